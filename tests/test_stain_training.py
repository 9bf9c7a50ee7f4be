"""Training with stain augmentation (``stain_augmentation=`` of ``tl.train_classifier`` / ``tl.align_contrastive``),
the stain reference carried by trained models, and the H&E-only prediction path's bad input."""

from __future__ import annotations

import functools
import json

import mudata as md
import numpy as np
import pandas as pd
import pytest

import cellsymphony as cs

cs.settings.progress = False
pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 150
TINY = {"arch": "morphology", "epochs": 2, "d_model": 16, "n_layers": 1, "n_heads": 2, "lr": 1e-3, "batch_size": 64}
ALIGN = {"epochs": 2, "dim": 8, "hidden": 16, "batch_size": 64}


@functools.cache
def _section():
    """A small synthetic Xenium + H&E section: true labels, the handcrafted embedding of the patches as scanned
    (``X_raw``) and of stain-normalised patches (``X_norm``), and an expression PCA."""
    from pathlib import Path

    from sklearn.decomposition import PCA

    a = cs.datasets.synthetic(n_cells=N, seed=3)
    folder = Path(a.uns["cellsymphony"]["samples"][a.obs["sample"].cat.categories[0]]["xenium_path"])
    truth = pd.read_parquet(folder / "truth.parquet").set_index("cell_id")["cell_type"].astype(str)
    labels = pd.Series(truth.reindex(a["rna"].obs["cell_id"].astype(str)).to_numpy())
    counts = labels.value_counts()
    # classes too rare for the classifier's minimum sizes at this section size are left unlabelled
    labels[labels.isin(counts.index[counts < 20])] = np.nan
    a.obs["truth"] = pd.Categorical(labels.to_numpy())
    cs.pp.embed_morphology(a, model="handcrafted", num_workers=0, key_added="X_raw")
    cs.pp.normalize_stain(a, n_cells=100)
    cs.pp.embed_morphology(a, model="handcrafted", num_workers=0, key_added="X_norm", stain="stain")
    x = np.asarray(a["rna"].X.todense() if hasattr(a["rna"].X, "todense") else a["rna"].X, dtype=np.float64)
    a["rna"].obsm["X_pca"] = PCA(10, random_state=0).fit_transform(np.log1p(x)).astype(np.float32)
    return a


def section():
    return _section().copy()


def _origin(names) -> np.ndarray:
    """The original cell of each row name (``<cell>-stain<i>`` -> ``<cell>``)."""
    return pd.Index(names).str.replace(r"-stain\d+$", "", regex=True).to_numpy()


@pytest.fixture
def fits(monkeypatch):
    """The data and split every ``CellTypeClassifier._fit`` call trained on (the real fit still runs)."""
    from cellsymphony.models.classifier._model import CellTypeClassifier

    seen, real = [], CellTypeClassifier._fit

    def spy(self, mdata, label_key, training):
        seen.append((mdata.obs_names.copy(), training.split))
        return real(self, mdata, label_key, training)

    monkeypatch.setattr(CellTypeClassifier, "_fit", spy)
    return seen


