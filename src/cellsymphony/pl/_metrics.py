"""Per-class precision / recall / F1 of one or several classifiers as an annotated heatmap-table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._docs import inject_docs, save_doc
from .._results import METRIC_COLUMNS, WIDE_LABELS, check_metrics_table, metrics_from_wide, metrics_of
from ._common import finish, new_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from mudata import MuData

PRODUCERS = "cs.tl.train_classifier or cs.tl.compare_classifiers"


def metrics_table(mdata: Any, key: str | Sequence[str] | pd.DataFrame) -> pd.DataFrame:
    """The metric table(s) :func:`metrics` draws (columns model, sample, class, metric, value): of the
    ``uns`` records ``key`` (their ``"metrics_table"``), or the table given (a metric table, or the wide
    table returned by :func:`cellsymphony.tl.compare_classifiers`, read back column by column)."""
    if isinstance(key, pd.DataFrame):
        if [str(c) for c in key.columns] == list(METRIC_COLUMNS):
            return check_metrics_table(key, "the table given as key")
        return metrics_from_wide(key)
    if isinstance(key, str):
        return metrics_of(mdata, key, PRODUCERS)
    keys = list(key)
    if not keys:
        raise ValueError("key is an empty list: give one or more classifier keys of uns.")
    return pd.concat([metrics_of(mdata, k, PRODUCERS) for k in keys], ignore_index=True)


@inject_docs(save=save_doc("metrics"))
def metrics(
    mdata: MuData | AnnData | None,
    key: str | Sequence[str] | pd.DataFrame = "cs_pred",
    *,
    metrics: Sequence[str] = ("precision", "recall", "f1"),
    classes: Sequence[str] | None = None,
    cmap: str = "viridis",
    annotate: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Per-class precision, recall and F1 of classifiers side by side, as the paper's metric tables.

    Rows are classifiers (classifier x section where a record has figures of several sections), columns
    are the metrics grouped by class, each cell annotated with its value.

    Parameters
    ----------
    mdata
        MuData (or AnnData) holding the classifier records in ``uns``; may be ``None`` when ``key`` is a
        DataFrame.
    key
        A classifier's ``key_added`` (its ``uns[key]["metrics_table"]``, written by
        :func:`cellsymphony.tl.train_classifier`), a list of such keys (drawn side by side), the ``key_added``
        of :func:`cellsymphony.tl.compare_classifiers`, its returned DataFrame, or a metric table
        (columns ``model, sample, class, metric, value``).
    metrics
        Which per-class metrics to show, in order (``"precision"``, ``"recall"``, ``"f1"``).
    classes
        Classes to show, in order; default all, in the order they first appear.
    cmap
        Colormap of the values (0 to 1).
    annotate
        Write each value in its cell.
    title
        Axes title; default ``"Per-class metrics"``.
    ax
        {ax}
    show
        {show}
    save
        {save}

    Returns
    -------
    The Axes. The drawn matrix is ``ax.images[0].get_array()`` (rows: classifiers, columns: class x
    metric); row labels are the y tick labels, metric labels the x tick labels and class names the
    labels of the secondary x axis on top.
    """
    if not all(m in WIDE_LABELS for m in metrics):
        raise ValueError(f"metrics must be among {list(WIDE_LABELS)}, got {list(metrics)}.")
    long = metrics_table(mdata, key)
    long = long[long["metric"].isin(list(metrics)) & (long["class"] != "all")].copy()
    if long.empty:
        raise ValueError(f"No {list(metrics)} values found for {key!r}.")
    # one row per model, or per model x section where a model has figures of several sections
    n_samples = long.groupby("model", sort=False)["sample"].nunique()
    long["model"] = [m if n_samples[m] == 1 else f"{m} / {s}" for m, s in zip(long["model"], long["sample"], strict=True)]
    models = list(dict.fromkeys(long["model"]))
    all_classes = list(dict.fromkeys(long["class"]))
    if classes is not None:
        unknown = [c for c in classes if c not in all_classes]
        if unknown:
            raise ValueError(f"classes {unknown} not found; the records have {all_classes}.")
        all_classes = list(classes)
    columns = [(c, m) for c in all_classes for m in metrics]
    pivot = long.pivot_table(index="model", columns=["class", "metric"], values="value", aggfunc="first")
    mat = np.full((len(models), len(columns)), np.nan)
    for j, col in enumerate(columns):
        if col in pivot.columns:
            mat[:, j] = pivot[col].reindex(models).to_numpy(dtype=float)

    width = max(4.0, 0.45 * len(columns) + 2.0 + 0.06 * max(len(m) for m in models))
    fig, ax = new_axes(ax, (width, 0.45 * len(models) + 1.8))
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(columns)), [WIDE_LABELS[m] for _, m in columns], fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=9)
    nm = len(metrics)
    for k in range(1, len(all_classes)):
        ax.axvline(k * nm - 0.5, color="white", lw=2.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks([k * nm + (nm - 1) / 2 for k in range(len(all_classes))], all_classes, fontsize=9)
    top.tick_params(length=0)
    for label in top.get_xticklabels():
        label.set_rotation(0 if max(len(c) for c in all_classes) * 6 < 3 * nm * 7 else 20)
        label.set_ha("center")
    if annotate:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    ax.text(
                        j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if mat[i, j] > 0.6 else "white",
                    )  # fmt: skip
    ax.set_title(title or "Per-class metrics", pad=28)
    fig.colorbar(im, ax=ax, shrink=0.8, label="score")
    finish(fig, show=show, save=save, name="metrics")
    return ax
