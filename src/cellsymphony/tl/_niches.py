from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import CONTRASTIVE_KEY, MOD_MORPH, NICHE_KEY
from .._docs import inject_docs
from .._joint import push_joint_obs
from .._settings import logger
from .._utils import params_record
from .._validate import check_choice, get_modality, is_mudata

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData


@inject_docs()
def niches(
    mdata: MuData | AnnData,
    *,
    use_rep: str = CONTRASTIVE_KEY,
    mod: str = MOD_MORPH,
    n_neighbors: int = 15,
    resolution: float = 0.5,
    method: Literal["leiden"] = "leiden",
    umap: bool = False,
    seed: int = 0,
    key_added: str = NICHE_KEY,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Cluster cells into niches: scanpy's k-nearest-neighbour graph of a representation, then Leiden.

    By default the representation is the morphology projection of :func:`cellsymphony.tl.align_contrastive`,
    so niches can be found from H&E alone (also on a morphology-only MuData of an H&E-only slide once
    ``aligner.transform(..., key_added='X_cs_contrastive')`` has run). Cells whose row of ``use_rep``
    has a NaN/inf are left out of the graph and get a NaN label.

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    use_rep
        Key in the modality's ``.obsm`` to cluster.
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
    copy
        {copy}

    Returns
    -------
    None, or a modified copy with ``copy=True``. Writes:

    - ``obs[key_added]`` (categorical niche labels ``'0'``, ``'1'``, ..., NaN for left-out cells) on the
      modality and on the MuData (``mdata.obs[key_added]``, besides ``mdata.obs['mod:key_added']``);
    - ``obsm[key_added + '_umap']`` on the modality when ``umap=True`` (NaN rows for left-out cells);
    - ``uns[key_added]`` on the modality: ``params``, ``n_niches`` and ``n_excluded``.
    """
    check_choice("method", method, ["leiden"])
    if int(n_neighbors) != n_neighbors or n_neighbors < 2:
        raise ValueError(f"n_neighbors={n_neighbors!r} must be an integer >= 2.")
    if not resolution > 0:
        raise ValueError(f"resolution={resolution!r} must be positive.")
    adata = get_modality(mdata, mod)
    if use_rep not in adata.obsm:
        hint = (
            "run cs.tl.align_contrastive first (or aligner.transform(mdata, key_added=...) on a new slide)"
            if use_rep == CONTRASTIVE_KEY
            else "pass one of its keys"
        )
        raise ValueError(
            f"{use_rep!r} is not in the {mod!r} modality's .obsm (it has {sorted(adata.obsm)}): {hint}."
        )
    x = adata.obsm[use_rep]
    x = np.asarray(x.to_numpy() if isinstance(x, pd.DataFrame) else x, dtype=np.float32)
    ok = np.isfinite(x).all(axis=1)
    n_ok = int(ok.sum())
    if n_ok <= n_neighbors:
        raise ValueError(
            f"Only {n_ok} cells have a finite {use_rep!r} row: need more than n_neighbors={n_neighbors}."
        )

    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names[ok]), obsm={"rep": x[ok]})
    sc.pp.neighbors(tmp, n_neighbors=int(n_neighbors), use_rep="rep", random_state=seed)
    sc.tl.leiden(
        tmp, resolution=resolution, random_state=seed, key_added="niche", flavor="igraph", n_iterations=2,
        directed=False,
    )  # fmt: skip
    codes = tmp.obs["niche"].astype(int).to_numpy()
    n_niches = int(codes.max()) + 1
    labels = np.full(adata.n_obs, -1, dtype=int)
    labels[ok] = codes
    cats = [str(i) for i in range(n_niches)]
    col = pd.Categorical.from_codes(labels, categories=cats)
    umap_xy = None
    if umap:
        sc.tl.umap(tmp, random_state=seed)
        umap_xy = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)
        umap_xy[ok] = tmp.obsm["X_umap"]

    if copy:
        mdata = mdata.copy()
        adata = get_modality(mdata, mod)
    adata.obs[key_added] = pd.Series(col, index=adata.obs_names)
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
        ),  # fmt: skip
        "n_niches": n_niches,
        "n_excluded": int((~ok).sum()),
    }
    if is_mudata(mdata):
        mdata.update()
        joint = adata.obs[key_added].reindex(mdata.obs_names)
        mdata.obs[key_added] = pd.Categorical(joint, categories=cats)
        push_joint_obs(mdata, [key_added])
    where = f"the {mod!r} modality and the MuData" if is_mudata(mdata) else "the AnnData"
    logger.info(
        "added .obs[%r] (%d niches, %d cells left out for NaN rows) to %s",
        key_added,
        n_niches,
        int((~ok).sum()),
        where,
    )
    return mdata if copy else None
