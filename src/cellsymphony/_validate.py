"""Checks and look-ups shared by the public functions.

Each raises a ``ValueError`` that names the problem and the function to run (or the
argument to pass) to fix it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._constants import LATEST_KEY, MOD_MORPH, MOD_RNA, SAMPLES_KEY, UNS_KEY

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

# which public function writes the representations of each modality
PRODUCERS = {MOD_RNA: "cs.pp.embed_expression", MOD_MORPH: "cs.pp.embed_morphology"}


def is_mudata(data: Any) -> bool:
    """Whether ``data`` is a MuData (checked without importing mudata eagerly)."""
    return type(data).__name__ == "MuData" and hasattr(data, "mod")


def get_modality(data: MuData | AnnData, mod: str) -> AnnData:
    """Return modality ``mod`` of a MuData, or ``data`` itself when it is an AnnData."""
    if is_mudata(data):
        if mod not in data.mod:
            raise ValueError(
                f"The MuData has no modality {mod!r} (it has {sorted(data.mod)}). "
                "Read the data with cs.io.read_xenium (or cs.io.read_he_cells for H&E-only slides)."
            )
        return data.mod[mod]
    return data


def uns_block(data: MuData | AnnData) -> dict:
    """The package's own dict ``data.uns["cellsymphony"]``, created when missing."""
    block = data.uns.get(UNS_KEY)
    if block is None:
        block = {}
        data.uns[UNS_KEY] = block
    return block


def set_latest(data: MuData | AnnData, mod: str, key: str) -> None:
    """Record ``key`` as the latest representation of modality ``mod``."""
    block = uns_block(data)
    latest = dict(block.get(LATEST_KEY, {}))
    latest[mod] = key
    block[LATEST_KEY] = latest


def resolve_rep(data: MuData | AnnData, mod: str, rep: str | None) -> str:
    """Name of the representation to use for ``mod``: ``rep`` if given, else the latest one written.

    Raises a ``ValueError`` naming the function to run when there is none, or when ``rep`` is absent.
    """
    adata = get_modality(data, mod)
    producer = PRODUCERS.get(mod, "the embedding function")
    if rep is None:
        latest = data.uns.get(UNS_KEY, {}).get(LATEST_KEY, {})
        rep = latest.get(mod) if isinstance(latest, Mapping) else None
        if rep is None:
            raise ValueError(
                f"No {mod!r} representation has been computed yet: run {producer} first "
                f"(or pass the name of an existing key of .obsm)."
            )
    if rep not in adata.obsm:
        raise ValueError(
            f"{rep!r} is not in the {mod!r} modality's .obsm (it has {sorted(adata.obsm)}): "
            f"run {producer} first, or pass one of those keys."
        )
    return rep


def get_rep(data: MuData | AnnData, mod: str, rep: str | None) -> tuple[str, np.ndarray]:
    """Resolve and return ``(key, float32 array)`` of a modality's representation."""
    key = resolve_rep(data, mod, rep)
    x = get_modality(data, mod).obsm[key]
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    return key, np.asarray(x, dtype=np.float32)


def find_obs_column(mdata: MuData | AnnData, key: str) -> pd.Series:
    """Find a per-cell column by name, indexed like ``mdata.obs``.

    Looks in ``mdata.obs`` as given, then as ``mod:key``, then in each modality's ``obs``.
    """
    looked = [f"obs[{key!r}]"]
    if key in mdata.obs:
        return mdata.obs[key]
    if is_mudata(mdata):
        for mod in mdata.mod:
            name = f"{mod}:{key}"
            looked.append(f"obs[{name!r}]")
            if name in mdata.obs:
                return mdata.obs[name]
        for mod, adata in mdata.mod.items():
            looked.append(f"{mod}.obs[{key!r}]")
            if key in adata.obs:
                return adata.obs[key].reindex(mdata.obs_names)
    raise ValueError(f"Column {key!r} not found; looked in {', '.join(looked)}.")


def samples_registry(data: MuData | AnnData) -> dict:
    """The per-sample registry ``uns["cellsymphony"]["samples"]`` (empty dict when missing)."""
    return data.uns.get(UNS_KEY, {}).get(SAMPLES_KEY, {})


def sample_registry(data: MuData | AnnData, sample: str) -> dict:
    """One sample's registry entry, with an error naming the known samples when it is missing."""
    reg = samples_registry(data)
    if sample not in reg:
        raise ValueError(
            f"Sample {sample!r} has no registry entry (known: {sorted(reg)}); read it with cs.io.read_xenium."
        )
    return reg[sample]


