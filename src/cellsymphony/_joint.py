"""Joint per-cell results also written to each modality, so scanpy and squidpy find them there.

A result about the cell as a whole (classifier predictions, niches, imported or transferred labels) lives
in ``mdata.obs``; :func:`push_joint_obs` copies it to every modality's ``obs`` under the same name, so that
``sq.gr.nhood_enrichment(mdata["rna"], cluster_key="cs_pred")`` works on the modality as it is. Every
function that writes such a column calls it, so a re-run replaces the copies too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any


def push_joint_obs(data: Any, keys: Iterable[str]) -> None:
    """Copy the columns ``keys`` of ``mdata.obs`` into the ``obs`` of every modality (no-op for an AnnData).

    Values are aligned on the cell names; cells a modality lacks are simply not copied. Categorical
    columns keep their categories (and so the colours scanpy stores for them).
    """
    mods = getattr(data, "mod", None)
    if mods is None:
        return
    keys = [k for k in dict.fromkeys(keys) if k in data.obs.columns]
    if not keys:
        return
    for adata in mods.values():
        for key in keys:
            adata.obs[key] = data.obs[key].reindex(adata.obs_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        data.update()
    # mudata pulls copies "mod:key" when it cannot tell the columns are equal (missing values), and may pull
    # them as all-missing: make them the values just pushed
    for m in mods:
        for k in keys:
            if f"{m}:{k}" in data.obs.columns:
                data.obs[f"{m}:{k}"] = data.obs[k].copy()  # same values and dtype (categories kept)
