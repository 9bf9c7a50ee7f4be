"""Patches cut from bands of the slide resampled once: the default extraction of cell and tile patches.

The Xenium frame is covered by one global grid of ``mpp`` um/px pixels (see
:mod:`cellsymphony.pp._patch_geometry`), cut into square blocks of ``BLOCK_PX`` pixels; a row of blocks is a
*band*. Each block a patch touches is resampled once (:meth:`PatchSource.read_band`: low-pass and bilinear
warp through the registration) and each patch is an integer-offset window of the blocks, so the cost follows
the tissue area, not cells times patch area. The nucleus sits within half a pixel of the patch centre and
its true position (:func:`~cellsymphony.pp._patch_geometry.grid_patch_origin`) is what token pooling uses.

A *schedule* (:func:`schedule`) lists, for batches of patches in their order, the blocks each batch is the
first to need and those it is the last to need. Whoever resamples (DataLoader workers, or this process)
computes each block exactly once, for the first batch that needs it; the consumer keeps a block from that
batch to its last one. Batches come in serpentine order along the bands, so a few bands are resident at
any time, whatever the number of cells (:attr:`BandStats.peak_blocks`).

On the CPU a block is low-passed and warped by OpenCV; on CUDA the workers only decode (the level pixels of
each new block, handed over in pinned memory) and the low-pass, the warp (torch) and the cutting run on the
GPU, the cutting as one gather per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ._patch_geometry import grid_patch_origin
from ._patch_source import one_thread, resample_region

BLOCK_PX = 256  # side of a resampled block (output pixels); a band is a row of blocks
#: decoded tiles a cluster worker's slide keeps between its chunks (about 200 MB of 512 px RGB tiles): the
#: tiles its neighbouring chunks share are decoded once per worker, not once per chunk (bench_morphology --only chunks)
WORKER_KEEP_TILES = 256
#: resampled blocks the same source keeps between its chunks (about 100 MB of 256 px blocks)
WORKER_KEEP_BLOCKS = 512
#: on the CPU a batch's patches are cut from one canvas of its blocks unless the canvas' rectangle holds more
#: than this many times the blocks the batch needs (then, slice by slice: the canvas would copy empty area)
CANVAS_SLACK = 2.0


@dataclass
class BandStats:
    """What a run of :func:`band_patches` did: blocks resampled, the most held at once, and the most decoded
    tiles its plan holds in one process."""

    blocks_resampled: int = 0
    peak_blocks: int = 0
    block_px: int = BLOCK_PX
    peak_tiles: int = 0  # decoded slide tiles held at most by one process (TilePlan.peak)


@dataclass
class Schedule:
    """Per batch: the patches' top-left global pixels, the blocks first needed there and last needed there."""

    origins: list[np.ndarray]
    new: list[list[tuple[int, int]]]
    free: list[list[tuple[int, int]]]
    needs: list[set[tuple[int, int]]]
    block: int = BLOCK_PX
    n_blocks: int = field(default=0)


def schedule(centres: list[np.ndarray], *, size: int, mpp: float, block: int = BLOCK_PX) -> Schedule:
    """The block schedule of batches of patches centred on ``centres`` (micrometres, one array per batch,
    all finite)."""
    if any(not np.isfinite(c).all() for c in centres):
        raise ValueError("band patches need finite centres: leave cells without a position out.")
    origins, needs = [], []
    first: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    for i, c in enumerate(centres):
        o, _ = grid_patch_origin(c, size=size, mpp=mpp)
        origins.append(o)
        keys: set[tuple[int, int]] = set()
        if len(o):
            b0 = np.floor_divide(o, block)
            b1 = np.floor_divide(o + size - 1, block)
            for dy in range(int((b1[:, 1] - b0[:, 1]).max()) + 1):
                for dx in range(int((b1[:, 0] - b0[:, 0]).max()) + 1):
                    bx = np.minimum(b0[:, 0] + dx, b1[:, 0])
                    by = np.minimum(b0[:, 1] + dy, b1[:, 1])
                    keys.update(zip(bx.tolist(), by.tolist(), strict=True))
        for k in keys:
            first.setdefault(k, i)
            last[k] = i
        needs.append(keys)
    new = [[] for _ in centres]
    free = [[] for _ in centres]
    for k, i in first.items():
        new[i].append(k)
    for k, i in last.items():
        free[i].append(k)
    for lst in new:
        lst.sort(key=lambda k: (k[1], k[0]))
    return Schedule(origins, new, free, needs, block=block, n_blocks=len(first))


@dataclass
class TilePlan:
    """Which decoded slide tiles each item of :class:`BandItems` is the last (in its process) to need.

    Items go to ``workers`` processes in turn (item ``i`` to process ``i % workers``, as the DataLoader hands
    them out), each with its own tile cache: a tile is dropped from a process's cache after the last item of
    that process that decodes it, so each tile is decoded once per process that needs it and the cache holds
    ``peak`` tiles at most (the tiles under about two bands), whatever the size of the slide."""

    free: list[list[tuple[int, int, int]]]
    peak: int


