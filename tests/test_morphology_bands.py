"""Band extraction (the default of cs.pp.cell_patches / embed_morphology): agreement with the exact per-cell
warp through rotated, flipped and non-rigid registrations, one resampling per block, memory bounded by a
few bands, the cache fingerprint, and a damaged tile."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from morphology_helpers import (
    HE_MPP,
    PIXEL_SIZE,
    draw_disc,
    make_mudata,
    quiet_morphology,
    rotated_alignment,
    write_he,
)

import cellsymphony as cs
from cellsymphony._registration import he_px_to_um, um_to_he_px
from cellsymphony.pp import _bands
from cellsymphony.pp._patch_geometry import grid_patch_origin, spatial_order
from cellsymphony.pp._patch_source import PatchSource, resample_region

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _quiet():
    yield from quiet_morphology()


def _tissue_image(h: int, w: int, seed: int) -> np.ndarray:
    """Tissue-like pixels: smooth stain variation, blurred grain and dark nuclei (no single-pixel noise, as
    a scanner's optics never give)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grain = gaussian_filter(rng.normal(0, 1, (h, w)), 1.5)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([225 + 15 * np.sin(xx / 23.0) + 40 * grain, 170 + 25 * np.cos(yy / 31.0) + 40 * grain,
                    205 + 20 * np.sin((xx + yy) / 27.0) + 30 * grain], axis=-1)  # fmt: skip
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(60):
        draw_disc(img, rng.uniform(20, [w - 20, h - 20]), rng.uniform(8, 18), (80, 40, 130))
    return img


def _cells(align, shape, n, seed, margin=120):
    h, w = shape
    rng = np.random.default_rng(seed)
    return he_px_to_um(rng.uniform([margin, margin], [w - margin, h - margin], (n, 2)), align, PIXEL_SIZE)


def _section(tmp_path, side: int, n: int, *, image_seed: int, cells_seed: int, margin: int = 120, missing=None):
    """A square tissue slide under the default rotated registration and a section of ``n`` cells on it (the cell
    ``missing`` without a position): ``(mudata, centres, alignment, slide path)``."""
    align = rotated_alignment()
    img = _tissue_image(side, side, seed=image_seed)
    path = write_he(tmp_path / "t.ome.tif", img)
    xy = _cells(align, img.shape[:2], n, seed=cells_seed, margin=margin)
    if missing is not None:
        xy[missing] = np.nan
    return make_mudata(xy, path, align), xy, align, path


@pytest.mark.parametrize(("angle", "flip"), [(30.0, True), (-75.0, False), (180.0, True)])
def test_band_patches_agree_with_the_exact_warp(tmp_path, angle, flip):
    align = rotated_alignment(angle_deg=angle, scale=1.1, flip=flip)
    img = _tissue_image(700, 800, seed=int(angle) % 7)
    path = write_he(tmp_path / "t.ome.tif", img)
    xy = _cells(align, img.shape[:2], 25, seed=1)
    m = make_mudata(xy, path, align)
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
    inner = (slice(None), slice(2, -2), slice(2, -2))
    for size, mpp in ((64, 0.5), (48, 1.0)):
        band = cs.pp.cell_patches(m, size=size, mpp=mpp)
        # today's exact warp on the band's own pixel grid: the same samples, within 2 grey levels ignoring a
        # 2 px border (in fact the rounding of a few pixels)
        origin, pos = grid_patch_origin(xy, size=size, mpp=mpp)
        same = src.read((origin + size / 2) * mpp, size=size, mpp=mpp)
        diff = np.abs(band.astype(int) - same)
        assert diff[inner].mean() <= 2.0 and diff.max() <= 1 and diff.mean() < 0.05
        # the exact warp centred on the nucleus samples the tissue up to half a pixel over: close, not equal
        exact = cs.pp.cell_patches(m, size=size, mpp=mpp, exact=True)
        shifted = np.abs(band[inner].astype(float) - exact[inner]).mean()
        assert 0.1 < shifted < 8.0
        # the nucleus's recorded position is where the slide has it: the patch pixel at pos maps back to it
        px = um_to_he_px((origin + pos) * mpp, align, PIXEL_SIZE)
        np.testing.assert_allclose(px, um_to_he_px(xy, align, PIXEL_SIZE), atol=1e-6)
    src.close()


