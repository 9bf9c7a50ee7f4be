"""Bad input (issue 14, parts 2 and 4-6): provenance of representations, no all-empty results, checksummed
cache chunks, strict parameters, minimum sizes. Each test gives the package a wrong input and checks the
error or warning it gets, and that nothing was written."""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from morphology_helpers import make_mudata, tissue
from test_classifier import TINY, make_mdata

import cellsymphony as cs
from cellsymphony._validate import check_float, check_int, check_mpp
from cellsymphony.models import CellTypeClassifier

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*untrained:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*have no non-zero count:UserWarning"),
]
cs.settings.progress = False

GENES = [f"GENE{i}" for i in range(40)]


# ------------------------------------------------------------------------------------------------ fixtures
@cache
def _checkpoint(root: str, seed: int) -> Path:
    """Two checkpoints of the same width and vocabulary that differ only in their (random) weights."""
    return cs.datasets.tiny_scgpt_checkpoint(Path(root) / f"ckpt{seed}", GENES, seed=seed, embsize=16, nheads=2,
                                             d_hid=32, nlayers=1)  # fmt: skip


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpts"))
    return _checkpoint(root, 1), _checkpoint(root, 2)


def _counts_mudata(n: int = 160, seed: int = 0) -> md.MuData:
    """Counts in which the class decides which half of the panel is expressed."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    lam = np.where((np.arange(len(GENES)) < len(GENES) // 2)[None, :] == (label[:, None] == 0), 3.0, 0.2)
    X = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    a = ad.AnnData(X, obs=pd.DataFrame({"cell_type": np.array(["A", "B"])[label]},
                                       index=[f"cell{i}" for i in range(n)]))  # fmt: skip
    a.var_names = GENES
    return md.MuData({"rna": a})


def _embed(mdata, ckpt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cs.pp.embed_expression(mdata, model_dir=ckpt, batch_size=64, **kw)


@pytest.fixture(scope="module")
def trained(ckpts):
    """A classifier trained on the embeddings of checkpoint A; the same cells embedded with A and with B."""
    a, b = ckpts
    mdata_a, mdata_b = _counts_mudata(), _counts_mudata()
    _embed(mdata_a, a)
    _embed(mdata_b, b)
    model = cs.tl.train_classifier(mdata_a, "cell_type", arch="unimodal", epochs=1, **TINY)
    return model, mdata_a, mdata_b


def _checksum(mdata) -> str:
    return str(mdata["rna"].uns["X_scgpt"]["params"]["weights_checksum"])


# ------------------------------------------------------------------------------------------------ 2. provenance
def test_classifier_refuses_embeddings_of_another_checkpoint(trained, tmp_path):
    model, mdata_a, mdata_b = trained
    ca, cb = _checksum(mdata_a), _checksum(mdata_b)
    assert ca != cb and mdata_a["rna"].obsm["X_scgpt"].shape == mdata_b["rna"].obsm["X_scgpt"].shape
    assert model.provenance["rna"]["fingerprint"]["weights_checksum"] == ca
    # the same producer: no complaint
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert model.predict(mdata_a, key_added=None).notna().all()
    # another checkpoint of the same width: refused, naming both fingerprints; nothing written
    with pytest.raises(ValueError, match=rf"weights_checksum: trained on '{ca}', given '{cb}'.*{ca[:23]}.*{cb[:23]}"):
        model.predict(mdata_b)
    assert "cs_pred" not in mdata_b.obs
    # allowed: a warning, and predictions
    with pytest.warns(UserWarning, match=rf"allow_mismatch=True.*|{cb[:23]}"):
        pred = model.predict(mdata_b, allow_mismatch=True, key_added=None)
    assert pred.notna().all() and set(pred.cat.categories) == {"A", "B"}
    # the fingerprints travel with the saved model
    loaded = CellTypeClassifier.load(model.save(tmp_path / "clf"))
    with pytest.raises(ValueError, match="not made by the same producer"):
        loaded.predict_proba(mdata_b)


def test_model_saved_without_provenance_loads_and_warns_once(trained, tmp_path):
    model, _, mdata_b = trained
    d = model.save(tmp_path / "clf")
    meta = json.loads((d / "config.json").read_text())
    del meta["inputs"]  # as written before the inputs' provenance was recorded
    (d / "config.json").write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loaded = CellTypeClassifier.load(d)
        pred = loaded.predict(mdata_b, key_added=None)  # cannot be checked: applied
    msgs = [str(w.message) for w in rec if "records no provenance" in str(w.message)]
    assert len(msgs) == 1 and "clf" in msgs[0]
    assert pred.notna().all()


def test_he_only_path_checks_the_encoder(tmp_path):
    """read_he_cells-style MuData -> embed_morphology -> a model trained on another encoder's embedding."""
    he, align, xy = tissue(str(tmp_path), n_cells=40)
    train = make_mudata(xy, he, align)
    new = make_mudata(xy, he, align)
    cs.pp.embed_morphology(train, model="handcrafted")
    cs.pp.embed_morphology(new, model="handcrafted", key_added="X_handcrafted", size=64, mpp=1.0)
    train.obs["cell_type"] = np.array(["A", "B"] * 20)
    model = cs.tl.train_classifier(train, "cell_type", arch="morphology", epochs=1, test_size=0.5, **TINY)
    with pytest.raises(ValueError, match=r"mpp: trained on 0\.5, given 1\.0"):
        model.predict(new, key_added=None)
    with pytest.warns(UserWarning, match="allow_mismatch=True"):
        assert model.predict(new, key_added=None, allow_mismatch=True).notna().all()


