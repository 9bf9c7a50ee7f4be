"""``cs.tl.compare_classifiers``: per-class precision / recall / F1 of every architecture and baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._docs import inject_docs
from .._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

BASELINES = ("logistic",)
ALL_SAMPLES = "all"


def _logistic(inputs, y_all, train_rows, test_rows, class_weight, seed) -> np.ndarray:
    """Logistic regression on the standardised, concatenated embeddings; predicted codes of the test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def rows(r):  # the inputs of these rows only: no copy of every cell's embeddings
        return np.concatenate([a[r] for a in (inputs.gene, inputs.morph) if a is not None], axis=1)

    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=2000, class_weight=class_weight, random_state=seed),
    )
    clf.fit(rows(train_rows), y_all[train_rows])
    return clf.predict(rows(test_rows)).astype(np.int64)


@inject_docs()
def compare_classifiers(
    mdata: MuData | AnnData,
    label_key: str,
    *,
    archs: Sequence[str] = ("unimodal", "spatial", "dual", "multi_input", "morphology"),
    baselines: Sequence[Literal["logistic"]] = ("logistic",),
    gene_rep: str | None = None,
    morph_rep: str | None = None,
    exclude: Sequence[str] = ("ambiguous",),
    confident_key: str | None = None,
    split: Literal["random", "spatial", "sample"] | Sequence[str] = "random",
    test_size: float = 0.2,
    block_size: float | None = None,
    test_samples: Sequence[str] | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-5,
    weight_decay: float = 0.01,
    d_model: int = 512,
    n_layers: int = 6,
    n_heads: int = 8,
    dropout: float = 0.1,
    wavelengths_um: Sequence[float] | None = None,
    dim_feedforward: int | None = None,
    class_weight: Literal["balanced"] | None = "balanced",
    early_stopping: bool = False,
    patience: int = 5,
    seed: int = 0,
    device: str | None = None,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Train every architecture (and baseline) on one split and tabulate per-class P / R / F1 on its test cells.

    All methods see the same cells: those with every input any of them reads, split once (as in
    :func:`~cellsymphony.tl.train_classifier`). The logistic-regression baseline (scikit-learn,
    standardised concatenation of the expression and morphology embeddings the architectures read)
    shows whether a transformer earns its cost.

    Parameters
    ----------
    mdata
        {mdata}
    label_key
        Column of cell labels (looked up as in :func:`~cellsymphony.tl.train_classifier`).
    archs
        Architectures to train (see :func:`~cellsymphony.tl.train_classifier`).
    baselines
        Baselines: ``"logistic"``, or none.
    gene_rep
        {gene_rep}
    morph_rep
        {morph_rep}
    exclude, confident_key, split, test_size, block_size, test_samples
        Exclusions and split, as in :func:`~cellsymphony.tl.train_classifier` (``split`` may be a per-cell
        array of ``"train"`` / ``"test"`` / ``"unused"``).
    epochs, batch_size, lr, weight_decay, d_model, n_layers, n_heads, dropout, wavelengths_um, dim_feedforward, class_weight, early_stopping, patience
        Architecture and training settings shared by every architecture, as in
        :func:`~cellsymphony.tl.train_classifier` (one definition:
        :class:`~cellsymphony.models.classifier._config.ClassifierTraining`).
    seed
        {seed}
    device
        {device}
    key_added
        When given, also store in ``mdata.uns[key_added]``: ``"metrics_table"`` (the long table
        ``model, sample, class, metric, value`` that ``cs.pl.metrics`` and the report read; model = the
        architecture or baseline), ``"table"`` (the returned wide view) and ``"params"``, and record the
        call in ``mdata.uns["cellsymphony"]["outputs"]``; ``None`` writes nothing.

    Returns
    -------
    A flat DataFrame in the layout of the paper's Tables 1-2, a view of the long metric table: one row per architecture x sample (index
    ``"<architecture> | <sample>"``; a row ``"all"`` pools the samples when there are several), columns
    ``architecture``, ``sample``, ``n_test``, then ``"<class> P"``, ``"<class> R"``, ``"<class> F1"`` for
    every class, then ``macro F1`` and ``weighted F1``.
    """
    from .._results import METRICS_TABLE, metrics_wide, record_outputs
    from .._utils import params_record
    from .._validate import check_choice
    from ..models.classifier._config import ClassifierConfig, training_from
    from ..models.classifier._metrics import classification_table
    from ..models.classifier._model import CellTypeClassifier, prepare
    from ..models.classifier._module import arch_tokens

    archs = [archs] if isinstance(archs, str) else list(archs)
    baselines = [baselines] if isinstance(baselines, str) else list(baselines)
    for a in archs:
        ClassifierConfig(a, d_model, n_layers, n_heads, dropout, dim_feedforward, wavelengths_um)  # validates
    for b in baselines:
        check_choice("baseline", b, BASELINES)
    if not archs and not baselines:
        raise ValueError("Nothing to compare: pass at least one arch or baseline.")
    training = training_from(locals())
    tokens = {t for a in archs for t in arch_tokens(a)}
    if baselines and not tokens & {"gene", "morph"}:
        tokens |= {"gene", "morph"}
    tokens = [t for t in ("gene", "morph", "spatial") if t in tokens]
    try:
        prep = prepare(mdata, label_key, tokens, training)
    except ValueError as err:
        if "at least 2 classes" in str(err):
            raise ValueError(f"Comparing classifiers needs at least 2 classes in {label_key!r}: {err}") from err
        raise
    inputs, classes = prep.inputs, prep.classes
    train_rows, test_rows = prep.train_rows, prep.test_rows
    if len(test_rows) == 0:
        raise ValueError("The split leaves no test cells to compare the classifiers on.")
    test_samples_arr = inputs.samples[test_rows].astype(str)
    logger.info(
        "comparing %s on %d training / %d test cells; left out: %s",
        ", ".join(archs + baselines), len(train_rows), len(test_rows), prep.exclusions,
    )  # fmt: skip
    # every architecture sees the same cells and the same split
    common = dataclasses.replace(training, gene_rep=inputs.gene_rep, morph_rep=inputs.morph_rep, split=prep.split)
    tables = []
    for arch in archs:
        model = CellTypeClassifier(
            arch, d_model=d_model, n_layers=n_layers, n_heads=n_heads, dropout=dropout,
            dim_feedforward=dim_feedforward, wavelengths_um=wavelengths_um,
        )  # fmt: skip
        model._fit(mdata, label_key, common)
        # the model's classes are those of its training cells, the same as here (one split)
        names = np.asarray(model.classes, dtype=object)[model.test_proba.argmax(axis=1)]
        pred = pd.Categorical(names, categories=classes).codes.astype(np.int64)
        tables.append(classification_table(arch, prep.y[test_rows], pred, test_samples_arr, classes))
    for base in baselines:
        pred = _logistic(inputs, prep.y, train_rows, test_rows, class_weight, seed)
        tables.append(classification_table(base, prep.y[test_rows], pred, test_samples_arr, classes))

    long = pd.concat(tables, ignore_index=True)
    table = metrics_wide(long)
    if key_added is not None:
        mdata.uns[key_added] = {
            METRICS_TABLE: long,
            "table": table,
            "params": params_record(
                label_key=label_key,
                archs=tuple(archs),
                baselines=tuple(baselines),
                **{**training.record(), "gene_rep": inputs.gene_rep, "morph_rep": inputs.morph_rep},
                d_model=int(d_model),
                n_layers=int(n_layers),
                n_heads=int(n_heads),
                dropout=float(dropout),
                wavelengths_um=tuple(ClassifierConfig(wavelengths_um=wavelengths_um).wavelengths_um),
                dim_feedforward=int(dim_feedforward or 4 * d_model),
            ),
        }
        record_outputs(mdata, key_added, "tl.compare_classifiers", [f"uns[{key_added!r}]"])
        logger.info("added uns[%r] (comparison table) to the %s", key_added, type(mdata).__name__)
    return table
