"""Preprocessing: per-cell embeddings of each modality, patches, and cell labels."""

from __future__ import annotations

__all__: list[str] = []
