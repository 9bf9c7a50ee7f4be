"""The one look-up of cell coordinates (micrometres) used across the package.

Priority rule (documented on the data-layout page):

1. **Key first.** ``which="cell"`` reads ``obsm["spatial"]`` (the cell centroid) only.
   ``which="nucleus"`` reads ``obsm["nucleus_centroid"]`` and fills the cells that have none with their
   cell centroid ``obsm["spatial"]``: a nucleus centroid from any source beats a cell centroid.
2. **Then source.** For each key: the object itself (``mdata.obsm``), then, for a MuData, its
   modalities in the order ``morphology``, ``rna``, then the others as stored. A source fills only the
   cells still without a finite position, matched by obs name; so a cell keeps the first finite value
   found.
3. Cells found nowhere are NaN rows; no source holding any of the keys is a ``ValueError`` naming the
   keys and the readers that write them.

Where the five earlier look-ups differed: the classifier's spatial features filled from the modalities
in storage order (now ``morphology`` first; ``cs.io.read_xenium`` writes the same centroids to both, so
results do not change); spatial coherence used ``mdata.obsm["spatial"]`` as a whole when present (its
NaN rows are now filled from the modalities); the nucleus-label transfer took the first source that
held every cell (it now fills per cell, and a cell without a nucleus centroid falls back to its cell
centroid instead of being NaN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ._constants import MOD_MORPH, MOD_RNA, NUCLEUS_KEY, SPATIAL_KEY
from ._validate import is_mudata

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

KEYS = {"cell": (SPATIAL_KEY,), "nucleus": (NUCLEUS_KEY, SPATIAL_KEY)}


def _sources(data) -> list:
    out = [data]
    if is_mudata(data):
        order = [m for m in (MOD_MORPH, MOD_RNA) if m in data.mod] + [
            m for m in data.mod if m not in (MOD_MORPH, MOD_RNA)
        ]
        out += [data.mod[m] for m in order]
    return out


def _as_xy(value) -> np.ndarray | None:
    arr = value.to_numpy() if isinstance(value, pd.DataFrame) else value
    try:
        arr = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[1] < 2:
        return None
    return arr[:, :2]


def cell_coordinates(
    data: MuData | AnnData,
    which: Literal["cell", "nucleus"] = "cell",
    *,
    names: pd.Index | np.ndarray | None = None,
    return_keys: bool = False,
    purpose: str = "",
):
    """Cell positions ``(n, 2)`` float64 in micrometres, aligned to ``data.obs_names`` (or ``names``).

    ``which="cell"``: the cell centroid ``obsm["spatial"]``; ``which="nucleus"``: the nucleus centroid
    ``obsm["nucleus_centroid"]``, the cell centroid where a cell has none. Sources in order: ``data``
    itself, then the MuData's modalities (``morphology``, ``rna``, others); each fills only the cells
    still without a finite position. Cells found nowhere are NaN.

    With ``return_keys=True`` also returns, per cell, the ``obsm`` key its position came from (``""``
    for NaN rows). ``purpose`` prefixes the error message (the calling function's name).
    """
    if which not in KEYS:
        raise ValueError(f"which={which!r} must be one of {sorted(KEYS)}.")
    keys = KEYS[which]
    target = pd.Index(data.obs_names if names is None else names).astype(str)
    out = np.full((len(target), 2), np.nan, dtype=np.float64)
    origin = np.full(len(target), "", dtype=object)
    found = False
    for key in keys:
        for src in _sources(data):
            if key not in src.obsm or src.obsm[key] is None:
                continue
            xy = _as_xy(src.obsm[key])
            if xy is None:
                continue
            found = True
            todo = ~np.isfinite(out).all(axis=1)
            if not todo.any():
                break
            idx = pd.Index(src.obs_names).astype(str).get_indexer(target[todo])
            rows = np.flatnonzero(todo)[idx >= 0]
            vals = xy[idx[idx >= 0]]
            ok = np.isfinite(vals).all(axis=1)
            out[rows[ok]] = vals[ok]
            origin[rows[ok]] = key
    if not found:
        wanted = " or ".join(f"obsm[{k!r}]" for k in keys)
        prefix = f"{purpose}: " if purpose else ""
        raise ValueError(
            f"{prefix}no cell coordinates: {wanted} (micrometres) is missing on the data and on its modalities; "
            "read the data with cs.io.read_xenium (or cs.io.read_he_cells for H&E-only slides)."
        )
    return (out, origin) if return_keys else out
