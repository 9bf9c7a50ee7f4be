"""Inputs, labels, exclusions and train / test splits of the classifier (numpy only, no torch).

Everything here works on arrays aligned to ``data.obs_names`` (``mdata.obs`` for a MuData), so the
trainer, :meth:`CellTypeClassifier.predict` and :func:`cellsymphony.tl.compare_classifiers` share it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..._constants import MOD_MORPH, MOD_RNA, SAMPLE_KEY
from ..._validate import find_obs_column, get_modality, get_rep, is_mudata

SPLITS = ("random", "spatial", "sample")
TRAIN, TEST, UNUSED = "train", "test", "unused"
TOKEN_MOD = {"gene": MOD_RNA, "morph": MOD_MORPH}


@dataclass
class Inputs:
    """The arrays one architecture reads, aligned to ``data.obs_names``; NaN rows where absent."""

    obs_names: pd.Index
    gene: np.ndarray | None = None
    morph: np.ndarray | None = None
    coords: np.ndarray | None = None  # section-relative micrometres
    samples: np.ndarray | None = None
    gene_rep: str | None = None
    morph_rep: str | None = None
    missing: dict[str, int] = field(default_factory=dict)

    @property
    def available(self) -> np.ndarray:
        """Cells with every needed input present and finite."""
        ok = np.ones(len(self.obs_names), dtype=bool)
        for x in (self.gene, self.morph, self.coords):
            if x is not None:
                ok &= np.isfinite(x).all(axis=1)
        return ok


def _rows(data, adata) -> np.ndarray:
    """Row of ``data`` for each row of modality ``adata`` (identity for an AnnData)."""
    if adata is data:
        return np.arange(data.n_obs)
    idx = data.obs_names.get_indexer(adata.obs_names)
    if (idx < 0).any():
        raise ValueError("The modality has cells that are not in the MuData's obs_names; call mdata.update().")
    return idx


def _modality_rep(data, mod: str, rep: str | None) -> tuple[str, np.ndarray]:
    """A modality's representation expanded to ``data``'s rows (NaN for cells the modality lacks)."""
    if is_mudata(data) and mod not in data.mod:
        from ..._validate import PRODUCERS

        raise ValueError(
            f"The MuData has no {mod!r} modality, which holds the representation this classifier reads "
            f"(run {PRODUCERS[mod]} on data that has it)."
        )
    key, x = get_rep(data, mod, rep)
    adata = get_modality(data, mod)
    out = np.full((data.n_obs, x.shape[1]), np.nan, dtype=np.float32)
    out[_rows(data, adata)] = x
    return key, out


def section_samples(data) -> np.ndarray:
    """``obs["sample"]`` as strings aligned to ``data.obs`` (one section ``"0"`` when there is no column)."""
    try:
        col = find_obs_column(data, SAMPLE_KEY)
    except ValueError:
        return np.full(data.n_obs, "0", dtype=object)
    return col.astype(object).where(col.notna(), "nan").astype(str).to_numpy(dtype=object)


def section_coordinates(data) -> np.ndarray:
    """Absolute micrometre centroids ``obsm["spatial"]`` aligned to ``data.obs`` (NaN where absent), by
    :func:`cellsymphony._coordinates.cell_coordinates`."""
    from ..._coordinates import cell_coordinates

    return cell_coordinates(data, "cell", purpose="the spatial classifier architectures")


def relative_coordinates(coords: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Micrometre coordinates relative to the centre of each section's bounding box."""
    rel = np.full_like(coords, np.nan, dtype=np.float32)
    for s in pd.unique(samples):
        sel = samples == s
        xy = coords[sel]
        fin = np.isfinite(xy).all(axis=1)
        if not fin.any():
            continue
        centre = (np.nanmin(xy[fin], axis=0) + np.nanmax(xy[fin], axis=0)) / 2
        rel[sel] = (xy - centre).astype(np.float32)
    return rel


