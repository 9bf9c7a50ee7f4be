"""Assemble the package's MuData layout from the pieces of one section.

Shared by :func:`cellsymphony.io.read_xenium` and :func:`cellsymphony.io.from_spatialdata`, so that
both give exactly the same layout.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import (
    COUNTS_LAYER,
    IN_IMAGE_KEY,
    MOD_MORPH,
    MOD_PROTEIN,
    MOD_RNA,
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
from .._registration import inside_image, um_to_he_px
from ._spatial_uns import attach_spatial_images

if TYPE_CHECKING:
    from mudata import MuData

MORPH_OBS = ("cell_area", "nucleus_area")


@dataclass
class Section:
    """Everything read from one Xenium section, before it becomes a MuData."""

    cell_ids: np.ndarray  # str
    obs: pd.DataFrame  # per-cell columns of the cells table (no centroid columns), any index
    spatial: np.ndarray  # (n, 2) micrometres
    gene_x: sparse.csr_matrix
    gene_var: pd.DataFrame  # id, name, feature_type
    sample: str
    pixel_size: float
    xenium_path: str = ""
    protein_x: sparse.csr_matrix | None = None
    protein_var: pd.DataFrame | None = None
    controls: dict = field(default_factory=dict)  # obs column -> per-cell totals
    nucleus: np.ndarray | None = None  # (n, 2) micrometres, NaN where a cell has no nucleus
    n_nuclei: np.ndarray | None = None
    he_path: str = ""
    he_shape: tuple[int, int] | None = None  # level-0 (height, width)
    he_mpp: float = float("nan")
    alignment: np.ndarray | None = None


def in_image_flags(nucleus_um: np.ndarray, section: Section) -> np.ndarray:
    """Whether each cell's nucleus centroid maps inside the H&E level 0."""
    if section.he_shape is None or section.alignment is None:
        return np.zeros(len(nucleus_um), dtype=bool)
    return inside_image(um_to_he_px(nucleus_um, section.alignment, section.pixel_size), section.he_shape)


def _var(var: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "gene_ids": var["id"].astype(str).to_numpy(),
            "feature_types": var["feature_type"].astype(str).to_numpy(),
        },
        index=pd.Index(var["name"].astype(str).to_numpy()),
    )
    return out


def build(section: Section) -> MuData:
    """The MuData of one section: modalities rna, morphology (and protein), the sample registry."""
    import anndata as ad
    import mudata as md

    n = len(section.cell_ids)
    index = pd.Index(np.asarray(section.cell_ids, dtype=str), name=None)
    sample_cat = pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[section.sample])

    obs = section.obs.copy()
    obs.index = index
    for col, total in section.controls.items():
        obs[col] = np.asarray(total, dtype=np.int64) if np.all(np.mod(total, 1) == 0) else np.asarray(total)
    if "cell_id" in obs.columns:
        obs["cell_id"] = obs["cell_id"].astype(str)
    spatial = np.asarray(section.spatial, dtype=np.float64).reshape(n, 2)
    if section.nucleus is not None:
        nucleus = np.asarray(section.nucleus, dtype=np.float64).reshape(n, 2).copy()
        none = ~np.isfinite(nucleus).all(axis=1)
        nucleus[none] = spatial[none]
        n_nuclei = np.asarray(section.n_nuclei if section.n_nuclei is not None else (~none).astype(np.int64))
        obs["n_nuclei"] = n_nuclei.astype(np.int64)
    else:
        nucleus = spatial.copy()
        if "nucleus_count" in obs.columns:
            obs["n_nuclei"] = pd.to_numeric(obs["nucleus_count"], errors="coerce").fillna(0).astype(np.int64)
    obs[SAMPLE_KEY] = sample_cat

    in_image = in_image_flags(nucleus, section)
    if section.he_shape is not None:
        _warn_coverage(in_image, nucleus, section)

    gene_x = sparse.csr_matrix(section.gene_x, dtype=np.float32)
    rna = ad.AnnData(X=gene_x, obs=obs, var=_var(section.gene_var))
    rna.layers[COUNTS_LAYER] = gene_x.copy()  # raw counts kept when X is normalised in place
    if rna.var_names.has_duplicates:
        rna.var_names_make_unique()
    morph_obs = pd.DataFrame(index=index)
    for col in MORPH_OBS:
        morph_obs[col] = pd.to_numeric(obs[col], errors="coerce").to_numpy() if col in obs else np.nan
    morph_obs[IN_IMAGE_KEY] = in_image
    if "n_nuclei" in obs:
        morph_obs["n_nuclei"] = obs["n_nuclei"].to_numpy()
    morph_obs[SAMPLE_KEY] = sample_cat
    morph = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=morph_obs)
    mods = {MOD_RNA: rna, MOD_MORPH: morph}
    if section.protein_x is not None and section.protein_x.shape[1] > 0:
        pobs = pd.DataFrame({SAMPLE_KEY: sample_cat}, index=index)
        prot = ad.AnnData(
            X=sparse.csr_matrix(section.protein_x, dtype=np.float32), obs=pobs, var=_var(section.protein_var)
        )
        mods[MOD_PROTEIN] = prot
    for a in mods.values():
        a.obsm[SPATIAL_KEY] = spatial.copy()
        a.obsm[NUCLEUS_KEY] = nucleus.copy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = md.MuData(mods)
        mdata.update()
    mdata.obs[SAMPLE_KEY] = sample_cat
    mdata.obsm[SPATIAL_KEY] = spatial.copy()
    mdata.obsm[NUCLEUS_KEY] = nucleus.copy()
    mdata.uns[UNS_KEY] = {SAMPLES_KEY: {section.sample: registry_entry(section)}}
    attach_spatial_images(mdata, section.sample)
    return mdata


def registry_entry(section: Section) -> dict:
    """One sample's registry: H&E path, alignment, pixel sizes, Xenium folder (h5mu-safe types only)."""
    alignment = section.alignment if section.alignment is not None else np.full((3, 3), np.nan)
    return {
        REG_HE_PATH: str(section.he_path or ""),
        REG_ALIGNMENT: np.asarray(alignment, dtype=np.float64),
        REG_PIXEL_SIZE: float(section.pixel_size),
        REG_HE_MPP: float(section.he_mpp),
        REG_XENIUM_PATH: str(section.xenium_path or ""),
    }


def _warn_coverage(in_image: np.ndarray, nucleus: np.ndarray, section: Section) -> None:
    n_out = int((~in_image).sum())
    if n_out == 0:
        return
    n = len(in_image)
    msg = (
        f"The H&E image {section.he_path!r} does not cover {n_out} of {n} cells of sample {section.sample!r} "
        f"(their nucleus centroid maps outside the image); morphology.obs['{IN_IMAGE_KEY}'] is False for them."
    )
    if n_out > n / 2 and section.alignment is not None:
        # a common mistake: the matrix of the inverse direction (morphology pixel -> H&E pixel)
        flipped = Section(**{**section.__dict__, "alignment": np.linalg.inv(section.alignment)})
        inverse_in = float(in_image_flags(nucleus, flipped).mean())
        if inverse_in >= 0.9 and inverse_in * n > 2 * (n - n_out):
            msg += (
                f" The alignment looks inverted: its inverse places {inverse_in:.0%} of the cells inside the image. "
                "The alignment must map H&E pixels to Xenium morphology pixels (10x's *_he_imagealignment.csv); "
                "pass its inverse (numpy.linalg.inv)."
            )
        else:
            msg += " Check that the H&E image and the alignment belong to this section."
    warnings.warn(msg, UserWarning, stacklevel=4)
