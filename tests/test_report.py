"""write_report: the figures and tables it writes, found from the layout of uns."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from _pl_data import CLASSES, make_mdata

import cellsymphony as cs
from cellsymphony._report import write_report


@pytest.fixture(scope="module")
def mdata(tmp_path_factory):
    data = make_mdata(tmp_path_factory.mktemp("report"), he=hasattr(cs.io, "read_he"))
    # a comparison table in the layout of cs.tl.compare_classifiers (dict with "table", "<class> P" columns)
    rows = []
    for arch, key in (("dual", "cs_pred"), ("unimodal", "cs_pred_unimodal")):
        m = data.uns[key]["metrics"]
        row = {"architecture": arch, "sample": "s1", "n_test": 48}
        for i, c in enumerate(CLASSES):
            row.update({f"{c} P": m["precision"][i], f"{c} R": m["recall"][i], f"{c} F1": m["f1"][i]})
        row["macro F1"] = float(np.mean(m["f1"]))
        rows.append(row)
    data.uns["cs_compare"] = {"table": pd.DataFrame(rows), "params": {"label_key": "cell_type"}}
    return data


def test_report_writes_figures_and_tables(mdata, tmp_path):
    path = write_report(mdata, tmp_path, settings_note={"epochs": (20, 3), "d_model": (512, 32)}, timings={"read": 1.5, "embed": 2.5})
    assert path == tmp_path / "report.html"
    html = path.read_text()
    figs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    expected = {"metrics.png", "metrics_comparison.png", "confusion_cs_pred.png", "history_cs_pred.png",
                "enrichment_cs_niche_enrichment.png", "registration_he_label.png", "spatial_cell_type.png"}  # fmt: skip
    assert expected <= set(figs), figs
    # every figure is linked from the page, and every linked figure exists
    linked = set(re.findall(r'src="figures/([^"]+)"', html))
    assert linked == set(figs)
    # the tables: comparison (with its columns), enrichment rows, registration statistics, timings, settings
    assert "tumour F1" in html
    assert "unimodal" in html
    assert "samples.s1.median_um" in html
    assert f"{mdata.uns['he_label']['samples']['s1']['median_um']:.3f}" in html
    assert "<th>total</th>" in html
    assert "4.000" in html  # total seconds
    assert "Settings that differ from the paper" in html
    assert "<td>512</td>" in html
    assert "Not drawn" not in html


def test_report_lists_what_could_not_be_drawn(mdata, tmp_path):
    data = mdata.copy()
    del data.uns["cs_pred"]["history"]
    path = write_report(data, tmp_path, settings_note="demo sizes", classifier_keys=["cs_pred"])
    html = path.read_text()
    assert "Not drawn" in html
    assert "history_cs_pred" in html.split('id="problems">Not drawn')[1]
    assert not (tmp_path / "figures" / "history_cs_pred.png").exists()
    assert "<p>demo sizes</p>" in html


def test_report_settings_as_nested_mapping_and_coherence(mdata, tmp_path):
    data = mdata.copy()
    data.uns["cs_niche_coherence"] = pd.DataFrame(
        {"n_cells": [10, 20], "observed": [0.8, 0.6], "null_mean": [0.3, 0.3], "null_sd": [0.05, 0.05], "z": [10.0, 6.0], "pval": [0.005, 0.005]},
        index=pd.Index(["0", "overall"], name="cluster"),
    )
    note = {"classifier size": {"demo": "d_model 64", "paper": "d_model 512"}}
    html = write_report(data, tmp_path, settings_note=note, label_keys=[]).read_text()
    settings = html.split('id="settings">')[1]
    assert "<th>demo</th>" in settings and "<th>paper</th>" in settings
    assert "<td>d_model 512</td>" in settings
    assert "Spatial coherence of clusters" in html
    assert "<th>overall</th>" in html
