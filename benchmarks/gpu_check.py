"""One prepared GPU check of every encoder and trainer: ``python -m benchmarks.gpu_check [--cpu]``.

Prints the environment (cellsymphony, torch and CUDA versions, the device) and one Markdown table:

- UNI2-h (random weights, bf16 autocast): images/s at batch 64, 128 and 256, with the peak GPU memory
  (``torch.cuda.max_memory_allocated``);
- ``cs.pp.embed_morphology`` with UNI2-h in cell mode and in tile mode on a synthetic section
  (``cs.datasets.synthetic``), ``--workers`` DataLoader workers decoding and resampling the H&E;
- the scGPT whole-human architecture (12 layers, 512-d, 8 heads, a 60,697-token vocabulary; random
  weights in the published layout) on a 5,000-gene panel, cells/s of the bucketed path of
  ``cs.pp.embed_expression``;
- one epoch of the dual classifier at the paper's sizes (d_model 512, 6 layers, 8 heads; 512-d scGPT and
  1536-d UNI2-h embeddings) on 460,000 cells (``benchmarks/bench_classifier.py``);
- one epoch of the contrastive aligner on 460,000 cells (512-d and 1536-d inputs).

On an H100/H200-class GPU it finishes within 8 minutes. Without CUDA it stops at once with an error,
unless ``--cpu`` is given: then everything runs at tiny sizes (the ``tiny`` ViT for UNI2-h, a 2-layer
scGPT, a few hundred cells, short epochs) on the CPU in well under a minute; ``tests/test_gpu_check.py``
runs it that way. Inputs are random (the speed of these networks does not depend on the values); nothing
is asserted here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# run as ``python -m benchmarks.gpu_check`` (the package's helpers and the other scripts' functions)
from . import bench_classifier, bench_contrastive, bench_scgpt
from .__main__ import machine
from ._common import StageSeconds, peak_rss_mib, print_table

#: tokens of scGPT's whole-human vocabulary (genes plus <pad>, <cls>, <eoc>)
WHOLE_HUMAN_VOCAB = 60_697
#: the table's columns
COLUMNS = ("check", "size", "value", "unit", "peak MiB", "seconds")


@dataclass(frozen=True)
class Sizes:
    """What each check runs at: the GPU sizes of the issue, or tiny ones for ``--cpu``."""

    uni_model: str
    uni_batches: tuple[int, ...]
    uni_repeats: int
    section_cells: int
    embed_batch: int
    panel_genes: int
    scgpt_cells: int
    scgpt_median_genes: float
    scgpt_dims: dict
    vocab: int
    classifier_cells: int
    classifier_dims: dict
    contrastive_cells: int


GPU = Sizes(
    uni_model="uni2-h", uni_batches=(64, 128, 256), uni_repeats=4, section_cells=4000, embed_batch=128,
    panel_genes=5000, scgpt_cells=4000, scgpt_median_genes=1500,
    scgpt_dims=dict(embsize=512, nheads=8, d_hid=512, nlayers=12), vocab=WHOLE_HUMAN_VOCAB,
    classifier_cells=460_000, classifier_dims=dict(d_model=512, n_layers=6, n_heads=8), contrastive_cells=460_000,
)
CPU = Sizes(
    uni_model="tiny", uni_batches=(4, 8, 16), uni_repeats=2, section_cells=200, embed_batch=32,
    panel_genes=200, scgpt_cells=300, scgpt_median_genes=40,
    scgpt_dims=dict(embsize=32, nheads=4, d_hid=64, nlayers=2), vocab=1000,
    classifier_cells=1024, classifier_dims=dict(d_model=32, n_layers=1, n_heads=2), contrastive_cells=2000,
)


class _Meter:
    """Peak memory of one check: GPU ``max_memory_allocated`` (reset at the start) or, on the CPU, the
    process's peak resident set so far."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak = peak_rss_mib()
        self.seconds = time.perf_counter() - self.t0


def _row(check: str, size: str, value: float, unit: str, meter: _Meter) -> dict:
    return {"check": check, "size": size, "value": float(value), "unit": unit, "peak MiB": float(meter.peak),
            "seconds": float(meter.seconds)}


