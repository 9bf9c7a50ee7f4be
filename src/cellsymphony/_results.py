"""The one schema of metric tables, and the record of which function wrote which keys.

**Metric tables.** Every producer of metrics (:func:`cellsymphony.tl.train_classifier`,
:func:`cellsymphony.tl.compare_classifiers`, :func:`cellsymphony.tl.align_contrastive`) stores one long
DataFrame in ``uns[key_added]["metrics_table"]`` with exactly the columns

``model``, ``sample``, ``class``, ``metric``, ``value``

one row per value. ``sample`` is a section name, or ``"all"`` for the cells of every section pooled;
``class`` is a class name, or ``"all"`` for a value over every class. Classifier metrics are ``precision``,
``recall``, ``f1`` and ``support`` per class, and ``macro_f1``, ``weighted_f1``, ``accuracy`` and
``support`` (test cells) for ``class == "all"``. ``cs.pl`` and the report read these tables and nothing
else (:func:`check_metrics_table`); the wide per-class P / R / F1 table is a view of it
(:func:`metrics_wide`, or ``table.pivot_table(index=["model", "sample"], columns=["class", "metric"],
values="value")``).

**Outputs record.** ``mdata.uns["cellsymphony"]["outputs"][key] = {"function": ..., "keys": [...]}`` says
which function wrote the ``uns`` entry ``key`` and every other key it wrote with it; the report finds its
records there (:func:`output_keys`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._constants import UNS_KEY

METRICS_TABLE = "metrics_table"  # the key of the long table inside a producer's uns entry
METRIC_COLUMNS = ("model", "sample", "class", "metric", "value")
ALL = "all"  # pooled sections (``sample``) / every class (``class``)
PER_CLASS_METRICS = ("precision", "recall", "f1", "support")
SUMMARY_METRICS = ("macro_f1", "weighted_f1", "accuracy", "support")
OUTPUTS_KEY = "outputs"
# short labels of the wide view: "<class> P" / "<class> R" / "<class> F1"
WIDE_LABELS = {"precision": "P", "recall": "R", "f1": "F1"}


def metrics_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """A metric table from rows of ``{model, sample, class, metric, value}`` (strings and floats)."""
    df = pd.DataFrame(list(rows), columns=list(METRIC_COLUMNS))
    for c in METRIC_COLUMNS[:-1]:
        df[c] = df[c].astype(str)
    df["value"] = df["value"].astype(np.float64)
    return df


def check_metrics_table(table: Any, where: str) -> pd.DataFrame:
    """``table`` if it is a metric table in the schema, else a ``ValueError`` saying what ``where`` holds."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(
            f"{where} is a {type(table).__name__}, not a metric table (a DataFrame with columns "
            f"{list(METRIC_COLUMNS)} as written by cs.tl.train_classifier / compare_classifiers / align_contrastive)."
        )
    cols = [str(c) for c in table.columns]
    if cols != list(METRIC_COLUMNS):
        raise ValueError(f"{where} has columns {cols}; a metric table has exactly {list(METRIC_COLUMNS)}.")
    if not pd.api.types.is_numeric_dtype(table["value"]):
        raise ValueError(f"{where}: the 'value' column is not numeric ({table['value'].dtype}).")
    out = table.copy()
    for c in METRIC_COLUMNS[:-1]:
        out[c] = out[c].astype(str)
    out.index = pd.RangeIndex(len(out))
    return out


def metrics_wide(table: pd.DataFrame, *, model_column: str = "architecture") -> pd.DataFrame:
    """The wide view of a metric table: one row per model x sample (index ``"<model> | <sample>"``),
    columns ``model_column``, ``sample``, ``n_test``, then ``"<class> P"``, ``"<class> R"``, ``"<class> F1"``
    for every class, then ``macro F1`` and ``weighted F1`` (the layout of the paper's Tables 1-2)."""
    long = check_metrics_table(table, "the metric table")
    models = list(dict.fromkeys(zip(long["model"], long["sample"], strict=True)))
    per = long[long["metric"].isin(list(WIDE_LABELS)) & (long["class"] != ALL)]
    classes = list(dict.fromkeys(per["class"]))
    value = {(m, s, c, k): v for m, s, c, k, v in long[["model", "sample", "class", "metric", "value"]].itertuples(index=False)}
    rows = []
    for m, s in models:
        row: dict[str, Any] = {model_column: m, "sample": s}
        n = value.get((m, s, ALL, "support"))
        row["n_test"] = int(n) if n is not None and np.isfinite(n) else 0
        for c in classes:
            for k, label in WIDE_LABELS.items():
                row[f"{c} {label}"] = value.get((m, s, c, k), np.nan)
        row["macro F1"] = value.get((m, s, ALL, "macro_f1"), np.nan)
        row["weighted F1"] = value.get((m, s, ALL, "weighted_f1"), np.nan)
        rows.append(row)
    wide = pd.DataFrame(rows)
    wide.index = pd.Index([f"{m} | {s}" for m, s in models], name="run")
    return wide


