"""Preprocessing: per-cell embeddings of each modality, patches, and cell labels."""

from __future__ import annotations

from ._annotate_singler import annotate_singler
from ._cell_patches import cell_patches
from ._embed_expression import embed_expression
from ._embed_morphology import embed_morphology
from ._harmonize_labels import harmonize_labels
from ._import_labels import import_labels
from ._transfer_nucleus_labels import transfer_nucleus_labels

__all__: list[str] = [
    "annotate_singler",
    "cell_patches",
    "embed_expression",
    "embed_morphology",
    "harmonize_labels",
    "import_labels",
    "transfer_nucleus_labels",
]
