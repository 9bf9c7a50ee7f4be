"""Registration QC: matched H&E nuclei over the Xenium nucleus centroids, and the offsets between them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import NUCLEUS_KEY, REG_HE_PATH, REGISTRATION_KEY, SAMPLE_KEY
from .._docs import inject_docs, save_doc
from .._validate import find_obs_column, sample_registry, samples_registry
from ._common import finish, uns_entry
from ._spatial import _he_background, obsm_frame, pick_sample

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure
    from mudata import MuData

    from ..io import Registration

def registration_pairs(mdata: Any, key: str) -> pd.DataFrame:
    """The matched cells of a nucleus-label transfer, one row each, indexed by cell id.

    Columns: the Xenium nucleus centroid ``x, y`` (micrometres), ``distance`` to the matched H&E
    nucleus and, when per-cell offsets were stored, ``dx, dy`` (Xenium minus H&E, micrometres, the sign
    convention of the ``mean_offset_um`` statistic) and the H&E nucleus position ``he_x, he_y``.

    Read from what :func:`cellsymphony.pp.transfer_nucleus_labels` writes: ``uns[key]`` (its record),
    ``obs[f"{key}_distance"]`` and, where present, per-cell offsets ``obsm[f"{key}_offset"]``.
    """
    uns_entry(mdata, key, "cs.pp.transfer_nucleus_labels")
    nuc = obsm_frame(mdata, NUCLEUS_KEY)
    names = mdata.obs_names.astype(str)
    offsets = None
    if f"{key}_offset" in mdata.obsm:
        arr = np.asarray(mdata.obsm[f"{key}_offset"], dtype=float)[:, :2]
        offsets = pd.DataFrame(arr, index=names, columns=["dx", "dy"]).dropna()
    if offsets is not None:
        offsets = offsets[offsets.index.isin(nuc.index)]
        xy = nuc.loc[offsets.index].to_numpy(float)
        out = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "dx": offsets["dx"].to_numpy(), "dy": offsets["dy"].to_numpy()},
                           index=offsets.index)  # fmt: skip
        out["he_x"] = out["x"] - out["dx"]
        out["he_y"] = out["y"] - out["dy"]
        out["distance"] = np.hypot(out["dx"], out["dy"])
        return out
    dkey = f"{key}_distance"
    if dkey not in mdata.obs:
        raise ValueError(
            f"Found uns[{key!r}] but neither per-cell offsets nor obs[{dkey!r}]: run cs.pp.transfer_nucleus_labels "
            f"with key_added={key!r}."
        )
    dist = pd.Series(mdata.obs[dkey].to_numpy(float), index=names).dropna()
    xy = nuc.loc[dist.index].to_numpy(float)
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "distance": dist.to_numpy()}, index=dist.index)


def registration_stats(mdata: Any, key: str, sample: str | None) -> dict:
    """The match statistics of ``uns[key]`` for ``sample`` (``uns[key]["samples"][sample]``, or the
    only / ``"all"`` entry), as written by :func:`cellsymphony.pp.transfer_nucleus_labels`; may be empty."""
    entry = uns_entry(mdata, key, "cs.pp.transfer_nucleus_labels")
    if not isinstance(entry, Mapping):
        return {}
    per = entry.get("samples")
    if isinstance(per, Mapping) and per:
        if sample is not None and sample in per:
            return dict(per[sample])
        if "all" in per:
            return dict(per["all"])
        if len(per) == 1:
            return dict(next(iter(per.values())))
        return {}
    return {k: v for k, v in entry.items() if np.ndim(v) <= 1 and not isinstance(v, Mapping | pd.DataFrame)}


@inject_docs(save=save_doc("registration_<key>"))
def registration(
    mdata: MuData | AnnData | Registration,
    key: str | None = None,
    *,
    sample: str | None = None,
    window_um: float | None = None,
    center: Sequence[float] | None = None,
    he: bool = True,
    bins: int = 40,
    title: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Figure:
    """Registration QC: of an automatic registration (:func:`cellsymphony.io.register_he`), or of an H&E
    nucleus-label transfer.

    **Automatic registration** (a :class:`~cellsymphony.io.Registration`, or a MuData it was applied to with
    ``key=None`` or ``"he_registration"``): six panels. The DAPI image (green) over the H&E resampled into the
    Xenium frame through the registration (including its non-rigid field) at section, region (``window_um``,
    300 um by default) and cellular (50 um) zoom; the residual map (each matched nucleus coloured by its
    residual, and the mean residual vector per 100 um square drawn 20 times longer); the residual distances;
    the QC figures (red when ``qc["ok"]`` is False). Only the needed parts of low-resolution levels are read.

    **Nucleus-label transfer** (``key`` = the ``key_added`` of :func:`cellsymphony.pp.transfer_nucleus_labels`),
    in three panels.

    (1) the matched H&E nuclei over the Xenium nucleus centroids in a window of the section (over
    the H&E), joined by their offsets; (2) the offset vectors ``(dx, dy)`` (Xenium minus H&E) with
    their mean (a systematic shift) as an arrow and their spread as an ellipse; (3) the distribution of match distances with the median and
    95th percentile. Token pooling of the morphology embedding works at 7 µm per token, so a median
    beyond a few micrometres degrades every morphology embedding.

    Parameters
    ----------
    mdata
        MuData after :func:`cellsymphony.pp.transfer_nucleus_labels` or :meth:`Registration.apply`, or a
        :class:`~cellsymphony.io.Registration`.
    key
        The ``key_added`` of the label transfer; ``None`` (or ``"he_registration"``): the automatic registration.
    sample
        Section to draw; required when the data holds several.
    window_um
        Side of the zoomed window (micrometres): of panel 1 for a label transfer (default 150), of the region
        view for an automatic registration (default 300).
    center
        Centre ``(x, y)`` of that window in micrometres; default the matched cell nearest the median position.
    he
        Draw the H&E under panel 1.
    bins
        Histogram bins of panel 3.
    title
        Figure title; default ``"Registration QC: <key>"`` with the number of matches.
    show
        {show}
    save
        {save}

    Returns
    -------
    For an automatic registration, the Figure with six Axes: three overlays titled
    ``"DAPI (green) over H&E: section"`` / ``region`` / ``cells``, ``"residual map ..."``, ``"residuals"`` and the QC text. For a label
    transfer, the Figure with three Axes titled ``"matched nuclei"``, ``"offsets"`` and ``"distances"``. In the
    first, ``collections[0]`` holds the Xenium centroids of the window and ``collections[1]`` the matched
    H&E nuclei (or, without per-cell offsets, the matched cells), in micrometres; the second's
    ``collections[0]`` holds every ``(dx, dy)`` (when per-cell offsets were stored; otherwise it shows
    the mean offset and its spread from the statistics); the third's patches are the histogram bars,
    and its lines the median and 95th percentile.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Ellipse

    from ._registration_overlay import is_registration

    if is_registration(mdata) or key in (None, REGISTRATION_KEY):
        from ._registration_overlay import registration_overlay

        if key is None and not is_registration(mdata) and REGISTRATION_KEY not in getattr(mdata, "uns", {}):
            raise ValueError(
                f"No uns[{REGISTRATION_KEY!r}] (automatic registration): pass key= the key_added of "
                "cs.pp.transfer_nucleus_labels, or register the H&E with cs.io.register_he(...).apply(mdata)."
            )
        fig = registration_overlay(mdata, sample=sample, region_um=300.0 if window_um is None else window_um,
                                   center=center, title=title)
        name = mdata.sample if is_registration(mdata) else "he"
        finish(fig, show=show, save=save, name=f"registration_{name}")
        return fig
    window_um = 150.0 if window_um is None else window_um
    pairs = registration_pairs(mdata, key)
    sample, mask = pick_sample(mdata, sample)
    if sample is not None:
        try:
            samp = find_obs_column(mdata, SAMPLE_KEY).astype(str)
            samp.index = mdata.obs_names.astype(str)
            pairs = pairs[samp.reindex(pairs.index).to_numpy() == sample]
        except ValueError:
            pass
    if pairs.empty:
        raise ValueError(f"No matched nuclei for key {key!r}{f' in sample {sample!r}' if sample else ''}.")
    stats = registration_stats(mdata, key, sample)
    has_vectors = "dx" in pairs
    dist = pairs["distance"].to_numpy()
    med, p95 = float(np.median(dist)), float(np.percentile(dist, 95))
    if has_vectors:
        mean = pairs[["dx", "dy"]].mean().to_numpy()
        sd = pairs[["dx", "dy"]].std(ddof=0).to_numpy()
    else:
        mean = np.asarray(stats.get("mean_offset_um", [np.nan, np.nan]), dtype=float).ravel()[:2]
        sd = np.asarray(stats.get("offset_sd_um", [np.nan, np.nan]), dtype=float).ravel()[:2]

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), layout="constrained")
    ax0, ax1, ax2 = axes
    if center is None:
        mid = pairs[["x", "y"]].median().to_numpy()
        center = pairs[["x", "y"]].to_numpy()[np.argmin(np.hypot(*(pairs[["x", "y"]].to_numpy() - mid).T))]
    cx, cy = float(center[0]), float(center[1])
    h = window_um / 2
    bbox = np.array([cx - h, cy - h, cx + h, cy + h])
    if he and sample is not None and sample in samples_registry(mdata):
        reg = sample_registry(mdata, sample)
        if str(reg.get(REG_HE_PATH, "")):
            _he_background(ax0, reg, bbox, max_image_px=600, he_mpp=None)
    nuc = obsm_frame(mdata, NUCLEUS_KEY).to_numpy(float)[mask]
    inwin = (np.abs(nuc[:, 0] - cx) <= h) & (np.abs(nuc[:, 1] - cy) <= h)
    win = pairs[(np.abs(pairs["x"] - cx) <= h) & (np.abs(pairs["y"] - cy) <= h)]
    ax0.scatter(nuc[inwin, 0], nuc[inwin, 1], s=14, c="#1f77b4", label="Xenium nucleus", zorder=3, linewidths=0)
    if has_vectors:
        ax0.scatter(win["he_x"], win["he_y"], s=22, marker="x", c="#d62728", label="matched H&E nucleus", zorder=4)
        segs = np.stack([win[["x", "y"]].to_numpy(), win[["he_x", "he_y"]].to_numpy()], axis=1)
        ax0.add_collection(LineCollection(segs, colors="black", linewidths=0.8, zorder=3))
    else:
        ax0.scatter(win["x"], win["y"], s=40, facecolors="none", edgecolors="#d62728", linewidths=1.2,
                    label="matched to an H&E nucleus", zorder=4)  # fmt: skip
    ax0.set_xlim(bbox[0], bbox[2])
    ax0.set_ylim(bbox[3], bbox[1])
    ax0.set_aspect("equal")
    ax0.set_xlabel("x (µm)")
    ax0.set_ylabel("y (µm)")
    ax0.legend(fontsize=7, loc="upper right", framealpha=0.8)
    ax0.set_title("matched nuclei")

    if has_vectors:
        ax1.scatter(pairs["dx"], pairs["dy"], s=4, alpha=0.4, c="#555555", linewidths=0)
        lim = max(float(np.percentile(dist, 99)), 1e-3) * 1.1
    else:
        lim = max(p95, 1e-3) * 1.1
    if np.all(np.isfinite(sd)):
        ax1.add_patch(Ellipse((mean[0], mean[1]), 2 * sd[0], 2 * sd[1], fill=False, color="#d62728", ls=":",
                              label="offset ± 1 sd"))  # fmt: skip
    if np.all(np.isfinite(mean)):
        ax1.annotate("", xy=(mean[0], mean[1]), xytext=(0, 0),
                     arrowprops={"arrowstyle": "->", "color": "#d62728", "lw": 2})  # fmt: skip
        lim = max(lim, 1.2 * float(np.abs(mean).max()))
    ax1.add_patch(plt.Circle((0, 0), med, fill=False, ls="--", color="#1f77b4", label=f"median distance {med:.2f} µm"))
    ax1.set_xlim(-lim, lim)
    ax1.set_ylim(lim, -lim)
    ax1.set_aspect("equal")
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.axvline(0, color="grey", lw=0.5)
    ax1.set_xlabel("dx (µm), Xenium - H&E")
    ax1.set_ylabel("dy (µm)")
    ax1.set_title("offsets")
    ax1.legend(fontsize=7, loc="upper right", title=f"mean ({mean[0]:.2f}, {mean[1]:.2f}) µm", title_fontsize=7)

    ax2.hist(dist, bins=bins, color="#7f7f7f")
    ax2.axvline(med, color="#1f77b4", ls="--", label=f"median {med:.2f} µm")
    ax2.axvline(p95, color="#d62728", ls=":", label=f"95th pct {p95:.2f} µm")
    ax2.set_xlabel("match distance (µm)")
    ax2.set_ylabel("matched nuclei")
    ax2.set_title("distances")
    ax2.legend(fontsize=7)
    rate = stats.get("match_rate_cells")
    extra = f", {float(rate):.0%} of cells" if rate is not None and np.ndim(rate) == 0 else ""
    fig.suptitle(title or f"Registration QC: {key} ({len(pairs):,} matched nuclei{extra})")
    finish(fig, show=show, save=save, name=f"registration_{key}")
    return fig
