"""cs.pl.spatial, registration, patch_gallery: cells, H&E and matches in micrometres."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from _pl_data import CLASSES, HE_SIZE, alignment, make_mdata
from matplotlib.colors import to_hex

import cellsymphony as cs
from cellsymphony._registration import he_px_to_um

needs_read_he = pytest.mark.skipif(
    not hasattr(cs.io, "read_he"), reason="cs.io.read_he (branch io) is not merged yet"
)


@pytest.fixture(scope="module")
def mdata(tmp_path_factory):
    return make_mdata(tmp_path_factory.mktemp("pl_spatial"), he=hasattr(cs.io, "read_he"))


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _colours_by_offset(coll):
    return {tuple(np.round(o, 6)): to_hex(c) for o, c in zip(coll.get_offsets(), coll.get_facecolors(), strict=True)}


def test_spatial_categorical_positions_colours_legend(mdata):
    ax = cs.pl.spatial(mdata, "cell_type", he=False)
    assert not ax.images
    coll = ax.collections[0]
    xy = mdata["rna"].obsm["spatial"]
    got = np.asarray(coll.get_offsets())
    assert got.shape == xy.shape
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(xy, axis=0))
    colours = _colours_by_offset(coll)
    legend = ax.get_legend()
    names = [t.get_text() for t in legend.get_texts()]
    assert names == CLASSES
    handle_colour = {t.get_text(): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    assert len(set(handle_colour.values())) == len(CLASSES)
    for i, label in enumerate(mdata.obs["cell_type"]):
        assert colours[tuple(np.round(xy[i], 6))] == handle_colour[label]
    # micrometre axes, y pointing down as in obsm["spatial"]
    assert ax.get_xlabel() == "x (µm)"
    y0, y1 = ax.get_ylim()
    assert y0 > y1
    assert ax.get_title() == "cell_type"


def test_spatial_palette_from_uns_and_groups(mdata):
    data = mdata.copy()
    data.uns["cell_type_colors"] = ["#000000", "#ff0000", "#00ff00", "#0000ff"]
    ax = cs.pl.spatial(data, "cell_type", he=False, groups=["T cell"])
    colours = _colours_by_offset(ax.collections[0])
    xy = data["rna"].obsm["spatial"]
    for i, label in enumerate(data.obs["cell_type"]):
        expected = "#ff0000" if label == "T cell" else "#d3d3d3"
        assert colours[tuple(np.round(xy[i], 6))] == expected
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["T cell"]


def test_spatial_gene_values(mdata):
    ax = cs.pl.spatial(mdata, "CD3E", he=False)
    coll = ax.collections[0]
    x = mdata["rna"][:, "CD3E"].X.toarray().ravel()
    np.testing.assert_allclose(np.sort(coll.get_array()), np.sort(np.log1p(x)))
    assert ax.get_title() == "CD3E (log1p counts)"


def test_spatial_errors(mdata):
    with pytest.raises(ValueError, match="not a gene"):
        cs.pl.spatial(mdata, "nonexistent", he=False)
    with pytest.raises(ValueError, match="Sample 'zz' not found"):
        cs.pl.spatial(mdata, "cell_type", sample="zz", he=False)
    two = mdata.copy()
    two.obs["sample"] = np.where(np.arange(two.n_obs) % 2, "s1", "s2")
    with pytest.raises(ValueError, match="several samples"):
        cs.pl.spatial(two, "cell_type", he=False)


@needs_read_he
def test_spatial_he_warped_into_micrometres(mdata):
    ax = cs.pl.spatial(mdata, "cell_type", max_image_px=200)
    assert len(ax.images) == 1
    im = ax.images[0]
    # a coarse level was read: the cells span ~430 H&E pixels, so 200 px asks for level 1 (downsample 2)
    assert im.get_label() == "H&E level 1"
    # the image's corners land where the registration puts those H&E pixels
    left, right, bottom, top = im.get_extent()
    corners_he = np.array([[left, top], [right, top], [left, bottom], [right, bottom]])
    to_data = im.get_transform() - ax.transData
    np.testing.assert_allclose(to_data.transform(corners_he), he_px_to_um(corners_he, alignment(), 0.2125), atol=1e-6)
    # and the region is the part of the level under the cells (white outside the image)
    arr = np.asarray(im.get_array())
    assert arr.dtype == np.uint8
    assert arr.shape[2] == 3
    assert arr.shape[0] <= HE_SIZE // 2 + 2


@needs_read_he
def test_spatial_he_pixels_land_at_their_micrometres(mdata):
    """Render the figure and read it back: each quadrant's colour of the H&E shows at the micrometre position
    the registration gives its centre (catches a wrong image transform, not just wrong corner arithmetic)."""
    ax = cs.pl.spatial(mdata, "cell_type", alpha=0.0, legend=False, max_image_px=400)
    np.testing.assert_allclose(ax.images[0].get_transform().get_affine().get_matrix()[2], [0, 0, 1])
    fig = ax.figure
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    h = HE_SIZE // 2
    quadrants = {(h // 2, h // 2): (230, 150, 190), (h + h // 2, h // 2): (120, 60, 160),
                 (h // 2, h + h // 2): (240, 240, 240), (h + h // 2, h + h // 2): (200, 100, 120)}  # fmt: skip
    for (px, py), colour in quadrants.items():
        um = he_px_to_um(np.array([[px, py]], float), alignment(), 0.2125)
        x, y = ax.transData.transform(um)[0]
        row = rgba.shape[0] - int(round(y))
        got = rgba[row - 1 : row + 2, int(round(x)) - 1 : int(round(x)) + 2, :3].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(got, colour, atol=12)


@needs_read_he
def test_registration_panels(mdata):
    fig = cs.pl.registration(mdata, "he_label", window_um=60)
    assert [a.get_title() for a in fig.axes[:3]] == ["matched nuclei", "offsets", "distances"]
    ax0, ax1, ax2 = fig.axes[:3]
    off = mdata.obsm["he_label_offset"]
    matched = np.isfinite(off[:, 0])
    np.testing.assert_allclose(np.asarray(ax1.collections[0].get_offsets()), off[matched])
    mean = off[matched].mean(axis=0)
    assert ax1.get_legend().get_title().get_text() == f"mean ({mean[0]:.2f}, {mean[1]:.2f}) µm"
    dist = mdata.obs["he_label_distance"].dropna().to_numpy()
    assert ax2.get_lines()[0].get_xdata()[0] == pytest.approx(np.median(dist))
    assert ax2.get_lines()[1].get_xdata()[0] == pytest.approx(np.percentile(dist, 95))
    assert sum(p.get_height() for p in ax2.patches) == matched.sum()
    # panel 1: H&E under the window, matched H&E nuclei = Xenium nucleus - offset (Xenium - H&E)
    assert len(ax0.images) == 1
    he_pts = np.asarray(ax0.collections[1].get_offsets())
    nuc = mdata["rna"].obsm["nucleus_centroid"]
    (x0, x1), (y1, y0) = ax0.get_xlim(), ax0.get_ylim()
    inside = matched & (nuc[:, 0] >= x0) & (nuc[:, 0] <= x1) & (nuc[:, 1] >= y0) & (nuc[:, 1] <= y1)
    assert 0 < len(he_pts) == inside.sum()
    np.testing.assert_allclose(np.sort(he_pts, axis=0), np.sort((nuc - off)[inside], axis=0))
    assert "120 matched nuclei, 50% of cells" in fig.get_suptitle()


def test_registration_from_distances_and_statistics(tmp_path):
    """Without per-cell offsets: distances from obs, the mean offset and spread from the statistics."""
    data = make_mdata(tmp_path, n=40, he=False)
    del data.obsm["he_label_offset"]
    fig = cs.pl.registration(data, "he_label", he=False)
    ax0, ax1, ax2 = fig.axes[:3]
    assert not ax1.collections  # no per-cell vectors to draw
    mean = data.uns["he_label"]["samples"]["s1"]["mean_offset_um"]
    assert ax1.get_legend().get_title().get_text() == f"mean ({mean[0]:.2f}, {mean[1]:.2f}) µm"
    assert sum(p.get_height() for p in ax2.patches) == 20
    assert len(ax0.collections) == 2


def test_registration_missing(tmp_path):
    data = make_mdata(tmp_path, n=20, he=False)
    del data.uns["he_label"]
    with pytest.raises(ValueError, match="transfer_nucleus_labels"):
        cs.pl.registration(data, "he_label")


@pytest.mark.skipif(not hasattr(cs.pp, "cell_patches"), reason="cs.pp.cell_patches (branch morphology) is not merged yet")
@needs_read_he
def test_patch_gallery_rows_and_patches(mdata):
    fig = cs.pl.patch_gallery(mdata, "cell_type", n=3, size=32, mpp=1.0)
    axes = np.asarray(fig.axes).reshape(len(CLASSES), 3)
    assert [a.get_ylabel().split("\n")[0] for a in axes[:, 0]] == CLASSES
    assert all(a.get_ylabel().endswith("(n=60)") for a in axes[:, 0])
    ids = [a.get_title() for a in axes.ravel()]
    assert all(ids)
    for r, row in enumerate(axes):
        for a in row:
            assert mdata.obs.loc[a.get_title(), "cell_type"] == CLASSES[r]
    patches = cs.pp.cell_patches(mdata, cells=ids, size=32, mpp=1.0)
    for a, p in zip(axes.ravel(), patches, strict=True):
        np.testing.assert_array_equal(np.asarray(a.images[0].get_array()), p)
    # same seed, same cells
    fig2 = cs.pl.patch_gallery(mdata, "cell_type", n=3, size=32, mpp=1.0)
    assert [a.get_title() for a in fig2.axes] == ids


def test_patch_gallery_groups_keep_their_stored_colours(mdata):
    # uns["<key>_colors"] follows the full category order: a subset of groups keeps each group's
    # colour (as in cs.pl.spatial), not the colours of the first len(groups) categories
    from matplotlib.colors import to_hex

    data = mdata.copy()
    data.uns["cell_type_colors"] = ["#000000", "#ff0000", "#00ff00", "#0000ff"]
    cats = list(data.obs["cell_type"].cat.categories)
    fig = cs.pl.patch_gallery(data, "cell_type", groups=[cats[2]], n=2, size=32, mpp=1.0)
    assert to_hex(fig.axes[0].yaxis.label.get_color()) == "#00ff00"
    assert to_hex(next(iter(fig.axes[0].spines.values())).get_edgecolor()) == "#00ff00"


def test_show_none_leaves_a_given_figure_to_the_caller(mdata, monkeypatch):
    # in a notebook (an interactive backend), drawing one panel of the caller's figure must not show it:
    # the inline backend closes a shown figure, and the later panels would be lost
    shown = []
    monkeypatch.setattr(matplotlib, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    fig, axes = plt.subplots(1, 2)
    cs.pl.spatial(mdata, "cell_type", ax=axes[0], he=False)
    cs.pl.spatial(mdata, "cell_type", ax=axes[1], he=False)
    assert shown == [] and len(axes[1].collections) == 1
    cs.pl.spatial(mdata, "cell_type", he=False)  # a figure of its own is shown
    assert shown == [1]
    cs.pl.spatial(mdata, "cell_type", ax=axes[0], he=False, show=True)  # asked for
    assert shown == [1, 1]
    plt.close("all")
