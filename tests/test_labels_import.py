"""cs.pp.import_labels and cs.pp.harmonize_labels."""

from __future__ import annotations

import re

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

import cellsymphony as cs


def small_mdata(n: int = 8) -> md.MuData:
    ids = [f"aaaa{i:04d}-1" for i in range(n)]
    obs = pd.DataFrame({"sample": pd.Categorical(["s1"] * (n // 2) + ["s2"] * (n - n // 2)),
                        "cell_id": [str(i % (n // 2) + 1) for i in range(n)]}, index=ids)
    rna = ad.AnnData(np.zeros((n, 3), dtype=np.float32), obs=obs.copy())
    rna.var_names = ["A", "B", "C"]
    fine = ["CD4+ T", "CD8+ T", "B naive", "Mono CD14", "NK", "Plasma", None, "Tumour"]
    rna.obs["fine"] = pd.Categorical(fine[:n])
    morph = ad.AnnData(np.zeros((n, 0), dtype=np.float32), obs=obs.copy())
    return md.MuData({"rna": rna, "morphology": morph})


def test_import_labels_by_obs_names(tmp_path):
    mdata = small_mdata()
    table = pd.DataFrame({"cell_id": list(mdata.obs_names[:5]) + ["zzzz0000-1", "zzzz0001-1"],
                          "label": ["T", "T", "B", "myeloid", "NK", "T", "B"]})
    csv = tmp_path / "labels.csv"
    table.to_csv(csv, index=False)
    out = cs.pp.import_labels(mdata, csv, key_added="ext", copy=True)
    lab = out.obs["ext"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert lab.iloc[:5].astype(str).tolist() == ["T", "T", "B", "myeloid", "NK"]
    assert lab.iloc[5:].isna().all()
    rep = out.uns["ext"]
    assert (rep["n_matched"], rep["n_table_unmatched"], rep["n_cells_unlabelled"]) == (5, 2, 3)
    assert rep["id_source"] == "obs_names"
    path = tmp_path / "i.h5mu"
    out.write(path)
    back = md.read_h5mu(path)
    assert back.obs["ext"].astype(str).tolist() == lab.astype(str).tolist()
    assert back.uns["ext"]["n_matched"] == 5


def test_import_labels_integer_ids_per_sample():
    mdata = small_mdata()
    # ids 1..4 repeat in both sections (obs["cell_id"]); floats as a CSV with gaps would give
    table = pd.DataFrame({"id": [1.0, 2.0, 3.0, np.nan], "cls": ["x", "y", "z", "w"]})
    with pytest.raises(ValueError, match="repeat.*sample="):
        cs.pp.import_labels(mdata, table, id_key="id", label_key="cls")
    cs.pp.import_labels(mdata, table, id_key="id", label_key="cls", sample="s2")
    lab = mdata.obs["imported_label"].astype(object)
    assert lab.iloc[:4].isna().all()
    assert lab.iloc[4:7].tolist() == ["x", "y", "z"]
    assert mdata.uns["imported_label"]["id_source"] == "obs['cell_id']"
    cs.pp.import_labels(mdata, table.assign(cls=["p", "q", "r", "s"]), id_key="id", label_key="cls", sample="s1")
    lab = mdata.obs["imported_label"].astype(object)
    assert lab.iloc[:3].tolist() == ["p", "q", "r"] and lab.iloc[4:7].tolist() == ["x", "y", "z"]


def test_import_labels_numeric_labels_with_gaps(tmp_path):
    """Cluster numbers in a CSV column with missing values are read as floats: they stay "3", not "3.0"."""
    mdata = small_mdata()
    table = pd.DataFrame({"cell_id": list(mdata.obs_names[:4]), "label": [3, None, 12, 3]})
    csv = tmp_path / "clusters.csv"
    table.to_csv(csv, index=False)
    out = cs.pp.import_labels(mdata, csv, key_added="cluster", copy=True)
    assert list(out.obs["cluster"].cat.categories) == ["12", "3"]
    assert out.obs["cluster"].iloc[:4].astype(object).tolist() == ["3", np.nan, "12", "3"]
    # non-integral numbers are kept as they are
    cs.pp.import_labels(mdata, table.assign(label=[0.5, None, 1.0, 0.5]), key_added="score")
    assert list(mdata.obs["score"].cat.categories) == ["0.5", "1.0"]


def test_import_labels_bad_input():
    mdata = small_mdata()
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label'\]"):
        cs.pp.import_labels(mdata, pd.DataFrame({"cell_id": ["a"], "type": ["T"]}))
    with pytest.raises(ValueError, match="matches a cell"):
        cs.pp.import_labels(mdata, pd.DataFrame({"cell_id": ["nope"], "label": ["T"]}))
    conflict = pd.DataFrame({"cell_id": [mdata.obs_names[0]] * 2, "label": ["T", "B"]})
    with pytest.raises(ValueError, match="different labels"):
        cs.pp.import_labels(mdata, conflict)
    assert "imported_label" not in mdata.obs


def test_harmonize_dict_regex_callable(tmp_path):
    mdata = small_mdata()
    mapping = {"CD4+ T": "T cell", "CD8+ T": "T cell", "B naive": "B cell", "Plasma": "B cell", "Mono CD14": "myeloid"}
    out = cs.pp.harmonize_labels(mdata, "fine", mapping, key_added="coarse", copy=True)
    got = out.obs["coarse"].astype(object).tolist()
    # NK and Tumour are not covered -> ambiguous; the missing fine label stays missing
    assert got[:6] == ["T cell", "T cell", "B cell", "myeloid", "ambiguous", "B cell"]
    assert pd.isna(got[6]) and got[7] == "ambiguous"
    rep = out.uns["coarse"]
    assert rep["n_unmapped"] == 2
    assert sorted(rep["unmapped_labels"]) == ["NK", "Tumour"]
    assert dict(zip(rep["table"]["source"], rep["table"]["target"], strict=True))["CD8+ T"] == "T cell"
    path = tmp_path / "h.h5mu"
    out.write(path)
    back = md.read_h5mu(path)
    assert back.obs["coarse"].astype(str).tolist() == out.obs["coarse"].astype(str).tolist()
    assert list(back.uns["coarse"]["table"]["n_cells"]) == list(rep["table"]["n_cells"])

    # regular expressions, first match wins; unmapped="keep"
    out = cs.pp.harmonize_labels(
        mdata, "fine", {r"\bT$": "T cell", r"^B|Plasma": "B cell", re.compile("mono", re.I): "myeloid"},
        regex=True, unmapped="keep", copy=True,
    )
    assert out.obs["label_coarse"].astype(object).tolist()[:6] == ["T cell", "T cell", "B cell", "myeloid", "NK", "B cell"]
    # a function; unmapped=None leaves uncovered cells missing
    out = cs.pp.harmonize_labels(mdata, "rna:fine", lambda s: "lymphoid" if "T" in s or s == "NK" else None,
                                 unmapped=None, copy=True)
    got = out.obs["label_coarse"].astype(object).tolist()
    assert got[0] == got[1] == got[4] == "lymphoid" and pd.isna(got[2]) and got[7] == "lymphoid"


def test_harmonize_bad_input():
    mdata = small_mdata()
    with pytest.raises(ValueError, match="Column 'nope' not found"):
        cs.pp.harmonize_labels(mdata, "nope", {"a": "b"})
    with pytest.raises(ValueError, match="mapping is empty"):
        cs.pp.harmonize_labels(mdata, "fine", {})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        cs.pp.harmonize_labels(mdata, "fine", {"(": "x"}, regex=True)
    with pytest.raises(ValueError, match="failed on label"):
        cs.pp.harmonize_labels(mdata, "fine", lambda s: 1 / 0)
