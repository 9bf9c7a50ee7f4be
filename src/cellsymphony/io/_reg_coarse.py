"""Coarse H&E-to-Xenium registration: rotation, mirror flip, scale and translation from low-resolution images.

The Xenium side is a nuclear-density image (the DAPI morphology image reduced to a few micrometres per pixel, or
the nucleus centroids binned when there is no DAPI image); the H&E side is the hematoxylin channel
(``skimage.color.rgb2hed``) of a low-resolution pyramid level. Every candidate similarity (angle x flip x
scale) is scored by the masked normalised cross-correlation of the two images over all translations at once
(Padfield 2012, computed with FFTs), first on images of ~64 pixels, then the best candidates are refined on
images twice as fine, and so on to a few micrometres per pixel.

Geometry: a similarity ``S`` maps H&E level-0 pixels ``(x, y, 1)`` to Xenium micrometres; images are
indexed ``[row, col]`` with pixel ``(i, j)`` of an image at ``r`` um per pixel centred on ``((j + 0.5) r,
(i + 0.5) r)`` um.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from .._registration import exact_downsample

COARSE_PX = 48  # pixels along the longer side of the Xenium image at the first (exhaustive) search
FINEST_PX = 256  # refinements (at least one) on images twice as fine until this many pixels ...
FINEST_UM = 8.0  # ... or pixels no finer than this: the nuclei stage absorbs the rest (offsets up to 60 um)
ANGLE_STEP = 6.0  # degrees between the angles of the exhaustive search
SCALE_STEP = 0.12  # log step between its scales
PRIOR_RANGE = 1.45  # with a known pixel size, scales within [prior / 1.45, prior * 1.45] are searched
UNKNOWN_MPP = (0.1, 2.0)  # micrometres per H&E pixel searched when the H&E records none ...
UNKNOWN_STEPS = (32, 8.0, 0.15)  # ... on smaller images, coarser angles and scales (pixels, degrees, log step)
N_KEEP, N_KEEP_UNKNOWN = 8, 12  # candidates kept from the exhaustive search (halved at each refinement)
REFINE_MARGIN = 0.25  # refinements read the H&E under the field grown by this fraction of its extent
MIN_OVERLAP = 0.25  # of the smaller of the field and the H&E, for a translation to be scored ...
MIN_FIELD = 0.15  # ... and of the Xenium field (an H&E showing less of the section is not registered)
SLIDE_UM = 80_000.0
AREA_RANGE = (1.6, 2.5)  # without a pixel size: scales within [estimate / 1.6, estimate * 2.5] of the tissue areas  # no H&E is larger than a slide: bounds the scale from above
_BAND_PIXELS = 8_000_000  # H&E pixels decoded at once when reducing a level


@dataclass
class Candidate:
    score: float
    angle: float  # radians
    flip: bool  # mirror x of the H&E before rotating
    scale: float  # micrometres per H&E level-0 pixel
    shift: np.ndarray  # (2,) micrometres: translation of the similarity

    level_scores: list = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        return similarity(self.angle, self.flip, self.scale, self.shift)

    def differs(self, other: Candidate, angle_deg: float = 10.0, scale_step: float = 0.12) -> bool:
        d_ang = abs((np.degrees(self.angle - other.angle) + 180.0) % 360.0 - 180.0)
        return self.flip != other.flip or d_ang > angle_deg or abs(np.log(self.scale / other.scale)) > scale_step


def similarity(angle: float, flip: bool, scale: float, shift) -> np.ndarray:
    """3 x 3: H&E level-0 pixel -> micrometres, ``scale * R(angle) @ F`` then ``+ shift``."""
    c, s = np.cos(angle), np.sin(angle)
    lin = scale * np.array([[c, -s], [s, c]]) @ (np.diag([-1.0, 1.0]) if flip else np.eye(2))
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = shift
    return m


def standardise(img: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Robustly scaled to about [0, 1] (1st / 99.5th percentiles of the valid pixels), float32."""
    v = img[valid] if valid is not None else img.ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.zeros_like(img, dtype=np.float32)
    lo, hi = np.percentile(v, [1.0, 99.5])
    if hi - lo <= 1e-9:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


class FixedImage:
    """The Xenium image prepared for NCC at one FFT size (its transforms computed once)."""

    def __init__(self, img: np.ndarray, um_per_px: float, pad_shape: tuple[int, int]) -> None:
        self.img = img.astype(np.float64)
        self.r = float(um_per_px)
        self.shape = img.shape
        self.pad = pad_shape
        self.n = float(img.size)
        self.f_f = sfft.rfft2(self.img, pad_shape)
        self.f_f2 = sfft.rfft2(self.img**2, pad_shape)


