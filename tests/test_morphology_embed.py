"""cs.pp.embed_morphology: cell and tile mode against hand-computed pooling, resume, off-image, I/O."""

from __future__ import annotations

import logging
import warnings

import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch
from morphology_helpers import (
    HE_MPP,
    PIXEL_SIZE,
    draw_disc,
    make_mudata,
    one_torch_thread,
    quiet_morphology,
    rotated_alignment,
    tissue,
    write_he,
)

import cellsymphony as cs
from cellsymphony._registration import he_px_to_um
from cellsymphony.pp import _chunks as engine
from cellsymphony.pp._patch_geometry import grid_patch_origin, tile_assignment, token_pool_weights
from cellsymphony.pp._patch_source import PatchSource


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


SIZE, MPP = 112, 1.0  # 8 x 8 tokens of 14 px: quick on two CPU cores


@pytest.fixture(autouse=True)
def _quiet():
    yield from quiet_morphology()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return tissue(str(tmp_path_factory.mktemp("tissue")), n_cells=24)


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cs.models.load_morphology_encoder("tiny")


def _mdata(slide, extra=()):
    path, align, xy = slide
    if len(extra):
        xy = np.vstack([xy, np.asarray(extra, dtype=float)])
    return make_mudata(xy, path, align)


def test_cell_mode_pools_central_tokens(slide, encoder):
    m = _mdata(slide)
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, batch_size=10, exact=True)
    x = m["morphology"].obsm["X_tiny"]
    assert x.shape == (24, encoder.embed_dim) and x.dtype == np.float32 and np.isfinite(x).all()
    assert m["morphology"].uns["X_tiny"]["params"]["exact"]
    patches = cs.pp.cell_patches(m, size=SIZE, mpp=MPP, exact=True)
    with torch.inference_mode():
        prefix, grid = encoder.forward_tokens(torch.from_numpy(patches))
    central = grid[:, 3:5, 3:5].mean(dim=(1, 2)).numpy()  # the 2 x 2 tokens around the centre of 8 x 8
    np.testing.assert_allclose(x, central, rtol=1e-4, atol=1e-5)
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, pool="cls", key_added="cls", exact=True)
    np.testing.assert_allclose(m["morphology"].obsm["cls"], prefix[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, pool_radius_um=23.0, key_added="wide", exact=True)
    w = token_pool_weights([[56.0, 56.0]], (8, 8), stride=14, radius_px=23.0)[0]
    wide = np.einsum("g,ngd->nd", w, grid.reshape(24, 64, -1).numpy())
    np.testing.assert_allclose(m["morphology"].obsm["wide"], wide, rtol=1e-4, atol=1e-5)
    assert cs._validate.resolve_rep(m, "morphology", None) == "wide"


def test_band_cell_mode_pools_at_the_nucleus_sub_pixel_position(slide, encoder):
    """Default (band) cell mode: the tokens are pooled at each nucleus's true position in its band patch,
    not at the patch centre; the embedding stays close to the exact per-cell warp's."""
    m = _mdata(slide)
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, batch_size=10)
    x = m["morphology"].obsm["X_tiny"]
    assert not m["morphology"].uns["X_tiny"]["params"]["exact"]
    patches = cs.pp.cell_patches(m, size=SIZE, mpp=MPP)
    _, pos = grid_patch_origin(m["morphology"].obsm["nucleus_centroid"], size=SIZE, mpp=MPP)
    assert np.abs(pos - SIZE / 2).max() <= 0.5 and np.abs(pos - SIZE / 2).max() > 0.05
    with torch.inference_mode():
        _, grid = encoder.forward_tokens(torch.from_numpy(patches))
    flat = grid.reshape(24, 64, -1).numpy()
    w = token_pool_weights(pos, (8, 8), stride=14)
    np.testing.assert_allclose(x, np.einsum("ng,ngd->nd", w, flat), rtol=1e-4, atol=1e-5)
    centre = token_pool_weights(np.full((24, 2), SIZE / 2), (8, 8), stride=14)
    assert not np.allclose(x, np.einsum("ng,ngd->nd", centre, flat), rtol=1e-4, atol=1e-5)  # the position matters
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, batch_size=10, exact=True, key_added="exact")
    ex = m["morphology"].obsm["exact"]
    cos = (x * ex).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ex, axis=1)
    assert cos.min() > 0.99


