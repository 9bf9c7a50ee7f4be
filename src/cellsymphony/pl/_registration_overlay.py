"""QC figure of an automatic H&E registration (:func:`cellsymphony.io.register_he`): DAPI over the registered
H&E at section, region and cellular zoom, and the residual map of the matched nuclei."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._constants import REG_ALIGNMENT, REG_HE_PATH, REG_PIXEL_SIZE, REG_XENIUM_PATH, REGISTRATION_KEY
from .._registration import exact_downsample, he_px_per_um, registry_warp, um_to_he_px
from .._settings import logger

DAPI_COLOUR = np.array([0.05, 0.95, 0.35])


@dataclass
class View:
    """What the figure needs, from a Registration or from a MuData's registry and ``uns["he_registration"]``."""

    sample: str
    he_path: str
    alignment: np.ndarray
    pixel_size: float
    warp: dict | None
    xenium_path: str
    residuals: pd.DataFrame
    qc: dict


def is_registration(data: Any) -> bool:
    """Whether ``data`` is a :class:`cellsymphony.io.Registration`, checked without importing ``io`` (whose
    ``Registration.plot`` imports this subpackage: importing it here would close an import cycle)."""
    return type(data).__name__ == "Registration" and hasattr(data, "qc") and hasattr(data, "residuals")


def view_of(data: Any, sample: str | None) -> View:
    if is_registration(data):
        return View(data.sample, data.he_path, data.alignment, data.pixel_size, data.nonrigid, data.xenium_path,
                    data.residuals, dict(data.qc))
    from .._validate import samples_registry

    block = data.uns.get(REGISTRATION_KEY) if hasattr(data, "uns") else None
    per = block.get("samples", {}) if isinstance(block, Mapping) else {}
    if not per:
        raise ValueError(f"No uns[{REGISTRATION_KEY!r}]: register the H&E with cs.io.register_he(...).apply(mdata) "
                         "(or read_xenium(..., he_alignment='auto')).")
    if sample is None:
        if len(per) != 1:
            raise ValueError(f"Several registered samples {sorted(per)}: pass sample=.")
        sample = next(iter(per))
    if sample not in per:
        raise ValueError(f"Sample {sample!r} has no automatic registration (registered: {sorted(per)}).")
    entry = dict(per[sample])
    reg = samples_registry(data)[sample]
    res = entry.pop("residuals", None)
    if not isinstance(res, pd.DataFrame):
        res = pd.DataFrame(columns=["x_um", "y_um", "dx_um", "dy_um", "distance_um", "inlier"])
    return View(str(sample), str(reg[REG_HE_PATH]), np.asarray(reg[REG_ALIGNMENT], float), float(reg[REG_PIXEL_SIZE]),
                registry_warp(reg), str(reg.get(REG_XENIUM_PATH, "") or ""), res, entry)


# ---------------------------------------------------------------------------------------------- rendering
def _grid(bbox, r):
    x0, y0, x1, y1 = bbox
    nx, ny = max(int(np.ceil((x1 - x0) / r)), 1), max(int(np.ceil((y1 - y0) / r)), 1)
    gx = x0 + (np.arange(nx) + 0.5) * r
    gy = y0 + (np.arange(ny) + 0.5) * r
    X, Y = np.meshgrid(gx, gy)
    return np.c_[X.ravel(), Y.ravel()], (ny, nx)


def render_he(v: View, bbox, r: float) -> np.ndarray:
    """The H&E resampled into the Xenium frame on the grid of ``bbox`` (um) at ``r`` um per pixel, RGB in [0, 1]
    (white outside the image); only the needed region of one pyramid level is read."""
    from scipy.ndimage import map_coordinates

    from ..io._read_he import read_he

    pts, shape = _grid(bbox, r)
    px = um_to_he_px(pts, v.alignment, v.pixel_size, v.warp)
    out = np.ones(shape + (3,))
    ok = np.isfinite(px).all(axis=1)
    if not ok.any() or not v.he_path or not Path(v.he_path).exists():
        return out
    um_per_px0 = 1.0 / he_px_per_um(v.alignment, v.pixel_size)
    with read_he(v.he_path, mpp=1.0, cache_tiles=0) as he:  # geometry from the registration, not the file
        want = max(r / um_per_px0, 1.0)
        level = max(i for i, d in enumerate(he.downsamples) if d <= want * 1.0001)
        ds = exact_downsample(he.downsamples[level])
        lp = (px[ok] + 0.5) / ds - 0.5
        lo = np.floor(lp.min(axis=0)).astype(int) - 1
        hi = np.ceil(lp.max(axis=0)).astype(int) + 2
        h_l, w_l = he.shapes[level]
        lo = np.maximum(lo, [-1, -1])
        hi = np.minimum(hi, [w_l + 1, h_l + 1])
        if (hi - lo).min() <= 0 or (hi - lo).prod() > 64e6:
            return out
        region = he.read_region(int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1]), level=level)
    rgb = np.ones((len(pts), 3))
    coords = [lp[:, 1] - lo[1], lp[:, 0] - lo[0]]
    for c in range(3):
        rgb[ok, c] = map_coordinates(region[..., c].astype(np.float32), coords, order=1, cval=255.0) / 255.0
    return rgb.reshape(shape + (3,))


