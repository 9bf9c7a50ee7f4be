"""H&E-only slides: the synthetic second slide, stain estimation / normalisation / augmentation, and
expression predicted from morphology (``cs.tl.predict_expression``)."""

from __future__ import annotations

import functools
import json

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

import cellsymphony as cs
from cellsymphony.pp import _stain

cs.settings.progress = False


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- stain maths on constructed pixels
H_TRUE = np.array([0.60, 0.75, 0.28])
E_TRUE = np.array([0.15, 0.85, 0.50])


def _pixels(h, e, n=20_000, seed=0, h_max=1.5, e_max=0.8):
    """Pixels composed from known stain vectors and concentrations (Beer-Lambert)."""
    rng = np.random.default_rng(seed)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    ch = rng.uniform(0, h_max, n) * (rng.random(n) < 0.5)
    ce = rng.uniform(0.05, e_max, n)
    return _stain._from_od(np.outer(ch, h) + np.outer(ce, e))


def test_macenko_recovers_the_stain_vectors():
    rec = _stain.macenko_estimate(_pixels(H_TRUE, E_TRUE))
    m = rec["stain_matrix"]
    assert m.shape == (3, 2)
    assert np.dot(m[:, 0], H_TRUE / np.linalg.norm(H_TRUE)) > 0.99
    assert np.dot(m[:, 1], E_TRUE / np.linalg.norm(E_TRUE)) > 0.99
    assert np.allclose(np.linalg.norm(m, axis=0), 1)


def test_macenko_normalisation_maps_a_slide_onto_the_reference():
    h2, e2 = np.array([0.45, 0.80, 0.55]), np.array([0.10, 0.80, 0.25])
    ref_px, src_px = _pixels(H_TRUE, E_TRUE, seed=1), _pixels(h2, e2, seed=1, h_max=2.2, e_max=0.5)
    ref, src = _stain.macenko_estimate(ref_px), _stain.macenko_estimate(src_px)
    out = _stain.normalize(src_px, src, ref)
    assert out.dtype == np.uint8 and out.shape == src_px.shape
    before = np.abs(src_px.astype(float) - ref_px).mean()
    after = np.abs(out.astype(float) - ref_px).mean()
    assert after < 0.3 * before  # same concentrations, other stain: normalised back to the reference colours
    again = _stain.macenko_estimate(out)
    assert np.allclose(again["stain_matrix"], ref["stain_matrix"], atol=0.03)


def test_reinhard_matches_lab_statistics_and_keeps_glass():
    ref_px, src_px = _pixels(H_TRUE, E_TRUE, seed=2), _pixels(np.array([0.4, 0.8, 0.5]), E_TRUE, seed=3)
    ref, src = _stain.reinhard_estimate(ref_px), _stain.reinhard_estimate(src_px)
    out = _stain.normalize(src_px, src, ref)
    got = _stain.reinhard_estimate(out)
    assert np.allclose(got["lab_mean"], ref["lab_mean"], atol=1.5)
    glass = np.full((4, 3), 250, np.uint8)
    assert np.array_equal(_stain.normalize(glass, src, ref), glass)


def test_jitter_is_deterministic_per_patch_and_changes_colour():
    patch = _pixels(H_TRUE, E_TRUE, n=32 * 32).reshape(32, 32, 3)
    batch = np.stack([patch, patch])
    rec = {"method": "jitter", "seed": 3, "strength": 0.2}
    xy = np.array([[10.0, 20.0], [30.0, 40.0]])
    a = _stain.apply_transform(batch, rec, xy)
    b = _stain.apply_transform(batch[::-1], rec, xy[::-1])[::-1]
    assert np.array_equal(a, b)  # a patch's draw depends on its centre, not its place in the batch
    assert not np.array_equal(a[0], a[1])
    assert np.abs(a[0].astype(float) - patch).mean() > 2


