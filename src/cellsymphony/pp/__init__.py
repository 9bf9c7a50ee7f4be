"""Preprocessing: per-cell embeddings of each modality, patches, and cell labels."""

from __future__ import annotations

from ._embed_expression import embed_expression

__all__: list[str] = ["embed_expression"]
