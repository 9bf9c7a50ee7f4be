"""Both label sources on the synthetic tissue: SingleR against its reference, and its H&E classifier's nuclei."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

import cellsymphony as cs

# the H&E classifier of the synthetic bundle calls these four classes
HE_CLASS = {"fibroblast": "fibroblast", "T cell": "lymphocyte", "B cell": "lymphocyte",
            "tumour epithelium": "tumour", "normal epithelium": "other", "macrophage": "other", "endothelial": "other"}


@pytest.fixture(scope="module")
def bundle():
    if not hasattr(cs.io, "read_xenium"):
        pytest.skip("cs.io.read_xenium is not on this branch yet")
    mdata = cs.datasets.synthetic()
    (sample, reg), = mdata.uns["cellsymphony"]["samples"].items()
    folder = Path(reg["xenium_path"])
    truth = pd.read_parquet(folder / "truth.parquet")
    truth["cell_id"] = truth["cell_id"].astype(str)
    return mdata, sample, folder, truth.set_index("cell_id")


def test_singler_and_he_labels_on_synthetic_tissue(bundle, tmp_path):
    mdata, sample, folder, truth = bundle
    mdata = mdata.copy()
    truth = truth.reindex(mdata.obs_names)
    reference = ad.read_h5ad(folder / "reference.h5ad")

    cs.pp.annotate_singler(mdata, reference, ref_label_key="cell_type", ref_max_per_label=60)
    rna = mdata["rna"].obs
    assert (rna["singler"].astype(str).to_numpy() == truth["cell_type"].to_numpy()).mean() > 0.9
    assert mdata["rna"].uns["singler"]["params"]["n_genes_used"] == mdata["rna"].n_vars

    cs.pp.transfer_nucleus_labels(mdata, folder / "he_nuclei.csv", sample=sample)
    stats = mdata.uns["he_label"]["samples"][sample]
    assert stats["match_rate_cells"] > 0.8
    assert stats["registration_ok"] and stats["median_um"] < 1.5
    he = mdata.obs["he_label"]
    m = he.notna().to_numpy()
    expected = truth["cell_type"].map(HE_CLASS).to_numpy()
    assert (he[m].astype(str).to_numpy() == expected[m]).mean() > 0.75

    # the two sources agree on the classes they share, once SingleR's labels are made coarse
    cs.pp.harmonize_labels(mdata, "singler_pruned", HE_CLASS, key_added="rna_coarse")
    both = mdata.obs["rna_coarse"].notna() & he.notna()
    agree = (mdata.obs["rna_coarse"][both].astype(str) == he[both].astype(str)).mean()
    assert agree > 0.7

    path = tmp_path / "synthetic_labels.h5mu"
    mdata.write(path)
    back = md.read_h5mu(path)
    assert back.obs["he_label"].astype(str).tolist() == he.astype(str).tolist()
    np.testing.assert_allclose(back.uns["he_label"]["samples"][sample]["median_um"], stats["median_um"])
