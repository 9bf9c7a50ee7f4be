"""cs.pp.transfer_nucleus_labels: matching, registration QC and refinement on constructed tissue."""

from __future__ import annotations

import json

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import cellsymphony as cs
from cellsymphony._registration import he_px_to_um, um_to_he_px

PIXEL_SIZE = 0.2125  # um per Xenium morphology pixel
HE_MPP = 0.2738  # um per H&E pixel
CLASSES = np.array(["fibroblast", "lymphocyte", "tumour"])


def true_alignment(angle_deg: float = 20.0) -> np.ndarray:
    """H&E pixel -> morphology pixel: rotation, scale he_mpp / pixel_size, translation."""
    th = np.deg2rad(angle_deg)
    s = HE_MPP / PIXEL_SIZE
    a = np.eye(3)
    a[:2, :2] = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    a[:2, 2] = [1500.0, -300.0]
    return a


def make_tissue(n_side: int = 30, spacing: float = 12.0, seed: int = 0, samples=("s1",)) -> tuple[md.MuData, np.ndarray]:
    """Cells on a jittered grid (um) and their true classes; registry with the true alignment."""
    rng = np.random.default_rng(seed)
    frames, truths = [], []
    for sample in samples:
        g = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * spacing
        xy = g + 100.0 + rng.uniform(-2.5, 2.5, g.shape)
        ids = [f"{sample}-{i}" for i in range(len(xy))]
        frames.append((ids, xy, sample))
        truths.append(CLASSES[rng.integers(0, 3, len(xy))])
    ids = sum((f[0] for f in frames), [])
    xy = np.concatenate([f[1] for f in frames])
    obs = pd.DataFrame({"sample": pd.Categorical(np.concatenate([[f[2]] * len(f[0]) for f in frames]))}, index=ids)
    rna = ad.AnnData(sparse.csr_matrix((len(ids), 5), dtype=np.float32), obs=obs.copy())
    rna.var_names = [f"G{i}" for i in range(5)]
    morph = ad.AnnData(np.zeros((len(ids), 0), dtype=np.float32), obs=obs.copy())
    for a in (rna, morph):
        a.obsm["spatial"] = xy + rng.normal(0, 1.0, xy.shape)
        a.obsm["nucleus_centroid"] = xy.copy()
    mdata = md.MuData({"rna": rna, "morphology": morph})
    mdata.uns["cellsymphony"] = {
        "samples": {
            s: {"he_path": "", "alignment": true_alignment(), "pixel_size": PIXEL_SIZE, "he_mpp": HE_MPP, "xenium_path": ""}
            for s in samples
        }
    }
    return mdata, np.concatenate(truths)


def make_nuclei(mdata, truth, *, shift_um=(0.0, 0.0), noise_um=0.3, miss=0.1, dup=0.05, seed=1, sample=None):
    """H&E nucleus table in H&E pixels of the true registration, with a known offset and errors."""
    rng = np.random.default_rng(seed)
    rna = mdata["rna"]
    keep = np.ones(rna.n_obs, bool) if sample is None else (rna.obs["sample"] == sample).to_numpy()
    xy = rna.obsm["nucleus_centroid"][keep]
    lab = truth[keep]
    xy = xy + np.asarray(shift_um) + rng.normal(0, noise_um, xy.shape)
    present = rng.random(len(xy)) >= miss
    xy, lab = xy[present], lab[present]
    n_dup = int(dup * len(xy))
    pick = rng.choice(len(xy), n_dup, replace=False)
    xy = np.concatenate([xy, xy[pick] + rng.normal(0, 2.0, (n_dup, 2))])
    lab = np.concatenate([lab, lab[pick]])
    px = um_to_he_px(xy, true_alignment(), PIXEL_SIZE)
    return pd.DataFrame({"x": px[:, 0], "y": px[:, 1], "class": lab, "probability": rng.uniform(0.5, 1, len(lab))})


