"""The streaming engine behind ``embed_morphology``: plans, batches, DataLoader decoding, pooling.

A *plan* splits the cells of one sample into chunks (the unit of the resumable cache and of the
dask scale-out, run by the chunk engine :mod:`cellsymphony.pp._chunks`) and each chunk into batches. A batch lists the patches to encode (their centres in
micrometres) and, for each cell it serves, the patch it uses and the nucleus position in that patch.
Cell mode: one patch per cell, centred on the nucleus. Tile mode: one patch per tile of a single
global grid (so any subset of cells gives the same tiles), each cell pooled from the tile whose
centre is nearest. Patches are cut from bands resampled once (:mod:`cellsymphony.pp._bands`, the
default; batches follow the bands, each nucleus pooled at its true sub-pixel position in its patch) or,
with ``exact=True``, warped one by one with the nucleus at the exact patch centre.

:func:`embed_cells` is the self-contained per-chunk function: give it an encoder, a
:class:`~cellsymphony.pp._patch_source.PatchSource` and cell coordinates, get the embedding rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..models.encoders import encoder_kind
from ._bands import BLOCK_PX, _worker_init, band_patches
from ._chunks import Chunk
from ._patch_geometry import grid_patch_origin, spatial_order, tile_assignment, token_pool_weights


@dataclass
class Batch:
    """Patches to encode and the cells they serve."""

    centres: np.ndarray  # (b, 2) patch centres, micrometres
    rows: np.ndarray  # (k,) positions of the served cells in the caller's cell list
    owner: np.ndarray  # (k,) index of each cell's patch in this batch
    pos_px: np.ndarray  # (k, 2) nucleus position in its patch, patch pixels


def plan(
    xy_um: np.ndarray,
    *,
    mode: str,
    size: int,
    mpp: float,
    batch_size: int,
    chunk_size: int,
    tile_stride: int | None = None,
    exact: bool = False,
) -> list[Chunk]:
    """Split cells (rows of ``xy_um``, all finite) into spatially compact chunks of batches: engine
    :class:`~cellsymphony.pp._chunks.Chunk` objects whose ``work`` is their list of :class:`Batch`.

    ``exact=True``: the plan of the per-cell warp (serpentine bands one patch high from the top cell, the
    nucleus at the patch centre); ``exact=False``: serpentine along the bands of the global band grid, each
    nucleus at its sub-pixel position in its band patch."""
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    chunks: list[Chunk] = []
    if n == 0:
        return chunks
    centre = np.full((1, 2), size / 2.0)
    band, anchor = (size * mpp, None) if exact else (BLOCK_PX * mpp, 0.0)
    if mode == "cell":
        order = spatial_order(xy, band=band, anchor=anchor)
        if exact:
            at, where = xy, np.repeat(centre, n, axis=0)
        else:  # the band window nearest each nucleus: its centre, and the nucleus's position in it
            origin, where = grid_patch_origin(xy, size=size, mpp=mpp)
            at = (origin + size / 2.0) * mpp
        for c, start in enumerate(range(0, n, chunk_size)):
            rows = order[start : start + chunk_size]
            batches = []
            for b in range(0, len(rows), batch_size):
                r = rows[b : b + batch_size]
                batches.append(Batch(at[r], r, np.arange(len(r)), where[r]))
            chunks.append(Chunk(c, rows, work=batches))
        return chunks
    stride = size // 2 if tile_stride is None else int(tile_stride)  # embed_morphology's default
    ij, pos = tile_assignment(xy, size=size, mpp=mpp, stride=stride)
    tiles, inverse = np.unique(ij, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    step = stride * mpp
    tile_xy = tiles * step
    if not exact:  # the nucleus in its tile's band window (the same as in the exact tile for an even size)
        pos = xy / mpp - grid_patch_origin(tile_xy, size=size, mpp=mpp)[0][inverse.ravel()]
    tile_order = spatial_order(tile_xy, band=band, anchor=anchor)
    cells_of = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[cells_of], np.arange(len(tiles) + 1))
    members = [cells_of[bounds[t] : bounds[t + 1]] for t in range(len(tiles))]
    current: list[int] = []
    count = 0

    def close(tlist):
        batches, all_rows = [], []
        for b in range(0, len(tlist), batch_size):
            tb = tlist[b : b + batch_size]
            rows = np.concatenate([members[t] for t in tb])
            owner = np.concatenate([np.full(len(members[t]), k) for k, t in enumerate(tb)])
            batches.append(Batch(tile_xy[tb], rows, owner, pos[rows]))
            all_rows.append(rows)
        chunks.append(Chunk(len(chunks), np.concatenate(all_rows), work=batches))

    for t in tile_order:
        current.append(int(t))
        count += len(members[t])
        if count >= chunk_size:
            close(current)
            current, count = [], 0
    if current:
        close(current)
    return chunks


class _PatchBatches:
    """Map-style dataset: item ``i`` is ``(i, uint8 patches of batch i)``; workers open the slide once."""

    def __init__(self, source, batches, size: int, mpp: float, level: int):
        self.source, self.batches, self.size, self.mpp, self.level = source, batches, size, mpp, level

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        import torch

        patches = self.source.read(self.batches[i].centres, size=self.size, mpp=self.mpp, level=self.level)
        return i, torch.from_numpy(patches)


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def pool_tokens(prefix, grid, batch: Batch, *, pool: str, radius_px: float | None, size: int):
    """Per-cell features ``(k, D)`` float32 (numpy) from a batch's tokens."""
    import torch

    b, rows, cols, dim = grid.shape if grid.ndim == 4 else (prefix.shape[0], 0, 0, prefix.shape[-1])
    owner = torch.as_tensor(batch.owner, device=prefix.device, dtype=torch.long)
    if pool == "cls":
        feat = prefix[:, 0] if prefix.shape[1] else grid.float().mean(dim=(1, 2))
        return feat.float()[owner].cpu().numpy()
    if rows * cols == 0:
        raise ValueError("This encoder returns only a global feature: use pool='cls'.")
    flat = grid.reshape(b, rows * cols, dim).float()
    if pool == "mean":
        return flat.mean(dim=1)[owner].cpu().numpy()
    w = token_pool_weights(batch.pos_px, (rows, cols), stride=size / cols, radius_px=radius_px)
    w = torch.as_tensor(w, dtype=torch.float32, device=flat.device)
    if len(batch.owner) == b and np.array_equal(batch.owner, np.arange(b)):  # cell mode: one patch per cell
        return torch.einsum("kt,ktd->kd", w, flat).cpu().numpy()
    out = torch.empty(len(owner), dim, dtype=torch.float32, device=flat.device)
    for o in np.unique(batch.owner):  # tile mode: one product per tile, for all of its cells
        sel = torch.as_tensor(np.flatnonzero(batch.owner == o), device=flat.device)
        out[sel] = w[sel] @ flat[int(o)]
    return out.cpu().numpy()


