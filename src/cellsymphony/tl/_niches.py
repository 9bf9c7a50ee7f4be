from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import CONTRASTIVE_KEY, LATEST_KEY, MOD_MORPH, NICHE_KEY, UNS_KEY
from .._docs import inject_docs
from .._joint import push_joint_obs
from .._settings import logger, settings
from .._utils import params_record
from .._validate import check_choice, check_float, check_int, get_modality, is_mudata, resolve_rep

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData


def _default_rep(mdata, mod: str) -> str:
    """``use_rep=None``: the latest representation of ``mod`` (``uns["cellsymphony"]["latest"]``). During the
    deprecation period a modality holding the contrastive projection keeps the former default, with a
    FutureWarning, when it is not the latest."""
    adata = get_modality(mdata, mod)
    latest = mdata.uns.get(UNS_KEY, {}).get(LATEST_KEY, {})
    latest = latest.get(mod) if hasattr(latest, "get") else None
    if CONTRASTIVE_KEY in adata.obsm and latest != CONTRASTIVE_KEY:
        warnings.warn(
            f"cs.tl.niches(use_rep=None) now means the latest {mod!r} representation ({latest!r}), no longer "
            f"{CONTRASTIVE_KEY!r}; this run still clusters {CONTRASTIVE_KEY!r}. Pass use_rep={CONTRASTIVE_KEY!r} "
            f"to keep clustering the contrastive projections (or use_rep={latest!r} for the new default).",
            FutureWarning,
            stacklevel=3,
        )
        return CONTRASTIVE_KEY
    if latest is None and CONTRASTIVE_KEY not in adata.obsm:
        raise ValueError(
            f"No {mod!r} representation to cluster: run cs.tl.align_contrastive first (or "
            "aligner.transform(mdata, key_added=...) on a new slide), or cs.pp.embed_morphology, or pass use_rep=."
        )
    return resolve_rep(mdata, mod, None)


def _full_graph(sub, ok: np.ndarray, n: int):
    """A graph of the ``ok`` cells as an ``(n, n)`` CSR matrix over every cell (left-out cells: no edges)."""
    import scipy.sparse as sp

    idx = np.flatnonzero(ok)
    coo = sp.coo_matrix(sub)
    return sp.csr_matrix((coo.data, (idx[coo.row], idx[coo.col])), shape=(n, n))


