"""cs.pp.annotate_singler on real data (scanpy's pbmc68k_reduced) and its pruning rule."""

from __future__ import annotations

import functools

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from sklearn.model_selection import train_test_split

import cellsymphony as cs
from cellsymphony.pp._annotate_singler import prune_scores


@functools.cache
def pbmc_halves(seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """pbmc68k_reduced with integer counts recovered, split (stratified) into reference and query halves.

    ``.raw.X`` holds log1p(counts / n_counts * 1e4) over 765 genes, rounded to 3 decimals; inverting it
    with ``obs["n_counts"]`` and rounding gives the counts back (largest rounding residue < 0.1).
    The query keeps the log-normalised values in ``layers["lognorm"]``.
    """
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    logn = pbmc.raw.X.toarray().astype(np.float64)
    n_counts = pbmc.obs["n_counts"].to_numpy(np.float64)
    raw = np.expm1(logn) * n_counts[:, None] / 1e4
    counts = np.round(raw)
    assert np.abs(raw - counts).max() < 0.1
    full = ad.AnnData(
        sparse.csr_matrix(counts.astype(np.float32)),
        obs=pbmc.obs[["bulk_labels"]].copy(),
        var=pd.DataFrame(index=pbmc.raw.var_names.astype(str)),
    )
    full.layers["lognorm"] = sparse.csr_matrix(logn.astype(np.float32))
    labels = full.obs["bulk_labels"].astype(str).to_numpy()
    ref_idx, query_idx = train_test_split(
        np.arange(full.n_obs), test_size=0.5, random_state=seed, stratify=labels
    )
    return full[ref_idx].copy(), full[query_idx].copy()


def as_mudata(query: ad.AnnData) -> md.MuData:
    morph = ad.AnnData(np.zeros((query.n_obs, 0), dtype=np.float32), obs=pd.DataFrame(index=query.obs_names))
    return md.MuData({"rna": query.copy(), "morphology": morph})


def agreement(adata: ad.AnnData, key: str = "singler") -> float:
    return float((adata.obs[key].astype(str) == adata.obs["bulk_labels"].astype(str)).mean())


def test_pbmc68k_agreement_with_held_out_labels(tmp_path):
    ref, query = pbmc_halves()
    mdata = as_mudata(query)
    cs.pp.annotate_singler(mdata, ref, ref_label_key="bulk_labels")
    rna = mdata["rna"]
    acc = agreement(rna)
    assert acc >= 0.75, f"SingleR agreement with held-out bulk_labels {acc:.3f} < 0.75"
    # the pruning removes a minority and the kept cells are at least as accurate
    conf = rna.obs["singler_confident"].to_numpy()
    assert conf.dtype == bool and 0.8 < conf.mean() < 1.0
    kept = rna.obs["singler"].astype(str)[conf] == rna.obs["bulk_labels"].astype(str)[conf]
    assert kept.mean() >= acc
    assert rna.obs["singler_pruned"].isna().to_numpy().tolist() == (~conf).tolist()
    uns = rna.uns["singler"]
    assert uns["params"]["n_ref_cells"] == ref.n_obs
    assert uns["params"]["n_genes_used"] == 765
    assert uns["params"]["query_input"] == "counts" and uns["params"]["ref_input"] == "counts"
    assert uns["n_pruned"] == int((~conf).sum())
    labels = list(uns["labels"])
    assert sorted(labels) == sorted(ref.obs["bulk_labels"].astype(str).unique())
    scores = rna.obsm["singler_scores"]
    assert scores.shape == (rna.n_obs, len(labels))
    # delta_med is the assigned label's score minus the median score
    idx = pd.Index(labels).get_indexer(rna.obs["singler"].astype(str))
    np.testing.assert_allclose(
        rna.obs["singler_delta_med"], scores[np.arange(rna.n_obs), idx] - np.median(scores, axis=1), atol=1e-5
    )
    assert (rna.obs["singler_delta"] >= 0).all()
    assert "rna:singler" in mdata.obs
    path = tmp_path / "singler.h5mu"
    mdata.write(path)
    back = md.read_h5mu(path)
    pd.testing.assert_series_equal(back["rna"].obs["singler"].astype(str), rna.obs["singler"].astype(str))
    np.testing.assert_allclose(back["rna"].obsm["singler_scores"], scores)
    assert list(back["rna"].uns["singler"]["labels"]) == labels
    assert back["rna"].uns["singler"]["params"]["n_genes_used"] == 765


def test_log_normalised_query_and_panel_subset():
    ref, query = pbmc_halves()
    # the query given as log-normalised values: detected, used as they are, same labels
    out = cs.pp.annotate_singler(query, ref, ref_label_key="bulk_labels", layer="lognorm", copy=True)
    assert out.uns["singler"]["params"]["query_input"] == "log"
    assert agreement(out) >= 0.75
    # a panel of 300 of the genes (as a Xenium panel): the shared genes are used
    genes = np.random.default_rng(0).choice(query.var_names, 300, replace=False)
    panel = query[:, genes].copy()
    cs.pp.annotate_singler(panel, ref, ref_label_key="bulk_labels", prune=False)
    assert panel.uns["singler"]["params"]["n_genes_used"] == 300
    assert set(panel.uns["singler"]["genes"]) == set(genes)
    assert panel.obs["singler_confident"].all()
    assert agreement(panel) >= 0.6


def test_prune_rule_matches_r():
    # R SingleR's test-prune.R: the assigned score vs the row median, min.diff.med = 0.05
    scores = np.array(
        [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=float
    )
    labels = np.array(["E", "E", "E", "E", "E"])
    pruned, delta = prune_scores(scores, labels, min_diff_med=0.05)
    assert pruned.tolist() == [False, False, True, True, True]
    np.testing.assert_allclose(delta, [1, 1, 0, 0, 0])
    assert prune_scores(scores, labels, min_diff_med=2)[0].all()
    # per-label outliers: more than 3 MADs (x 1.4826) below the label's median delta
    scores = np.zeros((10, 3))
    scores[:, 0] = [1.0, 1.1, 0.9, 1.0, 0.2, 1.05, 0.95, 0.0, 0.0, 0.0]
    scores[7:, 1] = [0.5, 0.6, 0.55]
    labels = np.array(["A"] * 7 + ["B"] * 3)
    pruned, _ = prune_scores(scores, labels, label_columns=["A", "B", "C"])
    assert pruned.tolist() == [False, False, False, False, True, False, False, False, False, False]
    # the fine-tuning margin: min_diff_next
    pruned, _ = prune_scores(
        scores, labels, label_columns=["A", "B", "C"], delta_next=np.full(10, 0.01), min_diff_next=0.05
    )
    assert pruned.all()


def test_bad_reference_input():
    ref, query = pbmc_halves()
    with pytest.raises(ValueError, match="no label column 'cell_type'.*bulk_labels"):
        cs.pp.annotate_singler(query, ref, ref_label_key="cell_type")
    renamed = ref.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(ref.n_vars)]
    with pytest.raises(ValueError, match="share no genes"):
        cs.pp.annotate_singler(query, renamed, ref_label_key="bulk_labels")
    with pytest.raises(ValueError, match="share only 10 genes"):
        cs.pp.annotate_singler(query, ref[:, :10].copy(), ref_label_key="bulk_labels")
    scaled = ref.copy()
    scaled.X = scaled.X.toarray() - 1.0
    with pytest.raises(ValueError, match="negative values"):
        cs.pp.annotate_singler(query, scaled, ref_label_key="bulk_labels")
    one = ref.copy()
    one.obs["one"] = "T"
    with pytest.raises(ValueError, match="single label"):
        cs.pp.annotate_singler(query, one, ref_label_key="one")
    with pytest.raises(ValueError, match="no layer 'counts'"):
        cs.pp.annotate_singler(query, ref, ref_label_key="bulk_labels", layer="counts")
    assert "singler" not in query.obs


def test_cells_without_detected_genes_are_pruned():
    ref, query = pbmc_halves()
    query = query.copy()
    x = query.X.toarray()
    x[:3] = 0
    query.X = sparse.csr_matrix(x)
    cs.pp.annotate_singler(query, ref, ref_label_key="bulk_labels", prune=False)
    conf = query.obs["singler_confident"].to_numpy()
    assert not conf[:3].any() and conf[3:].all()
    assert query.uns["singler"]["n_empty"] == 3
    assert query.obs["singler_pruned"].iloc[:3].isna().all()


def test_reference_subsampling_is_seeded():
    ref, query = pbmc_halves()
    a = cs.pp.annotate_singler(query, ref, ref_label_key="bulk_labels", ref_max_per_label=10, seed=3, copy=True)
    b = cs.pp.annotate_singler(query, ref, ref_label_key="bulk_labels", ref_max_per_label=10, seed=3, copy=True)
    per_label = ref.obs["bulk_labels"].value_counts()
    assert a.uns["singler"]["params"]["n_ref_cells"] == int(np.minimum(per_label, 10).sum())
    pd.testing.assert_series_equal(a.obs["singler"], b.obs["singler"])
    with pytest.raises(ValueError, match="ref_max_per_label=0"):
        cs.pp.annotate_singler(query, ref, ref_label_key="bulk_labels", ref_max_per_label=0)
