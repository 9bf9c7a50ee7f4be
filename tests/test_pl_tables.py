"""cs.pl.metrics, confusion, history, enrichment: what each figure shows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _pl_data import CLASSES, make_mdata
from sklearn.metrics import confusion_matrix

import cellsymphony as cs


@pytest.fixture(scope="module")
def mdata(tmp_path_factory):
    return make_mdata(tmp_path_factory.mktemp("pl_tables"), he=False)


@pytest.fixture(scope="module")
def mdata_h5mu(mdata, tmp_path_factory):
    """The same data after a write / read round trip, as users will have it."""
    import mudata as md

    path = tmp_path_factory.mktemp("rt") / "d.h5mu"
    mdata.write(path)
    return md.read_h5mu(path)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _ticks(labels):
    return [t.get_text() for t in labels]


# ----------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("which", ["memory", "h5mu"])
def test_metrics_two_classifiers_side_by_side(mdata, mdata_h5mu, which):
    data = mdata if which == "memory" else mdata_h5mu
    ax = cs.pl.metrics(data, ["cs_pred", "cs_pred_unimodal"])
    assert _ticks(ax.get_yticklabels()) == ["cs_pred", "cs_pred_unimodal"]
    assert _ticks(ax.get_xticklabels()) == ["P", "R", "F1"] * len(CLASSES)
    top = next(c for c in ax.child_axes)
    assert _ticks(top.get_xticklabels()) == CLASSES
    mat = np.asarray(ax.images[0].get_array())
    assert mat.shape == (2, 3 * len(CLASSES))
    rec = data.uns["cs_pred_unimodal"]["metrics"]
    np.testing.assert_allclose(mat[1, 0::3], rec["precision"])
    np.testing.assert_allclose(mat[1, 1::3], rec["recall"])
    np.testing.assert_allclose(mat[1, 2::3], rec["f1"])
    texts = [t.get_text() for t in ax.texts]
    assert f"{rec['f1'][0]:.2f}" in texts
    assert len(texts) == mat.size
    assert ax.get_title() == "Per-class metrics"


def test_metrics_comparison_table_wide_and_long(mdata):
    # a compare_classifiers-style wide table: rows arch x sample, columns "<class>_<metric>"
    rows = []
    for arch, key in (("dual", "cs_pred"), ("unimodal", "cs_pred_unimodal")):
        m = mdata.uns[key]["metrics"]
        row = {"arch": arch, "sample": "s1"}
        for i, c in enumerate(CLASSES):
            row.update({f"{c}_precision": m["precision"][i], f"{c}_recall": m["recall"][i], f"{c}_f1": m["f1"][i]})
        rows.append(row)
    wide = pd.DataFrame(rows)
    ax = cs.pl.metrics(None, wide, metrics=("f1",), classes=["tumour", "T cell"])
    assert _ticks(ax.get_yticklabels()) == ["dual / s1", "unimodal / s1"]
    mat = np.asarray(ax.images[0].get_array())
    f1 = mdata.uns["cs_pred"]["metrics"]["f1"]
    np.testing.assert_allclose(mat[0], [f1[CLASSES.index("tumour")], f1[CLASSES.index("T cell")]])
    # the same numbers in long form, stored in uns as compare_classifiers does
    long = wide.melt(id_vars=["arch", "sample"], var_name="col", value_name="value")
    long[["class", "metric"]] = long["col"].str.rsplit("_", n=1, expand=True)
    mdata.uns["cmp"] = long.drop(columns="col")
    ax2 = cs.pl.metrics(mdata, "cmp", metrics=("f1",), classes=["tumour", "T cell"])
    np.testing.assert_allclose(np.asarray(ax2.images[0].get_array()), mat)
    del mdata.uns["cmp"]


def test_metrics_errors(mdata):
    with pytest.raises(ValueError, match="run cs.tl.train_classifier or cs.tl.compare_classifiers first"):
        cs.pl.metrics(mdata, "nope")
    with pytest.raises(ValueError, match="classes"):
        cs.pl.metrics(mdata, "cs_pred", classes=["unicorn"])
    with pytest.raises(ValueError, match="metrics must be among"):
        cs.pl.metrics(mdata, "cs_pred", metrics=("accuracy",))


def test_metrics_save(mdata, tmp_path):
    path = tmp_path / "sub" / "m.png"
    cs.pl.metrics(mdata, "cs_pred", save=path)
    assert path.stat().st_size > 1000


# ----------------------------------------------------------------------------------- confusion
def test_confusion_counts_from_test_cells(mdata):
    ax = cs.pl.confusion(mdata, "cs_pred", normalize="none")
    t = (mdata.obs["cs_pred_split"] == "test").to_numpy()
    expected = confusion_matrix(mdata.obs["cell_type"][t], mdata.obs["cs_pred"][t], labels=CLASSES)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)
    assert _ticks(ax.get_xticklabels()) == CLASSES
    assert _ticks(ax.get_yticklabels()) == CLASSES
    assert ax.get_xlabel() == "predicted"
    assert ax.get_ylabel() == "true"
    assert f"n={t.sum()}" in ax.get_title()


def test_confusion_normalised_rows_and_stored_matrix(mdata):
    ax = cs.pl.confusion(mdata, "cs_pred")
    mat = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(mat.sum(axis=1), 1.0)
    # without per-cell columns, the matrix stored in uns is used
    slim = mdata.copy()
    del slim.obs["cs_pred"]
    ax2 = cs.pl.confusion(slim, "cs_pred", normalize="none")
    np.testing.assert_array_equal(np.asarray(ax2.images[0].get_array()), mdata.uns["cs_pred"]["metrics"]["confusion"])
    with pytest.raises(ValueError, match="normalize"):
        cs.pl.confusion(mdata, "cs_pred", normalize="rows")


# ----------------------------------------------------------------------------------- history
def test_history_panels_and_lines(mdata_h5mu):
    fig = cs.pl.history(mdata_h5mu, "cs_pred")
    assert len(fig.axes) == 2
    loss_ax, score_ax = fig.axes
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["train", "held-out"]
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_ydata(), mdata_h5mu.uns["cs_pred"]["history"]["train_loss"])
    np.testing.assert_array_equal(loss_ax.get_lines()[0].get_xdata(), np.arange(1, 7))
    assert [line.get_label() for line in score_ax.get_lines()] == ["macro F1 (held-out)"]
    assert loss_ax.get_xlabel() == "epoch"
    assert fig.get_suptitle() == "cs_pred"


def test_history_losses_only_and_missing(mdata):
    mdata.uns["X_cs_contrastive"] = {"history": {"train_loss": np.array([3.0, 2.0]), "test_loss": np.array([3.1, 2.5])}}
    fig = cs.pl.history(mdata, "X_cs_contrastive")
    assert len(fig.axes) == 1
    assert len(fig.axes[0].get_lines()) == 2
    del mdata.uns["X_cs_contrastive"]
    with pytest.raises(ValueError, match="align_contrastive"):
        cs.pl.history(mdata, "X_cs_contrastive")


# ----------------------------------------------------------------------------------- enrichment
def test_enrichment_heatmap_and_stars(mdata_h5mu):
    ax = cs.pl.enrichment(mdata_h5mu, "cs_niche_enrichment")
    # clusters in natural order, labels as columns
    assert _ticks(ax.get_yticklabels()) == ["0", "1", "2", "10"]
    assert _ticks(ax.get_xticklabels()) == sorted(CLASSES)
    mat = np.asarray(ax.images[0].get_array())
    table = mdata_h5mu.uns["cs_niche_enrichment"]
    col = sorted(CLASSES).index("B cell")
    assert mat[0, col] == pytest.approx(2.0)
    # the infinite log2 odds (cluster 10, tumour) is clipped to the colour scale, not dropped
    lim = ax.images[0].get_clim()[1]
    assert mat[3, sorted(CLASSES).index("tumour")] == pytest.approx(lim)
    # one star-text per significant cell; q = 1e-3 -> two stars (< 0.05, < 0.01, not < 0.001)
    n_sig = int((table["q"] < 0.05).sum())
    assert len(ax.texts) == n_sig
    assert {t.get_text() for t in ax.texts} <= {"*", "**", "***"}
    assert "**" in {t.get_text() for t in ax.texts}
    assert ax.get_ylabel() == "cluster"


def test_enrichment_obs_exp_and_errors(mdata):
    ax = cs.pl.enrichment(None, mdata.uns["cs_niche_enrichment"], value="obs_exp", vmax=3)
    mat = np.asarray(ax.images[0].get_array())
    assert mat[0, 0] == pytest.approx(2.0)  # log2(obs/exp) of 4
    assert ax.images[0].get_clim() == (-3, 3)
    with pytest.raises(ValueError, match="cluster_enrichment"):
        cs.pl.enrichment(mdata, "missing_key")
    with pytest.raises(ValueError, match="value"):
        cs.pl.enrichment(mdata, "cs_niche_enrichment", value="zscore")


def test_plots_leave_data_unchanged(mdata):
    before = (sorted(mdata.uns), list(mdata.obs.columns), mdata.shape)
    cs.pl.metrics(mdata, "cs_pred")
    cs.pl.confusion(mdata, "cs_pred")
    cs.pl.history(mdata, "cs_pred")
    cs.pl.enrichment(mdata, "cs_niche_enrichment")
    assert (sorted(mdata.uns), list(mdata.obs.columns), mdata.shape) == before


def test_enrichment_star_legend_whatever_the_threshold_order(mdata_h5mu):
    # thresholds given loosest-last must give the same stars and the same (correct) legend
    a = cs.pl.enrichment(mdata_h5mu, "cs_niche_enrichment", thresholds=(0.05, 0.01, 0.001))
    b = cs.pl.enrichment(mdata_h5mu, "cs_niche_enrichment", thresholds=(0.001, 0.01, 0.05))
    assert [t.get_text() for t in a.texts] == [t.get_text() for t in b.texts]
    assert "* q<0.05, ** q<0.01, *** q<0.001" in a.get_title()
    assert a.get_title() == b.get_title()


def test_comparison_columns_of_classes_named_like_a_metric_prefix():
    from cellsymphony.pl._common import comparison_long, split_metric_column

    # compare_classifiers writes "<class> P" / "<class> R" / "<class> F1": a class "p_x" or "r_cells"
    # must not be read as a "precision" / "recall" prefix
    assert split_metric_column("p_x F1") == ("p_x", "f1")
    assert split_metric_column("r_cells P") == ("r_cells", "precision")
    assert split_metric_column("T cell_precision") == ("T cell", "precision")
    assert split_metric_column("precision_T cell") == ("T cell", "precision")
    assert split_metric_column("f1:B cell") == ("B cell", "f1")
    table = pd.DataFrame(
        {"architecture": ["dual"], "sample": ["s1"], "n_test": [10], "p_x P": [0.5], "p_x R": [0.25], "p_x F1": [1 / 3]}
    )
    long = comparison_long(table)
    assert set(long["class"]) == {"p_x"}
    assert dict(zip(long["metric"], long["value"], strict=True)) == pytest.approx(
        {"precision": 0.5, "recall": 0.25, "f1": 1 / 3}
    )