def run_batches(
    encoder,
    source,
    batches: list,
    *,
    size: int,
    mpp: float,
    pool: str,
    radius_px: float | None,
    layer: int,
    device: str,
    num_workers: int,
    progress=None,
    exact: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Encode batches in order, decoding in DataLoader workers; yield ``(batch index, (k, D) features)``.

    ``exact=False``: patches cut from bands (:func:`cellsymphony.pp._bands.band_patches`; on CUDA the
    resampling and cutting run on the GPU); ``exact=True``: each patch warped on its own."""
    if not batches:
        return
    level = source.level_for(mpp)
    handcrafted = encoder_kind(encoder) == "features"
    if exact:
        loader = _exact_loader(source, batches, size, mpp, level, device, num_workers)
    else:
        loader = band_patches(source, [b.centres for b in batches], size=size, mpp=mpp, level=level,
                              device="cpu" if handcrafted else device, num_workers=num_workers)  # fmt: skip
    yield from _encode(encoder, loader, batches, pool=pool, radius_px=radius_px, layer=layer, size=size,
                       device=device, progress=progress, handcrafted=handcrafted)  # fmt: skip


def _exact_loader(source, batches, size, mpp, level, device, num_workers):
    from torch.utils.data import DataLoader

    data = _PatchBatches(source, batches, size, mpp, level)
    if num_workers > 0:
        source.close()  # each worker opens its own handle
    return DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=device.startswith("cuda"),
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )


def _encode(encoder, loader, batches, *, pool, radius_px, layer, size, device, progress, handcrafted):
    import torch

    for i, patches in loader:
        batch = batches[i]
        if handcrafted:
            feats = encoder(patches.cpu().numpy())[batch.owner]
        else:
            with torch.inference_mode(), _autocast(device):
                prefix, grid = encoder.forward_tokens(patches.to(device, non_blocking=True), layer=layer)
                feats = pool_tokens(prefix, grid, batch, pool=pool, radius_px=radius_px, size=size)
        if progress is not None:
            progress.update(len(batch.rows))
        yield i, np.asarray(feats, dtype=np.float32)


def embed_cells(
    encoder,
    source,
    xy_um: np.ndarray,
    *,
    mode: str = "cell",
    pool: str = "nucleus",
    pool_radius_um: float | None = None,
    layer: int = -1,
    size: int = 224,
    mpp: float = 0.5,
    tile_stride: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    exact: bool = False,
) -> np.ndarray:
    """Embeddings ``(n, D)`` float32 of the cells at ``xy_um`` (one self-contained chunk of work).

    Rows of cells whose centre is not finite are NaN. The tile grid and the band grid are global, so any
    partition of the cells into calls gives the same rows (to float tolerance) as one call.
    """
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    ok = np.flatnonzero(np.isfinite(xy).all(axis=1))
    out = np.full((len(xy), int(encoder.embed_dim)), np.nan, dtype=np.float32)
    chunks = plan(
        xy[ok], mode=mode, size=size, mpp=mpp, batch_size=batch_size, chunk_size=max(len(ok), 1), tile_stride=tile_stride,
        exact=exact,
    )
    batches = [b for c in chunks for b in c.work]
    radius = None if pool_radius_um is None else pool_radius_um / mpp
    for i, feats in run_batches(
        encoder, source, batches, size=size, mpp=mpp, pool=pool, radius_px=radius, layer=layer, device=device,
        num_workers=num_workers, exact=exact,
    ):
        out[ok[batches[i].rows]] = feats
    return out
