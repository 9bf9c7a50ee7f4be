"""Time cs.datasets.synthetic_xenium for a few sizes: seconds, cells/s, H&E megapixels, peak memory.

Each size runs in a fresh subprocess so that peak memory is per size. Usage:
``python -m benchmarks.bench_synthetic [n_cells ...]`` (default 5000 20000 50000).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from ._common import print_table

_CHILD = r"""
import json, resource, sys, time, tifffile
from pathlib import Path
import cellsymphony as cs
from cellsymphony.datasets import _synthetic as S
n, out = int(sys.argv[1]), Path(sys.argv[2])
t0, c0 = time.perf_counter(), time.process_time()
cs.datasets.synthetic_xenium(out, n_cells=n, seed=0)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
with tifffile.TiffFile(next(out.glob("*_he_image.ome.tif"))) as t:
    h, w = t.series[0].shape[:2]
size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
stages = {k: round(v, 1) for k, v in S.LAST_TIMINGS.items() if not k.endswith("_cpu")}
print(json.dumps({"wall": wall, "cpu": cpu, "he_mpx": h * w / 1e6,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bundle_mib": size / 2**20, "stages": stages}))
"""


def main(sizes: list[int]) -> None:
    rows, stages = [], []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([sys.executable, "-c", _CHILD, str(n), f"{tmp}/bundle"], capture_output=True,
                                 text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"n_cells": n, "seconds": r["wall"], "cpu_seconds": r["cpu"], "cells/s": n / r["wall"],
                     "H&E Mpx": r["he_mpx"], "peak MiB": r["peak_mib"], "bundle MiB": r["bundle_mib"]})
        stages.append({"n_cells": n, **r["stages"]})
    print_table(rows, title="cs.datasets.synthetic_xenium (wall clock; cpu = process CPU time)")
    print_table(stages, title="seconds per stage")


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: generation speed and peak memory at two sizes (the larger against
    the smaller: speed ratio 1 = linear scaling; memory ratio against the 4x cells)."""
    sizes = (1000, 4000) if quick else (5000, 20000)
    res = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", _CHILD, str(n), f"{tmp}/bundle"], capture_output=True,
                                 text=True, check=True)
        res.append(json.loads(out.stdout.strip().splitlines()[-1]))
    (a, b), (na, nb) = res, sizes
    return [
        {"figure": f"synthetic_xenium generation, {nb} cells", "value": nb / b["wall"], "unit": "cells/s",
         "baseline": f"{na / a['wall']:.0f} cells/s at {na} cells", "ratio": (nb / b["wall"]) / (na / a["wall"]),
         "note": "1 = linear scaling"},
        {"figure": f"synthetic_xenium peak memory, {nb} cells", "value": b["peak_mib"], "unit": "MiB",
         "baseline": f"{a['peak_mib']:.0f} MiB at {na} cells", "ratio": b["peak_mib"] / a["peak_mib"],
         "note": f"{nb // na}x the cells"},
    ]


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [5000, 20000, 50000])
