"""Cell-type classifiers: modules, splits, metrics, training outputs, save / load / predict, evidence tests.

The MuData objects follow the layout of cs.io.read_xenium + cs.pp.embed_expression / embed_morphology:
embeddings in mdata["rna"].obsm["X_scgpt"] and mdata["morphology"].obsm["X_uni2"], recorded in
uns["cellsymphony"]["latest"]; micrometre centroids in obsm["spatial"]; obs["sample"]; the registry.
"""

from __future__ import annotations

import json

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellsymphony as cs
from cellsymphony._validate import set_latest
from cellsymphony.models.classifier._data import (
    TEST,
    TRAIN,
    UNUSED,
    make_split,
    relative_coordinates,
    spatial_blocks,
)
from cellsymphony.models.classifier._metrics import classification_metrics
from cellsymphony.models.classifier._module import (
    ARCHS,
    DEFAULT_WAVELENGTHS_UM,
    CellClassifierModule,
    SpatialEncoding,
)

CLASSES = np.array(["Bcell", "Stroma", "Tcell", "Tumor"])
TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2}
FAST = {**TINY, "epochs": 10, "lr": 3e-3}


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    """No progress bars; one torch thread (the 2 shared CPU cores make multi-threaded tiny ops crawl)."""
    old, threads = cs.settings.progress, torch.get_num_threads()
    cs.settings.progress = False
    torch.set_num_threads(1)
    yield
    cs.settings.progress = old
    torch.set_num_threads(threads)


def make_mdata(
    n: int = 600,
    *,
    seed: int = 0,
    gene_dim: int = 16,
    morph_dim: int = 24,
    sections: dict[str, tuple[float, float]] | None = None,
    section_um: float = 1000.0,
    signal: float = 4.0,
    labels: str = "two_factor",
    modalities: tuple[str, ...] = ("rna", "morphology"),
    prefix: str = "cell",
) -> md.MuData:
    """Cells whose label is (A, B): A shifts the gene embedding, B the morphology embedding.

    ``labels="gene_x_side"`` makes B the side of the section (x relative to the section centre < 0)
    instead, so only the position tells B.
    """
    rng = np.random.default_rng(seed)
    sections = sections or {"s1": (0.0, 0.0)}
    names = list(sections)
    sample = np.array(names)[rng.integers(0, len(names), n)]
    offset = np.array([sections[s] for s in sample])
    xy = rng.uniform(0, section_um, size=(n, 2)) + offset
    a = rng.integers(0, 2, n)
    b = (xy[:, 0] - offset[:, 0] >= section_um / 2).astype(int) if labels == "gene_x_side" else rng.integers(0, 2, n)
    gene = rng.normal(size=(n, gene_dim)).astype(np.float32)
    gene[:, 0] += signal * a
    morph = rng.normal(size=(n, morph_dim)).astype(np.float32)
    if labels == "two_factor":
        morph[:, 0] += signal * b
    obs_names = [f"{prefix}{i}" for i in range(n)]

    def modality(x):
        ada = ad.AnnData(X=x, obs=pd.DataFrame({"sample": pd.Categorical(sample)}, index=obs_names))
        ada.obsm["spatial"] = xy.copy()
        ada.obsm["nucleus_centroid"] = xy + 1.0
        return ada

    mods = {}
    if "rna" in modalities:
        mods["rna"] = modality(sp.csr_matrix((n, 5), dtype=np.float32))
        mods["rna"].obsm["X_scgpt"] = gene
    if "morphology" in modalities:
        mods["morphology"] = modality(np.zeros((n, 0), dtype=np.float32))
        mods["morphology"].obsm["X_uni2"] = morph
    mdata = md.MuData(mods)
    mdata.uns["cellsymphony"] = {
        "samples": {
            s: {
                "he_path": "",
                "alignment": np.eye(3),
                "pixel_size": 0.2125,
                "he_mpp": 0.5,
                "xenium_path": "",
            }
            for s in names
        }
    }
    for mod, key in (("rna", "X_scgpt"), ("morphology", "X_uni2")):
        if mod in mods:
            set_latest(mdata, mod, key)
    mdata.obs["cell_type"] = pd.Categorical(CLASSES[2 * a + b])
    return mdata


