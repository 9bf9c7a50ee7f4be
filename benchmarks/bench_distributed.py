"""Scale-out: embed_morphology / embed_expression on a dask LocalCluster with 1 and 2 workers.

Run: ``python -m benchmarks.bench_distributed [--cells 2000]``. Each cluster has worker processes with
one thread (and one torch thread) each; every run is timed after a warm-up run on the same cluster (the
workers' imports and model load are a one-off cost, reported separately). Prints a table; the single
process (same thread budget: one torch thread) is the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

from ._common import print_table

warnings.filterwarnings("ignore")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap threshold
# at 128 KiB: every large temporary array of patch decoding is then a fresh mmap (about 5x slower decoding
# than in a plain process). Raising both thresholds in the workers' environment restores the speed.
MALLOC_THRESHOLDS = {
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 64 << 20,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 128 << 20,
}


def measure(n_cells: int = 2000, workers: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Seconds per run of each function in one process and on clusters of ``workers`` workers."""
    import dask
    import torch
    from distributed import Client, LocalCluster

    import cellsymphony as cs

    cs.settings.progress = False
    cs.settings.verbosity = "WARNING"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = cs.datasets.synthetic(n_cells=n_cells, seed=0)
    import tempfile

    tmp = tempfile.mkdtemp()
    ckpt = cs.datasets.tiny_scgpt_checkpoint(f"{tmp}/scgpt", list(m["rna"].var_names))
    morph = dict(model="tiny", batch_size=32, chunk_size=256)
    jobs = {
        "embed_morphology tiny, cell mode": lambda client: cs.pp.embed_morphology(m, **morph, client=client),
        "embed_expression tiny scGPT": lambda client: cs.pp.embed_expression(m, model_dir=ckpt, client=client),
    }
    rows = []
    try:
        for name, job in jobs.items():
            job(None)
            rows.append({"what": name, "workers": 0, "seconds": _time(lambda job=job: job(None)), "warm-up s": float("nan")})
        for n in workers:
            with dask.config.set(MALLOC_THRESHOLDS), LocalCluster(n_workers=n, processes=True, threads_per_worker=1, dashboard_address=None,
                              silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
                for name, job in jobs.items():
                    warm = _time(lambda job=job: job(client))
                    rows.append({"what": name, "workers": n, "seconds": _time(lambda job=job: job(client)), "warm-up s": warm})
    finally:
        torch.set_num_threads(threads)
    for r in rows:
        r["cells/s"] = n_cells / r["seconds"]
    return rows


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: 2 workers against 1 worker (and 1 worker against one process)."""
    n = 1000 if quick else 4000
    res = measure(n)
    out = []
    for what in dict.fromkeys(r["what"] for r in res):
        by = {r["workers"]: r for r in res if r["what"] == what}
        out.append({"figure": f"{what}, 2 dask workers ({n} cells)", "value": by[2]["cells/s"], "unit": "cells/s",
                    "baseline": f"{by[1]['cells/s']:.1f} cells/s with 1 worker", "ratio": by[2]["cells/s"] / by[1]["cells/s"],
                    "note": f"speed-up on {os.cpu_count()} CPUs"})
        out.append({"figure": f"{what}, 1 dask worker ({n} cells)", "value": by[1]["cells/s"], "unit": "cells/s",
                    "baseline": f"{by[0]['cells/s']:.1f} cells/s in this process", "ratio": by[1]["cells/s"] / by[0]["cells/s"],
                    "note": "overhead of the cluster (1 = none)"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=2000)
    args = ap.parse_args()
    print_table(measure(args.cells), f"dask.distributed scale-out ({args.cells} synthetic cells, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
