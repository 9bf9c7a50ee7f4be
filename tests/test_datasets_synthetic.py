"""cs.datasets.synthetic_xenium: file layout, readability by spatialdata_io, and measurable realism."""

from __future__ import annotations

import json
import re
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellsymphony as cs

N_CELLS = 1500
TYPES = ("tumour epithelium", "normal epithelium", "fibroblast", "T cell", "B cell", "macrophage", "endothelial")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return cs.datasets.synthetic_xenium(tmp_path_factory.mktemp("syn") / "bundle", n_cells=N_CELLS, seed=3)


@pytest.fixture(scope="session")
def int_bundle(tmp_path_factory):
    return cs.datasets.synthetic_xenium(tmp_path_factory.mktemp("syn_int") / "bundle", n_cells=300, seed=5,
                                        id_style="integer")


@pytest.fixture(scope="session")
def matrix(bundle):
    with h5py.File(bundle / "cell_feature_matrix.h5") as f:
        m = f["matrix"]
        n_feat, n_cells = m["shape"][:]
        X = sp.csr_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_cells, n_feat))
        names = m["features/name"][:].astype(str)
        ftype = m["features/feature_type"][:].astype(str)
        barcodes = m["barcodes"][:].astype(str)
    return X, names, ftype, barcodes


@pytest.fixture(scope="session")
def truth(bundle):
    return pd.read_parquet(bundle / "truth.parquet")


@pytest.fixture(scope="session")
def measured(bundle, truth):
    """Nucleus area, elongation and hematoxylin darkness measured on the H&E image inside each nucleus polygon
    (the polygons of nucleus_boundaries.parquet mapped into H&E pixels through the alignment)."""
    import tifffile
    from skimage.color import rgb2hed
    from skimage.draw import polygon

    he = tifffile.imread(next(bundle.glob("*_he_image.ome.tif")))
    hed = rgb2hed(he)[..., 0]
    align = np.loadtxt(next(bundle.glob("*_he_imagealignment.csv")), delimiter=",")
    spec = json.loads((bundle / "experiment.xenium").read_text())
    inv = np.linalg.inv(align)
    mpp = spec["cellsymphony_synthetic"]["he_mpp"]
    nb = pd.read_parquet(bundle / "nucleus_boundaries.parquet")
    rows = []
    for cid, g in nb.groupby("cell_id", sort=False):
        xy = np.c_[g.vertex_x.to_numpy(), g.vertex_y.to_numpy(), np.ones(len(g))]
        xy[:, :2] /= spec["pixel_size"]
        p = xy @ inv.T
        rr, cc = polygon(p[:, 1], p[:, 0], shape=hed.shape)
        if len(rr) < 5:
            continue
        cov = np.cov(np.c_[cc, rr].T)
        ev = np.linalg.eigvalsh(cov)
        rows.append((cid, len(rr) * mpp**2, np.sqrt(ev[1] / max(ev[0], 1e-6)), hed[rr, cc].mean(),
                     cc.mean(), rr.mean()))
    m = pd.DataFrame(rows, columns=["cell_id", "area", "elongation", "darkness", "cx", "cy"])
    return m.merge(truth[["cell_id", "cell_type", "cell_type_fine", "he_x", "he_y", "nucleus_area"]], on="cell_id")


# ------------------------------------------------------------------------------------------------ layout
def test_files_present(bundle):
    names = {p.name for p in bundle.iterdir()}
    for f in ("experiment.xenium", "cells.parquet", "cells.zarr.zip", "cell_feature_matrix.h5",
              "cell_boundaries.parquet", "nucleus_boundaries.parquet", "transcripts.parquet",
              "synthetic_he_image.ome.tif", "synthetic_he_imagealignment.csv", "truth.parquet",
              "he_nuclei.csv", "reference.h5ad"):
        assert f in names, f
    assert (bundle / "morphology_focus" / "morphology_focus_0000.ome.tif").is_file()
    spec = json.loads((bundle / "experiment.xenium").read_text())
    assert spec["pixel_size"] == 0.2125
    assert spec["analysis_sw_version"].startswith("xenium-2.")
    assert spec["num_cells"] == N_CELLS
    for key in ("run_name", "region_name", "panel_name", "panel_organism", "panel_num_targets_predesigned"):
        assert spec[key]


