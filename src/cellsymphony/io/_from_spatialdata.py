"""``cs.io.from_spatialdata``: a SpatialData from ``spatialdata_io.xenium`` as the package's MuData."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._settings import logger
from ._build import Section, build
from ._he import HEImage
from ._read_xenium import _nothing_he
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
) -> MuData:
    """Convert a SpatialData made by :func:`spatialdata_io.xenium` into the package's MuData layout.

    The cell table becomes the ``"rna"`` modality (and ``"protein"`` where present), the nucleus
    boundaries give ``obsm["nucleus_centroid"]``, and the aligned H&E image element (``he_image``) with its
    affine transformation to ``coordinate_system`` gives the sample registry, exactly as
    :func:`~cellsymphony.io.read_xenium` lays them out.

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
        Sample id. ``None``: from the ``experiment.xenium`` beside the H&E file, else ``"sample"``.
    he_mpp
        Micrometres per H&E pixel, for image files that do not record it.

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
    pixel_size = float(pixel_size)

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

    nucleus = n_nuclei = None
    if nucleus_key is not None and nucleus_key in sdata.shapes:
        nucleus, n_nuclei = _nuclei_from_shapes(sdata.shapes[nucleus_key], ids)

    he = _he_from_element(
        sdata, image_key, he_path, coordinate_system, um_to_cs, pixel_size, he_mpp, get_transformation
    )
    if sample is None:
        sample = "sample"
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
    """Centroid of each cell's largest nucleus polygon (NaN where none) and the number of polygons."""
    idx, _ = to_cell_ids(np.asarray(gdf.index), "nucleus shapes")
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


def _he_from_element(sdata, image_key, he_path, cs, um_to_cs, pixel_size, he_mpp, get_transformation) -> dict:
    if image_key is False:
        return _nothing_he()
    if image_key is None:
        names = [k for k in sdata.images if str(k).endswith("he_image")]
        if len(names) > 1:
            raise ValueError(f"Several H&E image elements {names}; pass image_key=.")
        if not names:
            if he_path is not None:
                raise ValueError(
                    "he_path was given but the SpatialData has no H&E image element; pass image_key=."
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
        he_path = _source_file(level0)
        if he_path is None:
            raise ValueError(
                f"Cannot tell which file the image element {image_key!r} was read from (e.g. a SpatialData read "
                "back from .zarr). Pass he_path= (the H&E OME-TIFF on disk), or image_key=False."
            )
    # H&E pixel -> coordinate system -> micrometres -> morphology pixels
    alignment = np.diag([1 / pixel_size, 1 / pixel_size, 1.0]) @ np.linalg.inv(um_to_cs) @ he_to_cs
    from .._registration import check_alignment

    alignment = check_alignment(alignment, source=f"transformation of image {image_key!r}")
    with HEImage(he_path, mpp=he_mpp, cache_tiles=0) as he:
        shape = level0.shape
        dims = list(getattr(level0, "dims", ("c", "y", "x")))
        hw = (int(shape[dims.index("y")]), int(shape[dims.index("x")]))
        if tuple(he.shapes[0]) != hw:
            raise ValueError(
                f"{str(he.path)!r} is {he.shapes[0][1]} x {he.shapes[0][0]} pixels but the image element {image_key!r} "
                f"is {hw[1]} x {hw[0]}: pass the file the element was read from as he_path=."
            )
        return {
            "he_path": str(he.path.resolve()),
            "he_shape": he.shapes[0],
            "he_mpp": float(he.mpp),
            "alignment": alignment,
        }


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
        candidates = []
        if isinstance(value, str):
            candidates = [value]
        elif isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.size <= 4:
            candidates = [str(v) for v in value.ravel()]
        for c in candidates:
            if c.lower().endswith(_IMAGE_SUFFIXES) and os.path.isfile(c):
                return c
    return None
