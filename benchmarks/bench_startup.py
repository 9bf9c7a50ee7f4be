"""Start-up time: ``import cellsymphony`` and ``cellsymphony --help`` against importing the full stack.

Run: ``python -m benchmarks.bench_startup``. Each figure is the median of several fresh interpreter
starts; the baseline is importing torch, timm, scanpy, squidpy and spatialdata in the same run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from ._common import print_table, timeit

CASES = {
    "python (empty)": [sys.executable, "-c", "pass"],
    "import cellsymphony": [sys.executable, "-c", "import cellsymphony"],
    # the console script when installed on PATH, else the same entry point through python -m
    "cellsymphony --help": (
        [shutil.which("cellsymphony"), "--help"] if shutil.which("cellsymphony") else [sys.executable, "-m", "cellsymphony", "--help"]
    ),
    "full stack (baseline)": [
        sys.executable,
        "-c",
        "import torch, timm, scanpy, squidpy, spatialdata",
    ],
}


def run(repeat: int = 3) -> list[dict]:
    """Time each case; return rows with seconds and the ratio to the full-stack import."""
    secs = {
        name: timeit(lambda cmd=cmd: subprocess.run(cmd, check=True, capture_output=True), repeat=repeat)
        for name, cmd in CASES.items()
    }
    base = secs["full stack (baseline)"]
    return [{"case": k, "seconds": v, "ratio to full stack": v / base} for k, v in secs.items()]


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: start-up against importing the full stack."""
    rows = run(repeat=2 if quick else 5)
    base = next(r for r in rows if r["case"] == "full stack (baseline)")["seconds"]
    return [
        {"figure": f"start-up: {r['case']}", "value": r["seconds"], "unit": "s",
         "baseline": f"{base:.2f} s import torch, timm, scanpy, squidpy, spatialdata", "ratio": r["seconds"] / base,
         "note": "lower is better"}
        for r in rows if r["case"] in ("import cellsymphony", "cellsymphony --help")
    ]


if __name__ == "__main__":
    print_table(run(), "Start-up time")
