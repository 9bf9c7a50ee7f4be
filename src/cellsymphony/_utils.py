"""Small helpers shared across the package: atomic writes, the chunk files of the resumable caches,
per-cell seeds, parameter records."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def partial_tag() -> str:
    """``host-pid-random``: the part of a temporary file's or folder's name that tells whose it is, so that a
    later write can tell the leftovers of a killed process (:func:`remove_stale_partials`)."""
    import secrets
    import socket

    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process (or not ours to tell)
    return True


LEGACY_TMP_AGE_S = 3600.0  # temporary files of earlier versions (no owner in the name) older than this are stale


def remove_stale_partials(path: str | os.PathLike, marker: str = "", suffix: str = "") -> int:
    """Remove the temporary files or folders that earlier writes of ``path`` left when their process was killed,
    and return how many were removed.

    They are named ``.{name}.{marker}{host}-{pid}-{random}{suffix}`` (:func:`partial_tag`); one is stale when it
    was made on this host by a process that no longer runs. Those of other hosts (the workers of a cluster) are
    left alone. Temporary files of earlier cellsymphony versions (``.{name}.XXXXXXXX.tmp``, no owner recorded)
    are removed once they are an hour old.
    """
    import shutil
    import socket
    import time

    path = Path(path)
    head = f".{path.name}.{marker}"
    mine = f"{head}{socket.gethostname()}-"
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not name.startswith(head) or not name.endswith(suffix):
            continue
        middle = name[len(head) : len(name) - len(suffix)]
        if name.startswith(mine):
            pid = middle[len(mine) - len(head) :].split("-")[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
        elif not (marker == "" and suffix == ".tmp" and len(middle) == 8 and "-" not in middle and "." not in middle):
            continue
        else:
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < LEGACY_TMP_AGE_S:
                    continue
            except OSError:
                continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            continue
    if removed:
        from ._settings import logger

        logger.info("removed %d temporary file(s) of earlier interrupted writes of %s", removed, path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error remove it.

    A reader never sees a half-written file, and a failed write leaves any old file untouched. The temporary
    files that earlier writes of ``path`` left when killed (``.{name}.{host}-{pid}-*.tmp`` of a process that is
    gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path, suffix=".tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{partial_tag()}-", suffix=".tmp")
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


CHECKSUM_SUFFIX = ".sha256"  # the checksum file beside each chunk file: chunk_000000.npy.sha256


def array_checksum(values: np.ndarray) -> str:
    """``sha256:<hex>`` of an array's dtype, shape and bytes (C order)."""
    import hashlib

    values = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    h.update(values.tobytes())
    return "sha256:" + h.hexdigest()


def save_chunk(path: str | os.PathLike, values: np.ndarray) -> None:
    """Persist one finished chunk of a resumable cache atomically (a reader never sees a partial file), with
    its checksum in ``<path>.sha256``.

    The chunk files of ``cs.pp.embed_morphology`` and ``cs.pp.embed_expression`` (``cache_dir=``), written
    the same way by a single process and by the workers of a cluster. The checksum is written first, so a
    chunk file that exists always has its checksum beside it (a write killed in between leaves a checksum
    without a chunk: the chunk is computed again).
    """
    path = Path(path)
    values = np.asarray(values)
    with atomic_path(path.with_name(path.name + CHECKSUM_SUFFIX)) as tmp:
        tmp.write_text(array_checksum(values) + "\n", encoding="ascii")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)


