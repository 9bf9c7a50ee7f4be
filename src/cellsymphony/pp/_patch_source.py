"""Reading registered H&E patches in the Xenium frame: one picklable source per sample.

:class:`PatchSource` carries only paths and numbers (no open file), so it can be shipped to
DataLoader workers or dask workers; each process opens the slide once, on first use, and keeps
its tile cache for the rest of its life.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .._constants import REG_ALIGNMENT, REG_HE_MPP, REG_HE_PATH, REG_PIXEL_SIZE, SAMPLE_KEY
from .._coordinates import cell_coordinates
from .._registration import check_alignment, he_px_per_um, local_um_to_he_affine, registry_warp, um_to_he_px
from .._validate import samples_registry
from ._patch_geometry import patch_to_um, spatial_order, um_to_level


@dataclass
class PatchSource:
    """Where one sample's patches come from: the H&E file and its registration to the Xenium frame."""

    he_path: str
    alignment: np.ndarray
    pixel_size: float
    he_mpp: float | None = None
    sample: str = ""
    cache_tiles: int = 512
    warp: dict | None = None  # the registry's non-rigid field (cs.io.register_he(nonrigid=True)), if any
    # decoded tiles a band stream leaves cached for the next one, and with them its resampled blocks
    # (kept_blocks): a cluster worker's source, whose chunks come one by one and share both with their
    # neighbours (see _bands.tile_cache, _bands.WORKER_KEEP_BLOCKS); 0: each stream drops its own
    keep_tiles: int = 0
    _he: object = field(default=None, init=False, repr=False, compare=False)
    # resampled blocks kept between band streams where keep_tiles is set ((mpp, level, block, key) -> pixels)
    kept_blocks: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)
    _pid: int = field(default=-1, init=False, repr=False, compare=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_he"], state["_pid"], state["kept_blocks"] = None, -1, OrderedDict()
        return state

    @property
    def he(self):
        """The opened :class:`HEImage` (opened once per process)."""
        if self._he is None or self._pid != os.getpid():
            from ..io._read_he import read_he

            self._he = read_he(self.he_path, mpp=self.he_mpp, cache_tiles=self.cache_tiles)
            self._pid = os.getpid()
        return self._he

    def close(self) -> None:
        """Close the slide (it reopens on next use) and drop the blocks kept from it."""
        if self._he is not None and self._pid == os.getpid():
            self._he.close()
        self._he, self._pid = None, -1
        self.kept_blocks.clear()

    @property
    def um_per_px(self) -> float:
        """Micrometres per H&E level-0 pixel from the registration."""
        return 1.0 / he_px_per_um(self.alignment, self.pixel_size)

    def level_for(self, mpp: float) -> int:
        """The coarsest pyramid level whose pixels are at or finer than ``mpp`` micrometres."""
        he = self.he
        # the registration's scale is the truth for geometry; translate mpp into the image's own units
        return int(he.best_level(mpp * he.mpp / self.um_per_px * (1 + 1e-6)))

    def geometry_bytes(self) -> bytes:
        """The registration (alignment and non-rigid field) as bytes, for cache keys and fingerprints."""
        out = np.ascontiguousarray(self.alignment, dtype=np.float64).tobytes()
        if self.warp is not None:
            for k in ("grid_um", "origin_px", "step_px"):
                out += np.ascontiguousarray(self.warp[k], dtype=np.float64).tobytes()
        return out

    def in_image(self, xy_um: np.ndarray) -> np.ndarray:
        """Whether each point (micrometres) falls inside the level-0 image."""
        xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        if self.warp is not None:
            px = um_to_he_px(xy, self.alignment, self.pixel_size, self.warp)
        else:
            m = um_to_level(self.alignment, self.pixel_size, 1.0)
            px = xy @ m[:2, :2].T + m[:2, 2]
        h, w = self.he.shapes[0]
        ok = np.isfinite(px).all(axis=1)
        return ok & (px[:, 0] >= -0.5) & (px[:, 0] < w - 0.5) & (px[:, 1] >= -0.5) & (px[:, 1] < h - 0.5)

    def read(self, xy_um: np.ndarray, *, size: int = 224, mpp: float = 0.5, level: int | None = None) -> np.ndarray:
        """Patches ``(n, size, size, 3)`` uint8 centred on ``xy_um``, in the Xenium orientation.

        Each patch is read from ``level`` (default: the finest needed), low-pass filtered in proportion
        to the downsampling and resampled with a bilinear affine warp; white outside the image. With a
        non-rigid field, each patch uses the field's local affine at its centre.
        """
        xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        if level is None:
            level = self.level_for(mpp)
        he = self.he
        ds = float(he.downsamples[level])
        to_level = um_to_level(self.alignment, self.pixel_size, ds)
        local = None
        if self.warp is not None:
            lvl = np.array([[1.0 / ds, 0, 0.5 / ds - 0.5], [0, 1.0 / ds, 0.5 / ds - 0.5], [0, 0, 1]])
            ok = np.isfinite(xy).all(axis=1)
            local = np.zeros((len(xy), 3, 3))
            local[ok] = lvl @ local_um_to_he_affine(xy[ok], self.alignment, self.pixel_size, self.warp)
        out = np.full((len(xy), size, size, 3), 255, dtype=np.uint8)
        with one_thread():  # one small warp per patch: extra threads only add overhead
            for i, (cx, cy) in enumerate(xy):
                if not (np.isfinite(cx) and np.isfinite(cy)):
                    continue
                shift = np.array([[1.0, 0, cx], [0, 1.0, cy], [0, 0, 1.0]])
                m = to_level if local is None else local[i]
                out[i] = _warp_patch(he, level, m @ shift @ patch_to_um(size, mpp), size)
        return out


    # ------------------------------------------------------------------ the band path (pp/_bands.py)
    def band_region(self, x0_um: float, y0_um: float, width_px: int, height_px: int, *, mpp: float = 0.5,
                    level: int | None = None) -> dict:
        """The CPU half of :meth:`read_band`: decode the level pixels a band needs and say where to sample them.

        Returns a dict of ``region`` (uint8 ``(h, w, 3)`` level pixels, white outside the image), ``sigma``
        (the low-pass, level pixels) and either ``affine`` (``(2, 3)``: band pixel ``(u, v, 1)`` -> region
        pixel) or ``grid`` (float32 ``(height_px, width_px, 2)`` region pixels of every band pixel: a
        non-rigid registration, mapped pixel by pixel through the field; NaN where the map is undefined).
        A tile that cannot be decoded raises a ``ValueError`` naming the file, the level and the tile's row
        and column, and the band.
        """
        w_px, h_px = int(width_px), int(height_px)
        if w_px < 1 or h_px < 1:
            raise ValueError(f"width_px and height_px must be >= 1, got {width_px} x {height_px}.")
        if level is None:
            level = self.level_for(mpp)
        he = self.he
        lin, shift, sigma, lattice, (rx0, ry0, rx1, ry1) = self._band_bounds(x0_um, y0_um, w_px, h_px, mpp, level)
        try:
            region = _read_level(he, level, rx0, ry0, rx1 - rx0, ry1 - ry0)
        except ValueError as err:  # a damaged tile: say which band needed it (nothing of it is written)
            raise ValueError(
                f"{err} It was needed for the band x {x0_um:.1f}-{x0_um + w_px * mpp:.1f} um, y {y0_um:.1f}-"
                f"{y0_um + h_px * mpp:.1f} um of sample {self.sample!r}; no cell of that band is embedded."
            ) from None
        out = {"region": region, "sigma": float(sigma)}
        if lattice is None:
            out["affine"] = np.concatenate([lin, (shift - [rx0, ry0])[:, None]], axis=1)
        else:  # region pixels (a few hundred: float32 keeps them to 1e-4 px, under OpenCV's 1/32 px lattice)
            us, vs, coarse = lattice
            out["grid"] = _lattice_to_grid(us, vs, (coarse - [rx0, ry0]).astype(np.float32), w_px, h_px)
        return out

    def _band_bounds(self, x0_um: float, y0_um: float, w_px: int, h_px: int, mpp: float, level: int):
        """Where a band's samples fall in ``level``: ``(lin, shift, sigma, lattice, (x0, y0, x1, y1))``, the band
        pixel -> level pixel map (``lin @ (u, v) + shift``; under a non-rigid field the :func:`_field_lattice`
        ``(us, vs, coarse)`` it is interpolated from, else None), the low-pass and the level rectangle to decode
        (its margins, stopped at a white frame around the image). Under a field the rectangle is the lattice's,
        which holds every pixel's (:func:`_lattice_to_grid`), so no pixel is mapped here."""
        he = self.he
        ds = float(he.downsamples[level])
        # band pixel (u, v) -> micrometres: its centre (x0 + (u + 0.5) mpp, y0 + (v + 0.5) mpp)
        band_um = np.array([[mpp, 0.0, x0_um + 0.5 * mpp], [0.0, mpp, y0_um + 0.5 * mpp], [0.0, 0.0, 1.0]])
        to_level = _um_to_level_of(self.alignment, self.pixel_size, ds) @ band_um
        lin = to_level[:2, :2]
        scale = math.sqrt(abs(lin[0, 0] * lin[1, 1] - lin[0, 1] * lin[1, 0]))  # level pixels per band pixel
        sigma = max(0.0, (scale - 1.0) / 2.0)
        lattice = None
        if self.warp is None:
            corners = np.array([[0, 0], [w_px - 1, 0], [0, h_px - 1], [w_px - 1, h_px - 1]], dtype=np.float64)
            pts = corners @ lin.T + to_level[:2, 2]
        else:  # the field's map: exact on a lattice every 8 pixels (bilinear between, in band_region)
            lattice = _field_lattice(self, x0_um, y0_um, w_px, h_px, mpp, ds)
            pts = lattice[2].reshape(-1, 2)  # every pixel's bounds (it is interpolated from these points)
            pts = pts[np.isfinite(pts).all(axis=1)]
            if not len(pts):
                pts = np.zeros((1, 2))
        margin = int(math.ceil(4 * sigma)) + 2
        rx0 = int(math.floor(pts[:, 0].min())) - margin
        ry0 = int(math.floor(pts[:, 1].min())) - margin
        rx1 = int(math.ceil(pts[:, 0].max())) + margin + 1
        ry1 = int(math.ceil(pts[:, 1].max())) + margin + 1
        # beyond a white frame of `margin` pixels around the image everything is white: sampling there
        # meets the region's (white) border, so the region stops at the frame (the same pixels, less work)
        # (the frame is wide enough that the low-pass, kept to the region's inside, stays white there)
        lh, lw = he.shapes[level]
        r = len(blur_kernel(sigma)) // 2
        frame = margin + 2 * r + 1
        rx0, ry0 = max(rx0, -frame), max(ry0, -frame)
        rx1, ry1 = max(min(rx1, lw + frame), rx0 + 2 * r + 2), max(min(ry1, lh + frame), ry0 + 2 * r + 2)
        return lin, to_level[:2, 2], sigma, lattice, (rx0, ry0, rx1, ry1)

    def band_tiles(self, x0_um: float, y0_um: float, width_px: int, height_px: int, *, mpp: float, level: int) -> list:
        """The tiles ``(level, row, column)`` of the slide that :meth:`band_region` decodes for this band."""
        *_, (rx0, ry0, rx1, ry1) = self._band_bounds(x0_um, y0_um, int(width_px), int(height_px), mpp, level)
        he = self.he
        th, tw = he.tile_shape(level)
        lh, lw = he.shapes[level]
        x0, y0, x1, y1 = max(rx0, 0), max(ry0, 0), min(rx1, lw), min(ry1, lh)
        if x0 >= x1 or y0 >= y1:
            return []
        return [(level, ty, tx) for ty in range(y0 // th, (y1 - 1) // th + 1) for tx in range(x0 // tw, (x1 - 1) // tw + 1)]

    def read_band(self, x0_um: float, y0_um: float, width_px: int, height_px: int, *, mpp: float = 0.5,
                  level: int | None = None, device=None) -> np.ndarray:
        """A rectangle of the Xenium frame ``(height_px, width_px, 3)`` uint8, resampled once.

        Pixel ``(u, v)`` has its centre at ``(x0_um + (u + 0.5) * mpp, y0_um + (v + 0.5) * mpp)``; white
        outside the image. Antialiased as :meth:`read` (a Gaussian low-pass of sigma ``(s - 1) / 2`` level
        pixels for a downsampling by ``s``, then bilinear sampling), through the registration (with a
        non-rigid field, pixel by pixel). ``device``: where the low-pass and the resampling run (a torch
        device, e.g. ``"cuda"``; default the CPU); decoding is always on the CPU.
        """
        with one_thread():  # as read(): small operations, which extra threads only slow down
            region = self.band_region(x0_um, y0_um, width_px, height_px, mpp=mpp, level=level)
            return resample_region(region, int(width_px), int(height_px), device=device).cpu().numpy()

    def transform_patches(self, patches: np.ndarray, xy_um: np.ndarray) -> np.ndarray:
        """Hook applied to patches cut from bands (a stain transform in :class:`~cellsymphony.pp._stain.StainedSource`)."""
        return patches

    @property
    def has_transform(self) -> bool:
        """Whether :meth:`transform_patches` changes patches (then they are cut on the CPU)."""
        return False


def _field_lattice(src, x0_um: float, y0_um: float, w_px: int, h_px: int, mpp: float, ds: float):
    """``(us, vs, coarse)``: the band pixel columns ``us`` and rows ``vs`` of every 8th pixel (and the last), and
    their level pixel coordinates ``coarse`` ``(len(vs), len(us), 2)`` through the non-rigid registration
    (``um_to_he_px``, the field's inverse; NaN where it is undefined)."""
    us = np.unique(np.r_[np.arange(0, w_px, 8), w_px - 1])
    vs = np.unique(np.r_[np.arange(0, h_px, 8), h_px - 1])
    cu, cv = np.meshgrid(us, vs)
    um = np.stack([cu.ravel(), cv.ravel()], axis=1) * mpp + [x0_um + 0.5 * mpp, y0_um + 0.5 * mpp]
    coarse = ((um_to_he_px(um, src.alignment, src.pixel_size, src.warp) + 0.5) / ds - 0.5).reshape(len(vs), len(us), 2)
    return us, vs, coarse


def _lattice_to_grid(us: np.ndarray, vs: np.ndarray, coarse: np.ndarray, w_px: int, h_px: int) -> np.ndarray:
    """A :func:`_field_lattice` interpolated bilinearly at every band pixel, along the columns then the rows (the
    field is smooth over its grid step of tens of micrometres, so the error of the interpolation is far below a
    pixel). Each pixel is a weighted mean of lattice points, so the grid stays within the lattice's bounds; a
    pixel with an undefined (NaN) lattice point among those it is interpolated from is undefined. In the dtype of
    ``coarse``.

    Where the lattice is defined everywhere (the usual case) the interpolation is two small matrix products
    with each axis' interpolation matrix (cached: every block of a band has the same lattice), 0.35x the time
    of gathering neighbours in the band stream; a NaN would leak through a zero weight there, so a lattice with
    one is gathered."""
    dtype = np.dtype(coarse.dtype)
    cols, rows_at = (int(w_px), tuple(np.asarray(us).tolist())), (int(h_px), tuple(np.asarray(vs).tolist()))
    if np.isfinite(coarse).all():  # in torch, whose BLAS keeps to torch's threads (one, in the band workers)
        import torch

        wx, wy = _lattice_matrix(*cols, dtype.str), _lattice_matrix(*rows_at, dtype.str)
        rows = torch.matmul(wx, torch.from_numpy(np.ascontiguousarray(coarse)))  # (len(vs), w_px, 2)
        return torch.tensordot(wy, rows, dims=([1], [0])).numpy()  # (h_px, w_px, 2)
    i0, i1, t = _lattice_weights(*cols)
    t = t.astype(dtype)
    rows = coarse[:, i0] * (1 - t)[None, :, None] + coarse[:, i1] * t[None, :, None]  # (len(vs), w_px, 2)
    j0, j1, t = _lattice_weights(*rows_at)
    t = t.astype(dtype)
    return rows[j0] * (1 - t)[:, None, None] + rows[j1] * t[:, None, None]


@functools.lru_cache(maxsize=64)
def _lattice_weights(n_px: int, lattice: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each of ``n_px`` pixels' two lattice neighbours and the weight of the second (none on a lattice point:
    the weight is above 0 only before the last point), float64; read-only (cached)."""
    f = np.interp(np.arange(n_px), np.asarray(lattice, dtype=np.float64), np.arange(len(lattice), dtype=np.float64))
    i0 = np.floor(f).astype(np.intp)
    t = f - i0
    out = (i0, np.where(t > 0, i0 + 1, i0), t)
    for a in out:
        a.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _lattice_matrix(n_px: int, lattice: tuple, dtype: str):
    """:func:`_lattice_weights` as a ``(n_px, len(lattice))`` interpolation matrix (two weights per row, summing
    to 1): a CPU torch tensor in ``dtype`` (cached)."""
    i0, i1, t = _lattice_weights(n_px, lattice)
    m = np.zeros((n_px, len(lattice)), dtype=np.float64)
    r = np.arange(n_px)
    m[r, i0] = 1.0 - t
    m[r, i1] += t  # (i1 is i0 where t is 0)
    import torch

    return torch.from_numpy(m.astype(dtype))  # (never written: shared by every block)


def resample_region(region: dict, width_px: int, height_px: int, *, device=None, engine: str | None = None):
    """The device half of :meth:`PatchSource.read_band`: low-pass and resample a :meth:`PatchSource.band_region`.

    Returns a uint8 torch tensor ``(height_px, width_px, 3)`` on ``device`` (default CPU). The low-pass is the
    separable Gaussian :func:`blur_kernel`, then bilinear sampling at the region pixels the affine (or the
    non-rigid ``grid``) gives, edges replicated. ``engine``:

    - ``"opencv"`` (the default on the CPU): ``cv2.sepFilter2D`` in float32 and ``cv2.warpAffine`` /
      ``cv2.remap``, vectorised C++ about twice as fast as torch's CPU kernels. OpenCV places each sample
      on a 1/32 pixel lattice, so its pixels differ from the torch engine's by at most 1 grey level in a few
      pixels per 100,000.
    - ``"torch"`` (the default elsewhere, i.e. on CUDA): the low-pass as shifted sums kept to the pixels the
      sampling can reach, the sampling ``torch.nn.functional.grid_sample`` (``align_corners=True``); the region
      is copied to the device without blocking (from pinned memory when the DataLoader pinned it).
    """
    import torch

    dev = torch.device("cpu" if device is None else device)
    raw = region["region"]
    fits = max(int(width_px), int(height_px), *raw.shape[:2]) < CV_MAX_SIDE  # OpenCV's image size limit
    engine = engine or ("opencv" if dev.type == "cpu" and fits else "torch")
    if engine == "opencv":
        if dev.type != "cpu":
            raise ValueError(f"engine='opencv' resamples on the CPU, not on {dev}; use engine='torch'.")
        return torch.from_numpy(_resample_opencv(region, int(width_px), int(height_px)))
    if engine != "torch":
        raise ValueError(f"engine must be 'opencv' or 'torch', got {engine!r}.")
    return _resample_torch(region, int(width_px), int(height_px), dev)


#: OpenCV's warps take images under 32,767 px a side; larger ones go to the torch engine
CV_MAX_SIDE = 32000


def _resample_opencv(region: dict, width_px: int, height_px: int) -> np.ndarray:
    """:func:`resample_region` with OpenCV on the CPU: uint8 ``(height_px, width_px, 3)``."""
    import cv2

    img = _blurred(region)
    if "affine" in region:
        a = np.asarray(region["affine"], dtype=np.float64).reshape(2, 3)
        out = cv2.warpAffine(img, a, (width_px, height_px), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        return _to_uint8(out)
    g = region["grid"]
    g = g.numpy() if hasattr(g, "numpy") else np.asarray(g)
    finite = np.isfinite(g)
    missing = None if finite.all() else ~finite.all(axis=-1)  # (the field is undefined nowhere, usually)
    if missing is not None:
        g = np.nan_to_num(g, nan=0.0)
    g = g.astype(np.float32, copy=False)
    out = _to_uint8(_remap(img, g[..., 0], g[..., 1]))
    if missing is not None:
        out[missing] = 255
    return out


def sample_region(region: dict, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A :meth:`PatchSource.band_region` (with an ``affine``) low-passed and sampled bilinearly at band pixel
    coordinates ``(cols, rows)`` (fractional, broadcast together to a shape ``S``, e.g. ``(n, 1, w)`` and
    ``(n, h, 1)`` for ``n`` windows: the full grids are never built): uint8 ``S + (3,)``, OpenCV on the CPU."""
    a = np.asarray(region["affine"], dtype=np.float64).reshape(2, 3)
    u, v = np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64)
    shape = np.broadcast_shapes(u.shape, v.shape)
    side = shape[-1] if len(shape) > 1 else 1
    mx = (a[0, 0] * u + a[0, 1] * v + a[0, 2]).astype(np.float32).reshape(-1, side)
    my = (a[1, 0] * u + a[1, 1] * v + a[1, 2]).astype(np.float32).reshape(-1, side)
    with one_thread():
        out = _remap(_blurred(region), mx, my)
    return _to_uint8(out).reshape(*shape, 3)


def _remap(img: np.ndarray, mx: np.ndarray, my: np.ndarray) -> np.ndarray:
    """``cv2.remap`` (bilinear, edges replicated) of ``img`` at float32 maps ``(rows, cols)``; maps taller than
    OpenCV's 32,767 px limit in slices of rows."""
    import cv2

    step = CV_MAX_SIDE
    return np.concatenate([cv2.remap(img, mx[i : i + step], my[i : i + step], cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REPLICATE) for i in range(0, len(mx), step)])  # fmt: skip


def _blurred(region: dict) -> np.ndarray:
    """The region's pixels low-passed with :func:`blur_kernel` (edges replicated), float32 ``(h, w, 3)``; the
    uint8 pixels themselves where the kernel is a single tap (downsampling by less than about 1.47), which
    OpenCV then samples in fixed point, several times faster than in float and within 1 grey level."""
    import cv2

    raw = region["region"]
    raw = np.ascontiguousarray(raw.numpy() if hasattr(raw, "numpy") else raw)
    k = np.asarray(blur_kernel(float(region["sigma"])), dtype=np.float32)
    if len(k) == 1:
        return raw
    # uint8 in, float32 out: 0.7x the time of converting to float32 first and filtering that (3 to 15 taps)
    return cv2.sepFilter2D(raw, cv2.CV_32F, k, k, borderType=cv2.BORDER_REPLICATE)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Float samples rounded (half to even) and saturated to uint8, in one OpenCV pass (0.4x numpy's rint, clip
    and cast); uint8 samples as they are. The samples are never negative (non-negative weights of uint8
    pixels), so ``convertScaleAbs``' absolute value changes nothing."""
    import cv2

    if x.dtype == np.uint8:
        return x
    return cv2.convertScaleAbs(x)


def _resample_torch(region: dict, width_px: int, height_px: int, dev):
    """:func:`resample_region` in torch on ``dev`` (the GPU path)."""
    import torch
    import torch.nn.functional as F

    raw = region["region"]
    raw = torch.from_numpy(raw) if isinstance(raw, np.ndarray) else raw
    raw = raw.to(dev, non_blocking=True)  # (h, w, 3) uint8
    k = blur_kernel(float(region["sigma"]))
    r = len(k) // 2
    img = _blur_valid(raw, k) if r else raw.float()  # the region less r pixels on each side
    h, w = img.shape[:2]
    if "affine" in region:
        a = torch.as_tensor(np.asarray(region["affine"], dtype=np.float32), device=dev)
        u = torch.arange(width_px, dtype=torch.float32, device=dev)
        v = torch.arange(height_px, dtype=torch.float32, device=dev)
        cols = a[0, 0] * u[None, :] + a[0, 1] * v[:, None] + (a[0, 2] - r)
        rows = a[1, 0] * u[None, :] + a[1, 1] * v[:, None] + (a[1, 2] - r)
        missing = None
    else:
        g = region["grid"]
        g = (torch.from_numpy(g) if isinstance(g, np.ndarray) else g).to(dev, non_blocking=True).float()
        missing = ~torch.isfinite(g).all(dim=-1)
        g = torch.nan_to_num(g, nan=0.0) - r
        cols, rows = g[..., 0], g[..., 1]
    grid = torch.stack([cols * (2.0 / max(w - 1, 1)) - 1, rows * (2.0 / max(h - 1, 1)) - 1], dim=-1).unsqueeze(0)
    out = F.grid_sample(img.permute(2, 0, 1).unsqueeze(0), grid, mode="bilinear", padding_mode="border",
                        align_corners=True)[0]
    out = out.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()  # interleaved: cheap cuts
    if missing is not None and bool(missing.any()):
        out[missing] = 255
    return out


def _um_to_level_of(alignment: np.ndarray, pixel_size: float, ds: float) -> np.ndarray:
    """:func:`um_to_level`, computed once per registration and level (every block of a band stream asks)."""
    a = np.ascontiguousarray(alignment, dtype=np.float64)
    return _um_to_level_cached(a.tobytes(), a.shape, float(pixel_size), float(ds)).copy()


@functools.lru_cache(maxsize=64)
def _um_to_level_cached(alignment: bytes, shape: tuple, pixel_size: float, ds: float) -> np.ndarray:
    return um_to_level(np.frombuffer(alignment, dtype=np.float64).reshape(shape), pixel_size, ds)


def blur_kernel(sigma: float) -> list[float]:
    """The taps of :func:`_blur`'s Gaussian (truncated at 4 sigma) less those that weigh under 1e-4 (a change
    below 0.03 grey levels each), renormalised; ``[1.0]`` (no low-pass) for sigma below about 0.23, where the
    full Gaussian of :meth:`PatchSource.read` changes no pixel by more than 0.05 grey levels."""
    return list(_blur_taps(float(sigma)))


@functools.lru_cache(maxsize=256)
def _blur_taps(sigma: float) -> tuple[float, ...]:
    """:func:`blur_kernel`, once per sigma (each block of a band stream asks three times)."""
    if sigma <= 0.05:
        return (1.0,)
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    keep = int(np.count_nonzero(k[radius + 1 :] >= 1e-4))
    k = k[radius - keep : radius + keep + 1]
    return tuple((k / k.sum()).astype(np.float32).tolist())


def _blur_valid(img, k: list[float]):
    """Separable low-pass of a torch ``(h, w, 3)`` image (uint8 or float) with taps ``k``, returned float32
    for the pixels whose whole kernel lies inside: ``(h - 2r, w - 2r, 3)``, ``r = len(k) // 2``."""
    r = len(k) // 2
    h, w = img.shape[0] - 2 * r, img.shape[1] - 2 * r
    out = img[0:h] * k[0]  # uint8 times a float: float32
    for i in range(1, 2 * r + 1):
        out.add_(img[i : i + h], alpha=k[i])
    res = out[:, 0:w] * k[0]
    for i in range(1, 2 * r + 1):
        res.add_(out[:, i : i + w], alpha=k[i])
    return res


@contextlib.contextmanager
def one_thread():
    """Torch and OpenCV on one thread (as :meth:`PatchSource.read` runs its per-patch warps), restored afterwards."""
    import cv2
    import torch

    before, before_cv = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        cv2.setNumThreads(before_cv)


def _read_level(he, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """A region of ``level`` in that level's pixels (white outside the image)."""
    return np.asarray(he.read_region(x0, y0, w, h, level=level))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian low-pass of an (h, w, 3) float32 image (edges replicated), as
    ``scipy.ndimage.gaussian_filter(..., truncate=4)`` but as a few shifted sums (much faster here)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = img.shape[:2]
    p = np.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    out = k[0] * p[0:h]
    for i in range(1, 2 * radius + 1):
        out += k[i] * p[i : i + h]
    p = np.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    out = k[0] * p[:, 0:w]
    for i in range(1, 2 * radius + 1):
        out += k[i] * p[:, i : i + w]
    return out


def _warp_patch(he, level: int, affine: np.ndarray, size: int) -> np.ndarray:
    """Resample one patch: ``affine`` maps patch pixel (u, v, 1) to continuous level pixels.

    Antialiasing: a Gaussian low-pass of sigma ``(s - 1) / 2`` level pixels for a downsampling by ``s``
    (separable, edges replicated), then bilinear sampling (torch ``grid_sample``).
    """
    import torch
    import torch.nn.functional as F

    lin = affine[:2, :2]
    scale = math.sqrt(abs(np.linalg.det(lin)))  # level pixels per output pixel
    sigma = max(0.0, (scale - 1.0) / 2.0)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float64)
    pts = corners @ lin.T + affine[:2, 2]
    margin = int(math.ceil(4 * sigma)) + 2
    x0 = int(math.floor(pts[:, 0].min())) - margin
    y0 = int(math.floor(pts[:, 1].min())) - margin
    x1 = int(math.ceil(pts[:, 0].max())) + margin + 1
    y1 = int(math.ceil(pts[:, 1].max())) + margin + 1
    region = _read_level(he, level, x0, y0, x1 - x0, y1 - y0)
    h, w = region.shape[:2]
    img = region.astype(np.float32)
    if sigma > 0.05:
        img = _blur(img, sigma)
    img = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    # sampling positions in normalised coordinates (align_corners=True: -1 and 1 are the edge pixel centres)
    u = torch.arange(size, dtype=torch.float64)
    cols = lin[0, 0] * u[None, :] + lin[0, 1] * u[:, None] + (affine[0, 2] - x0)
    rows = lin[1, 0] * u[None, :] + lin[1, 1] * u[:, None] + (affine[1, 2] - y0)
    grid = torch.stack([cols / (w - 1) * 2 - 1, rows / (h - 1) * 2 - 1], dim=-1).unsqueeze(0).float()
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def cell_centres(adata) -> np.ndarray:
    """Nucleus centroid of each cell (micrometres), the cell centroid where there is none
    (:func:`cellsymphony._coordinates.cell_coordinates` with ``which="nucleus"``)."""
    return cell_coordinates(adata, "nucleus", purpose="embed_morphology / cell_patches")


def select_cells(adata, cells) -> np.ndarray:
    """Integer positions of ``cells`` (None = all; a boolean mask, obs names, or integer positions)."""
    n = adata.n_obs
    if cells is None:
        return np.arange(n)
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"cells: a boolean mask must have one entry per cell ({n}), got {arr.shape}.")
        return np.flatnonzero(arr)
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise ValueError(f"cells: integer positions must lie in [0, {n}), got {arr.min()}..{arr.max()}.")
        return np.where(arr < 0, arr + n, arr).astype(np.int64)
    idx = adata.obs_names.get_indexer(arr.astype(str))
    if (idx < 0).any():
        bad = arr[idx < 0][:5].tolist()
        raise ValueError(f"cells: {int((idx < 0).sum())} names are not cells of the data, e.g. {bad}.")
    return idx.astype(np.int64)


def sample_sources(mdata, adata, rows: np.ndarray, sample: str | None, *, cache_tiles: int = 512):
    """Group ``rows`` by sample: ``[(PatchSource, positions)]``, positions indexing ``rows``; clear errors for gaps."""
    reg = samples_registry(mdata)
    if not reg and adata is not mdata:
        reg = samples_registry(adata)
    if not reg:
        raise ValueError(
            "No H&E is registered: mdata.uns['cellsymphony']['samples'] is empty. Read the section with "
            "cs.io.read_xenium(path, he_image=..., he_alignment=...) or build an H&E-only MuData with "
            "cs.io.read_he_cells."
        )
    allpos = np.arange(len(rows))
    if sample is not None:
        groups = {str(sample): allpos}
    elif SAMPLE_KEY in adata.obs:
        labels = adata.obs[SAMPLE_KEY].astype(str).to_numpy()[rows]
        groups = {s: allpos[labels == s] for s in dict.fromkeys(labels.tolist())}
    elif len(reg) == 1:
        groups = {next(iter(reg)): allpos}
    else:
        raise ValueError(f"The data has {len(reg)} samples but no obs[{SAMPLE_KEY!r}]: pass sample=.")
    out = []
    for s, r in groups.items():
        if s not in reg:
            raise ValueError(f"Sample {s!r} has no registry entry (known: {sorted(reg)}); pass sample= one of those.")
        entry = reg[s]
        path = str(entry.get(REG_HE_PATH, "") or "")
        if not path:
            raise ValueError(
                f"Sample {s!r} has no H&E image registered: read it with "
                "cs.io.read_xenium(path, he_image='..._he_image.ome.tif', he_alignment='..._he_imagealignment.csv')."
            )
        if not os.path.exists(path):
            raise ValueError(f"Sample {s!r}: the registered H&E {path!r} does not exist (moved?); update its he_path.")
        if REG_ALIGNMENT not in entry or REG_PIXEL_SIZE not in entry:
            raise ValueError(f"Sample {s!r}: the registry lacks 'alignment' / 'pixel_size'; read it with cs.io.read_xenium.")
        align = check_alignment(entry[REG_ALIGNMENT], source=f"sample {s!r}")
        he_mpp = entry.get(REG_HE_MPP)
        he_mpp = float(he_mpp) if he_mpp is not None and np.isfinite(float(he_mpp)) and float(he_mpp) > 0 else None
        src = PatchSource(path, align, float(entry[REG_PIXEL_SIZE]), he_mpp=he_mpp, sample=s, cache_tiles=cache_tiles,
                          warp=registry_warp(entry))
        out.append((src, r))
    return out


def ordered(xy: np.ndarray, size: int, mpp: float) -> np.ndarray:
    """Serpentine spatial order with bands one patch high."""
    return spatial_order(xy, band=size * mpp)
