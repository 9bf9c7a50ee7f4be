"""Scale-out of the embedding functions on a ``dask.distributed`` cluster.

``cs.pp.embed_morphology(..., client=client)`` and ``cs.pp.embed_expression(..., client=client)`` hand
their work to the functions here. The client process splits the cells into spatially compact chunks,
per sample, and submits one task per chunk that carries only what the chunk needs: for morphology the
sample's H&E path and registration (a picklable :class:`~cellsymphony.pp._patch_source.PatchSource`)
and the chunk's nucleus coordinates; for expression the chunk's sparse rows, their cell ids and the
column -> token index. Never the MuData.

On a worker, each task:

- sets torch to one thread (``$CELLSYMPHONY_TORCH_THREADS`` on the worker overrides it), once per
  process;
- takes the model from a per-process cache keyed by model name / weights file / device (loaded on the
  first task, reused by every later task of that worker), and opens each slide once per thread;
- with a ``cache_dir``, returns the chunk's file if an earlier attempt already wrote it,
  else computes the chunk and writes it atomically, so a lost worker costs only the chunk it was
  working on and a retried chunk recomputes only itself.

The client keeps a bounded number of chunks in flight (so the scheduler never holds the whole
matrix), collects each finished chunk as soon as it completes and writes it into the output in cell
order. With a ``cache_dir`` the chunks are the ones of the single-process run (the same ``plan`` for
morphology, the same consecutive rows for expression), so the two share one resumable cache: a run
started on a cluster can be finished in one process and vice versa.

Per-chunk entry points are the single-process code's own: ``embed_cells`` (morphology) and
``embed_rows`` (expression); the tile grid of tile mode is global, and every random draw of the
expression tokenisation is seeded per cell, so chunked results equal single-process ones.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._settings import logger, settings
from ._utils import load_chunk, save_chunk

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

THREADS_ENV = "CELLSYMPHONY_TORCH_THREADS"

# ------------------------------------------------------------------------------------------------
# worker-side state (one copy per worker process)
_LOCK = threading.RLock()
_MODELS: dict[tuple, Any] = {}
_SOURCES: OrderedDict[tuple, Any] = OrderedDict()
_MAX_SOURCES = 16
_THREADS_SET = False
# how many models this process has loaded (read by the tests through client.run)
LOAD_COUNT = 0


def _relax_malloc_trim() -> bool:
    """Undo the cost of dask's ``MALLOC_TRIM_THRESHOLD_=65536`` for image work.

    The dask nanny starts workers with a small glibc trim threshold (to hand freed memory back to the
    OS). Setting it also freezes glibc's mmap threshold at 128 KiB, so every large temporary array
    (a patch, a blurred region) is a fresh ``mmap`` whose pages are faulted in and zeroed again: patch
    decoding ran about 5x slower in a worker than in a plain process. Raising both thresholds
    (64 MiB mmap, 128 MiB trim) restores the plain-process speed; memory above that is still returned.
    """
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 128 << 20)
        return bool(ok)
    except (OSError, AttributeError):  # not glibc
        return False


def worker_torch_threads() -> int:
    """Prepare this process once: torch intra-op threads (``$CELLSYMPHONY_TORCH_THREADS``, default 1)
    and glibc's allocation thresholds (see :func:`_relax_malloc_trim`)."""
    global _THREADS_SET
    import torch

    with _LOCK:
        if not _THREADS_SET:
            n = int(os.environ.get(THREADS_ENV, "1") or 1)
            torch.set_num_threads(max(1, n))
            _relax_malloc_trim()
            _THREADS_SET = True
    return torch.get_num_threads()


def load_count() -> int:
    """Models loaded by this process (for tests and diagnostics)."""
    return LOAD_COUNT


def _cached_model(key: tuple, load: Callable[[], Any]):
    global LOAD_COUNT
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load()
            LOAD_COUNT += 1
        return _MODELS[key]


