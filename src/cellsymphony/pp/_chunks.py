"""The chunk engine of the embedding functions (``cs.pp.embed_morphology``, ``cs.pp.embed_expression``).

One engine for both embeddings and both execution paths. It owns:

- **plans**: cells cut into chunks (:class:`Chunk`): consecutive rows (:func:`row_chunks`, the
  expression cache), spatially compact runs along a Hilbert curve per sample (:func:`compact_chunks`,
  expression tasks without a cache); the morphology planner (``_morphology_runner.plan``) cuts its
  patch order into chunks of the same type;
- **cache naming**: the folder ``cache_dir/<name>-<fingerprint>`` (:func:`cache_folder`,
  :func:`fingerprint`) and the chunk files ``chunk_<index>[_<digest>].npy`` (:func:`chunk_file`);
- **computing one chunk** (:func:`compute_chunk`): read the chunk's file back if an earlier attempt
  finished it, else compute it and save it atomically;
- **executors**: :func:`run_chunks` reads back the finished chunks, then computes the others in this
  process (the job's ``stream``, one DataLoader over every pending chunk, each chunk saved as soon as
  its last batch is done) or on a ``dask.distributed`` cluster (one :func:`compute_chunk` task per chunk,
  a bounded number in flight, see :mod:`cellsymphony._distributed`).

A job (:class:`ChunkJob`) is what an embedding function gives the engine: the output width, how to
stream chunks in this process and which picklable function computes one chunk on a worker. Because
both paths compute the same chunks into the same files, a run started on a cluster can be finished in
one process and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._settings import logger, settings
from .._utils import file_stamp, load_chunk, save_chunk  # noqa: F401 - file_stamp: part of the engine's cache keys


# ------------------------------------------------------------------------------------------------ chunks
@dataclass
class Chunk:
    """A group of cells computed, cached and (on a cluster) shipped together.

    ``rows``: the cells' positions in the output array, in the order of the rows of the chunk's file;
    ``name``: its part of the task key (``cs-chunk-<kind>-<name>``); ``file``: its cache file, if any;
    ``work``: what the job needs to compute it (e.g. the morphology batches and patch source).
    """

    index: int
    rows: np.ndarray
    name: str = ""
    file: Path | None = None
    work: Any = field(default=None, repr=False)

    def __post_init__(self):
        if not self.name:
            self.name = f"{self.index:06d}"


class ChunkJob(Protocol):
    """What an embedding gives :func:`run_chunks`."""

    kind: str  # "morphology" / "expression": task keys are cs-chunk-<kind>-<chunk name>
    desc: str  # progress-bar and log label, e.g. "embed_morphology"
    dim: int  # output columns

    def stream(self, chunks: list[Chunk], progress, done: Callable[[int, np.ndarray | None], None]) -> None:
        """Compute ``chunks`` in this process (one loader over all of them); call ``done(i, values)`` as soon
        as ``chunks[i]`` is finished, with its ``(len(rows), dim)`` float32 rows, or ``None`` when the job
        wrote them into the output array itself; call ``progress.update(n_cells)`` as cells are done."""
        ...

    def task(self, chunk: Chunk) -> tuple[Callable, tuple, dict]:
        """``(fn, args, kwargs)``: a picklable function computing ``chunk``'s rows on a worker."""
        ...


# ------------------------------------------------------------------------------------------------ plans
def row_chunks(n: int, chunk_size: int) -> list[np.ndarray]:
    """Consecutive rows ``[k * chunk_size, (k + 1) * chunk_size)``: the chunks of the expression cache.

    They depend on the number of rows and ``chunk_size`` only (not on batch size, device or cluster),
    so a single process and the workers of a cluster compute and cache the very same chunks.
    """
    return [np.arange(s, min(s + chunk_size, n), dtype=np.int64) for s in range(0, n, int(chunk_size))]


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