def metrics_from_wide(wide: pd.DataFrame, *, model_column: str = "architecture") -> pd.DataFrame:
    """The metric table back from a wide view written by :func:`metrics_wide` (the table
    ``compare_classifiers`` returns), checking its layout column by column; per-class support is not in
    the view and so not in the result."""
    cols = [str(c) for c in wide.columns]
    head, tail = [model_column, "sample", "n_test"], ["macro F1", "weighted F1"]
    middle = cols[3:-2]
    labels = list(WIDE_LABELS.values())
    classes = [c[: -len(" P")] for c in middle[0::3]]
    expected = head + [f"{c} {k}" for c in classes for k in labels] + tail
    if cols != expected:
        raise ValueError(
            f"The table is neither a metric table (columns {list(METRIC_COLUMNS)}) nor the wide view "
            f"compare_classifiers returns ({head} + '<class> P/R/F1' + {tail}); its columns are {cols[:8]}..."
        )
    rows = []
    for r in wide.itertuples(index=False):
        rec = dict(zip(cols, r, strict=True))
        m, smp = rec[model_column], rec["sample"]
        for c in classes:
            for metric, k in WIDE_LABELS.items():
                rows.append({"model": m, "sample": smp, "class": c, "metric": metric, "value": rec[f"{c} {k}"]})
        for metric, k in (("macro_f1", "macro F1"), ("weighted_f1", "weighted F1"), ("support", "n_test")):
            rows.append({"model": m, "sample": smp, "class": ALL, "metric": metric, "value": rec[k]})
    return metrics_frame(rows)


def metrics_of(data: Any, key: str, producer: str) -> pd.DataFrame:
    """The metric table of ``uns[key]`` (of the data or one of its modalities), checked against the schema."""
    entry = None
    if key in data.uns:
        entry = data.uns[key]
    else:
        for adata in getattr(data, "mod", {}).values():
            if key in adata.uns:
                entry = adata.uns[key]
                break
    if entry is None:
        raise ValueError(
            f"uns has no entry {key!r}: run {producer} first (with key_added={key!r}); "
            f"uns has {sorted(map(str, data.uns))}."
        )
    if not hasattr(entry, "get") or METRICS_TABLE not in entry:
        raise ValueError(
            f"uns[{key!r}] has no {METRICS_TABLE!r}: it was not written by {producer} (or by a version before "
            "the metric tables; run it again)."
        )
    return check_metrics_table(entry[METRICS_TABLE], f"uns[{key!r}][{METRICS_TABLE!r}]")


# ------------------------------------------------------------------------------------------ outputs record
def record_outputs(data: Any, key: str, function: str, written: Sequence[str]) -> None:
    """Record that ``function`` wrote the ``uns`` entry ``key`` together with the keys ``written``
    (``"obs['cs_pred']"``, ...), in ``uns["cellsymphony"]["outputs"][key]`` (replacing an earlier record)."""
    block = data.uns.setdefault(UNS_KEY, {})
    outputs = dict(block.get(OUTPUTS_KEY, {}))
    outputs[str(key)] = {"function": str(function), "keys": np.asarray([str(w) for w in written], dtype=str)}
    block[OUTPUTS_KEY] = outputs


def output_keys(data: Any, function: str | Sequence[str]) -> list[str]:
    """The ``uns`` keys written by ``function`` (one name or several) according to the outputs record,
    in the order they were recorded, keeping only those still present in ``uns``."""
    names = {function} if isinstance(function, str) else set(function)
    outputs = data.uns.get(UNS_KEY, {}).get(OUTPUTS_KEY, {})
    return [str(k) for k, rec in outputs.items() if str(rec.get("function")) in names and k in data.uns]


