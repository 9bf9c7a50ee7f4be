"""cs.io.register_he: automatic H&E registration on synthetic sections under known transforms, and its failures.

The sections come from ``cs.datasets.synthetic_xenium``'s H&E options (rotation, mirror, recorded pixel size,
smooth deformation, no alignment CSV); ``truth_he.json`` and ``truth.parquet`` give the true geometry.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _he_images import altered_he

import cellsymphony as cs
from cellsymphony.datasets._tissue import Deformation

N_CELLS = 3000
SEED = 3
CASES = {  # name: synthetic_xenium H&E options
    "rot137_flip_mpp0.35": {"he_rotation": 137.0, "he_flip": True, "he_mpp": 0.35, "he_alignment": False},
    "rot250_mpp0.22": {"he_rotation": 250.0, "he_mpp": 0.22},
    "rot200_flip_nompp": {"he_rotation": 200.0, "he_flip": True, "he_record_mpp": False, "he_alignment": False},
    "rot37_mpp_30pc_off": {"he_rotation": 37.0, "he_record_mpp": 0.2738 * 1.3, "he_alignment": False},
    "deformed": {"he_rotation": 70.0, "he_deformation_um": 10.0, "he_deformation_wavelength_um": 500.0,
                 "he_alignment": False},
}
_BUNDLES: dict = {}


def bundle(tmp_path_factory, name: str = "rot250_mpp0.22", seed: int = SEED) -> Path:
    """A synthetic section with the H&E options of ``CASES[name]``, generated once per session."""
    key = (name, seed)
    if key not in _BUNDLES:
        out = tmp_path_factory.mktemp(f"{name}_s{seed}")
        cs.datasets.synthetic_xenium(out, n_cells=N_CELLS, seed=seed, transcripts=False, reference_cells=0,
                                     overwrite=True, **CASES.get(name, {}))
        _BUNDLES[key] = out
    return _BUNDLES[key]


def he_of(folder: Path) -> Path:
    return next(folder.glob("*_he_image.ome.tif"))


@cache
def truth(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell ids, each nucleus' H&E level-0 pixel, and where the true geometry puts that pixel (um)."""
    tr = pd.read_parquet(folder / "truth.parquet")
    geo = json.loads((folder / "truth_he.json").read_text())
    px = tr[["he_x", "he_y"]].to_numpy(np.float64)
    um = (np.c_[px, np.ones(len(px))] @ np.asarray(geo["alignment"]).T)[:, :2] * geo["pixel_size"]
    if geo["deformation"] is not None:
        d = geo["deformation"]
        field = Deformation(d["amplitude_um"], d["wavelength_um"], np.asarray(d["phases"]))
        um = um + np.stack(field(um[:, 0], um[:, 1]), axis=1)
    return tr["cell_id"].astype(str).to_numpy(), px, um


def truth_error(reg: cs.io.Registration, folder: Path) -> np.ndarray:
    """Per cell: distance (um) between where the registration and the true geometry put its H&E nucleus."""
    _, px, um = truth(folder)
    return np.hypot(*(reg.to_um(px) - um).T)


_REGS: dict = {}


def register(folder: Path, he: Path | None = None, **kw) -> cs.io.Registration:
    key = (str(folder), str(he), tuple(sorted(kw.items())))
    if key not in _REGS:
        _REGS[key] = cs.io.register_he(folder, he or he_of(folder), **kw)
    return _REGS[key]


@pytest.mark.parametrize("name", ["rot137_flip_mpp0.35", "rot250_mpp0.22"])
def test_any_rotation_flip_and_scale(tmp_path_factory, name):
    folder = bundle(tmp_path_factory, name)
    assert not CASES[name].get("he_alignment", True) or any(folder.glob("*he_imagealignment.csv"))
    reg = register(folder)
    qc = reg.qc
    for key in ("n_matched", "median_um", "p95_um", "inlier_fraction", "scale_um_per_px", "ok"):
        assert key in qc
    assert qc["ok"] is True, reg.summary()
    assert qc["flipped"] is CASES[name].get("he_flip", False)
    assert qc["angle_deg"] % 360 == pytest.approx(CASES[name]["he_rotation"] % 360, abs=0.2)
    assert qc["scale_um_per_px"] == pytest.approx(CASES[name]["he_mpp"], rel=0.003)
    assert qc["scale_estimated"] is False
    err = truth_error(reg, folder)
    assert np.median(err) <= 0.5 and np.percentile(err, 95) <= 1.5, (np.median(err), np.percentile(err, 95))
    assert reg.alignment.shape == (3, 3) and np.allclose(reg.alignment[2], [0, 0, 1])
    res = reg.residuals
    assert {"cell_id", "dx_um", "dy_um"} <= set(res.columns)
    assert len(res) == qc["n_matched"] and res["cell_id"].isin(truth(folder)[0]).all()
    assert reg.nonrigid is None


