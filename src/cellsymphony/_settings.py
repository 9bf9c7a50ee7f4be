"""Package-wide settings: device, batch sizes, verbosity, cache folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

# A library adds only a NullHandler: where messages go is the application's choice (the command line
# sets up a stderr handler, cellsymphony.__main__.cli_logging; in a notebook, logging.basicConfig()).
# The level (settings.verbosity) is INFO, so a configured handler shows what each function added.
logger = logging.getLogger("cellsymphony")
if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
    logger.addHandler(logging.NullHandler())


def log_seconds(stage: str, seconds: float, **fields) -> None:
    """A debug record of how long a stage took: the message, and the attributes ``stage`` and ``seconds``
    (plus ``fields``) that benchmarks collect with a logging handler. The library keeps no timing state."""
    logger.debug("%s: %.3f s", stage, seconds, extra={"stage": stage, "seconds": float(seconds), **fields})
if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)


def _default_cache() -> Path:
    env = os.environ.get("CELLSYMPHONY_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cellsymphony"


@dataclass
class Settings:
    """Settings read by every function that has no explicit argument for them.

    Attributes
    ----------
    device
        ``"auto"`` (CUDA when available, else CPU), or any torch device string.
    batch_size
        Default batch size for model inference when a function is given none (``cs.pp.embed_morphology``:
        patches per forward pass; ``cs.pp.embed_expression``: cells per forward pass).
    num_workers
        DataLoader workers that decode images while the model runs.
    cache_dir
        Where synthetic datasets and other cached files are kept
        (``$CELLSYMPHONY_CACHE`` or ``~/.cache/cellsymphony``).
    progress
        Show tqdm progress bars for long steps.
    """

    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 0
    cache_dir: Path = field(default_factory=_default_cache)
    progress: bool = True

    @property
    def verbosity(self) -> int:
        """Logging level of the ``cellsymphony`` logger (INFO; the library adds no output handler of its own)."""
        return logger.level

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logger.setLevel(level)


settings = Settings()


def resolve_device(device: str | None = None) -> str:
    """Return a torch device string: the given one, else the settings', with ``"auto"`` resolved."""
    device = device or settings.device
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
