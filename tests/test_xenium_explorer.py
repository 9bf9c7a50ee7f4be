"""cs.io.write_xenium_explorer: 10x's cell-groups CSV (cell_id,group,color), after concat too, and the alignment."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from _export_data import _bundle, _mdata

import cellsymphony as cs
from cellsymphony._joint import push_joint_obs

HEX = re.compile(r"^#[0-9a-f]{6}$")


def _bundle_ids() -> set[str]:
    return set(pd.read_parquet(_bundle() / "cells.parquet")["cell_id"].astype(str))


def _check(path, ids: set[str]) -> pd.DataFrame:
    text = path.read_text()
    assert text.splitlines()[0] == "cell_id,group,color"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert len(frame) == len(ids) and set(frame["cell_id"]) == ids and not frame["cell_id"].duplicated().any()
    assert frame["color"].map(lambda c: bool(HEX.match(c))).all()
    assert (frame["group"] != "").all()
    # one colour per group
    assert (frame.groupby("group")["color"].nunique() == 1).all()
    return frame


def test_cell_groups_csv(tmp_path):
    m = _mdata()
    written = cs.io.write_xenium_explorer(m, ["cs_pred", "in_image"], tmp_path / "xe")
    assert {p.name for p in written} == {"cs_pred.csv", "in_image.csv"}  # the folder's own alignment: no CSV
    frame = _check(tmp_path / "xe" / "synthetic" / "cs_pred.csv", _bundle_ids())
    assert (frame["group"] == "unassigned").sum() == 7
    by_id = frame.set_index("cell_id")["group"]
    want = m.obs["cs_pred"].astype(object).fillna("unassigned")
    assert (by_id.reindex(m["rna"].obs["cell_id"]).to_numpy() == want.to_numpy()).all()
    from cellsymphony.pl._common import palette_for

    pal = palette_for(m, "cs_pred", ["large", "small"])
    assert frame.loc[frame["group"] == "large", "color"].iloc[0] == pal["large"]
    # bad input: refused before anything is written
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cs.io.write_xenium_explorer(m, "cs_pred", tmp_path / "xe")
    with pytest.raises(ValueError, match="Column 'nope' not found"):
        cs.io.write_xenium_explorer(m, "nope", tmp_path / "y")
    with pytest.raises(ValueError, match=r"Unknown sample\(s\) \['S9'\]"):
        cs.io.write_xenium_explorer(m, "cs_pred", tmp_path / "y", sample="S9")
    with pytest.raises(ValueError, match="is numeric .* Pass bins="):
        cs.io.write_xenium_explorer(m, "cell_area", tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y*"))
    cs.io.write_xenium_explorer(m, "cell_area", tmp_path / "xe", bins=4, overwrite=True)
    binned = _check(tmp_path / "xe" / "synthetic" / "cell_area.csv", _bundle_ids())
    assert binned["group"].nunique() == 4
    assert not (tmp_path / "xe" / "synthetic" / "cs_pred.csv").exists()  # replaced as a whole


def test_after_concat_and_outside_alignment(tmp_path):
    a, b = _mdata(), _mdata()
    b.uns["cellsymphony"]["samples"]["synthetic"]["alignment"] = (
        b.uns["cellsymphony"]["samples"]["synthetic"]["alignment"] @ np.diag([1.001, 1.0, 1.0])
    )  # a registration that is not the folder's CSV
    joint = cs.io.concat([a, b], keys=["A", "B"])
    assert joint.obs_names[0].startswith("A_")
    joint.obs["cs_pred"] = pd.Categorical(np.where(np.arange(joint.n_obs) % 2, "x", "y"))
    push_joint_obs(joint, ["cs_pred"])
    written = cs.io.write_xenium_explorer(joint, "cs_pred", tmp_path / "xe")
    for s in ("A", "B"):
        frame = _check(tmp_path / "xe" / s / "cs_pred.csv", _bundle_ids())
        assert set(frame["group"]) == {"x", "y"}
    names = {str(p.relative_to(tmp_path / "xe")) for p in written}
    assert "B/synthetic_he_imagealignment.csv" in names and "A/synthetic_he_imagealignment.csv" not in names
    got = np.loadtxt(tmp_path / "xe" / "B" / "synthetic_he_imagealignment.csv", delimiter=",")
    np.testing.assert_allclose(got, joint.uns["cellsymphony"]["samples"]["B"]["alignment"], rtol=1e-9)
    # the squidpy/scanpy layer of each section survives concat
    assert set(joint["rna"].uns["spatial"]) == {"A", "B"}


def test_cli_writes_the_viewer_files(tmp_path):
    """What `cellsymphony run` / `demo` write after the .h5mu: Explorer groups and, with --spatialdata, the zarr."""
    import spatialdata as sd

    from cellsymphony.__main__ import build_parser
    from cellsymphony._run import write_viewer_files

    for cmd in (["demo", "--spatialdata"], ["run", "--xenium", "x", "--out", "o", "--spatialdata"]):
        assert build_parser().parse_args(cmd).spatialdata is True
    assert build_parser().parse_args(["demo"]).spatialdata is False
    m = _mdata()
    written = write_viewer_files(m, tmp_path, spatialdata=True)
    assert tmp_path / "xenium_explorer" / "synthetic" / "cs_pred.csv" in written
    _check(tmp_path / "xenium_explorer" / "synthetic" / "cs_pred.csv", _bundle_ids())
    back = sd.read_zarr(tmp_path / "cellsymphony.zarr")
    assert "he_image" in back.images and "cs_pred" in back.tables["table"].obs
    # a re-run replaces both
    write_viewer_files(m, tmp_path, spatialdata=True)
