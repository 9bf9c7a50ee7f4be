"""``cs.io.to_spatialdata``: the MuData and its section images as a SpatialData, for napari and spatialdata-plot."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import (
    MOD_RNA,
    REG_ALIGNMENT,
    REG_HE_PATH,
    REG_PIXEL_SIZE,
    REG_XENIUM_PATH,
    SAMPLE_KEY,
    SPATIAL_KEY,
)
from .._settings import logger
from .._validate import check_choice, sample_registry
from ._spatial_uns import SPATIAL_UNS
from ._xenium_files import to_cell_ids

if TYPE_CHECKING:
    from mudata import MuData
    from spatialdata import SpatialData

from ._from_spatialdata import RECORD_KEY  # table.uns: where each column came from, to rebuild the MuData

CELL_BOUNDARIES = "cell_boundaries"
CELL_CIRCLES = "cell_circles"
NUCLEUS_BOUNDARIES = "nucleus_boundaries"
HE_IMAGE = "he_image"
DAPI_IMAGE = "morphology_focus"
# the DAPI image of each Xenium software generation, as spatialdata_io.xenium reads it
_DAPI_FILES = ("morphology_focus/morphology_focus_0000.ome.tif", "morphology_focus.ome.tif", "morphology_mip.ome.tif")


def to_spatialdata(
    mdata: MuData,
    *,
    sample: str | list[str] | None = None,
    shapes: Literal["boundaries", "circles"] = "boundaries",
    images: bool = True,
    path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> SpatialData:
    """The MuData as a SpatialData: H&E and DAPI images, cell and nucleus shapes, one table of every result.

    The layout is that of :func:`spatialdata_io.xenium`, so that an object read from the Xenium folder and
    this one overlay without transformations: shapes in micrometres with a scale to the coordinate system
    ``"global"`` (Xenium morphology pixels), the DAPI image with the identity, the H&E (``"he_image"``) with
    its alignment as an affine. With several samples each has its own coordinate system (named after the
    sample) and its elements are prefixed ``"{sample}_"``. Images are opened lazily from their files (only
    the file headers are read); writing the SpatialData streams them level by level.

    Parameters
    ----------
    mdata
        The MuData of :func:`~cellsymphony.io.read_xenium` (or :func:`~cellsymphony.io.concat`), with any
        results.
    sample
        Sample id (or list of them) to export; ``None``: every sample.
    shapes
        ``"boundaries"``: the cell polygons of the Xenium folder's ``cell_boundaries.parquet`` (circles, with a
        warning, where the folder has none); ``"circles"``: circles of each cell's area at its centroid.
    images
        Add the H&E (and the Xenium DAPI image where the folder has one). A sample without an H&E gets none,
        with a warning.
    path
        Also write the SpatialData to this ``.zarr`` folder (into a temporary sibling, renamed into place when
        complete) and return the object read back from it.
    overwrite
        Replace an existing ``path``.

    Returns
    -------
    A SpatialData with, per sample, images ``he_image`` (and ``morphology_focus``), shapes ``cell_boundaries``
    (or ``cell_circles``) and ``nucleus_boundaries``, and the table ``"table"`` annotating the cell shapes
    (``region`` / ``cell_id``): ``X`` and ``layers`` of the ``"rna"`` modality; ``obs`` the columns of every
    modality and the MuData's own (``cs_pred``, ``cs_niche``, labels; a column that differs between modalities
    as ``"mod:column"``); ``obsm`` every embedding and probability matrix (class names in
    ``uns[key]["classes"]``); ``uns`` the MuData's parameter records and registry, and ``uns["cellsymphony_mudata"]``,
    from which :func:`~cellsymphony.io.from_spatialdata` rebuilds the MuData.
    """
    import spatialdata as sd

    check_choice("shapes", shapes, ("boundaries", "circles"))
    if type(mdata).__name__ != "MuData":
        raise TypeError(f"cs.io.to_spatialdata takes the MuData of cs.io.read_xenium, got {type(mdata).__name__}.")
    out_path = None
    if path is not None:
        out_path = Path(path)
        if out_path.exists() and not overwrite:
            raise FileExistsError(f"{str(out_path)!r} exists; pass overwrite=True to replace it.")
    samples = _pick_samples(mdata, sample)
    multi = len(samples) > 1
    obs_sample = mdata.obs[SAMPLE_KEY].astype(str).to_numpy()
    keep = np.isin(obs_sample, samples)
    sub = mdata[keep].copy() if not keep.all() else mdata
    obs_sample = obs_sample[keep]
    ids = _original_ids(sub)

    shape_elems: dict[str, Any] = {}
    image_elems: dict[str, Any] = {}
    regions = np.empty(sub.n_obs, dtype=object)
    for s in samples:
        reg = sample_registry(sub, s)
        cs_name = s if multi else "global"
        pre = f"{s}_" if multi else ""
        pixel_size = float(reg[REG_PIXEL_SIZE])
        rows = np.flatnonzero(obs_sample == s)
        folder = Path(str(reg.get(REG_XENIUM_PATH, "") or "")) if reg.get(REG_XENIUM_PATH) else None
        name, elem = _cell_shapes(sub, rows, ids[rows], folder, shapes, pixel_size, cs_name, s)
        shape_elems[pre + name] = elem
        regions[rows] = pre + name
        if folder is not None and (folder / "nucleus_boundaries.parquet").is_file():
            shape_elems[pre + NUCLEUS_BOUNDARIES] = _polygons(
                folder / "nucleus_boundaries.parquet", ids[rows], pixel_size, cs_name, unique=False
            )
        if images:
            image_elems.update({pre + k: v for k, v in _images(reg, folder, cs_name, s).items()})

    table = _table(sub, ids, regions)
    sdata = sd.SpatialData(images=image_elems, shapes=shape_elems, tables={"table": table})
    logger.info(
        "built a SpatialData of %d cells, samples %s: images %s, shapes %s",
        sub.n_obs, samples, list(image_elems), list(shape_elems),
    )  # fmt: skip
    if out_path is None:
        return sdata
    return write_zarr(sdata, out_path, overwrite=overwrite)


def write_zarr(sdata: SpatialData, path: str | os.PathLike, *, overwrite: bool = False) -> SpatialData:
    """Write a SpatialData into a temporary sibling of ``path``, rename it into place, return it read back."""
    import spatialdata as sd

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it.")
    with atomic_dir(path) as tmp:
        sdata.write(tmp)
    logger.info("wrote the SpatialData to %s", path)
    return sd.read_zarr(path)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path``, on error it is removed."""
    from .._utils import partial_tag, remove_stale_partials

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path, marker="partial-")  # the folders of earlier writes that were killed
    if path.exists():  # an "old-" folder is the only copy while path is missing (killed mid-swap)
        remove_stale_partials(path, marker="old-")
    tmp = path.parent / f".{path.name}.partial-{partial_tag()}"
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{partial_tag()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- samples and ids
def _pick_samples(mdata, sample) -> list[str]:
    if SAMPLE_KEY not in mdata.obs:
        raise ValueError(
            f"The MuData has no obs[{SAMPLE_KEY!r}]: read it with cs.io.read_xenium (or cs.io.concat), which records "
            "each cell's section."
        )
    present = list(dict.fromkeys(mdata.obs[SAMPLE_KEY].astype(str)))
    if sample is None:
        return present
    wanted = [sample] if isinstance(sample, str) else [str(s) for s in sample]
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise ValueError(f"Unknown sample(s) {unknown}: the MuData holds samples {present} (obs['sample']).")
    return wanted


def _original_ids(mdata) -> np.ndarray:
    """The Xenium cell ids (``obs["cell_id"]``, which cs.io.concat keeps when it prefixes obs_names)."""
    for a in mdata.mod.values():
        if "cell_id" in a.obs:
            return a.obs["cell_id"].reindex(mdata.obs_names).astype(str).to_numpy()
    return mdata.obs_names.astype(str).to_numpy()


# ---------------------------------------------------------------------- shapes
def _scale(pixel_size: float):
    from spatialdata.transformations import Scale

    return Scale([1.0 / pixel_size, 1.0 / pixel_size], axes=("x", "y"))


def _cell_shapes(mdata, rows, ids, folder, shapes, pixel_size, cs_name, sample):
    if shapes == "boundaries":
        if folder is not None and (folder / "cell_boundaries.parquet").is_file():
            return CELL_BOUNDARIES, _polygons(folder / "cell_boundaries.parquet", ids, pixel_size, cs_name)
        warnings.warn(
            f"Sample {sample!r} has no cell_boundaries.parquet (Xenium folder {str(folder or '')!r}); its cells are "
            "circles of their area instead (shapes='circles').",
            UserWarning,
            stacklevel=3,
        )
    return CELL_CIRCLES, _circles(mdata, rows, ids, pixel_size, cs_name)


def _circles(mdata, rows, ids, pixel_size, cs_name):
    from spatialdata.models import ShapesModel

    xy = np.asarray(mdata.obsm[SPATIAL_KEY], dtype=np.float64)[rows]
    area = None
    for a in mdata.mod.values():
        if "cell_area" in a.obs:
            area = a.obs["cell_area"].reindex(mdata.obs_names[rows]).to_numpy(np.float64)
            break
    if area is None or not np.isfinite(area).any():
        area = np.full(len(rows), np.pi * 5.0**2)
    fallback = np.nanmedian(area) if np.isfinite(area).any() else np.pi * 25.0
    radius = np.sqrt(np.where(np.isfinite(area) & (area > 0), area, fallback) / np.pi)
    return ShapesModel.parse(
        xy, geometry=0, radius=radius, index=pd.Index(ids), transformations={cs_name: _scale(pixel_size)}
    )


def _polygons(file: Path, ids: np.ndarray, pixel_size: float, cs_name: str, *, unique: bool = True):
    """The polygons of a Xenium boundaries parquet for the cells ``ids``, in their order (vectorised)."""
    import geopandas as gpd
    import pyarrow.parquet as pq
    import shapely
    from spatialdata.models import ShapesModel

    tab = pq.read_table(file, columns=["cell_id", "vertex_x", "vertex_y"])
    col = tab.column("cell_id").combine_chunks()
    enc = col.dictionary_encode() if not hasattr(col, "dictionary") else col
    codes = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    names, _ = to_cell_ids(enc.dictionary.to_numpy(zero_copy_only=False), str(file))
    x = tab.column("vertex_x").to_numpy()
    y = tab.column("vertex_y").to_numpy()
    # one polygon per run of rows with the same cell id (Xenium writes each polygon's vertices together)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    lengths = np.diff(np.r_[starts, len(codes)])
    run = np.repeat(np.arange(len(starts)), lengths)
    run_cell = codes[starts]
    good = lengths >= 4
    if not good.all():
        keep_rows = good[run]
        x, y, run = x[keep_rows], y[keep_rows], np.cumsum(np.r_[0, np.diff(run[keep_rows]) != 0])
        run_cell = run_cell[good]
    ring_offsets = np.r_[0, np.cumsum(np.bincount(run, minlength=len(run_cell)))]
    polys = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, np.column_stack([x, y]).astype(np.float64),
        (ring_offsets, np.arange(len(run_cell) + 1)),
    )  # fmt: skip
    pos = pd.Index(ids).get_indexer(names[run_cell])  # each polygon's row among the cells
    inside = pos >= 0
    polys, pos = polys[inside], pos[inside]
    if unique:
        first = ~pd.Series(pos).duplicated().to_numpy()
        polys, pos = polys[first], pos[first]
        order = np.argsort(pos, kind="stable")
        geoms, index = polys[order], np.asarray(ids)[pos[order]]
    else:
        order = np.argsort(pos, kind="stable")
        polys, pos = polys[order], pos[order]
        if pd.Series(pos).duplicated().any():  # several nuclei in a cell: one MultiPolygon per cell
            cell_pos, inv = np.unique(pos, return_inverse=True)
            geoms = shapely.multipolygons(polys, indices=inv)
            index = np.asarray(ids)[cell_pos]
        else:
            geoms, index = polys, np.asarray(ids)[pos]
    n_missing = len(ids) - len(pd.unique(index))
    if n_missing:
        logger.info("%s: %d of %d cells have no polygon", file.name, n_missing, len(ids))
    gdf = gpd.GeoDataFrame(geometry=geoms, index=pd.Index(index.astype(str)))
    return ShapesModel.parse(gdf, transformations={cs_name: _scale(pixel_size)})


