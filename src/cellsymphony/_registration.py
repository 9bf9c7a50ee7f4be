"""Geometry between the H&E pixel frame and the Xenium micrometre frame.

A sample's registry holds ``alignment`` (3 x 3, H&E pixel ``(x, y, 1)`` -> Xenium
morphology-image pixel, the convention of 10x's ``*_he_imagealignment.csv``) and
``pixel_size`` (micrometres per morphology pixel). Micrometres are morphology pixels
times ``pixel_size``; x runs to the right and y down, as ``obsm["spatial"]``.

A registry may also hold ``nonrigid`` (written by :func:`cellsymphony.io.register_he` with
``nonrigid=True``): a smooth displacement field in micrometres added after the affine,
sampled on a regular grid of H&E level-0 pixels (``grid_um`` ``(rows, cols, 2)``, the pixel
position ``origin_px`` ``(x, y)`` of grid node ``[0, 0]`` and the node spacing ``step_px``),
interpolated bilinearly and held constant beyond the grid. Every function here that takes
``warp=`` applies it: H&E pixel ``p`` lies at ``alignment(p) * pixel_size + d(p)`` um.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._constants import REG_NONRIGID as NONRIGID_KEY


def check_alignment(matrix, source: str = "alignment") -> np.ndarray:
    """Validate a 3 x 3 affine (finite, non-singular, last row 0 0 1) and return it as float64."""
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: the alignment must be a 3 x 3 numeric matrix ({err}).") from None
    if m.shape != (3, 3):
        raise ValueError(
            f"{source}: the alignment must be a 3 x 3 matrix (H&E pixel -> Xenium morphology pixel), "
            f"got shape {m.shape}."
        )
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{source}: the alignment matrix has non-finite entries.")
    if not np.allclose(m[2], [0, 0, 1], atol=1e-6):
        raise ValueError(f"{source}: the alignment's last row must be 0 0 1 (an affine), got {m[2].tolist()}.")
    det = np.linalg.det(m[:2, :2])
    if abs(det) < 1e-12:
        raise ValueError(f"{source}: the alignment matrix is singular (determinant {det:.3g}); check the file.")
    return m


def registry_warp(reg: Mapping | None) -> dict | None:
    """The non-rigid field of a sample's registry (None when it has none)."""
    if not isinstance(reg, Mapping):
        return None
    w = reg.get(NONRIGID_KEY)
    if not isinstance(w, Mapping) or "grid_um" not in w:
        return None
    grid = np.asarray(w["grid_um"], dtype=np.float64)
    if grid.ndim != 3 or grid.shape[2] != 2 or grid.size == 0:
        return None
    return {
        "grid_um": grid,
        "origin_px": np.asarray(w["origin_px"], dtype=np.float64).reshape(2),
        "step_px": float(np.asarray(w["step_px"]).ravel()[0]),
    }


def warp_displacement(warp: Mapping, xy_px) -> np.ndarray:
    """The non-rigid displacement (micrometres) at H&E level-0 pixels ``(n, 2)``; bilinear, constant beyond."""
    from scipy.ndimage import map_coordinates

    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    grid = np.asarray(warp["grid_um"], dtype=np.float64)
    f = (xy - np.asarray(warp["origin_px"], dtype=np.float64)) / float(warp["step_px"])
    rows = np.clip(f[:, 1], 0, grid.shape[0] - 1)
    cols = np.clip(f[:, 0], 0, grid.shape[1] - 1)
    ok = np.isfinite(rows) & np.isfinite(cols)
    out = np.full((len(xy), 2), np.nan)
    for k in range(2):
        out[ok, k] = map_coordinates(grid[..., k], [rows[ok], cols[ok]], order=1, mode="nearest")
    return out


def he_px_to_um(xy, alignment, pixel_size: float, warp: Mapping | None = None) -> np.ndarray:
    """Map H&E level-0 pixel coordinates ``(n, 2)`` (x, y) to Xenium micrometres (through ``warp`` if given)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    a = np.asarray(alignment, dtype=np.float64)
    um = (xy @ a[:2, :2].T + a[:2, 2]) * float(pixel_size)
    if warp is not None:
        um = um + warp_displacement(warp, xy)
    return um


def um_to_he_px(xy, alignment, pixel_size: float, warp: Mapping | None = None) -> np.ndarray:
    """Map Xenium micrometres ``(n, 2)`` (x, y) to H&E level-0 pixel coordinates (inverting ``warp`` if given,
    by fixed-point iteration: the field is smooth, so a few steps reach a small fraction of a pixel)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    inv = np.linalg.inv(np.asarray(alignment, dtype=np.float64))
    ps = float(pixel_size)
    px = (xy / ps) @ inv[:2, :2].T + inv[:2, 2]
    if warp is None:
        return px
    for _ in range(8):
        new = ((xy - warp_displacement(warp, px)) / ps) @ inv[:2, :2].T + inv[:2, 2]
        step = np.nanmax(np.abs(new - px)) if len(px) else 0.0
        px = new
        if not step > 1e-3:
            break
    return px


