"""scGPT cell embeddings of each cell's expression counts."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import MOD_RNA, NUCLEUS_KEY, SAMPLE_KEY, SPATIAL_KEY, X_SCGPT
from .._coordinates import cell_coordinates
from .._docs import inject_docs
from .._settings import logger, resolve_device, settings
from .._utils import as_rows, file_stamp, params_record, row_block
from .._validate import check_float, check_int, check_not_empty, get_modality, is_mudata, set_latest
from ._chunks import Chunk, cache_folder, chunk_file, compact_chunks, fingerprint, row_chunks, run_chunks

if TYPE_CHECKING:
    from anndata import AnnData
    from distributed import Client
    from mudata import MuData


def _gene_symbols(adata: AnnData, gene_key: str | None) -> np.ndarray:
    if gene_key is None:
        return np.asarray(adata.var_names, dtype=str)
    if gene_key not in adata.var:
        raise ValueError(
            f"gene_key={gene_key!r} is not a column of .var (it has {list(adata.var.columns)}); "
            "pass the column holding gene symbols, or gene_key=None to use var_names."
        )
    return np.asarray(adata.var[gene_key].astype(str), dtype=str)


DEFAULT_CHUNK_SIZE = 2048


def _cache_fingerprint(model_dir, weights_checksum: str, col2tok: np.ndarray, *, max_length: int, seed: int) -> str:
    """The fingerprint of the cache folder ``scgpt-<fingerprint>`` (the same as before the chunk engine, so
    existing caches are reused): the checkpoint (weights, args and vocabulary files), the arguments that
    change a cell's embedding and the gene matching (column -> token)."""
    from ..models.encoders._scgpt_inputs import DRAWS
    from ..models.encoders._weights import file_checksum

    record = {
        "weights": weights_checksum,
        "args": file_checksum(Path(model_dir) / "args.json"),
        "vocab": file_checksum(Path(model_dir) / "vocab.json"),
        "max_length": int(max_length),
        "seed": int(seed),
        "n_bins": 51,
        "draws": DRAWS,
    }
    return fingerprint(record, np.ascontiguousarray(col2tok, dtype=np.int64).tobytes())


# ------------------------------------------------------------------------------------------------ the chunk job
class _ExpressionJob:
    """The chunk engine's job (:class:`~cellsymphony.pp._chunks.ChunkJob`) for scGPT embeddings: in this
    process the pending chunks stream through :func:`embed_rows` (batches of each chunk's own cells); on a
    cluster each chunk is :func:`_chunk_on_worker` with the chunk's rows, cell ids and the gene index."""

    kind = "expression"
    desc = "embed_expression"

    def __init__(self, model, model_dir, X, ids, col2tok, lengths, out, *, kw: dict, device, requested_device):
        self.model, self.model_dir, self.X, self.ids, self.col2tok = model, str(model_dir), X, ids, col2tok
        self.lengths, self.out, self.kw = lengths, out, kw
        self.dim = int(model.d_model)
        self.device, self.requested_device = device, requested_device

    def stream(self, chunks, progress, done) -> None:
        from ..models.encoders._scgpt_inputs import embed_rows

        # one uncached chunk of every cell (no cache, one process): one stream, batched over all cells
        whole = len(chunks) == 1 and chunks[0].file is None and len(chunks[0].rows) == self.out.shape[0]
        embed_rows(
            self.model, self.X, self.ids, self.col2tok, lengths=self.lengths, **self.kw, device=self.device,
            bucketed=True, num_workers=settings.num_workers, progress=progress,
            chunks=None if whole else [ch.rows for ch in chunks],
            on_chunk=None if whole else (lambda j, _values: done(j, None)), out=self.out,
        )
        if whole:
            done(0, None)

    def task(self, chunk):
        rows = chunk.rows
        if not (self.lengths[rows] > 0).any():  # no cell to embed: an all-NaN chunk, no model needed
            return _nan_rows, (len(rows), self.dim), {}
        args = (self.model_dir, row_block(self.X, rows), self.ids[rows], self.col2tok)
        return _chunk_on_worker, args, {**self.kw, "device": self.requested_device}


def _nan_rows(n: int, dim: int) -> np.ndarray:
    return np.full((n, dim), np.nan, dtype=np.float32)


