"""Preprocessing: per-cell embeddings of each modality, patches, and cell labels."""

from __future__ import annotations

from ._annotate_singler import annotate_singler
from ._augment_stain import augment_stain
from ._cell_patches import cell_patches
from ._embed_expression import embed_expression
from ._embed_morphology import embed_morphology
from ._harmonize_labels import harmonize_labels
from ._import_labels import import_labels
from ._normalize_stain import normalize_stain
from ._transfer_nucleus_labels import transfer_nucleus_labels

__all__: list[str] = ["annotate_singler", "augment_stain", "cell_patches", "embed_expression", "embed_morphology", "harmonize_labels", "import_labels", "normalize_stain", "transfer_nucleus_labels"]
