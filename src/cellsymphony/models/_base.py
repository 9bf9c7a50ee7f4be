"""The base of the trainable models (``CellTypeClassifier``, ``ContrastiveAligner``), in the manner of
scvi-tools' ``BaseModelClass``: a config dataclass, one ``save`` / ``load`` contract and one fit loop.

A model is a data-aware wrapper around a plain ``nn.Module`` (the ``_module.py`` of each model). It reads
MuData but never writes into it: the ``cs.tl`` function that trains it writes the per-cell outputs.

Saved folder (``save(dir_path)``)::

    model.safetensors   the module's state dict; its header holds the format name and the
                        model's identity fields (e.g. the class order), checked against config.json
    config.json         {"format", "format_version", "cellsymphony_version",
                         "config": the config dataclass, "state": what the model learned besides weights
                         (classes, input widths, ...), "inputs": the provenance of every input
                         representation (its key, width and the parameter record of its producer),
                         "fit_params", "history", "weights": {"model.safetensors": "sha256:..."}}

Rules, the same for every model:

- **overwrite**: ``save`` refuses an existing, non-empty folder unless ``overwrite=True``; then only the
  model's two files are replaced (each written atomically), other files are left alone;
- **device**: ``load(device=None)`` puts the weights on ``cs.settings.device``; ``predict`` / ``transform``
  run where the weights are unless given a ``device``;
- **integrity**: ``load`` verifies the sha256 of the weights file recorded in ``config.json`` and that the
  config and the weights describe the same model, with an error naming the file;
- **seeding**: ``fit(seed=...)`` seeds the initial weights, shuffling and dropout without changing the
  caller's global random state (``torch.random.fork_rng`` around a ``torch.Generator`` /
  ``numpy.random.Generator``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch

from .._errors import InputFileError, InputFileNotFoundError, reading
from .._provenance import rep_fingerprint
from .._settings import log_seconds, logger, resolve_device, settings
from .._utils import atomic_path, package_version
from ._config import ModelConfig, json_safe

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VERSION_KEY = "cellsymphony_version"  # the one key naming the package version, in config.json and headers
STD_EPS = 1e-6  # a feature whose training standard deviation is below this is centred, not scaled
DEFAULT_PATIENCE = 5
CHECKSUM_SINCE = 2  # the format version from which config.json records the sha256 of the weights


class NotASavedModelError(InputFileNotFoundError):
    """A folder that lacks the files of a saved model (a ``FileNotFoundError``; also a ``ValueError``, which
    ``ContrastiveAligner.load`` raised before the models shared one loader)."""


class ModelFilesMismatchError(ValueError):
    """The ``config.json`` and the weights of a saved model folder describe different models, or the weights
    do not match the checksum recorded at saving."""


# --------------------------------------------------------------------------------------------- helpers
def autocast(device: torch.device | str):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_adamw(params, lr: float, weight_decay: float, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where the torch build supports it for ``device`` (CPU: about 2-3x
    faster steps for the 20 M-parameter paper-size classifier), else the default implementation.
    ``params`` may be parameter groups (dicts with their own ``weight_decay``)."""
    params = list(params)
    if torch.device(device).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str) -> Iterator[None]:
    """Seed torch for the body (initial weights, dropout) and restore the caller's global state after."""
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def standardization(x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation of the training rows ``x``, as float32 tensors, with
    (nearly) constant features given a standard deviation of 1 (see :func:`safe_std`)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    return x.mean(0), safe_std(x.std(0))


def safe_std(std: torch.Tensor) -> torch.Tensor:
    """Standard deviations below ``1e-6`` become 1: a feature constant on the training cells is centred,
    not divided by ~0 (elsewhere it would be amplified about a million-fold)."""
    std = torch.as_tensor(std, dtype=torch.float32)
    return torch.where(std > STD_EPS, std, torch.ones_like(std))


def sha256_bytes(raw: bytes) -> str:
    """``sha256:<hex>`` of some bytes (the form of every checksum the package records)."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _verified_weights(name: str, meta: Mapping, d: Path, cfg_path: Path, *, legacy: bool) -> bytes:
    """The bytes of the weights file, after checking the sha256 of every file ``config.json`` lists under
    ``"weights"`` (a current-format config must list the weights file; a folder of an earlier layout, which
    recorded none, is read as it is)."""
    recorded = meta.get("weights")
    recorded = dict(recorded) if isinstance(recorded, Mapping) else {}
    if WEIGHTS_FILE not in recorded and not legacy:
        raise ModelFilesMismatchError(
            f"{cfg_path} records no sha256 of {WEIGHTS_FILE} (its 'weights' entry is missing or empty), so the "
            f"weights of this {name} cannot be verified: the config was edited after saving. Restore the folder "
            "from a copy, or train and save the model again."
        )
    raw = b""
    for fname, expected in recorded.items():
        path = d / str(fname)
        if Path(str(fname)).name != str(fname):
            raise InputFileError(cfg_path, f"the {name} config", f"its 'weights' entry names {fname!r}, which is not "
                                 "a file of the folder", "Restore the folder, or save the model again.")  # fmt: skip
        if not path.is_file():
            raise NotASavedModelError(path, f"the {name} weights", f"{cfg_path.name} lists it but it is missing",
                                      "Restore the folder, or save the model again.")  # fmt: skip
        data = path.read_bytes()
        if sha256_bytes(data) != expected:
            raise ModelFilesMismatchError(
                f"{path} does not match the checksum recorded in {cfg_path} ({sha256_bytes(data)} vs {expected}): "
                "the weights changed or were damaged after saving; restore the folder or save the model again."
            )
        if fname == WEIGHTS_FILE:
            raw = data
    return raw or (d / WEIGHTS_FILE).read_bytes()


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


# --------------------------------------------------------------------------------------------- the base
class BaseModel:
    """What every trainable model shares: config, module, history, provenance, save / load, fit loop.

    A subclass sets the class attributes and implements :meth:`_build_module`, :meth:`_get_state` and
    :meth:`_set_state` (see the docs' "Adding a model" for a sketch).

    Attributes
    ----------
    config
        The config dataclass (architecture and hyper-parameters).
    module
        The trained ``nn.Module`` (``None`` before :meth:`fit` or :meth:`load`).
    history
        One row per epoch: ``epoch``, ``train_loss``, ``test_loss`` and the model's other per-epoch scores.
    fit_params
        The training settings of the last :meth:`fit` (saved with the model).
    provenance
        Per modality, the input representation the model was trained on: ``key``, ``dim`` and ``params``
        (the producer's parameter record, with its model and weights checksum).
    best_epoch
        With early stopping, the epoch whose weights were kept (1-based); else the last epoch.
    device
        Where the weights are.
    saved_version
        The package version that saved a loaded model.
    """

    FORMAT: ClassVar[str]
    FORMAT_VERSION: ClassVar[int]
    CONFIG_CLASS: ClassVar[type[ModelConfig]]
    TRAINER: ClassVar[str]  # the cs.tl function that trains it, for messages
    HISTORY_COLUMNS: ClassVar[tuple[str, ...]] = ("epoch", "train_loss", "test_loss")
    AUTOCAST: ClassVar[bool] = True  # bf16 autocast of the training steps on CUDA

    def __init__(self, config: ModelConfig):
        self.config = config
        self.module: torch.nn.Module | None = None
        self.history = pd.DataFrame(columns=list(self.HISTORY_COLUMNS))
        self.fit_params: dict[str, Any] = {}
        self.provenance: dict[str, dict] = {}
        self.best_epoch: int | None = None
        self.device = "cpu"
        self.saved_version: str | None = None

    # ------------------------------------------------------------------ to implement
    def _build_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def _get_state(self) -> dict[str, Any]:
        """What the model learned besides the weights (JSON values), saved as ``config.json["state"]``."""
        raise NotImplementedError

    def _set_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _weights_identity(self) -> dict[str, str]:
        """Fields written into the weights file's header and checked against ``config.json`` at load."""
        return {}

    def _weights_shapes(self) -> dict[str, tuple[int, str]]:
        """Per weight tensor, the size of its first dimension that the config and state imply, and what it
        counts (e.g. ``{"head.weight": (5, "classes")}``): checked at load with an error saying so."""
        return {}

    @classmethod
    def _upgrade(cls, meta: dict, path: Path) -> dict:
        """Turn an older ``config.json`` layout into the current one (override for legacy formats)."""
        return meta

    # ------------------------------------------------------------------ common
    @property
    def is_trained(self) -> bool:
        """Whether :meth:`fit` has run (or a trained model was loaded)."""
        return self.module is not None

    def _check_trained(self) -> None:
        if self.module is None:
            raise ValueError(
                f"The {type(self).__name__} is not trained: call .fit (or {self.TRAINER}) or .load first."
            )

    def _record_inputs(self, data, inputs: Mapping[str, tuple[str | None, int | None]]) -> None:
        """Record the provenance of the input representations: per modality ``(key, width)`` and the
        parameter record its producer wrote (``uns[key]["params"]`` of the modality)."""
        from .._validate import get_modality

        out = {}
        for mod, (key, dim) in inputs.items():
            if key is None:
                continue
            try:
                params = get_modality(data, mod).uns.get(key, {}).get("params", {})
            except (ValueError, KeyError, AttributeError):
                params = {}
            out[mod] = {
                "key": str(key), "dim": int(dim or 0), "params": json_safe(dict(params)),
                "fingerprint": json_safe(rep_fingerprint(params)),
            }  # fmt: skip
        self.provenance = out

    def _trained_fingerprint(self, mod: str) -> dict:
        """The fingerprint of the representation of ``mod`` the model was trained on (``{}``: not known)."""
        entry = self.provenance.get(mod) or {}
        fp = entry.get("fingerprint")
        if fp is None:  # saved before fingerprints were recorded: derived from the producer's record
            fp = rep_fingerprint(entry.get("params") or {})
        return dict(fp)

    def _check_provenance(
        self, data, reps: Mapping[str, str | None], *, allow_mismatch: bool = False, stacklevel: int = 4
    ) -> None:
        """Refuse to apply the model to representations made by another producer than those it was trained
        on: per modality, the fingerprint of ``reps[mod]`` in ``data`` (its producer's ``uns[key]["params"]``)
        against the recorded one. A ``ValueError`` names both fingerprints; ``allow_mismatch=True`` warns
        instead. Nothing is checked for a modality without a fingerprint on either side (a representation
        the package did not make, or a model saved without provenance, see :meth:`load`)."""
        from .._provenance import check_same_producer, embedding_params
        from .._validate import get_modality

        for mod, key in reps.items():
            if key is None:
                continue
            trained = self._trained_fingerprint(mod)
            try:
                found = rep_fingerprint(embedding_params(get_modality(data, mod), key))
            except ValueError:
                continue
            trained_key = (self.provenance.get(mod) or {}).get("key", "?")
            check_same_producer(
                trained, found, what=f"{type(self).__name__}: {mod!r} representation {key!r} of the data vs "
                f"{trained_key!r} it was trained on", names=("trained on", "given"),
                fix=f"Embed the data with the producer the model was trained on ({mod!r}: see the fingerprint), "
                f"or train a model on these embeddings ({self.TRAINER}).",
                allow_mismatch=allow_mismatch, stacklevel=stacklevel,
            )  # fmt: skip

    def _warn_unchecked_provenance(self, path) -> None:
        """Warn once, at load, when the model records no fingerprint of its inputs (saved by an earlier
        version): ``predict`` / ``transform`` then cannot check that the data were embedded alike."""
        if self.provenance and all(self._trained_fingerprint(m) for m in self.provenance):
            return
        if self.provenance and all("fingerprint" in (e or {}) for e in self.provenance.values()):
            return  # trained on representations without a producer record: recorded as such, nothing to add
        warnings.warn(
            f"{path} records no provenance of the representations the {type(self).__name__} was trained on "
            f"(saved by cellsymphony {self.saved_version or 'of an earlier version'}): predict / transform "
            "cannot check that new data were embedded with the same model and weights. Train it again (or "
            "re-save it after fitting) to record them.",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ the fit loop
    def _fit_loop(
        self,
        *,
        batches: Callable[[torch.Generator], Iterable[Any]],
        loss: Callable[[Any], torch.Tensor],
        evaluate: Callable[[], Mapping[str, float]],
        batch_len: Callable[[Any], int],
        n_train: int,
        epochs: int,
        lr: float,
        weight_decay: float,
        seed: int,
        device: torch.device | str,
        early_stopping: bool = False,
        patience: int = DEFAULT_PATIENCE,
        param_groups: list[dict] | None = None,
        schedule: Literal["constant", "cosine"] = "constant",
        steps_per_epoch: int | None = None,
        after_step: Callable[[], None] | None = None,
        desc: str = "training",
    ) -> pd.DataFrame:
        """Train ``self.module`` (already built, seeded and on ``device``) and return the history.

        Each epoch: AdamW steps over ``batches(generator)`` (the generator, seeded with ``seed``, drives the
        shuffling) with the loss under autocast, then ``evaluate()`` in eval mode without gradients, whose
        ``test_loss`` is the held-out loss. With ``early_stopping``, training stops once the held-out loss
        has not improved for ``patience`` epochs and the weights of the best epoch are restored.
        """
        from tqdm.auto import tqdm

        module = self.module
        opt = make_adamw(param_groups if param_groups is not None else module.parameters(), lr, weight_decay, device)
        sched = None
        if schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * int(steps_per_epoch or 1)))
        gen = torch.Generator().manual_seed(int(seed))
        rows: list[dict] = []
        best_loss, best_state, best_epoch, stale = math.inf, None, None, 0
        # one bar over every training cell of every epoch: an epoch of a whole section is long on a CPU
        bar = tqdm(total=epochs * n_train, desc=desc, unit="cell", disable=not settings.progress, leave=False,
                   mininterval=1.0)  # fmt: skip
        for epoch in range(epochs):
            t_epoch = time.perf_counter()
            bar.set_description(f"{desc}: epoch {epoch + 1}/{epochs}")
            module.train()
            total = torch.zeros((), device=device)
            count = 0
            for batch in batches(gen):
                n = batch_len(batch)
                with autocast(device) if self.AUTOCAST else contextlib.nullcontext():
                    value = loss(batch)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if after_step is not None:
                    after_step()
                total += value.detach().float() * n
                count += n
                bar.update(n)
            module.eval()
            with torch.no_grad():
                scores = dict(evaluate())
            row = {"epoch": epoch + 1, "train_loss": float(total) / max(count, 1), **scores}
            rows.append(row)
            log_seconds(f"{desc} epoch", time.perf_counter() - t_epoch, epoch=epoch + 1, n_cells=count)
            held = row.get("test_loss", math.nan)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", test=f"{held:.3f}")
            logger.debug("%s epoch %d: %s", desc, epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
            if early_stopping and np.isfinite(held):
                if held < best_loss:
                    best_loss, best_epoch, stale = held, epoch + 1, 0
                    best_state = copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()})
                else:
                    stale += 1
                    if stale >= patience:
                        logger.info(
                            "%s: held-out loss not improved for %d epochs: stopped after epoch %d, kept epoch %d",
                            desc, patience, epoch + 1, best_epoch,
                        )  # fmt: skip
                        break
        bar.close()
        if early_stopping and best_state is not None:
            module.load_state_dict(best_state)
            self.best_epoch = best_epoch
        else:
            self.best_epoch = len(rows)
        module.eval()
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | Path, *args, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``model.safetensors`` (weights) and ``config.json`` (format and
        package version, config, learned state, input provenance, training settings and history, and the
        sha256 of the weights file).

        Parameters
        ----------
        dir_path
            Folder to write (created when missing).
        overwrite
            Replace the model files of an existing folder. Without it, a folder that exists and is not
            empty is an error (``FileExistsError``); files other than the model's are never removed.

        Returns
        -------
        The folder.
        """
        from safetensors.torch import save

        if args:
            if len(args) > 1:
                raise TypeError(f"save() takes 1 positional argument (dir_path) but {1 + len(args)} were given.")
            warnings.warn(
                "save(dir, True) is deprecated: pass overwrite as a keyword, save(dir, overwrite=True).",
                FutureWarning,
                stacklevel=2,
            )
            overwrite = bool(args[0])
        self._check_trained()
        d = Path(dir_path)
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"{d} exists and is not a folder: give a folder path to save the model into.")
        if d.is_dir() and any(d.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{d} is not empty: pass overwrite=True to replace the model files there, or choose a new folder."
            )
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        header = {"format": self.FORMAT, VERSION_KEY: package_version(), **self._weights_identity()}
        raw = save(tensors, metadata=header)
        meta = {
            "format": self.FORMAT,
            "format_version": self.FORMAT_VERSION,
            VERSION_KEY: package_version(),
            "config": self.config.to_dict(),
            "state": json_safe(self._get_state()),
            "inputs": json_safe(self.provenance),
            "fit_params": json_safe(self.fit_params),
            "best_epoch": self.best_epoch,
            "history": json_safe(self.history),
            "weights": {WEIGHTS_FILE: sha256_bytes(raw)},
        }
        with atomic_path(d / WEIGHTS_FILE) as tmp:
            tmp.write_bytes(raw)
        with atomic_path(d / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=1, allow_nan=True), encoding="utf-8")
        logger.info("saved the %s to %s", type(self).__name__, d)
        return d

    @classmethod
    def load(cls, dir_path: str | Path, *, device: str | None = None):
        """Load a model written by :meth:`save` (or by an earlier cellsymphony version).

        Parameters
        ----------
        dir_path
            The folder holding ``model.safetensors`` and ``config.json``.
        device
            Torch device for the weights; ``None`` uses ``cs.settings.device``.

        Returns
        -------
        The trained model.

        Raises
        ------
        FileNotFoundError
            When a file is missing (:class:`NotASavedModelError`, also a ``ValueError``).
        ValueError
            When ``config.json`` is not readable, names another model or a newer format, when the weights file
            does not match the sha256 recorded at saving, or when config and weights disagree; the message
            names the file.
        """
        from safetensors.torch import load

        d = Path(dir_path)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        what = f"the {cls.__name__} folder"
        if not d.is_dir():
            raise NotASavedModelError(
                d, what, f"it does not exist (so it is not a saved {cls.__name__})" if not d.exists()
                else "it is a file, not a folder",
                "Pass the folder written by model.save(dir).",
            )
        missing = [p.name for p in (w_path, cfg_path) if not p.is_file()]
        if missing:
            raise NotASavedModelError(
                d, what, f"it is not a saved {cls.__name__}: missing {missing}",
                "A model folder is written by model.save(dir); pass that folder.",
            )
        again = "Restore the folder from a copy, or train and save the model again."
        with reading(cfg_path, f"the {cls.__name__} config", "The file is damaged (not valid JSON). " + again):
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise InputFileError(cfg_path, f"the {cls.__name__} config", "it holds no model description (a JSON "
                                 "object expected)", again)  # fmt: skip
        saved_format = meta.get("format_version")
        meta = cls._upgrade(meta, cfg_path)
        if meta.get("format") != cls.FORMAT:
            raise ValueError(f"{cfg_path} is not a {cls.__name__} (format {meta.get('format')!r}, expected {cls.FORMAT!r}).")
        if int(meta.get("format_version", 0)) > cls.FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path} was written by a newer cellsymphony ({meta.get(VERSION_KEY)}, format version "
                f"{meta.get('format_version')}); upgrade cellsymphony to load it."
            )
        legacy = not isinstance(saved_format, int) or saved_format < CHECKSUM_SINCE
        raw = _verified_weights(cls.__name__, meta, d, cfg_path, legacy=legacy)
        with reading(w_path, "the model weights", "The file is not a readable safetensors file. " + again):
            tensors = load(raw)
            header = _safetensors_metadata(raw)
        with reading(cfg_path, f"the {cls.__name__} config", "A field is missing or of the wrong type. " + again):
            obj = cls._from_config(cls.CONFIG_CLASS.from_dict(meta.get("config", {}), source=cfg_path))
            obj._set_state(meta.get("state", {}))
        for name, value in obj._weights_identity().items():
            if name in header and header[name] != value:
                raise ModelFilesMismatchError(
                    f"{cfg_path} and {w_path} disagree on {name!r} ({value} vs {header[name]}): the config was "
                    f"changed after saving, which would silently relabel the results. {again}"
                )
        for tensor, (size, meaning) in obj._weights_shapes().items():
            if tensor in tensors and tensors[tensor].shape[0] != size:
                raise ModelFilesMismatchError(
                    f"{cfg_path} and {w_path} disagree: the config implies {size} {meaning} but the weights' "
                    f"{tensor!r} has {tensors[tensor].shape[0]}; the two files come from different models. {again}"
                )
        module = obj._build_module()
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise ModelFilesMismatchError(
                f"{w_path} does not fit the model described by {cfg_path} ({first}): config and weights disagree, "
                f"the two files come from different models. {again}"
            ) from err
        obj.device = resolve_device(device)
        obj.module = module.to(obj.device).eval()
        obj.history = pd.DataFrame(meta.get("history") or {}, columns=None)
        obj.fit_params = dict(meta.get("fit_params") or {})
        obj.provenance = dict(meta.get("inputs") or {})
        obj.best_epoch = meta.get("best_epoch")
        obj.saved_version = meta.get(VERSION_KEY)
        obj._warn_unchecked_provenance(d)
        return obj

    @classmethod
    def _from_config(cls, config: ModelConfig):
        return cls(**dataclasses.asdict(config))


def deprecated_layout(path: Path, what: str) -> None:
    """Warn that a saved folder uses an older layout (it loads; re-saving adds the checksum)."""
    warnings.warn(
        f"{path} is in the {what} layout of an earlier cellsymphony (no weights checksum): it loads, but save "
        "it again with model.save(dir, overwrite=True) to get the current layout.",
        FutureWarning,
        stacklevel=4,
    )