def test_stain_estimation_needs_tissue():
    with pytest.raises(ValueError, match="tissue pixels"):
        _stain.macenko_estimate(np.full((50, 3), 120, np.uint8))
    with pytest.raises(ValueError, match="different methods"):
        _stain.normalize(np.zeros((2, 3), np.uint8), {"method": "macenko"}, {"method": "reinhard"})


# --------------------------------------------------------------------------- the synthetic second slide
N_SLIDE = 400


@functools.cache
def _slide(tmp_root: str, shift: float):
    return cs.datasets.synthetic_he(f"{tmp_root}/slide_{shift:g}", n_cells=N_SLIDE, seed=5,
                                    stain=cs.datasets.stain_shift(shift))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("he_slides"))
    return {s: _slide(root, s) for s in (0.0, 1.0)}


def test_synthetic_he_writes_an_h_and_e_only_slide(slides):
    folder = slides[0.0]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["he_nuclei.csv", "slide.json", "slide_he_image.ome.tif", "truth.parquet", "truth_expression.h5ad"]
    truth = pd.read_parquet(folder / "truth.parquet")
    nuclei = pd.read_csv(folder / "he_nuclei.csv")
    assert len(truth) == N_SLIDE and 0.9 * N_SLIDE < len(nuclei) < N_SLIDE
    assert set(nuclei.cell_id) <= set(truth.cell_id)
    expr = ad.read_h5ad(folder / "truth_expression.h5ad")
    assert expr.n_obs == N_SLIDE and expr.n_vars > 100 and set(expr.obs_names) == set(truth.cell_id)
    mdata = cs.io.read_he_cells(folder / "slide_he_image.ome.tif", folder / "he_nuclei.csv")
    assert list(mdata.mod) == ["morphology"] and mdata.n_obs == len(nuclei)
    meta = json.loads((folder / "slide.json").read_text())
    assert meta["seed"] == 5 and meta["jpeg_quality"] == 90


def test_stain_shift_changes_the_slide_not_the_tissue(slides):
    t0 = pd.read_parquet(slides[0.0] / "truth.parquet")
    t1 = pd.read_parquet(slides[1.0] / "truth.parquet")
    pd.testing.assert_frame_equal(t0[["cell_id", "cell_type", "x", "y"]], t1[["cell_id", "cell_type", "x", "y"]])
    m0 = json.loads((slides[0.0] / "slide.json").read_text())
    m1 = json.loads((slides[1.0] / "slide.json").read_text())
    assert m1["background"][2] > m0["background"][2]
    h0, h1 = np.array(m0["hematoxylin"]), np.array(m1["hematoxylin"])
    assert np.linalg.norm(h1) > np.linalg.norm(h0)  # stronger hematoxylin


def test_synthetic_he_bad_stain_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        cs.datasets.synthetic_he(tmp_path / "x", n_cells=50, stain={"haematoxylin": [1, 1, 1]})
    with pytest.raises(ValueError, match="3 non-negative"):
        cs.datasets.synthetic_he(tmp_path / "x", n_cells=50, stain={"eosin": [1, 2]})
    with pytest.raises(ValueError, match="jpeg_quality"):
        cs.datasets.synthetic_he(tmp_path / "x", n_cells=50, jpeg_quality=0)
    with pytest.raises(ValueError, match="amount"):
        cs.datasets.stain_shift(3)
    assert not (tmp_path / "x").exists()


def _read(folder):
    return cs.io.read_he_cells(folder / "slide_he_image.ome.tif", folder / "he_nuclei.csv", sample=folder.name)


