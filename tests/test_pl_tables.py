"""cs.pl.metrics, confusion, history, enrichment: what each figure shows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix

import cellsymphony as cs


@pytest.fixture(scope="module")
def mdata(produced):
    """The real producers' output (tests/_pl_data.run_producers), a copy each module may change."""
    return produced[0].copy()


@pytest.fixture(scope="module")
def mdata_h5mu(produced):
    """The same data after a write / read round trip, as users will have it."""
    return produced[1]


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _ticks(labels):
    return [t.get_text() for t in labels]


# ----------------------------------------------------------------------------------- metrics
def _per_class(data, key, metric):
    """One record's per-class values as the producer stored them (the pooled / only section)."""
    t = data.uns[key]["metrics_table"]
    return t[(t["metric"] == metric) & (t["class"] != "all")].set_index("class")["value"]


@pytest.mark.parametrize("which", ["memory", "h5mu"])
def test_metrics_two_classifiers_side_by_side(mdata, mdata_h5mu, which):
    data = mdata if which == "memory" else mdata_h5mu
    ax = cs.pl.metrics(data, ["cs_pred", "cs_pred_unimodal"])
    classes = list(data.uns["cs_pred"]["classes"])
    assert _ticks(ax.get_yticklabels()) == ["cs_pred", "cs_pred_unimodal"]
    assert _ticks(ax.get_xticklabels()) == ["P", "R", "F1"] * len(classes)
    top = next(c for c in ax.child_axes)
    assert _ticks(top.get_xticklabels()) == classes
    mat = np.asarray(ax.images[0].get_array())
    assert mat.shape == (2, 3 * len(classes))
    # the values are those of the classifier's own per-class record, from its test cells
    pc = data.uns["cs_pred_unimodal"]["metrics"]["per_class"]
    np.testing.assert_allclose(mat[1, 0::3], pc["precision"].to_numpy())
    np.testing.assert_allclose(mat[1, 1::3], pc["recall"].to_numpy())
    np.testing.assert_allclose(mat[1, 2::3], pc["f1"].to_numpy())
    np.testing.assert_allclose(mat[0, 2::3], _per_class(data, "cs_pred", "f1")[classes].to_numpy())
    texts = [t.get_text() for t in ax.texts]
    assert f"{pc['f1'].iloc[0]:.2f}" in texts
    assert len(texts) == mat.size
    assert ax.get_title() == "Per-class metrics"


def test_metrics_of_a_comparison_record_and_its_returned_table(mdata):
    table = mdata.uns["cs_compare"]["table"]
    ax = cs.pl.metrics(mdata, "cs_compare", metrics=("f1",))
    assert _ticks(ax.get_yticklabels()) == ["unimodal", "dual", "logistic"]
    classes = _ticks(next(c for c in ax.child_axes).get_xticklabels())
    mat = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(mat, table[[f"{c} F1" for c in classes]].to_numpy(dtype=float))
    # the wide table compare_classifiers returns is drawn the same (it carries its metric table)
    returned = cs.tl.compare_classifiers(
        mdata.copy(), "he_label", archs=("unimodal", "dual"), **{"d_model": 16, "n_layers": 1, "n_heads": 2, "epochs": 2, "lr": 3e-3}
    )
    ax2 = cs.pl.metrics(None, returned, metrics=("f1",))
    np.testing.assert_allclose(np.asarray(ax2.images[0].get_array()), mat)
    # and so is its long metric table, restricted to two classes in the order asked
    two = classes[::-1][:2]
    ax3 = cs.pl.metrics(None, mdata.uns["cs_compare"]["metrics_table"], metrics=("f1",), classes=two)
    np.testing.assert_allclose(np.asarray(ax3.images[0].get_array()), table[[f"{c} F1" for c in two]].to_numpy(dtype=float))


def test_metrics_read_only_the_schema(mdata):
    with pytest.raises(ValueError, match="run cs.tl.train_classifier or cs.tl.compare_classifiers first"):
        cs.pl.metrics(mdata, "nope")
    with pytest.raises(ValueError, match="classes"):
        cs.pl.metrics(mdata, "cs_pred", classes=["unicorn"])
    with pytest.raises(ValueError, match="metrics must be among"):
        cs.pl.metrics(mdata, "cs_pred", metrics=("accuracy",))
    # any other layout is refused, naming the columns a metric table has
    wide = pd.DataFrame({"arch": ["dual"], "T cell_precision": [0.5]})
    with pytest.raises(ValueError, match=r"neither a metric table \(columns \['model', 'sample', 'class', 'metric', 'value'\]\)"):
        cs.pl.metrics(None, wide)
    with pytest.raises(ValueError, match="has no 'metrics_table'"):
        cs.pl.metrics(mdata, "cs_pred_enrichment")


