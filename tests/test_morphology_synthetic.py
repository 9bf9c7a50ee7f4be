"""Morphology on the synthetic Xenium tissue (read through cs.io.read_xenium): both modes, and patches
centred on the rendered nuclei (handcrafted nucleus measurements follow the generator's truth)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from morphology_helpers import one_torch_thread

import cellsymphony as cs

N_CELLS = 300


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic_morph")
    cs.datasets.synthetic_xenium(path, n_cells=N_CELLS, seed=0, transcripts=False, reference_cells=0, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = cs.io.read_xenium(path)
    truth = pd.read_parquet(path / "truth.parquet").set_index("cell_id")
    truth.index = truth.index.astype(str)
    return mdata, truth.loc[mdata.obs_names]


@pytest.fixture(autouse=True)
def _quiet():
    cs.settings.progress = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_patches_are_centred_on_rendered_nuclei(bundle):
    mdata, truth = bundle
    patches = cs.pp.cell_patches(mdata, cells=np.arange(60), size=64, mpp=0.5)
    dark = 255.0 - patches.astype(float).mean(axis=-1)
    centre = dark[:, 30:34, 30:34].mean(axis=(1, 2))
    assert np.median(centre - dark.mean(axis=(1, 2))) > 40  # nuclei (hematoxylin) at the centre


def test_handcrafted_follows_the_truth(bundle):
    full, truth = bundle
    mdata = full[:250].copy()  # enough cells for the rank correlations, half the time
    mdata.uns["cellsymphony"] = full.uns["cellsymphony"]
    truth = truth.iloc[:250]
    cs.pp.embed_morphology(mdata, model="handcrafted")
    x = mdata["morphology"].obsm["X_handcrafted"]
    names = list(mdata["morphology"].uns["X_handcrafted"]["feature_names"])
    found = x[:, names.index("nucleus_found")] == 1
    assert found.mean() > 0.9
    area = x[found, names.index("nucleus_area_um2")]
    elong = x[found, names.index("nucleus_major_axis_um")] / np.maximum(x[found, names.index("nucleus_minor_axis_um")], 1e-3)
    assert spearmanr(area, truth["nucleus_area"].to_numpy()[found]).statistic > 0.4
    assert spearmanr(elong, truth["nucleus_elongation"].to_numpy()[found]).statistic > 0.4


@pytest.mark.parametrize("mode", ["cell", "tile"])
def test_both_modes_on_the_synthetic_tissue(bundle, mode):
    mdata, _ = bundle
    cs.pp.embed_morphology(mdata, model="tiny", mode=mode, size=112, mpp=1.0, key_added=f"X_{mode}")
    x = mdata["morphology"].obsm[f"X_{mode}"]
    inside = mdata["morphology"].obs["in_image"].to_numpy()
    assert x.shape == (N_CELLS, 32) and np.isfinite(x[inside]).all()
    assert np.isnan(x[~inside]).all()
    assert "morphology:in_image" in mdata.obs
