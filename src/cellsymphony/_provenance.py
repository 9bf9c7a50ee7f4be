"""The fingerprint of a representation, and the check that two representations were made alike.

Every embedding function records its producer in ``uns[key]["params"]`` (``cs.pp.embed_morphology``:
model, weights checksum, patch geometry, stain reference; ``cs.pp.embed_expression``: weights checksum,
``max_length``, binning). The **fingerprint** is the part of that record that decides what the numbers
mean: two embeddings with different fingerprints live in different spaces even when their widths agree
(e.g. two scGPT checkpoints of the same width). Settings that change results only by rounding or by a
few random draws (batch size, device, chunking, cache, seed) are not part of it, nor are paths.

Used by the trained models (``CellTypeClassifier.predict``, ``ContrastiveAligner.transform``: the
fingerprints of the representations they were trained on, saved in ``config.json``) and by
``cs.tl.predict_expression`` (reference vs target).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

# the keys of a producer's params record that make up the fingerprint, in the order they are shown
FINGERPRINT_KEYS = (
    "model", "weights_checksum", "mode", "pool", "pool_radius_um", "layer", "size", "mpp",  # embed_morphology
    "max_length", "n_bins",  # embed_expression
)  # fmt: skip
STAIN_KEY = "stain_reference"


def embedding_params(adata, rep: str) -> dict:
    """The producer's parameter record of ``adata.obsm[rep]`` (``adata.uns[rep]["params"]``), ``{}`` when absent."""
    entry = adata.uns.get(rep, {}) if hasattr(adata, "uns") else {}
    params = entry.get("params", {}) if isinstance(entry, Mapping) else {}
    return dict(params) if isinstance(params, Mapping) else {}


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _stain_reference(params: Mapping):
    st = params.get("stain")
    if not isinstance(st, Mapping) or str(st.get("method", "")) == "jitter":
        return None  # not normalised (jitter is an augmentation, not a target stain)
    ref = st.get("reference", {})
    return {str(k): np.asarray(v, dtype=np.float64).tolist() for k, v in ref.items() if k != "method"}


def rep_fingerprint(params: Mapping | None) -> dict:
    """The fingerprint of a representation from its producer's ``params`` record: the values of
    :data:`FINGERPRINT_KEYS` it holds (JSON-safe), plus ``stain_reference`` for a stain-normalised morphology
    embedding. ``{}`` when the record holds none of them (a representation the package did not make)."""
    if not params:
        return {}
    fp = {k: _plain(params[k]) for k in FINGERPRINT_KEYS if k in params and params[k] is not None}
    if fp:
        stain = _stain_reference(params)
        if stain is not None:
            fp[STAIN_KEY] = stain
    return fp


def describe(fp: Mapping) -> str:
    """A one-line form of a fingerprint for messages (checksums cut to 16 hex digits)."""
    if not fp:
        return "{no producer record}"
    parts = []
    for k, v in fp.items():
        if k == STAIN_KEY:
            parts.append(f"{k}=<{len(v)} values>" if isinstance(v, Mapping) else f"{k}={v}")
        elif isinstance(v, str) and v.startswith("sha256:"):
            parts.append(f"{k}={v[:23]}")
        else:
            parts.append(f"{k}={v}")
    return "{" + ", ".join(parts) + "}"


def _same(a, b) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) and not isinstance(b, bool):
        return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=0.0))
    return str(a) == str(b)


def fingerprint_differences(a: Mapping, b: Mapping, names: tuple[str, str] = ("a", "b")) -> list[str]:
    """The fields in which fingerprints ``a`` and ``b`` differ, as ``"key: <a> x, <b> y"`` texts. A field
    recorded on one side only is not a difference (records of earlier versions hold fewer fields), except
    the stain reference: normalised on one side and not on the other is one."""
    out = []
    for k in FINGERPRINT_KEYS:
        if k in a and k in b and not _same(a[k], b[k]):
            out.append(f"{k}: {names[0]} {a[k]!r}, {names[1]} {b[k]!r}")
    sa, sb = a.get(STAIN_KEY), b.get(STAIN_KEY)
    if a and b and (sa is None) != (sb is None):
        which = names[0] if sa is not None else names[1]
        out.append(f"stain: only the {which} was stain-normalised")
    elif sa is not None and sb is not None:
        same = set(sa) == set(sb) and all(
            np.shape(sa[k]) == np.shape(sb[k]) and np.allclose(sa[k], sb[k], atol=1e-6) for k in sa
        )
        if not same:
            out.append("stain: normalised to different reference stains (pass reference=the training section to "
                       "cs.pp.normalize_stain)")  # fmt: skip
    return out


def check_same_producer(
    expected: Mapping,
    found: Mapping,
    *,
    what: str,
    names: tuple[str, str],
    fix: str,
    allow_mismatch: bool,
    stacklevel: int = 3,
) -> list[str]:
    """Refuse (``ValueError``) or, with ``allow_mismatch``, warn when two fingerprints differ. The message
    names ``what`` was compared, both fingerprints in full and the differing fields, and ``fix``. Returns the
    differences (empty when the two agree or when either side has no fingerprint)."""
    if not expected or not found:
        return []
    diffs = fingerprint_differences(expected, found, names)
    if diffs:
        msg = (
            f"{what}: the representations were not made by the same producer ({'; '.join(diffs)}). "
            f"{names[0]}: {describe(expected)}; {names[1]}: {describe(found)}. {fix}"
        )
        if not allow_mismatch:
            raise ValueError(msg + " Pass allow_mismatch=True to apply it anyway.")
        warnings.warn(msg + " Applied anyway (allow_mismatch=True): the results may be meaningless.",
                      UserWarning, stacklevel=stacklevel)  # fmt: skip
    return diffs