# ------------------------------------------------------------------------------------------------ cache naming
def fingerprint(*parts: Any) -> str:
    """20 hex digits of the sha256 of ``parts`` in order: bytes as they are, anything else as JSON
    (``sort_keys=True``, ``default=str``). The cache folders' names; unchanged from the first releases,
    so caches written by earlier versions are found again."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def cache_folder(cache_dir: str | os.PathLike, *name: str) -> Path:
    """``cache_dir/<name parts joined by '-'>``, created; the last part is the run's fingerprint."""
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ValueError(f"cache_dir={str(cache_dir)!r} is a file; pass a folder (created if absent) or None.")
    folder = Path(cache_dir) / "-".join(str(p) for p in name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chunk_file(folder: Path, index: int, digest: str | None = None) -> Path:
    """``folder/chunk_<index:06d>.npy``, or ``chunk_<index:06d>_<digest>.npy`` when the chunk's contents
    are part of its name (the expression cache: a chunk whose cells or counts changed is not read back)."""
    return folder / (f"chunk_{index:06d}.npy" if digest is None else f"chunk_{index:06d}_{digest}.npy")


# ------------------------------------------------------------------------------------------------ one chunk
def compute_chunk(fn: Callable, args: tuple, kwargs: dict, file: str | None, shape: tuple[int, int]) -> np.ndarray:
    """The rows of one chunk: read back from ``file`` if an earlier attempt finished it, else ``fn(*args,
    **kwargs)`` saved atomically to ``file``. Runs as the task of a chunk on a cluster worker, so a lost
    worker costs only the chunk it was working on and a retried chunk recomputes only itself."""
    if file is not None:
        cached = load_chunk(file, shape)
        if cached is not None:
            return cached
    values = np.asarray(fn(*args, **kwargs), dtype=np.float32)
    if values.shape != tuple(shape):
        raise RuntimeError(f"A chunk's computation returned {values.shape}, not {tuple(shape)}.")
    if file is not None:
        save_chunk(file, values)
    return values


# ------------------------------------------------------------------------------------------------ executors
def resume(chunks: Sequence[Chunk], out: np.ndarray) -> list[Chunk]:
    """Copy every chunk whose file holds its finished rows into ``out``; return the chunks still to compute."""
    pending = []
    for ch in chunks:
        cached = None if ch.file is None else load_chunk(ch.file, (len(ch.rows), out.shape[1]))
        if cached is None:
            pending.append(ch)
        else:
            out[ch.rows] = cached
    return pending


def run_chunks(job: ChunkJob, chunks: Sequence[Chunk], out: np.ndarray, *, client=None) -> int:
    """Fill ``out[chunk.rows]`` for every chunk: finished chunks read back from their files, the others
    computed in this process (``client=None``) or as tasks on a dask cluster. Returns the number of
    chunks read back (also logged as ``"<desc>: resumed N finished chunk(s) from <folders>"``)."""
    pending = resume(chunks, out)
    n_resumed = len(chunks) - len(pending)
    if n_resumed:
        folders = sorted({str(ch.file.parent) for ch in chunks if ch.file is not None})
        logger.info("%s: resumed %d finished chunk(s) from %s", job.desc, n_resumed, ", ".join(folders))
    if client is None:
        _serial(job, pending, out)
    else:
        _dask(job, pending, out, client)
    return n_resumed


def _serial(job: ChunkJob, pending: list[Chunk], out: np.ndarray) -> None:
    from tqdm.auto import tqdm

    total = int(sum(len(ch.rows) for ch in pending))

    def done(i: int, values: np.ndarray | None) -> None:
        ch = pending[i]
        if values is not None:
            out[ch.rows] = values
        if ch.file is not None:
            save_chunk(ch.file, out[ch.rows])

    with tqdm(total=total, desc=job.desc, unit="cell", disable=not settings.progress or total == 0) as bar:
        job.stream(pending, bar, done)


class _Tasks:
    """The chunk tasks, each made (its rows sliced) only when it is submitted."""

    def __init__(self, job: ChunkJob, pending: list[Chunk], dim: int):
        self.job, self.pending, self.dim = job, pending, dim

    def __len__(self) -> int:
        return len(self.pending)

    def __bool__(self) -> bool:
        return bool(self.pending)

    def __iter__(self):
        for ch in self.pending:
            fn, args, kwargs = self.job.task(ch)
            file = None if ch.file is None else str(ch.file)
            shape = (len(ch.rows), self.dim)
            yield (f"cs-chunk-{self.job.kind}-{ch.name}", compute_chunk, (fn, args, kwargs, file, shape), {})


def _dask(job: ChunkJob, pending: list[Chunk], out: np.ndarray, client) -> None:
    from .._distributed import run_tasks

    def store(i, values):
        out[pending[i].rows] = values

    sizes = [len(ch.rows) for ch in pending]
    run_tasks(client, _Tasks(job, pending, out.shape[1]), store, progress_total=int(sum(sizes)),
              progress_sizes=sizes, desc=job.desc)  # fmt: skip
    logger.debug("%s: %d chunk(s) on the cluster", job.desc, len(pending))