def ncc_map(fixed: FixedImage, mov: np.ndarray, mask: np.ndarray,
            min_overlap: float = MIN_OVERLAP) -> tuple[np.ndarray, int, int]:
    """Masked NCC (Padfield 2012) of the fixed image (its whole field) with the moving image at every offset:
    only the overlap of the field with the moving image's valid region (``mask``: the H&E image's own bounds;
    beyond them nothing is known, so an H&E smaller than the section is scored on what it shows).

    Offsets whose overlap is less than ``min_overlap`` of the smaller of the two or :data:`MIN_FIELD` of the
    field, or whose moving part is almost flat, are scored -1. Returns the map and the offset of its index (0, 0): map index ``(iy, ix)`` puts moving
    pixel (0, 0) on fixed pixel ``(iy - oy, ix - ox)``.
    """
    ph, pw = fixed.pad
    g = mov.astype(np.float64) * mask
    m = mask.astype(np.float64)
    mh, mw = g.shape
    fh, fw = fixed.shape
    crop = (slice(0, fh + mh - 1), slice(0, fw + mw - 1))
    f_g = sfft.rfft2(g[::-1, ::-1], (ph, pw))
    f_m = sfft.rfft2(m[::-1, ::-1], (ph, pw))
    sfg = sfft.irfft2(fixed.f_f * f_g, (ph, pw))[crop]  # sum f g over the overlap
    sf = sfft.irfft2(fixed.f_f * f_m, (ph, pw))[crop]
    sff = sfft.irfft2(fixed.f_f2 * f_m, (ph, pw))[crop]
    # sums of the mask, g and g^2 over the fixed field at every offset: box sums of integral images
    n, sg, sgg = _box_sums(np.stack([m, g, g * g], axis=-1), fh, fw).transpose(2, 0, 1)
    n = np.round(n)
    # and at least MIN_FIELD of the field: a small moving image (a small scale) matches noise anywhere
    need = max(min_overlap * min(fixed.n, float(m.sum())), MIN_FIELD * fixed.n, 4.0)
    valid = m > 0
    flat = 0.05 * float(g[valid].var()) if valid.any() else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        var_g = (sgg - sg**2 / n) / n
        var_f = (sff - sf**2 / n) / n
        ncc = (sfg - sf * sg / n) / n / np.sqrt(np.maximum(var_f * var_g, 1e-24))
    ncc[(n < need) | ~(var_g > max(flat, 1e-8)) | ~(var_f > 1e-8)] = -1.0
    return np.nan_to_num(ncc, nan=-1.0), mh - 1, mw - 1


def _box_sums(g: np.ndarray, fh: int, fw: int) -> np.ndarray:
    """``out[iy, ix]``: sum of ``g`` (zero outside) over the rows ``[mh - 1 - iy, mh - 1 - iy + fh)`` and the
    columns ``[mw - 1 - ix, mw - 1 - ix + fw)``: the part of the moving image under the fixed field at map
    index ``(iy, ix)`` (separable window sums of cumulative sums)."""

    def along(a: np.ndarray, f: int) -> np.ndarray:  # axis 0
        m = a.shape[0]
        c = np.zeros((m + 2 * f + 1,) + a.shape[1:], np.float64)
        np.cumsum(a, axis=0, out=c[f + 1 : f + 1 + m])
        c[f + 1 + m :] = c[f + m]
        start = f + m - 1 - np.arange(f + m - 1)
        return c[start + f] - c[start]

    return np.swapaxes(along(np.swapaxes(along(g, fh), 0, 1), fw), 0, 1)


def best_offset(ncc: np.ndarray, oy: int, ox: int) -> tuple[float, float, float]:
    """The peak of an NCC map, refined to sub-pixel by a parabola through its neighbours: (score, dy, dx)."""
    k = int(np.argmax(ncc))
    iy, ix = np.unravel_index(k, ncc.shape)
    best = float(ncc[iy, ix])

    def sub(a, b, c):
        d = a - 2 * b + c
        return 0.0 if d >= 0 or a < -0.5 or c < -0.5 else float(np.clip(0.5 * (a - c) / d, -0.5, 0.5))

    fy = sub(ncc[iy - 1, ix], best, ncc[iy + 1, ix]) if 0 < iy < ncc.shape[0] - 1 else 0.0
    fx = sub(ncc[iy, ix - 1], best, ncc[iy, ix + 1]) if 0 < ix < ncc.shape[1] - 1 else 0.0
    return best, iy + fy - oy, ix + fx - ox


