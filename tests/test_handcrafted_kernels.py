"""The compiled kernels of the handcrafted encoder (models/encoders/_handcrafted_kernels.py) against the numpy,
scipy and scikit-image calls they stand for."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from cellsymphony.models.encoders import _handcrafted_kernels as kern
from cellsymphony.models.encoders._handcrafted import HandcraftedEncoder, _hed_from_rgb, _optical_density


def _tissue(n: int, side: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 windows of dark blobs (nuclei, some touching, some cut by the edge) on a pale background."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, side, side, 3), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for k in range(n):
        stain = np.zeros((side, side))
        for _ in range(rng.integers(3, 9)):
            cy, cx = rng.uniform(-4, side + 4, 2)
            if _ == 0:
                cy, cx = side / 2 + rng.normal(0, 2, 2)
            ry, rx = rng.uniform(3, 9, 2)
            stain += np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** 2)
        stain = ndimage.gaussian_filter(np.clip(stain, 0, 1) + rng.normal(0, 0.05, stain.shape), 0.7)
        rgb = np.stack([230 - 170 * stain, 210 - 190 * stain, 235 - 100 * stain], axis=-1)
        out[k] = np.clip(rgb + rng.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)
    return out


def test_window_quantiles_equal_numpy_percentile():
    rng = np.random.default_rng(0)
    stack = np.concatenate([rng.normal(size=(5, 16, 16)), np.zeros((1, 16, 16)), rng.integers(0, 3, (2, 16, 16))])
    qs = np.array([0.0, 10.0, 30.0, 50.0, 90.0, 100.0])
    got = kern.window_quantiles(np.ascontiguousarray(stack, np.float64), qs)
    np.testing.assert_array_equal(got, np.percentile(stack.reshape(len(stack), -1), qs, axis=1).T)


def test_deconvolve_is_rgb2hed_grey_and_moments():
    from skimage.color import rgb2hed

    win = _tissue(6, side=32)
    n, s = win.shape[:2]
    hema, eosin, grey = (np.empty((n, s, s)) for _ in range(3))
    moments = np.empty((n, 5, 2))
    kern.deconvolve(win, _optical_density(), _hed_from_rgb(), hema, eosin, grey, moments)
    hed = rgb2hed(win)
    np.testing.assert_allclose(hema, hed[..., 0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(eosin, hed[..., 1], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(grey, 0.299 * win[..., 0] + 0.587 * win[..., 1] + 0.114 * win[..., 2])
    for j, ch in enumerate([hed[..., 0], hed[..., 1], *(win[..., c].astype(float) for c in range(3))]):
        np.testing.assert_allclose(moments[:, j, 0], ch.reshape(n, -1).mean(1), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(moments[:, j, 1], ch.reshape(n, -1).std(1), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("side", [64, 24])
def test_kernels_equal_scikit_image_per_window(side):
    """Nuclei, texture and stain columns of the compiled path equal scikit-image's on each window, except where
    two equally high peaks of one nucleus tie in the watershed (a few windows)."""
    enc = HandcraftedEncoder(0.5)
    win = _tissue(60, side=side, seed=side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = enc(win)
    got = enc.features_of_windows(win)
    same = np.isclose(ref, got, rtol=1e-5, atol=1e-6)
    assert same.all(axis=1).mean() >= 0.9
    names = np.array(enc.feature_names)
    nucleus = np.char.startswith(names, "nucleus_") | (names == "perinuclear_eosin_mean")
    assert same[:, ~nucleus].all(axis=1).mean() >= 0.98  # stain, colour, co-occurrence, LBP: float sums only
    assert (ref[:, 0] == got[:, 0]).all()  # a nucleus is found in the same windows
    assert ref[:, 0].mean() > 0.5


def test_degenerate_windows():
    """Flat, saturated and all-foreground windows: finite values, as scikit-image."""
    enc = HandcraftedEncoder(0.5)
    flat = np.full((2, 64, 64, 3), 255, np.uint8)
    dark = np.full((2, 64, 64, 3), 40, np.uint8)
    blob = np.full((2, 64, 64, 3), 230, np.uint8)
    blob[:, 2:62, 2:62] = (60, 20, 120)  # one object filling the window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for win in (flat, dark, blob):
            got = enc.features_of_windows(win)
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, enc(win), rtol=1e-5, atol=1e-6)
