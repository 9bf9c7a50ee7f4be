"""cs.io on the synthetic Xenium bundles of cs.datasets: both id styles, registration, from_spatialdata."""

from __future__ import annotations

import warnings

import mudata
import numpy as np
import pandas as pd
import pytest
import tifffile

import cellsymphony as cs
from cellsymphony._registration import um_to_he_px

N_CELLS = 500


_CACHE: dict = {}


def _synthetic(style: str, tmp_path_factory):
    """One synthetic bundle per id style for this module, and its MuData."""
    if style not in _CACHE:
        path = tmp_path_factory.mktemp(f"synthetic_{style}")
        cs.datasets.synthetic_xenium(
            path,
            n_cells=N_CELLS,
            seed=0,
            id_style=style,
            transcripts=False,
            reference_cells=0,
            overwrite=True,
        )
        _CACHE[style] = (style, path, cs.io.read_xenium(path))
    return _CACHE[style]


@pytest.fixture(scope="module", params=["string", "integer"])
def bundle(request, tmp_path_factory):
    return _synthetic(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def string_bundle(tmp_path_factory):
    """The Xenium 2.0 layout (string ids), which spatialdata_io reads in full."""
    return _synthetic("string", tmp_path_factory)


def test_reads_synthetic_bundle(bundle):
    id_style, path, mdata = bundle
    truth = pd.read_parquet(path / "truth.parquet")
    ids = truth["cell_id"].astype(str).to_numpy()
    assert mdata.n_obs == N_CELLS
    assert set(mdata.obs_names) == set(ids)
    if id_style == "integer":
        assert all(c.isdigit() for c in mdata.obs_names)
    else:
        assert all(c.endswith("-1") and len(c) == 10 for c in mdata.obs_names)
    rna = mdata["rna"]
    assert rna.n_vars >= 500
    assert (rna.var["feature_types"] == "Gene Expression").all()
    # controls are out of X: their totals are in obs, and X sums to transcript_counts
    assert "control_probe_counts" in rna.obs
    np.testing.assert_array_equal(np.asarray(rna.X.sum(1)).ravel(), rna.obs["transcript_counts"].to_numpy())
    # nucleus centroid (um) agrees with the rendered truth position
    t = truth.set_index(truth["cell_id"].astype(str)).loc[mdata.obs_names]
    d = np.hypot(rna.obsm["nucleus_centroid"][:, 0] - t["x"], rna.obsm["nucleus_centroid"][:, 1] - t["y"])
    assert np.median(d) < 0.5
    reg = mdata.uns["cellsymphony"]["samples"][mdata.obs["sample"].cat.categories[0]]
    assert reg["he_path"].endswith("_he_image.ome.tif")
    assert reg["he_mpp"] == pytest.approx(0.2738, rel=1e-3)
    assert mdata["morphology"].obs["in_image"].mean() > 0.95


def test_registration_lands_on_rendered_nuclei(bundle):
    """A cell's nucleus centroid mapped through the alignment lands on its nucleus in the H&E."""
    _, path, mdata = bundle
    sample = mdata.obs["sample"].cat.categories[0]
    reg = mdata.uns["cellsymphony"]["samples"][sample]
    truth = pd.read_parquet(path / "truth.parquet")
    t = truth.set_index(truth["cell_id"].astype(str)).loc[mdata.obs_names]
    px = um_to_he_px(mdata["morphology"].obsm["nucleus_centroid"], reg["alignment"], reg["pixel_size"])
    # against the centroid of the rendered nucleus pixels (H&E level 0)
    d = np.hypot(px[:, 0] - t["he_x"].to_numpy(), px[:, 1] - t["he_y"].to_numpy())
    assert np.median(d) < 1.0
    assert np.mean(d < 2.0 / reg["he_mpp"]) > 0.9  # within 2 um
    # and in the image itself: hematoxylin-dark at the mapped point, brighter at random points
    with cs.io.read_he(reg["he_path"]) as he:

        def grey(x, y):
            return he.read_region(int(round(x)) - 1, int(round(y)) - 1, 3, 3).mean()

        at_nuclei = np.array([grey(x, y) for x, y in px[:200]])
        h, w = he.shapes[0]
        rng = np.random.default_rng(0)
        at_random = np.array([grey(x, y) for x, y in rng.uniform([0, 0], [w, h], (200, 2))])
    assert np.mean(at_nuclei < np.median(at_random)) > 0.95
    # a wrong alignment (the inverse) does not land on nuclei
    wrong = um_to_he_px(
        mdata["morphology"].obsm["nucleus_centroid"],
        reg["alignment"] @ np.diag([1.02, 1, 1]),
        reg["pixel_size"],
    )
    assert np.median(np.hypot(*(wrong - px).T)) > 2


def test_write_round_trip_synthetic(bundle, tmp_path):
    _, _, mdata = bundle
    cs.io.write(mdata, tmp_path / "s.h5mu")
    back = mudata.read_h5mu(tmp_path / "s.h5mu")
    sample = mdata.obs["sample"].cat.categories[0]
    np.testing.assert_array_equal(
        back.uns["cellsymphony"]["samples"][sample]["alignment"],
        mdata.uns["cellsymphony"]["samples"][sample]["alignment"],
    )
    assert (back["rna"].X != mdata["rna"].X).nnz == 0


def test_from_spatialdata_matches_read_xenium(string_bundle, tmp_path):
    _, path, mdata = string_bundle
    import spatialdata_io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.xenium(
            path,
            cells_as_circles=True,
            transcripts=False,
            cells_labels=False,
            nucleus_labels=False,
            morphology_focus=False,
        )
    assert "he_image" in sdata.images
    converted = cs.io.from_spatialdata(sdata)
    assert set(converted.mod) == {"rna", "morphology"}
    assert list(converted.obs_names) == list(mdata.obs_names)
    assert list(converted["rna"].var_names) == list(mdata["rna"].var_names)
    assert (converted["rna"].X != mdata["rna"].X).nnz == 0
    for key in ("spatial", "nucleus_centroid"):
        np.testing.assert_allclose(converted["rna"].obsm[key], mdata["rna"].obsm[key], atol=1e-6)
        np.testing.assert_allclose(
            converted["morphology"].obsm[key], mdata["morphology"].obsm[key], atol=1e-6
        )
    np.testing.assert_array_equal(
        converted["morphology"].obs["in_image"], mdata["morphology"].obs["in_image"]
    )
    np.testing.assert_array_equal(converted["rna"].obs["n_nuclei"], mdata["rna"].obs["n_nuclei"])
    (sample,) = converted.uns["cellsymphony"]["samples"]
    assert sample == mdata.obs["sample"].cat.categories[0]
    got, want = converted.uns["cellsymphony"]["samples"][sample], mdata.uns["cellsymphony"]["samples"][sample]
    np.testing.assert_allclose(got["alignment"], want["alignment"], rtol=1e-9, atol=1e-9)
    assert got["pixel_size"] == pytest.approx(want["pixel_size"])
    assert got["he_path"] == want["he_path"]
    assert got["he_mpp"] == pytest.approx(want["he_mpp"])
    assert got["xenium_path"] == want["xenium_path"]

    # without the H&E element, and errors naming the fix
    plain = cs.io.from_spatialdata(sdata, image_key=False)
    assert plain.uns["cellsymphony"]["samples"]["sample"]["he_path"] == ""
    with pytest.raises(ValueError, match="no table 'cells'"):
        cs.io.from_spatialdata(sdata, table_key="cells")
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, np.zeros((64, 64, 3), np.uint8), photometric="rgb", tile=(32, 32))
    with pytest.raises(ValueError, match=r"other\.tif' is 64 x 64 pixels but the image element .*he_path="):
        cs.io.from_spatialdata(sdata, he_path=other, he_mpp=0.5)
    # implausible scales: an inverted alignment warns with the fix, a pixel size in nanometres is refused,
    # and so is a coordinate system whose shapes imply one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cs.io.from_spatialdata(sdata, he_alignment=np.linalg.inv(want["alignment"]))
    assert any("alignment looks inverted (its inverse implies" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"pixel_size=212\.5 is out of range"):
        cs.io.from_spatialdata(sdata, pixel_size=212.5)
    from spatialdata.transformations import Identity, Scale, set_transformation

    for name in sdata.shapes:
        set_transformation(sdata.shapes[name], Scale([1000.0, 1000.0], axes=("x", "y")), to_coordinate_system="nm")
    with pytest.raises(ValueError, match=r"to 'nm' implies 0\.001 um per morphology pixel.*pixel_size="):
        cs.io.from_spatialdata(sdata, coordinate_system="nm")
    set_transformation(sdata.images["he_image"], Identity(), to_coordinate_system="image only")
    with pytest.raises(ValueError, match="no shapes element has a transformation to 'image only'.*he_alignment="):
        cs.io.from_spatialdata(sdata, coordinate_system="image only", pixel_size=0.2125)
    # an element held in memory (or read back from .zarr) does not say which file it came from
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    element = sdata.images["he_image"]
    sdata.images["he_image"] = Image2DModel.parse(
        element["scale0"]["image"].values,
        dims=("c", "y", "x"),
        transformations={"global": get_transformation(element, "global")},
    )
    with pytest.raises(ValueError, match="Cannot tell which file .*Pass he_path="):
        cs.io.from_spatialdata(sdata)
    again = cs.io.from_spatialdata(sdata, he_path=want["he_path"])
    np.testing.assert_allclose(again.uns["cellsymphony"]["samples"][sample]["alignment"], want["alignment"])