@inject_docs()
def niches(
    mdata: MuData | AnnData,
    *,
    use_rep: str | None = None,
    mod: str = MOD_MORPH,
    n_neighbors: int = 15,
    resolution: float = 0.5,
    method: Literal["leiden"] = "leiden",
    umap: bool = False,
    seed: int = 0,
    key_added: str = NICHE_KEY,
    neighbors_key: str | None = None,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Cluster cells into niches: scanpy's k-nearest-neighbour graph of a representation, then Leiden.

    Usually the representation is the morphology projection of :func:`cellsymphony.tl.align_contrastive`
    (``use_rep='X_cs_contrastive'``), so niches can be found from H&E alone (also on a morphology-only
    MuData of an H&E-only slide once ``aligner.transform(..., key_added='X_cs_contrastive')`` has run).
    Cells whose row of ``use_rep`` has a NaN/inf are left out of the graph and get a NaN label.

    The label is written once, on the modality (``mdata[mod].obs[key_added]``, which the MuData shows as
    ``mdata.obs[f"{{mod}}:{{key_added}}"]``; functions taking a column name find it by ``key_added``). The
    kNN graph is kept as scanpy keeps it, so ``sc.tl.umap(mdata[mod], neighbors_key=...)``,
    ``sc.tl.leiden`` or squidpy can reuse it; the UMAP (``umap=True``) is computed on that graph.

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    use_rep
        Key in the modality's ``.obsm`` to cluster; ``None``: the latest representation of ``mod``
        (``uns["cellsymphony"]["latest"]``). Until the next minor release, ``None`` on a modality holding
        ``X_cs_contrastive`` that is not the latest still means ``X_cs_contrastive`` (the former default),
        with a FutureWarning.
    mod
        Modality holding ``use_rep`` (ignored for an AnnData).
    n_neighbors
        Neighbours per cell of the kNN graph (:func:`scanpy.pp.neighbors`).
    resolution
        Leiden resolution: higher gives more, smaller niches.
    method
        Community detection; ``"leiden"`` (:func:`scanpy.tl.leiden`, igraph implementation).
    umap
        Also compute a UMAP of the same graph (:func:`scanpy.tl.umap`).
    seed
        {seed}
    key_added
        Name of the niche column.
    neighbors_key
        Where the kNN graph goes (as ``sc.pp.neighbors(key_added=...)``); default ``f"{{key_added}}_neighbors"``.
    copy
        {copy}

    Returns
    -------
    None, or a modified copy with ``copy=True``; writes

    - ``obs[key_added]`` on the modality: categorical niche labels ``'0'``, ``'1'``, ..., NaN for left-out
      cells; for a MuData also the same column in ``mdata.obs`` and in every other modality's ``obs``
      (a joint per-cell result, kept in sync on every run);
    - ``obsp[f"{{neighbors_key}}_connectivities"]`` and ``obsp[f"{{neighbors_key}}_distances"]``: on the
      modality, ``(n_cells, n_cells)`` CSR, left-out cells without edges; and ``uns[neighbors_key]`` with
      ``connectivities_key``, ``distances_key`` and scanpy's ``params``;
    - ``obsm[key_added + '_umap']`` on the modality, when ``umap=True``: NaN rows for left-out cells;
    - ``uns[key_added]`` on the modality: ``params``, ``n_niches`` and ``n_excluded``.
    """
    check_choice("method", method, ["leiden"])
    n_neighbors = check_int("n_neighbors", n_neighbors, min=2)
    resolution = check_float("resolution", resolution, min=0, min_open=True)
    seed = check_int("seed", seed)
    adata = get_modality(mdata, mod)
    if use_rep is None:
        use_rep = _default_rep(mdata, mod)
    elif use_rep not in adata.obsm:
        hint = (
            "run cs.tl.align_contrastive first (or aligner.transform(mdata, key_added=...) on a new slide)"
            if use_rep == CONTRASTIVE_KEY
            else "pass one of its keys"
        )
        raise ValueError(
            f"{use_rep!r} is not in the {mod!r} modality's .obsm (it has {sorted(adata.obsm)}): {hint}."
        )
    neighbors_key = neighbors_key or f"{key_added}_neighbors"
    x = adata.obsm[use_rep]
    x = np.asarray(x.to_numpy() if isinstance(x, pd.DataFrame) else x, dtype=np.float32)
    ok = np.isfinite(x).all(axis=1)
    n_ok = int(ok.sum())
    if n_ok <= n_neighbors:
        raise ValueError(
            f"Only {n_ok} cells have a finite {use_rep!r} row: need more than n_neighbors={n_neighbors}."
        )

    import time

    import anndata as ad
    import scanpy as sc

    def step(name, fn):  # the long steps of a large section (kNN, Leiden, UMAP), one progress line each
        t0 = time.perf_counter()
        if settings.progress:
            logger.info("niches: %s of %d cells ...", name, n_ok)
        fn()
        logger.info("niches: %s done in %.1f s", name, time.perf_counter() - t0)

    tmp = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names[ok]), obsm={"rep": x[ok]})
    step("kNN graph", lambda: sc.pp.neighbors(tmp, n_neighbors=int(n_neighbors), use_rep="rep", random_state=seed))
    step("Leiden", lambda: sc.tl.leiden(
        tmp, resolution=resolution, random_state=seed, key_added="niche", flavor="igraph", n_iterations=2,
        directed=False,
    ))  # fmt: skip
    codes = tmp.obs["niche"].astype(int).to_numpy()
    n_niches = int(codes.max()) + 1
    labels = np.full(adata.n_obs, -1, dtype=int)
    labels[ok] = codes
    cats = [str(i) for i in range(n_niches)]
    col = pd.Categorical.from_codes(labels, categories=cats)
    umap_xy = None
    if umap:  # on the graph just built (scanpy's UMAP reads tmp's neighbors)
        step("UMAP", lambda: sc.tl.umap(tmp, random_state=seed))
        umap_xy = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)
        umap_xy[ok] = tmp.obsm["X_umap"]
    conn = _full_graph(tmp.obsp["connectivities"], ok, adata.n_obs)
    dist = _full_graph(tmp.obsp["distances"], ok, adata.n_obs)
    nparams = {**dict(tmp.uns["neighbors"]["params"]), "use_rep": use_rep}  # scanpy's, naming our obsm key

    if copy:
        mdata = mdata.copy()
        adata = get_modality(mdata, mod)
    adata.obs[key_added] = pd.Series(col, index=adata.obs_names)
    adata.obsp[f"{neighbors_key}_connectivities"] = conn
    adata.obsp[f"{neighbors_key}_distances"] = dist
    adata.uns[neighbors_key] = {
        "connectivities_key": f"{neighbors_key}_connectivities",
        "distances_key": f"{neighbors_key}_distances",
        "params": nparams,
    }
    if umap_xy is not None:
        adata.obsm[f"{key_added}_umap"] = umap_xy
    adata.uns[key_added] = {
        "params": params_record(
            use_rep=use_rep,
            mod=mod,
            n_neighbors=n_neighbors,
            resolution=resolution,
            method=method,
            umap=umap,
            seed=seed,
            neighbors_key=neighbors_key,
        ),  # fmt: skip
        "n_niches": n_niches,
        "n_excluded": int((~ok).sum()),
    }
    if is_mudata(mdata):
        mdata.update()
        # a joint per-cell result: on the MuData, mirrored to every modality by the one function that does so
        mdata.obs[key_added] = adata.obs[key_added].reindex(mdata.obs_names)
        push_joint_obs(mdata, [key_added])
    where = f"the {mod!r} modality and the MuData" if is_mudata(mdata) else "the AnnData"
    logger.info(
        "added .obs[%r] (%d niches, %d cells left out for NaN rows), .obsp[%r / %r], .uns[%r] to %s",
        key_added, n_niches, int((~ok).sum()), f"{neighbors_key}_connectivities", f"{neighbors_key}_distances",
        neighbors_key, where,
    )
    return mdata if copy else None
