"""Data for the plotting and report tests.

- :func:`run_producers`: a tiny synthetic section (``cs.datasets``) put through the real producers at tiny
  sizes (tiny models, 2 epochs), so the plots and the report read exactly what the producers write;
- :func:`make_mdata`: a hand-built section with a known H&E geometry (registration, warped image) for the
  spatial maps, and the nucleus-label matches of :func:`add_matches`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

CLASSES = ["B cell", "T cell", "fibroblast", "tumour"]
PIXEL_SIZE = 0.2125  # um per Xenium morphology pixel
HE_MPP = 0.5  # um per H&E level-0 pixel
HE_SIZE = 512  # level-0 side in pixels


def alignment() -> np.ndarray:
    """H&E level-0 pixel -> Xenium morphology pixel: scale, 10 degree rotation, shift."""
    theta = np.deg2rad(10)
    s = HE_MPP / PIXEL_SIZE
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) * s
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = [150.0, 40.0]
    return m


def write_he(path: Path) -> Path:
    """A 3-level pyramidal OME-TIFF (YXS): four coloured quadrants, a black cross through the centre."""
    import tifffile

    img = np.zeros((HE_SIZE, HE_SIZE, 3), dtype=np.uint8)
    h = HE_SIZE // 2
    img[:h, :h] = (230, 150, 190)  # pink
    img[:h, h:] = (120, 60, 160)  # purple
    img[h:, :h] = (240, 240, 240)  # white
    img[h:, h:] = (200, 100, 120)  # red
    img[h - 4 : h + 4, :] = 0
    img[:, h - 4 : h + 4] = 0
    levels = [img, img[::2, ::2], img[::4, ::4]]
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tif:
        tif.write(
            levels[0], subifds=len(levels) - 1, tile=(128, 128), photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": HE_MPP, "PhysicalSizeY": HE_MPP},
        )  # fmt: skip
        for lev in levels[1:]:
            tif.write(lev, subfiletype=1, tile=(64, 64) if lev.shape[0] >= 64 else None, photometric="rgb")
    return path


@functools.cache
def _he_file(tmpdir: str) -> Path:
    return write_he(Path(tmpdir) / "he.ome.tif")


def make_mdata(tmpdir: str | Path, *, n: int = 240, seed: int = 0, he: bool = True):
    """The MuData: ``rna`` (counts, X_scgpt), ``morphology`` (X_uni2, in_image), joint labels and records."""
    import anndata as ad
    import mudata as md

    from cellsymphony._registration import he_px_to_um

    rng = np.random.default_rng(seed)
    ids = [f"cell{i:04d}" for i in range(n)]
    truth = np.array(CLASSES)[np.arange(n) % len(CLASSES)]
    # cells inside the H&E: pick H&E pixels, map them to micrometres through the registration
    he_px = rng.uniform(40, HE_SIZE - 40, size=(n, 2))
    spatial = he_px_to_um(he_px, alignment(), PIXEL_SIZE)
    nucleus = spatial + rng.normal(0, 0.5, size=spatial.shape)
    obs = pd.DataFrame(index=ids)
    obs["sample"] = pd.Categorical(["s1"] * n)
    genes = ["MS4A1", "CD3E", "COL1A1", "EPCAM", "PTPRC", "ACTB"]
    counts = rng.poisson(2, size=(n, len(genes))).astype(np.float32)
    rna = ad.AnnData(X=sp.csr_matrix(counts), obs=obs.copy(), var=pd.DataFrame(index=genes))
    rna.var["gene_ids"] = [f"ENSG{i:05d}" for i in range(len(genes))]
    codes = pd.Categorical(truth, categories=CLASSES).codes
    rna.obsm["X_scgpt"] = (np.eye(len(CLASSES))[codes] * 3 + rng.normal(0, 0.5, (n, len(CLASSES)))).astype(np.float32)
    morph = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs.copy())
    morph.obs["in_image"] = True
    morph.obsm["X_uni2"] = rng.normal(size=(n, 8)).astype(np.float32)
    morph.obsm["X_uni2"][:5] = np.nan  # cells outside the image have NaN rows
    for a in (rna, morph):
        a.obsm["spatial"] = spatial.copy()
        a.obsm["nucleus_centroid"] = nucleus.copy()
    mdata = md.MuData({"rna": rna, "morphology": morph})
    mdata.obs["cell_type"] = pd.Categorical(truth, categories=CLASSES)
    he_path = str(_he_file(str(tmpdir))) if he else ""
    mdata.uns["cellsymphony"] = {
        "samples": {
            "s1": {
                "he_path": he_path,
                "alignment": alignment(),
                "pixel_size": PIXEL_SIZE,
                "he_mpp": HE_MPP,
                "xenium_path": "",
            }
        },
        "latest": {"rna": "X_scgpt", "morphology": "X_uni2"},
    }
    add_matches(mdata, rng)
    return mdata


def add_matches(mdata, rng, *, offsets: bool = True):
    """An H&E nucleus-label transfer as cs.pp.transfer_nucleus_labels writes it: every second cell matched,
    with a systematic offset (Xenium - H&E) of (1.0, -0.5) um plus noise; per-cell offsets optional."""
    n = mdata.n_obs
    matched = np.arange(n) % 2 == 0
    off = np.full((n, 2), np.nan)
    off[matched] = np.array([1.0, -0.5]) + rng.normal(0, 0.4, (matched.sum(), 2))
    dist = np.hypot(off[:, 0], off[:, 1])
    labels = np.where(matched, np.asarray(mdata.obs["cell_type"], dtype=object), None)
    mdata.obs["he_label"] = pd.Categorical(labels, categories=CLASSES)
    mdata.obs["he_label_distance"] = dist
    if offsets:
        mdata.obsm["he_label_offset"] = off
    m = off[matched]
    mdata.uns["he_label"] = {
        "params": {"space": "he_px", "max_distance_um": 5.0},
        "samples": {
            "s1": {
                "n_cells": n,
                "n_matched": int(matched.sum()),
                "match_rate_cells": float(matched.mean()),
                "median_um": float(np.median(dist[matched])),
                "p95_um": float(np.percentile(dist[matched], 95)),
                "mean_offset_um": m.mean(axis=0),
                "offset_sd_um": m.std(axis=0),
                "label_counts": pd.DataFrame({"label": CLASSES, "n_nuclei": [40] * 4, "n_matched": [30] * 4}),
            }
        },
    }


TINY_CLASSIFIER = {"d_model": 16, "n_layers": 1, "n_heads": 2, "epochs": 2, "lr": 3e-3}
LABEL_KEY = "he_label"


def run_producers(tmpdir: str | Path):
    """A 300-cell synthetic section through the real producers: reading, handcrafted morphology and tiny
    scGPT embeddings, H&E nucleus labels, a classifier comparison (``cs_compare``), two trained classifiers
    (``cs_pred``: dual, ``cs_pred_unimodal``), a contrastive alignment, a cluster enrichment and a spatial
    coherence table; the MuData is written to and read back from ``.h5mu``, as users have it."""
    import mudata as md
    import torch

    import cellsymphony as cs

    torch.set_num_threads(1)
    tmpdir = Path(tmpdir)
    progress, cs.settings.progress = cs.settings.progress, False
    try:
        bundle = cs.datasets.synthetic_xenium(tmpdir / "xenium", n_cells=300, seed=0)
        mdata = cs.io.read_xenium(bundle)
        cs.pp.embed_morphology(mdata, model="handcrafted")
        ckpt = cs.datasets.tiny_scgpt_checkpoint(tmpdir / "scgpt", list(mdata["rna"].var_names), seed=0)
        cs.pp.embed_expression(mdata, model_dir=ckpt, seed=0)
        cs.pp.transfer_nucleus_labels(mdata, bundle / "he_nuclei.csv", x_key="x", y_key="y", label_key="class")
        cs.tl.compare_classifiers(mdata, LABEL_KEY, archs=("unimodal", "dual"), key_added="cs_compare", **TINY_CLASSIFIER)
        cs.tl.train_classifier(mdata, LABEL_KEY, arch="dual", **TINY_CLASSIFIER)
        cs.tl.train_classifier(mdata, LABEL_KEY, arch="unimodal", key_added="cs_pred_unimodal", **TINY_CLASSIFIER)
        cs.tl.align_contrastive(mdata, epochs=2, dim=8, hidden=16)
        cs.tl.cluster_enrichment(mdata, "cs_pred", LABEL_KEY, key_added="cs_pred_enrichment")
        cs.tl.spatial_coherence(mdata, "cs_pred", n_perms=20, key_added="cs_pred_coherence")
    finally:
        cs.settings.progress = progress
    path = tmpdir / "produced.h5mu"
    mdata.write(path)
    return mdata, md.read_h5mu(path)
