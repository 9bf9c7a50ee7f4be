"""The ``stain_augmentation=`` option of the trainers (``tl.train_classifier``, ``tl.align_contrastive``).

One rule for both: the held-out split is drawn on the original cells (as without augmentation, so the same
seed holds out the same cells); :func:`cellsymphony.pp.augment_stain` then adds the stain-jittered copies;
a copy goes to training when its cell does and is left out otherwise, so no copy of a held-out cell is
trained on and the held-out figures are measured on original cells only. The model is fitted on the
augmented rows; the trainer writes its per-cell outputs for the original cells of the user's MuData.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mudata import MuData

KEYS = ("n_copies", "strength", "seed")


def augmentation_spec(value: Any, seed: int) -> dict[str, Any] | None:
    """The settings of ``stain_augmentation=``: ``None`` (off), a number of copies, or a dict with some of
    ``n_copies``, ``strength`` and ``seed`` (defaults: those of :func:`cellsymphony.pp.augment_stain`, the
    trainer's ``seed``). Returns ``{"n_copies", "strength", "seed"}`` or ``None``; bad values raise before
    anything is computed."""
    from ..pp._augment_stain import N_COPIES, STRENGTH

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer | Mapping):
        raise ValueError(
            f"stain_augmentation={value!r}: pass None, a number of stain-jittered copies per cell (e.g. 2) or a "
            "dict(n_copies=, strength=, seed=)."
        )
    given = {"n_copies": value} if not isinstance(value, Mapping) else dict(value)
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise ValueError(f"stain_augmentation: unknown keys {unknown}; the keys are {list(KEYS)}.")
    spec = {"n_copies": given.get("n_copies", N_COPIES), "strength": given.get("strength", STRENGTH),
            "seed": given.get("seed", seed)}  # fmt: skip
    n, strength = spec["n_copies"], spec["strength"]
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"stain_augmentation: n_copies={n!r} must be a positive integer.")
    if isinstance(strength, bool) or not isinstance(strength, int | float | np.number) or not 0 < strength < 1:
        raise ValueError(f"stain_augmentation: strength={strength!r} must lie in (0, 1) (0.15 is moderate).")
    if isinstance(spec["seed"], bool) or not isinstance(spec["seed"], int | np.integer):
        raise ValueError(f"stain_augmentation: seed={spec['seed']!r} must be an integer.")
    return {"n_copies": int(n), "strength": float(strength), "seed": int(spec["seed"])}


def augmented(mdata: MuData, spec: dict, morph_rep: str | None) -> tuple[MuData, np.ndarray, np.ndarray]:
    """``cs.pp.augment_stain(mdata, ...)`` with, per row of the result, the row of ``mdata`` it copies and its
    copy number (0 for the original)."""
    from ..pp._augment_stain import COPY_KEY, augment_stain

    aug = augment_stain(mdata, morph_rep=morph_rep, **spec)
    copy = aug.obs[COPY_KEY].to_numpy().astype(int)
    names = mdata.obs_names.to_numpy().astype(str)
    suffix = np.where(copy > 0, np.char.add("-stain", copy.astype(str)), "")
    # the name of each row with its copy suffix removed: the original cell's
    stripped = np.array([n[: len(n) - len(s)] if s else n for n, s in zip(aug.obs_names, suffix, strict=True)])
    origin = pd.Index(names).get_indexer(stripped)
    if (origin < 0).any():  # augment_stain names copies "<cell>-stain<i>"; anything else is a bug
        raise RuntimeError("stain augmentation: a copy's name does not lead back to its cell.")
    return aug, origin, copy


def classifier_rows_split(split: np.ndarray, origin: np.ndarray, copy: np.ndarray) -> np.ndarray:
    """The per-row split of the augmented data: each row takes its cell's ``"train"`` / ``"test"`` /
    ``"unused"``, except copies of test cells, which are ``"unused"`` (never trained on, not scored)."""
    from ..models.classifier._data import TEST, UNUSED

    rows = np.asarray(split, dtype=object)[origin].copy()
    rows[(copy > 0) & (rows == TEST)] = UNUSED
    return rows


def fit_classifier(model, mdata, label_key: str, training, spec: dict) -> None:
    """Fit ``model`` (a ``CellTypeClassifier``) on ``mdata`` and its stain-jittered copies; afterwards the
    model describes the original cells (``split``, ``exclusions``) and records the augmentation in
    ``fit_params["stain_augmentation"]`` (saved with it)."""
    import dataclasses

    from ..models.classifier._data import TRAIN
    from ..models.classifier._model import prepare

    if "morph" not in model.tokens:
        raise ValueError(f"stain_augmentation needs a morphology input: arch={model.arch!r} reads none "
                         "(use 'morphology', 'dual' or 'multi_input').")  # fmt: skip
    prep = prepare(mdata, label_key, model.tokens, training)  # the split, drawn on the original cells
    aug, origin, copy = augmented(mdata, spec, prep.inputs.morph_rep)
    rows = classifier_rows_split(prep.split, origin, copy)
    model._fit(aug, label_key, dataclasses.replace(training, split=rows))
    model.split, model.exclusions = prep.split, prep.exclusions
    model.fit_params["split"] = training.split_name
    model.fit_params["stain_augmentation"] = {**spec, "morph_rep": str(prep.inputs.morph_rep),
                                              "n_train_rows": int((rows == TRAIN).sum())}  # fmt: skip


def augmented_fit(aligner, spec: dict):
    """A stand-in for ``aligner.fit`` (a ``ContrastiveAligner``, same arguments) that fits on ``mdata`` and the
    stain-jittered copies of its training cells: the held-out cells are those the aligner would hold out
    without augmentation, without their copies."""
    from ..models.contrastive._data import paired_inputs
    from ..models.contrastive._model import held_out_split

    def fit(mdata, *, gene_rep=None, morph_rep=None, test_size: float = 0.1, seed: int = 0, **kwargs):
        data = paired_inputs(mdata, gene_rep, morph_rep)
        test_idx, _ = held_out_split(data["n_used"], test_size, seed)
        test_names = pd.Index(data["obs_names"][test_idx])
        aug, origin, copy = augmented(mdata, spec, data["morph_rep"])
        keep = (copy == 0) | ~mdata.obs_names[origin].isin(test_names)
        if not keep.all():
            aug = aug[keep].copy()
        aligner.fit(aug, gene_rep=data["gene_rep"], morph_rep=data["morph_rep"], test_size=test_size, seed=seed,
                    test_obs_names=test_names, **kwargs)  # fmt: skip
        aligner.fit_params["stain_augmentation"] = {**spec, "morph_rep": str(data["morph_rep"]),
                                                    "n_train_rows": int(aligner.fit_info["n_train"])}  # fmt: skip
        return aligner

    return fit
