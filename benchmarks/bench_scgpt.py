"""Throughput of the scGPT cell-embedding path: length-bucketed batches vs the official batching.

Synthetic cells with a Xenium-like number of detected genes per cell (log-normal, long right tail) are
embedded with random-weight checkpoints in scGPT's layout: a tiny one and one at the full scGPT size
(12 layers, 512-d, 8 heads, d_hid 512). Three ways, same tokenisation and per-cell draws:

- ``official batching, torch TransformerEncoder``: cells in their given order, each batch padded to its
  longest cell, through ``torch.nn.TransformerEncoder`` built as scGPT builds it without flash-attn
  (nested-tensor fast path left on, as in scGPT);
- ``official batching, SDPA encoder``: the same batches through cellsymphony's encoder;
- ``bucketed, SDPA encoder`` (what ``cs.pp.embed_expression`` runs): cells sorted by number of genes,
  each batch padded to its longest cell.

Prints cells/s, the speed-up over the official batching and the agreement of the embeddings
(minimum cosine similarity against the torch TransformerEncoder output).

``--only tokenise``: the tokeniser alone (CPU), batch after batch as the DataLoader workers run it:
``tokenize_block`` (array operations over a batch) against the one-cell definition it is tested equal
to (``tokenize_cell`` with each cell's stream, then ``collate``), at 100 and 1,500 genes per cell (a
Xenium Prime 5K cell), with the seeds of all cells.

Run: ``PYTHONPATH=src python benchmarks/bench_scgpt.py [--cells 2000] [--full-cells 2000] [--threads 1]``
(one torch thread by default: on a shared machine more threads mostly measure contention).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

import cellsymphony as cs
from cellsymphony._utils import cell_seeds
from cellsymphony.models.encoders._scgpt import ScGPTEncoder, load_scgpt
from cellsymphony.models.encoders._scgpt_inputs import (
    CellDraws,
    batch_order,
    cell_genes,
    collate,
    embed_rows,
    scan_counts,
    tokenize_block,
    tokenize_cell,
)


def xenium_like_counts(n_cells: int, n_genes: int, *, median_genes: float, seed: int = 0) -> sp.csr_matrix:
    """Counts whose genes-per-cell follow a log-normal (median ``median_genes``, sigma 0.6), with
    mostly small counts (geometric), as in Xenium cell-feature matrices."""
    rng = np.random.default_rng(seed)
    k = np.clip(rng.lognormal(np.log(median_genes), 0.6, n_cells).astype(int), 1, n_genes)
    indptr = np.r_[0, np.cumsum(k)]
    indices = np.concatenate([np.sort(rng.choice(n_genes, kk, replace=False)) for kk in k])
    data = rng.geometric(0.45, indptr[-1]).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


class OfficialStack(nn.Module):
    """scGPT's own composition: GeneEncoder + value encoder + torch.nn.TransformerEncoder."""

    def __init__(self, model: ScGPTEncoder):
        super().__init__()
        self.model = model
        first = model.transformer_encoder.layers[0]
        layer = nn.TransformerEncoderLayer(
            model.d_model, first.self_attn.nhead, first.linear1.out_features, dropout=0.2, batch_first=True
        )
        self.stack = nn.TransformerEncoder(layer, len(model.transformer_encoder.layers))
        self.stack.load_state_dict(
            {k[len("transformer_encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("transformer_encoder.")}
        )
        self.eval()
        for name in ("d_model", "cls_token_id", "pad_token_id", "pad_value"):
            setattr(self, name, getattr(model, name))

    def encode_cls(self, genes, values, src_key_padding_mask):
        x = self.model.encoder(genes) + self.model.value_encoder(values)
        return self.stack(x, src_key_padding_mask=src_key_padding_mask)[:, 0]


def run(
    label: str, ckpt: Path, X: sp.csr_matrix, batch_size: int, max_length: int, device: str, workers: int
) -> list[tuple]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = load_scgpt(ckpt, device=device)
    genes = [f"GENE{i}" for i in range(X.shape[1])]
    col2tok = np.array([model.vocab.get(g, -1) for g in genes])
    ids = np.array([f"cell{i}" for i in range(X.shape[0])])
    lengths, _ = scan_counts(X, col2tok)
    official = OfficialStack(model)
    rows, ref = [], None
    for name, m, bucketed in (
        ("official batching, torch TransformerEncoder", official, False),
        ("official batching, SDPA encoder", model, False),
        ("bucketed, SDPA encoder (embed_expression)", model, True),
    ):
        kw = dict(max_length=max_length, batch_size=batch_size, seed=0, device=device, num_workers=workers)
        embed_rows(m, X[: 4 * batch_size], ids[: 4 * batch_size], col2tok, **kw)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        emb = embed_rows(m, X, ids, col2tok, lengths=lengths, bucketed=bucketed, **kw)
        dt = time.perf_counter() - t
        if ref is None:
            ref = emb
        cos = float(np.min(np.sum(emb * ref, axis=1)))
        rows.append((label, name, X.shape[0] / dt, dt, cos))
    return rows


def padded_tokens(lengths: np.ndarray, batch_size: int, max_length: int, bucketed: bool) -> int:
    n = np.minimum(lengths + 1, max_length)
    if bucketed:
        n = np.sort(n, kind="stable")
    return int(sum(len(b) * b.max() for b in (n[i : i + batch_size] for i in range(0, len(n), batch_size))))


def tokenise(n_cells: int, median_genes: float, *, n_genes: int = 5000, batch_size: int = 64) -> dict:
    """Cells/s of the batch tokeniser and of the per-cell definition, on the same batches."""
    X = xenium_like_counts(n_cells, n_genes, median_genes=median_genes, seed=3)
    col2tok = np.arange(n_genes, dtype=np.int64) + 10
    ids = [f"cell{i}" for i in range(n_cells)]
    t = time.perf_counter()
    seeds = cell_seeds(0, ids)
    t_seeds = time.perf_counter() - t
    batches = [np.sort(b) for b in batch_order(np.diff(X.indptr), batch_size)]
    kw = dict(cls_id=1, pad_value=-2.0, max_length=1200)
    t = time.perf_counter()
    for b in batches:
        tokenize_block(X[b], seeds[b], col2tok, pad_id=0, **kw)
    t_block = time.perf_counter() - t
    t = time.perf_counter()
    for b in batches:
        block = X[b]
        cells = [tokenize_cell(*cell_genes(block, col2tok, i), CellDraws(seeds[r]), **kw) for i, r in enumerate(b)]
        collate(cells, pad_id=0, pad_value=-2.0)
    t_cell = time.perf_counter() - t
    return {"genes": int(np.median(np.diff(X.indptr))), "block": n_cells / t_block, "cell": n_cells / t_cell,
            "seeds": n_cells / t_seeds}


def print_tokenise(rows: list[dict]) -> None:
    print(f"| {'genes/cell (median)':>19} | {'block cells/s':>13} | {'per-cell cells/s':>16} | {'ratio':>6} | {'seeds cells/s':>13} |")
    print(f"|{'-' * 21}|{'-' * 15}|{'-' * 18}|{'-' * 8}|{'-' * 15}|")
    for r in rows:
        print(f"| {r['genes']:>19} | {r['block']:>13,.0f} | {r['cell']:>16,.0f} | {r['block'] / r['cell']:>5.1f}x | {r['seeds']:>13,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["tokenise"], help="run only the tokeniser comparison")
    ap.add_argument("--cells", type=int, default=2000, help="cells for the tiny checkpoint")
    ap.add_argument("--full-cells", type=int, default=2000, help="cells for the full-size model")
    ap.add_argument("--genes", type=int, default=480, help="panel size")
    ap.add_argument("--median-genes", type=float, default=60, help="median detected genes per cell")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=1200)
    ap.add_argument("--device", default="cpu", help="torch device (bf16 autocast on cuda)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers that tokenise")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cs.settings.progress = False
    if args.only == "tokenise":
        print_tokenise([tokenise(20_000, 100), tokenise(2_000, 1500)])
        return

    genes = [f"GENE{i}" for i in range(args.genes)]
    tmp = Path(tempfile.mkdtemp())
    tiny = cs.datasets.tiny_scgpt_checkpoint(tmp / "tiny", genes, seed=0)
    full = cs.datasets.tiny_scgpt_checkpoint(tmp / "full", genes, seed=0, embsize=512, nheads=8, d_hid=512, nlayers=12)

    X_tiny = xenium_like_counts(args.cells, args.genes, median_genes=args.median_genes, seed=1)
    X_full = xenium_like_counts(args.full_cells, args.genes, median_genes=args.median_genes, seed=2)
    nnz = np.diff(X_full.indptr)
    print(
        f"cells: genes per cell median {np.median(nnz):.0f}, 90% {np.percentile(nnz, 90):.0f}, max {nnz.max()}; "
        f"panel {args.genes} genes; batch {args.batch_size}; torch threads {torch.get_num_threads()}; "
        f"device {args.device}; workers {args.workers}; torch {torch.__version__}"
    )
    for lab, X in (("tiny", X_tiny), ("full", X_full)):
        lengths = np.diff(X.indptr)
        a = padded_tokens(lengths, args.batch_size, args.max_length, False)
        b = padded_tokens(lengths, args.batch_size, args.max_length, True)
        print(f"{lab}: padded tokens, official batching {a:,} vs bucketed {b:,} ({a / b:.2f}x); real {int((lengths + 1).sum()):,}")

    kw = dict(batch_size=args.batch_size, max_length=args.max_length, device=args.device, workers=args.workers)
    results = run("tiny (2 x 32-d)", tiny, X_tiny, **kw)
    results += run("full (12 x 512-d, 8 heads)", full, X_full, **kw)

    print()
    print(f"| {'model':<27} | {'path':<44} | {'cells/s':>8} | {'seconds':>7} | {'speed-up':>8} | {'min cos':>9} |")
    print(f"|{'-' * 29}|{'-' * 46}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 11}|")
    for i, (label, name, cps, dt, cos) in enumerate(results):
        base = results[3 * (i // 3)][2]
        print(f"| {label:<27} | {name:<44} | {cps:>8.1f} | {dt:>7.2f} | {cps / base:>7.2f}x | {cos:>9.6f} |")


def suite(quick: bool = True) -> list[dict]:
    """Rows for ``python -m benchmarks``: bucketed vs the official batching, tiny and full-size models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cs.settings.progress = False
    genes = [f"GENE{i}" for i in range(480)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = cs.datasets.tiny_scgpt_checkpoint(Path(tmp) / "tiny", genes, seed=0)
            full = cs.datasets.tiny_scgpt_checkpoint(
                Path(tmp) / "full", genes, seed=0, embsize=512, nheads=8, d_hid=512, nlayers=12
            )
            for label, ckpt, n in (("tiny", tiny, 1000 if quick else 4000), ("full 12 x 512-d", full, 200 if quick else 2000)):
                X = xenium_like_counts(n, len(genes), median_genes=60, seed=1)
                res = run(label, ckpt, X, 64, 1200, device, 0)
                base, ours = res[0], res[2]
                rows.append({"figure": f"scGPT bucketed batches, {label} ({n} cells, {device})", "value": ours[2],
                             "unit": "cells/s", "baseline": f"{base[2]:.1f} cells/s official batching",
                             "ratio": ours[2] / base[2], "note": f"speed-up; min cos {ours[4]:.5f}"})
        tok = tokenise(2000 if quick else 20_000, 100)
        rows.append({"figure": "scGPT tokeniser, batch arrays (100 genes/cell)", "value": tok["block"],
                     "unit": "cells/s", "baseline": f"{tok['cell']:.0f} cells/s per-cell definition",
                     "ratio": tok["block"] / tok["cell"], "note": "same tokens (tested equal)"})
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    main()
