"""Tools: cell-type classifiers, contrastive alignment, niches and their statistics."""

from __future__ import annotations

from ._align_contrastive import align_contrastive
from ._cluster_enrichment import cluster_enrichment
from ._niches import niches
from ._spatial_coherence import spatial_coherence

__all__: list[str] = ["align_contrastive", "cluster_enrichment", "niches", "spatial_coherence"]
