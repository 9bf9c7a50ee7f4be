"""SingleR cell-type annotation against a labelled single-cell reference (BiocPy ``singler``)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import MIN_SINGLER_REF_CELLS, MOD_RNA, SINGLER_KEY
from .._docs import inject_docs
from .._settings import logger, settings
from .._utils import params_record
from .._validate import check_float, check_int, check_not_empty, get_modality, is_mudata

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

# fewer shared genes than this still runs, but SingleR's rank correlations get noisy
_FEW_GENES = 100
# the query is classified in blocks of cells whose dense log-normalised matrix (and its genes x cells copy
# for singler) stays under this many bytes each: a 460k-cell Xenium Prime 5k section would be 18 GB whole.
# SingleR scores every cell on its own, so the blocks give exactly the whole-matrix result.
_QUERY_BLOCK_BYTES = 256 * 2**20


def _matrix(adata: AnnData, layer: str | None, what: str, arg: str):
    if layer is None:
        x = adata.X
    else:
        if layer not in adata.layers:
            raise ValueError(
                f"{what} has no layer {layer!r} (it has {sorted(adata.layers)}); pass {arg}=None to use .X."
            )
        x = adata.layers[layer]
    if x is None:
        raise ValueError(f"{what} has no expression matrix in .X; pass {arg}= naming a layer.")
    if not sparse.issparse(x):
        x = np.asarray(x)
    return x


def _values(x) -> np.ndarray:
    return x.data if sparse.issparse(x) else np.asarray(x).ravel()


def _input_kind(x, what: str, arg: str) -> str:
    """``"counts"`` (non-negative integers), ``"log"`` (already log-normalised) or ``"linear"``
    (normalised but not log-transformed), from the values; negative values are an error."""
    v = _values(x)
    if v.size == 0:
        raise ValueError(f"{what} has an empty expression matrix.")
    v = v[np.isfinite(v)]
    if v.size and v.min() < 0:
        raise ValueError(
            f"{what} has negative values (scaled or centred data, e.g. after sc.pp.scale); SingleR needs "
            f"counts or log-normalised values: pass {arg}= naming a layer with those (or, for a scanpy object "
            "whose .raw holds them, pass adata.raw.to_adata())."
        )
    sample = v[: 200_000]
    if np.all(sample == np.round(sample)):
        return "counts"
    return "log" if v.max() <= 30 else "linear"


def _library_sizes(x) -> np.ndarray:
    """Per-cell totals over all genes (float64), without densifying a sparse matrix."""
    if sparse.issparse(x):
        return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    return np.asarray(x).sum(axis=1, dtype=np.float64)


def _log_normalise(x, kind: str, cols: np.ndarray, *, mean_lib: float | None = None) -> np.ndarray:
    """cells x genes -> dense float64 cells x ``cols``: log1p of size-factor-normalised counts.

    Library sizes are taken over all genes and centred at one (as scuttle's ``logNormCounts``, in
    natural log); only the selected columns are densified, so a whole-transcriptome atlas stays sparse.
    ``mean_lib`` is the mean library size of the positive cells of the whole matrix, for a block of rows
    (a chunk) to be normalised exactly as it would be in the whole.
    """
    lib = _library_sizes(x)
    if sparse.issparse(x):
        sub = sparse.csr_matrix(x)[:, cols].toarray().astype(np.float64)
    else:
        sub = np.asarray(x)[:, cols].astype(np.float64)
    if kind == "log":
        return sub
    if kind == "linear":
        return np.log1p(sub)
    positive = lib > 0
    sf = np.ones_like(lib)
    if positive.any():
        sf[positive] = lib[positive] / (lib[positive].mean() if mean_lib is None else mean_lib)
    return np.log1p(sub / sf[:, None])


def _mean_positive(lib: np.ndarray) -> float | None:
    positive = lib > 0
    return float(lib[positive].mean()) if positive.any() else None


def prune_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    nmads: float = 3.0,
    min_diff_med: float = 0.0,
    delta_next: np.ndarray | None = None,
    min_diff_next: float = 0.0,
    label_columns=None,
) -> tuple[np.ndarray, np.ndarray]:
    """SingleR's pruning rule (R ``SingleR::pruneScores``) on a cells x labels score matrix.

    ``delta_med`` = score of the assigned label minus the cell's median score over all labels.
    A cell is kept when ``delta_med >= min_diff_med``, its fine-tuning margin (``delta_next``,
    best minus next-best score at the last fine-tuning round) is ``>= min_diff_next``, and, among
    the cells of its label kept so far, ``delta_med >= median - nmads * MAD`` (MAD scaled by 1.4826
    as R's ``mad``). ``label_columns`` names the score columns (``None``: the assigned label's
    score is the row maximum). Returns ``(pruned, delta_med)``; True marks a discarded cell.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    _, codes = np.unique(labels, return_inverse=True)
    chosen = scores.max(axis=1) if label_columns is None else scores[np.arange(len(labels)), pd.Index(label_columns).get_indexer(labels)]
    return _prune(chosen, scores, codes, nmads, min_diff_med, delta_next, min_diff_next)


