"""Fine H&E-to-Xenium registration on nuclei: H&E nucleus detection, local offsets, robust affine, thin-plate spline.

- **Detection.** H&E nuclei are the blobs of the hematoxylin channel (``skimage.color.rgb2hed``'s stain
  matrix): peaks of a difference of Gaussians (1.5 and 5 um), read window by window from the pyramid level
  closest to 0.5 um per pixel. A large section is sampled: at most ``max_windows`` windows on a regular
  lattice over the part of the H&E that the coarse step puts on the Xenium field.
- **Local offsets.** Around each node of a grid, the H&E nuclei (through the current transform) and the Xenium
  nucleus centroids are binned at 1 um and cross-correlated: the peak is the local offset (the histogram of all
  pairwise displacements within the search radius), robust to missing and spurious nuclei on either side and
  indifferent to which nucleus is which. Nodes without a clear peak are dropped.
- **Pairs.** After each node's offset, H&E and Xenium nuclei that are each other's nearest neighbour within
  a few micrometres are pairs (:func:`cellsymphony._registration.mutual_nearest`).
- **Affine.** ``skimage.measure.ransac`` with an ``AffineTransform``, then least squares on the inliers with
  iterated trimming.
- **Non-rigid.** A thin-plate spline (``scipy.interpolate.RBFInterpolator``) through the robust mean residual
  of each cell of a grid, evaluated on a regular grid of H&E pixels and stored as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .._registration import apply_affine, exact_downsample, fit_affine, mutual_nearest
from ._reg_coarse import hematoxylin

DETECT_MPP = 0.75  # detection reads the coarsest level with pixels at or finer than this (um)
SIGMA_NUC_UM = 1.5  # inner Gaussian of the difference of Gaussians (about a small nucleus' radius / 2)
SIGMA_BG_UM = 5.0  # outer Gaussian (the local background)
MIN_SEPARATION_UM = 3.0  # two detections at least this far apart
WINDOW_PX = 512  # detection window (level pixels) when the level's tiles are not a usable size
VOTE_BIN_UM = 1.0
RANSAC_SUBSET = 400
SUPPORT_UM = 2.0
DOG_THRESHOLD = 0.01  # optical density: pale vesicular nuclei give 0.01-0.02, dark lymphocytes 0.05 and more


# ---------------------------------------------------------------------------------------------- detection
def detection_level(he, um_per_px0: float) -> int:
    """The coarsest level with pixels at or finer than :data:`DETECT_MPP` um (with the measured scale)."""
    best = 0
    for i, d in enumerate(he.downsamples):
        if um_per_px0 * d <= DETECT_MPP:
            best = i
    return best


def window_size(he, level: int) -> tuple[int, int]:
    th, tw = he.tile_shape(level)
    if 128 <= th <= 1024 and 128 <= tw <= 1024:
        return th, tw
    return WINDOW_PX, WINDOW_PX


@dataclass
class Detections:
    xy: np.ndarray  # (n, 2) level-0 pixels
    strength: np.ndarray  # (n,) DoG response
    window: np.ndarray  # (n,) index of the window


class HENucleusDetector:
    """Detects H&E nuclei window by window (level-pixel windows on the tile grid), caching each window."""

    def __init__(self, he, um_per_px0: float, level: int | None = None, threshold: float | None = None) -> None:
        self.he = he
        self.level = detection_level(he, um_per_px0) if level is None else level
        self.ds = exact_downsample(he.downsamples[self.level])
        self.um_per_px = um_per_px0 * self.ds  # of the detection level
        self.win = window_size(he, self.level)
        self.threshold = threshold
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.n_read = 0

    def windows_for(self, transform_px_to_um: np.ndarray, extent_um: tuple[float, float], max_windows: int,
                    tissue=None) -> np.ndarray:
        """Window indices ``(n, 2)`` (row, column of the window grid) that overlap the Xenium field
        (``[0, w] x [0, h]`` um) through the transform, on a regular lattice thinned to at most ``max_windows``.

        ``tissue(xy_level0)`` (optional) says whether a level-0 pixel lies on tissue.
        """
        h, w = self.he.shapes[self.level]
        wh, ww = self.win
        gy, gx = np.mgrid[0 : int(np.ceil(h / wh)), 0 : int(np.ceil(w / ww))]
        cy = (gy + 0.5) * wh
        cx = (gx + 0.5) * ww
        px0 = np.c_[(cx.ravel() + 0.5) * self.ds - 0.5, (cy.ravel() + 0.5) * self.ds - 0.5]
        um = apply_affine(transform_px_to_um, px0)
        # windows overlapping the field: centre within half a window diagonal of it
        half = 0.5 * np.hypot(wh, ww) * self.um_per_px
        inside = ((um[:, 0] >= -half) & (um[:, 0] <= extent_um[0] + half) & (um[:, 1] >= -half)
                  & (um[:, 1] <= extent_um[1] + half))
        if tissue is not None:
            inside &= tissue(px0)
        idx = np.c_[gy.ravel(), gx.ravel()][inside]
        if len(idx) > max_windows:
            # a regular sub-lattice: every k-th window in both directions, offset to the middle
            k = int(np.ceil(np.sqrt(len(idx) / max_windows)))
            while True:
                keep = (idx[:, 0] % k == k // 2) & (idx[:, 1] % k == k // 2)
                if keep.sum() <= max_windows or k > 64:
                    break
                k += 1
            idx = idx[keep]
        return idx

    def detect(self, windows: np.ndarray) -> Detections:
        xs, ss, ws = [], [], []
        for i, (r, c) in enumerate(windows):
            key = (int(r), int(c))
            if key not in self._cache:
                self._cache[key] = self._detect_window(*key)
            xy, st = self._cache[key]
            xs.append(xy)
            ss.append(st)
            ws.append(np.full(len(xy), i))
        if not xs:
            return Detections(np.zeros((0, 2)), np.zeros(0), np.zeros(0, int))
        return Detections(np.concatenate(xs), np.concatenate(ss), np.concatenate(ws))

    def _detect_window(self, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        wh, ww = self.win
        upp = self.um_per_px
        margin = int(np.ceil(3 * SIGMA_BG_UM / upp))
        y0, x0 = r * wh, c * ww
        rgb = self.he.read_region(x0 - margin, y0 - margin, ww + 2 * margin, wh + 2 * margin, level=self.level)
        self.n_read += 1
        xy, strength = detect_blobs(hematoxylin(rgb), upp, threshold=self.threshold)
        xy -= margin
        core = (xy[:, 0] >= -0.5) & (xy[:, 0] < ww - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] < wh - 0.5)
        xy, strength = xy[core], strength[core]
        # level pixels -> level-0 pixels (pixel centres on integers at every level)
        xy0 = (xy + np.array([x0, y0]) + 0.5) * self.ds - 0.5
        return xy0, strength


def detect_blobs(h: np.ndarray, um_per_px: float, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus centres ``(x, y)`` in pixels of a hematoxylin image, and their DoG response.

    Peaks of ``G(1.5 um) - G(5 um)`` at least 3 um apart, above ``threshold`` (optical density; default
    :data:`DOG_THRESHOLD`), refined to sub-pixel by a parabola.
    """
    s1, s2 = SIGMA_NUC_UM / um_per_px, SIGMA_BG_UM / um_per_px
    g1 = ndi.gaussian_filter(h, s1, mode="nearest")
    dog = g1 - ndi.gaussian_filter(g1, np.sqrt(max(s2**2 - s1**2, 1e-6)), mode="nearest")
    thr = DOG_THRESHOLD if threshold is None else float(threshold)
    size = max(3, int(round(MIN_SEPARATION_UM / um_per_px)) | 1)
    peak = (dog == ndi.maximum_filter(dog, size=size, mode="nearest")) & (dog > thr)
    iy, ix = np.nonzero(peak)
    if len(iy):  # a plateau of equal maxima is one peak: keep its first pixel
        lab, _ = ndi.label(peak, structure=np.ones((3, 3)))
        _, first = np.unique(lab[iy, ix], return_index=True)
        iy, ix = iy[first], ix[first]
    hh, ww = dog.shape
    inner = (iy > 0) & (iy < hh - 1) & (ix > 0) & (ix < ww - 1)
    iy, ix = iy[inner], ix[inner]
    c = dog[iy, ix]

    def sub(a, b):
        d = a - 2 * c + b
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d < 0, np.clip(0.5 * (a - b) / d, -0.5, 0.5), 0.0)

    fy = sub(dog[iy - 1, ix], dog[iy + 1, ix])
    fx = sub(dog[iy, ix - 1], dog[iy, ix + 1])
    return np.c_[ix + fx, iy + fy].astype(np.float64), c.astype(np.float64)


