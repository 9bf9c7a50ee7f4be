"""The section's H&E in ``uns["spatial"][library_id]``, the layout scanpy and squidpy read.

``sc.pl.spatial`` and ``sq.pl.spatial_scatter`` draw an image under the cells when a modality's
``uns["spatial"][library_id]`` holds ``images["hires"]`` / ``images["lowres"]`` and ``scalefactors`` that turn
``obsm["spatial"]`` into pixels of those images (``pixel = coordinate * tissue_hires_scalef``). The H&E is
rotated and scaled relative to the Xenium frame, so a plain scale factor cannot map it: the image stored
here is the H&E resampled into the section frame (micrometres, origin at 0), with the alignment (and the
non-rigid part of a registration, where there is one). Only a coarse pyramid level is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._constants import REG_ALIGNMENT, REG_HE_MPP, REG_HE_PATH, REG_PIXEL_SIZE, SAMPLE_KEY, SPATIAL_KEY
from .._registration import registry_warp, um_to_he_px
from .._settings import logger

SPATIAL_UNS = "spatial"  # uns key scanpy and squidpy read
HIRES_PX = 2000  # longest side of the hires image (10x's tissue_hires_image.png)
LOWRES_PX = 600  # and of the lowres image
_BAND_ROWS = 1024  # level rows read at a time when a level is much finer than needed


def spatial_entry(
    he_path: str,
    alignment: np.ndarray,
    pixel_size: float,
    spatial_um: np.ndarray,
    *,
    cell_area: np.ndarray | None = None,
    he_mpp: float | None = None,
    warp: Mapping | None = None,
    hires_px: int = HIRES_PX,
    lowres_px: int = LOWRES_PX,
) -> dict:
    """One ``uns["spatial"][library_id]`` entry: the H&E resampled into the section frame, scale factors."""
    from skimage.transform import resize

    from ._he import HEImage

    xy = np.asarray(spatial_um, dtype=np.float64)
    finite = np.isfinite(xy).all(axis=1)
    extent = np.nanmax(xy[finite], axis=0) if finite.any() else np.array([1.0, 1.0])
    extent = np.maximum(extent, 1.0) * 1.02 + 10.0  # a margin beyond the last cell
    scale = float(hires_px) / float(extent.max())  # hires pixels per micrometre
    shape = (max(int(np.ceil(extent[1] * scale)), 1), max(int(np.ceil(extent[0] * scale)), 1))
    with HEImage(he_path, mpp=he_mpp, cache_tiles=0) as he:
        hires = _resample(he, alignment, pixel_size, scale, shape, warp)
    f = float(lowres_px) / float(hires_px)
    low_shape = (max(round(shape[0] * f), 1), max(round(shape[1] * f), 1))
    lowres = (resize(hires, (*low_shape, 3), anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
    return {
        "images": {"hires": hires, "lowres": lowres},
        "scalefactors": {
            "tissue_hires_scalef": scale,
            "tissue_lowres_scalef": scale * low_shape[1] / shape[1],
            "spot_diameter_fullres": _cell_diameter(xy[finite], cell_area),
        },
        "metadata": {"source_image_path": str(he_path), "coordinate_unit": "micrometre"},
    }


def _cell_diameter(xy: np.ndarray, cell_area: np.ndarray | None) -> float:
    """Typical cell diameter (um): from the cell areas, else the median distance to the nearest cell."""
    if cell_area is not None:
        a = np.asarray(cell_area, dtype=np.float64)
        a = a[np.isfinite(a) & (a > 0)]
        if len(a):
            return float(2.0 * np.sqrt(np.median(a) / np.pi))
    if len(xy) < 2:
        return 10.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _resample(he, alignment, pixel_size: float, scale: float, shape: tuple[int, int], warp) -> np.ndarray:
    """RGB uint8 ``shape`` image whose pixel (r, c) shows the H&E at micrometres (c / scale, r / scale)."""
    from scipy.ndimage import map_coordinates

    um_per_px = 1.0 / scale
    level = he.best_level(um_per_px)
    ds = float(he.downsamples[level])
    k = max(int(np.floor(um_per_px / he.level_mpp(level))), 1)  # block-average the level by k first
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    um = np.column_stack([cols.ravel() * um_per_px, rows.ravel() * um_per_px])
    px = um_to_he_px(um, alignment, pixel_size, warp) / ds  # pixels of the level
    h, w = he.shapes[level]
    ok = (px[:, 0] > -1) & (px[:, 0] < w) & (px[:, 1] > -1) & (px[:, 1] < h)
    out = np.full((shape[0] * shape[1], 3), 255, dtype=np.uint8)
    if ok.any():
        x0, y0 = (max(int(np.floor(v)) - k, 0) for v in px[ok].min(axis=0))
        x1 = min(int(np.ceil(px[ok, 0].max())) + k + 1, w)
        y1 = min(int(np.ceil(px[ok, 1].max())) + k + 1, h)
        small = _read_reduced(he, level, x0, y0, x1 - x0, y1 - y0, k)
        cx = (px[ok, 0] - x0 - (k - 1) / 2.0) / k
        cy = (px[ok, 1] - y0 - (k - 1) / 2.0) / k
        for c in range(3):
            out[ok, c] = np.clip(
                map_coordinates(small[..., c], [cy, cx], order=1, mode="nearest") + 0.5, 0, 255
            ).astype(np.uint8)
    logger.debug("resampled the H&E (level %d, block %d) into a %d x %d section image", level, k, *shape[::-1])
    return out.reshape(shape[0], shape[1], 3)


def _read_reduced(he, level: int, x: int, y: int, width: int, height: int, k: int) -> np.ndarray:
    """A level region as float32, averaged over k x k blocks, read in bands of rows (bounded memory)."""
    hk, wk = max(height // k, 1), max(width // k, 1)
    out = np.empty((hk, wk, 3), dtype=np.float32)
    band = max(_BAND_ROWS // k, 1) * k
    for r0 in range(0, hk * k, band):
        n = min(band, hk * k - r0)
        region = he.read_region(x, y + r0, wk * k, n, level=level).astype(np.float32)
        out[r0 // k : (r0 + n) // k] = region.reshape(n // k, k, wk, k, 3).mean(axis=(1, 3))
    return out


def attach_spatial_images(mdata: Any, sample: str) -> None:
    """Write (or refresh) ``uns["spatial"][sample]`` on every modality from the sample's registry."""
    from .._validate import sample_registry

    reg = sample_registry(mdata, sample)
    he_path = str(reg.get(REG_HE_PATH, "") or "")
    mods = dict(getattr(mdata, "mod", {}))
    if not he_path or not np.isfinite(np.asarray(reg[REG_ALIGNMENT], dtype=np.float64)).all():
        for a in mods.values():
            if isinstance(a.uns.get(SPATIAL_UNS), Mapping):
                a.uns[SPATIAL_UNS].pop(sample, None)
        return
    in_sample = np.asarray(mdata.obs[SAMPLE_KEY].astype(str) == sample)
    xy = np.asarray(mdata.obsm[SPATIAL_KEY], dtype=np.float64)[in_sample]
    area = None
    for a in mods.values():
        if "cell_area" in a.obs:
            area = a.obs["cell_area"].reindex(mdata.obs_names[in_sample]).to_numpy(np.float64)
            break
    mpp = float(reg.get(REG_HE_MPP, np.nan))
    entry = spatial_entry(he_path, np.asarray(reg[REG_ALIGNMENT]), float(reg[REG_PIXEL_SIZE]), xy, cell_area=area,
                          he_mpp=mpp if np.isfinite(mpp) and mpp > 0 else None, warp=registry_warp(reg))
    for a in mods.values():
        block = a.uns.get(SPATIAL_UNS)
        block = dict(block) if isinstance(block, Mapping) else {}
        block[sample] = entry
        a.uns[SPATIAL_UNS] = block
