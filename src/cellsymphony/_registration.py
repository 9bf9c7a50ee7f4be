"""Geometry between the H&E pixel frame and the Xenium micrometre frame.

A sample's registry holds ``alignment`` (3 x 3, H&E pixel ``(x, y, 1)`` -> Xenium
morphology-image pixel, the convention of 10x's ``*_he_imagealignment.csv``) and
``pixel_size`` (micrometres per morphology pixel). Micrometres are morphology pixels
times ``pixel_size``; x runs to the right and y down, as ``obsm["spatial"]``.
"""

from __future__ import annotations

import numpy as np


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


def he_px_to_um(xy, alignment, pixel_size: float) -> np.ndarray:
    """Map H&E level-0 pixel coordinates ``(n, 2)`` (x, y) to Xenium micrometres."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    a = np.asarray(alignment, dtype=np.float64)
    return (xy @ a[:2, :2].T + a[:2, 2]) * float(pixel_size)


def um_to_he_px(xy, alignment, pixel_size: float) -> np.ndarray:
    """Map Xenium micrometres ``(n, 2)`` (x, y) to H&E level-0 pixel coordinates."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2) / float(pixel_size)
    inv = np.linalg.inv(np.asarray(alignment, dtype=np.float64))
    return xy @ inv[:2, :2].T + inv[:2, 2]


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