def test_aligner_transform_checks_the_producer():
    from test_contrastive import paired_mudata

    mdata = paired_mudata(120)
    mdata["morphology"].uns["X_uni2"] = {"params": {"model": "uni2-h", "weights_checksum": "sha256:" + "a" * 64}}
    aligner = cs.tl.align_contrastive(mdata, epochs=1, dim=8, hidden=16, batch_size=32)
    other = paired_mudata(120)
    other["morphology"].uns["X_uni2"] = {"params": {"model": "uni2-h", "weights_checksum": "sha256:" + "b" * 64}}
    with pytest.raises(ValueError, match=r"sha256:a{16}.*sha256:b{16}"):
        aligner.transform(other, "morphology")
    with pytest.warns(UserWarning, match="weights_checksum"):
        aligner.transform(other, "morphology", allow_mismatch=True)
    aligner.transform(other, "rna")  # no record on either side: nothing to check


# ------------------------------------------------------------------------------------------------ 4. empty results
def test_all_cells_off_the_image_is_refused_and_never_latest(tmp_path):
    he, align, xy = tissue(str(tmp_path), n_cells=20)
    mdata = make_mudata(xy + 1e5, he, align)  # every cell 10 cm away from the slide
    with pytest.raises(ValueError, match=r"would be empty: none of the 20 cells lies inside its H&E image"):
        cs.pp.embed_morphology(mdata, model="handcrafted", cache_dir=tmp_path / "cache")
    assert "X_handcrafted" not in mdata["morphology"].obsm and not (tmp_path / "cache").exists()
    with pytest.warns(UserWarning, match="does not become the latest"):
        cs.pp.embed_morphology(mdata, model="handcrafted", allow_empty=True)
    assert np.isnan(mdata["morphology"].obsm["X_handcrafted"]).all()
    assert "morphology" not in mdata.uns.get("cellsymphony", {}).get("latest", {})


def test_all_empty_expression_is_refused(ckpts):
    mdata = _counts_mudata(20)
    mdata["rna"].X = sp.csr_matrix(mdata["rna"].shape, dtype=np.float32)
    with pytest.raises(ValueError, match="would be empty: no cell has a non-zero count"):
        _embed(mdata, ckpts[0])
    assert "X_scgpt" not in mdata["rna"].obsm
    _embed(mdata, ckpts[0], allow_empty=True)
    assert np.isnan(mdata["rna"].obsm["X_scgpt"]).all()
    assert "rna" not in mdata.uns.get("cellsymphony", {}).get("latest", {})


def test_all_missing_labels_are_refused():
    mdata = make_mdata(40)
    table = pd.DataFrame({"cell_id": mdata.obs_names, "label": [None] * 40})
    with pytest.raises(ValueError, match=r"import_labels: 'imported_label' would be empty: the 40 cells matched"):
        cs.pp.import_labels(mdata, table)
    assert "imported_label" not in mdata.obs
    with pytest.warns(UserWarning, match="is empty"):
        cs.pp.import_labels(mdata, table, allow_empty=True)
    assert mdata.obs["imported_label"].isna().all()


