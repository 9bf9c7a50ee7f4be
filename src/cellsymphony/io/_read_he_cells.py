"""``cs.io.read_he_cells``: a morphology-only MuData from an H&E slide and a nucleus-detection table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import (
    IN_IMAGE_KEY,
    MOD_MORPH,
    NUCLEUS_CLASS_KEY,
    NUCLEUS_KEY,
    REG_ALIGNMENT,
    REG_HE_MPP,
    REG_HE_PATH,
    REG_PIXEL_SIZE,
    REG_XENIUM_PATH,
    SAMPLE_KEY,
    SAMPLES_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from .._settings import logger

if TYPE_CHECKING:
    from mudata import MuData

    from ._he import HEImage

# (x, y, units) column pairs written by common tools, tried when the given names are absent
_KNOWN_XY = [
    ("x", "y", "px"),
    ("centroid_x", "centroid_y", "px"),
    ("Centroid X px", "Centroid Y px", "px"),  # QuPath, pixel export
    ("Centroid X µm", "Centroid Y µm", "um"),  # QuPath measurement export
    ("Centroid X um", "Centroid Y um", "um"),
    ("X", "Y", "px"),
    ("x_centroid", "y_centroid", "px"),
]
_CLASS_COLUMNS = ("class", "Class", "type", "cell_type", "label", "Classification", "classification", "name")
_ID_COLUMNS = ("cell_id", "id", "object_id", "Object ID", "nucleus_id")
_AREA_COLUMNS = {"area": "px", "Nucleus: Area µm^2": "um", "Nucleus: Area": "um", "nucleus_area": "px"}


def _polygon_area_centroid(ring) -> tuple[float, float, float]:
    """Area and centroid (shoelace) of a closed or open polygon ring ``[[x, y], ...]``."""
    p = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(p) < 3:
        c = p.mean(axis=0) if len(p) else np.array([np.nan, np.nan])
        return 0.0, float(c[0]), float(c[1])
    x, y = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2.0
    if abs(a) < 1e-12:
        c = p.mean(axis=0)
        return 0.0, float(c[0]), float(c[1])
    cx = ((x + x1) * cross).sum() / (6 * a)
    cy = ((y + y1) * cross).sum() / (6 * a)
    return abs(a), float(cx), float(cy)


def _class_name(props: dict):
    cls = props.get("classification", props.get("class", props.get("type")))
    if isinstance(cls, dict):
        cls = cls.get("name")
    return None if cls is None else str(cls)


def _from_geojson(obj, source: str) -> pd.DataFrame:
    """Nuclei from GeoJSON (QuPath, CellViT, StarDist exports) or a HoVer-Net ``{"nuc": ...}`` json."""
    if isinstance(obj, dict) and "nuc" in obj:  # HoVer-Net json output
        recs = []
        for key, nuc in obj["nuc"].items():
            cx, cy = nuc["centroid"][:2]
            area = _polygon_area_centroid(nuc["contour"])[0] if nuc.get("contour") else np.nan
            t = nuc.get("type")
            recs.append({"cell_id": str(key), "x": float(cx), "y": float(cy), "area": area,
                         "class": None if t is None else str(t)})
        return pd.DataFrame.from_records(recs)
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, list):
        features = obj
    else:
        raise ValueError(
            f"{source}: not a GeoJSON FeatureCollection / list of Features, nor a HoVer-Net json with 'nuc'."
        )
    recs = []
    for k, feat in enumerate(features):
        geom = (feat or {}).get("geometry") or {}
        props = feat.get("properties") or {}
        cls = _class_name(props)
        fid = feat.get("id", props.get("id", props.get("cell_id")))
        gtype, coords = geom.get("type"), geom.get("coordinates")
        parts: list[tuple[float, float, float]] = []
        if gtype == "Point":
            parts = [(np.nan, float(coords[0]), float(coords[1]))]
        elif gtype == "MultiPoint":
            parts = [(np.nan, float(c[0]), float(c[1])) for c in coords]
        elif gtype == "Polygon":
            parts = [_polygon_area_centroid(coords[0])]
        elif gtype == "MultiPolygon":
            parts = [_polygon_area_centroid(poly[0]) for poly in coords]
            # one QuPath object split into pieces stays one nucleus (its largest piece)
            if str(props.get("objectType", "")).lower() in {"detection", "cell"} and parts:
                parts = [max(parts, key=lambda t: t[0])]
        else:
            continue
        for j, (area, cx, cy) in enumerate(parts):
            cid = f"{fid}" if fid is not None and len(parts) == 1 else f"{fid if fid is not None else k}_{j}"
            recs.append({"cell_id": cid, "x": cx, "y": cy, "area": area, "class": cls})
    if not recs:
        raise ValueError(f"{source}: the GeoJSON holds no Point / Polygon nucleus features.")
    return pd.DataFrame.from_records(recs)


def _read_table(nuclei, source: str) -> pd.DataFrame:
    if isinstance(nuclei, pd.DataFrame):
        return nuclei.copy()
    path = Path(nuclei)
    if not path.exists():
        raise ValueError(f"Nucleus table {str(path)!r} does not exist.")
    name = path.name.lower()
    try:
        if name.endswith((".geojson", ".json")):
            with open(path) as fh:
                return _from_geojson(json.load(fh), source)
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        return pd.read_csv(path, sep=sep)
    except (OSError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as err:
        if isinstance(err, ValueError) and str(err).startswith(source):
            raise
        raise ValueError(f"Cannot read the nucleus table {str(path)!r}: {err}") from None


def read_he_cells(
    he_image: str | os.PathLike | HEImage,
    nuclei: str | os.PathLike | pd.DataFrame,
    *,
    x: str = "x",
    y: str = "y",
    units: Literal["px", "um"] = "px",
    mpp: float | None = None,
    sample: str | None = None,
    id_key: str | None = None,
    class_key: str | None = None,
) -> MuData:
    """A morphology-only MuData from an H&E slide plus nucleus detections (slides without Xenium).

    Reads nucleus centroids from a CSV / TSV / parquet table (StarDist, QuPath measurement export,
    any table with centroid columns), a GeoJSON (QuPath, CellViT, StarDist: Point, Polygon, MultiPolygon
    and MultiPoint features, centroids of polygons computed exactly, ``classification`` kept), or a
    HoVer-Net json (``{"nuc": {id: {"centroid", "contour", "type"}}}``). The MuData has the layout of
    :func:`cellsymphony.io.read_xenium` for the ``"morphology"`` modality, and a registry whose
    alignment is the identity with ``pixel_size`` equal to the H&E's micrometres per pixel, so every
    morphology function works on it.

    Parameters
    ----------
    he_image
        The H&E slide (path or an opened :class:`~cellsymphony.io.HEImage`).
    nuclei
        Nucleus detections: a file as above or a DataFrame.
    x, y
        Centroid columns of a table; when absent, known column names (``centroid_x``, QuPath's
        ``Centroid X px`` / ``Centroid X µm``, ...) are tried.
    units
        Units of the table's centroids: ``"px"`` (level-0 H&E pixels) or ``"um"`` (micrometres).
        GeoJSON and HoVer-Net coordinates are pixels.
    mpp
        Micrometres per H&E pixel, when the file records none (or to override it).
    sample
        Sample id; default the slide's file name without extension.
    id_key
        Column of cell ids (default: ``cell_id`` / ``id`` / ``Object ID`` when present, else ``cell_<i>``).
    class_key
        Column of nucleus classes kept as ``obs["nucleus_class"]`` (default: ``class`` / ``type`` /
        ``Classification`` when present).

    Returns
    -------
    MuData with modality ``"morphology"``: X with zero columns; obs ``nucleus_area`` (um^2, NaN when
    unknown), ``cell_area`` (NaN), ``in_image``, ``sample`` (categorical), ``nucleus_class`` (when
    given); obsm ``spatial`` and ``nucleus_centroid`` (micrometres, x right, y down); and
    ``uns["cellsymphony"]["samples"][sample]`` with ``he_path``, identity ``alignment``, ``pixel_size``,
    ``he_mpp`` and an empty ``xenium_path``.
    """
    import anndata as ad
    import mudata as md

    from ._he import HEImage
    from ._read_he import read_he

    if units not in ("px", "um"):
        raise ValueError(f"units={units!r} is not one of ['px', 'um'].")
    he = he_image if isinstance(he_image, HEImage) else read_he(he_image, mpp=mpp)
    try:
        he_mpp = float(mpp) if mpp is not None else float(he.mpp)
        height, width = he.shapes[0]
        he_path = str(Path(he.path).resolve())
    finally:
        if he is not he_image:
            he.close()
    source = str(nuclei) if not isinstance(nuclei, pd.DataFrame) else "nuclei DataFrame"
    df = _read_table(nuclei, source)
    if len(df) == 0:
        raise ValueError(f"{source}: no nuclei.")
    cols = list(df.columns)
    if x in df.columns and y in df.columns:
        xc, yc, unit = x, y, units
    else:
        hit = None
        if (x, y) == ("x", "y"):
            hit = next(((a, b, u) for a, b, u in _KNOWN_XY if a in df.columns and b in df.columns), None)
        if hit is None:
            raise ValueError(
                f"{source}: no centroid columns {x!r} / {y!r} (columns: {cols[:20]}). Pass x= and y= naming "
                "the centroid columns (and units='um' for micrometres)."
            )
        xc, yc, unit = hit
    xy = df[[xc, yc]].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise ValueError(f"{source}: {int(bad.sum())} nuclei have missing or non-numeric centroids in {xc!r}/{yc!r}.")
    xy_um = xy if unit == "um" else xy * he_mpp

    idk = id_key or next((c for c in _ID_COLUMNS if c in df.columns), None)
    if id_key is not None and id_key not in df.columns:
        raise ValueError(f"{source}: id_key={id_key!r} is not a column ({cols[:20]}).")
    ids = df[idk].astype(str).to_numpy() if idk else np.array([f"cell_{i}" for i in range(len(df))])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: the ids in {idk!r} are not unique; pass id_key= another column or none.")
    sample = sample or Path(he_path).name.split(".")[0]

    obs = pd.DataFrame(index=pd.Index(ids, name="cell_id"))
    area = np.full(len(df), np.nan)
    for col, u in _AREA_COLUMNS.items():
        if col in df.columns:
            area = df[col].to_numpy(dtype=np.float64) * (he_mpp**2 if u == "px" else 1.0)
            break
    obs["cell_area"] = np.full(len(df), np.nan)
    obs["nucleus_area"] = area
    ck = class_key or next((c for c in _CLASS_COLUMNS if c in df.columns), None)
    if class_key is not None and class_key not in df.columns:
        raise ValueError(f"{source}: class_key={class_key!r} is not a column ({cols[:20]}).")
    if ck is not None and df[ck].notna().any():
        obs[NUCLEUS_CLASS_KEY] = pd.Categorical(df[ck].astype("string").fillna("unknown").to_numpy())
    px = xy_um / he_mpp
    inside = (px[:, 0] >= -0.5) & (px[:, 0] < width - 0.5) & (px[:, 1] >= -0.5) & (px[:, 1] < height - 0.5)
    obs[IN_IMAGE_KEY] = inside
    obs[SAMPLE_KEY] = pd.Categorical([sample] * len(df))
    adata = ad.AnnData(X=np.zeros((len(df), 0), dtype=np.float32), obs=obs)
    adata.obsm[SPATIAL_KEY] = xy_um.copy()
    adata.obsm[NUCLEUS_KEY] = xy_um.copy()
    mdata = md.MuData({MOD_MORPH: adata})
    mdata.uns[UNS_KEY] = {
        SAMPLES_KEY: {
            sample: {
                REG_HE_PATH: he_path,
                REG_ALIGNMENT: np.eye(3),
                REG_PIXEL_SIZE: he_mpp,
                REG_HE_MPP: he_mpp,
                REG_XENIUM_PATH: "",
            }
        }
    }
    if (~inside).any():
        logger.warning("read_he_cells: %d of %d nuclei lie outside the H&E image (in_image False).", int((~inside).sum()), len(df))
    logger.info("read_he_cells: %d nuclei on %s (sample %r, %.4g um/px)", len(df), Path(he_path).name, sample, he_mpp)
    return mdata
