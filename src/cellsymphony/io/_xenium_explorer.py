"""``cs.io.write_xenium_explorer``: cell-groups CSVs (and the H&E alignment) for Xenium Explorer."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import REG_ALIGNMENT, REG_HE_PATH, REG_XENIUM_PATH, SAMPLE_KEY
from .._settings import logger
from .._validate import find_obs_column, sample_registry
from ._to_spatialdata import _original_ids, _pick_samples, atomic_dir

if TYPE_CHECKING:
    from mudata import MuData

UNASSIGNED = "unassigned"  # the group of cells without a value
UNASSIGNED_COLOR = "#808080"
HEADER = ("cell_id", "group", "color")


def write_xenium_explorer(
    mdata: MuData,
    columns: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    sample: str | Sequence[str] | None = None,
    bins: int | Sequence[float] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write Xenium Explorer cell-groups CSVs, one per sample and column, and the H&E alignment where needed.

    Each file ``out_dir/{sample}/{column}.csv`` has the header ``cell_id,group,color`` and one row per cell
    of the sample's Xenium folder, for Xenium Explorer's *Cell Groups* import: the original Xenium cell ids
    (also after :func:`~cellsymphony.io.concat` prefixed the obs names), the cell's category, and its colour as
    a hex code from the palette the ``cs.pl`` plots use. Cells without a value (and cells of the folder's
    ``cells.parquet`` that the MuData does not hold) are in the group ``unassigned``.

    When the H&E's registration did not come from the folder's own ``*_he_imagealignment.csv``
    (``he_alignment=`` or ``"auto"`` in :func:`~cellsymphony.io.read_xenium`, :meth:`Registration.apply`), the
    alignment is also written as ``out_dir/{sample}/{image}_he_imagealignment.csv`` (3 x 3, no header, H&E
    pixel -> Xenium morphology pixel), the file Xenium Explorer's image alignment import reads.

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place when complete.

    Parameters
    ----------
    mdata
        The MuData (or its results), with ``obs["sample"]``.
    columns
        Categorical per-cell columns (``"cs_pred"``, ``"cs_niche"``, ...), looked up in ``mdata.obs``, as
        ``mod:column`` and in each modality's ``obs``.
    out_dir
        The folder to write (must not exist unless ``overwrite``).
    sample
        Sample id(s) to write; ``None``: every sample.
    bins
        Bin numeric columns into groups: a number of equal-width bins or the bin edges. Without it a numeric
        column is refused.
    overwrite
        Replace an existing ``out_dir``.

    Returns
    -------
    The paths written.
    """
    from ..pl._common import palette_for

    cols = [columns] if isinstance(columns, str) else list(columns)
    if not cols:
        raise ValueError("columns is empty; name at least one categorical obs column, e.g. 'cs_pred'.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} exists; pass overwrite=True to replace it.")
    samples = _pick_samples(mdata, sample)
    groups: dict[str, pd.Categorical] = {}
    for col in cols:
        try:
            values = find_obs_column(mdata, col)
        except ValueError as err:
            raise ValueError(f"write_xenium_explorer: {err}") from None
        groups[col] = _as_groups(values, col, bins)
    colours = {c: palette_for(mdata, c, list(g.categories)) for c, g in groups.items()}
    for c in colours:
        colours[c][UNASSIGNED] = colours[c].get(UNASSIGNED, UNASSIGNED_COLOR)

    ids = _original_ids(mdata)
    obs_sample = mdata.obs[SAMPLE_KEY].astype(str).to_numpy()
    plan: list[tuple[str, pd.DataFrame | np.ndarray]] = []
    for s in samples:
        rows = np.flatnonzero(obs_sample == s)
        reg = sample_registry(mdata, s)
        folder_ids = _folder_ids(reg)
        cell_ids = ids[rows]
        extra = np.asarray([], dtype=str)
        if folder_ids is not None:
            extra = folder_ids[~pd.Index(folder_ids).isin(cell_ids)]
            unknown = ~pd.Index(cell_ids).isin(folder_ids)
            if unknown.any():
                raise ValueError(
                    f"Sample {s!r}: {int(unknown.sum())} cell ids (e.g. {list(cell_ids[unknown][:3])}) are not in "
                    f"{str(Path(reg[REG_XENIUM_PATH]) / 'cells.parquet')!r}; Xenium Explorer would not find them. "
                    "Check that obs['cell_id'] holds the original Xenium ids."
                )
        for col, g in groups.items():
            labels = np.asarray(g[rows].astype(object))
            labels = np.where(pd.isna(labels), UNASSIGNED, labels).astype(str)
            frame = pd.DataFrame({
                "cell_id": np.concatenate([cell_ids, extra]),
                "group": np.concatenate([labels, np.full(len(extra), UNASSIGNED)]),
            })  # fmt: skip
            frame["color"] = pd.Series(frame["group"]).map(colours[col]).to_numpy()
            plan.append((f"{s}/{_safe(col)}.csv", frame))
        alignment = _outside_alignment(reg, s)
        if alignment is not None:
            plan.append((f"{s}/{alignment[0]}", alignment[1]))

    written = []
    with atomic_dir(out_dir) as tmp:
        for rel, content in plan:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, pd.DataFrame):
                content.to_csv(target, index=False, header=list(HEADER))
            else:
                np.savetxt(target, content, delimiter=",", fmt="%.10g")
            written.append(out_dir / rel)
    logger.info("wrote %d Xenium Explorer files to %s", len(written), out_dir)
    return written