def environment(device: str) -> list[str]:
    """Lines describing the software and the device the figures come from."""
    import torch

    import cellsymphony as cs

    lines = [f"cellsymphony {cs.__version__}; {machine()}", f"torch {torch.__version__}, CUDA {torch.version.cuda}"]
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, "
                     f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")  # fmt: skip
    else:
        lines.append(f"device: CPU ({torch.get_num_threads()} torch threads)")
    return lines


# ------------------------------------------------------------------------------------------------ the checks
def check_uni(sz: Sizes, device: str) -> tuple[list[dict], object]:
    """Images/s of the encoder's forward pass (as ``embed_morphology`` runs it: uint8 in, bf16 autocast on
    CUDA, inference mode) at each batch size; returns the rows and the encoder for the embedding checks."""
    import torch

    import cellsymphony as cs
    from cellsymphony.pp._morphology_runner import _autocast

    enc = cs.models.load_morphology_encoder(sz.uni_model, weights="random" if sz.uni_model != "tiny" else None,
                                            device=device)  # fmt: skip
    rows = []
    label = "UNI2-h (random weights, bf16)" if sz.uni_model == "uni2-h" else f"{sz.uni_model} ViT (CPU stand-in for UNI2-h)"
    gen = torch.Generator(device="cpu").manual_seed(0)
    for b in sz.uni_batches:
        x = torch.randint(0, 256, (b, 224, 224, 3), dtype=torch.uint8, generator=gen).to(device)
        with _Meter(device) as m, torch.inference_mode(), _autocast(device):
            enc.forward_tokens(x)  # warm-up (kernels, allocator)
            if m.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(sz.uni_repeats):
                enc.forward_tokens(x)
            if m.cuda:
                torch.cuda.synchronize()
            took = time.perf_counter() - t
        rows.append(_row(f"{label}, forward", f"batch {b}", b * sz.uni_repeats / took, "images/s", m))
        del x
    return rows, enc


def check_embed(sz: Sizes, device: str, enc, workers: int) -> list[dict]:
    """Cells/s of ``cs.pp.embed_morphology`` in cell and tile mode, reading the synthetic section's H&E."""
    import cellsymphony as cs

    mdata = cs.datasets.synthetic(n_cells=sz.section_cells, seed=0)
    n = mdata["morphology"].n_obs
    rows = []
    for mode in ("cell", "tile"):
        with _Meter(device) as m:
            cs.pp.embed_morphology(mdata, model=enc, mode=mode, batch_size=sz.embed_batch, num_workers=workers,
                                   device=device, key_added=f"X_{mode}")  # fmt: skip
        rows.append(_row(f"embed_morphology, {mode} mode ({enc.name})",
                         f"{n:,} cells, {workers} workers, batch {sz.embed_batch}", n / m.seconds, "cells/s", m))  # fmt: skip
    return rows


