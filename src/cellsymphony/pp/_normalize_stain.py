"""``cs.pp.normalize_stain``: estimate each slide's stain and the reference every slide is normalised to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import LATEST_KEY, MOD_MORPH, UNS_KEY
from .._docs import inject_docs
from .._settings import logger
from .._utils import params_record
from .._validate import check_choice, get_modality, is_mudata
from ._patch_source import cell_centres, sample_sources
from ._stain import METHODS, estimate, record_arrays, tissue_pixels

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

STAIN_KEY = "stain"
_MAX_PIXELS = 400_000


def _sample_pixels(src, xy: np.ndarray, n_cells: int, size_um: float, mpp: float, seed: int) -> np.ndarray:
    """Tissue pixels of patches around up to ``n_cells`` cells of one slide."""
    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(np.isfinite(xy).all(axis=1))
    ok = ok[src.in_image(xy[ok])]
    if len(ok) == 0:
        raise ValueError(f"Sample {src.sample!r}: no cell lies inside its H&E, so its stain cannot be estimated.")
    pick = rng.choice(ok, size=min(n_cells, len(ok)), replace=False)
    size = max(8, int(round(size_um / mpp)))
    px = tissue_pixels(src.read(xy[pick], size=size, mpp=mpp))
    if len(px) > _MAX_PIXELS:
        px = px[rng.choice(len(px), _MAX_PIXELS, replace=False)]
    return px


def stain_reference(reference: Any, method: str, key: str = STAIN_KEY) -> dict:
    """The reference stain record held by ``reference``.

    ``reference`` is a stain record (dict with ``method``), the ``uns`` entry of :func:`normalize_stain`
    (dict with ``reference``), an embedding's ``params`` (with ``stain``), a MuData / AnnData whose
    morphology modality holds a :func:`normalize_stain` result under ``key`` or an embedding made with
    ``stain=``, or a trained model (a classifier or aligner, loaded or not) whose morphology input was
    embedded with ``stain=`` (the reference recorded in its provenance).
    """
    if hasattr(reference, "provenance") and not hasattr(reference, "uns"):  # a trained model
        reference = model_stain_reference(reference)
    if isinstance(reference, dict):
        if "stain" in reference and isinstance(reference["stain"], dict):  # an embedding's params
            reference = reference["stain"]
        if "reference" in reference and isinstance(reference["reference"], dict):
            reference = reference["reference"]
        if "method" not in reference:
            raise ValueError("reference: a dict must be a stain record (with 'method') or the uns entry of "
                             "cs.pp.normalize_stain (with 'reference').")
        rec = record_arrays(reference)
    else:
        adata = get_modality(reference, MOD_MORPH)
        if not hasattr(adata, "uns"):
            raise ValueError(f"reference must be a MuData / AnnData or a stain record, got {type(reference).__name__}.")
        entry = adata.uns.get(key)
        if not (isinstance(entry, dict) and "reference" in entry):  # an embedding made with stain=
            latest = reference.uns.get(UNS_KEY, {}).get(LATEST_KEY, {}).get(MOD_MORPH) if is_mudata(reference) else None
            params = adata.uns.get(latest, {}).get("params", {}) if latest else {}
            entry = params.get("stain") if isinstance(params.get("stain"), dict) else None
        if entry is None:
            raise ValueError(f"The reference data hold no stain record under uns[{key!r}] of its morphology modality: "
                             "run cs.pp.normalize_stain on the reference section first.")
        rec = record_arrays(entry["reference"])
    if rec["method"] != method:
        raise ValueError(f"The reference stain was estimated with method={rec['method']!r}, not {method!r}: "
                         f"pass method={rec['method']!r}.")
    return rec


def model_stain_reference(model) -> dict:
    """The reference stain a model's morphology input was normalised to (``provenance["morphology"]``: the
    ``params["stain"]`` its embedding recorded), as a stain record."""
    entry = (getattr(model, "provenance", None) or {}).get(MOD_MORPH) or {}
    stain = (entry.get("params") or {}).get("stain")
    if not (isinstance(stain, dict) and isinstance(stain.get("reference"), dict)):
        what = "no morphology input" if not entry else f"the morphology embedding {entry.get('key')!r}"
        raise ValueError(
            f"The {type(model).__name__} was trained on {what}, which records no stain reference (embedded without "
            "stain=, stain-augmented, or a projection): there is no stain to normalise to. Pass the training section "
            "as reference=, or train on an embedding made with cs.pp.normalize_stain + "
            "cs.pp.embed_morphology(stain=...)."
        )
    return stain["reference"]


@inject_docs()
def normalize_stain(
    mdata: MuData | AnnData,
    *,
    method: Literal["macenko", "reinhard"] = "macenko",
    reference: MuData | AnnData | dict | None = None,
    n_cells: int = 400,
    patch_um: float = 24.0,
    mpp: float = 0.5,
    seed: int = 0,
    key_added: str = STAIN_KEY,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Estimate the stain of each slide and choose the reference stain that embeddings normalise to.

    The stain of each sample's H&E is estimated from the pixels of patches around ``n_cells`` of its
    cells (Macenko's stain vectors and robust maximal concentrations, or Reinhard's Lab statistics). Run
    :func:`cellsymphony.pp.embed_morphology` with ``stain=key_added`` afterwards: each patch is then
    mapped from its slide's stain to the reference before the encoder sees it, and the embedding's
    ``params`` record the reference, so the models trained on it carry it too.

    Parameters
    ----------
    mdata
        {mdata} Any number of samples (an H&E-only slide from :func:`cellsymphony.io.read_he_cells` too).
    method
        ``"macenko"`` (stain vectors; corrects hue and strength) or ``"reinhard"`` (Lab colour statistics).
    reference
        The stain to normalise to: ``None`` uses the first sample's own stain (this section becomes the
        reference: do it on the training section); a MuData / AnnData normalised before (the training
        section: its reference is reused, so a new slide matches it); a model trained on a normalised
        embedding (a ``CellTypeClassifier`` or ``ContrastiveAligner``, e.g. loaded from its folder: the
        reference recorded in its provenance, so the slide is embedded as the model expects); or a stain
        record / ``uns`` entry / embedding ``params`` dict holding one.
    n_cells
        Cells per sample whose surrounding pixels are used.
    patch_um
        Side of the patch read around each of them (micrometres).
    mpp
        Micrometres per pixel at which the patches are read.
    seed
        {seed}
    key_added
        Key of the record in the morphology modality's ``uns``.
    copy
        {copy}

    Returns
    -------
    ``None`` (or a modified copy with ``copy=True``); writes ``mdata["morphology"].uns[key_added]`` with
    ``params`` (method and arguments), ``reference`` (the reference stain record) and ``samples`` (one
    stain record per sample: ``stain_matrix`` (3, 2) and ``max_concentrations`` (2,) for Macenko,
    ``lab_mean`` and ``lab_std`` (3,) for Reinhard).
    """
    check_choice("method", method, METHODS)
    if int(n_cells) != n_cells or n_cells < 1:
        raise ValueError(f"n_cells must be a positive integer, got {n_cells!r}.")
    if not (patch_um > 0 and mpp > 0):
        raise ValueError(f"patch_um and mpp must be positive, got {patch_um!r} and {mpp!r}.")
    ref = None if reference is None else stain_reference(reference, method)
    adata = get_modality(mdata, MOD_MORPH)
    groups = sample_sources(mdata, adata, np.arange(adata.n_obs), None)
    xy = cell_centres(adata)
    samples: dict[str, dict] = {}
    try:
        for k, (src, pos) in enumerate(groups):
            px = _sample_pixels(src, xy[pos], int(n_cells), float(patch_um), float(mpp), seed + k)
            samples[src.sample] = estimate(px, method)
    finally:
        for src, _ in groups:
            src.close()
    if ref is None:
        ref = samples[next(iter(samples))]
    if copy:
        mdata = mdata.copy()
        adata = get_modality(mdata, MOD_MORPH)
    adata.uns[key_added] = {
        "params": params_record(method=method, n_cells=int(n_cells), patch_um=float(patch_um), mpp=float(mpp),
                                seed=int(seed), reference_given=reference is not None),
        "reference": dict(ref),
        "samples": samples,
    }
    logger.info("added mdata[%r].uns[%r]: %s stain of %d sample(s) and the reference", MOD_MORPH, key_added, method,
                len(samples))
    return mdata if copy else None