def test_nuclei_in_the_wrong_place_give_no_all_nan_he_label():
    mdata = make_mdata(40)
    xy = mdata["rna"].obsm["nucleus_centroid"]
    nuclei = pd.DataFrame({"x": xy[:, 0] * 1000, "y": xy[:, 1] * 1000, "class": "Tumor"})  # nm, not um
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"'he_label' of sample 's1' would be empty: .*only 0 of 40"):
            cs.pp.transfer_nucleus_labels(mdata, nuclei, space="um")
    assert "he_label" not in mdata.obs
    with pytest.warns(UserWarning, match="is empty"):
        cs.pp.transfer_nucleus_labels(mdata, nuclei, space="um", allow_empty=True)
    assert mdata.obs["he_label"].isna().all()


def test_zeroed_cache_chunk_is_recomputed_with_a_warning(tmp_path):
    he, align, xy = tissue(str(tmp_path), n_cells=30)
    mdata = make_mudata(xy, he, align)
    cs.pp.embed_morphology(mdata, model="handcrafted", cache_dir=tmp_path / "cache", chunk_size=10)
    first = mdata["morphology"].obsm["X_handcrafted"].copy()
    files = sorted((tmp_path / "cache").rglob("chunk_*.npy"))
    assert len(files) == 3 and all(f.with_name(f.name + ".sha256").is_file() for f in files)
    np.save(files[1], np.zeros_like(np.load(files[1])))  # right shape and dtype, wrong values
    again = make_mudata(xy, he, align)
    with pytest.warns(UserWarning, match=r"chunk_000001\.npy does not match its checksum .*computed again"):
        cs.pp.embed_morphology(again, model="handcrafted", cache_dir=tmp_path / "cache", chunk_size=10)
    np.testing.assert_array_equal(again["morphology"].obsm["X_handcrafted"], first)
    from cellsymphony._utils import load_chunk

    with warnings.catch_warnings():  # the chunk file was replaced, with its checksum
        warnings.simplefilter("error", UserWarning)
        fixed = load_chunk(files[1], np.load(files[1]).shape)
    assert fixed is not None and np.abs(fixed).sum() > 0


# ------------------------------------------------------------------------------------------------ 5. parameters
@pytest.mark.parametrize("bad", [0, 2.7, 2.0, True, "4", -1])
def test_batch_size_must_be_a_positive_integer(bad, tmp_path, ckpts):
    he, align, xy = tissue(str(tmp_path), n_cells=10)
    mdata = make_mudata(xy, he, align)
    with pytest.raises(ValueError, match=r"batch_size=.* (must be an integer >= 1|is out of range)"):
        cs.pp.embed_morphology(mdata, model="handcrafted", batch_size=bad, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() and "X_handcrafted" not in mdata["morphology"].obsm
    with pytest.raises(ValueError, match="batch_size="):
        cs.pp.embed_expression(_counts_mudata(10), model_dir=ckpts[0], batch_size=bad)
    with pytest.raises(ValueError, match="batch_size="):
        cs.tl.train_classifier(make_mdata(60), "cell_type", arch="unimodal", batch_size=bad, **TINY)


def test_numpy_integers_are_integers(tmp_path):
    he, align, xy = tissue(str(tmp_path), n_cells=10)
    mdata = make_mudata(xy, he, align)
    cs.pp.embed_morphology(mdata, model="handcrafted", batch_size=np.int64(4), size=np.int32(64))
    assert mdata["morphology"].uns["X_handcrafted"]["params"]["batch_size"] == 4
    assert check_int("n", np.uint8(3), min=1) == 3 and type(check_int("n", np.int64(3))) is int


@pytest.mark.parametrize("mpp", [1e-4, 1e4, 0.0, float("nan"), True])
def test_absurd_mpp_is_refused_before_any_work(mpp, tmp_path):
    he, align, xy = tissue(str(tmp_path), n_cells=10)
    mdata = make_mudata(xy, he, align)
    with pytest.raises(ValueError, match=r"mpp=.* um/px"):
        cs.pp.embed_morphology(mdata, model="handcrafted", mpp=mpp, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"mpp=.* 0\.05 and <= 10 um/px"):
        cs.pp.cell_patches(mdata, mpp=mpp)
    assert not (tmp_path / "c").exists() and "X_handcrafted" not in mdata["morphology"].obsm


def test_validators_messages():
    with pytest.raises(ValueError, match=r"k=2\.7 must be an integer >= 1 \(a hint\)"):
        check_int("k", 2.7, min=1, hint="a hint")
    with pytest.raises(ValueError, match=r"k=0 is out of range: it must be an integer in \[1, 5\]"):
        check_int("k", 0, min=1, max=5)
    assert check_int("k", None, none=True) is None
    with pytest.raises(ValueError, match=r"lr=0 is out of range: it must be a finite number > 0"):
        check_float("lr", 0, min=0, min_open=True)
    with pytest.raises(ValueError, match="must be a finite number"):
        check_float("x", float("inf"))
    assert check_mpp("mpp", 0.2125) == 0.2125


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: cs.tl.niches(m, n_neighbors=2.5), "n_neighbors=2.5 must be an integer"),
        (lambda m: cs.tl.train_classifier(m, "cell_type", arch="unimodal", epochs=0, **TINY), "epochs=0"),
        (lambda m: cs.tl.train_classifier(m, "cell_type", arch="unimodal", d_model=32.0), "d_model=32.0"),
        (lambda m: cs.tl.align_contrastive(m, epochs=1, dim=8.5), "dim=8.5"),
        (lambda m: cs.tl.align_contrastive(m, epochs=1, batch_size=1), "batch_size=1 is out of range"),
    ],
)
def test_public_numeric_parameters_are_strict(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_mdata(60))


