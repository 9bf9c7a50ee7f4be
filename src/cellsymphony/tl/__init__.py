"""Tools: cell-type classifiers, contrastive alignment, niches and their statistics."""

from __future__ import annotations

from ._compare_classifiers import compare_classifiers
from ._train_classifier import train_classifier

__all__: list[str] = ["compare_classifiers", "train_classifier"]