def _quiet_load(fn: Callable[[], Any]):
    """Load a model on a worker without repeating the client's 'untrained weights' warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*untrained.*")
        warnings.filterwarnings("ignore", message=".*random weights.*")
        return fn()


def _worker_source(src):
    """One open :class:`PatchSource` per slide and thread (its tile cache lives across chunks)."""
    key = (
        threading.get_ident(), src.he_path, _file_stamp(src.he_path), src.geometry_bytes(),
        float(src.pixel_size), src.he_mpp, src.sample,
    )  # the file's size and mtime: a slide re-exported to the same path is opened again, not read from old tiles
    with _LOCK:
        if key in _SOURCES:
            _SOURCES.move_to_end(key)
            return _SOURCES[key]
        _SOURCES[key] = src
        while len(_SOURCES) > _MAX_SOURCES:
            _, old = _SOURCES.popitem(last=False)
            old.close()
        return src


# ------------------------------------------------------------------------------------------------
# client side: checks, chunking, the submit / gather loop
def check_client(client) -> None:
    """A clear error unless ``client`` is a ``dask.distributed.Client``."""
    try:
        from distributed import Client
    except ImportError as err:  # pragma: no cover - distributed is a dependency
        raise ImportError("client= needs dask.distributed: pip install 'distributed'.") from err
    if not isinstance(client, Client):
        raise ValueError(
            f"client must be a dask.distributed.Client (or None for a single process), got {type(client).__name__}."
        )
    if client.status not in ("running", "newly-created"):
        raise ValueError(f"The dask client is not running (status {client.status!r}); start it or pass client=None.")


def hilbert_order(xy: np.ndarray, bits: int = 16) -> np.ndarray:
    """Indices visiting the points along a Hilbert curve over their bounding box (non-finite last)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    finite = np.isfinite(xy).all(axis=1)
    if not finite.any():
        return np.arange(n, dtype=np.int64)
    lo = xy[finite].min(axis=0)
    span = max(float((xy[finite].max(axis=0) - lo).max()), 1e-12)
    side = 1 << bits
    q = np.where(finite[:, None], (xy - lo) / span * (side - 1), 0.0)
    x = np.clip(q[:, 0], 0, side - 1).astype(np.int64)
    y = np.clip(q[:, 1], 0, side - 1).astype(np.int64)
    d = np.zeros(n, dtype=np.int64)
    s = side // 2
    while s > 0:
        rx = ((x & s) > 0).astype(np.int64)
        ry = ((y & s) > 0).astype(np.int64)
        d += s * s * ((3 * rx) ^ ry)
        turn = ry == 0
        flip = turn & (rx == 1)
        x[flip] = side - 1 - x[flip]
        y[flip] = side - 1 - y[flip]
        x[turn], y[turn] = y[turn].copy(), x[turn].copy()
        s //= 2
    d[~finite] = np.iinfo(np.int64).max
    return np.argsort(d, kind="stable").astype(np.int64)


def compact_chunks(xy: np.ndarray | None, groups: Iterable[np.ndarray], chunk_size: int) -> list[np.ndarray]:
    """Chunks of at most ``chunk_size`` rows, per group (sample), consecutive along a Hilbert curve of
    ``xy`` (row order without coordinates); each chunk's rows sorted ascending."""
    chunks = []
    for rows in groups:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            continue
        order = rows if xy is None else rows[hilbert_order(xy[rows])]
        for start in range(0, len(order), chunk_size):
            chunks.append(np.sort(order[start : start + chunk_size]))
    return chunks


def _n_threads(client) -> int:
    try:
        return max(1, int(sum(client.nthreads().values())))
    except Exception:  # noqa: BLE001 - only a sizing hint
        return 1


