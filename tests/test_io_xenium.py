"""cs.io.read_xenium on the shared real files and on bundles written in the 10x layouts."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings

import h5py
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from _xenium_bundle import GENES, HE_MPP, PIXEL_SIZE, PROTEINS, make_bundle

import cellsymphony as cs
from cellsymphony._registration import um_to_he_px


@pytest.fixture(scope="module")
def shared_xenium(shared_data):
    path = shared_data / "xenium_v1_small"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


# ---------------------------------------------------------------------- the shared real files
def test_shared_xenium_v1_small(shared_xenium):
    mdata = cs.io.read_xenium(shared_xenium)
    assert set(mdata.mod) == {"rna", "morphology"}
    rna, morph = mdata["rna"], mdata["morphology"]
    assert rna.shape == (6, 4)
    assert list(mdata.obs_names) == ["1", "2", "3", "4", "5", "6"]
    assert list(morph.obs_names) == list(rna.obs_names)
    assert list(rna.var_names) == ["ABCC11", "ACTA2", "ACTG2", "ADAM9"]
    assert rna.var["gene_ids"].iloc[0] == "ENSG00000121270"
    # float64 arrays cast, explicit zeros dropped: the 10x layout is CSC over cells
    assert sp.issparse(rna.X)
    assert rna.X.format == "csr"
    assert rna.X.dtype == np.float32
    with h5py.File(shared_xenium / "cell_feature_matrix.h5") as f:
        g = f["matrix"]
        m = sp.csc_matrix(
            (g["data"][()], g["indices"][()].astype(int), g["indptr"][()].astype(int)),
            shape=tuple(g["shape"][()].astype(int)),
        )
    np.testing.assert_array_equal(rna.X.toarray(), m.T.toarray())
    assert rna.X.nnz == np.count_nonzero(m.toarray())
    # the parquet (which matches the matrix) is preferred over the csv (which describes other cells)
    cells = pd.read_parquet(shared_xenium / "cells.parquet")
    np.testing.assert_allclose(rna.obsm["spatial"], cells[["x_centroid", "y_centroid"]].to_numpy())
    np.testing.assert_allclose(morph.obs["cell_area"].to_numpy(), cells["cell_area"].to_numpy())
    np.testing.assert_array_equal(
        rna.obs["transcript_counts"].to_numpy(), cells["transcript_counts"].to_numpy()
    )
    assert "x_centroid" not in rna.obs
    # nucleus centroids from the polygons: inside each polygon's bounding box, one nucleus each
    nb = pd.read_parquet(shared_xenium / "nucleus_boundaries.parquet")
    for i, cid in enumerate(range(1, 7)):
        poly = nb[nb.cell_id == cid]
        x, y = rna.obsm["nucleus_centroid"][i]
        assert poly.vertex_x.min() < x < poly.vertex_x.max()
        assert poly.vertex_y.min() < y < poly.vertex_y.max()
    assert (rna.obs["n_nuclei"] == 1).all()
    np.testing.assert_array_equal(morph.obsm["nucleus_centroid"], rna.obsm["nucleus_centroid"])
    # sample from experiment.xenium, registry without an H&E
    assert rna.obs["sample"].dtype == "category"
    assert list(mdata.obs["sample"].unique()) == ["Replicate 1"]
    reg = mdata.uns["cellsymphony"]["samples"]["Replicate 1"]
    assert reg["pixel_size"] == pytest.approx(0.2125)
    assert reg["he_path"] == ""
    assert np.isnan(reg["he_mpp"])
    assert reg["alignment"].shape == (3, 3)
    assert reg["xenium_path"] == str(shared_xenium.resolve())
    assert morph.n_vars == 0
    assert not morph.obs["in_image"].any()


def test_shared_xenium_sample_argument(shared_xenium):
    mdata = cs.io.read_xenium(shared_xenium, sample="breast_rep1")
    assert list(mdata.uns["cellsymphony"]["samples"]) == ["breast_rep1"]
    assert (mdata["morphology"].obs["sample"] == "breast_rep1").all()


# ---------------------------------------------------------------------- bundles in every layout
@pytest.mark.parametrize("id_style", ["string", "integer"])
@pytest.mark.parametrize("matrix", ["h5", "mex", "zarr"])
def test_bundle_layouts(tmp_path, id_style, matrix):
    b = make_bundle(tmp_path / "x", id_style=id_style, matrix=matrix, seed=1)
    mdata = cs.io.read_xenium(b.path)
    rna = mdata["rna"]
    assert list(rna.obs_names) == list(b.cell_ids)
    if id_style == "integer":
        assert list(rna.obs_names[:3]) == ["1", "2", "3"]
    else:
        assert all(len(c) == 10 and c.endswith("-1") for c in rna.obs_names)
    assert list(rna.var_names) == GENES
    gene = (b.features["feature_type"] == "Gene Expression").to_numpy()
    np.testing.assert_array_equal(rna.X.toarray(), b.counts[:, gene])
    # control features stay out of X, their per-cell totals are in obs
    kinds = b.features["feature_type"].to_numpy()
    np.testing.assert_array_equal(
        rna.obs["control_probe_counts"], b.counts[:, kinds == "Negative Control Probe"].sum(1)
    )
    np.testing.assert_array_equal(
        rna.obs["control_codeword_counts"], b.counts[:, kinds == "Negative Control Codeword"].sum(1)
    )
    np.testing.assert_array_equal(
        rna.obs["unassigned_codeword_counts"], b.counts[:, kinds == "Unassigned Codeword"].sum(1)
    )
    # nuclei: largest polygon's centroid, the cell centroid where none, the count per cell
    np.testing.assert_array_equal(rna.obs["n_nuclei"].to_numpy(), b.n_nuclei)
    expected = np.where(np.isnan(b.nucleus), b.centroids, b.nucleus)
    np.testing.assert_allclose(rna.obsm["nucleus_centroid"], expected, atol=1e-4)
    np.testing.assert_allclose(rna.obsm["spatial"], b.centroids)
    # the H&E in the folder is attached with its alignment
    reg = mdata.uns["cellsymphony"]["samples"]["Region 1"]
    np.testing.assert_allclose(reg["alignment"], b.alignment)
    assert reg["he_mpp"] == pytest.approx(HE_MPP)
    assert reg["pixel_size"] == pytest.approx(PIXEL_SIZE)
    assert reg["he_path"].endswith("test_he_image.ome.tif")
    assert mdata["morphology"].obs["in_image"].all()


def test_string_ids_stored_as_bytes(tmp_path):
    b = make_bundle(tmp_path / "x", cells_ids_as_bytes=True)
    assert isinstance(pd.read_parquet(b.path / "cells.parquet")["cell_id"].iloc[0], bytes)
    mdata = cs.io.read_xenium(b.path)
    assert list(mdata.obs_names) == list(b.cell_ids)
    assert isinstance(mdata["rna"].obs["cell_id"].iloc[0], str)


def test_protein_modality(tmp_path):
    b = make_bundle(tmp_path / "x", protein=True)
    mdata = cs.io.read_xenium(b.path)
    assert set(mdata.mod) == {"rna", "morphology", "protein"}
    prot = mdata["protein"]
    assert list(prot.var_names) == [p for p, _ in PROTEINS]
    kinds = b.features["feature_type"].to_numpy()
    # the file stores the values times protein_scaling_factor; the reader undoes it
    np.testing.assert_allclose(prot.X.toarray(), b.counts[:, kinds == "Protein Expression"])
    assert list(mdata["rna"].var_names) == GENES
    assert "spatial" in prot.obsm
    assert "nucleus_centroid" in prot.obsm


def test_only_required_files(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    for name in ("nucleus_boundaries.parquet", "cell_boundaries.parquet"):
        (b.path / name).unlink()
    mdata = cs.io.read_xenium(b.path)
    np.testing.assert_array_equal(mdata["rna"].obsm["nucleus_centroid"], mdata["rna"].obsm["spatial"])
    assert not mdata["morphology"].obs["in_image"].any()
    assert mdata.uns["cellsymphony"]["samples"]["Region 1"]["he_path"] == ""


def test_csv_cells_table_when_no_parquet(tmp_path):
    b = make_bundle(tmp_path / "x", id_style="integer", with_he=False)
    cells = pd.read_parquet(b.path / "cells.parquet")
    (b.path / "cells.parquet").unlink()
    with gzip.open(b.path / "cells.csv.gz", "wt") as f:
        cells.to_csv(f)  # with pandas' unnamed index column
    mdata = cs.io.read_xenium(b.path)
    assert "Unnamed: 0" not in mdata["rna"].obs
    np.testing.assert_allclose(mdata["rna"].obsm["spatial"], b.centroids)


def test_he_arguments(tmp_path):
    b = make_bundle(tmp_path / "x", he_axes="CYX")
    he_file = b.path / "test_he_image.ome.tif"
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(he_file, moved / "slide.ome.tif")
    shutil.move(b.path / "test_he_imagealignment.csv", moved / "align.csv")
    no_he = cs.io.read_xenium(b.path)
    assert no_he.uns["cellsymphony"]["samples"]["Region 1"]["he_path"] == ""
    mdata = cs.io.read_xenium(b.path, he_image=moved / "slide.ome.tif", he_alignment=moved / "align.csv")
    reg = mdata.uns["cellsymphony"]["samples"]["Region 1"]
    assert reg["he_path"] == str((moved / "slide.ome.tif").resolve())
    assert mdata["morphology"].obs["in_image"].all()
    # the alignment CSV named after an H&E file elsewhere is found
    shutil.copy(moved / "slide.ome.tif", moved / "s2_he_image.ome.tif")
    shutil.copy(moved / "align.csv", moved / "s2_he_imagealignment.csv")
    m1 = cs.io.read_xenium(b.path, he_image=moved / "s2_he_image.ome.tif")
    np.testing.assert_allclose(m1.uns["cellsymphony"]["samples"]["Region 1"]["alignment"], b.alignment)
    # an array alignment and an opened HEImage
    he = cs.io.read_he(moved / "slide.ome.tif")
    m2 = cs.io.read_xenium(b.path, he_image=he, he_alignment=b.alignment)
    np.testing.assert_allclose(m2.uns["cellsymphony"]["samples"]["Region 1"]["alignment"], b.alignment)
    # he_image=False skips the H&E of the folder
    b2 = make_bundle(tmp_path / "y")
    assert (
        cs.io.read_xenium(b2.path, he_image=False).uns["cellsymphony"]["samples"]["Region 1"]["he_path"] == ""
    )


def test_he_not_covering_cells_warns_and_flags(tmp_path):
    b = make_bundle(tmp_path / "x")
    shifted = b.alignment.copy()
    # shift the H&E so that it covers only the cells with x < ~70 um
    he = cs.io.read_he(b.path / "test_he_image.ome.tif")
    shifted[0, 2] -= 300.0
    with pytest.warns(UserWarning, match=r"does not cover (\d+) of 40 cells") as rec:
        mdata = cs.io.read_xenium(b.path, he_alignment=shifted)
    inside = mdata["morphology"].obs["in_image"].to_numpy()
    message = next(str(w.message) for w in rec if "does not cover" in str(w.message))
    n_out = int(message.split("does not cover ")[1].split(" ")[0])
    assert n_out == (~inside).sum()
    assert 0 < n_out < 40
    px = um_to_he_px(mdata["morphology"].obsm["nucleus_centroid"], shifted, PIXEL_SIZE)
    h, w = he.shapes[0]
    truth = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
    np.testing.assert_array_equal(inside, truth)


def test_inverted_alignment_is_pointed_out(tmp_path):
    b = make_bundle(tmp_path / "x")
    with pytest.warns(UserWarning, match="does not cover") as rec:
        mdata = cs.io.read_xenium(b.path, he_alignment=np.linalg.inv(b.alignment))
    messages = " ".join(str(w.message) for w in rec)
    assert "The alignment looks inverted: its inverse places 100% of the cells inside" in messages
    assert "has 0.5 um per pixel but the alignment implies 0.0903" in messages
    assert not mdata["morphology"].obs["in_image"].any()


# ---------------------------------------------------------------------- bad input
def _listing(path):
    return sorted(p.name for p in path.rglob("*"))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cs.io.read_xenium(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        cs.io.read_xenium(tmp_path / "afile")
    b = make_bundle(tmp_path / "x", with_he=False)
    (b.path / "experiment.xenium").rename(b.path / "exp.bak")
    with pytest.raises(FileNotFoundError, match=r"experiment\.xenium.*does not exist"):
        cs.io.read_xenium(b.path)
    (b.path / "exp.bak").rename(b.path / "experiment.xenium")
    (b.path / "cells.parquet").rename(b.path / "cells.bak")
    with pytest.raises(FileNotFoundError, match=r"No cells table .*cells\.parquet or cells\.csv\.gz"):
        cs.io.read_xenium(b.path)
    (b.path / "cells.bak").rename(b.path / "cells.parquet")
    (b.path / "cell_feature_matrix.h5").rename(b.path / "matrix.bak")
    with pytest.raises(FileNotFoundError, match=r"No cell-feature matrix.*cell_feature_matrix\.h5"):
        cs.io.read_xenium(b.path)


def test_missing_pixel_size_warns(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    specs = json.loads((b.path / "experiment.xenium").read_text())
    del specs["pixel_size"]
    (b.path / "experiment.xenium").write_text(json.dumps(specs))
    with pytest.warns(UserWarning, match="no pixel_size; assuming 0.2125"):
        mdata = cs.io.read_xenium(b.path)
    assert mdata.uns["cellsymphony"]["samples"]["Region 1"]["pixel_size"] == 0.2125


def test_damaged_files(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    (b.path / "experiment.xenium").write_text("{not json")
    with pytest.raises(ValueError, match=r"Cannot read the Xenium experiment file .*experiment\.xenium.*JSONDecodeError"):
        cs.io.read_xenium(b.path)
    b = make_bundle(tmp_path / "y", with_he=False)
    (b.path / "cell_feature_matrix.h5").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cell_feature_matrix\.h5"):
        cs.io.read_xenium(b.path)


def test_cell_ids_not_matching(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    cells = pd.read_parquet(b.path / "cells.parquet")
    cells.iloc[:-3].to_parquet(b.path / "cells.parquet", index=False)
    before = _listing(tmp_path)
    with pytest.raises(
        ValueError, match=r"do not match: 0 of the 37 cells .* and 3 of the 40 cells of the matrix"
    ):
        cs.io.read_xenium(b.path)
    assert _listing(tmp_path) == before  # nothing written
    # integer ids in the table, string ids in the matrix: the message says so
    c = make_bundle(tmp_path / "y", with_he=False)
    cells = pd.read_parquet(c.path / "cells.parquet")
    cells["cell_id"] = np.arange(1, len(cells) + 1, dtype=np.int32)
    cells.to_parquet(c.path / "cells.parquet", index=False)
    with pytest.raises(ValueError, match="integer ids but the matrix has string ids"):
        cs.io.read_xenium(c.path)


def test_reordered_matrix_is_aligned_to_the_table(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    cells = pd.read_parquet(b.path / "cells.parquet")
    cells.iloc[::-1].to_parquet(b.path / "cells.parquet", index=False)
    mdata = cs.io.read_xenium(b.path)
    assert list(mdata.obs_names) == list(b.cell_ids[::-1])
    gene = (b.features["feature_type"] == "Gene Expression").to_numpy()
    np.testing.assert_array_equal(mdata["rna"].X.toarray(), b.counts[::-1][:, gene])


def test_bad_alignment(tmp_path):
    b = make_bundle(tmp_path / "x")
    csv = b.path / "test_he_imagealignment.csv"
    np.savetxt(csv, np.eye(3)[:2], delimiter=",")
    with pytest.raises(ValueError, match=r"test_he_imagealignment\.csv.*3 x 3.*shape \(2, 3\)"):
        cs.io.read_xenium(b.path)
    np.savetxt(csv, np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]]), delimiter=",")
    with pytest.raises(ValueError, match=r"test_he_imagealignment\.csv.*singular"):
        cs.io.read_xenium(b.path)
    csv.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match=r"test_he_imagealignment\.csv"):
        cs.io.read_xenium(b.path)
    csv.unlink()
    with pytest.raises(ValueError, match=r"No alignment found for the H&E image .*he_alignment="):
        cs.io.read_xenium(b.path)
    with pytest.raises(ValueError, match="3 x 3"):
        cs.io.read_xenium(b.path, he_alignment=np.eye(2))


def test_unreadable_he(tmp_path):
    b = make_bundle(tmp_path / "x")
    (b.path / "test_he_image.ome.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match=r"Cannot read H&E image .*test_he_image\.ome\.tif"):
        cs.io.read_xenium(b.path)
    with pytest.raises(FileNotFoundError, match="missing.ome.tif"):
        cs.io.read_xenium(b.path, he_image=tmp_path / "missing.ome.tif", he_alignment=np.eye(3))


# ---------------------------------------------------------------------- write and concat
def test_write_round_trip(tmp_path):
    b = make_bundle(tmp_path / "x", protein=True)
    mdata = cs.io.read_xenium(b.path)
    out = tmp_path / "out" / "section.h5mu"
    cs.io.write(mdata, out)
    assert [p.name for p in out.parent.iterdir()] == ["section.h5mu"]  # no temporary file left
    back = mudata.read_h5mu(out)
    assert set(back.mod) == {"rna", "morphology", "protein"}
    np.testing.assert_array_equal(back["rna"].X.toarray(), mdata["rna"].X.toarray())
    np.testing.assert_array_equal(back["rna"].obsm["nucleus_centroid"], mdata["rna"].obsm["nucleus_centroid"])
    assert back["morphology"].obs["in_image"].dtype == bool
    assert back["rna"].obs["sample"].dtype == "category"
    reg, reg0 = (
        back.uns["cellsymphony"]["samples"]["Region 1"],
        mdata.uns["cellsymphony"]["samples"]["Region 1"],
    )
    assert set(reg) == {"he_path", "alignment", "pixel_size", "he_mpp", "xenium_path"}
    np.testing.assert_array_equal(reg["alignment"], reg0["alignment"])
    assert reg["he_path"] == reg0["he_path"]
    assert float(reg["he_mpp"]) == reg0["he_mpp"]
    # a registry without H&E (NaN values) survives too
    m2 = cs.io.read_xenium(b.path, he_image=False)
    cs.io.write(m2, tmp_path / "nohe.h5mu")
    r2 = mudata.read_h5mu(tmp_path / "nohe.h5mu").uns["cellsymphony"]["samples"]["Region 1"]
    assert r2["he_path"] == ""
    assert np.isnan(r2["alignment"]).all()


def test_write_is_atomic(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    mdata = cs.io.read_xenium(b.path)
    out = tmp_path / "a.h5mu"
    cs.io.write(mdata, out)
    before = out.read_bytes()
    mdata.uns["bad"] = {"x": object()}
    with pytest.raises(ValueError, match="nothing was written"):
        cs.io.write(mdata, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5mu", "x"]
    with pytest.raises(ValueError, match=r"\.h5mu"):
        cs.io.write(mdata, tmp_path / "a.h5ad")
    del mdata.uns["bad"]
    with pytest.raises(FileExistsError):
        cs.io.write(mdata, out, overwrite=False)


def test_concat(tmp_path):
    a = make_bundle(tmp_path / "a", seed=3, region_name="A", id_style="integer")  # ids 1..40 and 1..30 clash
    b = make_bundle(tmp_path / "b", seed=3, region_name="B", id_style="integer", n_cells=30)
    ma, mb = cs.io.read_xenium(a.path), cs.io.read_xenium(b.path)
    # joint results on the MuData itself are carried over
    ma.obs["cs_pred"] = pd.Categorical(["T cell"] * 40)
    mb.obs["cs_pred"] = pd.Categorical(["B cell"] * 30)
    ma.obsm["cs_pred_proba"], mb.obsm["cs_pred_proba"] = np.full((40, 2), 0.25), np.full((30, 2), 0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        joined = cs.io.concat([ma, mb])
    assert joined.n_obs == 70
    assert joined.obs_names.is_unique
    assert joined.obs_names[0] == f"A_{a.cell_ids[0]}"
    assert joined.obs_names[-1] == f"B_{b.cell_ids[29]}"
    assert list(joined.obs["sample"].cat.categories) == ["A", "B"]
    assert (joined.obs["sample"].value_counts()[["A", "B"]] == [40, 30]).all()
    assert (joined["morphology"].obs["sample"] == joined["rna"].obs["sample"]).all()
    assert joined["rna"].obs.loc[f"B_{b.cell_ids[5]}", "cell_id"] == b.cell_ids[5]
    assert joined.obs["cs_pred"].dtype == "category"
    assert (joined.obs["cs_pred"].iloc[:40] == "T cell").all()
    assert (joined.obs["cs_pred"].iloc[40:] == "B cell").all()
    np.testing.assert_array_equal(joined.obsm["cs_pred_proba"][:, 0], [0.25] * 40 + [0.75] * 30)
    assert set(joined.uns["cellsymphony"]["samples"]) == {"A", "B"}
    np.testing.assert_allclose(joined.uns["cellsymphony"]["samples"]["B"]["alignment"], b.alignment)
    np.testing.assert_allclose(joined["rna"].obsm["spatial"][40:], b.centroids)
    np.testing.assert_array_equal(joined["rna"].X.toarray()[:40], ma["rna"].X.toarray())
    cs.io.write(joined, tmp_path / "j.h5mu")
    back = mudata.read_h5mu(tmp_path / "j.h5mu")
    assert set(back.uns["cellsymphony"]["samples"]) == {"A", "B"}

    # distinct ids are kept as they are; index_unique="always" prefixes anyway
    c = make_bundle(tmp_path / "c", seed=4, region_name="C")  # string ids
    mc = cs.io.read_xenium(c.path)
    assert list(cs.io.concat([ma, mc]).obs_names[:2]) == list(a.cell_ids[:2])
    assert cs.io.concat([ma, mc], index_unique="always").obs_names[0] == f"A_{a.cell_ids[0]}"
    with pytest.raises(ValueError, match="clash"):
        cs.io.concat([ma, mb], index_unique="never")
    # the same sample id twice: an error naming the fix; keys= renames
    with pytest.raises(ValueError, match=r"'A' occurs in more than one input.*keys="):
        cs.io.concat([ma, ma])
    renamed = cs.io.concat([ma, ma], keys=["s1", "s2"])
    assert set(renamed.uns["cellsymphony"]["samples"]) == {"s1", "s2"}
    assert renamed.n_obs == 80


def test_concat_inner_and_outer_panels(tmp_path):
    a = make_bundle(tmp_path / "a", seed=5, region_name="A", with_he=False)
    b = make_bundle(tmp_path / "b", seed=6, region_name="B", with_he=False)
    ma, mb = cs.io.read_xenium(a.path), cs.io.read_xenium(b.path)
    mb.mod["rna"] = mb["rna"][:, 2:].copy()
    mb.update()
    assert list(cs.io.concat([ma, mb])["rna"].var_names) == GENES[2:]
    outer = cs.io.concat([ma, mb], join="outer")
    assert set(outer["rna"].var_names) == set(GENES)


def test_from_spatialdata_all_feature_types(tmp_path):
    """spatialdata_io.xenium(gex_only=False) keeps every feature type; the conversion splits them as the reader."""
    import spatialdata_io

    b = make_bundle(tmp_path / "x", protein=True, label_id=False, missing_nucleus=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.xenium(
            b.path,
            cells_as_circles=True,
            gex_only=False,
            transcripts=False,
            cells_labels=False,
            nucleus_labels=False,
            morphology_mip=False,
            morphology_focus=False,
        )
    assert sdata.tables["table"].n_vars == len(b.features)
    converted, direct = cs.io.from_spatialdata(sdata), cs.io.read_xenium(b.path)
    assert set(converted.mod) == set(direct.mod) == {"rna", "morphology", "protein"}
    for mod in ("rna", "protein"):
        assert list(converted[mod].var_names) == list(direct[mod].var_names)
        np.testing.assert_allclose(converted[mod].X.toarray(), direct[mod].X.toarray())
    for col in ("control_probe_counts", "control_codeword_counts", "unassigned_codeword_counts"):
        np.testing.assert_array_equal(converted["rna"].obs[col], direct["rna"].obs[col])
    reg, want = (
        converted.uns["cellsymphony"]["samples"]["Region 1"],
        direct.uns["cellsymphony"]["samples"]["Region 1"],
    )
    np.testing.assert_allclose(reg["alignment"], want["alignment"])
    np.testing.assert_allclose(
        converted["rna"].obsm["nucleus_centroid"], direct["rna"].obsm["nucleus_centroid"]
    )


def test_he_pixel_size_from_alignment_and_mismatch(tmp_path):
    b = make_bundle(tmp_path / "x")
    he = cs.io.read_he(b.path / "test_he_image.ome.tif")
    img = he.read_region(0, 0, he.shapes[0][1], he.shapes[0][0])
    bare = b.path / "bare.tif"  # no pixel size recorded
    tifffile.imwrite(bare, img, tile=(64, 64), photometric="rgb")
    mdata = cs.io.read_xenium(b.path, he_image=bare, he_alignment=b.alignment)
    assert mdata.uns["cellsymphony"]["samples"]["Region 1"]["he_mpp"] == pytest.approx(HE_MPP)
    with pytest.warns(UserWarning, match=r"has 1 um per pixel but the alignment implies 0\.5"):
        cs.io.read_xenium(b.path, he_image=bare, he_alignment=b.alignment, he_mpp=1.0)


def test_concat_registries_are_copies(tmp_path):
    """The joined registry is the output's own: changing it leaves the inputs (and the other sample) untouched."""
    a = make_bundle(tmp_path / "a", seed=3, region_name="A")
    ma = cs.io.read_xenium(a.path)
    joined = cs.io.concat([ma, ma], keys=["s1", "s2"])
    reg = joined.uns["cellsymphony"]["samples"]
    reg["s1"]["alignment"][0, 2] += 100.0
    reg["s1"]["he_path"] = "elsewhere.tif"
    np.testing.assert_allclose(reg["s2"]["alignment"], a.alignment)
    assert reg["s2"]["he_path"].endswith("test_he_image.ome.tif")
    np.testing.assert_allclose(ma.uns["cellsymphony"]["samples"]["A"]["alignment"], a.alignment)
    assert ma.uns["cellsymphony"]["samples"]["A"]["he_path"].endswith("test_he_image.ome.tif")


