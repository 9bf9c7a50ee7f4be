"""Whole sections: every stage of ``cellsymphony run`` on synthetic sections of 50k, 150k and 460k cells.

Run: ``python -m benchmarks.bench_section [--sizes 50000 150000 460000] [--stages ...] [--bundle-dir DIR]``.
The Benchmarks page's table: ``--sizes 50k 150k``, then ``--sizes 460k --subset classifier_predict=50000``
(it saved a few minutes on the shared machine; the full predictions are about 4 min of one core there).

Each size runs in a fresh process, one stage after the other on the same MuData, as ``cellsymphony run``
does (on CPU): ``read_xenium``; morphology with the ``tiny`` ViT in tile mode and the ``handcrafted``
encoder (cell mode, the representation used downstream, as in the demo); the tiny scGPT
(``cs.datasets.tiny_scgpt_checkpoint``); SingleR against the bundle's ``reference.h5ad``; the H&E
nucleus-label transfer (``he_nuclei.csv``); the dual classifier at the paper's sizes (d_model 512, 6 layers,
8 heads) for one epoch, then its predictions for every cell; the contrastive alignment, 2 epochs; niches,
enrichment and spatial coherence; the ``.h5mu`` write; the report.

For every stage the table gives wall-clock seconds, the peak resident memory of the process during the
stage (``VmHWM`` of ``/proc/self/status``, reset before each stage through ``/proc/self/clear_refs``; a
sampling thread where that is not allowed) and, between consecutive sizes, the scaling exponent
``log(t2 / t1) / log(n2 / n1)`` of the wall-clock and of the process's CPU seconds (1 is linear; the
baseline of each exponent is the same stage at the smaller size, measured by this script). The last row
is the peak of the whole run. Torch, BLAS and OpenMP run one thread (``--threads``): on a shared 2-core
machine multi-threaded torch ops spin-wait and slow down many-fold whenever another job runs, while the
CPU seconds of one thread do not depend on the other jobs. Stages too slow for a whole section on a CPU
(the classifier's training epoch at the paper's size, the per-cell handcrafted features) are timed on a
random subset of cells (``--subset``) and extrapolated linearly to the section; such rows say so, and
their exponent is linear by construction, so none is given.

Bundles are made with ``cs.datasets.synthetic_xenium`` in ``--bundle-dir`` (``synth50k``, ``synth150k``,
...) when absent, each in its own process; ``--bundle SIZE=PATH`` names an existing one (a 460k bundle is
looked for at ``/tmp/synth460k`` too). Results of each size are kept in ``--work-dir``/``n<size>/results.json``
and merged when parts are rerun with ``--stages``; a run whose first stage is not ``read_xenium`` starts
from the ``.h5mu`` that an earlier run of that size wrote. ``--table`` prints the table of the kept results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

STAGES = {
    "read_xenium": "cs.io.read_xenium",
    "morph_handcrafted": "morphology, handcrafted, cell mode",
    "morph_tiny_tile": "morphology, tiny ViT, tile mode",
    "scgpt": "expression, tiny scGPT",
    "singler": "SingleR labels",
    "nucleus_labels": "H&E nucleus-label transfer",
    "classifier_epoch": "dual classifier, 1 epoch (paper size)",
    "classifier_predict": "dual classifier, predict every cell",
    "contrastive": "contrastive alignment, 2 epochs",
    "niches": "niches (kNN + Leiden)",
    "enrichment": "niche x label enrichment",
    "coherence": "spatial coherence (1000 permutations)",
    "write": "write .h5mu",
    "report": "report (HTML + figures)",
}
# stages run together: the predictions come from the model trained in the epoch stage
_TOGETHER = {"classifier_predict": "classifier_epoch"}
DEFAULT_SIZES = (50_000, 150_000, 460_000)
DEFAULT_SUBSET = {"classifier_epoch": 10_000, "morph_handcrafted": 50_000}
# one thread for torch, BLAS and OpenMP: on a shared 2-core machine, multi-threaded torch ops spin-wait and
# slow down many-fold when another job runs, and the CPU seconds of one thread are the load-independent figure
DEFAULT_THREADS = 1
LABEL_KEY, CONFIDENT_KEY = "singler", "singler_confident"


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# ------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRSS:
    """High-water mark of this process's resident memory, per stage and over the whole run (GiB).

    Linux lets a process reset its own ``VmHWM`` (``echo 5 > /proc/self/clear_refs``); where it cannot, a
    thread samples ``VmRSS`` every 20 ms. Resetting ``VmHWM`` also resets what ``ru_maxrss`` reports, so
    the whole-run peak is the maximum of the readings taken before each reset.
    """

    def __init__(self) -> None:
        self.run_peak_kib = 0
        self.can_reset = self._try_reset()
        self._sampled = 0
        self._stop = threading.Event()
        if not self.can_reset:
            threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._sampled = max(self._sampled, _status_kib("VmRSS"))

    def start(self) -> float:
        """Begin a stage: reset the high-water mark; return the current RSS (GiB)."""
        self.run_peak_kib = max(self.run_peak_kib, self._hwm())
        if self.can_reset:
            self._try_reset()
        self._sampled = _status_kib("VmRSS")
        return self._sampled / 2**20

    def _hwm(self) -> int:
        return _status_kib("VmHWM") if self.can_reset else self._sampled

    def stage_peak(self) -> float:
        kib = self._hwm()
        self.run_peak_kib = max(self.run_peak_kib, kib)
        return kib / 2**20

    def whole_run(self) -> float:
        self.run_peak_kib = max(self.run_peak_kib, self._hwm())
        if not self.can_reset:  # nothing was reset: the kernel's own figure covers every moment
            self.run_peak_kib = max(self.run_peak_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return self.run_peak_kib / 2**20


# ------------------------------------------------------------------------------------------- bundles
def find_bundle(n: int, bundle_dir: Path, given: dict[int, Path]) -> Path:
    if n in given:
        return given[n]
    for cand in (bundle_dir / f"synth{size_label(n)}", Path("/tmp") / f"synth{size_label(n)}"):
        if (cand / "experiment.xenium").is_file():
            return cand
    return bundle_dir / f"synth{size_label(n)}"


def make_bundle(n: int, path: Path) -> None:
    """Generate a bundle in its own process (its memory does not count against the run)."""
    code = (
        "import cellsymphony as cs, sys; "
        f"cs.datasets.synthetic_xenium({str(path)!r}, n_cells={n}, seed=0)"
    )
    print(f"... generating {path} ({n:,} cells)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- stages
class Run:
    """One size: the MuData, the stage results, and the files of the run."""

    def __init__(self, n: int, bundle: Path, work: Path, subset: dict[str, int], seed: int = 0):
        self.n, self.bundle, self.work, self.subset, self.seed = n, bundle, work, subset, seed
        self.mdata = None
        self.timings: dict[str, float] = {}
        self.extra_rows: list[dict] = []

    # each stage returns a note (or None); extra rows go to self.extra_rows
    def read_xenium(self):
        import cellsymphony as cs

        self.mdata = cs.io.read_xenium(self.bundle)

    def morph_tiny_tile(self):
        import cellsymphony as cs

        cs.pp.embed_morphology(self.mdata, model="tiny", mode="tile")

    def _subset(self, stage: str):
        """``(rows, n_sub)``: a random subset of cells for ``stage``, or ``(None, n)`` for all of them."""
        import numpy as np

        n_sub = min(self.subset.get(stage) or self.n, self.n)
        if n_sub == self.n:
            return None, self.n
        return np.sort(np.random.default_rng(self.seed).choice(self.n, n_sub, replace=False)), n_sub

    def _extrapolated(self, seconds: float, n_sub: int, t0: float) -> dict:
        if n_sub == self.n:
            return {}
        scale = self.n / n_sub
        return {"seconds": seconds * scale, "measured_s": seconds, "cells timed": n_sub,
                "note": f"on {n_sub:,} random cells, x{scale:.3g} extrapolated", "setup_s": t0}  # fmt: skip

    def morph_handcrafted(self):
        import cellsymphony as cs

        rows, n_sub = self._subset("morph_handcrafted")
        t_setup = time.perf_counter()
        target = self.mdata if rows is None else self.mdata[rows].copy()  # a subset is timed, then dropped
        t0 = time.perf_counter()
        cs.pp.embed_morphology(target, model="handcrafted")
        # the tiny ViT (next stage, every cell) is the representation used downstream at every size
        return self._extrapolated(time.perf_counter() - t0, n_sub, t0 - t_setup)

    def scgpt(self):
        import cellsymphony as cs

        ckpt = self.work / "scgpt_tiny"
        if not (ckpt / "best_model.pt").is_file():  # setup, not timed separately (a fraction of a second)
            cs.datasets.tiny_scgpt_checkpoint(ckpt, list(self.mdata["rna"].var_names), seed=self.seed)
        cs.pp.embed_expression(self.mdata, model_dir=ckpt, seed=self.seed)

    def singler(self):
        import anndata as ad

        import cellsymphony as cs

        ref = ad.read_h5ad(self.bundle / "reference.h5ad")
        cs.pp.annotate_singler(self.mdata, ref, ref_label_key="cell_type", seed=self.seed)

    def nucleus_labels(self):
        import cellsymphony as cs

        cs.pp.transfer_nucleus_labels(self.mdata, self.bundle / "he_nuclei.csv", x_key="x", y_key="y", label_key="class")

    def classifier_epoch(self):
        import numpy as np
        import pandas as pd

        import cellsymphony as cs
        from cellsymphony._constants import PRED_KEY

        n_sub = min(self.subset.get("classifier_epoch") or self.n, self.n)
        # predictions of every cell, or (--subset classifier_predict=N) of N random cells, the training cells
        # among them: the model is then fitted on a copy of those cells, and its outputs copied back
        n_pred = max(min(self.subset.get("classifier_predict") or self.n, self.n), n_sub)
        order = np.random.default_rng(self.seed).permutation(self.n)
        cells = np.sort(order[:n_pred]) if n_pred < self.n else np.arange(self.n)
        target = self.mdata if n_pred == self.n else self.mdata[cells].copy()
        pos = np.full(self.n, -1)
        pos[cells] = np.arange(len(cells))
        split = np.full(len(cells), "unused", dtype=object)
        split[pos[order[: int(0.8 * n_sub)]]] = "train"
        split[pos[order[int(0.8 * n_sub) : n_sub]]] = "test"
        from ._common import StageSeconds

        with StageSeconds() as timed:
            clf = cs.tl.train_classifier(
                target, LABEL_KEY, arch="dual", confident_key=CONFIDENT_KEY, split=split, epochs=1,
                d_model=512, n_layers=6, n_heads=8, seed=self.seed, key_added=PRED_KEY,
            )  # fmt: skip
        if target is not self.mdata:  # the report of the whole section shows the subset's predictions
            for col in (PRED_KEY, f"{PRED_KEY}_split"):
                src = target.obs[col]
                self.mdata.obs[col] = pd.Categorical(src.reindex(self.mdata.obs_names), categories=src.cat.categories)
            proba = np.full((self.n, target.obsm[f"{PRED_KEY}_proba"].shape[1]), np.nan, dtype=np.float32)
            proba[cells] = target.obsm[f"{PRED_KEY}_proba"]
            self.mdata.obsm[f"{PRED_KEY}_proba"] = proba
            self.mdata.uns[PRED_KEY] = target.uns[PRED_KEY]
        clf.save(self.work / "classifier", overwrite=True)
        t = {"epochs": timed.seconds["classifier dual epoch"], "predict": sum(timed.seconds["classifier dual predict"])}
        scale = self.n / n_sub
        note = "" if n_sub == self.n else f"on {n_sub:,} random cells, x{scale:.3g} extrapolated"
        pred = {"stage": "classifier_predict", "seconds": t["predict"], "cells timed": n_pred, "note": ""}
        if n_pred < self.n:
            pred.update(seconds=t["predict"] * self.n / n_pred, measured_s=t["predict"],
                        note=f"on {n_pred:,} random cells, x{self.n / n_pred:.3g} extrapolated")  # fmt: skip
        self.extra_rows.append(pred)
        return {"seconds": t["epochs"][0] * scale, "measured_s": t["epochs"][0], "cells timed": n_sub, "note": note}

    def contrastive(self):
        import cellsymphony as cs
        from cellsymphony._constants import CONTRASTIVE_KEY

        aligner = cs.tl.align_contrastive(self.mdata, epochs=2, seed=self.seed, key_added=CONTRASTIVE_KEY)
        aligner.save(self.work / "contrastive", overwrite=True)

    def niches(self):
        import cellsymphony as cs
        from cellsymphony._constants import CONTRASTIVE_KEY, NICHE_KEY

        cs.tl.niches(self.mdata, use_rep=CONTRASTIVE_KEY, key_added=NICHE_KEY, seed=self.seed)

    def enrichment(self):
        import cellsymphony as cs
        from cellsymphony._constants import NICHE_KEY

        cs.tl.cluster_enrichment(self.mdata, NICHE_KEY, LABEL_KEY, key_added=f"{NICHE_KEY}_enrichment")

    def coherence(self):
        import cellsymphony as cs
        from cellsymphony._constants import NICHE_KEY

        cs.tl.spatial_coherence(self.mdata, NICHE_KEY, seed=self.seed, key_added=f"{NICHE_KEY}_coherence")

    def write(self):
        import cellsymphony as cs

        cs.io.write(self.mdata, self.work / "cellsymphony.h5mu")

    def report(self):
        from cellsymphony._report import write_report
        from cellsymphony._run import RUN_SETTINGS_NOTE

        write_report(self.mdata, self.work, settings_note=RUN_SETTINGS_NOTE, timings=self.timings,
                     title=f"bench_section: {self.n:,} cells")  # fmt: skip


def worker(n: int, bundle: Path, work: Path, stages: list[str], subset: dict[str, int], threads: int) -> None:
    """Run ``stages`` on one size in this process and merge the rows into ``work/results.json``."""
    warnings.filterwarnings("ignore")
    mem = PeakRSS()
    import torch

    import cellsymphony as cs

    torch.set_num_threads(threads)

    cs.settings.progress = False
    work.mkdir(parents=True, exist_ok=True)
    run = Run(n, bundle, work, subset)
    rows: dict[str, dict] = {}
    if stages[0] != "read_xenium":
        import mudata as md

        saved = work / "cellsymphony.h5mu"
        if not saved.is_file():
            raise SystemExit(f"{saved} does not exist: run the stages up to 'write' once for {n} cells first.")
        run.mdata = md.read_h5mu(saved)
    for stage in stages:
        if stage == "classifier_predict":
            continue  # measured by classifier_epoch
        print(f"... {size_label(n)}: {stage}", file=sys.stderr, flush=True)
        rss0 = mem.start()
        t0, c0 = time.perf_counter(), time.process_time()
        got = getattr(run, stage)() or {}
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = mem.stage_peak()
        run.timings[STAGES[stage]] = wall
        row = {"stage": stage, "seconds": wall, "cpu_s": cpu, "cells timed": n, "note": "", **got,
               "wall_s": wall, "rss_start_gib": rss0, "peak_gib": peak, "load": os.getloadavg()[0]}  # fmt: skip
        rows[stage] = row
        for extra in run.extra_rows:  # stages measured inside another (same memory window)
            rows[extra["stage"]] = {**extra, "wall_s": wall, "rss_start_gib": rss0, "peak_gib": peak}
        run.extra_rows = []
        print(f"    {stage}: {row['seconds']:.1f} s, peak {peak:.2f} GiB", file=sys.stderr, flush=True)
        _save(work, n, bundle, subset, rows, mem, stages, done=stage == stages[-1])  # a failure keeps what ran


def _save(work: Path, n: int, bundle: Path, subset: dict, rows: dict, mem: PeakRSS, stages: list[str], done: bool):
    results_file = work / "results.json"
    old = json.loads(results_file.read_text()) if results_file.is_file() else {"stages": {}}
    old["stages"].update(rows)
    old.update(n_cells=n, bundle=str(bundle), subset=subset)
    whole = {"peak_gib": mem.whole_run(), "stages": stages, "complete": done and stages == list(STAGES)}
    if whole["complete"] or "whole_run" not in old or not old["whole_run"].get("complete"):
        old["whole_run"] = whole
    old["mem_method"] = "VmHWM reset per stage" if mem.can_reset else "VmRSS sampled every 20 ms"
    tmp = results_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=1))
    os.replace(tmp, results_file)


# ------------------------------------------------------------------------------------------- table
def exponent(t1: float | None, t2: float | None, n1: int, n2: int) -> float | None:
    if not t1 or not t2 or t1 <= 0 or t2 <= 0:
        return None
    return math.log(t2 / t1) / math.log(n2 / n1)


def _exponents(r1: dict | None, r2: dict | None, n1: int, n2: int) -> str:
    """``"wall (cpu CPU)"``: the exponent of wall-clock seconds, and of the process's CPU seconds, which
    other jobs on a shared machine disturb less."""
    if r1 is None or r2 is None:
        return ""
    e = exponent(r1["seconds"], r2["seconds"], n1, n2)
    c = exponent(r1.get("cpu_s"), r2.get("cpu_s"), n1, n2)
    if e is None:
        return ""
    return f"{e:.2f}" + ("" if c is None else f" (cpu {c:.2f})")


def table(sizes: list[int], work_dir: Path) -> str:
    from ._common import print_table

    res = {}
    for n in sizes:
        f = work_dir / f"n{n}" / "results.json"
        if f.is_file():
            res[n] = json.loads(f.read_text())
    sizes = [n for n in sizes if n in res]
    if not sizes:
        print("no results yet")
        return ""
    rows = []
    for stage, what in STAGES.items():
        row = {"stage": what}
        notes = []
        prev = None
        for n in sizes:
            r = res[n]["stages"].get(stage)
            lab = size_label(n)
            row[f"{lab} s"] = "" if r is None else float(r["seconds"])
            row[f"{lab} peak GiB"] = "" if r is None else float(r["peak_gib"])
            if prev is not None:
                sub = r is not None and prev[1] is not None and (r["note"] or prev[1]["note"])
                row[f"exp {size_label(prev[0])}-{lab}"] = "linear (subset)" if sub else _exponents(prev[1], r, prev[0], n)
            if r is not None and r["note"]:
                notes.append(f"{lab}: {r['note']}")
            prev = (n, r)
        row["note"] = "; ".join(notes)
        rows.append(row)
    total = {"stage": "whole run (peak RSS; s = sum of stages)"}
    prev = None
    for n in sizes:
        lab = size_label(n)
        st = res[n]["stages"]
        total[f"{lab} s"] = float(sum(r["seconds"] for r in st.values()))
        w = res[n].get("whole_run", {})
        total[f"{lab} peak GiB"] = float(w.get("peak_gib", float("nan")))
        if prev is not None:
            e = exponent(prev[1], total[f"{lab} s"], prev[0], n)
            total[f"exp {size_label(prev[0])}-{lab}"] = "" if e is None else f"{e:.2f}"
        prev = (n, total[f"{lab} s"])
    total["note"] = "; ".join(f"{size_label(n)}: peak of a partial run" for n in sizes
                              if not res[n].get("whole_run", {}).get("complete"))  # fmt: skip
    rows.append(total)
    method = {res[n].get("mem_method", "") for n in sizes}
    text = print_table(rows, f"cellsymphony run, stage by stage, on synthetic sections (CPU; memory: {', '.join(method)})")
    (work_dir / "table.md").write_text(text + "\n")
    return text


# ------------------------------------------------------------------------------------------- main
def _size(text: str) -> int:
    text = text.lower().replace("_", "").replace(",", "")
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"{flag} {it}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_section", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=_size, default=list(DEFAULT_SIZES), help="cells per section (50k, 150000, ...)")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=None, help="stages to run (default all)")
    ap.add_argument("--bundle-dir", type=Path, default=Path("/tmp/section_bench"), help="where bundles are found or made")
    ap.add_argument("--bundle", nargs="*", default=[], metavar="SIZE=PATH", help="an existing bundle for a size")
    ap.add_argument("--work-dir", type=Path, default=None, help="results and outputs (default BUNDLE_DIR/runs)")
    ap.add_argument("--subset", nargs="*", default=[], metavar="STAGE=CELLS",
                    help=f"time a stage on a random subset and extrapolate (default {DEFAULT_SUBSET}; 0 = all cells)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help="torch / BLAS / OpenMP threads (default 1: CPU seconds independent of other jobs)")
    ap.add_argument("--no-generate", action="store_true", help="skip sizes without a bundle instead of generating one")
    ap.add_argument("--table", action="store_true", help="only print the table of the kept results")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work_dir = args.work_dir or args.bundle_dir / "runs"
    subset = dict(DEFAULT_SUBSET)
    subset.update({k: int(v) for k, v in _pairs(args.subset, "--subset").items()})
    unknown = set(subset) - set(STAGES)
    if unknown:
        raise SystemExit(f"--subset: unknown stage(s) {sorted(unknown)}")
    given = {_size(k): Path(v) for k, v in _pairs(args.bundle, "--bundle").items()}
    stages = list(STAGES) if args.stages is None else [s for s in STAGES if s in args.stages or
                                                       any(_TOGETHER.get(x) == s for x in args.stages)]  # fmt: skip

    if args.worker is not None:
        n = args.worker
        worker(n, find_bundle(n, args.bundle_dir, given), work_dir / f"n{n}", stages, subset, args.threads)
        return
    if args.table:
        table(args.sizes, work_dir)
        return
    from .__main__ import machine

    print(f"# bench_section: {machine()}", flush=True)
    for n in args.sizes:
        bundle = find_bundle(n, args.bundle_dir, given)
        if not (bundle / "experiment.xenium").is_file():
            if args.no_generate:
                print(f"... {size_label(n)}: no bundle at {bundle}; skipped", file=sys.stderr, flush=True)
                continue
            make_bundle(n, bundle)
        cmd = [sys.executable, "-m", "benchmarks.bench_section", "--worker", str(n), "--bundle-dir", str(args.bundle_dir),
               "--work-dir", str(work_dir), "--stages", *stages, "--bundle", f"{n}={bundle}",
               "--subset", *[f"{k}={v}" for k, v in subset.items()], "--threads", str(args.threads)]  # fmt: skip
        t0 = time.perf_counter()
        threads = str(args.threads)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}  # fmt: skip
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env)
        print(f"... {size_label(n)}: {time.perf_counter() - t0:.0f} s (exit {proc.returncode})", file=sys.stderr, flush=True)
    table(args.sizes, work_dir)


if __name__ == "__main__":
    main()
