"""cellsymphony: cell-level multimodal analysis of 10x Xenium and matched H&E.

``import cellsymphony as cs`` gives ``cs.io`` (readers and writers), ``cs.pp`` (embeddings,
labels), ``cs.tl`` (classifiers, contrastive alignment, niches), ``cs.pl`` (plots),
``cs.datasets`` (synthetic tissue, tiny checkpoints) and ``cs.models`` (encoders and
model classes). Importing the package is fast: torch, timm, scanpy, squidpy and
spatialdata are imported only by the functions that need them.
"""

from __future__ import annotations

from . import datasets, io, models, pl, pp, tl
from ._settings import settings
from ._version import __version__

__all__ = ["datasets", "io", "models", "pl", "pp", "settings", "tl", "__version__"]
