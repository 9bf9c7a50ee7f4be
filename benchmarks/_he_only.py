"""Shared set-up of the H&E-only benchmarks (cross_slide.py, virtual_xenium.py): section A, slides B, truth."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import cellsymphony as cs

CLASSIFIER = {"arch": "morphology", "epochs": 30, "d_model": 64, "n_layers": 1, "n_heads": 2, "lr": 1e-3,
              "batch_size": 128, "dropout": 0.1}
ALIGNER = {"epochs": 60, "dim": 32, "hidden": 128, "batch_size": 256, "lr": 2e-3}
WORK = Path(tempfile.gettempdir()) / "cellsymphony_he_only_bench"


def quiet():
    warnings.filterwarnings("ignore")
    cs.settings.progress = False
    import logging

    logging.getLogger("cellsymphony").setLevel(logging.WARNING)


def truth_labels(mdata, folder: Path, key: str = "truth") -> None:
    """The true cell type of every cell (by cell id) into ``mdata.obs[key]`` and each modality's obs."""
    truth = pd.read_parquet(folder / "truth.parquet").set_index("cell_id")
    for a in mdata.mod.values():
        ids = a.obs["cell_id"].astype(str) if "cell_id" in a.obs else a.obs_names.astype(str)
        a.obs[key] = pd.Categorical(truth["cell_type"].reindex(ids).astype(object).to_numpy())
    mdata.update()
    mdata.obs[key] = mdata.mod["morphology"].obs[key].reindex(mdata.obs_names).to_numpy()


def expression_pca(mdata, n_comps: int = 30, key: str = "X_pca") -> None:
    """Log-normalised expression PCA as the expression embedding of the aligner (no scGPT needed)."""
    import scanpy as sc

    rna = mdata.mod["rna"]
    tmp = rna.copy()
    sc.pp.normalize_total(tmp)
    sc.pp.log1p(tmp)
    sc.pp.pca(tmp, n_comps=n_comps, random_state=0)
    rna.obsm[key] = tmp.obsm["X_pca"].astype(np.float32)
    rna.uns[key] = {"params": {"model": "pca", "n_comps": n_comps}}


def section_a(n_cells: int, seed: int = 0):
    """Section A (Xenium + H&E) with its truth labels, and its bundle folder."""
    a = cs.datasets.synthetic(n_cells=n_cells, seed=seed)
    folder = Path(a.uns["cellsymphony"]["samples"][a.obs["sample"].cat.categories[0]]["xenium_path"])
    truth_labels(a, folder)
    return a, folder


def slide_b(n_cells: int, seed: int, shift: float, **kwargs):
    """An H&E-only slide of another patient with a stain shift, read with read_he_cells, and its folder."""
    folder = WORK / f"B_n{n_cells}_s{seed}_shift{shift:g}"
    if not (folder / "slide.json").exists():
        cs.datasets.synthetic_he(folder, n_cells=n_cells, seed=seed, stain=cs.datasets.stain_shift(shift),
                                 overwrite=True, **kwargs)
    b = cs.io.read_he_cells(folder / "slide_he_image.ome.tif", folder / "he_nuclei.csv", sample=f"B{shift:g}")
    truth_labels(b, folder)
    return b, folder


def macro_f1(true, pred) -> float:
    from sklearn.metrics import f1_score

    t, p = pd.Series(true).astype(object), pd.Series(pred).astype(object)
    ok = t.notna().to_numpy() & p.notna().to_numpy()
    return float(f1_score(t[ok], p[ok], average="macro"))
