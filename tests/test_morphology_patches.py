"""cs.pp.cell_patches: geometry through a rotated / scaled / flipped registration, antialiasing, tiles."""

from __future__ import annotations

import numpy as np
import pytest
from morphology_helpers import HE_MPP, PIXEL_SIZE, draw_disc, make_mudata, rotated_alignment, write_he

import cellsymphony as cs
from cellsymphony._registration import he_px_to_um, um_to_he_px
from cellsymphony.pp._patch_geometry import grid_patch_origin, spatial_order
from cellsymphony.pp._patch_source import PatchSource

MARKERS = {  # colour -> offset from the cell (micrometres, x right, y down)
    "red": ((255, 0, 0), (20.0, 0.0)),
    "blue": ((0, 0, 255), (0.0, 30.0)),
    "green": ((0, 255, 0), (-25.0, -15.0)),
}


def _centroid(patch: np.ndarray, colour: str) -> np.ndarray:
    d = 255.0 - patch.astype(np.float64)
    r, g, b = d[..., 0], d[..., 1], d[..., 2]
    w = {"red": g * (r < 60) * (b > 100), "blue": g * (b < 60) * (r > 100), "green": r * (g < 60) * (b > 100)}[colour]
    assert w.sum() > 0, f"{colour} marker not in the patch"
    rows, cols = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]]
    return np.array([(cols * w).sum() / w.sum(), (rows * w).sum() / w.sum()])


@pytest.fixture(scope="module", params=["YXS", "CYX"])
def marker_slide(request, tmp_path_factory):
    align = rotated_alignment(angle_deg=30.0, scale=1.1, flip=True)
    img = np.full((800, 900, 3), 255, dtype=np.uint8)
    centre = he_px_to_um([[450.0, 400.0]], align, PIXEL_SIZE)[0]
    for colour, offset in MARKERS.values():
        p = um_to_he_px(centre + np.array(offset), align, PIXEL_SIZE)[0]
        draw_disc(img, p, 3.0 / HE_MPP, colour)
    path = write_he(tmp_path_factory.mktemp("markers") / f"markers_{request.param}.ome.tif", img, axes=request.param)
    return path, align, centre


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("mpp", "size"), [(0.5, 224), (1.2, 128)])
def test_markers_land_at_expected_patch_pixels(marker_slide, mpp, size, exact):
    path, align, centre = marker_slide
    m = make_mudata(np.array([centre, centre + [500.0, 0.0]]), path, align)
    patches = cs.pp.cell_patches(m, size=size, mpp=mpp, exact=exact)
    assert patches.shape == (2, size, size, 3)
    assert patches.dtype == np.uint8
    # exact: the nucleus at patch coordinate size / 2; bands: at its recorded sub-pixel position
    pos = np.full(2, size / 2) if exact else grid_patch_origin(centre[None], size=size, mpp=mpp)[1][0]
    assert np.abs(pos - size / 2).max() <= 0.5
    for name, (_, (dx, dy)) in MARKERS.items():
        expected = pos - 0.5 + np.array([dx, dy]) / mpp
        got = _centroid(patches[0], name)
        np.testing.assert_allclose(got, expected, atol=0.5, err_msg=f"{name} marker at mpp {mpp}")


def test_level_choice_uses_the_registration_scale(marker_slide):
    path, align, _ = marker_slide
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
    um_per_px = src.um_per_px
    assert um_per_px == pytest.approx(HE_MPP * 1.1)  # the registration's scale, not the file's 0.25
    assert src.level_for(0.5) == 0  # level 1 would be 0.55 um/px: coarser than asked
    assert src.level_for(0.6) == 1
    assert src.level_for(1.2) == 2
    src.close()


def test_off_image_cells_are_white(marker_slide):
    path, align, centre = marker_slide
    far = centre + np.array([5000.0, 5000.0])
    edge = he_px_to_um([[0.0, 400.0]], align, PIXEL_SIZE)[0]  # on the left image border
    m = make_mudata(np.array([far, edge]), path, align)
    p = cs.pp.cell_patches(m, size=64, mpp=1.0)
    assert (p[0] == 255).all()
    # the border patch: part image (white background + nothing) -> check via a textured slide below
    src = PatchSource(str(path), align, PIXEL_SIZE)
    inside = src.in_image(np.array([far, edge, centre]))
    assert inside.tolist() == [False, True, True]
    src.close()