def test_nucleus_rows_without_cell_id_are_not_given_to_another_cell(tmp_path):
    """Vertices whose cell_id is missing belong to no cell (pandas codes them -1, which must not index a cell)."""
    from cellsymphony.io._xenium_files import read_nucleus_centroids

    def square(cid, cx, cy, r):
        xs, ys = [cx - r, cx + r, cx + r, cx - r], [cy - r, cy - r, cy + r, cy + r]
        return pd.DataFrame({"cell_id": [cid] * 4, "vertex_x": xs, "vertex_y": ys})

    df = pd.concat([square("aaaa-1", 10, 10, 1), square("bbbb-1", 50, 50, 1), square(None, 200, 200, 0.5)])
    df.to_parquet(tmp_path / "nucleus_boundaries.parquet")
    centroid, n_nuclei = read_nucleus_centroids(tmp_path, np.array(["aaaa-1", "bbbb-1"]))
    np.testing.assert_allclose(centroid, [[10, 10], [50, 50]])
    np.testing.assert_array_equal(n_nuclei, [1, 1])


def test_concat_column_on_some_inputs_only_survives_h5mu(tmp_path):
    """A MuData obs column that only some inputs have (bool, str) is missing for the others, not unwritable."""
    ma = cs.io.read_xenium(make_bundle(tmp_path / "a", seed=3, region_name="A").path)
    mb = cs.io.read_xenium(make_bundle(tmp_path / "b", seed=4, region_name="B").path)
    ma.obs["flag"] = np.arange(ma.n_obs) % 2 == 0
    ma.obs["note"] = "x"
    joined = cs.io.concat([ma, mb])
    cs.io.write(joined, tmp_path / "j.h5mu")
    back = mudata.read_h5mu(tmp_path / "j.h5mu")
    flag = back.obs["flag"]
    assert flag.iloc[: ma.n_obs].tolist() == (np.arange(ma.n_obs) % 2 == 0).tolist()
    assert flag.iloc[ma.n_obs :].isna().all()
    assert back.obs["note"].iloc[: ma.n_obs].eq("x").all() and back.obs["note"].iloc[ma.n_obs :].isna().all()


def test_nuclei_from_shapes_use_the_cell_id_column():
    """spatialdata-io 0.7 indexes nucleus shapes by nucleus label (1, 2, ...) and keeps the cell in a
    cell_id column: the nuclei go to that cell, not to the cell whose integer id equals the label."""
    import geopandas as gpd
    from shapely.geometry import box

    from cellsymphony.io._from_spatialdata import _nuclei_from_shapes

    ids = np.array(["aaaa-1", "bbbb-1", "cccc-1"])
    gdf = gpd.GeoDataFrame(
        {"cell_id": ["cccc-1", "aaaa-1", "aaaa-1"]},
        geometry=[box(0, 0, 2, 2), box(10, 10, 11, 11), box(20, 20, 24, 24)],
        index=pd.Index([1, 2, 3]),
    )
    centroid, n_nuclei = _nuclei_from_shapes(gdf, ids)
    np.testing.assert_allclose(centroid[0], [22, 22])  # the largest of the cell's two nuclei
    assert np.isnan(centroid[1]).all()
    np.testing.assert_allclose(centroid[2], [1, 1])
    np.testing.assert_array_equal(n_nuclei, [2, 0, 1])
