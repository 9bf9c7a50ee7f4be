"""Classification metrics in the layout stored in ``uns`` (flat DataFrames, arrays, floats)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Per-class and summary metrics of integer predictions ``y_pred`` against ``y_true``.

    Returns a dict with ``per_class`` (DataFrame indexed by class: precision, recall, f1, support;
    0 where undefined), ``macro_f1`` and ``weighted_f1`` (over the classes with test support),
    ``accuracy``, ``n`` and ``confusion`` (``(n_classes, n_classes)`` int64, rows true, columns
    predicted). With no cells the summary values are NaN.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = [str(c) for c in classes]
    k = len(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = np.arange(k)
    if len(y_true):
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        conf = confusion_matrix(y_true, y_pred, labels=labels).astype(np.int64)
    else:
        p = r = f = np.zeros(k)
        s = np.zeros(k, dtype=np.int64)
        conf = np.zeros((k, k), dtype=np.int64)
    per_class = pd.DataFrame(
        {"precision": p.astype(float), "recall": r.astype(float), "f1": f.astype(float), "support": s.astype(np.int64)},
        index=pd.Index(classes, name="class"),
    )
    supported = s > 0
    return {
        "per_class": per_class,
        "macro_f1": float(f[supported].mean()) if supported.any() else float("nan"),
        "weighted_f1": float((f * s).sum() / s.sum()) if s.sum() else float("nan"),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "n": int(len(y_true)),
        "confusion": conf,
    }


def classification_table(
    model: str, y_true: np.ndarray, y_pred: np.ndarray, samples: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """The metrics of one classifier as a metric table (see :mod:`cellsymphony._results`): per section, and
    pooled as sample ``"all"`` when there are several sections; per class (precision, recall, f1, support)
    and over the classes (``class="all"``: macro_f1, weighted_f1, accuracy, support)."""
    from ..._results import ALL, metrics_frame

    samples = np.asarray(samples).astype(str)
    groups = [(s, samples == s) for s in sorted(set(samples))]
    if len(groups) != 1:  # several sections (or no test cell at all): the pooled figures too
        groups.append((ALL, np.ones(len(samples), dtype=bool)))
    rows = []
    for sample, sel in groups:
        m = classification_metrics(np.asarray(y_true)[sel], np.asarray(y_pred)[sel], classes)
        for cls, r in m["per_class"].iterrows():
            for metric in ("precision", "recall", "f1", "support"):
                rows.append({"model": model, "sample": sample, "class": cls, "metric": metric, "value": r[metric]})
        for metric, v in (("macro_f1", m["macro_f1"]), ("weighted_f1", m["weighted_f1"]),
                          ("accuracy", m["accuracy"]), ("support", m["n"])):  # fmt: skip
            rows.append({"model": model, "sample": sample, "class": ALL, "metric": metric, "value": v})
    return metrics_frame(rows)