def test_matrix_is_10x_h5(bundle, matrix):
    with h5py.File(bundle / "cell_feature_matrix.h5") as f:
        assert f.attrs["filetype"] == "matrix"
        assert int(f.attrs["version"]) == 2
        assert "software_version" in f.attrs and "chemistry_description" in f.attrs
        m = f["matrix"]
        assert m["data"].dtype == np.int32
        assert m["indices"].dtype == np.int64 and m["indptr"].dtype == np.int64
        assert set(m["features"]) == {"_all_tag_keys", "feature_type", "genome", "id", "name"}
    X, names, ftype, barcodes = matrix
    cells = pd.read_parquet(bundle / "cells.parquet")
    assert list(barcodes) == list(cells.cell_id)
    assert all(re.fullmatch(r"[a-p]{8}-1", b) for b in barcodes)
    assert {"Gene Expression", "Negative Control Probe", "Negative Control Codeword",
            "Unassigned Codeword"} <= set(ftype)
    genes = names[ftype == "Gene Expression"]
    assert len(genes) >= 500 and len(set(genes)) == len(genes)
    for g in ("EPCAM", "KRT8", "ERBB2", "MKI67", "KRT5", "COL1A1", "DCN", "CD3E", "TRAC", "CD8A", "MS4A1",
              "CD79A", "CD68", "CD163", "PECAM1", "VWF", "CDH5"):
        assert g in genes
    gx = X[:, ftype == "Gene Expression"]
    np.testing.assert_array_equal(np.asarray(gx.sum(axis=1)).ravel(), cells.transcript_counts)
    probe = X[:, ftype == "Negative Control Probe"]
    np.testing.assert_array_equal(np.asarray(probe.sum(axis=1)).ravel(), cells.control_probe_counts)
    assert (cells.total_counts >= cells.transcript_counts).all()
    assert (cells.cell_area >= cells.nucleus_area).all() and (cells.nucleus_area > 0).all()
    assert (cells.cell_area > 1.5 * cells.nucleus_area).mean() > 0.5


def test_cells_zarr(bundle):
    import zarr
    from spatialdata_io.readers.xenium import cell_id_str_from_prefix_suffix_uint32

    store = zarr.storage.ZipStore(bundle / "cells.zarr.zip", read_only=True)
    z = zarr.open(store, mode="r")
    cid = z["cell_id"][...]
    assert cid.shape == (N_CELLS, 2) and cid.dtype == np.uint32
    cells = pd.read_parquet(bundle / "cells.parquet")
    assert list(cell_id_str_from_prefix_suffix_uint32(cid[:, 0], cid[:, 1])) == list(cells.cell_id)
    for k in ("0", "1"):
        labels = np.unique(z["masks"][k][...])
        np.testing.assert_array_equal(labels, np.arange(N_CELLS + 1))
        np.testing.assert_array_equal(z["polygon_sets"][k]["cell_index"][...], np.arange(N_CELLS))
    cols = list(z["cell_summary"].attrs["column_names"])
    assert {"z_level", "nucleus_count", "cell_area", "nucleus_area"} <= set(cols)
    summary = pd.DataFrame(z["cell_summary"][...], columns=cols)
    np.testing.assert_allclose(summary.cell_area, cells.cell_area)
    store.close()


def test_boundaries_and_transcripts(bundle, matrix):
    X, names, ftype, barcodes = matrix
    for f in ("cell_boundaries.parquet", "nucleus_boundaries.parquet"):
        b = pd.read_parquet(bundle / f)
        assert {"cell_id", "vertex_x", "vertex_y", "label_id"} <= set(b.columns)
        assert b.cell_id.nunique() == N_CELLS
    tr = pd.read_parquet(bundle / "transcripts.parquet")
    assert {"transcript_id", "cell_id", "overlaps_nucleus", "feature_name", "x_location", "y_location",
            "z_location", "qv"} <= set(tr.columns)
    assert tr.transcript_id.is_unique
    assert (tr.cell_id == "UNASSIGNED").any() and (tr.qv < 20).any()
    # molecules with qv >= 20 assigned to a cell add up to the matrix, feature by feature
    ok = tr[(tr.qv >= 20) & (tr.cell_id != "UNASSIGNED")]
    row = pd.Index(barcodes).get_indexer(ok.cell_id)
    col = pd.Index(names).get_indexer(ok.feature_name.astype(str))
    assert (row >= 0).all() and (col >= 0).all()
    counted = sp.csr_matrix((np.ones(len(ok), np.int64), (row, col)), shape=X.shape)
    assert (counted != X).nnz == 0


