"""Confusion matrix of a trained classifier on its held-out cells."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._docs import inject_docs, save_doc
from .._validate import check_choice, find_obs_column
from ._common import finish, new_axes, uns_entry

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from mudata import MuData


def _stored_confusion(entry: Mapping) -> tuple[np.ndarray, list[str]] | None:
    """``uns[key]["metrics"]["confusion"]`` and ``uns[key]["classes"]``, as train_classifier writes them."""
    met = entry.get("metrics")
    if isinstance(met, Mapping) and met.get("confusion") is not None and entry.get("classes") is not None:
        return np.asarray(met["confusion"], dtype=float), [str(c) for c in np.asarray(entry["classes"])]
    return None


def confusion_table(mdata: Any, key: str, *, split: str = "test") -> tuple[np.ndarray, list[str]]:
    """Counts (true class in rows, predicted in columns) and the class names for :func:`confusion`.

    Computed from ``obs[key]`` against the true labels on the cells of ``obs[f"{key}_split"] == split``
    when those columns exist (``split="all"``: every labelled cell), else read from
    ``uns[key]["metrics"]["confusion"]``.
    """
    entry = uns_entry(mdata, key, "cs.tl.train_classifier")
    params = entry.get("params", {}) if isinstance(entry, Mapping) else {}
    label_key = params.get("label_key")
    classes = entry.get("classes") if isinstance(entry, Mapping) else None
    if label_key is not None and str(label_key) != "None" and key in mdata.obs:
        truth = find_obs_column(mdata, str(label_key)).astype(object)
        pred = mdata.obs[key].astype(object)
        mask = truth.notna() & pred.notna()
        split_col = f"{key}_split"
        if split != "all" and split_col in mdata.obs:
            mask &= mdata.obs[split_col].astype(str) == split
        elif split != "all":
            mask = None
        if mask is not None:
            cls = [str(c) for c in (np.asarray(classes) if classes is not None else pd.unique(pred[pred.notna()]))]
            index = {c: i for i, c in enumerate(cls)}
            t = truth[mask].astype(str).map(index)
            p = pred[mask].astype(str).map(index)
            ok = t.notna() & p.notna()
            cm = np.zeros((len(cls), len(cls)))
            np.add.at(cm, (t[ok].astype(int).to_numpy(), p[ok].astype(int).to_numpy()), 1)
            return cm, cls
    stored = _stored_confusion(entry) if isinstance(entry, Mapping) else None
    if stored is None:
        raise ValueError(
            f"uns[{key!r}] has no confusion matrix and obs has no {key!r} / {key}_split columns with a "
            "label_key in its params: run cs.tl.train_classifier first."
        )
    return stored


@inject_docs(save=save_doc("confusion"))
def confusion(
    mdata: MuData | AnnData,
    key: str = "cs_pred",
    *,
    split: str = "test",
    normalize: Literal["true", "pred", "none"] = "true",
    cmap: str = "Blues",
    annotate: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Confusion matrix of a classifier: true classes in rows, predicted classes in columns.

    Parameters
    ----------
    mdata
        MuData with a classifier's outputs, written by :func:`cellsymphony.tl.train_classifier`.
    key
        The classifier's ``key_added``.
    split
        Which cells: ``"test"`` (held-out, default), ``"train"`` or ``"all"`` labelled cells.
    normalize
        ``"true"``: each row sums to 1 (recall on the diagonal); ``"pred"``: each column sums to 1
        (precision on the diagonal); ``"none"``: counts.
    cmap
        Colormap.
    annotate
        Write the value (and, when normalised, the count) in each cell.
    title
        Axes title; default ``"<key>: <split> cells"``.
    ax
        {ax}
    show
        {show}
    save
        {save}

    Returns
    -------
    The Axes; the drawn (normalised) matrix is ``ax.images[0].get_array()``.
    """
    check_choice("normalize", normalize, ("true", "pred", "none"))
    counts, classes = confusion_table(mdata, key, split=split)
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "true":
            mat = counts / counts.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            mat = counts / counts.sum(axis=0, keepdims=True)
        else:
            mat = counts.copy()
    mat = np.nan_to_num(mat)
    n = len(classes)
    fig, ax = new_axes(ax, (0.55 * n + 2.8, 0.5 * n + 2.0))
    im = ax.imshow(mat, cmap=cmap, vmin=0, vmax=1 if normalize != "none" else None, interpolation="nearest")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if annotate:
        top = mat.max() if mat.size else 1
        for i in range(n):
            for j in range(n):
                text = f"{mat[i, j]:.2f}\n({int(counts[i, j])})" if normalize != "none" else f"{int(counts[i, j])}"
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=6.5,
                    color="white" if mat[i, j] > 0.6 * top else "black",
                )  # fmt: skip
    ax.set_title(title or f"{key}: {split} cells (n={int(counts.sum())})")
    fig.colorbar(im, ax=ax, shrink=0.8, label={"true": "fraction of true class", "pred": "fraction of predicted", "none": "cells"}[normalize])
    finish(fig, show=show, save=save, name="confusion")
    return ax
