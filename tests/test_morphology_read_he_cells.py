"""cs.io.read_he_cells: nucleus tables of common tools -> a morphology-only MuData."""

from __future__ import annotations

import json
import warnings

import mudata as md
import numpy as np
import pandas as pd
import pytest
from morphology_helpers import write_he

import cellsymphony as cs

MPP = 0.5


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    img = np.full((400, 600, 3), 230, dtype=np.uint8)
    return write_he(tmp_path_factory.mktemp("he") / "slide.ome.tif", img, mpp=MPP, n_sub=1)


def _square(cx, cy, r):
    return [[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r], [cx - r, cy - r]]


def test_csv_table_registry_and_round_trip(he, tmp_path):
    df = pd.DataFrame({"id": ["a", "b", "c"], "x": [10.0, 300.0, 900.0], "y": [20.0, 200.0, 50.0], "class": ["T", "B", "T"]})
    df.to_csv(tmp_path / "nuclei.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cs.io.read_he_cells(he, tmp_path / "nuclei.csv")
    mod = m["morphology"]
    assert list(m.mod) == ["morphology"] and mod.n_vars == 0
    assert list(mod.obs_names) == ["a", "b", "c"]
    np.testing.assert_allclose(mod.obsm["spatial"], df[["x", "y"]].to_numpy() * MPP)
    np.testing.assert_allclose(mod.obsm["nucleus_centroid"], mod.obsm["spatial"])
    assert mod.obs["in_image"].tolist() == [True, True, False]  # x = 900 px is beyond the 600 px width
    assert mod.obs["nucleus_class"].tolist() == ["T", "B", "T"]
    assert mod.obs["sample"].tolist() == ["slide"] * 3
    reg = m.uns["cellsymphony"]["samples"]["slide"]
    np.testing.assert_array_equal(reg["alignment"], np.eye(3))
    assert reg["pixel_size"] == MPP and reg["he_mpp"] == MPP and reg["xenium_path"] == ""
    m.write(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    np.testing.assert_array_equal(back["morphology"].obsm["spatial"], mod.obsm["spatial"])
    assert back.uns["cellsymphony"]["samples"]["slide"]["he_path"] == reg["he_path"]
    # the patch of a nucleus is centred on it: cell_patches works on the H&E-only MuData
    p = cs.pp.cell_patches(m, cells=["b"], size=8, mpp=MPP)
    assert p.shape == (1, 8, 8, 3) and (p == 230).all()


def test_qupath_micrometre_columns_and_units(he, tmp_path):
    df = pd.DataFrame({"Object ID": ["n1", "n2"], "Centroid X µm": [5.0, 50.0], "Centroid Y µm": [7.0, 70.0],
                       "Nucleus: Area µm^2": [30.0, 41.0], "Classification": ["Tumor", None]})
    df.to_csv(tmp_path / "qupath.tsv", sep="\t", index=False)
    m = cs.io.read_he_cells(he, tmp_path / "qupath.tsv", sample="q")
    mod = m["morphology"]
    np.testing.assert_allclose(mod.obsm["spatial"], [[5.0, 7.0], [50.0, 70.0]])
    assert mod.obs["nucleus_area"].tolist() == [30.0, 41.0]
    assert mod.obs["nucleus_class"].tolist() == ["Tumor", "unknown"]
    assert list(mod.obs_names) == ["n1", "n2"] and "q" in m.uns["cellsymphony"]["samples"]
    # explicit columns in micrometres
    m2 = cs.io.read_he_cells(he, df, x_key="Centroid X µm", y_key="Centroid Y µm", units="um")
    np.testing.assert_allclose(m2["morphology"].obsm["spatial"], mod.obsm["spatial"])


def test_geojson_qupath_cellvit_and_hovernet(he, tmp_path):
    qupath = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "q1", "geometry": {"type": "Polygon", "coordinates": [_square(100, 50, 4)]},
         "properties": {"objectType": "detection", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "id": "q2", "geometry": {"type": "Point", "coordinates": [200.5, 60.0]},
         "properties": {"objectType": "detection"}},
    ]}
    (tmp_path / "q.geojson").write_text(json.dumps(qupath))
    m = cs.io.read_he_cells(he, tmp_path / "q.geojson")
    mod = m["morphology"]
    np.testing.assert_allclose(mod.obsm["spatial"], [[50.0, 25.0], [100.25, 30.0]])
    np.testing.assert_allclose(mod.obs["nucleus_area"].iloc[0], 64 * MPP**2)  # 8 x 8 px square
    assert mod.obs["nucleus_class"].iloc[0] == "Tumor"
    # CellViT: one MultiPolygon per class, each polygon a nucleus
    cellvit = [{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[_square(10, 10, 2)], [_square(40, 30, 3)]]},
                "properties": {"objectType": "annotation", "classification": {"name": "Neoplastic"}}}]
    (tmp_path / "cellvit.geojson").write_text(json.dumps(cellvit))
    m = cs.io.read_he_cells(he, tmp_path / "cellvit.geojson")
    np.testing.assert_allclose(m["morphology"].obsm["spatial"], [[5.0, 5.0], [20.0, 15.0]])
    assert m["morphology"].obs["nucleus_class"].tolist() == ["Neoplastic", "Neoplastic"]
    # HoVer-Net json
    hover = {"mag": 40, "nuc": {"1": {"centroid": [30.0, 40.0], "contour": _square(30, 40, 5)[:-1], "type": 2},
                                "2": {"centroid": [80.0, 90.0], "contour": _square(80, 90, 2)[:-1], "type": 1}}}
    (tmp_path / "hovernet.json").write_text(json.dumps(hover))
    m = cs.io.read_he_cells(he, tmp_path / "hovernet.json")
    np.testing.assert_allclose(m["morphology"].obsm["nucleus_centroid"], [[15.0, 20.0], [40.0, 45.0]])
    np.testing.assert_allclose(m["morphology"].obs["nucleus_area"], [100 * MPP**2, 16 * MPP**2])
    assert m["morphology"].obs["nucleus_class"].tolist() == ["2", "1"]