# --------------------------------------------------------------------------- the classifier
@pytest.mark.parametrize("split", ["random", "spatial"])
def test_classifier_trains_on_the_copies_and_writes_the_original_cells(split, fits, tmp_path):
    a = section()
    n_copies = {"random": 2, "spatial": 1}[split]
    clf = cs.tl.train_classifier(a, "truth", morph_rep="X_raw", split=split, stain_augmentation=n_copies, seed=1,
                                 **TINY)  # fmt: skip
    names, rows = fits[-1]
    rows = np.asarray(rows, dtype=object)
    assert len(names) == (1 + n_copies) * N  # the originals and the stain-jittered copies of each
    n_train = int((a.obs["cs_pred_split"] == "train").sum())
    assert (rows == "train").sum() == (1 + n_copies) * n_train  # trained on more rows: each training cell and copies
    # outputs: the original cells of the user's MuData, nothing else
    assert a.n_obs == N and not a.obs_names.str.contains("-stain").any()
    assert a.obs["cs_pred"].notna().all() and a.obsm["cs_pred_proba"].shape == (N, len(clf.classes))
    assert set(a.obs["cs_pred_split"]) <= {"train", "test", "unused"}
    # no copy of a test cell is trained on, and the test figures are the original test cells'
    test = set(a.obs_names[a.obs["cs_pred_split"] == "test"])
    assert test and not test & set(_origin(names[rows == "train"]))
    assert set(names[rows == "test"]) == test
    assert a.uns["cs_pred"]["metrics"]["n_test"] == len(test)
    # the split is drawn on the original cells as without augmentation
    plain = section()
    cs.tl.train_classifier(plain, "truth", morph_rep="X_raw", split=split, seed=1, key_added="p", **TINY)
    assert (plain.obs["p_split"].to_numpy() == a.obs["cs_pred_split"].to_numpy()).all()
    # recorded with the outputs and in the saved model
    rec = a.uns["cs_pred"]["params"]["stain_augmentation"]
    assert (rec["n_copies"], rec["strength"], rec["seed"], str(rec["morph_rep"])) == (n_copies, 0.15, 1, "X_raw")
    assert rec["n_train_rows"] == (1 + n_copies) * n_train
    assert a.uns["cs_pred"]["params"]["split"] == split
    clf.save(tmp_path / "clf")
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())["fit_params"]["stain_augmentation"]
    assert saved == {"n_copies": n_copies, "strength": 0.15, "seed": 1, "morph_rep": "X_raw",
                     "n_train_rows": (1 + n_copies) * n_train}  # fmt: skip
    back = cs.models.CellTypeClassifier.load(tmp_path / "clf")
    assert back.fit_params["stain_augmentation"]["n_copies"] == n_copies
    a.write(tmp_path / "a.h5mu")
    assert md.read_h5mu(tmp_path / "a.h5mu").uns["cs_pred"]["params"]["stain_augmentation"]["strength"] == 0.15


def test_classifier_stain_augmentation_settings_and_bad_values(fits):
    from cellsymphony.tl._stain_augmentation import augmentation_spec

    assert augmentation_spec(None, 0) is None
    assert augmentation_spec(3, 5) == {"n_copies": 3, "strength": 0.15, "seed": 5}  # augment_stain's defaults
    assert augmentation_spec({"strength": 0.3, "seed": 7}, 0) == {"n_copies": 2, "strength": 0.3, "seed": 7}
    fresh = section()
    for bad, msg in (("two", "stain_augmentation='two'"), (0, "n_copies=0"), ({"copies": 2}, r"unknown keys \['copies'\]"),
                     ({"strength": 1.5}, "strength=1.5"), (True, "stain_augmentation=True")):
        with pytest.raises(ValueError, match=msg):
            cs.tl.train_classifier(fresh, "truth", morph_rep="X_raw", stain_augmentation=bad, **TINY)
    with pytest.raises(ValueError, match="needs a morphology input"):
        cs.tl.train_classifier(fresh, "truth", **{**TINY, "arch": "unimodal"}, gene_rep="X_pca", stain_augmentation=1)
    with pytest.raises(ValueError, match="stain normalisation"):  # augment the patches as scanned
        cs.tl.train_classifier(fresh, "truth", morph_rep="X_norm", stain_augmentation=1, **TINY)
    assert "cs_pred" not in fresh.obs and "cs_pred" not in fresh.uns and not fits  # refused before any fit