def _prune(chosen, scores, codes, nmads, min_diff_med, delta_next, min_diff_next, valid=None):
    delta_med = chosen - np.median(scores, axis=1)
    keep = delta_med >= min_diff_med
    if valid is not None:  # cells excluded up front (no detected gene) do not enter the label statistics
        keep &= valid
    if delta_next is not None:
        keep &= np.asarray(delta_next) >= min_diff_next
    for code in np.unique(codes):
        idx = np.flatnonzero((codes == code) & keep)
        if idx.size == 0:
            continue
        cur = delta_med[idx]
        med = np.median(cur)
        mad = 1.4826 * np.median(np.abs(cur - med))
        keep[idx] &= cur >= med - nmads * mad
    return ~keep, delta_med


@inject_docs()
def annotate_singler(
    mdata: MuData | AnnData,
    reference: AnnData,
    *,
    ref_label_key: str,
    mod: str = MOD_RNA,
    ref_layer: str | None = None,
    layer: str | None = None,
    key_added: str = SINGLER_KEY,
    quantile: float = 0.8,
    fine_tune: bool = True,
    prune: bool = True,
    nmads: float = 3.0,
    min_diff_med: float = 0.0,
    min_diff_next: float = 0.0,
    min_genes: int = 20,
    ref_max_per_label: int | None = None,
    seed: int = 0,
    num_threads: int = 1,
    allow_empty: bool = False,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Label cells by SingleR against a labelled single-cell reference.

    The annotation itself is done by the BiocPy ``singler`` package (the Python port of
    Bioconductor's SingleR): ``singler.train_single`` finds marker genes between every pair of
    reference labels on the genes the panel and the reference share, and ``singler.classify_single``
    scores each cell by the ``quantile`` of its Spearman correlations to the reference cells of
    each label, with optional fine-tuning on the markers of the best-scoring labels.

    Both sides may hold raw counts or log-normalised values; which one is detected from the
    values (non-negative integers are counts; non-integers up to 30 are taken as already
    log-normalised; larger non-integers as normalised but not logged) and everything is brought
    to what SingleR expects, ``log1p`` of library-size-normalised counts (size factors centred at
    one, over all genes of each side). Negative (scaled) values are refused.

    On top, SingleR's pruning rule (R ``SingleR::pruneScores``, which ``singler`` does not
    provide): for each cell ``delta_med`` = score of its label minus its median score over all
    labels; a cell is pruned when ``delta_med < min_diff_med``, when its fine-tuning margin
    (best minus next-best score, ``f"{{key_added}}_delta"``) is below ``min_diff_next``, or when its
    ``delta_med`` is more than ``nmads`` median absolute deviations below the median ``delta_med``
    of the cells given the same label. Cells with no detected shared gene are always pruned.

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    reference
        Labelled single-cell reference (cells x genes, gene symbols as ``var_names`` like the panel),
        counts or log-normalised values.
    ref_label_key
        Column of ``reference.obs`` with the labels; cells with a missing label are ignored.
    mod
        Modality to annotate.
    ref_layer
        Layer of ``reference`` to use; ``None`` uses ``reference.X``.
    layer
        Layer of the query modality to use; ``None`` uses its ``.X`` (raw counts after
        :func:`cellsymphony.io.read_xenium`).
    key_added
        Name of the label column and prefix of the other keys written.
    quantile
        Quantile of each label's correlations used as its score (SingleR's default 0.8).
    fine_tune
        Run SingleR's fine-tuning rounds.
    prune
        Apply the pruning rule; with ``False`` every cell with a detected shared gene is confident.
    nmads
        Number of MADs below a label's median ``delta_med`` beyond which a cell is pruned.
    min_diff_med
        Minimum ``delta_med`` of a kept cell (R's default 0).
    min_diff_next
        Minimum fine-tuning margin (best minus next-best score) of a kept cell (R's default 0).
    min_genes
        Fewest genes the panel and the reference must share; fewer raise an error.
    ref_max_per_label
        Use at most this many reference cells per label (a seeded random subset); classification
        time grows with the reference size, so this keeps atlases of many thousands of cells fast.
        ``None`` uses every cell.
    seed
        {seed}
    num_threads
        Threads used by ``singler``.
    allow_empty
        When no cell has a detected shared gene (every cell pruned, no call at all), write the result with a
        warning instead of raising a ``ValueError``.
    copy
        {copy}

    Returns
    -------
    Returns None (or a copy with ``copy=True``) and writes, on the modality (``mdata[mod]``):

    - ``.obs[key_added]``: assigned label (categorical, every cell);
    - ``.obs[f"{{key_added}}_pruned"]``: the same label, missing where pruned (R's ``pruned.labels``);
    - ``.obs[f"{{key_added}}_delta"]``: best minus next-best score (after fine-tuning when on);
    - ``.obs[f"{{key_added}}_delta_med"]``: assigned-label score minus the median score (pruning statistic);
    - ``.obs[f"{{key_added}}_confident"]``: bool, not pruned;
    - ``.obsm[f"{{key_added}}_scores"]``: cells x labels scores, label order in ``.uns[key_added]["labels"]``;
    - ``.uns[key_added]``: ``"params"`` (with ``n_ref_cells``, ``n_genes_used``, ``n_markers``,
      detected ``query_input`` / ``ref_input``), ``"labels"``, ``"genes"`` (shared genes),
      ``"markers"`` (genes SingleR scored on), ``"n_pruned"`` and ``"n_empty"`` (cells with no
      detected shared gene).
    """
    import singler
    from tqdm.auto import tqdm

    data = mdata.copy() if copy else mdata
    adata = get_modality(data, mod)

    # --- validate everything before writing anything
    if type(reference).__name__ != "AnnData":
        raise ValueError(f"reference must be an AnnData (cells x genes), got {type(reference).__name__}.")
    if ref_label_key not in reference.obs:
        raise ValueError(
            f"The reference has no label column {ref_label_key!r} in .obs (it has {list(reference.obs.columns)}); "
            "pass ref_label_key= naming the cell-type column."
        )
    quantile = check_float("quantile", quantile, min=0, max=1, min_open=True)
    nmads = check_float("nmads", nmads, min=0, min_open=True)
    min_diff_med = check_float("min_diff_med", min_diff_med)
    min_diff_next = check_float("min_diff_next", min_diff_next)
    min_genes = check_int("min_genes", min_genes, min=1)
    ref_max_per_label = check_int("ref_max_per_label", ref_max_per_label, min=1, none=True)
    seed = check_int("seed", seed)
    num_threads = check_int("num_threads", num_threads, min=1)
    ref_labels = reference.obs[ref_label_key]
    has_label = ref_labels.notna().to_numpy()
    if has_label.sum() == 0:
        raise ValueError(f"reference.obs[{ref_label_key!r}] has no labels (all missing).")
    ref_labels_all = ref_labels.astype(object).where(ref_labels.notna(), None).to_numpy()
    use = has_label.copy()
    if ref_max_per_label is not None:
        rng = np.random.default_rng(seed)
        use[:] = False
        for lab in pd.unique(ref_labels_all[has_label]):
            idx = np.flatnonzero(has_label & (ref_labels_all == lab))
            if idx.size > ref_max_per_label:
                idx = np.sort(rng.choice(idx, ref_max_per_label, replace=False))
            use[idx] = True
    ref_labels = np.asarray([str(v) for v in ref_labels_all[use]], dtype=object)
    uniq = np.unique(ref_labels)
    if uniq.size < 2:
        raise ValueError(f"reference.obs[{ref_label_key!r}] has a single label ({uniq[0]!r}); SingleR needs two or more.")
    labs, n_per = np.unique(ref_labels, return_counts=True)
    few = {str(lab): int(k) for lab, k in zip(labs, n_per, strict=True) if k < MIN_SINGLER_REF_CELLS}
    if few:
        warnings.warn(
            f"annotate_singler: {len(few)} reference label(s) have fewer than {MIN_SINGLER_REF_CELLS} cells "
            f"({few}): their markers and scores rest on too few cells, and the pruning rule cannot tell a poor "
            "match from a good one (nearly every cell comes out confident). Use a reference with more cells per "
            "label, or merge or drop those labels.",
            UserWarning,
            stacklevel=2,
        )

    qx = _matrix(adata, layer, f"The {mod!r} modality", "layer")
    rx = _matrix(reference, ref_layer, "The reference", "ref_layer")
    rx = rx[use]
    q_names = pd.Index(adata.var_names.astype(str))
    r_names = pd.Index(reference.var_names.astype(str))
    q_first = ~q_names.duplicated()
    r_first = ~r_names.duplicated()
    shared = q_names[q_first].intersection(r_names[r_first], sort=False)
    if len(shared) == 0:
        raise ValueError(
            f"The {mod!r} modality and the reference share no genes (query e.g. {list(q_names[:3])}, reference e.g. "
            f"{list(r_names[:3])}); both need gene symbols (or both Ensembl ids) as var_names."
        )
    if len(shared) < min_genes:
        raise ValueError(
            f"The {mod!r} modality and the reference share only {len(shared)} genes (min_genes={min_genes}); "
            "SingleR needs more shared genes: use a reference measured on more of the panel's genes."
        )
    if len(shared) < _FEW_GENES:
        logger.warning("annotate_singler: only %d genes shared with the reference; labels may be noisy.", len(shared))
    q_kind = _input_kind(qx, f"The {mod!r} modality", "layer")
    r_kind = _input_kind(rx, "The reference", "ref_layer")

    # --- normalise each side over all its genes, then keep the shared genes (genes x cells for singler)
    q_idx = np.flatnonzero(q_first)[q_names[q_first].get_indexer(shared)]
    r_idx = np.flatnonzero(r_first)[r_names[r_first].get_indexer(shared)]
    r_log = _log_normalise(rx, r_kind, r_idx)
    genes = list(shared)

    built = singler.train_single(
        np.ascontiguousarray(r_log.T),
        list(ref_labels),
        genes,
        test_features=genes,
        check_missing=False,
        num_threads=num_threads,
    )
    del r_log
    labels = [str(x) for x in built.labels]
    cats = pd.Index(labels)
    n = adata.n_obs
    codes = np.empty(n, dtype=np.int64)
    scores = np.empty((n, len(labels)), dtype=np.float64)
    delta_next = np.empty(n, dtype=np.float64)
    empty = np.empty(n, dtype=bool)
    q_mean_lib = _mean_positive(_library_sizes(qx))
    block = max(1, _QUERY_BLOCK_BYTES // (8 * len(genes)))
    starts = range(0, n, block)
    for start in tqdm(starts, desc="SingleR", unit="block", disable=not settings.progress or len(starts) < 2):
        rows = slice(start, min(n, start + block))
        q_log = _log_normalise(qx[rows], q_kind, q_idx, mean_lib=q_mean_lib)
        res = singler.classify_single(
            np.ascontiguousarray(q_log.T),
            built,
            quantile=quantile,
            use_fine_tune=fine_tune,
            num_threads=num_threads,
        )
        codes[rows] = cats.get_indexer(res.get_column("best"))
        score_frame = res.get_column("scores")
        scores[rows] = np.column_stack([np.asarray(score_frame.get_column(lab), dtype=np.float64) for lab in labels])
        delta_next[rows] = np.asarray(res.get_column("delta"), dtype=np.float64)
        # a cell with no detected shared gene ties every label: never a confident call
        empty[rows] = ~(q_log > 0).any(axis=1)
        del q_log, res
    best = pd.Categorical.from_codes(codes, categories=cats)
    chosen = scores[np.arange(n), codes]
    pruned, delta_med = _prune(
        chosen, scores, codes, nmads, min_diff_med, delta_next if fine_tune else None, min_diff_next, ~empty
    )
    if not prune:
        pruned = empty
    check_not_empty(
        int((~empty).sum()), what=f"annotate_singler: {key_added!r}", allow_empty=allow_empty,
        why=f"none of the {n} cells has a detected count in the {len(genes)} genes shared with the reference "
        "(check layer=: it should hold counts or log-normalised values of the panel).",
    )  # fmt: skip

    # --- write
    adata.obs[key_added] = best
    adata.obs[f"{key_added}_pruned"] = pd.Categorical.from_codes(np.where(pruned, -1, codes), categories=cats)
    adata.obs[f"{key_added}_delta"] = delta_next
    adata.obs[f"{key_added}_delta_med"] = delta_med
    adata.obs[f"{key_added}_confident"] = ~pruned
    adata.obsm[f"{key_added}_scores"] = scores.astype(np.float32)
    markers = [str(g) for g in built.marker_subset()]
    adata.uns[key_added] = {
        "params": params_record(
            ref_label_key=ref_label_key,
            mod=mod,
            ref_layer=ref_layer,
            layer=layer,
            quantile=float(quantile),
            fine_tune=bool(fine_tune),
            prune=bool(prune),
            nmads=float(nmads),
            min_diff_med=float(min_diff_med),
            min_diff_next=float(min_diff_next),
            min_genes=int(min_genes),
            ref_max_per_label=ref_max_per_label,
            seed=int(seed),
            n_ref_cells=int(len(ref_labels)),
            n_ref_labels=int(len(labels)),
            n_genes_used=int(len(genes)),
            n_markers=int(len(markers)),
            query_input=q_kind,
            ref_input=r_kind,
            singler_version=str(singler.__version__),
        ),
        "labels": np.asarray(labels, dtype=object),
        "genes": np.asarray(genes, dtype=object),
        "markers": np.asarray(markers, dtype=object),
        "n_pruned": int(pruned.sum()),
        "n_empty": int(empty.sum()),
    }
    if is_mudata(data):
        data.update()
    logger.info(
        "annotate_singler: %d cells labelled with %d reference labels on %d shared genes (%d markers), %d pruned; "
        "added %s, %s_pruned, %s_delta, %s_delta_med, %s_confident to %s.obs, %s_scores to .obsm, %s to .uns",
        n, len(labels), len(genes), len(markers), int(pruned.sum()),
        key_added, key_added, key_added, key_added, key_added, mod, key_added, key_added,
    )
    return data if copy else None