def test_stain_shift_changes_embeddings_and_normalisation_reduces_it(slides, tmp_path):
    a, b = _read(slides[0.0])[:150].copy(), _read(slides[1.0])[:150].copy()
    for m in (a, b):
        cs.pp.embed_morphology(m, model="handcrafted", num_workers=0, key_added="X_raw")
    cs.pp.normalize_stain(a, n_cells=100)
    cs.pp.normalize_stain(b, reference=a, n_cells=100)
    for m in (a, b):
        cs.pp.embed_morphology(m, model="handcrafted", num_workers=0, key_added="X_norm", stain="stain")
    ids = a.obs_names.intersection(b.obs_names)
    names = list(a["morphology"].uns["X_raw"]["feature_names"])
    stain_cols = [i for i, n in enumerate(names) if n.startswith(("hematoxylin_", "eosin_", "rgb_"))]

    def gap(key):
        xa = a["morphology"][ids].obsm[key][:, stain_cols]
        xb = b["morphology"][ids].obsm[key][:, stain_cols]
        scale = xa.std(axis=0) + 1e-6
        return float(np.abs((xa - xb) / scale).mean())

    assert gap("X_raw") > 0.5  # the stain shift is visible in the embedding
    assert gap("X_norm") < 0.6 * gap("X_raw")  # normalised to A's stain, most of it is gone
    # the reference is recorded with the embedding, the same for both slides, and survives h5mu
    rec_a = a["morphology"].uns["X_norm"]["params"]["stain"]
    rec_b = b["morphology"].uns["X_norm"]["params"]["stain"]
    assert np.allclose(rec_a["reference"]["stain_matrix"], rec_b["reference"]["stain_matrix"])
    b.write(tmp_path / "b.h5mu")
    back = md.read_h5mu(tmp_path / "b.h5mu")
    got = back["morphology"].uns["X_norm"]["params"]["stain"]["reference"]
    assert np.allclose(got["stain_matrix"], rec_a["reference"]["stain_matrix"])
    assert str(got["method"]) == "macenko"
    # a new slide can be normalised to the reference read back from a file
    c = _read(slides[1.0])
    cs.pp.normalize_stain(c, reference=back["morphology"].uns["X_norm"]["params"])
    assert np.allclose(c["morphology"].uns["stain"]["reference"]["stain_matrix"], rec_a["reference"]["stain_matrix"])


def test_a_model_refuses_an_h_and_e_only_slide_embedded_otherwise(slides):
    """read_he_cells -> embed_morphology -> model.predict: the slide's embedding must come from the producer
    the model was trained on (here: patches at another mpp), unless allow_mismatch=True."""
    a, b = _read(slides[0.0])[:120].copy(), _read(slides[1.0])[:120].copy()
    cs.pp.embed_morphology(a, model="handcrafted", num_workers=0)
    cs.pp.embed_morphology(b, model="handcrafted", num_workers=0, mpp=1.0)
    a.obs["cell_type"] = np.array(["x", "y"])[np.arange(a.n_obs) % 2]
    model = cs.tl.train_classifier(a, "cell_type", arch="morphology", epochs=1, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match=r"mpp: trained on 0\.5, given 1\.0.*Pass allow_mismatch=True"):
        model.predict(b)
    assert "cs_pred" not in b.obs
    with pytest.warns(UserWarning, match="allow_mismatch=True"):
        model.predict(b, allow_mismatch=True)
    assert b.obs["cs_pred"].notna().any()


def test_normalize_stain_bad_input(slides):
    b = _read(slides[0.0])
    with pytest.raises(ValueError, match="cs.pp.normalize_stain"):
        cs.pp.embed_morphology(b, model="handcrafted", num_workers=0, stain="stain")
    assert "X_handcrafted" not in b["morphology"].obsm
    other = _read(slides[1.0])
    with pytest.raises(ValueError, match="run cs.pp.normalize_stain on the reference"):
        cs.pp.normalize_stain(b, reference=other)
    cs.pp.normalize_stain(other, method="reinhard", n_cells=50)
    with pytest.raises(ValueError, match="method='reinhard'"):
        cs.pp.normalize_stain(b, reference=other)
    with pytest.raises(ValueError, match="method"):
        cs.pp.normalize_stain(b, method="vahadane")
    copy = cs.pp.normalize_stain(b, reference=other, method="reinhard", n_cells=50, copy=True)
    assert "stain" in copy["morphology"].uns and "stain" not in b["morphology"].uns


