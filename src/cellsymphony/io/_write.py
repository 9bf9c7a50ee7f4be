"""``cs.io.write``: a MuData to ``.h5mu``, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .._settings import logger
from .._utils import atomic_path

if TYPE_CHECKING:
    from mudata import MuData


def write(
    mdata: MuData,
    path: str | os.PathLike,
    *,
    compression: Literal["gzip", "lzf"] | None = None,
    overwrite: bool = True,
) -> None:
    """Write a MuData to an ``.h5mu`` file atomically.

    The data are written to a temporary file beside ``path``, which is renamed onto ``path`` only when
    writing succeeded: a reader never sees a half-written file, and a failed write leaves an existing file
    untouched. Read it back with :func:`mudata.read_h5mu`.

    Parameters
    ----------
    mdata
        The MuData to write (e.g. from :func:`~cellsymphony.io.read_xenium`).
    path
        The ``.h5mu`` file to write.
    compression
        HDF5 compression of the arrays.
    overwrite
        Replace an existing file; with ``False`` an existing file raises an error.

    Returns
    -------
    None; writes ``path``.
    """
    import mudata as md

    if type(mdata).__name__ != "MuData":
        raise TypeError(
            f"cs.io.write writes a MuData, got {type(mdata).__name__}; use AnnData.write_h5ad for AnnData."
        )
    path = Path(path)
    if path.suffix != ".h5mu":
        raise ValueError(f"{str(path)!r}: the file name must end in .h5mu (a MuData file).")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; pass a file name ending in .h5mu.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it.")
    kwargs = {} if compression is None else {"compression": compression}
    with atomic_path(path) as tmp:
        try:
            md.write_h5mu(tmp, mdata, **kwargs)
        except Exception as err:
            raise ValueError(
                f"Writing {str(path)!r} failed ({type(err).__name__}: {err}); nothing was written. Values in .uns "
                "must be nested dicts of strings, numbers, arrays or flat DataFrames (no None, tuples or lists of "
                "dicts)."
            ) from err
    logger.info("wrote %d cells to %s", mdata.n_obs, path)
