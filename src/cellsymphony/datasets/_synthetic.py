"""``cs.datasets.synthetic_xenium``: a realistic synthetic Xenium bundle with its H&E, and ``cs.datasets.synthetic``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._settings import logger, settings
from .._utils import atomic_path, partial_tag, remove_stale_partials
from .._validate import check_float, check_int

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

PIXEL_SIZE = 0.2125  # um per Xenium morphology pixel
GENERATOR_VERSION = 6  # bump when the generated data change, to invalidate caches
_SW = {"string": "xenium-2.0.0.10", "integer": "Xenium-1.0.2"}

# mean transcripts per cell (panel genes) by type; Xenium panels give tens to hundreds per cell
LIBRARY = {"tumour epithelium": 190.0, "normal epithelium": 150.0, "fibroblast": 110.0, "T cell": 55.0,
           "B cell": 65.0, "macrophage": 135.0, "endothelial": 90.0}


# ----------------------------------------------------------------------------------------------- ids
def _encode_ids(prefix: np.ndarray, suffix: int = 1) -> np.ndarray:
    """Xenium >= 1.3 string ids: the uint32 prefix as hex with digits shifted to letters a-p, 8 wide."""
    table = str.maketrans("0123456789abcdef", "abcdefghijklmnop")
    return np.array([format(int(p), "x").translate(table).rjust(8, "a") + f"-{suffix}" for p in prefix], dtype=object)


# ----------------------------------------------------------------------------------------------- expression
def _draw_counts(types: np.ndarray, fine: np.ndarray, size: np.ndarray, profiles: np.ndarray, genes: list[str],
                 theta: np.ndarray, rng: np.random.Generator, compartments: np.ndarray | None = None):
    """Negative-binomial (gamma-Poisson) counts, CSR (cells x genes) int32."""
    import scipy.sparse as sp

    from ._panel import CELL_TYPES, FINE_TYPES, fine_shift, niche_shift

    n, g = len(types), len(genes)
    code = pd.Categorical(types, categories=CELL_TYPES).codes
    mult = {f: fine_shift(genes, f) for fs in FINE_TYPES.values() for f in fs}
    blocks = []
    step = max(1, 4_000_000 // g)
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        p = profiles[code[sl]].copy()
        for f in np.unique(fine[sl]):
            m = fine[sl] == f
            p[m] *= mult[f]
        if compartments is not None:
            for (t, comp) in set(zip(types[sl], compartments[sl], strict=True)):
                shift = niche_shift(genes, t, comp)
                if shift is not None:
                    p[(types[sl] == t) & (compartments[sl] == comp)] *= shift
        p /= p.sum(axis=1, keepdims=True)
        mu = (p * size[sl, None]).astype(np.float32)
        lam = mu * rng.gamma(theta, 1.0 / theta, size=mu.shape).astype(np.float32)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.int32)))
    return sp.vstack(blocks, format="csr")


def _library_sizes(types: np.ndarray, area: np.ndarray, rng: np.random.Generator, scale: float = 1.0):
    base = np.array([LIBRARY[t] for t in types])
    rel_area = np.clip(area / np.median(area), 0.3, 3.0) ** 0.5
    return scale * base * rel_area * np.exp(rng.normal(0, 0.45, len(types)))


# ----------------------------------------------------------------------------------------------- writers
def _write_h5(path: Path, counts, ctrl, cell_ids, feat_names, feat_ids, feat_types, sw: str,
              block: int = 100_000) -> None:
    """The 10x HDF5 matrix of ``[counts, ctrl]`` (cells x features CSR), written in blocks of cells."""
    import h5py
    import scipy.sparse as sp

    n = counts.shape[0]
    nnz = counts.nnz + ctrl.nnz
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["chemistry_description"] = "Xenium"
        f.attrs["filetype"] = "matrix"
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["software_version"] = sw
        f.attrs["version"] = np.int64(2)
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array([str(c).encode() for c in cell_ids]))
        # cells x features CSR has the arrays of 10x's features x cells CSC
        gz = {"compression": "gzip", "compression_opts": 1}
        data = m.create_dataset("data", shape=(nnz,), dtype=np.int32, **gz)
        indices = m.create_dataset("indices", shape=(nnz,), dtype=np.int64, **gz)
        indptr = np.zeros(n + 1, np.int64)
        pos = 0
        for s in range(0, n, block):
            blk = sp.hstack([counts[s : s + block], ctrl[s : s + block]], format="csr")
            data[pos : pos + blk.nnz] = blk.data.astype(np.int32)
            indices[pos : pos + blk.nnz] = blk.indices
            indptr[s + 1 : s + blk.shape[0] + 1] = pos + blk.indptr[1:]
            pos += blk.nnz
        m.create_dataset("indptr", data=indptr)
        m.create_dataset("shape", data=np.array([len(feat_names), len(cell_ids)], dtype=np.int32))
        ft = m.create_group("features")
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        ft.create_dataset("feature_type", data=np.array([t.encode() for t in feat_types]))
        ft.create_dataset("genome", data=np.array([b"Unknown"] * len(feat_names)))
        ft.create_dataset("id", data=np.array([i.encode() for i in feat_ids]))
        ft.create_dataset("name", data=np.array([n.encode() for n in feat_names]))


def _ome_meta(axes: str, mpp: float | None, channel: str | None = None) -> dict:
    meta = {"axes": axes}
    if mpp is not None:  # None: record no pixel size (an H&E export that lost it)
        meta.update({"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"})
    if channel:
        meta["Channel"] = {"Name": [channel]}
    return meta


def _band_tiles(bands: Iterator[np.ndarray], width: int, tile: int) -> Iterator[np.ndarray]:
    """The tiles of an image given as consecutive bands of rows, in TIFF order (rows of tiles, left to right).

    Bands of any height: rows short of a tile are kept for the next band. Edge tiles are yielded partial
    (tifffile pads them with zeros, as it does for a whole array).
    """
    pending = None
    for band in bands:
        buf = band if pending is None else np.concatenate([pending, band])
        full = len(buf) // tile * tile
        for r in range(0, full, tile):
            for c in range(0, width, tile):
                yield buf[r : r + tile, c : c + tile]
        pending = buf[full:] if full < len(buf) else None
        del buf, band
    if pending is not None:
        for c in range(0, width, tile):
            yield pending[:, c : c + tile]


def _prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """The items of ``items``, produced ``depth`` ahead in a thread (the next band is rendered while this one
    is compressed and written); an error in the thread is raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:  # handed to the consumer
            put((end, err))

    worker = threading.Thread(target=work, name="cellsymphony-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, err = q.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
            del item
    finally:
        stop.set()
        while worker.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            worker.join(timeout=0.1)


def _write_pyramid(path: Path, shape: tuple[int, ...], dtype, bands: Iterator[np.ndarray], mpp: float | None, *,
                   rgb: bool, compression: str, channel: str | None = None, tile: int = 512,
                   min_size: int = 512, jpeg_quality: int = 90) -> None:
    """A tiled OME-TIFF pyramid (levels 1.. in SubIFDs) of an image given as consecutive bands of rows.

    Level 0 is streamed tile by tile from ``bands`` (even heights, except the last); level 1 (a quarter of
    the pixels) is pooled from each band as it passes and kept, the smaller levels are pooled from it.
    """
    import tifffile

    from . import _render

    dtype = np.dtype(dtype)
    n_lev = _render.n_levels(shape, min_size)
    level1 = np.empty((shape[0] // 2, shape[1] // 2) + shape[2:], dtype) if n_lev > 1 else None
    done = [0]

    def pooled(bands):
        for band in bands:
            r0 = done[0]
            if level1 is not None:
                if r0 % 2:
                    raise ValueError("bands of the image must have an even number of rows (but the last)")
                part = _render.downsample2(band)
                level1[r0 // 2 : r0 // 2 + len(part)] = part
            done[0] += len(band)
            yield band

    # tiles are compressed in two threads, 64 MB at a time (the tiles waiting are views of the bands)
    kw = {"photometric": "rgb" if rgb else "minisblack", "tile": (tile, tile), "compression": compression,
          "maxworkers": 2, "buffersize": 1 << 26}
    if compression == "jpeg":
        kw["compressionargs"] = {"level": int(jpeg_quality)}
    elif compression == "zlib":
        kw["compressionargs"] = {"level": 1}
    res = 1e4 / mpp if mpp is not None else None  # pixels per cm
    tags = {"resolution": (res, res), "resolutionunit": "CENTIMETER"} if res is not None else {}
    ahead = _prefetch(bands)
    tiles = _band_tiles(pooled(ahead), shape[1], tile)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        try:
            tw.write(tiles, shape=shape, dtype=dtype, subifds=n_lev - 1, **tags,
                     metadata=_ome_meta("YXS" if rgb else "YX", mpp, channel), **kw)
        finally:  # tifffile takes just the tiles it needs: stop the producers here
            tiles.close()
            ahead.close()
        if done[0] != shape[0]:
            raise RuntimeError(f"{path.name}: {done[0]} rows were rendered for an image of {shape[0]}")
        levels = _render.pyramid(level1, min_size) if level1 is not None else []
        for k, lvl in enumerate(levels, start=1):
            lvl_tags = {"resolution": (res / 2**k, res / 2**k), "resolutionunit": "CENTIMETER"} if res else {}
            tw.write(lvl, subfiletype=1, **lvl_tags, metadata=None, **kw)


class _CellsZarr:
    """``cells.zarr.zip`` written in one pass: ids, then the masks band by band, then summary and polygons.

    A ZipStore cannot rewrite an entry, so the mask bands are whole chunk rows: every chunk is written once.
    """

    def __init__(self, path: Path, shape: tuple[int, int], band_rows: int, ids_prefix, id_style: str,
                 n_cells: int):
        import zarr
        from numcodecs import Blosc

        self._atomic = atomic_path(path)
        tmp = self._atomic.__enter__()
        self.store = None
        self.n_cells, self.band_rows = n_cells, band_rows
        try:
            tmp.unlink()
            self.store = zarr.storage.ZipStore(tmp, mode="w")
            self.root = root = zarr.open_group(
                store=self.store, mode="w", zarr_format=2,
                attributes={"major_version": 5, "minor_version": 0, "number_cells": int(n_cells),
                            "segmentation_methods": ["Segmented by nucleus expansion of 5.0µm"]})
            if id_style == "string":
                cid = np.stack([ids_prefix.astype(np.uint32), np.ones(n_cells, np.uint32)], axis=1)
            else:
                cid = ids_prefix.astype(np.uint32)
            root.create_array("cell_id", data=cid, chunks=(min(n_cells, 100_000),) + cid.shape[1:])
            masks = root.create_group("masks", attributes={"0": "nucleus", "1": "cell"})
            lz4 = Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE)
            chunks = (min(band_rows, shape[0]), min(4096, shape[1]))
            self.masks = [masks.create_array(k, shape=shape, dtype=np.uint32, chunks=chunks, compressors=lz4,
                                             fill_value=0) for k in ("0", "1")]
        except BaseException:
            self.abort()
            raise

    def write_masks(self, r0: int, nuc: np.ndarray, cell: np.ndarray) -> None:
        if r0 % self.band_rows:
            raise ValueError("mask bands must start on a chunk row")
        for arr, band in zip(self.masks, (nuc, cell), strict=True):
            step = arr.chunks[1]
            for c in range(0, band.shape[1], step):  # a chunk at a time: zarr copies what it encodes
                arr[r0 : r0 + len(band), c : c + step] = band[:, c : c + step]

    def finish(self, summary: pd.DataFrame, polys: dict) -> None:
        n_cells, root = self.n_cells, self.root
        root.create_array("cell_summary", data=summary.to_numpy(np.float64),
                          chunks=(min(n_cells, 100_000), summary.shape[1]),
                          attributes={"column_names": list(summary.columns)})
        ps = root.create_group("polygon_sets")
        for k, (vx, vy) in polys.items():
            g = ps.create_group(k, attributes={"name": "nucleus" if k == "0" else "cell"})
            nv = vx.shape[1]
            verts = np.empty((n_cells, 2 * nv), np.float32)
            verts[:, 0::2], verts[:, 1::2] = vx, vy
            g.create_array("cell_index", data=np.arange(n_cells, dtype=np.uint32))
            g.create_array("method", data=np.zeros(n_cells, np.uint32))
            g.create_array("num_vertices", data=np.full(n_cells, nv, np.int32))
            g.create_array("vertices", data=verts, chunks=(min(n_cells, 50_000), 2 * nv))
        self.store.close()
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Close the store and remove the partial file."""
        if self.store is not None:
            self.store.close()
        err = RuntimeError("cells.zarr.zip aborted")
        self._atomic.__exit__(type(err), err, None)  # atomic_path removes its temporary file


def _boundaries(ids, vx, vy, id_style):
    import pyarrow as pa

    n, nv = vx.shape
    # close each polygon (Xenium repeats the first vertex)
    vx = np.concatenate([vx, vx[:, :1]], axis=1)
    vy = np.concatenate([vy, vy[:, :1]], axis=1)
    code = np.repeat(np.arange(n), nv + 1)
    cols = {"cell_id": _ids_array(ids, code, id_style), "vertex_x": pa.array(vx.ravel().astype(np.float32)),
            "vertex_y": pa.array(vy.ravel().astype(np.float32))}
    if id_style == "string":
        cols["label_id"] = pa.array((code + 1).astype(np.int32))
    return pa.table(cols)


_TX_CHUNK_CELLS = 20_000  # cells whose molecules are drawn at once
_TX_ROW_GROUP = 1 << 20  # rows per row group of transcripts.parquet


def _transcripts(path: Path, counts, ctrl, ctrl_names, genes, cells, ids, id_style, nuc_area, cell_area, width,
                 height, rng) -> int:
    """Write ``transcripts.parquet``: one row per detected molecule, the matrix counts (qv >= 20) plus
    low-quality and unassigned ones, sorted by field of view and y; returns the number of rows.

    Molecules are drawn in chunks of cells into compact arrays (float32, int32 / int16), sorted once, and
    written by row groups, each building its own string columns.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    names = list(genes) + list(ctrl_names)
    n = counts.shape[0]
    per_cell = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64) + np.asarray(ctrl.sum(axis=1)).ravel()
    starts = list(range(0, n, _TX_CHUNK_CELLS))
    m_chunk = [int(per_cell[s : s + _TX_CHUNK_CELLS].sum()) for s in starts]
    extra = [(int(0.07 * m), int(0.05 * m)) for m in m_chunk]
    total = sum(m + lo + un for m, (lo, un) in zip(m_chunk, extra, strict=True))
    fx_all = np.empty(total, np.float32)
    fy_all = np.empty(total, np.float32)
    qv_all = np.empty(total, np.float32)
    nd_all = np.empty(total, np.float32)
    cell_code = np.empty(total, np.int32)
    feat_all = np.empty(total, np.int16 if len(names) < 2**15 else np.int32)
    nuclear_all = np.empty(total, np.uint8)
    cx_all, cy_all = cells.x.to_numpy(), cells.y.to_numpy()
    rn_all, rc_all = np.sqrt(nuc_area / np.pi), np.sqrt(cell_area / np.pi)
    pos = 0
    for s, m, (k_low, k_un) in zip(starts, m_chunk, extra, strict=True):
        e = min(n, s + _TX_CHUNK_CELLS)
        allc = sp.hstack([counts[s:e], ctrl[s:e]], format="csr")
        cell_of = np.repeat(np.arange(s, e, dtype=np.int32), np.diff(allc.indptr))
        feat = np.repeat(allc.indices, allc.data)
        cell_of = np.repeat(cell_of, allc.data)
        nuclear = rng.random(m) < 0.38
        r_n, r_c = rn_all[cell_of], rc_all[cell_of]
        rr = np.where(nuclear, r_n * np.sqrt(rng.random(m)) * 0.95,
                      r_n + (np.maximum(r_c - r_n, 0.3)) * np.sqrt(rng.random(m)))
        ang = rng.uniform(0, 2 * np.pi, m)
        x = cx_all[cell_of] + rr * np.cos(ang)
        y = cy_all[cell_of] + rr * np.sin(ang)
        qv = np.minimum(40.0, 20.0 + rng.exponential(9.0, m))
        # extra molecules: low quality (not in the matrix) and unassigned (outside cells)
        fx = rng.integers(0, len(genes), k_low + k_un)
        low_cell = rng.integers(s, e, k_low).astype(np.int32)
        x_extra = np.concatenate([cx_all[low_cell] + rng.normal(0, 3, k_low), rng.uniform(0, width, k_un)])
        y_extra = np.concatenate([cy_all[low_cell] + rng.normal(0, 3, k_low), rng.uniform(0, height, k_un)])
        sl = slice(pos, pos + m + k_low + k_un)
        fx_all[sl] = np.clip(np.concatenate([x, x_extra]), 0, width)
        fy_all[sl] = np.clip(np.concatenate([y, y_extra]), 0, height)
        cell_code[sl] = np.concatenate([cell_of, low_cell, np.full(k_un, n, np.int32)])
        feat_all[sl] = np.concatenate([feat, fx])
        nuclear_all[sl] = np.concatenate([nuclear, np.zeros(k_low + k_un, bool)])
        qv_all[sl] = np.concatenate([qv, rng.uniform(5, 19.9, k_low), rng.uniform(20, 40, k_un)])
        nd_all[sl] = np.concatenate([np.where(nuclear, 0.0, rr - r_n), rng.uniform(0, 5, k_low),
                                     rng.uniform(5, 30, k_un)])
        pos = sl.stop
    fov_codes, fov_labels = _fov_codes(fx_all, fy_all)
    order = np.lexsort((fy_all, fov_codes))  # the Xenium order: by field of view, then y
    feat_dict = pa.array([str(v) for v in names], pa.string())
    fov_dict = pa.array(fov_labels, pa.string())
    if id_style == "string":
        id_dict = pa.array([str(v) for v in ids] + ["UNASSIGNED"], pa.string())
    else:
        id_int = np.append(np.asarray(ids, np.int32), np.int32(-1))

    def strings(codes, dictionary):
        return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), dictionary).cast(pa.string())

    schema = pa.schema([("transcript_id", pa.uint64()),
                        ("cell_id", pa.string() if id_style == "string" else pa.int32()),
                        ("overlaps_nucleus", pa.uint8()), ("feature_name", pa.string()),
                        ("x_location", pa.float32()), ("y_location", pa.float32()), ("z_location", pa.float32()),
                        ("qv", pa.float32()), ("fov_name", pa.string()), ("nucleus_distance", pa.float32())])
    first_id = np.uint64(281474976710656)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for a in range(0, total, _TX_ROW_GROUP):
            o = order[a : a + _TX_ROW_GROUP]
            codes = cell_code[o]
            cols = [
                pa.array(np.arange(a, a + len(o), dtype=np.uint64) + first_id),
                strings(codes, id_dict) if id_style == "string" else pa.array(id_int[codes]),
                pa.array(nuclear_all[o]),
                strings(feat_all[o], feat_dict),
                pa.array(fx_all[o]),
                pa.array(fy_all[o]),
                pa.array(rng.uniform(8, 22, len(o)).astype(np.float32)),
                pa.array(qv_all[o]),
                strings(fov_codes[o], fov_dict),
                pa.array(nd_all[o]),
            ]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=_TX_ROW_GROUP)
    return total


