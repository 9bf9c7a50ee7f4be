"""``cs.datasets.synthetic_xenium``: a realistic synthetic Xenium bundle with its H&E, and ``cs.datasets.synthetic``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._settings import logger, settings
from .._utils import atomic_path

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

PIXEL_SIZE = 0.2125  # um per Xenium morphology pixel
GENERATOR_VERSION = 4  # bump when the generated data change, to invalidate caches
LAST_TIMINGS: dict[str, float] = {}  # seconds per stage of the last synthetic_xenium call (for benchmarks)
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
def _write_h5(path: Path, counts, cell_ids, feat_names, feat_ids, feat_types, sw: str) -> None:
    import h5py

    csc = counts.tocsr()  # cells x features CSR has the arrays of 10x's features x cells CSC
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["chemistry_description"] = "Xenium"
        f.attrs["filetype"] = "matrix"
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["software_version"] = sw
        f.attrs["version"] = np.int64(2)
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array([str(c).encode() for c in cell_ids]))
        m.create_dataset("data", data=csc.data.astype(np.int32), compression="gzip", compression_opts=1)
        m.create_dataset("indices", data=csc.indices.astype(np.int64), compression="gzip", compression_opts=1)
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([len(feat_names), len(cell_ids)], dtype=np.int32))
        ft = m.create_group("features")
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        ft.create_dataset("feature_type", data=np.array([t.encode() for t in feat_types]))
        ft.create_dataset("genome", data=np.array([b"Unknown"] * len(feat_names)))
        ft.create_dataset("id", data=np.array([i.encode() for i in feat_ids]))
        ft.create_dataset("name", data=np.array([n.encode() for n in feat_names]))


def _ome_meta(axes: str, mpp: float, channel: str | None = None) -> dict:
    meta = {"axes": axes, "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm"}
    if channel:
        meta["Channel"] = {"Name": [channel]}
    return meta


def _write_pyramid(path: Path, levels: list[np.ndarray], mpp: float, *, rgb: bool, compression: str,
                   channel: str | None = None, tile: int = 512) -> None:
    import tifffile

    kw = {"photometric": "rgb" if rgb else "minisblack", "tile": (tile, tile), "compression": compression,
          "maxworkers": 2}
    if compression == "jpeg":
        kw["compressionargs"] = {"level": 90}
    elif compression == "zlib":
        kw["compressionargs"] = {"level": 1}
    res = 1e4 / mpp  # pixels per cm
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, resolution=(res, res), resolutionunit="CENTIMETER",
                 metadata=_ome_meta("YXS" if rgb else "YX", mpp, channel), **kw)
        for k, lvl in enumerate(levels[1:], start=1):
            r = res / 2**k
            tw.write(lvl, subfiletype=1, resolution=(r, r), resolutionunit="CENTIMETER", metadata=None, **kw)


def _write_cells_zarr(path: Path, nuc, cell, ids_prefix, id_style, summary: pd.DataFrame, polys: dict,
                      n_cells: int) -> None:
    import zarr

    with atomic_path(path) as tmp:
        tmp.unlink()
        store = zarr.storage.ZipStore(tmp, mode="w")
        root = zarr.open_group(store=store, mode="w", zarr_format=2,
                               attributes={"major_version": 5, "minor_version": 0, "number_cells": int(n_cells),
                                           "segmentation_methods": ["Segmented by nucleus expansion of 5.0µm"]})
        if id_style == "string":
            cid = np.stack([ids_prefix.astype(np.uint32), np.ones(n_cells, np.uint32)], axis=1)
        else:
            cid = ids_prefix.astype(np.uint32)
        root.create_array("cell_id", data=cid, chunks=(min(n_cells, 100_000),) + cid.shape[1:])
        masks = root.create_group("masks", attributes={"0": "nucleus", "1": "cell"})
        from numcodecs import Blosc

        lz4 = Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE)
        for k, m in (("0", nuc), ("1", cell)):
            masks.create_array(k, data=m, chunks=(min(4096, m.shape[0]), min(4096, m.shape[1])), compressors=lz4)
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
        store.close()


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


def _transcripts(counts, ctrl, ctrl_names, genes, cells, ids, id_style, nuc_area, cell_area, width, height,
                 rng):
    """One row per detected molecule: the matrix counts (qv >= 20), plus low-quality and unassigned ones."""
    import scipy.sparse as sp

    allc = sp.hstack([counts, ctrl], format="csr")
    names = np.asarray(list(genes) + list(ctrl_names), dtype=object)
    n_per_cell = np.diff(allc.indptr)
    cell_of = np.repeat(np.arange(counts.shape[0]), n_per_cell)
    feat = np.repeat(allc.indices, allc.data)
    cell_of = np.repeat(cell_of, allc.data)
    m = len(feat)
    nuclear = rng.random(m) < 0.38
    r_n = np.sqrt(nuc_area / np.pi)[cell_of]
    r_c = np.sqrt(cell_area / np.pi)[cell_of]
    rr = np.where(nuclear, r_n * np.sqrt(rng.random(m)) * 0.95,
                  r_n + (np.maximum(r_c - r_n, 0.3)) * np.sqrt(rng.random(m)))
    ang = rng.uniform(0, 2 * np.pi, m)
    x = cells.x.to_numpy()[cell_of] + rr * np.cos(ang)
    y = cells.y.to_numpy()[cell_of] + rr * np.sin(ang)
    qv = np.minimum(40.0, 20.0 + rng.exponential(9.0, m))
    # extra molecules: low quality (not in the matrix) and unassigned (outside cells)
    k_low, k_un = int(0.07 * m), int(0.05 * m)
    fx = rng.integers(0, len(genes), k_low + k_un)
    low_cell = rng.integers(0, counts.shape[0], k_low)
    x_extra = np.concatenate([cells.x.to_numpy()[low_cell] + rng.normal(0, 3, k_low), rng.uniform(0, width, k_un)])
    y_extra = np.concatenate([cells.y.to_numpy()[low_cell] + rng.normal(0, 3, k_low), rng.uniform(0, height, k_un)])
    import pyarrow as pa

    total = m + k_low + k_un
    cell_code = np.concatenate([cell_of, low_cell, np.full(k_un, len(ids))])
    fx_all = np.clip(np.concatenate([x, x_extra]), 0, width).astype(np.float32)
    fy_all = np.clip(np.concatenate([y, y_extra]), 0, height).astype(np.float32)
    fov_codes, fov_labels = _fov_codes(fx_all, fy_all)
    order = np.lexsort((fy_all, fov_codes))
    cols = {
        "transcript_id": pa.array(np.arange(total, dtype=np.uint64) + np.uint64(281474976710656)),
        "cell_id": _ids_array(ids, cell_code[order], id_style),
        "overlaps_nucleus": pa.array(np.concatenate([nuclear, np.zeros(k_low + k_un, bool)]).astype(np.uint8)[order]),
        "feature_name": _dict_strings(np.concatenate([feat, fx])[order], names),
        "x_location": pa.array(fx_all[order]),
        "y_location": pa.array(fy_all[order]),
        "z_location": pa.array(rng.uniform(8, 22, total).astype(np.float32)),
        "qv": pa.array(np.concatenate([qv, rng.uniform(5, 19.9, k_low), rng.uniform(20, 40, k_un)])
                       .astype(np.float32)[order]),
        "fov_name": _dict_strings(fov_codes[order], fov_labels),
        "nucleus_distance": pa.array(np.concatenate([np.where(nuclear, 0.0, rr - r_n), rng.uniform(0, 5, k_low),
                                                     rng.uniform(5, 30, k_un)]).astype(np.float32)[order]),
    }
    return pa.table(cols)


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
    r = np.clip((y // 560).astype(int), 0, 25)
    c = np.clip((x // 560).astype(int), 0, 98) + 1
    uniq, inv = np.unique(r * 100 + c, return_inverse=True)
    return inv, [f"{chr(65 + u // 100)}{u % 100}" for u in uniq]


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
    if n_cells < 1:
        raise ValueError(f"n_cells must be positive, got {n_cells}")
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
    overwrite: bool = False,
) -> Path:
    """Write a synthetic Xenium output folder of a breast tumour section, with its H&E.

    The folder has the 10x Xenium file layout (v2.0 for string ids, v1.0 for integer ids) and can be read by
    :func:`cellsymphony.io.read_xenium` and by ``spatialdata_io.xenium``. See the docs page *Synthetic tissue*
    for the tissue model and how its realism is measured.

    Parameters
    ----------
    path
        Output folder (created; must be empty or absent unless ``overwrite``).
    n_cells
        Number of cells of the section.
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
    overwrite
        Replace an existing non-empty folder.

    Returns
    -------
    The folder path. It holds ``experiment.xenium``, ``cells.parquet``, ``cells.zarr.zip``,
    ``cell_feature_matrix.h5``, ``cell_boundaries.parquet``, ``nucleus_boundaries.parquet``,
    ``transcripts.parquet``, the DAPI morphology image, ``<name>_he_image.ome.tif``,
    ``<name>_he_imagealignment.csv``, ``truth.parquet`` (per cell: true type, fine type, compartment,
    rendered nucleus area / elongation / darkness, H&E nucleus centroid), ``he_nuclei.csv`` (a simulated
    H&E nucleus classifier's output) and ``reference.h5ad``.
    """
    from . import _panel, _render, _tissue

    if id_style not in ("string", "integer"):
        raise ValueError(f"id_style must be 'string' or 'integer', got {id_style!r}")
    if n_cells < 10:
        raise ValueError(f"n_cells must be at least 10, got {n_cells}")
    if not 0.1 <= he_mpp <= 2.0:
        raise ValueError(f"he_mpp must be between 0.1 and 2 um per pixel, got {he_mpp}")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"{path} exists and is not empty; pass overwrite=True or choose another folder")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    LAST_TIMINGS.clear()
    last = [t0]

    cpu = [time.process_time()]

    def _mark(stage):
        now, now_cpu = time.perf_counter(), time.process_time()
        LAST_TIMINGS[stage] = now - last[0]
        LAST_TIMINGS[stage + "_cpu"] = now_cpu - cpu[0]
        last[0], cpu[0] = now, now_cpu

    rng = np.random.default_rng(seed)
    genes, profiles, theta = _model(seed)

    _mark('setup')
    # ---- tissue and cell order (Xenium sorts cells by id, which follows the imaging order)
    tissue = _tissue.make_tissue(n_cells, rng)
    c = tissue.cells
    order = np.lexsort((c.x.to_numpy(), (c.y.to_numpy() // 400).astype(int)))
    tissue.cells = c = c.iloc[order].reset_index(drop=True)
    if id_style == "string":
        prefix = np.sort(rng.choice(np.arange(1 << 16, 1 << 26), size=n_cells, replace=False)).astype(np.uint32)
        ids = _encode_ids(prefix)
    else:
        prefix = np.arange(1, n_cells + 1, dtype=np.uint32)
        ids = prefix.astype(np.int32)

    _mark('tissue')
    # ---- segmentation at Xenium resolution
    nuc, cell = _render.morphology_masks(tissue, PIXEL_SIZE)
    nuc_area = _render.label_areas(nuc, n_cells, PIXEL_SIZE)
    cell_area = _render.label_areas(cell, n_cells, PIXEL_SIZE)
    cell_cent, tiny = _render.mask_centroids(cell, n_cells, PIXEL_SIZE)
    cell_cent[tiny] = c[["x", "y"]].to_numpy()[tiny]
    nvx, nvy = _tissue.nucleus_polygons(c)
    cvx, cvy = _tissue.cell_polygons(c)

    _mark('masks')
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
    import scipy.sparse as sp

    ctrl = sp.csr_matrix(rng.poisson(rate[None, :] * (size[:, None] / 100.0)).astype(np.int32))
    ct = np.asarray(ctrl_types)
    tx = np.asarray(counts.sum(axis=1)).ravel()

    def ctrl_sum(kind):
        cols = np.flatnonzero(ct == kind)
        return np.asarray(ctrl[:, cols].sum(axis=1)).ravel().astype(np.int32)

    _mark('expression')
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
        cells_df["segmentation_method"] = pd.Categorical(["Segmented by nucleus expansion of 5.0µm"] * n_cells)
    with atomic_path(path / "cells.parquet") as tmp:
        cells_df.to_parquet(tmp, index=False)

    feat_names = list(genes) + list(ctrl_names)
    feat_ids = _gene_ids(genes) + list(ctrl_names)
    feat_types = ["Gene Expression"] * len(genes) + list(ctrl_types)
    _write_h5(path / "cell_feature_matrix.h5", sp.hstack([counts, ctrl], format="csr"), ids, feat_names,
              feat_ids, feat_types, _SW[id_style])

    import pyarrow.parquet as pq

    for fname, (vx, vy) in (("nucleus_boundaries.parquet", (nvx, nvy)), ("cell_boundaries.parquet", (cvx, cvy))):
        with atomic_path(path / fname) as tmp:
            pq.write_table(_boundaries(ids, vx, vy, id_style), tmp, compression="zstd")

    summary = pd.DataFrame({
        "cell_centroid_x": cell_cent[:, 0], "cell_centroid_y": cell_cent[:, 1], "cell_area": cell_area,
        "nucleus_centroid_x": nvx.mean(axis=1), "nucleus_centroid_y": nvy.mean(axis=1), "nucleus_area": nuc_area,
        "z_level": np.full(n_cells, 1.0), "nucleus_count": np.ones(n_cells),
    })
    _write_cells_zarr(path / "cells.zarr.zip", nuc, cell, prefix, id_style, summary,
                      {"0": (nvx, nvy), "1": (cvx, cvy)}, n_cells)

    _mark('tables_zarr')
    # ---- DAPI morphology image
    dapi = _render.dapi_image(nuc, 900.0 + 1300.0 * c.dark.to_numpy(), rng)
    del cell
    levels = _render.pyramid(dapi, min_size=1024)
    if id_style == "string":
        (path / "morphology_focus").mkdir(exist_ok=True)
        _write_pyramid(path / "morphology_focus" / "morphology_focus_0000.ome.tif", levels, PIXEL_SIZE, rgb=False,
                       compression="zlib", channel="DAPI", tile=1024)
    else:
        _write_pyramid(path / "morphology_focus.ome.tif", levels, PIXEL_SIZE, rgb=False, compression="zlib",
                       channel="DAPI", tile=1024)
        try:
            os.link(path / "morphology_focus.ome.tif", path / "morphology_mip.ome.tif")
        except OSError:
            shutil.copyfile(path / "morphology_focus.ome.tif", path / "morphology_mip.ome.tif")
    del dapi, levels, nuc

    _mark('dapi')
    # ---- H&E: similarity transform H&E pixel -> morphology pixel (rotation, scale, shift)
    ang = np.deg2rad(rng.uniform(4.0, 11.0) * rng.choice([-1, 1]))
    s = he_mpp / PIXEL_SIZE
    lin = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    corners = np.array([[0, 0], [tissue.width_um, 0], [0, tissue.height_um], [tissue.width_um, tissue.height_um]])
    he_c = (np.linalg.inv(lin) @ (corners / PIXEL_SIZE).T).T
    margin = rng.uniform(60, 160, 2)
    offset = he_c.min(axis=0) - margin
    align = np.eye(3)
    align[:2, :2] = lin
    align[:2, 2] = lin @ offset
    he_shape = tuple(int(v) for v in np.ceil(he_c.max(axis=0) - offset + margin[::-1])[::-1])
    he2um = np.diag([PIXEL_SIZE, PIXEL_SIZE, 1.0]) @ align
    renderer = _render.HERenderer(tissue, he2um, he_shape, rng)
    renderer.render_nuclei()
    he = renderer.render()
    truth_he = renderer.nucleus_truth(he_mpp, n_cells)
    del renderer
    _write_pyramid(path / f"{name}_he_image.ome.tif", _render.pyramid(he), he_mpp, rgb=True, compression="jpeg")
    del he
    with atomic_path(path / f"{name}_he_imagealignment.csv") as tmp:
        np.savetxt(tmp, align, delimiter=",", fmt="%.10g")

    _mark('he')
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
    if reference_cells:
        ref = _reference(genes, profiles, theta, reference_cells, np.random.default_rng([seed, 11]))
        with atomic_path(path / "reference.h5ad") as tmp:
            ref.write_h5ad(tmp)

    _mark('truth_reference')
    if transcripts:
        tr = _transcripts(counts, ctrl, ctrl_names, genes, c, ids, id_style, nuc_area, cell_area,
                          tissue.width_um, tissue.height_um, rng)
        with atomic_path(path / "transcripts.parquet") as tmp:
            pq.write_table(tr, tmp, compression="zstd")
        n_tx = tr.num_rows
        del tr
    else:
        n_tx = int(tx.sum())

    _mark('transcripts')
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
        "images": ({"morphology_filepath": "morphology.ome.tif",
                    "morphology_focus_filepath": "morphology_focus/morphology_focus_0000.ome.tif"}
                   if id_style == "string" else
                   {"morphology_filepath": "morphology.ome.tif", "morphology_mip_filepath": "morphology_mip.ome.tif",
                    "morphology_focus_filepath": "morphology_focus.ome.tif"}),
        "xenium_explorer_files": {"transcripts_zarr_filepath": "transcripts.zarr.zip",
                                  "cells_zarr_filepath": "cells.zarr.zip",
                                  "cell_features_zarr_filepath": "cell_feature_matrix.zarr.zip",
                                  "analysis_zarr_filepath": "analysis.zarr.zip",
                                  "analysis_summary_filepath": "analysis_summary.html"},
        "cellsymphony_synthetic": {"generator_version": GENERATOR_VERSION, "seed": int(seed), "n_cells": int(n_cells),
                                   "id_style": id_style, "he_mpp": he_mpp, "n_transcripts": int(n_tx),
                                   "width_um": float(tissue.width_um), "height_um": float(tissue.height_um)},
    }
    with atomic_path(path / "experiment.xenium") as tmp:
        tmp.write_text(json.dumps(spec, indent=4))
    for f in path.rglob("*"):  # temporary files of atomic writes are private (0600); the bundle is not
        if f.is_file():
            f.chmod(0o644)
    logger.info("wrote a synthetic Xenium bundle of %d cells to %s in %.1f s", n_cells, path, time.perf_counter() - t0)
    return path


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
    from ..io import read_xenium

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