def run_tasks(
    client,
    tasks: list[tuple[str, Callable, tuple, dict]],
    on_result: Callable[[int, Any], None],
    *,
    progress_total: int = 0,
    progress_sizes: list[int] | None = None,
    desc: str = "",
    max_in_flight: int | None = None,
) -> None:
    """Submit ``tasks`` (``(name, fn, args, kwargs)``) with a bounded window, call ``on_result(i, value)``
    for each as it finishes (any order), release it at once. A task's error cancels the rest and is raised
    here; a worker lost mid-task is dask's business: the scheduler runs the task again elsewhere."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    if not tasks:
        return
    window = max_in_flight or max(4, 2 * _n_threads(client))
    run_id = uuid.uuid4().hex[:10]
    it = iter(enumerate(tasks))
    index_of: dict[str, int] = {}

    def submit_next(ac=None):
        try:
            i, (name, fn, args, kwargs) = next(it)
        except StopIteration:
            return None
        fut = client.submit(fn, *args, key=f"{name}-{run_id}", pure=False, retries=0, **kwargs)
        index_of[fut.key] = i
        if ac is not None:
            ac.add(fut)
        return fut

    first = [f for f in (submit_next() for _ in range(window)) if f is not None]
    ac = as_completed(first, with_results=False)
    with tqdm(total=progress_total, desc=desc, unit="cell", disable=not settings.progress or progress_total == 0) as bar:
        try:
            for fut in ac:
                i = index_of.pop(fut.key)
                value = fut.result()  # raises the task's own exception
                fut.release()
                on_result(i, value)
                if progress_sizes is not None:
                    bar.update(progress_sizes[i])
                submit_next(ac)
        except BaseException:
            for f in list(ac.futures):
                f.cancel()
            raise


# ------------------------------------------------------------------------------------------------
# morphology
class RemoteEncoder:
    """What the client needs to know about an encoder that only the workers load."""

    def __init__(self, info: dict, ref: tuple):
        self.__dict__.update(info)
        self.ref = ref

    def forward_tokens(self, *args, **kwargs):  # marks a token model (embed_morphology checks for it)
        raise RuntimeError("This encoder lives on the dask workers.")

    def __repr__(self) -> str:
        return f"RemoteEncoder({self.name!r}, embed_dim={self.embed_dim}, weights={self.weights_checksum[:19]})"


def _encoder_facts(enc) -> dict:
    return {
        "name": enc.name, "embed_dim": int(enc.embed_dim), "patch_size": enc.patch_size, "n_layers": int(enc.n_layers),
        "key": enc.key, "weights_checksum": enc.weights_checksum, "weights_path": str(enc.weights_path or ""),
        "untrained": bool(getattr(enc, "untrained", False)),
    }


def _named_encoder(model: str, weights, device: str | None):
    """The worker's cached encoder for a registry / timm name (loaded once per process and device)."""
    from ._settings import resolve_device
    from .models.encoders._morphology import load_morphology_encoder

    dev = resolve_device(device)
    w = None if weights is None else str(weights)
    return _cached_model(
        ("morphology", model, w, dev), lambda: _quiet_load(lambda: load_morphology_encoder(model, weights=w, device=dev))
    )


def morphology_encoder_info(model: str, weights, device: str | None) -> dict:
    """Task: load (and keep) the encoder on a worker; return its facts for the client's checks."""
    worker_torch_threads()
    return _encoder_facts(_named_encoder(model, weights, device))


def remote_morphology_encoder(client, model, weights, device: str | None, mpp: float, build_local: Callable):
    """The encoder as the client sees it: a deep model named by a string is loaded by the workers only
    (one task loads it and reports its dimensions, checksum and key); an ``nn.Module`` or the
    handcrafted encoder is built here on the CPU and shipped to the workers."""
    check_client(client)
    if isinstance(model, str) and model.lower() != "handcrafted":
        key = f"cs-morphology-encoder-{uuid.uuid4().hex[:10]}"
        fut = client.submit(morphology_encoder_info, model, weights, device, key=key, pure=False)
        info = fut.result()
        fut.release()
        # every worker loads the very file the first one resolved (not its own environment's)
        ref = ("named", model, info["weights_path"] or weights, info["weights_checksum"])
        return RemoteEncoder(info, ref)
    return build_local(model, weights, "cpu", mpp)


def _morphology_chunk(enc_ref, src, xy_um, cache_file: str | None, *, params: dict, device: str | None):
    """Task: embeddings (k, D) float32 of one chunk of cells (all inside the image)."""
    from .pp._morphology_runner import embed_cells

    xy_um = np.asarray(xy_um, dtype=np.float64)
    if isinstance(enc_ref, tuple):
        _, model, weights, checksum = enc_ref
        encoder = _named_encoder(model, weights, device)
        if encoder.weights_checksum != checksum:
            raise ValueError(
                f"Worker {os.uname().nodename} loaded {model!r} weights {encoder.weights_checksum[:19]}, "
                f"not the {checksum[:19]} of the first worker: give every worker the same weights (weights=path)."
            )
    else:
        encoder = enc_ref
    dim = int(encoder.embed_dim)
    if cache_file is not None:
        cached = load_chunk(Path(cache_file), (len(xy_um), dim))
        if cached is not None:  # a retried chunk whose first attempt had finished
            return cached
    worker_torch_threads()
    from ._settings import resolve_device

    dev = resolve_device(device)
    if hasattr(encoder, "to") and not isinstance(enc_ref, tuple):
        with _LOCK:
            encoder.to(dev)
    feats = embed_cells(encoder, _worker_source(src), xy_um, num_workers=0, device=dev, **params)
    if cache_file is not None:
        save_chunk(Path(cache_file), feats)
    return feats


