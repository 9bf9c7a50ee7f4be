"""The classifier's settings, defined once (no torch): the architecture (:class:`ClassifierConfig`, saved with
the model) and the data and training settings (:class:`ClassifierTraining`).

``cs.tl.train_classifier``, :meth:`CellTypeClassifier.fit` and ``cs.tl.compare_classifiers`` build these
from their keyword arguments; their signatures list the same names with the same defaults
(``tests/test_classifier.py`` checks it), so the three entry points cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..._validate import check_choice, check_float, check_int
from .._config import ModelConfig
from ._data import SPLITS, check_test_size

ARCHS = ("unimodal", "spatial", "dual", "multi_input", "morphology")
# Wavelengths (micrometres) of the sinusoidal spatial encoding. The shortest, 50 um, is a few cell
# diameters (local neighbourhood); the longest, 25 mm, exceeds the whole Xenium imaging area
# (about 10.5 x 22.5 mm), so with coordinates centred on the section the pair (sin, cos) at 25 mm is
# one-to-one over any section and the long wavelengths encode the position in the tissue (e.g.
# cortex vs medulla) smoothly. The ones between resolve tissue compartments of 0.1 - 10 mm.
DEFAULT_WAVELENGTHS_UM: tuple[float, ...] = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 25000.0)


@dataclasses.dataclass
class ClassifierConfig(ModelConfig):
    """Architecture of a :class:`~cellsymphony.models.CellTypeClassifier` (see its parameters)."""

    arch: str = "dual"
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    dropout: float = 0.1
    dim_feedforward: int | None = None
    wavelengths_um: Sequence[float] | None = None

    def __post_init__(self):
        check_choice("arch", self.arch, ARCHS)
        for name in ("d_model", "n_layers", "n_heads"):
            _positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}.")
        self.dropout = check_float("dropout", self.dropout, min=0, max=1, max_open=True)
        self.d_model, self.n_layers, self.n_heads = int(self.d_model), int(self.n_layers), int(self.n_heads)
        if self.dim_feedforward is not None:
            _positive_int("dim_feedforward", self.dim_feedforward)
        self.dim_feedforward = int(self.dim_feedforward or 4 * self.d_model)
        wl = [float(w) for w in (self.wavelengths_um if self.wavelengths_um is not None else DEFAULT_WAVELENGTHS_UM)]
        if not wl or min(wl) <= 0:
            raise ValueError(f"wavelengths_um={self.wavelengths_um!r} must be positive micrometres.")
        self.wavelengths_um = wl


@dataclasses.dataclass
class ClassifierTraining:
    """Inputs, split and training settings of a classifier fit (see :func:`cellsymphony.tl.train_classifier`).

    ``split`` is ``"random"``, ``"spatial"``, ``"sample"`` or a per-cell array of ``"train"`` / ``"test"`` /
    ``"unused"``.
    """

    gene_rep: str | None = None
    morph_rep: str | None = None
    exclude: Sequence[str] = ("ambiguous",)
    confident_key: str | None = None
    split: Any = "random"
    test_size: float = 0.2
    block_size: float | None = None
    test_samples: Sequence[str] | None = None
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-5
    weight_decay: float = 0.01
    class_weight: str | None = "balanced"
    early_stopping: bool = False
    patience: int = 5
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(str(e) for e in self.exclude)
        if isinstance(self.split, str):
            check_choice("split", self.split, SPLITS)
        check_test_size(self.test_size)
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("patience", self.patience)
        self.lr = check_float("lr", self.lr, min=0, min_open=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, min=0)
        self.seed = check_int("seed", self.seed)
        if self.class_weight not in ("balanced", None):
            raise ValueError(f"class_weight={self.class_weight!r} is not one of ['balanced', None].")
        self.block_size = check_float("block_size", self.block_size, min=0, min_open=True, none=True, unit="um")
        self.epochs, self.batch_size, self.patience = int(self.epochs), int(self.batch_size), int(self.patience)
        self.test_samples = None if self.test_samples is None else tuple(str(s) for s in self.test_samples)

    @property
    def split_name(self) -> str:
        """The split as recorded: its name, or ``"custom"`` for a per-cell array."""
        return self.split if isinstance(self.split, str) else "custom"

    def record(self) -> dict[str, Any]:
        """The settings as a ``params`` record (the per-cell split array as ``"custom"``)."""
        out = dataclasses.asdict(self)
        out["split"] = self.split_name
        out["test_size"], out["lr"], out["weight_decay"] = float(self.test_size), float(self.lr), float(self.weight_decay)
        return out


def _positive_int(name: str, v) -> None:
    check_int(name, v, min=1)


def settings_names() -> tuple[set[str], set[str]]:
    """The field names of the two dataclasses: (architecture, training)."""
    return {f.name for f in dataclasses.fields(ClassifierConfig)}, {f.name for f in dataclasses.fields(ClassifierTraining)}


def training_from(arguments: dict[str, Any]) -> ClassifierTraining:
    """The :class:`ClassifierTraining` of an entry point's arguments (its ``locals()``): the one place where
    the training settings are picked out of a signature."""
    return ClassifierTraining(**{f.name: arguments[f.name] for f in dataclasses.fields(ClassifierTraining)})
