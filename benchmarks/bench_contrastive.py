"""Training speed of cs.tl.align_contrastive on CPU: epochs/s on 100k cells, printed as a table.

    PYTHONPATH=src python benchmarks/bench_contrastive.py [--cells 100000] [--threads N] [--device cpu]

For each pair of input widths (512 = scGPT, 1536 = UNI2-h) the aligner is fitted for --epochs epochs
and the median wall time of an epoch (forward, backward and AdamW step on every training cell, plus
the held-out loss) is reported, with the fixed cost of a fit (pairing, standardisation, retrieval on
the held-out cells) and transform speed (cells/s, one modality, inference).
Inputs are random: the speed of these networks does not depend on the values.
"""

from __future__ import annotations

import argparse
import platform
import time

import anndata as ad
import mudata as md
import numpy as np
import torch

import cellsymphony as cs
from cellsymphony.models.contrastive import ContrastiveAligner

try:  # run as python -m benchmarks.bench_contrastive or as a script
    from ._common import StageSeconds
except ImportError:
    from _common import StageSeconds


def make(n: int, n_gene: int, n_morph: int, seed: int = 0) -> md.MuData:
    rng = np.random.default_rng(seed)
    names = [f"c{i}" for i in range(n)]
    mods = {}
    for mod, key, d in (("rna", "X_scgpt", n_gene), ("morphology", "X_uni2", n_morph)):
        a = ad.AnnData(
            np.zeros((n, 0), np.float32), obsm={key: rng.standard_normal((n, d), dtype=np.float32)}
        )
        a.obs_names = names
        mods[mod] = a
    mdata = md.MuData(mods)
    mdata.uns["cellsymphony"] = {"latest": {"rna": "X_scgpt", "morphology": "X_uni2"}}
    return mdata


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cs.settings.progress = False
    cs.settings.verbosity = "WARNING"

    print(
        f"# align_contrastive speed: {args.cells} cells (90% trained), batch {args.batch_size}, dim 128, hidden 256, "
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    header = (
        f"| {'gene dim':>8} | {'morph dim':>9} | {'s/epoch':>8} | {'epochs/s':>8} | {'train cells/s':>13} | "
        f"{'fixed s':>7} | {'transform cells/s':>17} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    ContrastiveAligner().fit(
        make(512, 16, 16), epochs=1, device=args.device
    )  # warm-up: thread pools, kernels
    for n_gene, n_morph in ((512, 512), (512, 1536), (1536, 1536)):
        mdata = make(args.cells, n_gene, n_morph)
        aligner = ContrastiveAligner()
        with StageSeconds() as timed:
            aligner.fit(mdata, epochs=args.epochs, batch_size=args.batch_size, device=args.device)
        epochs = timed.seconds["contrastive epoch"]
        epoch = float(np.median(epochs))
        fixed = sum(timed.seconds["contrastive fit"]) - sum(epochs)
        n_train = aligner.fit_info["n_train"]
        x = mdata["morphology"].obsm["X_uni2"]
        t = time.perf_counter()
        aligner.transform_array(x, "morphology")
        tt = time.perf_counter() - t
        print(
            f"| {n_gene:>8} | {n_morph:>9} | {epoch:>8.2f} | {1 / epoch:>8.3f} | {n_train / epoch:>13,.0f} | "
            f"{fixed:>7.2f} | {len(x) / tt:>17,.0f} |"
        )


if __name__ == "__main__":
    main()
