"""The paired inputs of the contrastive aligner: cells in both modalities with finite embeddings (no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..._constants import MOD_MORPH, MOD_RNA
from ..._settings import logger
from ..._validate import get_rep, is_mudata

if TYPE_CHECKING:
    from mudata import MuData


def paired_inputs(mdata: MuData, gene_rep: str | None, morph_rep: str | None) -> dict:
    """The paired training inputs of a MuData: cells present in both modalities with finite rows.

    Returns a dict with ``obs_names`` (the cells used, in ``rna`` order), ``x_gene``, ``x_morph``
    (float32), the resolved ``gene_rep`` / ``morph_rep`` and the cell counts ``n_rna``, ``n_morphology``,
    ``n_paired`` (in both), ``n_nan_rna`` / ``n_nan_morphology`` (paired cells whose row has a NaN or
    infinite value) and ``n_used``.
    """
    if not is_mudata(mdata) or MOD_RNA not in mdata.mod or MOD_MORPH not in mdata.mod:
        have = sorted(mdata.mod) if is_mudata(mdata) else "an AnnData"
        raise ValueError(
            f"Contrastive alignment needs a MuData with modalities 'rna' and 'morphology' (got {have}); "
            "read the data with cs.io.read_xenium."
        )
    rna, morph = mdata.mod[MOD_RNA], mdata.mod[MOD_MORPH]
    for name, ad in ((MOD_RNA, rna), (MOD_MORPH, morph)):
        if not ad.obs_names.is_unique:
            raise ValueError(f"The {name!r} modality has duplicated obs_names: cells are paired by name.")
    gene_rep, xg = get_rep(mdata, MOD_RNA, gene_rep)
    morph_rep, xm = get_rep(mdata, MOD_MORPH, morph_rep)
    common = rna.obs_names[rna.obs_names.isin(morph.obs_names)]
    if len(common) == 0:
        raise ValueError(
            "The 'rna' and 'morphology' modalities have no cell (obs_names) in common, so no pairs to train on: "
            f"e.g. {list(rna.obs_names[:3])} vs {list(morph.obs_names[:3])}."
        )
    gi, mi = rna.obs_names.get_indexer(common), morph.obs_names.get_indexer(common)
    ok_g = np.isfinite(xg).all(axis=1)[gi]
    ok_m = np.isfinite(xm).all(axis=1)[mi]
    ok = ok_g & ok_m
    info = {
        "gene_rep": gene_rep,
        "morph_rep": morph_rep,
        "n_rna": int(rna.n_obs),
        "n_morphology": int(morph.n_obs),
        "n_paired": int(len(common)),
        "n_nan_rna": int((~ok_g).sum()),
        "n_nan_morphology": int((~ok_m).sum()),
        "n_used": int(ok.sum()),
    }
    if len(common) < rna.n_obs or len(common) < morph.n_obs:
        logger.warning(
            "pairing cells by obs_names: %d of %d rna and %d of %d morphology cells are in both modalities",
            len(common), rna.n_obs, len(common), morph.n_obs,
        )  # fmt: skip
    if (~ok).any():
        logger.warning(
            "leaving out %d paired cells with NaN/inf rows (%d in %r, %d in %r); their outputs will be NaN",
            int((~ok).sum()), info["n_nan_rna"], gene_rep, info["n_nan_morphology"], morph_rep,
        )  # fmt: skip
    info.update(obs_names=common[ok], x_gene=_take_rows(xg, gi[ok]), x_morph=_take_rows(xm, mi[ok]))
    return info


def _take_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``x[rows]`` as a C-contiguous array, without a copy when ``rows`` is every row in order."""
    if len(rows) == len(x) and (rows == np.arange(len(x))).all():
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x[rows])