def check_scgpt(sz: Sizes, device: str, workers: int) -> list[dict]:
    """Cells/s of the scGPT architecture on a panel of ``sz.panel_genes`` genes (bucketed batches, the path of
    ``cs.pp.embed_expression``), after a warm-up batch."""
    import torch

    from cellsymphony.datasets import tiny_scgpt_checkpoint
    from cellsymphony.models.encoders._scgpt import load_scgpt
    from cellsymphony.models.encoders._scgpt_inputs import embed_rows, scan_counts

    genes = [f"GENE{i}" for i in range(sz.panel_genes)]
    extra = sz.vocab - sz.panel_genes - 3  # the three special tokens
    X = bench_scgpt.xenium_like_counts(sz.scgpt_cells, sz.panel_genes, median_genes=sz.scgpt_median_genes, seed=1)
    ids = np.array([f"cell{i}" for i in range(X.shape[0])])
    d = sz.scgpt_dims
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_scgpt_checkpoint(Path(tmp) / "scgpt", genes, seed=0, n_extra_genes=extra, **d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "untrained weights"
            model = load_scgpt(ckpt, device=device)
    col2tok = np.array([model.vocab.get(g, -1) for g in genes])
    lengths, _ = scan_counts(X, col2tok)
    kw = dict(max_length=1200, batch_size=64, seed=0, device=device, num_workers=workers)
    embed_rows(model, X[:128], ids[:128], col2tok, **kw)  # warm-up
    with _Meter(device) as m:
        embed_rows(model, X, ids, col2tok, lengths=lengths, **kw)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    label = f"scGPT {d['nlayers']} x {d['embsize']}-d, {d['nheads']} heads, vocab {sz.vocab:,}"
    return [_row(label, f"{sz.panel_genes:,}-gene panel, {len(ids):,} cells, median {np.median(np.diff(X.indptr)):.0f} "
                        f"genes/cell", len(ids) / m.seconds, "cells/s", m)]  # fmt: skip


def check_classifier(sz: Sizes, device: str) -> list[dict]:
    """Seconds of one training epoch of the dual classifier (``bench_classifier.bench_arch``: batches of 64,
    forward, cross-entropy, backward, AdamW; bf16 autocast on CUDA)."""
    import torch

    d = sz.classifier_dims
    with _Meter(device) as m:
        r = bench_classifier.bench_arch("dual", sz.classifier_cells, torch.device(device), **d)
    epoch = sz.classifier_cells / r["train cells/s"]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    size = (f"{sz.classifier_cells:,} cells, d_model {d['d_model']}, {d['n_layers']} layer{'s' * (d['n_layers'] > 1)}, "
            f"{d['n_heads']} heads, "
            f"{bench_classifier.GENE_DIM} + {bench_classifier.MORPH_DIM}-d inputs, batch 64")  # fmt: skip
    return [_row("dual classifier, one training epoch", size, epoch, "s/epoch", m),
            _row("dual classifier, prediction", f"{sz.classifier_cells:,} cells, batch 1024", r["predict cells/s"],
                 "cells/s", m)]  # fmt: skip


def check_contrastive(sz: Sizes, device: str) -> list[dict]:
    """Median seconds of a contrastive epoch (2 epochs fitted; 90% of the cells train) with 512-d expression
    and 1536-d morphology inputs (``bench_contrastive.make``)."""
    from cellsymphony.models.contrastive import ContrastiveAligner

    ContrastiveAligner().fit(bench_contrastive.make(512, 16, 16), epochs=1, device=device)  # warm-up
    mdata = bench_contrastive.make(sz.contrastive_cells, 512, 1536)
    with _Meter(device) as m, StageSeconds() as timed:
        ContrastiveAligner().fit(mdata, epochs=2, batch_size=256, device=device)
    epoch = float(np.median(timed.seconds["contrastive epoch"]))
    return [_row("contrastive aligner, one training epoch", f"{sz.contrastive_cells:,} cells, 512 + 1536-d, batch 256",
                 epoch, "s/epoch", m)]  # fmt: skip


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (under a minute; what the test runs)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers (default: min(8, CPUs - 1) on GPU, 0 with --cpu)")  # fmt: skip
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_check: CUDA is not available to torch {torch.__version__} (CUDA build {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): run it on a GPU machine, "
            "or pass --cpu for the tiny CPU check."
        )
    device = "cpu" if args.cpu else "cuda"
    sz = CPU if args.cpu else GPU
    workers = args.workers if args.workers is not None else (0 if args.cpu else max(1, min(8, (os.cpu_count() or 2) - 1)))
    warnings.filterwarnings("ignore")
    import cellsymphony as cs

    cs.settings.progress = False
    cs.settings.verbosity = "WARNING"
    if args.cpu:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny networks: one thread is as fast, and far faster on a shared machine
    t0 = time.perf_counter()
    print(f"# gpu_check ({'--cpu, tiny sizes' if args.cpu else 'GPU sizes'})", flush=True)
    for line in environment(device):
        print(f"- {line}", flush=True)
    rows: list[dict] = []

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        print(f"  ... {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        return out

    try:
        got, enc = timed("encoder forward", check_uni, sz, device)
        rows += got
        rows += timed("embed_morphology", check_embed, sz, device, enc, workers)
        del enc
        if device == "cuda":
            torch.cuda.empty_cache()
        rows += timed("scGPT", check_scgpt, sz, device, workers)
        rows += timed("classifier", check_classifier, sz, device)
        rows += timed("contrastive", check_contrastive, sz, device)
    finally:
        if args.cpu:
            torch.set_num_threads(threads)
    title = (f"gpu_check on {'the CPU (--cpu: tiny sizes, not GPU figures)' if args.cpu else torch.cuda.get_device_name(0)}"
             f", {time.perf_counter() - t0:.0f} s in all; peak MiB: "
             f"{'process peak RSS so far' if args.cpu else 'torch.cuda.max_memory_allocated during the check'}")  # fmt: skip
    print_table([{c: r[c] for c in COLUMNS} for r in rows], title)
    return rows


if __name__ == "__main__":
    main()