def gather_inputs(data, tokens: Sequence[str], gene_rep: str | None, morph_rep: str | None) -> Inputs:
    """Collect the inputs of ``tokens`` (``"gene"``, ``"morph"``, ``"spatial"``) from ``data``."""
    inp = Inputs(obs_names=data.obs_names, samples=section_samples(data))
    if "gene" in tokens:
        inp.gene_rep, inp.gene = _modality_rep(data, MOD_RNA, gene_rep)
    if "morph" in tokens:
        inp.morph_rep, inp.morph = _modality_rep(data, MOD_MORPH, morph_rep)
    if "spatial" in tokens:
        inp.coords = relative_coordinates(section_coordinates(data), inp.samples)
    for name, x in (("gene", inp.gene), ("morph", inp.morph), ("spatial", inp.coords)):
        if x is not None:
            inp.missing[name] = int((~np.isfinite(x).all(axis=1)).sum())
    return inp


def usable_labels(
    data, label_key: str, exclude: Sequence[str], confident_key: str | None, available: np.ndarray
) -> tuple[np.ndarray, dict[str, int]]:
    """Labels of the cells that may be used for training / evaluation (``None`` elsewhere) and the counts
    of cells left out for each reason (checked in this order)."""
    col = find_obs_column(data, label_key)
    missing = col.isna().to_numpy()
    labels = np.full(len(col), None, dtype=object)
    labels[~missing] = col[~missing].astype(str).to_numpy(dtype=object)
    keep = ~missing
    counts = {"no label": int(missing.sum())}
    excluded = keep & np.isin(labels.astype(str), [str(e) for e in exclude])
    counts["excluded label"] = int(excluded.sum())
    keep &= ~excluded
    if confident_key is not None:
        conf = find_obs_column(data, confident_key)
        conf = conf.astype(object).where(conf.notna(), False).astype(bool).to_numpy()
        not_conf = keep & ~conf
        counts[f"not {confident_key}"] = int(not_conf.sum())  # e.g. "not singler_confident", "not cs_train_cells"
        keep &= conf
    no_inputs = keep & ~available
    counts["missing or NaN inputs"] = int(no_inputs.sum())
    keep &= available
    labels[~keep] = None
    return labels, counts


def rare_labels(data, label_key: str, *, confident_key: str | None = None, exclude: Sequence[str] = ("ambiguous",),
                min_cells: int | None = None) -> list[str]:  # fmt: skip
    """The labels of ``label_key`` with fewer than ``min_cells`` usable cells (labelled, not excluded,
    confident; default ``MIN_LABELLED_CELLS_PER_CLASS``): too few for a classifier's minimum sizes with the
    default split. The pipelines (``cellsymphony run``, the demo) leave them out of training, with a warning,
    rather than stop after the embeddings."""
    from ..._constants import MIN_LABELLED_CELLS_PER_CLASS

    min_cells = MIN_LABELLED_CELLS_PER_CLASS if min_cells is None else int(min_cells)
    labels, _ = usable_labels(data, label_key, exclude, confident_key, np.ones(data.n_obs, dtype=bool))
    counts = pd.Series(labels[pd.notna(labels)]).value_counts()
    return sorted(str(k) for k, n in counts.items() if n < min_cells)


def check_test_size(test_size: float) -> None:
    """The held-out fraction of a split must lie strictly between 0 and 1."""
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be between 0 and 1, got {test_size}.")