# ---------------------------------------------------------------------- images
def _images(reg: dict, folder: Path | None, cs_name: str, sample: str) -> dict:
    from spatialdata.transformations import Affine, Identity

    out = {}
    he_path = str(reg.get(REG_HE_PATH, "") or "")
    alignment = np.asarray(reg.get(REG_ALIGNMENT, np.full((3, 3), np.nan)), dtype=np.float64)
    if he_path and Path(he_path).is_file() and np.isfinite(alignment).all():
        out[HE_IMAGE] = lazy_image(
            he_path, Affine(alignment, input_axes=("x", "y"), output_axes=("x", "y")), cs_name, rgb=True
        )
    else:
        why = "no H&E attached" if not he_path else f"H&E file {he_path!r} not found"
        warnings.warn(
            f"Sample {sample!r} has {why}: the SpatialData has no H&E image for it.", UserWarning, stacklevel=3
        )
    if folder is not None:
        for rel in _DAPI_FILES:
            if (folder / rel).is_file():
                out[DAPI_IMAGE] = lazy_image(folder / rel, Identity(), cs_name, rgb=False)
                break
    return out


def lazy_image(file: str | os.PathLike, transform, cs_name: str, *, rgb: bool):
    """An image element of a (pyramidal) TIFF file: one dask array per pyramid level, no pixel read."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.models.pyramids_utils import dask_arrays_to_datatree
    from spatialdata.transformations import set_transformation

    from ._he import HEImage

    he = HEImage(file, mpp=1.0, cache_tiles=0)  # the pixel size does not matter here
    levels = []
    for arr, lay in zip(he._arrays, he._layouts, strict=True):
        d = da.from_array(arr, chunks=arr.chunks, asarray=False, lock=False, inline_array=True)
        d = d[tuple(lay["fixed"])]
        kept = [i for i, f in enumerate(lay["fixed"]) if isinstance(f, slice)]  # axes left, in order
        yi, xi = kept.index(lay["y"]), kept.index(lay["x"])
        if lay["c"] is not None:
            ci = kept.index(lay["c"])
            d = da.moveaxis(d, [ci, yi, xi], [0, 1, 2])
        else:
            d = da.moveaxis(d, [yi, xi], [0, 1])[None]
        if rgb and d.shape[0] == 4:
            d = d[:3]
        levels.append(d)
    # the levels must halve (or so) in size; drop any that do not shrink
    kept_levels = [levels[0]]
    for d in levels[1:]:
        if d.shape[1] < kept_levels[-1].shape[1] and d.shape[2] < kept_levels[-1].shape[2]:
            kept_levels.append(d)
    n_c = kept_levels[0].shape[0]
    channels = ["r", "g", "b"] if rgb and n_c == 3 else (["DAPI"] if n_c == 1 else [f"c{i}" for i in range(n_c)])
    tree = dask_arrays_to_datatree(kept_levels, dims=("c", "y", "x"), channels=channels)
    set_transformation(tree, {cs_name: transform}, set_all=True)
    Image2DModel().validate(tree)
    elem = tree
    elem.attrs["cellsymphony_source"] = str(Path(file).resolve())
    return elem


# ---------------------------------------------------------------------- table
def _table(mdata, ids: np.ndarray, regions: np.ndarray):
    import anndata as ad
    from spatialdata.models import TableModel

    rna = mdata[MOD_RNA] if MOD_RNA in mdata.mod else next(iter(mdata.mod.values()))
    names = mdata.obs_names
    obs = pd.DataFrame(index=names.astype(str))
    record: dict[str, Any] = {"obs": {}, "obsm": {}, "uns": {}, "X": {}, "var": {}}

    def add_col(values: pd.Series, name: str, mod: str) -> str:
        target = name
        if name in obs.columns and not _same_values(obs[name], values):
            target = f"{mod}:{name}"
        if target not in obs.columns:
            obs[target] = values
        return target

    # the MuData's own columns first (cs_pred, ...), then each modality's
    own = [c for c in mdata.obs.columns if not any(c.startswith(f"{m}:") for m in mdata.mod)]
    record["obs"]["_joint"] = _pairs(own, [add_col(mdata.obs[c], c, "mudata") for c in own])
    for mod, a in mdata.mod.items():
        cols = list(a.obs.columns)
        frame = a.obs.reindex(names)
        record["obs"][mod] = _pairs(cols, [add_col(frame[c], c, mod) for c in cols])
    obs["cell_id"] = ids
    obs["region"] = pd.Categorical(regions.astype(str))

    obsm: dict[str, np.ndarray] = {}
    joint_keys = [k for k in mdata.obsm if k not in mdata.mod]
    record["obsm"]["_joint"] = _pairs(joint_keys, joint_keys)
    for k in joint_keys:
        obsm[k] = _dense(mdata.obsm[k])
    for mod, a in mdata.mod.items():
        targets = []
        pos = a.obs_names.get_indexer(names)
        for k in a.obsm:
            v = _dense(a.obsm[k])
            full = _take(v, pos)
            t = k if k not in obsm or _same_values(obsm[k], full) else f"{mod}:{k}"
            obsm.setdefault(t, full)
            targets.append(t)
        record["obsm"][mod] = _pairs(list(a.obsm), targets)
        record["uns"][mod] = {k: v for k, v in a.uns.items() if k != SPATIAL_UNS}
        record["var"][mod] = a.var.copy()
        if a is not rna and a.n_vars:
            xk = f"{mod}:X"
            obsm[xk] = _take(_dense(a.X), pos)
            record["X"][mod] = xk
    record["X"][MOD_RNA if MOD_RNA in mdata.mod else next(iter(mdata.mod))] = "X"

    pos = rna.obs_names.get_indexer(names)
    if not (pos >= 0).all():
        raise ValueError("Some cells of the MuData are not in its 'rna' modality; call mdata.update() first.")
    table = ad.AnnData(
        X=rna.X[pos] if not np.array_equal(pos, np.arange(len(pos))) else rna.X,
        obs=obs,
        var=rna.var.copy(),
        obsm=obsm,
        layers={k: (v if np.array_equal(pos, np.arange(len(pos))) else v[pos]) for k, v in rna.layers.items()},
        uns={k: v for k, v in mdata.uns.items()},
    )
    table.uns[RECORD_KEY] = record
    region = [str(r) for r in pd.unique(regions.astype(str))]
    return TableModel.parse(
        table, region=region[0] if len(region) == 1 else region, region_key="region", instance_key="cell_id"
    )


def _pairs(cols: list[str], targets: list[str]) -> dict:
    return {"names": np.asarray(cols, dtype=object).astype(str), "table": np.asarray(targets, dtype=object).astype(str)}


def _dense(v) -> np.ndarray:
    if hasattr(v, "toarray"):
        return v.toarray()
    if isinstance(v, pd.DataFrame):
        return v.to_numpy()
    return np.asarray(v)


def _take(v: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows ``pos`` of ``v`` (NaN where -1); ``v`` itself, not a copy, when already in that order."""
    if len(pos) == len(v) and np.array_equal(pos, np.arange(len(pos))):
        return v
    return v[pos] if (pos >= 0).all() else _fill(v, pos)


def _fill(v: np.ndarray, pos: np.ndarray) -> np.ndarray:
    out = np.full((len(pos), *v.shape[1:]), np.nan)
    out[pos >= 0] = v[pos[pos >= 0]]
    return out


def _same_values(a, b) -> bool:
    try:
        a = a.to_numpy() if hasattr(a, "to_numpy") else np.asarray(a)
        b = b.to_numpy() if hasattr(b, "to_numpy") else np.asarray(b)
        if a.shape != b.shape:
            return False
        return bool(pd.Series(a.ravel()).equals(pd.Series(b.ravel())) or np.array_equal(a, b, equal_nan=True))
    except (TypeError, ValueError):
        return False
