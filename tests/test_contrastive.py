"""Contrastive alignment: the loss, training on paired noisy views of one latent, save/load, bad input."""

from __future__ import annotations

import functools
import math

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch

import cellsymphony as cs
from cellsymphony.models.contrastive import ContrastiveAligner, ContrastiveModule, info_nce

cs.settings.progress = False
KEY = "X_cs_contrastive"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _paired_arrays(n: int, seed: int, n_gene: int = 32, n_morph: int = 48, k: int = 8, noise: float = 0.3):
    """Two noisy, differently non-linear views of one k-dimensional latent per cell."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    a = rng.normal(size=(k, n_gene)) / np.sqrt(k)
    b = rng.normal(size=(k, n_morph)) / np.sqrt(k)
    xg = np.tanh(z @ a) + noise * rng.normal(size=(n, n_gene))
    xm = (z @ b) ** 2 + 3.0 + noise * rng.normal(size=(n, n_morph))
    xy = rng.uniform(0, 2000, size=(n, 2))
    return xg.astype(np.float32), xm.astype(np.float32), xy


def paired_mudata(n: int = 1000, seed: int = 0, *, rna_cells=None, morph_cells=None) -> md.MuData:
    """A MuData with the cs.io.read_xenium layout and embeddings in X_scgpt / X_uni2."""
    xg, xm, xy = _paired_arrays(n, seed)
    names = np.array([f"cell_{i}" for i in range(n)])
    rna_cells = np.arange(n) if rna_cells is None else np.asarray(rna_cells)
    morph_cells = np.arange(n) if morph_cells is None else np.asarray(morph_cells)

    def modality(rows, rep, x):
        obs = pd.DataFrame({"sample": pd.Categorical(["s1"] * len(rows))}, index=names[rows])
        return ad.AnnData(
            np.zeros((len(rows), 0), np.float32),
            obs=obs,
            obsm={rep: x[rows].copy(), "spatial": xy[rows].copy(), "nucleus_centroid": xy[rows].copy()},
        )

    mdata = md.MuData(
        {"rna": modality(rna_cells, "X_scgpt", xg), "morphology": modality(morph_cells, "X_uni2", xm)}
    )
    mdata.uns["cellsymphony"] = {"latest": {"rna": "X_scgpt", "morphology": "X_uni2"}}
    return mdata


@functools.cache
def _trained(n: int = 1000):
    mdata = paired_mudata(n)
    aligner = cs.tl.align_contrastive(mdata, epochs=20, batch_size=128)
    return mdata, aligner


def trained():
    mdata, aligner = _trained()
    return mdata.copy(), aligner


# --------------------------------------------------------------------------- the loss
def test_info_nce_hand_computed():
    """Two cells in 2-d at temperature 0.5: logits [[2, 1.2], [0, 1.6]]; mean of four cross-entropies."""
    za = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    expected = (
        math.log(1 + math.exp(-0.8))  # a->b, cell 0: logits (2, 1.2)
        + math.log(1 + math.exp(-1.6))  # a->b, cell 1: logits (0, 1.6)
        + math.log(1 + math.exp(-2.0))  # b->a, cell 0: logits (2, 0)
        + math.log(1 + math.exp(-0.4))  # b->a, cell 1: logits (1.2, 1.6)
    ) / 4
    assert float(info_nce(za, zb, 0.5)) == pytest.approx(expected, rel=1e-6)


def test_info_nce_symmetric_and_perfect_pairs():
    g = torch.Generator().manual_seed(0)
    za = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    zb = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    assert float(info_nce(za, zb, 0.07)) == pytest.approx(float(info_nce(zb, za, 0.07)), rel=1e-6)
    # identical, well separated pairs give a loss near zero at a low temperature
    eye = torch.eye(16)
    assert float(info_nce(eye, eye, 0.01)) < 1e-6
    with pytest.raises(ValueError, match="differ in shape"):
        info_nce(za, zb[:10], 0.07)


def test_module_symmetric_loss_and_temperature_clamp():
    torch.manual_seed(0)
    module = ContrastiveModule(20, 20, dim=8, hidden=16, dropout=0.0)
    x1, x2 = torch.randn(32, 20), torch.randn(32, 20)
    # the heads are different networks, so swap the weights together with the inputs
    swapped = ContrastiveModule(20, 20, dim=8, hidden=16, dropout=0.0)
    swapped.gene_head.load_state_dict(module.morph_head.state_dict())
    swapped.morph_head.load_state_dict(module.gene_head.state_dict())
    swapped.log_temperature.data.copy_(module.log_temperature.data)
    with torch.no_grad():
        assert float(module.loss(x1, x2)) == pytest.approx(float(swapped.loss(x2, x1)), rel=1e-6)
    z = module.encode(x1, "morphology")
    np.testing.assert_allclose(z.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    assert float(module.temperature) == pytest.approx(0.07)
    module.log_temperature.data.fill_(math.log(1e-4))
    assert float(module.temperature) == pytest.approx(0.01)
    module.clamp_temperature()
    assert float(module.log_temperature) == pytest.approx(math.log(0.01))
    fixed = ContrastiveModule(4, 4, learn_temperature=False)
    assert "log_temperature" not in dict(fixed.named_parameters())
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveModule(4, 4, temperature=5.0)


# --------------------------------------------------------------------------- training
def test_align_contrastive_retrieval_far_above_chance():
    mdata, aligner = trained()
    uns = mdata.uns[KEY]
    ret = uns["retrieval"]
    assert list(ret.index) == ["recall@1", "recall@5", "recall@10"]
    n_test = uns["n_cells"]["n_test"]
    assert n_test == 100
    np.testing.assert_allclose(ret["chance"], np.array([1, 5, 10]) / n_test)
    for col in ("rna_to_morphology", "morphology_to_rna"):
        assert ret.loc["recall@1", col] > 20 * ret.loc["recall@1", "chance"]  # > 0.2 with chance 0.01
        assert ret.loc["recall@10", col] > 0.6
        assert (np.diff(ret[col].to_numpy()) >= 0).all()
    hist = uns["history"]
    assert list(hist.columns) == ["epoch", "train_loss", "test_loss", "temperature"]
    assert len(hist) == 20
    assert hist["train_loss"].iloc[-1] < 0.6 * hist["train_loss"].iloc[0]
    assert hist["test_loss"].iloc[-1] < hist["test_loss"].iloc[0]
    # outputs: every cell of each modality, L2-normalised, dim 128
    for mod in ("rna", "morphology"):
        z = mdata[mod].obsm[KEY]
        assert z.shape == (1000, 128)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    params = uns["params"]
    assert params["gene_rep"] == "X_scgpt"
    assert params["morph_rep"] == "X_uni2"
    assert params["batch_size"] == 128
    assert params["epochs"] == 20
    assert set(uns["test_obs_names"]) == set(aligner.test_obs_names)
    # a held-out cell's own partner is, on average, far closer than other cells
    zr, zm = mdata["rna"].obsm[KEY], mdata["morphology"].obsm[KEY]
    test = mdata["rna"].obs_names.get_indexer(aligner.test_obs_names)
    sims = zr[test] @ zm[test].T
    assert np.diag(sims).mean() > sims.mean() + 0.3


def test_training_is_reproducible():
    a = paired_mudata(300, seed=1)
    b = paired_mudata(300, seed=1)
    cs.tl.align_contrastive(a, epochs=2, batch_size=64, dim=16, hidden=32)
    cs.tl.align_contrastive(b, epochs=2, batch_size=64, dim=16, hidden=32)
    np.testing.assert_array_equal(a["morphology"].obsm[KEY], b["morphology"].obsm[KEY])
    pd.testing.assert_frame_equal(a.uns[KEY]["history"], b.uns[KEY]["history"])


def test_save_load_transform_round_trip_exact(tmp_path):
    mdata, aligner = trained()
    assert aligner.save(tmp_path / "aligner") == tmp_path / "aligner"
    assert sorted(p.name for p in (tmp_path / "aligner").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        aligner.save(tmp_path / "aligner")
    aligner.save(tmp_path / "aligner", overwrite=True)
    loaded = cs.models.ContrastiveAligner.load(tmp_path / "aligner")
    assert isinstance(loaded, ContrastiveAligner)
    assert loaded.temperature == aligner.temperature
    pd.testing.assert_frame_equal(loaded.history, aligner.history)
    pd.testing.assert_frame_equal(loaded.retrieval, aligner.retrieval)
    for mod in ("rna", "morphology"):
        np.testing.assert_array_equal(loaded.transform(mdata, mod), mdata[mod].obsm[KEY])
    # an H&E-only slide: a MuData with the morphology modality alone
    he_only = md.MuData({"morphology": mdata["morphology"][:, :].copy()})
    del he_only["morphology"].obsm[KEY]
    out = loaded.transform(he_only, key_added=KEY)
    np.testing.assert_array_equal(out, mdata["morphology"].obsm[KEY])
    np.testing.assert_array_equal(he_only["morphology"].obsm[KEY], out)
    # an AnnData of the modality works too, and wrong widths are refused
    np.testing.assert_array_equal(loaded.transform(mdata["morphology"], rep="X_uni2"), out)
    with pytest.raises(ValueError, match="takes 48 features"):
        loaded.transform_array(np.zeros((3, 5), np.float32), "morphology")
    with pytest.raises(ValueError, match="not a saved ContrastiveAligner"):
        ContrastiveAligner.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not trained"):
        ContrastiveAligner().transform(mdata)


def test_h5mu_round_trip(tmp_path):
    mdata, _ = trained()
    path = tmp_path / "a.h5mu"
    mdata.write(path)
    back = md.read_h5mu(path)
    for mod in ("rna", "morphology"):
        np.testing.assert_array_equal(back[mod].obsm[KEY], mdata[mod].obsm[KEY])
    uns, uns0 = back.uns[KEY], mdata.uns[KEY]
    pd.testing.assert_frame_equal(uns["history"], uns0["history"], check_dtype=False)
    pd.testing.assert_frame_equal(uns["retrieval"], uns0["retrieval"], check_dtype=False)
    assert uns["n_cells"] == uns0["n_cells"]
    assert uns["params"]["gene_rep"] == "X_scgpt"
    np.testing.assert_array_equal(np.asarray(uns["test_obs_names"], dtype=str), uns0["test_obs_names"])


# --------------------------------------------------------------------------- bad input
def test_partial_overlap_and_nan_rows():
    mdata = paired_mudata(400, rna_cells=np.arange(0, 350), morph_cells=np.arange(50, 400))
    mdata["rna"].obsm["X_scgpt"][[60, 61, 62, 63, 64]] = np.nan  # cells 60..64, paired
    mdata["rna"].obsm["X_scgpt"][10, 3] = np.inf  # cell 10: rna only
    mdata["morphology"].obsm["X_uni2"][[12, 13, 14], 0] = np.nan  # cells 62..64 (already NaN in rna), paired
    mdata["morphology"].obsm["X_uni2"][[300, 320], 1] = np.nan  # cells 350, 370: morphology only
    cs.tl.align_contrastive(mdata, epochs=2, batch_size=64)
    counts = mdata.uns[KEY]["n_cells"]
    assert counts["n_rna"] == 350
    assert counts["n_morphology"] == 350
    assert counts["n_paired"] == 300
    assert counts["n_nan_rna"] == 5
    assert counts["n_nan_morphology"] == 3
    assert counts["n_used"] == 295
    assert counts["n_train"] + counts["n_test"] == 295
    zr, zm = mdata["rna"].obsm[KEY], mdata["morphology"].obsm[KEY]
    nan_r = np.flatnonzero(np.isnan(zr).any(axis=1))
    nan_m = np.flatnonzero(np.isnan(zm).any(axis=1))
    np.testing.assert_array_equal(nan_r, [10, 60, 61, 62, 63, 64])
    np.testing.assert_array_equal(nan_m, [12, 13, 14, 300, 320])
    assert np.isnan(zr[nan_r]).all()
    assert np.isfinite(np.delete(zr, nan_r, axis=0)).all()


def test_empty_overlap_is_an_error():
    mdata = paired_mudata(200, rna_cells=np.arange(0, 100), morph_cells=np.arange(100, 200))
    with pytest.raises(ValueError, match="no cell \\(obs_names\\) in common"):
        cs.tl.align_contrastive(mdata, epochs=1)
    assert KEY not in mdata.uns
    assert KEY not in mdata["rna"].obsm


def test_batch_size_clamped_with_warning():
    mdata = paired_mudata(40)
    with pytest.warns(UserWarning, match="clamped to 36"):
        cs.tl.align_contrastive(mdata, epochs=1, batch_size=256)
    assert mdata.uns[KEY]["params"]["batch_size"] == 36
    assert mdata.uns[KEY]["params"]["batch_size_requested"] == 256


def test_missing_inputs_name_the_function_to_run():
    mdata = paired_mudata(50)
    del mdata.uns["cellsymphony"]
    with pytest.raises(ValueError, match="cs.pp.embed_expression"):
        cs.tl.align_contrastive(mdata, epochs=1)
    with pytest.raises(ValueError, match="cs.pp.embed_morphology"):
        cs.tl.align_contrastive(mdata, gene_rep="X_scgpt", morph_rep="X_nope", epochs=1)
    with pytest.raises(ValueError, match="'rna' and 'morphology'"):
        cs.tl.align_contrastive(md.MuData({"morphology": mdata["morphology"].copy()}), epochs=1)
    with pytest.raises(ValueError, match="test_size"):
        cs.tl.align_contrastive(mdata, gene_rep="X_scgpt", morph_rep="X_uni2", test_size=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        cs.tl.align_contrastive(mdata, gene_rep="X_scgpt", morph_rep="X_uni2", batch_size=1)


def test_no_held_out_cells_gives_nan_figures():
    mdata = paired_mudata(200)
    cs.tl.align_contrastive(mdata, epochs=2, batch_size=64, test_size=0)
    uns = mdata.uns[KEY]
    assert uns["n_cells"]["n_test"] == 0
    assert uns["n_cells"]["n_train"] == 200
    assert uns["history"]["test_loss"].isna().all()
    assert uns["history"]["train_loss"].notna().all()
    assert uns["retrieval"][["rna_to_morphology", "chance"]].isna().all().all()
    assert np.isfinite(mdata["morphology"].obsm[KEY]).all()


def test_retrieval_recall_counts_ties_at_chance_not_as_hits():
    from cellsymphony.models.contrastive._model import retrieval_recall

    n = 20
    # a collapsed projection (every cell the same point) retrieves nothing: recall is chance, k / n
    same = torch.nn.functional.normalize(torch.ones(n, 4), dim=1)
    r = retrieval_recall(same, same, ks=(1, 5, 10, 50), chunk=7)
    assert r == pytest.approx({1: 1 / n, 5: 5 / n, 10: 10 / n, 50: 1.0})
    # distinct points: the partner is first, recall@1 = 1; a pair of tied candidates counts half at k=1
    eye = torch.eye(n)
    assert retrieval_recall(eye, eye, ks=(1,))[1] == pytest.approx(1.0)
    z_b = eye.clone()
    z_b[1] = eye[0]  # candidates 0 and 1 tie for query 0; query 1 scores 0 against every candidate
    r = retrieval_recall(eye, z_b, ks=(1, 2))
    assert r[1] == pytest.approx((n - 2 + 1 / 2 + 1 / n) / n)
    assert r[2] == pytest.approx((n - 2 + 1 + 2 / n) / n)
