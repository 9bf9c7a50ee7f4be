"""Cell labels: SingleR agreement on real data, and registration QC / refinement on constructed tissue.

Run: ``python -m benchmarks.bench_labels``. Prints three tables:

1. ``cs.pp.annotate_singler`` on scanpy's ``pbmc68k_reduced`` split into stratified reference and query
   halves (5 seeds), on all 765 genes and on random panels of 300 and 100 genes: agreement with the
   held-out ``bulk_labels``, fraction kept by the pruning rule, agreement among the kept cells, seconds.
2. ``cs.pp.transfer_nucleus_labels`` with a known registration error (shift in um) injected into H&E
   nuclei (0.3 um localisation noise, 10 % missed, 5 % duplicated): the QC it reports and what
   ``refine="shift"`` leaves.
3. Both label sources on the synthetic tissue (``cs.datasets.synthetic()``, 4,000 cells): SingleR
   against the bundle's reference (coarse and fine labels, all or 100 reference cells per label) and the
   bundle's simulated H&E classifier, scored against the true labels.
4. Matching time against the number of cells.
"""

from __future__ import annotations

import time
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
from scipy import sparse

import cellsymphony as cs
from cellsymphony._registration import um_to_he_px

from ._common import print_table

PIXEL_SIZE, HE_MPP = 0.2125, 0.2738


def pbmc_counts() -> ad.AnnData:
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    logn = pbmc.raw.X.toarray().astype(np.float64)
    counts = np.round(np.expm1(logn) * pbmc.obs["n_counts"].to_numpy(np.float64)[:, None] / 1e4)
    return ad.AnnData(
        sparse.csr_matrix(counts.astype(np.float32)),
        obs=pbmc.obs[["bulk_labels"]].copy(),
        var=pd.DataFrame(index=pbmc.raw.var_names.astype(str)),
    )


def singler_rows(seeds=range(5)) -> list[dict]:
    from sklearn.model_selection import train_test_split

    full = pbmc_counts()
    labels = full.obs["bulk_labels"].astype(str).to_numpy()
    rows = []
    for n_genes in (765, 300, 100):
        acc, kept, acc_kept, secs = [], [], [], []
        for seed in seeds:
            r, q = train_test_split(np.arange(full.n_obs), test_size=0.5, random_state=seed, stratify=labels)
            genes = np.random.default_rng(seed).choice(full.var_names, n_genes, replace=False)
            query = full[q][:, genes].copy()
            t0 = time.perf_counter()
            cs.pp.annotate_singler(query, full[r].copy(), ref_label_key="bulk_labels")
            secs.append(time.perf_counter() - t0)
            ok = (query.obs["singler"].astype(str) == query.obs["bulk_labels"].astype(str)).to_numpy()
            conf = query.obs["singler_confident"].to_numpy()
            acc.append(ok.mean())
            kept.append(conf.mean())
            acc_kept.append(ok[conf].mean())
        rows.append({
            "genes": n_genes, "agreement": float(np.mean(acc)), "min over seeds": float(np.min(acc)),
            "kept": float(np.mean(kept)), "agreement kept": float(np.mean(acc_kept)), "seconds": float(np.median(secs)),
        })
    return rows


