"""Whole-section sizes: the code paths that a 10^5-10^6-cell section takes (vectorised ids and colours,
the count matrix read without whole copies, classifier predictions in batches, the report's UMAP
subsample, the pre-flight memory check of ``cellsymphony run``). Random data, seconds each."""

from __future__ import annotations

import logging
import tracemalloc

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellsymphony as cs
from cellsymphony import __main__ as cli
from cellsymphony import _memory
from cellsymphony._validate import set_latest
from cellsymphony.io._xenium_files import _decode_bytes, cell_id_from_prefix_suffix, read_matrix


@pytest.fixture(autouse=True)
def _quiet():
    """No progress bars; one torch thread (tiny models on 2 shared cores crawl with more)."""
    import torch

    old, threads = cs.settings.progress, torch.get_num_threads()
    cs.settings.progress = False
    torch.set_num_threads(1)
    yield
    cs.settings.progress = old
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- reading
def test_prefix_suffix_ids_match_the_per_cell_formula():
    rng = np.random.default_rng(0)
    n = 200_000
    prefix = rng.integers(0, 2**32, n, dtype=np.uint64)
    prefix[:3] = [0, 1, 2**32 - 1]
    pairs = np.stack([prefix, rng.integers(1, 4, n, dtype=np.uint64)], axis=1).astype(np.uint32)
    table = str.maketrans("0123456789abcdef", "abcdefghijklmnop")
    want = [format(int(p), "x").translate(table).rjust(8, "a") + f"-{int(s)}" for p, s in pairs[::997]]
    got = cell_id_from_prefix_suffix(pairs)
    assert got.shape == (n,)
    assert list(got[::997]) == want
    assert list(got[:3]) == ["aaaaaaaa-" + str(pairs[0, 1]), "aaaaaaab-" + str(pairs[1, 1]), "pppppppp-" + str(pairs[2, 1])]
    # prefixes wider than Xenium's uint32 keep the per-cell rule (more than 8 letters)
    wide = cell_id_from_prefix_suffix(np.array([[2**36, 1]], dtype=np.uint64))
    assert list(wide) == [format(2**36, "x").translate(table) + "-1"]


def test_object_columns_are_decoded_per_distinct_value():
    n = 300_000
    values = np.empty(n, dtype=object)
    values[:] = b"Segmented by nucleus expansion of 5.0\xc2\xb5m"
    values[1::3] = "already text"
    values[2::7] = None
    values[5] = 3
    out = _decode_bytes(values)
    assert out.dtype == object and len(out) == n
    assert out[0] == "Segmented by nucleus expansion of 5.0µm"
    assert out[1] == "already text" and out[2] is None and out[5] == 3
    assert sum(isinstance(v, bytes) for v in out[:1000]) == 0


def _write_matrix(path, n_cells: int, n_genes: int, per_cell: int, seed: int = 0):
    """A 10x cell_feature_matrix.h5 (CSC over cells: int32 values, int64 indices, as Xenium writes)."""
    rng = np.random.default_rng(seed)
    cols = np.sort(rng.random((n_cells, n_genes)).argsort(axis=1)[:, :per_cell], axis=1)
    indices = cols.ravel().astype(np.int64)
    data = rng.integers(1, 30, indices.size).astype(np.int32)
    indptr = np.arange(0, indices.size + 1, per_cell, dtype=np.int64)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = data, indices, indptr
        g["shape"] = np.array([n_genes, n_cells], dtype=np.int32)
        g["barcodes"] = np.array([f"cell{i}".encode() for i in range(n_cells)])
        fg = g.create_group("features")
        fg["id"] = np.array([f"G{i}".encode() for i in range(n_genes)])
        fg["name"] = np.array([f"GENE{i}".encode() for i in range(n_genes)])
        fg["feature_type"] = np.array([b"Gene Expression"] * n_genes)
    return data, indices, indptr


