"""The resumable cache of cs.pp.embed_expression (cache_dir=): resume after an interruption, no stale reuse.

The cluster side (a LocalCluster resuming a single-process cache and the reverse) is in test_distributed.py.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp

import cellsymphony as cs
from cellsymphony._utils import save_chunk
from cellsymphony.models.encoders._scgpt import ScGPTEncoder

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*untrained:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*have no non-zero count:UserWarning"),
]

PANEL = [f"GENE{i}" for i in range(40)]
IN_VOCAB = PANEL[:36]
N = 120
_ENCODE_CLS = ScGPTEncoder.encode_cls
KW = dict(max_length=12, batch_size=8, chunk_size=30)  # 4 chunks of 30 cells, about 4 batches each


@pytest.fixture(autouse=True)
def _quiet():
    cs.settings.progress = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture
def ckpt(tmp_path):
    return cs.datasets.tiny_scgpt_checkpoint(tmp_path / "ckpt", IN_VOCAB, seed=3)


def _mudata(seed: int = 0) -> md.MuData:
    rng = np.random.default_rng(seed)
    X = rng.geometric(0.6, (N, len(PANEL))).astype(np.float32) - 1  # counts with many zeros and ties
    X[7] = 0  # an empty cell: NaN row, in the first chunk
    a = ad.AnnData(sp.csr_matrix(X))
    a.var_names = PANEL
    a.obs_names = [f"cell{i}" for i in range(N)]
    morph = ad.AnnData(np.zeros((N, 0), np.float32), obs=a.obs.copy())
    return md.MuData({"rna": a, "morphology": morph})


def _emb(m, key="X_scgpt"):
    return m["rna"].obsm[key]


def _close(x, y):
    np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
    np.testing.assert_allclose(np.nan_to_num(x), np.nan_to_num(y), atol=1e-5)


def _chunk_files(cache):
    return sorted(cache.rglob("chunk_*.npy"))


class _Calls:
    """Counts the model's forward passes (batches); raises after ``fail_after`` of them if given."""

    def __init__(self, monkeypatch, fail_after: int | None = None):
        self.n, self.fail_after = 0, fail_after

        def encode_cls(model, *args, **kwargs):
            if self.fail_after is not None and self.n >= self.fail_after:
                raise RuntimeError("interrupted")
            self.n += 1
            return _ENCODE_CLS(model, *args, **kwargs)

        monkeypatch.setattr(ScGPTEncoder, "encode_cls", encode_cls)


def test_resume_after_interrupt_equals_uninterrupted(ckpt, tmp_path, monkeypatch, caplog):
    m = _mudata()
    cs.pp.embed_expression(m, model_dir=ckpt, **KW, cache_dir=tmp_path / "full", key_added="full")
    cs.pp.embed_expression(m, model_dir=ckpt, max_length=12, batch_size=8, key_added="plain")
    assert len(_chunk_files(tmp_path / "full")) == 4

    # the run dies in its 7th batch: the first chunk (29 cells, 4 batches) is finished, the second is not
    cache = tmp_path / "cache"
    calls = _Calls(monkeypatch, fail_after=6)
    with pytest.raises(RuntimeError, match="interrupted"):
        cs.pp.embed_expression(m, model_dir=ckpt, **KW, cache_dir=cache, key_added="resumed")
    assert calls.n == 6
    assert "resumed" not in m["rna"].obsm  # nothing written by the failed run
    files = _chunk_files(cache)
    assert [f.name[:12] for f in files] == ["chunk_000000"] and not list(cache.rglob("*.tmp"))

    # started again: only the three other chunks are computed, and the result is that of the whole run
    calls = _Calls(monkeypatch)
    caplog.set_level(logging.INFO, logger="cellsymphony")
    cs.pp.embed_expression(m, model_dir=ckpt, **KW, cache_dir=cache, key_added="resumed")
    assert "resumed 1 finished chunk(s)" in caplog.text
    assert calls.n == 12  # 3 chunks x 4 batches of 8
    assert len(_chunk_files(cache)) == 4
    np.testing.assert_array_equal(_emb(m, "resumed"), _emb(m, "full"))
    assert np.isnan(_emb(m, "resumed")[7]).all() and np.isfinite(np.delete(_emb(m, "resumed"), 7, axis=0)).all()
    _close(_emb(m, "resumed"), _emb(m, "plain"))  # chunking changes only the float rounding of padding

    # chunks do not depend on the batch size: another batch size resumes every chunk
    calls = _Calls(monkeypatch)
    cs.pp.embed_expression(m, model_dir=ckpt, max_length=12, batch_size=16, chunk_size=30, cache_dir=cache, key_added="b16")
    assert calls.n == 0
    np.testing.assert_array_equal(_emb(m, "b16"), _emb(m, "full"))

    # cache_dir and chunk_size recorded; the record survives h5mu
    m.write(tmp_path / "out.h5mu")
    p = md.read_h5mu(tmp_path / "out.h5mu")["rna"].uns["resumed"]["params"]
    assert p["cache_dir"] == str(cache) and p["chunk_size"] == 30 and str(p["weights_checksum"]).startswith("sha256:")
    assert "cache_dir" not in md.read_h5mu(tmp_path / "out.h5mu")["rna"].uns["plain"]["params"]


