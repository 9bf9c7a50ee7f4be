"""Rendering of the synthetic section: label masks and DAPI at Xenium resolution, and the H&E image.

All rendering is vectorised: nuclei are "splatted" in chunks of cells (one numpy expression over a
(cells, window, window) block), backgrounds are computed per image block at reduced resolution.

Nothing here holds a whole image: the masks and the DAPI are rendered in bands of morphology rows
(:func:`mask_bands`), the H&E in bands of H&E rows (:meth:`HERenderer.render_band`); each band splats only
the cells whose window meets it, so a section of hundreds of thousands of cells needs memory for a few
bands (and the level-1 images of the pyramids), not for the gigapixel images.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ._tissue import (
    DUCT,
    DUCT_LUMEN,
    EXPANSION_UM,
    LYMPHOID,
    RASTER_UM,
    STROMA,
    TUMOUR,
    VESSEL_LUMEN,
    Tissue,
)

_CHUNK_PIXELS = 3_000_000  # pixels evaluated per splat chunk
MASK_BAND_ROWS = 4096  # morphology rows per band: the chunk rows of the cells.zarr.zip masks (each written once)
HE_BAND_ROWS = 2048  # H&E rows per band (a multiple of the 1024-px render blocks and the 512-px JPEG tiles)
_ENSURE_WINDOW = 40  # px: a nucleus covered by its neighbours keeps its centre pixel unless seen this close
_EXPAND_STEP = 3  # the nucleus expansion (cell mask) is computed on every 3rd pixel, then upsampled


def _geometry(cells: pd.DataFrame, px2um: np.ndarray, grow_um: np.ndarray | None):
    """Per-cell shape constants of :func:`splat` and the half-size (hx, hy) in pixels of its window."""
    f32 = np.float32
    n = len(cells)
    grow = np.zeros(n) if grow_um is None else np.asarray(grow_um, float)
    a = cells.a.to_numpy() + grow
    b = cells.b.to_numpy() + grow
    phi = cells.phi.to_numpy()
    irr = 0.3 if grow_um is not None else 1.0
    c3, c4 = cells.c3.to_numpy() * irr, cells.c4.to_numpy() * irr
    p3, p4 = cells.p3.to_numpy(), cells.p4.to_numpy()
    # per-cell constants of the boundary harmonics: h = 1 + A3 cos3a + B3 sin3a + A4 cos4a + B4 sin4a
    A3, B3 = (c3 * np.cos(3 * p3)).astype(f32), (c3 * np.sin(3 * p3)).astype(f32)
    A4, B4 = (c4 * np.cos(4 * p4)).astype(f32), (c4 * np.sin(4 * p4)).astype(f32)
    # bounding box of the rotated shape in tissue um, then in pixels through the inverse map
    rmax = (1 + c3 + c4)
    ex = np.sqrt((a * np.cos(phi)) ** 2 + (b * np.sin(phi)) ** 2) * rmax
    ey = np.sqrt((a * np.sin(phi)) ** 2 + (b * np.cos(phi)) ** 2) * rmax
    inv = np.linalg.inv(px2um)
    hx = np.abs(inv[0, 0]) * ex + np.abs(inv[0, 1]) * ey
    hy = np.abs(inv[1, 0]) * ex + np.abs(inv[1, 1]) * ey
    hx = (np.ceil((hx + 1.5) / 3) * 3).astype(int)
    hy = (np.ceil((hy + 1.5) / 3) * 3).astype(int)
    regular = (c3 + c4) == 0  # plain ellipses: no harmonics to evaluate
    return a, b, phi, (A3, B3, A4, B4), hx, hy, regular


def splat_rows(cells: pd.DataFrame, cy: np.ndarray, px2um: np.ndarray, *, grow_um: np.ndarray | None = None):
    """First and last image row (inclusive) that :func:`splat` can touch for each cell."""
    hy = _geometry(cells, px2um, grow_um)[5]
    cyi = np.rint(cy).astype(np.int64)
    return cyi - hy, cyi + hy


def splat(cells: pd.DataFrame, cx: np.ndarray, cy: np.ndarray, px2um: np.ndarray, shape: tuple[int, int],
          *, grow_um: np.ndarray | None = None, values: bool = True, origin: tuple[int, int] = (0, 0)):
    """Yield, per chunk of cells, the image pixels inside each nucleus.

    ``cx, cy`` are nucleus centres in image pixels, ``px2um`` the (2, 2) linear map from a pixel offset
    (dx, dy) to a tissue offset in micrometres. ``grow_um`` enlarges each shape (cytoplasm). ``shape`` and
    ``origin`` (row, column of its first pixel) give the window of the image to fill: pixels outside are
    dropped, and the rows and columns yielded are relative to ``origin``, so a band of a large image gets
    exactly the pixels the whole image would. Yields ``(rows, cols, cell_index, q, u, v)`` for the pixels
    inside: q in [0, 1] is the normalised radius (0 at the centre, 1 on the outline) and (u, v) the position
    in units of the semi-axes (``None`` unless ``values``). Cells are grouped by the size of their bounding
    box, so each chunk is one array expression; a cell later in ``cells`` paints over an earlier one.
    """
    n = len(cells)
    if n == 0:
        return
    f32 = np.float32
    a, b, phi, (A3, B3, A4, B4), hx, hy, regular = _geometry(cells, px2um, grow_um)
    key = (hx * 100_000 + hy) * 2 + regular
    height, width = shape
    r0, c0 = origin
    m00, m01, m10, m11 = (f32(v) for v in px2um.ravel())
    for k in np.unique(key):
        idx = np.flatnonzero(key == k)
        is_regular = bool(k % 2)
        kx, ky = int(k // 2 // 100_000), int(k // 2 % 100_000)
        offx = np.arange(-kx, kx + 1)
        offy = np.arange(-ky, ky + 1)
        step = max(1, _CHUNK_PIXELS // (len(offx) * len(offy)))
        for s in range(0, len(idx), step):
            ii = idx[s : s + step]
            cxi, cyi = np.rint(cx[ii]).astype(np.int64), np.rint(cy[ii]).astype(np.int64)
            col = cxi[:, None, None] + offx[None, None, :]
            row = cyi[:, None, None] + offy[None, :, None]
            ddx = (col - cx[ii, None, None]).astype(f32)
            ddy = (row - cy[ii, None, None]).astype(f32)
            cp = np.cos(phi[ii]).astype(f32)[:, None, None]
            sp = np.sin(phi[ii]).astype(f32)[:, None, None]
            # pixel offset -> um -> rotated into the nucleus frame, in one linear map per cell
            xr = (cp * m00 + sp * m10) * ddx + (cp * m01 + sp * m11) * ddy
            yr = (cp * m10 - sp * m00) * ddx + (cp * m11 - sp * m01) * ddy
            u = xr / a[ii].astype(f32)[:, None, None]
            v = yr / b[ii].astype(f32)[:, None, None]
            q0 = u * u + v * v
            if is_regular:
                hf = np.ones(1, f32)
            else:
                inv_rho = 1.0 / (np.sqrt(xr * xr + yr * yr) + f32(1e-6))
                ca, sa = xr * inv_rho, yr * inv_rho
                ca2, sa2 = ca * ca, sa * sa
                c2, s2 = ca2 - sa2, 2 * ca * sa
                cos3, sin3 = ca * (4 * ca2 - 3), sa * (3 - 4 * sa2)
                hf = (1 + A3[ii, None, None] * cos3 + B3[ii, None, None] * sin3
                      + A4[ii, None, None] * (2 * c2 * c2 - 1) + B4[ii, None, None] * (2 * s2 * c2))
            inside = q0 <= hf * hf if not is_regular else q0 <= 1
            row = row - r0
            col = col - c0
            inside &= (row >= 0) & (row < height) & (col >= 0) & (col < width)
            rows = np.broadcast_to(row, inside.shape)[inside]
            cols = np.broadcast_to(col, inside.shape)[inside]
            ci = np.broadcast_to(ii[:, None, None], inside.shape)[inside]
            if values:
                q = np.sqrt(q0[inside]) if is_regular else np.sqrt(q0[inside]) / hf[inside]
                yield rows, cols, ci, q, u[inside], v[inside]
            else:
                yield rows, cols, ci, None, None, None


# ----------------------------------------------------------------------------------------------- Xenium side
def morphology_shape(tissue: Tissue, pixel_size: float) -> tuple[int, int]:
    """(rows, columns) of the morphology image and the masks."""
    return int(np.ceil(tissue.height_um / pixel_size)), int(np.ceil(tissue.width_um / pixel_size))


def mask_bands(tissue: Tissue, pixel_size: float, band_rows: int | None = None
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Nucleus and cell label masks (uint32, label = cell index + 1), band by band of ``band_rows`` rows.

    Yields ``(r0, nucleus, cell)`` for the rows ``r0 : r0 + band_rows`` (fewer in the last band). The cell
    mask is the nucleus mask expanded by up to 5 um (as Xenium), computed on every third pixel and
    upsampled; each band renders the nuclei of a halo around it (the expansion distance, plus the window in
    which a hidden nucleus looks for itself), so the bands put together are the mask the whole image would
    give, with no seams.
    """
    band_rows = band_rows or MASK_BAND_ROWS
    cells = tissue.cells
    height, width = morphology_shape(tissue, pixel_size)
    px2um = np.eye(2) * pixel_size
    cx, cy = cells.x.to_numpy() / pixel_size, cells.y.to_numpy() / pixel_size
    top, bottom = splat_rows(cells, cy, px2um)
    # a nucleus hidden by its neighbours keeps its centre pixel (see _ensure_labels)
    rc = np.clip(np.rint(cy).astype(int), 0, height - 1)
    cc = np.clip(np.rint(cx).astype(int), 0, width - 1)
    f = _EXPAND_STEP
    off = f // 2
    ns_r, ns_c = len(range(off, height, f)), len(range(off, width, f))
    reach = int(np.ceil(EXPANSION_UM / (f * pixel_size))) + 2  # subsampled pixels the expansion can cross
    col_map = np.minimum(np.arange(width) // f, ns_c - 1)
    for r0 in range(0, height, band_rows):
        r1 = min(height, r0 + band_rows)
        # subsampled rows whose distance transform is exact for this band, the full rows they need
        k0 = max(0, min(r0 // f, ns_r - 1) - reach)
        k1 = min(ns_r, min((r1 - 1) // f, ns_r - 1) + reach + 1)
        need0, need1 = min(r0, f * k0 + off), max(r1, f * (k1 - 1) + off + 1)
        a, b = max(0, need0 - _ENSURE_WINDOW), min(height, need1 + _ENSURE_WINDOW)
        nuc = np.zeros((b - a, width), np.uint32)
        sel = np.flatnonzero((bottom >= a) & (top < b))
        for rows, cols, ci, *_ in splat(cells.iloc[sel], cx[sel], cy[sel], px2um, (b - a, width), values=False,
                                        origin=(a, 0)):
            nuc[rows, cols] = sel[ci] + 1
        own = np.flatnonzero((rc >= need0) & (rc < need1))
        _ensure_labels(nuc, rc[own] - a, cc[own], (own + 1).astype(np.uint32))
        # nucleus expansion by up to 5 um, on every f-th pixel
        small = nuc[f * k0 + off - a :: f][: k1 - k0, off::f]
        dist, (iy, ix) = ndi.distance_transform_edt(small == 0, return_indices=True)
        grown = small[iy, ix]
        grown[dist * f * pixel_size > EXPANSION_UM] = 0
        del dist, iy, ix, small
        row_map = np.minimum(np.arange(r0, r1) // f, ns_r - 1) - k0
        cell = grown[row_map][:, col_map]
        del grown
        core = nuc[r0 - a : r1 - a]
        np.copyto(cell, core, where=core > 0)
        # every nucleus label lies within the window of its centre (ensured above) and is copied into the cell
        # mask, so the cell mask needs no check of its own
        yield r0, core, cell
        del nuc, core, cell


def _ensure_labels(mask: np.ndarray, r: np.ndarray, c: np.ndarray, labels: np.ndarray,
                   window: int = _ENSURE_WINDOW) -> None:
    """Give each cell at least its centre pixel (a nucleus covered by its neighbours would vanish).

    ``r, c`` are the centre pixels of the cells with ``labels`` in ``mask``, whose rows must reach
    ``window`` rows beyond each of these centres.
    """
    for i in np.flatnonzero(mask[r, c] != labels):  # few cells: check their neighbourhood
        win = mask[max(0, r[i] - window) : r[i] + window, max(0, c[i] - window) : c[i] + window]
        if not np.any(win == labels[i]):
            mask[r[i], c[i]] = labels[i]


class LabelStats:
    """Areas and centroids of labels 1..n, accumulated band by band of a label mask."""

    def __init__(self, n: int, pixel_size: float, step: int = 3):
        self.n, self.pixel_size, self.step = n, pixel_size, step
        self.count = np.zeros(n + 1, np.int64)
        self.sub = np.zeros((3, n + 1))  # every step-th pixel: count, sum of columns, sum of rows

    def add(self, band: np.ndarray, r0: int) -> None:
        """Count the rows ``r0 : r0 + len(band)`` of the mask."""
        n, step = self.n, self.step
        for s in range(0, len(band), 256):  # bincount works on an intp copy: a few rows at a time
            self.count += np.bincount(band[s : s + 256].ravel(), minlength=n + 1)
        off = step // 2
        first = (off - r0) % step  # first band row on the global grid of every step-th row
        sub = band[first::step, off::step]
        lab = sub.ravel()
        nz = np.flatnonzero(lab)
        lab = lab[nz]
        yy, xx = np.divmod(nz, sub.shape[1])
        self.sub[0] += np.bincount(lab, minlength=n + 1)
        self.sub[1] += np.bincount(lab, xx * step + off, minlength=n + 1)
        self.sub[2] += np.bincount(lab, yy * step + first + r0, minlength=n + 1)

    def areas(self) -> np.ndarray:
        """Area (um^2) of labels 1..n."""
        return self.count[1:] * self.pixel_size**2

    def centroids(self) -> tuple[np.ndarray, np.ndarray]:
        """Centroid (um) of labels 1..n from every ``step``-th pixel (sub-micrometre accurate, 9x cheaper), and
        which labels had no such pixel."""
        cnt, sx, sy = self.sub[:, 1:]
        return np.stack([sx, sy], axis=1) / np.maximum(cnt, 1)[:, None] * self.pixel_size, cnt == 0


def dapi_noise(rng: np.random.Generator) -> np.ndarray:
    """The periodic noise tile of the DAPI image."""
    return _noise_tile(rng, 1024, sigma=1.0)


def dapi_band(nuc: np.ndarray, r0: int, brightness: np.ndarray, noise: np.ndarray, block_rows: int = 256):
    """DAPI-like uint16 rows ``r0 : r0 + len(nuc)``: bright nuclei (denser chromatin brighter), dim
    background, shot noise (``noise`` from :func:`dapi_noise`, by position, so bands join seamlessly)."""
    lut = np.concatenate([[0.0], brightness]).astype(np.float32)
    out = np.empty(nuc.shape, np.uint16)
    for s in range(0, nuc.shape[0], block_rows):
        blk = nuc[s : s + block_rows]
        val = lut[blk]
        nz = _tiled(noise, r0 + s, 0, blk.shape)
        img = 180.0 + val * (1.0 + 0.18 * nz) + 25.0 * nz
        out[s : s + block_rows] = np.clip(img, 0, 65535).astype(np.uint16)
    return out


# ----------------------------------------------------------------------------------------------- H&E side
def _noise_tile(rng: np.random.Generator, size: int, sigma: float = 0.0, channels: int = 0) -> np.ndarray:
    shape = (size, size, channels) if channels else (size, size)
    t = rng.standard_normal(shape).astype(np.float32)
    if sigma:
        t = ndi.gaussian_filter(t, (sigma, sigma, 0) if channels else sigma, mode="wrap")
        t /= t.std() + 1e-9
    return t


def _tiled(tile: np.ndarray, r0: int, c0: int, shape: tuple[int, int]) -> np.ndarray:
    """A (h, w) crop of the periodic ``tile`` starting at (r0, c0) (wrapping), without a gather."""
    s = tile.shape[0]
    dy, dx = r0 % s, c0 % s
    reps = ((dy + shape[0]) // s + 1, (dx + shape[1]) // s + 1) + (1,) * (tile.ndim - 2)
    big = np.tile(tile, reps) if reps[0] * reps[1] > 1 else tile
    return big[dy : dy + shape[0], dx : dx + shape[1]]


def _fibre_tiles(rng: np.random.Generator, size: int = 512, n_orient: int = 4) -> list[np.ndarray]:
    """Anisotropic noise (collagen fibres) at ``n_orient`` orientations, periodic."""
    base = rng.standard_normal((size, size)).astype(np.float32)
    out = []
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.fftfreq(size)[None, :]
    fb = np.fft.fft2(base)
    for k in range(n_orient):
        th = np.pi * k / n_orient
        along = kx * np.cos(th) + ky * np.sin(th)  # frequency along the fibre: suppressed
        across = -kx * np.sin(th) + ky * np.cos(th)
        filt = np.exp(-(along * 60) ** 2 - (across * 4) ** 2)
        t = np.real(np.fft.ifft2(fb * filt)).astype(np.float32)
        out.append((t - t.mean()) / (t.std() + 1e-9))
    return out


# the stain and scanner of a slide (cs.datasets.synthetic_he / synthetic_xenium(he_stain=)): hematoxylin and eosin
# optical-density vectors (None: the usual ones, drawn per slide), their strengths, the optical density of the
# glass (scalar or per RGB channel; 0.03 is near white)
STAIN_DEFAULTS = {"hematoxylin": None, "eosin": None, "hematoxylin_strength": 1.0, "eosin_strength": 1.0,
                  "background": 0.03}
STAIN_KEYS = tuple(STAIN_DEFAULTS)


def blur_band(band: np.ndarray, sigma_px: float) -> np.ndarray:
    """A Gaussian blur of an RGB band (a scanner out of focus); rows beyond the band are taken as its edge rows."""
    if sigma_px <= 0:
        return band
    return np.clip(ndi.gaussian_filter(band.astype(np.float32), (sigma_px, sigma_px, 0), mode="nearest"), 0, 255
                   ).round().astype(np.uint8)


# per compartment background stain densities: (eosin, hematoxylin)
_BG = {
    STROMA: (0.95, 0.06),
    TUMOUR: (0.55, 0.10),
    LYMPHOID: (0.30, 0.10),
    DUCT: (0.50, 0.08),
    DUCT_LUMEN: (0.05, 0.02),
    VESSEL_LUMEN: (1.25, 0.01),  # red blood cells
}


class HERenderer:
    """Render the H&E image of a tissue in H&E pixel space given the H&E pixel -> micrometre affine.

    :meth:`render_band` renders rows of the image (call it for consecutive bands covering the image once);
    :meth:`nucleus_truth` then gives the rendered nuclei's areas, shapes and centroids.

    ``he2um`` may include a mirror flip. ``deform`` (optional) is a smooth displacement of the tissue
    coordinates, ``(x, y) um -> (dx, dy) um``: H&E pixel ``p`` shows the tissue at ``he2um(p) + deform(he2um(p))``
    (each nucleus is drawn where that lands on its centre; its shape is not warped, the field being smooth).
    """

    def __init__(self, tissue: Tissue, he2um: np.ndarray, shape: tuple[int, int], rng: np.random.Generator,
                 deform=None, stain: dict | None = None):
        self.t = tissue
        self.he2um = he2um  # (3, 3): H&E pixel (x, y, 1) -> um (x, y, 1)
        self.shape = shape
        self.deform = deform
        self.flip = bool(np.linalg.det(he2um[:2, :2]) < 0)
        raster = tissue.raster
        eos = np.zeros(raster.shape, np.float32)
        hem = np.zeros(raster.shape, np.float32)
        for comp, (e, h) in _BG.items():
            eos[raster == comp] = e
            hem[raster == comp] = h
        self.eos = ndi.gaussian_filter(eos, 0.8)
        self.hem = ndi.gaussian_filter(hem, 0.8)
        self.is_stroma = ndi.gaussian_filter((raster == STROMA).astype(np.float32), 1.0)
        # uneven staining over the slide
        self.stain_field = ndi.gaussian_filter(rng.standard_normal(raster.shape).astype(np.float32), 40)
        self.stain_field /= self.stain_field.std() + 1e-9
        # stain colour variation (slide level)
        hv = np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.04, 3)
        ev = np.array([0.10, 0.88, 0.42]) + rng.normal(0, 0.03, 3)
        h_amp, e_amp = rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)
        # a lab's stain and scanner (see STAIN_KEYS): other vectors, strengths and glass colour
        st = {**STAIN_DEFAULTS, **(stain or {})}
        hv = hv if st["hematoxylin"] is None else np.asarray(st["hematoxylin"], dtype=np.float64)
        ev = ev if st["eosin"] is None else np.asarray(st["eosin"], dtype=np.float64)
        self.hv = (hv / np.linalg.norm(hv) * 1.25 * h_amp * st["hematoxylin_strength"]).astype(np.float32)
        self.ev = (ev / np.linalg.norm(ev) * 0.62 * e_amp * st["eosin_strength"]).astype(np.float32)
        self.background = (np.zeros(3) + np.asarray(st["background"], dtype=np.float64)).astype(np.float32)
        self.fibres = _fibre_tiles(rng, size=1024)
        self.shift = rng.integers(0, 1024, 2)
        self.rot = float(np.arctan2(he2um[1, 0], he2um[0, 0]))
        self.noise = _noise_tile(rng, 1024)
        self.grain = _noise_tile(rng, 1024, sigma=0.8)
        self.moments = np.zeros((7, len(tissue.cells)), np.float64)  # n, x, y, xx, yy, xy, h
        # nucleus centres in H&E pixels and the rows each nucleus (macrophage cytoplasm) can touch
        cells = tissue.cells
        inv = np.linalg.inv(he2um)
        c_um = np.c_[cells.x.to_numpy(), cells.y.to_numpy()]
        v = c_um
        if deform is not None:  # v + deform(v) = centre: a fixed point (the field is smooth and small)
            for _ in range(20):
                v = c_um - np.stack(deform(v[:, 0], v[:, 1]), axis=1)
        xy = np.c_[v, np.ones(len(cells))] @ inv.T
        self.centres = np.c_[xy[:, 0], xy[:, 1]]
        self.px2um = he2um[:2, :2]
        self.rows = splat_rows(cells, xy[:, 1], self.px2um)
        self.mac = np.flatnonzero(cells.cell_type.to_numpy() == "macrophage")
        self.mac_rows = splat_rows(cells.iloc[self.mac], xy[self.mac, 1], self.px2um,
                                   grow_um=cells.cyto.to_numpy()[self.mac])
        self.dark = cells.dark.to_numpy().astype(np.float32)
        self.ves = cells.vesicular.to_numpy().astype(np.float32)
        self.ndx, self.ndy = cells.nuc_dx.to_numpy().astype(np.float32), cells.nuc_dy.to_numpy().astype(np.float32)

    def _nuclei(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Hematoxylin density of the nuclei and eosin of the cytoplasm in rows ``r0 : r1``; adds the moments of
        the nucleus pixels in these rows."""
        cells = self.t.cells
        cx, cy = self.centres[:, 0], self.centres[:, 1]
        shape = (r1 - r0, self.shape[1])
        nuc_h = np.zeros(shape, np.float32)
        cyto = np.zeros(shape, np.float32)
        # cytoplasm first (macrophages' abundant pink cytoplasm)
        top, bottom = self.mac_rows
        mac = self.mac[(bottom >= r0) & (top < r1)]
        sub = cells.iloc[mac]
        for rows, cols, _ci, q, *_ in splat(sub, cx[mac], cy[mac], self.px2um, shape, grow_um=sub.cyto.to_numpy(),
                                            origin=(r0, 0)):
            cyto[rows, cols] = 0.35 * np.clip((1 - q) / 0.25, 0, 1)
        top, bottom = self.rows
        sel = np.flatnonzero((bottom >= r0) & (top < r1))
        mom = np.zeros((7, len(sel)), np.float64)
        for rows, cols, ci, q, u, v in splat(cells.iloc[sel], cx[sel], cy[sel], self.px2um, shape, origin=(r0, 0)):
            g = sel[ci]
            d, vs = self.dark[g], self.ves[g]
            q2 = q * q
            val = d * (0.88 + 0.12 * (1 - q2))  # solid chromatin
            w = np.flatnonzero(vs > 0)  # vesicular nuclei: pale centre, dark rim, a nucleolus
            if len(w):
                cw = g[w]
                vesic = 0.45 + 0.75 * q2[w] * q2[w]
                nucleolus = 1.3 * np.exp(-((u[w] - self.ndx[cw]) ** 2 + (v[w] - self.ndy[cw]) ** 2) / (2 * 0.13**2))
                val[w] = d[w] * ((1 - vs[w]) * val[w] / d[w] + vs[w] * vesic) + vs[w] * nucleolus
            val *= 0.35 + 0.65 * np.sqrt(np.clip((1 - q) / 0.12, 0, 1))  # soft edge
            nuc_h[rows, cols] = val
            X, Y = cols.astype(np.float64), (rows + r0).astype(np.float64)
            for k, wt in enumerate((None, X, Y, X * X, Y * Y, X * Y, val)):
                mom[k] += np.bincount(ci, wt, minlength=len(sel))
        self.moments[:, sel] += mom  # each pixel lies in one band: nothing is counted twice
        return nuc_h, cyto

    def _raster_coords(self, r0, c0, h, w, f):
        rr = np.arange(r0, r0 + h, f, dtype=np.float64) + (f - 1) / 2
        cc = np.arange(c0, c0 + w, f, dtype=np.float64) + (f - 1) / 2
        C, R = np.meshgrid(cc, rr)
        A = self.he2um
        xu = A[0, 0] * C + A[0, 1] * R + A[0, 2]
        yu = A[1, 0] * C + A[1, 1] * R + A[1, 2]
        if self.deform is not None:
            dx, dy = self.deform(xu, yu)
            xu, yu = xu + dx, yu + dy
        return xu, yu

    def render_block(self, r0: int, c0: int, nuc_h: np.ndarray, cyto: np.ndarray) -> np.ndarray:
        """RGB of the block at (r0, c0) (a multiple of 4) with these nucleus and cytoplasm densities."""
        h, w = nuc_h.shape
        f = 4
        xu, yu = self._raster_coords(r0, c0, h, w, f)
        coords = np.stack([yu / RASTER_UM - 0.5, xu / RASTER_UM - 0.5])
        eos = ndi.map_coordinates(self.eos, coords, order=1, mode="nearest")
        hem = ndi.map_coordinates(self.hem, coords, order=1, mode="nearest")
        strom = ndi.map_coordinates(self.is_stroma, coords, order=1, mode="nearest")
        stain = ndi.map_coordinates(self.stain_field, coords, order=1, mode="nearest")
        orient = ndi.map_coordinates(self.t.orientation, coords, order=0, mode="nearest")
        inside = ((xu >= 0) & (xu <= self.t.width_um) & (yu >= 0) & (yu <= self.t.height_um)).astype(np.float32)

        def up(a):
            return np.repeat(np.repeat(a, f, axis=0), f, axis=1)[:h, :w]

        orient_lo_raw = orient
        eos, hem, strom, stain, inside = map(up, (eos, hem, strom, stain, inside))
        # collagen fibres along the local orientation (blend of oriented textures, weights at low resolution)
        sh = self.shift
        orient_lo = orient_lo_raw - self.rot
        if self.flip:  # a mirrored image turns fibre angles the other way (fibres are axial: mod pi)
            orient_lo = -orient_lo
        fib = np.zeros((h, w), np.float32)
        wsum = np.zeros_like(orient_lo, dtype=np.float32)
        ws = []
        for k in range(len(self.fibres)):
            wk = np.clip(np.cos(2 * (orient_lo - np.pi * k / len(self.fibres))), 0, None) ** 2
            ws.append(wk)
            wsum += wk
        for k, tile in enumerate(self.fibres):
            fib += up(ws[k] / (wsum + 1e-6)) * _tiled(tile, r0 + sh[0], c0 + sh[1], (h, w))
        eos = eos * (1 + strom * (0.22 * fib)) + cyto
        nuc = nuc_h * (1 + 0.12 * _tiled(self.grain, r0 + sh[1], c0 + sh[0], (h, w)))
        H = (hem + nuc) * (1 + 0.06 * stain) * inside
        E = eos * (1 + 0.08 * stain) * inside
        od = H[..., None] * self.hv + E[..., None] * self.ev + self.background
        od += 0.025 * _tiled(self.noise, r0 + sh[0] // 2, c0 + sh[1] // 3, (h, w))[..., None]
        rgb = 255.0 * np.exp(-np.clip(od, 0, None))
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def render_band(self, r0: int, r1: int, block: int = 1024, workers: int = 2) -> np.ndarray:
        """RGB uint8 rows ``r0 : r1`` (``r0`` a multiple of 4): the nuclei splatted into this band only, then the
        background and colour in blocks (in threads: numpy releases the GIL; blocks are disjoint and
        deterministic)."""
        from concurrent.futures import ThreadPoolExecutor

        nuc_h, cyto = self._nuclei(r0, r1)
        h, width = nuc_h.shape
        out = np.empty((h, width, 3), np.uint8)

        def one(rc):
            br, c0 = rc
            sl = (slice(br, br + block), slice(c0, c0 + block))
            out[sl] = self.render_block(r0 + br, c0, nuc_h[sl], cyto[sl])

        starts = [(br, c0) for br in range(0, h, block) for c0 in range(0, width, block)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, starts))
        return out

    def nucleus_truth(self, he_mpp: float, n: int) -> pd.DataFrame:
        """Per cell: rendered nucleus area (um^2), elongation, mean hematoxylin density, H&E centroid (px)."""
        cnt = np.r_[0, self.moments[0]]
        m = {k: np.r_[0, self.moments[i]] for i, k in enumerate(("n", "x", "y", "xx", "yy", "xy", "h"))}
        c = np.maximum(cnt[1:], 1)
        mx, my = m["x"][1:] / c, m["y"][1:] / c
        vxx = m["xx"][1:] / c - mx**2 + 1 / 12
        vyy = m["yy"][1:] / c - my**2 + 1 / 12
        vxy = m["xy"][1:] / c - mx * my
        tr, det = vxx + vyy, vxx * vyy - vxy**2
        disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
        l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-9)
        empty = cnt[1:] == 0
        out = pd.DataFrame({
            "nucleus_area_rendered": cnt[1:] * he_mpp**2,
            "nucleus_elongation": np.sqrt(l1 / l2),
            "nucleus_darkness": m["h"][1:] / c,
            "he_x": np.where(empty, self.centres[:, 0], mx),
            "he_y": np.where(empty, self.centres[:, 1], my),
        })
        return out


def n_levels(shape: tuple[int, ...], min_size: int = 512) -> int:
    """Number of levels :func:`pyramid` makes for an image of this shape."""
    k, size = 1, min(shape[:2])
    while size // 2 >= min_size:
        size //= 2
        k += 1
    return k


def downsample2(a: np.ndarray, block_rows: int = 256) -> np.ndarray:
    """2x mean pooling (rounded; an odd last row or column is dropped), in blocks of rows."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    out = np.empty((h, w) + a.shape[2:], a.dtype)
    for s in range(0, h, block_rows):
        blk = a[2 * s : 2 * min(h, s + block_rows), : 2 * w].astype(np.uint32)
        t = blk[0::2, 0::2] + blk[1::2, 0::2] + blk[0::2, 1::2] + blk[1::2, 1::2]
        out[s : s + block_rows] = (t + 2) // 4
    return out


def pyramid(img: np.ndarray, min_size: int = 512) -> list[np.ndarray]:
    """Levels by 2x mean pooling until the short side is below ``min_size``."""
    levels = [img]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        levels.append(downsample2(levels[-1]))
    return levels
