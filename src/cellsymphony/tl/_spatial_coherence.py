from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import SAMPLE_KEY
from .._coordinates import cell_coordinates
from .._docs import inject_docs
from .._settings import logger
from .._utils import getter_record
from .._validate import find_obs_column, renamed_parameters

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

OVERALL = "overall"


def _coordinates(mdata: MuData | AnnData) -> np.ndarray:
    """Cell centroids ``obsm['spatial']`` (micrometres) indexed like ``mdata.obs``
    (:func:`cellsymphony._coordinates.cell_coordinates`); NaN rows for cells with none."""
    return cell_coordinates(mdata, "cell", purpose="spatial_coherence")


def _same_fractions(codes: np.ndarray, src: np.ndarray, dst: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster fraction of edges (from a cell of the cluster) ending in the same cluster, then overall.

    ``codes`` may be 2-D (permutations x cells); the result then has one row per permutation.
    """
    codes = np.atleast_2d(codes)
    cs, cd = codes[:, src], codes[:, dst]
    same = cs == cd
    out = np.empty((codes.shape[0], k + 1))
    for r in range(codes.shape[0]):
        tot = np.bincount(cs[r], minlength=k)
        hit = np.bincount(cs[r][same[r]], minlength=k)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[r, :k] = hit / tot
        out[r, k] = same[r].mean() if same.shape[1] else np.nan
    return out


@renamed_parameters(n_neighs="n_neighbors")
@inject_docs()
def spatial_coherence(
    mdata: MuData | AnnData,
    cluster_key: str,
    *,
    n_neighbors: int = 6,
    radius: float | None = None,
    n_perms: int = 1000,
    seed: int = 0,
    sample_key: str | None = SAMPLE_KEY,
    key_added: str | None = None,
) -> pd.DataFrame:
    """How spatially coherent clusters are: fraction of each cell's spatial neighbours in its own cluster.

    The spatial graph is squidpy's (:func:`squidpy.gr.spatial_neighbors` on ``obsm['spatial']``,
    built per sample so cells of different sections are never neighbours): each cell's ``n_neighbors``
    nearest cells, or every cell within ``radius`` micrometres. The observed statistic (per cluster:
    the fraction of edges leaving its cells that land in the same cluster; overall: the fraction of
    all edges joining two cells of one cluster) is compared with a null in which the labels are
    permuted among the cells of each sample ``n_perms`` times, keeping the graph and the cluster
    sizes. Use it to compare clusterings, e.g. niches of raw morphology embeddings against niches of
    contrastive projections.

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    cluster_key
        Column of clusters, looked up in ``mdata.obs`` as given, then as ``mod:cluster_key``, then in
        each modality's ``obs``. Cells without a cluster keep their place in the graph but their edges
        are not counted.
    n_neighbors
        Nearest neighbours per cell (ignored when ``radius`` is given).
    radius
        Neighbourhood radius in micrometres instead of a fixed number of neighbours.
    n_perms
        Label permutations of the null.
    seed
        {seed}
    sample_key
        Column of sections (a graph per section); ``None``, or the default ``'sample'`` when absent: all
        cells form one section.
    key_added
        When given, the table is also stored as ``mdata.uns[key_added] = {{"table": ..., "params": ...}}``
        (the storage shape of every getter).

    Returns
    -------
    A flat DataFrame indexed by cluster (str) plus a last row ``'overall'``, with the columns
    ``n_cells``, ``n_edges`` (counted edges from the cluster's cells), ``observed``, ``null_mean``,
    ``null_sd``, ``z`` (``(observed - null_mean) / null_sd``) and ``pval`` (empirical one-sided,
    ``(1 + #null >= observed) / (n_perms + 1)``; NaN, like
    ``observed``, for a cluster without counted edges).
    """
    if int(n_neighbors) != n_neighbors or n_neighbors < 1:
        raise ValueError(f"n_neighbors={n_neighbors!r} must be a positive integer.")
    if int(n_perms) != n_perms or n_perms < 1:
        raise ValueError(f"n_perms={n_perms!r} must be a positive integer.")
    clusters = find_obs_column(mdata, cluster_key)
    xy = _coordinates(mdata)
    samples = np.full(mdata.n_obs, "0", dtype=object)
    if sample_key is not None:
        try:
            samples = find_obs_column(mdata, sample_key).astype(str).to_numpy()
        except ValueError:
            if sample_key != SAMPLE_KEY:
                raise
            logger.info("no %r column: treating all cells as one section", sample_key)
    placed = np.isfinite(xy).all(axis=1)
    if placed.sum() < 2:
        raise ValueError("Fewer than two cells have finite .obsm['spatial'] coordinates.")

    import anndata as ad
    import squidpy as sq

    tmp = ad.AnnData(
        obs=pd.DataFrame({"sample": pd.Categorical(samples[placed])}, index=mdata.obs_names[placed]),
        obsm={"spatial": xy[placed]},
    )
    kw = {"radius": float(radius)} if radius is not None else {"n_neighs": int(n_neighbors)}  # squidpy's name
    sq.gr.spatial_neighbors(tmp, library_key="sample", coord_type="generic", spatial_key="spatial", **kw)
    graph = tmp.obsp["spatial_connectivities"].tocoo()

    lab = clusters[placed]
    cat = lab.astype("category") if not isinstance(lab.dtype, pd.CategoricalDtype) else lab
    cat = cat.cat.remove_unused_categories()
    codes = cat.cat.codes.to_numpy()
    names = [str(c) for c in cat.cat.categories]
    k = len(names)
    if k == 0:
        raise ValueError(f"No placed cell has a {cluster_key!r} value.")
    keep = (graph.row != graph.col) & (codes[graph.row] >= 0) & (codes[graph.col] >= 0)
    src, dst = graph.row[keep], graph.col[keep]
    observed = _same_fractions(codes, src, dst, k)[0]

    labelled = np.flatnonzero(codes >= 0)
    groups = [labelled[tmp.obs["sample"].to_numpy()[labelled] == s] for s in np.unique(tmp.obs["sample"])]
    rng = np.random.default_rng(seed)
    null = np.empty((int(n_perms), k + 1))
    chunk = max(1, int(2e7 // max(len(codes), 1)))
    for s in range(0, int(n_perms), chunk):
        m = min(chunk, int(n_perms) - s)
        perm = np.repeat(codes[None, :], m, axis=0)
        for g in groups:
            perm[:, g] = rng.permuted(np.repeat(codes[None, g], m, axis=0), axis=1)
        null[s : s + m] = _same_fractions(perm, src, dst, k)
    with np.errstate(invalid="ignore"):
        null_mean = np.nanmean(null, axis=0)
        null_sd = np.nanstd(null, axis=0, ddof=1) if n_perms > 1 else np.full(k + 1, np.nan)
        z = (observed - null_mean) / null_sd
        pval = (1 + (null >= observed[None, :]).sum(axis=0)) / (n_perms + 1)
        pval[~np.isfinite(observed)] = np.nan  # no counted edge: no statistic, no p-value
    n_cells = np.append(np.bincount(codes[codes >= 0], minlength=k), (codes >= 0).sum())
    n_edges = np.append(np.bincount(codes[src], minlength=k), len(src))
    df = pd.DataFrame(
        {
            "n_cells": n_cells.astype(np.int64),
            "n_edges": n_edges.astype(np.int64),
            "observed": observed,
            "null_mean": null_mean,
            "null_sd": null_sd,
            "z": z,
            "pval": pval,
        },
        index=pd.Index([*names, OVERALL], name="cluster"),
    )
    if key_added is not None:
        mdata.uns[key_added] = getter_record(
            df, cluster_key=cluster_key, n_neighbors=int(n_neighbors), radius=radius, n_perms=int(n_perms), seed=int(seed),
            sample_key=sample_key,
        )
        from .._results import record_outputs

        record_outputs(mdata, key_added, "tl.spatial_coherence", [f"uns[{key_added!r}]"])
        logger.info("added .uns[%r] (spatial coherence of %r)", key_added, cluster_key)
    return df
