"""Memory estimates of the steps of ``cellsymphony run``, and the pre-flight check built on them.

A Xenium section of 10^5-10^6 cells is held in memory as a MuData: its counts, the per-cell tables and
every embedding. :func:`section_size` reads how big a section is from the files' metadata alone (the row
count of ``cells.parquet``, the shape of the count matrix), :func:`estimate_steps` turns that into the
expected peak resident memory of each step, and :func:`check_memory` refuses, before any heavy work,
a run whose largest step would not fit in the memory available, naming the option that makes it smaller.

The constants were measured with ``benchmarks/bench_section.py`` on synthetic sections of 50,000 to
460,000 cells (peak RSS per stage) and from the code's own arrays (counts as float32 CSR, embeddings as
float32); they err on the generous side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GB = 1e9

# measured (benchmarks/bench_section.py): the interpreter, numpy/pandas/anndata/scanpy and torch, and
# freed-but-kept heap of the streaming steps
PROCESS_BYTES = 1.2e9
# obs tables of the MuData and its modalities, cell ids, obsm coordinates: 2.1 kB per cell measured after
# read_xenium at 460,000 cells (4.4 kB at 50,000, where the allocator's slack weighs more)
CELL_BYTES = 3_000
COUNT_BYTES = 8  # float32 value + int32 index per stored count
READ_COUNT_BYTES = 8  # while reading: the whole matrix (controls included) beside the gene part
SCGPT_DIM = 512
CONTRASTIVE_DIM = 128
N_LABELS = 30  # SingleR scores are cells x reference labels (float64 while scored, float32 kept)
# kNN search, neighbour graphs and Leiden of niches (pynndescent + scanpy + igraph): 6.9 kB per cell measured
# at 460,000 cells, of which 1.7 kB stays resident afterwards
GRAPH_CELL_BYTES = 7_000
GRAPH_KEPT_CELL_BYTES = 1_800
REPORT_CELL_BYTES = 1_500  # spatial figures of every cell (points, colours, the rendered canvas)
TRAIN_MODEL_BYTES = 0.5e9  # the paper-size classifier with its gradients and AdamW state
MORPH_DIMS = {"uni2-h": 1536, "handcrafted": 44, "tiny": 32}


@dataclass
class SectionSize:
    """How big a Xenium section is, from its files' metadata."""

    n_cells: int
    nnz: int  # stored values of the count matrix, every feature type
    source: str  # the file the figures come from


def section_size(folder: str | os.PathLike) -> SectionSize | None:
    """Cells and stored counts of a Xenium output folder without reading its tables (``None`` when the
    folder's matrix is in a form whose size cannot be read cheaply)."""
    folder = Path(folder)
    h5 = folder / "cell_feature_matrix.h5"
    if h5.is_file():
        import h5py

        try:
            with h5py.File(h5, "r") as f:
                g = f["matrix"]
                return SectionSize(int(g["shape"][1]), int(g["data"].shape[0]), str(h5))
        except (OSError, KeyError, IndexError, ValueError):
            return None  # read_xenium reports a damaged file with its own message
    mex = next((p for p in (folder / "cell_feature_matrix" / n for n in ("matrix.mtx.gz", "matrix.mtx")) if p.is_file()), None)
    if mex is not None:
        import gzip

        opener = gzip.open if mex.suffix == ".gz" else open
        try:
            with opener(mex, "rt") as fh:
                for line in fh:
                    if not line.startswith("%"):
                        _, cells, nnz = (int(v) for v in line.split()[:3])
                        return SectionSize(cells, nnz, str(mex))
        except (OSError, ValueError):
            return None
    return None