def test_scale_measured_without_pixel_size(tmp_path_factory):
    folder = bundle(tmp_path_factory, "rot200_flip_nompp")
    with pytest.raises(ValueError, match="records no pixel size"):
        cs.io.read_he(he_of(folder))
    reg = register(folder)
    assert reg.qc["ok"], reg.summary()
    assert reg.qc["scale_estimated"] is True and reg.qc["mpp_source"] == "estimated"
    assert np.isnan(reg.qc["mpp_recorded"])
    assert reg.qc["scale_um_per_px"] == pytest.approx(0.2738, rel=0.003)
    assert reg.he_mpp == pytest.approx(reg.qc["scale_um_per_px"])
    assert "scale estimated" in reg.summary()
    assert np.median(truth_error(reg, folder)) <= 0.5


def test_scale_measured_when_pixel_size_is_wrong(tmp_path_factory):
    folder = bundle(tmp_path_factory, "rot37_mpp_30pc_off")
    reg = register(folder)
    assert reg.qc["ok"], reg.summary()
    assert reg.qc["mpp_source"] == "file" and reg.qc["scale_estimated"] is False
    assert reg.qc["scale_ratio"] == pytest.approx(1 / 1.3, rel=0.005)
    assert np.median(truth_error(reg, folder)) <= 0.5


def test_nonrigid_corrects_smooth_deformation(tmp_path_factory):
    folder = bundle(tmp_path_factory, "deformed")
    rigid = register(folder)
    err_rigid = truth_error(rigid, folder)
    assert np.median(err_rigid) > 3.0
    assert not rigid.qc["ok"] and "nonrigid=True" in rigid.qc["reason"]
    reg = register(folder, nonrigid=True)
    assert reg.qc["ok"], reg.summary()
    err = truth_error(reg, folder)
    assert np.median(err) <= 1.0, np.median(err)
    assert reg.nonrigid is not None and reg.nonrigid["grid_um"].ndim == 3
    assert 5.0 < reg.qc["nonrigid_max_um"] < 20.0
    assert reg.qc["affine_median_um"] > 2 * reg.qc["median_um"]


@pytest.mark.parametrize(("kind", "kw", "shift"), [
    ("left45", {"keep_left": 0.45}, 0),  # the H&E shows less than the Xenium field
    ("bordered", {"pad_px": 3000}, 3000),  # the H&E shows much more (a wide slide border)
])
def test_he_covering_less_or_more_than_the_section(tmp_path_factory, kind, kw, shift):
    folder = bundle(tmp_path_factory)
    reg = register(folder, altered(tmp_path_factory, kind, **kw))
    assert reg.qc["ok"], reg.summary()
    _, px, um = truth(folder)
    err = np.hypot(*(reg.to_um(px + shift) - um).T)
    inside = px[:, 0] < 0.45 * he_width(folder) if kind == "left45" else np.ones(len(px), bool)
    assert np.median(err[inside]) <= 0.5 and np.percentile(err[inside], 95) <= 1.5


def he_width(folder: Path) -> int:
    with cs.io.read_he(he_of(folder)) as he:
        return he.shapes[0][1]


# ---------------------------------------------------------------------------------------------- failures
_ALTERED: dict = {}


def altered(tmp_path_factory, kind: str, **kw) -> Path:
    """The plain case's H&E (rotated 250 degrees, 0.22 um/px) blank, blurred, RGBA or grey; once per session."""
    if kind not in _ALTERED:
        src = he_of(bundle(tmp_path_factory))
        _ALTERED[kind] = altered_he(src, tmp_path_factory.mktemp(kind) / f"{kind}_he_image.ome.tif", mpp=0.22, **kw)
    return _ALTERED[kind]


def _assert_failed(reg, tmp_path):
    assert reg.qc["ok"] is False
    assert reg.qc["reason"]
    out = tmp_path / "alignment.csv"
    with pytest.raises(ValueError, match="failed its QC"):
        reg.write_csv(out)
    assert not out.exists()


def test_blank_image_fails(tmp_path_factory, tmp_path):
    reg = register(bundle(tmp_path_factory), altered(tmp_path_factory, "blank", blank=True))
    _assert_failed(reg, tmp_path)
    assert "nuclei" in reg.qc["reason"]


