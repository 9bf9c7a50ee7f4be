"""A CPU morphology baseline without deep weights: nucleus morphometrics, stain statistics, texture.

Everything is computed with scikit-image (colour deconvolution ``rgb2hed``, Otsu threshold,
``regionprops``, grey-level co-occurrence matrices, local binary patterns) on the patch around
the nucleus; sizes are in micrometres, so features do not depend on the patch resolution.

Two paths compute the same features. :meth:`HandcraftedEncoder.__call__` takes one patch per cell and
runs scikit-image on each (the definition). :meth:`HandcraftedEncoder.features_in_band` takes one image
of a band of tissue and the cells' positions in it: the colour deconvolution, grey levels and local
binary patterns are computed once per band pixel, and every per-cell step (smoothing, thresholds, the
nucleus segmentation and its watershed, morphometrics, stain percentiles, co-occurrence matrices) runs
as array operations over the stack of all the band's cell windows at once, each window treated as
its own image, so the per-cell definition is kept (what differs: see
:meth:`~HandcraftedEncoder.features_in_band`). :meth:`HandcraftedEncoder.features_of_windows` is the same
vectorised computation on given per-cell patches, which ``embed_morphology`` samples for each band from one
decoded and low-pass filtered region of the slide (``cellsymphony.pp._handcrafted_bands``).
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

        On the same pixels the values are those of :meth:`__call__` except in a few percent of the cells,
        from the vectorised segmentation: the distance transform of the chosen nucleus's object alone
        (not of all objects), and ties of the nearest object broken in raster order.
        """
        from skimage.color import rgb2hed

        band = np.asarray(band_rgb)
        if band.ndim != 3 or band.shape[-1] != 3 or band.dtype != np.uint8:
            raise ValueError(f"expected a uint8 band image (H, W, 3), got {band.dtype} {band.shape}.")
        pos = np.asarray(pos_px, dtype=np.float64).reshape(-1, 2)
        n = len(pos)
        if n == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        side = self.window_px(window_px)
        c = side // 2
        u0 = np.floor(pos[:, 0] - side / 2 + 0.5).astype(np.int64)
        v0 = np.floor(pos[:, 1] - side / 2 + 0.5).astype(np.int64)
        bh, bw = band.shape[:2]
        if not np.isfinite(pos).all() or u0.min() < 0 or v0.min() < 0 or u0.max() + side > bw or v0.max() + side > bh:
            raise ValueError(
                f"features_in_band: every cell's {side} px window must lie inside the {bw} x {bh} px band; "
                "read the band with a margin of half a window around its cells."
            )

        def cut(img):  # (n, side, side[, ...]) copies of the cells' windows
            view = np.lib.stride_tricks.sliding_window_view(img, (side, side), axis=(0, 1))
            w = view[v0, u0]
            return np.ascontiguousarray(np.moveaxis(w, (-2, -1), (1, 2)) if img.ndim == 3 else w)

        # once per band pixel: colour deconvolution, grey levels, local binary patterns
        hed = rgb2hed(band)
        grey = 0.299 * band[..., 0] + 0.587 * band[..., 1] + 0.114 * band[..., 2]
        hema, eosin = cut(hed[..., 0]), cut(hed[..., 1])
        grey_w = cut(grey)
        grey8 = grey.astype(np.uint8).astype(np.float64)  # local_binary_pattern's input in _one
        hist = _window_lbp_hist(cut(_uniform_lbp(grey8, LBP_P, LBP_R)), cut(grey8), LBP_P, LBP_R)

        def box_stats(img):  # mean and std of each window, from summed-area tables of the band
            npx = side * side
            out = []
            for x in (img, img * img):
                sat = np.zeros((bh + 1, bw + 1), x.dtype)
                sat[1:, 1:] = x.cumsum(0).cumsum(1)
                out.append(sat[v0 + side, u0 + side] - sat[v0, u0 + side] - sat[v0 + side, u0] + sat[v0, u0])
            mean = out[0] / npx
            return mean, np.sqrt(np.maximum(out[1] / npx - mean * mean, 0.0))

        stats = [box_stats(hed[..., 0]), box_stats(hed[..., 1])]
        stats += [box_stats(band[..., i].astype(np.int64)) for i in range(3)]  # exact integer sums
        return self._stack_features(hema, eosin, grey_w, hist, stats, c)

    def features_of_windows(self, windows: np.ndarray) -> np.ndarray:
        """:meth:`__call__` on uint8 patches ``(n, H, W, 3)`` centred on nuclei, as array operations over the
        stack of their central windows (the same features; see :meth:`features_in_band` for the segmentation
        details)."""
        from skimage.color import rgb2hed

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
        win = patches[:, lo : h // 2 + half, lo : h // 2 + half]
        side = win.shape[1]
        hed = rgb2hed(win)
        hema, eosin = np.ascontiguousarray(hed[..., 0]), np.ascontiguousarray(hed[..., 1])
        grey = 0.299 * win[..., 0] + 0.587 * win[..., 1] + 0.114 * win[..., 2]
        grey8 = grey.astype(np.uint8).astype(np.float64)
        pad = int(np.ceil(LBP_R))
        big = np.zeros((n, side + 2 * pad, side + 2 * pad))
        big[:, pad : pad + side, pad : pad + side] = grey8
        codes = _lbp_codes(lambda dr, dc: big[:, pad + dr : pad + dr + side, pad + dc : pad + dc + side], grey8, LBP_P, LBP_R)
        nb = LBP_P + 2
        hist = np.bincount((np.arange(n)[:, None, None] * nb + codes).ravel(), minlength=n * nb).reshape(n, nb)
        hist = hist.astype(np.float64) / np.maximum(hist.sum(1, keepdims=True), 1.0)
        stats = []
        for x in (hema, eosin, *(win[..., i].astype(np.float64) for i in range(3))):
            flat = x.reshape(n, -1)
            stats.append((flat.mean(1), flat.std(1)))
        return self._stack_features(hema, eosin, grey, hist, stats, min(h // 2, half))

    def _stack_features(self, hema, eosin, grey, hist, stats, c: int) -> np.ndarray:
        """All columns from window stacks ``(n, s, s)``: stain (hematoxylin, eosin), grey levels, the LBP
        histograms, ``stats`` (mean, std) of hematoxylin, eosin, R, G, B, and the nucleus at pixel ``(c, c)``."""
        n = len(hema)
        morph = self._nuclei_in_windows(hema, eosin, c)
        stain = []
        for (mean, std), ch in zip(stats[:2], (hema, eosin), strict=True):
            p10, p50, p90 = np.percentile(ch.reshape(n, -1), [10, 50, 90], axis=1)
            stain += [mean, std, p10, p50, p90]
        colour = [m / 255.0 for m, _ in stats[2:]] + [sd / 255.0 for _, sd in stats[2:]]
        tex = _glcm_props(np.clip(grey // 8, 0, 31).astype(np.int64), 32)
        return np.column_stack([morph, *stain, *colour, tex, hist]).astype(np.float32)

    def _nuclei_in_windows(self, hema: np.ndarray, eosin: np.ndarray, c: int) -> np.ndarray:
        """The 12 nucleus columns of :meth:`_one` for a stack of windows ``(n, s, s)`` (nucleus expected at
        pixel ``(c, c)``): each window thresholded, filled, split by its watershed and measured on its own,
        as one array operation over the stack (2-D structuring elements, so windows never touch)."""
        from scipy import ndimage
        from scipy.spatial import cKDTree
        from skimage.filters import threshold_otsu
        from skimage.segmentation import watershed

        n, s = hema.shape[0], hema.shape[1]
        mpp = self.mpp
        cross = np.zeros((3, 3, 3), bool)
        cross[1] = ndimage.generate_binary_structure(2, 1)
        full = np.zeros((3, 3, 3), bool)
        full[1] = True
        sigma = max(0.5, 0.5 / mpp)
        smooth = ndimage.gaussian_filter(hema, sigma=(0, sigma, sigma))
        flat = smooth.reshape(n, -1)
        ok = (flat.max(1) - flat.min(1)) > 1e-6
        r = max(1, int(round(1.5 / mpp)))
        core = np.median(smooth[:, max(0, c - r) : c + r + 1, max(0, c - r) : c + r + 1].reshape(n, -1), axis=1)
        background = np.percentile(flat, 30, axis=1)
        thr = (core + background) / 2
        for i in np.flatnonzero(ok & ~(core > background)):  # Otsu where the centre is not stained
            thr[i] = threshold_otsu(smooth[i])
        mask = (smooth > thr[:, None, None]) & ok[:, None, None]
        mask = ndimage.binary_fill_holes(mask, structure=cross)
        lab4, _ = ndimage.label(mask, structure=cross)  # remove_small_objects (4-connected components)
        sizes = np.bincount(lab4.ravel())
        mask &= (sizes >= max(4, int(3.0 / mpp**2)))[lab4]
        comps, _ = ndimage.label(mask, structure=full)

        # the component of each window that holds the centre, else the one nearest it within search_um
        rad = int(np.ceil(self.search_um / mpp)) + 1
        lo, hi = max(0, c - rad), min(s, c + rad + 1)
        yy, xx = np.mgrid[lo:hi, lo:hi]
        d2 = (yy - c) ** 2 + (xx - c) ** 2
        near = comps[:, lo:hi, lo:hi]
        d2w = np.where(near > 0, d2[None], np.iinfo(np.int64).max).reshape(n, -1)
        best = np.argmin(d2w, axis=1)
        best_d2 = d2w[np.arange(n), best]
        chosen = np.where(np.sqrt(best_d2.astype(np.float64)) * mpp <= self.search_um, near.reshape(n, -1)[np.arange(n), best], 0)
        chosen[best_d2 == np.iinfo(np.int64).max] = 0
        out = np.zeros((n, 12))
        boxes = np.flatnonzero(chosen > 0)
        if len(boxes) == 0:
            return out
        # each chosen component, with a margin, side by side in one strip image: the segmentation steps
        # below see only these pixels (a few times fewer than the windows), still one call per step
        md = max(2, int(round(2.0 / mpp)))
        grow = max(1, int(round(2.0 / mpp)))
        margin = max(md, grow) + 1
        kk, rr, cc = np.nonzero(comps[boxes] == chosen[boxes][:, None, None])
        nb = len(boxes)
        r0, r1, c0, c1 = np.full(nb, s), np.full(nb, -1), np.full(nb, s), np.full(nb, -1)
        np.minimum.at(r0, kk, rr)
        np.maximum.at(r1, kk, rr)
        np.minimum.at(c0, kk, cc)
        np.maximum.at(c1, kk, cc)
        # a component near the window's edge gets a wider margin, outside the window and foreground for the
        # distance transform (the window's edge is no background to scipy's EDT)
        edge = (r0 < margin) | (c0 < margin) | (r1 >= s - margin) | (c1 >= s - margin)
        mg = np.where(edge, 4 * margin, margin)
        hb, wb = r1 - r0 + 1 + 2 * mg, c1 - c0 + 1 + 2 * mg
        # shelf packing, tallest first, into rows of at least 1024 px
        yoff, xoff = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
        shelf_w = max(int(wb.max()), 1024)
        y = x = shelf_h = 0
        for i in np.argsort(-hb, kind="stable"):
            if x + wb[i] > shelf_w:
                y, x, shelf_h = y + shelf_h, 0, 0
            yoff[i], xoff[i] = y, x
            x, shelf_h = x + int(wb[i]), max(shelf_h, int(hb[i]))
        height, width = y + shelf_h, shelf_w
        bid = np.full((height, width), -1, np.int64)  # box of each strip pixel
        for i in range(nb):
            bid[yoff[i] : yoff[i] + hb[i], xoff[i] : xoff[i] + wb[i]] = i
        in_box = bid >= 0
        wr = (r0 - mg - yoff)[bid] + np.arange(height)[:, None]  # window row / column of each strip pixel
        wc = (c0 - mg - xoff)[bid] + np.arange(width)[None, :]
        valid = in_box & (wr >= 0) & (wr < s) & (wc >= 0) & (wc < s)
        win = boxes[bid]
        wrc, wcc = np.clip(wr, 0, s - 1), np.clip(wc, 0, s - 1)
        sel = valid & (comps[win, wrc, wcc] == chosen[win])
        h_s = np.where(valid, hema[win, wrc, wcc], 0.0)
        e_s = np.where(valid, eosin[win, wrc, wcc], 0.0)
        cy = c - (r0 - mg) + yoff  # the window centre in strip coordinates
        cx = c - (c0 - mg) + xoff

        # peak_local_max(dist, min_distance=md, labels=comps, exclude_border=False) on each component
        fg = valid & (comps[win, wrc, wcc] > 0)  # every object of the window, as the per-cell transform sees them
        dist = np.where(sel, ndimage.distance_transform_edt(fg | (in_box & ~valid)), 0.0)
        bg = np.finfo(dist.dtype).min
        img = np.where(sel, dist, bg)
        peak = sel & (img == ndimage.maximum_filter(img, size=2 * md + 1, mode="nearest"))
        flat_box = np.bincount(bid[sel & ~peak], minlength=nb) == 0
        for b in np.flatnonzero(flat_box):  # a flat object: its isolated pixels are its peaks (as scikit-image)
            rect = slice(yoff[b], yoff[b] + hb[b]), slice(xoff[b], xoff[b] + wb[b])
            peak[rect] = sel[rect] ^ ndimage.binary_opening(sel[rect])
        peak &= sel & (dist > 0)
        py, px = np.nonzero(peak)
        order = np.argsort(-dist[py, px], kind="stable")
        py, px = py[order], px[order]
        keep = np.ones(len(py), bool)  # minimum spacing (Chebyshev >= md), greedily from the highest peak
        if len(py):
            pts = np.column_stack([py, px]).astype(np.float64)
            for i, cand in enumerate(cKDTree(pts).query_ball_point(pts, r=md - 0.5, p=np.inf)):
                if keep[i]:
                    for j in cand:
                        if j > i:
                            keep[j] = False
        markers = np.zeros(sel.shape, np.int64)
        markers[py[keep], px[keep]] = np.arange(1, int(keep.sum()) + 1)
        lab = watershed(-dist, markers, mask=sel).astype(np.int64)
        unmarked = np.bincount(bid[py[keep], px[keep]], minlength=nb) == 0
        if unmarked.any():  # no peak: the component itself (as _one without peaks)
            lab[sel & unmarked[bid]] = -1

        # the nucleus: the watershed region at the centre, else the nearest one to it
        ly, lx = np.nonzero(lab)
        lb = bid[ly, lx]
        d2 = (ly - cy[lb]) ** 2 + (lx - cx[lb]) ** 2
        first = np.lexsort((d2, lb))
        lb_sorted = lb[first]
        head = first[np.r_[True, lb_sorted[1:] != lb_sorted[:-1]]]
        pick = np.zeros(nb, np.int64)
        pick[lb[head]] = lab[ly[head], lx[head]]
        nuc = (lab == pick[bid]) & (lab != 0)

        ny, nx = np.nonzero(nuc)
        k = bid[ny, nx]
        m00 = np.bincount(k, minlength=nb).astype(np.float64)
        cnt = np.maximum(m00, 1)
        mr = np.bincount(k, ny, nb) / cnt
        mc = np.bincount(k, nx, nb) / cnt
        dr, dc = ny - mr[k], nx - mc[k]
        a = np.bincount(k, dr * dr, nb) / cnt
        b2 = np.bincount(k, dr * dc, nb) / cnt
        d = np.bincount(k, dc * dc, nb) / cnt
        root = np.sqrt(((a - d) / 2) ** 2 + b2**2)
        l1 = np.clip((a + d) / 2 + root, 0, None)
        l2 = np.clip((a + d) / 2 - root, 0, None)
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, None)), 0.0)
        br0, br1, bc0, bc1 = np.full(nb, height), np.full(nb, -1), np.full(nb, width), np.full(nb, -1)
        np.minimum.at(br0, k, ny)
        np.maximum.at(br1, k, ny)
        np.minimum.at(bc0, k, nx)
        np.maximum.at(bc1, k, nx)
        bbox = np.maximum((br1 - br0 + 1) * (bc1 - bc0 + 1), 1)
        # skimage.measure.perimeter(neighborhood=4) of each nucleus
        border = nuc & ~ndimage.binary_erosion(nuc, border_value=0)
        pim = ndimage.convolve(border.astype(np.int64), np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]]), mode="constant")
        weights = np.zeros(50)
        weights[[5, 7, 15, 17, 25, 27]] = 1
        weights[[21, 33]] = np.sqrt(2)
        weights[[13, 23]] = (1 + np.sqrt(2)) / 2
        yb, xb = np.nonzero(border)
        perim_px = np.bincount(bid[yb, xb], weights[np.minimum(pim[yb, xb], 49)], nb)
        convex = _convex_areas(ny, nx, k, nb)
        hv = h_s[ny, nx]
        h_mean = np.bincount(k, hv, nb) / cnt
        h_std = np.sqrt(np.bincount(k, (hv - h_mean[k]) ** 2, nb) / cnt)
        ring = ndimage.binary_dilation(nuc, iterations=grow) & ~nuc & valid
        yr, xr = np.nonzero(ring)
        kr = bid[yr, xr]
        n_ring = np.bincount(kr, minlength=nb)
        e_ring = np.where(n_ring > 0, np.bincount(kr, e_s[yr, xr], nb) / np.maximum(n_ring, 1), 0.0)
        area = m00 * mpp**2
        perim = np.maximum(perim_px, 1.0) * mpp
        cols = [np.ones(nb), area, perim, 4 * np.sqrt(l1) * mpp, 4 * np.sqrt(l2) * mpp, ecc, m00 / np.maximum(convex, 1),
                m00 / bbox, np.minimum(1.0, 4 * np.pi * area / perim**2), h_mean, h_std, e_ring]  # fmt: skip
        found = m00 > 0
        out[boxes[found]] = np.column_stack(cols)[found]
        return out


