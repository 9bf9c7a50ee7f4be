"""Tools: cell-type classifiers, contrastive alignment, niches and their statistics."""

from __future__ import annotations

from ._align_contrastive import align_contrastive
from ._cluster_enrichment import cluster_enrichment
from ._compare_classifiers import compare_classifiers
from ._niches import niches
from ._predict_expression import predict_expression
from ._spatial_coherence import spatial_coherence
from ._train_classifier import train_classifier

__all__: list[str] = ["align_contrastive", "cluster_enrichment", "compare_classifiers", "niches", "predict_expression", "spatial_coherence", "train_classifier"]
