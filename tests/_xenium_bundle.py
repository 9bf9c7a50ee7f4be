"""Small Xenium output folders in the real 10x file layouts, written for the reader tests.

Each bundle knows its truth (cell positions, nuclei, counts, H&E pixel of each nucleus), so the tests
can check values rather than only shapes.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import io as spio
from scipy import sparse

GENES = ["EPCAM", "KRT8", "PTPRC", "CD3E", "MS4A1", "COL1A1", "PECAM1", "CD68"]
CONTROLS = [
    ("NegControlProbe_00042", "Negative Control Probe"),
    ("NegControlProbe_00035", "Negative Control Probe"),
    ("NegControlCodeword_0500", "Negative Control Codeword"),
    ("UnassignedCodeword_0001", "Unassigned Codeword"),
]
PROTEINS = [("CD45", "Protein Expression"), ("PanCK", "Protein Expression")]
PIXEL_SIZE = 0.2125
HE_MPP = 0.5
PROTEIN_SCALE = 1000.0


@dataclass
class Bundle:
    path: Path
    cell_ids: np.ndarray  # str
    centroids: np.ndarray  # (n, 2) um
    nucleus: np.ndarray  # (n, 2) um centroid of the largest nucleus, NaN where none
    n_nuclei: np.ndarray
    counts: np.ndarray  # (n, n_features) dense, in feature order
    features: pd.DataFrame  # id, name, feature_type
    alignment: np.ndarray | None  # H&E px -> morphology px
    he_shape: tuple[int, int] | None


def string_ids(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """String cell ids in Xenium's ``aaabbbcc-1`` scheme and their (prefix, suffix) uint32 pairs."""
    prefixes = np.sort(rng.choice(2**31, size=n, replace=False)).astype(np.uint32)
    table = str.maketrans("0123456789abcdef", "abcdefghijklmnop")
    ids = np.array([format(int(p), "x").translate(table).rjust(8, "a") + "-1" for p in prefixes])
    pairs = np.stack([prefixes, np.ones(n, dtype=np.uint32)], axis=1)
    return ids, pairs


def _polygon(cx: float, cy: float, r: float, n: int = 12) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return np.vstack([pts, pts[:1]])  # closed, as 10x writes them