def test_tile_mode_matches_hand_pooling_and_chunking(slide, encoder):
    m = _mdata(slide)
    cs.pp.embed_morphology(m, model="tiny", mode="tile", size=SIZE, mpp=MPP, tile_stride=56, batch_size=4)
    x = m["morphology"].obsm["X_tiny"]
    assert np.isfinite(x).all()
    xy = m["morphology"].obsm["nucleus_centroid"]
    ij, pos = tile_assignment(xy, size=SIZE, mpp=MPP, stride=56)
    path, align, _ = slide
    cs.pp.embed_morphology(m, model="tiny", mode="tile", size=SIZE, mpp=MPP, tile_stride=56, batch_size=4, exact=True,
                           key_added="exact")  # fmt: skip
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
    for i in (0, 7, 19):
        w = token_pool_weights(pos[i][None], (8, 8), stride=14)[0]
        # bands: the tile is the band window whose centre is the tile centre (an even size: exactly)
        x0, y0 = (ij[i] * 56 - SIZE / 2) * MPP
        band = src.read_band(x0, y0, SIZE, SIZE, mpp=MPP)
        exact = src.read(ij[i][None] * 56 * MPP, size=SIZE, mpp=MPP)
        assert np.abs(band.astype(int) - exact[0]).max() <= 1  # the same samples, rounding apart
        for tile, got in ((band[None], x[i]), (exact, m["morphology"].obsm["exact"][i])):
            with torch.inference_mode():
                _, grid = encoder.forward_tokens(torch.from_numpy(np.ascontiguousarray(tile)))
            np.testing.assert_allclose(got, w @ grid.reshape(64, -1).numpy(), rtol=1e-4, atol=1e-5)
    src.close()
    # one global grid: a subset of the cells (other chunks, other batches) gets the same rows
    sub = m["morphology"][::3].copy()
    sub.uns["cellsymphony"] = m.uns["cellsymphony"]
    cs.pp.embed_morphology(sub, model="tiny", mode="tile", size=SIZE, mpp=MPP, tile_stride=56, batch_size=3, chunk_size=2)
    np.testing.assert_allclose(sub.obsm["X_tiny"], x[::3], rtol=1e-4, atol=1e-5)
    # fewer encoder passes than cells
    n_tiles = len(np.unique(ij, axis=0))
    assert n_tiles < len(xy)


