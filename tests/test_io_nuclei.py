"""The shared nucleus-file reader behind cs.io.read_he_cells and cs.pp.transfer_nucleus_labels."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from morphology_helpers import write_he

import cellsymphony as cs
from cellsymphony.io._nuclei import COLUMNS, read_nuclei


def _square(cx, cy, r):
    return [[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r], [cx - r, cy - r]]


def _feature(geom, **props):
    return {"type": "Feature", "geometry": geom, "properties": props}


def test_polygon_holes_multipolygons_and_properties(tmp_path, caplog):
    # 20 x 20 square at (100, 100) with a 10 x 10 hole whose centre is 2.5 px right of it
    holed = {"type": "Polygon", "coordinates": [_square(100, 100, 10), _square(102.5, 100, 5)[::-1]]}
    split = {"type": "MultiPolygon", "coordinates": [[_square(10, 10, 1)], [_square(50, 60, 3)]]}
    feats = [
        {**_feature(holed, classification={"name": "Tumor", "color": [1, 2, 3]}, measurements={"Score": 0.7}), "id": "h"},
        {**_feature(split, objectType="detection", classification={"names": ["Immune", "CD8"]}), "id": "d"},
        _feature(split, objectType="annotation", my_class="Stroma", probability=0.25),
        _feature({"type": "GeometryCollection", "geometries": [
            {"type": "Point", "coordinates": [1.0, 2.0, 0.0]}, {"type": "MultiPoint", "coordinates": [[3.0, 4.0]]}]}),
        _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, classification={"name": "Region"}),
        _feature(None),
    ]
    path = tmp_path / "n.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    with caplog.at_level(logging.WARNING, logger="cellsymphony"):
        t = read_nuclei(path, label="my_class")
    assert "'LineString': 1" in caplog.text and "'no geometry': 1" in caplog.text
    assert tuple(t.columns) == COLUMNS and t.attrs["units"] == "px" and t.attrs["source"] == str(path)
    # exterior minus hole: area 400 - 100, centroid (400 * 100 - 100 * 102.5) / 300 in x
    np.testing.assert_allclose(t.loc[0, ["x", "y", "area"]].to_numpy(float), [(40000 - 10250) / 300, 100.0, 300.0])
    assert (t.loc[0, "class"], t.loc[0, "probability"], t.loc[0, "cell_id"]) == ("Tumor", 0.7, "h")
    # a QuPath detection split into pieces is one nucleus (its largest piece); an annotation gives one per polygon
    assert t.loc[1, ["cell_id", "class"]].tolist() == ["d", "Immune:CD8"]
    np.testing.assert_allclose(t.loc[1, ["x", "y", "area"]].to_numpy(float), [50.0, 60.0, 36.0])
    np.testing.assert_allclose(t.loc[2:3, ["x", "y"]].to_numpy(float), [[10.0, 10.0], [50.0, 60.0]])
    assert t.loc[2:3, "class"].tolist() == ["Stroma", "Stroma"] and t.loc[2:3, "cell_id"].tolist() == ["2_0", "2_1"]
    np.testing.assert_allclose(t.loc[2:3, "probability"], 0.25)
    np.testing.assert_allclose(t.loc[4:5, ["x", "y"]].to_numpy(float), [[1.0, 2.0], [3.0, 4.0]])
    assert np.isnan(t.loc[4:5, "area"]).all() and t.loc[4:5, "class"].isna().all() and len(t) == 6


def test_hovernet_and_tables(tmp_path):
    hover = {"nuc": {"7": {"centroid": [30.0, 40.0], "contour": _square(30, 40, 5)[:-1], "type": 2, "type_prob": 0.0},
                     "8": {"centroid": [1.0, 2.0], "type": None, "type_prob": None}}}
    (tmp_path / "h.json").write_text(json.dumps(hover))
    t = read_nuclei(tmp_path / "h.json")
    assert t["cell_id"].tolist() == ["7", "8"] and t["class"].tolist() == ["2", None]
    np.testing.assert_allclose(t["area"], [100.0, np.nan])
    np.testing.assert_allclose(t["probability"], [0.0, np.nan])

    df = pd.DataFrame({"Object ID": ["a", "b", "c"], "Centroid X µm": [1.0, np.nan, 3.0], "Centroid Y µm": [4.0, 5.0, 6.0],
                       "Nucleus: Area µm^2": [10.0, 11.0, 12.0], "Class": ["T", None, "B"], "probability": [0.5, 0.6, 0.7]})
    df.to_parquet(tmp_path / "q.parquet")
    with pytest.raises(ValueError, match=r"1 nuclei have missing or non-numeric centroids in 'Centroid X µm'"):
        read_nuclei(tmp_path / "q.parquet", guess_columns=True)
    t = read_nuclei(tmp_path / "q.parquet", guess_columns=True, drop_invalid=True)
    assert t.attrs == {"source": str(tmp_path / "q.parquet"), "units": "um", "area_units": "um", "id_column": "Object ID"}
    assert t["cell_id"].tolist() == ["a", "c"] and t["class"].tolist() == ["T", "B"]
    np.testing.assert_allclose(t[["x", "y", "area", "probability"]].to_numpy(float), [[1, 4, 10, 0.5], [3, 6, 12, 0.7]])
    non_numeric = df.assign(**{"Centroid X µm": [1.0, "oops", 3.0]})
    assert read_nuclei(non_numeric, guess_columns=True, drop_invalid=True)["cell_id"].tolist() == ["a", "c"]
    # without guessing (the transfer's rule) the default columns must be there
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['x', 'y'\].*no centroid columns 'x' / 'y'"):
        read_nuclei(df)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['kind', 'nope'\].*label_key= naming it.*id_key="):
        read_nuclei(df, x="Centroid X µm", y="Centroid Y µm", label="kind", id_key="nope", label_arg="label_key")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="must be a DataFrame or the path"):
        read_nuclei(42)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="Cannot read the nucleus file"):
        read_nuclei(tmp_path / "broken.json")
    (tmp_path / "h.json").write_text(json.dumps({"nuc": {"1": {"type": 1}}}))
    with pytest.raises(ValueError, match="Cannot read the nucleus file.*centroid"):
        read_nuclei(tmp_path / "h.json")
    (tmp_path / "lines.geojson").write_text(json.dumps([_feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]})]))
    with pytest.raises(ValueError, match="holds no Point / Polygon nucleus features"):
        read_nuclei(tmp_path / "lines.geojson")
    with pytest.raises(ValueError, match="no nuclei"):
        read_nuclei(pd.DataFrame({"x": [], "y": []}))
    with pytest.raises(ValueError, match="no nucleus has finite numeric coordinates"):
        read_nuclei(pd.DataFrame({"x": [np.nan], "y": [1.0]}), drop_invalid=True)


def test_both_callers_read_a_file_alike(tmp_path):
    """read_he_cells and transfer_nucleus_labels see the same centroids and classes in one GeoJSON."""
    he = write_he(tmp_path / "slide.ome.tif", np.full((200, 200, 3), 230, dtype=np.uint8), mpp=0.5, n_sub=1)
    feats = [_feature({"type": "Polygon", "coordinates": [_square(40, 60, 4)]}, classification={"name": "T"}, score=0.9),
             _feature({"type": "Point", "coordinates": [120.0, 30.0]}, classification={"name": "B"}, score=0.4)]
    path = tmp_path / "n.geojson"
    path.write_text(json.dumps(feats))
    m = cs.io.read_he_cells(he, path)
    np.testing.assert_allclose(m["morphology"].obsm["spatial"], [[20.0, 30.0], [60.0, 15.0]])
    # its registry maps H&E pixels to those micrometres, so the transfer reads the same file onto the same cells
    mdata = m.copy()
    cs.pp.transfer_nucleus_labels(mdata, path)
    assert mdata.obs["he_label"].astype(str).tolist() == ["T", "B"]
    np.testing.assert_allclose(mdata.obs["he_label_probability"], [0.9, 0.4])