def test_non_rigid_bands_follow_the_field(tmp_path):
    """Under a non-rigid field a band is mapped pixel by pixel: it agrees with the exact warp (which uses the
    field's local affine at each cell) and puts a marker where the field says."""
    align = rotated_alignment(angle_deg=20.0, scale=1.0, flip=True)
    img = _tissue_image(700, 800, seed=3)
    ys, xs = np.mgrid[0:8, 0:9]
    field = np.stack([6.0 * np.sin(xs / 2.5), 5.0 * np.cos(ys / 3.0)], axis=-1)  # micrometres
    warp = {"grid_um": field, "origin_px": np.array([0.0, 0.0]), "step_px": 100.0}
    centre_px = np.array([400.0, 350.0])
    draw_disc(img, centre_px, 10.0, (0, 255, 0))
    path = write_he(tmp_path / "w.ome.tif", img)
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP, warp=warp)
    xy = he_px_to_um(np.random.default_rng(2).uniform(150, 550, (12, 2)), align, PIXEL_SIZE, warp)
    size, mpp = 64, 0.5
    origin, pos = grid_patch_origin(xy, size=size, mpp=mpp)
    sched_centres = [xy]
    [(_, band)] = list(_bands.band_patches(src, sched_centres, size=size, mpp=mpp, level=src.level_for(mpp)))
    band = band.numpy()
    exact = src.read((origin + size / 2) * mpp, size=size, mpp=mpp)  # its local affine, on the band's grid
    assert np.abs(band[:, 2:-2, 2:-2].astype(float) - exact[:, 2:-2, 2:-2]).mean() <= 2.0
    assert np.abs(pos - size / 2).max() <= 0.5
    # the green marker, through the field, lands at its micrometre position in a band
    c_um = he_px_to_um(centre_px[None], align, PIXEL_SIZE, warp)[0]
    x0, y0 = c_um - 16 * mpp
    blk = src.read_band(x0, y0, 32, 32, mpp=mpp).astype(float)
    wgt = (255 - blk[..., 0]) * (blk[..., 1] > 150) * (blk[..., 2] < 120)
    rows, cols = np.mgrid[0:32, 0:32]
    got = np.array([(cols * wgt).sum(), (rows * wgt).sum()]) / wgt.sum()
    np.testing.assert_allclose(got, [15.5, 15.5], atol=0.35)
    src.close()


def test_each_block_once_and_a_few_bands_resident(tmp_path):
    """Every block is resampled once and freed after its last batch; the most blocks held at once follows
    the width of the tissue, not the number of cells (4x the cells on a 4x taller strip: the same peak)."""
    align = rotated_alignment(angle_deg=0.0, scale=1.0, flip=False)
    img = np.full((1600, 500, 3), 200, dtype=np.uint8)
    path = write_he(tmp_path / "strip.ome.tif", img, n_sub=0)
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
    size, mpp, block = 32, 1.0, 32
    peaks = []
    for n, rows in ((150, 400), (600, 1600)):
        rng = np.random.default_rng(n)
        xy = he_px_to_um(rng.uniform([0, 0], [500, rows], (n, 2)), align, PIXEL_SIZE)
        order = spatial_order(xy, band=block * mpp, anchor=0.0)
        centres = [xy[order[k : k + 16]] for k in range(0, n, 16)]
        stats = _bands.BandStats()
        got = list(_bands.band_patches(src, centres, size=size, mpp=mpp, level=0, stats=stats, block=block))
        sched = _bands.schedule(centres, size=size, mpp=mpp, block=block)
        assert stats.blocks_resampled == sched.n_blocks  # each block once
        assert [i for i, _ in got] == list(range(len(centres)))
        for (_, p), c in zip(got[:3], centres[:3], strict=True):  # the windows are the exact warp's samples
            origin, _ = grid_patch_origin(c, size=size, mpp=mpp)
            assert np.abs(p.numpy().astype(int) - src.read((origin + size / 2) * mpp, size=size, mpp=mpp)).max() <= 1
        peaks.append(stats.peak_blocks)
    cols = int(np.ceil(500 * PIXEL_SIZE * 1.0 / PIXEL_SIZE * HE_MPP / (block * mpp))) + 2
    assert peaks[1] <= peaks[0] + 2  # independent of the number of cells
    assert peaks[1] <= 3 * cols  # about two bands of blocks (plus the turn of the serpentine)
    src.close()


