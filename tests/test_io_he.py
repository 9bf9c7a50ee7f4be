"""cs.io.read_he: SVS, OME-TIFF (YXS and CYX pyramids), plain tiled TIFF, tile cache, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile

import cellsymphony as cs


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 7) % 256, (yy * 5) % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    img[rng.random((h, w)) < 0.01] = 0
    return img


def _write_ome(
    path, img: np.ndarray, axes: str, *, mpp: float = 0.25, n_sub: int = 2, tile: int = 128
) -> list:
    """An OME-TIFF pyramid in SubIFDs; returns the levels as (h, w, 3) arrays."""
    levels = [img]
    for i in range(1, n_sub + 1):
        levels.append(img[:: 2**i, :: 2**i])
    planar = axes == "CYX"
    kw = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    if planar:
        kw["planarconfig"] = "separate"
    with tifffile.TiffWriter(path, ome=True) as w:
        for i, lev in enumerate(levels):
            data = np.moveaxis(lev, -1, 0) if planar else lev
            if i == 0:
                w.write(
                    data,
                    subifds=n_sub,
                    metadata={"axes": axes, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
                    **kw,
                )
            else:
                w.write(data, subfiletype=1, **kw)
    return levels


@pytest.fixture(scope="module")
def svs(shared_data):
    path = shared_data / "he" / "cmu_small_region.svs"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def ome_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ome")
    img = _rgb(700, 1000)
    out = {}
    for axes in ("YXS", "CYX"):
        p = d / f"slide_{axes}.ome.tif"
        out[axes] = (p, _write_ome(p, img, axes))
    return out


def test_svs_real_file(svs):
    with cs.io.read_he(svs) as he:
        assert he.mpp == pytest.approx(0.499)
        # the thumbnail, label and macro images are not pyramid levels
        assert he.n_levels == 1
        assert he.shapes == [(2967, 2220)]
        assert he.downsamples == [1.0]
        assert he.tile_shape(0) == (240, 240)
        assert he.tiles_decoded == 0
        full = tifffile.imread(svs)  # the baseline series
        region = he.read_region(100, 200, 500, 400)
        assert region.dtype == np.uint8
        assert region.shape == (400, 500, 3)
        np.testing.assert_array_equal(region, full[200:600, 100:600])
        # 500 x 400 at (100, 200) touches tile columns 0-2 and rows 0-2 of 240-pixel tiles
        assert he.tiles_decoded == 9
        # a second read of the same area is served from the cache
        he.read_region(150, 250, 300, 300)
        assert he.tiles_decoded == 9
        # beyond the right and bottom edge: white
        edge = he.read_region(2000, 2800, 500, 400)
        np.testing.assert_array_equal(edge[:167, :220], full[2800:, 2000:])
        assert (edge[167:] == 255).all()
        assert (edge[:, 220:] == 255).all()


def test_region_outside_image_is_white_and_decodes_nothing(svs):
    he = cs.io.read_he(svs)
    out = he.read_region(-500, -500, 100, 50)
    assert out.shape == (50, 100, 3)
    assert (out == 255).all()
    assert he.tiles_decoded == 0
    part = he.read_region(-10, -20, 30, 40)
    assert (part[:20] == 255).all()
    assert (part[:, :10] == 255).all()
    assert not (part[20:, 10:] == 255).all()
    he.close()


def test_lru_cache_size(svs):
    he = cs.io.read_he(svs, cache_tiles=1)
    he.read_region(0, 0, 10, 10)
    he.read_region(300, 0, 10, 10)  # another tile evicts the first
    he.read_region(0, 0, 10, 10)
    assert he.tiles_decoded == 3
    nocache = cs.io.read_he(svs, cache_tiles=0)
    nocache.read_region(0, 0, 10, 10)
    nocache.read_region(0, 0, 10, 10)
    assert nocache.tiles_decoded == 2


@pytest.mark.parametrize("axes", ["YXS", "CYX"])
def test_ome_pyramid(ome_files, axes):
    path, levels = ome_files[axes]
    he = cs.io.read_he(path)
    assert he.mpp == pytest.approx(0.25)
    assert he.n_levels == 3
    assert he.shapes == [(700, 1000), (350, 500), (175, 250)]
    assert he.downsamples == pytest.approx([1.0, 2.0, 4.0])
    assert he.level_mpp(2) == pytest.approx(1.0)
    assert he.best_level(0.25) == 0
    assert he.best_level(0.6) == 1
    assert he.best_level(10) == 2
    assert he.best_level(0.1) == 0
    assert he.tile_shape(1) == (128, 128)
    for lev, truth in enumerate(levels):
        got = he.read_region(30, 40, 200, 150, level=lev)
        expected = np.full((150, 200, 3), 255, np.uint8)
        part = truth[40:190, 30:230]
        expected[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="level must be"):
        he.read_region(0, 0, 5, 5, level=3)


def test_plain_tiled_tiff_resolution_tags_and_mpp_argument(tmp_path):
    img = _rgb(300, 400)
    tagged = tmp_path / "tagged.tif"
    tifffile.imwrite(
        tagged,
        img,
        tile=(64, 64),
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    he = cs.io.read_he(tagged)
    assert he.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(he.read_region(0, 0, 400, 300), img)
    assert cs.io.read_he(tagged, mpp=0.3).mpp == pytest.approx(0.3)

    # a pyramid stored as separate pages, without any pixel size
    bare = tmp_path / "bare.tif"
    with tifffile.TiffWriter(bare) as w:
        w.write(img, tile=(64, 64), photometric="rgb")
        w.write(img[::2, ::2], tile=(64, 64), photometric="rgb")
    with pytest.raises(ValueError, match=r"bare\.tif.*records no pixel size.*mpp="):
        cs.io.read_he(bare)
    he = cs.io.read_he(bare, mpp=0.5)
    assert he.shapes == [(300, 400), (150, 200)]
    np.testing.assert_array_equal(he.read_region(10, 10, 50, 50, level=1), img[::2, ::2][10:60, 10:60])
    with pytest.raises(ValueError, match="mpp must be a positive"):
        cs.io.read_he(bare, mpp=-1)


def test_grey_and_uint16_become_rgb8(tmp_path):
    grey = (np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10).astype(np.uint16)
    p = tmp_path / "grey.tif"
    tifffile.imwrite(p, grey, tile=(32, 32))
    he = cs.io.read_he(p, mpp=1.0)
    out = he.read_region(0, 0, 96, 64)
    assert out.shape == (64, 96, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    expected = np.round(grey.astype(float) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 1], expected)


def _every_tile_both_ways(he) -> tuple[list[bool], int]:
    """Each level's use of the direct tile decoding, after checking every tile of every level against
    tifffile's zarr store (the path of the other layouts)."""
    used = [lay["page"] is not None for lay in he._layouts]
    n = 0
    for level, lay in enumerate(he._layouts):
        th, tw = he.tile_shape(level)
        h, w = he.shapes[level]
        for ty in range(-(-h // th)):
            for tx in range(-(-w // tw)):
                direct = he._tile(level, ty, tx)
                page, lay["page"] = lay["page"], None
                try:
                    store = he._tile(level, ty, tx)
                finally:
                    lay["page"] = page
                assert direct.shape == store.shape == (min(th, h - ty * th), min(tw, w - tx * tw), 3)
                np.testing.assert_array_equal(direct, store, err_msg=f"{he.path.name} level {level} tile {ty},{tx}")
                n += 1
    return used, n


@pytest.mark.parametrize(
    ("kind", "direct"),
    [("jpeg", True), ("zlib", True), ("rgba", True), ("grey16", True), ("planar", False), ("strips", False)],
)
def test_tiles_decoded_from_the_file_equal_tifffiles_store(tmp_path, kind, direct):
    """A tiled, interleaved page's tiles are decoded straight from the file (the codec without the zarr store's
    round trip); they equal the store's, edge tiles cropped, on every level. Planar and stripped files keep
    the store."""
    img = _rgb(300, 457)
    p = tmp_path / f"{kind}.tif"
    if kind in ("jpeg", "zlib"):
        with tifffile.TiffWriter(p, ome=True) as w:
            w.write(img, subifds=1, tile=(128, 128), photometric="rgb", compression=kind,
                    metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
            w.write(img[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb", compression=kind)
    elif kind == "rgba":
        tifffile.imwrite(p, np.concatenate([img, np.full((300, 457, 1), 255, np.uint8)], -1), tile=(64, 64),
                         photometric="rgb", extrasamples=["unassalpha"], compression="zlib")
    elif kind == "grey16":
        tifffile.imwrite(p, img[..., 0].astype(np.uint16) * 257, tile=(64, 64))
    elif kind == "planar":
        tifffile.imwrite(p, np.moveaxis(img, -1, 0), tile=(64, 64), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(p, img, photometric="rgb", rowsperstrip=16)
    he = cs.io.read_he(p, mpp=0.25, cache_tiles=0)
    used, n = _every_tile_both_ways(he)
    assert used == [direct] * he.n_levels and n >= 8
    if kind in ("zlib", "rgba", "planar", "strips"):  # lossless: the pixels written
        np.testing.assert_array_equal(he.read_region(0, 0, 457, 300), img)


def test_real_slide_tiles_decoded_from_the_file_equal_tifffiles_store(svs):
    """The Aperio slide (JPEG tiles with shared JPEG tables) through the direct decoding: every tile as the store's."""
    used, n = _every_tile_both_ways(cs.io.read_he(svs, cache_tiles=0))
    assert all(used) and n > 100


def test_pickle_reopens(ome_files):
    path, levels = ome_files["YXS"]
    he = cs.io.read_he(path, cache_tiles=8)
    copy = pickle.loads(pickle.dumps(he))
    assert copy.shapes == he.shapes
    assert copy.mpp == he.mpp
    assert copy.cache_tiles == 8
    np.testing.assert_array_equal(copy.read_region(0, 0, 20, 20), levels[0][:20, :20])


def test_errors_name_the_file(tmp_path, svs):
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        cs.io.read_he(tmp_path / "missing.svs")
    junk = tmp_path / "junk.ome.tif"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match=r"Cannot read H&E image .*junk\.ome\.tif"):
        cs.io.read_he(junk)
    with pytest.raises(ValueError, match="is a folder"):
        cs.io.read_he(tmp_path)
    # a truncated copy of a real slide: opening or reading fails with the file's name, not a codec traceback
    cut = tmp_path / "cut.svs"
    cut.write_bytes(svs.read_bytes()[:700_000])

    def open_and_read():
        cs.io.read_he(cut).read_region(0, 0, 2220, 2967)

    with pytest.raises(ValueError, match=r"cut\.svs"):
        open_and_read()


def test_ome_pixel_size_of_the_slide_not_of_a_macro_listed_first(tmp_path):
    """An OME-TIFF listing a macro image before the slide: mpp is the slide's PhysicalSizeX."""
    path = tmp_path / "macro_first.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(np.zeros((64, 96, 3), np.uint8), photometric="rgb",
                 metadata={"axes": "YXS", "Name": "macro", "PhysicalSizeX": 20.0, "PhysicalSizeY": 20.0})
        tw.write(_rgb(512, 512), photometric="rgb", tile=(256, 256),
                 metadata={"axes": "YXS", "Name": "slide", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with cs.io.read_he(path) as he:
        assert he.shapes[0] == (512, 512)
        assert he.mpp == pytest.approx(0.5)
