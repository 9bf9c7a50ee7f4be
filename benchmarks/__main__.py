"""Every figure of the project in one table: ``python -m benchmarks [--quick | --full] [--only NAME ...]``.

Each benchmark script has a ``suite(quick: bool) -> list[dict]`` entry that measures its figures and the
baseline of each in the same run; rows are ``figure, value, unit, baseline, ratio`` (and a note saying
how to read the ratio). ``--quick`` (the default) uses small sizes and takes a few minutes on two CPU
cores; ``--full`` uses the sizes quoted in the docs. A suite that fails prints its error as a row and the
others still run. The scripts also run on their own and print their detailed tables.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import sys
import time
import traceback
import warnings

from ._common import StageSeconds, print_table

# name -> (module, what it measures); in the order of the table
SUITES = {
    "startup": ("bench_startup", "import time vs the full stack"),
    "morphology": ("bench_morphology", "patch extraction vs tile-decode floor, cell vs tile mode, peak memory"),
    "scgpt": ("bench_scgpt", "scGPT bucketed vs official batching"),
    "classifier": ("bench_classifier", "classifier training epochs/s"),
    "contrastive": ("bench_contrastive", "contrastive alignment epochs/s"),
    "distributed": ("bench_distributed", "1 vs 2 dask workers"),
    "io": ("bench_io", "read_xenium vs reading the counts alone, H&E tile cache"),
    "labels": ("bench_labels", "nucleus-label transfer scaling"),
    "synthetic": ("bench_synthetic", "synthetic bundle generation speed and memory at two sizes"),
    "registration": ("bench_registration", "automatic H&E registration error, time and memory"),
    "export": ("bench_export", "to_spatialdata, Xenium Explorer CSV and streamed zarr write vs plain reads/writes"),
}


def machine() -> str:
    """One line about the machine the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except Exception:  # noqa: BLE001
        gpu, tv = "torch not importable", "-"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{os.cpu_count()} x {cpu}; {gpu}; Python {platform.python_version()}, torch {tv}; "
            f"load average {load} at start")


def _contrastive_adapter(mod, quick: bool) -> list[dict]:
    """Rows from bench_contrastive's ``make`` + ``ContrastiveAligner`` when the script has no ``suite``."""
    import numpy as np

    from cellsymphony.models.contrastive import ContrastiveAligner

    n = 5000 if quick else 100_000
    ContrastiveAligner().fit(mod.make(512, 16, 16), epochs=1)  # warm-up
    res = {}
    for dims in ((512, 512), (512, 1536)):
        with StageSeconds() as timed:
            ContrastiveAligner().fit(mod.make(n, *dims), epochs=2)
        res[dims] = 1.0 / float(np.median(timed.seconds["contrastive epoch"]))
    base = res[(512, 512)]
    return [{"figure": f"contrastive alignment, gene {g} / morph {m} dims ({n} cells)", "value": v, "unit": "epochs/s",
             "baseline": f"{base:.3f} epochs/s at 512 / 512", "ratio": v / base, "note": ""}
            for (g, m), v in res.items()]


def run_suite(name: str, quick: bool) -> list[dict]:
    module_name, what = SUITES[name]
    try:
        mod = importlib.import_module(f".{module_name}", __package__)
    except ModuleNotFoundError as err:
        return [{"figure": what, "value": float("nan"), "unit": "", "baseline": "", "ratio": float("nan"),
                 "note": f"not on this branch ({err.name})"}]
    # the scripts' own detailed tables go to stderr: stdout has the one table
    with contextlib.redirect_stdout(sys.stderr):
        if hasattr(mod, "suite"):
            return mod.suite(quick)
        if name == "contrastive":
            return _contrastive_adapter(mod, quick)
    raise RuntimeError(f"benchmarks/{module_name}.py has no suite(quick) entry")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=True, help="small sizes (default)")
    size.add_argument("--full", dest="quick", action="store_false", help="the sizes quoted in the docs")
    ap.add_argument("--only", nargs="*", choices=list(SUITES), default=None, help="run only these suites")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import cellsymphony as cs

    cs.settings.progress = False
    cs.settings.verbosity = "WARNING"
    info = machine()
    print(f"# cellsymphony {cs.__version__} benchmarks ({'quick' if args.quick else 'full'}): {info}", flush=True)
    rows: list[dict] = []
    for name in args.only or list(SUITES):
        t = time.perf_counter()
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            got = run_suite(name, args.quick)
        except Exception as err:  # noqa: BLE001 - one failing suite must not hide the others
            traceback.print_exc()
            got = [{"figure": SUITES[name][1], "value": float("nan"), "unit": "", "baseline": "",
                    "ratio": float("nan"), "note": f"error: {type(err).__name__}: {err}"[:120]}]
        print(f"    {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        rows.extend({"suite": name, **r} for r in got)
    cols = ("suite", "figure", "value", "unit", "baseline", "ratio", "note")
    print_table([{c: r.get(c, "") for c in cols} for r in rows], "cellsymphony figures (ratio = value / baseline unless noted)")
    return rows


if __name__ == "__main__":
    main()