def _split_random(codes: np.ndarray, test_size: float, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Stratified split: per class, ``round(test_size * n)`` cells (at least 1, at most n - 1) to test.

    Classes with a single cell cannot be stratified: they stay in training (returned for a warning).
    """
    is_test = np.zeros(len(codes), dtype=bool)
    singletons = []
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        if len(idx) < 2:
            singletons.append(c)
            continue
        n_test = int(min(max(round(test_size * len(idx)), 1), len(idx) - 1))
        is_test[rng.permutation(idx)[:n_test]] = True
    return is_test, singletons


def _take_groups(groups: np.ndarray, test_size: float, rng: np.random.Generator, what: str) -> np.ndarray:
    """Shuffle the groups and hold out whole groups until ``test_size`` of the cells are in test."""
    uniq, counts = np.unique(groups, return_counts=True)
    if len(uniq) < 2:
        raise ValueError(f"Only one {what} has labelled cells: a held-out-{what} split needs at least 2.")
    order = rng.permutation(len(uniq))
    target = test_size * len(groups)
    chosen, n = [], 0
    for i in order:
        if n >= target or len(chosen) == len(uniq) - 1:
            break
        chosen.append(uniq[i])
        n += counts[i]
    return np.isin(groups, chosen)


def spatial_blocks(coords: np.ndarray, samples: np.ndarray, block_size: float | None) -> np.ndarray:
    """Integer block id of each cell on a square grid of side ``block_size`` micrometres
    anchored at each section's lower-left corner; ``None`` uses 1/8 of the section's longer side."""
    keys = np.zeros((len(coords), 3), dtype=np.int64)
    codes, uniq = pd.factorize(samples)
    keys[:, 0] = codes
    for k in range(len(uniq)):
        sel = codes == k
        xy = coords[sel]
        lo = xy.min(axis=0)
        side = block_size if block_size is not None else max(float(np.ptp(xy, axis=0).max()) / 8, 1e-6)
        keys[sel, 1:] = np.floor((xy - lo) / side).astype(np.int64)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


def make_split(
    labels: np.ndarray,
    *,
    split: str,
    test_size: float,
    seed: int,
    samples: np.ndarray,
    coords_abs: np.ndarray | None = None,
    block_size: float | None = None,
    test_samples: Sequence[str] | None = None,
) -> np.ndarray:
    """``"train"`` / ``"test"`` / ``"unused"`` for every cell (unused: ``labels`` is None)."""
    out = np.full(len(labels), UNUSED, dtype=object)
    used = np.flatnonzero(pd.notna(labels))
    rng = np.random.default_rng(seed)
    lab = labels[used].astype(str)
    if split == "random":
        _, codes = np.unique(lab, return_inverse=True)
        is_test, singletons = _split_random(codes, test_size, rng)
        if singletons:
            names = sorted(str(x) for x in np.unique(lab)[singletons])
            warnings.warn(
                f"Label(s) {names} have a single usable cell and cannot be stratified: that cell is kept "
                "in training, so these classes have no test support (their metrics are 0 / absent).",
                UserWarning,
                stacklevel=3,
            )
    elif split == "sample":
        groups = samples[used].astype(str)
        if test_samples is not None:
            unknown = sorted(set(map(str, test_samples)) - set(groups))
            if unknown:
                raise ValueError(f"test_samples {unknown} have no usable labelled cells (samples: {sorted(set(groups))}).")
            is_test = np.isin(groups, [str(t) for t in test_samples])
            if is_test.all():
                raise ValueError("test_samples holds out every section: leave at least one for training.")
        else:
            is_test = _take_groups(groups, test_size, rng, "sample")
    elif split == "spatial":
        if coords_abs is None:
            raise ValueError("split='spatial' needs cell coordinates in obsm['spatial'].")
        xy = coords_abs[used]
        if not np.isfinite(xy).all():
            raise ValueError("split='spatial' needs finite coordinates for every labelled cell.")
        is_test = _take_groups(spatial_blocks(xy, samples[used].astype(str), block_size), test_size, rng, "block")
    else:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)} (or a per-cell array of train/test/unused).")
    out[used] = np.where(is_test, TEST, TRAIN)
    return out


def split_from_array(split, n_obs: int, labels: np.ndarray) -> np.ndarray:
    """Validate a user-given per-cell split (e.g. ``obs["cs_pred_split"]`` of an earlier run)."""
    arr = np.asarray(split, dtype=object).astype(str)
    if arr.shape != (n_obs,):
        raise ValueError(f"A per-cell split must have one entry per cell ({n_obs}), got shape {arr.shape}.")
    bad = sorted(set(arr) - {TRAIN, TEST, UNUSED})
    if bad:
        raise ValueError(f"A per-cell split holds only 'train', 'test' and 'unused'; found {bad}.")
    usable = pd.notna(labels)
    return np.where(usable, arr, UNUSED).astype(object)