@pytest.mark.parametrize("non_rigid", [False, True])
def test_each_tile_decoded_once_and_dropped_after_its_last_block(tmp_path, non_rigid):
    """The tile plan: through a rotated registration (and a non-rigid field on top of it, whose plan maps each
    block's field lattice) each slide tile is decoded once (whatever the cache size the source was given),
    dropped after the last block that needs it, and at most the tiles under a few bands are held: fewer than a
    third of a tall strip's tiles, the same for 4x the cells on a 4x taller strip."""
    align = rotated_alignment(angle_deg=20.0, scale=1.0, flip=True)
    peaks = []
    for n, rows in ((150, 400), (600, 1600)):
        path = write_he(tmp_path / f"strip{rows}.ome.tif", np.full((rows, 500, 3), 200, dtype=np.uint8), n_sub=0, tile=64)
        warp = None
        if non_rigid:
            ys, xs = np.mgrid[0 : rows // 100 + 2, 0:7]
            field = np.stack([6.0 * np.sin(xs / 2.5), 5.0 * np.cos(ys / 3.0)], axis=-1)  # micrometres
            warp = {"grid_um": field, "origin_px": np.array([0.0, 0.0]), "step_px": 100.0}
        src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP, cache_tiles=4, warp=warp)  # an LRU far too small
        rng = np.random.default_rng(n)
        xy = he_px_to_um(rng.uniform([40, 40], [460, rows - 40], (n, 2)), align, PIXEL_SIZE, warp)
        size, mpp, block = 32, 1.0, 32
        order = spatial_order(xy, band=block * mpp, anchor=0.0)
        centres = [xy[order[k : k + 16]] for k in range(0, n, 16)]
        sched = _bands.schedule(centres, size=size, mpp=mpp, block=block)
        needed = {t for keys in sched.new for bx, by in keys
                  for t in src.band_tiles(bx * block * mpp, by * block * mpp, block, block, mpp=mpp, level=0)}  # fmt: skip
        stats = _bands.BandStats()
        for _ in _bands.band_patches(src, centres, size=size, mpp=mpp, level=0, stats=stats, block=block):
            pass
        assert src.he.tiles_decoded == len(needed)  # each once
        assert len(src.he._cache) == 0  # all dropped after their last block
        assert src.cache_tiles == 4 and src.he.cache_tiles == 4  # the source's own setting is back
        assert stats.peak_tiles > 0
        peaks.append((stats.peak_tiles, len(needed)))
        src.close()
    assert peaks[1][0] < peaks[1][1] / 3
    assert peaks[1][0] <= peaks[0][0] + 4  # independent of the number of cells


def test_a_workers_source_keeps_tiles_for_its_next_chunk(tmp_path):
    """A cluster worker streams its chunks one by one: with keep_tiles (what the worker cache sets) the blocks
    and tiles that neighbouring chunks share are resampled and decoded once for all of them, not once per
    chunk, and the patches are the same; the tile cache holds at most the plan's peak and keep_tiles more."""
    from cellsymphony._distributed import WorkerCache
    from cellsymphony.pp._morphology_runner import plan

    align = rotated_alignment(angle_deg=20.0, scale=1.0, flip=True)
    path = write_he(tmp_path / "t.ome.tif", _tissue_image(900, 500, seed=4), n_sub=0, tile=64)
    rng = np.random.default_rng(0)
    xy = he_px_to_um(rng.uniform([40, 40], [460, 860], (900, 2)), align, PIXEL_SIZE)
    chunks = plan(xy, mode="cell", size=32, mpp=1.0, batch_size=16, chunk_size=100, exact=False)
    assert len(chunks) >= 6
    got = {}
    for keep in (False, True):
        src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
        if keep:
            src = WorkerCache().source(src)
            assert src.keep_tiles == _bands.WORKER_KEEP_TILES
        peak, patches, resampled = 0, [], 0
        for ch in chunks:
            stats = _bands.BandStats()
            for _, p in _bands.band_patches(src, [b.centres for b in ch.work], size=32, mpp=1.0, level=0,
                                            stats=stats, block=32):  # fmt: skip
                patches.append(p.numpy())
            peak = max(peak, stats.peak_tiles)
            resampled += stats.blocks_resampled
            assert len(src.he._cache) <= peak + 8 + src.keep_tiles
        got[keep] = (src.he.tiles_decoded, resampled, np.concatenate(patches))
        src.close()
    scheds = [_bands.schedule([b.centres for b in ch.work], size=32, mpp=1.0, block=32) for ch in chunks]
    blocks = {k for sc in scheds for keys in sc.new for k in keys}
    tiles = {t for bx, by in blocks for t in src.band_tiles(bx * 32.0, by * 32.0, 32, 32, mpp=1.0, level=0)}
    assert got[True][1] == len(blocks) < got[False][1] == sum(sc.n_blocks for sc in scheds)  # once each
    assert got[True][0] == len(tiles) < got[False][0]
    np.testing.assert_array_equal(got[True][2], got[False][2])


