"""``cs.tl.compare_classifiers``: per-class precision / recall / F1 of every architecture and baseline."""

from __future__ import annotations

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


def _rows_of(method: str, y_true, y_pred, samples, classes) -> list[dict]:
    from ..models.classifier._metrics import classification_metrics

    groups = [(s, samples == s) for s in sorted(set(samples))]
    if len(groups) > 1:
        groups.append((ALL_SAMPLES, np.ones(len(samples), dtype=bool)))
    rows = []
    for sample, sel in groups:
        m = classification_metrics(y_true[sel], y_pred[sel], classes)
        row = {"architecture": method, "sample": str(sample), "n_test": m["n"]}
        for cls, r in m["per_class"].iterrows():
            row[f"{cls} P"] = r["precision"]
            row[f"{cls} R"] = r["recall"]
            row[f"{cls} F1"] = r["f1"]
        row["macro F1"] = m["macro_f1"]
        row["weighted F1"] = m["weighted_f1"]
        rows.append(row)
    return rows


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
    split: Literal["random", "spatial", "sample"] = "random",
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
    class_weight: Literal["balanced"] | None = "balanced",
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
        Exclusions and split, as in :func:`~cellsymphony.tl.train_classifier`.
    epochs, batch_size, lr, weight_decay, d_model, n_layers, n_heads, class_weight
        Training settings shared by every architecture.
    seed
        {seed}
    device
        {device}
    key_added
        When given, also store the table and the parameters in ``mdata.uns[key_added]``
        (``"table"``, ``"params"``); ``None`` writes nothing.

    Returns
    -------
    A flat DataFrame in the layout of the paper's Tables 1-2: one row per architecture x sample
    (index ``"<architecture> | <sample>"``; a row ``"all"`` pools the samples when there are several),
    columns ``architecture``, ``sample``, ``n_test``, then ``"<class> P"``, ``"<class> R"``,
    ``"<class> F1"`` for every class, then ``macro F1`` and ``weighted F1``.
    """
    from .._utils import params_record
    from .._validate import check_choice
    from ..models.classifier._data import (
        TEST,
        TRAIN,
        check_test_size,
        gather_inputs,
        make_split,
        section_coordinates,
        usable_labels,
    )
    from ..models.classifier._model import CellTypeClassifier
    from ..models.classifier._module import ARCHS, arch_tokens

    archs = [archs] if isinstance(archs, str) else list(archs)
    baselines = [baselines] if isinstance(baselines, str) else list(baselines)
    for a in archs:
        check_choice("arch", a, ARCHS)
    for b in baselines:
        check_choice("baseline", b, BASELINES)
    if not archs and not baselines:
        raise ValueError("Nothing to compare: pass at least one arch or baseline.")
    if isinstance(exclude, str):
        exclude = (exclude,)
    check_test_size(test_size)
    tokens = {t for a in archs for t in arch_tokens(a)}
    if baselines and not tokens & {"gene", "morph"}:
        tokens |= {"gene", "morph"}
    tokens = [t for t in ("gene", "morph", "spatial") if t in tokens]
    inputs = gather_inputs(mdata, tokens, gene_rep, morph_rep)
    labels, exclusions = usable_labels(mdata, label_key, exclude, confident_key, inputs.available)
    classes = sorted(set(labels[pd.notna(labels)]))
    if len(classes) < 2:
        raise ValueError(f"Comparing classifiers needs at least 2 classes in {label_key!r}, found {classes}.")
    split_arr = make_split(
        labels,
        split=split,
        test_size=test_size,
        seed=seed,
        samples=inputs.samples,
        coords_abs=section_coordinates(mdata) if split == "spatial" else None,
        block_size=block_size,
        test_samples=test_samples,
    )
    train_rows = np.flatnonzero(split_arr == TRAIN)
    test_rows = np.flatnonzero(split_arr == TEST)
    if len(test_rows) == 0:
        raise ValueError("The split leaves no test cells to compare the classifiers on.")
    y_all = np.full(len(labels), -1, dtype=np.int64)
    lab_rows = np.flatnonzero(pd.notna(labels))
    y_all[lab_rows] = pd.Categorical(labels[lab_rows], categories=classes).codes
    test_samples_arr = inputs.samples[test_rows].astype(str)
    logger.info(
        "comparing %s on %d training / %d test cells; left out: %s",
        ", ".join(archs + baselines),
        len(train_rows),
        len(test_rows),
        exclusions,
    )

    rows = []
    for arch in archs:
        model = CellTypeClassifier(arch, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
        model.fit(
            mdata,
            label_key,
            gene_rep=inputs.gene_rep,
            morph_rep=inputs.morph_rep,
            exclude=exclude,
            confident_key=confident_key,
            split=split_arr,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            class_weight=class_weight,
            seed=seed,
            device=device,
            key_added=None,
        )
        names = np.asarray(model.classes, dtype=object)[model._fit_proba[test_rows].argmax(axis=1)]
        pred = pd.Categorical(names, categories=classes).codes.astype(np.int64)
        rows += _rows_of(arch, y_all[test_rows], pred, test_samples_arr, classes)
    for base in baselines:
        pred = _logistic(inputs, y_all, train_rows, test_rows, class_weight, seed)
        rows += _rows_of(base, y_all[test_rows], pred, test_samples_arr, classes)

    table = pd.DataFrame(rows)
    table.index = pd.Index([f"{r['architecture']} | {r['sample']}" for r in rows], name="run")
    if key_added is not None:
        mdata.uns[key_added] = {
            "table": table,
            "params": params_record(
                label_key=label_key,
                archs=tuple(archs),
                baselines=tuple(baselines),
                gene_rep=inputs.gene_rep,
                morph_rep=inputs.morph_rep,
                exclude=tuple(exclude),
                confident_key=confident_key,
                split=split,
                test_size=float(test_size),
                block_size=block_size,
                test_samples=tuple(test_samples) if test_samples is not None else None,
                epochs=int(epochs),
                batch_size=int(batch_size),
                lr=float(lr),
                weight_decay=float(weight_decay),
                d_model=int(d_model),
                n_layers=int(n_layers),
                n_heads=int(n_heads),
                class_weight=class_weight,
                seed=int(seed),
            ),
        }
        logger.info("added uns[%r] (comparison table) to the %s", key_added, type(mdata).__name__)
    return table