def test_bad_tables(he, tmp_path):
    with pytest.raises(ValueError, match="no centroid columns 'cx' / 'cy'"):
        cs.io.read_he_cells(he, pd.DataFrame({"x": [1.0], "y": [2.0]}), x_key="cx", y_key="cy")
    with pytest.raises(ValueError, match="no centroid columns"):
        cs.io.read_he_cells(he, pd.DataFrame({"a": [1.0]}))
    with pytest.raises(ValueError, match="missing or non-numeric"):
        cs.io.read_he_cells(he, pd.DataFrame({"x": [1.0, np.nan], "y": [2.0, 3.0]}))
    with pytest.raises(ValueError, match="not unique"):
        cs.io.read_he_cells(he, pd.DataFrame({"id": ["a", "a"], "x": [1.0, 2.0], "y": [2.0, 3.0]}))
    with pytest.raises(ValueError, match="does not exist"):
        cs.io.read_he_cells(he, tmp_path / "nope.csv")
    (tmp_path / "bad.geojson").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a GeoJSON"):
        cs.io.read_he_cells(he, tmp_path / "bad.geojson")
    with pytest.raises(ValueError, match="units="):
        cs.io.read_he_cells(he, pd.DataFrame({"x": [1.0], "y": [2.0]}), units="mm")


def test_mudata_level_layout_like_read_xenium(he, tmp_path):
    """As read_xenium: mdata.obs['sample'] (categorical) and mdata.obsm coordinates; mudata's warnings silenced."""
    df = pd.DataFrame({"x": [10.0, 300.0], "y": [20.0, 200.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        m = cs.io.read_he_cells(he, df, sample="s1")
    assert m.obs["sample"].dtype == "category" and m.obs["sample"].tolist() == ["s1", "s1"]
    np.testing.assert_allclose(m.obsm["spatial"], df[["x", "y"]].to_numpy() * MPP)
    np.testing.assert_allclose(m.obsm["nucleus_centroid"], m.obsm["spatial"])
    m.write(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    assert back.obs["sample"].tolist() == ["s1", "s1"]