def test_gather_equals_the_canvas_and_the_slice_copies():
    """The GPU's one-gather cutting (run here on the CPU) gives the CPU's canvas windows, and both give the
    slice copies a sparse batch (blocks far apart, beyond CANVAS_SLACK) takes, also when cut into given rows."""
    import torch

    rng = np.random.default_rng(0)
    store = {(bx, by): torch.from_numpy(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
             for bx in range(-1, 3) for by in range(4)}  # fmt: skip
    big = np.concatenate([np.concatenate([store[(bx, by)].numpy() for bx in range(-1, 3)], axis=1) for by in range(4)])
    for size in (10, 40):  # within 2 x 2 blocks, and patches larger than a block (3 x 3)
        hi = 64 - size
        origins = np.stack([rng.integers(-16, -16 + hi + 1, 30), rng.integers(0, hi + 1, 30)], axis=1)
        a = _bands.cut(store, origins, size, 16).numpy()
        np.testing.assert_array_equal(a, _bands.gather(store, origins, size, 16).numpy())
        far = {**store, (40, 40): store[(0, 0)]}  # a 42 x 41 rectangle for 17 blocks: sliced, not a canvas
        assert _bands.CANVAS_SLACK * len(far) < 42 * 41
        np.testing.assert_array_equal(_bands.cut(far, origins, size, 16).numpy(), a)
        rows = rng.permutation(40)[:30]  # cut straight into rows of a larger array (cs.pp.cell_patches), both ways
        for blocks in (store, far):
            dest = np.full((40, size, size, 3), 7, np.uint8)
            assert _bands.cut(blocks, origins, size, 16, dest, rows) is dest
            np.testing.assert_array_equal(dest[rows], a)
            assert (np.delete(dest, rows, axis=0) == 7).all()
        for i in (0, 4, 29):
            ox, oy = origins[i]
            np.testing.assert_array_equal(a[i], big[oy : oy + size, ox + 16 : ox + 16 + size])


@pytest.mark.parametrize(("mpp", "blurred"), [(0.3, False), (1.2, True)])
def test_opencv_resampling_one_tap_and_blurred_paths(tmp_path, mpp, blurred):
    """A downsampling under about 1.47 has a one-tap kernel: the uint8 pixels are warped in OpenCV's fixed
    point, without the low-pass; a larger one blurs in float32. Both agree with the torch engine and with
    the exact per-patch warp on the same samples to the rounding (1 grey level, in few pixels)."""
    import torch

    from cellsymphony.pp._patch_source import PatchSource, blur_kernel, resample_region

    align = rotated_alignment(angle_deg=25.0, scale=1.2, flip=True)
    path = write_he(tmp_path / "t.ome.tif", _tissue_image(500, 500, seed=7))
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
    x0, y0 = he_px_to_um([[230.0, 240.0]], align, PIXEL_SIZE)[0]
    reg = src.band_region(x0, y0, 48, 48, mpp=mpp, level=0)
    assert (len(blur_kernel(reg["sigma"])) > 1) == blurred
    band = src.read_band(x0, y0, 48, 48, mpp=mpp, level=0)
    assert band.dtype == np.uint8 and band.shape == (48, 48, 3)
    reg["region"] = torch.from_numpy(reg["region"])
    d = np.abs(resample_region(reg, 48, 48, device="cpu", engine="torch").numpy().astype(int) - band)
    assert d.max() <= 1 and d.mean() < 0.02
    # the exact warp of the 32 px patch whose pixels are band pixels 8..39 (band pixel u centred at x0 + (u + 0.5) mpp)
    exact = src.read(np.array([[x0 + 24 * mpp, y0 + 24 * mpp]]), size=32, mpp=mpp, level=0)[0]
    cut = band[8:40, 8:40]
    e = np.abs(exact.astype(int) - cut)[2:-2, 2:-2]
    assert e.max() <= 1 and e.mean() < 0.05
    assert len(blur_kernel(0.25)) > 1 and blur_kernel(0.2) == [1.0] and blur_kernel(0.0) == [1.0]


def test_decoded_regions_resample_as_read_band(tmp_path):
    """The GPU path's split (workers decode, the device resamples in torch) gives read_band's pixels (OpenCV on
    the CPU) to the rounding of a few pixels; here both on the CPU."""
    import torch

    align = rotated_alignment(angle_deg=40.0, scale=1.2, flip=True)
    path = write_he(tmp_path / "t.ome.tif", _tissue_image(500, 500, seed=5))
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
    x0, y0 = he_px_to_um([[250.0, 250.0]], align, PIXEL_SIZE)[0]
    reg = src.band_region(x0, y0, 40, 30, mpp=0.7)
    reg["region"] = torch.from_numpy(reg["region"]).pin_memory() if torch.cuda.is_available() else torch.from_numpy(reg["region"])
    band = src.read_band(x0, y0, 40, 30, mpp=0.7)
    np.testing.assert_array_equal(resample_region(reg, 40, 30, device="cpu").numpy(), band)  # OpenCV, as read_band
    d = np.abs(resample_region(reg, 40, 30, device="cpu", engine="torch").numpy().astype(int) - band)
    assert d.max() <= 1 and d.mean() < 0.01
    with pytest.raises(ValueError, match="engine='opencv' resamples on the CPU"):
        resample_region(reg, 40, 30, device="meta", engine="opencv")
    # the whole GPU pipeline (workers decode, the consumer resamples and cuts) run on the CPU: the same patches
    xy = he_px_to_um(np.random.default_rng(0).uniform(150, 350, (20, 2)), align, PIXEL_SIZE)
    centres = [xy[:7], xy[7:]]
    kw = {"size": 24, "mpp": 0.7, "level": src.level_for(0.7)}
    for (i, a), (j, b) in zip(_bands.band_patches(src, centres, **kw),
                              _bands.band_patches(src, centres, **kw, decode_only=True, num_workers=1), strict=True):
        assert i == j
        d = np.abs(a.numpy().astype(int) - b.numpy())
        assert d.max() <= 1 and d.mean() < 0.01
    # out= and rows=: each batch lands in its rows, cut straight in (CPU blocks) or copied from the device's batch
    want = np.concatenate([p.numpy() for _, p in _bands.band_patches(src, centres, **kw)])
    rows = [np.array([9, 0, 3, 12, 5, 1, 19]), np.array([2, 4, 6, 7, 8, 10, 11, 13, 14, 15, 16, 17, 18])]
    for decode_only in (False, True):
        dest = np.zeros((20, 24, 24, 3), np.uint8)
        got = list(_bands.band_patches(src, centres, **kw, decode_only=decode_only, out=dest, rows=rows))
        assert [i for i, _ in got] == [0, 1] and all(p is None for _, p in got)
        d = np.abs(dest[np.concatenate(rows)].astype(int) - want)
        assert d.max() <= int(decode_only) and d.mean() < 0.01
    with pytest.raises(ValueError, match="out= and rows="):
        list(_bands.band_patches(src, centres, **kw, out=dest))
    with pytest.raises(ValueError, match="width_px and height_px"):
        src.read_band(x0, y0, 0, 30)
    src.close()


def test_exact_keeps_the_old_cache_fingerprint(tmp_path):
    """exact=True names its cache as earlier versions did (their chunks are reused); bands name theirs apart."""
    from cellsymphony.pp._embed_morphology import _cache_name

    m, xy, align, path = _section(tmp_path, 600, 10, image_seed=0, cells_seed=4)
    kw = {"model": "tiny", "size": 56, "mpp": 1.0, "batch_size": 4, "chunk_size": 5, "cache_dir": tmp_path / "c"}
    cs.pp.embed_morphology(m, **kw, exact=True, key_added="e")
    cs.pp.embed_morphology(m, **kw, key_added="b")
    folders = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(folders) == 2
    old_params = {"model": "tiny", "weights_checksum": "random", "mode": "cell", "pool": "nucleus", "pool_radius_um": None,
                  "layer": -1, "size": 56, "mpp": 1.0, "tile_stride": None, "batch_size": 4, "chunk_size": 5}  # fmt: skip
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP, sample="s1")
    names = m["morphology"].obs_names.to_numpy()
    assert f"e-s1-{_cache_name(src, names, xy, old_params)}" in folders
    e, b = m["morphology"].obsm["e"], m["morphology"].obsm["b"]
    assert not np.array_equal(e, b)
    cos = (e * b).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98


