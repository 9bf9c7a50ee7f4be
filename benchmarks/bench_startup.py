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
    "cellsymphony --help": [shutil.which("cellsymphony") or "cellsymphony", "--help"],
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


if __name__ == "__main__":
    print_table(run(), "Start-up time")
