"""Time cs.datasets.synthetic_xenium for a few sizes: seconds, CPU seconds, peak memory, bundle size.

Each size runs in a fresh subprocess so that peak memory (the child's peak resident set) is per size. Usage:
``python -m benchmarks.bench_synthetic [n_cells ...] [--out DIR] [--keep]`` (default 50000 150000 460000).
Bundles are written to ``DIR/synthetic_n<cells>`` (default: a temporary folder) and deleted after
measuring unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ._common import print_table

_CHILD = r"""
import json, logging, resource, sys, time, tifffile
from pathlib import Path
import cellsymphony as cs
n, out = int(sys.argv[1]), Path(sys.argv[2])
stages = {}  # seconds per stage, from the generator's debug records
class Stages(logging.Handler):
    def emit(self, record):
        if hasattr(record, "stage"):
            stages[record.stage] = round(record.seconds, 1)
log = logging.getLogger("cellsymphony")
log.addHandler(Stages()); log.setLevel(logging.DEBUG)
t0, c0 = time.perf_counter(), time.process_time()
cs.datasets.synthetic_xenium(out, n_cells=n, seed=0, overwrite=True)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
with tifffile.TiffFile(next(out.glob("*_he_image.ome.tif"))) as t:
    h, w = t.series[0].shape[:2]
with tifffile.TiffFile(next(out.rglob("morphology_focus*.ome.tif"))) as t:
    mh, mw = t.series[0].shape[:2]
size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
print(json.dumps({"wall": wall, "cpu": cpu, "he_mpx": h * w / 1e6, "dapi_mpx": mh * mw / 1e6,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bundle_mib": size / 2**20, "stages": stages}))
"""


def _run(n: int, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(out)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"synthetic_xenium({n}) failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(sizes: list[int], out: str | None = None, keep: bool = False) -> None:
    rows, stages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}", flush=True)
        for n in sizes:
            bundle = folder / f"synthetic_n{n}"
            r = _run(n, bundle)
            if not keep:
                shutil.rmtree(bundle, ignore_errors=True)
            rows.append({"n_cells": n, "seconds": r["wall"], "cpu_seconds": r["cpu"], "cells/s": n / r["wall"],
                         "DAPI Mpx": r["dapi_mpx"], "H&E Mpx": r["he_mpx"], "peak MiB": r["peak_mib"],
                         "bundle MiB": r["bundle_mib"]})
            stages.append({"n_cells": n, **r["stages"]})
            print(json.dumps(rows[-1]), f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print_table(rows, title="cs.datasets.synthetic_xenium (wall clock; cpu = process CPU time, all threads)")
    print_table(stages, title="seconds per stage")


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: generation speed and peak memory at two sizes (the larger against
    the smaller: speed ratio 1 = linear scaling; memory ratio against the 4x cells)."""
    sizes = (1000, 4000) if quick else (5000, 20000)
    res = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            res.append(_run(n, Path(tmp) / "bundle"))
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", nargs="*", type=int, default=[50_000, 150_000, 460_000])
    p.add_argument("--out", help="folder for the bundles (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the bundles")
    args = p.parse_args()
    main(args.sizes, args.out, args.keep)