def check_choice(name: str, value: str, choices) -> None:
    """Raise a ``ValueError`` listing the valid options when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


def renamed_parameters(**old_to_new: str) -> Callable:
    """Accept the former keyword names of renamed parameters for a deprecation period: the call works,
    with a FutureWarning that names the new keyword (the names follow the naming table of the
    contributor guide). The signature shows the new names only."""

    def deco(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{func.__name__}() got both {old}= (its former name) and {new}=; pass {new}= only.")
                    warnings.warn(
                        f"{func.__name__}({old}=...) is deprecated and will be removed; write {new}=... instead "
                        "(same meaning).",
                        FutureWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        wrapper.renamed_parameters = dict(old_to_new)
        return wrapper

    return deco



# ------------------------------------------------------------------------------------------------ numbers
def check_int(
    name: str, value, *, min: int | None = None, max: int | None = None, none: bool = False, hint: str = ""
) -> int | None:
    """``value`` as an ``int`` after checking it: a Python or numpy integer (not a bool, not a float such as
    ``2.7`` or ``2.0``) within ``[min, max]``. ``none=True`` lets ``None`` through. Raises a ``ValueError``
    naming the parameter, what it got and what it takes (``hint``: a default or a fix to add)."""
    if value is None and none:
        return None
    bounds = _bounds_text(min, max)
    tail = f" ({hint})" if hint else ""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}={value!r} must be an integer{bounds}{' or None' if none else ''}{tail}.")
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name}={value!r} is out of range: it must be an integer{bounds}{tail}.")
    return int(value)


def check_float(
    name: str,
    value,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    none: bool = False,
    unit: str = "",
    hint: str = "",
) -> float | None:
    """``value`` as a finite ``float`` after checking it: a real number (integers accepted, bools and strings
    not) within ``min``..``max`` (``min_open`` / ``max_open``: the bound itself excluded). ``none=True`` lets
    ``None`` through. Raises a ``ValueError`` naming the parameter, what it got and the range."""
    if value is None and none:
        return None
    lo = "" if min is None else f"{'>' if min_open else '>='} {min:g}"
    hi = "" if max is None else f"{'<' if max_open else '<='} {max:g}"
    rng = " and ".join(p for p in (lo, hi) if p)
    unit_text = f" {unit}" if unit else ""
    tail = f" ({hint})" if hint else ""
    what = f"a finite number{' ' + rng if rng else ''}{unit_text}{' or None' if none else ''}"
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name}={value!r} must be {what}{tail}.")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name}={value!r} must be {what}{tail}.")
    low_bad = min is not None and (v <= min if min_open else v < min)
    high_bad = max is not None and (v >= max if max_open else v > max)
    if low_bad or high_bad:
        raise ValueError(f"{name}={value!r} is out of range: it must be {what}{tail}.")
    return v


def check_mpp(name: str, value) -> float:
    """A pixel size in micrometres per pixel, within the plausible range of slides and patches
    (``MPP_RANGE``: 0.05 - 10 um/px); a value outside it is almost always a unit mistake (nm, mm, or
    pixels per micrometre)."""
    from ._constants import MPP_RANGE

    lo, hi = MPP_RANGE
    return check_float(name, value, min=lo, max=hi, unit="um/px",
                       hint="micrometres per pixel, e.g. 0.5 for 20x patches; check the unit")  # fmt: skip


def _bounds_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


# ------------------------------------------------------------------------------------------------ empty results
def check_not_empty(n_valid: int, *, what: str, why: str, allow_empty: bool, latest: bool = False) -> bool:
    """Refuse an all-empty result (all NaN, all missing): ``n_valid == 0`` raises a ``ValueError`` saying
    ``what`` would be empty and ``why`` (the likely cause and fix), unless ``allow_empty``; then it warns and
    returns ``True`` (the caller writes the result; an embedding does not become the latest representation,
    ``latest=True`` says so in the warning). Returns ``False`` when the result is not empty."""
    if n_valid > 0:
        return False
    tail = " It is written but does not become the latest representation." if latest else " It is written."
    if not allow_empty:
        raise ValueError(f"{what} would be empty: {why} Nothing was written; pass allow_empty=True to write it anyway.")
    warnings.warn(f"{what} is empty (allow_empty=True): {why}{tail}", UserWarning, stacklevel=3)
    return True
