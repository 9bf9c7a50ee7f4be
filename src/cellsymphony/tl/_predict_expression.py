"""``cs.tl.predict_expression``: per-cell expression predicted from H&E ("virtual Xenium")."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import MOD_MORPH, MOD_RNA, NUCLEUS_KEY, SAMPLE_KEY, SPATIAL_KEY
from .._docs import inject_docs
from .._provenance import check_same_producer, embedding_params, fingerprint_differences, rep_fingerprint
from .._settings import logger
from .._utils import params_record
from .._validate import check_choice, check_float, check_int, is_mudata, resolve_rep

if TYPE_CHECKING:
    from mudata import MuData

    from ..models.contrastive import ContrastiveAligner

METHODS = ("knn", "ridge")
MATCHES = ("rna", "morphology")
FUNCTION = "cellsymphony.tl.predict_expression"


def _embedding_params(adata, rep: str) -> dict:
    return embedding_params(adata, rep)


def provenance_mismatch(ref_params: dict, tgt_params: dict) -> list[str]:
    """The differences between two embeddings' params that make them incomparable (encoder, weights, patch
    geometry, stain reference): the fingerprints of :mod:`cellsymphony._provenance` compared."""
    return fingerprint_differences(rep_fingerprint(ref_params), rep_fingerprint(tgt_params), ("reference", "target"))


def _expression(rna, genes: list[str], layer: str | None, normalize: bool):
    import scipy.sparse as sp

    x = rna.layers[layer] if layer is not None else rna.X
    lib = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    cols = rna.var_names.get_indexer(genes)
    y = x[:, cols]
    y = y.toarray() if sp.issparse(y) else np.asarray(y)
    y = y.astype(np.float64)
    target_sum = None
    if normalize:
        pos = lib[lib > 0]
        if len(pos) == 0:
            raise ValueError("The reference expression is all zero: nothing to predict from.")
        target_sum = float(np.median(pos))
        y = np.log1p(y / np.maximum(lib, 1e-12)[:, None] * target_sum)
    return y, target_sum


def _knn_mean(query: np.ndarray, base: np.ndarray, values: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Mean of ``values`` over the ``k`` rows of ``base`` most cosine-similar to each row of ``query``
    (both L2-normalised)."""
    out = np.empty((len(query), values.shape[1]), np.float64)
    for s in range(0, len(query), chunk):
        sim = query[s : s + chunk] @ base.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[s : s + chunk] = values[idx].mean(axis=1)
    return out


