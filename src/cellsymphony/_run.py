"""The real-data pipeline behind ``cellsymphony run``: read, embed, label, classify, align, niches, report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._constants import CONTRASTIVE_KEY, HE_LABEL_KEY, NICHE_KEY, PRED_KEY, SINGLER_KEY
from ._settings import logger

# what this pipeline does that the paper did differently (shown in the report)
RUN_SETTINGS_NOTE = {
    "label source": ("SingleR (transcriptomic) and an H&E nucleus classifier", "one source per run (--labels)"),
    "classifier comparison": ("unimodal, spatial, dual, multi-input transformers", "the same, plus a logistic baseline"),
}


TRAIN_CELLS_KEY = "cs_train_cells"
# the per-cell categorical results written as Xenium Explorer cell groups, where present
VIEWER_COLUMNS = (PRED_KEY, NICHE_KEY, SINGLER_KEY, "labels", HE_LABEL_KEY)
EXPLORER_DIR = "xenium_explorer"
ZARR_NAME = "cellsymphony.zarr"


def trainable_exclude(mdata, label_key: str, confident_key: str | None) -> tuple[str, ...]:
    """``exclude=`` for the pipelines' classifiers: ``"ambiguous"`` and the labels with too few usable cells
    for the classifiers' minimum sizes (left out with a warning, rather than stopping the run)."""
    from .models.classifier._data import rare_labels

    rare = rare_labels(mdata, label_key, confident_key=confident_key)
    if rare:
        logger.warning("labels with too few cells to train on are left out of the classifiers: %s", rare)
    return ("ambiguous", *rare)


def write_viewer_files(mdata, out: Path, *, spatialdata: bool = False) -> list[Path]:
    """``out/xenium_explorer/{sample}/{column}.csv`` for each result of ``VIEWER_COLUMNS`` present (and the H&E
    alignment where it did not come from the Xenium folder); with ``spatialdata``, ``out/cellsymphony.zarr``."""
    import cellsymphony as cs

    from ._validate import find_obs_column

    cols = []
    for c in VIEWER_COLUMNS:
        try:
            find_obs_column(mdata, c)
        except ValueError:
            continue
        cols.append(c)
    written = cs.io.write_xenium_explorer(mdata, cols, out / EXPLORER_DIR, overwrite=True) if cols else []
    if spatialdata:
        cs.io.to_spatialdata(mdata, path=out / ZARR_NAME, overwrite=True)
        written.append(out / ZARR_NAME)
    return written


def training_subset(mdata, label_key: str, confident_key: str | None, n_cells: int, seed: int) -> str:
    """Mark at most ``n_cells`` labelled (and confident) cells, drawn at random, in
    ``mdata.obs["cs_train_cells"]``, and return that column's name: the classifiers' ``confident_key``,
    so that they train and test on those cells only."""
    import numpy as np

    from ._validate import find_obs_column

    usable = find_obs_column(mdata, label_key).notna().to_numpy()
    if confident_key is not None:
        conf = find_obs_column(mdata, confident_key)
        usable &= conf.astype(object).where(conf.notna(), False).astype(bool).to_numpy()
    rows = np.flatnonzero(usable)
    chosen = np.zeros(mdata.n_obs, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(rows)[: int(n_cells)]] = True
    mdata.obs[TRAIN_CELLS_KEY] = chosen
    logger.info("training the classifiers on %d of the %d labelled cells (--train-cells)", int(chosen.sum()), len(rows))
    return TRAIN_CELLS_KEY


def check_device(device: str | None) -> None:
    """A ``--device`` that torch can use here: a valid device string, and the GPU it names present."""
    if device is None or device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"--device {device}: not a torch device ({err}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps")


def _check_checkpoint(path: Path) -> None:
    """Open a morphology-encoder checkpoint without loading its tensors (safetensors header; a torch file
    memory-mapped), so that a truncated or foreign file fails before the pipeline starts."""
    from ._errors import InputFileError, reading
    from .models.encoders._weights import find_weight_file

    f = find_weight_file(path, source="--uni2")
    fix = "The file is truncated or is no checkpoint: download the weights again."
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        with reading(f, "the morphology-encoder checkpoint", fix), safe_open(str(f), framework="pt") as fh:
            n = len(list(fh.keys()))
    else:
        import torch

        with reading(f, "the morphology-encoder checkpoint", fix):
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        n = len(sd) if isinstance(sd, dict) else 0
    if n == 0:
        raise InputFileError(f, "the morphology-encoder checkpoint", "it holds no tensors", fix)