def local_um_to_he_affine(xy_um, alignment, pixel_size: float, warp: Mapping | None = None,
                          h_um: float = 1.0) -> np.ndarray:
    """Per point ``(n, 3, 3)``: the affine that best approximates the map micrometres -> H&E level-0 pixels near
    each point (the global inverse without a warp; with one, its Jacobian by central differences)."""
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    inv = np.linalg.inv(np.asarray(alignment, dtype=np.float64)) @ np.diag([1 / float(pixel_size)] * 2 + [1.0])
    out = np.broadcast_to(inv, (n, 3, 3)).copy()
    if warp is None or n == 0:
        return out
    c = um_to_he_px(xy, alignment, pixel_size, warp)
    dx = (um_to_he_px(xy + [h_um, 0], alignment, pixel_size, warp) - um_to_he_px(xy - [h_um, 0], alignment, pixel_size, warp)) / (2 * h_um)
    dy = (um_to_he_px(xy + [0, h_um], alignment, pixel_size, warp) - um_to_he_px(xy - [0, h_um], alignment, pixel_size, warp)) / (2 * h_um)
    out[:, :2, 0] = dx
    out[:, :2, 1] = dy
    out[:, :2, 2] = c - np.einsum("nij,nj->ni", out[:, :2, :2], xy)
    return out


def exact_downsample(ds: float) -> float:
    """A pyramid level's downsample factor as the integer it approximates (the ratio of level sizes is off by up
    to one pixel over the image, e.g. 2.0003 for ``floor(h / 2)``, which would shift far pixels by a pixel)."""
    r = round(float(ds))
    return float(r) if r >= 1 and abs(ds - r) <= 0.01 * ds else float(ds)


def he_px_per_um(alignment, pixel_size: float) -> float:
    """Mean number of H&E level-0 pixels per micrometre along the axes (from the affine's scale)."""
    a = np.asarray(alignment, dtype=np.float64)[:2, :2] * float(pixel_size)
    return float(1.0 / np.sqrt(abs(np.linalg.det(a))))


def inside_image(px, shape) -> np.ndarray:
    """Whether H&E level-0 pixel coordinates ``(n, 2)`` (x, y) fall inside an image of ``shape`` (height, width).

    Coordinates are continuous, pixel ``i`` covering ``[i, i + 1)``; NaN coordinates are outside.
    """
    px = np.asarray(px, dtype=np.float64).reshape(-1, 2)
    h, w = shape[:2]
    return (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)



def apply_affine(t, xy) -> np.ndarray:
    """Points ``(n, 2)`` through a 3 x 3 affine."""
    t = np.asarray(t, dtype=np.float64)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return xy @ t[:2, :2].T + t[:2, 2]


def fit_affine(src, dst, kind: str = "affine") -> np.ndarray:
    """3 x 3 transform taking ``src`` onto ``dst`` (least squares): ``"affine"`` or ``"shift"``."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    t = np.eye(3)
    if kind == "shift":
        t[:2, 2] = (dst - src).mean(axis=0)
        return t
    # centred for conditioning (pixel coordinates run to 10^5)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    design = np.column_stack([src - ms, np.ones(len(src))])
    coef, *_ = np.linalg.lstsq(design, dst - md, rcond=None)  # (3, 2)
    t[:2, :2] = coef[:2].T
    t[:2, 2] = md + coef[2] - t[:2, :2] @ ms
    return t


def mutual_nearest(a, b, max_d: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairs ``(index in a, index in b, distance)`` of points that are each other's nearest
    neighbour within ``max_d``; NaN points take no part."""
    from scipy.spatial import cKDTree

    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    empty = (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    ok_a = np.flatnonzero(np.isfinite(a).all(axis=1))
    ok_b = np.flatnonzero(np.isfinite(b).all(axis=1))
    if ok_a.size == 0 or ok_b.size == 0:
        return empty
    pa, pb = a[ok_a], b[ok_b]
    d_b, j_b = cKDTree(pa).query(pb, distance_upper_bound=max_d)  # nearest a of each b
    _, j_a = cKDTree(pb).query(pa, distance_upper_bound=max_d)  # nearest b of each a
    has = np.flatnonzero(np.isfinite(d_b))
    cand = j_b[has]
    mutual = j_a[cand] == has
    return ok_a[cand[mutual]], ok_b[has[mutual]], d_b[has[mutual]]