# ---------------------------------------------------------------------------------------------- offsets
def node_offsets(he_um: np.ndarray, xen_um: np.ndarray, node_um: float, radius_um: float,
                 min_peak: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local offsets (Xenium minus H&E) on a grid of square nodes of side ``node_um``.

    Returns ``(centres (k, 2), offsets (k, 2), support (k,), node of each H&E nucleus (n,) or -1)`` for the
    nodes with a clear peak: at least ``min_peak`` times the mean of the correlation, and a support (the
    fraction of the node's H&E nuclei with a Xenium nucleus within 2 um once shifted) well above what the local
    density of Xenium nuclei gives by chance (at least 1.5 times it and 0.2 more); other nuclei get node -1.
    """
    empty = (np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.full(len(he_um), -1))
    ok = np.isfinite(he_um).all(axis=1)
    if ok.sum() < 3 or len(xen_um) < 3:
        return empty
    lo = np.nanmin(he_um[ok], axis=0)
    cell = np.full(len(he_um), -1, dtype=np.int64)
    ij = np.floor((he_um[ok] - lo) / node_um).astype(np.int64)
    nx = int(ij[:, 0].max()) + 1
    key = ij[:, 1] * nx + ij[:, 0]
    cell[ok] = key
    xtree_order = np.argsort(xen_um[:, 1])
    xs = xen_um[xtree_order]
    b = VOTE_BIN_UM
    nb = int(np.ceil(node_um / b))
    nr = int(np.ceil(radius_um / b))
    size = nb + 2 * nr
    shape = (sfft.next_fast_len(size + nb), sfft.next_fast_len(size + nb))
    sig = 1.0 / b
    centres, offs, strengths = [], [], []
    node_of = np.full(len(he_um), -1)
    uniq, inv = np.unique(key, return_inverse=True)
    members = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])
    ok_idx = np.flatnonzero(ok)
    for u, mem in zip(uniq, members, strict=True):
        idx = ok_idx[mem]
        if len(idx) < 5:
            continue
        gx, gy = int(u % nx), int(u // nx)
        x0 = lo + np.array([gx, gy]) * node_um  # node corner (um)
        a = _bin(he_um[idx] - x0, nb, b)
        # Xenium nuclei in the node grown by the radius
        y_lo, y_hi = np.searchsorted(xs[:, 1], [x0[1] - radius_um, x0[1] + node_um + radius_um])
        cand = xs[y_lo:y_hi]
        cand = cand[(cand[:, 0] >= x0[0] - radius_um) & (cand[:, 0] < x0[0] + node_um + radius_um)]
        if len(cand) < 3:
            continue
        bb = _bin(cand - (x0 - radius_um), size, b)
        a = ndi.gaussian_filter(a, sig)
        # correlation c[d] = sum_u a[u] bb[u + d + nr]: offset d (bins) for d in [-nr, nr]
        fa = sfft.rfft2(a[::-1, ::-1], shape)
        fb = sfft.rfft2(bb, shape)
        full = sfft.irfft2(fa * fb, shape)
        cor = full[nb - 1 : nb - 1 + 2 * nr + 1, nb - 1 : nb - 1 + 2 * nr + 1]
        k = int(np.argmax(cor))
        py, px = np.unravel_index(k, cor.shape)
        peak = float(cor[py, px])
        mean = float(cor.mean())
        if not (mean > 0 and peak >= min_peak * mean):
            continue

        def sub(a_, c_, b_):
            d = a_ - 2 * c_ + b_
            return 0.0 if d >= 0 else float(np.clip(0.5 * (a_ - b_) / d, -0.5, 0.5))

        fy = sub(cor[py - 1, px], peak, cor[py + 1, px]) if 0 < py < cor.shape[0] - 1 else 0.0
        fx = sub(cor[py, px - 1], peak, cor[py, px + 1]) if 0 < px < cor.shape[1] - 1 else 0.0
        off = np.array([px + fx - nr, py + fy - nr]) * b
        # support: nuclei with a Xenium nucleus within 2 um once shifted, against chance at this density
        d, _ = cKDTree(cand).query(he_um[idx] + off, distance_upper_bound=SUPPORT_UM)
        support = float(np.isfinite(d).mean())
        density = len(cand) / (node_um + 2 * radius_um) ** 2
        chance = 1.0 - np.exp(-density * np.pi * SUPPORT_UM**2)
        if support < max(1.5 * chance, chance + 0.2):
            continue
        centres.append(x0 + node_um / 2)
        offs.append(off)
        strengths.append(support)
        node_of[idx] = len(centres) - 1
    if not centres:
        return empty
    return np.asarray(centres), np.asarray(offs), np.asarray(strengths), node_of


def _bin(xy: np.ndarray, n: int, b: float) -> np.ndarray:
    """Points (relative to the grid corner, um) binned into an ``n x n`` image of ``b`` um bins (bilinear)."""
    img = np.zeros((n + 1, n + 1), np.float32)
    f = xy / b - 0.5
    i0 = np.floor(f).astype(np.int64)
    w1 = f - i0
    for dy in (0, 1):
        for dx in (0, 1):
            wy = w1[:, 1] if dy else 1 - w1[:, 1]
            wx = w1[:, 0] if dx else 1 - w1[:, 0]
            iy, ix = i0[:, 1] + dy, i0[:, 0] + dx
            ok = (iy >= 0) & (iy < n) & (ix >= 0) & (ix < n)
            np.add.at(img, (iy[ok], ix[ok]), (wy * wx)[ok])
    return img[:n, :n]


# ---------------------------------------------------------------------------------------------- pairs, fits
def pairs_after_offsets(he_um, node_of, offsets, xen_um, max_d: float):
    """Mutual-nearest pairs (H&E index, Xenium index, distance) after shifting each H&E nucleus by its node's
    offset; nuclei of no node are left out."""
    moved = np.full_like(he_um, np.nan)
    has = node_of >= 0
    moved[has] = he_um[has] + offsets[node_of[has]]
    ci, ni, d = mutual_nearest(xen_um, moved, max_d)
    return ni, ci, d


def robust_affine(src: np.ndarray, dst: np.ndarray, threshold: float, *, seed: int = 0,
                  max_trials: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Affine ``src -> dst`` by RANSAC (skimage) then least squares with trimming; (3 x 3, inlier mask)."""
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    n = len(src)
    if n < 3:
        raise ValueError("fewer than 3 pairs")
    rng = np.random.default_rng(seed)
    if n >= 8:
        # RANSAC on a random subset (its final estimate is an SVD over all inliers), then every pair is scored
        sub = rng.choice(n, size=min(n, RANSAC_SUBSET), replace=False)
        model, inl_sub = ransac((src[sub], dst[sub]), AffineTransform, min_samples=3, residual_threshold=threshold,
                                max_trials=max_trials, rng=rng)
        if model is None or inl_sub is None or inl_sub.sum() < 3:
            inl = np.ones(n, bool)
        else:
            t = fit_affine(src[sub][inl_sub], dst[sub][inl_sub])
            inl = np.hypot(*(apply_affine(t, src) - dst).T) <= threshold
            if inl.sum() < 3:
                inl = np.ones(n, bool)
    else:
        inl = np.ones(n, bool)
    t = fit_affine(src[inl], dst[inl])
    for _ in range(6):
        res = np.hypot(*(apply_affine(t, src) - dst).T)
        sd = 1.4826 * np.median(res[inl]) if inl.any() else threshold
        cut = max(3.0 * sd, 0.75)
        cut = min(cut, threshold)
        new = res <= cut
        if new.sum() < 3 or np.array_equal(new, inl):
            break
        inl = new
        t = fit_affine(src[inl], dst[inl])
    return t, inl


# ---------------------------------------------------------------------------------------------- non-rigid
NONRIGID_BIN_UM = 40.0  # residuals are summarised per square of this side (at least)
NONRIGID_GRID_UM = 20.0  # spacing of the stored field
NONRIGID_SMOOTHING = 3000.0  # thin-plate spline smoothing (um^2 kernel units) of a bin of median size
PASS_PAIR_UM = 3.0  # pairs: mutual nearest within this, after the local offsets


def _binned_medians(pos: np.ndarray, vec: np.ndarray, bin_um: float, min_count: int = 3):
    key = np.floor(pos / bin_um).astype(np.int64)
    uniq, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")
    splits = np.cumsum(counts)[:-1]
    centres, meds, ns, keep_pairs = [], [], [], np.zeros(len(pos), bool)
    for grp in np.split(order, splits):
        if len(grp) < min_count:
            continue
        med = np.median(vec[grp], axis=0)
        dev = np.hypot(*(vec[grp] - med).T)
        good = grp[dev <= max(3.0 * 1.4826 * np.median(dev), 1.0)]
        if len(good) < min_count:
            continue
        keep_pairs[good] = True
        centres.append(pos[good].mean(axis=0))
        meds.append(np.median(vec[good], axis=0))
        ns.append(len(good))
    return np.asarray(centres).reshape(-1, 2), np.asarray(meds).reshape(-1, 2), np.asarray(ns), keep_pairs


def fit_nonrigid(p_px: np.ndarray, xen_um: np.ndarray, affine: np.ndarray, *, scale_um_per_px: float,
                 iterations: int = 3, node_um: float = 100.0, radius_um: tuple = (30.0, 15.0)) -> dict | None:
    """A smooth displacement field (um, after ``affine``) from H&E nuclei ``p_px`` to Xenium nuclei.

    Each iteration pairs the nuclei through local offsets under the current transform (so that pairs are found
    however large the deformation, up to ``radius_um``: the first search radius, then the next ...), takes the median residual per bin, fits a thin-plate
    spline through the bin medians and samples it on a grid of H&E pixels. None when too few bins hold pairs.
    """
    from scipy.interpolate import RBFInterpolator

    from .._registration import warp_displacement

    base = apply_affine(affine, p_px)
    warp = None
    grid_um = shape = origin = step_px = bin_um = None
    moved = base
    for it in range(max(1, iterations)):
        _, off, _, node = node_offsets(moved, xen_um, node_um, radius_um[min(it, len(radius_um) - 1)])
        hi, xi, _ = pairs_after_offsets(moved, node, off, xen_um, PASS_PAIR_UM)
        if len(hi) < 20:
            return warp
        if grid_um is None:
            pts = base[hi]
            area = np.prod(np.ptp(pts, axis=0) + 1.0)
            bin_um = max(NONRIGID_BIN_UM, float(np.sqrt(area / 3000.0)))
            # the grid: the H&E pixels of the pairs' bounding box, grown by two bins
            lo_px, hi_px = p_px[hi].min(axis=0), p_px[hi].max(axis=0)
            step_px = NONRIGID_GRID_UM / scale_um_per_px
            margin = 2 * bin_um / scale_um_per_px
            origin = lo_px - margin
            shape = (int(np.ceil((hi_px[1] - lo_px[1] + 2 * margin) / step_px)) + 1,
                     int(np.ceil((hi_px[0] - lo_px[0] + 2 * margin) / step_px)) + 1)
            gy, gx = np.mgrid[0 : shape[0], 0 : shape[1]]
            grid_um = apply_affine(affine, np.c_[gx.ravel(), gy.ravel()] * step_px + origin)
        vec = xen_um[xi] - base[hi]
        centres, meds, ns, _keep = _binned_medians(base[hi], vec, bin_um)
        if len(centres) < 6:
            return warp
        rbf = RBFInterpolator(centres, meds, kernel="thin_plate_spline", degree=1,
                              smoothing=NONRIGID_SMOOTHING / np.maximum(ns, 1) * np.median(ns),
                              neighbors=None if len(centres) <= 2500 else 150)
        field = np.empty((len(grid_um), 2))
        for s in range(0, len(grid_um), 20_000):
            field[s : s + 20_000] = rbf(grid_um[s : s + 20_000])
        warp = {"grid_um": field.reshape(shape[0], shape[1], 2), "origin_px": origin.astype(np.float64),
                "step_px": np.float64(step_px)}
        moved = base + warp_displacement(warp, p_px)
    return warp
