"""Small helpers shared across the package: atomic writes, the chunk files of the resumable caches,
per-cell seeds, parameter records."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error remove it.

    A reader never sees a half-written file, and a failed write leaves any old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file private (0600); give it the permissions of an ordinary new file
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_chunk(path: str | os.PathLike, values: np.ndarray) -> None:
    """Persist one finished chunk of a resumable cache atomically (a reader never sees a partial file).

    The chunk files of ``cs.pp.embed_morphology`` and ``cs.pp.embed_expression`` (``cache_dir=``), written
    the same way by a single process and by the workers of a cluster.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)


def load_chunk(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray | None:
    """A chunk written by :func:`save_chunk`, or ``None`` when it is absent, unreadable or not a float32
    array of ``shape`` (then the chunk is computed again and its file replaced)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return arr if arr.shape == tuple(shape) and arr.dtype == np.float32 else None


def cell_seeds(seed: int, cell_ids) -> np.ndarray:
    """One 64-bit seed per cell, from the global seed and the cell id alone.

    A draw made from ``np.random.default_rng(cell_seeds(seed, ids)[i])`` does not depend on
    batching, ordering or chunking of the cells.
    """
    out = np.empty(len(cell_ids), dtype=np.uint64)
    prefix = str(int(seed)).encode() + b"\x00"
    for i, cid in enumerate(cell_ids):
        digest = hashlib.blake2b(prefix + str(cid).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def package_version() -> str:
    """The installed cellsymphony version."""
    from . import __version__

    return __version__


def params_record(**params) -> dict:
    """A ``params`` dict safe to store in ``uns`` (h5mu-serialisable): a ``None`` value is left out (it reads
    back as a missing key, never as the string ``"None"``), tuples and lists become arrays (of strings when an
    item is a string; a ``None`` item becomes ``""``), paths become strings, nested dicts are treated alike,
    and the package version is added."""
    out = {k: _uns_safe(v) for k, v in params.items() if v is not None}
    out["version"] = package_version()
    return out


def _uns_safe(v):
    if isinstance(v, os.PathLike):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _uns_safe(x) for k, x in v.items() if x is not None}
    if isinstance(v, tuple | list):
        if any(x is None or isinstance(x, str | os.PathLike) for x in v):
            return np.asarray(["" if x is None else str(_uns_safe(x)) for x in v])
        return np.asarray(v)
    return v
