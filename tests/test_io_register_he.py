"""cs.io.register_he: automatic H&E registration on synthetic sections under known transforms, and its failures."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _he_warp import Deformation, new_position, transform_px, warp_he, write_pyramid

import cellsymphony as cs

N_CELLS = 4000
PIXEL_SIZE = 0.2125


@cache
def _bundle() -> Path:
    return cs.datasets.synthetic_path(n_cells=N_CELLS, seed=0)


@cache
def _truth():
    """Per cell: the H&E level-0 pixel of its nucleus in the bundle's own H&E, and where it is (um)."""
    b = _bundle()
    tr = pd.read_parquet(b / "truth.parquet")
    a0 = np.loadtxt(next(b.glob("*_he_imagealignment.csv")), delimiter=",")
    old = tr[["he_x", "he_y"]].to_numpy(np.float64)
    um = (np.c_[old, np.ones(len(old))] @ a0.T)[:, :2] * PIXEL_SIZE
    return tr["cell_id"].astype(str).to_numpy(), old, um


_IMAGES: dict = {}


def _case(tmp_path_factory, name: str, w: np.ndarray, **kw) -> tuple[Path, np.ndarray]:
    """A warped copy of the bundle's H&E, once per session; returns the image and the new pixel of each cell."""
    if name not in _IMAGES:
        out = tmp_path_factory.mktemp(name)
        path, _ = warp_he(_bundle(), out, w, **kw)
        _, old, _ = _truth()
        q = new_position(old, np.load(out / "w.npy"), kw.get("deform"))
        _IMAGES[name] = (path, q)
    return _IMAGES[name]


def truth_error(reg: cs.io.Registration, q: np.ndarray) -> np.ndarray:
    """Distance (um) between where the registration puts each cell's H&E nucleus and where the cell is."""
    _, _, um = _truth()
    return np.hypot(*(reg.to_um(q) - um).T)


_REGS: dict = {}


def _register(key, path, **kw) -> cs.io.Registration:
    if key not in _REGS:
        _REGS[key] = cs.io.register_he(_bundle(), path, **kw)
    return _REGS[key]


