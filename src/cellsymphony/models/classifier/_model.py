"""``CellTypeClassifier``: the MuData-aware wrapper (fit / predict / save / load) of the classifier module."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..._joint import push_joint_obs
from ..._settings import logger, resolve_device, settings
from ..._utils import atomic_path, package_version, params_record
from ..._validate import check_choice
from ._data import (
    SPLITS,
    TEST,
    TRAIN,
    UNUSED,
    check_test_size,
    gather_inputs,
    make_split,
    section_coordinates,
    split_from_array,
    usable_labels,
)
from ._metrics import classification_metrics
from ._module import ARCHS, DEFAULT_WAVELENGTHS_UM, CellClassifierModule, arch_tokens

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "cellsymphony.CellTypeClassifier"
FORMAT_VERSION = 1
PREDICT_BATCH = 1024


def _autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where the torch build supports it for ``device`` (CPU: about 2-3x
    faster steps for the 20 M-parameter paper-size model), else the default implementation."""
    params = list(params)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


class CellTypeClassifier:
    """Transformer cell-type classifier on expression / morphology embeddings and cell positions.

    Build it with :func:`cellsymphony.tl.train_classifier` (or ``CellTypeClassifier(arch).fit(mdata,
    label_key)``), apply it to any section with :meth:`predict`, keep it with :meth:`save` and
    :meth:`load`. The network is :class:`~cellsymphony.models.classifier._module.CellClassifierModule`.

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
        ``None`` uses 50 um to 25 mm (see :data:`~cellsymphony.models.classifier._module.DEFAULT_WAVELENGTHS_UM`).
    """

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
        check_choice("arch", arch, ARCHS)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}.")
        self.arch = arch
        self.tokens = arch_tokens(arch)
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.dropout = float(dropout)
        self.dim_feedforward = int(dim_feedforward or 4 * d_model)
        self.wavelengths_um = [float(w) for w in (wavelengths_um or DEFAULT_WAVELENGTHS_UM)]
        self.module: CellClassifierModule | None = None
        self.classes: list[str] | None = None
        self.gene_dim: int | None = None
        self.morph_dim: int | None = None
        self.gene_rep: str | None = None
        self.morph_rep: str | None = None
        self.label_key: str | None = None
        self.history: dict[str, np.ndarray] | None = None
        self.metrics: dict | None = None
        self.split: np.ndarray | None = None
        self.exclusions: dict[str, int] | None = None
        self.params: dict | None = None
        self.saved_version: str | None = None
        # wall-clock seconds of the last fit (per epoch, with its test evaluation; predicting every cell), for
        # benchmarks; not saved with the model (they vary between runs)
        self.timings: dict = {}

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        state = f"{len(self.classes)} classes" if self.classes else "not trained"
        return (
            f"CellTypeClassifier(arch={self.arch!r}, d_model={self.d_model}, n_layers={self.n_layers}, "
            f"n_heads={self.n_heads}; {state})"
        )

    @property
    def is_trained(self) -> bool:
        return self.module is not None

    def _check_trained(self) -> None:
        if self.module is None:
            raise ValueError("The classifier is not trained: call .fit (or cs.tl.train_classifier) or .load first.")

    def _build_module(self) -> CellClassifierModule:
        return CellClassifierModule(
            self.arch,
            len(self.classes),
            gene_dim=self.gene_dim,
            morph_dim=self.morph_dim,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            wavelengths_um=self.wavelengths_um,
        )

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
                with _autocast(device):
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
        seed: int = 0,
        device: str | None = None,
        key_added: str | None = "cs_pred",
    ) -> CellTypeClassifier:
        """Train on the labelled cells of ``mdata`` and (with ``key_added``) write the outputs.

        See :func:`cellsymphony.tl.train_classifier` for the parameters and the outputs; ``split`` may
        also be a per-cell array of ``"train"`` / ``"test"`` / ``"unused"`` (e.g. the
        ``obs["cs_pred_split"]`` of an earlier run, to compare models on identical cells), and
        ``key_added=None`` writes nothing. Returns ``self``.
        """
        # ---- validate everything before writing anything
        if isinstance(exclude, str):
            exclude = (exclude,)
        exclude = tuple(str(e) for e in exclude)
        if isinstance(split, str):
            check_choice("split", split, SPLITS)
        check_test_size(test_size)
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
        if class_weight not in ("balanced", None):
            raise ValueError(f"class_weight={class_weight!r} is not one of ['balanced', None].")
        dev = torch.device(resolve_device(device))
        self.timings = {}

        inputs = gather_inputs(mdata, self.tokens, gene_rep, morph_rep)
        labels, exclusions = usable_labels(mdata, label_key, exclude, confident_key, inputs.available)
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
            coords_abs = section_coordinates(mdata) if split == "spatial" else None
            split_arr = make_split(
                labels,
                split=split,
                test_size=test_size,
                seed=seed,
                samples=inputs.samples,
                coords_abs=coords_abs,
                block_size=block_size,
                test_samples=test_samples,
            )
        train_rows = np.flatnonzero(split_arr == TRAIN)
        test_rows = np.flatnonzero(split_arr == TEST)
        if len(train_rows) == 0:
            raise ValueError("The split leaves no training cells.")
        if len(test_rows) == 0:
            warnings.warn("The split leaves no test cells: test metrics are NaN.", UserWarning, stacklevel=2)

        self.classes = classes
        self.label_key = label_key
        self.gene_rep, self.morph_rep = inputs.gene_rep, inputs.morph_rep
        self.gene_dim = None if inputs.gene is None else int(inputs.gene.shape[1])
        self.morph_dim = None if inputs.morph is None else int(inputs.morph.shape[1])
        y_all = np.full(mdata.n_obs, -1, dtype=np.int64)
        lab_rows = np.flatnonzero(pd.notna(labels))
        y_all[lab_rows] = pd.Categorical(labels[lab_rows], categories=classes).codes

        n_left = sum(exclusions.values())
        logger.info(
            "classifier %r: %d training and %d test cells, %d classes; %d cells left out (%s)",
            self.arch,
            len(train_rows),
            len(test_rows),
            len(classes),
            n_left,
            ", ".join(f"{k}: {v}" for k, v in exclusions.items()),
        )

        # ---- class weights from the training cells
        counts = np.bincount(y_all[train_rows], minlength=len(classes)).astype(np.float64)
        if (counts == 0).any():
            warnings.warn(
                f"Classes {[c for c, n in zip(classes, counts, strict=True) if n == 0]} have no training cells: "
                "the model cannot predict them.",
                UserWarning,
                stacklevel=2,
            )
        if class_weight == "balanced":
            weights = np.where(counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0)
        else:
            weights = np.ones(len(classes))

        with torch.random.fork_rng(devices=_rng_devices(dev)):
            torch.manual_seed(seed)
            self.module = self._build_module()
            for name, x in (("gene", inputs.gene), ("morph", inputs.morph)):
                if x is not None:
                    xt = x[train_rows]
                    self.module.set_standardization(name, torch.from_numpy(xt.mean(0)), torch.from_numpy(xt.std(0)))
            self.history = self._train(
                inputs, y_all, train_rows, test_rows, weights, dev, epochs, batch_size, lr, weight_decay, seed
            )

        # ---- predictions for every cell with the inputs, metrics on the test split
        avail = np.flatnonzero(inputs.available)
        proba = np.full((mdata.n_obs, len(classes)), np.nan, dtype=np.float32)
        bs = max(batch_size, PREDICT_BATCH)
        t_pred = time.perf_counter()
        proba[avail] = self._proba(inputs, dev, bs, rows=avail, desc=f"classifier {self.arch}: predict")
        self.timings["predict"] = time.perf_counter() - t_pred
        pred = proba[test_rows].argmax(axis=1) if len(test_rows) else np.zeros(0, dtype=np.int64)
        self.metrics = classification_metrics(y_all[test_rows], pred, classes)
        self.split = split_arr
        self.exclusions = exclusions
        self._fit_proba = proba
        self._fit_labels = y_all
        self.params = params_record(
            arch=self.arch,
            label_key=label_key,
            gene_rep=self.gene_rep,
            morph_rep=self.morph_rep,
            exclude=exclude,
            confident_key=confident_key,
            split=split if isinstance(split, str) else "custom",
            test_size=float(test_size),
            block_size=block_size,
            test_samples=tuple(test_samples) if test_samples is not None else None,
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            weight_decay=float(weight_decay),
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            dropout=self.dropout,
            wavelengths_um=tuple(self.wavelengths_um),
            class_weight=class_weight,
            seed=int(seed),
            device=str(dev),
        )
        logger.info(
            "classifier %r: test macro F1 %.3f, weighted F1 %.3f", self.arch, self.metrics["macro_f1"], self.metrics["weighted_f1"]
        )
        if key_added is not None:
            self._write(mdata, key_added, proba, split_arr, train_info=True)
        return self

    def _train(self, inputs, y_all, train_rows, test_rows, weights, dev, epochs, batch_size, lr, weight_decay, seed):
        from tqdm.auto import tqdm

        module = self.module.to(dev)
        train = self._tensors(inputs, train_rows, dev)
        test = self._tensors(inputs, test_rows, dev) if len(test_rows) else None
        y_train = torch.as_tensor(y_all[train_rows], device=dev)
        y_test = y_all[test_rows]
        w = torch.as_tensor(weights, dtype=torch.float32, device=dev)
        opt = make_adamw(module.parameters(), lr, weight_decay, dev)
        gen = torch.Generator().manual_seed(int(seed))
        n = len(train_rows)
        hist = {k: np.full(epochs, np.nan) for k in ("train_loss", "test_loss", "test_macro_f1", "test_accuracy")}
        # one bar over every training cell of every epoch: an epoch of a whole section is long on a CPU
        bar = tqdm(total=epochs * n, desc=f"classifier {self.arch}", unit="cell", disable=not settings.progress,
                   leave=False, mininterval=1.0)  # fmt: skip
        self.timings["epochs"] = []
        for epoch in range(epochs):
            t_epoch = time.perf_counter()
            bar.set_description(f"classifier {self.arch}: epoch {epoch + 1}/{epochs}")
            module.train()
            order = torch.randperm(n, generator=gen).to(dev)
            total = torch.zeros((), device=dev)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = {k: v[idx] for k, v in train.items()}
                with _autocast(dev):
                    logits = module(**batch)
                loss = F.cross_entropy(logits.float(), y_train[idx], weight=w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
                bar.update(len(idx))
            hist["train_loss"][epoch] = float(total) / n
            if test is not None:
                proba = self._proba(test, dev, max(batch_size, PREDICT_BATCH))
                logp = torch.log(torch.from_numpy(proba).clamp_min(1e-12))
                hist["test_loss"][epoch] = float(F.nll_loss(logp, torch.as_tensor(y_test), weight=w.cpu()))
                m = classification_metrics(y_test, proba.argmax(1), self.classes)
                hist["test_macro_f1"][epoch] = m["macro_f1"]
                hist["test_accuracy"][epoch] = m["accuracy"]
            bar.set_postfix(loss=f"{hist['train_loss'][epoch]:.3f}", f1=f"{hist['test_macro_f1'][epoch]:.3f}")
            self.timings["epochs"].append(time.perf_counter() - t_epoch)
            logger.debug(
                "epoch %d: train loss %.4f, test loss %.4f, test macro F1 %.4f",
                epoch,
                hist["train_loss"][epoch],
                hist["test_loss"][epoch],
                hist["test_macro_f1"][epoch],
            )
        bar.close()
        return hist

    # ------------------------------------------------------------------ outputs
    def _labels(self, proba: np.ndarray) -> pd.Categorical:
        """The most probable class of each row; missing for rows without probabilities (NaN inputs)."""
        has = np.isfinite(proba).all(axis=1)
        pred = np.full(len(proba), None, dtype=object)
        pred[has] = np.asarray(self.classes, dtype=object)[proba[has].argmax(axis=1)]
        return pd.Categorical(pred, categories=self.classes)

    def _write(self, mdata, key_added: str, proba: np.ndarray, split_arr: np.ndarray | None, train_info: bool) -> None:
        mdata.obs[key_added] = self._labels(proba)
        mdata.obsm[f"{key_added}_proba"] = proba
        written = [f"obs[{key_added!r}]", f"obsm[{key_added + '_proba'!r}]"]
        block = {"classes": np.asarray(self.classes, dtype=object), "model": self._model_record()}
        if split_arr is not None:
            mdata.obs[f"{key_added}_split"] = pd.Categorical(split_arr, categories=[TRAIN, TEST, UNUSED])
            written.append(f"obs[{key_added + '_split'!r}]")
        if train_info:
            m = self.metrics
            block.update(
                params=self.params,
                history={k: np.asarray(v, dtype=np.float64) for k, v in self.history.items()},
                metrics={
                    "per_class": m["per_class"],
                    "macro_f1": m["macro_f1"],
                    "weighted_f1": m["weighted_f1"],
                    "accuracy": m["accuracy"],
                    "n_test": m["n"],
                    "confusion": m["confusion"],
                },
                exclusions={k: int(v) for k, v in self.exclusions.items()},
            )
        mdata.uns[key_added] = block
        push_joint_obs(mdata, [key_added, f"{key_added}_split"])
        written.append(f"uns[{key_added!r}]")
        logger.info("added %s to the %s", ", ".join(written), type(mdata).__name__)

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
    def _predict_inputs(self, mdata, gene_rep, morph_rep):
        self._check_trained()
        inputs = gather_inputs(
            mdata,
            self.tokens,
            gene_rep if gene_rep is not None else self.gene_rep,
            morph_rep if morph_rep is not None else self.morph_rep,
        )
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
    ) -> pd.DataFrame:
        """Class probabilities of every cell (rows ``mdata.obs_names``, columns the classes).

        Cells lacking an input the architecture reads get NaN rows. ``gene_rep`` / ``morph_rep``
        default to the keys the model was trained on.
        """
        inputs = self._predict_inputs(mdata, gene_rep, morph_rep)
        dev = torch.device(resolve_device(device))
        avail = np.flatnonzero(inputs.available)
        if len(avail) < mdata.n_obs:
            logger.info(
                "%d of %d cells lack an input of the %r classifier (%s): no prediction for them",
                mdata.n_obs - len(avail),
                mdata.n_obs,
                self.arch,
                ", ".join(f"{k}: {v}" for k, v in inputs.missing.items()),
            )
        proba = np.full((mdata.n_obs, len(self.classes)), np.nan, dtype=np.float32)
        proba[avail] = self._proba(inputs, dev, batch_size or PREDICT_BATCH, rows=avail, desc=f"classifier {self.arch}: predict")
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
            ``uns[key_added]`` (``classes`` and ``model``: architecture, representations, dimensions).
            ``None`` writes nothing.
        gene_rep, morph_rep
            Representations to read; by default the keys the model was trained on.
        batch_size
            Cells per forward pass (1024 by default).
        device
            Torch device; ``None`` uses ``cs.settings.device``.

        Returns
        -------
        The predictions as a categorical Series indexed like ``mdata.obs`` (NaN for cells without the
        needed inputs).
        """
        proba = self.predict_proba(mdata, gene_rep=gene_rep, morph_rep=morph_rep, batch_size=batch_size, device=device)
        arr = proba.to_numpy()
        if key_added is not None:
            self._write(mdata, key_added, arr, None, train_info=False)
        return pd.Series(self._labels(arr), index=mdata.obs_names, name=key_added)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """Everything needed to rebuild the model, as JSON-ready values."""
        self._check_trained()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cellsymphony_version": package_version(),
            "arch": self.arch,
            "tokens": list(self.tokens),
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "dim_feedforward": self.dim_feedforward,
            "dropout": self.dropout,
            "wavelengths_um": self.wavelengths_um,
            "classes": list(self.classes),
            "gene_dim": self.gene_dim,
            "morph_dim": self.morph_dim,
            "gene_rep": self.gene_rep,
            "morph_rep": self.morph_rep,
            "label_key": self.label_key,
            "history": {k: [float(x) for x in v] for k, v in (self.history or {}).items()},
            "test_macro_f1": None if self.metrics is None else float(self.metrics["macro_f1"]),
        }

    def save(self, dir_path: str | Path, overwrite: bool = False) -> Path:
        """Write the model to a directory: ``model.safetensors`` (weights) and ``config.json``
        (architecture, classes, embedding keys and dimensions, package version, training history).

        Parameters
        ----------
        dir_path
            Directory to write (created when missing).
        overwrite
            Replace the files of an existing model there; otherwise a ``FileExistsError``.

        Returns
        -------
        The directory path.
        """
        from safetensors.torch import save_file

        self._check_trained()
        d = Path(dir_path)
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"{d} exists and is not a directory.")
        if d.is_dir() and any(d.iterdir()) and not overwrite:
            raise FileExistsError(f"{d} is not empty: pass overwrite=True to replace the model there.")
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        with atomic_path(d / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT, "cellsymphony_version": package_version()})
        with atomic_path(d / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(self.config(), indent=2))
        logger.info("saved the %r classifier to %s", self.arch, d)
        return d

    @classmethod
    def load(cls, dir_path: str | Path, *, device: str | None = None) -> CellTypeClassifier:
        """Load a model written by :meth:`save`.

        Parameters
        ----------
        dir_path
            The directory.
        device
            Device to place the weights on; ``None`` keeps them on the CPU (moved at predict time).

        Returns
        -------
        The classifier, ready for :meth:`predict`.
        """
        from safetensors.torch import load_file

        d = Path(dir_path)
        cfg_path = d / CONFIG_FILE
        if not cfg_path.is_file() or not (d / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{d} has no {CONFIG_FILE} and {WEIGHTS_FILE}: not a saved CellTypeClassifier.")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_path} is not a CellTypeClassifier config (format {cfg.get('format')!r}).")
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{d} was written by a newer cellsymphony ({cfg.get('cellsymphony_version')}); upgrade to load it."
            )
        obj = cls(
            cfg["arch"],
            d_model=cfg["d_model"],
            n_layers=cfg["n_layers"],
            n_heads=cfg["n_heads"],
            dropout=cfg["dropout"],
            dim_feedforward=cfg["dim_feedforward"],
            wavelengths_um=cfg["wavelengths_um"],
        )
        obj.classes = list(cfg["classes"])
        obj.gene_dim, obj.morph_dim = cfg["gene_dim"], cfg["morph_dim"]
        obj.gene_rep, obj.morph_rep = cfg["gene_rep"], cfg["morph_rep"]
        obj.label_key = cfg.get("label_key")
        obj.history = {k: np.asarray(v) for k, v in cfg.get("history", {}).items()} or None
        obj.saved_version = cfg.get("cellsymphony_version")
        module = obj._build_module()
        module.load_state_dict(load_file(str(d / WEIGHTS_FILE)), strict=True)
        obj.module = module.to(resolve_device(device) if device is not None else "cpu").eval()
        return obj
