"""Preprocessing: per-cell embeddings of each modality, patches, and cell labels."""

from __future__ import annotations

from ._annotate_singler import annotate_singler

__all__: list[str] = ["annotate_singler"]