def _jpeg_slide(path, img, tile=128):
    tifffile.imwrite(path, img, tile=(tile, tile), photometric="rgb", compression="jpeg",
                     metadata={"axes": "YXS", "PhysicalSizeX": HE_MPP, "PhysicalSizeY": HE_MPP})  # fmt: skip
    return path


def test_a_damaged_tile_fails_with_its_position_and_file(tmp_path):
    align = rotated_alignment(angle_deg=0.0, scale=1.0, flip=False)
    img = _tissue_image(512, 512, seed=1)
    path = _jpeg_slide(tmp_path / "broken.ome.tif", img)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[5], page.databytecounts[5]  # tile row 1, column 1 of a 4 x 4 grid
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * n)
    inside = he_px_to_um([[190.0, 190.0]], align, PIXEL_SIZE)
    elsewhere = he_px_to_um([[450.0, 60.0]], align, PIXEL_SIZE)
    m = make_mudata(np.vstack([elsewhere, inside]), path, align)
    msg = rf"{os.path.basename(path)}.*tile row 1, column 1.*band x .* um"
    with pytest.raises(ValueError, match=msg):
        cs.pp.cell_patches(m, size=32, mpp=0.5)
    for workers in (0, 1):
        with pytest.raises(ValueError, match=r"tile row 1, column 1"):
            cs.pp.embed_morphology(m, model="tiny", size=56, mpp=0.5, num_workers=workers)
    assert "X_tiny" not in m["morphology"].obsm  # nothing written: no silent NaN rows
    # the cell away from the damaged tile reads fine on its own
    ok = make_mudata(elsewhere, path, align)
    assert cs.pp.cell_patches(ok, size=32, mpp=0.5).shape == (1, 32, 32, 3)