def available_bytes() -> int | None:
    """Memory this process can still use: ``MemAvailable`` of ``/proc/meminfo``, lowered to the cgroup's
    limit minus its usage where a container sets one; ``psutil`` elsewhere; ``None`` when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - no way to tell: the check is skipped
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def _weights_bytes(path: str | os.PathLike | None) -> int:
    if path is None:
        return 0
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".bin", ".safetensors", ".pt", ".pth"))
    return p.stat().st_size if p.is_file() else 0


def estimate_steps(
    size: SectionSize,
    *,
    morph_dim: int,
    morph_weights_bytes: int = 0,
    scgpt_weights_bytes: int = 0,
    labels: bool = True,
    n_archs: int = 5,
    train_cells: int | None = None,
) -> dict[str, float]:
    """Estimated peak resident bytes of each step of ``cellsymphony run``, in order.

    What is kept grows step by step (counts, then each embedding, scores, predictions, projections); each
    step adds its own transient arrays on top: the whole matrix while reading, the encoder's weights twice
    while they load (checkpoint and model), the training copies of the inputs of the labelled cells (at
    most ``train_cells``) for the classifiers, the neighbour graphs of the niches, the figures of the report.
    """
    n, nnz = size.n_cells, size.nnz
    kept = PROCESS_BYTES + n * CELL_BYTES + nnz * COUNT_BYTES
    steps: dict[str, float] = {"reading the Xenium run": kept + nnz * READ_COUNT_BYTES}
    morph = n * morph_dim * 4
    steps["morphology embeddings"] = kept + morph + 2 * morph_weights_bytes
    kept += morph
    scgpt = n * SCGPT_DIM * 4
    steps["expression embeddings (scGPT)"] = kept + scgpt + 2 * scgpt_weights_bytes
    kept += scgpt
    if labels:
        scores = n * N_LABELS * 4
        steps["labels"] = kept + scores + n * N_LABELS * 8 + 0.8e9  # float64 scores and query blocks while scored
        kept += scores
        trained = n if train_cells is None else min(n, int(train_cells))
        inputs = trained * (SCGPT_DIM + morph_dim + 2) * 4  # the float32 copies of train + test inputs
        proba = n * 10 * 4 * 2  # probabilities of every cell (array and obsm), about 10 classes
        # the logistic baseline of the comparison: float64 copies of the training inputs in scikit-learn
        logistic = trained * (SCGPT_DIM + morph_dim) * 8 if n_archs else 0
        steps["classifiers"] = kept + inputs + max(logistic, 0) + proba + TRAIN_MODEL_BYTES
        kept += proba * (1 + n_archs) / 2
    contrastive = n * CONTRASTIVE_DIM * 4 * 2  # projections written to both modalities
    steps["contrastive alignment"] = kept + contrastive + n * CONTRASTIVE_DIM * 4
    kept += contrastive
    steps["niches"] = kept + n * GRAPH_CELL_BYTES
    kept += n * GRAPH_KEPT_CELL_BYTES  # what the niches step leaves resident (graphs, freed-but-kept heap)
    steps["writing results"] = kept + 0.2e9
    steps["report"] = kept + n * REPORT_CELL_BYTES + 0.5e9  # its UMAPs use at most 50,000 cells
    return steps


def check_memory(
    xenium: str | os.PathLike,
    *,
    morph_model: str,
    morph_weights: str | os.PathLike | None,
    scgpt_dir: str | os.PathLike | None,
    labels: bool,
    n_archs: int,
    train_cells: int | None,
    available: int | None = None,
) -> dict[str, float] | None:
    """Refuse a run that cannot fit: ``ValueError`` naming the step, the section's size, the estimate, the
    memory available and the option that makes the step smaller. Returns the estimates (``None`` when the
    size or the available memory cannot be told; then nothing is checked)."""
    size = section_size(xenium)
    if available is None:
        available = available_bytes()
    if size is None or available is None:
        return None
    kw = dict(
        morph_dim=MORPH_DIMS.get(morph_model, 1536),
        morph_weights_bytes=_weights_bytes(morph_weights),
        scgpt_weights_bytes=_weights_bytes(Path(scgpt_dir) / "best_model.pt" if scgpt_dir else None),
        labels=labels,
        n_archs=n_archs,
    )
    steps = estimate_steps(size, train_cells=train_cells, **kw)
    step, need = max(steps.items(), key=lambda kv: kv[1])
    if need <= available:
        return steps
    what = f"{size.n_cells:,} cells ({size.nnz / 1e6:,.0f} M stored counts)"
    msg = (
        f"not enough memory for this section: {what}; the step '{step}' needs an estimated {need / GB:.1f} GB "
        f"and {available / GB:.1f} GB is available."
    )
    hint = None
    if step == "classifiers":
        # the largest number of training cells that fits, in steps of 10,000
        for cells in range(min(size.n_cells, train_cells or size.n_cells) // 10_000 * 10_000, 0, -10_000):
            trial = estimate_steps(size, train_cells=cells, **kw)
            if max(trial.values()) <= available:
                hint = (
                    f" Pass --train-cells {cells} to train the classifiers on a random subset of the labelled "
                    f"cells (predictions still cover every cell, in batches): an estimated "
                    f"{max(trial.values()) / GB:.1f} GB."
                )
                break
    if hint is None:
        hint = (
            " No option of cellsymphony run makes this step smaller: the counts and the embeddings of every cell "
            "are held in memory. Use a machine with more memory"
            + (", or --morph-model handcrafted (44 features instead of 1536, no weights)" if kw["morph_dim"] > 64 else "")
            + "."
        )
    raise ValueError(msg + hint + " (--skip-memory-check runs it anyway.)")