def test_synthetic_generators_are_strict(tmp_path):
    with pytest.raises(ValueError, match=r"he_jpeg_quality=90\.5 must be an integer"):
        cs.datasets.synthetic_xenium(tmp_path / "x", n_cells=100, he_jpeg_quality=90.5)
    with pytest.raises(ValueError, match=r"n_cells=True must be an integer"):
        cs.datasets.synthetic_reference(n_cells=True)
    with pytest.raises(ValueError, match=r"embsize=16\.0 must be an integer"):
        cs.datasets.tiny_scgpt_checkpoint(tmp_path / "c", GENES, embsize=16.0)
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ 6. minimum sizes
def test_training_on_two_cells_is_refused():
    mdata = make_mdata(100)
    ct = np.full(100, None, dtype=object)
    ct[:2] = ["A", "B"]
    mdata.obs["cell_type"] = ct
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"Too few training cells: .* at least 5; .*'A': [01], 'B': [01]"):
            cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", epochs=1, **TINY)
    assert "cs_pred" not in mdata.obs


def test_too_few_test_cells_for_metrics_is_refused():
    mdata = make_mdata(100)
    ct = np.full(100, None, dtype=object)
    ct[:40] = ["A", "B"] * 20
    mdata.obs["cell_type"] = ct
    with pytest.raises(ValueError, match=r"Too few test cells for metrics: the split holds 4 \(at least 10"):
        cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", epochs=1, test_size=0.1, **TINY)
    model = cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", epochs=1, test_size=0.25, **TINY)
    assert model.metrics["n"] == 10


def test_singler_warns_on_a_reference_of_one_cell_per_label():
    query = cs.datasets.synthetic_reference(n_cells=150, seed=0)
    atlas = cs.datasets.synthetic_reference(n_cells=400, seed=0)
    first = ~atlas.obs["cell_type"].duplicated().to_numpy()
    tiny = atlas[first].copy()
    assert tiny.obs["cell_type"].value_counts().max() == 1
    with pytest.warns(UserWarning, match=r"reference label\(s\) have fewer than 5 cells"):
        cs.pp.annotate_singler(query, tiny, ref_label_key="cell_type", min_genes=5)
    assert "singler" in query.obs
    with warnings.catch_warnings():  # a reference of enough cells per label: no warning
        warnings.simplefilter("error", UserWarning)
        cs.pp.annotate_singler(query, atlas, ref_label_key="cell_type", ref_max_per_label=20)


def test_align_contrastive_on_three_cells_gives_one_clear_error():
    from test_contrastive import paired_mudata

    mdata = paired_mudata(3)
    with pytest.raises(ValueError, match=r"needs at least 10 cells present in both modalities .*; found 3 "):
        cs.tl.align_contrastive(mdata, epochs=1)
    assert "X_cs_contrastive" not in mdata["rna"].obsm


def test_pipelines_leave_out_labels_too_rare_to_train_on():
    from cellsymphony._run import trainable_exclude

    mdata = make_mdata(200)
    ct = mdata.obs["cell_type"].astype(str).to_numpy().copy()
    ct[:3] = "Rare"
    mdata.obs["cell_type"] = ct
    exclude = trainable_exclude(mdata, "cell_type", None)
    assert exclude == ("ambiguous", "Rare")
    model = cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", epochs=1, exclude=exclude, **TINY)
    assert "Rare" not in model.classes
