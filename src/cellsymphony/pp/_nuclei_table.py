"""Read labelled nucleus centroids exported by H&E classifiers (CSV / TSV, GeoJSON, HoVer-Net JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

# property names that hold a nucleus class in GeoJSON exports, tried in this order after `label`
_CLASS_PROPERTIES = ("classification", "class", "class_name", "type", "cell_type", "label", "name")
_PROB_PROPERTIES = ("probability", "prob", "type_prob", "confidence", "score")


def _ring_centroid(ring) -> tuple[float, float, float]:
    """Area-weighted centroid (x, y) and signed area of a closed or open polygon ring."""
    p = np.asarray(ring, dtype=np.float64)[:, :2]
    if len(p) == 0:
        return np.nan, np.nan, 0.0
    q = np.roll(p, -1, axis=0)
    cross = p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]
    area = cross.sum() / 2.0
    if abs(area) < 1e-12:
        m = p.mean(axis=0)
        return float(m[0]), float(m[1]), 0.0
    cx = ((p[:, 0] + q[:, 0]) * cross).sum() / (6.0 * area)
    cy = ((p[:, 1] + q[:, 1]) * cross).sum() / (6.0 * area)
    return float(cx), float(cy), float(area)


def _polygon_centroid(rings) -> tuple[float, float]:
    """Centroid of a GeoJSON Polygon (exterior ring minus holes)."""
    parts = [_ring_centroid(r) for r in rings]
    if not parts:
        return np.nan, np.nan
    ext = parts[0]
    total = abs(ext[2])
    if total == 0:
        return ext[0], ext[1]
    sx, sy, a = ext[0] * total, ext[1] * total, total
    for cx, cy, ar in parts[1:]:
        sx -= cx * abs(ar)
        sy -= cy * abs(ar)
        a -= abs(ar)
    return (sx / a, sy / a) if a > 0 else (ext[0], ext[1])


def _geometry_points(geom: dict) -> list[tuple[float, float]]:
    """One centroid per nucleus: a Point or Polygon is one; each part of a Multi* is one (CellViT groups
    all nuclei of a class into one MultiPolygon / MultiPoint feature)."""
    if not geom:
        return []
    kind = geom.get("type")
    coords = geom.get("coordinates")
    if kind == "Point":
        return [(float(coords[0]), float(coords[1]))]
    if kind == "MultiPoint":
        return [(float(c[0]), float(c[1])) for c in coords]
    if kind == "Polygon":
        return [_polygon_centroid(coords)]
    if kind == "MultiPolygon":
        return [_polygon_centroid(poly) for poly in coords]
    if kind == "GeometryCollection":
        out = []
        for g in geom.get("geometries", []):
            out.extend(_geometry_points(g))
        return out
    raise ValueError(f"GeoJSON geometry type {kind!r} is not supported (Point, MultiPoint, Polygon, MultiPolygon).")


def _class_name(props: dict, label: str):
    for key in (label, *_CLASS_PROPERTIES):
        if key in props and props[key] is not None:
            v = props[key]
            if isinstance(v, dict):  # QuPath / CellViT: {"name": "Tumor", "color": [...]}
                v = v.get("name", v.get("names"))
                if isinstance(v, list):
                    v = ":".join(str(x) for x in v)
            return None if v is None else str(v)
    return None


def _prob(props: dict):
    for key in _PROB_PROPERTIES:
        if key in props:
            try:
                return float(props[key])
            except (TypeError, ValueError):
                return np.nan
    meas = props.get("measurements")
    if isinstance(meas, dict):
        for key in _PROB_PROPERTIES:
            for k, v in meas.items():
                if k.lower() == key:
                    return float(v)
    return np.nan


def _read_geojson(obj, x: str, y: str, label: str) -> pd.DataFrame:
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, list):
        features = obj
    else:
        raise ValueError("not a GeoJSON FeatureCollection, Feature or list of Features")
    rows = []
    for feat in features:
        if not isinstance(feat, dict):
            continue
        props = feat.get("properties") or {}
        cls = _class_name(props, label)
        prob = _prob(props)
        for px, py in _geometry_points(feat.get("geometry")):
            rows.append((px, py, cls, prob))
    df = pd.DataFrame(rows, columns=[x, y, label, "probability"])
    if df["probability"].isna().all():
        df = df.drop(columns="probability")
    return df


def _read_hovernet(obj, x: str, y: str, label: str) -> pd.DataFrame:
    rows = []
    for nuc in obj["nuc"].values():
        cx, cy = nuc["centroid"][:2]
        t = nuc.get("type")
        rows.append((float(cx), float(cy), None if t is None else str(t), float(nuc.get("type_prob", np.nan) or np.nan)))
    df = pd.DataFrame(rows, columns=[x, y, label, "probability"])
    if df["probability"].isna().all():
        df = df.drop(columns="probability")
    return df


def read_nuclei(nuclei, *, x: str, y: str, label: str) -> pd.DataFrame:
    """A DataFrame of nucleus centroids with columns ``x``, ``y``, ``label`` (and ``probability`` when given).

    ``nuclei`` is a DataFrame, or a path to a CSV/TSV (columns named by ``x``, ``y``, ``label``), a GeoJSON
    export (QuPath, CellViT: Point / Polygon / Multi* features with a ``classification`` property) or a
    HoVer-Net JSON (``{"nuc": {id: {"centroid", "type", "type_prob"}}}``).
    """
    source = "nuclei"
    if isinstance(nuclei, str | os.PathLike):
        path = Path(nuclei)
        source = str(path)
        if not path.exists():
            raise ValueError(f"nuclei file {path} does not exist.")
        suffixes = "".join(path.suffixes).lower()
        if suffixes.endswith((".geojson", ".json")):
            try:
                obj = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}).") from None
            try:
                df = _read_hovernet(obj, x, y, label) if isinstance(obj, dict) and "nuc" in obj else _read_geojson(obj, x, y, label)
            except (KeyError, TypeError, IndexError) as err:
                raise ValueError(f"{path}: could not read nucleus centroids from the JSON ({err!r}).") from None
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        elif suffixes.endswith((".tsv", ".tsv.gz", ".txt")):
            df = pd.read_csv(path, sep="\t")
        else:
            df = pd.read_csv(path)
    elif isinstance(nuclei, pd.DataFrame):
        df = nuclei
    else:
        raise ValueError(
            f"nuclei must be a DataFrame or a path to a CSV / GeoJSON file, got {type(nuclei).__name__}."
        )
    missing = [c for c in (x, y, label) if c not in df.columns]
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {missing} (it has {list(df.columns)}); name the coordinate and class "
            "columns with x=, y= and label=."
        )
    out = pd.DataFrame(
        {
            "x": pd.to_numeric(df[x], errors="coerce").to_numpy(np.float64),
            "y": pd.to_numeric(df[y], errors="coerce").to_numpy(np.float64),
            "label": df[label].astype(object).where(df[label].notna(), None).to_numpy(),
        }
    )
    if "probability" in df.columns:
        out["probability"] = pd.to_numeric(df["probability"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(out[["x", "y"]].to_numpy()).all(axis=1)
    if bad.all():
        raise ValueError(f"{source}: no nucleus has finite numeric coordinates in columns {x!r}, {y!r}.")
    return out.loc[~bad].reset_index(drop=True)
