"""The chunk engine (cellsymphony.pp._chunks): cache names kept from earlier versions, one chunk's
computation, and the executors' bookkeeping. The embeddings' resume and cluster tests are in
test_morphology_embed.py, test_expression_cache.py and test_distributed.py."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from morphology_helpers import HE_MPP, PIXEL_SIZE, tissue

from cellsymphony.pp import _chunks
from cellsymphony.pp._patch_source import PatchSource


def _morphology_v1(src, names, xy, params) -> str:
    """The folder fingerprint as written before the engine (cellsymphony 0.x ``_fingerprint``)."""
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(json.dumps([src.he_path, src.pixel_size, src.he_mpp, src.sample]).encode())
    st = os.stat(src.he_path)
    h.update(json.dumps([st.st_size, st.st_mtime_ns]).encode())
    h.update(src.geometry_bytes())
    h.update("\x00".join(map(str, names)).encode())
    h.update(np.ascontiguousarray(xy, dtype=np.float64).tobytes())
    return h.hexdigest()[:20]


def _expression_v1(record: dict, col2tok: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(record, sort_keys=True).encode())
    h.update(np.ascontiguousarray(col2tok, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def test_cache_names_of_earlier_versions_are_kept(tmp_path):
    """Caches written before the chunk engine are found again: same folder fingerprints, same file names
    (the expression record has held the draw definition since the vectorised tokeniser)."""
    from cellsymphony.datasets import tiny_scgpt_checkpoint
    from cellsymphony.models.encoders._scgpt_inputs import DRAWS
    from cellsymphony.models.encoders._weights import file_checksum
    from cellsymphony.pp._embed_expression import _cache_fingerprint
    from cellsymphony.pp._embed_morphology import _cache_name

    path, align, xy = tissue(str(tmp_path), n_cells=6)
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP, sample="s1")
    names = np.array([f"cell{i}" for i in range(len(xy))])
    params = {"model": "tiny", "weights_checksum": "random", "mode": "cell", "pool": "nucleus",
              "pool_radius_um": None, "layer": -1, "size": 64, "mpp": 1.0, "tile_stride": None,
              "batch_size": 4, "chunk_size": 3}  # fmt: skip
    assert _cache_name(src, names, xy, params) == _morphology_v1(src, names, xy, params)
    assert _cache_name(src, names[:-1], xy[:-1], params) != _cache_name(src, names, xy, params)

    ckpt = tiny_scgpt_checkpoint(tmp_path / "ckpt", ["A", "B", "C"], seed=0)
    col2tok = np.array([3, -1, 4, 5])
    record = {"weights": file_checksum(ckpt / "best_model.pt"), "args": file_checksum(ckpt / "args.json"),
              "vocab": file_checksum(ckpt / "vocab.json"), "max_length": 12, "seed": 0, "n_bins": 51,
              "draws": DRAWS}  # fmt: skip
    fp = _cache_fingerprint(ckpt, record["weights"], col2tok, max_length=12, seed=0)
    assert fp == _expression_v1(record, col2tok)
    assert _chunks.cache_folder(tmp_path / "c", "scgpt", fp).name == f"scgpt-{fp}"
    assert _chunks.chunk_file(tmp_path, 3).name == "chunk_000003.npy"
    assert _chunks.chunk_file(tmp_path, 3, "ab12").name == "chunk_000003_ab12.npy"
    with pytest.raises(ValueError, match="is a file"):
        _chunks.cache_folder(ckpt / "args.json", "x")


def _rows(k, dim=3, value=1.0):
    return np.full((k, dim), value, dtype=np.float32)


def test_compute_chunk_reads_back_a_finished_chunk_and_checks_shapes(tmp_path):
    file = str(tmp_path / "chunk_000000.npy")
    calls = []

    def fn(k):
        calls.append(k)
        return _rows(k)

    first = _chunks.compute_chunk(fn, (4,), {}, file, (4, 3))
    again = _chunks.compute_chunk(fn, (4,), {}, file, (4, 3))
    assert calls == [4] and np.array_equal(first, again) and again.dtype == np.float32
    # a file of another shape (another run's chunk) is recomputed and replaced
    assert _chunks.compute_chunk(fn, (5,), {}, file, (5, 3)).shape == (5, 3) and calls == [4, 5]
    with pytest.raises(RuntimeError, match=r"returned \(2, 3\), not \(4, 3\)"):
        _chunks.compute_chunk(lambda: _rows(2), (), {}, None, (4, 3))


class _Job:
    """A job whose stream computes each chunk as the mean of its row numbers (the output written by done())."""

    kind, desc, dim = "test", "test job", 2

    def __init__(self):
        self.streamed = []

    def stream(self, chunks, progress, done):
        for i, ch in enumerate(chunks):
            self.streamed.append(ch.index)
            progress.update(len(ch.rows))
            done(i, np.repeat(ch.rows[:, None].astype(np.float32), 2, axis=1))

    def task(self, chunk):  # pragma: no cover - the dask executor is tested in test_distributed.py
        raise AssertionError


def test_serial_executor_resumes_finished_chunks_and_saves_the_others(tmp_path, caplog):
    import logging

    plans = _chunks.row_chunks(10, 4)
    assert [r.tolist() for r in plans] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    chunks = [_chunks.Chunk(c, rows, file=_chunks.chunk_file(tmp_path, c)) for c, rows in enumerate(plans)]
    np.save(chunks[1].file, np.full((4, 2), 7.0, dtype=np.float32))  # a chunk finished by an earlier run
    out = np.full((10, 2), np.nan, dtype=np.float32)
    job = _Job()
    caplog.set_level(logging.INFO, logger="cellsymphony")
    assert _chunks.run_chunks(job, chunks, out) == 1
    assert job.streamed == [0, 2]
    assert "test job: resumed 1 finished chunk(s)" in caplog.text
    np.testing.assert_array_equal(out[4:8], 7.0)
    np.testing.assert_array_equal(out[[0, 1, 2, 3, 8, 9], 0], [0, 1, 2, 3, 8, 9])
    assert sorted(p.name for p in tmp_path.glob("chunk_*.npy")) == [f"chunk_00000{i}.npy" for i in range(3)]
    # everything is cached now: a second run computes nothing
    job2, out2 = _Job(), np.full((10, 2), np.nan, dtype=np.float32)
    assert _chunks.run_chunks(job2, chunks, out2) == 3 and job2.streamed == []
    np.testing.assert_array_equal(out2, out)