def stain_transforms(adata, key: str, samples) -> dict[str, dict]:
    """Per sample, the transform to the reference recorded by :func:`normalize_stain` under ``uns[key]``."""
    entry = adata.uns.get(key)
    if not (isinstance(entry, dict) and "reference" in entry and "samples" in entry):
        raise ValueError(f"stain={key!r}: mdata['morphology'].uns[{key!r}] holds no stain record; run "
                         f"cs.pp.normalize_stain(mdata, key_added={key!r}) first.")
    ref = record_arrays(entry["reference"])
    out = {}
    for s in samples:
        if s not in entry["samples"]:
            raise ValueError(f"stain={key!r}: sample {s!r} has no stain estimate (it has {sorted(entry['samples'])}); "
                             "re-run cs.pp.normalize_stain on these data.")
        out[s] = {"method": ref["method"], "source": record_arrays(entry["samples"][s]), "reference": ref}
    return out


def wrap_stained(adata, key: str, groups: list) -> list:
    """``sample_sources`` groups whose sources read through the transforms recorded under ``uns[key]``
    (a normalisation record of :func:`normalize_stain`, or a jitter record of :func:`augment_stain`)."""
    from ._stain import StainedSource

    entry = adata.uns.get(key)
    if isinstance(entry, dict) and str(entry.get("method", "")) == "jitter":
        rec = {"method": "jitter", "seed": int(entry["seed"]), "strength": float(entry["strength"])}
        return [(StainedSource.wrap(src, rec), pos) for src, pos in groups]
    transforms = stain_transforms(adata, key, [src.sample for src, _ in groups])
    return [(StainedSource.wrap(src, transforms[src.sample]), pos) for src, pos in groups]


def stain_record(adata, key: str) -> dict:
    """What an embedding made with ``stain=key`` records in its ``params["stain"]``: the key, the method and
    the reference stain (reusable as ``reference=`` of :func:`normalize_stain` for a new slide)."""
    entry = adata.uns[key]
    if str(entry.get("method", "")) == "jitter":
        return {"key": key, "method": "jitter", "seed": int(entry["seed"]), "strength": float(entry["strength"])}
    ref = record_arrays(entry["reference"])
    return {"key": key, "method": ref["method"], "reference": ref}