def test_cells_without_a_position_are_white(tmp_path):
    m, xy, *_ = _section(tmp_path, 400, 3, image_seed=2, cells_seed=0, margin=100, missing=1)
    band, exact = (cs.pp.cell_patches(m, size=32, mpp=0.5, exact=e) for e in (False, True))
    assert (band[1] == 255).all() and (exact[1] == 255).all()
    assert band[0].mean() < 250 and np.abs(band[[0, 2]].astype(float) - exact[[0, 2]]).mean() < 8
    with pytest.raises(ValueError, match="finite centres"):
        _bands.schedule([xy], size=32, mpp=0.5)


def test_patches_into_a_memory_map_and_too_many_for_memory_refused(tmp_path, monkeypatch):
    """out= (a memory-mapped .npy) gets the same patches, white where a cell has none whatever it held; a new
    array larger than the memory available is refused before anything is read, naming out=."""
    import cellsymphony._memory as memory

    m, *_ = _section(tmp_path, 400, 5, image_seed=3, cells_seed=1, margin=100, missing=3)
    want = cs.pp.cell_patches(m, size=32, mpp=0.5)
    for exact in (False, True):
        mm = np.lib.format.open_memmap(tmp_path / f"p{exact}.npy", mode="w+", dtype=np.uint8, shape=(5, 32, 32, 3))
        mm[...] = 7
        got = cs.pp.cell_patches(m, size=32, mpp=0.5, out=mm, exact=exact)
        assert got is mm
        mm.flush()
        back = np.load(tmp_path / f"p{exact}.npy")
        assert (back[3] == 255).all()
        if not exact:
            np.testing.assert_array_equal(back, want)
    with pytest.raises(ValueError, match=r"out= must be a uint8 array of shape \(5, 32, 32, 3\)"):
        cs.pp.cell_patches(m, size=32, mpp=0.5, out=np.zeros((5, 32, 32, 3), np.float32))
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    with pytest.raises(ValueError, match=r"5 patches of 32 x 32 px are 0\.0 GB, but 0\.0 GB .*open_memmap"):
        cs.pp.cell_patches(m, size=32, mpp=0.5)
    mm = np.zeros((5, 32, 32, 3), np.uint8)
    np.testing.assert_array_equal(cs.pp.cell_patches(m, size=32, mpp=0.5, out=mm), want)  # out=: no check