def preflight(
    xenium: Path,
    *,
    he_image: Path | None,
    he_alignment: Path | None,
    uni2: Path | None,
    scgpt: Path,
    labels: str | Path | None,
    reference: Path | None,
    ref_label_key: str | None,
    cell_id_col: str,
    label_col: str,
    device: str | None,
) -> None:
    """Open every input of :func:`run_pipeline` before any heavy step, so that a bad one fails in seconds
    instead of after hours of embeddings: the device, the Xenium folder's headers (experiment.xenium, the cells
    table's columns, the matrix), the H&E and its alignment, the scGPT folder (built and loaded), the UNI2-h
    checkpoint's header, the reference's ``obs`` column ``ref_label_key`` and a labels file's columns.
    Raises a ``ValueError`` (an ``InputFileError`` for a file) naming the input and the fix."""
    import logging
    import warnings

    import anndata as ad

    from ._errors import read_table, reading, require_file
    from .io._read_xenium import _attach_he
    from .io._xenium_files import CELLS_CSV, CELLS_PARQUET, find_matrix, pixel_size_of, read_experiment
    from .models.encoders._scgpt import load_scgpt

    check_device(device)
    specs = read_experiment(xenium)
    pixel_size = pixel_size_of(specs, str(xenium / "experiment.xenium"))
    table = xenium / CELLS_PARQUET
    if not table.is_file():
        table = next((xenium / n for n in CELLS_CSV if (xenium / n).is_file()), table)
    columns = list(read_table(table, "the cells table", "Copy it again from the Xenium output.", nrows=5).columns)
    missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in columns]
    if missing:
        raise ValueError(f"--xenium {xenium}: {table.name} lacks the column(s) {missing}; it is not a Xenium cells table")
    matrix = find_matrix(xenium)
    if matrix.name.endswith(".h5"):
        import h5py

        with reading(matrix, "the count matrix", "Copy it again from the Xenium output."), h5py.File(matrix, "r") as f:
            if "matrix" not in f:
                raise ValueError(f"--xenium {xenium}: {matrix.name} has no 'matrix' group; it is not a 10x matrix")
    if reference is not None:
        with reading(reference, "the reference", "Pass a readable .h5ad file (anndata.read_h5ad)."):
            ref = ad.read_h5ad(require_file(reference, "the reference"), backed="r")
        try:
            if ref_label_key not in ref.obs.columns:
                raise ValueError(
                    f"--ref-label-key {ref_label_key}: not a column of the reference's obs ({reference.name} has "
                    f"{list(ref.obs.columns)[:20]}); pass the column of cell-type labels"
                )
            if ref.obs[ref_label_key].nunique() < 2:
                raise ValueError(f"--ref-label-key {ref_label_key}: the reference's column has fewer than 2 labels")
        finally:
            ref.file.close()
    if labels is not None and labels != "singler":
        cols = list(read_table(labels, "the label table", "Pass a CSV / TSV / Parquet table of cell ids and labels.",
                               nrows=5).columns)  # fmt: skip
        missing = [c for c in (cell_id_col, label_col) if c not in cols]
        if missing:
            flags = {cell_id_col: "--cell-id-col", label_col: "--label-col"}
            raise ValueError(
                f"--labels {labels}: no column {missing} (it has {cols[:20]}); pass "
                + " and ".join(f"{flags[c]}" for c in missing)
            )
    # the H&E and the checkpoints last (the slowest to open); their warnings and logs come again in their step
    level = logger.level
    try:
        logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _attach_he(xenium, he_image, he_alignment, None, pixel_size)
            load_scgpt(scgpt)
        if uni2 is not None:
            _check_checkpoint(uni2)
    finally:
        logger.setLevel(level)