def make_bundle(
    path: Path,
    *,
    n_cells: int = 40,
    id_style: str = "string",
    matrix: str = "h5",
    cells_ids_as_bytes: bool = False,
    protein: bool = False,
    with_he: bool = True,
    he_axes: str = "YXS",
    label_id: bool = True,
    missing_nucleus: bool = True,
    seed: int = 0,
    region_name: str = "Region 1",
    version: str | None = None,
) -> Bundle:
    rng = np.random.default_rng(seed)
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    n = n_cells
    if id_style == "string":
        ids, pairs = string_ids(n, rng)
    else:
        ids = np.arange(1, n + 1).astype(str)
        pairs = None

    side = int(np.ceil(np.sqrt(n)))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    centroids = np.stack([gx.ravel()[:n], gy.ravel()[:n]], axis=1) * 15.0 + 30.0 + rng.uniform(-2, 2, (n, 2))
    nuc_centres = centroids + rng.uniform(-1.5, 1.5, (n, 2))
    n_nuclei = np.ones(n, dtype=np.int64)
    if missing_nucleus:
        n_nuclei[1] = 0  # a cell without a nucleus
    if label_id:
        n_nuclei[2] = 2  # a binucleate cell: the second nucleus is smaller
    nucleus = np.where(n_nuclei[:, None] > 0, nuc_centres, np.nan)

    # nucleus and cell boundaries
    rows = []
    for i in range(n):
        label = 1
        if n_nuclei[i] >= 1:
            for x, y in _polygon(*nuc_centres[i], 2.5):
                rows.append((ids[i], x, y, label))
        if n_nuclei[i] == 2:
            for x, y in _polygon(nuc_centres[i][0] + 5.0, nuc_centres[i][1], 1.0):
                rows.append((ids[i], x, y, label + 1))
    nb = pd.DataFrame(rows, columns=["cell_id", "vertex_x", "vertex_y", "label_id"])
    if not label_id:
        nb = nb.drop(columns="label_id")
    cb = pd.DataFrame(
        [(ids[i], x, y) for i in range(n) for x, y in _polygon(*centroids[i], 6.0)],
        columns=["cell_id", "vertex_x", "vertex_y"],
    )
    for df in (nb, cb):
        if id_style == "integer":
            df["cell_id"] = df["cell_id"].astype(np.int32)
        df["vertex_x"] = df["vertex_x"].astype(np.float32)
        df["vertex_y"] = df["vertex_y"].astype(np.float32)
    nb.to_parquet(path / "nucleus_boundaries.parquet", index=False)
    cb.to_parquet(path / "cell_boundaries.parquet", index=False)

    # counts: genes, controls (and proteins)
    feats = [(f"ENSG{i:011d}", g, "Gene Expression") for i, g in enumerate(GENES)]
    feats += [(name, name, t) for name, t in CONTROLS]
    if protein:
        feats += [(name, name, t) for name, t in PROTEINS]
    features = pd.DataFrame(feats, columns=["id", "name", "feature_type"])
    counts = rng.poisson(2.0, size=(n, len(features))).astype(np.int64)
    kinds = features["feature_type"].to_numpy()
    counts[:, kinds != "Gene Expression"] = rng.poisson(
        0.3, size=(n, int((kinds != "Gene Expression").sum()))
    )
    if protein:
        prot = kinds == "Protein Expression"
        counts[:, prot] = rng.integers(0, 50, size=(n, int(prot.sum())))
    counts[0, :] = 0  # an empty cell

    gene = kinds == "Gene Expression"
    cells = pd.DataFrame(
        {
            "cell_id": ids.astype(np.int32) if id_style == "integer" else ids,
            "x_centroid": centroids[:, 0],
            "y_centroid": centroids[:, 1],
            "transcript_counts": counts[:, gene].sum(1).astype(np.int32),
            "control_probe_counts": counts[:, kinds == "Negative Control Probe"].sum(1).astype(np.int32),
            "control_codeword_counts": counts[:, kinds == "Negative Control Codeword"]
            .sum(1)
            .astype(np.int32),
            "unassigned_codeword_counts": counts[:, kinds == "Unassigned Codeword"].sum(1).astype(np.int32),
            "total_counts": counts[:, ~np.isin(kinds, ["Protein Expression"])].sum(1).astype(np.int32),
            "cell_area": np.full(n, np.pi * 36.0),
            "nucleus_area": np.where(n_nuclei > 0, np.pi * 6.25, 0.0),
        }
    )
    if id_style == "string" and cells_ids_as_bytes:
        cells["cell_id"] = [s.encode() for s in ids]
    cells.to_parquet(path / "cells.parquet", index=False)

    if matrix == "h5":
        write_h5(path / "cell_feature_matrix.h5", counts, features, ids, protein=protein)
    elif matrix == "mex":
        write_mex(path / "cell_feature_matrix", counts, features, ids)
    elif matrix == "zarr":
        write_zarr(path / "cell_feature_matrix.zarr.zip", counts, features, ids, pairs)
    else:
        raise ValueError(matrix)

    if version is None:
        version = "Xenium-1.0.2" if id_style == "integer" else "xenium-1.9.0.10"
    specs = {
        "run_name": "test run",
        "region_name": region_name,
        "pixel_size": PIXEL_SIZE,
        "analysis_sw_version": version,
        "num_cells": n,
    }
    (path / "experiment.xenium").write_text(json.dumps(specs, indent=4))

    alignment, he_shape = None, None
    if with_he:
        alignment, he_shape = write_he(path, nucleus, n_nuclei, axes=he_axes)
    return Bundle(path, ids, centroids, nucleus, n_nuclei, counts, features, alignment, he_shape)


def write_h5(
    path: Path, counts: np.ndarray, features: pd.DataFrame, ids: np.ndarray, *, protein: bool = False
):
    """The 10x HDF5 layout: CSC over cells, integer arrays, byte strings, root attributes."""
    import h5py

    values = counts.astype(np.float64)
    if protein:
        prot = features["feature_type"].to_numpy() == "Protein Expression"
        values[:, prot] = counts[:, prot] * PROTEIN_SCALE  # the file stores scaled integers
    m = sparse.csc_matrix(values.T)  # features x cells, CSC: one column per cell
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["software_version"] = "xenium-1.9.0.10"
        if protein:
            f.attrs["protein_scaling_factor"] = PROTEIN_SCALE
        g = f.create_group("matrix")
        g["barcodes"] = np.array([s.encode() for s in ids])
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        fg = g.create_group("features")
        fg["_all_tag_keys"] = np.array([b"genome"])
        fg["feature_type"] = np.array([s.encode() for s in features["feature_type"]])
        fg["genome"] = np.array([b"Unknown"] * len(features))
        fg["id"] = np.array([s.encode() for s in features["id"]])
        fg["name"] = np.array([s.encode() for s in features["name"]])


