"""Example H&E patches per group: the "morphological pattern" of each cluster or cell type."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import IN_IMAGE_KEY
from .._docs import inject_docs, save_doc
from .._validate import find_obs_column
from ._common import finish, natural_key, palette_for

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure
    from mudata import MuData


def _group_order(labels: pd.Series) -> list[str]:
    """Every group of ``labels``: the categories in order, else the values in natural order."""
    if isinstance(labels.dtype, pd.CategoricalDtype):
        return [str(c) for c in labels.cat.categories]
    return sorted({str(v) for v in labels.dropna()}, key=natural_key)


def gallery_cells(mdata: Any, groupby: str, *, n: int, groups: Sequence[str] | None, seed: int) -> dict[str, list[str]]:
    """Up to ``n`` cell ids per group, drawn at random (seeded) among the cells inside the H&E."""
    labels = find_obs_column(mdata, groupby)
    order = _group_order(labels)
    labels = labels.astype(object).where(labels.notna(), None)
    labels = labels.map(lambda v: None if v is None else str(v))
    try:
        inside = find_obs_column(mdata, IN_IMAGE_KEY).fillna(False).astype(bool).to_numpy()
    except ValueError:
        inside = np.ones(mdata.n_obs, dtype=bool)
    if groups is not None:
        unknown = [g for g in groups if g not in order]
        if unknown:
            raise ValueError(f"groups {unknown} are not values of {groupby!r} ({order}).")
        order = list(groups)
    rng = np.random.default_rng(seed)
    out = {}
    names = np.asarray(mdata.obs_names)
    for g in order:
        idx = np.flatnonzero((labels == g).to_numpy() & inside)
        if len(idx) > n:
            idx = np.sort(rng.choice(idx, size=n, replace=False))
        out[g] = [str(c) for c in names[idx]]
    if not any(out.values()):
        raise ValueError(f"No cell of any group of {groupby!r} lies inside an H&E image (obs[{IN_IMAGE_KEY!r}]).")
    return out


@inject_docs(save=save_doc("patch_gallery_<groupby>"))
def patch_gallery(
    mdata: MuData | AnnData,
    groupby: str,
    *,
    n: int = 8,
    groups: Sequence[str] | None = None,
    size: int = 224,
    mpp: float = 0.5,
    seed: int = 0,
    palette: Any = None,
    title: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Figure:
    """A grid of H&E patches: one row per group (cluster, niche or cell type), ``n`` random cells each.

    Patches come from :func:`cellsymphony.pp.cell_patches` (nucleus-centred, resampled through the
    registration into the Xenium orientation), so they show what the morphology encoder sees.

    Parameters
    ----------
    mdata
        MuData with a registered H&E per sample (from :func:`cellsymphony.io.read_xenium` or
        :func:`cellsymphony.io.read_he_cells`).
    groupby
        Column with the groups (looked up in ``obs``, as ``mod:groupby``, then in each modality).
    n
        Patches per group (fewer when a group has fewer cells inside the image).
    groups
        Groups to show, in order; default all.
    size
        Patch side in pixels.
    mpp
        Micrometres per patch pixel (``size * mpp`` is the field of view).
    seed
        Seed of the random choice of cells.
    palette
        Colours of the row labels (dict, list or colormap name); default as :func:`cellsymphony.pl.spatial`.
    title
        Figure title; default ``"<groupby>: H&E patches (<field> µm)"``.
    show
        {show}
    save
        {save}

    Returns
    -------
    The Figure: ``len(groups) x n`` Axes; the first Axes of each row has the group (and its cell count)
    as y label, and each Axes that shows a patch holds it as ``ax.images[0]`` with the cell id as title.
    """
    import matplotlib.pyplot as plt

    from ..pp._cell_patches import cell_patches

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    chosen = gallery_cells(mdata, groupby, n=n, groups=groups, seed=seed)
    order = list(chosen)
    all_ids = [c for g in order for c in chosen[g]]
    patches = cell_patches(mdata, cells=all_ids, size=size, mpp=mpp)
    by_id = dict(zip(all_ids, patches, strict=True))
    # colours over every group (uns[f"{groupby}_colors"] follows the full order), then the rows shown
    colours = palette_for(mdata, groupby, _group_order(find_obs_column(mdata, groupby)), palette)
    counts = find_obs_column(mdata, groupby).astype(str).value_counts()
    cell = 1.15
    fig, axes = plt.subplots(
        len(order), n, figsize=(cell * n + 1.2, cell * len(order) + 0.6), squeeze=False,
        gridspec_kw={"wspace": 0.04, "hspace": 0.12},
    )  # fmt: skip
    for r, g in enumerate(order):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(chosen[g]):
                cid = chosen[g][c]
                ax.imshow(by_id[cid], interpolation="antialiased")
                ax.set_title(cid, fontsize=4, pad=1)
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_edgecolor(colours[g])
                    spine.set_linewidth(2)
        axes[r, 0].set_ylabel(f"{g}\n(n={int(counts.get(g, 0))})", rotation=0, ha="right", va="center",
                              fontsize=8, color=colours[g])  # fmt: skip
    fig.suptitle(title or f"{groupby}: H&E patches ({size * mpp:g} µm)", fontsize=10)
    finish(fig, show=show, save=save, name=f"patch_gallery_{groupby}")
    return fig
