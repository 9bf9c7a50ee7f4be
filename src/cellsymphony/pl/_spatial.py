"""Cells coloured by a column over the registered H&E, in micrometres."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import MOD_RNA, REG_ALIGNMENT, REG_HE_PATH, REG_PIXEL_SIZE, SAMPLE_KEY, SPATIAL_KEY
from .._docs import inject_docs, save_doc
from .._registration import um_to_he_px
from .._settings import logger
from .._validate import find_obs_column, is_mudata, sample_registry, samples_registry
from ._common import finish, natural_key, new_axes, palette_for

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from mudata import MuData


def obsm_frame(mdata: Any, basis: str) -> pd.DataFrame:
    """Per-cell coordinates ``obsm[basis]`` indexed like ``mdata.obs``, from the MuData or any modality."""
    if basis in mdata.obsm:
        return pd.DataFrame(np.asarray(mdata.obsm[basis])[:, :2], index=mdata.obs_names)
    if is_mudata(mdata):
        for adata in mdata.mod.values():
            if basis in adata.obsm:
                arr = np.asarray(adata.obsm[basis])[:, :2]
                return pd.DataFrame(arr, index=adata.obs_names).reindex(mdata.obs_names)
    raise ValueError(f"No obsm[{basis!r}] on the data or its modalities: read it with cs.io.read_xenium.")


def color_values(mdata: Any, color: str) -> tuple[pd.Series, str]:
    """The values to colour by: an obs column (see CONVENTIONS: obs, ``mod:key``, each modality), else a
    gene of the ``rna`` modality (log1p of its counts). Returns ``(series, label)``."""
    try:
        return find_obs_column(mdata, color), color
    except ValueError as err:
        rna = mdata.mod.get(MOD_RNA) if is_mudata(mdata) else mdata
        if rna is not None and color in rna.var_names:
            x = rna[:, color].X
            x = np.asarray(x.toarray() if hasattr(x, "toarray") else x).ravel().astype(float)
            s = pd.Series(np.log1p(x), index=rna.obs_names).reindex(mdata.obs_names)
            return s, f"{color} (log1p counts)"
        raise ValueError(f"{err} It is not a gene of the 'rna' modality either.") from None


def pick_sample(mdata: Any, sample: str | None) -> tuple[str | None, np.ndarray]:
    """The sample to draw and a boolean mask of its cells; an error lists the samples when one must be chosen."""
    n = mdata.n_obs
    try:
        col = find_obs_column(mdata, SAMPLE_KEY).astype(str)
    except ValueError:
        col = None
    known = sorted(samples_registry(mdata)) or ([] if col is None else sorted(col.unique()))
    if sample is None:
        if col is not None and col.nunique() > 1:
            raise ValueError(f"The data holds several samples {sorted(col.unique())}: pass sample=.")
        sample = known[0] if known else (None if col is None else col.iloc[0])
        return sample, np.ones(n, dtype=bool)
    if col is None or sample not in set(col):
        raise ValueError(f"Sample {sample!r} not found; the data has samples {known}.")
    return sample, (col == sample).to_numpy()


def _he_background(ax, reg: Mapping, bbox_um: np.ndarray, max_image_px: int, he_mpp: float | None) -> Any:
    """Draw the part of the sample's H&E under ``bbox_um`` (x0, y0, x1, y1) at a coarse level, warped into
    micrometres through the registration with an affine image transform; return the AxesImage."""
    from matplotlib.transforms import Affine2D

    from ..io._read_he import read_he

    alignment = np.asarray(reg[REG_ALIGNMENT], dtype=float)
    pixel_size = float(reg[REG_PIXEL_SIZE])
    x0, y0, x1, y1 = bbox_um
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
    px = um_to_he_px(corners, alignment, pixel_size)
    lo, hi = px.min(axis=0), px.max(axis=0)
    with read_he(reg[REG_HE_PATH]) as img:
        if he_mpp is not None:
            level = img.best_level(he_mpp)
        else:
            needed = max(hi - lo) / max_image_px
            level = max((i for i, d in enumerate(img.downsamples) if d <= needed), default=0)
        ds = float(img.downsamples[level])
        h_l, w_l = img.shapes[level]
        lx0 = int(np.clip(np.floor(lo[0] / ds) - 1, 0, w_l))
        ly0 = int(np.clip(np.floor(lo[1] / ds) - 1, 0, h_l))
        lx1 = int(np.clip(np.ceil(hi[0] / ds) + 1, 0, w_l))
        ly1 = int(np.clip(np.ceil(hi[1] / ds) + 1, 0, h_l))
        if lx1 <= lx0 or ly1 <= ly0:
            logger.warning("the cells lie outside the H&E image; drawing them without it")
            return None
        region = img.read_region(lx0, ly0, lx1 - lx0, ly1 - ly0, level=level)
    # level pixel edges -> level-0 pixels -> Xenium morphology pixels -> micrometres
    matrix = alignment.copy()
    matrix[:2] *= pixel_size  # scale the affine's top two rows only: the last row stays 0 0 1
    to_um = Affine2D(matrix)
    extent = (lx0 * ds, lx1 * ds, ly1 * ds, ly0 * ds)
    im = ax.imshow(region, extent=extent, transform=to_um + ax.transData, interpolation="antialiased", zorder=0)
    im.set_label(f"H&E level {level}")
    return im


@inject_docs(save=save_doc("spatial_<color>"))
def spatial(
    mdata: MuData | AnnData,
    color: str | None = None,
    *,
    he: bool = True,
    sample: str | None = None,
    basis: str = SPATIAL_KEY,
    groups: Sequence[str] | None = None,
    size: float | None = None,
    alpha: float = 0.9,
    palette: Any = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    max_image_px: int = 2000,
    he_mpp: float | None = None,
    legend: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Cells at their micrometre positions, coloured by a column or gene, over the registered H&E.

    The H&E is read at a coarse pyramid level (only the part under the cells) and drawn through
    the sample's registration (H&E pixel -> Xenium pixel -> micrometres) as an affine image
    transform, so rotation and scaling of the alignment are honoured exactly; x runs to the right
    and y down, as ``obsm["spatial"]``. (squidpy's ``spatial_scatter`` takes one scale factor per
    image and cannot express a rotated registration, hence the affine image here.)

    Parameters
    ----------
    mdata
        MuData from :func:`cellsymphony.io.read_xenium` / :func:`cellsymphony.io.read_he_cells`, or an
        AnnData with ``obsm[basis]``.
    color
        An obs column (looked up in ``obs``, as ``mod:color``, then in each modality) or a gene of the
        ``rna`` modality (log1p counts); ``None`` draws all cells in one colour.
    he
        Draw the H&E underneath (when the sample has one registered).
    sample
        Which section to draw; required when the data holds several.
    basis
        Key of the micrometre coordinates in ``obsm``.
    groups
        For a categorical ``color``: draw only these categories in colour, the others light grey.
    size
        Marker size in points squared; default about 70% of the typical distance between cells.
    alpha
        Marker opacity.
    palette
        Categorical colours (dict, list or colormap name); default ``uns[f"{{color}}_colors"]`` or scanpy's.
    cmap
        Colormap for continuous values.
    vmin
        Lower colour limit for continuous values.
    vmax
        Upper colour limit for continuous values.
    max_image_px
        Use the coarsest pyramid level that still draws the cells' extent with at least this many pixels.
    he_mpp
        Instead, draw the H&E at the coarsest level at or finer than this many micrometres per pixel.
    legend
        Draw a legend (categorical) or colour bar (continuous).
    title
        Axes title; default ``color``.
    ax
        {ax}
    show
        {show}
    save
        {save}

    Returns
    -------
    The Axes, in micrometres: ``ax.images`` holds the H&E (when drawn), ``ax.collections[0]`` the cells
    (offsets = their coordinates, face colours = their colours); the legend lists the categories.
    The image's label says which pyramid level was drawn (``"H&E level 2"``).
    """
    if max_image_px < 16:
        raise ValueError(f"max_image_px must be at least 16, got {max_image_px}.")
    sample, mask = pick_sample(mdata, sample)
    xy = obsm_frame(mdata, basis).to_numpy(dtype=float)
    if color is not None:
        values, clabel = color_values(mdata, color)
        values = values[mask]
    else:
        values, clabel = None, ""
    xy = xy[mask]
    ok = np.all(np.isfinite(xy), axis=1)
    xy = xy[ok]
    if len(xy) == 0:
        raise ValueError(f"No cells with finite obsm[{basis!r}] coordinates to draw.")
    if values is not None:
        values = values[ok]
    span = np.ptp(xy, axis=0)
    pad = 0.02 * max(span.max(), 1.0)
    bbox = np.array([xy[:, 0].min() - pad, xy[:, 1].min() - pad, xy[:, 0].max() + pad, xy[:, 1].max() + pad])
    aspect = (bbox[3] - bbox[1]) / max(bbox[2] - bbox[0], 1e-9)
    fig, ax = new_axes(ax, (6.5, float(np.clip(6.5 * aspect, 2.5, 9))))

    if he and sample is not None and sample in samples_registry(mdata):
        reg = sample_registry(mdata, sample)
        if str(reg.get(REG_HE_PATH, "")):
            _he_background(ax, reg, bbox, max_image_px, he_mpp)
        else:
            logger.info("sample %r has no H&E registered; drawing the cells only", sample)
    if size is None:
        # markers about 70% of the typical spacing between cells, so the H&E shows between them
        fig.canvas.draw_idle()
        width_pt = ax.get_window_extent().width * 72 / fig.dpi
        pt_per_um = width_pt / max(bbox[2] - bbox[0], 1e-9)
        spacing_um = np.sqrt((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) / len(xy))
        size = float(np.clip((0.7 * spacing_um * pt_per_um) ** 2, 0.3, 80))
    if values is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#1f77b4", alpha=alpha, linewidths=0, zorder=2)
    elif isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values):
        cat = values.astype("category") if not isinstance(values.dtype, pd.CategoricalDtype) else values
        cats = [str(c) for c in cat.cat.categories]
        if not isinstance(values.dtype, pd.CategoricalDtype):
            cats = sorted(cats, key=natural_key)
        colours = palette_for(mdata, color, cats, palette)
        if groups is not None:
            unknown = [g for g in groups if g not in cats]
            if unknown:
                raise ValueError(f"groups {unknown} are not categories of {color!r} ({cats}).")
            colours = {c: (v if c in groups else "#d3d3d3") for c, v in colours.items()}
        # one colour per category, picked per cell by its code (a whole section has ~10^5-10^6 cells: no
        # per-cell strings); the last row is for missing values
        from matplotlib.colors import to_rgba

        grey = "#d3d3d3"
        hexes = [colours.get(str(c), grey) for c in cat.cat.categories] + [grey]
        table = np.array([to_rgba(h) for h in hexes])
        greyed = np.array([h.lower() == grey for h in hexes])
        codes = cat.cat.codes.to_numpy()
        which = np.where(codes < 0, len(hexes) - 1, codes)
        # draw the unlabelled / greyed cells first so coloured ones sit on top
        order = np.argsort(~greyed[which], kind="stable")
        ax.scatter(xy[order, 0], xy[order, 1], s=size, c=table[which[order]], alpha=alpha, linewidths=0, zorder=2)
        if legend:
            from matplotlib.lines import Line2D

            shown = [c for c in cats if groups is None or c in groups]
            handles = [Line2D([], [], marker="o", ls="", color=colours[c], label=c, markersize=6) for c in shown]
            ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8,
                      title=clabel, title_fontsize=8)  # fmt: skip
    else:
        v = values.to_numpy(dtype=float)
        order = np.argsort(np.nan_to_num(v, nan=-np.inf), kind="stable")
        sc = ax.scatter(xy[order, 0], xy[order, 1], s=size, c=v[order], cmap=cmap, vmin=vmin, vmax=vmax,
                        alpha=alpha, linewidths=0, zorder=2, plotnonfinite=True)  # fmt: skip
        if legend:
            fig.colorbar(sc, ax=ax, shrink=0.7, label=clabel)
    ax.set_xlim(bbox[0], bbox[2])
    ax.set_ylim(bbox[3], bbox[1])  # y down, as obsm["spatial"] and the image
    ax.set_aspect("equal")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_title(title if title is not None else (clabel or (f"sample {sample}" if sample else "cells")))
    finish(fig, show=show, save=save, name=f"spatial_{color or 'cells'}")
    return ax
