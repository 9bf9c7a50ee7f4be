"""Morphology and expression encoders and their weight loading (imported lazily: these modules import torch).

The morphology encoders come in two kinds, named by their ``kind`` attribute (:data:`ENCODER_KINDS`):

- ``"tokens"`` (:class:`~cellsymphony.models.MorphologyEncoder`, every ViT / timm / wrapped module):
  ``forward_tokens(x, layer=-1) -> (prefix, grid)`` on a normalised float batch, with ``embed_dim``,
  ``n_layers`` and ``patch_size``; ``cs.pp.embed_morphology`` pools the grid at each nucleus;
- ``"features"`` (:class:`~cellsymphony.models.HandcraftedEncoder`): called on uint8 patches
  ``(n, H, W, 3)``, returns one ``(n, embed_dim)`` feature row per patch; cell mode only.
"""

from __future__ import annotations

ENCODER_KINDS = ("tokens", "features")


def encoder_kind(encoder) -> str:
    """The encoder's declared ``kind`` (one of :data:`ENCODER_KINDS`), or a clear error."""
    kind = getattr(encoder, "kind", None)
    if kind not in ENCODER_KINDS:
        raise ValueError(
            f"{type(encoder).__name__} declares no encoder kind (its .kind is {kind!r}, expected one of "
            f"{ENCODER_KINDS}): pass a model name, an nn.Module (wrapped by cs.models.load_morphology_encoder) "
            "or a cs.models.MorphologyEncoder / HandcraftedEncoder."
        )
    return kind
