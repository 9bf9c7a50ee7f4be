"""Export benchmarks: cs.io.to_spatialdata and cs.io.write_xenium_explorer on a synthetic section in memory.

Run: ``python benchmarks/bench_export.py [n_cells]`` (default 460,000). No Xenium bundle is generated: the
MuData is drawn in memory and the folder holds only what the export reads (``cells.parquet``, the two
boundary parquets with 13 vertices per polygon, and a pyramidal H&E TIFF that is opened but never
decoded). Each figure has a baseline measured in the same run: the plain parquet read of the polygons
for ``to_spatialdata``, ``DataFrame.to_csv`` of the same three columns for the Explorer CSV, and the
image's size for the peak memory of the streamed zarr write. Prints Markdown tables; nothing is asserted.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

N_VERTICES = 13  # Xenium writes 13 vertices per cell polygon (closed: 13 rows with the first repeated)


def _ids(n: int) -> np.ndarray:
    from cellsymphony.datasets._synthetic import _encode_ids

    return _encode_ids((np.arange(n, dtype=np.uint32) * 7 + (1 << 16)).astype(np.uint32))


def _polygons(path: Path, ids: np.ndarray, xy: np.ndarray, radius: float) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = np.linspace(0, 2 * np.pi, N_VERTICES)
    t[-1] = 0.0
    vx = (xy[:, :1] + radius * np.cos(t)[None]).ravel().astype(np.float32)
    vy = (xy[:, 1:] + radius * np.sin(t)[None]).ravel().astype(np.float32)
    cid = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(ids)), N_VERTICES)), pa.array(ids))
    pq.write_table(pa.table({"cell_id": cid, "vertex_x": vx, "vertex_y": vy}), path)


def _he(path: Path, side: int) -> None:
    import tifffile

    base = np.full((side, side, 3), 230, np.uint8)
    base[::64] = 120
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        levels = [base]
        while levels[-1].shape[0] > 512:
            levels.append(levels[-1][::2, ::2])
        opts = {"photometric": "rgb", "tile": (256, 256), "compression": "zlib"}
        tif.write(levels[0], subifds=len(levels) - 1, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER",
                  **opts)
        for lvl in levels[1:]:
            tif.write(lvl, subfiletype=1, **opts)


def make_section(folder: Path, n_cells: int, *, he_side: int = 4096, seed: int = 0):
    """A MuData laid out like cs.io.read_xenium's, with predictions, and a folder with what the export reads."""
    import anndata as ad
    import mudata as md
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    side = np.sqrt(n_cells) * 12.0
    xy = rng.uniform(0, side, (n_cells, 2))
    ids = _ids(n_cells)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"cell_id": ids}).to_parquet(folder / "cells.parquet", index=False)
    _polygons(folder / "cell_boundaries.parquet", ids, xy, 5.5)
    _polygons(folder / "nucleus_boundaries.parquet", ids, xy, 3.0)
    _he(folder / "bench_he_image.ome.tif", he_side)
    n_genes, per_cell = 300, 40
    x = sp.csr_matrix((rng.poisson(2, n_cells * per_cell).astype(np.float32) + 1,
                       rng.integers(0, n_genes, n_cells * per_cell), np.arange(0, n_cells * per_cell + 1, per_cell)),
                      shape=(n_cells, n_genes))
    x.sum_duplicates()
    sample = pd.Categorical(["bench"] * n_cells)
    obs = pd.DataFrame({"cell_id": ids, "cell_area": np.full(n_cells, 95.0), "sample": sample}, index=ids)
    rna = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    rna.layers["counts"] = x.copy()
    morph = ad.AnnData(X=np.zeros((n_cells, 0), np.float32), obs=pd.DataFrame({"sample": sample}, index=ids))
    morph.obsm["X_uni2"] = rng.standard_normal((n_cells, 64)).astype(np.float32)
    for a in (rna, morph):
        a.obsm["spatial"] = xy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": rna, "morphology": morph})
    mdata.obs["sample"] = sample
    classes = [f"type_{i}" for i in range(10)]
    mdata.obs["cs_pred"] = pd.Categorical(rng.choice(classes, n_cells), categories=classes)
    mdata.obsm["cs_pred_proba"] = rng.random((n_cells, 10)).astype(np.float32)
    mdata.obsm["spatial"] = xy
    s = 0.5 / 0.2125
    mdata.uns["cellsymphony"] = {"samples": {"bench": {
        "he_path": str(folder / "bench_he_image.ome.tif"), "alignment": np.diag([s, s, 1.0]), "pixel_size": 0.2125,
        "he_mpp": 0.5, "xenium_path": str(folder)}}}
    return mdata


def _stream_write(sdata, out: Path) -> tuple[float, float]:
    """Seconds and peak traced MiB of writing the image elements alone."""
    import spatialdata as sd

    images = sd.SpatialData(images=dict(sdata.images))
    tracemalloc.start()
    t0 = time.perf_counter()
    images.write(out)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return dt, peak


def measure(n_cells: int, tmp: Path) -> list[dict]:
    import pandas as pd
    import pyarrow.parquet as pq

    import cellsymphony as cs

    cs.settings.verbosity = "WARNING"
    mdata = make_section(tmp / "xenium", n_cells)
    rows = []
    t0 = time.perf_counter()
    pq.read_table(tmp / "xenium" / "cell_boundaries.parquet")
    pq.read_table(tmp / "xenium" / "nucleus_boundaries.parquet")
    base = time.perf_counter() - t0
    t0 = time.perf_counter()
    sdata = cs.io.to_spatialdata(mdata)
    dt = time.perf_counter() - t0
    rows.append({"figure": "to_spatialdata (polygons, lazy H&E)", "value": dt, "unit": "s",
                 "baseline": base, "ratio": dt / base, "note": "baseline: pyarrow read of the two boundary parquets"})
    frame = pd.DataFrame({"cell_id": mdata["rna"].obs["cell_id"].to_numpy(),
                          "group": mdata.obs["cs_pred"].astype(str).to_numpy(), "color": "#1f77b4"})
    t0 = time.perf_counter()
    frame.to_csv(tmp / "baseline.csv", index=False)
    base = time.perf_counter() - t0
    t0 = time.perf_counter()
    cs.io.write_xenium_explorer(mdata, "cs_pred", tmp / "explorer")
    dt = time.perf_counter() - t0
    rows.append({"figure": "write_xenium_explorer (1 column)", "value": dt, "unit": "s", "baseline": base,
                 "ratio": dt / base, "note": "baseline: DataFrame.to_csv of the same 3 columns"})
    he_mib = sdata.images["he_image"]["scale0"]["image"].nbytes / 2**20
    dt, peak = _stream_write(sdata, tmp / "images.zarr")
    rows.append({"figure": "zarr write of the H&E pyramid, peak traced memory", "value": peak, "unit": "MiB",
                 "baseline": he_mib, "ratio": peak / he_mib, "note": f"baseline: level-0 size; write took {dt:.1f} s"})
    return rows


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: 50,000 cells quick, 460,000 full."""
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        return measure(50_000 if quick else 460_000, Path(tmp))


def main(n_cells: int = 460_000) -> None:
    from benchmarks._common import print_table

    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        print_table(measure(n_cells, Path(tmp)), title=f"Export of a {n_cells:,}-cell section")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 460_000)
