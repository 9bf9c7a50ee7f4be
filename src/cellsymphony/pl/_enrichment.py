"""Clusters x labels enrichment heatmap with significance marks."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._validate import check_choice
from ._common import finish, natural_key, new_axes, uns_entry

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from mudata import MuData

_VALUE_NAMES = {
    "log2_odds": ("log2_odds", "log2_odds_ratio", "log2_or", "log2or", "log2 odds", "log2_odds_ratios"),
    "obs_exp": ("obs_exp", "observed_expected", "obs/exp", "obs_over_exp", "ratio", "enrichment", "oe"),
    "count": ("count", "counts", "n", "observed", "n_cells"),
}
_Q_NAMES = ("q", "qval", "q_value", "qvalue", "fdr", "padj", "p_adj", "q_bh")
_CLUSTER_NAMES = ("cluster", "clusters", "niche", "group")
_LABEL_NAMES = ("label", "labels", "cell_type", "class")


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def enrichment_matrices(table: Any, value: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(values, q)`` as clusters x labels DataFrames from a :func:`cellsymphony.tl.cluster_enrichment` table.

    Accepts the long table (one row per cluster and label with columns such as ``cluster``,
    ``label``, ``log2_odds``, ``obs_exp``, ``q``) or a dict of wide clusters x labels tables.
    """
    if isinstance(table, Mapping) and not isinstance(table, pd.DataFrame):
        for sub in ("table", "enrichment", "result"):
            if isinstance(table.get(sub), pd.DataFrame):
                return enrichment_matrices(table[sub], value)
        vkey = _pick(list(table), _VALUE_NAMES[value])
        if vkey is None or not isinstance(table[vkey], pd.DataFrame):
            raise ValueError(f"The enrichment record has no {value!r} table (keys: {list(table)}).")
        qkey = _pick(list(table), _Q_NAMES)
        q = table[qkey] if qkey is not None and isinstance(table[qkey], pd.DataFrame) else None
        return table[vkey].astype(float), None if q is None else q.astype(float)
    df = pd.DataFrame(table)
    vcol = _pick(df.columns, _VALUE_NAMES[value])
    if vcol is None:
        raise ValueError(
            f"The enrichment table has no {value!r} column (looked for {_VALUE_NAMES[value]}); "
            f"it has {list(df.columns)}."
        )
    ccol = _pick(df.columns, _CLUSTER_NAMES)
    lcol = _pick(df.columns, _LABEL_NAMES)
    if ccol is None or lcol is None:
        text = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if len(text) < 2:
            raise ValueError(f"Cannot tell the cluster and label columns of the enrichment table {list(df.columns)}.")
        ccol, lcol = ccol or text[0], lcol or [t for t in text if t != ccol][0]
    df[ccol] = df[ccol].astype(str)
    df[lcol] = df[lcol].astype(str)
    vals = df.pivot_table(index=ccol, columns=lcol, values=vcol, aggfunc="first", observed=False)
    qcol = _pick(df.columns, _Q_NAMES)
    q = None
    if qcol is not None:
        q = df.pivot_table(index=ccol, columns=lcol, values=qcol, aggfunc="first", observed=False)
        q = q.reindex(index=vals.index, columns=vals.columns)
    return vals.astype(float), q


def _stars(q: float, thresholds: Sequence[float]) -> str:
    if not np.isfinite(q):
        return ""
    return "*" * sum(q < t for t in thresholds)


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
        Axes to draw into; default a new figure.
    show
        Show the figure; ``None`` shows it only with an interactive backend and when not saving.
    save
        Path to save the figure to, or ``True`` for ``figures/enrichment.png``.

    Returns
    -------
    The Axes: clusters in rows (y tick labels), labels in columns (x tick labels); the drawn
    log2 values are ``ax.images[0].get_array()`` (infinite values clipped to the scale) and each cell
    with q below a threshold carries a text of stars.
    """
    check_choice("value", value, ("log2_odds", "obs_exp"))
    thresholds = sorted((float(t) for t in thresholds), reverse=True)  # loosest first: k stars = q < k-th
    table = key if isinstance(key, pd.DataFrame) else uns_entry(mdata, key, "cs.tl.cluster_enrichment")
    vals, q = enrichment_matrices(table, value)
    vals = vals.loc[sorted(vals.index, key=natural_key)]
    if q is not None:
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
    if q is not None:
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
    note = ", ".join(f"{'*' * (k + 1)} q<{t:g}" for k, t in enumerate(thresholds)) if q is not None else "no q values"
    ax.set_title(title or f"Enrichment ({note})", fontsize=9)
    finish(fig, show=show, save=save, name="enrichment")
    return ax