def test_he_image_and_alignment(bundle):
    import tifffile

    align = np.loadtxt(bundle / "synthetic_he_imagealignment.csv", delimiter=",")
    assert align.shape == (3, 3)
    np.testing.assert_allclose(align[2], [0, 0, 1])
    scale = np.sqrt(abs(np.linalg.det(align[:2, :2])))
    angle = np.degrees(np.arctan2(align[1, 0], align[0, 0]))
    assert abs(scale - 1) > 0.05 and 3 < abs(angle) < 20 and np.abs(align[:2, 2]).max() > 10
    with tifffile.TiffFile(bundle / "synthetic_he_image.ome.tif") as tif:
        s = tif.series[0]
        assert s.axes == "YXS" and s.dtype == np.uint8
        assert len(s.levels) >= 2
        page = tif.pages[0]
        assert page.is_tiled and page.compression in (7, 8, 50013)  # JPEG or deflate
        ome = tif.ome_metadata
    mpp = float(re.search(r'PhysicalSizeX="([0-9.]+)"', ome).group(1))
    assert mpp == pytest.approx(0.2738)
    assert mpp / 0.2125 == pytest.approx(scale, rel=1e-6)


# ------------------------------------------------------------------------------------------------ readers
def _no_id_warnings(record):
    bad = [str(w.message) for w in record if "cell_id" in str(w.message) or "does not match" in str(w.message)]
    assert not bad, bad


def test_spatialdata_io_reads_string_bundle(bundle):
    from spatialdata_io import xenium

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sdata = xenium(bundle, cells_as_circles=False)
    _no_id_warnings(rec)
    table = sdata.tables["table"]
    assert table.n_obs == N_CELLS and table.n_vars >= 500
    assert "cell_labels" in table.obs and table.obs["nucleus_count"].eq(1).all()
    assert {"he_image", "morphology_focus"} <= set(sdata.images)
    assert {"cell_labels", "nucleus_labels"} <= set(sdata.labels)
    assert len(sdata.shapes["cell_boundaries"]) == N_CELLS
    assert list(sdata.images["morphology_focus"]["scale0"].c.values) == ["DAPI"]


def test_spatialdata_io_reads_integer_bundle(int_bundle):
    from spatialdata_io import xenium

    cells = pd.read_parquet(int_bundle / "cells.parquet")
    assert cells.cell_id.dtype.kind == "i"
    assert (int_bundle / "morphology_mip.ome.tif").is_file() and (int_bundle / "morphology_focus.ome.tif").is_file()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sdata = xenium(int_bundle, cells_as_circles=True)
    _no_id_warnings(rec)
    assert sdata.tables["table"].n_obs == 300
    assert {"he_image", "morphology_focus", "morphology_mip"} <= set(sdata.images)
    tr = pd.read_parquet(int_bundle / "transcripts.parquet")
    assert tr.cell_id.dtype.kind == "i" and (tr.cell_id == -1).any()


# ------------------------------------------------------------------------------------------------ realism
def test_registration_truth(bundle, measured):
    """A nucleus polygon mapped through the alignment lands on its rendered nucleus."""
    d = np.hypot(measured.cx - measured.he_x, measured.cy - measured.he_y)
    assert np.median(d) < 1.0 and np.quantile(d, 0.95) < 3.0
    r = np.corrcoef(measured.area, measured.nucleus_area)[0, 1]
    assert r > 0.9


def test_nucleus_morphology_by_type(measured):
    med = measured.groupby("cell_type", observed=True)[["area", "elongation", "darkness"]].median()
    assert set(TYPES) <= set(med.index)
    area, el, dark = med.area, med.elongation, med.darkness
    # size: tumour largest; lymphocytes smallest
    assert area["tumour epithelium"] > 1.5 * area["normal epithelium"]
    assert area["tumour epithelium"] > area["macrophage"] > area["T cell"]
    assert max(area["T cell"], area["B cell"]) < min(area[t] for t in TYPES if t not in ("T cell", "B cell"))
    # shape: fibroblasts and endothelium spindle / flat; lymphocytes round
    assert el["fibroblast"] > 2.5 and el["endothelial"] > 2.0
    assert el["T cell"] < 1.35 and el["B cell"] < 1.35
    assert el["tumour epithelium"] < el["fibroblast"]
    # chromatin: lymphocytes darkest; vesicular tumour and macrophage nuclei paler than fibroblasts
    assert min(dark["T cell"], dark["B cell"]) > max(dark[t] for t in TYPES if t not in ("T cell", "B cell"))
    assert dark["fibroblast"] > dark["tumour epithelium"] and dark["fibroblast"] > dark["macrophage"]
    # T and B cells look alike in H&E
    assert abs(area["T cell"] - area["B cell"]) / area["T cell"] < 0.15
    assert abs(dark["T cell"] - dark["B cell"]) / dark["T cell"] < 0.1
    # pleomorphism: tumour nuclei vary more in size than normal epithelium
    cv = measured.groupby("cell_type_fine", observed=True).area.agg(lambda a: a.std() / a.mean())
    assert cv[cv.index.str.startswith("Tumour")].min() > 1.5 * cv["Luminal epithelium"]


