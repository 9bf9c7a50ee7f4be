"""Test helper: write an existing bundle's H&E again under a known transform (rotation, flip, scale, blur).

Stands in for ``synthetic_xenium``'s own options where a test needs a quick variant of a cached bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi


def transform_px(angle_deg: float = 0.0, flip: bool = False, zoom: float = 1.0) -> np.ndarray:
    """3 x 3 on H&E level-0 pixels: mirror x (optional), rotate, zoom (new pixels per old pixel)."""
    a = np.radians(angle_deg)
    lin = zoom * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    if flip:
        lin = lin @ np.diag([-1.0, 1.0])
    m = np.eye(3)
    m[:2, :2] = lin
    return m


def write_pyramid(path: Path, img: np.ndarray, mpp: float | None) -> None:
    """A pyramidal OME-TIFF (levels in SubIFDs, 512-px tiles) of an RGB, RGBA or one-channel uint8 image."""
    levels = [img]
    while min(levels[-1].shape[:2]) > 1024:
        a = levels[-1].astype(np.float32)
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].reshape(h // 2, 2, w // 2, 2, *a.shape[2:]).mean(axis=(1, 3))
        levels.append(a.round().astype(np.uint8))
    meta = {"axes": "YXS" if img.ndim == 3 else "YX"}
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    opts = {"tile": (512, 512), "compression": "zlib",
            "photometric": "rgb" if img.ndim == 3 and img.shape[2] in (3, 4) else "minisblack"}
    if img.ndim == 3 and img.shape[2] == 4:
        opts["extrasamples"] = [2]  # unassociated alpha
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, metadata=None, **opts)


class Deformation:
    """A smooth displacement (old H&E pixels) of the content shown at new pixel q: ``amp * (sin, sin)`` waves."""

    def __init__(self, amplitude_px: float, wavelength_px: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.amp = amplitude_px / np.sqrt(2)
        self.k = 2 * np.pi / wavelength_px
        self.ph = rng.uniform(0, 2 * np.pi, 4)

    def __call__(self, q: np.ndarray) -> np.ndarray:  # (n, 2) new px -> (n, 2) old-px displacement
        x, y = q[:, 0], q[:, 1]
        return self.amp * np.c_[np.sin(self.k * y + self.ph[0]) + 0.5 * np.sin(0.7 * self.k * x + self.ph[1]),
                                np.sin(self.k * x + self.ph[2]) + 0.5 * np.sin(0.6 * self.k * y + self.ph[3])] / 1.5


def warp_he(bundle: Path, out: Path, w: np.ndarray, *, mpp: float | None = -1.0, blur_px: float = 0.0,
            blank: bool = False, deform: Deformation | None = None) -> tuple[Path, np.ndarray]:
    """Write ``bundle``'s H&E mapped through ``w`` (old level-0 px -> new px, shifted into a tight box) to
    ``out``; returns the image path and its true alignment (new H&E px -> morphology px).

    ``mpp=-1`` records the original pixel size divided by the zoom, ``None`` records none. With ``deform``, new
    pixel q shows old pixel ``w^-1 q + deform(q)``; the returned alignment is then the affine part, and
    ``new_position(old_px, w_shifted, deform)`` gives where an old pixel went.
    """
    bundle, out = Path(bundle), Path(out)
    src = next(bundle.glob("*_he_image.ome.tif"))
    align = np.loadtxt(next(bundle.glob("*_he_imagealignment.csv")), delimiter=",")
    with tifffile.TiffFile(src) as t:
        img = t.series[0].levels[0].asarray()
        old_mpp = 0.2738
    h, w_ = img.shape[:2]
    corners = np.array([[0, 0, 1], [w_, 0, 1], [0, h, 1], [w_, h, 1]], float) @ w.T
    lo = corners[:, :2].min(axis=0)
    w = w.copy()
    w[:2, 2] -= lo - 20  # 20 px margin
    size = np.ceil(corners[:, :2].max(axis=0) - lo + 40).astype(int)
    inv = np.linalg.inv(w)
    matrix = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])
    offset = np.array([inv[1, 2], inv[0, 2]])
    new = np.empty((size[1], size[0], 3), np.uint8)
    coords = None
    if deform is not None:
        gy, gx = np.mgrid[0 : new.shape[0], 0 : new.shape[1]]
        q = np.c_[gx.ravel(), gy.ravel()].astype(np.float64)
        o = q @ inv[:2, :2].T + inv[:2, 2] + deform(q)
        coords = [o[:, 1].reshape(new.shape[:2]), o[:, 0].reshape(new.shape[:2])]
        del gy, gx, q, o
    for c in range(3):
        if coords is not None:
            ch = ndi.map_coordinates(img[..., c], coords, order=1, cval=255)
        else:
            ch = ndi.affine_transform(img[..., c], matrix, offset, output_shape=new.shape[:2], order=1, cval=255)
        if blur_px > 0:
            ch = ndi.gaussian_filter(ch, blur_px)
        new[..., c] = ch
    if blank:
        new[:] = 245
    zoom = float(np.sqrt(abs(np.linalg.det(w[:2, :2]))))
    path = out / "warped_he_image.ome.tif"
    out.mkdir(parents=True, exist_ok=True)
    write_pyramid(path, new, old_mpp / zoom if mpp == -1.0 else mpp)
    np.save(out / "w.npy", w)
    return path, align @ inv


def new_position(old_px: np.ndarray, w: np.ndarray, deform: Deformation | None) -> np.ndarray:
    """New-image pixels of old-image pixels (inverting the deformation by fixed-point iteration)."""
    q = np.c_[old_px, np.ones(len(old_px))] @ w.T
    q = q[:, :2]
    if deform is None:
        return q
    for _ in range(30):
        q = np.c_[old_px - deform(q), np.ones(len(old_px))] @ w.T
        q = q[:, :2]
    return q