def test_partly_outside_patch_is_white_padded(tmp_path):
    align = rotated_alignment(angle_deg=0.0, scale=1.0, flip=False)
    img = np.zeros((300, 300, 3), dtype=np.uint8)  # black slide
    path = write_he(tmp_path / "black.ome.tif", img, n_sub=0)
    corner = he_px_to_um([[0.0, 0.0]], align, PIXEL_SIZE)[0]  # cell on the top-left pixel's centre
    m = make_mudata(corner[None], path, align)
    p = cs.pp.cell_patches(m, size=40, mpp=HE_MPP)[0]
    # no rotation, same scale: left and top halves are outside (white), the rest is the black image
    assert (p[:19, :] == 255).all() and (p[:, :19] == 255).all()
    assert (p[21:, 21:] == 0).all()


def test_antialiasing_removes_fine_stripes(tmp_path):
    align = rotated_alignment(angle_deg=0.0, scale=1.0, flip=False)
    img = np.zeros((400, 400, 3), dtype=np.uint8)
    img[:, ::2] = 255  # 1-pixel stripes: 0.5 um period
    path = write_he(tmp_path / "stripes.ome.tif", img, n_sub=0)
    centre = he_px_to_um([[200.0, 200.0]], align, PIXEL_SIZE)[0]
    m = make_mudata(centre[None], path, align)
    p = cs.pp.cell_patches(m, size=48, mpp=1.0)[0].astype(float)  # 4x coarser than the slide
    assert abs(p.mean() - 127.5) < 6
    assert p.std() < 6, "stripes alias into the downsampled patch"


def test_cells_argument_order_and_nucleus_fallback(marker_slide):
    path, align, centre = marker_slide
    xy = np.array([centre, centre + [10.0, 0.0], centre + [0.0, 10.0]])
    nuc = xy.copy()
    nuc[1] = np.nan  # no nucleus: falls back to the cell centroid
    nuc[2] = centre  # nucleus elsewhere than the cell centroid
    m = make_mudata(xy, path, align, nucleus_xy=nuc)
    allp = cs.pp.cell_patches(m, size=32, mpp=1.0)
    np.testing.assert_array_equal(allp[2], allp[0])  # centred on the nucleus, not the cell
    assert not np.array_equal(allp[1], allp[0])
    by_name = cs.pp.cell_patches(m, cells=["cell2", "cell0"], size=32, mpp=1.0)
    np.testing.assert_array_equal(by_name, allp[[2, 0]])
    by_mask = cs.pp.cell_patches(m, cells=np.array([False, True, False]), size=32, mpp=1.0)
    np.testing.assert_array_equal(by_mask, allp[[1]])
    with pytest.raises(ValueError, match="not cells"):
        cs.pp.cell_patches(m, cells=["nope"])


def test_spatial_order_decodes_fewer_tiles(tmp_path):
    rng = np.random.default_rng(1)
    align = rotated_alignment(angle_deg=0.0, scale=1.0, flip=False)
    img = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    path = write_he(tmp_path / "noise.ome.tif", img, n_sub=0, tile=64)
    xy = he_px_to_um(rng.uniform(50, 970, (150, 2)), align, PIXEL_SIZE)
    counts = {}
    for name, order in {"random": rng.permutation(150), "spatial": spatial_order(xy, band=32 * 0.5)}.items():
        src = PatchSource(str(path), align, PIXEL_SIZE, cache_tiles=64)
        src.read(xy[order], size=32, mpp=0.5)
        counts[name] = src.he.tiles_decoded
        src.close()
    n_tiles = 16 * 16
    assert counts["spatial"] <= n_tiles  # every tile decoded at most once
    assert counts["random"] > 1.5 * counts["spatial"]


def test_missing_he_registry_errors(marker_slide):
    path, align, centre = marker_slide
    m = make_mudata(centre[None], path, align)
    m.uns["cellsymphony"]["samples"]["s1"]["he_path"] = ""
    with pytest.raises(ValueError, match=r"read_xenium\(path, he_image="):
        cs.pp.cell_patches(m)
    m.uns["cellsymphony"]["samples"] = {}
    with pytest.raises(ValueError, match="No H&E is registered"):
        cs.pp.cell_patches(m)
