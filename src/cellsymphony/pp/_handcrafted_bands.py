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


def read_band(source, x0_um: float, y0_um: float, side_px: int, *, mpp: float, level: int) -> np.ndarray:
    """``(side_px, side_px, 3)`` uint8 image whose pixel ``(u, v)`` is centred at ``(x0_um + (u + 0.5) mpp,
    y0_um + (v + 0.5) mpp)``: one patch of the source centred on the band (its usual antialiased warp)."""
    centre = np.array([[x0_um + side_px * mpp / 2.0, y0_um + side_px * mpp / 2.0]])
    return source.read(centre, size=int(side_px), mpp=mpp, level=level)[0]


def warp_windows(source, xy_um: np.ndarray, *, size: int, mpp: float, level: int) -> np.ndarray:
    """``source.read(xy_um, size=size, mpp=mpp, level=level)`` for the cells of one band, decoding and low-pass
    filtering the band's region of the slide once: every cell's patch is then sampled (bilinear, at its exact
    centre) from that one filtered region, as ``_patch_source._warp_patch`` samples its own region, so the
    pixels are the per-cell patches' (to float rounding). A non-rigid registration (its own scale at each
    cell) or a source with its own ``read`` (stain transforms) is read cell by cell."""
    import math

    import torch
    import torch.nn.functional as F

    from ._patch_geometry import patch_to_um, um_to_level
    from ._patch_source import PatchSource, _blur, _read_level, one_thread

    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    if source.warp is not None or type(source).read is not PatchSource.read:
        return source.read(xy, size=size, mpp=mpp, level=level)
    he = source.he
    to_level = um_to_level(source.alignment, source.pixel_size, float(he.downsamples[level]))
    affine = to_level @ patch_to_um(size, mpp)  # patch pixel -> level pixel, for a patch centred at 0
    lin = affine[:2, :2]
    sigma = max(0.0, (math.sqrt(abs(np.linalg.det(lin))) - 1.0) / 2.0)
    u = np.arange(size, dtype=np.float64)
    offset = xy @ to_level[:2, :2].T + affine[:2, 2]  # each cell's shift
    gx = (lin[0, 0] * u[None, :] + lin[0, 1] * u[:, None])[None] + offset[:, 0, None, None]
    gy = (lin[1, 0] * u[None, :] + lin[1, 1] * u[:, None])[None] + offset[:, 1, None, None]
    margin = int(math.ceil(4 * sigma)) + 2
    x0, y0 = int(math.floor(gx.min())) - margin, int(math.floor(gy.min())) - margin
    x1, y1 = int(math.ceil(gx.max())) + margin + 1, int(math.ceil(gy.max())) + margin + 1
    img = _read_level(he, level, x0, y0, x1 - x0, y1 - y0).astype(np.float32)
    if sigma > 0.05:
        img = _blur(img, sigma)
    h, w = img.shape[:2]
    grid = np.stack([(gx - x0) / (w - 1) * 2 - 1, (gy - y0) / (h - 1) * 2 - 1], axis=-1)
    with one_thread():  # every cell's samples as the rows of one tall output image
        src_t = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1).unsqueeze(0)
        out = F.grid_sample(src_t, torch.from_numpy(grid.reshape(1, -1, size, 2)), mode="bilinear",
                            padding_mode="border", align_corners=True)[0]  # fmt: skip
    out = out.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(out.reshape(len(xy), size, size, 3))


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