def _as_groups(values: pd.Series, col: str, bins) -> pd.Categorical:
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in values.cat.categories]
        return pd.Categorical(values.astype(object).map(lambda v: v if pd.isna(v) else str(v)), categories=cats)
    if pd.api.types.is_bool_dtype(values):
        return pd.Categorical(values.astype(str), categories=["False", "True"])
    if pd.api.types.is_numeric_dtype(values):
        if bins is None:
            raise ValueError(
                f"Column {col!r} is numeric ({values.dtype}), not categorical: Xenium Explorer cell groups are "
                "categories. Pass bins= (a number of bins or the bin edges) to group its values, or convert it "
                "with .astype('category')."
            )
        cut = pd.cut(values.astype(np.float64), bins=bins, include_lowest=True)
        return pd.Categorical(cut.astype(object).map(lambda v: v if pd.isna(v) else str(v)),
                              categories=[str(c) for c in cut.cat.categories])
    labels = values.astype(object).map(lambda v: v if pd.isna(v) else str(v))
    return pd.Categorical(labels, categories=sorted(set(labels.dropna())))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def _folder_ids(reg: dict) -> np.ndarray | None:
    """The cell ids of the sample's Xenium ``cells.parquet`` (None without a folder)."""
    import pyarrow.parquet as pq

    from ._xenium_files import to_cell_ids

    folder = str(reg.get(REG_XENIUM_PATH, "") or "")
    if not folder or not (Path(folder) / "cells.parquet").is_file():
        return None
    col = pq.read_table(Path(folder) / "cells.parquet", columns=["cell_id"]).column("cell_id")
    ids, _ = to_cell_ids(col.to_numpy(), str(Path(folder) / "cells.parquet"))
    return ids


def _outside_alignment(reg: dict, sample: str) -> tuple[str, np.ndarray] | None:
    """(file name, matrix) when the registry's alignment is not the one in the sample's Xenium folder."""
    from ._xenium_files import find_he_files, read_alignment

    he_path = str(reg.get(REG_HE_PATH, "") or "")
    alignment = np.asarray(reg.get(REG_ALIGNMENT, np.full((3, 3), np.nan)), dtype=np.float64)
    if not he_path or not np.isfinite(alignment).all():
        return None
    folder = str(reg.get(REG_XENIUM_PATH, "") or "")
    if folder and Path(folder).is_dir():
        img, csv = find_he_files(Path(folder))
        if img is not None and csv is not None and Path(img).resolve() == Path(he_path).resolve():
            try:
                if np.allclose(read_alignment(csv), alignment, rtol=1e-9, atol=1e-9):
                    return None
            except ValueError:
                pass
    if "nonrigid" in reg:
        warnings.warn(
            f"Sample {sample!r}: the registration has a non-rigid part that an alignment CSV cannot hold; Xenium "
            "Explorer will show the H&E with its affine part only.",
            UserWarning,
            stacklevel=3,
        )
    name = Path(he_path).name
    stem = name[: -len("he_image.ome.tif")] if name.endswith("he_image.ome.tif") else name.split(".")[0] + "_"
    return f"{stem}he_imagealignment.csv", alignment
