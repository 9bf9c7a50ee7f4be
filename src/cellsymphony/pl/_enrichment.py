"""Clusters x labels enrichment heatmap with significance marks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._docs import inject_docs, save_doc
from .._utils import uns_table
from .._validate import check_choice
from ._common import finish, natural_key, new_axes, uns_entry

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from mudata import MuData

# the columns cs.tl.cluster_enrichment writes, per `value` option
_VALUE_COLUMNS = {"log2_odds": "log2_odds_ratio", "obs_exp": "obs_exp"}
_Q_COLUMN = "qval"


def enrichment_matrices(table: Any, value: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(values, q)`` as clusters x labels DataFrames from a :func:`cellsymphony.tl.cluster_enrichment` table
    (one row per cluster and label, columns ``cluster``, ``label``, ``log2_odds_ratio``, ``obs_exp``, ``qval``)."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(
            f"Expected the DataFrame cs.tl.cluster_enrichment returns (or its key_added), got {type(table).__name__}."
        )
    need = ["cluster", "label", _VALUE_COLUMNS[value], _Q_COLUMN]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(
            f"The enrichment table has no column {missing} (it has {list(table.columns)}): pass the table "
            "cs.tl.cluster_enrichment returns, or its key_added."
        )
    df = table.assign(cluster=table["cluster"].astype(str), label=table["label"].astype(str))
    vals = df.pivot_table(index="cluster", columns="label", values=_VALUE_COLUMNS[value], aggfunc="first", observed=False)
    q = df.pivot_table(index="cluster", columns="label", values=_Q_COLUMN, aggfunc="first", observed=False)
    return vals.astype(float), q.reindex(index=vals.index, columns=vals.columns).astype(float)


def _stars(q: float, thresholds: Sequence[float]) -> str:
    if not np.isfinite(q):
        return ""
    return "*" * sum(q < t for t in thresholds)


@inject_docs(save=save_doc("enrichment"))
def enrichment(
    mdata: MuData | AnnData | None,
    key: str | pd.DataFrame = "cs_niche_enrichment",
    *,
    value: Literal["log2_odds", "obs_exp"] = "log2_odds",
    thresholds: Sequence[float] = (0.05, 0.01, 0.001),
    vmax: float | None = None,
    cmap: str = "RdBu_r",
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Heatmap of cell-label enrichment within clusters (niches), marked by significance.

    Parameters
    ----------
    mdata
        MuData holding the table in ``uns[key]`` (from :func:`cellsymphony.tl.cluster_enrichment`
        with ``key_added``); may be ``None`` when ``key`` is the DataFrame itself.
    key
        ``key_added`` of :func:`cellsymphony.tl.cluster_enrichment`, or the DataFrame it returned.
    value
        ``"log2_odds"`` (log2 odds ratio, diverging around 0) or ``"obs_exp"`` (observed / expected,
        drawn on a log2 colour scale around 1).
    thresholds
        Benjamini-Hochberg q-value cut-offs for one, two, three stars.
    vmax
        Colour-scale limit (symmetric, in log2 units); default the largest finite absolute value,
        capped at 4.
    cmap
        Diverging colormap.
    title
        Axes title.
    ax
        {ax}
    show
        {show}
    save
        {save}

    Returns
    -------
    The Axes: clusters in rows (y tick labels), labels in columns (x tick labels); the drawn
    log2 values are ``ax.images[0].get_array()`` (infinite values clipped to the scale) and each cell
    with q below a threshold carries a text of stars.
    """
    check_choice("value", value, ("log2_odds", "obs_exp"))
    thresholds = sorted((float(t) for t in thresholds), reverse=True)  # loosest first: k stars = q < k-th
    table = key if isinstance(key, pd.DataFrame) else uns_table(uns_entry(mdata, key, "cs.tl.cluster_enrichment"))
    vals, q = enrichment_matrices(table, value)
    vals = vals.loc[sorted(vals.index, key=natural_key)]
    q = q.loc[vals.index]
    raw = vals.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log2(raw) if value == "obs_exp" else raw
    finite = logv[np.isfinite(logv)]
    lim = vmax if vmax is not None else float(min(4.0, np.abs(finite).max())) if finite.size else 1.0
    lim = lim or 1.0
    shown = np.clip(np.where(np.isnan(logv), np.nan, logv), -lim, lim)
    nr, nc = shown.shape
    fig, ax = new_axes(ax, (0.6 * nc + 2.8, 0.42 * nr + 1.8))
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(nc), [str(c) for c in vals.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(nr), [str(r) for r in vals.index], fontsize=8)
    ax.set_xlabel("label")
    ax.set_ylabel("cluster")
    qa = q.to_numpy(dtype=float)
    for i in range(nr):
        for j in range(nc):
            s = _stars(qa[i, j], thresholds)
            if s:
                ax.text(j, i, s, ha="center", va="center", fontsize=8,
                        color="white" if abs(shown[i, j]) > 0.6 * lim else "black")  # fmt: skip
    label = "log2 odds ratio" if value == "log2_odds" else "log2 observed / expected"
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label(label)
    note = ", ".join(f"{'*' * (k + 1)} q<{t:g}" for k, t in enumerate(thresholds))
    ax.set_title(title or f"Enrichment ({note})", fontsize=9)
    finish(fig, show=show, save=save, name="enrichment")
    return ax