# --------------------------------------------------------------------------- the aligner
def test_aligner_holds_out_original_cells_without_their_copies(tmp_path):
    a = section()
    aligner = cs.tl.align_contrastive(a, gene_rep="X_pca", morph_rep="X_raw", stain_augmentation=1, seed=2, **ALIGN)
    test, train = set(aligner.test_obs_names), set(aligner.train_obs_names)
    assert test and not any("-stain" in n for n in test)  # held out: original cells only
    assert not test & set(_origin(list(train)))  # no copy of a held-out cell trained on
    assert len(train) == 2 * (N - len(test))  # each training cell and its copy
    plain = section()
    ref = cs.tl.align_contrastive(plain, gene_rep="X_pca", morph_rep="X_raw", seed=2, **ALIGN)
    assert test == set(ref.test_obs_names)  # the cells held out without augmentation
    # outputs for the original cells only
    for mod in ("rna", "morphology"):
        z = a[mod].obsm["X_cs_contrastive"]
        assert z.shape == (N, ALIGN["dim"]) and np.isfinite(z).all()
    assert a.n_obs == N and set(a.uns["X_cs_contrastive"]["test_obs_names"]) == test
    assert a.uns["X_cs_contrastive"]["n_cells"]["n_test"] == len(test)
    rec = a.uns["X_cs_contrastive"]["params"]["stain_augmentation"]
    assert (rec["n_copies"], rec["seed"], rec["n_train_rows"]) == (1, 2, len(train))
    aligner.save(tmp_path / "al")
    back = cs.models.ContrastiveAligner.load(tmp_path / "al")
    assert back.fit_params["stain_augmentation"]["n_copies"] == 1
    with pytest.raises(ValueError, match="unknown keys"):
        cs.tl.align_contrastive(plain, gene_rep="X_pca", morph_rep="X_raw", stain_augmentation={"n": 1}, **ALIGN)


# --------------------------------------------------------------------------- the stain reference of a model
def test_models_carry_the_stain_reference_to_a_new_slide(tmp_path):
    a = section()
    ref = a["morphology"].uns["stain"]["reference"]
    clf = cs.tl.train_classifier(a, "truth", morph_rep="X_norm", **TINY)
    aligner = cs.tl.align_contrastive(a, gene_rep="X_pca", morph_rep="X_norm", **ALIGN)
    for model in (clf, aligner):
        got = model.provenance["morphology"]["params"]["stain"]["reference"]
        assert np.allclose(got["stain_matrix"], ref["stain_matrix"])
    clf.save(tmp_path / "clf")
    inputs = json.loads((tmp_path / "clf" / "config.json").read_text())["inputs"]
    assert np.allclose(inputs["morphology"]["params"]["stain"]["reference"]["stain_matrix"], ref["stain_matrix"])
    loaded = cs.models.CellTypeClassifier.load(tmp_path / "clf")
    # a new slide normalised to the model's reference, then embedded and typed as the model expects
    b = md.MuData({"morphology": a["morphology"].copy()})
    for k in ("X_raw", "X_norm", "stain"):
        b["morphology"].obsm.pop(k, None)
        b["morphology"].uns.pop(k, None)
    b.uns["cellsymphony"] = {"samples": a.uns["cellsymphony"]["samples"]}
    with pytest.raises(ValueError, match=r"run cs\.pp\.embed_morphology"):  # the representation the model needs
        loaded.predict(b)
    with pytest.raises(ValueError, match=r"run cs\.pp\.embed_morphology"):
        aligner.transform(b, "morphology")
    cs.pp.normalize_stain(b, reference=loaded, n_cells=100)
    assert np.allclose(b["morphology"].uns["stain"]["reference"]["stain_matrix"], ref["stain_matrix"])
    cs.pp.normalize_stain(b, reference=aligner, n_cells=100)
    cs.pp.embed_morphology(b, model="handcrafted", num_workers=0, key_added="X_norm", stain="stain")
    assert np.allclose(b["morphology"].uns["X_norm"]["params"]["stain"]["reference"]["max_concentrations"],
                       ref["max_concentrations"])  # fmt: skip
    # the same slide through the same reference: the same embedding as the training section's
    assert np.allclose(b["morphology"].obsm["X_norm"], a["morphology"].obsm["X_norm"], atol=1e-4)
    assert loaded.predict(b, key_added=None).notna().all()
    # a model trained on an embedding without normalisation has no reference to give
    raw = cs.tl.train_classifier(section(), "truth", morph_rep="X_raw", **TINY)
    with pytest.raises(ValueError, match="'X_raw', which records no stain reference"):
        cs.pp.normalize_stain(b, reference=raw)