def _norm_log(X):
    X = X.astype(np.float64)
    lib = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags(100.0 / np.maximum(lib, 1)) @ X
    return X.log1p().tocsc()


def test_marker_enrichment(matrix, truth):
    X, names, ftype, _ = matrix
    gx = X[:, ftype == "Gene Expression"]
    genes = pd.Index(names[ftype == "Gene Expression"])
    L = _norm_log(gx)
    types = truth.cell_type.astype(str).to_numpy()
    markers = {"tumour epithelium": ["EPCAM", "KRT8", "ERBB2"], "normal epithelium": ["EPCAM", "KRT8", "KRT18"],
               "fibroblast": ["COL1A1", "DCN", "LUM"], "T cell": ["CD3E", "CD2", "TRAC"],
               "B cell": ["MS4A1", "CD79A", "CD19"], "macrophage": ["CD68", "CD163", "C1QA"],
               "endothelial": ["PECAM1", "VWF", "CDH5"]}
    epithelial = np.isin(types, ["tumour epithelium", "normal epithelium"])
    for t, gs in markers.items():
        # epithelial markers are shared by tumour and normal epithelium: compare with the other lineages
        rest = ~epithelial if t in ("tumour epithelium", "normal epithelium") else types != t
        for g in gs:
            col = np.asarray(L[:, genes.get_loc(g)].todense()).ravel()
            assert col[types == t].mean() > 3 * col[rest].mean() + 0.05, (t, g)
    # within the epithelium: basal keratins mark the normal ducts, ERBB2 the tumour
    lib = np.asarray(gx.sum(axis=1)).ravel()
    N = sp.diags(100.0 / np.maximum(lib, 1)) @ gx.astype(np.float64).tocsc()
    krt5 = np.asarray(N[:, genes.get_loc("KRT5")].todense()).ravel()
    erbb2 = np.asarray(N[:, genes.get_loc("ERBB2")].todense()).ravel()
    basal = truth.cell_type_fine.astype(str).to_numpy() == "Basal/myoepithelial cell"
    krt14 = np.asarray(N[:, genes.get_loc("KRT14")].todense()).ravel()
    assert krt5[basal].mean() > 3 * krt5[types == "tumour epithelium"].mean()
    assert krt14[basal].mean() > 3 * krt14[~epithelial].mean()
    assert erbb2[types == "tumour epithelium"].mean() > 1.5 * erbb2[types == "normal epithelium"].mean()
    # T vs B: alike in H&E, apart in expression
    cd3 = np.asarray(L[:, genes.get_loc("CD3E")].todense()).ravel()
    ms4 = np.asarray(L[:, genes.get_loc("MS4A1")].todense()).ravel()
    assert cd3[types == "T cell"].mean() > 5 * cd3[types == "B cell"].mean()
    assert ms4[types == "B cell"].mean() > 5 * ms4[types == "T cell"].mean()
    # tumour vs normal epithelium: close in expression (closer than T vs B)
    prof = {t: np.asarray(L[types == t].mean(axis=0)).ravel() for t in ("tumour epithelium", "normal epithelium",
                                                                         "T cell", "B cell")}
    r_epi = np.corrcoef(prof["tumour epithelium"], prof["normal epithelium"])[0, 1]
    r_tb = np.corrcoef(prof["T cell"], prof["B cell"])[0, 1]
    assert r_epi > 0.85 and r_epi > r_tb