def test_the_field_lattice_interpolates_as_bilinear_sampling():
    """A non-rigid band's grid (every pixel from the field's lattice of every 8th pixel) equals scipy's bilinear
    sampling of the lattice, stays within the lattice's bounds (which the tile plan uses), and is undefined only
    where an undefined lattice point weighs: the 15 x 15 pixels around an interior one (the products of the
    defined lattice and the gathering of one with a NaN alike), in float64 and float32."""
    from scipy.ndimage import map_coordinates

    from cellsymphony.pp._patch_source import _lattice_to_grid

    rng = np.random.default_rng(0)
    for w, h in ((1, 1), (7, 3), (256, 256), (300, 17)):
        us = np.unique(np.r_[np.arange(0, w, 8), w - 1])
        vs = np.unique(np.r_[np.arange(0, h, 8), h - 1])
        coarse = rng.normal(0, 100, (len(vs), len(us), 2)) + 5000
        grid = _lattice_to_grid(us, vs, coarse, w, h)
        rows, cols = np.meshgrid(np.interp(np.arange(h), vs, np.arange(len(vs))),
                                 np.interp(np.arange(w), us, np.arange(len(us))), indexing="ij")  # fmt: skip
        for k in range(2):
            want = map_coordinates(coarse[..., k], [rows, cols], order=1, mode="nearest")
            np.testing.assert_allclose(grid[..., k], want, rtol=0, atol=1e-9)
            assert coarse[..., k].min() - 1e-9 <= grid[..., k].min() and grid[..., k].max() <= coarse[..., k].max() + 1e-9
        single = _lattice_to_grid(us, vs, coarse.astype(np.float32), w, h)  # as band_region makes it
        assert single.dtype == np.float32 and single.shape == (h, w, 2)
        np.testing.assert_allclose(single, grid, rtol=0, atol=2e-3)
    us = vs = np.unique(np.r_[np.arange(0, 256, 8), 255])
    coarse = rng.normal(0, 100, (len(vs), len(us), 2))
    coarse[10, 12] = np.nan
    undefined = np.isnan(_lattice_to_grid(us, vs, coarse, 256, 256)).any(axis=-1)
    assert undefined.sum() == 15 * 15
    assert undefined[80 - 7 : 80 + 8, 96 - 7 : 96 + 8].all()


def test_non_rigid_bands_the_same_in_dataloader_workers(tmp_path):
    """Under a non-rigid field the tile plan is made for the workers too (each decodes its own blocks' tiles):
    two DataLoader workers give the patches this process gives."""
    align = rotated_alignment(angle_deg=20.0, scale=1.0, flip=True)
    rng = np.random.default_rng(0)
    path = write_he(tmp_path / "s.ome.tif", _tissue_image(800, 500, seed=5), n_sub=0, tile=64)
    ys, xs = np.mgrid[0:10, 0:7]
    field = np.stack([6.0 * np.sin(xs / 2.5), 5.0 * np.cos(ys / 3.0)], axis=-1)  # micrometres
    warp = {"grid_um": field, "origin_px": np.array([0.0, 0.0]), "step_px": 100.0}
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP, cache_tiles=4, warp=warp)
    xy = he_px_to_um(rng.uniform([40, 40], [460, 760], (300, 2)), align, PIXEL_SIZE, warp)
    order = spatial_order(xy, band=32.0, anchor=0.0)
    centres = [xy[order[k : k + 16]] for k in range(0, 300, 16)]
    kw = dict(size=32, mpp=1.0, level=0, block=32)
    here = [p.numpy() for _, p in _bands.band_patches(src, centres, **kw)]
    src.close()
    workers = [p.numpy() for _, p in _bands.band_patches(src, centres, **kw, num_workers=2)]
    assert len(here) == len(workers) == len(centres)
    for a, b in zip(here, workers, strict=True):
        np.testing.assert_array_equal(a, b)
    assert min(p.min() for p in here) < 200  # tissue, not the white outside
    src.close()
