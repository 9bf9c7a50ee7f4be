"""``cs.io.read_he_cells``: a morphology-only MuData from an H&E slide and a nucleus-detection table."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import (
    IN_IMAGE_KEY,
    MOD_MORPH,
    NUCLEUS_CLASS_KEY,
    NUCLEUS_KEY,
    REG_ALIGNMENT,
    REG_HE_MPP,
    REG_HE_PATH,
    REG_PIXEL_SIZE,
    REG_XENIUM_PATH,
    SAMPLE_KEY,
    SAMPLES_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from .._registration import inside_image
from .._settings import logger
from .._validate import renamed_parameters
from ._nuclei import read_nuclei

if TYPE_CHECKING:
    from mudata import MuData

    from ._he import HEImage


@renamed_parameters(x="x_key", y="y_key", class_key="label_key")
def read_he_cells(
    he_image: str | os.PathLike | HEImage,
    nuclei: str | os.PathLike | pd.DataFrame,
    *,
    x_key: str = "x",
    y_key: str = "y",
    units: Literal["px", "um"] = "px",
    mpp: float | None = None,
    sample: str | None = None,
    id_key: str | None = None,
    label_key: str | None = None,
) -> MuData:
    """A morphology-only MuData from an H&E slide plus nucleus detections (slides without Xenium).

    Reads nucleus centroids from a CSV / TSV / parquet table (StarDist, QuPath measurement export,
    any table with centroid columns), a GeoJSON (QuPath, CellViT, StarDist: Point, Polygon, MultiPolygon
    and MultiPoint features, centroids of polygons computed exactly, ``classification`` kept), or a
    HoVer-Net json (``{"nuc": {id: {"centroid", "contour", "type"}}}``). The MuData has the layout of
    :func:`cellsymphony.io.read_xenium` for the ``"morphology"`` modality, and a registry whose
    alignment is the identity with ``pixel_size`` equal to the H&E's micrometres per pixel, so every
    morphology function works on it.

    Parameters
    ----------
    he_image
        The H&E slide (path or an opened :class:`~cellsymphony.io.HEImage`).
    nuclei
        Nucleus detections: a file as above or a DataFrame.
    x_key, y_key
        Centroid columns of a table; when absent, known column names (``centroid_x``, QuPath's
        ``Centroid X px`` / ``Centroid X µm``, ...) are tried.
    units
        Units of the table's centroids: ``"px"`` (level-0 H&E pixels) or ``"um"`` (micrometres).
        GeoJSON and HoVer-Net coordinates are pixels.
    mpp
        Micrometres per H&E pixel, when the file records none (or to override it).
    sample
        Sample id; default the slide's file name without extension.
    id_key
        Column of cell ids (default: ``cell_id`` / ``id`` / ``Object ID`` when present, else ``cell_<i>``).
    label_key
        Column (or GeoJSON property) of nucleus classes kept as ``obs["nucleus_class"]`` (default:
        ``class`` / ``type`` / ``Classification`` when present).

    Returns
    -------
    MuData with modality ``"morphology"``: X with zero columns; obs ``nucleus_area`` (um^2, NaN when
    unknown), ``cell_area`` (NaN), ``in_image``, ``sample`` (categorical), ``nucleus_class`` (when
    given); obsm ``spatial`` and ``nucleus_centroid`` (micrometres, x right, y down); and
    ``uns["cellsymphony"]["samples"][sample]`` with ``he_path``, identity ``alignment``, ``pixel_size``,
    ``he_mpp`` and an empty ``xenium_path``.
    """
    import anndata as ad
    import mudata as md

    from ._he import HEImage
    from ._read_he import read_he

    if units not in ("px", "um"):
        raise ValueError(f"units={units!r} is not one of ['px', 'um'].")
    he = he_image if isinstance(he_image, HEImage) else read_he(he_image, mpp=mpp)
    try:
        he_mpp = float(mpp) if mpp is not None else float(he.mpp)
        height, width = he.shapes[0]
        he_path = str(Path(he.path).resolve())
    finally:
        if he is not he_image:
            he.close()
    table = read_nuclei(nuclei, x=x_key, y=y_key, label=label_key, id_key=id_key, units=units, guess_columns=True,
                        label_arg="label_key")
    source, idk = table.attrs["source"], table.attrs["id_column"]
    xy = table[["x", "y"]].to_numpy(dtype=np.float64)
    xy_um = xy if table.attrs["units"] == "um" else xy * he_mpp
    ids = table["cell_id"].to_numpy()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: the ids in {idk!r} are not unique; pass id_key= another column or none.")
    sample = sample or Path(he_path).name.split(".")[0]

    n = len(table)
    obs = pd.DataFrame(index=pd.Index(ids, name="cell_id"))
    obs["cell_area"] = np.full(n, np.nan)
    obs["nucleus_area"] = table["area"].to_numpy(np.float64) * (he_mpp**2 if table.attrs["area_units"] == "px" else 1.0)
    if table["class"].notna().any():
        obs[NUCLEUS_CLASS_KEY] = pd.Categorical(table["class"].astype("string").fillna("unknown").to_numpy())
    inside = inside_image(xy_um / he_mpp, (height, width))
    obs[IN_IMAGE_KEY] = inside
    obs[SAMPLE_KEY] = pd.Categorical([sample] * n, categories=[sample])
    adata = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs)
    adata.obsm[SPATIAL_KEY] = xy_um.copy()
    adata.obsm[NUCLEUS_KEY] = xy_um.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mudata's pull_on_update notice, as in read_xenium
        mdata = md.MuData({MOD_MORPH: adata})
    mdata.obs[SAMPLE_KEY] = pd.Categorical([sample] * n, categories=[sample])
    mdata.obsm[SPATIAL_KEY] = xy_um.copy()
    mdata.obsm[NUCLEUS_KEY] = xy_um.copy()
    mdata.uns[UNS_KEY] = {
        SAMPLES_KEY: {
            sample: {
                REG_HE_PATH: he_path,
                REG_ALIGNMENT: np.eye(3),
                REG_PIXEL_SIZE: he_mpp,
                REG_HE_MPP: he_mpp,
                REG_XENIUM_PATH: "",
            }
        }
    }
    if (~inside).any():
        logger.warning("read_he_cells: %d of %d nuclei lie outside the H&E image (in_image False).", int((~inside).sum()), n)
    logger.info("read_he_cells: %d nuclei on %s (sample %r, %.4g um/px)", n, Path(he_path).name, sample, he_mpp)
    return mdata
