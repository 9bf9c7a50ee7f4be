"""Tests above the sizes where a code path changes, ours or a field library's (issue 12).

Every function whose algorithm or memory plan depends on the number of cells gets a test just above the
size where it switches. The thresholds, and where they come from:

| size | what switches | covered by |
| --- | --- | --- |
| 8,192 cells | ``scanpy.pp.neighbors`` leaves exact brute-force kNN for pynndescent (euclidean) | niches, ``pl.embedding``, the kNN test |
| 10,000 cells | umap-learn's default epochs drop from 500 to 200 | ``pl.embedding`` |
| ``2e7 / n`` permutations | ``spatial_coherence`` draws its null in blocks of permutations | coherence |
| 2 x ``n_neighs`` cells | scikit-learn's ``NearestNeighbors(algorithm="auto")`` (squidpy's graph) uses a k-d tree above it | coherence, graph test |
| 256 MiB of dense query | ``annotate_singler`` classifies in blocks of cells | SingleR block test |
| ``chunk_size`` cells | scGPT count scan, the resumable caches, dask tasks | scan test (and test_distributed) |
| 4,096 held-out cells | contrastive retrieval recall in blocks of rows | recall test |

Embeddings are random around cluster centres, so each test runs in seconds; the first pynndescent call of
a session also compiles its numba kernels (about half a minute on two cores).
"""

from __future__ import annotations

import functools

import anndata as ad
import matplotlib
import mudata as md
import numpy as np
import pandas as pd
import pytest

import cellsymphony as cs

matplotlib.use("Agg")
cs.settings.progress = False

KEY = "X_cs_contrastive"
KNN_SWITCH = 8192  # scanpy: exact kNN below, pynndescent above (euclidean)
N_BIG = 24_000  # above every switch in the table