def test_augment_stain_repeats_cells_with_perturbed_embeddings(slides):
    b = _read(slides[0.0])
    b = b[:120].copy()
    cs.pp.embed_morphology(b, model="handcrafted", num_workers=0)
    aug = cs.pp.augment_stain(b, n_copies=2, strength=0.2, seed=1)
    assert aug.n_obs == 3 * b.n_obs
    m = aug["morphology"]
    assert (m.obs["stain_copy"].to_numpy() == np.repeat([0, 1, 2], b.n_obs)).all()
    assert m.obs_names[b.n_obs] == f"{b.obs_names[0]}-stain1"
    x = m.obsm["X_handcrafted"]
    orig = b["morphology"].obsm["X_handcrafted"]
    assert np.array_equal(x[: b.n_obs], orig)
    assert not np.allclose(x[b.n_obs : 2 * b.n_obs], orig)
    assert np.array_equal(m.obsm["spatial"][b.n_obs :2 * b.n_obs], b["morphology"].obsm["spatial"])
    again = cs.pp.augment_stain(b, n_copies=1, strength=0.2, seed=1)
    assert np.allclose(again["morphology"].obsm["X_handcrafted"][b.n_obs :], x[b.n_obs : 2 * b.n_obs])
    with pytest.raises(ValueError, match="strength"):
        cs.pp.augment_stain(b, strength=1.5)


# --------------------------------------------------------------------------- predict_expression
N_REF, N_GENES = 600, 40


@functools.cache
def _world(seed: int = 0):
    """A reference (counts + morphology embedding) and a target from the same cell-type model."""
    rng = np.random.default_rng(seed)
    k = 5
    profiles = rng.gamma(0.6, 1.0, size=(k, N_GENES)) + 0.05
    centres = rng.normal(size=(k, 24)) * 2.0

    def cells(n, prefix):
        t = rng.integers(0, k, n)
        counts = rng.poisson(profiles[t] / profiles[t].sum(1, keepdims=True) * 150).astype(np.float32)
        morph = (centres[t] + rng.normal(scale=0.8, size=(n, 24))).astype(np.float32)
        names = [f"{prefix}{i}" for i in range(n)]
        xy = rng.uniform(0, 1000, (n, 2))
        return t, counts, morph, names, xy

    def morph_ad(morph, names, xy):
        m = ad.AnnData(np.zeros((len(names), 0), np.float32), obs=pd.DataFrame(
            {"sample": pd.Categorical(["s"] * len(names))}, index=names), obsm={"X_uni2": morph, "spatial": xy,
                                                                                "nucleus_centroid": xy})
        m.uns["X_uni2"] = {"params": {"model": "uni2-h", "weights_checksum": "sha256:abc", "mpp": 0.5, "size": 224}}
        return m

    t, counts, morph, names, xy = cells(N_REF, "r")
    pcs = np.log1p(counts) @ rng.normal(size=(N_GENES, 16)).astype(np.float32)
    rna = ad.AnnData(counts, obs=pd.DataFrame({"sample": pd.Categorical(["ref"] * N_REF)}, index=names),
                     var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]), obsm={"X_pca": pcs, "spatial": xy})
    ref = md.MuData({"rna": rna, "morphology": morph_ad(morph, names, xy)})
    ref.uns["cellsymphony"] = {"latest": {"rna": "X_pca", "morphology": "X_uni2"}}
    aligner = cs.tl.align_contrastive(ref, epochs=15, batch_size=128, dim=16, hidden=64, seed=0)
    tt, tcounts, tmorph, tnames, txy = cells(400, "t")
    tgt = md.MuData({"morphology": morph_ad(tmorph, tnames, txy)})
    tgt.uns["cellsymphony"] = {"latest": {"morphology": "X_uni2"}}
    true = np.log1p(tcounts / tcounts.sum(1, keepdims=True) * np.median(counts.sum(1)))
    return ref, tgt, aligner, true