@inject_docs()
def predict_expression(
    target: MuData,
    reference: MuData,
    *,
    method: Literal["knn", "ridge"] = "knn",
    aligner: ContrastiveAligner | None = None,
    morph_rep: str | None = None,
    genes: Sequence[str] | None = None,
    key_added: str = "predicted",
    k: int = 50,
    match: Literal["rna", "morphology"] = "morphology",
    n_comps: int = 50,
    alpha: float = 1.0,
    layer: str | None = None,
    normalize: bool = True,
    modality: str = MOD_RNA,
    allow_mismatch: bool = False,
    copy: bool = False,
) -> MuData | None:
    """Predict, for every cell of ``target`` (an H&E-only slide too), the expression of the reference's genes.

    ``method="knn"`` (BLEEP's rule, per cell): each target cell's morphology embedding is projected into
    the shared space of ``aligner`` (the :class:`~cellsymphony.models.ContrastiveAligner` that
    :func:`cellsymphony.tl.align_contrastive` returned on the reference); its prediction is the mean
    expression of the ``k`` reference cells nearest to it there (cosine similarity to their morphology
    projections with ``match="morphology"``, the default; to their expression projections with
    ``match="rna"``, BLEEP's query against expression).
    ``method="ridge"`` (the HEST benchmark's baseline): ridge regression of expression on the first
    ``n_comps`` principal components of the standardised morphology embedding ``morph_rep``, fitted on
    the reference cells.

    Parameters
    ----------
    target
        MuData with a ``"morphology"`` modality holding the embedding the model reads (H&E-only slides:
        :func:`cellsymphony.io.read_he_cells` then :func:`cellsymphony.pp.embed_morphology`).
    reference
        The section with measured expression (``"rna"``) and the same morphology embedding.
    method
        ``"knn"`` (shared space of ``aligner``) or ``"ridge"`` (morphology embedding).
    aligner
        The trained aligner (``method="knn"`` only).
    morph_rep
        {morph_rep} For ``"knn"``, default the representation the aligner was trained on.
    genes
        Genes to predict (default: all of the reference's); those absent from the reference are left out
        with a warning.
    key_added
        Key of the record in the new modality's ``uns``.
    k
        Reference cells averaged per target cell (``"knn"``).
    match
        What target cells are matched to in the shared space: the reference's morphology projections
        (``"morphology"``: same-modality neighbours, the more accurate in ``benchmarks/virtual_xenium.py``) or
        its expression projections (``"rna"``, as BLEEP).
    n_comps
        Principal components of the embedding (``"ridge"``; at most the embedding's dimension).
    alpha
        Ridge penalty (``"ridge"``).
    layer
        Layer of the reference's ``"rna"`` with counts; ``None`` uses ``X``.
    normalize
        Predict ``log1p`` of counts scaled to the reference's median library size (the scale of
        ``scanpy.pp.normalize_total`` + ``log1p``); ``False`` averages the values as they are.
    modality
        Name of the modality written; a measured modality of that name is never replaced (pass another name,
        e.g. ``"rna_predicted"``, to predict on a section that has expression).
    allow_mismatch
        Accept a target embedding made with another encoder, weights, patch geometry or stain reference
        than the reference's, or than the one ``aligner`` was trained on (otherwise a ``ValueError`` lists
        the differences and names both fingerprints), with a warning.
    copy
        {copy}

    Returns
    -------
    ``None`` (or a modified copy with ``copy=True``); writes ``target.mod[modality]``: an AnnData with one row
    per morphology cell (same ``obs_names``, ``obs["sample"]``, ``obsm["spatial"]`` and
    ``obsm["nucleus_centroid"]``), ``var_names`` the genes, ``X`` the predictions (float32; NaN rows for cells
    without an embedding) and ``uns[key_added]`` with ``params`` (method, representation, k / n_comps / alpha,
    normalisation and its ``target_sum``), ``reference`` (its samples, number of cells and genes) and
    ``genes_missing``.
    """
    import anndata as ad

    check_choice("method", method, METHODS)
    check_choice("match", match, MATCHES)
    if not is_mudata(target):
        raise ValueError("predict_expression writes a new modality: target must be a MuData (an H&E-only slide read "
                         "with cs.io.read_he_cells is one).")
    if not is_mudata(reference) or MOD_RNA not in reference.mod or MOD_MORPH not in reference.mod:
        raise ValueError("reference must be a MuData with measured expression ('rna') and a 'morphology' modality: "
                         "a Xenium section read with cs.io.read_xenium and embedded with cs.pp.embed_morphology.")
    if MOD_MORPH not in target.mod:
        raise ValueError("The target has no 'morphology' modality: read the slide with cs.io.read_he_cells (H&E only) "
                         "or cs.io.read_xenium, then run cs.pp.embed_morphology.")
    k = check_int("k", k, min=1)
    n_comps = check_int("n_comps", n_comps, min=1)
    alpha = check_float("alpha", alpha, min=0)
    rna, rmorph, tmorph = reference.mod[MOD_RNA], reference.mod[MOD_MORPH], target.mod[MOD_MORPH]

    # ---- genes
    wanted = list(rna.var_names) if genes is None else [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
    known = set(rna.var_names)
    use = list(dict.fromkeys(g for g in wanted if g in known))
    missing = [g for g in wanted if g not in known]
    if not use:
        raise ValueError(f"None of the {len(wanted)} genes asked for is measured in the reference (e.g. {wanted[:5]}; "
                         f"the reference has {rna.n_vars} genes, e.g. {list(rna.var_names[:5])}).")
    if missing:
        warnings.warn(f"predict_expression: {len(missing)} of the genes asked for are not in the reference and are "
                      f"left out: {missing[:10]}", UserWarning, stacklevel=2)
    if layer is not None and layer not in rna.layers:
        raise ValueError(f"layer={layer!r} is not a layer of the reference's 'rna' (it has {sorted(rna.layers)}).")

    # ---- representations and their provenance
    if method == "knn":
        if aligner is None:
            raise ValueError("method='knn' needs aligner=: the ContrastiveAligner that cs.tl.align_contrastive "
                             "returned on the reference (or ContrastiveAligner.load(dir)).")
        rep = morph_rep or aligner.morph_rep
    else:
        rep = morph_rep
        if rep is None:
            rep = resolve_rep(target, MOD_MORPH, None)
    if rep not in tmorph.obsm:
        made = _embedding_params(rmorph, rep).get("model", "the reference's encoder")
        raise ValueError(f"The target's morphology has no {rep!r} embedding (it has {sorted(tmorph.obsm)}): run "
                         f"cs.pp.embed_morphology(target, model={str(made)!r}, ...) with the reference's settings first.")
    if rep not in rmorph.obsm:
        raise ValueError(f"The reference's morphology has no {rep!r} embedding: run cs.pp.embed_morphology on the "
                         "reference with the same settings.")
    check_same_producer(
        rep_fingerprint(_embedding_params(rmorph, rep)), rep_fingerprint(_embedding_params(tmorph, rep)),
        what=f"predict_expression: the target's {rep!r} vs the reference's", names=("reference", "target"),
        fix="Re-embed the target with the reference's settings (cs.pp.embed_morphology).",
        allow_mismatch=allow_mismatch,
    )
    if method == "knn":  # the aligner's own record of what it was trained on, against the target
        aligner._check_provenance(target, {MOD_MORPH: rep}, allow_mismatch=allow_mismatch, stacklevel=4)

    # ---- reference cells: expression paired with the reference side of the model
    paired = rna.obs_names.intersection(rmorph.obs_names, sort=False)
    y_all, target_sum = _expression(rna, use, layer, normalize)
    x_t = np.asarray(tmorph.obsm[rep], dtype=np.float32)
    shared = target.obs_names.intersection(paired)
    if len(shared):
        logger.warning("predict_expression: %d target cells are also reference cells: their predictions see their own "
                       "expression (hold them out of the reference to measure accuracy).", len(shared))
    if method == "knn":
        if match == "rna":
            z_r = aligner.transform(reference, MOD_RNA, allow_mismatch=allow_mismatch)
            ref_rows = np.arange(rna.n_obs)
        else:
            z_r = aligner.transform(reference, MOD_MORPH, rep=rep, allow_mismatch=allow_mismatch)[rmorph.obs_names.get_indexer(paired)]
            ref_rows = rna.obs_names.get_indexer(paired)
        ok = np.isfinite(z_r).all(axis=1)
        z_r, ref_rows = z_r[ok], ref_rows[ok]
        if len(ref_rows) < k:
            raise ValueError(f"The reference has {len(ref_rows)} cells with a shared-space projection, fewer than k={k}: "
                             "pass a smaller k or a larger reference.")
        z_t = aligner.transform_array(x_t, MOD_MORPH)
        good = np.isfinite(z_t).all(axis=1)
        pred = np.full((tmorph.n_obs, len(use)), np.nan, np.float32)
        pred[good] = _knn_mean(z_t[good].astype(np.float64), z_r.astype(np.float64), y_all[ref_rows], k)
        extra = {"k": k, "match": match, "aligner_morph_rep": aligner.morph_rep, "aligner_gene_rep": aligner.gene_rep}
    else:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x_r = np.asarray(rmorph.obsm[rep], dtype=np.float64)[rmorph.obs_names.get_indexer(paired)]
        y_r = y_all[rna.obs_names.get_indexer(paired)]
        ok = np.isfinite(x_r).all(axis=1)
        if ok.sum() < 2:
            raise ValueError("The reference has fewer than 2 cells with a finite morphology embedding to fit the ridge on.")
        if x_r.shape[1] != x_t.shape[1]:
            raise ValueError(f"The target's {rep!r} has {x_t.shape[1]} dimensions, the reference's {x_r.shape[1]}.")
        n_pc = int(min(n_comps, x_r.shape[1], ok.sum() - 1))
        if n_pc < 1:
            raise ValueError(f"n_comps must be >= 1, got {n_comps!r}.")
        fit = make_pipeline(StandardScaler(), PCA(n_components=n_pc, random_state=0), Ridge(alpha=float(alpha)))
        fit.fit(x_r[ok], y_r[ok])
        good = np.isfinite(x_t).all(axis=1)
        pred = np.full((tmorph.n_obs, len(use)), np.nan, np.float32)
        if good.any():
            pred[good] = np.asarray(fit.predict(x_t[good].astype(np.float64))).reshape(int(good.sum()), len(use))
        extra = {"n_comps": n_pc, "alpha": float(alpha)}

    # ---- write the new modality
    if modality in target.mod:
        old = target.mod[modality]
        made_by = [v for v in old.uns.values() if isinstance(v, dict) and isinstance(v.get("params"), dict)
                   and str(v["params"].get("function", "")) == FUNCTION]
        if not made_by:
            raise ValueError(f"The target already has a measured {modality!r} modality: pass modality='rna_predicted' "
                             "(or another new name) to keep it.")
    if copy:
        target = target.copy()
        tmorph = target.mod[MOD_MORPH]
    out = ad.AnnData(X=pred, obs=pd.DataFrame(index=tmorph.obs_names.copy()), var=pd.DataFrame(index=pd.Index(use)))
    if SAMPLE_KEY in tmorph.obs:
        out.obs[SAMPLE_KEY] = tmorph.obs[SAMPLE_KEY].to_numpy()
    for key in (SPATIAL_KEY, NUCLEUS_KEY):
        if key in tmorph.obsm:
            out.obsm[key] = np.asarray(tmorph.obsm[key]).copy()
    ref_samples = (rna.obs[SAMPLE_KEY].astype(str).unique().tolist() if SAMPLE_KEY in rna.obs else [])
    out.uns[key_added] = {
        "params": params_record(function=FUNCTION, method=method, morph_rep=rep, layer=layer, normalize=bool(normalize),
                                target_sum=target_sum, allow_mismatch=bool(allow_mismatch), **extra),
        "reference": {"samples": np.asarray(ref_samples, dtype=str), "n_cells": int(len(paired)),
                      "n_genes": int(len(use))},
        "genes_missing": np.asarray(missing, dtype=str),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        target.mod[modality] = out
        target.update()
    logger.info("added the %r modality (%d cells x %d genes predicted by %s from %r) with uns[%r]", modality,
                out.n_obs, out.n_vars, method, rep, key_added)
    return target if copy else None