def test_out_of_focus_image_fails(tmp_path_factory, tmp_path):
    blurred = altered(tmp_path_factory, "blurred", blur_um=5.0)
    _assert_failed(register(bundle(tmp_path_factory), blurred), tmp_path)


def test_another_section_fails(tmp_path_factory, tmp_path):
    """The H&E of another section of the same tissue model (another seed), in the same orientation."""
    other = bundle(tmp_path_factory, "rot250_mpp0.22", seed=SEED + 6)
    reg = register(bundle(tmp_path_factory), he_of(other))
    _assert_failed(reg, tmp_path)


def test_another_tissue_fails(shared_data, tmp_path_factory, tmp_path):
    reg = register(bundle(tmp_path_factory), shared_data / "he" / "cmu_small_region.svs")
    _assert_failed(reg, tmp_path)
    assert "nonrigid" not in reg.qc["reason"]


def test_failed_registration_is_not_applied(tmp_path_factory):
    folder = bundle(tmp_path_factory)
    blank = altered(tmp_path_factory, "blank", blank=True)
    reg = register(folder, blank)
    mdata = cs.io.read_xenium(folder, he_image=False)
    with pytest.raises(ValueError, match="failed its QC"):
        reg.apply(mdata)
    assert mdata.uns["cellsymphony"]["samples"]["synthetic"]["he_path"] == ""
    assert "registration_error_um" not in mdata["rna"].obs
    assert "he_registration" not in mdata.uns
    with pytest.raises(ValueError, match=r"failed its QC \(ok=False, n_matched=.*median_um="):
        cs.io.read_xenium(folder, he_image=blank, he_alignment="auto")


# ---------------------------------------------------------------------------------------------- outputs
def test_csv_round_trip_and_apply_match_read_xenium(tmp_path_factory, tmp_path):
    folder = bundle(tmp_path_factory, "rot137_flip_mpp0.35")
    assert not list(folder.glob("*he_imagealignment.csv"))  # the H&E came without its alignment
    with pytest.raises(ValueError, match="he_alignment='auto'"):
        cs.io.read_xenium(folder)
    reg = register(folder)
    csv = reg.write_csv(tmp_path / "x_he_imagealignment.csv")
    assert np.allclose(np.loadtxt(csv, delimiter=","), reg.alignment, rtol=1e-9, atol=1e-9)
    with_csv = cs.io.read_xenium(folder, he_image=he_of(folder), he_alignment=csv)
    applied = cs.io.read_xenium(folder, he_image=False)
    reg.apply(applied)
    a = with_csv.uns["cellsymphony"]["samples"]["synthetic"]
    b = applied.uns["cellsymphony"]["samples"]["synthetic"]
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9)
        elif isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key])
        else:
            assert a[key] == b[key]
    np.testing.assert_array_equal(with_csv["morphology"].obs["in_image"], applied["morphology"].obs["in_image"])
    for mod in ("rna", "morphology"):
        err = applied[mod].obs["registration_error_um"].to_numpy()
        assert np.isfinite(err).mean() > 0.9
        assert np.nanmedian(err) < 0.5
    auto = cs.io.read_xenium(folder, he_alignment="auto")
    np.testing.assert_allclose(auto.uns["cellsymphony"]["samples"]["synthetic"]["alignment"], reg.alignment,
                               rtol=1e-6, atol=1e-6)
    assert auto.uns["he_registration"]["samples"]["synthetic"]["ok"]


def test_registration_error_follows_the_true_error(tmp_path_factory):
    """Rigid on a deformed section: the per-cell error estimate tracks where the affine is off."""
    folder = bundle(tmp_path_factory, "deformed")
    rigid = register(folder)
    mdata = cs.io.read_xenium(folder, he_image=False)
    rigid.apply(mdata, force=True)
    est = pd.Series(mdata.obs["registration_error_um"].to_numpy(), index=mdata.obs_names)
    ids, _, _ = truth(folder)
    true = pd.Series(truth_error(rigid, folder), index=ids).reindex(est.index)
    ok = est.notna().to_numpy()
    assert ok.mean() > 0.5
    assert np.corrcoef(est[ok], true[ok])[0, 1] > 0.6