def morphology_on_cluster(
    client,
    encoder,
    groups: list,
    xy: np.ndarray,
    names: np.ndarray,
    out: np.ndarray,
    in_image: np.ndarray,
    *,
    key: str,
    run_params: dict,
    cache_dir,
    device: str | None,
) -> int:
    """Fill ``out`` / ``in_image`` for every sample group ``(PatchSource, positions)`` with chunk tasks on
    the cluster; return the number of chunks resumed from ``cache_dir``."""
    from .pp._embed_morphology import _fingerprint
    from .pp._morphology_runner import plan

    dim = int(encoder.embed_dim)
    p = run_params
    task_params = dict(
        mode=p["mode"], pool=p["pool"], pool_radius_um=p["pool_radius_um"], layer=p["layer"], size=p["size"],
        mpp=p["mpp"], tile_stride=p["tile_stride"], batch_size=p["batch_size"],
    )
    if isinstance(encoder, RemoteEncoder):
        enc_arg = encoder.ref
    else:  # a user's module or the handcrafted encoder: one copy per worker, recomputable if a worker dies
        enc_arg = client.submit(_identity, encoder, key=f"cs-morphology-module-{uuid.uuid4().hex[:10]}", pure=False)
    tasks, targets, sizes = [], [], []
    n_resumed = 0
    for src, pos in groups:
        inside = src.in_image(xy[pos])
        in_image[pos] = inside
        valid = pos[inside]
        chunks = plan(
            xy[valid], mode=p["mode"], size=p["size"], mpp=p["mpp"], batch_size=p["batch_size"],
            chunk_size=p["chunk_size"], tile_stride=p["tile_stride"],
        )
        folder = None
        if cache_dir is not None:
            fp = _fingerprint(src, names[valid], xy[valid], run_params)
            folder = Path(cache_dir) / f"{key}-{src.sample or 'sample'}-{fp}"
            folder.mkdir(parents=True, exist_ok=True)
        src.close()  # the client does not read the slide; workers open their own handles
        for ch in chunks:
            rows = valid[ch.rows]
            cache_file = None
            if folder is not None:
                cache_file = folder / f"chunk_{ch.index:06d}.npy"
                cached = load_chunk(cache_file, (len(rows), dim))
                if cached is not None:
                    out[rows] = cached
                    n_resumed += 1
                    continue
            name = f"cs-chunk-morphology-{src.sample or 'sample'}-{ch.index:06d}"
            args = (enc_arg, src, xy[rows], None if cache_file is None else str(cache_file))
            tasks.append((name, _morphology_chunk, args, {"params": task_params, "device": device}))
            targets.append(rows)
            sizes.append(len(rows))

    def store(i, feats):
        out[targets[i]] = feats

    try:
        run_tasks(client, tasks, store, progress_total=int(sum(sizes)), progress_sizes=sizes, desc="embed_morphology")
    finally:
        if not isinstance(enc_arg, tuple):
            enc_arg.release()
    logger.debug("embed_morphology: %d chunk(s) on the cluster, %d resumed", len(tasks), n_resumed)
    return n_resumed


def _identity(x):
    return x


# ------------------------------------------------------------------------------------------------
# expression
def _scgpt_model(model_dir: str, device: str | None):
    from ._settings import resolve_device
    from .models.encoders._scgpt import load_scgpt

    dev = resolve_device(device)
    path = os.path.realpath(model_dir)
    # the files' size and modification time are part of the key: a checkpoint replaced in the same folder
    # while the cluster stays up is loaded again, never served (and cached under its new checksum) stale
    stamp = tuple(_file_stamp(os.path.join(path, f)) for f in ("args.json", "vocab.json", "best_model.pt"))
    key = ("scgpt", path, stamp, dev)
    return _cached_model(key, lambda: _quiet_load(lambda: load_scgpt(path, device=dev))), dev


def _file_stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:  # load_scgpt names the missing file
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _expression_chunk(
    model_dir: str, block, cell_ids, col2tok, *, max_length: int, batch_size: int, seed: int, device,
    cache_file: str | None = None,
):
    """Task: scGPT embeddings (k, d) float32 of one block of rows (CSR or dense); with ``cache_file``,
    read back if an earlier attempt finished it, else computed and saved there."""
    from .models.encoders._scgpt_inputs import embed_rows

    worker_torch_threads()
    model, dev = _scgpt_model(model_dir, device)
    if cache_file is not None:
        cached = load_chunk(cache_file, (len(cell_ids), int(model.d_model)))
        if cached is not None:  # a retried chunk whose first attempt had finished
            return cached
    emb = embed_rows(
        model, block, cell_ids, col2tok, max_length=max_length, batch_size=batch_size, seed=seed, device=dev,
        bucketed=True, num_workers=0, progress=False,
    )
    if cache_file is not None:
        save_chunk(cache_file, emb)
    return emb


