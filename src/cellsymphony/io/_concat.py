"""``cs.io.concat``: several sections in one MuData."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import LATEST_KEY, NUCLEUS_KEY, SAMPLE_KEY, SAMPLES_KEY, SPATIAL_KEY, UNS_KEY
from .._settings import logger

if TYPE_CHECKING:
    from mudata import MuData


def _samples_of(mdata: MuData, i: int) -> pd.Series:
    """Each cell's sample id, from mdata.obs or a modality's obs."""
    if SAMPLE_KEY in mdata.obs:
        return mdata.obs[SAMPLE_KEY].astype(str)
    for adata in mdata.mod.values():
        if SAMPLE_KEY in adata.obs:
            return adata.obs[SAMPLE_KEY].astype(str).reindex(mdata.obs_names)
    raise ValueError(
        f"Input {i} has no obs['{SAMPLE_KEY}']: concatenate MuData objects read with cs.io.read_xenium."
    )


def concat(
    mdatas: Sequence[MuData],
    *,
    keys: Sequence[str] | None = None,
    join: Literal["inner", "outer"] = "inner",
    index_unique: Literal["auto", "always", "never"] = "auto",
    sep: str = "_",
) -> MuData:
    """Join several sections (e.g. from :func:`~cellsymphony.io.read_xenium`) into one MuData.

    Parameters
    ----------
    mdatas
        The MuData objects, each with ``obs["sample"]`` and its registry entries in
        ``uns["cellsymphony"]["samples"]``.
    keys
        New sample ids, one per input (each input must then hold a single sample); use this when two
        inputs carry the same sample id.
    join
        ``"inner"`` keeps the features (genes) measured in every section; ``"outer"`` keeps all, with
        zeros where a section's panel lacks a gene (beware: a gene that was not measured is not a zero).
    index_unique
        ``"auto"``: prefix the cell ids with ``"{sample}{sep}"`` when ids clash between inputs;
        ``"always"``: prefix them always; ``"never"``: raise an error on a clash.
    sep
        Separator between sample id and cell id.

    Returns
    -------
    A new MuData with every modality concatenated, ``obs["sample"]`` (categorical) on the MuData and on
    each modality, ``obsm`` kept where every input has it, the MuData's own ``obs`` columns (e.g. classifier
    predictions), ``obs["cell_id"]`` holding the original ids, and ``uns["cellsymphony"]["samples"]``
    holding the registries of all inputs (``uns["cellsymphony"]["latest"]`` when all inputs agree; other
    ``uns`` entries of the MuData are not carried over).
    """
    import anndata as ad
    import mudata as md

    mdatas = list(mdatas)
    if not mdatas:
        raise ValueError("cs.io.concat needs at least one MuData.")
    for i, m in enumerate(mdatas):
        if type(m).__name__ != "MuData":
            raise TypeError(f"Input {i} is a {type(m).__name__}, not a MuData.")
    if keys is not None and len(keys) != len(mdatas):
        raise ValueError(f"keys has {len(keys)} entries for {len(mdatas)} inputs.")
    if index_unique not in ("auto", "always", "never"):
        raise ValueError(f"index_unique={index_unique!r} is not one of ['auto', 'always', 'never'].")

    samples: list[pd.Series] = []
    registries: list[dict] = []
    for i, m in enumerate(mdatas):
        s = _samples_of(m, i)
        reg = dict(m.uns.get(UNS_KEY, {}).get(SAMPLES_KEY, {}))
        if keys is not None:
            present = pd.unique(s)
            if len(present) != 1:
                raise ValueError(f"keys= renames whole inputs, but input {i} holds samples {list(present)}.")
            old, new = present[0], str(keys[i])
            s = pd.Series(new, index=s.index)
            reg = {new: reg[old]} if old in reg else {}
        missing = sorted(set(pd.unique(s)) - set(reg))
        if missing:
            raise ValueError(
                f"Input {i}: samples {missing} have no entry in uns['{UNS_KEY}']['{SAMPLES_KEY}']; read them with "
                "cs.io.read_xenium."
            )
        samples.append(s)
        registries.append(reg)

    merged_reg: dict = {}
    for reg in registries:
        for name, entry in reg.items():
            if name in merged_reg:
                raise ValueError(
                    f"Sample id {name!r} occurs in more than one input; give each section its own id with "
                    "concat(..., keys=[...]) or cs.io.read_xenium(..., sample=...)."
                )
            merged_reg[name] = copy.deepcopy(entry)  # the output's own, not a view of an input's

    all_ids = [m.obs_names.to_numpy().astype(str) for m in mdatas]
    clash = pd.Index(np.concatenate(all_ids)).has_duplicates
    if clash and index_unique == "never":
        raise ValueError(
            "Cell ids clash between inputs; use index_unique='auto' to prefix them with the sample id."
        )
    prefix = index_unique == "always" or (index_unique == "auto" and clash)

    parts = []
    cell_sample = []
    shared_obsm = set.intersection(*(set(m.obsm) for m in mdatas)) | {SPATIAL_KEY, NUCLEUS_KEY}
    global_obsm: dict[str, list[pd.DataFrame]] = {k: [] for k in sorted(shared_obsm)}
    global_obs: list[pd.DataFrame] = []
    for m, s, ids in zip(mdatas, samples, all_ids, strict=True):
        # vectorised (a section has up to ~10^6 cells): "<sample><sep><cell id>"
        new = np.char.add(np.char.add(s.to_numpy().astype(str), sep), ids.astype(str)) if prefix else ids
        rename = pd.Series(new, index=pd.Index(ids))
        cell_sample.append(pd.Series(s.to_numpy(), index=new))
        for key, frames in global_obsm.items():
            if key in m.obsm:
                frames.append(pd.DataFrame(np.asarray(m.obsm[key]), index=new))
        # the MuData's own columns (not those pulled from a modality as "mod:column")
        own = [c for c in m.obs.columns if c != SAMPLE_KEY and not any(c.startswith(f"{k}:") for k in m.mod)]
        global_obs.append(pd.DataFrame({c: m.obs[c].to_numpy() for c in own}, index=new))
        mods = {}
        for name, adata in m.mod.items():
            adata = adata.copy()
            if "cell_id" not in adata.obs:
                adata.obs["cell_id"] = adata.obs_names.astype(str)
            adata.obs[SAMPLE_KEY] = s.reindex(adata.obs_names.astype(str)).to_numpy()
            adata.obs_names = pd.Index(rename.reindex(adata.obs_names.astype(str)).to_numpy())
            if keys is not None and isinstance(adata.uns.get("spatial"), dict):  # library ids follow the new ids
                old_ids = [str(x) for x in pd.unique(_samples_of(m, 0))]
                adata.uns["spatial"] = {str(s.iloc[0]) if k in old_ids else k: v for k, v in adata.uns["spatial"].items()}
            mods[name] = adata
        parts.append(mods)

    order = list(dict.fromkeys(k for mods in parts for k in mods))
    categories = list(dict.fromkeys(str(x) for s in samples for x in pd.unique(s)))
    joined = {}
    for name in order:
        pieces = [mods[name] for mods in parts if name in mods]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            a = ad.concat(pieces, join=join, merge="same", uns_merge="same")
        a.obs[SAMPLE_KEY] = pd.Categorical(a.obs[SAMPLE_KEY].astype(str), categories=categories)
        spatial = {k: v for p in pieces for k, v in p.uns.get("spatial", {}).items()}  # scanpy's H&E per sample
        if spatial:
            a.uns["spatial"] = spatial
        joined[name] = a

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = md.MuData(joined)
        out.update()
    by_cell = pd.concat(cell_sample)
    out.obs[SAMPLE_KEY] = pd.Categorical(
        by_cell.reindex(out.obs_names).astype(str).to_numpy(), categories=categories
    )
    for key, frames in global_obsm.items():
        if len(frames) == len(mdatas) and len({f.shape[1] for f in frames}) == 1:
            out.obsm[key] = pd.concat(frames).reindex(out.obs_names).to_numpy()
    extra = pd.concat(global_obs).reindex(out.obs_names)
    for col in extra.columns:
        out.obs[col] = _writable(extra[col])

    block: dict = {SAMPLES_KEY: merged_reg}
    latest = [m.uns.get(UNS_KEY, {}).get(LATEST_KEY) for m in mdatas]
    if latest[0] is not None and all(_same(latest[0], x) for x in latest[1:]):
        block[LATEST_KEY] = dict(latest[0])
    out.uns[UNS_KEY] = block
    logger.info("joined %d sections: %d cells, samples %s", len(mdatas), out.n_obs, categories)
    return out


def _writable(values: pd.Series) -> pd.Series:
    """An object column of the joined obs in a dtype h5mu can store: a column absent from some inputs (NaN
    there) or categorical with different categories per input comes out of the join as ``object``."""
    if values.dtype != object:
        return values
    present = values.dropna()
    if present.map(lambda v: isinstance(v, str)).all():
        return values.astype("category")
    if present.map(lambda v: isinstance(v, bool | np.bool_)).all():
        return values.astype("boolean")
    return values


def _same(a, b) -> bool:
    if a is None or b is None:
        return False
    return dict(a) == dict(b)
