"""cs.datasets.synthetic_xenium at scale: band-wise rendering equals the whole image, bad input is refused
before anything is written, and an interrupted run leaves no bundle behind."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import tifffile

import cellsymphony as cs
from cellsymphony.datasets import _render, _synthetic, _tissue

N_CELLS = 1200  # about 1,700 morphology rows: seven bands of 256 rows, their seams inside the tissue
SEED = 4


def _bundle(path, monkeypatch, band_rows: int):
    with monkeypatch.context() as m:
        m.setattr(_render, "MASK_BAND_ROWS", band_rows)
        m.setattr(_render, "HE_BAND_ROWS", band_rows)
        return cs.datasets.synthetic_xenium(path, n_cells=N_CELLS, seed=SEED, transcripts=False, reference_cells=0)


@pytest.fixture(scope="module")
def banded(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield _bundle(tmp_path_factory.mktemp("bands") / "bundle", mp, 256)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield _bundle(tmp_path_factory.mktemp("whole") / "bundle", mp, 1 << 20)  # one band: the whole image
    finally:
        mp.undo()


def _masks(path):
    import zarr

    store = zarr.storage.ZipStore(path / "cells.zarr.zip", read_only=True)
    z = zarr.open(store, mode="r")
    out = {k: z["masks"][k][...] for k in ("0", "1")}
    chunks = z["masks"]["0"].chunks
    summary = pd.DataFrame(z["cell_summary"][...], columns=list(z["cell_summary"].attrs["column_names"]))
    store.close()
    return out, chunks, summary


def _levels(path):
    with tifffile.TiffFile(path) as tif:
        return [lvl.asarray() for lvl in tif.series[0].levels]


def test_bands_equal_the_whole_image(banded, whole):
    masks_b, chunks_b, summary_b = _masks(banded)
    masks_w, chunks_w, summary_w = _masks(whole)
    height = masks_b["0"].shape[0]
    assert height > 5 * 256 and chunks_b[0] == 256 and chunks_w[0] == height  # several bands, one band
    for k in ("0", "1"):
        np.testing.assert_array_equal(masks_b[k], masks_w[k])
    pd.testing.assert_frame_equal(summary_b, summary_w)
    pd.testing.assert_frame_equal(pd.read_parquet(banded / "cells.parquet"), pd.read_parquet(whole / "cells.parquet"))
    truth_b, truth_w = pd.read_parquet(banded / "truth.parquet"), pd.read_parquet(whole / "truth.parquet")
    pd.testing.assert_frame_equal(truth_b, truth_w, check_exact=False, rtol=1e-12)
    for f in ("morphology_focus/morphology_focus_0000.ome.tif", "synthetic_he_image.ome.tif"):
        lb, lw = _levels(banded / f), _levels(whole / f)
        assert len(lb) == len(lw) >= (2 if f.startswith("synthetic") else 1)
        for a, b in zip(lb, lw, strict=True):
            np.testing.assert_array_equal(a, b)
    # every chunk of the masks written once (a ZipStore cannot replace an entry)
    names = [i.filename for i in zipfile.ZipFile(banded / "cells.zarr.zip").infolist()]
    assert not [k for k, v in collections.Counter(names).items() if v > 1]
    assert sum(n.startswith("masks/0/") and n[-1].isdigit() for n in names) > 5


def test_band_masks_invariants(banded):
    masks, _, summary = _masks(banded)
    cells = pd.read_parquet(banded / "cells.parquet")
    ps = _synthetic.PIXEL_SIZE
    for k, col in (("0", "nucleus_area"), ("1", "cell_area")):
        counts = np.bincount(masks[k].ravel(), minlength=N_CELLS + 1)
        assert (counts[1:] > 0).all()  # every label present
        assert len(counts) == N_CELLS + 1
        np.testing.assert_allclose(cells[col].to_numpy(), counts[1:] * ps**2)
    # no seams: labels continue across the band boundaries as between any two rows
    for k in ("0", "1"):
        agree = (masks[k][1:] == masks[k][:-1]).mean(axis=1)  # row r against row r + 1
        seams = agree[255::256]
        assert seams.mean() > agree.mean() - 0.02 and seams.min() > np.quantile(agree, 0.01)
    # centroids from the masks: close to where the cells were placed
    truth = pd.read_parquet(banded / "truth.parquet")
    d = np.hypot(cells.x_centroid - truth.x, cells.y_centroid - truth.y)
    assert np.median(d) < 1.5
    np.testing.assert_allclose(summary.cell_centroid_x, cells.x_centroid)


def test_mask_bands_any_band_height():
    """mask_bands put together is the same mask for bands of any (even) height, also not multiples of 3."""
    tissue = _tissue.make_tissue(400, np.random.default_rng(1))
    ref = None
    for rows in (1 << 20, 256, 98, 50):
        parts = list(_render.mask_bands(tissue, _synthetic.PIXEL_SIZE, rows))
        assert [r0 for r0, *_ in parts] == list(range(0, parts[-1][0] + 1, rows))
        nuc = np.concatenate([p[1] for p in parts])
        cell = np.concatenate([p[2] for p in parts])
        stats = _render.LabelStats(400, _synthetic.PIXEL_SIZE)
        for r0, _, c in parts:
            stats.add(c, r0)
        if ref is None:
            ref = nuc, cell, stats.areas(), stats.centroids()[0]
            continue
        np.testing.assert_array_equal(nuc, ref[0])
        np.testing.assert_array_equal(cell, ref[1])
        np.testing.assert_array_equal(stats.areas(), ref[2])
        np.testing.assert_array_equal(stats.centroids()[0], ref[3])


def test_transcripts_by_row_groups(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(_synthetic, "_TX_CHUNK_CELLS", 150)
    kw = {"n_cells": 600, "seed": 2, "reference_cells": 0}
    a = cs.datasets.synthetic_xenium(tmp_path / "a", **kw)
    monkeypatch.setattr(_synthetic, "_TX_ROW_GROUP", 10_000)
    b = cs.datasets.synthetic_xenium(tmp_path / "b", **kw)
    f = pq.ParquetFile(b / "transcripts.parquet")
    assert f.metadata.num_row_groups > 5
    ta, tb = pd.read_parquet(a / "transcripts.parquet"), pd.read_parquet(b / "transcripts.parquet")
    pd.testing.assert_frame_equal(ta, tb)  # the row groups do not change the table
    spec = json.loads((b / "experiment.xenium").read_text())
    assert len(tb) == spec["cellsymphony_synthetic"]["n_transcripts"]
    assert (np.diff(tb.transcript_id.to_numpy().astype(np.int64)) == 1).all()
    # the Xenium order: by field of view (A1, A2, ..., B1, ...), then y within it
    fov = tb.fov_name.to_numpy()
    row, col = np.array([ord(v[0]) for v in fov]), np.array([int(v[1:]) for v in fov])
    key = row * 100 + col
    assert (np.diff(key) >= 0).all()
    same = np.diff(key) == 0
    assert (np.diff(tb.y_location.to_numpy())[same] >= 0).all()
    assert ((tb.y_location // 560).astype(int) == row - 65).all()
    # molecules (qv >= 20, in a cell) add up to the matrix totals per cell
    cells = pd.read_parquet(b / "cells.parquet")
    ok = tb[(tb.qv >= 20) & (tb.cell_id != "UNASSIGNED")]
    per_cell = ok.cell_id.value_counts().reindex(cells.cell_id, fill_value=0).to_numpy()
    np.testing.assert_array_equal(per_cell, cells.total_counts.to_numpy())
    assert tb.x_location.dtype == np.float32 and tb.overlaps_nucleus.dtype == np.uint8


# ------------------------------------------------------------------------------------------------ bad input
def test_too_many_cells_is_refused_at_once(tmp_path):
    limit = _tissue.max_cells()
    assert 1_000_000 <= limit < 2_000_000
    with pytest.raises(ValueError, match=r"n_cells=1,800,001 is more than .* at most 1,800,000 cells"):
        cs.datasets.synthetic_xenium(tmp_path / "x", n_cells=limit + 1)
    with pytest.raises(ValueError, match=r"n_cells=1500.5 must be an integer"):
        cs.datasets.synthetic_xenium(tmp_path / "x", n_cells=1500.5)
    assert list(tmp_path.iterdir()) == []
    # the geometry behind the limit: a section of max_cells() cells fits the field-of-view rows A-Z
    side = np.sqrt(limit * _tissue.MEAN_AREA_UM2 * 1.06) * 1.04
    assert side / _tissue.ASPECT <= _tissue.FOV_ROWS * _tissue.FOV_UM


def test_tissue_model_that_cannot_place_the_cells(monkeypatch):
    placed = _tissue._place(100.0, 100.0, np.random.default_rng(0))

    def sparse(width, height, rng):  # a model that places a few cells however large the section
        raster, orientation, cells = placed
        return raster, orientation, cells.iloc[:5]

    monkeypatch.setattr(_tissue, "_place", sparse)
    with pytest.raises(ValueError, match=r"placed only [\d,]+ of n_cells=500 cells"):
        _tissue.make_tissue(500, np.random.default_rng(0))


def test_disk_too_small_is_refused_before_writing(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**8, 10**8))
    target = tmp_path / "deep" / "bundle"
    with pytest.raises(ValueError, match="not enough disk space") as err:
        cs.datasets.synthetic_xenium(target, n_cells=460_000)
    msg = str(err.value)
    assert str(target) in msg and str(tmp_path) in msg
    assert "0.1 GB free" in msg and "transcripts=False" in msg
    need = float(msg.split("needs about ")[1].split(" GB")[0])
    assert 4 < need < 12  # 460,000 cells: several GB
    assert not (tmp_path / "deep").exists()
    with pytest.raises(ValueError, match="not enough disk space") as err:
        cs.datasets.synthetic_xenium(target, n_cells=460_000, transcripts=False)
    assert "transcripts=False" not in str(err.value)
    # a small bundle fits
    cs.datasets.synthetic_xenium(target, n_cells=100, transcripts=False, reference_cells=0)
    assert (target / "experiment.xenium").is_file()


def test_estimate_covers_the_bundle(banded):
    size = sum(p.stat().st_size for p in banded.rglob("*") if p.is_file())
    est = _synthetic._estimate_bytes(N_CELLS, transcripts=False, reference_cells=0, he_mpp=0.2738)
    assert size < est


# ------------------------------------------------------------------------------------------------ interruption
def _fail(*args, **kwargs):
    raise RuntimeError("interrupted")


def test_interrupted_run_leaves_no_bundle(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    with monkeypatch.context() as m:
        m.setattr(_synthetic, "_he_nuclei", _fail)  # a late stage: most files are written by then
        with pytest.raises(RuntimeError, match="interrupted"):
            cs.datasets.synthetic_xenium(target, n_cells=150, transcripts=False, reference_cells=0)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its hidden temporary folder
    # an old bundle survives an interrupted overwrite, and is replaced by a complete one
    cs.datasets.synthetic_xenium(target, n_cells=150, seed=1, transcripts=False, reference_cells=0)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(_synthetic, "_he_nuclei", _fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            cs.datasets.synthetic_xenium(target, n_cells=150, seed=2, overwrite=True, transcripts=False,
                                         reference_cells=0)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    cs.datasets.synthetic_xenium(target, n_cells=150, seed=2, overwrite=True, transcripts=False, reference_cells=0)
    spec = json.loads((target / "experiment.xenium").read_text())
    assert spec["cellsymphony_synthetic"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in target.rglob("*") if p.is_file())


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_leftover_of_a_killed_run_is_removed(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = tmp_path / f".bundle.partial-{socket.gethostname()}-{pid}-0000"
    (left / "morphology_focus").mkdir(parents=True)
    alive = tmp_path / f".bundle.partial-{socket.gethostname()}-{os.getpid()}-1111"  # a run still going
    alive.mkdir()
    cs.datasets.synthetic_xenium(tmp_path / "bundle", n_cells=100, transcripts=False, reference_cells=0)
    assert not left.exists() and alive.exists()
