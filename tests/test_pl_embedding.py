"""cs.pl.embedding: UMAP of a representation, coloured by a column."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from _pl_data import CLASSES, make_mdata
from matplotlib.colors import to_hex

import cellsymphony as cs


@pytest.fixture(scope="module")
def mdata(tmp_path_factory):
    return make_mdata(tmp_path_factory.mktemp("pl_emb"), n=120, he=False)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_embedding_umap_of_a_modality_rep(mdata):
    ax = cs.pl.embedding(mdata, "X_uni2", "cell_type", n_neighbors=10)
    coll = ax.collections[0]
    # the 5 NaN rows (cells outside the image) are left out
    assert len(coll.get_offsets()) == mdata.n_obs - 5
    assert ax.get_xlabel() == "UMAP1"
    assert ax.get_title() == "X_uni2 (morphology): cell_type"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == CLASSES
    assert len({to_hex(c) for c in coll.get_facecolors()}) == len(CLASSES)
    assert "X_umap" not in mdata["morphology"].obsm  # nothing written


def test_embedding_separates_what_the_rep_separates(mdata):
    """X_scgpt is one-hot by class plus noise: each class's UMAP points form their own group."""
    ax = cs.pl.embedding(mdata, "X_scgpt", "cell_type", n_neighbors=10)
    coll = ax.collections[0]
    xy = np.asarray(coll.get_offsets())
    colours = np.array([to_hex(c) for c in coll.get_facecolors()])
    centres = {c: xy[colours == c].mean(axis=0) for c in set(colours)}
    # every point is nearer its own class centre than any other
    own = np.array([np.linalg.norm(p - centres[c]) for p, c in zip(xy, colours, strict=True)])
    other = np.array([min(np.linalg.norm(p - centres[k]) for k in centres if k != c) for p, c in zip(xy, colours, strict=True)])
    assert (own < other).mean() > 0.95


def test_embedding_two_columns_drawn_as_is_and_continuous(mdata):
    data = mdata.copy()
    data["rna"].obsm["X_2d"] = data["rna"].obsm["spatial"]
    ax = cs.pl.embedding(data, "X_2d", "CD3E")
    np.testing.assert_allclose(np.sort(np.asarray(ax.collections[0].get_offsets()), axis=0),
                               np.sort(data["rna"].obsm["spatial"], axis=0))  # fmt: skip


def test_embedding_errors(mdata):
    with pytest.raises(ValueError, match="not found in obsm"):
        cs.pl.embedding(mdata, "X_nothing", "cell_type")
    with pytest.raises(ValueError, match="mod='protein'"):
        cs.pl.embedding(mdata, "X_uni2", "cell_type", mod="protein")