def test_count_matrix_is_read_without_whole_copies(tmp_path):
    """3 million stored counts: the peak of reading stays near the final float32/int32 CSR (the old
    float64 / int64 path held about 3.5 times it)."""
    path = tmp_path / "cell_feature_matrix.h5"
    data, indices, indptr = _write_matrix(path, n_cells=30_000, n_genes=400, per_cell=100)
    tracemalloc.start()
    try:
        x, feats, ids = read_matrix(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.format == "csr" and x.shape == (30_000, 400)
    assert x.dtype == np.float32 and x.indices.dtype == np.int32
    final = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    assert peak < 1.6 * final, (peak / 2**20, final / 2**20)
    row = 12345
    s, e = indptr[row], indptr[row + 1]
    np.testing.assert_array_equal(x[row].indices, indices[s:e])
    np.testing.assert_array_equal(x[row].data, data[s:e].astype(np.float32))
    assert ids[row] == "cell12345" and feats["name"].iloc[7] == "GENE7"


def test_count_matrix_with_out_of_range_index_is_refused(tmp_path):
    path = tmp_path / "cell_feature_matrix.h5"
    _write_matrix(path, n_cells=50, n_genes=20, per_cell=3)
    with h5py.File(path, "r+") as f:
        idx = f["matrix/indices"][()]
        idx[4] = 25
        f["matrix/indices"][...] = idx
    with pytest.raises(ValueError, match="outside"):
        read_matrix(path)


# ------------------------------------------------------------------------------------------- classifier
def _embedded(n: int, seed: int = 0) -> md.MuData:
    rng = np.random.default_rng(seed)
    names = [f"c{i}" for i in range(n)]
    label = rng.integers(0, 3, n)
    gene = rng.normal(size=(n, 12)).astype(np.float32)
    gene[:, 0] += 3 * label
    morph = rng.normal(size=(n, 8)).astype(np.float32)
    xy = rng.uniform(0, 3000, (n, 2))
    mods = {}
    for mod, rep, x in (("rna", "X_scgpt", gene), ("morphology", "X_uni2", morph)):
        a = ad.AnnData(X=sp.csr_matrix((n, 1), dtype=np.float32), obs=pd.DataFrame(index=names))
        a.obs["sample"] = pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), ["s1"])
        a.obsm[rep], a.obsm["spatial"] = x, xy
        mods[mod] = a
    mdata = md.MuData(mods)
    for mod, rep in (("rna", "X_scgpt"), ("morphology", "X_uni2")):
        set_latest(mdata, mod, rep)
    mdata.obs["cell_type"] = pd.Categorical(np.array(["a", "b", "c"])[label])
    return mdata


def test_classifier_predicts_every_cell_in_batches(monkeypatch, caplog):
    """Predictions of 5,000 cells (several predict batches) are made batch by batch, with no copy of every
    cell's inputs, equal to one pass over all of them; the fit logs its timings."""
    from cellsymphony.models.classifier import _model

    mdata = _embedded(5000)
    with caplog.at_level(logging.DEBUG, logger="cellsymphony"):
        clf = cs.tl.train_classifier(mdata, "cell_type", arch="dual", d_model=16, n_layers=1, n_heads=2, epochs=1, lr=3e-3)
    timed = {r.stage: r.seconds for r in caplog.records if hasattr(r, "stage")}  # timings are log records only
    assert timed["classifier dual epoch"] > 0 and timed["classifier dual predict"] > 0
    assert not hasattr(clf, "timings")
    converted = []
    real = _model.CellTypeClassifier._tensors

    def spy(inputs, rows, device):
        converted.append(len(rows))
        return real(inputs, rows, device)

    monkeypatch.setattr(_model.CellTypeClassifier, "_tensors", staticmethod(spy))
    proba = clf.predict_proba(mdata, batch_size=1024).to_numpy()
    assert max(converted) == 1024 and sum(converted) == 5000
    import torch

    inputs = clf._predict_inputs(mdata, None, None)
    whole = clf._proba(real(inputs, np.arange(5000), torch.device("cpu")), torch.device("cpu"), 5000)
    np.testing.assert_allclose(proba, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mdata.obsm["cs_pred_proba"], whole, rtol=1e-5, atol=1e-6)