def test_nonrigid_registry_survives_h5mu(tmp_path_factory, tmp_path):
    import mudata

    from cellsymphony._registration import he_px_to_um, registry_warp, um_to_he_px

    folder = bundle(tmp_path_factory, "deformed")
    reg = register(folder, nonrigid=True)
    mdata = cs.io.read_xenium(folder, he_image=False)
    reg.apply(mdata)
    mdata.write(tmp_path / "x.h5mu")
    back = mudata.read_h5mu(tmp_path / "x.h5mu")
    entry = back.uns["cellsymphony"]["samples"]["synthetic"]
    assert set(entry["nonrigid"]) == {"grid_um", "origin_px", "step_px"}
    np.testing.assert_allclose(entry["nonrigid"]["grid_um"], reg.nonrigid["grid_um"])
    res = back.uns["he_registration"]["samples"]["synthetic"]["residuals"]
    assert isinstance(res, pd.DataFrame) and len(res) == reg.qc["n_matched"]
    # the registry's mapping (used by the patch reader and label transfer) is the non-rigid one
    warp = registry_warp(entry)
    _, px, um = truth(folder)
    err = np.hypot(*(he_px_to_um(px, entry["alignment"], entry["pixel_size"], warp) - um).T)
    assert np.median(err) <= 1.0
    back_px = um_to_he_px(he_px_to_um(px[:50], entry["alignment"], entry["pixel_size"], warp),
                          entry["alignment"], entry["pixel_size"], warp)
    np.testing.assert_allclose(back_px, px[:50], atol=0.01)


def test_patch_reader_and_label_transfer_use_the_nonrigid_field(tmp_path_factory):
    deformed = bundle(tmp_path_factory, "deformed")
    # the same tissue (same seed) under a plain similarity, read with its true alignment CSV
    reference = cs.io.read_xenium(bundle(tmp_path_factory, "rot250_mpp0.22"))
    cells = np.arange(0, N_CELLS, 30)
    want = cs.pp.cell_patches(reference, cells=cells, size=32, mpp=0.5).astype(np.float64)

    def mismatch(reg) -> float:
        mdata = cs.io.read_xenium(deformed, he_image=False)
        reg.apply(mdata, force=True)
        got = cs.pp.cell_patches(mdata, cells=cells, size=32, mpp=0.5).astype(np.float64)
        return float(np.median(np.abs(got - want)))

    nonrigid = register(deformed, nonrigid=True)
    assert mismatch(nonrigid) < 0.6 * mismatch(register(deformed))

    # label transfer through the registry: H&E nuclei in the deformed image's pixels land on their cells
    ids, px, _ = truth(deformed)
    mdata = cs.io.read_xenium(deformed, he_image=False)
    nonrigid.apply(mdata)
    cs.pp.transfer_nucleus_labels(mdata, pd.DataFrame({"x": px[:, 0], "y": px[:, 1], "class": ids}),
                                  max_distance_um=3.0)
    labels = mdata.obs["he_label"].astype(object)
    assert (labels.to_numpy() == mdata.obs_names.to_numpy()).mean() > 0.95


# ---------------------------------------------------------------------------------------------- inputs
def test_nuclei_file_with_missing_spurious_nuclei_and_foreign_ids(tmp_path_factory, tmp_path):
    folder = bundle(tmp_path_factory, "rot137_flip_mpp0.35")
    _, px, _ = truth(folder)
    rng = np.random.default_rng(0)
    keep = rng.random(len(px)) > 0.2  # 20 % missing
    spurious = rng.uniform(px.min(axis=0), px.max(axis=0), (len(px) // 5, 2))  # 20 % spurious
    xy = np.r_[px[keep] + rng.normal(0, 1.0, (keep.sum(), 2)), spurious]
    table = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "cell_id": [f"he{i}" for i in range(len(xy))]})
    table.to_csv(tmp_path / "nuclei.csv", index=False)
    reg = cs.io.register_he(folder, he_of(folder), nuclei=tmp_path / "nuclei.csv")
    assert reg.qc["ok"], reg.summary()
    assert reg.qc["n_windows"] == 0  # no detection: the file's nuclei
    err = truth_error(reg, folder)
    assert np.median(err) <= 0.5 and np.percentile(err, 95) <= 1.5
    with pytest.raises(ValueError, match="outside the H&E image"):
        cs.io.register_he(folder, he_of(folder), nuclei=pd.DataFrame({"x": xy[:, 0] + 1e6, "y": xy[:, 1]}))


def test_without_dapi_image_falls_back_to_nuclei(tmp_path_factory, tmp_path):
    src = bundle(tmp_path_factory, "rot137_flip_mpp0.35")
    folder = tmp_path / "xenium"
    folder.mkdir()
    for f in ("experiment.xenium", "cells.parquet", "cell_feature_matrix.h5", "nucleus_boundaries.parquet"):
        (folder / f).symlink_to(src / f)
    reg = cs.io.register_he(folder, he_of(src))
    assert reg.qc["coarse_source"] == "nuclei"
    assert reg.qc["ok"], reg.summary()
    assert np.median(truth_error(reg, src)) <= 0.5


