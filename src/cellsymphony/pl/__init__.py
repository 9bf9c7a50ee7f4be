"""Plots, scanpy-style: each returns its Axes or Figure and takes ``show=`` and ``save=``.

matplotlib, scanpy and squidpy are imported inside the functions, so ``import cellsymphony``
stays light; every function works under the non-interactive Agg backend.
"""

from __future__ import annotations

from ._confusion import confusion
from ._embedding import embedding
from ._enrichment import enrichment
from ._history import history
from ._metrics import metrics
from ._patch_gallery import patch_gallery
from ._registration import registration
from ._spatial import spatial

__all__ = [
    "confusion",
    "embedding",
    "enrichment",
    "history",
    "metrics",
    "patch_gallery",
    "registration",
    "spatial",
]
