"""``cs.datasets.synthetic_he``: an H&E-only slide of the synthetic tissue, stained and scanned elsewhere."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .._settings import logger
from .._utils import atomic_path

# what the slide folder holds (besides the H&E image)
NUCLEI_FILE = "he_nuclei.csv"
TRUTH_FILE = "truth.parquet"
EXPRESSION_FILE = "truth_expression.h5ad"
SLIDE_FILE = "slide.json"


def stain_shift(amount: float) -> dict:
    """A stain and scanner shift of size ``amount`` (0 none, 1 strong), for ``stain=`` of :func:`synthetic_he`.

    The hematoxylin vector turns towards blue-purple and the eosin vector towards orange-red, hematoxylin
    strengthens and eosin weakens (a lab with longer hematoxylin and a fresher counterstain), and the glass
    turns a little yellow (another scanner's white balance), all in proportion to ``amount``.

    Parameters
    ----------
    amount
        Size of the shift, from 0 (the usual stain) to 2; 0.5 is moderate, 1 strong.

    Returns
    -------
    A ``stain`` dict (``hematoxylin``, ``eosin``, ``hematoxylin_strength``, ``eosin_strength``, ``background``).
    """
    a = float(amount)
    if not 0 <= a <= 2:
        raise ValueError(f"amount must lie in [0, 2], got {amount!r}")
    h = np.array([0.65, 0.70, 0.29]) + a * np.array([-0.12, 0.05, 0.25])
    e = np.array([0.10, 0.88, 0.42]) + a * np.array([0.0, 0.02, -0.22])
    return {"hematoxylin": np.clip(h, 0.01, None).tolist(), "eosin": np.clip(e, 0.01, None).tolist(),
            "hematoxylin_strength": 1.0 + 0.35 * a, "eosin_strength": 1.0 - 0.3 * a,
            "background": [0.03, 0.03 + 0.02 * a, 0.03 + 0.08 * a]}


def _detections(truth: pd.DataFrame, rng: np.random.Generator, miss: float = 0.04, sd_px: float = 1.5) -> pd.DataFrame:
    """A nucleus detector's output on the slide: true nuclei with localisation noise, a few missed."""
    keep = rng.random(len(truth)) > miss
    t = truth[keep]
    return pd.DataFrame({"cell_id": t.cell_id.to_numpy(), "x": (t.he_x.to_numpy() + rng.normal(0, sd_px, len(t))).round(2),
                         "y": (t.he_y.to_numpy() + rng.normal(0, sd_px, len(t))).round(2)})


def synthetic_he(
    path: str | os.PathLike,
    *,
    n_cells: int = 5000,
    seed: int = 1,
    stain: dict | None = None,
    he_mpp: float = 0.2738,
    blur_um: float = 0.0,
    jpeg_quality: int = 90,
    name: str = "slide",
    overwrite: bool = False,
) -> Path:
    """Write an H&E-only slide of the synthetic tumour (another section of the same tissue model, another patient).

    The tissue, cells and expression are drawn by :func:`synthetic_xenium` under ``seed``; only what an
    archival slide has is kept (the H&E and a nucleus-detection table), with the truth beside it for
    scoring. The stain and scanner are set by ``stain``, ``blur_um``, ``jpeg_quality`` and ``he_mpp``
    (:func:`stain_shift` makes a graded shift).

    Parameters
    ----------
    path
        Output folder (created; must be empty or absent unless ``overwrite``).
    n_cells
        Number of cells.
    seed
        Random seed (use another seed than the training section's for another patient).
    stain
        Stain vectors and strengths and the glass colour: a dict of any of ``hematoxylin``, ``eosin``
        (optical density per RGB channel), ``hematoxylin_strength``, ``eosin_strength`` (factors) and
        ``background`` (optical density of the glass, scalar or per channel); ``None`` the usual stain.
    he_mpp
        Micrometres per pixel of the scan (0.2738 a 40x scan, 0.5 a 20x one).
    blur_um
        Gaussian blur (sigma, micrometres): a scan slightly out of focus.
    jpeg_quality
        JPEG quality of the slide's tiles (1-100).
    name
        Prefix of the image file ``<name>_he_image.ome.tif`` and the sample id :func:`cellsymphony.io.read_he_cells`
        gives it.
    overwrite
        Replace an existing non-empty folder.

    Returns
    -------
    The folder, holding ``<name>_he_image.ome.tif``; ``he_nuclei.csv`` (a detector's output: ``cell_id``,
    ``x``, ``y`` in level-0 pixels; about 4 % of nuclei missed, 1.5 px localisation noise);
    ``truth.parquet`` (per cell of the tissue: ``cell_id``, ``cell_type``, ``cell_type_fine``,
    ``compartment``, position ``x, y`` um and the rendered nucleus ``he_x, he_y`` px, as
    :func:`synthetic_xenium` writes it); ``truth_expression.h5ad`` (the cells' true counts, cells x genes);
    ``slide.json`` (the stain actually rendered: ``hematoxylin``, ``eosin``, ``background``, ``blur_um``,
    ``jpeg_quality``, ``he_mpp``, and ``seed``, ``n_cells``).
    """
    import anndata as ad
    import h5py
    import scipy.sparse as sp

    from ._synthetic import (
        _check_stain,
        _move_into_place,
        _partial_tag,
        check_output_folder,
        synthetic_xenium,
    )

    path = check_output_folder(path, overwrite)
    _check_stain(stain)  # everything else is checked by synthetic_xenium, before it writes anything
    tmp = path.parent / f".{path.name}.he-partial-{_partial_tag()}"
    full = tmp / "xenium"
    try:
        tmp.mkdir(parents=True)
        synthetic_xenium(full, n_cells=n_cells, seed=seed, he_mpp=he_mpp, name=name, transcripts=False,
                         reference_cells=0, he_stain=stain, he_blur_um=blur_um, he_jpeg_quality=jpeg_quality)
        out = tmp / "slide"
        out.mkdir()
        os.replace(full / f"{name}_he_image.ome.tif", out / f"{name}_he_image.ome.tif")
        truth = pd.read_parquet(full / TRUTH_FILE)
        os.replace(full / TRUTH_FILE, out / TRUTH_FILE)
        with atomic_path(out / NUCLEI_FILE) as f:
            _detections(truth, np.random.default_rng([seed, 23])).to_csv(f, index=False)
        with h5py.File(full / "cell_feature_matrix.h5", "r") as h:
            m = h["matrix"]
            n_feat, n_obs = (int(v) for v in m["shape"][()])
            x = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=(n_feat, n_obs)).T.tocsr()
            names = np.array([v.decode() for v in m["features"]["name"][()]])
            kinds = np.array([v.decode() for v in m["features"]["feature_type"][()]])
            cells = np.array([v.decode() for v in m["barcodes"][()]])
        gex = kinds == "Gene Expression"
        expr = ad.AnnData(X=x[:, gex].astype(np.float32), obs=pd.DataFrame(index=pd.Index(cells, name="cell_id")),
                          var=pd.DataFrame(index=pd.Index(names[gex])))
        with atomic_path(out / EXPRESSION_FILE) as f:
            expr.write_h5ad(f)
        rendered = json.loads((full / "truth_he.json").read_text())["stain"]
        with atomic_path(out / SLIDE_FILE) as f:
            f.write_text(json.dumps({**rendered, "he_mpp": float(he_mpp), "seed": int(seed), "n_cells": int(n_cells),
                                     "stain_requested": stain}, indent=2))
        shutil.rmtree(full)
        _move_into_place(out, path, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote an H&E-only synthetic slide of %d cells to %s", n_cells, path)
    return path
