"""Niches (scanpy kNN + Leiden), cluster x label enrichment (Fisher / BH) and spatial coherence (squidpy graph)."""

from __future__ import annotations

import functools

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

import cellsymphony as cs

cs.settings.progress = False
KEY = "X_cs_contrastive"


@functools.cache
def _tissue(side: int = 40, block: int = 10, seed: int = 0):
    """A ``side x side`` lattice of cells (10 um apart) in two sections; niches are ``block x block``
    squares, and each niche's cells have a projection near its own centre on the unit sphere."""
    rng = np.random.default_rng(seed)
    gy, gx = np.mgrid[0:side, 0:side]
    xy = np.c_[gx.ravel(), gy.ravel()].astype(float) * 10.0
    nb = side // block
    truth = (gy.ravel() // block) * nb + gx.ravel() // block
    k = nb * nb
    centres = np.linalg.qr(rng.normal(size=(16, k)))[0].T  # k orthonormal centres in 16-d
    z = centres[truth] + 0.15 * rng.normal(size=(len(truth), 16))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    # a second section: the same lattice shifted far away, so only the per-sample graph keeps it apart
    xy2 = xy + np.array([0.0, 5.0])
    return (
        np.vstack([xy, xy2]),
        np.r_[truth, (truth + 1) % k],  # section 2: the same blocks under other names
        np.vstack([z, z[rng.permutation(len(z))]]).astype(np.float32),
        np.r_[["s1"] * len(truth), ["s2"] * len(truth)],
    )


def tissue_mudata() -> md.MuData:
    xy, truth, z, sample = _tissue()
    names = [f"c{i}" for i in range(len(truth))]
    obs = pd.DataFrame({"sample": pd.Categorical(sample)}, index=names)
    mods = {}
    for mod in ("rna", "morphology"):
        mods[mod] = ad.AnnData(
            np.zeros((len(names), 0), np.float32), obs=obs.copy(), obsm={"spatial": xy.copy(), KEY: z.copy()}
        )
    mods["rna"].obs["truth"] = pd.Categorical([str(t) for t in truth])
    mods["rna"].obs["shuffled"] = pd.Categorical(
        np.random.default_rng(1).permutation(mods["rna"].obs["truth"].to_numpy())
    )
    mdata = md.MuData(mods)
    return mdata


# --------------------------------------------------------------------------- niches
def test_niches_recover_clusters_write_once_and_keep_the_graph(tmp_path):
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    from cellsymphony._validate import find_obs_column

    mdata = tissue_mudata()
    n = mdata.n_obs
    mdata["morphology"].obsm[KEY][[0, 5]] = np.nan
    assert cs.tl.niches(mdata, use_rep=KEY, n_neighbors=15, resolution=0.5, umap=True) is None
    lab = mdata["morphology"].obs["cs_niche"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert lab.isna().sum() == 2
    assert lab.iloc[[0, 5]].isna().all()
    # section 1 has niches by construction (section 2's projections were shuffled in space)
    first = slice(0, n // 2)
    truth = mdata["rna"].obs["truth"].to_numpy()[first]
    ok = lab.iloc[first].notna().to_numpy()
    assert adjusted_rand_score(truth[ok], lab.iloc[first].to_numpy()[ok]) > 0.95
    # a joint result: one column of the MuData, mirrored into every modality (squidpy reads the modality)
    joint = mdata.obs["cs_niche"]
    for m in ("rna", "morphology"):
        pd.testing.assert_series_equal(
            mdata[m].obs["cs_niche"].astype(str), joint.reindex(mdata[m].obs_names).astype(str), check_names=False
        )
    pd.testing.assert_series_equal(joint.astype(str), lab.reindex(mdata.obs_names).astype(str), check_names=False)
    pd.testing.assert_series_equal(
        find_obs_column(mdata, "cs_niche").astype(str), lab.reindex(mdata.obs_names).astype(str), check_names=False
    )
    # the kNN graph, kept as scanpy keeps it (left-out cells without edges), reusable by scanpy
    mod = mdata["morphology"]
    nb = mod.uns["cs_niche_neighbors"]
    conn, dist = mod.obsp[nb["connectivities_key"]], mod.obsp[nb["distances_key"]]
    assert conn.shape == dist.shape == (n, n)
    assert conn[[0, 5]].nnz == 0 and conn[:, [0, 5]].nnz == 0
    assert (np.diff(dist.indptr)[np.r_[1:5, 6:n]] == 14).all()  # n_neighbors - 1 neighbours per kept cell
    assert nb["params"]["n_neighbors"] == 15 and nb["params"]["use_rep"] == KEY
    tmp = mod[np.r_[1:5, 6:n]].copy()
    sc.tl.leiden(tmp, neighbors_key="cs_niche_neighbors", resolution=0.5, random_state=0, flavor="igraph",
                 n_iterations=2, directed=False, key_added="again")  # fmt: skip
    assert adjusted_rand_score(tmp.obs["again"], lab.iloc[np.r_[1:5, 6:n]].astype(str)) == 1.0
    sc.tl.umap(tmp, neighbors_key="cs_niche_neighbors", random_state=0)
    assert np.isfinite(tmp.obsm["X_umap"]).all()
    umap = mdata["morphology"].obsm["cs_niche_umap"]
    assert umap.shape == (n, 2)
    assert np.isnan(umap[[0, 5]]).all()
    assert np.isfinite(np.delete(umap, [0, 5], 0)).all()
    uns = mdata["morphology"].uns["cs_niche"]
    assert uns["n_excluded"] == 2
    assert uns["params"]["use_rep"] == KEY
    assert uns["params"]["neighbors_key"] == "cs_niche_neighbors"
    assert uns["n_niches"] == lab.cat.categories.size
    mdata.write(tmp_path / "n.h5mu")
    back = md.read_h5mu(tmp_path / "n.h5mu")
    pd.testing.assert_series_equal(
        back.obs["morphology:cs_niche"].astype(str), mdata.obs["morphology:cs_niche"].astype(str)
    )
    assert back["morphology"].uns["cs_niche"]["n_excluded"] == 2
    assert (back["morphology"].obsp["cs_niche_neighbors_connectivities"] != conn).nnz == 0
    assert back["morphology"].uns["cs_niche_neighbors"]["connectivities_key"] == "cs_niche_neighbors_connectivities"


def test_niches_use_rep_default_is_the_latest_with_a_deprecation():
    mdata = tissue_mudata()
    mdata["morphology"].obsm["X_other"] = mdata["morphology"].obsm[KEY][:, ::-1].copy()
    mdata.uns["cellsymphony"] = {"latest": {"morphology": "X_other"}}
    # the contrastive projection present but not the latest: the former default, with a warning naming both
    with pytest.warns(FutureWarning, match="use_rep='X_cs_contrastive'.*use_rep='X_other'"):
        cs.tl.niches(mdata)
    assert mdata["morphology"].uns["cs_niche"]["params"]["use_rep"] == KEY
    # without it: the latest representation, silently
    del mdata["morphology"].obsm[KEY]
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cs.tl.niches.*")
        cs.tl.niches(mdata, key_added="nx")
    assert mdata["morphology"].uns["nx"]["params"]["use_rep"] == "X_other"
    # a re-run replaces the joint column and its copies on every modality (kept in sync)
    mdata.obs["nx"] = "stale"
    mdata["rna"].obs["nx"] = "stale"
    cs.tl.niches(mdata, key_added="nx")
    assert not (mdata.obs["nx"].astype(str) == "stale").any()
    assert not (mdata["rna"].obs["nx"].astype(str) == "stale").any()


def test_niches_copy_anndata_and_errors():
    mdata = tissue_mudata()
    out = cs.tl.niches(mdata, use_rep=KEY, copy=True, key_added="nx")
    assert "nx" not in mdata["morphology"].obs
    assert "nx" in out["morphology"].obs
    assert "nx" in out.obs and "nx" not in mdata.obs
    adata = mdata["morphology"].copy()
    cs.tl.niches(adata, use_rep=KEY, key_added="nx")
    assert adata.obs["nx"].notna().all()
    assert adata.uns["nx_neighbors"]["distances_key"] in adata.obsp
    pd.testing.assert_series_equal(adata.obs["nx"], out["morphology"].obs["nx"])  # seeded: same labels
    with pytest.raises(ValueError, match="cs.tl.align_contrastive"):
        cs.tl.niches(md.MuData({"morphology": ad.AnnData(np.zeros((30, 0)))}))
    with pytest.raises(ValueError, match="n_neighbors"):
        cs.tl.niches(mdata, n_neighbors=1)
    with pytest.raises(ValueError, match="method="):
        cs.tl.niches(mdata, method="louvain")


# --------------------------------------------------------------------------- enrichment
def _two_by_two() -> ad.AnnData:
    # cluster A: 8 x, 2 y; cluster B: 1 x, 9 y; plus two cells without a label
    cl = ["A"] * 10 + ["B"] * 10 + ["A", "B"]
    lb = ["x"] * 8 + ["y"] * 2 + ["x"] + ["y"] * 9 + [np.nan, np.nan]
    return ad.AnnData(obs=pd.DataFrame({"cl": cl, "lb": lb}, index=[f"c{i}" for i in range(22)]))


def test_cluster_enrichment_hand_checked_fisher(tmp_path):
    adata = _two_by_two()
    df = cs.tl.cluster_enrichment(adata, "cl", "lb", key_added="enr")
    assert list(df.columns) == [
        "cluster", "label", "count", "n_cluster", "n_label", "n_cells", "expected", "obs_exp",
        "log2_odds_ratio", "pval", "qval",
    ]  # fmt: skip
    assert list(zip(df.cluster, df.label, strict=True)) == [("A", "x"), ("A", "y"), ("B", "x"), ("B", "y")]
    ax = df.iloc[0]
    assert (ax["count"], ax["n_cluster"], ax["n_label"], ax["n_cells"]) == (8, 10, 9, 20)
    assert ax["expected"] == pytest.approx(4.5)
    assert ax["obs_exp"] == pytest.approx(8 / 4.5)
    assert ax["log2_odds_ratio"] == pytest.approx(np.log2(8.5 * 9.5 / (2.5 * 1.5)))
    # hypergeometric tail P(X >= 8), X ~ Hyp(N=20, K=9, n=10): (C(9,8)C(11,2) + C(9,9)C(11,1)) / C(20,10)
    p_ax = (9 * 55 + 1 * 11) / 184756
    assert ax["pval"] == pytest.approx(p_ax, rel=1e-9)
    # (B, y): P(X >= 9), K=11: (C(11,9)C(9,1) + C(11,10)C(9,0)) / C(20,10) -- the same value
    assert df.iloc[3]["pval"] == pytest.approx(p_ax, rel=1e-9)
    # depleted pairs: P(X >= 1) = 1 - C(11,10)/C(20,10) and P(X >= 2) = 1 - C(11,1)C(9,9)/C(20,10)
    assert df.iloc[1]["pval"] == pytest.approx(1 - 11 / 184756, rel=1e-9)
    assert df.iloc[2]["pval"] == pytest.approx(1 - 11 / 184756, rel=1e-9)
    # Benjamini-Hochberg over 4 tests: the two smallest get p * 4 / 2, the others stay at their p
    np.testing.assert_allclose(df["qval"], [2 * p_ax, 1 - 11 / 184756, 1 - 11 / 184756, 2 * p_ax], rtol=1e-9)
    # stored flat and h5ad-safe
    adata.write_h5ad(tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad")
    pd.testing.assert_frame_equal(
        back.uns["enr"]["table"].reset_index(drop=True), df, check_dtype=False, check_index_type=False
    )
    assert back.uns["enr"]["params"]["cluster_key"] == "cl" and back.uns["enr"]["params"]["label_key"] == "lb"


def test_cluster_enrichment_on_mudata_finds_columns_and_writes_h5mu(tmp_path):
    mdata = tissue_mudata()
    cs.tl.niches(mdata, use_rep=KEY)
    mdata.update()
    df = cs.tl.cluster_enrichment(mdata, "cs_niche", "truth", key_added="cs_niche_enrichment")
    n_niches = mdata.obs["morphology:cs_niche"].cat.categories.size
    assert len(df) == n_niches * 16
    assert (df.groupby("cluster")["count"].sum() == df.groupby("cluster")["n_cluster"].first()).all()
    assert df["qval"].between(0, 1).all()
    assert (df["qval"] >= df["pval"] - 1e-12).all()
    # every niche is significantly enriched for some true block
    assert (df.groupby("cluster")["qval"].min() < 1e-10).all()
    mdata.write(tmp_path / "e.h5mu")
    back = md.read_h5mu(tmp_path / "e.h5mu")
    pd.testing.assert_frame_equal(
        back.uns["cs_niche_enrichment"]["table"].reset_index(drop=True), df, check_dtype=False, check_index_type=False
    )
    with pytest.raises(ValueError, match="not found; looked in"):
        cs.tl.cluster_enrichment(mdata, "cs_niche", "nope")


# --------------------------------------------------------------------------- spatial coherence
def test_spatial_coherence_blocky_vs_shuffled(tmp_path):
    mdata = tissue_mudata()
    blocky = cs.tl.spatial_coherence(mdata, "truth", n_neighbors=6, n_perms=200, key_added="coh")
    shuffled = cs.tl.spatial_coherence(mdata, "shuffled", n_neighbors=6, n_perms=200)
    with pytest.warns(FutureWarning, match=r"n_neighs=\.\.\.\) is deprecated.*n_neighbors="):
        former = cs.tl.spatial_coherence(mdata, "truth", n_neighs=6, n_perms=200)  # the former name still works
    pd.testing.assert_frame_equal(former, blocky)
    assert list(blocky.columns) == ["n_cells", "n_edges", "observed", "null_mean", "null_sd", "z", "pval"]
    assert blocky.index[-1] == "overall"
    assert len(blocky) == 17
    o = blocky.loc["overall"]
    assert o["n_cells"] == mdata.n_obs
    assert o["n_edges"] == 6 * mdata.n_obs
    # 10x10 blocks on a lattice: most neighbours share the block; the null is about 1/16
    assert o["observed"] > 0.8
    assert o["null_mean"] == pytest.approx(1 / 16, abs=0.02)
    assert o["z"] > 20
    assert o["pval"] == pytest.approx(1 / 201)
    assert (blocky["observed"].iloc[:-1] > 0.7).all()
    s = shuffled.loc["overall"]
    assert abs(s["observed"] - s["null_mean"]) < 4 * s["null_sd"]
    assert s["pval"] > 0.001
    assert abs(s["z"]) < 4
    # the second section is a shifted copy 5 um away: a pooled graph would join the two sections
    # and halve the coherence; the per-sample graph keeps the coherence of a single section
    one = mdata[mdata.obs["rna:sample"] == "s1"].copy()
    single = cs.tl.spatial_coherence(one, "truth", n_perms=20)
    assert o["observed"] == pytest.approx(single.loc["overall", "observed"], abs=1e-9)
    pooled = cs.tl.spatial_coherence(mdata, "truth", sample_key=None, n_perms=20)
    assert pooled.loc["overall", "observed"] < o["observed"] - 0.2
    with pytest.raises(ValueError, match="not found"):
        cs.tl.spatial_coherence(mdata, "truth", sample_key="section")
    mdata.write(tmp_path / "c.h5mu")
    back = md.read_h5mu(tmp_path / "c.h5mu")
    pd.testing.assert_frame_equal(back.uns["coh"]["table"], blocky, check_dtype=False, check_index_type=False)
    assert back.uns["coh"]["params"]["n_neighbors"] == 6 and back.uns["coh"]["params"]["n_perms"] == 200


def test_spatial_coherence_is_seeded_and_checks_input():
    mdata = tissue_mudata()
    a = cs.tl.spatial_coherence(mdata, "shuffled", n_perms=30, seed=3)
    b = cs.tl.spatial_coherence(mdata, "shuffled", n_perms=30, seed=3)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="n_perms"):
        cs.tl.spatial_coherence(mdata, "truth", n_perms=0)
    no_xy = ad.AnnData(obs=pd.DataFrame({"cl": ["a", "b"] * 5}, index=[f"c{i}" for i in range(10)]))
    with pytest.raises(ValueError, match="obsm\\['spatial'\\]"):
        cs.tl.spatial_coherence(no_xy, "cl")


def test_spatial_coherence_cluster_without_edges_has_no_pvalue():
    # with a radius, an isolated cell has no neighbour: its cluster has no counted edge, so neither an
    # observed fraction nor a p-value (never the smallest possible p of a perfectly coherent cluster)
    xy = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [2, 1], [100, 100]], dtype=float)
    a = ad.AnnData(
        obs=pd.DataFrame({"cl": ["a", "a", "a", "b", "b", "b", "lone"]}, index=[f"c{i}" for i in range(7)]),
        obsm={"spatial": xy},
    )
    df = cs.tl.spatial_coherence(a, "cl", radius=1.5, n_perms=50)
    assert df.loc["lone", "n_edges"] == 0
    assert np.isnan(df.loc["lone", "observed"])
    assert np.isnan(df.loc["lone", "pval"])
    assert np.isfinite(df.loc["a", "pval"]) and np.isfinite(df.loc["overall", "pval"])