def test_mudata_input_and_rgba_image(tmp_path_factory):
    folder = bundle(tmp_path_factory)
    mdata = cs.io.read_xenium(folder, he_image=False)
    reg = cs.io.register_he(mdata, altered(tmp_path_factory, "rgba", mode="rgba"))
    assert reg.sample == "synthetic" and reg.qc["nucleus_source"] == "mudata"
    assert reg.qc["ok"], reg.summary()
    assert np.median(truth_error(reg, folder)) <= 0.5


def test_one_channel_image_registers_or_fails_honestly(tmp_path_factory):
    folder = bundle(tmp_path_factory)
    reg = register(folder, altered(tmp_path_factory, "grey", mode="grey"))
    if reg.qc["ok"]:
        assert np.median(truth_error(reg, folder)) <= 0.5
    else:
        assert reg.qc["reason"]


def test_bad_arguments(tmp_path_factory, tmp_path):
    folder = bundle(tmp_path_factory)
    with pytest.raises(FileNotFoundError):
        cs.io.register_he(tmp_path / "missing", he_of(folder))
    with pytest.raises(ValueError, match="max_windows"):
        cs.io.register_he(folder, he_of(folder), max_windows=0)
    with pytest.raises(ValueError, match="he_mpp"):
        cs.io.register_he(folder, he_of(folder), he_mpp=-1.0)
    with pytest.raises(ValueError, match="he_image=False"):
        cs.io.read_xenium(folder, he_image=False, he_alignment="auto")


# ---------------------------------------------------------------------------------------------- figure, CLI
def test_qc_figure_of_a_registration_and_of_the_applied_mudata(tmp_path_factory, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = bundle(tmp_path_factory, "rot137_flip_mpp0.35")
    reg = register(folder)
    fig = reg.plot(save=tmp_path / "qc.png")
    titles = [ax.get_title() for ax in fig.axes]
    for zoom in ("section", "region", "cells"):
        assert f"DAPI (green) over H&E: {zoom}" in titles
    assert any(t.startswith("residual map") for t in titles) and "QC: ok" in titles
    assert (tmp_path / "qc.png").stat().st_size > 10_000
    section = next(ax for ax in fig.axes if ax.get_title().endswith("section")).images[0].get_array()
    assert section.shape[0] > 100
    plt.close(fig)
    mdata = cs.io.read_xenium(folder, he_image=False)
    reg.apply(mdata)
    fig = cs.pl.registration(mdata)
    assert "QC: ok" in [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    fig = register(bundle(tmp_path_factory), altered(tmp_path_factory, "blank", blank=True)).plot()
    assert "QC: FAILED" in [ax.get_title() for ax in fig.axes]
    plt.close(fig)


def test_command_line_register(tmp_path_factory, tmp_path, capsys):
    from cellsymphony import __main__ as cli

    folder = bundle(tmp_path_factory, "rot137_flip_mpp0.35")
    out = tmp_path / "alignment.csv"
    code = cli.main(["register", "--xenium", str(folder), "--he", str(he_of(folder)), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ok: True" in printed and "median_um:" in printed
    np.testing.assert_allclose(np.loadtxt(out, delimiter=","), register(folder).alignment, rtol=1e-6, atol=1e-6)
    # an existing --out is a usage error; a failed registration exits 1 and writes nothing but the figure
    assert cli.main(["register", "--xenium", str(folder), "--he", str(he_of(folder)), "--out", str(out)]) == 2
    capsys.readouterr()
    bad, fig = tmp_path / "bad.csv", tmp_path / "bad.png"
    blank = altered(tmp_path_factory, "blank", blank=True)
    code = cli.main(["register", "--xenium", str(folder), "--he", str(blank), "--out", str(bad), "--figure", str(fig)])
    captured = capsys.readouterr()
    assert code == 1 and "ok: False" in captured.out and "nothing written" in captured.err
    assert not bad.exists() and fig.exists()


def test_report_has_the_registration_section(tmp_path_factory, tmp_path):
    from cellsymphony._report import write_report

    folder = bundle(tmp_path_factory, "rot137_flip_mpp0.35")
    mdata = cs.io.read_xenium(folder, he_image=False)
    register(folder).apply(mdata)
    page = write_report(mdata, tmp_path, settings_note="test").read_text()
    assert "H&amp;E registration" in page or "H&E registration" in page
    assert (tmp_path / "figures" / "he_registration_synthetic.png").is_file()
    assert "median_um" in page
