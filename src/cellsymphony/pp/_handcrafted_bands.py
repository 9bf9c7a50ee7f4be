"""The handcrafted encoder of ``embed_morphology`` by bands: one image per band of tissue, not per cell.

The section is cut into square bands of ``BAND_PX`` pixels at ``mpp`` on one global grid anchored at the
micrometre origin; each band is read once (with a margin of half a feature window), and the features of
all its cells come from :meth:`~cellsymphony.models.encoders._handcrafted.HandcraftedEncoder.features_in_band`.
All bands share one pixel lattice (pixel centres at ``(i + 0.5) * mpp``), so a cell's window, and its
features, do not depend on which cells are computed together: chunked, resumed and cluster runs equal a
whole run. Chunks are whole bands in serpentine order (:func:`~cellsymphony.pp._patch_geometry.spatial_order`
over the bands), so memory is a few bands whatever the number of cells.
"""

from __future__ import annotations

import numpy as np

from ._chunks import Chunk
from ._patch_geometry import spatial_order

#: side of a band in pixels (at the encoder's mpp; 192 um at 0.5 um/px), before its margins
BAND_PX = 384


def band_index(xy_um: np.ndarray, *, mpp: float, band_px: int = BAND_PX) -> np.ndarray:
    """Integer ``(n, 2)`` index ``(column, row)`` of the band holding each cell."""
    return np.floor(np.asarray(xy_um, dtype=np.float64).reshape(-1, 2) / (band_px * mpp)).astype(np.int64)


def band_chunks(xy_um: np.ndarray, *, mpp: float, chunk_size: int, band_px: int = BAND_PX) -> list[np.ndarray]:
    """Rows of ``xy_um`` (all finite) in chunks of about ``chunk_size`` cells made of whole bands, the bands
    in serpentine order; a band with more than ``chunk_size`` cells is a chunk of its own."""
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return []
    bands, inverse = np.unique(band_index(xy, mpp=mpp, band_px=band_px), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    members = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[members], np.arange(len(bands) + 1))
    chunks, current = [], []
    count = 0
    for b in spatial_order((bands + 0.5) * band_px * mpp, band=band_px * mpp):
        rows = members[bounds[b] : bounds[b + 1]]
        if current and count + len(rows) > chunk_size:
            chunks.append(np.concatenate(current))
            current, count = [], 0
        current.append(rows)
        count += len(rows)
    if current:
        chunks.append(np.concatenate(current))
    return chunks


def warp_windows(source, xy_um: np.ndarray, *, size: int, mpp: float, level: int) -> np.ndarray:
    """``source.read(xy_um, size=size, mpp=mpp, level=level)`` for the cells of one band, decoding and low-pass
    filtering the band's region of the slide once (:meth:`~cellsymphony.pp._patch_source.PatchSource.band_region`,
    as the band patches): every cell's window is then sampled bilinearly at its exact centre from that one
    region (:func:`~cellsymphony.pp._patch_source.sample_region`), as ``_patch_source._warp_patch`` samples its
    own region, so the pixels are the per-cell patches' (1 grey level apart in about 3 pixels per 10,000: OpenCV's
    1/32 px sampling lattice, and the low-pass taps under 1e-4 left out). A non-rigid registration (its own
    scale at each cell) or a source with its own ``read`` (stain transforms) is read cell by cell."""
    from ._patch_source import PatchSource, sample_region

    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    if source.warp is not None or type(source).read is not PatchSource.read:
        return source.read(xy, size=size, mpp=mpp, level=level)
    # a rectangle of the global mpp grid holding every window, a pixel to spare on each side
    half = size * mpp / 2.0
    x0 = (np.floor((xy[:, 0].min() - half) / mpp) - 1) * mpp
    y0 = (np.floor((xy[:, 1].min() - half) / mpp) - 1) * mpp
    w = int(np.ceil((xy[:, 0].max() + half - x0) / mpp)) + 2
    h = int(np.ceil((xy[:, 1].max() + half - y0) / mpp)) + 2
    region = source.band_region(x0, y0, w, h, mpp=mpp, level=level)
    # window pixel (a, b) of cell i is centred at xy_i + (a + 0.5 - size / 2) mpp: band pixel coordinates
    a = np.arange(size, dtype=np.float64)
    u = (xy[:, 0, None, None] - x0) / mpp - size / 2.0 + a[None, None, :]
    v = (xy[:, 1, None, None] - y0) / mpp - size / 2.0 + a[None, :, None]
    return sample_region(region, u, v)