def test_off_image_cells_params_and_h5mu_round_trip(slide, tmp_path):
    path, align, xy = slide
    far = xy[0] + [4000.0, -3000.0]
    m = _mdata(slide, extra=[far])
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, key_added="X_m")
    mod = m["morphology"]
    x = mod.obsm["X_m"]
    assert np.isnan(x[-1]).all() and np.isfinite(x[:-1]).all()
    assert mod.obs["in_image"].tolist() == [True] * 24 + [False]
    assert mod.obs["X_m_empty"].tolist() == [False] * 24 + [True]  # the NaN-row flag, named after the key
    params = mod.uns["X_m"]["params"]
    assert params["model"] == "tiny" and params["weights_checksum"] == "random" and params["mode"] == "cell"
    assert params["pool"] == "nucleus" and params["mpp"] == MPP and params["size"] == SIZE
    assert params["version"] == cs.__version__
    assert m.uns["cellsymphony"]["latest"]["morphology"] == "X_m"
    m.write(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    np.testing.assert_array_equal(back["morphology"].obsm["X_m"], x)
    assert back["morphology"].uns["X_m"]["params"]["weights_checksum"] == "random"
    assert back.uns["cellsymphony"]["latest"]["morphology"] == "X_m"


def test_resume_after_interrupt_equals_uninterrupted(slide, tmp_path, monkeypatch, caplog):
    m = _mdata(slide)
    kw = {"model": "tiny", "size": SIZE, "mpp": MPP, "batch_size": 3, "chunk_size": 5}
    cs.pp.embed_morphology(m, **kw, key_added="full")
    saved = []
    real_save = engine.save_chunk  # the chunk engine saves every finished chunk

    def interrupted(path, values):
        if len(saved) == 2:
            raise KeyboardInterrupt  # the run dies while the third chunk is being written
        real_save(path, values)
        saved.append(path)

    monkeypatch.setattr(engine, "save_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cs.pp.embed_morphology(m, **kw, key_added="resumed", cache_dir=tmp_path)
    assert "resumed" not in m["morphology"].obsm  # nothing written by the failed run
    files = sorted(tmp_path.rglob("chunk_*.npy"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(engine, "save_chunk", real_save)
    caplog.set_level(logging.INFO, logger="cellsymphony")
    cs.pp.embed_morphology(m, **kw, key_added="resumed", cache_dir=tmp_path)
    assert "resumed 2 finished chunk(s)" in caplog.text
    assert len(sorted(tmp_path.rglob("chunk_*.npy"))) == 5  # 24 cells in chunks of 5
    np.testing.assert_array_equal(m["morphology"].obsm["resumed"], m["morphology"].obsm["full"])
    # another model / mode never reuses these chunks
    cs.pp.embed_morphology(m, **kw, pool="cls", key_added="resumed_cls", cache_dir=tmp_path)
    assert len(sorted(tmp_path.rglob("chunk_*.npy"))) == 10


def test_cache_is_not_reused_after_the_slide_changes(slide, tmp_path):
    import shutil

    path, align, xy = slide
    he = tmp_path / "he.ome.tif"
    shutil.copy(path, he)
    m = make_mudata(xy, he, align)
    kw = {"model": "tiny", "size": SIZE, "mpp": MPP, "batch_size": 8, "chunk_size": 8}
    cs.pp.embed_morphology(m, **kw, key_added="emb", cache_dir=tmp_path / "cache")
    old = m["morphology"].obsm["emb"].copy()
    # the same path now holds other pixels (a re-export): same cells, same registration, same key
    write_he(he, np.full((900, 1100, 3), 128, dtype=np.uint8))
    cs.pp.embed_morphology(m, **kw, key_added="fresh")
    cs.pp.embed_morphology(m, **kw, key_added="emb", cache_dir=tmp_path / "cache")
    x = m["morphology"].obsm
    assert not np.allclose(x["fresh"], old)
    np.testing.assert_array_equal(x["emb"], x["fresh"])


def test_dataloader_workers_give_the_same_result(slide):
    m = _mdata(slide)
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, batch_size=6, key_added="w0")
    cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, batch_size=6, num_workers=2, key_added="w2")
    np.testing.assert_array_equal(m["morphology"].obsm["w0"], m["morphology"].obsm["w2"])


def test_copy_returns_a_modified_copy(slide):
    m = _mdata(slide)
    out = cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP, copy=True)
    assert "X_tiny" in out["morphology"].obsm and "X_tiny" not in m["morphology"].obsm
    assert cs.pp.embed_morphology(m, model="tiny", size=SIZE, mpp=MPP) is None


def test_handcrafted_measures_nuclei(tmp_path):
    align = rotated_alignment(angle_deg=20.0, scale=1.0, flip=False)
    img = np.full((500, 500, 3), (235, 200, 220), dtype=np.uint8)
    centres_px = np.array([[120.0, 120.0], [350.0, 150.0], [200.0, 380.0]])
    radii_um = [2.5, 4.0, 5.5]
    for p, r in zip(centres_px, radii_um, strict=True):
        draw_disc(img, p, r / HE_MPP, (60, 30, 130))
    path = write_he(tmp_path / "nuclei.ome.tif", img)
    m = make_mudata(he_px_to_um(centres_px, align, PIXEL_SIZE), path, align)
    cs.pp.embed_morphology(m, model="handcrafted", size=96, mpp=0.5)
    x = m["morphology"].obsm["X_handcrafted"]
    names = list(m["morphology"].uns["X_handcrafted"]["feature_names"])
    assert x.shape == (3, len(names)) and np.isfinite(x).all()
    area = x[:, names.index("nucleus_area_um2")]
    np.testing.assert_allclose(area, np.pi * np.square(radii_um), rtol=0.2)
    assert (x[:, names.index("nucleus_found")] == 1).all()
    assert (x[:, names.index("nucleus_circularity")] > 0.8).all()
    assert m["morphology"].uns["X_handcrafted"]["params"]["weights_checksum"] == "none"
    with pytest.raises(ValueError, match="mode='cell'"):
        cs.pp.embed_morphology(m, model="handcrafted", mode="tile")


def test_bad_input(slide, tmp_path):
    m = _mdata(slide)
    with pytest.raises(ValueError, match="Unknown morphology model 'unii'.*uni2-h.*tiny.*handcrafted"):
        cs.pp.embed_morphology(m, model="unii")
    with pytest.raises(ValueError, match=r"mode='slide' is not one of \['cell', 'tile'\]"):
        cs.pp.embed_morphology(m, model="tiny", mode="slide")
    with pytest.raises(ValueError, match="pool="):
        cs.pp.embed_morphology(m, model="tiny", pool="max")
    with pytest.raises(ValueError, match="not a multiple of 'tiny'"):
        cs.pp.embed_morphology(m, model="tiny", size=100)
    with pytest.raises(ValueError, match="tile_stride"):
        cs.pp.embed_morphology(m, model="tiny", mode="tile", tile_stride=500)
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing keys .*unexpected keys|missing keys"):
        cs.pp.embed_morphology(m, model="tiny", weights=tmp_path)
    m.uns["cellsymphony"]["samples"]["s1"]["he_path"] = ""
    with pytest.raises(ValueError, match=r"read_xenium\(path, he_image="):
        cs.pp.embed_morphology(m, model="tiny")
    assert "X_tiny" not in m["morphology"].obsm  # nothing written on failure


def test_real_svs_through_read_he_cells(shared_data, tmp_path):
    svs = shared_data / "he" / "cmu_small_region.svs"
    if not svs.exists():
        pytest.skip(f"{svs} not present")
    # the tissue of this slide lies in x 900-1600 px, y 300-2900 px
    nuclei = pd.DataFrame({"x": [1200.0, 1400.0, 1100.0, 1300.0, 1500.0, 5000.0], "y": [800.0, 1200.0, 2000.0, 2500.0, 1700.0, 100.0]})
    m = cs.io.read_he_cells(svs, nuclei)
    assert m["morphology"].obs["in_image"].tolist() == [True] * 5 + [False]
    cs.pp.embed_morphology(m, model="tiny", mode="cell", key_added="cell")
    cs.pp.embed_morphology(m, model="tiny", mode="tile", key_added="tile")
    for key in ("cell", "tile"):
        x = m["morphology"].obsm[key]
        assert np.isfinite(x[:5]).all() and np.isnan(x[5]).all()
    # a patch is real tissue (not white) at the first nucleus, white for the off-slide one
    p = cs.pp.cell_patches(m, cells=[0, 5], size=64)
    assert p[0].mean() < 200 and (p[1] == 255).all()
    m.write(tmp_path / "svs.h5mu")
    back = md.read_h5mu(tmp_path / "svs.h5mu")
    np.testing.assert_array_equal(back["morphology"].obsm["tile"], m["morphology"].obsm["tile"])


def test_per_chunk_function_equals_the_annotator(slide, encoder):
    """embed_cells (the self-contained unit a scale-out ships to a worker) gives the annotator's rows."""
    from cellsymphony.pp._morphology_runner import embed_cells

    path, align, xy = slide
    m = _mdata(slide)
    cs.pp.embed_morphology(m, model=encoder, mode="tile", size=SIZE, mpp=MPP, tile_stride=56)
    src = PatchSource(str(path), align, PIXEL_SIZE, he_mpp=HE_MPP)
    half = embed_cells(encoder, src, xy[12:], mode="tile", size=SIZE, mpp=MPP, tile_stride=56, batch_size=5)
    src.close()
    np.testing.assert_allclose(half, m["morphology"].obsm["X_tiny"][12:], rtol=1e-4, atol=1e-5)
    # tile_stride=None is the annotator's default (size // 2), as documented there
    cs.pp.embed_morphology(m, model=encoder, mode="tile", size=SIZE, mpp=MPP, key_added="default_stride")
    default = embed_cells(encoder, src, xy[12:], mode="tile", size=SIZE, mpp=MPP, batch_size=5)
    src.close()
    np.testing.assert_allclose(default, m["morphology"].obsm["default_stride"][12:], rtol=1e-4, atol=1e-5)