@functools.cache
def _section(n_side: tuple[int, int] = (160, 150), block: int = 40, dim: int = 32, seed: int = 0):
    """A lattice of ``160 x 150 = 24,000`` cells 10 um apart in two sections (left and right half),
    with ``block x block`` square niches whose cells' representations lie near the niche's centre."""
    rng = np.random.default_rng(seed)
    w, h = n_side
    gy, gx = np.mgrid[0:h, 0:w]
    xy = np.c_[gx.ravel(), gy.ravel()].astype(float) * 10.0
    nbx = -(-w // block)
    truth = (gy.ravel() // block) * nbx + gx.ravel() // block
    k = int(truth.max()) + 1
    centres = np.linalg.qr(rng.normal(size=(dim, k)))[0].T
    z = (centres[truth] + 0.12 * rng.normal(size=(len(truth), dim))).astype(np.float32)
    sample = np.where(gx.ravel() < w // 2, "s1", "s2")
    return xy, truth, z, sample


def _mudata() -> md.MuData:
    xy, truth, z, sample = _section()
    names = pd.Index([f"c{i}" for i in range(len(truth))])
    obs = pd.DataFrame({"sample": pd.Categorical(sample)}, index=names)
    mods = {}
    for mod in ("rna", "morphology"):
        mods[mod] = ad.AnnData(
            np.zeros((len(names), 0), np.float32), obs=obs.copy(), obsm={"spatial": xy.copy(), KEY: z.copy()}
        )
    mods["rna"].obs["truth"] = pd.Categorical(truth.astype(str))
    return md.MuData(mods)


def test_section_is_above_every_switch():
    xy, truth, z, sample = _section()
    assert len(truth) == N_BIG > KNN_SWITCH
    assert 2e7 / len(truth) < 1000  # the coherence null below needs more than one block of permutations


def test_scanpy_knn_above_its_switch_is_accurate():
    """The pynndescent path of ``sc.pp.neighbors`` (crashed with pynndescent 0.7: csr_array.getnnz)."""
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    _, _, z, _ = _section()
    a = ad.AnnData(obsm={"r": z})
    sc.pp.neighbors(a, n_neighbors=15, use_rep="r", random_state=0)
    d = a.obsp["distances"].tocsr()
    assert d.shape == (N_BIG, N_BIG)
    assert (np.diff(d.indptr) >= 14).all()  # n_neighbors includes the cell itself
    rows = np.random.default_rng(0).choice(N_BIG, 300, replace=False)
    exact = NearestNeighbors(n_neighbors=15).fit(z).kneighbors(z[rows], return_distance=False)[:, 1:]
    approx = [set(d.indices[d.indptr[r] : d.indptr[r + 1]]) - {r} for r in rows]
    recall = np.mean([len(approx[i] & set(exact[i])) / 14 for i in range(len(rows))])
    assert recall > 0.9


def test_niches_above_knn_switch(tmp_path):
    from sklearn.metrics import adjusted_rand_score

    mdata = _mudata()
    mdata["morphology"].obsm[KEY][:3] = np.nan
    cs.tl.niches(mdata, n_neighbors=15, resolution=0.5)
    lab = mdata["morphology"].obs["cs_niche"]
    assert lab.isna().sum() == 3
    ok = lab.notna().to_numpy()
    truth = mdata["rna"].obs["truth"].to_numpy()
    assert adjusted_rand_score(truth[ok], lab.to_numpy()[ok]) > 0.9
    assert mdata["morphology"].uns["cs_niche"]["n_excluded"] == 3
    mdata.write(tmp_path / "n.h5mu")
    back = md.read_h5mu(tmp_path / "n.h5mu")
    pd.testing.assert_series_equal(
        back.obs["morphology:cs_niche"].astype(str), mdata.obs["morphology:cs_niche"].astype(str)
    )


def test_pl_embedding_above_knn_and_umap_switches():
    import matplotlib.pyplot as plt

    mdata = _mudata()
    n = 20_000
    sub = mdata[:n].copy()
    ax = cs.pl.embedding(sub, KEY, "truth", mod="morphology", show=False)
    xy = np.asarray(ax.collections[0].get_offsets())
    assert xy.shape == (n, 2)
    assert np.isfinite(xy).all()
    # the UMAP keeps niches apart: cells lie closer to their own niche's centre than to others'
    truth = sub["rna"].obs["truth"].to_numpy()
    cats = np.unique(truth)
    centres = np.stack([xy[truth == c].mean(axis=0) for c in cats])
    nearest = cats[np.argmin(((xy[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)]
    assert (nearest == truth).mean() > 0.9
    plt.close("all")


def test_spatial_coherence_above_graph_and_permutation_block_sizes(tmp_path):
    mdata = _mudata()
    n_perms = 1000  # 2e7 / 24,000 = 833 permutations per block: two blocks
    df = cs.tl.spatial_coherence(mdata, "truth", n_neighbors=6, n_perms=n_perms, key_added="coh")
    o = df.loc["overall"]
    assert o["n_cells"] == N_BIG
    assert o["n_edges"] == 6 * N_BIG
    # 40 x 40 blocks on a 10 um lattice: only cells on a block edge have a neighbour in another block
    assert o["observed"] > 0.9
    xy, truth, _, sample = _section()
    # labels are permuted within each section: the null is the per-section chance of a shared label
    frame = pd.DataFrame({"s": sample, "t": truth})
    null = sum((g["t"].value_counts(normalize=True) ** 2).sum() * len(g) for _, g in frame.groupby("s")) / len(frame)
    assert o["null_mean"] == pytest.approx(float(null), rel=0.05)
    assert o["pval"] == pytest.approx(1 / (n_perms + 1))
    # seeded and independent of the block plan: a second run gives the same table
    again = cs.tl.spatial_coherence(mdata, "truth", n_neighbors=6, n_perms=n_perms)
    pd.testing.assert_frame_equal(df, again)
    mdata.write(tmp_path / "c.h5mu")
    back = md.read_h5mu(tmp_path / "c.h5mu")
    pd.testing.assert_frame_equal(back.uns["coh"]["table"], df, check_dtype=False, check_index_type=False)


def test_squidpy_graph_above_kdtree_switch_is_exact_and_per_sample():
    """squidpy's generic kNN graph (scikit-learn k-d tree at this size) equals an exact kNN per section."""
    import squidpy as sq
    from scipy.spatial import cKDTree

    xy, _, _, sample = _section()
    rng = np.random.default_rng(1)
    xy = xy + rng.uniform(-2, 2, xy.shape)  # break the lattice's distance ties
    a = ad.AnnData(obs=pd.DataFrame({"sample": pd.Categorical(sample)}), obsm={"spatial": xy})
    sq.gr.spatial_neighbors(a, library_key="sample", coord_type="generic", n_neighs=6)
    g = a.obsp["spatial_connectivities"].tocsr()
    assert (sample[g.tocoo().row] == sample[g.tocoo().col]).all()
    for s in ("s1", "s2"):
        idx = np.flatnonzero(sample == s)
        _, nn = cKDTree(xy[idx]).query(xy[idx], k=7)
        rows = rng.choice(len(idx), 200, replace=False)
        for r in rows:
            got = set(g.indices[g.indptr[idx[r]] : g.indptr[idx[r] + 1]]) - {idx[r]}
            assert set(idx[nn[r, 1:]]) <= got  # the graph is symmetrised: it may hold more


def test_singler_blocks_equal_the_whole(monkeypatch):
    """``annotate_singler`` classifies in blocks of cells above a memory budget: same result as one block."""
    from cellsymphony.pp import _annotate_singler as mod

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(60)]
    n_types = 3
    prof = rng.gamma(0.6, 1.0, (n_types, len(genes))) + 0.05
    prof[np.arange(n_types)[:, None], rng.choice(len(genes), (n_types, 6), replace=False)] += 8

    def draw(n, depth):
        t = rng.integers(0, n_types, n)
        p = prof[t] / prof[t].sum(1, keepdims=True)
        return rng.poisson(p * depth).astype(np.float32), t

    rx, rt = draw(600, 400)
    qx, qt = draw(2_500, 80)
    ref = ad.AnnData(rx, obs=pd.DataFrame({"ct": [f"T{t}" for t in rt]}), var=pd.DataFrame(index=genes))
    whole = ad.AnnData(qx, var=pd.DataFrame(index=genes))
    whole.obs_names = [f"q{i}" for i in range(len(qt))]
    blocked = whole.copy()
    cs.pp.annotate_singler(whole, ref, ref_label_key="ct", min_genes=10)
    # 60 genes x 8 bytes x 700 cells: four blocks, the last one short
    monkeypatch.setattr(mod, "_QUERY_BLOCK_BYTES", 8 * len(genes) * 700)
    cs.pp.annotate_singler(blocked, ref, ref_label_key="ct", min_genes=10)
    for col in ("singler", "singler_pruned", "singler_confident", "singler_delta", "singler_delta_med"):
        pd.testing.assert_series_equal(blocked.obs[col], whole.obs[col])
    np.testing.assert_array_equal(blocked.obsm["singler_scores"], whole.obsm["singler_scores"])
    assert (whole.obs["singler"].astype(str).str[1:].astype(int).to_numpy() == qt).mean() > 0.9


def test_scgpt_count_scan_chunks_equal_the_whole():
    import scipy.sparse as sp

    from cellsymphony.models.encoders._scgpt_inputs import scan_counts

    rng = np.random.default_rng(0)
    x = sp.random(5_000, 80, density=0.1, format="csr", random_state=1, dtype=np.float32)
    x.data = np.ceil(x.data * 20)
    x.data[[4_000, 30_000]] = [2.5, -1.0]  # the report's counts and first example must not depend on chunks
    col2tok = np.where(rng.random(80) < 0.8, np.arange(80) + 10, -1)
    one = scan_counts(x, col2tok, chunk_size=10_000)
    many = scan_counts(x, col2tok, chunk_size=700)
    assert one[1]["n_negative"] + one[1]["n_noninteger"] >= 1
    for a, b in zip(one, many, strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        else:
            np.testing.assert_array_equal(a, b)


def test_contrastive_recall_blocks_equal_the_whole():
    torch = pytest.importorskip("torch")
    from cellsymphony.models.contrastive._model import retrieval_recall

    g = torch.Generator().manual_seed(0)
    n = 5_000  # above the 4,096-row block
    za = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    zb = torch.nn.functional.normalize(za + 0.3 * torch.randn(n, 16, generator=g), dim=1)
    whole = retrieval_recall(za, zb, chunk=n)
    blocks = retrieval_recall(za, zb)
    assert whole == blocks
    assert whole[min(whole)] > 50 / n  # far above chance (k / n)