# ------------------------------------------------------------------------------------------ retrieval
RETRIEVAL_DIRECTIONS = ("rna_to_morphology", "morphology_to_rna", "chance")


def retrieval_table(model: str, retrieval: pd.DataFrame) -> pd.DataFrame:
    """The held-out retrieval of a contrastive aligner as a metric table: sample and class ``"all"``,
    metrics ``recall@<k>_rna_to_morphology``, ``recall@<k>_morphology_to_rna``, ``recall@<k>_chance`` and
    ``support`` (the held-out cells scored)."""
    rows = []
    for name, r in retrieval.iterrows():
        for d in RETRIEVAL_DIRECTIONS:
            rows.append({"model": model, "sample": ALL, "class": ALL, "metric": f"{name}_{d}", "value": r[d]})
    n = retrieval["n_cells"].iloc[0] if len(retrieval) else 0
    rows.append({"model": model, "sample": ALL, "class": ALL, "metric": "support", "value": n})
    return metrics_frame(rows)


def retrieval_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The wide retrieval view of :func:`retrieval_table`'s rows (of one model): index ``recall@<k>``,
    columns ``k``, ``rna_to_morphology``, ``morphology_to_rna``, ``chance``, ``n_cells``."""
    long = check_metrics_table(table, "the retrieval metric table")
    value = dict(zip(long["metric"], long["value"], strict=True))
    names = list(dict.fromkeys(m.split("_", 1)[0] for m in long["metric"] if m.startswith("recall@")))
    out = pd.DataFrame(
        {
            "k": [int(n.split("@")[1]) for n in names],
            **{d: [value[f"{n}_{d}"] for n in names] for d in RETRIEVAL_DIRECTIONS},
            "n_cells": [int(value.get("support", 0))] * len(names),
        },
        index=names,
    )
    return out


# ----------------------------------------------------------------------- classifier outputs in the MuData
def write_classifier(mdata, model, key_added: str, function: str = "tl.train_classifier") -> None:
    """Write a fitted classifier's outputs: predictions of every cell, the split and the training record."""
    import numpy as np
    import pandas as pd

    from .models.classifier._data import TEST, TRAIN, UNUSED

    proba = model.predict_proba(mdata).to_numpy()
    m = model.metrics
    table = model.metrics_table.copy()
    table["model"] = str(key_added)
    train_info = {
        "params": model.params,
        "history": {k: np.asarray(v, dtype=np.float64) for k, v in model.history.drop(columns="epoch").items()},
        "metrics": {
            "per_class": m["per_class"],
            "macro_f1": m["macro_f1"],
            "weighted_f1": m["weighted_f1"],
            "accuracy": m["accuracy"],
            "n_test": m["n"],
            "confusion": m["confusion"],
        },
        METRICS_TABLE: table,
        "exclusions": {k: int(v) for k, v in model.exclusions.items()},
    }
    split = pd.Categorical(model.split, categories=[TRAIN, TEST, UNUSED])
    write_predictions(mdata, model, key_added, proba, split=split, extra=train_info, function=function)


def write_predictions(
    mdata, model, key_added: str, proba, *, split=None, extra: dict | None = None,
    function: str = "CellTypeClassifier.predict",
) -> None:  # fmt: skip
    """Write ``obs[key_added]``, ``obsm[f"{key_added}_proba"]`` (and the split) and ``uns[key_added]``."""
    import numpy as np

    from ._joint import push_joint_obs
    from ._settings import logger

    mdata.obs[key_added] = model._labels(proba)
    mdata.obsm[f"{key_added}_proba"] = proba
    written = [f"obs[{key_added!r}]", f"obsm[{key_added + '_proba'!r}]"]
    if split is not None:
        mdata.obs[f"{key_added}_split"] = split
        written.append(f"obs[{key_added + '_split'!r}]")
    mdata.uns[key_added] = {"classes": np.asarray(model.classes, dtype=object), "model": model._model_record(), **(extra or {})}
    push_joint_obs(mdata, [key_added, f"{key_added}_split"])  # joint results also on every modality
    written.append(f"uns[{key_added!r}]")
    record_outputs(mdata, key_added, function, written)
    logger.info("added %s to the %s", ", ".join(written), type(mdata).__name__)
