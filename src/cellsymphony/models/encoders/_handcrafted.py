"""A CPU morphology baseline without deep weights: nucleus morphometrics, stain statistics, texture.

Everything is computed with scikit-image (colour deconvolution ``rgb2hed``, Otsu threshold,
``regionprops``, grey-level co-occurrence matrices, local binary patterns) on the patch around
the nucleus; sizes are in micrometres, so features do not depend on the patch resolution.
"""

from __future__ import annotations

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
