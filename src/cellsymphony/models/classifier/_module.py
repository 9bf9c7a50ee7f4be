"""The torch modules of the cell-type classifier (plain ``nn.Module``; no AnnData / MuData here).

One cell is a short sequence of tokens, one per input:

* **gene token**: the expression embedding (``mdata["rna"].obsm["X_scgpt"]``), standardised with the
  training cells' per-feature mean and standard deviation, then a linear projection to ``d_model``;
* **morphology token**: the morphology embedding (``mdata["morphology"].obsm["X_uni2"]``), same treatment;
* **spatial token**: a sinusoidal encoding of the cell centroid *relative to its section* (see
  :class:`SpatialEncoding`), then a linear projection to ``d_model``.

Each token gets a learned modality (token-type) embedding added, the sequence goes through a
pre-norm transformer encoder, is mean-pooled over its tokens, layer-normalised and classified by a
linear head. The ``"multi_input"`` architecture adds *relative positional attention*: a learned bias
``b[layer, head, i, j]`` added to the attention logit of query token ``i`` on key token ``j``
(:class:`PairBiasEncoderLayer`), i.e. a learned attention prior for every ordered pair of
modalities, per head and layer, initialised at zero (plain attention at the start of training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._base import safe_std
from ._config import ARCHS, DEFAULT_WAVELENGTHS_UM

# tokens of each architecture, in sequence order
ARCH_TOKENS: dict[str, tuple[str, ...]] = {
    "unimodal": ("gene",),
    "spatial": ("gene", "spatial"),
    "dual": ("gene", "morph"),
    "multi_input": ("gene", "morph", "spatial"),
    "morphology": ("morph",),
}

def arch_tokens(arch: str) -> tuple[str, ...]:
    """The tokens (``"gene"``, ``"morph"``, ``"spatial"``) an architecture reads, in order."""
    if arch not in ARCH_TOKENS:
        raise ValueError(f"arch={arch!r} is not one of {list(ARCHS)}.")
    return ARCH_TOKENS[arch]


class SpatialEncoding(nn.Module):
    """Sinusoidal encoding of section-relative micrometre coordinates with explicit wavelengths.

    For coordinates ``(x, y)`` in micrometres *relative to the section* (the caller subtracts the
    centre of each section's bounding box, so that a model trained on one section applies to
    another) and wavelengths ``lambda_k`` in micrometres, the features are
    ``sin(2 pi x / lambda_k), cos(2 pi x / lambda_k), sin(2 pi y / lambda_k), cos(2 pi y / lambda_k)``
    for every ``k``: ``4 * len(wavelengths_um)`` features.

    Parameters
    ----------
    wavelengths_um
        Wavelengths in micrometres; :data:`DEFAULT_WAVELENGTHS_UM` (50 um to 25 mm) by default.
    """

    def __init__(self, wavelengths_um: Sequence[float] = DEFAULT_WAVELENGTHS_UM):
        super().__init__()
        wl = torch.as_tensor([float(w) for w in wavelengths_um], dtype=torch.float32)
        if wl.ndim != 1 or len(wl) == 0 or bool((wl <= 0).any()):
            raise ValueError(f"wavelengths_um must be a non-empty list of positive numbers, got {wavelengths_um}.")
        self.register_buffer("wavelengths_um", wl)

    @property
    def n_features(self) -> int:
        return 4 * len(self.wavelengths_um)

    def forward(self, coords_um: torch.Tensor) -> torch.Tensor:
        """``(batch, 2)`` section-relative micrometres -> ``(batch, 4 * n_wavelengths)``."""
        phase = 2 * math.pi * coords_um.float()[:, :, None] / self.wavelengths_um  # (B, 2, K)
        feats = torch.stack([phase.sin(), phase.cos()], dim=-1)  # (B, 2, K, 2)
        return feats.flatten(1)


class PairBiasEncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with an optional learned attention bias between token pairs.

    With ``n_tokens`` given, the layer holds a parameter ``pair_bias`` of shape
    ``(n_heads, n_tokens, n_tokens)`` (zeros at start) added to the scaled dot-product attention
    logits: ``softmax(q_i . k_j / sqrt(d) + pair_bias[h, i, j])``. Without it the layer is a standard
    pre-norm encoder layer.
    """

    def __init__(
        self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float, n_tokens: int | None = None
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout
        if n_tokens is not None:
            self.pair_bias = nn.Parameter(torch.zeros(n_heads, n_tokens, n_tokens))
        else:
            self.register_parameter("pair_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        mask = None
        if self.pair_bias is not None:
            mask = self.pair_bias.to(q.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.out(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.ff(self.norm2(x)))


class CellClassifierModule(nn.Module):
    """Token projections, modality embeddings, transformer encoder, mean pool and linear head.

    Parameters
    ----------
    arch
        One of ``"unimodal"`` (gene token), ``"spatial"`` (gene + spatial), ``"dual"`` (gene +
        morphology), ``"multi_input"`` (gene + morphology + spatial, with a learned attention bias
        between token pairs) or ``"morphology"`` (morphology token).
    n_classes
        Number of output classes.
    gene_dim, morph_dim
        Dimensions of the expression and morphology embeddings (needed by the archs that read them).
    d_model, n_layers, n_heads
        Width, depth and number of attention heads of the encoder.
    dim_feedforward
        Hidden width of the feed-forward blocks; ``4 * d_model`` by default.
    dropout
        Dropout in the encoder and before the head.
    wavelengths_um
        Wavelengths of the spatial encoding, micrometres (see :class:`SpatialEncoding`).
    """

    def __init__(
        self,
        arch: str,
        n_classes: int,
        *,
        gene_dim: int | None = None,
        morph_dim: int | None = None,
        d_model: int = 512,
        n_layers: int = 6,
        n_heads: int = 8,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        wavelengths_um: Sequence[float] = DEFAULT_WAVELENGTHS_UM,
    ):
        super().__init__()
        self.arch = arch
        self.tokens = arch_tokens(arch)
        if n_classes < 2:
            raise ValueError(f"A classifier needs at least 2 classes, got {n_classes}.")
        self.projections = nn.ModuleDict()
        if "gene" in self.tokens:
            if not gene_dim:
                raise ValueError(f"arch={arch!r} reads the expression embedding: pass gene_dim.")
            self.register_buffer("gene_mean", torch.zeros(gene_dim))
            self.register_buffer("gene_std", torch.ones(gene_dim))
            self.projections["gene"] = nn.Linear(gene_dim, d_model)
        if "morph" in self.tokens:
            if not morph_dim:
                raise ValueError(f"arch={arch!r} reads the morphology embedding: pass morph_dim.")
            self.register_buffer("morph_mean", torch.zeros(morph_dim))
            self.register_buffer("morph_std", torch.ones(morph_dim))
            self.projections["morph"] = nn.Linear(morph_dim, d_model)
        if "spatial" in self.tokens:
            self.spatial_encoding = SpatialEncoding(wavelengths_um)
            self.projections["spatial"] = nn.Linear(self.spatial_encoding.n_features, d_model)
        n_tokens = len(self.tokens)
        self.modality_embedding = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)
        pair_tokens = n_tokens if arch == "multi_input" else None
        self.layers = nn.ModuleList(
            PairBiasEncoderLayer(d_model, n_heads, dim_feedforward or 4 * d_model, dropout, pair_tokens)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, n_classes)

    def set_standardization(self, name: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the per-feature mean / std used to standardise input ``name`` (``"gene"`` or ``"morph"``)."""
        getattr(self, f"{name}_mean").copy_(torch.as_tensor(mean, dtype=torch.float32))
        getattr(self, f"{name}_std").copy_(safe_std(std))  # (nearly) constant features: centred, not scaled

    def embed_tokens(
        self,
        gene: torch.Tensor | None = None,
        morph: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input token sequence ``(batch, n_tokens, d_model)``."""
        inputs = {"gene": gene, "morph": morph, "spatial": coords}
        out = []
        for name in self.tokens:
            x = inputs[name]
            if x is None:
                raise ValueError(f"arch={self.arch!r} needs the {name!r} input.")
            if name == "spatial":
                x = self.spatial_encoding(x)
            else:
                x = (x.float() - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")
            out.append(self.projections[name](x))
        return torch.stack(out, dim=1) + self.modality_embedding

    def forward(
        self,
        gene: torch.Tensor | None = None,
        morph: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(batch, n_classes)`` from the inputs the architecture reads.

        ``gene`` is ``(batch, gene_dim)``, ``morph`` ``(batch, morph_dim)`` and ``coords``
        ``(batch, 2)`` section-relative micrometres.
        """
        x = self.embed_tokens(gene, morph, coords)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.head_dropout(self.norm(x.mean(dim=1))))