@pytest.fixture(scope="module")
def tissue():
    return make_tissue()


def test_transfer_matches_and_qc(tissue, tmp_path):
    mdata, truth = tissue
    nuclei = make_nuclei(mdata, truth)
    out = cs.pp.transfer_nucleus_labels(mdata, nuclei, copy=True)
    assert out is not None and "he_label" not in mdata.obs  # copy leaves the input alone
    lab = out.obs["he_label"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    matched = lab.notna().to_numpy()
    # ~10% of nuclei are missed: those cells stay unlabelled
    assert 0.82 < matched.mean() < 0.95
    assert (lab[matched].astype(str).to_numpy() == truth[matched]).mean() > 0.97
    stats = out.uns["he_label"]["samples"]["s1"]
    assert stats["n_matched"] == matched.sum()
    assert stats["n_nuclei"] == len(nuclei)
    # no systematic shift: offsets centred on zero, distances at the noise level
    np.testing.assert_allclose(stats["mean_offset_um"], [0, 0], atol=0.1)
    assert stats["median_um"] < 0.6
    assert stats["registration_ok"]
    assert np.nanmax(out.obs["he_label_distance"]) <= 5.0
    assert out.obs["he_label_probability"].notna().sum() == matched.sum()
    path = tmp_path / "t.h5mu"
    out.write(path)
    back = md.read_h5mu(path)
    pd.testing.assert_series_equal(back.obs["he_label"].astype(str), out.obs["he_label"].astype(str))
    np.testing.assert_allclose(back.uns["he_label"]["samples"]["s1"]["mean_offset_um"], stats["mean_offset_um"])
    assert back.uns["he_label"]["params"]["space"] == "he_px"
    assert list(back.uns["he_label"]["samples"]["s1"]["label_counts"]["label"]) == list(stats["label_counts"]["label"])


def test_qc_measures_known_shift_and_refinement_recovers_it(tissue, tmp_path, caplog):
    mdata, truth = tissue
    mdata = mdata.copy()
    shift = np.array([2.5, -1.8])
    nuclei = make_nuclei(mdata, truth, shift_um=shift, noise_um=0.3)
    with pytest.warns(UserWarning, match="registration of sample 's1' looks off"):
        cs.pp.transfer_nucleus_labels(mdata, nuclei)
    stats = mdata.uns["he_label"]["samples"]["s1"]
    # offset = cell - H&E nucleus = -shift (matching within 5 um keeps almost all true pairs)
    np.testing.assert_allclose(stats["mean_offset_um"], -shift, atol=0.15)
    assert stats["median_um"] == pytest.approx(np.hypot(*shift), abs=0.3)
    assert not stats["registration_ok"]

    before = mdata.uns["cellsymphony"]["samples"]["s1"]["alignment"].copy()
    cs.pp.transfer_nucleus_labels(mdata, nuclei, refine="shift")
    stats = mdata.uns["he_label"]["samples"]["s1"]
    ref = stats["refinement"]
    assert ref["applied"]
    np.testing.assert_allclose(ref["correction_um"][:2, 2], -shift, atol=0.1)
    np.testing.assert_allclose(ref["qc_before"]["mean_offset_um"], -shift, atol=0.15)
    assert stats["median_um"] < 0.6 and stats["registration_ok"]
    np.testing.assert_allclose(stats["mean_offset_um"], [0, 0], atol=0.05)
    after = mdata.uns["cellsymphony"]["samples"]["s1"]["alignment"]
    np.testing.assert_allclose(ref["alignment_before"], before)
    np.testing.assert_allclose(ref["alignment_after"], after)
    # the refined registry maps each H&E nucleus onto its shifted-back position
    px = nuclei[["x", "y"]].to_numpy()[:5]
    np.testing.assert_allclose(
        he_px_to_um(px, after, PIXEL_SIZE), he_px_to_um(px, before, PIXEL_SIZE) - shift, atol=0.1
    )
    path = tmp_path / "r.h5mu"
    mdata.write(path)
    back = md.read_h5mu(path)
    np.testing.assert_allclose(back.uns["cellsymphony"]["samples"]["s1"]["alignment"], after)
    assert back.uns["he_label"]["samples"]["s1"]["refinement"]["kind"] == "shift"


def test_affine_refinement_recovers_rotation(tissue):
    mdata, truth = tissue
    mdata = mdata.copy()
    nuclei = make_nuclei(mdata, truth, noise_um=0.2, miss=0.0, dup=0.0)
    # registry off by a 0.6 degree rotation about the tissue centre plus a 1 um shift
    th = np.deg2rad(0.6)
    c = np.array([280.0, 280.0]) / PIXEL_SIZE
    rot = np.eye(3)
    rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    rot[:2, 2] = c - rot[:2, :2] @ c + np.array([1.0, 0.5]) / PIXEL_SIZE
    mdata.uns["cellsymphony"]["samples"]["s1"]["alignment"] = rot @ true_alignment()
    cs.pp.transfer_nucleus_labels(mdata, nuclei, qc_warn_um=10.0)
    p95_before = mdata.uns["he_label"]["samples"]["s1"]["p95_um"]
    assert p95_before > 2.0
    cs.pp.transfer_nucleus_labels(mdata, nuclei, refine="affine")
    stats = mdata.uns["he_label"]["samples"]["s1"]
    assert stats["p95_um"] < 0.6
    np.testing.assert_allclose(
        mdata.uns["cellsymphony"]["samples"]["s1"]["alignment"], true_alignment(), rtol=1e-3, atol=0.5
    )


def test_wrong_space_warns_with_rate_and_suggestion(tissue):
    mdata, truth = tissue
    nuclei = make_nuclei(mdata, truth)
    # no nucleus matches: an all-missing he_label is refused, with the hint (allow_empty=True writes it)
    with pytest.raises(ValueError, match=r"would be empty: .*match rate .*space='he_px'"):
        cs.pp.transfer_nucleus_labels(mdata, nuclei, space="um", copy=True)
    with pytest.warns(UserWarning, match=r"match rate .*space='he_px'"):
        out = cs.pp.transfer_nucleus_labels(mdata, nuclei, space="um", copy=True, allow_empty=True)
    assert out.uns["he_label"]["samples"]["s1"]["match_rate"] < 0.2
    # micrometre input is matched directly
    um = he_px_to_um(nuclei[["x", "y"]].to_numpy(), true_alignment(), PIXEL_SIZE)
    in_um = nuclei.assign(x=um[:, 0], y=um[:, 1])
    out = cs.pp.transfer_nucleus_labels(mdata, in_um, space="um", copy=True)
    assert out.uns["he_label"]["samples"]["s1"]["match_rate"] > 0.85
    # and the other way round: micrometres read as H&E pixels
    with pytest.raises(ValueError, match=r"look like space='um' \(with space='um' 9\d% would match"):
        cs.pp.transfer_nucleus_labels(mdata, in_um, copy=True)


def test_nuclei_files_csv_geojson_hovernet(tissue, tmp_path):
    mdata, truth = tissue
    nuclei = make_nuclei(mdata, truth, miss=0.0, dup=0.0).iloc[:200]
    expected = cs.pp.transfer_nucleus_labels(mdata, nuclei, copy=True).obs["he_label"].astype(str)

    csv = tmp_path / "nuclei.csv"
    nuclei.rename(columns={"x": "centroid_x", "y": "centroid_y", "class": "type"}).to_csv(csv, index=False)
    got = cs.pp.transfer_nucleus_labels(mdata, csv, x_key="centroid_x", y_key="centroid_y", label_key="type", copy=True)
    pd.testing.assert_series_equal(got.obs["he_label"].astype(str), expected)

    # QuPath-style: one Polygon feature per nucleus (a small square around the centroid), classification dict
    feats = []
    for px, py, cls in nuclei[["x", "y", "class"]].itertuples(index=False):
        ring = [[px - 4, py - 4], [px + 4, py - 4], [px + 4, py + 4], [px - 4, py + 4], [px - 4, py - 4]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "detection", "classification": {"name": cls, "color": [255, 0, 0]}}})
    gj = tmp_path / "nuclei.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    got = cs.pp.transfer_nucleus_labels(mdata, gj, copy=True)
    pd.testing.assert_series_equal(got.obs["he_label"].astype(str), expected)

    # CellViT-style: one MultiPoint feature per class
    feats = [{"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": g[["x", "y"]].to_numpy().tolist()},
              "properties": {"classification": {"name": cls}}} for cls, g in nuclei.groupby("class")]
    gj2 = tmp_path / "cellvit.geojson"
    gj2.write_text(json.dumps(feats))
    got = cs.pp.transfer_nucleus_labels(mdata, gj2, copy=True)
    pd.testing.assert_series_equal(got.obs["he_label"].astype(str), expected)

    # HoVer-Net JSON: classes are type numbers
    codes = {c: i + 1 for i, c in enumerate(CLASSES)}
    hv = {"mag": 40, "nuc": {str(i): {"centroid": [float(px), float(py)], "type": codes[cls], "type_prob": 0.9}
                             for i, (px, py, cls) in enumerate(nuclei[["x", "y", "class"]].itertuples(index=False))}}
    hvp = tmp_path / "hovernet.json"
    hvp.write_text(json.dumps(hv))
    got = cs.pp.transfer_nucleus_labels(mdata, hvp, copy=True)
    exp_codes = expected.map(lambda v: str(codes[v]) if v in codes else v)
    pd.testing.assert_series_equal(got.obs["he_label"].astype(str), exp_codes)