def test_metrics_save(mdata, tmp_path):
    path = tmp_path / "sub" / "m.png"
    cs.pl.metrics(mdata, "cs_pred", save=path)
    assert path.stat().st_size > 1000


# ----------------------------------------------------------------------------------- confusion
def test_confusion_counts_from_test_cells(mdata):
    ax = cs.pl.confusion(mdata, "cs_pred", normalize="none")
    classes = list(mdata.uns["cs_pred"]["classes"])
    t = (mdata.obs["cs_pred_split"] == "test").to_numpy()
    truth = mdata.obs["he_label"].astype(object)[t].astype(str)
    expected = confusion_matrix(truth, mdata.obs["cs_pred"][t].astype(str), labels=classes)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)
    # the producer's own confusion matrix of its test cells is the same
    np.testing.assert_array_equal(expected, mdata.uns["cs_pred"]["metrics"]["confusion"])
    assert _ticks(ax.get_xticklabels()) == classes
    assert _ticks(ax.get_yticklabels()) == classes
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
    np.testing.assert_array_equal(loss_ax.get_lines()[0].get_xdata(), np.arange(1, 3))
    assert sorted(line.get_label() for line in score_ax.get_lines()) == ["accuracy (held-out)", "macro F1 (held-out)"]
    assert loss_ax.get_xlabel() == "epoch"
    assert fig.get_suptitle() == "cs_pred"


def test_history_of_the_aligner_and_missing(mdata_h5mu):
    fig = cs.pl.history(mdata_h5mu, "X_cs_contrastive")
    assert len(fig.axes) == 2
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train", "held-out"]
    hist = mdata_h5mu.uns["X_cs_contrastive"]["history"]
    np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_ydata(), hist["test_loss"])
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["temperature"]
    with pytest.raises(ValueError, match="align_contrastive"):
        cs.pl.history(mdata_h5mu, "X_missing")


# ----------------------------------------------------------------------------------- enrichment
def test_enrichment_heatmap_and_stars(mdata_h5mu):
    table = mdata_h5mu.uns["cs_pred_enrichment"]["table"]  # the getters' storage shape
    ax = cs.pl.enrichment(mdata_h5mu, "cs_pred_enrichment")
    clusters = sorted(set(table["cluster"].astype(str)))
    labels = sorted(set(table["label"].astype(str)))
    assert _ticks(ax.get_yticklabels()) == clusters
    assert _ticks(ax.get_xticklabels()) == labels
    mat = np.asarray(ax.images[0].get_array())
    lim = ax.images[0].get_clim()[1]
    assert lim == pytest.approx(min(4.0, np.abs(table["log2_odds_ratio"]).max()))
    stars = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    for r in table.itertuples():
        i, j = clusters.index(str(r.cluster)), labels.index(str(r.label))
        assert mat[i, j] == pytest.approx(np.clip(r.log2_odds_ratio, -lim, lim))
        # stars: q < 0.05, < 0.01, < 0.001
        assert stars.get((i, j), "") == "*" * sum(r.qval < t for t in (0.05, 0.01, 0.001))
    assert len(stars) == int((table["qval"] < 0.05).sum()) > 0  # the predictions are enriched in their labels
    assert ax.get_ylabel() == "cluster"


def test_enrichment_obs_exp_and_errors(mdata):
    table = mdata.uns["cs_pred_enrichment"]["table"]
    ax = cs.pl.enrichment(None, table, value="obs_exp", vmax=3)
    mat = np.asarray(ax.images[0].get_array())
    first = table.iloc[0]
    clusters = sorted(set(table["cluster"].astype(str)))
    labels = sorted(set(table["label"].astype(str)))
    i, j = clusters.index(str(first["cluster"])), labels.index(str(first["label"]))
    with np.errstate(divide="ignore"):
        assert mat[i, j] == pytest.approx(np.clip(np.log2(first["obs_exp"]), -3, 3))
    assert ax.images[0].get_clim() == (-3, 3)
    with pytest.raises(ValueError, match="cluster_enrichment"):
        cs.pl.enrichment(mdata, "missing_key")
    with pytest.raises(ValueError, match="value"):
        cs.pl.enrichment(mdata, "cs_pred_enrichment", value="zscore")
    with pytest.raises(ValueError, match=r"no column \['log2_odds_ratio'\]"):
        cs.pl.enrichment(None, table.rename(columns={"log2_odds_ratio": "log2_or"}))


