"""Classifier throughput: training and prediction cells/s per architecture at the paper's sizes.

Paper sizes: d_model 512, 6 encoder layers, 8 heads; expression embedding 512-d (scGPT), morphology
embedding 1536-d (UNI2-h). One training epoch is the loop of ``CellTypeClassifier.fit`` (batches of 64
cells: forward, class-weighted cross-entropy, backward, AdamW step; bf16 autocast on CUDA); prediction is
batched forward passes of 1024 cells without gradients.

Run: ``python benchmarks/bench_classifier.py [--cells 1024] [--device cpu] [--threads N]``.
Prints a table; nothing is asserted. Wall-clock cells/s depend on what else runs on the machine; on a
CPU, cells per CPU-second of the process (``time.process_time``) is the load-independent figure (with
``--threads 1`` it is the speed of one dedicated core).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cellsymphony.models.classifier._model import _autocast, make_adamw
from cellsymphony.models.classifier._module import ARCHS, CellClassifierModule

GENE_DIM, MORPH_DIM, N_CLASSES = 512, 1536, 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_arch(arch: str, n_cells: int, device: torch.device, batch_size: int = 64, d_model: int = 512,
               n_layers: int = 6, n_heads: int = 8) -> dict:
    torch.manual_seed(0)
    module = CellClassifierModule(
        arch, N_CLASSES, gene_dim=GENE_DIM, morph_dim=MORPH_DIM, d_model=d_model, n_layers=n_layers, n_heads=n_heads
    ).to(device)
    x = {
        "gene": torch.randn(n_cells, GENE_DIM, device=device),
        "morph": torch.randn(n_cells, MORPH_DIM, device=device),
        "coords": torch.rand(n_cells, 2, device=device) * 5000 - 2500,
    }
    x = {k: v for k, v in x.items() if (k if k != "coords" else "spatial") in module.tokens}
    y = torch.randint(0, N_CLASSES, (n_cells,), device=device)
    w = torch.ones(N_CLASSES, device=device)
    opt = make_adamw(module.parameters(), 3e-5, 0.01, device)

    def train_epoch(n: int) -> None:
        module.train()
        order = torch.randperm(n_cells, device=device)[:n]
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            with _autocast(device):
                logits = module(**{k: v[idx] for k, v in x.items()})
            loss = F.cross_entropy(logits.float(), y[idx], weight=w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    train_epoch(2 * batch_size)  # warm-up
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    train_epoch(n_cells)
    _sync(device)
    train_s, train_cpu = time.perf_counter() - t, time.process_time() - c

    module.eval()
    with torch.no_grad():
        t, c = time.perf_counter(), time.process_time()
        for start in range(0, n_cells, 1024):
            with _autocast(device):
                module(**{k: v[start : start + 1024] for k, v in x.items()})
        _sync(device)
        pred_s, pred_cpu = time.perf_counter() - t, time.process_time() - c
    return {
        "arch": arch,
        "tokens": len(module.tokens),
        "params (M)": sum(p.numel() for p in module.parameters()) / 1e6,
        "train cells/s": n_cells / train_s,
        "train cells/CPU-s": n_cells / train_cpu,
        "100k-cell epoch, 1 core (min)": 1e5 * train_cpu / n_cells / 60,
        "predict cells/s": n_cells / pred_s,
        "predict cells/CPU-s": n_cells / pred_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1024, help="cells per timed epoch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"# classifier throughput: d_model 512, 6 layers, 8 heads, gene dim {GENE_DIM}, morph dim {MORPH_DIM}, "
        f"batch 64, {args.cells} cells, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = [bench_arch(a, args.cells, device) for a in args.archs]
    cols = list(rows[0])
    width = {c: max(len(c), 11) for c in cols}
    print(" | ".join(c.ljust(width[c]) for c in cols))
    print("-|-".join("-" * width[c] for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append((f"{v:.1f}" if isinstance(v, float) else str(v)).ljust(width[c]))
        print(" | ".join(cells))


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: training epochs/s on 100k cells per architecture (paper sizes),
    from cells per CPU-second (load-independent), against the expression-only ("unimodal") model."""
    n = 256 if quick else 2048
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    archs = ("unimodal", "multi_input") if quick else ARCHS
    res = {a: bench_arch(a, n, device) for a in archs}
    # on a CPU: per CPU-hour of the process (load-independent); on a GPU: per wall-clock hour
    key, unit = ("train cells/s", "epochs/h") if device.type == "cuda" else ("train cells/CPU-s", "epochs/CPU-h")
    base = res["unimodal"][key] * 3600 / 1e5
    return [
        {"figure": f"classifier training, {a}, 100k-cell epochs ({device.type})", "value": r[key] * 3600 / 1e5,
         "unit": unit, "baseline": f"{base:.3g} {unit} unimodal (expression only)",
         "ratio": r[key] * 3600 / 1e5 / base, "note": f"{r['params (M)']:.1f} M parameters"}
        for a, r in res.items()
    ]


if __name__ == "__main__":
    main()