def test_multiple_samples_keep_each_others_labels():
    mdata, truth = make_tissue(n_side=12, samples=("a", "b"))
    with pytest.raises(ValueError, match="several samples"):
        cs.pp.transfer_nucleus_labels(mdata, make_nuclei(mdata, truth, sample="a"))
    cs.pp.transfer_nucleus_labels(mdata, make_nuclei(mdata, truth, sample="a"), sample="a")
    cs.pp.transfer_nucleus_labels(mdata, make_nuclei(mdata, truth, sample="b", seed=5), sample="b")
    in_a = (mdata.obs["rna:sample"] == "a").to_numpy()
    lab = mdata.obs["he_label"]
    assert lab[in_a].notna().mean() > 0.8 and lab[~in_a].notna().mean() > 0.8
    assert set(mdata.uns["he_label"]["samples"]) == {"a", "b"}


def test_bad_nuclei_input(tissue, tmp_path):
    mdata, truth = tissue
    nuclei = make_nuclei(mdata, truth)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['class'\]"):
        cs.pp.transfer_nucleus_labels(mdata, nuclei.drop(columns="class"))
    csv = tmp_path / "n.csv"
    nuclei.drop(columns="y").to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"n.csv lacks the column\(s\) \['y'\]"):
        cs.pp.transfer_nucleus_labels(mdata, csv)
    with pytest.raises(ValueError, match="does not exist"):
        cs.pp.transfer_nucleus_labels(mdata, tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="space='bogus' is not one of"):
        cs.pp.transfer_nucleus_labels(mdata, nuclei, space="bogus")
    with pytest.raises(ValueError, match="needs space='he_px'"):
        cs.pp.transfer_nucleus_labels(mdata, nuclei, space="um", refine="shift")
    bare = mdata.copy()
    del bare.uns["cellsymphony"]
    with pytest.raises(ValueError, match="space='um'"):
        cs.pp.transfer_nucleus_labels(bare, nuclei)
    assert "he_label" not in mdata.obs