class Steps:
    """Numbered, timed pipeline steps: ``with steps("embedding"):`` logs ``[2/8] embedding`` and its time."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.done += 1
        logger.info("[%d/%d] %s ...", self.done, self.total, name)
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - t0
        logger.info("[%d/%d] %s done in %.1f s", self.done, self.total, name, self.timings[name])
        return out


def run_pipeline(
    xenium: Path,
    out: Path,
    *,
    he_image: Path | None,
    he_alignment: Path | None,
    uni2: Path | None,
    morph_model: str,
    morph_mode: str,
    scgpt: Path,
    labels: str | Path | None,
    reference: Path | None,
    ref_label_key: str | None,
    cell_id_col: str,
    label_col: str,
    epochs: int,
    d_model: int = 512,
    n_layers: int = 6,
    n_heads: int = 8,
    archs: tuple[str, ...] = ("unimodal", "spatial", "dual", "multi_input", "morphology"),
    train_cells: int | None = None,
    device: str | None,
    seed: int,
    spatialdata: bool = False,
) -> Path:
    """Run the whole pipeline on one Xenium section and write ``out/cellsymphony.h5mu``, the trained models
    and ``out/report.html``; return the path of the ``.h5mu``.

    ``train_cells``: train (and compare) the classifiers on at most this many labelled cells drawn at random
    (``mdata.obs["cs_train_cells"]``), which bounds the memory and time of training on a whole section;
    predictions are made for every cell. Also writes the Xenium Explorer cell groups (``out/xenium_explorer/``)
    and, with ``spatialdata``, ``out/cellsymphony.zarr`` for napari and spatialdata-plot."""
    import cellsymphony as cs

    from ._report import write_report

    out.mkdir(parents=True, exist_ok=True)
    has_labels = labels is not None
    steps = Steps(total=7 + (4 if has_labels else 0))

    mdata = steps.run("reading the Xenium run", lambda: cs.io.read_xenium(xenium, he_image=he_image, he_alignment=he_alignment))
    steps.run(
        f"morphology embeddings ({morph_model}, {morph_mode} mode)",
        lambda: cs.pp.embed_morphology(mdata, model=morph_model, weights=uni2, mode=morph_mode, device=device),
    )
    steps.run("expression embeddings (scGPT)", lambda: cs.pp.embed_expression(mdata, model_dir=scgpt, device=device))

    size = {"epochs": epochs, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads}
    label_key = confident_key = None
    if labels == "singler":
        import anndata as ad

        ref = ad.read_h5ad(reference)
        steps.run("SingleR labels", lambda: cs.pp.annotate_singler(mdata, ref, ref_label_key=ref_label_key))
        label_key, confident_key = SINGLER_KEY, f"{SINGLER_KEY}_confident"
    elif has_labels:
        steps.run("importing labels", lambda: cs.pp.import_labels(
            mdata, labels, id_key=cell_id_col, label_key=label_col, key_added="labels"))  # fmt: skip
        label_key = "labels"
    if label_key is not None and train_cells is not None:
        confident_key = training_subset(mdata, label_key, confident_key, train_cells, seed)
    if label_key is not None:
        exclude = trainable_exclude(mdata, label_key, confident_key)  # labels too rare to train on: left out
        steps.run("comparing classifiers", lambda: cs.tl.compare_classifiers(
            mdata, label_key, archs=archs, confident_key=confident_key, exclude=exclude, device=device, seed=seed,
            key_added="cs_compare", **size))  # fmt: skip
        clf = steps.run("training the dual classifier", lambda: cs.tl.train_classifier(
            mdata, label_key, arch="dual", confident_key=confident_key, exclude=exclude, device=device, seed=seed,
            key_added=PRED_KEY, **size))  # fmt: skip
        clf.save(out / "classifier", overwrite=True)
    aligner = steps.run("contrastive alignment", lambda: cs.tl.align_contrastive(
        mdata, epochs=epochs, device=device, seed=seed, key_added=CONTRASTIVE_KEY))  # fmt: skip
    aligner.save(out / "contrastive", overwrite=True)
    steps.run("niches", lambda: cs.tl.niches(mdata, use_rep=CONTRASTIVE_KEY, key_added=NICHE_KEY))
    if label_key is not None:
        steps.run("enrichment", lambda: cs.tl.cluster_enrichment(
            mdata, NICHE_KEY, label_key, key_added=f"{NICHE_KEY}_enrichment"))  # fmt: skip
    h5mu = out / "cellsymphony.h5mu"
    steps.run("writing results", lambda: cs.io.write(mdata, h5mu))
    steps.run("Xenium Explorer / SpatialData files", lambda: write_viewer_files(mdata, out, spatialdata=spatialdata))
    note = dict(RUN_SETTINGS_NOTE)
    paper = {"epochs": 20, "d_model": 512, "n_layers": 6, "n_heads": 8}
    for k, v in size.items():
        if v != paper[k]:
            note[f"classifier {k}"] = (str(paper[k]), str(v))
    if train_cells is not None and TRAIN_CELLS_KEY in mdata.obs:
        note["classifier training cells"] = ("every labelled cell", f"{int(mdata.obs[TRAIN_CELLS_KEY].sum()):,} drawn at random")
    write_report(mdata, out, settings_note=note, timings=steps.timings, title=f"cellsymphony: {xenium.name}")
    logger.info("results in %s (cellsymphony.h5mu, report.html, figures/, classifier/, contrastive/)", out)
    return h5mu