CASES = {
    "rot137_flip_zoom0.8": (137.0, True, 0.8),
    "rot250_zoom1.25": (250.0, False, 1.25),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_any_rotation_flip_and_scale(tmp_path_factory, name):
    angle, flip, zoom = CASES[name]
    path, q = _case(tmp_path_factory, name, transform_px(angle, flip, zoom))
    reg = _register(name, path)
    qc = reg.qc
    for key in ("n_matched", "median_um", "p95_um", "inlier_fraction", "scale_um_per_px", "ok"):
        assert key in qc
    assert qc["ok"] is True, reg.summary()
    assert qc["flipped"] is flip
    assert qc["scale_um_per_px"] == pytest.approx(0.2738 / zoom, rel=0.005)
    assert qc["scale_estimated"] is False
    err = truth_error(reg, q)
    assert np.median(err) <= 0.5 and np.percentile(err, 95) <= 1.5, (np.median(err), np.percentile(err, 95))
    assert reg.alignment.shape == (3, 3) and np.allclose(reg.alignment[2], [0, 0, 1])
    res = reg.residuals
    assert {"cell_id", "dx_um", "dy_um"} <= set(res.columns)
    assert len(res) == qc["n_matched"] and res["cell_id"].isin(_truth()[0]).all()
    assert reg.nonrigid is None


def test_scale_measured_without_pixel_size(tmp_path_factory):
    path, q = _case(tmp_path_factory, "rot200_flip_nompp", transform_px(200.0, True, 0.9), mpp=None)
    reg = _register("nompp", path)
    assert reg.qc["ok"], reg.summary()
    assert reg.qc["scale_estimated"] is True and reg.qc["mpp_source"] == "estimated"
    assert np.isnan(reg.qc["mpp_recorded"])
    assert reg.qc["scale_um_per_px"] == pytest.approx(0.2738 / 0.9, rel=0.005)
    assert reg.he_mpp == pytest.approx(reg.qc["scale_um_per_px"])
    assert "scale estimated" in reg.summary()
    assert np.median(truth_error(reg, q)) <= 0.5


def test_scale_measured_when_pixel_size_is_wrong(tmp_path_factory):
    path, q = _case(tmp_path_factory, "rot37", transform_px(37.0, False, 1.0))
    reg = cs.io.register_he(_bundle(), path, he_mpp=0.2738 * 1.3)  # 30 % off
    assert reg.qc["ok"], reg.summary()
    assert reg.qc["mpp_source"] == "he_mpp" and reg.qc["scale_estimated"] is False
    assert reg.qc["scale_ratio"] == pytest.approx(1 / 1.3, rel=0.01)
    assert np.median(truth_error(reg, q)) <= 0.5


def test_nonrigid_corrects_smooth_deformation(tmp_path_factory):
    deform = Deformation(10.0 / 0.2738, 500.0 / 0.2738, seed=1)
    path, q = _case(tmp_path_factory, "deformed", transform_px(70.0, False, 1.0), deform=deform)
    rigid = _register("deformed_rigid", path)
    err_rigid = truth_error(rigid, q)
    assert np.median(err_rigid) > 3.0
    assert not rigid.qc["ok"] and "nonrigid=True" in rigid.qc["reason"]
    reg = _register("deformed_nonrigid", path, nonrigid=True)
    assert reg.qc["ok"], reg.summary()
    err = truth_error(reg, q)
    assert np.median(err) <= 1.0, np.median(err)
    assert reg.nonrigid is not None and reg.nonrigid["grid_um"].ndim == 3
    assert 5.0 < reg.qc["nonrigid_max_um"] < 20.0
    assert reg.qc["affine_median_um"] > 2 * reg.qc["median_um"]


# ---------------------------------------------------------------------------------------------- failures
def _assert_failed(reg, tmp_path):
    assert reg.qc["ok"] is False
    assert reg.qc["reason"]
    out = tmp_path / "alignment.csv"
    with pytest.raises(ValueError, match="failed its QC"):
        reg.write_csv(out)
    assert not out.exists()


def test_blank_image_fails(tmp_path_factory, tmp_path):
    path, _ = _case(tmp_path_factory, "blank", transform_px(10.0), blank=True)
    reg = cs.io.register_he(_bundle(), path)
    _assert_failed(reg, tmp_path)
    assert "nuclei" in reg.qc["reason"]


def test_out_of_focus_image_fails(tmp_path_factory, tmp_path):
    path, _ = _case(tmp_path_factory, "blurred", transform_px(10.0), blur_px=20.0)
    _assert_failed(cs.io.register_he(_bundle(), path), tmp_path)


def test_other_section_fails(tmp_path):
    other = cs.datasets.synthetic_path(n_cells=150, seed=1)
    _assert_failed(cs.io.register_he(_bundle(), next(other.glob("*_he_image.ome.tif"))), tmp_path)


def test_other_tissue_fails(shared_data, tmp_path):
    reg = cs.io.register_he(_bundle(), shared_data / "he" / "cmu_small_region.svs")
    _assert_failed(reg, tmp_path)


def test_failed_registration_is_not_applied(tmp_path_factory):
    path, _ = _case(tmp_path_factory, "blank", transform_px(10.0), blank=True)
    reg = cs.io.register_he(_bundle(), path)
    mdata = cs.io.read_xenium(_bundle(), he_image=False)
    before = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
              for k, v in mdata.uns["cellsymphony"]["samples"]["synthetic"].items()}
    with pytest.raises(ValueError, match="failed its QC"):
        reg.apply(mdata)
    after = mdata.uns["cellsymphony"]["samples"]["synthetic"]
    assert after["he_path"] == before["he_path"] == ""
    assert "registration_error_um" not in mdata["rna"].obs
    with pytest.raises(ValueError, match=r"failed its QC \(ok=False, n_matched=.*median_um="):
        cs.io.read_xenium(_bundle(), he_image=path, he_alignment="auto")


