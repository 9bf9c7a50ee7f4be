"""The command line: argument errors (one line, exit 2), failures (exit 1), info, fast start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cellsymphony import __main__ as cli


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr); argparse's own exits are caught."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def xenium(tmp_path):
    d = tmp_path / "xenium"
    d.mkdir()
    (d / "experiment.xenium").write_text("{}")
    return d


@pytest.fixture
def scgpt(tmp_path):
    d = tmp_path / "scgpt"
    d.mkdir()
    for f in ("best_model.pt", "vocab.json", "args.json"):
        (d / f).write_text("x")
    return d


@pytest.fixture
def weights(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(b"0")
    return f


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    for var in (cli.ENV_UNI2H, cli.ENV_UNI, cli.ENV_SCGPT, "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_empty"))


def _one_line_error(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_no_command_and_unknown_option(capsys):
    code, _, err = run([], capsys)
    assert code == 2
    _one_line_error(err, "command")
    code, _, err = run(["demo", "--bogus"], capsys)
    assert code == 2
    _one_line_error(err, "--bogus")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--n-cells", "0"], "positive integer"),
        (["demo", "--n-cells", "abc"], "positive integer"),
        (["demo", "--n-cells", "50"], "at least 200"),
    ],
)
def test_demo_bad_arguments(args, needle, capsys):
    code, _, err = run(args, capsys)
    assert code == 2
    _one_line_error(err, needle)


def test_demo_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    code, _, err = run(["demo", "--out", str(f)], capsys)
    assert code == 2
    _one_line_error(err, "is a file")


def test_run_missing_paths(tmp_path, xenium, scgpt, weights, capsys):
    base = ["run", "--uni2", str(weights), "--scgpt", str(scgpt), "--out", str(tmp_path / "out")]
    code, _, err = run([*base, "--xenium", str(tmp_path / "nope")], capsys)
    assert code == 2
    _one_line_error(err, "--xenium", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run([*base, "--xenium", str(empty)], capsys)
    _one_line_error(err, "experiment.xenium")
    code, _, err = run([*base, "--xenium", str(xenium), "--he-image", str(tmp_path / "he.tif")], capsys)
    assert code == 2
    _one_line_error(err, "--he-image", "no such file")
    code, _, err = run([*base, "--xenium", str(xenium), "--he-alignment", str(xenium)], capsys)
    _one_line_error(err, "--he-alignment", "is a folder")


def test_run_weights_errors(tmp_path, xenium, scgpt, weights, capsys):
    out = ["--out", str(tmp_path / "out"), "--xenium", str(xenium)]
    code, _, err = run(["run", *out, "--scgpt", str(scgpt)], capsys)
    assert code == 2
    _one_line_error(err, "--uni2 is required", "huggingface.co/MahmoodLab/UNI2-h")
    code, _, err = run(["run", *out, "--scgpt", str(scgpt), "--uni2", str(tmp_path / "missing.bin")], capsys)
    _one_line_error(err, "--uni2", "no such file")
    (scgpt / "vocab.json").unlink()
    code, _, err = run(["run", *out, "--scgpt", str(scgpt), "--uni2", str(weights)], capsys)
    assert code == 2
    _one_line_error(err, "--scgpt", "missing vocab.json")
    code, _, err = run(["run", *out, "--uni2", str(weights)], capsys)
    _one_line_error(err, "--scgpt is required", cli.ENV_SCGPT)


def test_run_weights_from_environment(tmp_path, xenium, scgpt, weights, monkeypatch, capsys):
    """With the env vars set, the check passes on to the next argument (here: a bad labels file)."""
    monkeypatch.setenv(cli.ENV_UNI2H, str(weights))
    monkeypatch.setenv(cli.ENV_SCGPT, str(scgpt))
    code, _, err = run(["run", "--xenium", str(xenium), "--out", str(tmp_path / "o"), "--labels", str(tmp_path / "l.csv")], capsys)
    assert code == 2
    _one_line_error(err, "--labels", "no such file")
    monkeypatch.setenv(cli.ENV_UNI2H, str(tmp_path / "gone.bin"))
    code, _, err = run(["run", "--xenium", str(xenium), "--out", str(tmp_path / "o")], capsys)
    _one_line_error(err, f"${cli.ENV_UNI2H}", "no such file")


def test_run_labels_errors(tmp_path, xenium, scgpt, weights, capsys):
    base = ["run", "--xenium", str(xenium), "--uni2", str(weights), "--scgpt", str(scgpt), "--out", str(tmp_path / "o")]
    code, _, err = run([*base, "--labels", "singler"], capsys)
    assert code == 2
    _one_line_error(err, "--reference")
    ref = tmp_path / "ref.csv"
    ref.write_text("x")
    code, _, err = run([*base, "--labels", "singler", "--reference", str(ref)], capsys)
    _one_line_error(err, ".h5ad")
    h5ad = tmp_path / "ref.h5ad"
    h5ad.write_text("x")
    code, _, err = run([*base, "--labels", "singler", "--reference", str(h5ad)], capsys)
    _one_line_error(err, "--ref-label-key")
    labels = tmp_path / "labels.csv"
    labels.write_text("cell_id,label\n")
    code, _, err = run([*base, "--labels", str(labels), "--reference", str(h5ad)], capsys)
    _one_line_error(err, "only used with --labels singler")


def test_run_refuses_to_overwrite(tmp_path, xenium, scgpt, weights, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "cellsymphony.h5mu").write_text("old")
    args = ["run", "--xenium", str(xenium), "--uni2", str(weights), "--scgpt", str(scgpt), "--out", str(out)]
    code, _, err = run(args, capsys)
    assert code == 2
    _one_line_error(err, "--overwrite")
    assert (out / "cellsymphony.h5mu").read_text() == "old"


def test_failure_is_one_line_exit_1(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    code, _, err = run(["info"], capsys)
    assert code == 1
    _one_line_error(err, "something broke", "--debug")
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main(["--debug", "info"])


def test_info_lists_versions_devices_weights(tmp_path, weights, monkeypatch, capsys):
    monkeypatch.setenv(cli.ENV_UNI2H, str(weights))
    monkeypatch.setenv(cli.ENV_SCGPT, str(tmp_path))  # a folder without the scGPT files
    code, out, _ = run(["info"], capsys)
    assert code == 0
    assert out.startswith("cellsymphony ")
    assert "devices: cpu" in out
    assert f"${cli.ENV_UNI2H} = {weights} (found)" in out
    assert "MISSING best_model.pt, vocab.json, args.json" in out
    assert "UNI      not found" in out
    import torch

    assert f"torch        {torch.__version__.split('+')[0]}" in out


def test_info_finds_hugging_face_cache(tmp_path, monkeypatch, capsys):
    snap = tmp_path / "hub" / "models--MahmoodLab--UNI2-h" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli.hf_cache_files("MahmoodLab/UNI2-h") == [snap / "pytorch_model.bin"]
    code, out, _ = run(["info"], capsys)
    assert f"Hugging Face cache: {snap / 'pytorch_model.bin'}" in out


def test_help_is_light_and_works_as_module():
    code = (
        "import sys\n"
        "from cellsymphony.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'timm', 'scanpy', 'squidpy', 'spatialdata', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', ','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout
    assert "run" in out.stdout
    assert out.stdout.strip().endswith("HEAVY"), out.stdout
    res = subprocess.run([sys.executable, "-m", "cellsymphony", "run", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "--xenium" in res.stdout
    assert "--uni2" in res.stdout


def test_run_classifier_options(tmp_path, xenium, scgpt, weights, capsys):
    base = ["run", "--xenium", str(xenium), "--uni2", str(weights), "--scgpt", str(scgpt), "--out", str(tmp_path / "o")]
    code, _, err = run([*base, "--archs", "dual,transformerXL"], capsys)
    assert code == 2
    _one_line_error(err, "--archs", "transformerXL")
    code, _, err = run([*base, "--d-model", "30", "--n-heads", "8"], capsys)
    _one_line_error(err, "multiple of --n-heads")


@pytest.mark.slow
def test_run_end_to_end_on_a_synthetic_bundle(tmp_path):
    """`cellsymphony run` on a small synthetic Xenium folder, handcrafted morphology, tiny scGPT, SingleR labels."""
    import mudata as md

    import cellsymphony as cs

    bundle = cs.datasets.synthetic_xenium(tmp_path / "xenium", n_cells=600, seed=3)
    mdata = cs.io.read_xenium(bundle)
    ckpt = cs.datasets.tiny_scgpt_checkpoint(tmp_path / "scgpt", list(mdata["rna"].var_names))
    out = tmp_path / "out"
    code = cli.main([
        "run", "--xenium", str(bundle), "--morph-model", "handcrafted", "--scgpt", str(ckpt),
        "--labels", "singler", "--reference", str(bundle / "reference.h5ad"), "--ref-label-key", "cell_type",
        "--epochs", "2", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--archs", "unimodal,dual",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    result = md.read_h5mu(out / "cellsymphony.h5mu")
    assert "cs_pred" in result.obs
    assert "morphology:cs_niche" in result.obs  # cs.tl.niches writes its label once, on the modality
    assert "X_cs_contrastive" in result["morphology"].obsm
    table = result.uns["cs_compare"]["table"]
    assert set(table["architecture"]) >= {"unimodal", "dual", "logistic"}
    html = (out / "report.html").read_text()
    assert "classifier d_model" in html  # the settings that differ from the paper's
    assert (out / "figures" / "metrics_comparison.png").exists()
    assert (out / "classifier").is_dir()
    assert (out / "contrastive").is_dir()


def test_every_morphology_choice_has_a_memory_estimate():
    """The pre-flight memory check sizes the embedding of every encoder `run --morph-model` accepts."""
    from cellsymphony._memory import MORPH_DIMS
    from cellsymphony.models.encoders._morphology import PRESETS

    run = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["run"]._actions
               if a.dest == "morph_model")
    assert set(run.choices) <= set(MORPH_DIMS)
    for name in set(run.choices) & set(PRESETS):
        assert MORPH_DIMS[name] == PRESETS[name].kwargs()["embed_dim"], name
