"""Compiled per-window kernels of the handcrafted encoder (numba, one loop over the windows of a stack).

Each kernel follows the scikit-image / scipy call of :meth:`HandcraftedEncoder._one
<cellsymphony.models.encoders._handcrafted.HandcraftedEncoder._one>` that it stands for, on each window on
its own (so windows never touch), in one compiled pass instead of one Python call per cell:

- :func:`nuclei`: ``binary_fill_holes`` (background 4-connected), ``remove_small_objects`` (4-connected),
  ``label`` (8-connected), ``distance_transform_edt`` (exact; the window's edge is no background),
  ``peak_local_max(labels=..., exclude_border=False)`` with its minimum spacing, ``watershed`` (4-connected,
  flooded from the markers by level, then age, as a bucket queue), and the ``regionprops`` morphometrics of the chosen nucleus (moments,
  perimeter with ``neighborhood=4``, convex hull of the pixels' edge midpoints, extent), the nucleus's
  hematoxylin and the perinuclear eosin ring (``binary_dilation`` by the cross, ``grow`` times).
- :func:`texture`: ``graycomatrix`` (symmetric, normed) and ``graycoprops`` averaged over the given offsets,
  and the ``local_binary_pattern(method="uniform")`` histogram (zero padding, bilinear neighbours).
- :func:`deconvolve`: ``rgb2hed`` (scikit-image's optical densities and matrix), grey levels, window means
  and standard deviations; :func:`window_quantiles`: ``np.percentile`` (linear) of each window.

Only the chosen nucleus's object is labelled and split (the other objects of the window cannot reach it).
Where two markers of that object are equally high, scikit-image's heap lets them flood in an order that
depends on every object of the patch; here they flood in raster order: that is where the values can differ
from the per-cell definition (:func:`_watershed`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# 4-neighbourhood (the cross) and 8-neighbourhood offsets, row-major
_N4 = np.array([[-1, 0], [0, -1], [0, 1], [1, 0]], dtype=np.int64)
_N8 = np.array([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]], dtype=np.int64)


@njit(cache=True, nogil=True)
def deconvolve(win, od, conv, hema, eosin, grey, stats):
    """``rgb2hed`` of uint8 windows ``win`` ``(n, s, s, 3)`` into ``hema`` and ``eosin`` ``(n, s, s)``, their
    grey levels ``0.299 R + 0.587 G + 0.114 B`` into ``grey``, and the mean and standard deviation of each
    window's hematoxylin, eosin, R, G, B into ``stats`` ``(n, 5, 2)``. ``od``: scikit-image's optical density
    of each of the 256 levels (``log(max(v / 255, 1e-6)) / log(1e-6)``), ``conv``: its ``hed_from_rgb``."""
    n, s0, s1 = win.shape[0], win.shape[1], win.shape[2]
    npx = s0 * s1
    for k in range(n):
        acc = np.zeros(5)
        for y in range(s0):
            for x in range(s1):
                r, g, b = win[k, y, x, 0], win[k, y, x, 1], win[k, y, x, 2]
                a0, a1, a2 = od[r], od[g], od[b]
                h = max(a0 * conv[0, 0] + a1 * conv[1, 0] + a2 * conv[2, 0], 0.0)
                e = max(a0 * conv[0, 1] + a1 * conv[1, 1] + a2 * conv[2, 1], 0.0)
                hema[k, y, x] = h
                eosin[k, y, x] = e
                grey[k, y, x] = 0.299 * r + 0.587 * g + 0.114 * b
                acc[0] += h
                acc[1] += e
                acc[2] += r
                acc[3] += g
                acc[4] += b
        mean = acc / npx
        var = np.zeros(5)
        for y in range(s0):
            for x in range(s1):
                var[0] += (hema[k, y, x] - mean[0]) ** 2
                var[1] += (eosin[k, y, x] - mean[1]) ** 2
                for c in range(3):
                    var[2 + c] += (win[k, y, x, c] - mean[2 + c]) ** 2
        for j in range(5):
            stats[k, j, 0] = mean[j]
            stats[k, j, 1] = np.sqrt(var[j] / npx)


@njit(cache=True, nogil=True)
def window_quantiles(stack, qs):
    """``(n, len(qs))``: ``np.percentile(stack[i], qs)`` (linear interpolation) of each window of ``stack``
    ``(n, h, w)``, exactly: the order statistics are found in a 1024-bin histogram between the window's
    extremes, then among the few values of their bin."""
    n = stack.shape[0]
    m = stack.shape[1] * stack.shape[2]
    nb = 1024
    out = np.empty((n, qs.shape[0]))
    counts = np.zeros(nb + 1, np.int64)
    bins = np.empty(m, np.int64)
    few = np.empty(m)
    for k in range(n):
        flat = stack[k].ravel()
        lo, hi = flat.min(), flat.max()
        scale = nb / (hi - lo) if hi > lo else 0.0
        counts[:] = 0
        for i in range(m):
            b = min(int((flat[i] - lo) * scale), nb - 1)
            bins[i] = b
            counts[b + 1] += 1
        for b in range(nb):
            counts[b + 1] += counts[b]  # counts[b]: values in the bins before b
        for j in range(qs.shape[0]):
            pos = qs[j] / 100.0 * (m - 1)
            r = int(np.floor(pos))
            frac = pos - r
            a = _rank_value(flat, bins, counts, r, few)
            if frac > 0.0 and r + 1 < m:
                a = a + (_rank_value(flat, bins, counts, r + 1, few) - a) * frac
            out[k, j] = a
    return out


@njit(cache=True, nogil=True)
def _rank_value(flat, bins, counts, r, few):
    """The value of rank ``r`` (0-based, ascending) of ``flat``, its histogram ``bins`` / ``counts`` given."""
    b = np.searchsorted(counts, r, side="right") - 1
    c = 0
    for i in range(flat.shape[0]):
        if bins[i] == b:
            few[c] = flat[i]
            c += 1
    return np.sort(few[:c])[r - counts[b]]


@njit(cache=True, nogil=True)
def _fill_holes(mask, seen, sy, sx):
    """``binary_fill_holes(mask)`` in place: the background not 4-connected to outside the window is filled
    (``seen``: ``(s0 + 2, s1 + 2)`` scratch, the window with a ring of outside around it)."""
    s0, s1 = mask.shape
    seen[:, :] = False
    for y in range(s0 + 2):
        seen[y, 0] = seen[y, s1 + 1] = True
    for x in range(s1 + 2):
        seen[0, x] = seen[s0 + 1, x] = True
    top = 0
    for y in range(s0):
        for x in range(s1):
            if (y == 0 or x == 0 or y == s0 - 1 or x == s1 - 1) and not mask[y, x]:
                seen[y + 1, x + 1] = True
                sy[top], sx[top] = y, x
                top += 1
    while top > 0:
        top -= 1
        py, px = sy[top], sx[top]
        for t in range(4):
            qy, qx = py + _N4[t, 0], px + _N4[t, 1]
            if not seen[qy + 1, qx + 1] and not mask[qy, qx]:
                seen[qy + 1, qx + 1] = True
                sy[top], sx[top] = qy, qx
                top += 1
    for y in range(s0):
        for x in range(s1):
            if not seen[y + 1, x + 1]:
                mask[y, x] = True


@njit(cache=True, nogil=True)
def _label4(mask, lab4, sizes, nid, y, x, stack):
    """Label the 4-connected component of ``mask`` at the unlabelled pixel ``(y, x)`` into ``lab4`` (the next
    id, ``nid[0] + 1``) and its size into ``sizes``: the components ``remove_small_objects`` sizes, labelled
    where they are met (a pixel survives when ``sizes[lab4[y, x]] >= min_size``; ``sizes[0]`` is 0)."""
    s0, s1 = mask.shape
    nid[0] += 1
    i = nid[0]
    lab4[y, x] = i
    stack[0] = y * s1 + x
    top, count = 1, 1
    while top > 0:
        top -= 1
        py, px = stack[top] // s1, stack[top] % s1
        for t in range(4):
            qy, qx = py + _N4[t, 0], px + _N4[t, 1]
            if 0 <= qy < s0 and 0 <= qx < s1 and mask[qy, qx] and lab4[qy, qx] == 0:
                lab4[qy, qx] = i
                stack[top] = qy * s1 + qx
                top += 1
                count += 1
    sizes[i] = count


@njit(cache=True, nogil=True)
def _queue(qhead, qtail, qnext, b, p):
    """Append pixel ``p`` to the first-in first-out list of bucket ``b``."""
    if qhead[b] < 0:
        qhead[b] = p
    else:
        qnext[qtail[b]] = p
    qtail[b] = p
    qnext[p] = -1


@njit(cache=True, nogil=True)
def _watershed(d2, obj, ws, my, mx, nm, qhead, qtail, qnext):
    """``watershed(-dist, markers=ws, mask=obj)`` in place (``d2``: the squared distances), as scikit-image
    floods from markers: 4-connected, each marker queued at its own value and age 0, each pixel reached at
    the higher of its own value and the level it was reached from, the queue ordered by that level, then by
    age (the order pixels were queued). The levels only go down in squared distance, so the queue is one
    first-in first-out list per squared distance (``qhead``, ``qtail``, ``qnext``: scratch, the buckets all
    empty (-1) on entry and on return).

    Markers of equal value leave in raster order (``my``, ``mx``). scikit-image's binary heap lets them
    leave in an order set by the heap's structure, which holds the markers of every object of the patch
    (also those cut by its edge): there, and only there, a nucleus can be split otherwise."""
    s0, s1 = d2.shape
    cur = 0
    for j in range(nm):
        b = d2[my[j], mx[j]]
        cur = max(cur, b)
        _queue(qhead, qtail, qnext, b, my[j] * s1 + mx[j])
    while cur >= 0:
        p = qhead[cur]
        if p < 0:
            cur -= 1
            continue
        qhead[cur] = qnext[p]
        if qhead[cur] < 0:
            qtail[cur] = -1
        py, px = p // s1, p % s1
        for t in range(4):
            qy, qx = py + _N4[t, 0], px + _N4[t, 1]
            if 0 <= qy < s0 and 0 <= qx < s1 and obj[qy, qx] and ws[qy, qx] == 0:
                ws[qy, qx] = ws[py, px]
                _queue(qhead, qtail, qnext, min(d2[qy, qx], cur), qy * s1 + qx)


@njit(cache=True, nogil=True)
def _hull_pixels(ys, xs, npx, s):
    """``convex_hull_image(obj).sum()`` of an object given by its pixels: the pixel centres inside or on the
    convex hull of the pixels' edge midpoints (exact, in doubled integer coordinates)."""
    left = np.full(s, 1 << 30, np.int64)
    right = np.full(s, -1, np.int64)
    for i in range(npx):
        left[ys[i]] = min(left[ys[i]], xs[i])
        right[ys[i]] = max(right[ys[i]], xs[i])
    pts = np.empty((6 * s, 2), np.int64)  # (2x, 2y): the extreme pixels of each row carry the hull
    m = 0
    for y in range(s):
        if right[y] < 0:
            continue
        for x, dx in ((left[y], -1), (right[y], 1)):
            pts[m, 0], pts[m, 1] = 2 * x + dx, 2 * y
            pts[m + 1, 0], pts[m + 1, 1] = 2 * x, 2 * y - 1
            pts[m + 2, 0], pts[m + 2, 1] = 2 * x, 2 * y + 1
            m += 3
    pts = pts[:m]
    order = np.argsort(pts[:, 0] * (8 * s + 16) + pts[:, 1])
    p = pts[order]
    hull = np.empty((2 * m + 1, 2), np.int64)  # Andrew's monotone chain, collinear points dropped
    h = 0
    for i in range(m):
        while h >= 2 and (hull[h - 1, 0] - hull[h - 2, 0]) * (p[i, 1] - hull[h - 2, 1]) - (
            hull[h - 1, 1] - hull[h - 2, 1]
        ) * (p[i, 0] - hull[h - 2, 0]) <= 0:
            h -= 1
        hull[h] = p[i]
        h += 1
    lower = h + 1
    for i in range(m - 2, -1, -1):
        while h >= lower and (hull[h - 1, 0] - hull[h - 2, 0]) * (p[i, 1] - hull[h - 2, 1]) - (
            hull[h - 1, 1] - hull[h - 2, 1]
        ) * (p[i, 0] - hull[h - 2, 0]) <= 0:
            h -= 1
        hull[h] = p[i]
        h += 1
    h -= 1  # the last point repeats the first
    if h < 3:
        return float(npx)
    ymin, ymax = hull[:h, 1].min(), hull[:h, 1].max()
    total = 0.0
    eps = 1e-9
    for r in range((ymin + 1) // 2, ymax // 2 + 1):  # pixel rows: y = r, doubled 2r
        y2 = 2 * r
        lo, hi = np.inf, -np.inf
        for e in range(h):
            ax, ay = hull[e, 0], hull[e, 1]
            bx, by = hull[(e + 1) % h, 0], hull[(e + 1) % h, 1]
            if ay == by:
                if ay == y2:
                    lo, hi = min(lo, ax, bx), max(hi, ax, bx)
            elif min(ay, by) <= y2 <= max(ay, by):
                x2 = ax + (y2 - ay) * (bx - ax) / (by - ay)
                lo, hi = min(lo, x2), max(hi, x2)
        if hi >= lo:
            total += max(np.floor(hi / 2.0 + eps) - np.ceil(lo / 2.0 - eps) + 1.0, 0.0)
    return total


@njit(cache=True, nogil=True)
def nuclei(smooth, hema, eosin, thr, ok, c, min_size, md, grow, search_px, mpp, out):
    """The 12 nucleus columns of ``HandcraftedEncoder._one`` for each window ``(n, s, s)`` into ``out``
    ``(n, 12)`` (zeros where no nucleus): ``smooth`` the smoothed hematoxylin thresholded at ``thr``,
    ``ok`` whether the window has contrast, the nucleus expected at pixel ``(c, c)``.

    Only the chosen object is labelled, measured and split: the window's holes are filled, then the
    4-connected components (``remove_small_objects``) are sized where they are met, and the distance
    transform runs on the object's bounding box with a pixel to spare (its nearest background pixels all
    lie there: the first pixel past the object along a row or a column is background)."""
    n, s0, s1 = smooth.shape
    npix = s0 * s1
    mask = np.zeros((s0, s1), np.bool_)
    seen = np.zeros((s0 + 2, s1 + 2), np.bool_)
    sy, sx = np.empty(npix + 8, np.int64), np.empty(npix + 8, np.int64)
    obj = np.zeros((s0, s1), np.bool_)
    lab4 = np.zeros((s0, s1), np.int64)
    ws = np.zeros((s0, s1), np.int64)
    depth = np.zeros((s0, s1), np.int64)
    rowmax = np.zeros((s0, s1), np.int64)
    vm = np.zeros((s0, s1), np.int64)
    qnext = np.full(npix, -1, np.int64)
    sizes = np.zeros(npix + 1, np.int64)
    nid = np.zeros(1, np.int64)
    stack = np.zeros(npix + 8, np.int64)
    cy_, cx_ = np.empty(npix, np.int64), np.empty(npix, np.int64)
    peaks = np.empty(npix, np.int64)
    val = np.empty(npix, np.int64)
    ky, kx = np.empty(npix, np.int64), np.empty(npix, np.int64)
    gv = np.zeros((s0, s1), np.int64)
    d2a = np.zeros((s0, s1), np.int64)
    far = s0 + s1  # more than any distance in the window: no background
    qhead, qtail = np.full(far * far + 1, -1, np.int64), np.full(far * far + 1, -1, np.int64)  # every squared distance
    r2 = search_px * search_px
    rad = int(np.ceil(search_px)) + 1
    for k in range(n):
        out[k, :] = 0.0
        if not ok[k]:
            continue
        sm = smooth[k]
        t = thr[k]
        for y in range(s0):
            for x in range(s1):
                mask[y, x] = sm[y, x] > t
        _fill_holes(mask, seen, sy, sx)
        lab4[:, :] = 0
        nid[0] = 0
        # the nearest surviving pixel to the centre within the search radius (ties: raster order)
        best, py0, px0 = r2 + 1, -1, -1
        for y in range(max(0, c - rad), min(s0, c + rad + 1)):
            for x in range(max(0, c - rad), min(s1, c + rad + 1)):
                d2 = (y - c) * (y - c) + (x - c) * (x - c)
                if d2 < best and mask[y, x]:
                    if lab4[y, x] == 0:
                        _label4(mask, lab4, sizes, nid, y, x, stack)
                    if sizes[lab4[y, x]] >= min_size:
                        best, py0, px0 = d2, y, x
        if py0 < 0 or np.sqrt(best) > search_px:
            continue
        # its object: the 8-connected pixels that survive, from there
        obj[:, :] = False
        obj[py0, px0] = True
        cy_[0], cx_[0] = py0, px0
        m, head = 1, 0
        while head < m:
            py, px = cy_[head], cx_[head]
            head += 1
            for t8 in range(8):
                qy, qx = py + _N8[t8, 0], px + _N8[t8, 1]
                if not (0 <= qy < s0 and 0 <= qx < s1) or obj[qy, qx] or not mask[qy, qx]:
                    continue
                if lab4[qy, qx] == 0:
                    _label4(mask, lab4, sizes, nid, qy, qx, stack)
                if sizes[lab4[qy, qx]] >= min_size:
                    obj[qy, qx] = True
                    cy_[m], cx_[m] = qy, qx
                    m += 1
        r0, r1, c0, c1 = s0, -1, s1, -1
        for i in range(m):
            r0, r1, c0, c1 = min(r0, cy_[i]), max(r1, cy_[i]), min(c0, cx_[i]), max(c1, cx_[i])
        # distance_transform_edt of the surviving mask at the object's pixels, from the object's box with a pixel
        # to spare: gv, each box pixel's distance to the nearest background pixel of its column (in the box),
        # then each object pixel's squared distance min over columns x' of (x - x')^2 + gv[y, x']^2, over
        # the columns no farther than its own gv (the exact transform, as scipy's, at those pixels)
        y0, y1, x0, x1 = max(0, r0 - 1), min(s0, r1 + 2), max(0, c0 - 1), min(s1, c1 + 2)
        for y in range(y0, y1):
            for x in range(x0, x1):
                if mask[y, x] and lab4[y, x] == 0:
                    _label4(mask, lab4, sizes, nid, y, x, stack)
                gv[y, x] = 1 if mask[y, x] and sizes[lab4[y, x]] >= min_size else 0
        for x in range(x0, x1):
            run = far
            for y in range(y0, y1):
                run = min(run + 1, far) if gv[y, x] > 0 else 0
                gv[y, x] = run
            run = far
            for y in range(y1 - 1, y0 - 1, -1):
                run = min(run + 1, far) if gv[y, x] > 0 else 0
                gv[y, x] = min(gv[y, x], run)
        for i in range(m):
            y, x = cy_[i], cx_[i]
            g = gv[y, x]
            xa, xb = (x0, x1) if g >= far else (max(x0, x - g), min(x1, x + g + 1))
            best2 = far * far
            for xx in range(xa, xb):
                gg = gv[y, xx]
                if gg < far:
                    best2 = min(best2, (x - xx) * (x - xx) + gg * gg)
            d2a[y, x] = best2
        # peak_local_max(dist, min_distance=md, labels=...): the object's pixels equal to the object's
        # maximum within md (Chebyshev), a separable running maximum over the box (of the squared distances,
        # which order and tie as the distances do)
        for y in range(y0, y1):
            for x in range(x0, x1):
                vm[y, x] = d2a[y, x] if obj[y, x] else -1  # off the object: below any distance
        for y in range(y0, y1):
            for x in range(x0, x1):
                top = -1
                for xx in range(max(x0, x - md), min(x1, x + md + 1)):
                    top = max(top, vm[y, xx])
                rowmax[y, x] = top
        order = np.argsort(cy_[:m] * s1 + cx_[:m])  # the object's pixels in raster order, as np.nonzero
        cy_[:m], cx_[:m] = cy_[:m][order], cx_[:m][order]
        npk = 0
        for i in range(m):
            y, x = cy_[i], cx_[i]
            top = -1
            for yy in range(max(y0, y - md), min(y1, y + md + 1)):
                top = max(top, rowmax[yy, x])
            if d2a[y, x] == top:
                peaks[npk] = i
                npk += 1
        if npk == m:  # a flat object: its isolated pixels (not in its opening by the cross) are the peaks
            npk = 0
            for i in range(m):
                if not _in_opening(obj, cy_[i], cx_[i]):
                    peaks[npk] = i
                    npk += 1
        # highest first (stable: raster order), at least md apart (Chebyshev), then the markers in raster order
        for j in range(npk):
            val[j] = -d2a[cy_[peaks[j]], cx_[peaks[j]]]
        rank = np.argsort(val[:npk], kind="mergesort")
        nmark = 0
        for j in range(npk):
            i = peaks[rank[j]]
            y, x = cy_[i], cx_[i]
            if d2a[y, x] <= 0:  # above peak_local_max's threshold, the image's minimum (0)
                continue
            free = True
            for q in range(nmark):
                if max(abs(ky[q] - y), abs(kx[q] - x)) < md:
                    free = False
                    break
            if free:
                ky[nmark], kx[nmark] = y, x
                nmark += 1
        ws[:, :] = 0
        if nmark == 0:  # no marker: the object itself
            for i in range(m):
                ws[cy_[i], cx_[i]] = 1
        else:
            raster = np.argsort(ky[:nmark] * s1 + kx[:nmark])
            my, mx = ky[:nmark][raster].copy(), kx[:nmark][raster].copy()
            for j in range(nmark):
                ws[my[j], mx[j]] = j + 1
            _watershed(d2a, obj, ws, my, mx, nmark, qhead, qtail, qnext)
        # the nucleus: the region at the chosen pixel, else the nearest labelled pixel of the object
        pick = ws[py0, px0]
        if pick == 0:
            best = r2 + 1
            for i in range(m):
                y, x = cy_[i], cx_[i]
                d2 = (y - c) * (y - c) + (x - c) * (x - c)
                if ws[y, x] > 0 and d2 < best:
                    best, pick = d2, ws[y, x]
            if pick == 0 or np.sqrt(best) > search_px:
                continue
        _measure(ws, pick, cy_, cx_, m, hema[k], eosin[k], grow, mpp, depth, stack, out[k])


@njit(cache=True, nogil=True)
def _in_opening(obj, y, x):
    """Whether pixel ``(y, x)`` of ``obj`` is in ``binary_opening(obj)`` by the cross: some pixel of the
    object at it or 4-next to it has its whole cross in the object."""
    s0, s1 = obj.shape
    for t in range(-1, 4):
        ey, ex = (y, x) if t < 0 else (y + _N4[t, 0], x + _N4[t, 1])
        if not (0 <= ey < s0 and 0 <= ex < s1) or not obj[ey, ex]:
            continue
        inner = True
        for u in range(4):
            qy, qx = ey + _N4[u, 0], ex + _N4[u, 1]
            if not (0 <= qy < s0 and 0 <= qx < s1) or not obj[qy, qx]:
                inner = False
                break
        if inner:
            return True
    return False


@njit(cache=True, nogil=True)
def _measure(ws, pick, cy_, cx_, m, hema, eosin, grow, mpp, depth, stack, row):
    """``regionprops`` of the nucleus (the pixels of the object ``cy_, cx_`` labelled ``pick`` in ``ws``) and
    the eosin of its ring into ``row`` (12)."""
    s0, s1 = ws.shape
    npx = 0
    for i in range(m):
        y, x = cy_[i], cx_[i]
        if ws[y, x] == pick:
            cy_[npx], cx_[npx] = y, x  # compact the nucleus's pixels to the front
            npx += 1
    sr = sc = hsum = 0.0
    br0, br1, bc0, bc1 = s0, -1, s1, -1
    for i in range(npx):
        y, x = cy_[i], cx_[i]
        sr += y
        sc += x
        hsum += hema[y, x]
        br0, br1, bc0, bc1 = min(br0, y), max(br1, y), min(bc0, x), max(bc1, x)
    mr, mc, hmean = sr / npx, sc / npx, hsum / npx
    a = b2 = dd = hvar = 0.0
    for i in range(npx):
        y, x = cy_[i], cx_[i]
        a += (y - mr) * (y - mr)
        b2 += (y - mr) * (x - mc)
        dd += (x - mc) * (x - mc)
        hvar += (hema[y, x] - hmean) * (hema[y, x] - hmean)
    a, b2, dd = a / npx, b2 / npx, dd / npx
    root = np.sqrt(((a - dd) / 2) ** 2 + b2 * b2)
    l1 = max((a + dd) / 2 + root, 0.0)
    l2 = max((a + dd) / 2 - root, 0.0)
    ecc = np.sqrt(max(1.0 - l2 / l1, 0.0)) if l1 > 0 else 0.0
    # perimeter(neighborhood=4): the border pixels (a 4-neighbour outside the nucleus or the window) weighted
    # by the pattern of their border neighbours; `depth` marks them (1) before it serves the ring
    depth[:, :] = 0
    for i in range(npx):
        y, x = cy_[i], cx_[i]
        inner = 0 < y < s0 - 1 and 0 < x < s1 - 1
        if inner:
            inner = ws[y - 1, x] == pick and ws[y + 1, x] == pick and ws[y, x - 1] == pick and ws[y, x + 1] == pick
        depth[y, x] = 0 if inner else 1
    perim_px = 0.0
    for i in range(npx):
        y, x = cy_[i], cx_[i]
        if depth[y, x] == 1:
            code = 1
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    qy, qx = y + dy, x + dx
                    if (dy or dx) and 0 <= qy < s0 and 0 <= qx < s1 and depth[qy, qx] == 1:
                        code += 2 if dy == 0 or dx == 0 else 10
            perim_px += _perimeter_weight(min(code, 49))
    convex = _hull_pixels(cy_, cx_, npx, max(s0, s1))
    # the perinuclear ring: within `grow` 4-steps of the nucleus (binary_dilation by the cross), outside it
    depth[:, :] = -1
    top = 0
    for i in range(npx):
        depth[cy_[i], cx_[i]] = 0
        stack[top] = cy_[i] * s1 + cx_[i]
        top += 1
    head = 0
    esum = 0.0
    nring = 0
    while head < top:
        p = stack[head]
        head += 1
        py, px = p // s1, p % s1
        if depth[py, px] >= grow:
            continue
        for t in range(4):
            qy, qx = py + _N4[t, 0], px + _N4[t, 1]
            if 0 <= qy < s0 and 0 <= qx < s1 and depth[qy, qx] < 0:
                depth[qy, qx] = depth[py, px] + 1
                stack[top] = qy * s1 + qx
                top += 1
                esum += eosin[qy, qx]
                nring += 1
    area = npx * mpp * mpp
    perim = max(perim_px, 1.0) * mpp
    row[0] = 1.0
    row[1] = area
    row[2] = perim
    row[3] = 4 * np.sqrt(l1) * mpp
    row[4] = 4 * np.sqrt(l2) * mpp
    row[5] = ecc
    row[6] = npx / max(convex, 1.0)
    row[7] = npx / max((br1 - br0 + 1) * (bc1 - bc0 + 1), 1)
    row[8] = min(1.0, 4 * np.pi * area / (perim * perim))
    row[9] = hmean
    row[10] = np.sqrt(hvar / npx)
    row[11] = esum / nring if nring > 0 else 0.0


@njit(cache=True, nogil=True)
def _perimeter_weight(code):
    """scikit-image's perimeter weights of the 3x3 border patterns (kernel 10 2 10 / 2 1 2 / 10 2 10)."""
    if code in (5, 7, 15, 17, 25, 27):
        return 1.0
    if code in (21, 33):
        return np.sqrt(2.0)
    if code in (13, 23):
        return (1.0 + np.sqrt(2.0)) / 2.0
    return 0.0


@njit(cache=True, nogil=True)
def texture(grey, offsets, weights, levels, rp, cp, lut, out):
    """Co-occurrence properties and uniform LBP histogram of each grey window ``(n, s, s)`` (float grey
    levels 0..255) into ``out`` ``(n, 6 + P + 2)``: contrast, dissimilarity, homogeneity, energy, correlation,
    ASM of the symmetric normed matrix of ``grey // 8`` at each distinct offset ``(dr, dc)``, averaged with
    ``weights`` (how often ``graycomatrix`` meets the offset); then the histogram of the LBP labels of
    ``grey.astype(uint8)``, the neighbours sampled at ``(rp, cp)`` (bilinear, zero outside the window), the
    bit pattern mapped to its uniform label by ``lut`` (``2 ** P`` entries)."""
    n, s0, s1 = grey.shape
    P = rp.shape[0]
    q = np.empty((s0, s1), np.int64)
    g8 = np.zeros((s0 + 4, s1 + 4))  # grey.astype(uint8), zero padding of 2 px (R <= 2)
    cnt = np.empty((levels, levels))
    codes = np.zeros((s0, s1), np.int64)
    sq = np.empty((levels, levels))
    ab = np.empty((levels, levels))
    hom = np.empty((levels, levels))
    for i in range(levels):
        for j in range(levels):
            sq[i, j] = (i - j) * (i - j)
            ab[i, j] = abs(i - j)
            hom[i, j] = 1.0 / (1.0 + (i - j) * (i - j))
    # scikit-image's bilinear_interpolation at (y + rp, x + cp) takes its fractions from the absolute
    # coordinates, so their rounding follows the pixel's position: per neighbour, row and column
    rlo, rhi, rfr = np.empty((P, s0), np.int64), np.empty((P, s0), np.int64), np.empty((P, s0))
    clo, chi, cfr = np.empty((P, s1), np.int64), np.empty((P, s1), np.int64), np.empty((P, s1))
    for i in range(P):
        for y in range(s0):
            r = y + rp[i]
            rlo[i, y], rhi[i, y], rfr[i, y] = int(np.floor(r)) + 2, int(np.ceil(r)) + 2, r - np.floor(r)
        for x in range(s1):
            cc = x + cp[i]
            clo[i, x], chi[i, x], cfr[i, x] = int(np.floor(cc)) + 2, int(np.ceil(cc)) + 2, cc - np.floor(cc)
    total_w = weights.sum()
    for k in range(n):
        for y in range(s0):
            for x in range(s1):
                g = grey[k, y, x]
                q[y, x] = min(max(int(np.floor(g / 8.0)), 0), levels - 1)
                g8[y + 2, x + 2] = float(int(g))
        props = np.zeros(6)
        for o in range(offsets.shape[0]):
            # the symmetric normed matrix P = (C + C^T) / (2 pairs) of the pair counts C, from C's upper triangle
            dr, dc = offsets[o, 0], offsets[o, 1]
            cnt[:, :] = 0.0
            for y in range(max(0, -dr), s0 - max(0, dr)):
                for x in range(max(0, -dc), s1 - max(0, dc)):
                    cnt[q[y, x], q[y + dr, x + dc]] += 1.0
            inv = 1.0 / max(2.0 * (s0 - abs(dr)) * (s1 - abs(dc)), 1.0)
            con = dis = hm = asm = mean = 0.0
            for i in range(levels):
                for j in range(i, levels):
                    pij = (cnt[i, j] + cnt[j, i]) * inv
                    cnt[i, j] = pij  # the upper triangle now holds P
                    if pij == 0.0:
                        continue
                    w = 1.0 if i == j else 2.0  # P[i, j] and P[j, i]
                    con += w * pij * sq[i, j]
                    dis += w * pij * ab[i, j]
                    hm += w * pij * hom[i, j]
                    asm += w * pij * pij
                    mean += 0.5 * w * pij * (i + j)  # the same for rows and columns
            vv = cov = 0.0
            for i in range(levels):
                for j in range(i, levels):
                    pij = cnt[i, j]
                    if pij == 0.0:
                        continue
                    w = 1.0 if i == j else 2.0
                    vv += 0.5 * w * pij * ((i - mean) ** 2 + (j - mean) ** 2)
                    cov += w * pij * (i - mean) * (j - mean)
            sd = np.sqrt(vv)
            wo = weights[o]
            props[0] += wo * con
            props[1] += wo * dis
            props[2] += wo * hm
            props[3] += wo * np.sqrt(asm)
            props[4] += wo * (1.0 if sd < 1e-15 else cov / (sd * sd))
            props[5] += wo * asm
        for j in range(6):
            out[k, j] = props[j] / total_w
        codes[:, :] = 0
        for i in range(P):  # one pass per neighbour over the whole window
            bit = 1 << i
            for y in range(s0):
                r0, r1, dr = rlo[i, y], rhi[i, y], rfr[i, y]
                for x in range(s1):
                    c0, c1, dc = clo[i, x], chi[i, x], cfr[i, x]
                    top = (1 - dc) * g8[r0, c0] + dc * g8[r0, c1]
                    bottom = (1 - dc) * g8[r1, c0] + dc * g8[r1, c1]
                    codes[y, x] |= bit * (((1 - dr) * top + dr * bottom) - g8[y + 2, x + 2] >= 0)  # branch-free
        hist = np.zeros(P + 2)
        for y in range(s0):
            for x in range(s1):
                hist[lut[codes[y, x]]] += 1.0
        total = max(hist.sum(), 1.0)
        for j in range(P + 2):
            out[k, 6 + j] = hist[j] / total
