"""Small H&E images with a known registration, for the morphology tests.

A slide is drawn in H&E pixels from objects placed in Xenium micrometres through the inverse of a
rotated, scaled, flipped and shifted alignment, and written as a tiled OME-TIFF pyramid (YXS or planar
CYX, 2 x 2 block-averaged levels); the MuData is built with the registry layout of cs.io.read_xenium.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from cellsymphony._registration import um_to_he_px

HE_MPP = 0.25
PIXEL_SIZE = 0.2125
SAMPLE = "s1"


def rotated_alignment(angle_deg: float = 30.0, scale: float = 1.1, flip: bool = True) -> np.ndarray:
    """H&E pixel -> Xenium morphology pixel: a rotation, a flip of x, a scale and a shift."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    lin = rot @ np.diag([-1.0 if flip else 1.0, 1.0]) * (HE_MPP / PIXEL_SIZE) * scale
    a = np.eye(3)
    a[:2, :2] = lin
    a[:2, 2] = [1500.0, 200.0]
    return a


def block_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    return img[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def write_he(path: Path, img: np.ndarray, *, mpp: float = HE_MPP, axes: str = "YXS", n_sub: int = 2, tile: int = 128) -> Path:
    """A tiled OME-TIFF pyramid (sub-resolutions in SubIFDs, each 2 x 2 block means of the last)."""
    levels = [img]
    for _ in range(n_sub):
        levels.append(block_mean(levels[-1], 2))
    planar = axes == "CYX"
    kw = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    if planar:
        kw["planarconfig"] = "separate"
    with tifffile.TiffWriter(path, ome=True) as w:
        for i, lev in enumerate(levels):
            data = np.moveaxis(lev, -1, 0) if planar else lev
            if i == 0:
                w.write(data, subifds=n_sub, metadata={"axes": axes, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **kw)
            else:
                w.write(data, subfiletype=1, **kw)
    return path


def draw_disc(img: np.ndarray, xy_px, radius_px: float, colour) -> None:
    """Paint a filled disc (H&E pixel centre convention: integers are pixel centres)."""
    h, w = img.shape[:2]
    x, y = xy_px
    r = int(np.ceil(radius_px)) + 1
    ys, xs = np.mgrid[max(0, int(y) - r) : min(h, int(y) + r + 2), max(0, int(x) - r) : min(w, int(x) + r + 2)]
    inside = (xs - x) ** 2 + (ys - y) ** 2 <= radius_px**2
    img[ys[inside], xs[inside]] = colour


def make_mudata(xy_um: np.ndarray, he_path: Path | str, alignment: np.ndarray, *, nucleus_xy: np.ndarray | None = None):
    """A MuData with the read_xenium layout (morphology modality and registry) for given cell centres."""
    import anndata as ad
    import mudata as md

    n = len(xy_um)
    obs = pd.DataFrame(
        {"cell_area": np.full(n, 80.0), "nucleus_area": np.full(n, 30.0), "sample": pd.Categorical([SAMPLE] * n)},
        index=[f"cell{i}" for i in range(n)],
    )
    a = ad.AnnData(np.zeros((n, 0), dtype=np.float32), obs=obs)
    a.obsm["spatial"] = np.asarray(xy_um, dtype=np.float64)
    a.obsm["nucleus_centroid"] = np.asarray(xy_um if nucleus_xy is None else nucleus_xy, dtype=np.float64)
    m = md.MuData({"morphology": a})
    m.uns["cellsymphony"] = {
        "samples": {
            SAMPLE: {
                "he_path": str(he_path),
                "alignment": np.asarray(alignment, dtype=np.float64),
                "pixel_size": PIXEL_SIZE,
                "he_mpp": HE_MPP,
                "xenium_path": "",
            }
        }
    }
    return m


@functools.cache
def tissue(folder: str, n_cells: int = 40, seed: int = 0, axes: str = "YXS"):
    """A small textured 'tissue' slide with dark nuclei at the cells; returns (he_path, alignment, xy_um)."""
    rng = np.random.default_rng(seed)
    align = rotated_alignment()
    h, w = 900, 1100
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [
            225 + 20 * np.sin(xx / 9.0),
            170 + 30 * np.cos(yy / 13.0) * np.sin(xx / 17.0),
            205 + 25 * np.sin((xx + yy) / 11.0),
        ],
        axis=-1,
    )
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    # cells inside the image, in micrometres (through the registration)
    inv_corners = np.array([[150, 150], [w - 150, 150], [150, h - 150], [w - 150, h - 150]], dtype=float)
    from cellsymphony._registration import he_px_to_um

    corners_um = he_px_to_um(inv_corners, align, PIXEL_SIZE)
    lo, hi = corners_um.min(0), corners_um.max(0)
    xy = []
    while len(xy) < n_cells:
        p = rng.uniform(lo, hi)
        q = um_to_he_px(p, align, PIXEL_SIZE)[0]
        if 60 < q[0] < w - 60 and 60 < q[1] < h - 60:
            xy.append(p)
    xy = np.array(xy)
    for p, r in zip(um_to_he_px(xy, align, PIXEL_SIZE), rng.uniform(2.5, 5.0, n_cells), strict=True):
        draw_disc(img, p, r / HE_MPP, (70 + rng.integers(0, 40), 40, 120 + rng.integers(0, 40)))
    path = write_he(Path(folder) / f"tissue_{axes}.ome.tif", img, axes=axes)
    return path, align, xy


def one_torch_thread():
    """Generator for an autouse fixture: one torch thread (the tiny models gain nothing from more, and
    on a shared 2-core machine extra threads only spin), restored afterwards."""
    from cellsymphony.pp._patch_source import one_thread

    with one_thread():
        yield


def quiet_morphology():
    """Generator for an autouse fixture: no progress bars, and the untrained-encoder and FutureWarning
    messages the morphology tests provoke on purpose silenced, restored afterwards."""
    import cellsymphony as cs

    cs.settings.progress = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*untrained.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield
