"""cs.io.to_spatialdata: the layout of spatialdata_io, the zarr write, the round trip, spatialdata-plot over the H&E."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from _export_data import _bundle, _mdata, _pink_fraction, _render

import cellsymphony as cs


@pytest.fixture(scope="module")
def mdata():
    return _mdata()


@pytest.fixture(scope="module")
def sdio():
    import spatialdata_io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata_io.xenium(_bundle(), cells_as_circles=False, transcripts=False, cells_labels=False,
                                     nucleus_labels=False)


def _affine(element, cs_name="global"):
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs_name)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))


def test_layout_overlays_spatialdata_io_without_transforms(mdata, sdio):
    sdata = cs.io.to_spatialdata(mdata)
    assert set(sdata.images) == {"he_image", "morphology_focus"}
    assert set(sdata.shapes) == {"cell_boundaries", "nucleus_boundaries"}
    # the same coordinate system and the same transformation of every element as spatialdata_io.xenium
    for kind in ("images", "shapes"):
        for name in getattr(sdata, kind):
            np.testing.assert_allclose(_affine(getattr(sdata, kind)[name]), _affine(getattr(sdio, kind)[name]),
                                       rtol=1e-12, atol=1e-9)
    ours, theirs = sdata.shapes["cell_boundaries"], sdio.shapes["cell_boundaries"]
    assert set(ours.index) == set(theirs.index)
    common = theirs.index[:50]
    for cid in common:
        assert ours.loc[cid].geometry.equals_exact(theirs.loc[cid].geometry, 1e-9)
    # the images are the same pixels, opened lazily
    for name in sdata.images:
        a = sdata.images[name]["scale0"]["image"]
        b = sdio.images[name]["scale0"]["image"] if hasattr(sdio.images[name], "children") else sdio.images[name]
        assert a.shape == b.shape
        np.testing.assert_array_equal(a[:, :64, :64].values, b[:, :64, :64].values)
    # one table annotating the cell polygons with every result
    t = sdata.tables["table"]
    assert t.uns["spatialdata_attrs"]["region"] == "cell_boundaries"
    assert t.uns["spatialdata_attrs"]["instance_key"] == "cell_id"
    assert set(t.obs["cell_id"]) == set(theirs.index)
    assert t.obs["cs_pred"].isna().sum() == 7 and list(t.obs["cs_pred"].cat.categories) == ["large", "small"]
    assert "in_image" in t.obs and "cell_area" in t.obs
    np.testing.assert_array_equal(t.obsm["cs_pred_proba"], mdata.obsm["cs_pred_proba"])
    assert list(t.uns["cs_pred"]["classes"]) == ["large", "small"]
    np.testing.assert_allclose(t.obsm["spatial"], sdio.tables["table"].obsm["spatial"])


def test_circles_and_bad_input(mdata, tmp_path):
    sdata = cs.io.to_spatialdata(mdata, shapes="circles", images=False)
    assert not sdata.images and "cell_circles" in sdata.shapes
    circ = sdata.shapes["cell_circles"]
    np.testing.assert_allclose(circ["radius"].to_numpy() ** 2 * np.pi, mdata["rna"].obs["cell_area"].to_numpy())
    with pytest.raises(ValueError, match=r"Unknown sample\(s\) \['nope'\].*holds samples"):
        cs.io.to_spatialdata(mdata, sample="nope")
    with pytest.raises(ValueError, match="shapes='polygons' is not one of"):
        cs.io.to_spatialdata(mdata, shapes="polygons")
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cs.io.to_spatialdata(mdata, path=tmp_path / "x.zarr")
    # a sample without an H&E: no H&E image, with a warning (the DAPI stays)
    plain = cs.io.read_xenium(_bundle(), he_image=False)
    with pytest.warns(UserWarning, match="no H&E attached"):
        s = cs.io.to_spatialdata(plain)
    assert set(s.images) == {"morphology_focus"}
    assert "spatial" not in plain["rna"].uns


def test_zarr_write_reads_back_and_round_trips(mdata, tmp_path):
    """The write that failed with spatialdata < 0.7.3 (dask chunk grids passed as zarr chunks): see pyproject."""
    import mudata as md
    import spatialdata as sd

    out = tmp_path / "section.zarr"
    back = cs.io.to_spatialdata(mdata, path=out)
    assert out.is_dir() and not list(tmp_path.glob(".section.zarr.partial-*"))
    again = sd.read_zarr(out)
    img = again.images["he_image"]
    he = cs.io.read_he(mdata.uns["cellsymphony"]["samples"]["synthetic"]["he_path"])
    level0 = img["scale0"]["image"] if hasattr(img, "children") else img
    assert level0.shape[1:] == he.shapes[0]
    np.testing.assert_array_equal(np.moveaxis(level0[:, 100:164, 200:264].values, 0, -1),
                                  he.read_region(200, 100, 64, 64))
    np.testing.assert_allclose(_affine(img), mdata.uns["cellsymphony"]["samples"]["synthetic"]["alignment"])
    # from_spatialdata rebuilds the same MuData
    for s in (back, again):
        m2 = cs.io.from_spatialdata(s)
        assert set(m2.mod) == set(mdata.mod)
        assert list(m2.obs_names) == list(mdata.obs_names)
        for mod in mdata.mod:
            a, b = mdata[mod], m2[mod]
            assert list(a.obs.columns) == list(b.obs.columns)
            for c in a.obs.columns:
                pd.testing.assert_series_equal(a.obs[c], b.obs[c], check_names=False, check_index=False)
            assert set(a.obsm) == set(b.obsm)
            assert (a.X != b.X).sum() == 0
        assert (m2["rna"].layers["counts"] != mdata["rna"].layers["counts"]).nnz == 0
        pd.testing.assert_series_equal(m2.obs["cs_pred"], mdata.obs["cs_pred"], check_names=False)
        np.testing.assert_array_equal(m2.obsm["cs_pred_proba"], mdata.obsm["cs_pred_proba"])
        reg = m2.uns["cellsymphony"]["samples"]["synthetic"]
        np.testing.assert_array_equal(reg["alignment"], mdata.uns["cellsymphony"]["samples"]["synthetic"]["alignment"])
        assert "spatial" in m2["rna"].uns
    m2.write(tmp_path / "back.h5mu")
    assert md.read_h5mu(tmp_path / "back.h5mu")["rna"].obs["cs_pred"].equals(mdata["rna"].obs["cs_pred"])
    # overwrite replaces it in place
    cs.io.to_spatialdata(mdata, path=out, overwrite=True, images=False)
    assert not sd.read_zarr(out).images


def test_spatialdata_plot_renders_cs_pred_over_the_he(mdata):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers .pl)

    sdata = cs.io.to_spatialdata(mdata)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.pl.render_images("he_image").pl.render_shapes("cell_boundaries", color="cs_pred", fill_alpha=0.6) \
            .pl.show(coordinate_systems="global", ax=ax)
    img = _render(fig)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.pl.render_shapes("cell_boundaries", color="cs_pred", fill_alpha=0.6).pl.show(
            coordinate_systems="global", ax=ax)
    dots_only = _render(fig)
    assert img.std() > 20  # not blank
    assert _pink_fraction(img) > 0.02 and _pink_fraction(dots_only) < 0.002  # the H&E is really there
    assert len(np.unique(img.reshape(-1, 3) // 16, axis=0)) > 50  # an image, not a few flat colours


def test_experiment_xenium_lists_only_files_the_bundle_holds():
    import json

    folder = _bundle()
    spec = json.loads((folder / "experiment.xenium").read_text())
    listed = [*spec["images"].values(), *spec["xenium_explorer_files"].values()]
    assert listed and all((folder / rel).is_file() for rel in listed), listed


def test_from_spatialdata_rough_edges(mdata, sdio, tmp_path):
    # the dtypes read_xenium gives, from spatialdata_io's table
    conv = cs.io.from_spatialdata(sdio)
    for col in ("nucleus_count", "transcript_counts", "control_probe_counts", "n_nuclei"):
        assert np.issubdtype(conv["rna"].obs[col].dtype, np.integer), (col, conv["rna"].obs[col].dtype)
    # he_alignment= instead of the element's transformation
    shifted = np.asarray(mdata.uns["cellsymphony"]["samples"]["synthetic"]["alignment"]).copy()
    shifted[0, 2] += 3.0
    got = cs.io.from_spatialdata(sdio, he_alignment=shifted).uns["cellsymphony"]["samples"]
    np.testing.assert_allclose(got[next(iter(got))]["alignment"], shifted)
    # a zarr written without images: the message says so and names the fix
    import spatialdata as sd

    plain = cs.io.to_spatialdata(mdata, images=False)
    del plain.tables["table"].uns["cellsymphony_mudata"]  # as another tool would write it
    out = tmp_path / "plain.zarr"
    plain.write(out)
    back = sd.read_zarr(out)
    with pytest.raises(ValueError, match="no image element named '\\*he_image' .*written without images"):
        cs.io.from_spatialdata(back, he_path=tmp_path / "x.ome.tif")
    # the sample id from the element names of a multi-sample export
    two = cs.io.concat([mdata, _mdata()], keys=["S1", "S2"])
    s = cs.io.to_spatialdata(two, images=False)
    assert {"S1_cell_boundaries", "S2_cell_boundaries", "S1_nucleus_boundaries"} <= set(s.shapes)
    from spatialdata.transformations import get_transformation

    assert set(get_transformation(s.shapes["S2_cell_boundaries"], get_all=True)) == {"S2"}
    one = cs.io.to_spatialdata(two, sample="S2", images=False)
    del one.tables["table"].uns["cellsymphony_mudata"]
    one.shapes["S2_cell_boundaries"] = one.shapes.pop("cell_boundaries")
    t = one.tables["table"]
    t.obs["region"] = pd.Categorical(["S2_cell_boundaries"] * t.n_obs)
    t.uns["spatialdata_attrs"]["region"] = "S2_cell_boundaries"
    assert list(cs.io.from_spatialdata(one, pixel_size=0.2125).uns["cellsymphony"]["samples"]) == ["S2"]