def render_dapi(v: View, bbox, r: float) -> np.ndarray | None:
    """The DAPI image on the same grid, scaled to [0, 1] (1st-99.5th percentiles); None without an image."""
    from scipy.ndimage import map_coordinates

    from ..io._morphology_image import MorphologyImage, find_dapi

    path = find_dapi(Path(v.xenium_path)) if v.xenium_path and Path(v.xenium_path).is_dir() else None
    if path is None:
        return None
    pts, shape = _grid(bbox, r)
    with MorphologyImage(path, v.pixel_size) as m:
        img, cx, cy, s = m.read_window(*bbox, r)
    if img.size == 0:
        return np.zeros(shape)
    vals = map_coordinates(img, [(pts[:, 1] - cy) / s - 0.5, (pts[:, 0] - cx) / s - 0.5], order=1, cval=np.nan)
    fin = vals[np.isfinite(vals)]
    if fin.size == 0:
        return np.zeros(shape)
    lo, hi = np.percentile(fin, [1.0, 99.5])
    return np.clip((np.nan_to_num(vals, nan=lo) - lo) / max(hi - lo, 1e-9), 0, 1).reshape(shape)


def overlay(he_rgb: np.ndarray, dapi: np.ndarray | None) -> np.ndarray:
    """DAPI in green over the H&E (the nuclei of a good registration are purple under green)."""
    if dapi is None:
        return he_rgb
    a = 0.75 * dapi[..., None]
    return he_rgb * (1 - a) + a * DAPI_COLOUR


# ---------------------------------------------------------------------------------------------- figure
def extent_of(v: View) -> tuple[float, float]:
    from ..io._morphology_image import MorphologyImage, find_dapi

    path = find_dapi(Path(v.xenium_path)) if v.xenium_path and Path(v.xenium_path).is_dir() else None
    if path is not None:
        with MorphologyImage(path, v.pixel_size) as m:
            h, w = m.shapes[0]
        return w * v.pixel_size, h * v.pixel_size
    if len(v.residuals):
        return (float(v.residuals["x_um"].max()) + 20.0, float(v.residuals["y_um"].max()) + 20.0)
    return (1000.0, 1000.0)