# ---------------------------------------------------------------------------------------------- outputs
def test_csv_round_trip_and_apply_match_read_xenium(tmp_path_factory, tmp_path):
    name = "rot137_flip_zoom0.8"
    path, _ = _case(tmp_path_factory, name, transform_px(*CASES[name]))
    reg = _register(name, path)
    csv = reg.write_csv(tmp_path / "x_he_imagealignment.csv")
    assert np.allclose(np.loadtxt(csv, delimiter=","), reg.alignment, rtol=1e-9, atol=1e-9)
    with_csv = cs.io.read_xenium(_bundle(), he_image=path, he_alignment=csv)
    applied = cs.io.read_xenium(_bundle(), he_image=False)
    reg.apply(applied)
    a = with_csv.uns["cellsymphony"]["samples"]["synthetic"]
    b = applied.uns["cellsymphony"]["samples"]["synthetic"]
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9)
        else:
            assert a[key] == pytest.approx(b[key]) if isinstance(a[key], float) else a[key] == b[key]
    np.testing.assert_array_equal(with_csv["morphology"].obs["in_image"], applied["morphology"].obs["in_image"])
    for mod in ("rna", "morphology"):
        err = applied[mod].obs["registration_error_um"].to_numpy()
        assert np.isfinite(err).mean() > 0.9
        assert np.nanmedian(err) < 0.5
    auto = cs.io.read_xenium(_bundle(), he_image=path, he_alignment="auto")
    np.testing.assert_allclose(auto.uns["cellsymphony"]["samples"]["synthetic"]["alignment"], reg.alignment,
                               rtol=1e-6, atol=1e-6)
    assert auto.uns["he_registration"]["samples"]["synthetic"]["ok"]


def test_nonrigid_registry_survives_h5mu(tmp_path_factory, tmp_path):
    import mudata

    deform = Deformation(10.0 / 0.2738, 500.0 / 0.2738, seed=1)
    path, q = _case(tmp_path_factory, "deformed", transform_px(70.0, False, 1.0), deform=deform)
    reg = _register("deformed_nonrigid", path, nonrigid=True)
    mdata = cs.io.read_xenium(_bundle(), he_image=False)
    reg.apply(mdata)
    mdata.write(tmp_path / "x.h5mu")
    back = mudata.read_h5mu(tmp_path / "x.h5mu")
    entry = back.uns["cellsymphony"]["samples"]["synthetic"]
    assert set(entry["nonrigid"]) == {"grid_um", "origin_px", "step_px"}
    np.testing.assert_allclose(entry["nonrigid"]["grid_um"], reg.nonrigid["grid_um"])
    res = back.uns["he_registration"]["samples"]["synthetic"]["residuals"]
    assert isinstance(res, pd.DataFrame) and len(res) == reg.qc["n_matched"]
    # the registry's mapping (used by the patch reader and label transfer) is the non-rigid one
    from cellsymphony._registration import he_px_to_um, registry_warp, um_to_he_px

    warp = registry_warp(entry)
    _, _, um = _truth()
    err = np.hypot(*(he_px_to_um(q, entry["alignment"], entry["pixel_size"], warp) - um).T)
    assert np.median(err) <= 1.0
    back_px = um_to_he_px(he_px_to_um(q[:50], entry["alignment"], entry["pixel_size"], warp),
                          entry["alignment"], entry["pixel_size"], warp)
    np.testing.assert_allclose(back_px, q[:50], atol=0.01)