def warp_moving(he_img: np.ndarray, he_f: float, angle: float, flip: bool, scale: float, r: float,
                corner: tuple[int, int] = (0, 0)):
    """The H&E image (``he_f`` level-0 pixels per pixel; ``corner`` (column, row): where a crop of it starts)
    under the linear part of the similarity, resampled at ``r`` um per pixel into its bounding box (zero outside
    the image), its validity mask, and the um position of its pixel (0, 0) centre relative to the similarity
    with zero shift."""
    lin = similarity(angle, flip, scale, (0.0, 0.0))[:2, :2]
    h, w = he_img.shape
    c0 = np.asarray(corner, dtype=float)
    # he pixel (i, j) centre in level-0 px: ((j + c0 + 0.5) f - 0.5, (i + r0 + 0.5) f - 0.5)
    corners = (np.array([[0, 0], [w, 0], [0, h], [w, h]], float) + c0) * he_f - 0.5
    um = corners @ lin.T
    lo = um.min(axis=0)
    size = np.ceil((um.max(axis=0) - lo) / r).astype(int) + 1
    # output pixel (i, j) centre in um: lo + ((j + 0.5) r, (i + 0.5) r) -> level-0 px -> he pixel
    inv = np.linalg.inv(lin)
    # he pixel (row, col) = A @ (out row, out col) + b
    a_xy = inv * r / he_f  # d(he x, he y) / d(out x, out y)
    b_xy = (inv @ (lo + 0.5 * r) + 0.5) / he_f - 0.5 - c0
    matrix = np.array([[a_xy[1, 1], a_xy[1, 0]], [a_xy[0, 1], a_xy[0, 0]]])
    offset = np.array([b_xy[1], b_xy[0]])
    shape = (int(size[1]), int(size[0]))
    out = ndi.affine_transform(he_img, matrix, offset, output_shape=shape, order=1, mode="constant", cval=0.0,
                               prefilter=False)
    mask = ndi.affine_transform(np.ones(he_img.shape, np.float32), matrix, offset, output_shape=shape, order=0,
                                mode="constant", cval=0.0, prefilter=False)
    return out, mask, lo + 0.5 * r


def score_candidate(fixed: FixedImage, he_img, he_f, angle, flip, scale, corner=(0, 0)) -> Candidate:
    mov, mask, origin = warp_moving(he_img, he_f, angle, flip, scale, fixed.r, corner)
    if mov.shape[0] + fixed.shape[0] > fixed.pad[0] or mov.shape[1] + fixed.shape[1] > fixed.pad[1]:
        raise ValueError("FFT size too small for the moving image")
    score, dy, dx = best_offset(*ncc_map(fixed, mov, mask))
    # moving pixel (0, 0) sits on fixed pixel (dy, dx): its centre in um is ((dx + .5) r, (dy + .5) r)
    shift = np.array([(dx + 0.5) * fixed.r, (dy + 0.5) * fixed.r]) - origin
    return Candidate(score, angle, flip, scale, shift)


# ---------------------------------------------------------------------------------------------- images
# hematoxylin optical density per uint8 value and channel: skimage's colour deconvolution (rgb2hed) with a
# lookup table, since H&E pixels are 8-bit (the same stain matrix, without a float64 copy of the image)
def _hed_lut() -> np.ndarray:
    from skimage.color import hed_from_rgb

    v = np.arange(256, dtype=np.float64)
    od = np.log(np.maximum(v, 1e-6) / 255.0) / np.log(1e-6)  # skimage: log(max(rgb, 1e-6)) / log(1e-6)
    od = np.maximum(od, 0.0)
    return (od[:, None] * hed_from_rgb[:, 0][None, :]).astype(np.float32)  # (256, 3): channel weights


_LUT = None


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """The hematoxylin channel of ``skimage.color.rgb2hed`` (clipped at 0) of a uint8 RGB array, float32."""
    global _LUT
    if _LUT is None:
        _LUT = _hed_lut()
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    h = _LUT[rgb[..., 0], 0] + _LUT[rgb[..., 1], 1] + _LUT[rgb[..., 2], 2]
    return np.maximum(h, 0.0, out=h)


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f, a.shape[1] // f
    return a[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3), dtype=np.float32)


