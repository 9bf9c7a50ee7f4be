"""Shared data of the export tests: a small synthetic section with a prediction, and image statistics."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

import cellsymphony as cs
from cellsymphony._joint import push_joint_obs

N_CELLS, SEED = 300, 2


@functools.cache
def _bundle():
    return cs.datasets.synthetic_path(n_cells=N_CELLS, seed=SEED)


def _mdata():
    m = cs.io.read_xenium(_bundle())
    area = m["rna"].obs["cell_area"].to_numpy()
    pred = np.where(area > np.median(area), "large", "small").astype(object)
    pred[:7] = None  # cells without a prediction
    m.obs["cs_pred"] = pd.Categorical(pred, categories=["large", "small"])
    m.obsm["cs_pred_proba"] = np.random.default_rng(0).random((m.n_obs, 2))
    m.uns["cs_pred"] = {"classes": np.array(["large", "small"], dtype=object), "params": {"seed": 0}}
    push_joint_obs(m, ["cs_pred"])
    return m


def _pink_fraction(rgb: np.ndarray) -> float:
    """Share of pixels with the H&E's eosin pink (red and blue above green), absent from the plot colours."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return float(((r - g > 25) & (b - g > 10) & (r > 120)).mean())


def _render(fig) -> np.ndarray:
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


