"""Shared helpers of cellsymphony._utils."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from cellsymphony._utils import params_record


def test_params_record_survives_h5ad_with_none_inside_lists_and_dicts(tmp_path):
    rec = params_record(a=None, b=[1, None], c=("x", None), d={"k": None, "p": Path("/tmp/f")}, e=(1, 2), f=0.5)
    adata = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
    adata.uns["params"] = rec
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["params"]
    assert "a" not in back  # None is left out, never stored as the string "None"
    assert list(back["b"]) == ["1", ""] and list(back["c"]) == ["x", ""]
    assert back["d"] == {"p": "/tmp/f"}
    np.testing.assert_array_equal(back["e"], [1, 2])
    assert back["f"] == 0.5 and isinstance(back["version"], str)


def test_the_library_adds_only_a_null_handler_and_the_cli_logs_to_stderr(capsys):
    """Importing the package configures no output (a NullHandler; the messages propagate to the
    application's handlers); the command line prints them on stderr while a command runs."""
    import logging
    import subprocess
    import sys

    code = (
        "import logging, cellsymphony\n"
        "lg = logging.getLogger('cellsymphony')\n"
        "print([type(h).__name__ for h in lg.handlers], lg.propagate, lg.level)\n"
        "lg.info('not shown'); lg.warning('nor this')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["['NullHandler']", "True", str(logging.INFO)]
    assert res.stderr == ""  # no output configured by the library (the NullHandler also stops the last resort)

    from cellsymphony.__main__ import cli_logging

    logger = logging.getLogger("cellsymphony")
    before = list(logger.handlers)
    with cli_logging():
        logger.info("added obsm['X']")
    assert capsys.readouterr().err == "cellsymphony: added obsm['X']\n"
    assert logger.handlers == before and logger.propagate