def tile_plan(source, sched: Schedule, *, mpp: float, level: int, workers: int) -> TilePlan:
    """The :class:`TilePlan` of ``sched`` read from ``source`` at ``level`` by ``workers`` processes (0: this one)."""
    s, w = sched.block, max(1, int(workers))
    last: dict[tuple[int, tuple], int] = {}
    first: dict[tuple[int, tuple], int] = {}
    for i, keys in enumerate(sched.new):
        for bx, by in keys:
            for t in source.band_tiles(bx * s * mpp, by * s * mpp, s, s, mpp=mpp, level=level):
                first.setdefault((i % w, t), i)
                last[(i % w, t)] = i
    free: list[list] = [[] for _ in sched.new]
    per_worker = np.zeros((w, len(sched.new) + 1), dtype=np.int64)
    for (wk, t), i in last.items():
        free[i].append(t)
        per_worker[wk, first[(wk, t)]] += 1
        per_worker[wk, i + 1] -= 1
    live = per_worker.cumsum(axis=1).max() if len(last) else 0
    return TilePlan(free, int(live))


class BandItems:
    """Map-style dataset: item ``i`` is ``(i, {block: pixels})`` for the blocks batch ``i`` is the first to need.

    ``decode_only``: the blocks' decoded level pixels (:meth:`PatchSource.band_region`, resampled by the
    consumer on its device); otherwise the resampled uint8 blocks (on this process's CPU). ``tiles``: the
    :func:`tile_plan` by which each item drops the decoded tiles no later item of this process needs."""

    def __init__(self, source, sched: Schedule, *, mpp: float, level: int, tiles: TilePlan, decode_only: bool = False):
        self.source, self.sched, self.mpp, self.level, self.decode_only = source, sched, mpp, level, decode_only
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.sched.new)

    def __getitem__(self, i: int):
        s, mpp = self.sched.block, self.mpp
        out = {}
        with one_thread():  # many small operations: extra threads only spin (and fight for shared cores)
            for key in self.sched.new[i]:
                out[key] = self._block(key, s, mpp)
        self.source.he.forget_tiles(self.tiles.free[i])  # the decoded tiles no later item of this process needs
        return i, out

    def _block(self, key, s, mpp):
        import torch

        bx, by = key
        reg = self.source.band_region(bx * s * mpp, by * s * mpp, s, s, mpp=mpp, level=self.level)
        if self.decode_only:
            reg["region"] = torch.from_numpy(reg["region"])
            if "grid" in reg:
                reg["grid"] = torch.from_numpy(reg["grid"])
            return reg
        return resample_region(reg, s, s)


def cut(store: dict, origins: np.ndarray, size: int, block: int, out: np.ndarray | None = None,
        rows: np.ndarray | None = None):
    """Patches ``(n, size, size, 3)`` uint8 from the blocks in ``store`` (torch tensors, one device).

    On the CPU the batch's blocks are laid side by side in one canvas (a batch in serpentine order needs a
    near-full rectangle of blocks) and every patch is one window of it, all taken by one indexing operation;
    a sparse batch (blocks far apart) copies a slice per patch and block instead. Elsewhere one gather over
    the stacked blocks of the batch, with no loop over cells.

    ``out`` and ``rows`` (CPU blocks only): patch ``j`` is written straight into ``out[rows[j]]`` (one slice
    copy per patch, no batch array in between: the bytes are written once) and ``out`` is returned."""
    import torch

    n = len(origins)
    first = next(iter(store.values()))
    dev = first.device
    if n == 0:
        return out if out is not None else torch.empty((0, size, size, 3), dtype=torch.uint8, device=dev)
    if dev.type != "cpu":
        if out is not None:
            raise ValueError("cut(out=...) writes from CPU blocks only")
        return gather(store, origins, size, block)
    kx = [k[0] for k in store]
    ky = [k[1] for k in store]
    bx0, by0 = min(kx), min(ky)
    nbx, nby = max(kx) - bx0 + 1, max(ky) - by0 + 1
    if nbx * nby > CANVAS_SLACK * len(store):
        got = _cut_slices({k: v.numpy() for k, v in store.items()}, origins, size, block, out, rows)
        return got if out is not None else torch.from_numpy(got)
    canvas = np.empty((nby * block, nbx * block, 3), dtype=np.uint8)  # blocks no patch touches stay unset
    for (bx, by), v in store.items():
        y, x = (by - by0) * block, (bx - bx0) * block
        canvas[y : y + block, x : x + block] = v.numpy()
    oy, ox = origins[:, 1] - by0 * block, origins[:, 0] - bx0 * block
    if out is not None:
        for r, x, y in zip(rows.tolist(), ox.tolist(), oy.tolist(), strict=True):
            out[r] = canvas[y : y + size, x : x + size]
        return out
    windows = np.lib.stride_tricks.sliding_window_view(canvas, (size, size, 3))[:, :, 0]
    return torch.from_numpy(windows[oy, ox])