def world():
    ref, tgt, aligner, true = _world()
    return ref.copy(), tgt.copy(), aligner, true


def _mean_gene_r(pred, true):
    r = [np.corrcoef(pred[:, j], true[:, j])[0, 1] for j in range(true.shape[1]) if true[:, j].std() > 0]
    return float(np.nanmean(r))


@pytest.mark.parametrize("method", ["knn", "ridge"])
def test_predict_expression_writes_a_modality_that_round_trips(method, tmp_path):
    ref, tgt, aligner, true = world()
    cs.tl.predict_expression(tgt, ref, method=method, aligner=aligner if method == "knn" else None, k=20)
    rna = tgt["rna"]
    assert list(rna.var_names) == list(ref["rna"].var_names)
    assert list(rna.obs_names) == list(tgt["morphology"].obs_names)
    assert rna.X.dtype == np.float32 and np.isfinite(rna.X).all()
    assert np.array_equal(rna.obsm["spatial"], tgt["morphology"].obsm["spatial"])
    rec = rna.uns["predicted"]
    assert rec["params"]["method"] == method and rec["reference"]["n_cells"] == N_REF
    assert _mean_gene_r(rna.X, true) > 0.5  # cell types are recoverable from this morphology
    tgt.write(tmp_path / "t.h5mu")
    back = md.read_h5mu(tmp_path / "t.h5mu")
    assert np.array_equal(back["rna"].X, rna.X)
    assert back["rna"].uns["predicted"]["params"]["method"] == method
    # the scanpy toolkit works on it
    import scanpy as sc

    sc.pp.pca(back["rna"], n_comps=5)
    assert back["rna"].obsm["X_pca"].shape == (tgt.n_obs, 5)


def test_knn_is_the_mean_of_the_nearest_reference_cells():
    ref, tgt, aligner, true = world()
    with pytest.warns(UserWarning, match="left out"):
        cs.tl.predict_expression(tgt, ref, aligner=aligner, k=15, genes=["g3", "g1", "nope"], normalize=False,
                                 match="rna")
    pred = tgt["rna"].X
    assert list(tgt["rna"].var_names) == ["g3", "g1"]
    zt = aligner.transform(tgt, "morphology")
    zr = aligner.transform(ref, "rna")
    nn = np.argsort(-(zt[:3] @ zr.T), axis=1)[:, :15]
    by_hand = ref["rna"][:, ["g3", "g1"]].X[nn].mean(axis=1)
    assert np.allclose(pred[:3], by_hand, atol=1e-5)
    assert list(tgt["rna"].uns["predicted"]["genes_missing"]) == ["nope"]
    # match="morphology" (the default): neighbours among the reference's morphology projections
    cs.tl.predict_expression(tgt, ref, aligner=aligner, k=15, genes=["g3"], normalize=False)
    zm = aligner.transform(ref, "morphology")
    nn = np.argsort(-(zt[:3] @ zm.T), axis=1)[:, :15]
    assert np.allclose(tgt["rna"].X[:3, 0], ref["rna"][:, "g3"].X[nn].mean(axis=1).ravel(), atol=1e-5)


def test_nan_embeddings_give_nan_rows_and_rerun_replaces_the_prediction():
    ref, tgt, aligner, _ = world()
    tgt["morphology"].obsm["X_uni2"][:2] = np.nan
    cs.tl.predict_expression(tgt, ref, aligner=aligner, k=10)
    assert np.isnan(tgt["rna"].X[:2]).all() and np.isfinite(tgt["rna"].X[2:]).all()
    cs.tl.predict_expression(tgt, ref, method="ridge", genes=["g0"])
    assert tgt["rna"].n_vars == 1 and tgt["rna"].uns["predicted"]["params"]["method"] == "ridge"