def _dict_strings(codes: np.ndarray, labels):
    """A plain string column built in C++ from integer codes into ``labels`` (no Python string objects)."""
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes, np.int32)),
                                          pa.array([str(v) for v in labels], pa.string())).cast(pa.string())


def _ids_array(ids: np.ndarray, codes: np.ndarray, id_style: str):
    """Cell-id column for ``codes`` into ``ids``; code ``len(ids)`` means unassigned."""
    import pyarrow as pa

    if id_style == "string":
        return _dict_strings(codes, list(ids) + ["UNASSIGNED"])
    return pa.array(np.append(np.asarray(ids, np.int32), np.int32(-1))[codes])


def _fov_codes(x, y):
    """Field-of-view code of each position (int16, ranks of the fields present) and the fields' names."""
    from ._tissue import FOV_COLS, FOV_ROWS, FOV_UM

    key = (np.clip((y // FOV_UM).astype(np.int16), 0, FOV_ROWS - 1) * 100
           + np.clip((x // FOV_UM).astype(np.int16), 0, FOV_COLS - 1) + 1).astype(np.int16)
    present = np.bincount(key, minlength=FOV_ROWS * 100) > 0
    rank = (np.cumsum(present) - 1).astype(np.int16)
    uniq = np.flatnonzero(present)
    return rank[key], [f"{chr(65 + u // 100)}{u % 100}" for u in uniq]


# ----------------------------------------------------------------------------------------------- H&E classifier
def _he_nuclei(truth: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Simulated H&E nucleus classifier output: misses, duplicates, confusions, localisation noise."""
    true_cls = truth.cell_type.map({"fibroblast": "fibroblast", "T cell": "lymphocyte", "B cell": "lymphocyte",
                                    "tumour epithelium": "tumour", "normal epithelium": "other",
                                    "macrophage": "other", "endothelial": "other"}).to_numpy()
    classes = np.array(["fibroblast", "lymphocyte", "tumour", "other"])
    # rows: true class; columns: called class (typical confusions of H&E classifiers)
    confusion = {
        "fibroblast": [0.84, 0.03, 0.03, 0.10],
        "lymphocyte": [0.02, 0.92, 0.02, 0.04],
        "tumour": [0.03, 0.03, 0.88, 0.06],
        "other": [0.18, 0.10, 0.17, 0.55],  # endothelium as fibroblast, normal epithelium as tumour
    }
    n = len(truth)
    keep = rng.random(n) > 0.07  # missed nuclei
    called = np.empty(n, dtype=object)
    for c in classes:
        m = true_cls == c
        called[m] = rng.choice(classes, size=m.sum(), p=confusion[c])
    correct = called == true_cls
    prob = np.where(correct, rng.beta(8, 2, n), rng.beta(3, 3, n))
    sd = 1.8  # px localisation noise
    df = pd.DataFrame({"x": truth.he_x.to_numpy() + rng.normal(0, sd, n), "y": truth.he_y.to_numpy() + rng.normal(0, sd, n),
                       "class": called, "probability": prob})[keep]
    dup = df.sample(frac=0.02, random_state=int(rng.integers(1 << 31)))
    dup = dup.assign(x=dup.x + rng.normal(0, 6, len(dup)), y=dup.y + rng.normal(0, 6, len(dup)),
                     probability=dup.probability * 0.7)
    k_fp = int(0.015 * n)
    lo, hi = truth[["he_x", "he_y"]].min().to_numpy(), truth[["he_x", "he_y"]].max().to_numpy()
    fp = pd.DataFrame({"x": rng.uniform(lo[0], hi[0], k_fp), "y": rng.uniform(lo[1], hi[1], k_fp),
                       "class": rng.choice(classes, k_fp), "probability": rng.beta(2, 4, k_fp)})
    out = pd.concat([df, dup, fp], ignore_index=True)
    out = out.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)
    out["probability"] = out.probability.clip(0.05, 0.999).round(4)
    out[["x", "y"]] = out[["x", "y"]].round(2)
    return out


# ----------------------------------------------------------------------------------------------- reference
def _reference(genes, profiles, theta, n_cells: int, rng: np.random.Generator) -> AnnData:
    import anndata as ad

    from ._panel import CELL_TYPES, FINE_TYPES, FINE_WEIGHTS

    # an atlas over-samples immune cells and has another platform: deeper counts, gene-wise batch effect
    comp = {"tumour epithelium": 0.22, "normal epithelium": 0.10, "fibroblast": 0.16, "T cell": 0.20,
            "B cell": 0.12, "macrophage": 0.12, "endothelial": 0.08}
    names = list(comp)
    p = np.array([comp[k] for k in names])
    types = np.asarray(names, dtype=object)[rng.choice(len(names), n_cells, p=p / p.sum())]
    fine = np.empty(n_cells, dtype=object)
    for t in CELL_TYPES:
        m = types == t
        w = np.asarray(FINE_WEIGHTS[t])
        fine[m] = np.asarray(FINE_TYPES[t], dtype=object)[rng.choice(len(w), m.sum(), p=w / w.sum())]
    batch = np.exp(rng.normal(0, 0.3, len(genes)))
    prof = profiles * batch
    prof /= prof.sum(axis=1, keepdims=True)
    size = np.array([LIBRARY[t] for t in types]) * 4.0 * np.exp(rng.normal(0, 0.5, n_cells))
    X = _draw_counts(types, fine, size, prof, genes, theta, rng)
    obs = pd.DataFrame({"cell_type": pd.Categorical(types, categories=list(CELL_TYPES)),
                        "cell_type_fine": pd.Categorical(fine),
                        "donor": pd.Categorical(rng.choice(["D1", "D2", "D3"], n_cells))},
                       index=[f"ref_{i:06d}" for i in range(n_cells)])
    var = pd.DataFrame({"gene_ids": _gene_ids(genes), "feature_types": "Gene Expression"}, index=list(genes))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["description"] = "synthetic single-cell reference (separate draw from the same cell-type programmes)"
    return adata


def _gene_ids(genes) -> list[str]:
    # Stable placeholder identifiers (real Ensembl ids are not bundled); one per symbol.
    return [f"CSYN{i + 1:07d}" for i in range(len(genes))]


def _model(seed: int):
    """Panel, expression programmes and dispersions: shared by the tissue and the reference."""
    from ._panel import expression_profiles, gene_panel

    genes = gene_panel()
    rng = np.random.default_rng([seed, 7])
    profiles = expression_profiles(genes, rng)
    theta = np.exp(rng.normal(np.log(3.0), 0.5, len(genes))).astype(np.float32)
    return genes, profiles, theta


def synthetic_reference(*, n_cells: int = 5000, seed: int = 0) -> AnnData:
    """A single-cell reference atlas matching the synthetic Xenium panel.

    A separate draw from the same cell-type expression programmes as :func:`synthetic_xenium` with the same
    ``seed``: other composition, deeper counts and a gene-wise platform effect, as a real atlas would be.

    Parameters
    ----------
    n_cells
        Number of reference cells.
    seed
        Seed of the synthetic tissue the reference should match.

    Returns
    -------
    AnnData with integer counts in ``X`` (CSR), ``var_names`` = panel gene symbols, ``var["gene_ids"]``,
    ``obs["cell_type"]`` (the seven coarse types) and ``obs["cell_type_fine"]`` (atlas-style fine labels such
    as ``"CD4 T cell"``, ``"CD8 T cell"``, ``"Plasma cell"``).
    """
    n_cells = check_int("n_cells", n_cells, min=1)
    seed = check_int("seed", seed)
    genes, profiles, theta = _model(seed)
    return _reference(genes, profiles, theta, n_cells, np.random.default_rng([seed, 11]))


# ----------------------------------------------------------------------------------------------- main entry
def synthetic_xenium(
    path: str | os.PathLike,
    *,
    n_cells: int = 20_000,
    seed: int = 0,
    id_style: Literal["string", "integer"] = "string",
    he_mpp: float = 0.2738,
    name: str = "synthetic",
    transcripts: bool = True,
    reference_cells: int = 3000,
    he_rotation: float | None = None,
    he_flip: bool = False,
    he_record_mpp: bool | float = True,
    he_deformation_um: float = 0.0,
    he_deformation_wavelength_um: float = 500.0,
    he_alignment: bool = True,
    he_stain: dict | None = None,
    he_blur_um: float = 0.0,
    he_jpeg_quality: int = 90,
    he_compression: Literal["jpeg", "zlib", "none"] = "jpeg",
    overwrite: bool = False,
) -> Path:
    """Write a synthetic Xenium output folder of a breast tumour section, with its H&E.

    The folder has the 10x Xenium file layout (v2.0 for string ids, v1.0 for integer ids) and can be read by
    :func:`cellsymphony.io.read_xenium` and by ``spatialdata_io.xenium``. See the docs page *Synthetic tissue*
    for the tissue model and how its realism is measured.

    Images and masks are rendered and written in bands of rows and the transcripts by row groups, so memory
    stays a few GB at real section sizes (460,000 cells: about 6.5 GB on disk). The bundle is generated in a
    hidden folder beside ``path`` and renamed into place when complete: an interrupted run leaves no partial
    bundle at ``path``, and ``overwrite`` replaces an old bundle only with a complete one. The free disk
    space is checked against an estimate of the bundle's size before anything is written.

    Parameters
    ----------
    path
        Output folder (created; must be empty or absent unless ``overwrite``).
    n_cells
        Number of cells of the section, from 10 to 1,800,000 (the largest section whose fields of view the
        bundle can name).
    seed
        Random seed; the same seed gives the same bundle.
    id_style
        ``"string"``: cell ids such as ``"aaabbbcc-1"`` and the Xenium 2.0 layout (``morphology_focus/``
        folder, ``cells.zarr.zip`` with polygon sets); ``"integer"``: integer ids and the Xenium 1.0 layout
        (``morphology_mip.ome.tif``, ``morphology_focus.ome.tif``).
    he_mpp
        Micrometres per H&E pixel at level 0.
    name
        Prefix of the H&E files ``<name>_he_image.ome.tif`` / ``<name>_he_imagealignment.csv``.
    transcripts
        Write ``transcripts.parquet`` (the largest file).
    reference_cells
        Cells of the matching single-cell reference ``reference.h5ad`` (0: none).
    he_rotation
        Rotation (degrees, any angle) of the H&E relative to the Xenium frame; ``None``: a small random one
        (4-11 degrees either way), as a slide placed by hand. With the next four, the cases of automatic
        registration (:func:`cellsymphony.io.register_he`); the defaults give the usual bundle.
    he_flip
        Mirror the H&E (a slide scanned face down).
    he_record_mpp
        Pixel size recorded in the H&E file: ``True`` the true ``he_mpp``, ``False`` none, or a (wrong) value.
    he_deformation_um
        Amplitude (largest displacement, um) of a smooth local deformation of the tissue in the H&E (a section
        that stretched between imaging and staining); 0 for none.
    he_deformation_wavelength_um
        Wavelength of that deformation (um).
    he_alignment
        Write ``<name>_he_imagealignment.csv`` (the affine part of the truth when deformed); ``False``: an H&E
        without its alignment file.
    he_stain
        The stain and scanner colour of the H&E, a dict of any of ``hematoxylin`` and ``eosin`` (RGB
        optical-density vectors; default the usual ones, drawn per slide), ``hematoxylin_strength`` and
        ``eosin_strength`` (factors, 1 usual) and ``background`` (optical density of the glass, scalar or per
        RGB channel; 0.03 usual). See :func:`synthetic_he`.
    he_blur_um
        Gaussian blur (sigma, micrometres) of the H&E, a scanner slightly out of focus; 0 for none.
    he_jpeg_quality
        JPEG quality of the H&E tiles (1-100; 90 usual).
    he_compression
        Compression of the H&E's 512 px tiles: ``"jpeg"`` (lossy, at ``he_jpeg_quality``: what slide scanners
        write, and what the patch-extraction benchmarks decode), ``"zlib"`` (lossless) or ``"none"``.
    overwrite
        Replace an existing non-empty folder (once the new bundle is complete).

    Returns
    -------
    The folder path. It holds ``experiment.xenium``, ``cells.parquet``, ``cells.zarr.zip``,
    ``cell_feature_matrix.h5``, ``cell_boundaries.parquet``, ``nucleus_boundaries.parquet``,
    ``transcripts.parquet``, the DAPI morphology image, ``<name>_he_image.ome.tif``,
    ``<name>_he_imagealignment.csv`` (unless ``he_alignment=False``), ``truth.parquet`` (per cell: true type,
    fine type, compartment, position ``x, y`` um, rendered nucleus area / elongation / darkness, the H&E
    nucleus centroid ``he_x, he_y`` in level-0 pixels: where the H&E shows the nucleus, deformation included),
    ``truth_he.json`` (the true H&E geometry: ``alignment`` (the affine, H&E pixel -> morphology pixel),
    ``rotation_deg``, ``flip``, ``he_mpp``, ``he_mpp_recorded`` (null when none) and ``deformation``
    (amplitude, wavelength and phases of the field of :class:`cellsymphony.datasets._tissue.Deformation`, or
    null)), ``he_nuclei.csv`` (a simulated H&E nucleus classifier's output) and ``reference.h5ad``.
    """
    from ._tissue import max_cells

    if id_style not in ("string", "integer"):
        raise ValueError(f"id_style must be 'string' or 'integer', got {id_style!r}")
    n_cells = check_int("n_cells", n_cells, min=10)
    seed = check_int("seed", seed)
    if n_cells > max_cells():
        raise ValueError(f"n_cells={n_cells:,} is more than the synthetic tissue model can lay out: at most "
                         f"{max_cells():,} cells (the section must fit the field-of-view rows A-Z of the bundle)")
    he_mpp = check_float("he_mpp", he_mpp, min=0.1, max=2.0, unit="um/px")
    reference_cells = check_int("reference_cells", reference_cells, min=0)
    if not isinstance(he_record_mpp, bool) and not (0 < float(he_record_mpp) < 100):
        raise ValueError(f"he_record_mpp must be True, False or a pixel size in um, got {he_record_mpp!r}")
    he_deformation_um = check_float("he_deformation_um", he_deformation_um, min=0, max=100, unit="um")
    he_deformation_wavelength_um = check_float("he_deformation_wavelength_um", he_deformation_wavelength_um, min=0,
                                               min_open=True, unit="um")  # fmt: skip
    stain = _check_stain(he_stain)
    he_blur_um = check_float("he_blur_um", he_blur_um, min=0, max=20, unit="um")
    he_jpeg_quality = check_int("he_jpeg_quality", he_jpeg_quality, min=1, max=100)
    if he_compression not in ("jpeg", "zlib", "none"):
        raise ValueError(f"he_compression must be 'jpeg', 'zlib' or 'none', got {he_compression!r}")
    he_opts = {"rotation": None if he_rotation is None else float(he_rotation), "flip": bool(he_flip),
               "record_mpp": he_record_mpp, "deformation_um": float(he_deformation_um),
               "wavelength_um": float(he_deformation_wavelength_um), "alignment": bool(he_alignment),
               "stain": stain, "blur_um": float(he_blur_um), "jpeg_quality": int(he_jpeg_quality),
               "compression": he_compression}
    path = check_output_folder(path, overwrite)
    t0 = time.perf_counter()
    _check_disk(path, n_cells=int(n_cells), transcripts=transcripts, reference_cells=reference_cells, he_mpp=he_mpp)
    # generate into a hidden sibling and rename it into place at the end: an interrupted run leaves no
    # half bundle at `path` (and an old bundle there is replaced only by a complete one)
    _remove_stale_partials(path)
    tmp = path.parent / f".{path.name}.partial-{_partial_tag()}"
    tmp.mkdir(parents=True)
    try:
        _generate(tmp, n_cells=int(n_cells), seed=seed, id_style=id_style, he_mpp=he_mpp, name=name,
                  transcripts=transcripts, reference_cells=reference_cells, he_opts=he_opts)
        _move_into_place(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote a synthetic Xenium bundle of %d cells to %s in %.1f s", n_cells, path, time.perf_counter() - t0)
    return path


# ----------------------------------------------------------------------------------------------- bundle folder
# bytes per cell of each part of a bundle (measured at 50,000 cells with the default he_mpp, plus ~10 %)
_BYTES_PER_CELL = {"dapi": 5_800, "he": 1_300, "masks": 2_100, "tables": 900, "transcripts": 4_300}
_BYTES_PER_REFERENCE_CELL = 1_900


def check_output_folder(path: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder of a generator as a Path: absent, empty, or (with ``overwrite``) any folder."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} exists and is not a folder")
        if any(path.iterdir()) and not overwrite:
            raise ValueError(f"{path} exists and is not empty; pass overwrite=True or choose another folder")
    return path


def _check_stain(stain: dict | None) -> dict | None:
    """``he_stain`` validated: known keys, 3-vectors of positive optical density, positive strengths."""
    from ._render import STAIN_KEYS

    if stain is None:
        return None
    if not isinstance(stain, dict):
        raise ValueError(f"he_stain must be a dict with keys among {list(STAIN_KEYS)}, got {type(stain).__name__}")
    bad = sorted(set(stain) - set(STAIN_KEYS))
    if bad:
        raise ValueError(f"he_stain: unknown keys {bad}; use {list(STAIN_KEYS)}")
    out = dict(stain)
    for k in ("hematoxylin", "eosin"):
        if out.get(k) is not None:
            v = np.asarray(out[k], dtype=np.float64)
            if v.shape != (3,) or (v < 0).any() or v.sum() <= 0:
                raise ValueError(f"he_stain[{k!r}] must be 3 non-negative optical densities (R, G, B), got {out[k]!r}")
            out[k] = v.tolist()
    for k in ("hematoxylin_strength", "eosin_strength"):
        if k in out and not 0 < float(out[k]) <= 5:
            raise ValueError(f"he_stain[{k!r}] must be a factor in (0, 5], got {out[k]!r}")
    if "background" in out:
        b = np.zeros(3) + np.asarray(out["background"], dtype=np.float64)
        if b.shape != (3,) or (b < 0).any() or (b > 1).any():
            raise ValueError(f"he_stain['background'] must be an optical density in [0, 1] (or 3 of them), got {out['background']!r}")
        out["background"] = b.tolist()
    return out


def _estimate_bytes(n_cells: int, *, transcripts: bool, reference_cells: int, he_mpp: float) -> int:
    """About what a bundle takes on disk (an over-estimate by some 10 %)."""
    b = _BYTES_PER_CELL
    per_cell = b["dapi"] + b["he"] * (0.2738 / he_mpp) ** 2 + b["masks"] + b["tables"]
    if transcripts:
        per_cell += b["transcripts"]
    return int(n_cells * per_cell + reference_cells * _BYTES_PER_REFERENCE_CELL + 20e6)


def _check_disk(path: Path, *, n_cells: int, transcripts: bool, reference_cells: int, he_mpp: float) -> None:
    need = _estimate_bytes(n_cells, transcripts=transcripts, reference_cells=reference_cells, he_mpp=he_mpp)
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need > free:
        tx = _estimate_bytes(n_cells, transcripts=True, reference_cells=0, he_mpp=he_mpp) - _estimate_bytes(
            n_cells, transcripts=False, reference_cells=0, he_mpp=he_mpp)
        hint = f"transcripts=False (saves about {tx / 1e9:.1f} GB), " if transcripts else ""
        raise ValueError(f"not enough disk space for a synthetic bundle of {n_cells:,} cells at {path}: it needs about "
                         f"{need / 1e9:.1f} GB and {parent} has {free / 1e9:.1f} GB free. Reduce it ({hint}fewer "
                         f"cells, reference_cells=0) or choose a folder on a larger disk.")


def _partial_tag() -> str:
    return partial_tag()


def _remove_stale_partials(path: Path) -> None:
    """Remove the hidden folders of runs for ``path`` on this host whose process is gone (killed runs)."""
    remove_stale_partials(path, marker="partial-")


def _move_into_place(tmp: Path, path: Path, *, overwrite: bool) -> None:
    for f in tmp.rglob("*"):  # temporary files of atomic writes are private (0600); the bundle is not
        if f.is_file():
            f.chmod(0o644)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"{path} was filled by someone else while the bundle was generated; it is left as it "
                             f"is (pass overwrite=True to replace it)")
        old = path.parent / f".{path.name}.old-{_partial_tag()}"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)


def _generate(path: Path, *, n_cells: int, seed: int, id_style: str, he_mpp: float, name: str, transcripts: bool,
              reference_cells: int, he_opts: dict | None = None) -> None:
    """Write the bundle into the (new, empty) folder ``path``."""
    import scipy.sparse as sp

    from . import _panel, _render, _tissue

    last = [time.perf_counter()]
    cpu = [time.process_time()]

    def _mark(stage):  # seconds per stage, through logging (benchmarks read the records' stage / seconds)
        from .._settings import log_seconds

        now, now_cpu = time.perf_counter(), time.process_time()
        wall, used = now - last[0], now_cpu - cpu[0]
        log_seconds(stage, wall, cpu_seconds=used)
        last[0], cpu[0] = now, now_cpu

    rng = np.random.default_rng(seed)
    genes, profiles, theta = _model(seed)

    _mark("setup")
    # ---- tissue and cell order (Xenium sorts cells by id, which follows the imaging order)
    tissue = _tissue.make_tissue(n_cells, rng)
    c = tissue.cells
    order = np.lexsort((c.x.to_numpy(), (c.y.to_numpy() // 400).astype(int)))
    tissue.cells = c = c.iloc[order].reset_index(drop=True)
    if id_style == "string":
        lo, hi = 1 << 16, 1 << 26
        prefix = (np.sort(rng.choice(hi - lo, size=n_cells, replace=False)) + lo).astype(np.uint32)
        ids = _encode_ids(prefix)
    else:
        prefix = np.arange(1, n_cells + 1, dtype=np.uint32)
        ids = prefix.astype(np.int32)
    nvx, nvy = _tissue.nucleus_polygons(c)
    cvx, cvy = _tissue.cell_polygons(c)

    _mark("tissue")
    # ---- segmentation masks and DAPI at Xenium resolution, band by band, in one pass
    shape = _render.morphology_shape(tissue, PIXEL_SIZE)
    band_rows = _render.MASK_BAND_ROWS
    nuc_stats, cell_stats = _render.LabelStats(n_cells, PIXEL_SIZE), _render.LabelStats(n_cells, PIXEL_SIZE)
    brightness = 900.0 + 1300.0 * c.dark.to_numpy()
    noise = _render.dapi_noise(np.random.default_rng([seed, 13]))
    zw = _CellsZarr(path / "cells.zarr.zip", shape, band_rows, prefix, id_style, n_cells)

    def dapi_bands():
        for r0, nuc, cell in _render.mask_bands(tissue, PIXEL_SIZE, band_rows):
            zw.write_masks(r0, nuc, cell)
            nuc_stats.add(nuc, r0)
            cell_stats.add(cell, r0)
            del cell
            yield _render.dapi_band(nuc, r0, brightness, noise)

    focus = (path / "morphology_focus" / "morphology_focus_0000.ome.tif" if id_style == "string"
             else path / "morphology_focus.ome.tif")
    focus.parent.mkdir(exist_ok=True)
    try:
        _write_pyramid(focus, shape, np.uint16, dapi_bands(), PIXEL_SIZE, rgb=False, compression="zlib",
                       channel="DAPI", tile=1024, min_size=1024)
        nuc_area, cell_area = nuc_stats.areas(), cell_stats.areas()
        cell_cent, tiny = cell_stats.centroids()
        cell_cent[tiny] = c[["x", "y"]].to_numpy()[tiny]
        summary = pd.DataFrame({
            "cell_centroid_x": cell_cent[:, 0], "cell_centroid_y": cell_cent[:, 1], "cell_area": cell_area,
            "nucleus_centroid_x": nvx.mean(axis=1), "nucleus_centroid_y": nvy.mean(axis=1), "nucleus_area": nuc_area,
            "z_level": np.full(n_cells, 1.0), "nucleus_count": np.ones(n_cells),
        })
        zw.finish(summary, {"0": (nvx, nvy), "1": (cvx, cvy)})
    except BaseException:
        zw.abort()
        raise
    if id_style == "integer":
        try:
            os.link(focus, path / "morphology_mip.ome.tif")
        except OSError:
            shutil.copyfile(focus, path / "morphology_mip.ome.tif")

    _mark("masks_dapi")
    # ---- expression
    types = c.cell_type.to_numpy()
    fine = c.cell_type_fine.to_numpy()
    size = _library_sizes(types, cell_area, rng)
    counts = _draw_counts(types, fine, size, profiles, genes, theta, rng, c.compartment.to_numpy())
    ctrl_names, ctrl_types = _panel.control_features()
    if id_style == "integer":
        ctrl_types = ["Blank Codeword" if t == "Unassigned Codeword" else t for t in ctrl_types]
        ctrl_names = [f"BLANK_{i:04d}" if n.startswith("Unassigned") else n for i, n in enumerate(ctrl_names)]
    rate = np.where(np.asarray(ctrl_types) == "Negative Control Probe", 0.004, 0.0015)
    step = 100_000  # in blocks of cells (the same draws as one call)
    ctrl = sp.vstack([sp.csr_matrix(rng.poisson(rate[None, :] * (size[s : s + step, None] / 100.0)).astype(np.int32))
                      for s in range(0, n_cells, step)], format="csr")
    ct = np.asarray(ctrl_types)
    tx = np.asarray(counts.sum(axis=1)).ravel()

    def ctrl_sum(kind):
        cols = np.flatnonzero(ct == kind)
        return np.asarray(ctrl[:, cols].sum(axis=1)).ravel().astype(np.int32)

    _mark("expression")
    # ---- cells table (Xenium columns)
    cells_df = pd.DataFrame({
        "cell_id": ids,
        "x_centroid": cell_cent[:, 0],
        "y_centroid": cell_cent[:, 1],
        "transcript_counts": tx.astype(np.int32),
        "control_probe_counts": ctrl_sum("Negative Control Probe"),
        "control_codeword_counts": ctrl_sum("Negative Control Codeword"),
    })
    if id_style == "string":
        cells_df["unassigned_codeword_counts"] = ctrl_sum("Unassigned Codeword")
        cells_df["deprecated_codeword_counts"] = np.zeros(n_cells, np.int32)
        cells_df["genomic_control_counts"] = np.zeros(n_cells, np.int32)
    cells_df["total_counts"] = (tx + np.asarray(ctrl.sum(axis=1)).ravel()).astype(np.int32)
    cells_df["cell_area"] = cell_area
    cells_df["nucleus_area"] = nuc_area
    if id_style == "string":
        cells_df["nucleus_count"] = np.ones(n_cells, np.uint32)
        cells_df["segmentation_method"] = pd.Categorical.from_codes(
            np.zeros(n_cells, np.int8), ["Segmented by nucleus expansion of 5.0µm"])
    with atomic_path(path / "cells.parquet") as tmp:
        cells_df.to_parquet(tmp, index=False)
    del cells_df

    feat_names = list(genes) + list(ctrl_names)
    feat_ids = _gene_ids(genes) + list(ctrl_names)
    feat_types = ["Gene Expression"] * len(genes) + list(ctrl_types)
    _write_h5(path / "cell_feature_matrix.h5", counts, ctrl, ids, feat_names, feat_ids, feat_types, _SW[id_style])

    import pyarrow.parquet as pq

    for fname, (vx, vy) in (("nucleus_boundaries.parquet", (nvx, nvy)), ("cell_boundaries.parquet", (cvx, cvy))):
        with atomic_path(path / fname) as tmp:
            pq.write_table(_boundaries(ids, vx, vy, id_style), tmp, compression="zstd")
    del cvx, cvy

    _mark("tables")
    # ---- H&E: similarity transform H&E pixel -> morphology pixel (rotation, mirror, scale, shift)
    opts = {"rotation": None, "flip": False, "record_mpp": True, "deformation_um": 0.0, "wavelength_um": 500.0,
            "alignment": True, "stain": None, "blur_um": 0.0, "jpeg_quality": 90, "compression": "jpeg",
            **(he_opts or {})}
    ang = np.deg2rad(rng.uniform(4.0, 11.0) * rng.choice([-1, 1]))  # drawn in any case: the same stream
    if opts["rotation"] is not None:
        ang = np.deg2rad(opts["rotation"])
    s = he_mpp / PIXEL_SIZE
    lin = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    if opts["flip"]:
        lin = lin @ np.diag([-1.0, 1.0])
    corners = np.array([[0, 0], [tissue.width_um, 0], [0, tissue.height_um], [tissue.width_um, tissue.height_um]])
    he_c = (np.linalg.inv(lin) @ (corners / PIXEL_SIZE).T).T
    margin = rng.uniform(60, 160, 2)
    deform = None
    if opts["deformation_um"] > 0:  # its own stream, so the rest of the bundle stays the same
        deform = _tissue.Deformation.random(opts["deformation_um"], opts["wavelength_um"],
                                            np.random.default_rng([seed, 19]))
        margin = margin + opts["deformation_um"] / he_mpp
    offset = he_c.min(axis=0) - margin
    align = np.eye(3)
    align[:2, :2] = lin
    align[:2, 2] = lin @ offset
    he_shape = tuple(int(v) for v in np.ceil(he_c.max(axis=0) - offset + margin[::-1])[::-1])
    he2um = np.diag([PIXEL_SIZE, PIXEL_SIZE, 1.0]) @ align
    renderer = _render.HERenderer(tissue, he2um, he_shape, rng, deform=deform, stain=opts["stain"])
    he_rows = _render.HE_BAND_ROWS
    sigma_px = opts["blur_um"] / he_mpp
    he_bands = (_render.blur_band(renderer.render_band(r0, min(he_shape[0], r0 + he_rows)), sigma_px)
                for r0 in range(0, he_shape[0], he_rows))
    rec = opts["record_mpp"]
    recorded = he_mpp if rec is True else (None if rec is False else float(rec))
    _write_pyramid(path / f"{name}_he_image.ome.tif", (*he_shape, 3), np.uint8, he_bands, recorded, rgb=True,
                   compression=None if opts["compression"] == "none" else opts["compression"],
                   jpeg_quality=opts["jpeg_quality"])
    truth_he = renderer.nucleus_truth(he_mpp, n_cells)
    rendered_stain = {"hematoxylin": renderer.hv.tolist(), "eosin": renderer.ev.tolist(),
                      "background": renderer.background.tolist(), "blur_um": float(opts["blur_um"]),
                      "jpeg_quality": int(opts["jpeg_quality"])}
    del renderer
    if opts["alignment"]:
        with atomic_path(path / f"{name}_he_imagealignment.csv") as tmp:
            np.savetxt(tmp, align, delimiter=",", fmt="%.10g")
    with atomic_path(path / "truth_he.json") as tmp:
        tmp.write_text(json.dumps({
            "alignment": align.tolist(), "rotation_deg": float(np.rad2deg(ang)), "flip": bool(opts["flip"]),
            "he_mpp": float(he_mpp), "he_mpp_recorded": recorded, "pixel_size": PIXEL_SIZE,
            "he_compression": str(opts["compression"]),
            "deformation": None if deform is None else deform.record(),
            "stain": rendered_stain,
        }, indent=2))

    _mark("he")
    # ---- truth and label sources
    truth = pd.DataFrame({
        "cell_id": ids,
        "cell_type": pd.Categorical(types, categories=list(_panel.CELL_TYPES)),
        "cell_type_fine": pd.Categorical(fine),
        "compartment": pd.Categorical(c.compartment.to_numpy(), categories=list(_tissue.COMPARTMENTS)),
        "x": c.x.to_numpy(), "y": c.y.to_numpy(),
        "nucleus_semi_major_um": c.a.to_numpy(), "nucleus_semi_minor_um": c.b.to_numpy(),
        "nucleus_angle": c.phi.to_numpy(),
        "nucleus_area": truth_he.nucleus_area_rendered.to_numpy(),
        "nucleus_elongation": truth_he.nucleus_elongation.to_numpy(),
        "nucleus_darkness": truth_he.nucleus_darkness.to_numpy(),
        "he_x": truth_he.he_x.to_numpy(), "he_y": truth_he.he_y.to_numpy(),
        "library_size": size,
    })
    with atomic_path(path / "truth.parquet") as tmp:
        truth.to_parquet(tmp, index=False)
    with atomic_path(path / "he_nuclei.csv") as tmp:
        _he_nuclei(truth, rng).to_csv(tmp, index=False)
    del truth
    if reference_cells:
        ref = _reference(genes, profiles, theta, reference_cells, np.random.default_rng([seed, 11]))
        with atomic_path(path / "reference.h5ad") as tmp:
            ref.write_h5ad(tmp)
        del ref

    _mark("truth_reference")
    if transcripts:
        n_tx = _transcripts(path / "transcripts.parquet", counts, ctrl, ctrl_names, genes, c, ids, id_style,
                            nuc_area, cell_area, tissue.width_um, tissue.height_um, rng)
    else:
        n_tx = int(tx.sum())

    _mark("transcripts")
    area_mm2 = tissue.width_um * tissue.height_um / 1e6
    spec = {
        "major_version": 5 if id_style == "string" else 1,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": "cellsymphony synthetic breast tumour",
        "run_start_time": "2026-01-01T00:00:00Z",
        "region_name": name,
        "preservation_method": "ffpe",
        "num_cells": int(n_cells),
        "transcripts_per_cell": float(np.median(tx)),
        "transcripts_per_100um": float(tx.sum() / (area_mm2 * 1e6) * 100.0),
        "cassette_name": "synthetic",
        "slide_id": "0000000",
        "panel_design_id": "cellsymphony_synthetic",
        "panel_name": "Synthetic Tumour Microenvironment",
        "panel_organism": "Human",
        "panel_tissue_type": "Breast",
        "panel_num_targets_predesigned": len(genes),
        "panel_num_targets_custom": 0,
        "pixel_size": PIXEL_SIZE,
        "instrument_sn": "synthetic",
        "instrument_sw_version": "2.0.0.0" if id_style == "string" else "1.0.2",
        "analysis_sw_version": _SW[id_style],
        "experiment_uuid": "", "cassette_uuid": "", "roi_uuid": "", "well_uuid": "", "calibration_uuid": "",
        "z_step_size": 3.0,
        # only the files the bundle holds (10x also lists morphology.ome.tif and the Explorer's transcripts,
        # cell-feature and analysis zarr files and analysis_summary.html, which a synthetic bundle does not have)
        "images": ({"morphology_focus_filepath": "morphology_focus/morphology_focus_0000.ome.tif"}
                   if id_style == "string" else
                   {"morphology_mip_filepath": "morphology_mip.ome.tif",
                    "morphology_focus_filepath": "morphology_focus.ome.tif"}),
        "xenium_explorer_files": {"cells_zarr_filepath": "cells.zarr.zip"},
        "cellsymphony_synthetic": {"generator_version": GENERATOR_VERSION, "seed": int(seed), "n_cells": int(n_cells),
                                   "id_style": id_style, "he_mpp": he_mpp, "n_transcripts": int(n_tx),
                                   "width_um": float(tissue.width_um), "height_um": float(tissue.height_um)},
    }
    with atomic_path(path / "experiment.xenium") as tmp:
        tmp.write_text(json.dumps(spec, indent=4))


def synthetic(*, n_cells: int = 4000, seed: int = 0, id_style: Literal["string", "integer"] = "string") -> MuData:
    """The synthetic tumour section read into a MuData (the bundle is cached on disk).

    The bundle written by :func:`synthetic_xenium` is kept under ``cs.settings.cache_dir`` keyed by the
    parameters and the generator version; each call reads it again, so every call returns a fresh object.

    Parameters
    ----------
    n_cells
        Number of cells.
    seed
        Random seed.
    id_style
        Cell-id style of the bundle (see :func:`synthetic_xenium`).

    Returns
    -------
    MuData from :func:`cellsymphony.io.read_xenium` with modalities ``"rna"`` and ``"morphology"``, the H&E
    registered in ``uns["cellsymphony"]["samples"]``. The bundle folder is
    ``uns["cellsymphony"]["samples"][sample]["xenium_path"]``; its ``truth.parquet`` holds the true labels.
    """
    from ..io._read_xenium import read_xenium

    folder = synthetic_path(n_cells=n_cells, seed=seed, id_style=id_style)
    return read_xenium(folder)


def synthetic_path(*, n_cells: int = 4000, seed: int = 0, id_style: Literal["string", "integer"] = "string") -> Path:
    """Folder of the cached synthetic bundle for these parameters, generated on first use.

    Parameters
    ----------
    n_cells
        Number of cells.
    seed
        Random seed.
    id_style
        Cell-id style of the bundle.

    Returns
    -------
    Path of the bundle folder under ``cs.settings.cache_dir``.
    """
    folder = Path(settings.cache_dir) / f"synthetic_v{GENERATOR_VERSION}_n{n_cells}_s{seed}_{id_style}"
    done = folder / ".complete"
    if not done.exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            synthetic_xenium(tmp, n_cells=n_cells, seed=seed, id_style=id_style)
            (tmp / ".complete").write_text("ok\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if done.exists():  # another process finished first: keep its bundle (a reader may be using it)
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        if folder.exists():  # an incomplete leftover of an interrupted run
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