# ------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes(arch):
    torch.manual_seed(0)
    mod = CellClassifierModule(arch, 5, gene_dim=12, morph_dim=20, **TINY)
    x = {"gene": torch.randn(7, 12), "morph": torch.randn(7, 20), "coords": torch.randn(7, 2) * 500}
    tokens = mod.embed_tokens(**x)
    assert tokens.shape == (7, len(mod.tokens), 32)
    out = mod(**x)
    assert out.shape == (7, 5)
    assert torch.isfinite(out).all()
    biases = [layer.pair_bias for layer in mod.layers]
    if arch == "multi_input":
        assert all(b is not None and b.shape == (2, 3, 3) for b in biases)
        # the bias is trained: it gets a gradient
        out.sum().backward()
        assert mod.layers[0].pair_bias.grad is not None
        assert mod.layers[0].pair_bias.grad.abs().sum() > 0
    else:
        assert all(b is None for b in biases)


def test_pair_bias_changes_attention():
    """The learned bias is a real mechanism: changing it changes the output."""
    torch.manual_seed(0)
    mod = CellClassifierModule("multi_input", 3, gene_dim=4, morph_dim=4, **TINY).eval()
    x = {"gene": torch.randn(5, 4), "morph": torch.randn(5, 4), "coords": torch.randn(5, 2) * 300}
    before = mod(**x)
    with torch.no_grad():
        mod.layers[0].pair_bias[:, :, 2] = -1e4  # nobody attends to the spatial token
    assert not torch.allclose(before, mod(**x))


def test_module_bad_inputs():
    with pytest.raises(ValueError, match="gene_dim"):
        CellClassifierModule("dual", 3, morph_dim=4, **TINY)
    with pytest.raises(ValueError, match="at least 2 classes"):
        CellClassifierModule("unimodal", 1, gene_dim=4, **TINY)
    mod = CellClassifierModule("spatial", 3, gene_dim=4, **TINY)
    with pytest.raises(ValueError, match="'spatial' input"):
        mod(gene=torch.randn(2, 4))