def test_predict_expression_bad_input():
    ref, tgt, aligner, _ = world()
    with pytest.raises(ValueError, match="None of the 2 genes"):
        cs.tl.predict_expression(tgt, ref, aligner=aligner, genes=["x1", "x2"])
    with pytest.raises(ValueError, match="fewer than k=5000"):
        cs.tl.predict_expression(tgt, ref, aligner=aligner, k=5000)
    with pytest.raises(ValueError, match="needs aligner="):
        cs.tl.predict_expression(tgt, ref)
    bare = md.MuData({"morphology": tgt["morphology"].copy()})
    del bare["morphology"].obsm["X_uni2"]
    with pytest.raises(ValueError, match=r"run cs.pp.embed_morphology\(target, model='uni2-h'"):
        cs.tl.predict_expression(bare, ref, aligner=aligner)
    with pytest.raises(ValueError, match="measured 'rna'"):
        cs.tl.predict_expression(ref.copy(), ref, aligner=aligner)
    with pytest.raises(ValueError, match="MuData"):
        cs.tl.predict_expression(tgt["morphology"], ref, aligner=aligner)
    with pytest.raises(ValueError, match=r"no 'morphology' modality.*cs.pp.embed_morphology"):
        cs.tl.predict_expression(md.MuData({"other": tgt["morphology"].copy()}), ref, aligner=aligner)
    with pytest.raises(ValueError, match=r"run cs.pp.embed_morphology"):  # ridge: no latest embedding either
        cs.tl.predict_expression(md.MuData({"morphology": bare["morphology"].copy()}), ref, method="ridge")
    with pytest.raises(ValueError, match="fewer than k=601"):  # one more than the reference's cells
        cs.tl.predict_expression(tgt, ref, aligner=aligner, k=N_REF + 1)
    with pytest.raises(ValueError, match=r"k=0 is out of range"):
        cs.tl.predict_expression(tgt, ref, aligner=aligner, k=0)
    # another encoder's weights: refused by the provenance check unless allowed
    tgt["morphology"].uns["X_uni2"]["params"]["weights_checksum"] = "sha256:other"
    with pytest.raises(ValueError, match="weights_checksum"):
        cs.tl.predict_expression(tgt, ref, aligner=aligner)
    assert "rna" not in tgt.mod
    with pytest.warns(UserWarning, match="weights_checksum"):
        cs.tl.predict_expression(tgt, ref, aligner=aligner, allow_mismatch=True)
    assert "rna" in tgt.mod


def test_provenance_compares_the_stain_reference():
    from cellsymphony.tl._predict_expression import provenance_mismatch

    ref = {"model": "uni2-h", "stain": {"method": "macenko", "reference": {"method": "macenko",
                                                                           "stain_matrix": np.eye(3)[:, :2]}}}
    assert provenance_mismatch(ref, dict(ref)) == []
    assert "stain" in provenance_mismatch(ref, {"model": "uni2-h"})[0]
    other = {"model": "uni2-h", "stain": {"method": "macenko", "reference": {"method": "macenko",
                                                                             "stain_matrix": np.ones((3, 2))}}}
    assert "different reference" in provenance_mismatch(ref, other)[0]


def test_blur_jpeg_and_pixel_size_of_the_scan(tmp_path):
    import tifffile

    sharp = cs.datasets.synthetic_he(tmp_path / "sharp", n_cells=60, seed=7, he_mpp=0.5)
    soft = cs.datasets.synthetic_he(tmp_path / "soft", n_cells=60, seed=7, he_mpp=0.5, blur_um=1.5, jpeg_quality=40)
    imgs = [tifffile.imread(f / "slide_he_image.ome.tif").astype(float) for f in (sharp, soft)]
    assert imgs[0].shape == imgs[1].shape

    def edges(img):
        return float(np.abs(np.diff(img, axis=1)).mean())

    assert edges(imgs[1]) < 0.7 * edges(imgs[0])
    meta = json.loads((soft / "slide.json").read_text())
    assert meta["blur_um"] == 1.5 and meta["jpeg_quality"] == 40 and meta["he_mpp"] == 0.5
    assert cs.io.read_he(soft / "slide_he_image.ome.tif").mpp == pytest.approx(0.5)
