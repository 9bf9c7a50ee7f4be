"""Tools: cell-type classifiers, contrastive alignment, niches and their statistics."""

from __future__ import annotations

__all__: list[str] = []
