"""scanpy and squidpy on mdata["rna"] as read: the H&E under the plots, joint results and counts on the modality."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from _export_data import _mdata, _pink_fraction, _render

from cellsymphony._joint import push_joint_obs


def test_squidpy_and_scanpy_plots_show_the_he():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    m = _mdata()
    rna = m["rna"]
    entry = rna.uns["spatial"]["synthetic"]
    assert entry["images"]["hires"].ndim == 3 and entry["images"]["lowres"].shape[2] == 3
    # the image pixel under a cell is the H&E pixel the alignment maps that cell to
    from cellsymphony._registration import um_to_he_px
    from cellsymphony.io import read_he

    reg = m.uns["cellsymphony"]["samples"]["synthetic"]
    he = read_he(reg["he_path"])
    s = entry["scalefactors"]["tissue_hires_scalef"]
    xy = rna.obsm["spatial"][::37]
    px = um_to_he_px(xy, reg["alignment"], reg["pixel_size"])
    lvl = he.best_level(1 / s)
    ds = he.downsamples[lvl]
    hires = entry["images"]["hires"].astype(float)
    diffs = [np.abs(hires[int(round(y * s)), int(round(x * s))]
                    - he.read_region(int(p[0] / ds), int(p[1] / ds), 1, 1, level=lvl)[0, 0]).mean()
             for (x, y), p in zip(xy, px, strict=True)]
    assert np.median(diffs) < 25

    figs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sq.pl.spatial_scatter(rna, color="cs_pred", img=True, figsize=(4, 3), dpi=80)
        figs["squidpy"] = _render(plt.gcf())
        sq.pl.spatial_scatter(rna, color="cs_pred", img=False, figsize=(4, 3), dpi=80)
        figs["squidpy_noimg"] = _render(plt.gcf())
        sc.pl.spatial(rna, color="cs_pred", show=False)
        figs["scanpy"] = _render(plt.gcf())
    assert _pink_fraction(figs["squidpy"]) > 0.02 and _pink_fraction(figs["squidpy_noimg"]) < 0.002
    assert _pink_fraction(figs["scanpy"]) > 0.02
    for img in figs.values():
        assert img.std() > 20


def test_graph_functions_on_the_modality_and_counts(tmp_path):
    import mudata as md
    import scanpy as sc
    import squidpy as sq

    m = _mdata()
    rna = m["rna"]
    assert list(rna.obs["cs_pred"].cat.categories) == ["large", "small"]
    sq.gr.spatial_neighbors(rna, coord_type="generic", n_neighs=6)
    sub = rna[rna.obs["cs_pred"].notna()].copy()
    sq.gr.nhood_enrichment(sub, cluster_key="cs_pred", n_perms=20, seed=0, show_progress_bar=False)
    assert sub.uns["cs_pred_nhood_enrichment"]["zscore"].shape == (2, 2)
    # re-run: the modalities follow
    m.obs["cs_pred"] = pd.Categorical(np.where(np.arange(m.n_obs) % 3, "p", "q"))
    push_joint_obs(m, ["cs_pred"])
    for mod in m.mod:
        assert (m[mod].obs["cs_pred"].astype(str).to_numpy() == m.obs["cs_pred"].astype(str).to_numpy()).all()
    for col in [c for c in m.obs.columns if c.endswith(":cs_pred")]:  # mudata's pulled copies agree too
        pd.testing.assert_series_equal(m.obs[col].astype(object), m.obs["cs_pred"].astype(object), check_names=False)
    m.write(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    assert (back["rna"].obs["cs_pred"].astype(str) == m.obs["cs_pred"].astype(str).to_numpy()).all()
    assert back["rna"].uns["spatial"]["synthetic"]["images"]["hires"].shape == rna.uns["spatial"]["synthetic"]["images"]["hires"].shape
    # raw counts survive an in-place normalisation
    before = rna.layers["counts"].copy()
    sc.pp.normalize_total(rna)
    assert (rna.layers["counts"] != before).nnz == 0 and not np.allclose(rna.X.sum(1), before.sum(1))
    assert (back["rna"].layers["counts"] != before).nnz == 0
