"""The one error for files the package cannot use, and the one wrapper around every file read.

Every reader (Xenium folders, H&E and nucleus files, label tables, scGPT and encoder checkpoints, saved
model folders) reports a bad input file the same way::

    Cannot read <what> '<path>': <what is wrong>. <how to fix it>

as an :class:`InputFileError` (a ``ValueError``), or an :class:`InputFileNotFoundError` (also a
``FileNotFoundError``) when the path does not exist, with the library's original exception chained
(``raise ... from err``) so that ``--debug`` tracebacks still show it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class InputFileError(ValueError):
    """A file the package cannot use: the message names the file, the problem and the fix.

    Attributes ``path``, ``what``, ``problem`` and ``fix`` hold the parts of the message.
    """

    def __init__(self, path: str | os.PathLike, what: str, problem: str, fix: str = "") -> None:
        self.path, self.what = str(path), what
        self.problem, self.fix = problem.rstrip(". "), fix.strip()
        msg = f"Cannot read {what} {self.path!r}: {self.problem}."
        super().__init__(f"{msg} {self.fix}" if self.fix else msg)


class InputFileNotFoundError(InputFileError, FileNotFoundError):
    """An input path that does not exist (a ``FileNotFoundError``, also a ``ValueError``)."""


def _first_line(err: BaseException, path: str | os.PathLike) -> str:
    """What went wrong, in one line: a check of the package that names the file (``"<path>: ..."``) keeps its
    words; a library's error is quoted with its type."""
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) > 300:
        line = line[:300] + " ..."
    for prefix in (f"{str(path)!r}: ", f"{path}: "):
        if type(err) is ValueError and line.startswith(prefix):
            return line[len(prefix) :]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, fix: str = "", *, problem: str | None = None) -> Iterator[None]:
    """Wrap the reading of one file: any exception of the body becomes an :class:`InputFileError` naming
    ``path`` (``what`` says which file it is, e.g. ``"the cells table"``) with ``fix``, chaining the original.

    A missing file gives an :class:`InputFileNotFoundError`; an :class:`InputFileError` raised inside (a
    check that already names its file) passes through unchanged. ``problem`` replaces the library's own
    description (``"TypeName: first line of its message"``) of what is wrong.
    """
    try:
        yield
    except InputFileError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        p = Path(path)
        if not p.exists():
            raise InputFileNotFoundError(path, what, "it does not exist", "Check the path.") from err
        raise InputFileError(path, what, problem or _first_line(err, path), fix) from err
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - every library has its own error types for a bad file
        raise InputFileError(path, what, problem or _first_line(err, path), fix) from err


def require_file(path: str | os.PathLike, what: str, fix: str = "Check the path.") -> Path:
    """``path`` as a Path; an :class:`InputFileNotFoundError` when it does not exist, an :class:`InputFileError`
    when it is a folder."""
    p = Path(path)
    if not p.exists():
        raise InputFileNotFoundError(p, what, "it does not exist", fix)
    if p.is_dir():
        raise InputFileError(p, what, "it is a folder, not a file", "Pass the path of the file itself.")
    return p


def require_dir(path: str | os.PathLike, what: str, fix: str = "Check the path.") -> Path:
    """``path`` as a Path; an :class:`InputFileNotFoundError` when it does not exist, an :class:`InputFileError`
    when it is a file."""
    p = Path(path)
    if not p.exists():
        raise InputFileNotFoundError(p, what, "it does not exist", fix)
    if not p.is_dir():
        raise InputFileError(p, what, "it is a file, not a folder", "Pass the folder that holds it.")
    return p


def read_table(path: str | os.PathLike, what: str, fix: str = "", *, nrows: int | None = None):
    """A table file by its suffix (``.parquet``; ``.tsv`` / ``.tsv.gz`` / ``.txt`` tab-separated; else CSV) as a
    DataFrame, read inside :func:`reading`. ``nrows``: only the first rows (the header check of the CLI)."""
    import pandas as pd

    p = require_file(path, what)
    name = p.name.lower()
    with reading(p, what, fix):
        if name.endswith(".parquet"):
            if nrows is None:
                return pd.read_parquet(p)
            import pyarrow.parquet as pq

            return pq.ParquetFile(p).schema_arrow.empty_table().to_pandas()
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        return pd.read_csv(p, sep=sep, nrows=nrows)
