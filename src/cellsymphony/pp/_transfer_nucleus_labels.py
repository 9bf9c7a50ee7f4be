"""Transfer H&E nucleus classes onto Xenium cells, with registration QC and optional refinement."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import (
    HE_LABEL_KEY,
    NUCLEUS_KEY,
    REG_ALIGNMENT,
    REG_PIXEL_SIZE,
    SAMPLE_KEY,
    SPATIAL_KEY,
)
from .._coordinates import cell_coordinates
from .._docs import inject_docs
from .._joint import push_joint_obs
from .._registration import (
    apply_affine,
    check_alignment,
    fit_affine,
    he_px_to_um,
    mutual_nearest,
    registry_warp,
)
from .._settings import logger
from .._utils import params_record
from .._validate import (
    check_choice,
    check_float,
    check_not_empty,
    is_mudata,
    renamed_parameters,
    samples_registry,
)
from ..io._nuclei import read_nuclei

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

SPACES = ("he_px", "um", "xenium_px")
REFINE = ("shift", "affine")
# below this fraction of possible matches the coordinates are probably in another space
_LOW_MATCH_RATE = 0.2
_MIN_PAIRS = {"shift": 5, "affine": 10}
_MAX_ITER = 20


def _cell_coords(data, cells: pd.Index) -> tuple[np.ndarray, str]:
    """Xenium nucleus centroids (micrometres) of ``cells``, the cell centroid where a cell has none
    (:func:`cellsymphony._coordinates.cell_coordinates`), and the key most of them came from."""
    xy, keys = cell_coordinates(data, "nucleus", names=cells, return_keys=True, purpose="transfer_nucleus_labels")
    n_cell = int((keys == SPATIAL_KEY).sum())
    if n_cell:
        logger.warning(
            "transfer_nucleus_labels: %d of %d cells have no obsm[%r]; matching them by their cell centroid obsm[%r].",
            n_cell, len(keys), NUCLEUS_KEY, SPATIAL_KEY,
        )
    return xy, NUCLEUS_KEY if (keys == NUCLEUS_KEY).any() else SPATIAL_KEY


def _qc(cells_xy, nuclei_xy, ci, ni, n_cells, n_nuclei) -> dict:
    off = cells_xy[ci] - nuclei_xy[ni]
    dist = np.hypot(off[:, 0], off[:, 1])
    n = int(len(ci))
    possible = max(min(n_cells, n_nuclei), 1)
    out = {
        "n_cells": int(n_cells),
        "n_nuclei": int(n_nuclei),
        "n_matched": n,
        "match_rate_cells": n / max(n_cells, 1),
        "match_rate_nuclei": n / max(n_nuclei, 1),
        "match_rate": n / possible,
    }
    if n:
        out.update(
            median_um=float(np.median(dist)),
            p95_um=float(np.percentile(dist, 95)),
            mean_offset_um=off.mean(axis=0),
            median_offset_um=np.median(off, axis=0),
            offset_sd_um=off.std(axis=0),
        )
    else:
        out.update(
            median_um=np.nan, p95_um=np.nan, mean_offset_um=np.full(2, np.nan),
            median_offset_um=np.full(2, np.nan), offset_sd_um=np.full(2, np.nan),
        )
    return out


def _to_um(xy: np.ndarray, space: str, reg: dict | None) -> np.ndarray:
    if space == "um":
        return xy.copy()
    ps = float(reg[REG_PIXEL_SIZE])
    if space == "xenium_px":
        return xy * ps
    return he_px_to_um(xy, reg[REG_ALIGNMENT], ps, registry_warp(reg))


@renamed_parameters(x="x_key", y="y_key", label="label_key")
@inject_docs()
def transfer_nucleus_labels(
    mdata: MuData | AnnData,
    nuclei: pd.DataFrame | str | os.PathLike,
    *,
    x_key: str = "x",
    y_key: str = "y",
    label_key: str = "class",
    space: Literal["he_px", "um", "xenium_px"] = "he_px",
    sample: str | None = None,
    max_distance_um: float = 5.0,
    key_added: str = HE_LABEL_KEY,
    refine: Literal["shift", "affine"] | None = None,
    qc_warn_um: float = 3.0,
    allow_empty: bool = False,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Put the classes of an H&E nucleus classifier onto Xenium cells, and check the registration.

    Labelled nucleus centroids from an H&E pipeline (QuPath, HoVer-Net, CellViT, AI-sTIL ...) are
    mapped into the Xenium micrometre frame through the sample's registration
    (``mdata.uns["cellsymphony"]["samples"][sample]["alignment"]``) and matched one-to-one to the
    Xenium nucleus centroids (``obsm["nucleus_centroid"]``): a cell and a nucleus are paired when
    each is the other's nearest neighbour and they lie within ``max_distance_um``. Unmatched cells
    get a missing label.

    The matched pairs measure the registration: their distances (median and 95th percentile) and
    offset vectors (cell minus H&E nucleus; a mean clearly away from zero is a systematic shift).
    These are logged and stored, with a warning when the median exceeds ``qc_warn_um`` (morphology
    tokens pool 7 um, so a worse registration blurs every morphology embedding). With
    ``refine="shift"`` or ``"affine"`` the correction is fitted from the pairs (iterating match
    and fit until it settles), composed into the sample's registry alignment, and the match is
    run again; the refinement corrects residual errors up to about ``max_distance_um`` and is
    recorded in ``uns``. Morphology embeddings computed before a refinement should be recomputed.

    When almost nothing matches, a warning gives the match rate and the rate the other
    coordinate spaces would give, to point at a wrong ``space=``.

    Parameters
    ----------
    mdata
        {mdata}
    nuclei
        Labelled nucleus centroids: a DataFrame, or the path of a CSV / TSV / parquet table with columns
        ``x``, ``y``, ``label`` (and optionally ``probability``), of a GeoJSON export (QuPath / CellViT:
        Point, Polygon, MultiPoint or MultiPolygon features, one nucleus per point or polygon but one per
        QuPath detection, class in the ``label`` property or ``classification`` ``{{"name": ...}}``,
        probability in ``probability`` / ``score`` ...), or of a HoVer-Net JSON
        (``{{"nuc": {{id: {{"centroid", "type", "type_prob"}}}}}}``, classes are the type numbers).
    x_key, y_key
        Coordinate columns (for GeoJSON / HoVer-Net files the geometry is used); formerly ``x``, ``y``.
    label_key
        Class column (property for GeoJSON); formerly ``label``.
    space
        Frame of the coordinates: ``"he_px"`` H&E level-0 pixels (mapped through the registration,
        including its non-rigid field when :func:`cellsymphony.io.register_he` stored one),
        ``"um"`` Xenium micrometres, ``"xenium_px"`` Xenium morphology-image pixels.
    sample
        Section the nuclei belong to; ``None`` when there is only one. Only its cells are matched.
    max_distance_um
        Largest distance (micrometres) between a cell's nucleus centroid and a matched H&E nucleus.
    key_added
        Name of the label column and of the ``uns`` entry.
    refine
        ``None`` (default) leaves the registration alone; ``"shift"`` or ``"affine"`` refines it from
        the matched pairs (``space="he_px"`` only) and updates the sample's registry.
    qc_warn_um
        Median match distance (micrometres) above which a registration warning is issued.
    allow_empty
        When no cell of the sample gets a label (no nucleus matched, or only nuclei without a class: an all-missing
        ``he_label``, usually a wrong ``space=`` or registration), write the empty column with a warning instead
        of raising a ``ValueError``.
    copy
        {copy}

    Returns
    -------
    Returns None (or a copy with ``copy=True``) and writes:

    - ``mdata.obs[key_added]``: matched class (categorical; missing for unmatched cells);
    - ``mdata.obs[f"{{key_added}}_distance"]``: distance (um) to the matched H&E nucleus;
    - ``mdata.obs[f"{{key_added}}_probability"]``: the classifier's probability, when the input has one;
    - ``mdata.uns[key_added]``: ``"params"`` and ``"samples"][sample]`` with the match statistics
      (``n_cells``, ``n_nuclei``, ``n_matched``, ``match_rate_cells``, ``match_rate_nuclei``), the
      registration QC (``median_um``, ``p95_um``, ``mean_offset_um``, ``median_offset_um``,
      ``offset_sd_um``, ``registration_ok``), ``"label_counts"`` (DataFrame) and, after a refinement,
      ``"refinement"`` (``applied``, ``kind``, ``correction_um``, ``alignment_before``,
      ``alignment_after``, ``n_iterations`` and the ``qc_before``; a refinement that gives fewer
      matches at a larger median distance is not applied, with a warning);
    - with ``refine``, ``mdata.uns["cellsymphony"]["samples"][sample]["alignment"]`` is replaced.
    """
    check_choice("space", space, SPACES)
    if refine is not None:
        check_choice("refine", refine, REFINE)
        if space != "he_px":
            raise ValueError(
                f"refine={refine!r} corrects the H&E registration and needs space='he_px' (got space={space!r})."
            )
    max_distance_um = check_float("max_distance_um", max_distance_um, min=0, min_open=True, unit="um")
    qc_warn_um = check_float("qc_warn_um", qc_warn_um, min=0, min_open=True, unit="um")
    table = read_nuclei(nuclei, x=x_key, y=y_key, label=label_key, label_arg="label_key", drop_invalid=True)

    data = mdata.copy() if copy else mdata
    obs_names = pd.Index(data.obs_names)

    # --- which section and which cells
    registry = samples_registry(data)
    sample_col = None
    for src in [data] + (list(data.mod.values()) if is_mudata(data) else []):
        if SAMPLE_KEY in src.obs:
            sample_col = src.obs[SAMPLE_KEY].reindex(obs_names).astype(object)
            break
    present = [] if sample_col is None else sorted(pd.unique(sample_col.dropna().astype(str)))
    if sample is None:
        known = sorted(registry) if space != "um" else present
        if len(known) == 1:
            sample = known[0]
        elif len(known) > 1:
            raise ValueError(f"The data hold several samples {known}: pass sample= naming the section of these nuclei.")
        elif space != "um":
            raise ValueError(
                f"space={space!r} needs a sample registry with the H&E alignment and pixel size "
                "(mdata.uns['cellsymphony']['samples'], written by cs.io.read_xenium with an H&E image); "
                "none found. Pass coordinates in micrometres with space='um'."
            )
    reg = registry.get(sample) if sample is not None else None  # also used to suggest another space
    if space != "um":
        if sample not in registry:
            raise ValueError(f"Sample {sample!r} has no registry entry (known: {sorted(registry)}).")
        reg = registry[sample]
        if space == "he_px":
            if REG_ALIGNMENT not in reg:
                raise ValueError(f"Sample {sample!r} has no H&E alignment in its registry; read it with an H&E image.")
            check_alignment(reg[REG_ALIGNMENT], f"sample {sample!r}")
    if sample is not None and sample_col is not None and sample in present:
        in_sample = (sample_col.astype(str) == str(sample)).to_numpy()
    elif sample is not None and sample_col is not None and present:
        raise ValueError(f"No cell has obs[{SAMPLE_KEY!r}] == {sample!r} (samples present: {present}).")
    else:
        in_sample = np.ones(len(obs_names), dtype=bool)
    sample_id = "all" if sample is None else str(sample)
    cell_idx = np.flatnonzero(in_sample)
    cells_xy, coord_key = _cell_coords(data, obs_names[cell_idx])

    nuc_raw = table[["x", "y"]].to_numpy()
    nuc_um = _to_um(nuc_raw, space, reg)
    n_cells = int(np.isfinite(cells_xy).all(axis=1).sum())
    n_nuc = len(table)

    ci, ni, dist = mutual_nearest(cells_xy, nuc_um, max_distance_um)
    qc = _qc(cells_xy, nuc_um, ci, ni, n_cells, n_nuc)

    # --- wrong space? compare with the other interpretations of the numbers
    if qc["match_rate"] < _LOW_MATCH_RATE:
        alternatives = []
        for alt in SPACES:
            if alt == space or (alt != "um" and (reg is None or (alt == "he_px" and REG_ALIGNMENT not in reg))):
                continue
            a_ci, _, _ = mutual_nearest(cells_xy, _to_um(nuc_raw, alt, reg), max_distance_um)
            alternatives.append((alt, len(a_ci) / max(min(n_cells, n_nuc), 1)))
        hint = "; ".join(f"with space={alt!r} {rate:.0%} would match" for alt, rate in alternatives)
        better = [alt for alt, rate in alternatives if rate > max(2 * qc["match_rate"], _LOW_MATCH_RATE)]
        msg = (
            f"transfer_nucleus_labels: only {qc['n_matched']} of {min(n_cells, n_nuc)} possible nuclei matched a cell "
            f"within {max_distance_um} um (match rate {qc['match_rate']:.1%}) with space={space!r}. "
            + (f"The coordinates look like space={better[0]!r} ({hint})." if better else
               f"Check space= ({hint or 'no other space available'}), sample=, the registration, and that H&E "
               "coordinates are level-0 pixels (not those of a downsampled level).")
        )
    labelled = int(table["class"].notna().to_numpy()[ni].sum()) if len(ni) else 0
    if labelled == 0:  # an all-missing label column: refused unless allow_empty
        cause = msg if qc["match_rate"] < _LOW_MATCH_RATE else (
            f"the {qc['n_matched']} matched nuclei have no class in column {label_key!r}.")
        check_not_empty(0, what=f"transfer_nucleus_labels: {key_added!r} of sample {sample_id!r}",
                        why=cause, allow_empty=allow_empty)  # fmt: skip
    if qc["match_rate"] < _LOW_MATCH_RATE:
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)

    # --- optional refinement of the registration
    refinement = None
    if refine is not None:
        need = _MIN_PAIRS[refine]
        if qc["n_matched"] < need:
            raise ValueError(
                f"refine={refine!r} needs at least {need} matched pairs, found {qc['n_matched']}; check space= and "
                "the registration, or raise max_distance_um."
            )
        total = np.eye(3)
        iterations = 0
        for iterations in range(1, _MAX_ITER + 1):  # noqa: B007
            moved = apply_affine(total, nuc_um)
            r_ci, r_ni, _ = mutual_nearest(cells_xy, moved, max_distance_um)
            if len(r_ci) < need:
                break
            step = fit_affine(moved[r_ni], cells_xy[r_ci], refine)
            total = step @ total
            if np.abs(step[:2, 2]).max() < 1e-3 and np.abs(step[:2, :2] - np.eye(2)).max() < 1e-6:
                break
        ps = float(reg[REG_PIXEL_SIZE])
        scale = np.diag([ps, ps, 1.0])
        before = np.asarray(reg[REG_ALIGNMENT], dtype=np.float64).copy()
        after = np.linalg.inv(scale) @ total @ scale @ before
        check_alignment(after, "refined alignment")
        new_um = he_px_to_um(nuc_raw, after, ps, registry_warp(reg))
        new = mutual_nearest(cells_xy, new_um, max_distance_um)
        new_qc = _qc(cells_xy, new_um, *new[:2], n_cells, n_nuc)
        qc_before = qc
        improved = new_qc["n_matched"] >= need and not (
            new_qc["median_um"] > qc["median_um"] and new_qc["n_matched"] <= qc["n_matched"]
        )
        if improved:
            reg[REG_ALIGNMENT] = after
            nuc_um, (ci, ni, dist), qc = new_um, new, new_qc
        else:
            total, after = np.eye(3), before
            msg = (
                f"transfer_nucleus_labels: refine={refine!r} did not improve the match of sample {sample_id!r} "
                "(fewer matches and a larger median distance); the registration is left unchanged."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            logger.warning(msg)
        refinement = {
            "applied": bool(improved),
            "kind": refine,
            "correction_um": total,
            "alignment_before": before,
            "alignment_after": after,
            "n_iterations": int(iterations),
            "qc_before": qc_before,
        }
        logger.info(
            "transfer_nucleus_labels: refined the registration of sample %r (%s, %d iterations): median match "
            "distance %.2f -> %.2f um%s",
            sample_id, refine, iterations, qc_before["median_um"], qc["median_um"],
            "; the registry alignment is updated, recompute morphology embeddings (cs.pp.embed_morphology)."
            if improved else "; not applied.",
        )

    qc["registration_ok"] = bool(qc["n_matched"] > 0 and qc["median_um"] <= qc_warn_um)
    if qc["n_matched"] and qc["median_um"] > qc_warn_um:
        msg = (
            f"transfer_nucleus_labels: the H&E registration of sample {sample_id!r} looks off: median match distance "
            f"{qc['median_um']:.2f} um > {qc_warn_um} um (mean offset {qc['mean_offset_um'][0]:+.2f}, "
            f"{qc['mean_offset_um'][1]:+.2f} um); morphology tokens pool 7 um, so this blurs the embeddings. "
            "Consider refine='shift' or 'affine'."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)

    # --- write
    # vectorised (one value per H&E nucleus, ~10^6 on a section): missing stays None, the rest as text
    missing = table["class"].isna().to_numpy()
    labels = table["class"].astype(str).to_numpy(dtype=object)
    labels[missing] = None
    rows = cell_idx[ci]
    col = pd.Series(None, index=obs_names, dtype=object)
    dcol = pd.Series(np.nan, index=obs_names, dtype=np.float64)
    if key_added in data.obs:  # keep the labels of other samples from earlier calls
        col[~in_sample] = data.obs[key_added].astype(object)[~in_sample]
        dkey = f"{key_added}_distance"
        if dkey in data.obs:
            dcol[~in_sample] = data.obs[dkey].to_numpy()[~in_sample]
    col.iloc[rows] = labels[ni]
    dcol.iloc[rows] = dist
    classes = sorted(pd.unique(col.dropna().astype(str)))
    data.obs[key_added] = pd.Categorical(col.to_numpy(), categories=classes)
    data.obs[f"{key_added}_distance"] = dcol.to_numpy()
    if table["probability"].notna().any():
        pkey = f"{key_added}_probability"
        pcol = pd.Series(np.nan, index=obs_names, dtype=np.float64)
        if pkey in data.obs:
            pcol[~in_sample] = data.obs[pkey].to_numpy()[~in_sample]
        pcol.iloc[rows] = table["probability"].to_numpy()[ni]
        data.obs[pkey] = pcol.to_numpy()

    matched_labels = pd.Series(labels[ni], dtype=object).fillna("nan")
    counts_nuclei = pd.Series(labels, dtype=object).fillna("nan").value_counts()
    counts_matched = matched_labels.value_counts()
    label_counts = pd.DataFrame(
        {
            "label": counts_nuclei.index.astype(str),
            "n_nuclei": counts_nuclei.to_numpy().astype(np.int64),
            "n_matched": counts_matched.reindex(counts_nuclei.index).fillna(0).to_numpy().astype(np.int64),
        }
    )
    entry = dict(qc)
    entry["coords_key"] = coord_key
    entry["label_counts"] = label_counts
    if refinement is not None:
        entry["refinement"] = refinement
    block = data.uns.get(key_added)
    samples = dict(block.get("samples", {})) if isinstance(block, dict) else {}
    samples[sample_id] = entry
    data.uns[key_added] = {
        "params": params_record(
            x_key=x_key, y_key=y_key, label_key=label_key, space=space, sample=sample_id, max_distance_um=float(max_distance_um),
            refine=refine, qc_warn_um=float(qc_warn_um),
            nuclei=str(nuclei) if isinstance(nuclei, str | os.PathLike) else "DataFrame",
        ),
        "samples": samples,
    }
    push_joint_obs(data, [key_added, f"{key_added}_distance", f"{key_added}_probability"])
    from .._results import record_outputs

    record_outputs(data, key_added, "pp.transfer_nucleus_labels", [f"obs[{key_added!r}]", f"uns[{key_added!r}]"])
    logger.info(
        "transfer_nucleus_labels: sample %r: %d of %d cells matched to %d H&E nuclei (%.1f%% of cells, %.1f%% of nuclei) "
        "within %.1f um; registration QC: median %.2f um, 95th percentile %.2f um, mean offset (%+.2f, %+.2f) um. "
        "Added %s, %s_distance to obs and %s to uns.",
        sample_id, qc["n_matched"], n_cells, n_nuc, 100 * qc["match_rate_cells"], 100 * qc["match_rate_nuclei"],
        max_distance_um, qc["median_um"], qc["p95_um"], qc["mean_offset_um"][0], qc["mean_offset_um"][1],
        key_added, key_added, key_added,
    )
    return data if copy else None