def expression_chunk_inputs(adata) -> dict:
    """Coordinates (nucleus centroid, else cell centroid; ``None`` without either) and sample labels of
    the cells, for spatially compact chunks per sample."""
    from ._constants import NUCLEUS_KEY, SAMPLE_KEY, SPATIAL_KEY

    xy = None
    for k in (SPATIAL_KEY, NUCLEUS_KEY):  # the nucleus centroid wins, the cell centroid fills its gaps
        if k in adata.obsm:
            arr = np.asarray(adata.obsm[k], dtype=np.float64)[:, :2]
            xy = arr if xy is None else np.where(np.isfinite(arr), arr, xy)
    samples = adata.obs[SAMPLE_KEY].astype(str).to_numpy() if SAMPLE_KEY in adata.obs else None
    return {"xy": xy, "samples": samples}


def expression_on_cluster(
    client,
    X,
    cell_ids: np.ndarray,
    col2tok: np.ndarray,
    lengths: np.ndarray,
    *,
    model_dir,
    d_model: int,
    xy: np.ndarray | None,
    samples: np.ndarray | None,
    max_length: int,
    batch_size: int,
    seed: int,
    device: str | None,
    chunk_size: int | None = None,
    cached_chunks: list[tuple[int, np.ndarray, str]] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """scGPT embeddings of every row of ``X`` computed by chunk tasks on the cluster (NaN rows for cells
    without any non-zero vocabulary gene), in row order.

    Without a cache, chunks are spatially compact groups of non-empty cells, per sample; ``chunk_size``
    (cells per task) defaults to about four chunks per worker thread, between 64 and 4096 cells: enough
    tasks to balance the load and to lose little when a worker dies, few enough that the per-task
    overhead (milliseconds) does not matter. ``cached_chunks``: the chunks of the resumable cache still
    to compute, as ``(index, rows, file)``; only these rows are computed (into ``out``), each task saves
    its chunk to its file (or reads it back when a first attempt had finished it)."""
    from .models.encoders._scgpt_inputs import _as_rows, _row_block

    check_client(client)
    X = _as_rows(X)
    n = X.shape[0]
    if out is None:
        out = np.full((n, int(d_model)), np.nan, dtype=np.float32)
    lengths = np.asarray(lengths)
    if cached_chunks is not None:
        plan = []
        for c, rows, file in cached_chunks:
            if (lengths[rows] > 0).any():
                plan.append((c, rows, file))
            else:  # no cell to embed: its (all-NaN) chunk is written here, no task needed
                save_chunk(file, out[rows])
    else:
        nonempty = np.flatnonzero(lengths > 0)
        if samples is None:
            groups = [nonempty]
        else:
            labels = np.asarray(samples)[nonempty]
            groups = [nonempty[labels == s] for s in dict.fromkeys(labels.tolist())]
        if chunk_size is None:
            chunk_size = int(np.clip(np.ceil(len(nonempty) / (4 * _n_threads(client))), 64, 4096))
        plan = [(c, rows, None) for c, rows in enumerate(compact_chunks(xy, groups, int(chunk_size)))]
    chunks = [rows for _, rows, _ in plan]
    ids = np.asarray(cell_ids)
    col2tok = np.asarray(col2tok, dtype=np.int64)
    kw = {"max_length": int(max_length), "batch_size": int(batch_size), "seed": int(seed), "device": device}

    def tasks():
        for c, rows, file in plan:
            # rows read one chunk at a time, only for the chunks in flight
            args = (str(model_dir), _row_block(X, rows), ids[rows], col2tok)
            yield (f"cs-chunk-expression-{c:06d}", _expression_chunk, args, {**kw, "cache_file": file})

    def store(i, emb):
        out[chunks[i]] = emb

    run_tasks(
        client, _LazyList(tasks(), len(chunks)), store, progress_total=int(sum(map(len, chunks))),
        progress_sizes=[len(c) for c in chunks], desc="scGPT",
    )
    return out


class _LazyList:
    """A sized iterable whose items are made when iterated (rows are sliced only when submitted)."""

    def __init__(self, gen, n: int):
        self._gen, self._n = gen, n

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        return self._gen

    def __bool__(self) -> bool:
        return self._n > 0
