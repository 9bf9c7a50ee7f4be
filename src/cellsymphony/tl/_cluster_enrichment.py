from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._docs import inject_docs
from .._settings import logger
from .._utils import getter_record
from .._validate import find_obs_column

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

PSEUDOCOUNT = 0.5  # Haldane-Anscombe correction of the odds ratio


@inject_docs(pseudocount=str(PSEUDOCOUNT))
def cluster_enrichment(
    mdata: MuData | AnnData,
    cluster_key: str,
    label_key: str,
    *,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Enrichment of each label (e.g. cell type) in each cluster (e.g. niche): one-sided Fisher tests.

    For every cluster ``c`` and label ``l`` the cells (those with both a cluster and a label) form the
    2x2 table ``[[a, b], [c, d]]`` with ``a`` = in ``c`` with ``l``, ``b`` = in ``c`` with another label,
    ``c`` = elsewhere with ``l``, ``d`` = elsewhere with another label. The p-value is
    :func:`scipy.stats.fisher_exact` with ``alternative='greater'`` (more cells with ``l`` in ``c``
    than expected); the q-value is the Benjamini-Hochberg correction over all cluster x label pairs
    (:func:`statsmodels.stats.multitest.multipletests`, ``method='fdr_bh'``).

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    cluster_key
        Column of clusters, looked up in ``mdata.obs`` as given, then as ``mod:cluster_key``, then in
        each modality's ``obs``.
    label_key
        Column of labels, looked up the same way.
    key_added
        When given, the table is also stored as ``mdata.uns[key_added] = {{"table": ..., "params": ...}}``
        (the storage shape of every getter).

    Returns
    -------
    A flat DataFrame with one row per cluster x label (every pair, including empty ones), clusters
    in category order, and the columns

    - ``cluster``, ``label`` (str);
    - ``count``: cells of the cluster with the label (``a``);
    - ``n_cluster``, ``n_label``, ``n_cells``: cluster size, label total, cells tested;
    - ``expected``: ``n_cluster * n_label / n_cells``;
    - ``obs_exp``: ``count / expected``;
    - ``log2_odds_ratio``: ``log2(((a + {pseudocount}) (d + {pseudocount})) / ((b + {pseudocount}) (c + {pseudocount})))``,
      the Haldane-Anscombe pseudocount keeping it finite for empty cells of the table;
    - ``pval``: one-sided Fisher exact p (enrichment); ``qval``: Benjamini-Hochberg q.
    """
    from scipy.stats import fisher_exact
    from statsmodels.stats.multitest import multipletests

    clusters = find_obs_column(mdata, cluster_key)
    labels = find_obs_column(mdata, label_key)
    ok = clusters.notna().to_numpy() & labels.notna().to_numpy()
    if not ok.any():
        raise ValueError(f"No cell has both a {cluster_key!r} and a {label_key!r} value.")
    cl = clusters[ok].astype(str) if not isinstance(clusters.dtype, pd.CategoricalDtype) else clusters[ok]
    lb = labels[ok].astype(str) if not isinstance(labels.dtype, pd.CategoricalDtype) else labels[ok]
    table = pd.crosstab(
        pd.Categorical(cl).remove_unused_categories(),
        pd.Categorical(lb).remove_unused_categories(),
        dropna=False,
    )
    counts = table.to_numpy().astype(np.int64)
    n = int(counts.sum())
    n_cluster = counts.sum(axis=1, keepdims=True)
    n_label = counts.sum(axis=0, keepdims=True)
    a = counts
    b = n_cluster - a
    c = n_label - a
    d = n - a - b - c
    rows = []
    for i, cname in enumerate(table.index):
        for j, lname in enumerate(table.columns):
            tab = [[int(a[i, j]), int(b[i, j])], [int(c[i, j]), int(d[i, j])]]
            p = fisher_exact(tab, alternative="greater").pvalue
            expected = float(n_cluster[i, 0] * n_label[0, j] / n)
            lor = np.log2(
                (a[i, j] + PSEUDOCOUNT)
                * (d[i, j] + PSEUDOCOUNT)
                / ((b[i, j] + PSEUDOCOUNT) * (c[i, j] + PSEUDOCOUNT))
            )
            rows.append(
                {
                    "cluster": str(cname),
                    "label": str(lname),
                    "count": int(a[i, j]),
                    "n_cluster": int(n_cluster[i, 0]),
                    "n_label": int(n_label[0, j]),
                    "n_cells": n,
                    "expected": expected,
                    "obs_exp": float(a[i, j] / expected),
                    "log2_odds_ratio": float(lor),
                    "pval": float(p),
                }
            )
    df = pd.DataFrame(rows)
    df["qval"] = multipletests(df["pval"].to_numpy(), method="fdr_bh")[1]
    if key_added is not None:
        mdata.uns[key_added] = getter_record(df, cluster_key=cluster_key, label_key=label_key)
        from .._results import record_outputs

        record_outputs(mdata, key_added, "tl.cluster_enrichment", [f"uns[{key_added!r}]"])
        logger.info("added .uns[%r] (%d clusters x %d labels)", key_added, counts.shape[0], counts.shape[1])
    return df
