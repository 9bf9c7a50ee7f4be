"""The model base shared by CellTypeClassifier and ContrastiveAligner: one save/load contract (checksums,
provenance, old layouts), one fit loop (seeding, early stopping), one definition of the classifier settings."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from test_classifier import TINY, make_mdata
from test_contrastive import paired_mudata

import cellsymphony as cs
from cellsymphony.models import CellTypeClassifier, ContrastiveAligner

cs.settings.progress = False


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    mdata = make_mdata(200)
    mdata["rna"].uns["X_scgpt"] = {"params": {"model": "scgpt", "weights": "sha256:abc", "n_cells": 200}}
    model = cs.tl.train_classifier(mdata, "cell_type", arch="dual", epochs=2, lr=1e-3, **TINY)
    return mdata, model


def _saved(model, path):
    model.save(path, overwrite=True)
    return path


# ------------------------------------------------------------------------------------------- save / load
def test_provenance_of_the_inputs_is_saved(classifier, tmp_path):
    mdata, model = classifier
    assert model.provenance["rna"] == {
        "key": "X_scgpt",
        "dim": 16,
        "params": {"model": "scgpt", "weights": "sha256:abc", "n_cells": 200},
        "fingerprint": {"model": "scgpt"},  # the producer's identity fields (cellsymphony._provenance)
    }
    loaded = CellTypeClassifier.load(_saved(model, tmp_path / "m"))
    assert loaded.provenance == model.provenance
    assert loaded.fit_params == model.fit_params
    assert loaded.fit_params["epochs"] == 2


def test_flipped_weights_byte_is_refused_naming_the_file(classifier, tmp_path):
    _, model = classifier
    d = _saved(model, tmp_path / "m")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the checksum recorded in .*config\.json"):
        CellTypeClassifier.load(d)


def _edit_config(model, path, **changes):
    """Save ``model`` and change ``config.json`` entries (``section={"field": value}``, or a value)."""
    d = _saved(model, path)
    cfg = json.loads((d / "config.json").read_text())
    for section, change in changes.items():
        if isinstance(change, dict) and change:
            cfg[section].update(change)
        else:
            cfg[section] = change
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_config_edited_after_saving_is_refused(classifier, tmp_path):
    _, model = classifier
    d = _edit_config(model, tmp_path / "a", state={"classes": model.classes[::-1]})
    with pytest.raises(ValueError, match="disagree on 'classes'"):
        CellTypeClassifier.load(d)
    # config and weights of different models (the weights file itself is unchanged: its checksum holds)
    d = _edit_config(model, tmp_path / "b", config={"d_model": 64, "dim_feedforward": 256})
    with pytest.raises(ValueError, match="does not fit the model described by"):
        CellTypeClassifier.load(d)


def test_truncated_config_and_other_model(classifier, tmp_path):
    _, model = classifier
    d = _saved(model, tmp_path / "m")
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config\.json.*not valid JSON"):
        CellTypeClassifier.load(d)
    (d / "config.json").write_text(text)
    with pytest.raises(ValueError, match="is not a ContrastiveAligner"):
        ContrastiveAligner.load(d)
    with pytest.raises(FileNotFoundError, match="not a saved CellTypeClassifier"):
        CellTypeClassifier.load(tmp_path / "nothing")


def test_one_overwrite_rule(classifier, tmp_path):
    _, model = classifier
    d = tmp_path / "m"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty: pass overwrite=True"):
        model.save(d)
    model.save(d, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine"  # only the model's files are replaced
    with pytest.warns(FutureWarning, match="overwrite as a keyword"):
        model.save(d, True)
    aligner = cs.tl.align_contrastive(paired_mudata(120), epochs=1, dim=8, hidden=16)
    with pytest.raises(FileExistsError, match="not empty"):
        aligner.save(d)


def test_load_device_rule(classifier, tmp_path):
    _, model = classifier
    d = _saved(model, tmp_path / "m")
    old = cs.settings.device
    try:
        cs.settings.device = "cpu"
        assert CellTypeClassifier.load(d).device == "cpu"
        assert next(CellTypeClassifier.load(d, device="cpu").module.parameters()).device.type == "cpu"
    finally:
        cs.settings.device = old


def test_format_1_classifier_folder_still_loads(classifier, tmp_path):
    """The layout written before the model base: flat config.json, no checksum."""
    from safetensors.torch import save_file

    mdata, model = classifier
    d = tmp_path / "old"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, str(d / "model.safetensors"))
    old = {
        "format": "cellsymphony.CellTypeClassifier", "format_version": 1, "cellsymphony_version": "0.1.0",
        "arch": "dual", "tokens": ["gene", "morph"], "d_model": 32, "n_layers": 1, "n_heads": 2,
        "dim_feedforward": 128, "dropout": 0.1, "wavelengths_um": list(model.wavelengths_um),
        "classes": model.classes, "gene_dim": 16, "morph_dim": 24, "gene_rep": "X_scgpt", "morph_rep": "X_uni2",
        "label_key": "cell_type", "history": {"train_loss": [1.0, 0.5]}, "test_macro_f1": 0.5,
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(old))
    with pytest.warns(FutureWarning, match="earlier cellsymphony"):
        loaded = CellTypeClassifier.load(d)
    assert loaded.saved_version == "0.1.0"
    np.testing.assert_allclose(
        loaded.predict_proba(mdata).to_numpy(), model.predict_proba(mdata).to_numpy(), atol=1e-6
    )


def test_format_1_aligner_folder_still_loads(tmp_path):
    from safetensors.torch import save_file

    mdata = paired_mudata(150)
    aligner = cs.tl.align_contrastive(mdata, epochs=1, dim=8, hidden=16)
    d = tmp_path / "old"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in aligner.module.state_dict().items()}, str(d / "model.safetensors"))
    old = {
        "format": "cellsymphony.ContrastiveAligner/1", "version": "0.1.0",
        "config": {"dim": 8, "hidden": 16, "dropout": 0.1, "temperature": 0.07, "learn_temperature": True},
        "n_gene": 32, "n_morph": 48, "gene_rep": "X_scgpt", "morph_rep": "X_uni2", "learn_temperature": True,
        "fit_info": {"n_used": 150}, "fit_params": {"epochs": 1}, "history": aligner.history.to_dict(orient="list"),
        "retrieval": aligner.retrieval.to_dict(orient="list"), "retrieval_index": list(aligner.retrieval.index),
        "test_obs_names": list(aligner.test_obs_names),
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(old))
    with pytest.warns(FutureWarning, match="earlier cellsymphony"):
        loaded = ContrastiveAligner.load(d, device="cpu")
    np.testing.assert_array_equal(loaded.transform(mdata, "rna"), mdata["rna"].obsm["X_cs_contrastive"])
    assert loaded.fit_params == {"epochs": 1}
    assert loaded.saved_version == "0.1.0"


# ------------------------------------------------------------------------------------------- the fit loop
def test_fit_leaves_the_global_random_state_alone():
    mdata = make_mdata(120)
    torch.manual_seed(123)
    np.random.seed(7)  # noqa: NPY002 - the legacy global state must stay untouched
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()  # noqa: NPY002
    cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", epochs=1, **TINY)
    cs.tl.align_contrastive(paired_mudata(100), epochs=1, dim=8, hidden=16)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)  # noqa: NPY002


def test_early_stopping_restores_the_best_epoch():
    """Expression unrelated to morphology: the networks can only memorise the training pairs, so the
    held-out loss rises after epoch 3; training stops `patience` epochs after the best epoch and the kept
    weights are those of the best epoch."""
    mdata = paired_mudata(300, seed=3)
    mdata["rna"].obsm["X_scgpt"] = np.random.default_rng(0).normal(size=mdata["rna"].obsm["X_scgpt"].shape).astype(np.float32)
    kw = {"epochs": 15, "lr": 1e-2, "batch_size": 64, "dim": 16, "hidden": 128, "test_size": 0.3}
    full = cs.tl.align_contrastive(mdata.copy(), **kw)
    losses = full.history["test_loss"].to_numpy()
    best = int(np.argmin(losses)) + 1
    assert best <= 5 and losses[-1] > losses[best - 1] + 0.5, losses  # the held-out loss rises early
    assert full.best_epoch == 15  # without early stopping the last epoch is kept
    stopped = cs.tl.align_contrastive(mdata, **kw, early_stopping=True, patience=3)
    assert stopped.best_epoch == best
    assert len(stopped.history) == best + 3
    np.testing.assert_allclose(stopped.history["test_loss"].to_numpy(), losses[: len(stopped.history)], rtol=1e-5)
    # the kept weights give the best epoch's held-out loss, not the last one's
    te = mdata["rna"].obs_names.get_indexer(stopped.test_obs_names)
    xg, xm = mdata["rna"].obsm["X_scgpt"][te], mdata["morphology"].obsm["X_uni2"][te]
    kept = stopped._eval_loss(
        torch.from_numpy(xg), torch.from_numpy(xm), torch.arange(len(te)), stopped.fit_info["batch_size"]
    )
    assert kept == pytest.approx(losses[best - 1], rel=1e-4)
    assert mdata.uns["X_cs_contrastive"]["params"]["best_epoch"] == best


def test_classifier_early_stopping_and_history():
    mdata = make_mdata(200)
    model = cs.tl.train_classifier(
        mdata, "cell_type", arch="unimodal", epochs=30, lr=3e-2, early_stopping=True, patience=2, **TINY
    )
    h = model.history
    assert list(h.columns) == ["epoch", "train_loss", "test_loss", "test_macro_f1", "test_accuracy"]
    assert model.best_epoch == int(h["test_loss"].idxmin()) + 1
    assert len(h) <= 30
    assert mdata.uns["cs_pred"]["params"]["early_stopping"]


# ------------------------------------------------------------------------------------------- deprecations
def test_deprecated_spellings_warn_and_work(classifier):
    mdata, model = classifier
    with pytest.warns(FutureWarning, match="model.config is a dataclass"):
        assert model.config()["arch"] == "dual"
    aligner = ContrastiveAligner(dim=8, hidden=16)
    with pytest.warns(FutureWarning, match="config.dim"):
        assert aligner.config["dim"] == 8
    from cellsymphony.models.contrastive import ProjectionHead

    head = ProjectionHead(3, hidden=4, dim=2)
    with pytest.warns(FutureWarning, match="set_standardization"):
        head.set_standardisation(torch.zeros(3), torch.tensor([1.0, 0.0, 2.0]))
    assert head.std.tolist() == [1.0, 1.0, 2.0]
    data = make_mdata(100)
    with pytest.warns(FutureWarning, match="cs.tl.train_classifier"):
        CellTypeClassifier("unimodal", **TINY).fit(data, "cell_type", epochs=1)
    assert "cs_pred" in data.obs  # still written, this release
    quiet = make_mdata(100)
    CellTypeClassifier("unimodal", **TINY).fit(quiet, "cell_type", epochs=1, key_added=None)
    assert "cs_pred" not in quiet.obs and "cs_pred" not in quiet.uns


# ------------------------------------------------------------------------------------------- one settings definition
def test_the_three_classifier_entry_points_share_one_settings_definition():
    import dataclasses

    from cellsymphony.models.classifier._config import ClassifierConfig, ClassifierTraining

    arch_fields = {f.name: f.default for f in dataclasses.fields(ClassifierConfig)}
    train_fields = {f.name: f.default for f in dataclasses.fields(ClassifierTraining)}

    def params(func, skip):
        sig = inspect.signature(func)
        return {n: p.default for n, p in sig.parameters.items() if n not in skip}

    common = {"self", "mdata", "label_key", "key_added"}
    fit = params(CellTypeClassifier.fit, common)
    assert fit == train_fields
    assert params(CellTypeClassifier.__init__, {"self"}) == arch_fields
    # stain_augmentation builds the training rows from the section (tl.train_classifier only; the model fits rows)
    train = params(cs.tl.train_classifier, common | {"stain_augmentation"})
    assert train == {**train_fields, **arch_fields}
    compare = params(cs.tl.compare_classifiers, common | {"archs", "baselines"})
    assert compare == {**train_fields, **{k: v for k, v in arch_fields.items() if k != "arch"}}
