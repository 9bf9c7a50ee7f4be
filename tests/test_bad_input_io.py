"""Bad and tampered input files: the readers' plausibility checks, the one loader error (file, problem, fix,
the original exception chained), the integrity checks of saved model folders, the clean-up of killed writes
and the early checks of ``cellsymphony run``."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tifffile
from _xenium_bundle import PIXEL_SIZE, make_bundle

import cellsymphony as cs
from cellsymphony._errors import InputFileError, InputFileNotFoundError
from cellsymphony.io._nuclei import read_nuclei

cs.settings.progress = False


# ------------------------------------------------------------------------------------------- the cells table
def _rewrite_plain(path):
    """Rewrite a parquet file uncompressed and without dictionaries (statistics kept), so that the bytes of a
    value can be found and overwritten in its data page."""
    df = pd.read_parquet(path)
    df.to_parquet(path, index=False, compression=None, use_dictionary=False)
    return df


def test_random_bytes_in_a_data_page_are_caught_by_the_file_statistics(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    path = b.path / "cells.parquet"
    df = _rewrite_plain(path)
    value = float(np.sort(df["x_centroid"].to_numpy())[len(df) // 2])  # neither min nor max: data page only
    raw = path.read_bytes()
    needle = struct.pack("<d", value)
    assert raw.count(needle) == 1
    path.write_bytes(raw.replace(needle, struct.pack("<d", 1e111)))
    assert pd.read_parquet(path)["x_centroid"].max() == 1e111  # the damage reads back silently
    lo, hi = df["x_centroid"].min(), df["x_centroid"].max()
    with pytest.raises(InputFileError, match=r"Cannot read the cells table .*cells\.parquet.*: 1 of 40 cells have a "
                       r"centroid outside the range that the file's own statistics record \(x " + f"{lo:.6g} to {hi:.6g}"):
        cs.io.read_xenium(b.path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_centroids(tmp_path, bad):
    b = make_bundle(tmp_path / "x", with_he=False)
    df = pd.read_parquet(b.path / "cells.parquet")
    df.loc[[3, 7], "y_centroid"] = bad
    df.to_parquet(b.path / "cells.parquet", index=False)
    with pytest.raises(ValueError, match=r"cells\.parquet.*2 of 40 cells have a missing or non-finite centroid") as err:
        cs.io.read_xenium(b.path)
    assert b.cell_ids[3] in str(err.value)


def _dapi(folder, height: int, width: int):
    d = folder / "morphology_focus"
    d.mkdir(exist_ok=True)
    tifffile.imwrite(d / "morphology_focus_0000.ome.tif", np.zeros((height, width), np.uint16), ome=True,
                     metadata={"axes": "YX"})  # fmt: skip


def test_centroids_must_lie_within_the_morphology_image(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    span = b.centroids.max(0) / PIXEL_SIZE
    _dapi(b.path, int(span[1]) + 50, int(span[0]) + 50)
    assert cs.io.read_xenium(b.path).n_obs == 40  # the section covers every cell
    _dapi(b.path, 200, 200)  # 42.5 um: most cells lie beyond
    n_off = int(((b.centroids > 200 * PIXEL_SIZE + 0.01 * 200 * PIXEL_SIZE + 10).any(axis=1)).sum())
    with pytest.raises(InputFileError, match=rf"{n_off} of 40 cells have a centroid outside the section, which the "
                       r"morphology image morphology_focus_0000\.ome\.tif spans"):
        cs.io.read_xenium(b.path)


def _write_cells_zarr(path, ids):
    import zarr

    store = zarr.storage.ZipStore(path, mode="w")
    root = zarr.open_group(store, mode="w", zarr_format=2)
    arr = np.asarray(ids, dtype=np.uint32)
    a = root.create_array("cell_id", shape=arr.shape, dtype=arr.dtype)
    a[...] = arr
    store.close()


def test_cells_zarr_ids_are_checked_against_the_table(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False, id_style="integer")
    ids = b.cell_ids.astype(np.int64)
    _write_cells_zarr(b.path / "cells.zarr.zip", ids[::-1])  # same cells, another order: fine
    assert cs.io.read_xenium(b.path).n_obs == 40
    _write_cells_zarr(b.path / "cells.zarr.zip", np.r_[ids[:30], ids[30:] + 1000])
    with pytest.raises(InputFileError, match=r"cells\.zarr\.zip.*10 of the 40 cells of the table are not in it .* "
                       r"10 of its 40 cells are not in the table"):
        cs.io.read_xenium(b.path)
    (b.path / "cells.zarr.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputFileError, match=r"Cannot read the cell segmentation .*cells\.zarr\.zip") as err:
        cs.io.read_xenium(b.path)
    assert err.value.__cause__ is not None


# ------------------------------------------------------------------------------------------- nucleus boundaries
def test_nucleus_boundaries_matching_no_cell_or_some_cells(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    path = b.path / "nucleus_boundaries.parquet"
    nb = pd.read_parquet(path)
    other = nb.copy()
    other["cell_id"] = "zz" + other["cell_id"].astype(str)
    other.to_parquet(path, index=False)
    with pytest.raises(InputFileError, match=r"nucleus_boundaries\.parquet.*none of its 39 nucleus cell ids matches a "
                       r"cell of the cells table.*nucleus_boundaries=False"):
        cs.io.read_xenium(b.path)
    assert cs.io.read_xenium(b.path, nucleus_boundaries=False).n_obs == 40
    some = nb.copy()
    stray = some["cell_id"].isin(b.cell_ids[:5])
    some.loc[stray, "cell_id"] = "zz" + some.loc[stray, "cell_id"].astype(str)
    some.to_parquet(path, index=False)
    n_stray = some.loc[stray, "cell_id"].nunique()  # 4: cell 1 of the bundle has no nucleus
    with pytest.warns(UserWarning, match=rf"{n_stray} of its 39 nucleus cell ids are not cells of the cells table"):
        mdata = cs.io.read_xenium(b.path)
    # the cells whose nucleus was dropped fall back on their own centroid; the others keep their nucleus
    np.testing.assert_allclose(mdata["rna"].obsm["nucleus_centroid"][:5], b.centroids[:5])
    has = np.isfinite(b.nucleus[5:]).all(1)
    np.testing.assert_allclose(mdata["rna"].obsm["nucleus_centroid"][5:][has], b.nucleus[5:][has], atol=1e-3)


def test_nucleus_boundaries_in_another_unit_or_damaged(tmp_path):
    b = make_bundle(tmp_path / "x", with_he=False)
    path = b.path / "nucleus_boundaries.parquet"
    nb = pd.read_parquet(path)
    px = nb.copy()
    px[["vertex_x", "vertex_y"]] = px[["vertex_x", "vertex_y"]] / PIXEL_SIZE  # morphology pixels, not um
    px.to_parquet(path, index=False)
    with pytest.raises(InputFileError, match=r"its nuclei lie far from their cells \(median distance .* another unit"):
        cs.io.read_xenium(b.path)
    nan = nb.copy()
    nan.loc[[0, 1, 2], "vertex_x"] = np.nan
    nan.to_parquet(path, index=False)
    with pytest.raises(InputFileError, match=r"3 of its \d+ vertices are missing or not finite"):
        cs.io.read_xenium(b.path)
    path.write_bytes(b"PAR1 garbage PAR1")
    with pytest.raises(InputFileError, match=r"Cannot read the nucleus boundaries .*nucleus_boundaries=False") as err:
        cs.io.read_xenium(b.path)
    assert err.value.__cause__ is not None


# ------------------------------------------------------------------------------------------- H&E and alignment
def test_inverted_alignment_file_gets_a_hint(tmp_path):
    b = make_bundle(tmp_path / "x")
    np.savetxt(b.path / "test_he_imagealignment.csv", np.linalg.inv(b.alignment), delimiter=",")
    with pytest.warns(UserWarning, match="looks inverted") as rec:
        mdata = cs.io.read_xenium(b.path)
    messages = [str(w.message) for w in rec]
    assert any("The alignment looks inverted (its inverse implies the image's pixel size)" in m for m in messages)
    assert any("The alignment looks inverted: its inverse places 100% of the cells inside the image" in m
               for m in messages)  # fmt: skip
    assert not mdata["morphology"].obs["in_image"].any()
    # a matrix that is merely wrong is not called inverted
    wrong = b.alignment.copy()
    wrong[:2, 2] += 1e5
    np.savetxt(b.path / "test_he_imagealignment.csv", wrong, delimiter=",")
    with pytest.warns(UserWarning, match="does not cover 40 of 40") as rec:
        cs.io.read_xenium(b.path)
    assert not any("looks inverted" in str(w.message) for w in rec)


def test_missing_he_path_or_folder_is_not_reported_as_a_missing_alignment(tmp_path):
    b = make_bundle(tmp_path / "x")
    with pytest.raises(InputFileNotFoundError, match=r"Cannot read H&E image .*nope\.ome\.tif.*: it does not exist"):
        cs.io.read_xenium(b.path, he_image=tmp_path / "nope.ome.tif")
    with pytest.raises(FileNotFoundError):
        cs.io.read_xenium(b.path, he_image=tmp_path / "nope.ome.tif")
    with pytest.raises(InputFileError, match=r"Cannot read H&E image .*: it is a folder, not a file"):
        cs.io.read_xenium(b.path, he_image=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Cannot read the H&E alignment file .*gone\.csv.*: it does not exist"):
        cs.io.read_xenium(b.path, he_alignment=tmp_path / "gone.csv")
    with pytest.raises(InputFileNotFoundError, match=r"Cannot read the Xenium folder .*: it does not exist"):
        cs.io.read_xenium(tmp_path / "no_folder")


# ------------------------------------------------------------------------------------------- other loaders
def test_label_tables_and_nucleus_files_name_the_file(tmp_path):
    mdata = cs.io.read_xenium(make_bundle(tmp_path / "x", with_he=False).path)
    bad = tmp_path / "labels.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputFileError, match=r"Cannot read the label table .*labels\.parquet.*: ArrowInvalid") as err:
        cs.pp.import_labels(mdata, bad, id_key="cell_id", label_key="label")
    assert err.value.__cause__ is not None
    with pytest.raises(FileNotFoundError, match=r"Cannot read the label table .*missing\.csv.*: it does not exist"):
        cs.pp.import_labels(mdata, tmp_path / "missing.csv", id_key="cell_id", label_key="label")
    geo = tmp_path / "nuclei.geojson"
    geo.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(InputFileError, match=r"Cannot read the nucleus file .*nuclei\.geojson.*JSONDecodeError") as err:
        read_nuclei(geo)
    assert isinstance(err.value.__cause__, json.JSONDecodeError)


@pytest.fixture(scope="module")
def scgpt_dir(tmp_path_factory):
    return cs.datasets.tiny_scgpt_checkpoint(tmp_path_factory.mktemp("scgpt") / "m", ["A", "B", "C"])


@pytest.mark.parametrize(
    ("name", "damage", "cause"),
    [
        ("args.json", lambda p: p.write_text(p.read_text()[:20]), json.JSONDecodeError),
        ("vocab.json", lambda p: p.write_bytes(b"\xff\xfe{\x00"), UnicodeDecodeError),
        ("best_model.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), Exception),
    ],
)
def test_scgpt_files_name_the_file_and_chain_the_cause(scgpt_dir, tmp_path, name, damage, cause):
    import shutil

    from cellsymphony.models.encoders._scgpt import load_scgpt

    d = tmp_path / "m"
    shutil.copytree(scgpt_dir, d)
    damage(d / name)
    with pytest.raises(InputFileError, match=rf"Cannot read scGPT {name} '.*{name}'.*scGPT model zoo") as err:
        load_scgpt(d)
    assert isinstance(err.value.__cause__, cause)
    (d / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name} not found in"):
        load_scgpt(d)


def test_truncated_encoder_checkpoint(tmp_path):
    from cellsymphony.models.encoders._weights import load_state_dict

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(InputFileError, match=r"Cannot read the safetensors checkpoint .*model\.safetensors.*download "
                       r"the weights again") as err:
        load_state_dict(f)
    assert err.value.__cause__ is not None


# ------------------------------------------------------------------------------------------- saved model folders
@pytest.fixture(scope="module")
def classifier():
    from test_classifier import TINY, make_mdata

    mdata = make_mdata(200)
    with torch_threads(1):
        return cs.tl.train_classifier(mdata, "cell_type", arch="dual", epochs=1, lr=1e-3, **TINY)


class torch_threads:  # noqa: N801 - used as a context manager
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


def _save(model, path):
    model.save(path, overwrite=True)
    return path, json.loads((path / "config.json").read_text())


def test_saved_folder_integrity(classifier, tmp_path):
    from safetensors.torch import load, save

    from cellsymphony.models import CellTypeClassifier
    from cellsymphony.models._base import ModelFilesMismatchError, sha256_bytes

    d, cfg = _save(classifier, tmp_path / "a")
    # a config stripped of its checksum cannot vouch for its weights
    (d / "config.json").write_text(json.dumps({**cfg, "weights": {}}))
    with pytest.raises(ModelFilesMismatchError, match=r"config\.json records no sha256 of model\.safetensors"):
        CellTypeClassifier.load(d)
    # a checksum listed for a file that is gone
    (d / "config.json").write_text(json.dumps({**cfg, "weights": {**cfg["weights"], "extra.bin": "sha256:00"}}))
    with pytest.raises(FileNotFoundError, match=r"extra\.bin.*config\.json lists it but it is missing"):
        CellTypeClassifier.load(d)
    # one class more in the config than the head has outputs (weights without the identity header)
    raw = (d / "model.safetensors").read_bytes()
    bare = save(load(raw))
    (d / "model.safetensors").write_bytes(bare)
    state = {**cfg["state"], "classes": [*cfg["state"]["classes"], "extra"]}
    (d / "config.json").write_text(json.dumps({**cfg, "state": state, "weights": {"model.safetensors": sha256_bytes(bare)}}))
    n = len(cfg["state"]["classes"])
    with pytest.raises(ModelFilesMismatchError, match=rf"the config implies {n + 1} classes but the weights' "
                       rf"'head\.weight' has {n}"):
        CellTypeClassifier.load(d)


def test_damaged_saved_files_name_the_file(classifier, tmp_path):
    from cellsymphony.models import CellTypeClassifier
    from cellsymphony.models._base import sha256_bytes

    d, cfg = _save(classifier, tmp_path / "b")
    short = (d / "model.safetensors").read_bytes()[:200]
    (d / "model.safetensors").write_bytes(short)
    (d / "config.json").write_text(json.dumps({**cfg, "weights": {"model.safetensors": sha256_bytes(short)}}))
    with pytest.raises(InputFileError, match=r"Cannot read the model weights .*model\.safetensors") as err:
        CellTypeClassifier.load(d)
    assert err.value.__cause__ is not None
    (d / "config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputFileError, match=r"Cannot read the CellTypeClassifier config .*UnicodeDecodeError") as err:
        CellTypeClassifier.load(d)
    assert isinstance(err.value.__cause__, UnicodeDecodeError)
    with pytest.raises(FileNotFoundError, match=r"Cannot read the CellTypeClassifier folder .*: it does not exist"):
        CellTypeClassifier.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- clean-up
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_write_removes_the_temporary_files_of_killed_writes(tmp_path):
    target = tmp_path / "result.npy"
    code = (
        "import os, signal, sys\n"
        "from cellsymphony._utils import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'x' * 100000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    res = subprocess.run([sys.executable, "-c", code, str(target)], env=env)
    assert res.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 1 and left[0].startswith(".result.npy.") and left[0].endswith(".tmp")
    host = socket.gethostname()
    live = tmp_path / f".result.npy.{host}-{os.getpid()}-abcd1234.tmp"  # a write in progress (this process)
    live.write_bytes(b"y")
    legacy_old = tmp_path / ".result.npy.abcd_123.tmp"  # an earlier version's name, hours old
    legacy_old.write_bytes(b"z")
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    legacy_new = tmp_path / ".result.npy.efgh_456.tmp"  # maybe still being written
    legacy_new.write_bytes(b"z")
    other = tmp_path / ".other.npy.abcd_123.tmp"  # another file's
    other.write_bytes(b"z")
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    dead = tmp_path / f".result.npy.{host}-{_dead_pid()}-0000ffff.tmp"
    dead.write_bytes(b"w")

    cs._utils.save_chunk(target, np.zeros((2, 3), np.float32))  # the cache chunk writer: one atomic write
    names = sorted(p.name for p in tmp_path.iterdir())
    # the chunk and its checksum file; the live writer's, the fresh legacy and the other file's temporaries stay
    assert names == sorted(["result.npy", "result.npy.sha256", live.name, legacy_new.name, other.name])
    np.testing.assert_array_equal(cs._utils.load_chunk(target, (2, 3)), np.zeros((2, 3), np.float32))


# ------------------------------------------------------------------------------------------- cellsymphony run
@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    bundle = cs.datasets.synthetic_xenium(root / "xenium", n_cells=200, seed=1, transcripts=False, reference_cells=300)
    mdata = cs.io.read_xenium(bundle)
    genes = list(mdata["rna"].var_names)
    scgpt = cs.datasets.tiny_scgpt_checkpoint(root / "scgpt", genes)
    return bundle, scgpt


def _cli(argv, capsys):
    from cellsymphony import __main__ as cli

    t0 = time.perf_counter()
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], time.perf_counter() - t0


def test_run_checks_every_input_before_the_embeddings(run_inputs, tmp_path, capsys):
    bundle, scgpt = run_inputs
    out = tmp_path / "results" / "out"
    base = ["run", "--xenium", str(bundle), "--morph-model", "handcrafted", "--scgpt", str(scgpt), "--out", str(out)]
    ref = ["--labels", "singler", "--reference", str(bundle / "reference.h5ad")]

    code, lines, _ = _cli([*base, *ref, "--ref-label-key", "celltype_typo"], capsys)
    assert code == 2
    assert len(lines) == 1, lines  # one line: no pipeline step was logged, so nothing heavy ran
    assert "--ref-label-key celltype_typo: not a column of the reference's obs" in lines[0]
    assert "cell_type" in lines[0]  # the columns it has
    assert not (tmp_path / "results").exists()

    code, lines, _ = _cli([*base, "--device", "cuda:7" if not _cuda() else "cuda:99"], capsys)
    assert code == 2 and len(lines) == 1 and "--device cuda:" in lines[0]
    code, lines, _ = _cli([*base, "--device", "gpu0"], capsys)
    assert code == 2 and len(lines) == 1 and "--device gpu0: not a torch device" in lines[0]

    labels = tmp_path / "labels.csv"
    labels.write_text("barcode,label\nx,1\n")
    code, lines, _ = _cli([*base, "--labels", str(labels)], capsys)
    assert code == 2 and len(lines) == 1 and "no column ['cell_id']" in lines[0] and "--cell-id-col" in lines[0]

    bad_scgpt = tmp_path / "bad_scgpt"
    bad_scgpt.mkdir()
    for f in ("vocab.json", "best_model.pt"):
        (bad_scgpt / f).write_bytes((scgpt / f).read_bytes())
    (bad_scgpt / "args.json").write_text('{"embsize": 32')
    code, lines, _ = _cli([*base[:-4], "--scgpt", str(bad_scgpt), "--out", str(out)], capsys)
    assert code == 2 and len(lines) == 1 and "Cannot read scGPT args.json" in lines[0]
    assert not (tmp_path / "results").exists()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_run_failing_after_the_checks_leaves_no_empty_out_folder(run_inputs, tmp_path, capsys):
    import shutil

    bundle, scgpt = run_inputs
    broken = tmp_path / "xenium"
    shutil.copytree(bundle, broken, ignore=shutil.ignore_patterns("*.tif", "reference.h5ad", "transcripts*"))
    df = pd.read_parquet(broken / "cells.parquet")
    df.loc[0, "x_centroid"] = np.nan  # the header is fine; reading the section fails in its first step
    df.to_parquet(broken / "cells.parquet", index=False)
    out = tmp_path / "out"
    code, lines, _ = _cli(["run", "--xenium", str(broken), "--morph-model", "handcrafted", "--scgpt", str(scgpt),
                           "--he-image", str(next(bundle.glob("*he_image.ome.tif"))), "--out", str(out)], capsys)  # fmt: skip
    assert code == 1
    assert "non-finite centroid" in lines[-1]
    assert not out.exists()