def test_nuclei_file_with_missing_spurious_nuclei_and_foreign_ids(tmp_path_factory, tmp_path):
    name = "rot250_zoom1.25"
    path, q = _case(tmp_path_factory, name, transform_px(*CASES[name]))
    rng = np.random.default_rng(0)
    keep = rng.random(len(q)) > 0.2  # 20 % missing
    lo, hi = q.min(axis=0), q.max(axis=0)
    spurious = rng.uniform(lo, hi, (len(q) // 10, 2))  # 10 % spurious
    xy = np.r_[q[keep] + rng.normal(0, 0.5, (keep.sum(), 2)), spurious]
    table = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "cell_id": [f"he{i}" for i in range(len(xy))]})
    table.to_csv(tmp_path / "nuclei.csv", index=False)
    reg = cs.io.register_he(_bundle(), path, nuclei=tmp_path / "nuclei.csv")
    assert reg.qc["ok"], reg.summary()
    assert "n_windows" in reg.qc and reg.qc["n_windows"] == 0
    err = truth_error(reg, q)
    assert np.median(err) <= 0.5 and np.percentile(err, 95) <= 1.5


def test_without_dapi_image_falls_back_to_nuclei(tmp_path_factory, tmp_path):
    name = "rot137_flip_zoom0.8"
    path, q = _case(tmp_path_factory, name, transform_px(*CASES[name]))
    folder = tmp_path / "xenium"
    folder.mkdir()
    for f in ("experiment.xenium", "cells.parquet", "cell_feature_matrix.h5", "nucleus_boundaries.parquet"):
        (folder / f).symlink_to(_bundle() / f)
    reg = cs.io.register_he(folder, path)
    assert reg.qc["coarse_source"] == "nuclei"
    assert reg.qc["ok"], reg.summary()
    assert np.median(truth_error(reg, q)) <= 0.5


def test_mudata_input_and_rgba_image(tmp_path_factory, tmp_path):
    import tifffile

    name = "rot250_zoom1.25"
    path, q = _case(tmp_path_factory, name, transform_px(*CASES[name]))
    rgb = tifffile.imread(path, level=0)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    apath = tmp_path / "rgba.ome.tif"
    write_pyramid(apath, rgba, 0.2738 / 1.25)
    mdata = cs.io.read_xenium(_bundle(), he_image=False)
    reg = cs.io.register_he(mdata, apath)
    assert reg.sample == "synthetic" and reg.qc["nucleus_source"] == "mudata"
    assert reg.qc["ok"], reg.summary()
    assert np.median(truth_error(reg, q)) <= 0.5


def test_one_channel_image_registers_or_fails_honestly(tmp_path_factory, tmp_path):
    import tifffile

    name = "rot250_zoom1.25"
    path, q = _case(tmp_path_factory, name, transform_px(*CASES[name]))
    grey = tifffile.imread(path, level=0).mean(axis=2).round().astype(np.uint8)
    gpath = tmp_path / "grey.ome.tif"
    write_pyramid(gpath, grey, 0.2738 / 1.25)
    reg = cs.io.register_he(_bundle(), gpath)
    if reg.qc["ok"]:
        assert np.median(truth_error(reg, q)) <= 0.5
    else:
        assert reg.qc["reason"]


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        cs.io.register_he(tmp_path / "missing", tmp_path / "he.tif")
    with pytest.raises(ValueError, match="max_windows"):
        cs.io.register_he(_bundle(), next(_bundle().glob("*_he_image.ome.tif")), max_windows=0)


