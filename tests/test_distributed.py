"""Scale-out on dask.distributed: equality with one process, several sections, a worker killed mid-run.

One LocalCluster (2 worker processes, 1 thread each) serves the whole module. The data: two small
synthetic sections joined with cs.io.concat, each with its own H&E and registration.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from distributed_helpers import KillAfterFirstChunk
from morphology_helpers import one_torch_thread

import cellsymphony as cs
from cellsymphony import _distributed as dist
from cellsymphony._utils import save_chunk
from cellsymphony.pp import _chunks
from cellsymphony.pp import _embed_expression as ee

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(900)

MORPH = dict(model="tiny", size=112, mpp=1.0, batch_size=16, chunk_size=24)  # ~6 chunks per section


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(autouse=True)
def _quiet():
    cs.settings.progress = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*untrained.*")
        warnings.filterwarnings("ignore", message=".*random weights.*")
        yield


@pytest.fixture(scope="module")
def client():
    import dask

    # generous timeouts: the machine running the tests may be busy (no timing is asserted anywhere)
    with dask.config.set({"distributed.comm.timeouts.connect": "120s", "distributed.comm.timeouts.tcp": "120s"}):
        cluster = distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR
        )
        c = distributed.Client(cluster, timeout="120s")
        try:
            yield c
        finally:
            c.close(timeout=60)
            cluster.close(timeout=60)


@pytest.fixture(scope="module")
def sections():
    """Two synthetic sections (their own H&E and registration each) and their concatenation."""
    a = cs.datasets.synthetic(n_cells=150, seed=1)
    b = cs.datasets.synthetic(n_cells=150, seed=2)
    both = cs.io.concat([a, b], keys=["s1", "s2"])
    return a, b, both


@pytest.fixture(scope="module")
def scgpt_dir(tmp_path_factory, sections):
    return cs.datasets.tiny_scgpt_checkpoint(tmp_path_factory.mktemp("scgpt"), list(sections[2]["rna"].var_names))


def _worker_facts(client):
    loads = {w: info["loads"] for w, info in client.run(dist.worker_cache_info).items()}
    threads = client.run(lambda: __import__("torch").get_num_threads())
    return loads, threads


def _assert_same(x, y, atol=1e-5):
    assert x.shape == y.shape and x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
    np.testing.assert_allclose(np.nan_to_num(x), np.nan_to_num(y), rtol=1e-5, atol=atol)


def test_morphology_cell_mode_equals_single_process_section_by_section(client, sections):
    a, b, both = sections
    one, dask = both.copy(), both.copy()
    cs.pp.embed_morphology(one, **MORPH)
    cs.pp.embed_morphology(dask, **MORPH, client=client)
    x, y = one["morphology"].obsm["X_tiny"], dask["morphology"].obsm["X_tiny"]
    _assert_same(x, y)
    assert np.isfinite(y).all(axis=1).sum() > 250
    np.testing.assert_array_equal(one["morphology"].obs["X_tiny_empty"], dask["morphology"].obs["X_tiny_empty"])
    np.testing.assert_array_equal(dask["morphology"].obs["X_tiny_empty"], ~np.isfinite(y).all(axis=1))
    assert dask.uns["cellsymphony"]["latest"]["morphology"] == "X_tiny"
    assert dask["morphology"].uns["X_tiny"]["params"]["mode"] == "cell"

    # several sections in one call: each through its own H&E and registration, as when run alone
    sample = dask["morphology"].obs["sample"].astype(str).to_numpy()
    for section, sid in ((a, "s1"), (b, "s2")):
        alone = section.copy()
        cs.pp.embed_morphology(alone, **MORPH)
        _assert_same(y[sample == sid], alone["morphology"].obsm["X_tiny"])

    loads, threads = _worker_facts(client)
    assert set(loads.values()) <= {0, 1} and max(loads.values()) == 1, loads  # the model loads once per worker
    assert set(threads.values()) == {1}, threads  # one torch thread per worker


def test_morphology_tile_mode_equals_single_process(client, sections):
    both = sections[2]
    kw = dict(MORPH, mode="tile", tile_stride=56, chunk_size=40)
    one, dask = both.copy(), both.copy()
    cs.pp.embed_morphology(one, **kw)
    cs.pp.embed_morphology(dask, **kw, client=client)
    _assert_same(one["morphology"].obsm["X_tiny"], dask["morphology"].obsm["X_tiny"])


def test_expression_equals_single_process(client, sections, scgpt_dir):
    both = sections[2]
    one, dask = both.copy(), both.copy()
    cs.pp.embed_expression(one, model_dir=scgpt_dir, batch_size=16)
    cs.pp.embed_expression(dask, model_dir=scgpt_dir, batch_size=16, client=client)
    x, y = one["rna"].obsm["X_scgpt"], dask["rna"].obsm["X_scgpt"]
    _assert_same(x, y)
    np.testing.assert_array_equal(one["rna"].obs["X_scgpt_empty"], dask["rna"].obs["X_scgpt_empty"])
    assert dask.uns["cellsymphony"]["latest"]["rna"] == "X_scgpt"
    loads, _ = _worker_facts(client)
    # one morphology encoder and one scGPT model at most per worker, whatever the number of chunks
    assert max(loads.values()) <= 2, loads


def _kill_run(client, folder: Path, fn):
    """Run ``fn()`` with the kill-once plugin; return the killed key and the chunk keys started."""
    folder.mkdir(parents=True, exist_ok=True)
    client.register_plugin(KillAfterFirstChunk(str(folder)))
    try:
        fn()
    finally:
        client.unregister_worker_plugin(KillAfterFirstChunk.name)
    client.wait_for_workers(2, timeout=180)
    assert (folder / "killed").exists(), "no worker was killed: the test did not test anything"
    killed = (folder / "killed").read_text()
    started = (folder / "started.log").read_text().split()
    return killed, started


def test_worker_killed_mid_run_morphology_retries_its_chunk(client, sections, tmp_path):
    both = sections[2]
    one, dask = both.copy(), both.copy()
    cs.pp.embed_morphology(one, **MORPH)
    cache = tmp_path / "cache"
    killed, started = _kill_run(
        client, tmp_path / "events", lambda: cs.pp.embed_morphology(dask, **MORPH, cache_dir=cache, client=client)
    )
    assert started.count(killed) >= 2  # the killed chunk ran again, on a live worker
    _assert_same(one["morphology"].obsm["X_tiny"], dask["morphology"].obsm["X_tiny"])
    # every chunk persisted; a single-process run resumes all of them (the cache is shared)
    files = sorted(cache.glob("*/chunk_*.npy"))
    n_chunks = len({k.rsplit("-", 1)[0] for k in started})
    assert len(files) == n_chunks
    logger = logging.getLogger("cellsymphony")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        again = both.copy()
        cs.pp.embed_morphology(again, **MORPH, cache_dir=cache)
    finally:
        logger.removeHandler(handler)
    assert any(f"resumed {n_chunks} finished chunk" in r.getMessage() for r in records)
    _assert_same(again["morphology"].obsm["X_tiny"], dask["morphology"].obsm["X_tiny"], atol=0)


def test_worker_killed_mid_run_expression_retries_its_chunk(client, sections, scgpt_dir, tmp_path):
    both = sections[2]
    one, dask = both.copy(), both.copy()
    cs.pp.embed_expression(one, model_dir=scgpt_dir, batch_size=16)
    killed, started = _kill_run(
        client, tmp_path / "events", lambda: cs.pp.embed_expression(dask, model_dir=scgpt_dir, batch_size=16, client=client)
    )
    assert started.count(killed) >= 2
    assert len({k.rsplit("-", 1)[0] for k in started}) >= 4  # several chunks, so the kill came mid-run
    x, y = one["rna"].obsm["X_scgpt"], dask["rna"].obsm["X_scgpt"]
    assert not np.isnan(y[~dask["rna"].obs["X_scgpt_empty"].to_numpy()]).any()  # complete
    _assert_same(x, y)


def test_single_process_cache_resumed_on_the_cluster(client, sections, tmp_path):
    section = sections[0]
    one, dask = section.copy(), section.copy()
    cs.pp.embed_morphology(one, **MORPH, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*/chunk_*.npy"))
    assert len(files) >= 3
    # poison one cached chunk: the cluster run must use the cache (and recompute only what is missing)
    marked = np.load(files[0])
    save_chunk(files[0], np.full_like(marked, 7.0))  # with its checksum: read back as finished
    files[1].unlink()
    cs.pp.embed_morphology(dask, **MORPH, cache_dir=tmp_path, client=client)
    y = dask["morphology"].obsm["X_tiny"]
    assert (y == 7.0).all(axis=1).sum() == len(marked)
    assert files[1].exists()
    rest = ~(y == 7.0).all(axis=1)
    _assert_same(y[rest], one["morphology"].obsm["X_tiny"][rest])


def _messages(fn) -> list[str]:
    """Run ``fn()``; return the messages it logged on the cellsymphony logger."""
    logger = logging.getLogger("cellsymphony")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return [r.getMessage() for r in records]


def test_expression_cache_shared_by_single_process_and_cluster(client, sections, scgpt_dir, tmp_path, monkeypatch):
    from cellsymphony.models.encoders._scgpt import ScGPTEncoder

    both = sections[2]
    kw = dict(model_dir=scgpt_dir, batch_size=16, chunk_size=50)  # 300 cells: 6 chunks of 50
    full = both.copy()
    cs.pp.embed_expression(full, **kw, cache_dir=tmp_path / "full")  # uninterrupted, one process
    # a single-process run interrupted in its 5th batch: only the first chunk (at most 4 batches) is saved
    cache = tmp_path / "cache"
    real, n = ScGPTEncoder.encode_cls, [0]

    def failing(model, *args, **kwargs):
        if n[0] == 4:
            raise RuntimeError("interrupted")
        n[0] += 1
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ScGPTEncoder, "encode_cls", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        cs.pp.embed_expression(both.copy(), **kw, cache_dir=cache)
    monkeypatch.undo()
    files = sorted(cache.rglob("chunk_*.npy"))
    assert [f.name[:12] for f in files] == ["chunk_000000"]
    # mark it: the cluster run must read it back, not compute it
    save_chunk(files[0], np.full_like(np.load(files[0]), 7.0))

    # the cluster finishes the run, losing a worker on the way: only the missing chunks run as tasks
    dask = both.copy()
    events = tmp_path / "events"
    msgs = []
    killed, started = _kill_run(
        client, events,
        lambda: msgs.extend(_messages(lambda: cs.pp.embed_expression(dask, **kw, cache_dir=cache, client=client))),
    )
    assert any("resumed 1 finished chunk(s)" in m for m in msgs), msgs
    assert sorted({k.rsplit("-", 1)[0] for k in started}) == [f"cs-chunk-expression-{c:06d}" for c in range(1, 6)]
    assert started.count(killed) >= 2  # the lost worker cost its chunk only
    y = dask["rna"].obsm["X_scgpt"]
    assert (y[:50] == 7.0).all()
    _assert_same(y[50:], full["rna"].obsm["X_scgpt"][50:])
    assert len(sorted(cache.rglob("chunk_*.npy"))) == 6
    assert dask["rna"].uns["X_scgpt"]["params"]["cache_dir"] == str(cache)

    # and a single process resumes the cluster's cache: every chunk is read back
    again = both.copy()
    msgs = _messages(lambda: cs.pp.embed_expression(again, **kw, cache_dir=cache))
    assert any("resumed 6 finished chunk(s)" in m for m in msgs), msgs
    _assert_same(again["rna"].obsm["X_scgpt"], y, atol=0)


def test_bad_client(sections, scgpt_dir):
    with pytest.raises(ValueError, match="dask.distributed.Client"):
        cs.pp.embed_morphology(sections[0].copy(), **MORPH, client="tcp://localhost:8786")
    with pytest.raises(ValueError, match="dask.distributed.Client"):
        cs.pp.embed_expression(sections[0].copy(), model_dir=scgpt_dir, client=object())


def test_hilbert_chunks_are_compact():
    g = np.stack(np.meshgrid(np.arange(64.0), np.arange(64.0)), -1).reshape(-1, 2)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(g))
    xy = g[perm]
    chunks = _chunks.compact_chunks(xy, [np.arange(len(xy))], 64)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(xy)))
    for rows in chunks:
        span = xy[rows].max(0) - xy[rows].min(0) + 1
        assert span.prod() <= 4 * 64, span  # a blob, not a strip across the section
    # per group (sample), and without coordinates in row order
    chunks = _chunks.compact_chunks(None, [np.arange(10), np.arange(10, 15)], 4)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def test_module_and_handcrafted_encoders_are_shipped_to_the_workers(client, sections):
    section = sections[0]
    enc = cs.models.load_morphology_encoder("tiny")  # an nn.Module: sent once, not loaded by name
    for kw in (dict(MORPH, model=enc, key_added="mod"), dict(model="handcrafted", chunk_size=48, key_added="hc")):
        one, dask = section.copy(), section.copy()
        cs.pp.embed_morphology(one, **kw)
        cs.pp.embed_morphology(dask, **kw, client=client)
        key = kw["key_added"]
        _assert_same(one["morphology"].obsm[key], dask["morphology"].obsm[key], atol=1e-4)
        assert np.isfinite(dask["morphology"].obsm[key]).all(axis=1).sum() > 100


def test_worker_scgpt_cache_reloads_a_replaced_checkpoint(tmp_path):
    """A worker keeps loaded models across tasks; a checkpoint rewritten in the same folder must be loaded
    again (else its chunks would be computed with, and cached under the checksum of, the wrong weights)."""
    import os
    import time

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = cs.datasets.tiny_scgpt_checkpoint(tmp_path / "m", ["A", "B", "C"], seed=0)
        first, _ = ee._worker_scgpt(str(folder), "cpu")
        assert ee._worker_scgpt(str(folder), "cpu")[0] is first  # kept while the files are unchanged
        before = os.stat(folder / "best_model.pt").st_mtime_ns
        cs.datasets.tiny_scgpt_checkpoint(tmp_path / "m", ["A", "B", "C"], seed=1)
        if os.stat(folder / "best_model.pt").st_mtime_ns == before:  # coarse file-system clock
            time.sleep(0.01)
            os.utime(folder / "best_model.pt")
        second, _ = ee._worker_scgpt(str(folder), "cpu")
    assert second is not first
    w1 = dict(first.named_parameters())
    w2 = dict(second.named_parameters())
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)


def test_worker_slide_handle_reopens_a_replaced_slide(tmp_path):
    """Workers keep one open slide per path (with its tile cache); an H&E re-exported to the same path must be
    opened again, not read from the old handle's tiles (the chunk cache keys on the file too)."""
    import os
    import shutil
    import time

    from morphology_helpers import PIXEL_SIZE, tissue, write_he

    from cellsymphony.pp._patch_source import PatchSource

    path, align, xy = tissue(str(tmp_path), n_cells=4)
    he = tmp_path / "he.ome.tif"
    shutil.copy(path, he)
    src = dist.worker_cache().source(PatchSource(str(he), align, PIXEL_SIZE))
    before = src.read(xy[:1], size=32, mpp=1.0)
    assert dist.worker_cache().source(PatchSource(str(he), align, PIXEL_SIZE)) is src  # kept while the file is unchanged
    stamp = os.stat(he).st_mtime_ns
    write_he(he, np.full((900, 1100, 3), 128, dtype=np.uint8))
    if os.stat(he).st_mtime_ns == stamp:  # coarse file-system clock
        time.sleep(0.01)
        os.utime(he)
    again = dist.worker_cache().source(PatchSource(str(he), align, PIXEL_SIZE))
    after = again.read(xy[:1], size=32, mpp=1.0)
    assert again is not src
    assert (after == 128).all() and not (before == 128).all()
    again.close()