def test_changed_inputs_never_reuse_the_cache(ckpt, tmp_path):
    m = _mudata()
    cache = tmp_path / "cache"
    kw = dict(max_length=12, batch_size=16, chunk_size=40, cache_dir=cache)
    cs.pp.embed_expression(m, model_dir=ckpt, **kw)
    files = _chunk_files(cache)
    assert len(files) == 3 and len({f.parent for f in files}) == 1
    # mark the cached chunks (with their checksums): a run that reads them back gives 7.0 rows
    for f in files:
        save_chunk(f, np.full_like(np.load(f), 7.0))
    cs.pp.embed_expression(m, model_dir=ckpt, **kw, key_added="again")
    assert (_emb(m, "again") == 7.0).all()

    def fresh(data, model_dir=ckpt, **changed):
        """The cached run with ``changed`` arguments reads no marked chunk and equals a run without cache."""
        args = {**kw, **changed}
        cs.pp.embed_expression(data, model_dir=model_dir, **args, key_added="cached")
        no_cache = {k: v for k, v in args.items() if k != "cache_dir"}
        cs.pp.embed_expression(data, model_dir=model_dir, **no_cache, key_added="ref")
        x = _emb(data, "cached")
        _close(x, _emb(data, "ref"))
        return x

    n_folders = 1
    for changed in ({"max_length": 8}, {"seed": 1}):
        assert not (fresh(m, **changed) == 7.0).all(axis=1).any()
        n_folders += 1
        assert len({f.parent for f in _chunk_files(cache)}) == n_folders
    # gene matching: one vocabulary gene renamed (gene_key=) so that it no longer matches
    m.mod["rna"].var["symbol"] = ["UNKNOWN" if g == "GENE3" else g for g in PANEL]
    assert not (fresh(m, gene_key="symbol") == 7.0).all(axis=1).any()
    # another checkpoint: new weights written into the same folder
    m2 = _mudata()
    first = {f: f.read_bytes() for f in ckpt.iterdir()}
    cs.datasets.tiny_scgpt_checkpoint(ckpt, IN_VOCAB, seed=4)
    assert not (fresh(m2) == 7.0).all(axis=1).any()
    for f, content in first.items():  # the first checkpoint back (new files, the same bytes): reused
        f.write_bytes(content)
    cs.pp.embed_expression(m2, model_dir=ckpt, **kw)
    assert (_emb(m2) == 7.0).all()

    # the counts of one cell changed: only its chunk is computed again
    m3 = _mudata()
    X = m3["rna"].X.tolil()
    X[50, 0] = 0 if X[50, 0] else 2  # a gene token removed or added
    m3.mod["rna"].X = X.tocsr()
    cs.pp.embed_expression(m3, model_dir=ckpt, **kw, key_added="cached")
    cs.pp.embed_expression(m3, model_dir=ckpt, max_length=12, batch_size=16, key_added="ref")
    x = _emb(m3, "cached")
    marked = (x == 7.0).all(axis=1)
    np.testing.assert_array_equal(marked, (np.arange(N) < 40) | (np.arange(N) >= 80))
    _close(x[40:80], _emb(m3, "ref")[40:80])
    assert np.abs(x[50] - _emb(m, "X_scgpt")[50]).max() > 1e-3  # that cell's embedding did change
    # other cells (a subset, in another order): no chunk has the same cells
    m4 = _mudata()[::-2].copy()
    assert not (fresh(m4) == 7.0).all(axis=1).any()


def test_cache_argument_errors(ckpt, tmp_path):
    m = _mudata()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        cs.pp.embed_expression(m, model_dir=ckpt, cache_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="chunk_size"):
        cs.pp.embed_expression(m, model_dir=ckpt, cache_dir=tmp_path / "c", chunk_size=0)
    assert not (tmp_path / "c").exists()
    # a damaged chunk file (wrong shape) is computed again and replaced
    cs.pp.embed_expression(m, model_dir=ckpt, **KW, cache_dir=tmp_path / "c", key_added="a")
    f = _chunk_files(tmp_path / "c")[1]
    np.save(f, np.zeros((3, 3), np.float32))
    with pytest.warns(UserWarning, match=r"is a float32 array of shape \(3, 3\), not float32 \(30, 32\)"):
        cs.pp.embed_expression(m, model_dir=ckpt, **KW, cache_dir=tmp_path / "c", key_added="b")
    np.testing.assert_array_equal(_emb(m, "a"), _emb(m, "b"))
    assert np.load(f).shape == (30, 32)


def test_batch_size_defaults_to_the_setting(ckpt, monkeypatch):
    """One settings default for both embeddings: embed_expression(batch_size=None) uses cs.settings.batch_size."""
    m = _mudata()
    old = cs.settings.batch_size
    cs.settings.batch_size = 16
    try:
        calls = _Calls(monkeypatch)
        cs.pp.embed_expression(m, model_dir=ckpt, max_length=12)
    finally:
        cs.settings.batch_size = old
    assert m["rna"].uns["X_scgpt"]["params"]["batch_size"] == 16
    n_cells = int((~m["rna"].obs["X_scgpt_empty"]).sum())
    assert calls.n == -(-n_cells // 16)  # ceil: batches of 16 cells
    with pytest.raises(ValueError, match="batch_size=0 is out of range"):
        cs.pp.embed_expression(m, model_dir=ckpt, batch_size=0)