def test_spatial_encoding_values():
    enc = SpatialEncoding([100.0, 1000.0])
    assert enc.n_features == 8
    f = enc(torch.tensor([[25.0, 0.0], [0.0, 250.0]]))
    # layout: x: (sin, cos) per wavelength, then y: (sin, cos) per wavelength
    expected = torch.tensor(
        [
            [1.0, 0.0, np.sin(np.pi / 20), np.cos(np.pi / 20), 0.0, 1.0, 0.0, 1.0],
            [0.0, 1.0, 0.0, 1.0, np.sin(5 * np.pi), np.cos(5 * np.pi), 1.0, 0.0],
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(f, expected, atol=1e-5, rtol=0)
    assert DEFAULT_WAVELENGTHS_UM[0] == 50.0
    assert DEFAULT_WAVELENGTHS_UM[-1] == 25000.0
    with pytest.raises(ValueError, match="positive"):
        SpatialEncoding([0.0, 10.0])


def test_relative_coordinates():
    coords = np.array([[0, 0], [100, 50], [10000, 10000], [10200, 10400], [np.nan, 1]])
    samples = np.array(["a", "a", "b", "b", "b"])
    rel = relative_coordinates(coords, samples)
    np.testing.assert_allclose(rel[:4], [[-50, -25], [50, 25], [-100, -200], [100, 200]])
    assert np.isnan(rel[4, 0])


# ------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_checked():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    pc = m["per_class"]
    # a: 1 of 2 predicted a are a (P=1/2), 1 of 2 a found (R=1/2); b: P=2/3, R=1, F1=0.8; c: never predicted
    np.testing.assert_allclose(pc["precision"], [0.5, 2 / 3, 0.0])
    np.testing.assert_allclose(pc["recall"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(pc["f1"], [0.5, 0.8, 0.0])
    assert pc["support"].tolist() == [2, 2, 1]
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["weighted_f1"] == pytest.approx((0.5 * 2 + 0.8 * 2) / 5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    np.testing.assert_array_equal(m["confusion"], [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    # a class without test support does not count in the macro average
    m2 = classification_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b", "c"])
    assert m2["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


# ------------------------------------------------------------------------------------------- splits
def _labels(counts: dict[str, int]) -> np.ndarray:
    return np.array([k for k, v in counts.items() for _ in range(v)] + [None, None], dtype=object)


@pytest.mark.filterwarnings("ignore:Label")
def test_split_random_stratified_and_singletons():
    labels = _labels({"a": 50, "b": 20, "c": 1})
    samples = np.full(len(labels), "s1", dtype=object)
    with pytest.warns(UserWarning, match=r"\['c'\] have a single usable cell"):
        split = make_split(labels, split="random", test_size=0.2, seed=0, samples=samples)
    assert (split[-2:] == UNUSED).all()
    lab = labels.astype(str)
    assert ((lab == "a") & (split == TEST)).sum() == 10
    assert ((lab == "b") & (split == TEST)).sum() == 4
    assert split[lab == "c"].tolist() == [TRAIN]
    again = make_split(labels, split="random", test_size=0.2, seed=0, samples=samples)
    np.testing.assert_array_equal(split, again)
    other = make_split(labels, split="random", test_size=0.2, seed=1, samples=samples)
    assert (split != other).any()


def test_split_spatial_blocks():
    rng = np.random.default_rng(0)
    n = 2000
    coords = rng.uniform(0, 800, size=(n, 2))
    samples = np.full(n, "s1", dtype=object)
    labels = np.array(["a", "b"], dtype=object)[rng.integers(0, 2, n)]
    split = make_split(labels, split="spatial", test_size=0.25, seed=0, samples=samples, coords_abs=coords, block_size=100)
    blocks = spatial_blocks(coords, samples, 100)
    assert len(np.unique(blocks)) == 64
    # no block has both train and test cells
    for b in np.unique(blocks):
        assert len(set(split[blocks == b])) == 1
    frac = (split == TEST).mean()
    assert 0.25 <= frac < 0.25 + 2 * (1 / 64) + 0.02
    # blocks of two sections never merge, even at the same coordinates
    blocks2 = spatial_blocks(np.vstack([coords, coords]), np.repeat(["s1", "s2"], n).astype(object), 100)
    assert len(np.unique(blocks2)) == 128


def test_split_sample():
    labels = _labels({"a": 30, "b": 30})
    samples = np.array((["s1", "s2", "s3"] * 21)[: len(labels)], dtype=object)
    split = make_split(labels, split="sample", test_size=0.3, seed=0, samples=samples)
    test_sections = set(samples[split == TEST])
    assert len(test_sections) == 1
    assert not test_sections & set(samples[split == TRAIN])
    split = make_split(labels, split="sample", test_size=0.3, seed=0, samples=samples, test_samples=["s2", "s3"])
    assert set(samples[split == TEST]) == {"s2", "s3"}
    with pytest.raises(ValueError, match="at least 2"):
        make_split(labels, split="sample", test_size=0.3, seed=0, samples=np.full(len(labels), "s1", dtype=object))
    with pytest.raises(ValueError, match="every section"):
        make_split(labels, split="sample", test_size=0.3, seed=0, samples=samples, test_samples=["s1", "s2", "s3"])


# ------------------------------------------------------------------------------------------- training
def test_train_outputs_exclusions_and_h5mu_roundtrip(tmp_path):
    mdata = make_mdata(400, sections={"s1": (0, 0), "s2": (5000, 0)})
    ct = mdata.obs["cell_type"].astype(str).to_numpy().copy()
    ct[:10] = "ambiguous"
    ct[10:15] = np.nan
    mdata.obs["cell_type"] = ct
    conf = np.ones(mdata.n_obs, dtype=bool)
    conf[15:20] = False
    mdata.obs["confident"] = conf
    gene = mdata["rna"].obsm["X_scgpt"]
    gene[20:23, 3] = np.nan  # NaN embeddings: no prediction, not used
    model = cs.tl.train_classifier(
        mdata, "cell_type", arch="dual", confident_key="confident", epochs=2, lr=1e-3, **TINY
    )
    assert isinstance(model, cs.models.CellTypeClassifier)
    classes = list(CLASSES)
    assert model.classes == classes
    uns = mdata.uns["cs_pred"]
    assert list(uns["classes"]) == classes
    assert uns["exclusions"] == {
        "no label": 5,
        "excluded label": 10,
        "not confident": 5,
        "missing or NaN inputs": 3,
    }
    split = mdata.obs["cs_pred_split"]
    assert (split.iloc[:23] == UNUSED).all()
    assert (split.iloc[23:] != UNUSED).all()
    assert (split == TEST).sum() == uns["metrics"]["n_test"]
    pred = mdata.obs["cs_pred"]
    assert list(pred.cat.categories) == classes
    assert pred.iloc[20:23].isna().all()
    assert pred.drop(pred.index[20:23]).notna().all()  # every cell with inputs, labelled or not
    proba = mdata.obsm["cs_pred_proba"]
    assert proba.shape == (mdata.n_obs, 4)
    ok = np.isfinite(proba).all(1)
    np.testing.assert_allclose(proba[ok].sum(1), 1, atol=1e-5)
    assert (np.asarray(classes)[proba[ok].argmax(1)] == pred[ok].astype(str)).all()
    for k in ("train_loss", "test_loss", "test_macro_f1", "test_accuracy"):
        assert uns["history"][k].shape == (2,)
        assert np.isfinite(uns["history"][k]).all()
    met = uns["metrics"]
    assert list(met["per_class"].columns) == ["precision", "recall", "f1", "support"]
    assert met["per_class"]["support"].sum() == met["n_test"]
    assert met["confusion"].shape == (4, 4)
    assert met["confusion"].sum() == met["n_test"]
    assert met["macro_f1"] == pytest.approx(met["per_class"]["f1"][met["per_class"]["support"] > 0].mean())
    p = uns["params"]
    assert p["arch"] == "dual"
    assert p["gene_rep"] == "X_scgpt"
    assert p["morph_rep"] == "X_uni2"
    assert list(p["exclude"]) == ["ambiguous"]
    assert "version" in p

    mdata.update()
    path = tmp_path / "out.h5mu"
    mdata.write(path)
    back = md.read_h5mu(path)
    pd.testing.assert_series_equal(
        back.obs["cs_pred"].astype(str), mdata.obs["cs_pred"].astype(str), check_names=False
    )
    assert back.obs["cs_pred_split"].tolist() == mdata.obs["cs_pred_split"].tolist()
    np.testing.assert_array_equal(back.obsm["cs_pred_proba"], proba)
    ub = back.uns["cs_pred"]
    assert list(ub["classes"]) == classes
    pd.testing.assert_frame_equal(ub["metrics"]["per_class"], met["per_class"], check_dtype=False, check_names=False)
    np.testing.assert_array_equal(ub["metrics"]["confusion"], met["confusion"])
    np.testing.assert_allclose(ub["history"]["train_loss"], uns["history"]["train_loss"])
    assert ub["exclusions"]["not confident"] == 5


def test_train_deterministic_and_label_lookup():
    """Same seed -> same model; labels found in a modality's obs; exclude given as a string."""
    m1, m2 = make_mdata(200), make_mdata(200)
    for m in (m1, m2):
        m["rna"].obs["ct_rna"] = m.obs["cell_type"].to_numpy()
    a = cs.tl.train_classifier(m1, "ct_rna", arch="unimodal", exclude="Tumor", epochs=2, **TINY)
    b = cs.tl.train_classifier(m2, "ct_rna", arch="unimodal", exclude="Tumor", epochs=2, **TINY)
    assert a.classes == ["Bcell", "Stroma", "Tcell"]
    np.testing.assert_array_equal(m1.obsm["cs_pred_proba"], m2.obsm["cs_pred_proba"])
    np.testing.assert_array_equal(a.history["train_loss"], b.history["train_loss"])


def test_two_factor_evidence(tmp_path):
    """Gene embedding carries factor A, morphology factor B, the label is (A, B): only models reading
    both can separate the four classes; each single-modality model is stuck near 50 % accuracy."""
    mdata = make_mdata(800, seed=1)
    table = cs.tl.compare_classifiers(
        mdata,
        "cell_type",
        archs=("unimodal", "dual", "multi_input", "morphology"),
        key_added="cmp",
        **FAST,
    )
    f1 = table.set_index("architecture")["macro F1"]
    single = max(f1["unimodal"], f1["morphology"])
    assert f1["dual"] > single + 0.25
    assert f1["multi_input"] > single + 0.25
    assert f1["dual"] > 0.8
    assert f1["logistic"] > 0.8  # the baseline sees both embeddings too
    # layout: one row per architecture x sample, P / R / F1 per class, flat columns
    assert list(table.index) == [f"{a} | s1" for a in ("unimodal", "dual", "multi_input", "morphology", "logistic")]
    assert list(table.columns[:3]) == ["architecture", "sample", "n_test"]
    assert list(table.columns[3:6]) == ["Bcell P", "Bcell R", "Bcell F1"]
    assert len(table.columns) == 3 + 3 * 4 + 2
    assert (table["n_test"] == 160).all()
    assert mdata.uns["cmp"]["table"] is table
    assert "cs_pred" not in mdata.obs  # a getter writes nothing else
    mdata.write(tmp_path / "cmp.h5mu")
    back = md.read_h5mu(tmp_path / "cmp.h5mu").uns["cmp"]
    pd.testing.assert_frame_equal(back["table"], table, check_dtype=False, check_names=False)
    assert list(back["params"]["archs"]) == ["unimodal", "dual", "multi_input", "morphology"]


def test_spatial_token_uses_section_relative_position(tmp_path):
    """The label's second factor is the side of the section, in two sections 20 mm apart: the spatial
    architecture must learn it from positions relative to each section."""
    mdata = make_mdata(800, seed=2, labels="gene_x_side", sections={"s1": (0, 0), "s2": (20000, 7000)})
    table = cs.tl.compare_classifiers(mdata, "cell_type", archs=("unimodal", "spatial"), baselines=(), **FAST)
    rows = table["macro F1"]
    assert rows["spatial | all"] > rows["unimodal | all"] + 0.25
    assert set(table["sample"]) == {"s1", "s2", "all"}
    mdata.write(tmp_path / "cmp.h5mu")  # no key_added: nothing new in uns, still writable


def test_sample_and_spatial_split_training():
    mdata = make_mdata(300, sections={"s1": (0, 0), "s2": (3000, 0), "s3": (6000, 0)})
    cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", split="sample", test_samples=["s3"], epochs=1, **TINY)
    split = mdata.obs["cs_pred_split"].astype(str)
    samples = mdata["rna"].obs["sample"].astype(str)
    assert set(samples[split == TEST]) == {"s3"}
    assert set(samples[split == TRAIN]) == {"s1", "s2"}
    cs.tl.train_classifier(mdata, "cell_type", arch="spatial", split="spatial", block_size=250, epochs=1, key_added="sp", **TINY)
    assert mdata.uns["sp"]["params"]["split"] == "spatial"
    assert 0.15 < (mdata.obs["sp_split"] == TEST).mean() < 0.4


# ------------------------------------------------------------------------------------------- save / load / predict
def test_save_load_predict(tmp_path):
    mdata = make_mdata(300)
    model = cs.tl.train_classifier(mdata, "cell_type", arch="multi_input", epochs=2, lr=1e-3, **TINY)
    d = model.save(tmp_path / "clf")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["format"], cfg["format_version"]) == ("cellsymphony.CellTypeClassifier", 2)
    state = cfg["state"]
    assert state["classes"] == list(CLASSES)
    assert (state["gene_dim"], state["morph_dim"]) == (16, 24)
    assert (state["gene_rep"], state["morph_rep"]) == ("X_scgpt", "X_uni2")
    assert cfg["config"]["arch"] == "multi_input" and cfg["config"]["d_model"] == 32
    assert cfg["cellsymphony_version"] == cs.__version__
    # the provenance of each input representation, and the checksum of the weights file
    assert cfg["inputs"]["rna"]["key"] == "X_scgpt" and cfg["inputs"]["rna"]["dim"] == 16
    assert cfg["inputs"]["morphology"]["key"] == "X_uni2" and cfg["inputs"]["morphology"]["dim"] == 24
    import hashlib

    digest = "sha256:" + hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert cfg["weights"] == {"model.safetensors": digest}
    assert cfg["fit_params"]["epochs"] == 2 and cfg["fit_params"]["label_key"] == "cell_type"
    assert len(cfg["history"]["train_loss"]) == 2
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(d)
    model.save(d, overwrite=True)

    loaded = cs.models.CellTypeClassifier.load(d)
    assert loaded.arch == "multi_input"
    assert loaded.classes == model.classes
    before = mdata.obsm["cs_pred_proba"].copy()
    pred = loaded.predict(mdata, key_added="again")
    np.testing.assert_allclose(mdata.obsm["again_proba"], before, atol=1e-6)
    assert (pred.astype(str) == mdata.obs["cs_pred"].astype(str)).all()
    assert (mdata.obs["again"].astype(str) == mdata.obs["cs_pred"].astype(str)).all()

    # another section: different cells, other coordinates
    other = make_mdata(120, seed=5, sections={"sB": (40000, 0)}, prefix="other")
    p1 = model.predict(other, key_added=None)
    p2 = loaded.predict(other)
    assert p1.index.equals(other.obs_names)
    assert (p1.astype(str) == p2.astype(str)).all()
    assert "cs_pred" in other.obs
    assert "cs_pred_split" not in other.obs
    assert list(other.uns["cs_pred"]["classes"]) == list(CLASSES)
    other.write(tmp_path / "other.h5mu")
    back = md.read_h5mu(tmp_path / "other.h5mu")
    assert back.obs["cs_pred"].astype(str).tolist() == p2.astype(str).tolist()
    assert back.uns["cs_pred"]["model"]["arch"] == "multi_input"

    # wrong dimensions
    bad = make_mdata(50, seed=6, morph_dim=30)
    with pytest.raises(ValueError, match="has 30 dimensions but the classifier was trained on 24"):
        loaded.predict(bad)
    with pytest.raises(FileNotFoundError):
        cs.models.CellTypeClassifier.load(tmp_path / "nothing")


def test_morphology_model_on_he_only_slide(tmp_path):
    train = make_mdata(300)
    model = cs.tl.train_classifier(train, "cell_type", arch="morphology", epochs=2, lr=1e-3, **TINY)
    model.save(tmp_path / "m")
    he_only = make_mdata(150, seed=9, modalities=("morphology",), prefix="he")
    assert list(he_only.mod) == ["morphology"]
    loaded = cs.models.CellTypeClassifier.load(tmp_path / "m")
    pred = loaded.predict(he_only)
    assert pred.notna().all()
    np.testing.assert_allclose(
        he_only.obsm["cs_pred_proba"], model.predict_proba(he_only).to_numpy(), atol=1e-6
    )
    # a model that reads expression cannot run on it, and says what is missing
    dual = cs.tl.train_classifier(train, "cell_type", arch="dual", epochs=1, key_added="d", **TINY)
    with pytest.raises(ValueError, match="no 'rna' modality"):
        dual.predict(he_only)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    mdata = make_mdata(100)
    mdata.obs["one"] = "Tcell"
    with pytest.raises(ValueError, match="at least 2 classes"):
        cs.tl.train_classifier(mdata, "one", arch="unimodal", epochs=1, **TINY)
    with pytest.raises(ValueError, match="at least 2 classes"):
        cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", exclude=("Tcell", "Tumor", "Stroma"), **TINY)
    with pytest.raises(ValueError, match="not found"):
        cs.tl.train_classifier(mdata, "nope", arch="unimodal", **TINY)
    with pytest.raises(ValueError, match="arch="):
        cs.tl.train_classifier(mdata, "cell_type", arch="triple", **TINY)
    with pytest.raises(ValueError, match="split="):
        cs.tl.train_classifier(mdata, "cell_type", split="diagonal", **TINY)
    assert "cs_pred" not in mdata.obs  # nothing written by failed calls

    no_emb = make_mdata(100)
    del no_emb.uns["cellsymphony"]["latest"]
    with pytest.raises(ValueError, match=r"cs\.pp\.embed_expression"):
        cs.tl.train_classifier(no_emb, "cell_type", arch="unimodal", **TINY)
    with pytest.raises(ValueError, match=r"cs\.pp\.embed_morphology"):
        cs.tl.train_classifier(no_emb, "cell_type", arch="morphology", **TINY)
    with pytest.raises(ValueError, match=r"cs\.pp\.embed_morphology"):
        cs.tl.train_classifier(no_emb, "cell_type", arch="dual", gene_rep="X_scgpt", morph_rep="X_missing", **TINY)


def test_singleton_label_is_refused_with_the_fix():
    """A class with fewer than MIN_TRAIN_CELLS_PER_CLASS training cells is refused (it used to train, with a
    test support of 0); leaving it out trains."""
    mdata = make_mdata(200)
    ct = mdata.obs["cell_type"].astype(str).to_numpy().copy()
    ct[0] = "Rare"
    mdata.obs["cell_type"] = ct
    with pytest.warns(UserWarning, match=r"\['Rare'\] have a single usable cell"), \
            pytest.raises(ValueError, match=r"Too few training cells: .* at least 5; .*\{'Rare': 1\}.*exclude="):
        cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", epochs=1, **TINY)
    assert "cs_pred" not in mdata.obs
    model = cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", epochs=1, exclude=["Rare"], **TINY)
    assert "Rare" not in model.classes
    assert mdata.obs["cs_pred_split"].iloc[0] == "unused"


def test_anndata_of_one_modality():
    """Single-modality architectures accept the AnnData of that modality."""
    mdata = make_mdata(200)
    rna = mdata["rna"].copy()
    rna.obs["cell_type"] = mdata.obs["cell_type"].to_numpy()
    rna.uns["cellsymphony"] = {"latest": {"rna": "X_scgpt"}}
    model = cs.tl.train_classifier(rna, "cell_type", arch="spatial", epochs=1, **TINY)
    assert rna.obs["cs_pred"].notna().all()
    assert rna.obsm["cs_pred_proba"].shape == (200, 4)
    assert (model.predict(rna, key_added=None).astype(str) == rna.obs["cs_pred"].astype(str)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_and_cpu_predict(tmp_path):
    """Training on CUDA (bf16 autocast) learns the two-factor labels; the saved model predicts on the CPU."""
    mdata = make_mdata(800, seed=1)
    model = cs.tl.train_classifier(mdata, "cell_type", arch="multi_input", device="cuda", **FAST)
    assert mdata.uns["cs_pred"]["params"]["device"].startswith("cuda")
    assert mdata.uns["cs_pred"]["metrics"]["macro_f1"] > 0.8
    model.save(tmp_path / "m")
    cpu = cs.models.CellTypeClassifier.load(tmp_path / "m").predict(mdata, key_added=None, device="cpu")
    agree = (cpu.astype(str) == mdata.obs["cs_pred"].astype(str)).mean()
    assert agree > 0.97  # bf16 on the GPU vs float32 on the CPU: a few borderline cells may differ


def test_compare_uses_common_cells_and_given_split():
    """Cells lacking an input of any compared method are left out for all of them (here every Tumor cell
    lacks its morphology embedding), and a per-cell split array is used as given."""
    mdata = make_mdata(300)
    tumor = (mdata.obs["cell_type"] == "Tumor").to_numpy()
    mdata["morphology"].obsm["X_uni2"][tumor] = np.nan
    table = cs.tl.compare_classifiers(mdata, "cell_type", archs=("unimodal", "dual"), baselines=(), epochs=1, **TINY)
    assert [c for c in table.columns if c.endswith(" F1") and c != "macro F1" and c != "weighted F1"] == [
        "Bcell F1",
        "Stroma F1",
        "Tcell F1",
    ]
    assert table["n_test"].nunique() == 1
    assert ((table.filter(like=" P") >= 0) & (table.filter(like=" P") <= 1)).all().all()

    split = np.where(np.arange(mdata.n_obs) % 4 == 0, TEST, TRAIN).astype(object)
    split[:20] = UNUSED
    model = cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", split=split, epochs=1, **TINY)
    assert model.classes == list(CLASSES)  # unimodal does not need the morphology embedding
    got = mdata.obs["cs_pred_split"].astype(str).to_numpy()
    np.testing.assert_array_equal(got, split.astype(str))
    assert mdata.uns["cs_pred"]["exclusions"]["outside the given split"] == 20
    assert mdata.uns["cs_pred"]["params"]["split"] == "custom"
    with pytest.raises(ValueError, match="only 'train', 'test' and 'unused'"):
        cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", split=np.full(mdata.n_obs, "x"), **TINY)


def test_compare_classifiers_checks_test_size_and_records_test_samples(tmp_path):
    mdata = make_mdata(120, sections={"s1": (0, 0), "s2": (3000, 0)})
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="test_size"):
            cs.tl.compare_classifiers(mdata, "cell_type", archs=(), baselines=("logistic",), test_size=bad, key_added="c")
    assert "c" not in mdata.uns
    cs.tl.compare_classifiers(
        mdata, "cell_type", archs=(), split="sample", test_samples=["s2"], key_added="c"
    )
    mdata.write(tmp_path / "c.h5mu")
    params = md.read_h5mu(tmp_path / "c.h5mu").uns["c"]["params"]
    assert list(params["test_samples"]) == ["s2"]


def test_constant_training_feature_is_not_amplified():
    """A feature constant on the training cells (std 0) must not be divided by ~0: on a new section
    where it moves a little, the logits would otherwise blow up by a factor of about 1e6."""
    torch.manual_seed(0)
    mod = CellClassifierModule("unimodal", 3, gene_dim=4, **TINY).eval()
    train = torch.randn(50, 4)
    train[:, 2] = 5.0
    mod.set_standardization("gene", train.mean(0), train.std(0))
    assert mod.gene_std[2] == 1.0
    assert torch.allclose(mod.gene_std[[0, 1, 3]], train.std(0)[[0, 1, 3]])
    x = train[:8].clone()
    shifted = x.clone()
    shifted[:, 2] += 0.01
    with torch.no_grad():
        assert torch.allclose(mod(gene=x), mod(gene=shifted), atol=0.05)
