"""``cs.pp.augment_stain``: training cells repeated under random stain perturbations, re-embedded."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import MOD_MORPH
from .._docs import inject_docs
from .._settings import logger
from .._validate import get_modality, is_mudata, resolve_rep

if TYPE_CHECKING:
    from mudata import MuData
    from torch import nn

COPY_KEY = "stain_copy"
_JITTER_KEY = "_stain_jitter"
_EMBED_ARGS = ("mode", "pool", "layer", "size", "mpp")
N_COPIES, STRENGTH = 2, 0.15  # the defaults, also of the trainers' stain_augmentation=


def _embed_kwargs(params: dict, rep: str) -> dict:
    out = {}
    for k in _EMBED_ARGS:
        if k not in params:
            raise ValueError(f"augment_stain: uns[{rep!r}]['params'] lacks {k!r}: re-run cs.pp.embed_morphology.")
        out[k] = params[k]
    out["layer"], out["size"], out["mpp"] = int(out["layer"]), int(out["size"]), float(out["mpp"])
    out["mode"], out["pool"] = str(out["mode"]), str(out["pool"])
    radius = params.get("pool_radius_um", "None")
    out["pool_radius_um"] = None if isinstance(radius, str) else float(radius)
    stride = params.get("tile_stride", "None")
    out["tile_stride"] = None if isinstance(stride, str) else int(stride)
    return out


@inject_docs()
def augment_stain(
    mdata: MuData,
    *,
    n_copies: int = N_COPIES,
    strength: float = STRENGTH,
    morph_rep: str | None = None,
    model: str | nn.Module | None = None,
    weights: str | None = None,
    seed: int = 0,
) -> MuData:
    """The cells of a section plus ``n_copies`` copies re-embedded from stain-perturbed patches.

    Stain augmentation for training at the input side: every copy of a cell reads the same nucleus-centred
    patch as :func:`cellsymphony.pp.embed_morphology` did, perturbs its stain at random (HED jitter: the
    hematoxylin, eosin and residual concentrations scaled by ``U(1 - strength, 1 + strength)`` and
    shifted, the stain vectors turned by up to ``strength`` radians; one draw per patch and copy) and
    embeds it with the same encoder and settings (read from ``uns[morph_rep]["params"]``). Train
    :func:`cellsymphony.tl.train_classifier` or :func:`cellsymphony.tl.align_contrastive` on the result
    as on the section: a model then sees each cell under several stains. Copies keep their cell's
    coordinates, so ``split="spatial"`` holds a cell and its copies out together.

    Parameters
    ----------
    mdata
        A section with a morphology embedding (and any other modality, copied alongside).
    n_copies
        Perturbed copies per cell.
    strength
        Size of the perturbation (0.05 mild, 0.15 moderate, 0.3 strong).
    morph_rep
        {morph_rep}
    model
        The encoder, when the embedding was made with an ``nn.Module`` (its name cannot be re-loaded);
        default the model named in the embedding's params.
    weights
        Its weights (as in :func:`cellsymphony.pp.embed_morphology`).
    seed
        Seed of the perturbations.

    Returns
    -------
    A new MuData of ``(1 + n_copies) * n_cells`` cells: the originals, then each copy (``obs_names``
    suffixed ``-stain1``, ``-stain2``, ...), with ``obs["stain_copy"]`` (0 for the originals) on it and every
    modality; the morphology ``obsm[morph_rep]`` of the copies is the perturbed embedding, everything else
    (expression, labels, coordinates, the sample registry) is repeated. ``mdata`` is not changed.
    """
    import anndata as ad
    import mudata as md

    from ._embed_morphology import embed_morphology

    if not is_mudata(mdata):
        raise ValueError("augment_stain takes a MuData (the section with its morphology modality).")
    if int(n_copies) != n_copies or n_copies < 1:
        raise ValueError(f"n_copies must be a positive integer, got {n_copies!r}.")
    if not 0 < strength < 1:
        raise ValueError(f"strength must lie in (0, 1), got {strength!r}.")
    morph = get_modality(mdata, MOD_MORPH)
    rep = resolve_rep(mdata, MOD_MORPH, morph_rep)
    params = dict(morph.uns.get(rep, {}).get("params", {}))
    if isinstance(params.get("stain"), dict):
        raise ValueError(f"augment_stain: {rep!r} was embedded with stain normalisation; augment an embedding of the "
                         "patches as scanned (embed_morphology without stain=).")
    kwargs = _embed_kwargs(params, rep)
    if model is None:
        model = str(params.get("model", ""))
        if model in ("", "module"):
            raise ValueError(f"augment_stain: {rep!r} was made with an nn.Module: pass model= the same encoder.")
        wp = str(params.get("weights_path", "") or "")
        weights = weights if weights is not None else (wp or None)
    if model == "handcrafted":
        weights = None
    copies = []
    for i in range(1, int(n_copies) + 1):
        tmp = ad.AnnData(obs=morph.obs[[]].copy(), obsm={k: np.asarray(morph.obsm[k]) for k in ("spatial", "nucleus_centroid")
                                                         if k in morph.obsm})
        for col in ("sample", "in_image"):
            if col in morph.obs:
                tmp.obs[col] = morph.obs[col].to_numpy()
        tmp.uns["cellsymphony"] = {"samples": mdata.uns["cellsymphony"]["samples"]}
        tmp.uns[_JITTER_KEY] = {"method": "jitter", "seed": int(seed) * 1000 + i, "strength": float(strength)}
        embed_morphology(tmp, model=model, weights=weights, key_added=rep, stain=_JITTER_KEY, **kwargs)
        copies.append(tmp.obsm[rep])

    mods = {}
    for name, a in mdata.mod.items():
        parts = []
        for i in range(int(n_copies) + 1):
            b = a.copy()
            b.obs_names = a.obs_names if i == 0 else pd.Index([f"{c}-stain{i}" for c in a.obs_names])
            b.obs[COPY_KEY] = i
            if name == MOD_MORPH and i > 0:
                b.obsm[rep] = copies[i - 1]
            parts.append(b)
        out = ad.concat(parts, axis=0, merge="first", uns_merge="first")
        out.uns = a.uns.copy()
        mods[name] = out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        res = md.MuData(mods)
        res.uns = {k: v for k, v in mdata.uns.items()}
        names = pd.Index(np.concatenate([mdata.obs_names.to_numpy()] + [
            np.array([f"{c}-stain{i}" for c in mdata.obs_names]) for i in range(1, int(n_copies) + 1)]))
        order = names.get_indexer(res.obs_names)
        glob = [c for c in mdata.obs.columns if not any(c.startswith(f"{m}:") for m in mdata.mod)]
        for c in glob:
            vals = mdata.obs[c]
            tiled = np.tile(vals.astype(object).to_numpy(), int(n_copies) + 1)[order]
            res.obs[c] = pd.Categorical(tiled, categories=vals.cat.categories) if isinstance(
                vals.dtype, pd.CategoricalDtype) else tiled.astype(vals.dtype)
        for k, v in mdata.obsm.items():
            if isinstance(v, np.ndarray) and v.shape[0] == mdata.n_obs:
                res.obsm[k] = np.concatenate([v] * (int(n_copies) + 1))[order]
        res.obs[COPY_KEY] = np.repeat(np.arange(int(n_copies) + 1), mdata.n_obs)
        res.update()
    logger.info("augment_stain: %d cells x %d (the originals and %d stain-jittered copies, strength %.2f)",
                mdata.n_obs, int(n_copies) + 1, int(n_copies), strength)
    return res
