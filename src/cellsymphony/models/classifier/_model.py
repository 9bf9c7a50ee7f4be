"""``CellTypeClassifier``: the MuData-aware wrapper (fit / predict / save / load) of the classifier module."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..._constants import MIN_TEST_CELLS, MIN_TEST_CELLS_PER_CLASS, MIN_TRAIN_CELLS_PER_CLASS
from ..._settings import log_seconds, logger, resolve_device, settings
from .._base import BaseModel, autocast, deprecated_layout, make_adamw, seeded, standardization
from .._config import json_safe
from ._config import ClassifierConfig, ClassifierTraining, training_from
from ._data import (
    TEST,
    TRAIN,
    UNUSED,
    gather_inputs,
    make_split,
    section_coordinates,
    split_from_array,
    usable_labels,
)
from ._metrics import classification_metrics, classification_table
from ._module import CellClassifierModule, arch_tokens

__all__ = ["CellTypeClassifier", "make_adamw"]  # make_adamw: kept importable here for the benchmarks

FORMAT = "cellsymphony.CellTypeClassifier"
PREDICT_BATCH = 1024
_UNSET = object()
_autocast = autocast  # the name the benchmarks import


@dataclasses.dataclass
class Prepared:
    """The labelled cells of one fit: inputs, classes, per-cell split and label codes (-1: unused)."""

    inputs: object
    classes: list[str]
    split: np.ndarray
    y: np.ndarray
    exclusions: dict[str, int]

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(self.split == TRAIN)

    @property
    def test_rows(self) -> np.ndarray:
        return np.flatnonzero(self.split == TEST)


def prepare(mdata, label_key: str, tokens: Sequence[str], training: ClassifierTraining) -> Prepared:
    """Inputs, usable labels, exclusions and the split of a fit (shared by ``fit`` and ``compare_classifiers``)."""
    inputs = gather_inputs(mdata, tokens, training.gene_rep, training.morph_rep)
    labels, exclusions = usable_labels(mdata, label_key, training.exclude, training.confident_key, inputs.available)
    split = training.split
    if not isinstance(split, str):
        split_arr = split_from_array(split, mdata.n_obs, labels)
        outside = pd.notna(labels) & (split_arr == UNUSED)
        exclusions["outside the given split"] = int(outside.sum())
        labels = np.where(outside, None, labels)
    classes = sorted(set(labels[pd.notna(labels)]))
    if len(classes) < 2:
        raise ValueError(
            f"Training needs at least 2 classes in {label_key!r} after exclusions, found {classes} "
            f"(cells left out: {exclusions})."
        )
    if isinstance(split, str):
        split_arr = make_split(
            labels,
            split=split,
            test_size=training.test_size,
            seed=training.seed,
            samples=inputs.samples,
            coords_abs=section_coordinates(mdata) if split == "spatial" else None,
            block_size=training.block_size,
            test_samples=training.test_samples,
        )
    y = np.full(mdata.n_obs, -1, dtype=np.int64)
    rows = np.flatnonzero(pd.notna(labels))
    y[rows] = pd.Categorical(labels[rows], categories=classes).codes
    split_arr = np.asarray(split_arr, dtype=object)
    check_sizes(y, split_arr, classes, label_key)
    return Prepared(inputs, classes, split_arr, y, exclusions)


def check_sizes(y: np.ndarray, split: np.ndarray, classes: list[str], label_key: str) -> None:
    """Refuse a fit whose statistics would rest on too few cells: every class needs
    ``MIN_TRAIN_CELLS_PER_CLASS`` training cells and, unless the split holds no test cells at all (then the
    test metrics are NaN, with a warning), the test split needs ``MIN_TEST_CELLS`` cells and
    ``MIN_TEST_CELLS_PER_CLASS`` of every class (``cellsymphony._constants``)."""
    n_train = np.bincount(y[split == TRAIN], minlength=len(classes))
    n_test = np.bincount(y[(split == TEST) & (y >= 0)], minlength=len(classes))
    fix = ("Label more cells, leave those classes out (exclude=[...]), merge them (cs.pp.harmonize_labels), "
           "or change the split (test_size=, split=).")  # fmt: skip
    few = {c: int(n) for c, n in zip(classes, n_train, strict=True) if n < MIN_TRAIN_CELLS_PER_CLASS}
    if few:
        raise ValueError(
            f"Too few training cells: each class of {label_key!r} needs at least {MIN_TRAIN_CELLS_PER_CLASS}; "
            f"these have fewer (training cells): {few}. {fix}"
        )
    total = int(n_test.sum())
    if total == 0:
        return
    if total < MIN_TEST_CELLS:
        raise ValueError(
            f"Too few test cells for metrics: the split holds {total} (at least {MIN_TEST_CELLS} needed; "
            f"per class {dict(zip(classes, n_test.tolist(), strict=True))}). {fix}"
        )
    few = {c: int(n) for c, n in zip(classes, n_test, strict=True) if n < MIN_TEST_CELLS_PER_CLASS}
    if few:
        raise ValueError(
            f"Too few test cells for per-class metrics: each class of {label_key!r} needs at least "
            f"{MIN_TEST_CELLS_PER_CLASS} test cells; these have fewer: {few}. {fix}"
        )


class CellTypeClassifier(BaseModel):
    """Transformer cell-type classifier on expression / morphology embeddings and cell positions.

    Build it with :func:`cellsymphony.tl.train_classifier` (which also writes the predictions), or
    ``CellTypeClassifier(arch).fit(mdata, label_key)``; apply it to any section with :meth:`predict`, keep
    it with :meth:`save` and :meth:`load`. The network is
    :class:`~cellsymphony.models.classifier._module.CellClassifierModule`.

    Parameters
    ----------
    arch
        ``"unimodal"`` (expression embedding), ``"spatial"`` (expression + position), ``"dual"``
        (expression + morphology), ``"multi_input"`` (expression + morphology + position, with a learned
        attention bias between token pairs) or ``"morphology"`` (morphology embedding only, for H&E-only
        slides).
    d_model, n_layers, n_heads
        Width, depth and attention heads of the transformer encoder.
    dropout
        Dropout in the encoder and before the linear head.
    dim_feedforward
        Hidden width of the feed-forward blocks; ``4 * d_model`` when ``None``.
    wavelengths_um
        Wavelengths (micrometres) of the sinusoidal encoding of section-relative positions;
        ``None`` uses 50 um to 25 mm (see :data:`~cellsymphony.models.classifier._config.DEFAULT_WAVELENGTHS_UM`).

    Attributes
    ----------
    config
        The :class:`~cellsymphony.models.classifier._config.ClassifierConfig`.
    classes
        Class names, in the order of the probability columns.
    metrics
        After :meth:`fit`: ``per_class`` (precision, recall, f1, support), ``macro_f1``, ``weighted_f1``,
        ``accuracy``, ``n`` and ``confusion`` on the test cells.
    metrics_table
        The same as a long metric table (``model, sample, class, metric, value``).
    split
        The per-cell ``"train"`` / ``"test"`` / ``"unused"`` of the last fit.
    test_proba
        Probabilities of the test cells (rows in the order of ``split == "test"``).
    """

    FORMAT = FORMAT
    FORMAT_VERSION = 2
    CONFIG_CLASS = ClassifierConfig
    TRAINER = "cs.tl.train_classifier"
    HISTORY_COLUMNS = ("epoch", "train_loss", "test_loss", "test_macro_f1", "test_accuracy")

    def __init__(
        self,
        arch: Literal["unimodal", "spatial", "dual", "multi_input", "morphology"] = "dual",
        *,
        d_model: int = 512,
        n_layers: int = 6,
        n_heads: int = 8,
        dropout: float = 0.1,
        dim_feedforward: int | None = None,
        wavelengths_um: Sequence[float] | None = None,
    ):
        super().__init__(
            ClassifierConfig(arch, d_model, n_layers, n_heads, dropout, dim_feedforward, wavelengths_um)
        )
        self.tokens = arch_tokens(arch)
        self.classes: list[str] | None = None
        self.gene_dim: int | None = None
        self.morph_dim: int | None = None
        self.gene_rep: str | None = None
        self.morph_rep: str | None = None
        self.label_key: str | None = None
        self.metrics: dict | None = None
        self.metrics_table: pd.DataFrame | None = None
        self.split: np.ndarray | None = None
        self.test_proba: np.ndarray | None = None
        self.exclusions: dict[str, int] | None = None

    # the architecture fields, read through the config
    arch = property(lambda self: self.config.arch)
    d_model = property(lambda self: self.config.d_model)
    n_layers = property(lambda self: self.config.n_layers)
    n_heads = property(lambda self: self.config.n_heads)
    dropout = property(lambda self: self.config.dropout)
    dim_feedforward = property(lambda self: self.config.dim_feedforward)
    wavelengths_um = property(lambda self: self.config.wavelengths_um)

    @property
    def params(self) -> dict:
        """The ``params`` record of the last fit (architecture and training settings), as stored in ``uns``."""
        from ..._utils import params_record

        arch = self.config.to_dict()
        del arch["dim_feedforward"]
        return params_record(**{**self.fit_params, **arch})

    def __repr__(self) -> str:
        state = f"{len(self.classes)} classes" if self.classes else "not trained"
        return (
            f"CellTypeClassifier(arch={self.arch!r}, d_model={self.d_model}, n_layers={self.n_layers}, "
            f"n_heads={self.n_heads}; {state})"
        )

    # ------------------------------------------------------------------ the base's hooks
    def _build_module(self) -> CellClassifierModule:
        c = self.config
        return CellClassifierModule(
            c.arch, len(self.classes), gene_dim=self.gene_dim, morph_dim=self.morph_dim, d_model=c.d_model,
            n_layers=c.n_layers, n_heads=c.n_heads, dim_feedforward=c.dim_feedforward, dropout=c.dropout,
            wavelengths_um=c.wavelengths_um,
        )  # fmt: skip

    def _get_state(self) -> dict:
        return {
            "classes": list(self.classes),
            "gene_dim": self.gene_dim,
            "morph_dim": self.morph_dim,
            "gene_rep": self.gene_rep,
            "morph_rep": self.morph_rep,
            "label_key": self.label_key,
            "test_macro_f1": None if self.metrics is None else float(self.metrics["macro_f1"]),
        }

    def _set_state(self, state) -> None:
        self.classes = [str(c) for c in state["classes"]]
        self.gene_dim, self.morph_dim = state.get("gene_dim"), state.get("morph_dim")
        self.gene_rep, self.morph_rep = state.get("gene_rep"), state.get("morph_rep")
        self.label_key = state.get("label_key")

    def _weights_identity(self) -> dict[str, str]:
        return {"classes": "\x1f".join(self.classes)}

    def _weights_shapes(self) -> dict[str, tuple[int, str]]:
        n = len(self.classes)
        return {"head.weight": (n, "classes"), "head.bias": (n, "classes")}

    @classmethod
    def _upgrade(cls, meta: dict, path: Path) -> dict:
        if meta.get("format") == FORMAT and int(meta.get("format_version", 0)) == 1:  # flat layout of 0.1
            deprecated_layout(path, "format-1 CellTypeClassifier")
            names = [f.name for f in dataclasses.fields(ClassifierConfig)]
            state_keys = ("classes", "gene_dim", "morph_dim", "gene_rep", "morph_rep", "label_key", "test_macro_f1")
            return {
                "format": FORMAT,
                "format_version": 1,
                "cellsymphony_version": meta.get("cellsymphony_version"),
                "config": {k: meta[k] for k in names if k in meta},
                "state": {k: meta.get(k) for k in state_keys},
                "history": meta.get("history") or {},
            }
        return meta

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _tensors(inputs, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        out = {}
        for name, x in (("gene", inputs.gene), ("morph", inputs.morph), ("coords", inputs.coords)):
            if x is not None:
                out[name] = torch.as_tensor(np.ascontiguousarray(x[rows]), dtype=torch.float32, device=device)
        return out

    @torch.no_grad()
    def _proba(
        self, source, device: torch.device, batch_size: int, rows: np.ndarray | None = None, desc: str | None = None
    ) -> np.ndarray:
        """Class probabilities, batched on ``device``: of the rows held in ``source`` (tensors, e.g. the
        test cells kept on the device during training), or with ``rows`` of the inputs ``source``, taken
        batch by batch so that no copy of the whole section's inputs is made. ``desc`` shows a progress bar
        (in cells)."""
        from tqdm.auto import tqdm

        module = self.module.to(device).eval()
        n = len(rows) if rows is not None else len(next(iter(source.values())))
        out = np.empty((n, len(self.classes)), dtype=np.float32)
        with tqdm(total=n, desc=desc, unit="cell", disable=desc is None or not settings.progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                if rows is None:
                    batch = {k: v[start : start + batch_size] for k, v in source.items()}
                else:
                    batch = self._tensors(source, rows[start : start + batch_size], device)
                with autocast(device):
                    logits = module(**batch)
                out[start : start + len(logits)] = torch.softmax(logits.float(), dim=1).cpu().numpy()
                bar.update(len(logits))
        return out

    # ------------------------------------------------------------------ training
    def fit(
        self,
        mdata,
        label_key: str,
        *,
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
        class_weight: Literal["balanced"] | None = "balanced",
        early_stopping: bool = False,
        patience: int = 5,
        seed: int = 0,
        device: str | None = None,
        key_added=_UNSET,
    ) -> CellTypeClassifier:
        """Train on the labelled cells of ``mdata`` and evaluate on its test split.

        See :func:`cellsymphony.tl.train_classifier` for the parameters (the same names and defaults, one
        definition: :class:`~cellsymphony.models.classifier._config.ClassifierTraining`); ``split`` may also
        be a per-cell array of ``"train"`` / ``"test"`` / ``"unused"`` (e.g. the ``obs["cs_pred_split"]`` of
        an earlier run, to compare models on identical cells). The model reads ``mdata`` and does not write
        into it: ``cs.tl.train_classifier`` writes the predictions. ``key_added`` is deprecated (with a
        name, or left out, the outputs are still written, with a warning; ``None`` writes nothing). Returns
        ``self``.
        """
        training = training_from(locals())
        self._fit(mdata, label_key, training)
        if key_added is not None:
            key = "cs_pred" if key_added is _UNSET else key_added
            warnings.warn(
                "CellTypeClassifier.fit writing into the MuData is deprecated: models no longer write their "
                f"outputs. Use cs.tl.train_classifier(mdata, {label_key!r}, ...) to train and write obs[{key!r}], "
                f"or model.fit(..., key_added=None) then model.predict(mdata, key_added={key!r}).",
                FutureWarning,
                stacklevel=2,
            )
            from ..._results import write_classifier

            write_classifier(mdata, self, key, function="tl.train_classifier")
        return self

    def _fit(self, mdata, label_key: str, training: ClassifierTraining) -> None:
        dev = torch.device(resolve_device(training.device))
        prep = prepare(mdata, label_key, self.tokens, training)
        inputs, classes = prep.inputs, prep.classes
        train_rows, test_rows = prep.train_rows, prep.test_rows
        if len(train_rows) == 0:
            raise ValueError("The split leaves no training cells.")
        if len(test_rows) == 0:
            warnings.warn("The split leaves no test cells: test metrics are NaN.", UserWarning, stacklevel=3)
        self.classes, self.label_key = classes, label_key
        self.gene_rep, self.morph_rep = inputs.gene_rep, inputs.morph_rep
        self.gene_dim = None if inputs.gene is None else int(inputs.gene.shape[1])
        self.morph_dim = None if inputs.morph is None else int(inputs.morph.shape[1])
        self._record_inputs(mdata, {"rna": (self.gene_rep, self.gene_dim), "morphology": (self.morph_rep, self.morph_dim)})
        logger.info(
            "classifier %r: %d training and %d test cells, %d classes; %d cells left out (%s)",
            self.arch, len(train_rows), len(test_rows), len(classes), sum(prep.exclusions.values()),
            ", ".join(f"{k}: {v}" for k, v in prep.exclusions.items()),
        )  # fmt: skip

        # ---- class weights from the training cells
        counts = np.bincount(prep.y[train_rows], minlength=len(classes)).astype(np.float64)
        if (counts == 0).any():
            warnings.warn(
                f"Classes {[c for c, n in zip(classes, counts, strict=True) if n == 0]} have no training cells: "
                "the model cannot predict them.",
                UserWarning,
                stacklevel=3,
            )
        if training.class_weight == "balanced":
            weights = np.where(counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0)
        else:
            weights = np.ones(len(classes))
        w = torch.as_tensor(weights, dtype=torch.float32, device=dev)

        with seeded(training.seed, dev):
            self.module = self._build_module()
            for name, x in (("gene", inputs.gene), ("morph", inputs.morph)):
                if x is not None:
                    self.module.set_standardization(name, *standardization(x[train_rows]))
            self.module.to(dev)
            train = self._tensors(inputs, train_rows, dev)
            test = self._tensors(inputs, test_rows, dev) if len(test_rows) else None
            y_train = torch.as_tensor(prep.y[train_rows], device=dev)
            y_test = prep.y[test_rows]
            bs, n = training.batch_size, len(train_rows)

            def batches(gen):
                order = torch.randperm(n, generator=gen).to(dev)
                for start in range(0, n, bs):
                    idx = order[start : start + bs]
                    yield {k: v[idx] for k, v in train.items()}, y_train[idx]

            def loss(batch):
                x, y = batch
                return F.cross_entropy(self.module(**x).float(), y, weight=w)

            def evaluate():
                if test is None:
                    return {"test_loss": np.nan, "test_macro_f1": np.nan, "test_accuracy": np.nan}
                proba = self._proba(test, dev, max(bs, PREDICT_BATCH))
                logp = torch.log(torch.from_numpy(proba).clamp_min(1e-12))
                m = classification_metrics(y_test, proba.argmax(1), classes)
                test_loss = float(F.nll_loss(logp, torch.as_tensor(y_test), weight=w.cpu()))
                return {"test_loss": test_loss, "test_macro_f1": m["macro_f1"], "test_accuracy": m["accuracy"]}

            self.history = self._fit_loop(
                batches=batches, loss=loss, evaluate=evaluate, batch_len=lambda b: len(b[1]), n_train=n,
                epochs=training.epochs, lr=training.lr, weight_decay=training.weight_decay, seed=training.seed,
                device=dev, early_stopping=training.early_stopping, patience=training.patience,
                desc=f"classifier {self.arch}",
            )  # fmt: skip

        # ---- metrics on the test split
        self.test_proba = (
            self._proba(self._tensors(inputs, test_rows, dev), dev, max(training.batch_size, PREDICT_BATCH))
            if len(test_rows) else np.zeros((0, len(classes)), dtype=np.float32)
        )  # fmt: skip
        pred = self.test_proba.argmax(axis=1)
        self.metrics = classification_metrics(prep.y[test_rows], pred, classes)
        self.metrics_table = classification_table(self.arch, prep.y[test_rows], pred, inputs.samples[test_rows], classes)
        self.split = prep.split
        self.exclusions = prep.exclusions
        self.fit_params = json_safe({
            "label_key": label_key, **training.record(), "gene_rep": self.gene_rep, "morph_rep": self.morph_rep,
            "device": str(dev),
        })  # fmt: skip
        logger.info(
            "classifier %r: test macro F1 %.3f, weighted F1 %.3f", self.arch, self.metrics["macro_f1"], self.metrics["weighted_f1"]
        )

    # ------------------------------------------------------------------ outputs
    def _labels(self, proba: np.ndarray) -> pd.Categorical:
        """The most probable class of each row; missing for rows without probabilities (NaN inputs)."""
        has = np.isfinite(proba).all(axis=1)
        pred = np.full(len(proba), None, dtype=object)
        pred[has] = np.asarray(self.classes, dtype=object)[proba[has].argmax(axis=1)]
        return pd.Categorical(pred, categories=self.classes)

    def _model_record(self) -> dict:
        rec = {
            "arch": self.arch,
            "label_key": self.label_key,
            "gene_rep": self.gene_rep,
            "morph_rep": self.morph_rep,
            "gene_dim": int(self.gene_dim or 0),
            "morph_dim": int(self.morph_dim or 0),
        }
        return {k: v for k, v in rec.items() if v is not None}

    # ------------------------------------------------------------------ inference
    def _predict_inputs(self, mdata, gene_rep, morph_rep, allow_mismatch: bool = False):
        self._check_trained()
        inputs = gather_inputs(
            mdata,
            self.tokens,
            gene_rep if gene_rep is not None else self.gene_rep,
            morph_rep if morph_rep is not None else self.morph_rep,
        )
        self._check_provenance(mdata, {"rna": inputs.gene_rep, "morphology": inputs.morph_rep},
                               allow_mismatch=allow_mismatch, stacklevel=5)  # fmt: skip
        for name, x, dim, rep in (
            ("expression", inputs.gene, self.gene_dim, inputs.gene_rep),
            ("morphology", inputs.morph, self.morph_dim, inputs.morph_rep),
        ):
            if x is not None and x.shape[1] != dim:
                raise ValueError(
                    f"The {name} representation {rep!r} has {x.shape[1]} dimensions but the classifier was "
                    f"trained on {dim} ({name} embedding from the same encoder needed)."
                )
        return inputs

    def predict_proba(
        self,
        mdata,
        *,
        gene_rep: str | None = None,
        morph_rep: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        allow_mismatch: bool = False,
    ) -> pd.DataFrame:
        """Class probabilities of every cell (rows ``mdata.obs_names``, columns the classes).

        Cells lacking an input the architecture reads get NaN rows. ``gene_rep`` / ``morph_rep``
        default to the keys the model was trained on; ``device`` to where the weights are. Embeddings made
        by another producer than those of training are refused unless ``allow_mismatch=True`` (see
        :meth:`predict`).
        """
        from ..._validate import check_int

        batch_size = check_int("batch_size", batch_size, min=1, none=True, hint="default 1024")
        inputs = self._predict_inputs(mdata, gene_rep, morph_rep, allow_mismatch)
        dev = torch.device(resolve_device(device) if device is not None else self.device)
        avail = np.flatnonzero(inputs.available)
        if len(avail) < mdata.n_obs:
            logger.info(
                "%d of %d cells lack an input of the %r classifier (%s): no prediction for them",
                mdata.n_obs - len(avail), mdata.n_obs, self.arch,
                ", ".join(f"{k}: {v}" for k, v in inputs.missing.items()),
            )  # fmt: skip
        proba = np.full((mdata.n_obs, len(self.classes)), np.nan, dtype=np.float32)
        t0 = time.perf_counter()
        proba[avail] = self._proba(inputs, dev, batch_size or PREDICT_BATCH, rows=avail, desc=f"classifier {self.arch}: predict")
        log_seconds(f"classifier {self.arch} predict", time.perf_counter() - t0, n_cells=len(avail))
        return pd.DataFrame(proba, index=mdata.obs_names, columns=pd.Index(self.classes))

    def predict(
        self,
        mdata,
        *,
        key_added: str | None = "cs_pred",
        gene_rep: str | None = None,
        morph_rep: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        allow_mismatch: bool = False,
    ) -> pd.Series:
        """Predict the cell type of every cell of ``mdata`` (any section, with the embeddings the model reads).

        A model of ``arch="morphology"`` needs only the morphology modality, so it applies to a
        MuData made from an H&E-only slide (``cs.io.read_he_cells`` + ``cs.pp.embed_morphology``).

        Parameters
        ----------
        mdata
            MuData (or, for ``"unimodal"`` / ``"morphology"``, the AnnData of that modality).
        key_added
            Write ``obs[key_added]`` (categorical prediction), ``obsm[f"{key_added}_proba"]``
            (probabilities, columns in the order of ``uns[key_added]["classes"]``) and
            ``uns[key_added]`` (``classes`` and ``model``: architecture, representations, dimensions),
            through the writer of :func:`cellsymphony.tl.train_classifier`. ``None`` writes nothing.
        gene_rep, morph_rep
            Representations to read; by default the keys the model was trained on.
        batch_size
            Cells per forward pass (1024 by default).
        device
            Torch device; ``None`` runs where the weights are.
        allow_mismatch
            Predict even when an input embedding was made by another producer than the one the model was
            trained on (another model, weights checksum or patch geometry: the fingerprints recorded at
            training, see the classifiers page), with a warning; by default that is a ``ValueError`` naming
            both fingerprints.

        Returns
        -------
        The predictions as a categorical Series indexed like ``mdata.obs`` (NaN for cells without the
        needed inputs).
        """
        proba = self.predict_proba(mdata, gene_rep=gene_rep, morph_rep=morph_rep, batch_size=batch_size, device=device,
                                   allow_mismatch=allow_mismatch)  # fmt: skip
        arr = proba.to_numpy()
        if key_added is not None:
            from ..._results import write_predictions

            write_predictions(mdata, self, key_added, arr)
        return pd.Series(self._labels(arr), index=mdata.obs_names, name=key_added)
