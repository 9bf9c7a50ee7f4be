"""Import per-cell labels from an external table, joined by cell id."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import IMPORTED_LABEL_KEY, SAMPLE_KEY
from .._docs import inject_docs
from .._errors import read_table, require_file
from .._joint import push_joint_obs
from .._settings import logger
from .._utils import params_record
from .._validate import check_not_empty, is_mudata, renamed_parameters

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

_ID_COLUMN = "cell_id"


def _id_strings(values) -> pd.Index:
    """Cell ids as strings; integral floats (``1.0``, from a CSV column with gaps) become ``"1"``,
    bytes are decoded."""
    s = pd.Series(values)
    if pd.api.types.is_float_dtype(s) and np.all(np.isnan(s) | (s == np.round(s))):
        s = s.astype("Int64")
    out = [v.decode() if isinstance(v, bytes) else (None if pd.isna(v) else str(v)) for v in s]
    return pd.Index(out, dtype=object)


def _obs_column(data, name: str) -> pd.Series | None:
    for src in [data] + (list(data.mod.values()) if is_mudata(data) else []):
        if name in src.obs:
            return src.obs[name].reindex(data.obs_names)
    return None


@renamed_parameters(cell_id_col="id_key", label_col="label_key")
@inject_docs()
def import_labels(
    mdata: MuData | AnnData,
    table: pd.DataFrame | str | os.PathLike,
    *,
    id_key: str = _ID_COLUMN,
    label_key: str = "label",
    key_added: str = IMPORTED_LABEL_KEY,
    sample: str | None = None,
    allow_empty: bool = False,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Bring per-cell labels from another tool (a CSV or DataFrame keyed by cell id) into the data.

    Table ids are compared as strings with ``mdata.obs_names`` and, when present, with an
    ``obs["cell_id"]`` column (whichever matches more is used), so both Xenium ids (``aaabbbcc-1``)
    and integer ids (``1``, ``1.0``) join. Rows whose id is absent from the data are counted and
    left out; cells absent from the table get a missing label.

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    table
        DataFrame, or path to a CSV (``.tsv`` / ``.txt``: tab-separated) or Parquet file.
    id_key
        Column of ``table`` with the cell ids.
    label_key
        Column of ``table`` with the labels.
    key_added
        Column of ``mdata.obs`` to write.
    sample
        Only join cells of this section (``obs["sample"]``), for ids that repeat across sections.
    allow_empty
        When every matched cell's label is missing (an empty or all-missing label column), write the empty
        column with a warning instead of raising a ``ValueError``.
    copy
        {copy}

    Returns
    -------
    Returns None (or a copy with ``copy=True``) and writes ``mdata.obs[key_added]`` (categorical) and
    ``mdata.uns[key_added]``: ``"params"``, ``n_table_rows``, ``n_matched``, ``n_table_unmatched``
    (rows whose id is not a cell), ``n_cells_unlabelled`` and ``id_source`` (``"obs_names"`` or
    ``"obs['cell_id']"``).
    """
    source = "table"
    if isinstance(table, str | os.PathLike):
        path = require_file(table, "the label table", "Check the path of the table of cell ids and labels.")
        source = str(path)
        table = read_table(path, "the label table", "Pass a CSV (.tsv / .txt: tab-separated) or Parquet file of "
                           "cell ids and labels; check that the file is complete.")  # fmt: skip
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a DataFrame or a path to a CSV / Parquet file, got {type(table).__name__}.")
    missing = [c for c in (id_key, label_key) if c not in table.columns]
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {missing} (it has {list(table.columns)}); pass id_key= and label_key=."
        )

    data = mdata.copy() if copy else mdata
    obs_names = pd.Index(data.obs_names)
    scope = np.ones(len(obs_names), dtype=bool)
    if sample is not None:
        col = _obs_column(data, SAMPLE_KEY)
        if col is None or not (col.astype(str) == str(sample)).any():
            raise ValueError(f"No cell has obs[{SAMPLE_KEY!r}] == {sample!r}.")
        scope = (col.astype(str) == str(sample)).to_numpy()

    ids = _id_strings(table[id_key].to_numpy())
    # integral floats (cluster numbers in a CSV column with gaps) read as "3", not "3.0", as the ids are
    labels = np.asarray(_id_strings(table[label_key].to_numpy()), dtype=object)
    frame = pd.DataFrame({"id": ids, "label": labels}).dropna(subset=["id"])
    frame["label"] = [None if pd.isna(v) else str(v) for v in frame["label"]]
    dup = frame.drop_duplicates()
    conflicts = dup["id"][dup["id"].duplicated()].unique()
    if len(conflicts):
        raise ValueError(
            f"{len(conflicts)} cell id(s) appear in {source} with different labels, e.g. {list(conflicts[:5])}; "
            "resolve them first (or pass sample= when ids repeat across sections)."
        )
    frame = dup.set_index("id")["label"]

    candidates = {"obs_names": _id_strings(obs_names.to_numpy())}
    cid = _obs_column(data, _ID_COLUMN)
    if cid is not None:
        candidates[f"obs[{_ID_COLUMN!r}]"] = _id_strings(cid.to_numpy())
    best_name, best_ids, best_n = None, None, -1
    for name, cand in candidates.items():
        n = int(pd.Index(cand[scope]).isin(frame.index).sum())
        if n > best_n:
            best_name, best_ids, best_n = name, cand, n
    if best_n == 0:
        raise ValueError(
            f"No id of {source}[{id_key!r}] (e.g. {list(frame.index[:3])}) matches a cell "
            f"(obs_names e.g. {list(obs_names[:3])}); check id_key= and sample=."
        )
    scoped = pd.Index(best_ids[scope])
    if scoped.duplicated().any():
        raise ValueError(
            f"Cell ids in {best_name} repeat (e.g. {list(scoped[scoped.duplicated()][:3])}); pass sample= to join "
            "one section at a time."
        )

    n_labels = int(frame.reindex(scoped).notna().sum())
    check_not_empty(
        n_labels, what=f"import_labels: {key_added!r}", allow_empty=allow_empty,
        why=f"the {best_n} cells matched in {source} all have a missing {label_key!r} (check label_key=; the "
        f"table has columns {list(table.columns)}).",
    )  # fmt: skip
    values = pd.Series(None, index=obs_names, dtype=object)
    if key_added in data.obs and sample is not None:  # keep other sections' labels from earlier calls
        values[~scope] = data.obs[key_added].astype(object)[~scope]
    values[scope] = frame.reindex(scoped).to_numpy()
    matched = int(scoped.isin(frame.index).sum())
    n_unmatched_rows = int((~frame.index.isin(scoped)).sum())
    cats = sorted({v for v in values.dropna()})
    data.obs[key_added] = pd.Categorical(values.to_numpy(), categories=cats)
    push_joint_obs(data, [key_added])
    n_unlabelled = int(data.obs[key_added][scope].isna().sum())
    data.uns[key_added] = {
        "params": params_record(
            id_key=id_key, label_key=label_key, sample=sample,
            table=source if source != "table" else "DataFrame",
        ),
        "n_table_rows": int(len(frame)),
        "n_matched": matched,
        "n_table_unmatched": n_unmatched_rows,
        "n_cells_unlabelled": n_unlabelled,
        "id_source": best_name,
    }
    logger.info(
        "import_labels: %d of %d table ids matched cells (via %s); %d table rows match no cell, %d cells have no "
        "label. Added %s to obs and uns.",
        matched, len(frame), best_name, n_unmatched_rows, n_unlabelled, key_added,
    )
    if n_unmatched_rows > matched:
        logger.warning(
            "import_labels: most table ids (%d of %d) match no cell; check the id format and sample=.",
            n_unmatched_rows, len(frame),
        )
    return data if copy else None
