"""The torch part of the contrastive aligner: two projection networks and the symmetric InfoNCE loss.

Plain ``nn.Module`` code with no knowledge of MuData; :class:`~cellsymphony.models.ContrastiveAligner`
wraps it (the scvi-tools split between a *module* and a data-aware *model*).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .._base import safe_std

MIN_TEMPERATURE = 0.01  # logits scale at most 100, as in CLIP
MAX_TEMPERATURE = 1.0


def info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE between two batches of paired, L2-normalised embeddings.

    Row ``i`` of ``z_a`` and row ``i`` of ``z_b`` are a positive pair; every other row of the other
    modality in the batch is a negative. With logits ``L = z_a @ z_b.T / temperature`` the loss is
    ``(CE(L, arange) + CE(L.T, arange)) / 2``: the mean of the a->b and b->a cross-entropies, so
    swapping the two modalities gives the same value.

    Parameters
    ----------
    z_a, z_b
        ``(batch, dim)`` L2-normalised embeddings of the same cells.
    temperature
        Softmax temperature (> 0).

    Returns
    -------
    Scalar loss tensor.
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"paired batches differ in shape: {tuple(z_a.shape)} vs {tuple(z_b.shape)}")
    logits = z_a @ z_b.T / temperature
    target = torch.arange(z_a.shape[0], device=z_a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class ProjectionHead(nn.Module):
    """Standardise, then ``Linear -> LayerNorm -> GELU -> Dropout -> Linear``, then L2-normalise.

    The per-feature mean and standard deviation of the training cells are buffers of the head, so
    they are saved with the weights and applied unchanged to new sections.
    """

    def __init__(self, n_input: int, *, hidden: int = 256, dim: int = 128, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_input))
        self.register_buffer("std", torch.ones(n_input))
        self.net = nn.Sequential(
            nn.Linear(n_input, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )

    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the input standardisation; standard deviations below 1e-6 are treated as 1."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(safe_std(std))

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Deprecated spelling of :meth:`set_standardization`."""
        warnings.warn(
            "ProjectionHead.set_standardisation is deprecated: call set_standardization (the spelling of "
            "CellClassifierModule.set_standardization).",
            FutureWarning,
            stacklevel=2,
        )
        self.set_standardization(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net((x - self.mean) / self.std)
        return F.normalize(z, dim=-1)


class ContrastiveModule(nn.Module):
    """Two projection heads into a shared ``dim``-dimensional unit sphere and a learnable temperature.

    Parameters
    ----------
    n_gene, n_morph
        Input dimensions of the expression and morphology embeddings.
    dim
        Dimension of the shared space.
    hidden
        Width of the hidden layer of each head.
    dropout
        Dropout after the hidden layer.
    temperature
        Initial softmax temperature.
    learn_temperature
        Learn the temperature (as ``log`` temperature, clamped to ``[0.01, 1]``) or keep it fixed.
    """

    def __init__(
        self,
        n_gene: int,
        n_morph: int,
        *,
        dim: int = 128,
        hidden: int = 256,
        dropout: float = 0.1,
        temperature: float = 0.07,
        learn_temperature: bool = True,
    ):
        super().__init__()
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature={temperature} must lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}].")
        self.gene_head = ProjectionHead(n_gene, hidden=hidden, dim=dim, dropout=dropout)
        self.morph_head = ProjectionHead(n_morph, hidden=hidden, dim=dim, dropout=dropout)
        log_t = torch.tensor(math.log(temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature, clamped to ``[0.01, 1]``."""
        return self.log_temperature.clamp(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)).exp()

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp the stored log temperature in place (called after each optimiser step)."""
        self.log_temperature.clamp_(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE))

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Project one modality (``"rna"`` or ``"morphology"``) into the shared space."""
        if modality == "rna":
            return self.gene_head(x)
        if modality == "morphology":
            return self.morph_head(x)
        raise ValueError(f"modality={modality!r} is not one of ['rna', 'morphology'].")

    def forward(self, x_gene: torch.Tensor, x_morph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gene_head(x_gene), self.morph_head(x_morph)

    def loss(self, x_gene: torch.Tensor, x_morph: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of a batch of paired cells."""
        z_gene, z_morph = self(x_gene, x_morph)
        return info_nce(z_gene, z_morph, self.temperature)
