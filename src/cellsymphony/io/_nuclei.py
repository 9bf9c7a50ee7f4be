"""One reader for nucleus-detection files: tables (CSV / TSV / parquet), GeoJSON (QuPath, CellViT, StarDist) and
HoVer-Net json. Used by :func:`cellsymphony.io.read_he_cells` and :func:`cellsymphony.pp.transfer_nucleus_labels`."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pandas as pd

from .._errors import reading, require_file
from .._settings import logger

# the columns of every table read_nuclei returns
COLUMNS = ("cell_id", "x", "y", "class", "probability", "area")

# (x, y, units) column pairs written by common tools, tried (with guess_columns) when the given names are absent
_KNOWN_XY = [
    ("x", "y", "px"),
    ("centroid_x", "centroid_y", "px"),
    ("Centroid X px", "Centroid Y px", "px"),  # QuPath, pixel export
    ("Centroid X µm", "Centroid Y µm", "um"),  # QuPath measurement export
    ("Centroid X um", "Centroid Y um", "um"),
    ("X", "Y", "px"),
    ("x_centroid", "y_centroid", "px"),
]
# table columns tried for the class, the id and the area when none is named
_CLASS_COLUMNS = ("class", "Class", "type", "cell_type", "label", "Classification", "classification", "name")
_ID_COLUMNS = ("cell_id", "id", "object_id", "Object ID", "nucleus_id")
_AREA_COLUMNS = {"area": "px", "Nucleus: Area µm^2": "um", "Nucleus: Area": "um", "nucleus_area": "px"}
# GeoJSON properties holding a class (tried after the one named by `label`) and a probability
_CLASS_PROPERTIES = ("classification", "class", "class_name", "type", "cell_type", "label", "name")
_PROB_PROPERTIES = ("probability", "prob", "type_prob", "confidence", "score")


# --- geometry -----------------------------------------------------------------------------------------------------


def _ring(ring) -> tuple[float, float, float]:
    """Centroid (x, y) and signed shoelace area of a closed or open polygon ring ``[[x, y(, z)], ...]``."""
    p = np.asarray(ring, dtype=np.float64)
    if p.size == 0:
        return np.nan, np.nan, 0.0
    p = p.reshape(len(p), -1)[:, :2]
    q = np.roll(p, -1, axis=0)
    cross = p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]
    area = cross.sum() / 2.0
    if len(p) < 3 or abs(area) < 1e-12:
        m = p.mean(axis=0)
        return float(m[0]), float(m[1]), 0.0
    cx = ((p[:, 0] + q[:, 0]) * cross).sum() / (6.0 * area)
    cy = ((p[:, 1] + q[:, 1]) * cross).sum() / (6.0 * area)
    return float(cx), float(cy), float(area)


def _polygon(rings) -> tuple[float, float, float]:
    """Centroid (x, y) and area of a GeoJSON Polygon: the exterior ring minus its holes."""
    parts = [_ring(r) for r in rings]
    if not parts:
        return np.nan, np.nan, 0.0
    ex, ey, ea = parts[0]
    area = abs(ea)
    if area == 0:
        return ex, ey, 0.0
    sx, sy, a = ex * area, ey * area, area
    for cx, cy, ar in parts[1:]:
        sx, sy, a = sx - cx * abs(ar), sy - cy * abs(ar), a - abs(ar)
    return (sx / a, sy / a, a) if a > 0 else (ex, ey, area)


def _geometry_nuclei(geom, props: dict, skipped: Counter) -> list[tuple[float, float, float]]:
    """``(x, y, area)`` of each nucleus in a geometry (area NaN for points). A Point or Polygon is one nucleus;
    each part of a Multi* is one (CellViT puts all nuclei of a class in one feature), except that a QuPath
    detection / cell split into pieces stays one nucleus (its largest piece)."""
    if not isinstance(geom, dict):
        skipped["no geometry"] += 1
        return []
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Point":
        return [(float(coords[0]), float(coords[1]), np.nan)]
    if kind == "MultiPoint":
        return [(float(c[0]), float(c[1]), np.nan) for c in coords]
    if kind == "Polygon":
        return [_polygon(coords)]
    if kind == "MultiPolygon":
        parts = [_polygon(poly) for poly in coords]
        if parts and str(props.get("objectType", "")).lower() in {"detection", "cell"}:
            parts = [max(parts, key=lambda t: t[2])]
        return parts
    if kind == "GeometryCollection":
        return [n for g in geom.get("geometries", []) for n in _geometry_nuclei(g, props, skipped)]
    skipped[str(kind)] += 1
    return []


# --- properties ---------------------------------------------------------------------------------------------------


def _class_name(props: dict, label: str | None):
    for key in (label, *_CLASS_PROPERTIES) if label else _CLASS_PROPERTIES:
        if props.get(key) is not None:
            v = props[key]
            if isinstance(v, dict):  # QuPath / CellViT: {"name": "Tumor", "color": [...]}
                v = v.get("name", v.get("names"))
                if isinstance(v, list):
                    v = ":".join(str(x) for x in v)
            return None if v is None else str(v)
    return None


def _float(v) -> float:
    try:
        return float(v) if v is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def _probability(props: dict) -> float:
    for key in _PROB_PROPERTIES:
        if key in props:
            return _float(props[key])
    meas = props.get("measurements")
    if isinstance(meas, dict):
        lower = {str(k).lower(): v for k, v in meas.items()}
        for key in _PROB_PROPERTIES:
            if key in lower:
                return _float(lower[key])
    return np.nan


# --- files --------------------------------------------------------------------------------------------------------


def _from_hovernet(obj: dict) -> pd.DataFrame:
    recs = []
    for key, nuc in obj["nuc"].items():
        cx, cy = nuc["centroid"][:2]
        contour = nuc.get("contour")
        t = nuc.get("type")
        recs.append((str(key), float(cx), float(cy), None if t is None else str(t), _float(nuc.get("type_prob")),
                     abs(_ring(contour)[2]) if contour else np.nan))
    return pd.DataFrame.from_records(recs, columns=list(COLUMNS))


def _from_geojson(obj, label: str | None, source: str) -> pd.DataFrame:
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, list):
        features = obj
    else:
        raise ValueError(
            f"{source}: not a GeoJSON FeatureCollection, Feature or list of Features, nor a HoVer-Net json with 'nuc'."
        )
    recs, skipped = [], Counter()
    for k, feat in enumerate(features):
        if not isinstance(feat, dict):
            skipped["not a Feature"] += 1
            continue
        props = feat.get("properties") or {}
        cls, prob = _class_name(props, label), _probability(props)
        fid = feat.get("id", props.get("id", props.get("cell_id")))
        parts = _geometry_nuclei(feat.get("geometry"), props, skipped)
        for j, (cx, cy, area) in enumerate(parts):
            cid = str(fid) if fid is not None and len(parts) == 1 else f"{fid if fid is not None else k}_{j}"
            recs.append((cid, cx, cy, cls, prob, area))
    if skipped:
        logger.warning("%s: skipped GeoJSON features that are no nucleus: %s", source, dict(skipped))
    if not recs:
        raise ValueError(f"{source}: the GeoJSON holds no Point / Polygon nucleus features.")
    return pd.DataFrame.from_records(recs, columns=list(COLUMNS))


def _load(nuclei, label: str | None) -> tuple[pd.DataFrame, str, bool]:
    """The raw table (or the nuclei of a geometry file, in COLUMNS), its name for messages, and whether it is
    a geometry file."""
    if isinstance(nuclei, pd.DataFrame):
        return nuclei, "nuclei DataFrame", False
    if not isinstance(nuclei, str | os.PathLike):
        raise ValueError(
            f"nuclei must be a DataFrame or the path of a CSV / TSV / parquet / GeoJSON / HoVer-Net json file, "
            f"got {type(nuclei).__name__}."
        )
    path = require_file(nuclei, "the nucleus file", "Check the path of the nucleus detections (nuclei=).")
    source = str(path)
    name = path.name.lower()
    fix = ("Pass a CSV / TSV / parquet table of nucleus centroids, a GeoJSON (QuPath, CellViT, StarDist) or a "
           "HoVer-Net json; check that the file is complete.")
    with reading(path, "the nucleus file", fix):
        if name.endswith((".geojson", ".json")):
            with open(path, encoding="utf-8") as fh:
                obj = json.load(fh)
            if isinstance(obj, dict) and "nuc" in obj:
                return _from_hovernet(obj), source, True
            return _from_geojson(obj, label, source), source, True
        if name.endswith(".parquet"):
            return pd.read_parquet(path), source, False
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        return pd.read_csv(path, sep=sep), source, False


# --- the reader ---------------------------------------------------------------------------------------------------


def read_nuclei(
    nuclei: str | os.PathLike | pd.DataFrame,
    *,
    x: str = "x",
    y: str = "y",
    label: str | None = None,
    id_key: str | None = None,
    units: str = "px",
    guess_columns: bool = False,
    drop_invalid: bool = False,
    label_arg: str = "label",
) -> pd.DataFrame:
    """Nucleus detections as one table, whatever the file format.

    Parameters
    ----------
    nuclei
        A DataFrame, or the path of a CSV / TSV (``.tsv``, ``.tsv.gz``, ``.txt``) / parquet table, a GeoJSON
        (``.geojson`` / ``.json``: QuPath, CellViT, StarDist; Point, MultiPoint, Polygon, MultiPolygon and
        GeometryCollection features) or a HoVer-Net json (``{"nuc": {id: {"centroid", "contour", "type",
        "type_prob"}}}``).
    x, y
        Centroid columns of a table (geometry files use their geometry).
    label
        Class column of a table, or GeoJSON property tried first; when named, a table must have it. ``None``:
        the first of the usual class columns / properties present.
    id_key
        Id column of a table (must exist when named); ``None``: the first usual id column present.
    units
        Units of a table's centroid columns (``"px"`` or ``"um"``), recorded in ``attrs["units"]``.
    guess_columns
        When ``(x, y)`` are the defaults and absent, try the centroid columns of common tools (``centroid_x``,
        QuPath's ``Centroid X px`` / ``Centroid X µm`` ...), with their units.
    drop_invalid
        Drop nuclei with missing or non-numeric centroids (an error when all are); else any is an error.
    label_arg
        Name of the caller's class argument, for error messages.

    Returns
    -------
    DataFrame with columns ``cell_id`` (str), ``x``, ``y`` (float), ``class`` (object, None when unknown),
    ``probability`` and ``area`` (float, NaN when unknown; polygon areas in pixels), and ``attrs``
    ``source`` (name for messages), ``units`` and ``area_units`` (``"px"`` or ``"um"``) and ``id_column``
    (the column the ids came from; None when numbered ``cell_<i>``).
    """
    raw, source, geometry = _load(nuclei, label)
    if len(raw) == 0:
        raise ValueError(f"{source}: no nuclei.")
    if geometry:
        out = raw.reset_index(drop=True)
        unit, area_unit, idk, xc, yc = "px", "px", "cell_id", "x", "y"
    else:
        cols = list(raw.columns)
        xc, yc, unit = x, y, units
        if not (x in raw.columns and y in raw.columns) and guess_columns and (x, y) == ("x", "y"):
            xc, yc, unit = next(((a, b, u) for a, b, u in _KNOWN_XY if a in raw.columns and b in raw.columns),
                                (x, y, units))
        missing = [c for c in (xc, yc) if c not in raw.columns]
        if label is not None and label not in raw.columns:
            missing.append(label)
        if id_key is not None and id_key not in raw.columns:
            missing.append(id_key)
        if missing:
            what = []
            if xc in missing or yc in missing:
                what.append(f"no centroid columns {xc!r} / {yc!r} (pass x_key= and y_key= naming them)")
            if label in missing:
                what.append(f"no class column {label!r} (pass {label_arg}= naming it)")
            if id_key in missing:
                what.append(f"no id column {id_key!r} (pass id_key= naming it, or none)")
            raise ValueError(f"{source} lacks the column(s) {missing} (it has {cols[:20]}): {'; '.join(what)}.")
        ck = label if label is not None else next((c for c in _CLASS_COLUMNS if c in raw.columns), None)
        idk = id_key if id_key is not None else next((c for c in _ID_COLUMNS if c in raw.columns), None)
        area_col = next((c for c in _AREA_COLUMNS if c in raw.columns), None)
        n = len(raw)
        out = pd.DataFrame(
            {
                "cell_id": raw[idk].astype(str).to_numpy() if idk else np.char.add("cell_", np.arange(n).astype(str)),
                "x": pd.to_numeric(raw[xc], errors="coerce").to_numpy(np.float64),
                "y": pd.to_numeric(raw[yc], errors="coerce").to_numpy(np.float64),
                "class": raw[ck].astype(object).where(raw[ck].notna(), None).to_numpy() if ck else np.full(n, None),
                "probability": (pd.to_numeric(raw["probability"], errors="coerce").to_numpy(np.float64)
                                if "probability" in raw.columns else np.full(n, np.nan)),
                "area": (pd.to_numeric(raw[area_col], errors="coerce").to_numpy(np.float64)
                         if area_col else np.full(n, np.nan)),
            }
        )
        area_unit = _AREA_COLUMNS[area_col] if area_col else "px"
    bad = ~np.isfinite(out[["x", "y"]].to_numpy(np.float64)).all(axis=1)
    if bad.any() and not drop_invalid:
        raise ValueError(f"{source}: {int(bad.sum())} nuclei have missing or non-numeric centroids in {xc!r}/{yc!r}.")
    if bad.all():
        raise ValueError(f"{source}: no nucleus has finite numeric coordinates in columns {xc!r}, {yc!r}.")
    out = out.loc[~bad].reset_index(drop=True)
    out.attrs = {"source": source, "units": unit, "area_units": area_unit, "id_column": idk}
    return out
