"""A CPU morphology baseline without deep weights: nucleus morphometrics, stain statistics, texture.

Everything is computed with scikit-image (colour deconvolution ``rgb2hed``, Otsu threshold,
``regionprops``, grey-level co-occurrence matrices, local binary patterns) on the patch around
the nucleus; sizes are in micrometres, so features do not depend on the patch resolution.

Two paths compute the same features. :meth:`HandcraftedEncoder.__call__` takes one patch per cell and
runs scikit-image on each (the definition). :meth:`HandcraftedEncoder.features_of_windows` takes a stack
of per-cell windows and runs the same steps, each window on its own, in compiled loops
(:mod:`~cellsymphony.models.encoders._handcrafted_kernels`, numba): about 12 times faster on one core,
the same values but where a nucleus has two equally high distance peaks (see there).
``embed_morphology`` samples the windows of each band of cells from one decoded and low-pass filtered
region of the slide (``cellsymphony.pp._handcrafted_bands``); :meth:`HandcraftedEncoder.features_in_band`
cuts them from one image of a band on its pixel lattice.
"""

from __future__ import annotations

import functools

import numpy as np

GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_P, LBP_R = 8, 1


class HandcraftedEncoder:
    """Per-cell features from nucleus-centred patches.

    Parameters
    ----------
    mpp
        Micrometres per patch pixel (to express sizes in micrometres).
    window_um
        Side of the central window (micrometres) used for stain statistics and texture.
    search_um
        The nucleus is the hematoxylin-positive object containing the centre, else the nearest one
        within this distance (micrometres); none found gives zero morphometrics and ``nucleus_found`` 0.

    Attributes
    ----------
    feature_names
        Names of the output columns.
    embed_dim
        Number of features.
    """

    name = "handcrafted"
    key = "X_handcrafted"
    kind = "features"  # called on uint8 patches, one feature row per patch (ENCODER_KINDS)
    weights_checksum = "none"

    def __init__(self, mpp: float = 0.5, *, window_um: float = 32.0, search_um: float = 6.0):
        self.mpp = float(mpp)
        self.window_um = float(window_um)
        self.search_um = float(search_um)
        morph = [
            "nucleus_found", "nucleus_area_um2", "nucleus_perimeter_um", "nucleus_major_axis_um",
            "nucleus_minor_axis_um", "nucleus_eccentricity", "nucleus_solidity", "nucleus_extent",
            "nucleus_circularity", "nucleus_hematoxylin_mean", "nucleus_hematoxylin_std", "perinuclear_eosin_mean",
        ]
        stain = [f"{c}_{s}" for c in ("hematoxylin", "eosin") for s in ("mean", "std", "p10", "p50", "p90")]
        colour = [f"rgb_{c}_{s}" for s in ("mean", "std") for c in "rgb"]
        glcm = [f"glcm_{p}" for p in GLCM_PROPS]
        lbp = [f"lbp_{i}" for i in range(LBP_P + 2)]
        self.feature_names = morph + stain + colour + glcm + lbp
        self.embed_dim = len(self.feature_names)

    def __repr__(self) -> str:
        return f"HandcraftedEncoder(mpp={self.mpp}, n_features={self.embed_dim})"

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Features ``(n, embed_dim)`` float32 of uint8 patches ``(n, H, W, 3)`` centred on nuclei."""
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(f"expected uint8 patches (n, H, W, 3), got shape {patches.shape}.")
        return np.stack([self._one(p) for p in patches]).astype(np.float32) if len(patches) else np.zeros(
            (0, self.embed_dim), np.float32
        )

    def _one(self, patch: np.ndarray) -> np.ndarray:
        from scipy import ndimage
        from skimage.color import rgb2hed
        from skimage.feature import graycomatrix, graycoprops, local_binary_pattern, peak_local_max
        from skimage.filters import threshold_otsu
        from skimage.measure import label, regionprops
        from skimage.morphology import remove_small_objects
        from skimage.segmentation import watershed

        h_img, w_img = patch.shape[:2]
        half = max(4, int(round(self.window_um / self.mpp / 2)))
        cy, cx = h_img // 2, w_img // 2
        win = patch[max(0, cy - half) : cy + half, max(0, cx - half) : cx + half]
        hed = rgb2hed(win)
        hema, eosin = hed[..., 0], hed[..., 1]

        # nucleus: the hematoxylin-positive object at (or nearest to) the centre; touching nuclei
        # are split by a watershed on the distance transform
        morph = np.zeros(12)
        smooth = ndimage.gaussian_filter(hema, sigma=max(0.5, 0.5 / self.mpp))
        pick, lab = 0, None
        if np.ptp(smooth) > 1e-6:
            # threshold halfway between the background and the stain at the centre, so pale
            # (vesicular) nuclei are found as well as dark ones; Otsu when the centre is not stained
            c = (min(cy, half), min(cx, half))
            r = max(1, int(round(1.5 / self.mpp)))
            core = float(np.median(smooth[max(0, c[0] - r) : c[0] + r + 1, max(0, c[1] - r) : c[1] + r + 1]))
            background = float(np.percentile(smooth, 30))
            thr = (core + background) / 2 if core > background else threshold_otsu(smooth)
            mask = ndimage.binary_fill_holes(smooth > thr)
            mask = remove_small_objects(mask, min_size=max(4, int(3.0 / self.mpp**2)))
            if mask.any():
                dist = ndimage.distance_transform_edt(mask)
                comps = label(mask)
                peaks = peak_local_max(dist, min_distance=max(2, int(round(2.0 / self.mpp))), labels=comps, exclude_border=False)
                markers = np.zeros_like(comps)
                markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
                lab = watershed(-dist, markers, mask=mask) if len(peaks) else comps
                pick = lab[c]
                if pick == 0 and lab.max() > 0:
                    d, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
                    if d[c] * self.mpp <= self.search_um:
                        pick = lab[iy[c], ix[c]]
        if pick:
            region = regionprops((lab == pick).astype(np.uint8), intensity_image=hema)[0]
            nuc = lab == pick
            ring = ndimage.binary_dilation(nuc, iterations=max(1, int(round(2.0 / self.mpp)))) & ~nuc
            area = region.area * self.mpp**2
            perim = max(region.perimeter, 1.0) * self.mpp
            morph = np.array(
                [
                    1.0,
                    area,
                    perim,
                    region.axis_major_length * self.mpp,
                    region.axis_minor_length * self.mpp,
                    region.eccentricity,
                    region.solidity,
                    region.extent,
                    min(1.0, 4 * np.pi * area / perim**2),
                    float(hema[nuc].mean()),
                    float(hema[nuc].std()),
                    float(eosin[ring].mean()) if ring.any() else 0.0,
                ]
            )
        stain = []
        for ch in (hema, eosin):
            p10, p50, p90 = np.percentile(ch, [10, 50, 90])
            stain += [ch.mean(), ch.std(), p10, p50, p90]
        rgb = win.reshape(-1, 3).astype(np.float64) / 255.0
        colour = [*rgb.mean(0), *rgb.std(0)]

        grey = (0.299 * win[..., 0] + 0.587 * win[..., 1] + 0.114 * win[..., 2]).astype(np.float64)
        q = np.clip(grey // 8, 0, 31).astype(np.uint8)  # 32 grey levels
        glcm = graycomatrix(q, distances=[1, 2], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True)
        tex = [float(np.nan_to_num(graycoprops(glcm, p)).mean()) for p in GLCM_PROPS]
        lbp = local_binary_pattern(grey.astype(np.uint8), LBP_P, LBP_R, method="uniform")
        hist = np.bincount(lbp.astype(np.int64).ravel(), minlength=LBP_P + 2)[: LBP_P + 2].astype(np.float64)
        hist /= max(hist.sum(), 1.0)
        return np.concatenate([morph, stain, colour, tex, hist])

    # -------------------------------------------------------------------------------------- per band
    def window_px(self, size: int | None = None) -> int:
        """Side in pixels of the central window the features use, inside a patch of ``size`` pixels
        (``None``: the full ``window_um`` window)."""
        side = 2 * max(4, int(round(self.window_um / self.mpp / 2)))
        return side if size is None else min(int(size), side)

    def features_in_band(self, band_rgb: np.ndarray, pos_px: np.ndarray, *, window_px: int | None = None) -> np.ndarray:
        """Features ``(n, embed_dim)`` float32 of the cells at ``pos_px`` in one image of a band of tissue.

        Parameters
        ----------
        band_rgb
            uint8 ``(H, W, 3)`` image at this encoder's ``mpp``, in the Xenium orientation (as read by
            :class:`~cellsymphony.pp._patch_source.PatchSource`).
        pos_px
            ``(n, 2)`` nucleus positions ``(x, y)`` in band pixel coordinates (pixel ``(u, v)`` covers
            ``[u, u + 1) x [v, v + 1)``, as nucleus positions in patches).
        window_px
            Side of each cell's window: ``self.window_px(size)`` for the per-cell patches of ``size`` px
            being matched (default: the whole ``window_um``). Every window must lie inside the band.

        Returns
        -------
        :meth:`__call__` of each cell's window cut from the band. The band's pixels are shared, so a window
        starts at the band pixel nearest ``pos - window_px / 2`` (up to half a pixel from the nucleus, where
        a per-cell patch is resampled at the nucleus itself; several features of the per-cell definition
        move with that sub-pixel phase: the ``lbp_*`` bins, solidity, extent, eccentricity). For the
        per-cell patches' own pixels use :meth:`features_of_windows` on them.

        On the same pixels the values are those of :meth:`__call__` except in a few percent of the cells
        (:meth:`features_of_windows`).
        """
        band = np.asarray(band_rgb)
        if band.ndim != 3 or band.shape[-1] != 3 or band.dtype != np.uint8:
            raise ValueError(f"expected a uint8 band image (H, W, 3), got {band.dtype} {band.shape}.")
        pos = np.asarray(pos_px, dtype=np.float64).reshape(-1, 2)
        n = len(pos)
        if n == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        side = self.window_px(window_px)
        u0 = np.floor(pos[:, 0] - side / 2 + 0.5).astype(np.int64)
        v0 = np.floor(pos[:, 1] - side / 2 + 0.5).astype(np.int64)
        bh, bw = band.shape[:2]
        if not np.isfinite(pos).all() or u0.min() < 0 or v0.min() < 0 or u0.max() + side > bw or v0.max() + side > bh:
            raise ValueError(
                f"features_in_band: every cell's {side} px window must lie inside the {bw} x {bh} px band; "
                "read the band with a margin of half a window around its cells."
            )

        windows = np.lib.stride_tricks.sliding_window_view(band, (side, side), axis=(0, 1))[v0, u0]
        return self.features_of_windows(np.ascontiguousarray(np.moveaxis(windows, (-2, -1), (1, 2))))

    def features_of_windows(self, windows: np.ndarray) -> np.ndarray:
        """:meth:`__call__` on uint8 patches ``(n, H, W, 3)`` centred on nuclei, each patch's central window on
        its own in the compiled kernels (:mod:`~cellsymphony.models.encoders._handcrafted_kernels`).

        The values are those of :meth:`__call__` (up to the order of floating-point sums) except where the
        nucleus has two distance-transform peaks of the same height: scikit-image's watershed floods them in
        an order set by its binary heap, which holds the peaks of every object of the patch, also those its
        edge cuts; the kernel floods them in raster order, so the split between the two, and the nucleus's
        size and shape ratios, can differ (2 to 3 % of the cells of the synthetic sections).
        """
        from . import _handcrafted_kernels as kern

        patches = np.asarray(windows)
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise ValueError(f"expected uint8 patches (n, H, W, 3), got {patches.dtype} {patches.shape}.")
        n, h, w = patches.shape[:3]
        if n == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        if h != w:
            raise ValueError(f"expected square patches, got {h} x {w}.")
        half = self.window_px() // 2
        lo = max(0, h // 2 - half)
        win = np.ascontiguousarray(patches[:, lo : h // 2 + half, lo : h // 2 + half])
        side = win.shape[1]
        hema, eosin, grey = (np.empty((n, side, side)) for _ in range(3))
        moments = np.empty((n, 5, 2))
        kern.deconvolve(win, _optical_density(), _hed_from_rgb(), hema, eosin, grey, moments)
        c = min(h // 2, half)
        morph = self._nuclei_in_windows(hema, eosin, c)
        stain = []
        for j, ch in enumerate((hema, eosin)):
            p10, p50, p90 = kern.window_quantiles(ch, np.array([10.0, 50.0, 90.0])).T
            stain += [moments[:, j, 0], moments[:, j, 1], p10, p50, p90]
        colour = [moments[:, j, 0] / 255.0 for j in range(2, 5)] + [moments[:, j, 1] / 255.0 for j in range(2, 5)]
        tex = np.empty((n, len(GLCM_PROPS) + LBP_P + 2))
        kern.texture(grey, _GLCM_OFFSETS, _GLCM_WEIGHTS, 32, *_LBP_POINTS, _LBP_LUT, tex)
        return np.column_stack([morph, *stain, *colour, tex]).astype(np.float32)

    def _nuclei_in_windows(self, hema: np.ndarray, eosin: np.ndarray, c: int) -> np.ndarray:
        """The 12 nucleus columns of :meth:`_one` for a stack of windows ``(n, s, s)`` (nucleus expected at
        pixel ``(c, c)``): each window smoothed and thresholded as :meth:`_one`, then segmented and measured
        on its own by the compiled :func:`~cellsymphony.models.encoders._handcrafted_kernels.nuclei`."""
        from scipy import ndimage
        from skimage.filters import threshold_otsu

        from . import _handcrafted_kernels as kern

        n = hema.shape[0]
        mpp = self.mpp
        smooth = np.ascontiguousarray(ndimage.gaussian_filter(hema, sigma=(0, max(0.5, 0.5 / mpp), max(0.5, 0.5 / mpp))))
        flat = smooth.reshape(n, -1)
        ok = (flat.max(1) - flat.min(1)) > 1e-6
        r = max(1, int(round(1.5 / mpp)))
        core = np.median(smooth[:, max(0, c - r) : c + r + 1, max(0, c - r) : c + r + 1].reshape(n, -1), axis=1)
        background = kern.window_quantiles(smooth, np.array([30.0]))[:, 0]
        thr = (core + background) / 2
        for i in np.flatnonzero(ok & ~(core > background)):  # Otsu where the centre is not stained
            thr[i] = threshold_otsu(smooth[i])
        out = np.zeros((n, 12))
        kern.nuclei(smooth, hema, eosin, thr, ok, int(c), max(4, int(3.0 / mpp**2)), max(2, int(round(2.0 / mpp))),
                    max(1, int(round(2.0 / mpp))), self.search_um / mpp, mpp, out)  # fmt: skip
        return out


#: graycomatrix's distinct pixel offsets (row, column) at distances 1, 2 and angles 0, 45, 90, 135 degrees and
#: how often each occurs (scikit-image rounds 45 degrees at distance 2 to (1, 1) again)
_GLCM_OFFSETS, _GLCM_WEIGHTS = np.unique(
    [(int(round(np.sin(a) * d)), int(round(np.cos(a) * d))) for d in (1, 2) for a in (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)],
    axis=0, return_counts=True,
)  # fmt: skip
_GLCM_OFFSETS, _GLCM_WEIGHTS = _GLCM_OFFSETS.astype(np.int64), _GLCM_WEIGHTS.astype(np.float64)
#: local_binary_pattern's sampling points (row, column offsets) of the P neighbours at radius R, and the
#: uniform label of each bit pattern (bit i: neighbour i): its number of set bits where it changes at most
#: twice along i = 0..P-1 (not around the circle, as scikit-image counts), else P + 1
_LBP_POINTS = (
    np.round(-LBP_R * np.sin(2 * np.pi * np.arange(LBP_P) / LBP_P), 5),
    np.round(LBP_R * np.cos(2 * np.pi * np.arange(LBP_P) / LBP_P), 5),
)
_bits = (np.arange(2**LBP_P)[:, None] >> np.arange(LBP_P)[None, :]) & 1
_LBP_LUT = np.where((_bits[:, 1:] != _bits[:, :-1]).sum(1) <= 2, _bits.sum(1), LBP_P + 1).astype(np.int64)
del _bits


@functools.cache
def _optical_density() -> np.ndarray:
    """scikit-image's ``separate_stains`` optical density of each uint8 level (its own conversion and clipping,
    so the compiled ``rgb2hed`` uses the very same numbers)."""
    from skimage.util import img_as_float

    rgb = np.maximum(img_as_float(np.arange(256, dtype=np.uint8)), 1e-6)
    return np.log(rgb) / np.log(1e-6)


@functools.cache
def _hed_from_rgb() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return np.ascontiguousarray(hed_from_rgb, dtype=np.float64)