class HEHematoxylin:
    """Hematoxylin images of an H&E slide at low resolutions, read from its pyramid (band by band)."""

    def __init__(self, he) -> None:
        self.he = he
        self._cache: dict[int, np.ndarray] = {}

    def tissue_area_px(self, side_px: int = 1024) -> float:
        """Area (level-0 pixels^2) of the tissue: where the optical density of a level about ``side_px`` pixels
        across exceeds 0.08 (white slide glass stays below it), closed and filled; 0 when nothing is there."""
        he = self.he
        h0, w0 = he.shapes[0]
        level = he.best_level(he.mpp * max(h0, w0) / side_px)
        rgb = he.read_region(0, 0, he.shapes[level][1], he.shapes[level][0], level=level).astype(np.float32)
        od = -np.log(np.maximum(rgb.mean(axis=2), 1.0) / 255.0)
        ds = exact_downsample(he.downsamples[level])
        return float(tissue_mask(od, 0.08).sum() * ds * ds)

    def at(self, f: float) -> tuple[np.ndarray, float]:
        """About ``f`` (at least) level-0 pixels per pixel: the image and its exact level-0 pixels per pixel."""
        he = self.he
        f = max(float(f), 1.0)
        level = he.best_level(he.mpp * f)
        ds = exact_downsample(he.downsamples[level])
        k = max(1, int(np.floor(f / ds + 1e-6)))
        key = (level, k)
        if key not in self._cache:
            h, w = he.shapes[level]
            oh, ow = max(h // k, 1), max(w // k, 1)
            out = np.zeros((oh, ow), np.float32)
            rows = max(k, (_BAND_PIXELS // max(w, 1)) // k * k)
            for r0 in range(0, oh * k, rows):
                r1 = min(oh * k, r0 + rows)
                band = hematoxylin(he.read_region(0, r0, ow * k, r1 - r0, level=level))
                out[r0 // k : r1 // k] = block_mean(band, k)
            self._cache[key] = out
        return self._cache[key], ds * k


def tissue_mask(img: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels above ``threshold``, closed and with holes filled (a tissue outline from a low-resolution image)."""
    m = ndi.binary_closing(img > threshold, iterations=2)
    return ndi.binary_fill_holes(m)


def nuclei_density(xy_um: np.ndarray, extent: tuple[float, float], r: float) -> np.ndarray:
    """Nucleus centroids binned into an image of ``r`` um per pixel covering ``[0, w) x [0, h)`` um."""
    w, h = extent
    nx, ny = max(int(np.ceil(w / r)), 1), max(int(np.ceil(h / r)), 1)
    ok = np.isfinite(xy_um).all(axis=1)
    img, _, _ = np.histogram2d(xy_um[ok, 1], xy_um[ok, 0], bins=(ny, nx), range=((0, ny * r), (0, nx * r)))
    return img.astype(np.float32)


# ---------------------------------------------------------------------------------------------- search
def _prep(img: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return standardise(ndi.gaussian_filter(img.astype(np.float32), sigma))


def _pad_for(fixed_shape, he_shape, he_f, max_scale, r) -> tuple[int, int]:
    diag = float(np.hypot(*he_shape)) * he_f * max_scale / r + 3
    return (sfft.next_fast_len(int(fixed_shape[0] + diag)), sfft.next_fast_len(int(fixed_shape[1] + diag)))


def search(
    xenium_image,
    he_images: HEHematoxylin,
    *,
    mpp_prior: float | None,
    flips: bool = True,
    n_keep: int | None = None,
) -> list[Candidate]:
    """Candidate similarities (H&E level-0 pixel -> um), best first, after the exhaustive search and the
    refinements.

    ``xenium_image(r)`` returns the Xenium nuclear image at about ``r`` um per pixel and its exact pixel size;
    its extent (um) is ``xenium_image.extent``.
    """
    extent = max(xenium_image.extent)
    if mpp_prior is not None:
        lo, hi = mpp_prior / PRIOR_RANGE, mpp_prior * PRIOR_RANGE
        coarse_px, angle_step, scale_step = COARSE_PX, ANGLE_STEP, SCALE_STEP
    else:
        lo, hi = UNKNOWN_MPP
        hi = max(lo * 1.5, min(hi, SLIDE_UM / max(he_images.he.shapes[0])))
        coarse_px, angle_step, scale_step = UNKNOWN_STEPS
        # the tissue areas give the scale roughly: sqrt(um^2 of Xenium tissue / px^2 of H&E tissue) is too small
        # when the H&E shows more tissue than the section, too large when it shows less
        area_um2 = getattr(xenium_image, "tissue_area_um2", None)
        area_px = he_images.tissue_area_px()
        if area_um2 and area_px:
            est = float(np.sqrt(area_um2 / area_px))
            a_lo, a_hi = max(lo, est / AREA_RANGE[0]), min(hi, est * AREA_RANGE[1])
            if a_lo < a_hi:
                lo, hi = a_lo, a_hi
                coarse_px, angle_step, scale_step = COARSE_PX, ANGLE_STEP, SCALE_STEP
    r0 = extent / coarse_px
    n_scales = int(np.ceil(np.log(hi / lo) / scale_step)) + 1
    scales = np.exp(np.linspace(np.log(lo), np.log(hi), n_scales))
    angles = np.radians(np.arange(0.0, 360.0, angle_step))

    x_img, xr = xenium_image(r0)
    fixed_img = _prep(x_img)
    cands: list[Candidate] = []
    # each scale reads the H&E at about the fixed resolution (level-0 pixels per pixel: an integer multiple of a
    # pyramid level's downsample, so scales share images)
    prepped: dict[float, np.ndarray] = {}
    for sc in scales:
        he_img, he_f = he_images.at(xr / sc)
        if he_f not in prepped:
            prepped[he_f] = _prep(he_img)
        mov = prepped[he_f]
        fixed = FixedImage(fixed_img, xr, _pad_for(fixed_img.shape, mov.shape, he_f, float(sc), xr))
        for flip in (False, True) if flips else (False,):
            for ang in angles:
                cands.append(score_candidate(fixed, mov, he_f, float(ang), flip, float(sc)))
    # without a pixel size, small scales (an H&E showing part of the section) compete at this resolution: keep more
    keep = _diverse(cands, n_keep or (N_KEEP_UNKNOWN if mpp_prior is None else N_KEEP))
    for c in keep:
        c.level_scores.append(c.score)

    # refinements: images twice as fine, a local search around each kept candidate
    a_step, s_step, r = np.radians(angle_step), scale_step, r0
    first = True
    while first or (max(xenium_image.extent) / r < FINEST_PX * 0.99 and r / 2 >= FINEST_UM * 0.99):
        first = False
        r /= 2.0
        a_step /= 2.0
        s_step /= 2.0
        x_img, xr = xenium_image(r)
        fixed_img = _prep(x_img)
        refined = []
        for c in keep:
            he_img, he_f = he_images.at(max(xr / c.scale, 1.0))
            mov, corner = _crop_near(_prep(he_img), he_f, c, xenium_image.extent)
            fixed = FixedImage(fixed_img, xr, _pad_for(fixed_img.shape, mov.shape, he_f, c.scale * np.exp(s_step), xr))
            best = None
            for da in (-1.0, 0.0, 1.0):
                for ds in (-1.0, 0.0, 1.0):
                    cand = score_candidate(fixed, mov, he_f, c.angle + da * a_step, c.flip, c.scale * np.exp(ds * s_step),
                                           corner)
                    if best is None or cand.score > best.score:
                        best = cand
            best.level_scores = [*c.level_scores, best.score]
            refined.append(best)
        # refinements can bring two candidates to the same pose: keep distinct ones
        keep = _diverse(refined, max(3, len(refined) // 2))
    return keep


def _crop_near(he_img: np.ndarray, he_f: float, c: Candidate, extent, margin: float = REFINE_MARGIN):
    """The part of the H&E image that the candidate puts on the Xenium field, grown by ``margin`` of the field's
    extent (a refinement moves it by much less), and the (column, row) of its corner: an H&E much larger than the
    section costs the refinements no more than the section."""
    w, h = extent
    grow = margin * max(w, h)
    field = np.array([[-grow, -grow], [w + grow, -grow], [-grow, h + grow], [w + grow, h + grow]])
    inv = np.linalg.inv(c.matrix())
    px0 = field @ inv[:2, :2].T + inv[:2, 2]
    px = (px0 + 0.5) / he_f - 0.5
    hh, ww = he_img.shape
    c0, r0 = (int(np.clip(np.floor(v), 0, n)) for v, n in zip(px.min(axis=0), (ww, hh), strict=True))
    c1, r1 = (int(np.clip(np.ceil(v) + 1, 0, n)) for v, n in zip(px.max(axis=0), (ww, hh), strict=True))
    if c1 - c0 < 4 or r1 - r0 < 4:
        return he_img, (0, 0)
    return he_img[r0:r1, c0:c1], (c0, r0)


def _diverse(cands: list[Candidate], n: int) -> list[Candidate]:
    """The ``n`` best candidates that differ from each other in flip, angle or scale."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: -c.score):
        if all(c.differs(o) for o in out):
            out.append(c)
            if len(out) == n:
                break
    return out