def write_mex(folder: Path, counts: np.ndarray, features: pd.DataFrame, ids: np.ndarray):
    folder.mkdir()
    tmp = folder / "matrix.mtx"
    spio.mmwrite(str(tmp), sparse.coo_matrix(counts.T))
    with open(tmp, "rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
        dst.write(src.read())
    tmp.unlink()
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        for _, r in features.iterrows():
            f.write(f"{r['id']}\t{r['name']}\t{r['feature_type']}\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.write("".join(f"{c}\n" for c in ids))


def write_zarr(path: Path, counts: np.ndarray, features: pd.DataFrame, ids: np.ndarray, pairs):
    """``cell_feature_matrix.zarr.zip``: group cell_features, CSR over features, cell_id prefix/suffix pairs."""
    import zarr

    m = sparse.csr_matrix(counts.T)  # rows are features
    store = zarr.storage.ZipStore(path, mode="w")
    root = zarr.open_group(store, mode="w", zarr_format=2)
    g = root.create_group(
        "cell_features",
        attributes={
            "major_version": 3,
            "minor_version": 0,
            "number_cells": int(counts.shape[0]),
            "number_features": int(counts.shape[1]),
            "feature_keys": list(features["name"]),
            "feature_ids": list(features["id"]),
            "feature_types": list(features["feature_type"]),
        },
    )
    cid = pairs if pairs is not None else ids.astype(np.uint32)
    for name, arr in (
        ("cell_id", cid),
        ("data", m.data.astype(np.uint32)),
        ("indices", m.indices.astype(np.uint32)),
        ("indptr", m.indptr.astype(np.uint32)),
    ):
        a = g.create_array(name, shape=arr.shape, dtype=arr.dtype)
        a[...] = arr
    store.close()


def he_alignment(angle_deg: float = 12.0, shift=(40.0, -25.0)) -> np.ndarray:
    """H&E pixel -> morphology pixel: rotation, scale (H&E 0.5 um/px, morphology 0.2125 um/px) and shift."""
    s = HE_MPP / PIXEL_SIZE
    t = np.deg2rad(angle_deg)
    return np.array(
        [[s * np.cos(t), -s * np.sin(t), shift[0]], [s * np.sin(t), s * np.cos(t), shift[1]], [0.0, 0.0, 1.0]]
    )


def write_he(path: Path, nucleus: np.ndarray, n_nuclei: np.ndarray, *, axes: str = "YXS"):
    """A pyramidal OME-TIFF H&E with a dark disk at each nucleus, and its alignment CSV."""
    a = he_alignment()
    inv = np.linalg.inv(a)
    has = n_nuclei > 0
    morph_px = nucleus[has] / PIXEL_SIZE
    he_px = morph_px @ inv[:2, :2].T + inv[:2, 2]
    # shift the H&E frame so that every nucleus lies inside, with a margin
    lo = he_px.min(0) - 30
    a = a @ np.array([[1, 0, lo[0]], [0, 1, lo[1]], [0, 0, 1]])
    inv = np.linalg.inv(a)
    he_px = morph_px @ inv[:2, :2].T + inv[:2, 2]
    w, h = (int(v) for v in np.ceil(he_px.max(0) + 30))
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = (235, 190, 210)  # eosin pink
    yy, xx = np.mgrid[0:h, 0:w]
    for x, y in he_px:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= 2.5**2] = (70, 40, 130)  # haematoxylin
    levels = [img, img[::2, ::2]]
    kw = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
    if axes == "CYX":
        kw["planarconfig"] = "separate"
    with tifffile.TiffWriter(path / "test_he_image.ome.tif", ome=True) as tw:
        for i, lev in enumerate(levels):
            data = np.moveaxis(lev, -1, 0) if axes == "CYX" else lev
            if i == 0:
                tw.write(
                    data,
                    subifds=1,
                    metadata={"axes": axes, "PhysicalSizeX": HE_MPP, "PhysicalSizeY": HE_MPP},
                    **kw,
                )
            else:
                tw.write(data, subfiletype=1, **kw)
    np.savetxt(path / "test_he_imagealignment.csv", a, delimiter=",")
    return a, (h, w)