def registration_overlay(data: Any, *, sample: str | None = None, region_um: float = 300.0, cell_um: float = 50.0,
                         center=None, section_px: int = 500, title: str | None = None):
    """The figure: DAPI over the registered H&E at three zooms, the residual map, the residual distances, the QC."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    v = view_of(data, sample)
    w, h = extent_of(v)
    res = v.residuals
    ok = bool(v.qc.get("ok"))
    if center is None:
        if len(res):
            mid = res[["x_um", "y_um"]].median().to_numpy(float)
            xy = res[["x_um", "y_um"]].to_numpy(float)
            center = xy[np.argmin(np.hypot(*(xy - mid).T))]
        else:
            center = (w / 2, h / 2)
    cx, cy = float(center[0]), float(center[1])
    region_um = min(region_um, max(w, h))
    boxes = {
        "section": (0.0, 0.0, w, h),
        "region": (cx - region_um / 2, cy - region_um / 2, cx + region_um / 2, cy + region_um / 2),
        "cells": (cx - cell_um / 2, cy - cell_um / 2, cx + cell_um / 2, cy + cell_um / 2),
    }
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.5), layout="constrained")
    for ax, (name, box) in zip(axes[0], boxes.items(), strict=True):
        r = max((box[2] - box[0]), (box[3] - box[1])) / (section_px if name == "section" else 400)
        try:
            img = overlay(render_he(v, box, r), render_dapi(v, box, r))
        except Exception as err:  # noqa: BLE001 - a QC figure draws what it can
            logger.warning("registration figure: cannot render the %s view (%s)", name, err)
            img = np.ones((2, 2, 3))
        ax.imshow(img, extent=(box[0], box[2], box[3], box[1]), interpolation="antialiased")
        ax.set_xlim(box[0], box[2])
        ax.set_ylim(box[3], box[1])
        ax.set_title(f"DAPI (green) over H&E: {name}")
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
        if name == "cells" and len(res):
            win = res[(res["x_um"].between(box[0], box[2])) & (res["y_um"].between(box[1], box[3]))]
            ax.scatter(win["x_um"], win["y_um"], s=30, marker="+", c="white", linewidths=1.2, label="Xenium nucleus")
            ax.scatter(win["x_um"] - win["dx_um"], win["y_um"] - win["dy_um"], s=24, marker="x", c="#d62728",
                       linewidths=1.0, label="H&E nucleus")  # fmt: skip
            ax.legend(fontsize=7, loc="upper right", framealpha=0.7)
    for name, colour in (("region", "white"), ("cells", "yellow")):
        b = boxes[name]
        for ax in axes[0][: 1 if name == "region" else 2]:
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=colour, lw=1.2))

    ax = axes[1][0]
    if len(res):
        d = res["distance_um"].to_numpy(float)
        vmax = max(2.0, float(np.percentile(d, 95)))
        sc = ax.scatter(res["x_um"], res["y_um"], c=d, s=3, cmap="viridis", vmin=0, vmax=vmax, linewidths=0)
        fig.colorbar(sc, ax=ax, label="residual (µm)", shrink=0.8)
        # mean residual vectors per 100 um square, drawn 20 x longer
        key = np.floor(res[["x_um", "y_um"]].to_numpy(float) / 100.0).astype(int)
        grp = pd.DataFrame({"kx": key[:, 0], "ky": key[:, 1], "x": res["x_um"], "y": res["y_um"], "dx": res["dx_um"],
                            "dy": res["dy_um"]}).groupby(["kx", "ky"]).mean()  # fmt: skip
        ax.quiver(grp["x"], grp["y"], grp["dx"], grp["dy"], angles="xy", scale_units="xy", scale=1 / 20.0,
                  color="#d62728", width=0.004, label="mean residual x 20")  # fmt: skip
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no matched nuclei", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")
    ax.set_title("residual map (Xenium minus registered H&E)")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")

    ax = axes[1][1]
    if len(res):
        d = res["distance_um"].to_numpy(float)
        ax.hist(np.clip(d, 0, 10), bins=50, color="#7f7f7f")
        med, p95 = float(np.median(d)), float(np.percentile(d, 95))
        ax.axvline(med, color="#1f77b4", ls="--", label=f"median {med:.2f} µm")
        ax.axvline(p95, color="#d62728", ls=":", label=f"95th pct {p95:.2f} µm")
        ax.legend(fontsize=7)
    ax.set_xlabel("residual distance (µm, clipped at 10)")
    ax.set_ylabel("matched nuclei")
    ax.set_title("residuals")

    ax = axes[1][2]
    ax.axis("off")
    keys = ("ok", "reason", "n_matched", "median_um", "p95_um", "inlier_fraction", "match_rate", "chance_match_rate",
            "scale_um_per_px", "scale_estimated", "mpp_recorded", "angle_deg", "flipped", "nonrigid", "nonrigid_max_um",
            "coarse_source", "time_total_s")  # fmt: skip
    lines = []
    for k in keys:
        if k in v.qc:
            val = v.qc[k]
            val = f"{float(val):.3g}" if isinstance(val, float | np.floating) else str(val)
            if k == "reason" and len(val) > 60:
                val = val[:57] + "..."
            lines.append(f"{k}: {val}")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, transform=ax.transAxes,
            color="black" if ok else "#b00000")
    ax.set_title("QC: " + ("ok" if ok else "FAILED"), color="black" if ok else "#b00000")
    fig.suptitle(title or f"H&E registration of sample {v.sample!r}: {Path(v.he_path).name}")
    return fig
