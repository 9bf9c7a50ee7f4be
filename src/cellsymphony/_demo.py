"""The end-to-end demo behind ``cellsymphony demo`` and ``make demo``."""

from __future__ import annotations

from pathlib import Path

from ._settings import logger


def run_demo(out: str | Path, *, n_cells: int = 4000, seed: int = 0) -> None:
    """Run the pipeline on the synthetic tissue and write its outputs to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("demo: writing to %s", out)