def test_training_subset_marks_labelled_confident_cells():
    from cellsymphony._run import TRAIN_CELLS_KEY, training_subset

    mdata = _embedded(20_000)
    labels = mdata.obs["cell_type"].astype(object)
    labels[:500] = None
    mdata.obs["cell_type"] = pd.Categorical(labels)
    mdata.obs["confident"] = np.arange(20_000) % 4 != 0
    key = training_subset(mdata, "cell_type", "confident", 6000, seed=0)
    chosen = mdata.obs[key].to_numpy()
    assert key == TRAIN_CELLS_KEY and chosen.sum() == 6000
    assert mdata.obs["cell_type"][chosen].notna().all() and mdata.obs["confident"][chosen].all()
    training_subset(mdata, "cell_type", "confident", 6000, seed=0)
    np.testing.assert_array_equal(mdata.obs[key].to_numpy(), chosen)  # the same cells for the same seed
    clf = cs.tl.train_classifier(mdata, "cell_type", arch="unimodal", confident_key=key, d_model=16, n_layers=1,
                                 n_heads=2, epochs=1)  # fmt: skip
    used = mdata.obs["cs_pred_split"].isin(["train", "test"]).to_numpy()
    assert used.sum() == 6000 and (used == chosen).all()
    assert mdata.obs["cs_pred"].notna().sum() == 20_000  # predictions for every cell
    assert clf.is_trained


# ------------------------------------------------------------------------------------------- figures
def test_spatial_colours_are_picked_per_category_code():
    import matplotlib

    matplotlib.use("Agg")
    n = 30_000
    rng = np.random.default_rng(0)
    a = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    a.obsm["spatial"] = rng.uniform(0, 2000, (n, 2))
    lab = pd.Categorical(np.array(["x", "y", "z"])[rng.integers(0, 3, n)])
    lab[::10] = np.nan
    a.obs["lab"] = lab
    palette = {"x": "#ff0000", "y": "#00ff00", "z": "#0000ff"}
    ax = cs.pl.spatial(a, "lab", he=False, palette=palette, groups=["x", "z"], show=False)
    faces = ax.collections[0].get_facecolors()[:, :3]
    offsets = ax.collections[0].get_offsets()
    assert len(faces) == n
    grey = np.array([0xD3, 0xD3, 0xD3]) / 255
    greyed = np.isclose(faces, grey).all(axis=1)
    want_grey = lab.isna() | (np.asarray(lab) == "y")
    assert greyed.sum() == want_grey.sum()
    assert greyed[: want_grey.sum()].all()  # greyed cells drawn first, under the coloured ones
    red = np.isclose(faces, [1, 0, 0]).all(axis=1)
    where = pd.DataFrame(a.obsm["spatial"]).round(6).apply(tuple, axis=1)
    drawn = pd.DataFrame(np.asarray(offsets)).round(6).apply(tuple, axis=1)
    assert set(drawn[red]) == set(where[np.asarray(lab == "x")])