def load_chunk(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray | None:
    """A chunk written by :func:`save_chunk`, or ``None`` when it is absent or bad (then the chunk is
    computed again and its file replaced). Bad: unreadable, not a float32 array of ``shape``, or not matching
    its checksum file (damaged or overwritten after it was written); each bad chunk is reported by a
    ``UserWarning`` naming the file. A chunk without a checksum file (written by an earlier version) is
    read as it is, so caches of earlier versions still resume."""
    import warnings

    path = Path(path)
    if not path.exists():
        return None
    problem = None
    arr = None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        problem = f"is unreadable ({type(err).__name__}: {err})"
    if problem is None and (arr.shape != tuple(shape) or arr.dtype != np.float32):
        problem = f"is a {arr.dtype} array of shape {arr.shape}, not float32 {tuple(shape)}"
    if problem is None:
        sums = path.with_name(path.name + CHECKSUM_SUFFIX)
        try:
            expected = sums.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            expected = None  # a chunk of an earlier version: no checksum to verify
        except (OSError, UnicodeDecodeError) as err:
            expected = f"<unreadable: {err}>"
        if expected is not None and array_checksum(arr) != expected:
            problem = f"does not match its checksum {sums.name} (changed or damaged after it was written)"
    if problem is None:
        return arr
    warnings.warn(f"cache chunk {path} {problem}: it is computed again and replaced.", UserWarning, stacklevel=2)
    return None


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def mix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser of a uint64 array (wrapping arithmetic): a bijection that spreads every
    input bit over the whole word. ``mix64(seed + (k + 1) * golden)`` is SplitMix64's k-th draw, so
    counter-based random numbers of many cells are computed at once."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping is the point (numpy warns on 0-d arrays only)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Uniform float64 draws in [0, 1): draw number ``positions[i]`` of the SplitMix64 stream seeded
    ``seeds[i]`` (53 random bits each). Vectorised over any number of cells and positions."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    positions = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = mix64(seeds + (positions + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """``(size, modification time ns)`` of a file, ``(-1, -1)`` when it cannot be read: part of a cache key
    where hashing a multi-GB file would be too slow (a file re-exported to the same path is new)."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def as_rows(X):
    """A matrix that can be read by blocks of rows: CSR, dense ndarray or an anndata backed dataset."""
    import scipy.sparse as sp

    if sp.issparse(X):
        return X if X.format == "csr" else sp.csr_matrix(X)  # CSC / COO: one sparse copy, never dense
    if isinstance(X, np.ndarray):
        return X
    if getattr(X, "format", None) == "csr":  # anndata backed CSR dataset
        return X
    return np.asarray(X)


def row_block(X, idx: np.ndarray):
    """Rows ``idx`` (sorted) of X as CSR (sorted indices) or dense."""
    import scipy.sparse as sp

    block = X[idx]
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        block.sort_indices()
    return block


def cell_seeds(seed: int, cell_ids) -> np.ndarray:
    """One 64-bit seed per cell, from the global seed and the cell id alone.

    A draw made from the cell's seed does not depend on batching, ordering or chunking of the cells.
    Computed for all cells at once: FNV-1a over the id's characters (a loop over character positions,
    not over cells), mixed with the global seed by SplitMix64.
    """
    ids = np.asarray(cell_ids).astype(str).ravel()
    n = len(ids)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    width = ids.dtype.itemsize // 4
    codes = ids.view(np.uint32).reshape(n, width).astype(np.uint64) if width else np.zeros((n, 0), np.uint64)
    lengths = np.strings.str_len(ids)
    h = np.full(n, _FNV_OFFSET ^ mix64(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            h = np.where(j < lengths, (h ^ codes[:, j]) * _FNV_PRIME, h)
    return mix64(h ^ lengths.astype(np.uint64))


def package_version() -> str:
    """The installed cellsymphony version."""
    from ._version import __version__

    return __version__


def uns_table(entry) -> pd.DataFrame:
    """The table of a getter's ``uns`` entry: getters (``cs.tl.cluster_enrichment``, ``cs.tl.spatial_coherence``,
    ``cs.tl.compare_classifiers``) store ``{"table": DataFrame, "params": {...}}``; a bare DataFrame (files
    written by earlier versions) is returned as it is."""
    import pandas as pd

    if isinstance(entry, pd.DataFrame):
        return entry
    if hasattr(entry, "get") and isinstance(entry.get("table"), pd.DataFrame):
        return entry["table"]
    raise ValueError(f"Not a getter's table record (a dict with a 'table' DataFrame): {type(entry).__name__}.")


def getter_record(table: pd.DataFrame, **params) -> dict:
    """The one storage shape of a getter's result in ``uns[key_added]``: ``{"table": table, "params": ...}``."""
    return {"table": table.copy(), "params": params_record(**params)}


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
