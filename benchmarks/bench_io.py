"""Reading benchmarks: cs.io.read_xenium on a synthetic bundle, and H&E patch reads against decoding every tile.

Run: ``python benchmarks/bench_io.py [n_cells]``. Prints Markdown tables; nothing is asserted.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _table(rows: list[dict], title: str) -> None:
    cols = list(rows[0])
    fmt = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    w = [max(len(c), *(len(r[i]) for r in fmt)) for i, c in enumerate(cols)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(c.ljust(x) for c, x in zip(cols, w, strict=True)) + " |")
    print("| " + " | ".join("-" * x for x in w) + " |")
    for r in fmt:
        print("| " + " | ".join(v.ljust(x) for v, x in zip(r, w, strict=True)) + " |")


def main(n_cells: int = 5000) -> None:
    warnings.simplefilter("ignore")
    import cellsymphony as cs
    from cellsymphony._registration import um_to_he_px

    cs.settings.verbosity = "WARNING"
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for style in ("string", "integer"):
            path = Path(tmp) / style
            t0 = time.perf_counter()
            cs.datasets.synthetic_xenium(
                path, n_cells=n_cells, id_style=style, transcripts=False, reference_cells=0
            )
            gen = time.perf_counter() - t0
            t0 = time.perf_counter()
            mdata = cs.io.read_xenium(path)
            read = time.perf_counter() - t0
            t0 = time.perf_counter()
            cs.io.write(mdata, Path(tmp) / f"{style}.h5mu")
            write = time.perf_counter() - t0
            rows.append(
                {
                    "id style": style,
                    "cells": mdata.n_obs,
                    "genes": mdata["rna"].n_vars,
                    "generate s": gen,
                    "read_xenium s": read,
                    "write h5mu s": write,
                }
            )
        _table(rows, f"read_xenium on the synthetic bundle ({n_cells} cells)")

        reg = mdata.uns["cellsymphony"]["samples"][mdata.obs["sample"].cat.categories[0]]
        px = um_to_he_px(mdata["morphology"].obsm["nucleus_centroid"], reg["alignment"], reg["pixel_size"])
        order = np.lexsort((px[:, 0], px[:, 1]))  # row-major order, as a patch extractor would visit cells
        rows = []
        for cache in (0, 16, 256):
            he = cs.io.read_he(reg["he_path"], cache_tiles=cache)
            level = 0
            th, tw = he.tile_shape(level)
            h, w = he.shapes[level]
            n_tiles = -(-h // th) * -(-w // tw)
            t0 = time.perf_counter()
            for x, y in px[order]:
                he.read_region(int(x) - 112, int(y) - 112, 224, 224, level=level)
            dt = time.perf_counter() - t0
            rows.append(
                {
                    "cache_tiles": cache,
                    "patches": len(px),
                    "seconds": dt,
                    "patches/s": len(px) / dt,
                    "tiles decoded": he.tiles_decoded,
                    "tiles in level": n_tiles,
                    "decodes per tile": he.tiles_decoded / n_tiles,
                }
            )
            he.close()
        he = cs.io.read_he(reg["he_path"], cache_tiles=0)
        t0 = time.perf_counter()
        for ty in range(0, h, th):
            he.read_region(0, ty, w, th, level=0)
        once = time.perf_counter() - t0
        rows.append(
            {
                "cache_tiles": "decode every tile once",
                "patches": "-",
                "seconds": once,
                "patches/s": "-",
                "tiles decoded": he.tiles_decoded,
                "tiles in level": n_tiles,
                "decodes per tile": 1.0,
            }
        )
        _table(
            rows,
            f"224 x 224 H&E patches at level 0 ({he.shapes[0][1]} x {he.shapes[0][0]} px, "
            f"{tw} x {th} tiles, {reg['he_mpp']} um/px)",
        )
        print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: read_xenium against reading the count matrix alone
    (scanpy.read_10x_h5, the floor), and level-0 patch reads with the tile cache against none."""
    warnings.simplefilter("ignore")
    import scanpy as sc

    import cellsymphony as cs
    from cellsymphony._registration import um_to_he_px

    n = 2000 if quick else 20000
    folder = cs.datasets.synthetic_path(n_cells=n, seed=0)
    t0 = time.perf_counter()
    mdata = cs.io.read_xenium(folder)
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc.read_10x_h5(Path(folder) / "cell_feature_matrix.h5")
    floor = time.perf_counter() - t0
    rows = [{"figure": f"cs.io.read_xenium ({n} cells: counts, cells, registry)", "value": n / read, "unit": "cells/s",
             "baseline": f"{n / floor:.0f} cells/s scanpy.read_10x_h5 of the counts alone", "ratio": floor / read,
             "note": "fraction of the floor speed"}]
    reg = mdata.uns["cellsymphony"]["samples"][mdata.obs["sample"].cat.categories[0]]
    px = um_to_he_px(mdata["morphology"].obsm["nucleus_centroid"], reg["alignment"], reg["pixel_size"])
    px = px[np.lexsort((px[:, 0], px[:, 1]))][: 500 if quick else None]
    cps = {}
    for cache in (0, 256):
        he = cs.io.read_he(reg["he_path"], cache_tiles=cache)
        t0 = time.perf_counter()
        for x, y in px:
            he.read_region(int(x) - 112, int(y) - 112, 224, 224, level=0)
        cps[cache] = len(px) / (time.perf_counter() - t0)
        he.close()
    rows.append({"figure": "H&E 224 px reads at level 0, 256-tile cache", "value": cps[256], "unit": "patches/s",
                 "baseline": f"{cps[0]:.0f} patches/s without a cache", "ratio": cps[256] / cps[0], "note": "speed-up"})
    return rows


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
