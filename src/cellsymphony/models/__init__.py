"""Models: morphology and expression encoders, the cell-type classifier and the contrastive aligner.

The torch-based classes are imported on first access (``cs.models.CellTypeClassifier``), so
``import cellsymphony`` does not import torch.
"""

from __future__ import annotations

import importlib

# public name -> module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "CellTypeClassifier": ".classifier._model",
    "CellClassifierModule": ".classifier._module",
    "MorphologyEncoder": ".encoders._morphology",
    "load_morphology_encoder": ".encoders._morphology",
    "HandcraftedEncoder": ".encoders._handcrafted",
    "ScGPTEncoder": ".encoders._scgpt",
    "load_scgpt": ".encoders._scgpt",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'cellsymphony.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
