"""UMAP of any per-cell representation, coloured by a column (scanpy does the work)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._docs import inject_docs, save_doc
from .._validate import is_mudata
from ._common import finish, natural_key, new_axes, palette_for
from ._spatial import color_values

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from mudata import MuData


def find_rep(mdata: Any, rep: str, mod: str | None) -> tuple[pd.DataFrame, str]:
    """``obsm[rep]`` indexed like ``mdata.obs`` and where it was found (``"mdata"`` or a modality)."""
    if mod is not None:
        if not is_mudata(mdata) or mod not in mdata.mod:
            raise ValueError(f"mod={mod!r} is not a modality of the data.")
        places = [(mod, mdata.mod[mod])]
    else:
        places = [("mdata", mdata)] + (list(mdata.mod.items()) if is_mudata(mdata) else [])
    for where, adata in places:
        if rep in adata.obsm:
            x = adata.obsm[rep]
            x = x.to_numpy() if isinstance(x, pd.DataFrame) else np.asarray(x)
            return pd.DataFrame(x, index=adata.obs_names).reindex(mdata.obs_names), where
    looked = [w for w, _ in places]
    raise ValueError(
        f"Representation {rep!r} not found in obsm of {looked}: compute it first "
        "(cs.pp.embed_expression, cs.pp.embed_morphology, cs.tl.align_contrastive)."
    )


@inject_docs(save=save_doc("embedding_<rep>"))
def embedding(
    mdata: MuData | AnnData,
    rep: str,
    color: str | None = None,
    *,
    mod: str | None = None,
    n_neighbors: int = 15,
    min_dist: float = 0.5,
    seed: int = 0,
    palette: Any = None,
    size: float | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """UMAP of a representation (an embedding of either modality or the contrastive space), coloured by a column.

    The UMAP is computed by scanpy (neighbours + UMAP, seeded) on the cells with a finite
    representation and drawn with :func:`scanpy.pl.embedding`; nothing is written to ``mdata``.
    A two-column representation (an existing ``X_umap``) is drawn as it is.

    Parameters
    ----------
    mdata
        MuData or AnnData.
    rep
        Key of the representation in ``obsm`` (of the MuData or a modality, e.g. ``"X_uni2"``,
        ``"X_scgpt"``, ``"X_cs_contrastive"``).
    color
        Column to colour by (looked up as by :func:`cellsymphony.pl.spatial`) or a gene.
    mod
        Take ``rep`` from this modality (needed when several hold the same key, as with
        ``X_cs_contrastive``); default the first place that has it: the MuData, then each modality.
    n_neighbors
        Neighbours of the kNN graph.
    min_dist
        UMAP ``min_dist``.
    seed
        Random state of the neighbours and UMAP.
    palette
        Categorical colours (dict, list or colormap name).
    size
        Point size; default scanpy's.
    title
        Axes title; default ``"<rep>: <color>"``.
    ax
        {ax}
    show
        {show}
    save
        {save}

    Returns
    -------
    The Axes; ``ax.collections[0]`` holds the cells' UMAP coordinates.
    """
    import scanpy as sc
    from anndata import AnnData

    frame, where = find_rep(mdata, rep, mod)
    ok = np.all(np.isfinite(frame.to_numpy(dtype=float)), axis=1)
    if ok.sum() < 3:
        raise ValueError(f"{rep!r} has only {int(ok.sum())} cells with finite values; nothing to draw.")
    x = frame.to_numpy(dtype=np.float32)[ok]
    tmp = AnnData(obs=pd.DataFrame(index=frame.index[ok].astype(str)))
    if x.shape[1] == 2:
        tmp.obsm["X_umap"] = x
    else:
        tmp.obsm[rep] = x
        sc.pp.neighbors(tmp, use_rep=rep, n_neighbors=min(n_neighbors, int(ok.sum()) - 1), random_state=seed)
        sc.tl.umap(tmp, min_dist=min_dist, random_state=seed)
    label = None
    if color is not None:
        values, label = color_values(mdata, color)
        values = values[ok]
        values.index = tmp.obs_names
        if not pd.api.types.is_numeric_dtype(values) or isinstance(values.dtype, pd.CategoricalDtype):
            cat = values.astype("category")
            if not isinstance(values.dtype, pd.CategoricalDtype):
                cat = cat.cat.reorder_categories(sorted(cat.cat.categories, key=natural_key))
            cats = [str(c) for c in cat.cat.categories]
            cat = cat.cat.rename_categories(cats)
            tmp.obs[color] = cat
            colours = palette_for(mdata, color, cats, palette)
            tmp.uns[f"{color}_colors"] = [colours[c] for c in cats]
        else:
            tmp.obs[color] = values.astype(float)
    fig, ax = new_axes(ax, (5.5, 4.5))
    sc.pl.embedding(tmp, basis="X_umap", color=color, ax=ax, show=False, size=size,
                    title=title or (f"{rep} ({where}): {label}" if label else f"{rep} ({where})"))  # fmt: skip
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    finish(fig, show=show, save=save, name=f"embedding_{rep}")
    return ax
