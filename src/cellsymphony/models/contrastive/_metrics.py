"""Held-out cross-modal retrieval of the contrastive aligner."""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


@torch.no_grad()
def retrieval_recall(
    z_a: torch.Tensor, z_b: torch.Tensor, ks=RECALL_KS, chunk: int = 4096
) -> dict[int, float]:
    """Recall@k of retrieving row ``i`` of ``z_b`` from row ``i`` of ``z_a`` by cosine similarity.

    With ``g`` candidates scoring strictly higher than the true partner and ``t`` scoring the same
    (the partner included), the partner's chance of being in the top ``k`` under random tie-breaking
    is ``clip((k - g) / t, 0, 1)``; recall@k is its mean over the rows. Ties thus count at chance
    (a collapsed projection scores ``k / n``), never as hits. Computed in chunks of rows so memory
    stays ``chunk * n``.
    """
    n = z_a.shape[0]
    greater, tied = [], []
    for s in range(0, n, chunk):
        sims = z_a[s : s + chunk] @ z_b.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        true = sims[rows, rows + s][:, None]
        greater.append((sims > true).sum(dim=1))
        tied.append((sims == true).sum(dim=1))
    if not n:
        return {k: float("nan") for k in ks}
    g = torch.cat(greater).cpu().numpy().astype(np.float64)
    t = torch.cat(tied).cpu().numpy().astype(np.float64)
    return {k: float(np.clip((k - g) / t, 0, 1).mean()) for k in ks}
