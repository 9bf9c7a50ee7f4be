"""Test helpers: H&E images made from a synthetic bundle's H&E (blank, out of focus, RGBA, one channel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi


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


def altered_he(src: Path, out: Path, *, mpp: float = 0.2738, blank: bool = False, blur_um: float = 0.0,
               mode: str = "rgb", keep_left: float = 1.0, pad_px: int = 0) -> Path:
    """``src``'s level 0 written again: blank, blurred by ``blur_um``, as RGBA or one channel, only its left
    ``keep_left`` fraction (same pixel coordinates), or inside a white (slide) border of ``pad_px`` pixels (pixel
    coordinates shifted by ``pad_px``)."""
    img = tifffile.imread(src, level=0)
    if keep_left < 1.0:
        img = img[:, : int(img.shape[1] * keep_left)]
    if pad_px:
        img = np.pad(img, ((pad_px, pad_px), (pad_px, pad_px), (0, 0)), constant_values=242)
    if blur_um > 0:
        img = np.stack([ndi.gaussian_filter(img[..., c], blur_um / mpp) for c in range(3)], axis=2)
    if blank:
        img = np.full_like(img, 245)
    if mode == "rgba":
        img = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif mode == "grey":
        img = img.mean(axis=2).round().astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid(out, img, mpp)
    return out
