"""Virtual Xenium: per-cell expression predicted from H&E, scored on a held-out block of A and on slide B.

    PYTHONPATH=src python benchmarks/virtual_xenium.py [--cells 3000]

Section A (synthetic Xenium, seed 0) is split into a training part and a held-out spatial block (the
quarter of the section with the largest x). The aligner (``align_contrastive`` on A's expression PCA and
the handcrafted morphology embedding) and the ridge are fitted on the training part only; predictions are
scored on the held-out block and on every cell of slide B (another patient, seed 1, H&E only, the usual
stain), against the true log-normalised expression. Per gene: Pearson r over cells, for the 50 most
variable genes of A's training part (mean, median, and the best genes); per cell: Pearson r over those
genes. Baselines: the reference mean profile (the same for every cell: no per-gene r) and ridge on PCA of
the raw morphology embedding (the HEST baseline).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from _common import print_table
from _he_only import ALIGNER, expression_pca, quiet, section_a, slide_b

import cellsymphony as cs


def _pearson_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair; NaN where either column is constant (the mean profile has no per-gene r)."""
    const = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(const, np.nan, (a * b).sum(0) / np.where(const, 1.0, den))


def score(pred: np.ndarray, true: np.ndarray) -> dict:
    ok = np.isfinite(pred).all(axis=1)
    r_gene = _pearson_cols(pred[ok], true[ok])
    r_cell = _pearson_cols(pred[ok].T, true[ok].T)
    return {"r_gene": r_gene, "mean r (genes)": float(np.nanmean(r_gene)) if np.isfinite(r_gene).any() else float("nan"),
            "median r (genes)": float(np.nanmedian(r_gene)) if np.isfinite(r_gene).any() else float("nan"),
            "mean r (cells)": float(np.nanmean(r_cell))}


def run(n_cells: int = 3000, seed: int = 0, k: int = 50) -> tuple[list[dict], pd.DataFrame]:
    import mudata as md

    quiet()
    t0 = time.perf_counter()
    a, _ = section_a(n_cells, seed)
    cs.pp.embed_morphology(a, model="handcrafted", num_workers=0)
    expression_pca(a)
    x = a.mod["morphology"].obsm["spatial"][:, 0]
    held = x >= np.quantile(x, 0.75)
    train = a[~held].copy()
    test = md.MuData({"morphology": a.mod["morphology"][held].copy()})
    test.uns = {k_: v for k_, v in a.uns.items()}
    aligner = cs.tl.align_contrastive(train, gene_rep="X_pca", morph_rep="X_handcrafted", seed=seed, **ALIGNER)

    rna_tr = train.mod["rna"]
    lib = np.asarray(rna_tr.X.sum(axis=1)).ravel()
    target_sum = float(np.median(lib[lib > 0]))
    import scanpy as sc

    tmp = rna_tr.copy()
    sc.pp.normalize_total(tmp, target_sum=target_sum)
    sc.pp.log1p(tmp)
    hvg = tmp.var_names[np.argsort(-tmp.X.toarray().var(axis=0))[:50]].tolist()

    b, bfolder = slide_b(n_cells, seed + 1, 0.0)
    cs.pp.embed_morphology(b, model="handcrafted", num_workers=0)
    import anndata as ad

    truth_b = ad.read_h5ad(bfolder / "truth_expression.h5ad")
    targets = {"A held-out block": (test, a.mod["rna"][held]), "B (H&E only)": (b, truth_b)}
    ref_mean = tmp[:, hvg].X.toarray().mean(0)
    rows, per_gene = [], {}
    for tname, (tgt, true_ad) in targets.items():
        true_ad = true_ad[true_ad.obs_names.isin(tgt.mod["morphology"].obs_names)]
        libt = np.asarray(true_ad.X.sum(axis=1)).ravel()
        sub = true_ad[:, hvg].X
        sub = sub.toarray() if hasattr(sub, "toarray") else np.asarray(sub)
        true = np.log1p(sub / np.maximum(libt, 1e-12)[:, None] * target_sum)
        rows_t = tgt.mod["morphology"].obs_names.get_indexer(true_ad.obs_names)
        for method, kw in (("knn, match='rna' (BLEEP)", {"method": "knn", "aligner": aligner, "k": k, "match": "rna"}),
                           ("knn, match='morphology'", {"method": "knn", "aligner": aligner, "k": k, "match": "morphology"}),
                           ("ridge on raw morphology", {"method": "ridge", "morph_rep": "X_handcrafted"})):
            cs.tl.predict_expression(tgt, train, genes=hvg, key_added="predicted", **kw)
            pred = np.asarray(tgt.mod["rna"].X)[rows_t]
            sc_ = score(pred, true)
            per_gene[(tname, method)] = sc_.pop("r_gene")
            rows.append({"target": tname, "method": method, **sc_})
        sc_ = score(np.tile(ref_mean, (len(true), 1)), true)
        sc_.pop("r_gene")
        rows.append({"target": tname, "method": "reference mean profile", **sc_})
    print_table(rows, title=f"Virtual Xenium: Pearson r of predicted vs true expression ({n_cells} cells, 50 HVGs)")
    genes = pd.DataFrame({f"{t} / {m}": v for (t, m), v in per_gene.items()}, index=hvg)
    best = genes.sort_values(genes.columns[0], ascending=False)
    print("\nPer-gene r, best and worst 8 genes on the held-out block (knn):")
    print(pd.concat([best.head(8), best.tail(8)]).round(2).to_string())
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return rows, genes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args()
    run(args.cells, args.seed, args.k)


if __name__ == "__main__":
    main()