def test_niche_programmes(matrix, truth):
    """The same type differs by compartment: exhausted T cells and SPP1+ macrophages inside tumour nests."""
    X, names, ftype, _ = matrix
    gx = X[:, ftype == "Gene Expression"].astype(np.float64)
    genes = list(names[ftype == "Gene Expression"])
    lib = np.asarray(gx.sum(axis=1)).ravel()
    N = (sp.diags(100.0 / np.maximum(lib, 1)) @ gx).tocsc()
    types, comp = truth.cell_type.astype(str).to_numpy(), truth.compartment.astype(str).to_numpy()

    def mean(gene, mask):
        return np.asarray(N[:, genes.index(gene)].todense()).ravel()[mask].mean()

    t_in, t_out = (types == "T cell") & (comp == "tumour nest"), (types == "T cell") & (comp != "tumour nest")
    assert t_in.sum() > 10 and t_out.sum() > 10
    assert mean("PDCD1", t_in) > 2 * mean("PDCD1", t_out)
    m_in, m_out = (types == "macrophage") & (comp == "tumour nest"), (types == "macrophage") & (comp != "tumour nest")
    assert mean("SPP1", m_in) > 2 * mean("SPP1", m_out)


def test_counts_realistic(matrix, truth):
    X, names, ftype, _ = matrix
    gx = X[:, ftype == "Gene Expression"]
    lib = np.asarray(gx.sum(axis=1)).ravel()
    assert 30 < np.median(lib) < 400 and lib.max() < 3000
    assert lib.std() / lib.mean() > 0.4
    assert 1 - gx.nnz / np.prod(gx.shape) > 0.7  # sparse, as a targeted panel is
    # over-dispersion: variance above the mean for a marker within its own type
    tum = truth.cell_type.astype(str).to_numpy() == "tumour epithelium"
    col = np.asarray(gx[tum][:, list(names).index("KRT8")].todense()).ravel()
    assert col.var() > 1.5 * col.mean()
    ctrl = X[:, ftype != "Gene Expression"]
    assert 0 < ctrl.sum() < 0.05 * gx.sum()


def test_compartments_and_types(truth):
    assert truth.cell_type.nunique() == 7
    comp = pd.crosstab(truth.compartment, truth.cell_type)
    assert comp.loc["tumour nest", "tumour epithelium"] > 0.7 * comp.loc["tumour nest"].sum()
    assert comp.loc["lymphoid aggregate", ["T cell", "B cell"]].sum() > 0.8 * comp.loc["lymphoid aggregate"].sum()
    assert comp.loc["normal duct", "normal epithelium"] == comp.loc["normal duct"].sum()
    assert comp.loc["vessel", "endothelial"] == comp.loc["vessel"].sum()


# ------------------------------------------------------------------------------------------------ label sources
def test_reference(bundle, matrix):
    import anndata as ad

    ref = ad.read_h5ad(bundle / "reference.h5ad")
    X, names, ftype, _ = matrix
    assert list(ref.var_names) == list(names[ftype == "Gene Expression"])
    assert set(ref.obs.cell_type.cat.categories) == set(TYPES)
    fine = set(ref.obs.cell_type_fine)
    assert {"CD4 T cell", "CD8 T cell", "Plasma cell"} <= fine
    data = ref.X.data
    assert np.all(data == np.round(data)) and ref.X.sum() > 0
    cd8 = np.asarray(ref[:, "CD8A"].X.todense()).ravel()
    is_cd8 = ref.obs.cell_type_fine.to_numpy() == "CD8 T cell"
    is_cd4 = ref.obs.cell_type_fine.to_numpy() == "CD4 T cell"
    assert cd8[is_cd8].mean() > 5 * cd8[is_cd4].mean()
    ref2 = cs.datasets.synthetic_reference(n_cells=200, seed=3)
    assert ref2.n_obs == 200 and list(ref2.var_names) == list(ref.var_names)


def test_he_nuclei(bundle, truth):
    from scipy.spatial import cKDTree

    calls = pd.read_csv(bundle / "he_nuclei.csv")
    assert list(calls.columns) == ["x", "y", "class", "probability"]
    assert set(calls["class"]) <= {"fibroblast", "lymphocyte", "tumour", "other"}
    assert calls.probability.between(0, 1).all()
    assert 0.85 * len(truth) < len(calls) < 1.1 * len(truth)
    d, j = cKDTree(calls[["x", "y"]].to_numpy()).query(truth[["he_x", "he_y"]].to_numpy())
    hit = d < 8
    assert 0.85 < hit.mean() < 0.99  # some nuclei are missed
    assert 0.5 < np.median(d[hit]) < 4  # small localisation noise
    lymph = truth.cell_type.isin(["T cell", "B cell"]).to_numpy() & hit
    called = calls["class"].to_numpy()[j]
    assert (called[lymph] == "lymphocyte").mean() > 0.8
    tum = (truth.cell_type == "tumour epithelium").to_numpy() & hit
    assert 0.7 < (called[tum] == "tumour").mean() < 0.99  # confusions exist
    dd, _ = cKDTree(calls[["x", "y"]].to_numpy()).query(calls[["x", "y"]].to_numpy(), k=2)
    assert (dd[:, 1] < 10).sum() > 0  # duplicates


