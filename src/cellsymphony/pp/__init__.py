"""Preprocessing: per-cell embeddings of each modality, patches, and cell labels."""

from __future__ import annotations

from ._cell_patches import cell_patches
from ._embed_expression import embed_expression
from ._embed_morphology import embed_morphology

__all__: list[str] = ["cell_patches", "embed_expression", "embed_morphology"]