def _convex_areas(ys: np.ndarray, xs: np.ndarray, k: np.ndarray, nb: int) -> np.ndarray:
    """Pixels of each object's convex hull, as ``skimage.morphology.convex_hull_image(obj).sum()`` (the hull
    of the pixels' edge midpoints; pixel centres inside or on it): objects ``k`` given by their pixels."""
    from scipy.spatial import ConvexHull, QhullError

    out = np.zeros(nb)
    if len(k) == 0:
        return out
    # the extreme pixels of each row of each object carry the hull
    key = k * (int(ys.max()) + 1) + ys
    order = np.lexsort((xs, key))
    key_s = key[order]
    first = np.r_[True, key_s[1:] != key_s[:-1]]
    last = np.r_[key_s[1:] != key_s[:-1], True]
    left, right = order[first], order[last]
    obj = k[left]
    bounds = np.searchsorted(obj, np.arange(nb + 1))
    eps = 1e-9
    for i in np.flatnonzero(np.diff(bounds)):
        sl = slice(bounds[i], bounds[i + 1])
        ly, lx, rx = ys[left[sl]].astype(np.float64), xs[left[sl]].astype(np.float64), xs[right[sl]].astype(np.float64)
        pts = np.concatenate([
            np.column_stack([ly, lx - 0.5]), np.column_stack([ly - 0.5, lx]), np.column_stack([ly + 0.5, lx]),
            np.column_stack([ly, rx + 0.5]), np.column_stack([ly - 0.5, rx]), np.column_stack([ly + 0.5, rx]),
        ])  # fmt: skip
        try:
            v = pts[ConvexHull(pts).vertices]
        except QhullError:
            out[i] = bounds[i + 1] - bounds[i]
            continue
        rows = np.arange(np.ceil(v[:, 0].min() - eps), np.floor(v[:, 0].max() + eps) + 1)
        a, b = v, np.roll(v, -1, axis=0)
        dy = b[:, 0] - a[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (rows[:, None] - a[None, :, 0]) / dy[None, :]
        x = a[None, :, 1] + t * (b[:, 1] - a[:, 1])[None, :]
        hit = (t >= -eps) & (t <= 1 + eps) & (dy[None, :] != 0)
        flat = dy == 0  # horizontal edges: both ends lie on their row
        xh = np.concatenate([a[flat, 1], b[flat, 1]])
        yh = np.concatenate([a[flat, 0], b[flat, 0]])
        on = np.abs(rows[:, None] - yh[None, :]) <= eps
        lo = np.minimum(np.where(hit, x, np.inf).min(1), np.where(on, xh[None, :], np.inf).min(1) if len(xh) else np.inf)
        hi = np.maximum(np.where(hit, x, -np.inf).max(1), np.where(on, xh[None, :], -np.inf).max(1) if len(xh) else -np.inf)
        out[i] = np.maximum(np.floor(hi + eps) - np.ceil(lo - eps) + 1, 0).sum()
    return out


def _lbp_codes(at, centre: np.ndarray, P: int, R: float) -> np.ndarray:
    """Uniform LBP codes (0..P+1) as ``skimage.feature.local_binary_pattern(..., method="uniform")``: ``at(dr,
    dc)`` gives the pixels ``(dr, dc)`` away from each centre (zero outside the image), ``centre`` their values."""
    rp = np.round(-R * np.sin(2 * np.pi * np.arange(P) / P), 5)
    cp = np.round(R * np.cos(2 * np.pi * np.arange(P) / P), 5)
    bits = np.empty((P, *centre.shape), bool)
    for i in range(P):
        r0, r1, c0, c1 = int(np.floor(rp[i])), int(np.ceil(rp[i])), int(np.floor(cp[i])), int(np.ceil(cp[i]))
        fr, fc = rp[i] - r0, cp[i] - c0
        if r0 == r1 and c0 == c1:  # on the pixel grid: the interpolation is the pixel itself
            bits[i] = at(r0, c0) - centre >= 0
            continue
        top = (1 - fc) * at(r0, c0) + fc * at(r0, c1)
        bottom = (1 - fc) * at(r1, c0) + fc * at(r1, c1)
        bits[i] = ((1 - fr) * top + fr * bottom) - centre >= 0
    changes = (bits[:-1] != bits[1:]).sum(0)
    return np.where(changes <= 2, bits.sum(0), P + 1).astype(np.uint8)


def _uniform_lbp(img: np.ndarray, P: int, R: float) -> np.ndarray:
    """Uniform LBP codes of a whole image (zero padding outside it, as scikit-image)."""
    h, w = img.shape
    pad = int(np.ceil(R))
    big = np.zeros((h + 2 * pad, w + 2 * pad))
    big[pad : pad + h, pad : pad + w] = img
    return _lbp_codes(lambda dr, dc: big[pad + dr : pad + dr + h, pad + dc : pad + dc + w], img, P, R)


def _window_lbp_hist(band_codes: np.ndarray, grey: np.ndarray, P: int, R: float) -> np.ndarray:
    """Normalised histograms ``(n, P + 2)`` of the uniform LBP codes of each window ``grey`` ``(n, s, s)``
    computed on that window alone: the band's codes inside, and the outer ``ceil(R)`` pixels recomputed with
    the window's zero padding (what the per-cell patch sees)."""
    n, s, _ = grey.shape
    pad = int(np.ceil(R))
    nb = P + 2
    k = np.repeat(np.arange(n), s * s)
    hist = np.bincount(k * nb + band_codes.reshape(-1).astype(np.int64), minlength=n * nb).reshape(n, nb)
    edge = np.ones((s, s), bool)
    edge[pad : s - pad, pad : s - pad] = False
    ry, rx = np.nonzero(edge)
    big = np.zeros((n, s + 2 * pad, s + 2 * pad))
    big[:, pad : pad + s, pad : pad + s] = grey
    own = _lbp_codes(lambda dr, dc: big[:, pad + ry + dr, pad + rx + dc], grey[:, ry, rx], P, R)
    ke = np.repeat(np.arange(n), len(ry))
    hist -= np.bincount(ke * nb + band_codes[:, ry, rx].reshape(-1).astype(np.int64), minlength=n * nb).reshape(n, nb)
    hist += np.bincount(ke * nb + own.reshape(-1).astype(np.int64), minlength=n * nb).reshape(n, nb)
    hist = hist.astype(np.float64)
    return hist / np.maximum(hist.sum(1, keepdims=True), 1.0)


def _glcm_props(q: np.ndarray, levels: int) -> np.ndarray:
    """Mean over distances (1, 2) and angles (0, 45, 90, 135 degrees) of each ``GLCM_PROPS`` property of the
    symmetric, normalised grey-level co-occurrence matrix of each window of ``q`` ``(n, s, s)`` (int levels):
    ``graycoprops(graycomatrix(...))`` per window, as one histogram over the stack."""
    n, s, _ = q.shape
    offsets = [(int(round(np.sin(a) * d)), int(round(np.cos(a) * d))) for d in (1, 2)
               for a in (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)]  # fmt: skip
    counts = {}
    base = (np.arange(n) * levels * levels)[:, None, None]
    for off in dict.fromkeys(offsets):
        dr, dc = off
        a = q[:, max(0, -dr) : s - max(0, dr), max(0, -dc) : s - max(0, dc)]
        b = q[:, max(0, dr) : s + min(0, dr), max(0, dc) : s + min(0, dc)]
        c = np.bincount((base + a * levels + b).ravel(), minlength=n * levels * levels).reshape(n, levels, levels)
        c = (c + c.transpose(0, 2, 1)).astype(np.float64)
        counts[off] = c / np.maximum(c.sum((1, 2), keepdims=True), 1)
    i = np.arange(levels, dtype=np.float64)[None, :, None]
    j = np.arange(levels, dtype=np.float64)[None, None, :]
    res = {p: np.zeros(n) for p in GLCM_PROPS}
    for off, times in zip(*np.unique(np.array(offsets), axis=0, return_counts=True), strict=True):
        P = counts[tuple(int(v) for v in off)]
        res["contrast"] += times * ((P * (i - j) ** 2).sum((1, 2)))
        res["dissimilarity"] += times * ((P * np.abs(i - j)).sum((1, 2)))
        res["homogeneity"] += times * ((P / (1.0 + (i - j) ** 2)).sum((1, 2)))
        asm = (P**2).sum((1, 2))
        res["ASM"] += times * (asm)
        res["energy"] += times * (np.sqrt(asm))
        di = i - (i * P).sum((1, 2))[:, None, None]
        dj = j - (j * P).sum((1, 2))[:, None, None]
        std_i = np.sqrt((P * di**2).sum((1, 2)))
        std_j = np.sqrt((P * dj**2).sum((1, 2)))
        cov = (P * di * dj).sum((1, 2))
        flat = (std_i < 1e-15) | (std_j < 1e-15)
        res["correlation"] += times * (np.where(flat, 1.0, cov / np.where(flat, 1.0, std_i * std_j)))
    return np.column_stack([res[p] / len(offsets) for p in GLCM_PROPS])
