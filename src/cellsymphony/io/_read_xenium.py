"""``cs.io.read_xenium``: a Xenium output folder (plus its H&E) as a MuData."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._errors import require_dir, require_file
from .._registration import he_px_per_um
from .._settings import logger
from ._build import Section, build
from ._he import HEImage
from ._xenium_files import (
    check_cells_zarr_ids,
    check_centroids,
    default_sample_id,
    find_he_files,
    find_matrix,
    morphology_extent,
    pixel_size_of,
    read_alignment,
    read_cells_table,
    read_experiment,
    read_matrix,
    read_nucleus_centroids,
    sibling_alignment,
    split_features,
)

if TYPE_CHECKING:
    from mudata import MuData


def read_xenium(
    path: str | os.PathLike,
    *,
    he_image: str | os.PathLike | HEImage | Literal[False] | None = None,
    he_alignment: str | os.PathLike | np.ndarray | Literal["auto"] | None = None,
    sample: str | None = None,
    he_mpp: float | None = None,
    nucleus_boundaries: bool = True,
) -> MuData:
    """Read a 10x Xenium output folder, and its post-Xenium H&E, into a MuData.

    Only ``experiment.xenium``, a cells table (``cells.parquet``, preferred, or ``cells.csv.gz``) and a
    count matrix (``cell_feature_matrix.h5``, the ``cell_feature_matrix/`` MEX folder or
    ``cell_feature_matrix.zarr.zip``) are required. Integer cell ids (Xenium < 1.3) and string ids
    (``aaabbbcc-1``, possibly stored as bytes) are both read, detected by their type. The H&E is opened
    lazily to learn its size and pixel size; it is never loaded.

    Parameters
    ----------
    path
        The Xenium output folder (the one holding ``experiment.xenium``).
    he_image
        The H&E image (pyramidal OME-TIFF, SVS or tiled TIFF; a path or an opened
        :class:`~cellsymphony.io.HEImage`). ``None``: the folder's ``*he_image.ome.tif`` if there is one.
        ``False``: attach no H&E.
    he_alignment
        The 3 x 3 affine mapping H&E level-0 pixels ``(x, y, 1)`` to Xenium morphology pixels: a path to
        10x's ``*_he_imagealignment.csv`` (no header) or an array. ``None``: the folder's
        ``*he_imagealignment.csv``, or the CSV named after the H&E file (``X_he_image.ome.tif`` ->
        ``X_he_imagealignment.csv``). Required when an H&E is attached. ``"auto"``: register the H&E to the
        section with :func:`cellsymphony.io.register_he` (DAPI image and nuclei, no file needed); a
        registration that fails its QC raises a ``ValueError`` quoting the QC, and the registry then also
        holds the per-cell ``obs["registration_error_um"]`` and ``uns["he_registration"]``.
    sample
        Sample id of this section. Default: ``region_name`` of ``experiment.xenium``, else its ``run_name``,
        else the folder name.
    he_mpp
        Micrometres per H&E pixel at level 0. Default: the image's own record, else the value implied by the
        alignment's scale. A recorded value more than 10% away from the alignment's raises a warning.
    nucleus_boundaries
        Read ``nucleus_boundaries.parquet`` (when present) for the nucleus centroids.

    Returns
    -------
    A MuData with modalities:

    ``"rna"``
        ``X`` raw counts (CSR, float32) of the "Gene Expression" features; ``var_names`` gene symbols,
        ``var["gene_ids"]``, ``var["feature_types"]``; ``obs`` the per-cell columns of the cells table
        (``cell_id``, ``transcript_counts``, ``cell_area``, ``nucleus_area``, ...), the per-cell totals of
        each control feature type of the matrix (``control_probe_counts``, ``control_codeword_counts``,
        ``genomic_control_counts``, ``unassigned_codeword_counts``, ``deprecated_codeword_counts``),
        ``n_nuclei`` and ``sample`` (categorical).
    ``"morphology"``
        ``X`` with zero columns (embeddings go to ``.obsm``); ``obs["cell_area"]``, ``obs["nucleus_area"]``,
        ``obs["in_image"]`` (nucleus centroid inside the H&E), ``obs["n_nuclei"]``, ``obs["sample"]``.
    ``"protein"``
        Only when the matrix has "Protein Expression" features: their values (the file's scaling undone).

    Every modality (and the MuData) has ``obsm["spatial"]`` (cell centroid, micrometres) and
    ``obsm["nucleus_centroid"]`` (centroid of the cell's largest nucleus polygon; the cell centroid where
    there is none). ``obs_names`` are the cell ids as strings. ``mdata.obs["sample"]`` and
    ``mdata.uns["cellsymphony"]["samples"][sample]`` with ``he_path``, ``alignment``, ``pixel_size``,
    ``he_mpp`` and ``xenium_path`` (``he_path`` ``""`` and NaN alignment / ``he_mpp`` without an H&E).

    Examples
    --------
    >>> import cellsymphony as cs
    >>> mdata = cs.io.read_xenium("outs/")  # doctest: +SKIP
    """
    if isinstance(he_alignment, str) and he_alignment == "auto":
        return _read_xenium_auto(path, he_image=he_image, sample=sample, he_mpp=he_mpp,
                                nucleus_boundaries=nucleus_boundaries)
    folder = require_dir(path, "the Xenium folder", "Pass the Xenium output folder (the one holding "
                         "experiment.xenium).")  # fmt: skip
    specs = read_experiment(folder)
    pixel_size = pixel_size_of(specs, str(folder / "experiment.xenium"))
    table, table_path = read_cells_table(folder)
    ids = table["cell_id"].to_numpy()
    spatial = table[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    extent, extent_source = morphology_extent(folder, pixel_size)
    check_centroids(spatial, ids, table_path, extent_um=extent, extent_source=extent_source)
    matrix_path = find_matrix(folder)
    x, feats, matrix_ids = read_matrix(matrix_path)

    x = _match_cells(ids, matrix_ids, x, table, table_path, matrix_path)
    check_cells_zarr_ids(folder, ids, table_path)
    parts = split_features(x, feats)
    del x  # the genes were copied out: free the whole matrix before the MuData is built
    if parts["gene_x"].shape[1] == 0:
        raise ValueError(
            f"{str(matrix_path)!r} has no 'Gene Expression' features (feature types: "
            f"{sorted(set(feats['feature_type']))}); it is not a Xenium gene-expression matrix."
        )

    nuclei = read_nucleus_centroids(folder, ids, spatial) if nucleus_boundaries else None
    he = _attach_he(folder, he_image, he_alignment, he_mpp, pixel_size)

    obs = table.drop(columns=["x_centroid", "y_centroid"])
    section = Section(
        cell_ids=ids,
        obs=obs,
        spatial=spatial,
        gene_x=parts["gene_x"],
        gene_var=parts["gene_var"],
        protein_x=parts["protein_x"],
        protein_var=parts["protein_var"],
        controls=parts["controls"],
        nucleus=None if nuclei is None else nuclei[0],
        n_nuclei=None if nuclei is None else nuclei[1],
        sample=str(sample) if sample is not None else default_sample_id(specs, folder),
        pixel_size=pixel_size,
        xenium_path=str(folder.resolve()),
        **he,
    )
    mdata = build(section)
    logger.info(
        "read %d cells x %d genes of sample %r from %s%s",
        mdata.n_obs,
        mdata["rna"].n_vars,
        section.sample,
        folder,
        f" (H&E {Path(he['he_path']).name})" if he["he_path"] else "",
    )
    return mdata


def _match_cells(ids, matrix_ids, x, table: pd.DataFrame, table_path: Path, matrix_path: Path):
    """Rows of ``x`` in the cells table's order; a clear error when the two files disagree."""
    tab = pd.Index(ids)
    mat = pd.Index(matrix_ids)
    if tab.equals(mat):
        return x
    only_tab = tab.difference(mat)
    only_mat = mat.difference(tab)
    if len(only_tab) or len(only_mat):
        hint = ""
        style = table.attrs.get("id_style")
        mat_numeric = all(s.isdigit() for s in matrix_ids[:50])
        if style == "integer" and not mat_numeric or style == "string" and mat_numeric and len(matrix_ids):
            hint = (
                f" The cells table has {style} ids but the matrix has "
                f"{'integer' if mat_numeric else 'string'} ids: the files come from different software versions."
            )
        raise ValueError(
            f"The cell ids of {table_path.name} and {matrix_path.name} in {str(table_path.parent)!r} do not match: "
            f"{len(only_tab)} of the {len(tab)} cells of the table are not in the matrix (e.g. "
            f"{list(only_tab[:3])}) and {len(only_mat)} of the {len(mat)} cells of the matrix are not in the "
            f"table (e.g. {list(only_mat[:3])}).{hint} Copy both files from the same Xenium output (and the same "
            "segmentation run)."
        )
    return x[mat.get_indexer(tab)]


def _nothing_he() -> dict:
    return {"he_path": "", "he_shape": None, "he_mpp": float("nan"), "alignment": None}


def _attach_he(folder: Path, he_image, he_alignment, he_mpp, pixel_size: float) -> dict:
    """The Section fields of the H&E to attach (path, level-0 shape, mpp, alignment); empty when none."""
    nothing = _nothing_he()
    if he_image is False:
        return nothing
    auto_alignment = None
    if he_image is None:
        he_image, auto_alignment = find_he_files(folder)
        if he_image is None:
            if he_alignment is not None:
                raise ValueError(
                    f"he_alignment was given but {str(folder)!r} holds no *he_image.ome.tif; pass the H&E with "
                    "he_image=."
                )
            return nothing
    if not isinstance(he_image, HEImage):
        # a missing path or a folder is reported as such, before any alignment is looked for
        require_file(he_image, "H&E image", "Check the path (he_image=), or pass he_image=False to read without "
                     "the H&E.")  # fmt: skip
    if he_alignment is None:
        name = he_image.path if isinstance(he_image, HEImage) else Path(he_image)
        he_alignment = auto_alignment or sibling_alignment(name)
        if he_alignment is None:
            raise ValueError(
                f"No alignment found for the H&E image {str(name)!r}: pass he_alignment= (10x's "
                "*_he_imagealignment.csv, or a 3 x 3 array mapping H&E pixels to Xenium morphology pixels), "
                "he_alignment='auto' to register the H&E automatically, or he_image=False to read without the H&E."
            )
    return he_fields(he_image, read_alignment(he_alignment), pixel_size, he_mpp=he_mpp)


def he_fields(he_image, alignment: np.ndarray, pixel_size: float, *, he_mpp: float | None = None,
              expect_shape: tuple[int, int] | None = None, element: str = "") -> dict:
    """The Section fields of an H&E (``he_path``, ``he_shape``, ``he_mpp``, ``alignment``) whose ``alignment``
    (a 3 x 3 affine already through :func:`~cellsymphony._registration.check_alignment`) maps its level-0
    pixels to Xenium morphology pixels of ``pixel_size`` um.

    The one plausibility check of an attached H&E, for :func:`read_xenium` and
    :func:`~cellsymphony.io.from_spatialdata`: a file whose level 0 is not ``expect_shape`` (height, width; that
    of the image ``element`` the file should hold) is refused; one that records no pixel size takes the one
    the alignment implies; one that records another (beyond 10 %) warns, saying when the alignment looks
    inverted."""
    # micrometres per H&E pixel implied by the alignment's scale
    mpp_from_alignment = 1.0 / he_px_per_um(alignment, pixel_size)
    if isinstance(he_image, HEImage):
        if he_mpp is not None:
            raise ValueError(
                "he_mpp cannot be combined with an opened HEImage; pass mpp= to cs.io.read_he instead."
            )
        he = he_image
    else:
        try:
            he = HEImage(he_image, mpp=he_mpp, cache_tiles=0)
        except ValueError as err:
            if he_mpp is not None or "records no pixel size" not in str(err):
                raise
            # the file does not say; the alignment does
            he = HEImage(he_image, mpp=mpp_from_alignment, cache_tiles=0)
            logger.info(
                "%s records no pixel size; using %.4g um/px from the alignment",
                he.path.name,
                mpp_from_alignment,
            )
    out = {
        "he_path": str(he.path.resolve()),
        "he_shape": he.shapes[0],
        "he_mpp": float(he.mpp),
        "alignment": alignment,
    }
    if not isinstance(he_image, HEImage):
        he.close()
    if expect_shape is not None and tuple(out["he_shape"]) != tuple(expect_shape):
        (h, w), (eh, ew) = out["he_shape"], expect_shape
        raise ValueError(
            f"{out['he_path']!r} is {w} x {h} pixels but the image element {element!r} is {ew} x {eh}: pass the "
            "file the element was read from as he_path=."
        )
    ratio = out["he_mpp"] / mpp_from_alignment
    if not 0.9 < ratio < 1.1:
        # the inverse matrix (morphology pixel -> H&E pixel) implies pixel_size**2 / mpp instead
        inverse_ratio = out["he_mpp"] / (1.0 / he_px_per_um(np.linalg.inv(alignment), pixel_size))
        hint = (
            " The alignment looks inverted (its inverse implies the image's pixel size): it must map H&E pixels "
            "to Xenium morphology pixels (10x's *_he_imagealignment.csv); pass its inverse (numpy.linalg.inv)."
            if 0.9 < inverse_ratio < 1.1
            else " Check that the alignment belongs to this image (and he_mpp=, if given)."
        )
        warnings.warn(
            f"The H&E image {out['he_path']!r} has {out['he_mpp']:.4g} um per pixel but the alignment implies "
            f"{mpp_from_alignment:.4g} (with the Xenium pixel size {pixel_size}).{hint}",
            UserWarning,
            stacklevel=4,
        )
    return out


def _read_xenium_auto(path, *, he_image, sample, he_mpp, nucleus_boundaries) -> MuData:
    """``read_xenium(path, he_image=..., he_alignment="auto")``: read without the H&E, register it, apply."""
    from ._register_he import register_he

    folder = Path(path)
    if he_image is False:
        raise ValueError("he_alignment='auto' registers an H&E image, but he_image=False was given.")
    if he_image is None:
        if folder.is_dir():
            he_image, _ = find_he_files(folder)
        if he_image is None:
            raise ValueError(
                f"he_alignment='auto': {str(folder)!r} holds no *he_image.ome.tif; pass the H&E with he_image=."
            )
    mdata = read_xenium(path, he_image=False, sample=sample, nucleus_boundaries=nucleus_boundaries)
    reg = register_he(mdata, he_image, he_mpp=he_mpp)
    if not reg.qc["ok"]:
        name = Path(he_image.path if isinstance(he_image, HEImage) else he_image).name
        raise ValueError(
            f"he_alignment='auto': the automatic registration of the H&E {name!r} to {str(folder)!r} failed its QC "
            f"({reg.summary()}). Nothing was read. Look at cs.io.register_he(path, he_image).plot(), check that the "
            "image belongs to this section, or pass the alignment CSV with he_alignment=."
        )
    reg.apply(mdata)
    return mdata
