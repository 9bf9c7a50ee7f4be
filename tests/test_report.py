"""write_report: the figures and tables it writes, found from the outputs record of uns["cellsymphony"]."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cellsymphony._report import write_report


@pytest.fixture(scope="module")
def mdata(produced):
    """The real producers' output read back from .h5mu (tests/_pl_data.run_producers)."""
    return produced[1]


def test_report_writes_figures_and_tables(mdata, tmp_path):
    path = write_report(mdata, tmp_path, settings_note={"epochs": (20, 3), "d_model": (512, 32)}, timings={"read": 1.5, "embed": 2.5})
    assert path == tmp_path / "report.html"
    html = path.read_text()
    figs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    expected = {"metrics.png", "metrics_comparison.png", "confusion_cs_pred.png", "history_cs_pred.png",
                "confusion_cs_pred_unimodal.png", "history_X_cs_contrastive.png",
                "enrichment_cs_pred_enrichment.png", "registration_he_label.png", "spatial_he_label.png"}  # fmt: skip
    assert expected <= set(figs), figs
    # every figure is linked from the page, and every linked figure exists
    linked = set(re.findall(r'src="figures/([^"]+)"', html))
    assert linked == set(figs)
    # the tables: comparison (the wide view of its metric table), classifier summaries, retrieval, enrichment,
    # registration statistics, coherence, timings, settings
    classes = list(mdata.uns["cs_compare"]["table"].filter(like=" F1").columns)
    assert classes and all(c in html for c in classes)
    assert "logistic" in html and "unimodal" in html
    macro = mdata.uns["cs_pred"]["metrics"]["macro_f1"]
    assert f"{macro:.3f}" in html.split('id="classifiers"')[1]
    assert "recall@10" in html and "rna_to_morphology" in html
    assert "samples.synthetic.median_um" in html
    assert f"{mdata.uns['he_label']['samples']['synthetic']['median_um']:.3f}" in html
    assert "Spatial coherence of clusters" in html
    assert "<th>total</th>" in html
    assert "4.000" in html  # total seconds
    assert "Settings that differ from the paper" in html
    assert "<td>512</td>" in html
    assert "Not drawn" not in html


def test_report_lists_what_could_not_be_drawn(mdata, tmp_path):
    data = mdata.copy()
    data.uns["cs_pred"] = dict(data.uns["cs_pred"])
    del data.uns["cs_pred"]["history"]
    path = write_report(data, tmp_path, settings_note="demo sizes", classifier_keys=["cs_pred"])
    html = path.read_text()
    assert "Not drawn" in html
    assert "history_cs_pred" in html.split('id="problems">Not drawn')[1]
    assert not (tmp_path / "figures" / "history_cs_pred.png").exists()
    assert "<p>demo sizes</p>" in html


def test_report_settings_as_nested_mapping_and_coherence(mdata, tmp_path):
    data = mdata.copy()
    note = {"classifier size": {"demo": "d_model 64", "paper": "d_model 512"}}
    html = write_report(data, tmp_path, settings_note=note, label_keys=[]).read_text()
    settings = html.split('id="settings">')[1]
    assert "<th>demo</th>" in settings and "<th>paper</th>" in settings
    assert "<td>d_model 512</td>" in settings
    assert "Spatial coherence of clusters" in html
    coherence = data.uns["cs_pred_coherence"]["table"]  # the getters' storage shape
    assert all(f"<th>{c}</th>" in html for c in coherence.index.astype(str))


def test_report_finds_only_recorded_outputs(mdata, tmp_path):
    """A record of the classifier layout not written by a producer is not taken for one."""
    data = mdata.copy()
    data.uns["lookalike"] = {"metrics": {"precision": np.array([0.5])}, "classes": np.array(["a"])}
    html = write_report(data, tmp_path, settings_note="x", label_keys=[]).read_text()
    assert "lookalike" not in html
    assert "confusion_cs_pred.png" in html
    # named anyway, it is listed as not drawn (no metric table), and the rest of the report is written
    html = write_report(data, tmp_path / "named", settings_note="x", label_keys=[], classifier_keys=["lookalike"]).read_text()
    problems = html.split('id="problems">Not drawn')[1]
    assert "classifier summary" in problems and "has no &#x27;metrics_table&#x27;" in problems
