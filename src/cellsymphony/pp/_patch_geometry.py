"""Geometry of cell patches and token pooling (numpy only, no torch).

Conventions
-----------
- Xenium frame: micrometres, x to the right, y down (as ``obsm["spatial"]``).
- A patch of ``size`` px at ``mpp`` um/px centred on ``(cx, cy)``: pixel ``(u, v)`` (column, row)
  has its centre at ``(cx + (u + 0.5 - size / 2) * mpp, cy + (v + 0.5 - size / 2) * mpp)``, so the
  centre point sits at continuous patch coordinate ``size / 2`` (between the two middle pixels).
- H&E pixels: continuous coordinates whose integers are pixel centres (the scikit-image / scipy
  convention) at level 0; level ``l`` with downsample ``d`` has ``x_l = (x_0 + 0.5) / d - 0.5``.
- Band grid (the default extraction, :mod:`cellsymphony.pp._bands`): one global pixel grid of ``mpp``
  um/px anchored at the micrometre origin, pixel ``(u, v)`` centred at ``((u + 0.5) mpp, (v + 0.5) mpp)``;
  a band patch is the ``size`` x ``size`` window of that grid whose centre is nearest the nucleus, so the
  nucleus lies within half a pixel of ``size / 2`` and its true position is kept for token pooling.
- Tokens: token ``(r, c)`` of a grid with stride ``s`` px covers ``[c s, (c + 1) s)`` and has its
  centre at ``((c + 0.5) s, (r + 0.5) s)`` in patch coordinates.
"""

from __future__ import annotations

import numpy as np


def patch_to_um(size: int, mpp: float) -> np.ndarray:
    """(3, 3) affine: patch pixel (u, v, 1) -> micrometre offset from the patch centre."""
    off = (0.5 - size / 2.0) * mpp
    return np.array([[mpp, 0.0, off], [0.0, mpp, off], [0.0, 0.0, 1.0]])


def um_to_level(alignment: np.ndarray, pixel_size: float, downsample: float) -> np.ndarray:
    """(3, 3) affine: Xenium micrometres -> continuous pixel coordinates of a pyramid level."""
    inv = np.linalg.inv(np.asarray(alignment, dtype=np.float64))
    scale_um = np.diag([1.0 / pixel_size, 1.0 / pixel_size, 1.0])
    lvl = np.array([[1.0 / downsample, 0, 0.5 / downsample - 0.5], [0, 1.0 / downsample, 0.5 / downsample - 0.5], [0, 0, 1]])
    return lvl @ inv @ scale_um


def spatial_order(xy: np.ndarray, band: float, *, anchor: float | None = None) -> np.ndarray:
    """Indices that visit points in serpentine bands of height ``band`` (good locality for tile caches).

    Bands start at the smallest y, or at ``anchor`` (e.g. 0: the bands of the global band grid)."""
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64)
    finite = np.isfinite(xy).all(axis=1)
    x = np.where(finite, xy[:, 0], 0.0)
    y = np.where(finite, xy[:, 1], 0.0)
    start = y.min() if anchor is None else float(anchor)
    row = np.floor((y - start) / max(band, 1e-9)).astype(np.int64)
    xs = np.where(row % 2 == 0, x, -x)
    return np.lexsort((xs, row)).astype(np.int64)


def token_pool_weights(
    pos_px: np.ndarray, grid: tuple[int, int], stride: float, radius_px: float | None = None
) -> np.ndarray:
    """Weights ``(n, rows * cols)`` over a token grid that pool the tokens at positions ``pos_px``.

    Parameters
    ----------
    pos_px
        ``(n, 2)`` nucleus positions (x, y) in patch pixel coordinates (a patch centred on the nucleus
        has it at ``(size / 2, size / 2)``).
    grid
        ``(rows, cols)`` of spatial tokens.
    stride
        Input pixels per token.
    radius_px
        ``None``: bilinear interpolation of the token grid at the position (the four tokens whose
        centres surround it; a nucleus at the patch centre of an even grid gets the central 2 x 2 with
        0.25 each). A radius: the mean of every token whose centre lies within ``radius_px`` of the
        position (at least the nearest token).

    Returns
    -------
    Row-stochastic float64 weights, row-major token order (``r * cols + c``).
    """
    pos = np.asarray(pos_px, dtype=np.float64).reshape(-1, 2)
    rows, cols = int(grid[0]), int(grid[1])
    n = len(pos)
    w = np.zeros((n, rows * cols))
    if radius_px is None:
        fx = pos[:, 0] / stride - 0.5
        fy = pos[:, 1] / stride - 0.5
        c0, r0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        wx1, wy1 = fx - c0, fy - r0
        ii = np.arange(n)
        for dr, wy in ((0, 1 - wy1), (1, wy1)):
            for dc, wx in ((0, 1 - wx1), (1, wx1)):
                r = np.clip(r0 + dr, 0, rows - 1)
                c = np.clip(c0 + dc, 0, cols - 1)
                np.add.at(w, (ii, r * cols + c), wy * wx)
        return w
    cy, cx = np.meshgrid((np.arange(rows) + 0.5) * stride, (np.arange(cols) + 0.5) * stride, indexing="ij")
    centres = np.stack([cx.ravel(), cy.ravel()], axis=1)
    d2 = ((pos[:, None, :] - centres[None]) ** 2).sum(-1)
    inside = d2 <= float(radius_px) ** 2 + 1e-9
    nearest = np.argmin(d2, axis=1)
    inside[np.arange(n), nearest] = True
    w = inside / inside.sum(axis=1, keepdims=True)
    return w


def tile_assignment(xy_um: np.ndarray, *, size: int, mpp: float, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest tile of one global grid for each cell, and the cell's position in that tile.

    Tile ``(i, j)`` is centred at ``(i * stride * mpp, j * stride * mpp)`` micrometres, so the grid
    depends only on ``(size, mpp, stride)``, never on which cells are processed together.

    Returns
    -------
    ``(ij, pos_px)``: integer tile indices ``(n, 2)`` and positions ``(n, 2)`` in tile pixels.
    """
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    step = stride * mpp
    ij = np.round(xy / step).astype(np.int64)
    pos = size / 2.0 + (xy - ij * step) / mpp
    return ij, pos


def grid_patch_origin(xy_um: np.ndarray, *, size: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """The band-grid window of ``size`` px nearest each centre: its top-left global pixel and the centre's
    position in it.

    Returns
    -------
    ``(origin, pos_px)``: integer ``(n, 2)`` global pixel indices (x, y) of each window's top-left pixel and
    float ``(n, 2)`` positions of the centres in window pixels (within half a pixel of ``size / 2``).
    """
    f = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2) / float(mpp)
    origin = np.round(f - size / 2.0).astype(np.int64)
    return origin, f - origin
