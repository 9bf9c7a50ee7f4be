"""Contrastive alignment of expression and morphology embeddings (imports torch)."""

from __future__ import annotations

from ._model import ContrastiveAligner
from ._module import ContrastiveModule, ProjectionHead, info_nce

__all__ = ["ContrastiveAligner", "ContrastiveModule", "ProjectionHead", "info_nce"]