def test_patch_reader_and_label_transfer_use_the_nonrigid_field(tmp_path_factory):
    deform = Deformation(10.0 / 0.2738, 500.0 / 0.2738, seed=1)
    path, q = _case(tmp_path_factory, "deformed", transform_px(70.0, False, 1.0), deform=deform)
    truth_mdata = cs.io.read_xenium(_bundle())  # the undeformed H&E with its true alignment
    cells = np.arange(0, N_CELLS, 40)
    want = cs.pp.cell_patches(truth_mdata, cells=cells, size=32, mpp=0.5).astype(np.float64)

    def mismatch(reg) -> float:
        mdata = cs.io.read_xenium(_bundle(), he_image=False)
        reg.apply(mdata, force=True)
        got = cs.pp.cell_patches(mdata, cells=cells, size=32, mpp=0.5).astype(np.float64)
        return float(np.median(np.abs(got - want)))

    rigid = _register("deformed_rigid", path)
    nonrigid = _register("deformed_nonrigid", path, nonrigid=True)
    assert mismatch(nonrigid) < 0.5 * mismatch(rigid)

    # label transfer through the registry: H&E nuclei in the deformed image's pixels land on their cells
    ids, _, _ = _truth()
    mdata = cs.io.read_xenium(_bundle(), he_image=False)
    nonrigid.apply(mdata)
    table = pd.DataFrame({"x": q[:, 0], "y": q[:, 1], "class": ids})
    cs.pp.transfer_nucleus_labels(mdata, table, max_distance_um=3.0)
    labels = mdata.obs["he_label"].astype(object)
    assert (labels.to_numpy() == mdata.obs_names.to_numpy()).mean() > 0.95


# ---------------------------------------------------------------------------------------------- figure, CLI
def test_qc_figure_of_a_registration_and_of_the_applied_mudata(tmp_path_factory, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "rot137_flip_zoom0.8"
    path, _ = _case(tmp_path_factory, name, transform_px(*CASES[name]))
    reg = _register(name, path)
    fig = reg.plot(save=tmp_path / "qc.png")
    titles = [ax.get_title() for ax in fig.axes]
    for zoom in ("section", "region", "cells"):
        assert f"DAPI (green) over H&E: {zoom}" in titles
    assert any(t.startswith("residual map") for t in titles) and "QC: ok" in titles
    assert (tmp_path / "qc.png").stat().st_size > 10_000
    # the section view is the registered H&E: its dark (nuclear) pixels sit on bright DAPI
    section = next(ax for ax in fig.axes if ax.get_title().endswith("section")).images[0].get_array()
    assert section.shape[0] > 100
    plt.close(fig)
    mdata = cs.io.read_xenium(_bundle(), he_image=False)
    reg.apply(mdata)
    fig = cs.pl.registration(mdata)
    assert "QC: ok" in [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    blank, _ = _case(tmp_path_factory, "blank", transform_px(10.0), blank=True)
    fig = cs.io.register_he(_bundle(), blank).plot()
    assert "QC: FAILED" in [ax.get_title() for ax in fig.axes]
    plt.close(fig)


def test_command_line_register(tmp_path_factory, tmp_path, capsys):
    from cellsymphony import __main__ as cli

    name = "rot137_flip_zoom0.8"
    path, _ = _case(tmp_path_factory, name, transform_px(*CASES[name]))
    out = tmp_path / "alignment.csv"
    code = cli.main(["register", "--xenium", str(_bundle()), "--he", str(path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ok: True" in printed and "median_um:" in printed
    np.testing.assert_allclose(np.loadtxt(out, delimiter=","), _register(name, path).alignment, rtol=1e-6, atol=1e-6)
    # an existing --out is a usage error; a failed registration exits 1 and writes nothing
    assert cli.main(["register", "--xenium", str(_bundle()), "--he", str(path), "--out", str(out)]) == 2
    blank, _ = _case(tmp_path_factory, "blank", transform_px(10.0), blank=True)
    bad = tmp_path / "bad.csv"
    fig = tmp_path / "bad.png"
    code = cli.main(["register", "--xenium", str(_bundle()), "--he", str(blank), "--out", str(bad), "--figure", str(fig)])
    captured = capsys.readouterr()
    assert code == 1 and "ok: False" in captured.out and "nothing written" in captured.err
    assert not bad.exists() and fig.exists()