def tissue(n_side: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * 12.0
    xy = g + 100 + rng.uniform(-2.5, 2.5, g.shape)
    ids = [f"c{i}" for i in range(len(xy))]
    rna = ad.AnnData(sparse.csr_matrix((len(xy), 1), dtype=np.float32), obs=pd.DataFrame(index=ids))
    rna.obsm["nucleus_centroid"] = xy
    morph = ad.AnnData(np.zeros((len(xy), 0), np.float32), obs=pd.DataFrame(index=ids))
    morph.obsm["nucleus_centroid"] = xy
    th = np.deg2rad(20)
    a = np.eye(3)
    a[:2, :2] = HE_MPP / PIXEL_SIZE * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    a[:2, 2] = [1500, -300]
    mdata = md.MuData({"rna": rna, "morphology": morph})
    mdata.uns["cellsymphony"] = {"samples": {"s1": {"alignment": a, "pixel_size": PIXEL_SIZE, "he_mpp": HE_MPP}}}
    return mdata, xy, a


def nuclei_for(xy, a, shift, seed=1):
    rng = np.random.default_rng(seed)
    p = xy + shift + rng.normal(0, 0.3, xy.shape)
    p = p[rng.random(len(p)) >= 0.1]
    dup = rng.choice(len(p), int(0.05 * len(p)), replace=False)
    p = np.concatenate([p, p[dup] + rng.normal(0, 2, (len(dup), 2))])
    px = um_to_he_px(p, a, PIXEL_SIZE)
    return pd.DataFrame({"x": px[:, 0], "y": px[:, 1], "class": "tumour"})


def qc_rows() -> list[dict]:
    rows = []
    for shift in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        mdata, xy, a = tissue(60)
        nuc = nuclei_for(xy, a, np.array([shift, 0.0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cs.pp.transfer_nucleus_labels(mdata, nuc, refine="shift")
        s = mdata.uns["he_label"]["samples"]["s1"]
        b = s["refinement"]["qc_before"]
        rows.append({
            "injected shift um": shift, "matched before": b["match_rate_nuclei"], "median um": b["median_um"],
            "p95 um": b["p95_um"], "mean offset x um": b["mean_offset_um"][0],
            "fitted shift x um": s["refinement"]["correction_um"][0, 2], "median after": s["median_um"],
            "matched after": s["match_rate_nuclei"],
        })
    return rows


def synthetic_rows() -> tuple[list[dict], list[dict]]:
    from pathlib import Path

    mdata = cs.datasets.synthetic()
    ((sample, reg),) = mdata.uns["cellsymphony"]["samples"].items()
    folder = Path(reg["xenium_path"])
    truth = pd.read_parquet(folder / "truth.parquet")
    truth["cell_id"] = truth["cell_id"].astype(str)
    truth = truth.set_index("cell_id").reindex(mdata.obs_names)
    ref = ad.read_h5ad(folder / "reference.h5ad")
    rows = []
    for key in ("cell_type", "cell_type_fine"):
        for per_label in (None, 100):
            t0 = time.perf_counter()
            cs.pp.annotate_singler(mdata, ref, ref_label_key=key, ref_max_per_label=per_label, key_added="sr")
            secs = time.perf_counter() - t0
            obs = mdata["rna"].obs
            ok = obs["sr"].astype(str).to_numpy() == truth[key].to_numpy()
            conf = obs["sr_confident"].to_numpy()
            rows.append({"labels": key, "ref cells per label": per_label or "all", "agreement": float(ok.mean()),
                         "kept": float(conf.mean()), "agreement kept": float(ok[conf].mean()), "seconds": secs})
    he_class = {"fibroblast": "fibroblast", "T cell": "lymphocyte", "B cell": "lymphocyte", "tumour epithelium": "tumour",
                "normal epithelium": "other", "macrophage": "other", "endothelial": "other"}
    cs.pp.transfer_nucleus_labels(mdata, folder / "he_nuclei.csv")
    st = mdata.uns["he_label"]["samples"][sample]
    lab = mdata.obs["he_label"]
    m = lab.notna().to_numpy()
    he = [{"cells matched": st["match_rate_cells"], "nuclei matched": st["match_rate_nuclei"],
           "agreement with truth": float((lab[m].astype(str).to_numpy() == truth["cell_type"].map(he_class).to_numpy()[m]).mean()),
           "median um": st["median_um"], "p95 um": st["p95_um"],
           "mean offset um": f"({st['mean_offset_um'][0]:+.2f}, {st['mean_offset_um'][1]:+.2f})"}]
    return rows, he


def time_rows() -> list[dict]:
    rows = []
    for n_side in (100, 200, 320):
        mdata, xy, a = tissue(n_side)
        nuc = nuclei_for(xy, a, np.zeros(2))
        t0 = time.perf_counter()
        cs.pp.transfer_nucleus_labels(mdata, nuc)
        rows.append({"cells": len(xy), "nuclei": len(nuc), "seconds": time.perf_counter() - t0})
    return rows


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: nucleus-label transfer speed at two sizes (per-cell cost at the
    larger size against the smaller: 1 means linear scaling)."""
    sizes = (60, 120) if quick else (100, 320)
    mdata, xy, a = tissue(20)
    cs.pp.transfer_nucleus_labels(mdata, nuclei_for(xy, a, np.zeros(2)))  # warm-up: imports, first calls
    cps = []
    for n_side in sizes:
        mdata, xy, a = tissue(n_side)
        nuc = nuclei_for(xy, a, np.zeros(2))
        t0 = time.perf_counter()
        cs.pp.transfer_nucleus_labels(mdata, nuc)
        cps.append(len(xy) / (time.perf_counter() - t0))
    return [{"figure": f"transfer_nucleus_labels, {sizes[1] ** 2} cells", "value": cps[1], "unit": "cells/s",
             "baseline": f"{cps[0]:.0f} cells/s at {sizes[0] ** 2} cells", "ratio": cps[1] / cps[0],
             "note": "1 = linear scaling"}]


if __name__ == "__main__":
    cs.settings.verbosity = "ERROR"
    warnings.simplefilter("ignore", FutureWarning)
    print_table(singler_rows(), "SingleR on pbmc68k_reduced halves (5 seeds)")
    print_table(qc_rows(), "Registration QC against an injected shift (refine='shift')")
    sr, he = synthetic_rows()
    print_table(sr, "SingleR on the synthetic tissue (truth: the simulated cell types)")
    print_table(he, "H&E classifier labels on the synthetic tissue")
    print_table(time_rows(), "transfer_nucleus_labels time")