# ------------------------------------------------------------------------------------------------ api
def test_deterministic_and_errors(tmp_path):
    a = cs.datasets.synthetic_xenium(tmp_path / "a", n_cells=150, seed=9, transcripts=False, reference_cells=0)
    b = cs.datasets.synthetic_xenium(tmp_path / "b", n_cells=150, seed=9, transcripts=False, reference_cells=0)
    pd.testing.assert_frame_equal(pd.read_parquet(a / "cells.parquet"), pd.read_parquet(b / "cells.parquet"))
    assert not (a / "transcripts.parquet").exists() and not (a / "reference.h5ad").exists()
    with pytest.raises(ValueError, match="not empty"):
        cs.datasets.synthetic_xenium(a, n_cells=150)
    with pytest.raises(ValueError, match="id_style"):
        cs.datasets.synthetic_xenium(tmp_path / "c", id_style="uuid")
    with pytest.raises(ValueError, match="n_cells"):
        cs.datasets.synthetic_xenium(tmp_path / "c", n_cells=3)


def test_synthetic_reads_cached_bundle(tmp_path, monkeypatch):
    if not hasattr(cs.io, "read_xenium"):
        pytest.skip("cs.io.read_xenium is not on this branch yet")
    monkeypatch.setattr(cs.settings, "cache_dir", tmp_path)
    m1 = cs.datasets.synthetic(n_cells=300, seed=2)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / ".complete").exists()
    stamp = (folders[0] / "cells.parquet").stat().st_mtime_ns
    m2 = cs.datasets.synthetic(n_cells=300, seed=2)
    assert (folders[0] / "cells.parquet").stat().st_mtime_ns == stamp
    assert m1 is not m2 and m1.n_obs == m2.n_obs == 300
    assert {"rna", "morphology"} <= set(m1.mod)
    m1.mod["rna"].obs["x"] = 1
    assert "x" not in m2.mod["rna"].obs


def test_synthetic_path_keeps_a_bundle_another_process_completed(tmp_path, monkeypatch):
    """Two processes generating the same bundle: the one finishing second must not delete the first one's
    complete folder (which a reader may be using); it discards its own copy."""
    from cellsymphony.datasets import _synthetic

    monkeypatch.setattr(cs.settings, "cache_dir", tmp_path)
    real = _synthetic.synthetic_xenium

    def racing(path, **kwargs):
        # another process completes the bundle while this one is still generating
        final = tmp_path / f"synthetic_v{_synthetic.GENERATOR_VERSION}_n10_s0_string"
        final.mkdir()
        (final / "in_use.txt").write_text("the other process's bundle\n")
        (final / ".complete").write_text("ok\n")
        return real(path, **kwargs)

    monkeypatch.setattr(_synthetic, "synthetic_xenium", racing)
    folder = cs.datasets.synthetic_path(n_cells=10, seed=0)
    assert (folder / "in_use.txt").exists() and (folder / ".complete").exists()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind


def test_he_compression(tmp_path):
    """The H&E's tiles are JPEG by default (as scanners write them); zlib keeps the rendered pixels."""
    import tifffile

    kw = {"n_cells": 120, "seed": 4, "transcripts": False, "reference_cells": 0}
    jpeg = cs.datasets.synthetic_xenium(tmp_path / "j", **kw)
    lossless = cs.datasets.synthetic_xenium(tmp_path / "z", **kw, he_compression="zlib")
    with tifffile.TiffFile(jpeg / "synthetic_he_image.ome.tif") as a, tifffile.TiffFile(lossless / "synthetic_he_image.ome.tif") as b:
        assert a.pages[0].compression == 7 and b.pages[0].compression == 8  # JPEG, deflate
        pa, pb = a.series[0].asarray(), b.series[0].asarray()
    assert pa.shape == pb.shape and 0 < np.abs(pa.astype(float) - pb).mean() < 4  # the JPEG loss, small
    assert json.loads((lossless / "truth_he.json").read_text())["he_compression"] == "zlib"
    with pytest.raises(ValueError, match="he_compression must be 'jpeg', 'zlib' or 'none'"):
        cs.datasets.synthetic_xenium(tmp_path / "x", **kw, he_compression="png")
