"""benchmarks/gpu_check.py: the prepared GPU check runs end to end at tiny sizes on the CPU (``--cpu``), prints
one table with every check, and stops at once with a clear error where there is no CUDA and no ``--cpu``."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHECKS = [
    "forward", "forward", "forward", "embed_morphology, cell mode", "embed_morphology, tile mode", "scGPT",
    "dual classifier, one training epoch", "dual classifier, prediction", "contrastive aligner, one training epoch",
]  # fmt: skip


@pytest.fixture(scope="module")
def gpu_check():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    return gpu_check


def _table(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_cpu_mode_prints_every_check_with_positive_figures(gpu_check, capsys):
    rows = gpu_check.main(["--cpu"])
    out = capsys.readouterr().out
    assert "torch " in out and "device: CPU" in out  # the environment is logged
    table = _table(out)
    header, body = table[0], table[2:]
    assert header == list(gpu_check.COLUMNS)
    assert len(body) == len(CHECKS) == len(rows)
    for want, row in zip(CHECKS, body, strict=True):
        assert want in row[0]
        value, peak, seconds = (float(row[i].replace(",", "")) for i in (2, 4, 5))
        assert value > 0 and peak > 0 and seconds > 0, row
    assert [r["unit"] for r in rows[:3]] == ["images/s"] * 3
    assert {r["unit"] for r in rows[3:5]} == {"cells/s"} and rows[6]["unit"] == "s/epoch"


def test_without_cuda_it_stops_with_a_clear_error(gpu_check):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU run is not a test")
    with pytest.raises(SystemExit, match=r"CUDA is not available.*pass --cpu"):
        gpu_check.main([])