def _cut_slices(arrays: dict, origins: np.ndarray, size: int, block: int, out: np.ndarray | None = None,
                rows: np.ndarray | None = None) -> np.ndarray:
    """:func:`cut` on the CPU by one slice copy per patch and block it overlaps (a batch whose blocks are far
    apart), into ``out[rows]`` when given."""
    if out is None:
        out, rows = np.empty((len(origins), size, size, 3), dtype=np.uint8), range(len(origins))
    for i, (ox, oy) in zip(rows, origins.tolist(), strict=True):
        y = oy
        while y < oy + size:
            by, ry = divmod(y, block)
            hh = min(block - ry, oy + size - y)
            x = ox
            while x < ox + size:
                bx, rx = divmod(x, block)
                ww = min(block - rx, ox + size - x)
                out[i, y - oy : y - oy + hh, x - ox : x - ox + ww] = arrays[(bx, by)][ry : ry + hh, rx : rx + ww]
                x += ww
            y += hh
    return out


def gather(store: dict, origins: np.ndarray, size: int, block: int):
    """:func:`cut` as one indexing operation (any device): blocks stacked, each output pixel's block and
    offset computed from the patch origins."""
    import torch

    keys = list(store)
    dev = store[keys[0]].device
    stack = torch.stack([store[k] for k in keys])  # (nb, block, block, 3)
    kx = np.array([k[0] for k in keys])
    ky = np.array([k[1] for k in keys])
    bx0, by0 = int(kx.min()), int(ky.min())
    table = torch.full((int(ky.max()) - by0 + 1, int(kx.max()) - bx0 + 1), -1, dtype=torch.long, device=dev)
    table[torch.as_tensor(ky - by0, device=dev), torch.as_tensor(kx - bx0, device=dev)] = torch.arange(len(keys), device=dev)
    o = torch.as_tensor(origins, dtype=torch.long, device=dev)
    r = torch.arange(size, device=dev)
    gx = o[:, 0, None] + r[None, :]  # (n, size) global columns
    gy = o[:, 1, None] + r[None, :]  # (n, size) global rows
    slot = table[(gy // block - by0)[:, :, None], (gx // block - bx0)[:, None, :]]
    return stack[slot, (gy % block)[:, :, None], (gx % block)[:, None, :]]


def band_patches(
    source,
    centres: list[np.ndarray],
    *,
    size: int,
    mpp: float,
    level: int,
    device: str = "cpu",
    num_workers: int = 0,
    stats: BandStats | None = None,
    block: int = BLOCK_PX,
    decode_only: bool | None = None,
    out: np.ndarray | None = None,
    rows: list[np.ndarray] | None = None,
) -> Iterator[tuple[int, object]]:
    """Yield ``(batch index, patches)`` for batches of patches centred on ``centres`` (micrometres), in order.

    ``patches`` is a uint8 tensor ``(n, size, size, 3)``: on the CPU, or on ``device`` when that is a CUDA
    device and the source has no stain transform (then the workers only decode and the GPU resamples and
    cuts). Blocks are resampled once each, in ``num_workers`` DataLoader workers (or here), and freed after
    the last batch that needs them. ``decode_only`` (default: on CUDA) has the workers only decode and this
    process resample on ``device`` (the GPU path; ``device="cpu"`` runs it on the CPU, for tests). Each
    process decodes a slide tile once and drops it after the last block it needs it for (:func:`tile_plan`).

    ``out`` (a uint8 array, e.g. memory-mapped) and ``rows`` (one index array per batch): batch ``i``'s patches
    are written into ``out[rows[i]]``, cut straight into it on the CPU (no batch array: the bytes are written
    once), and ``patches`` is ``None``."""
    if not centres:
        return
    if (out is None) != (rows is None) or (rows is not None and len(rows) != len(centres)):
        raise ValueError("band_patches: out= and rows= (one index array per batch of centres) go together")
    sched = schedule(centres, size=size, mpp=mpp, block=block)
    cuda = str(device).startswith("cuda")
    on_gpu = (cuda if decode_only is None else bool(decode_only)) and not source.has_transform
    stats = BandStats(block_px=block) if stats is None else stats
    kept = _reuse_kept(source, sched, (mpp, level, block)) if source.keep_tiles and not on_gpu else None
    with tile_cache(source, sched, mpp=mpp, level=level, workers=num_workers, stats=stats) as tiles:
        yield from _stream(source, sched, centres, size=size, block=block, level=level, device=device, mpp=mpp,
                           num_workers=num_workers, on_gpu=on_gpu, cuda=cuda, tiles=tiles, stats=stats, kept=kept,
                           out=out, rows=rows)


def _reuse_kept(source, sched: Schedule, tag: tuple) -> dict:
    """The blocks of ``sched`` that an earlier stream of ``source`` resampled and kept (a cluster worker's source,
    ``keep_tiles`` set): taken out of the schedule's ``new`` lists (nothing decodes or resamples them again)
    and returned, to seed the stream's store."""
    kept = source.kept_blocks
    reused = {}
    for i, keys in enumerate(sched.new):
        hit = [k for k in keys if (*tag, k) in kept]
        for k in hit:
            reused[k] = kept[(*tag, k)]
            kept.move_to_end((*tag, k))
        if hit:
            sched.new[i] = [k for k in keys if k not in reused]
    return reused


def _keep(source, tag: tuple, blocks: dict) -> None:
    """Add resampled blocks to ``source.kept_blocks`` (least recently used out beyond WORKER_KEEP_BLOCKS)."""
    kept = source.kept_blocks
    for k, v in blocks.items():
        kept[(*tag, k)] = v
        kept.move_to_end((*tag, k))
    while len(kept) > WORKER_KEEP_BLOCKS:
        kept.popitem(last=False)


@contextlib.contextmanager
def tile_cache(source, sched: Schedule, *, mpp: float, level: int, workers: int, stats: BandStats | None = None):
    """Within: ``source`` (and the processes it is shipped to) holds the tiles of :func:`tile_plan` (yielded,
    for :class:`BandItems`), its cache sized to the plan's peak; the source's own ``cache_tiles`` after. Under a
    non-rigid field the plan maps each block's field lattice (:meth:`PatchSource.band_tiles`), not every pixel.

    A source with ``keep_tiles`` (a cluster worker's, :data:`WORKER_KEEP_TILES`) drops nothing by the plan: its
    cache holds the plan's peak and ``keep_tiles`` more, least recently used out first, so the tiles the
    stream used last are still decoded when the worker's next chunk (often a neighbour) needs them."""
    tiles = tile_plan(source, sched, mpp=mpp, level=level, workers=workers)
    if stats is not None:
        stats.peak_tiles = tiles.peak
    keep = max(0, int(source.keep_tiles))
    if keep:
        tiles = TilePlan([[] for _ in tiles.free], tiles.peak)
    before = source.cache_tiles
    source.cache_tiles = source.he.cache_tiles = tiles.peak + 8 + keep  # what the plan holds, and a little slack
    try:
        yield tiles
    finally:
        source.cache_tiles = before
        if source._he is not None:
            source._he.cache_tiles = before


def _stream(source, sched, centres, *, size, block, level, device, mpp, num_workers, on_gpu, cuda, tiles, stats,
            kept=None, out=None, rows=None):
    """:func:`band_patches` once its schedule and tile plan are made; ``kept``: blocks an earlier stream of the
    source resampled (see :func:`_reuse_kept`), this stream's own added to them as they come."""
    import torch
    from torch.utils.data import DataLoader

    data = BandItems(source, sched, mpp=mpp, level=level, decode_only=on_gpu, tiles=tiles)
    if num_workers > 0:
        source.close()  # each worker opens its own handle
    loader = DataLoader(
        data, batch_size=None, shuffle=False, num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None, pin_memory=on_gpu and cuda,
        prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False,
    )  # fmt: skip
    store: dict = dict(kept or {})
    direct = out is not None and not on_gpu and not source.has_transform  # cut straight into out[rows[i]]
    for i, blocks in loader:
        for k, v in blocks.items():
            store[k] = resample_region(v, block, block, device=device, engine="torch") if on_gpu else v
        if kept is not None:
            _keep(source, (mpp, level, block), blocks)
        stats.blocks_resampled += len(blocks)
        stats.peak_blocks = max(stats.peak_blocks, len(store))
        if len(sched.origins[i]):
            need = {k: store[k] for k in sched.needs[i]}
            with one_thread():
                patches = cut(need, sched.origins[i], size, block, *((out, rows[i]) if direct else ()))
        else:
            patches = torch.empty((0, size, size, 3), dtype=torch.uint8)
        if source.has_transform:
            patches = torch.from_numpy(np.ascontiguousarray(source.transform_patches(patches.cpu().numpy(), centres[i])))
        for k in sched.free[i]:
            store.pop(k, None)
        if out is not None:
            if not direct:
                out[rows[i]] = patches.cpu().numpy()
            patches = None
        yield i, patches


def _worker_init(_):
    """DataLoader workers: one torch and one OpenCV thread each (the workers are the parallelism)."""
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