def test_report_umap_uses_a_fixed_random_subsample(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellsymphony._report import umap_cells, write_report

    given = []

    def embedding(data, rep, color=None, *, mod=None, **kw):  # what the report hands to the UMAP figure
        given.append((data.n_obs, list(data.obs_names[:5]), mod))
        return plt.subplots()[1]

    monkeypatch.setattr(cs.pl, "embedding", embedding)

    mdata = _embedded(1500)
    rng = np.random.default_rng(1)
    for mod in ("rna", "morphology"):
        mdata[mod].obsm["X_cs_contrastive"] = rng.normal(size=(1500, 8)).astype(np.float32)
    mdata.update()
    view, caption = umap_cells(mdata, 400)
    again, _ = umap_cells(mdata, 400)
    assert view.n_obs == 400 and list(view.obs_names) == list(again.obs_names)
    assert "400 of the 1,500 cells" in caption
    assert umap_cells(mdata, 5000) == (mdata, "")
    mdata.uns["X_cs_contrastive"] = {"retrieval": pd.DataFrame({"k": [1], "chance": [0.001]})}
    write_report(mdata, tmp_path, settings_note="test", umap_max_cells=400, label_keys=["cell_type"],
                 contrastive_key="X_cs_contrastive")  # a hand-made record: named, as the outputs record lacks it
    html = (tmp_path / "report.html").read_text()
    assert html.count("400 of the 1,500 cells, drawn at random (seed 0)") == 4  # alt text and caption, 2 figures
    assert (tmp_path / "figures" / "umap_X_cs_contrastive_morphology.png").exists()
    assert [g[0] for g in given] == [400, 400] and {g[2] for g in given} == {"rna", "morphology"}
    assert given[0][1] == list(view.obs_names[:5])  # the same cells in every figure and run
    given.clear()
    write_report(mdata, tmp_path / "all", settings_note="test", umap_max_cells=None, label_keys=["cell_type"],
                 contrastive_key="X_cs_contrastive")
    assert [g[0] for g in given] == [1500, 1500]


# ------------------------------------------------------------------------------------------- pre-flight
def _big_bundle(tmp_path, n_cells=461_094, nnz=690_000_000):
    """A Xenium folder whose count matrix claims a whole section (the datasets are never written, so the
    file stays a few kB): what the pre-flight check reads."""
    d = tmp_path / "xenium"
    d.mkdir()
    (d / "experiment.xenium").write_text("{}")
    with h5py.File(d / "cell_feature_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["shape"] = np.array([5101, n_cells], dtype=np.int32)
        g.create_dataset("data", shape=(nnz,), dtype="i4", chunks=(min(nnz, 1 << 20),))
    scgpt = tmp_path / "scgpt"
    scgpt.mkdir()
    for name in cli.SCGPT_FILES:
        (scgpt / name).write_text("x")
    return d, scgpt


def _run_argv(d, scgpt, out, *extra):
    weights = d / "pytorch_model.bin"  # UNI2-h: 1536-d embeddings (the weights' size here is a few bytes)
    weights.write_bytes(b"0")
    return ["run", "--xenium", str(d), "--uni2", str(weights), "--scgpt", str(scgpt), "--labels", "singler",
            "--reference", str(d / "ref.h5ad"), "--ref-label-key", "cell_type", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture
def no_pipeline(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        return None

    import cellsymphony._run

    monkeypatch.setattr(cellsymphony._run, "run_pipeline", fake)
    # these bundles hold only experiment.xenium (all the memory check reads): the input preflight, tested in
    # tests/test_bad_input_io.py, would refuse them first
    monkeypatch.setattr(cellsymphony._run, "preflight", lambda *a, **k: None)
    return calls


def test_section_size_from_metadata(tmp_path):
    d, _ = _big_bundle(tmp_path)
    size = _memory.section_size(d)
    assert (size.n_cells, size.nnz) == (461_094, 690_000_000)
    assert (d / "cell_feature_matrix.h5").stat().st_size < 1_000_000
    steps = _memory.estimate_steps(size, morph_dim=1536)
    assert list(steps)[0] == "reading the Xenium run" and list(steps)[-1] == "report"
    assert max(steps, key=steps.get) == "classifiers"
    smaller = _memory.estimate_steps(size, morph_dim=1536, train_cells=50_000)
    assert smaller["classifiers"] < steps["classifiers"] and smaller["reading the Xenium run"] == steps["reading the Xenium run"]


def test_run_refuses_a_section_too_big_before_any_work(tmp_path, monkeypatch, capsys, no_pipeline):
    d, scgpt = _big_bundle(tmp_path)
    (d / "ref.h5ad").write_text("x")
    monkeypatch.setattr(_memory, "available_bytes", lambda: int(17e9))
    code = cli.main(_run_argv(d, scgpt, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and not no_pipeline
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "461,094 cells" in err and "'classifiers'" in err and "17.0 GB is available" in err
    assert "estimated" in err and "--train-cells" in err and "--skip-memory-check" in err
    suggested = int(err.split("--train-cells ")[1].split()[0])
    # the suggested subset fits, and the run goes ahead with it
    code = cli.main(_run_argv(d, scgpt, tmp_path / "out", "--train-cells", str(suggested)))
    assert code == 0 and no_pipeline[-1]["train_cells"] == suggested


def test_run_names_no_option_when_nothing_streams(tmp_path, monkeypatch, capsys, no_pipeline):
    d, scgpt = _big_bundle(tmp_path)
    (d / "ref.h5ad").write_text("x")
    monkeypatch.setattr(_memory, "available_bytes", lambda: int(4e9))
    code = cli.main(_run_argv(d, scgpt, tmp_path / "out", "--train-cells", "10000"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and not no_pipeline
    assert "4.0 GB is available" in err and "more memory" in err
    code = cli.main(_run_argv(d, scgpt, tmp_path / "out", "--skip-memory-check"))
    assert code == 0 and len(no_pipeline) == 1


def test_small_section_passes_the_check(tmp_path, monkeypatch, no_pipeline):
    d, scgpt = _big_bundle(tmp_path, n_cells=5000, nnz=1_000_000)
    (d / "ref.h5ad").write_text("x")
    monkeypatch.setattr(_memory, "available_bytes", lambda: int(8e9))
    assert cli.main(_run_argv(d, scgpt, tmp_path / "out")) == 0 and len(no_pipeline) == 1


# ------------------------------------------------------------------------------------------- contrastive
def test_contrastive_retrieval_is_scored_on_a_fixed_pool():
    """12,000 held-out cells: retrieval (quadratic in its cells) is scored among 10,000 of them by default;
    a smaller pool is the same on a re-run, and retrieval_cells=None scores every held-out cell."""
    kw = {"epochs": 1, "batch_size": 512, "test_size": 0.5, "dim": 8, "hidden": 16}
    mdata = _embedded(24_000)
    cs.tl.align_contrastive(mdata, **kw)
    ret = mdata.uns["X_cs_contrastive"]["retrieval"]
    assert (ret["n_cells"] == 10_000).all() and ret["chance"].iloc[0] == pytest.approx(1e-4)
    assert mdata.uns["X_cs_contrastive"]["n_cells"]["n_test"] == 12_000
    small = _embedded(3000)
    pool = cs.tl.align_contrastive(small, **kw, retrieval_cells=500).retrieval
    again = cs.tl.align_contrastive(small, **kw, retrieval_cells=500, key_added="again").retrieval
    assert (pool["n_cells"] == 500).all()
    pd.testing.assert_frame_equal(again, pool)
    every = cs.tl.align_contrastive(small, **kw, retrieval_cells=None, key_added="every").retrieval
    assert (every["n_cells"] == 1500).all()
    with pytest.raises(ValueError, match="retrieval_cells"):
        cs.tl.align_contrastive(small, **kw, retrieval_cells=1)


# ------------------------------------------------------------------------------------------- labels
def test_nucleus_labels_of_a_section_are_written_without_per_nucleus_loops():
    """60,000 cells and their H&E nuclei (missing classes among them): labels land on the matched cells,
    missing ones stay missing, the categories are the classes seen."""
    n = 60_000
    mdata = _embedded(n)
    for mod in mdata.mod.values():
        mod.obsm["nucleus_centroid"] = mod.obsm["spatial"]
    xy = mdata["rna"].obsm["spatial"]
    cls = np.array(["tumour", "immune", "stroma"], dtype=object)[np.arange(n) % 3]
    cls[::10] = None
    table = pd.DataFrame({"x": xy[:, 0] + 0.1, "y": xy[:, 1], "class": cls})
    table.loc[5, "class"] = np.nan
    cs.pp.transfer_nucleus_labels(mdata, table, space="um", sample="s1")
    got = mdata.obs["he_label"]
    assert list(got.cat.categories) == ["immune", "stroma", "tumour"]
    matched = mdata.obs["he_label_distance"].notna().to_numpy()
    assert matched.mean() > 0.9
    want = pd.Series(cls, index=mdata.obs_names).where(pd.notna(cls), None)
    want.iloc[5] = None
    agree = got[matched].astype(object).fillna("-") == want[matched].fillna("-")
    assert agree.mean() > 0.999  # random positions: a few cells closer than 0.1 um swap their nuclei