def _worker_scgpt(model_dir: str, device: str | None):
    """The worker's cached scGPT model and its device. The files' size and modification time are part of
    the key: a checkpoint replaced in the same folder while the cluster stays up is loaded again, never
    served (and cached under its new checksum) stale."""
    from .._distributed import worker_cache
    from ..models.encoders._scgpt import load_scgpt

    dev = resolve_device(device)
    path = os.path.realpath(model_dir)
    stamp = tuple(file_stamp(os.path.join(path, f)) for f in ("args.json", "vocab.json", "best_model.pt"))
    return worker_cache().model(("scgpt", path, stamp, dev), lambda: load_scgpt(path, device=dev)), dev


def _chunk_on_worker(model_dir: str, block, cell_ids, col2tok, *, max_length: int, batch_size: int, seed: int,
                     device) -> np.ndarray:  # fmt: skip
    """One chunk's scGPT embeddings ``(k, d)`` float32 on a cluster worker (rows as CSR or dense)."""
    from ..models.encoders._scgpt_inputs import embed_rows

    model, dev = _worker_scgpt(model_dir, device)
    return embed_rows(
        model, block, cell_ids, col2tok, max_length=max_length, batch_size=batch_size, seed=seed, device=dev,
        bucketed=True, num_workers=0, progress=False,
    )


def _task_chunk_size(n_cells: int, client) -> int:
    """Cells per task without a cache: about four tasks per worker thread, between 64 and 4096 cells
    (enough tasks to balance the load and to lose little when a worker dies, few enough that the
    per-task overhead of milliseconds does not matter)."""
    from .._distributed import n_threads

    return int(np.clip(np.ceil(n_cells / (4 * n_threads(client))), 64, 4096))