def handcrafted_by_band(
    encoder, source, xy_um: np.ndarray, *, size: int, mpp: float, band_px: int = BAND_PX
) -> np.ndarray:
    """Handcrafted features ``(n, D)`` float32 of the cells at ``xy_um``, band by band (one chunk's work, in
    this process or on a cluster worker). Rows of cells whose centre is not finite are NaN.

    ``size``: the per-cell patch side the features stand for (the window is ``encoder.window_px(size)``).
    """
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    out = np.full((len(xy), int(encoder.embed_dim)), np.nan, dtype=np.float32)
    ok = np.flatnonzero(np.isfinite(xy).all(axis=1))
    if len(ok) == 0:
        return out
    window = encoder.window_px(size)
    level = source.level_for(mpp)
    idx = band_index(xy[ok], mpp=mpp, band_px=band_px)
    bands, inverse = np.unique(idx, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    members = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[members], np.arange(len(bands) + 1))
    for b in range(len(bands)):
        rows = ok[members[bounds[b] : bounds[b + 1]]]
        windows = warp_windows(source, xy[rows], size=window, mpp=mpp, level=level)
        out[rows] = encoder.features_of_windows(windows)
    return out


class _ChunkFeatures:
    """Map-style dataset: item ``i`` is ``(i, features of chunk i)``; DataLoader workers open the slide once."""

    def __init__(self, encoder, source, xys: list, size: int, mpp: float):
        self.encoder, self.source, self.xys, self.size, self.mpp = encoder, source, xys, size, mpp

    def __len__(self) -> int:
        return len(self.xys)

    def __getitem__(self, i: int):
        return i, handcrafted_by_band(self.encoder, self.source, self.xys[i], size=self.size, mpp=self.mpp)


def _chunk_on_worker(encoder, src, xy_um, *, size: int, mpp: float) -> np.ndarray:
    """One chunk's rows on a cluster worker (the worker's open source for the slide)."""
    from .._distributed import worker_cache

    return handcrafted_by_band(encoder, worker_cache().source(src), xy_um, size=size, mpp=mpp)


class HandcraftedBandJob:
    """The chunk engine's job (:class:`~cellsymphony.pp._chunks.ChunkJob`) for ``model="handcrafted"`` by bands.

    Each chunk's ``work`` is its :class:`~cellsymphony.pp._patch_source.PatchSource`. In this process the
    pending chunks of a sample run in ``num_workers`` DataLoader workers (0: here), one chunk per item."""

    kind = "morphology"
    desc = "embed_morphology"

    def __init__(self, encoder, xy: np.ndarray, *, size: int, mpp: float, num_workers: int, enc_ref=None):
        self.encoder, self.xy, self.size, self.mpp, self.num_workers = encoder, xy, size, mpp, num_workers
        self.enc_ref = encoder if enc_ref is None else enc_ref
        self.dim = int(encoder.embed_dim)

    def stream(self, chunks: list[Chunk], progress, done) -> None:
        from torch.utils.data import DataLoader

        start = 0
        while start < len(chunks):  # the consecutive chunks of one sample share its slide and loader
            src = chunks[start].work
            stop = start
            while stop < len(chunks) and chunks[stop].work is src:
                stop += 1
            data = _ChunkFeatures(self.encoder, src, [self.xy[chunks[i].rows] for i in range(start, stop)],
                                  self.size, self.mpp)  # fmt: skip
            if self.num_workers > 0:
                src.close()  # each worker opens its own handle
            loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                collate_fn=_identity, persistent_workers=False)  # fmt: skip
            try:
                for i, values in loader:
                    done(start + i, values)
                    progress.update(len(values))
            finally:
                src.close()
            start = stop

    def task(self, chunk: Chunk):
        return _chunk_on_worker, (self.enc_ref, chunk.work, self.xy[chunk.rows]), {"size": self.size, "mpp": self.mpp}


def _identity(x):
    return x


def plan_chunks(xy: np.ndarray, valid: np.ndarray, *, mpp: float, chunk_size: int, band_px: int = BAND_PX) -> list:
    """``(index, rows)`` of each chunk of a sample's cells ``valid`` (output positions)."""
    return [(c, valid[r]) for c, r in enumerate(band_chunks(xy[valid], mpp=mpp, chunk_size=chunk_size, band_px=band_px))]
