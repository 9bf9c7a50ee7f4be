"""Map fine labels to the coarse classes the models train on."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import AMBIGUOUS_LABEL, HARMONIZED_LABEL_KEY
from .._docs import inject_docs
from .._joint import push_joint_obs
from .._settings import logger
from .._utils import params_record
from .._validate import find_obs_column

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

KEEP = "keep"


def _compile(mapping: Mapping, regex: bool) -> Callable[[str], str | None]:
    patterns = []
    exact = {}
    for k, v in mapping.items():
        target = None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        if isinstance(k, re.Pattern):
            patterns.append((k, target))
        elif regex:
            try:
                patterns.append((re.compile(str(k)), target))
            except re.error as err:
                raise ValueError(f"mapping key {k!r} is not a valid regular expression ({err}).") from None
        else:
            exact[str(k)] = target
    if not patterns:
        return exact.get

    def lookup(label: str) -> str | None:
        if label in exact:
            return exact[label]
        for pat, target in patterns:
            if pat.search(label):
                return target
        return None

    return lookup


@inject_docs()
def harmonize_labels(
    mdata: MuData | AnnData,
    key: str,
    mapping: Mapping | Callable[[str], str | None],
    *,
    key_added: str = HARMONIZED_LABEL_KEY,
    unmapped: str | None = AMBIGUOUS_LABEL,
    regex: bool = False,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Map fine labels (SingleR's immune subtypes, an H&E classifier's classes ...) to coarse classes.

    ``mapping`` says which coarse class each fine label belongs to, in one of three forms:

    - a dict ``{{fine: coarse}}`` of exact labels, e.g. ``{{"CD8+ Cytotoxic T": "T cell"}}``;
    - a dict of regular expressions (``regex=True``, or keys given as compiled ``re.Pattern``),
      e.g. ``{{r"\\bT\\b|T cell|T Reg": "T cell", r"(?i)monocyte|macrophage": "myeloid"}}``: the first
      pattern (in dict order) found anywhere in the label wins, exact keys being tried before patterns;
    - a function ``fine -> coarse`` (returning ``None`` for labels it does not map).

    A target of ``None`` counts as unmapped. Cells whose label is missing stay missing (they are
    unlabelled, not ambiguous); cells whose label is not mapped get ``unmapped``.

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    key
        Column with the fine labels, looked up in ``mdata.obs``, then as ``mod:key``, then in each
        modality's ``obs`` (so ``"singler"`` finds ``mdata["rna"].obs["singler"]``; use
        ``"singler_pruned"`` to leave pruned cells missing).
    mapping
        Fine -> coarse mapping: dict, dict of regular expressions, or function.
    key_added
        Column of ``mdata.obs`` to write.
    unmapped
        Label given to cells whose label the mapping does not cover (``"ambiguous"`` by default, which
        the classifiers exclude); ``"keep"`` keeps the fine label; ``None`` leaves them missing.
    regex
        Treat the string keys of ``mapping`` as regular expressions.
    copy
        {copy}

    Returns
    -------
    Returns None (or a copy with ``copy=True``) and writes ``mdata.obs[key_added]`` (categorical) and
    ``mdata.uns[key_added]``: ``"params"``, ``"table"`` (DataFrame: ``source``, ``target``, ``n_cells``
    for every fine label seen), ``n_unmapped`` (cells) and ``unmapped_labels`` (fine labels not covered).
    """
    if callable(mapping) and not isinstance(mapping, Mapping):
        lookup = mapping
        kind = "callable"
    elif isinstance(mapping, Mapping):
        if len(mapping) == 0:
            raise ValueError("mapping is empty; give at least one fine -> coarse pair.")
        lookup = _compile(mapping, regex)
        kind = "regex" if regex or any(isinstance(k, re.Pattern) for k in mapping) else "dict"
    else:
        raise ValueError(f"mapping must be a dict or a function, got {type(mapping).__name__}.")
    if unmapped is not None and not isinstance(unmapped, str):
        raise ValueError(f"unmapped must be a string or None, got {unmapped!r}.")

    data = mdata.copy() if copy else mdata
    fine = find_obs_column(data, key).reindex(data.obs_names)
    fine_str = fine.astype(object).where(fine.notna(), None)
    seen = sorted({str(v) for v in fine_str.dropna()})
    targets, not_covered = {}, []
    for label in seen:
        try:
            t = lookup(label)
        except Exception as err:  # a user function failing: say on which label
            raise ValueError(f"the mapping function failed on label {label!r}: {err!r}") from err
        if t is None or (isinstance(t, float) and np.isnan(t)):
            not_covered.append(label)
            t = label if unmapped == KEEP else unmapped
        else:
            t = str(t)
        targets[label] = t
    if seen and len(not_covered) == len(seen):
        logger.warning(
            "harmonize_labels: the mapping covers none of the %d labels of %r (e.g. %s); check its keys.",
            len(seen), key, seen[:3],
        )
    coarse = [None if v is None else targets[str(v)] for v in fine_str]
    cats = sorted({c for c in coarse if c is not None})
    data.obs[key_added] = pd.Categorical(coarse, categories=cats)
    push_joint_obs(data, [key_added])
    counts = pd.Series([str(v) for v in fine_str.dropna()], dtype=object).value_counts()
    table = pd.DataFrame(
        {
            "source": np.asarray(seen, dtype=object),
            "target": np.asarray(["nan" if targets[s] is None else targets[s] for s in seen], dtype=object),
            "n_cells": np.asarray([int(counts.get(s, 0)) for s in seen], dtype=np.int64),
        }
    )
    n_unmapped = int(sum(counts.get(s, 0) for s in not_covered))
    data.uns[key_added] = {
        "params": params_record(key=key, mapping_kind=kind, unmapped=unmapped, regex=bool(regex)),
        "table": table,
        "n_unmapped": n_unmapped,
        "unmapped_labels": np.asarray(not_covered, dtype=object),
    }
    logger.info(
        "harmonize_labels: %d fine labels of %r -> %d classes; %d cells (%d labels) unmapped -> %s. Added %s to obs and uns.",
        len(seen), key, len(cats), n_unmapped, len(not_covered), unmapped, key_added,
    )
    return data if copy else None
