"""The handcrafted encoder by bands (pp/_handcrafted_bands.py, HandcraftedEncoder.features_of_windows /
features_in_band) against the per-cell definition (HandcraftedEncoder.__call__ on per-cell patches)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import cellsymphony as cs
from cellsymphony.models.encoders._handcrafted import HandcraftedEncoder
from cellsymphony.pp._handcrafted_bands import (
    BAND_PX,
    band_chunks,
    band_index,
    handcrafted_by_band,
    warp_windows,
)
from cellsymphony.pp._morphology_runner import embed_cells
from cellsymphony.pp._patch_source import cell_centres, sample_sources

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_CELLS = 300
#: the nucleus shape ratios, the features a watershed tie can move (see the first test)
SHAPE = {"nucleus_eccentricity", "nucleus_solidity", "nucleus_extent", "nucleus_circularity"}


@pytest.fixture(scope="module")
def section():
    cs.settings.progress = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cs.datasets.synthetic(n_cells=N_CELLS, seed=0)
    mod = m["morphology"]
    [(src, _)] = sample_sources(m, mod, np.arange(mod.n_obs), None)
    xy = cell_centres(mod)
    inside = src.in_image(xy)
    return m, src, xy, inside


@pytest.fixture(scope="module")
def per_cell(section):
    """Today's per-cell path: one resampled 64 px patch per cell, scikit-image on each."""
    _, src, xy, inside = section
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_cells(HandcraftedEncoder(0.5), src, xy[inside], mode="cell", size=64, mpp=0.5, batch_size=64, exact=True)


def _correlations(a: np.ndarray, b: np.ndarray, names) -> dict:
    out = {}
    for j, name in enumerate(names):
        if a[:, j].std() > 0:
            out[name] = float(np.corrcoef(a[:, j], b[:, j])[0, 1])
    return out


def test_embed_morphology_by_band_matches_the_per_cell_features(section, per_cell):
    m, _, _, inside = section
    m = m.copy()
    cs.pp.embed_morphology(m, model="handcrafted")
    band = m["morphology"].obsm["X_handcrafted"][inside]
    names = list(m["morphology"].uns["X_handcrafted"]["feature_names"])
    corr = _correlations(per_cell, band, names)
    assert len(corr) >= 40  # every feature that varies is compared
    # the shape ratios move where a nucleus has two equally high distance peaks: scikit-image's watershed lets
    # them flood in an order set by its heap, which holds the peaks of every object of the per-cell patch (also
    # those its edge cuts); the compiled watershed takes them in raster order (a few cells in 300 here)
    low = {k: round(v, 4) for k, v in corr.items() if v < (0.97 if k in SHAPE else 0.99)}
    assert not low, f"features below their correlation with the per-cell path: {low}"
    found = names.index("nucleus_found")
    assert (band[:, found] == per_cell[:, found]).mean() >= 0.99
    params = m["morphology"].uns["X_handcrafted"]["params"]
    assert params["band_px"] == BAND_PX  # recorded (and part of the cache fingerprint)


def test_chunks_and_workers_do_not_change_the_values(section):
    m, _, _, _ = section
    m = m.copy()
    cs.pp.embed_morphology(m, model="handcrafted", key_added="whole")
    cs.pp.embed_morphology(m, model="handcrafted", chunk_size=40, num_workers=2, key_added="parts")
    np.testing.assert_array_equal(m["morphology"].obsm["whole"], m["morphology"].obsm["parts"])


def test_band_chunks_are_whole_bands_in_serpentine_order(section):
    _, _, xy, inside = section
    pts = xy[inside]
    chunks = band_chunks(pts, mpp=0.5, chunk_size=60)
    rows = np.concatenate(chunks)
    assert np.array_equal(np.sort(rows), np.arange(len(pts)))  # every cell once
    band_of = band_index(pts, mpp=0.5)
    owner = {}
    for c, r in enumerate(chunks):
        for b in map(tuple, band_of[r]):
            assert owner.setdefault(b, c) == c  # a band is never split between chunks
    assert max(len(r) for r in chunks) <= max(60, max(np.unique(band_of, axis=0, return_counts=True)[1]))


def test_warp_windows_are_the_per_cell_patches(section):
    _, src, xy, inside = section
    pts = xy[inside][:80]
    level = src.level_for(0.5)
    a = src.read(pts, size=64, mpp=0.5, level=level)
    b = warp_windows(src, pts, size=64, mpp=0.5, level=level)
    diff = np.abs(a.astype(int) - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding of the sampling positions only


def test_vectorised_windows_equal_scikit_image_on_the_same_pixels(section, per_cell):
    _, src, xy, inside = section
    enc = HandcraftedEncoder(0.5)
    ref = per_cell  # scikit-image on each of these very patches
    got = enc.features_of_windows(src.read(xy[inside], size=64, mpp=0.5))
    same_rows = np.isclose(ref, got, rtol=1e-5, atol=1e-6).all(axis=1)
    assert same_rows.mean() >= 0.97
    # the rest differ in the watershed split of a nucleus between equally high peaks (see above)
    corr = _correlations(ref, got, enc.feature_names)
    assert min(v for k, v in corr.items() if k not in SHAPE) >= 0.99
    assert min(corr[k] for k in SHAPE) >= 0.97


def test_features_in_band_cut_on_the_band_lattice(section):
    _, src, xy, inside = section
    enc = HandcraftedEncoder(0.5)
    pts = xy[inside]
    centre = np.median(pts, axis=0)
    side = 320
    band = src.read(centre[None], size=side, mpp=0.5)[0]
    pos = (pts - (centre - side * 0.5 / 2)) / 0.5
    keep = ((pos > 34) & (pos < side - 34)).all(axis=1)
    pos = pos[keep]
    u0 = np.floor(pos - 32 + 0.5).astype(int)
    windows = np.stack([band[v : v + 64, u : u + 64] for u, v in u0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = enc(windows)  # the definition on the very windows cut from the band
    got = enc.features_in_band(band, pos)
    assert np.isclose(ref, got, rtol=1e-5, atol=1e-6).all(axis=1).mean() >= 0.95
    assert min(_correlations(ref, got, enc.feature_names).values()) >= 0.99


def test_bad_input_is_named():
    enc = HandcraftedEncoder(0.5)
    band = np.full((100, 100, 3), 255, np.uint8)
    with pytest.raises(ValueError, match="64 px window must lie inside the 100 x 100 px band"):
        enc.features_in_band(band, np.array([[10.0, 50.0]]))
    with pytest.raises(ValueError, match="uint8 band image"):
        enc.features_in_band(band.astype(float), np.array([[50.0, 50.0]]))
    with pytest.raises(ValueError, match="uint8 patches"):
        enc.features_of_windows(np.zeros((2, 64, 64), np.uint8))
    assert enc.features_of_windows(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, enc.embed_dim)


def test_off_image_rows_are_nan(section):
    _, src, xy, inside = section
    pts = np.vstack([xy[inside][:3], [[np.nan, np.nan]]])
    out = handcrafted_by_band(HandcraftedEncoder(0.5), src, pts, size=64, mpp=0.5)
    assert np.isfinite(out[:3]).all() and np.isnan(out[3]).all()