def test_plots_leave_data_unchanged(mdata):
    before = (sorted(mdata.uns), list(mdata.obs.columns), mdata.shape)
    cs.pl.metrics(mdata, "cs_pred")
    cs.pl.confusion(mdata, "cs_pred")
    cs.pl.history(mdata, "cs_pred")
    cs.pl.enrichment(mdata, "cs_pred_enrichment")
    assert (sorted(mdata.uns), list(mdata.obs.columns), mdata.shape) == before


def test_enrichment_star_legend_whatever_the_threshold_order(mdata_h5mu):
    # thresholds given loosest-last must give the same stars and the same (correct) legend
    a = cs.pl.enrichment(mdata_h5mu, "cs_pred_enrichment", thresholds=(0.05, 0.01, 0.001))
    b = cs.pl.enrichment(mdata_h5mu, "cs_pred_enrichment", thresholds=(0.001, 0.01, 0.05))
    assert [t.get_text() for t in a.texts] == [t.get_text() for t in b.texts]
    assert "* q<0.05, ** q<0.01, *** q<0.001" in a.get_title()
    assert a.get_title() == b.get_title()


def test_wide_view_of_classes_named_like_a_metric():
    """The wide view is derived from the long table, so a class named "p_x" or "F1" cannot be mis-read."""
    from cellsymphony._results import metrics_frame, metrics_wide

    rows = [{"model": "dual", "sample": "s1", "class": c, "metric": m, "value": v}
            for c in ("p_x", "F1") for m, v in (("precision", 0.5), ("recall", 0.25), ("f1", 1 / 3), ("support", 4))]
    rows += [{"model": "dual", "sample": "s1", "class": "all", "metric": m, "value": v}
             for m, v in (("macro_f1", 1 / 3), ("weighted_f1", 1 / 3), ("support", 8))]  # fmt: skip
    wide = metrics_wide(metrics_frame(rows))
    assert list(wide.columns) == ["architecture", "sample", "n_test", "p_x P", "p_x R", "p_x F1", "F1 P", "F1 R",
                                  "F1 F1", "macro F1", "weighted F1"]  # fmt: skip
    assert wide.loc["dual | s1", "p_x R"] == 0.25 and wide.loc["dual | s1", "n_test"] == 8
    # and back, column by column (per-class support is not in the view); two views concatenate
    from cellsymphony._results import metrics_from_wide

    back = metrics_from_wide(pd.concat([wide, wide.assign(architecture="spatial")]))
    long = metrics_frame(rows)
    keep = ~((long["metric"] == "support") & (long["class"] != "all")) & (long["metric"] != "accuracy")
    expected = long[keep].sort_values(["class", "metric"]).reset_index(drop=True)
    got = back[back["model"] == "dual"].sort_values(["class", "metric"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    with pytest.raises(ValueError, match="neither a metric table"):
        metrics_from_wide(wide.drop(columns="p_x R"))


def test_metrics_rows_per_section_when_a_record_has_several():
    """A classifier evaluated on two sections has figures per section and pooled ("all"): one row each."""
    from cellsymphony.models.classifier._metrics import classification_table

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    pred = np.where(rng.random(90) < 0.7, y, rng.integers(0, 3, 90))
    samples = np.repeat(["s1", "s2"], 45)
    long = classification_table("dual", y, pred, samples, ["a", "b", "c"])
    assert sorted(set(long["sample"])) == ["all", "s1", "s2"]
    ax = cs.pl.metrics(None, long, metrics=("recall",))
    assert _ticks(ax.get_yticklabels()) == ["dual / s1", "dual / s2", "dual / all"]
    mat = np.asarray(ax.images[0].get_array())
    s1 = samples == "s1"
    expected = [((pred[s1] == k) & (y[s1] == k)).sum() / (y[s1] == k).sum() for k in range(3)]
    np.testing.assert_allclose(mat[0], expected)
