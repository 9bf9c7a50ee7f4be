"""Training curves of a classifier or a contrastive aligner."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._docs import inject_docs, save_doc
from ._common import finish, uns_entry

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure
    from mudata import MuData

# the series the trainers write (train_classifier: train_loss, test_loss, test_macro_f1, test_accuracy;
# align_contrastive: train_loss, test_loss, temperature) and their legend labels
_PRETTY = {
    "train_loss": "train",
    "test_loss": "held-out",
    "test_macro_f1": "macro F1 (held-out)",
    "test_accuracy": "accuracy (held-out)",
    "temperature": "temperature",
}


def history_table(mdata: Any, key: str) -> pd.DataFrame:
    """``uns[key]["history"]`` as a DataFrame with one row per epoch."""
    entry = uns_entry(mdata, key, "cs.tl.train_classifier or cs.tl.align_contrastive")
    hist = entry.get("history") if isinstance(entry, Mapping) else None
    if hist is None:
        raise ValueError(f"uns[{key!r}] has no 'history': it is written by cs.tl.train_classifier / cs.tl.align_contrastive.")
    if isinstance(hist, pd.DataFrame):
        df = hist.copy()
    else:
        cols = {k: np.asarray(v, dtype=float).ravel() for k, v in hist.items() if np.ndim(v) >= 1 and np.size(v) > 0}
        n = max((len(v) for v in cols.values()), default=0)
        if not n:
            raise ValueError(f"uns[{key!r}]['history'] is empty.")
        df = pd.DataFrame({k: np.pad(v, (0, n - len(v)), constant_values=np.nan) for k, v in cols.items()})
    if "epoch" in df.columns:
        df = df.set_index("epoch")
    else:
        df.index = np.arange(1, len(df) + 1)
    df.index.name = "epoch"
    return df


@inject_docs(save=save_doc("history_<key>"))
def history(
    mdata: MuData | AnnData,
    key: str = "cs_pred",
    *,
    title: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Figure:
    """Per-epoch training curves: the losses, and beside them any other recorded score (macro F1,
    retrieval, temperature).

    Parameters
    ----------
    mdata
        MuData with ``uns[key]["history"]`` (per-epoch arrays), as written by
        :func:`cellsymphony.tl.train_classifier` or :func:`cellsymphony.tl.align_contrastive`.
    key
        The trainer's ``key_added`` (``"cs_pred"``, ``"X_cs_contrastive"``, ...).
    title
        Figure title; default the key.
    show
        {show}
    save
        {save}

    Returns
    -------
    The Figure: one panel of losses (one line per ``*loss*`` series, labelled in the legend) and,
    when the history has other series, a second panel with those.
    """
    import matplotlib.pyplot as plt

    df = history_table(mdata, key)
    # train first, then held-out, then the rest (h5mu round trips sort the keys alphabetically)
    rank = {"train_loss": 0, "test_loss": 1}
    cols = sorted(df.columns, key=lambda c: rank.get(str(c), 2))
    df = df[cols]
    losses = [c for c in df.columns if "loss" in str(c).lower()]
    others = [c for c in df.columns if c not in losses]
    n_panels = 1 + bool(others and losses)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.2), layout="constrained", squeeze=False)
    axes = axes[0]
    groups = [("loss", losses or list(df.columns))] + ([("score", others)] if others and losses else [])
    for ax, (ylabel, cols) in zip(axes, groups, strict=False):
        for c in cols:
            y = df[c].to_numpy(dtype=float)
            ax.plot(df.index, y, marker="o" if len(df) <= 30 else None, ms=3, label=_PRETTY.get(str(c), str(c)))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    axes[0].set_title("loss")
    if n_panels > 1:
        axes[1].set_title("scores")
    fig.suptitle(title or key)
    finish(fig, show=show, save=save, name=f"history_{key}")
    return fig