@inject_docs()
def embed_expression(
    mdata: MuData | AnnData,
    *,
    model_dir: str | os.PathLike,
    mod: str = MOD_RNA,
    gene_key: str | None = None,
    layer: str | None = None,
    max_length: int = 1200,
    batch_size: int | None = None,
    min_gene_fraction: float = 0.5,
    device: str | None = None,
    seed: int = 0,
    key_added: str = X_SCGPT,
    cache_dir: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    client: Client | None = None,
    allow_empty: bool = False,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Embed each cell's expression counts with a scGPT model (the ``<cls>`` output, L2-normalised).

    The computation follows ``scgpt.tasks.embed_data(adata, model_dir, gene_col="index")`` of scgpt 0.2.4
    (see the expression-embedding page of the docs): genes are matched to the vocabulary by symbol;
    each cell's non-zero matched genes follow a ``<cls>`` token; their raw counts are binned per cell
    into 51 bins; cells with more than ``max_length - 1`` genes keep a random ``max_length - 1``; the
    transformer output at ``<cls>`` is L2-normalised. Random draws (tie-breaking in the binning, gene
    sampling) come from a generator seeded per cell by ``seed`` and the cell id, so the result of a
    cell does not depend on batching, order or chunking. Cells are batched by similar numbers of genes,
    each batch padded only to its longest cell; rows are read from the (sparse) matrix batch by batch.

    With ``cache_dir`` the cells are embedded in fixed chunks of ``chunk_size`` consecutive cells, each
    saved atomically when finished; a run started again with the same inputs reads the finished chunks
    back and computes only the others, giving results identical to an uninterrupted run. A run on a
    cluster (``client``) and one in a single process share these chunk files.

    Parameters
    ----------
    mdata
        {mdata_or_adata}
    model_dir
        Folder with scGPT's ``args.json``, ``vocab.json`` and ``best_model.pt`` (e.g. the downloaded
        whole-human model ``scGPT_human``, or one written by
        :func:`cellsymphony.datasets.tiny_scgpt_checkpoint`).
    mod
        Modality holding the counts (ignored for an AnnData).
    gene_key
        Column of ``.var`` with gene symbols; ``None`` uses ``var_names``.
    layer
        Layer holding raw counts; ``None`` uses ``.X``.
    max_length
        Maximum number of tokens per cell, ``<cls>`` included (1200 in scGPT).
    batch_size
        Cells per forward pass; default ``cs.settings.batch_size`` (as :func:`cellsymphony.pp.embed_morphology`).
    min_gene_fraction
        Warn when fewer than this fraction of the genes are in the model's vocabulary.
    device
        {device}
    seed
        {seed}
    key_added
        Key of the embedding in ``.obsm`` and of its record in ``.uns``.
    cache_dir
        Folder for finished chunks (resume after an interruption); ``None`` keeps nothing. Chunks are kept
        in ``cache_dir/scgpt-<fingerprint>``, the fingerprint covering the checkpoint files (weights
        checksum), ``max_length``, ``seed`` and the gene matching; each chunk's file name covers its cell
        ids and counts, so a changed input is computed again, never read from a stale file.
        ``batch_size`` and ``device`` are not part of it (they change results only by float rounding).
    chunk_size
        Cells per chunk: of the cache (default 2048, consecutive cells in ``.obs`` order), and per task on
        a cluster (default: about four tasks per worker thread without ``cache_dir``).
    client
        {client} Each task gets a chunk's sparse rows, cell ids and the gene -> token index; with
        ``cache_dir`` the chunks are those of the cache, which each worker writes as it finishes them.
    allow_empty
        When no cell has a non-zero count in a vocabulary gene (every row would be NaN), write the all-NaN
        embedding with a warning instead of raising a ``ValueError``; it does not become the latest
        representation.
    copy
        {copy}

    Returns
    -------
    Returns ``None``, or a modified copy with ``copy=True``, and writes to the modality ``mod``:

    - ``.obsm[key_added]``: (n_cells, embsize) float32 embedding, NaN rows for cells without any
      non-zero gene in the vocabulary;
    - ``.obs[f"{{key_added}}_empty"]``: True for those cells;
    - ``.uns[key_added]``: ``params`` (arguments including ``cache_dir``, model folder, weights checksum,
      vocabulary and gene-match figures) and ``unmatched_genes`` (the genes not in the vocabulary);

    and records ``key_added`` as the latest representation of ``mod`` in
    ``uns["cellsymphony"]["latest"]``.
    """
    max_length = check_int("max_length", max_length, min=2, hint="the <cls> token and at least one gene")
    batch_size = check_int("batch_size", settings.batch_size if batch_size is None else batch_size, min=1,
                           hint="default cs.settings.batch_size")  # fmt: skip
    min_gene_fraction = check_float("min_gene_fraction", min_gene_fraction, min=0, max=1)
    seed = check_int("seed", seed)
    chunk_size = check_int("chunk_size", chunk_size, min=1, none=True)
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ValueError(f"cache_dir={str(cache_dir)!r} is a file; pass a folder (created if absent) or None.")
    if client is not None:
        from .._distributed import check_client, ensure_worker_cache

        check_client(client)
        ensure_worker_cache(client)
    adata = get_modality(mdata, mod)
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer={layer!r} is not in .layers (it has {list(adata.layers)}).")
    symbols = _gene_symbols(adata, gene_key)
    requested_device = device  # a cluster's workers resolve their own device
    device = resolve_device(device)

    from ..models.encoders._scgpt import load_scgpt
    from ..models.encoders._scgpt_inputs import chunk_digest, scan_counts
    from ..models.encoders._weights import file_checksum

    model = load_scgpt(model_dir)

    # gene matching, by symbol, as embed_data does
    col2tok = np.array([model.vocab.get(g, -1) for g in symbols], dtype=np.int64)
    matched = col2tok >= 0
    n_matched, n_total = int(matched.sum()), len(symbols)
    unmatched = symbols[~matched]
    logger.info("scGPT: matched %d/%d genes in the vocabulary of size %d", n_matched, n_total, len(model.vocab))
    if n_matched == 0:
        where = f"var[{gene_key!r}]" if gene_key else "var_names"
        raise ValueError(
            f"None of the {n_total} genes of {where} (e.g. {list(symbols[:5])}) is in the scGPT vocabulary "
            f"of {model_dir}: scGPT uses gene symbols; pass gene_key= naming a column of symbols."
        )
    if n_matched < min_gene_fraction * n_total:
        warnings.warn(
            f"Only {n_matched}/{n_total} genes ({n_matched / n_total:.0%}) are in the scGPT vocabulary "
            f"(not found, e.g.: {list(unmatched[:8])}); the embedding uses the matched genes only. "
            "Check that the genes are symbols (gene_key=) of the model's species.",
            UserWarning,
            stacklevel=2,
        )

    X = as_rows(adata.layers[layer] if layer is not None else adata.X)  # CSC / COO to CSR once, for every reader
    lengths, report = scan_counts(X, col2tok)
    if report["n_negative"] or report["n_noninteger"]:
        row, value = report["example"]
        source = f"layers[{layer!r}]" if layer is not None else ".X"
        raise ValueError(
            f"{source} does not hold raw counts: {report['n_negative']} negative and "
            f"{report['n_noninteger']} non-integer values among the matched genes (e.g. {value!r} in cell "
            f"{adata.obs_names[row]!r}). scGPT embeddings are computed from raw counts: pass "
            "layer= naming the layer of raw counts (e.g. layer='counts')."
        )
    empty = lengths == 0
    n_empty = int(empty.sum())
    all_empty = check_not_empty(
        adata.n_obs - n_empty, what=f"The expression embedding {key_added!r}", latest=True, allow_empty=allow_empty,
        why=f"no cell has a non-zero count in any of the {n_matched} matched genes (every row would be NaN). "
        "Check layer= (raw counts) and gene_key= (gene symbols).",
    )  # fmt: skip
    if n_empty and not all_empty:
        warnings.warn(
            f"{n_empty} of {adata.n_obs} cells have no non-zero count in any vocabulary gene: their "
            f"embedding is NaN and obs[{key_added + '_empty'!r}] is True.",
            UserWarning,
            stacklevel=2,
        )

    weights_checksum = file_checksum(Path(model_dir) / "best_model.pt")
    ids = np.asarray(adata.obs_names)
    emb = np.full((adata.n_obs, int(model.d_model)), np.nan, dtype=np.float32)

    # ---- plan: the cache's consecutive chunks; without a cache one stream in this process, or spatially
    # compact chunks of the non-empty cells per sample on a cluster
    if cache_dir is not None:
        chunk_size = int(chunk_size or DEFAULT_CHUNK_SIZE)
        fp = _cache_fingerprint(model_dir, weights_checksum, col2tok, max_length=max_length, seed=seed)
        folder = cache_folder(cache_dir, "scgpt", fp)
        chunks = [
            Chunk(c, rows, file=chunk_file(folder, c, chunk_digest(row_block(X, rows), ids[rows], col2tok)))
            for c, rows in enumerate(row_chunks(adata.n_obs, chunk_size))
        ]
    elif client is None:
        chunks = [Chunk(0, np.arange(adata.n_obs, dtype=np.int64))]
    else:
        nonempty = np.flatnonzero(~empty)
        groups = [nonempty]
        if SAMPLE_KEY in adata.obs:
            labels = adata.obs[SAMPLE_KEY].astype(str).to_numpy()[nonempty]
            groups = [nonempty[labels == s] for s in dict.fromkeys(labels.tolist())]
        xy = cell_coordinates(adata, "nucleus") if NUCLEUS_KEY in adata.obsm or SPATIAL_KEY in adata.obsm else None
        size = int(chunk_size or _task_chunk_size(len(nonempty), client))
        chunks = [Chunk(c, rows) for c, rows in enumerate(compact_chunks(xy, groups, size))]
    job = _ExpressionJob(
        model, model_dir, X, ids, col2tok, lengths, emb, device=device, requested_device=requested_device,
        kw={"max_length": int(max_length), "batch_size": int(batch_size), "seed": int(seed)},
    )
    if not all_empty:
        run_chunks(job, chunks, emb, client=client)
    if not all_empty:
        all_empty = check_not_empty(
            int(np.isfinite(emb).all(axis=1).sum()), what=f"The expression embedding {key_added!r}", latest=True,
            allow_empty=allow_empty, why=f"the scGPT model in {model_dir} returned NaN or inf for every cell.",
        )  # fmt: skip

    # write (on the copy, if asked)
    if copy:
        mdata = mdata.copy()
        adata = get_modality(mdata, mod)
    adata.obsm[key_added] = emb
    adata.obs[f"{key_added}_empty"] = empty
    adata.uns[key_added] = {
        "params": params_record(
            model_dir=str(model_dir),
            gene_key=gene_key,
            layer=layer,
            max_length=max_length,
            batch_size=batch_size,
            seed=seed,
            cache_dir=cache_dir,
            chunk_size=chunk_size,
            weights_checksum=weights_checksum,
            n_bins=51,
            embsize=model.d_model,
            vocab_size=len(model.vocab),
            n_genes=n_total,
            n_matched_genes=n_matched,
            n_empty_cells=n_empty,
            untrained=model.untrained,
        ),
        "unmatched_genes": np.asarray(unmatched, dtype=object),
    }
    if not all_empty:
        set_latest(mdata, mod, key_added)
    if is_mudata(mdata):
        mdata.update()
    logger.info(
        "added obsm[%r] (%d x %d), obs[%r], uns[%r] to %s",
        key_added,
        emb.shape[0],
        emb.shape[1],
        f"{key_added}_empty",
        key_added,
        f"mdata[{mod!r}]" if is_mudata(mdata) else "adata",
    )
    return mdata if copy else None
