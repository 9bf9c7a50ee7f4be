"""``cs.io.from_spatialdata``: a SpatialData from ``spatialdata_io.xenium`` as the package's MuData."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import MPP_RANGE
from .._settings import logger
from .._validate import check_mpp
from ._build import Section, build
from ._read_xenium import _nothing_he, he_fields
from ._xenium_files import (
    EXPERIMENT_FILE,
    GENE_EXPRESSION,
    default_sample_id,
    read_experiment,
    split_features,
    to_cell_ids,
)

if TYPE_CHECKING:
    from mudata import MuData
    from spatialdata import SpatialData

_IMAGE_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".svs")
RECORD_KEY = "cellsymphony_mudata"  # written by cs.io.to_spatialdata (io/_to_spatialdata.py)


def from_spatialdata(
    sdata: SpatialData,
    *,
    table_key: str = "table",
    image_key: str | Literal[False] | None = None,
    he_path: str | os.PathLike | None = None,
    nucleus_key: str | None = "nucleus_boundaries",
    coordinate_system: str = "global",
    pixel_size: float | None = None,
    sample: str | None = None,
    he_mpp: float | None = None,
    he_alignment: str | os.PathLike | np.ndarray | None = None,
) -> MuData:
    """Convert a SpatialData made by :func:`spatialdata_io.xenium` into the package's MuData layout.

    The cell table becomes the ``"rna"`` modality (and ``"protein"`` where present), the nucleus
    boundaries give ``obsm["nucleus_centroid"]``, and the aligned H&E image element (``he_image``) with its
    affine transformation to ``coordinate_system`` gives the sample registry, exactly as
    :func:`~cellsymphony.io.read_xenium` lays them out.

    A SpatialData written by :func:`~cellsymphony.io.to_spatialdata` (its table holds
    ``uns["cellsymphony_mudata"]``) is rebuilt exactly: every modality with its columns, embeddings and
    parameter records, the MuData's own results and the sample registry; the other arguments are then not
    used.

    Parameters
    ----------
    sdata
        The SpatialData, e.g. ``spatialdata_io.xenium(path)`` of a folder with a ``*he_image.ome.tif`` and its
        alignment CSV.
    table_key
        The table holding the cells.
    image_key
        The H&E image element. ``None``: the one element whose name ends in ``he_image`` (if any);
        ``False``: attach no H&E.
    he_path
        The H&E image file on disk (the package reads patches from the file lazily). ``None``: the file the
        element was read from (recorded by ``spatialdata_io``); pass it for a SpatialData read back from
        ``.zarr``.
    nucleus_key
        The shapes element with the nucleus polygons (``None`` to use the cell centroids).
    coordinate_system
        The coordinate system in which the shapes and the H&E are aligned (``"global"``: Xenium morphology
        pixels for ``spatialdata_io.xenium``).
    pixel_size
        Micrometres per morphology pixel. ``None``: from the transformation of the table's shapes.
    sample
        Sample id. ``None``: from the ``experiment.xenium`` beside the H&E file, else from the name of the
        table's region (``"S1_cell_boundaries"`` -> ``"S1"``), else ``"sample"``.
    he_mpp
        Micrometres per H&E pixel, for image files that do not record it.
    he_alignment
        The 3 x 3 affine H&E level-0 pixel -> Xenium morphology pixel (10x's ``*_he_imagealignment.csv`` or an
        array), used instead of the image element's transformation.

    Returns
    -------
    A MuData laid out like the result of :func:`~cellsymphony.io.read_xenium`: modalities ``"rna"``
    (``X`` counts of the "Gene Expression" features, ``obs`` the table's columns, control totals, ``n_nuclei``,
    ``sample``), ``"morphology"`` (``cell_area``, ``nucleus_area``, ``in_image``, ``n_nuclei``, ``sample``), and
    ``"protein"`` where present; ``obsm["spatial"]`` and ``obsm["nucleus_centroid"]`` (micrometres) on each;
    ``mdata.uns["cellsymphony"]["samples"][sample]``.
    """
    from spatialdata.transformations import get_transformation

    if table_key not in sdata.tables:
        raise ValueError(
            f"The SpatialData has no table {table_key!r} (it has {list(sdata.tables)}); pass table_key=."
        )
    table = sdata.tables[table_key]
    if RECORD_KEY in table.uns:
        return _from_record(table)
    if "cell_id" not in table.obs:
        raise ValueError(
            f"Table {table_key!r} has no obs['cell_id']; it does not come from spatialdata_io.xenium."
        )
    if "spatial" not in table.obsm:
        raise ValueError(f"Table {table_key!r} has no obsm['spatial'] (cell centroids in micrometres).")
    ids, _ = to_cell_ids(table.obs["cell_id"].to_numpy(), f"table {table_key!r}")
    if pd.Index(ids).has_duplicates:
        raise ValueError(f"Table {table_key!r} lists some cell ids more than once.")

    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    region = (
        region
        if isinstance(region, str)
        else (list(region)[0] if region is not None and len(region) else None)
    )
    um_to_cs = _um_to_cs(sdata, [region, nucleus_key], coordinate_system, get_transformation)
    if pixel_size is None:
        if um_to_cs is None:
            raise ValueError(
                "Cannot tell the Xenium pixel size: no shapes element with a transformation to "
                f"{coordinate_system!r}. Pass pixel_size= (micrometres per morphology pixel, 0.2125 for Xenium)."
            )
        pixel_size = float(1.0 / np.sqrt(abs(np.linalg.det(um_to_cs[:2, :2]))))
        lo, hi = MPP_RANGE
        if not lo <= pixel_size <= hi:
            raise ValueError(
                f"The transformation of the shapes to {coordinate_system!r} implies {pixel_size:.4g} um per morphology "
                f"pixel, outside [{lo}, {hi}]: the shapes are not in micrometres or {coordinate_system!r} is not the "
                "Xenium pixel frame. Pass coordinate_system= or pixel_size= (0.2125 for Xenium)."
            )
    pixel_size = check_mpp("pixel_size", pixel_size)

    # counts: the table's features, split by type like the reader does
    x = sparse.csr_matrix(table.X, dtype=np.float64)
    var = table.var
    feats = pd.DataFrame(
        {
            "id": var["gene_ids"].astype(str).to_numpy() if "gene_ids" in var else table.var_names.to_numpy(),
            "name": table.var_names.astype(str).to_numpy(),
            "feature_type": var["feature_types"].astype(str).to_numpy()
            if "feature_types" in var
            else np.full(table.n_vars, GENE_EXPRESSION),
        }
    )
    parts = split_features(x, feats)

    drop = {attrs.get("region_key"), "cell_labels"} - {None, "cell_id"}
    obs = table.obs.drop(columns=[c for c in drop if c in table.obs.columns]).reset_index(drop=True)
    obs["cell_id"] = ids
    obs = _xenium_dtypes(obs)

    nucleus = n_nuclei = None
    if nucleus_key is not None and nucleus_key in sdata.shapes:
        nucleus, n_nuclei = _nuclei_from_shapes(sdata.shapes[nucleus_key], ids)

    he = _he_from_element(
        sdata, image_key, he_path, coordinate_system, um_to_cs, pixel_size, he_mpp, get_transformation,
        he_alignment,
    )
    if sample is None:
        sample = _sample_from_names(region, list(sdata.images))
        if he["he_path"]:
            folder = Path(he["he_path"]).parent
            if (folder / EXPERIMENT_FILE).is_file():
                sample = default_sample_id(read_experiment(folder), folder)
    xenium_path = ""
    if he["he_path"] and (Path(he["he_path"]).parent / EXPERIMENT_FILE).is_file():
        xenium_path = str(Path(he["he_path"]).parent.resolve())

    section = Section(
        cell_ids=ids,
        obs=obs,
        spatial=np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2],
        gene_x=parts["gene_x"],
        gene_var=parts["gene_var"],
        protein_x=parts["protein_x"],
        protein_var=parts["protein_var"],
        controls=parts["controls"],
        nucleus=nucleus,
        n_nuclei=n_nuclei,
        sample=str(sample),
        pixel_size=pixel_size,
        xenium_path=xenium_path,
        **he,
    )
    mdata = build(section)
    logger.info("converted %d cells of sample %r from SpatialData", mdata.n_obs, section.sample)
    return mdata


def _affine(element, cs: str, get_transformation) -> np.ndarray | None:
    try:
        t = get_transformation(element, to_coordinate_system=cs)
    except Exception:
        return None
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _um_to_cs(sdata, names, cs: str, get_transformation) -> np.ndarray | None:
    """Affine from micrometres (the shapes' own units for spatialdata_io.xenium) to the coordinate system."""
    for name in names:
        if name is not None and name in sdata.shapes:
            m = _affine(sdata.shapes[name], cs, get_transformation)
            if m is not None:
                return m
    return None


def _nuclei_from_shapes(gdf, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid of each cell's largest nucleus polygon (NaN where none) and the number of polygons.

    The cell of a polygon is its ``cell_id`` column where there is one: spatialdata-io 0.7 indexes the
    nucleus shapes by nucleus label (1, 2, ...) and keeps the cell id in that column, while 0.6 indexed
    them by cell id. (An integer index read as cell ids would pair nuclei with the wrong cells.)"""
    owner = gdf["cell_id"].to_numpy() if "cell_id" in gdf.columns else np.asarray(gdf.index)
    idx, _ = to_cell_ids(owner, "nucleus shapes")
    geoms = gdf.geometry
    frame = pd.DataFrame(
        {
            "cell_id": idx,
            "area": geoms.area.to_numpy(),
            "cx": geoms.centroid.x.to_numpy(),
            "cy": geoms.centroid.y.to_numpy(),
        }
    )
    centroid = np.full((len(ids), 2), np.nan)
    n_nuclei = np.zeros(len(ids), dtype=np.int64)
    largest = frame.sort_values("area", ascending=False, kind="stable").drop_duplicates("cell_id")
    pos = pd.Index(ids).get_indexer(largest["cell_id"].to_numpy())
    ok = pos >= 0
    centroid[pos[ok]] = largest[["cx", "cy"]].to_numpy()[ok]
    counts = frame.groupby("cell_id", sort=False).size()
    cpos = pd.Index(ids).get_indexer(counts.index.to_numpy())
    n_nuclei[cpos[cpos >= 0]] = counts.to_numpy()[cpos >= 0]
    return centroid, n_nuclei


def _he_from_element(sdata, image_key, he_path, cs, um_to_cs, pixel_size, he_mpp, get_transformation,
                     he_alignment=None) -> dict:
    if image_key is False:
        return _nothing_he()
    if image_key is None:
        names = [k for k in sdata.images if str(k).endswith("he_image")]
        if len(names) > 1:
            raise ValueError(f"Several H&E image elements {names}; pass image_key=.")
        if not names:
            if he_path is not None or he_alignment is not None:
                raise ValueError(
                    f"he_path/he_alignment were given, but the SpatialData has no image element named '*he_image' "
                    f"(its images: {list(sdata.images) or 'none; it was written without images'}). Name the H&E "
                    "element with image_key=, or leave he_path/he_alignment out to convert without the H&E."
                )
            return _nothing_he()
        image_key = names[0]
    if image_key not in sdata.images:
        raise ValueError(f"The SpatialData has no image {image_key!r} (it has {list(sdata.images)}).")
    element = sdata.images[image_key]
    he_to_cs = _affine(element, cs, get_transformation)
    if he_to_cs is None:
        raise ValueError(
            f"Image {image_key!r} has no transformation to the coordinate system {cs!r}; pass coordinate_system=."
        )
    level0 = _level0(element)
    if he_path is None:
        he_path = element.attrs.get("cellsymphony_source") or _source_file(level0)
        if he_path is not None and not os.path.isfile(he_path):
            he_path = None
        if he_path is None:
            raise ValueError(
                f"Cannot tell which file the image element {image_key!r} was read from (e.g. a SpatialData read "
                "back from .zarr). Pass he_path= (the H&E OME-TIFF on disk), or image_key=False."
            )
    from .._registration import check_alignment

    if he_alignment is not None:
        from ._xenium_files import read_alignment

        alignment = read_alignment(he_alignment)
    elif um_to_cs is None:
        raise ValueError(
            f"Cannot place image {image_key!r} on the cells: no shapes element has a transformation to "
            f"{cs!r}. Pass he_alignment= (10x's *_he_imagealignment.csv), or image_key=False."
        )
    else:
        # H&E pixel -> coordinate system -> micrometres -> morphology pixels
        alignment = np.diag([1 / pixel_size, 1 / pixel_size, 1.0]) @ np.linalg.inv(um_to_cs) @ he_to_cs
        alignment = check_alignment(alignment, source=f"transformation of image {image_key!r}")
    dims = list(getattr(level0, "dims", ("c", "y", "x")))
    hw = (int(level0.shape[dims.index("y")]), int(level0.shape[dims.index("x")]))
    return he_fields(he_path, alignment, pixel_size, he_mpp=he_mpp, expect_shape=hw, element=str(image_key))


def _level0(element) -> Any:
    """The full-resolution DataArray of a (multiscale) image element."""
    if hasattr(element, "children") and element.children:
        first = sorted(element.children)[0]
        node = element[first]
        return node[next(iter(node.data_vars))]
    return element


def _source_file(data_array) -> str | None:
    """The image file named in the dask graph of an element read by spatialdata_io (dask_image.imread)."""
    data = getattr(data_array, "data", None)
    if data is None or not hasattr(data, "__dask_graph__"):
        return None
    try:
        graph = dict(data.__dask_graph__())
    except Exception:
        return None
    for value in graph.values():
        for c in _strings(value, depth=0):
            if c.lower().endswith(_IMAGE_SUFFIXES) and os.path.isfile(c):
                return c
    return None


def _strings(value, depth: int):
    """The strings (and paths) inside a dask graph value: tasks are tuples, readers keep paths in objects."""
    if depth > 4:
        return
    if isinstance(value, str | os.PathLike):
        yield os.fspath(value)
    elif isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.size <= 4:
        yield from (str(v) for v in value.ravel())
    elif isinstance(value, tuple | list):
        for v in value[:8]:
            yield from _strings(v, depth + 1)
    elif isinstance(value, dict):
        for v in list(value.values())[:8]:
            yield from _strings(v, depth + 1)
    else:  # a reader object (tifffile store, openslide wrapper, task object) that keeps its file name
        for attr in ("args", "path", "filename", "_filename", "_path", "file", "fname"):
            v = getattr(value, attr, None)
            if v is not None and v is not value:
                yield from _strings(v, depth + 1)


_REGION_SUFFIXES = ("cell_boundaries", "cell_circles", "cell_labels", "he_image", "morphology_focus")


def _sample_from_names(region, image_names) -> str:
    """The sample id in element names such as ``"S1_cell_boundaries"``; ``"sample"`` when there is none."""
    for name in [region, *image_names]:
        if not name:
            continue
        for suffix in _REGION_SUFFIXES:
            name = str(name)
            if name.endswith(suffix) and len(name) > len(suffix) + 1 and name[-len(suffix) - 1] in "_-":
                return name[: -len(suffix) - 1]
    return "sample"


# the dtypes cs.io.read_xenium gives the cells-table columns (spatialdata_io casts some of them)
_INT_COLUMNS = ("nucleus_count", "transcript_counts", "total_counts", "z_level")


def _xenium_dtypes(obs: pd.DataFrame) -> pd.DataFrame:
    for col in obs.columns:
        s = obs[col]
        if (col in _INT_COLUMNS or col.endswith("_counts")) and pd.api.types.is_numeric_dtype(s):
            v = s.to_numpy()
            if np.isfinite(v).all() and np.all(v == np.round(v)):
                obs[col] = v.astype(np.int64)
    return obs


def _from_record(table) -> MuData:
    """The MuData written by cs.io.to_spatialdata, rebuilt from its table."""
    import anndata as ad
    import mudata as md

    from .._constants import SAMPLE_KEY, SAMPLES_KEY, UNS_KEY
    from ._spatial_uns import attach_spatial_images

    rec = table.uns[RECORD_KEY]
    names = table.obs_names.astype(str)
    mods = {}
    for mod, cols in rec["obs"].items():
        if mod == "_joint":
            continue
        obs = pd.DataFrame(
            {str(n): table.obs[str(t)].to_numpy() for n, t in zip(cols["names"], cols["table"], strict=True)},
            index=names,
        )
        for n, t in zip(cols["names"], cols["table"], strict=True):
            if isinstance(table.obs[str(t)].dtype, pd.CategoricalDtype):
                obs[str(n)] = table.obs[str(t)].to_numpy()
                obs[str(n)] = pd.Categorical(obs[str(n)], categories=table.obs[str(t)].cat.categories)
        var = rec["var"][mod]
        xk = rec["X"].get(mod)
        if xk == "X":
            x = table.X
        elif xk is not None:
            x = np.asarray(table.obsm[str(xk)], dtype=np.float32)
        else:
            x = np.zeros((table.n_obs, 0), dtype=np.float32)
        om = rec["obsm"].get(mod, {"names": [], "table": []})
        a = ad.AnnData(
            X=x, obs=obs, var=var,
            obsm={str(n): np.asarray(table.obsm[str(t)]) for n, t in zip(om["names"], om["table"], strict=True)},
            uns=dict(rec["uns"].get(mod, {})),
        )  # fmt: skip
        if xk == "X":
            for k, v in table.layers.items():
                a.layers[k] = v
        mods[str(mod)] = a
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = md.MuData(mods)
        mdata.update()
    joint = rec["obs"]["_joint"]
    for n, t in zip(joint["names"], joint["table"], strict=True):
        mdata.obs[str(n)] = table.obs[str(t)].reindex(mdata.obs_names).to_numpy()
        if isinstance(table.obs[str(t)].dtype, pd.CategoricalDtype):
            mdata.obs[str(n)] = pd.Categorical(mdata.obs[str(n)], categories=table.obs[str(t)].cat.categories)
    jm = rec["obsm"]["_joint"]
    for n in jm["names"]:
        mdata.obsm[str(n)] = np.asarray(table.obsm[str(n)])
    mdata.uns.update({k: v for k, v in table.uns.items() if k not in (RECORD_KEY, "spatialdata_attrs")})
    for s in mdata.uns.get(UNS_KEY, {}).get(SAMPLES_KEY, {}):
        if SAMPLE_KEY in mdata.obs and (mdata.obs[SAMPLE_KEY].astype(str) == s).any():
            he = str(mdata.uns[UNS_KEY][SAMPLES_KEY][s].get("he_path", "") or "")
            if not he or os.path.isfile(he):
                attach_spatial_images(mdata, s)
    logger.info("rebuilt the MuData of %d cells from its SpatialData table", mdata.n_obs)
    return mdata
