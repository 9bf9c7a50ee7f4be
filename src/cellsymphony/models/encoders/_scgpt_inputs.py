"""Turning count rows into scGPT inputs, and embedding blocks of rows with a loaded :class:`ScGPTEncoder`.

What ``scgpt.tasks.embed_data(adata, model_dir, gene_col="index")`` of scgpt 0.2.4 does to each cell,
and what is mirrored here:

1. the genes (columns) are restricted to those in the vocabulary; a cell's tokens are its non-zero
   genes, in column order, after a ``<cls>`` token whose value is ``pad_value`` (-2);
2. the raw values of those non-zero genes are binned per cell into 51 bins (``DataCollator`` hard-codes
   ``n_bins=51``): quantile edges ``np.quantile(row, linspace(0, 1, 50))`` and ``np.digitize`` from both
   sides, a value equal to several edges drawn uniformly among the bins it spans; values become 1..50;
3. a cell with more than ``max_length - 1`` genes keeps ``<cls>`` and a random ``max_length - 1`` of them
   (binning happens before this sampling, on all of the cell's genes);
4. each batch is padded with ``<pad>`` / ``pad_value`` to its longest cell; ``src_key_padding_mask`` is
   ``genes == <pad>``; the transformer output at position 0 (``<cls>``) is the embedding, L2-normalised.

The official code draws the random numbers of 2. and 3. from global streams (``np.random.rand``,
``torch.randperm``), so its output changes with batching and order. Here each cell draws from its own
counter-based stream (SplitMix64 seeded by the global seed and its cell id,
:func:`cellsymphony._utils.cell_seeds`): the result of a cell depends on nothing else. The draws of a
cell with ``n`` genes are: uniforms ``0 .. n-1`` for the tie-breaking of its genes (in column order),
then, when it has more than ``max_length - 1`` genes, uniforms ``n .. 2n-1`` as sampling keys: the
``max_length - 1`` genes with the smallest keys are kept, in column order (the transformer has no
positional encoding, so the order of the tokens does not change the embedding). Because the stream is
counter-based, :func:`tokenize_block` tokenises a whole batch with array operations (no per-cell Python
objects); :func:`tokenize_cell` with :class:`CellDraws` is the same definition written for one cell,
and a test holds the two equal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from ..._utils import as_rows as _as_rows
from ..._utils import row_block as _row_block

N_BINS = 51
#: the definition of the per-cell random draws; part of the cache fingerprint of the embeddings
DRAWS = "splitmix64-counter-v1"


class CellDraws:
    """One cell's stream of uniforms (``.random(n)``, as a numpy Generator): draws ``0, 1, ...`` of the
    counter-based stream of ``seed`` (:func:`cellsymphony._utils.counter_uniforms`)."""

    def __init__(self, seed: int | np.uint64):
        self._seed = np.uint64(seed)
        self._pos = 0

    def random(self, n: int) -> np.ndarray:
        from ..._utils import counter_uniforms

        draws = counter_uniforms(np.full(n, self._seed, dtype=np.uint64), np.arange(self._pos, self._pos + n))
        self._pos += n
        return draws


def bin_values(row: np.ndarray, rng: np.random.Generator, n_bins: int = N_BINS) -> np.ndarray:
    """Bin one cell's values as scGPT's ``preprocess.binning`` (+ ``_digitize(side="both")``).

    Zeros stay 0; non-zero values get bins 1..``n_bins - 1`` from per-cell quantile edges; a value equal to
    several edges gets a bin drawn uniformly among ``right + 1 .. left`` (one uniform per value, drawn
    from ``rng``). Returns float32 (the collator writes the bins into a float tensor).
    """
    row = np.asarray(row, dtype=np.float32)
    if row.size == 0:
        return row.copy()
    if row.max() == 0:
        return np.zeros_like(row)
    if row.min() <= 0:
        nz = np.flatnonzero(row)
        out = np.zeros(row.shape, dtype=np.float32)
        out[nz] = _digitize_both(row[nz], rng, n_bins)
        return out
    return _digitize_both(row, rng, n_bins).astype(np.float32)


def _digitize_both(x: np.ndarray, rng: np.random.Generator, n_bins: int) -> np.ndarray:
    bins = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, bins)
    right = np.digitize(x, bins, right=True)
    rands = rng.random(len(x))
    return np.ceil(rands * (right - left) + left).astype(np.int64)


def tokenize_cell(
    tokens: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
    *,
    cls_id: int,
    pad_value: float,
    max_length: int,
    n_bins: int = N_BINS,
) -> tuple[np.ndarray, np.ndarray]:
    """``(<cls> + gene tokens, pad_value + binned values)`` of one cell, at most ``max_length`` long.

    ``tokens`` / ``counts``: the cell's non-zero genes in the vocabulary (token ids, raw values).
    """
    values = bin_values(counts, rng, n_bins)
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) + 1 > max_length:  # the max_length - 1 smallest sampling keys, in column order
        keep = np.sort(np.argsort(rng.random(len(tokens)), kind="stable")[: max_length - 1])
        tokens, values = tokens[keep], values[keep]
    genes = np.concatenate([[cls_id], tokens]).astype(np.int64)
    vals = np.concatenate([[pad_value], values]).astype(np.float32)
    return genes, vals


#: the most cells x distinct values one binning table may hold; larger blocks are binned in row groups
_TABLE_LIMIT = 1 << 24


def _bin_rows(x: np.ndarray, r: np.ndarray, n: np.ndarray, rands: np.ndarray, n_bins: int) -> np.ndarray:
    """:func:`bin_values` of many rows at once: ``x`` the non-zero values grouped by row (``r``, sorted,
    rows ``0 .. len(n) - 1`` with ``n[i] > 0`` values each), ``rands`` their tie-breaking draws.

    Values are replaced by their ranks among the block's distinct values (counts take few distinct
    values), so each row's order statistics and its digitisation are read from per-row cumulative
    histograms: no per-row sort and no per-row call. Quantile edges follow numpy's "linear" method with
    its two-sided interpolation, so they are the same floats as ``np.quantile``'s.
    """
    distinct, rank = np.unique(x, return_inverse=True)
    n_rows, n_distinct, m = len(n), len(distinct), n_bins - 1
    if n_rows > 1 and n_rows * (n_distinct + 1) > _TABLE_LIMIT:  # bounded memory: halve the rows
        half = n_rows // 2
        cut = int(np.searchsorted(r, half))
        return np.concatenate([
            _bin_rows(x[:cut], r[:cut], n[:half], rands[:cut], n_bins),
            _bin_rows(x[cut:], r[cut:] - half, n[half:], rands[cut:], n_bins),
        ])
    rows_m = np.repeat(np.arange(n_rows), m)
    # order statistics: the value at sorted position p of row i is the distinct value whose cumulative
    # count in row i first exceeds p
    hist = np.bincount(r * n_distinct + rank, minlength=n_rows * n_distinct).reshape(n_rows, n_distinct)
    cum = np.cumsum(hist, axis=1)
    stride = len(x) + 1
    flat = (np.arange(n_rows)[:, None] * stride + cum).ravel()

    def order_stat(pos: np.ndarray) -> np.ndarray:
        i = np.searchsorted(flat, (np.arange(n_rows)[:, None] * stride + pos).ravel(), side="right")
        return distinct[i.reshape(pos.shape) - np.arange(n_rows)[:, None] * n_distinct]

    q = np.linspace(0, 1, m)
    virt = (n[:, None] - 1) * q[None, :]
    lo = np.floor(virt).astype(np.int64)
    gamma = virt - lo
    a, b = order_stat(lo), order_stat(np.minimum(lo + 1, n[:, None] - 1))
    diff = b - a  # in the values' dtype, as numpy's _lerp
    edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    edges = np.maximum.accumulate(edges, axis=1)
    distinct64 = distinct.astype(np.float64)

    def digitize(side: str) -> np.ndarray:  # np.digitize(value, edges, right=(side == "right")) per row
        first = np.searchsorted(distinct64, edges, side=side).ravel()  # first distinct value past the edge
        table = np.cumsum(
            np.bincount(rows_m * (n_distinct + 1) + first, minlength=n_rows * (n_distinct + 1)).reshape(
                n_rows, n_distinct + 1
            ),
            axis=1,
        )
        return table[r, rank]

    left, right = digitize("left"), digitize("right")
    return np.ceil(rands * (right - left) + left).astype(np.float32)


def tokenize_block(
    block,
    seeds: np.ndarray,
    col2tok: np.ndarray,
    *,
    cls_id: int,
    pad_id: int,
    pad_value: float,
    max_length: int,
    n_bins: int = N_BINS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row of ``block`` (CSR with sorted indices, or dense) tokenised and padded at once:
    ``(genes int64, values float32, padding mask bool)``, row ``i`` drawing from ``seeds[i]``.

    The same result as :func:`tokenize_cell` with ``CellDraws(seeds[i])`` on each row followed by
    :func:`collate`, computed with array operations over the whole block.
    """
    from ..._utils import counter_uniforms

    block = sp.csr_matrix(block)
    block.sort_indices()
    n_rows = block.shape[0]
    row_all = np.repeat(np.arange(n_rows), np.diff(block.indptr))
    tok_all = np.asarray(col2tok)[block.indices]
    keep = (tok_all >= 0) & (block.data != 0)
    rows, tokens = row_all[keep], tok_all[keep].astype(np.int64)
    x = block.data[keep].astype(np.float32)
    n = np.bincount(rows, minlength=n_rows)
    start = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    pos = np.arange(len(rows)) - start[rows]  # the gene's position in its row (column order)
    seeds = np.asarray(seeds, dtype=np.uint64)
    bins = np.zeros(len(rows), dtype=np.float32)
    if len(rows):
        live = np.flatnonzero(n > 0)  # rows without genes take no part
        compact = np.full(n_rows, -1, dtype=np.int64)
        compact[live] = np.arange(len(live))
        bins = _bin_rows(x, compact[rows], n[live], counter_uniforms(seeds[rows], pos), n_bins)
    # sampling of the rows with more than max_length - 1 genes: the smallest keys (draws n .. 2n-1)
    over = n > max_length - 1
    if over.any():
        # the sampled rows' keys laid out as a (rows, genes) array, padded with inf: a partition per row
        # in C keeps the max_length - 1 smallest keys (ties broken by position, as in tokenize_cell)
        sel = np.flatnonzero(over[rows])
        slot = np.full(n_rows, -1, dtype=np.int64)
        slot[over] = np.arange(int(over.sum()))
        grid = np.full((int(over.sum()), int(n.max())), np.inf)
        grid[slot[rows[sel]], pos[sel]] = counter_uniforms(seeds[rows[sel]], n[rows[sel]] + pos[sel])
        k = max_length - 1
        part = np.partition(grid, [k - 1, k], axis=1)  # each row has more than k keys
        threshold = part[:, k - 1 : k]
        picked = grid <= threshold
        if np.any(part[:, k - 1] == part[:, k]):  # a tie at the cut (2^-53 odds): break it by position
            chosen = np.argsort(grid, axis=1, kind="stable")[:, :k]
            picked = np.zeros(grid.shape, dtype=bool)
            picked[np.arange(len(grid))[:, None], chosen] = True
        kept = np.ones(len(rows), dtype=bool)
        kept[sel] = picked[slot[rows[sel]], pos[sel]]
        rows, tokens, bins = rows[kept], tokens[kept], bins[kept]
        n = np.bincount(rows, minlength=n_rows)
        start = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        pos = np.arange(len(rows)) - start[rows]
    length = int(n.max(initial=0)) + 1
    genes = np.full((n_rows, length), pad_id, dtype=np.int64)
    values = np.full((n_rows, length), pad_value, dtype=np.float32)
    genes[:, 0] = cls_id
    genes[rows, pos + 1] = tokens
    values[rows, pos + 1] = bins
    return genes, values, genes == pad_id


def collate(
    cells: Sequence[tuple[np.ndarray, np.ndarray]], *, pad_id: int, pad_value: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad a batch to its longest cell: ``(genes int64, values float32, padding mask bool)``."""
    length = max(len(g) for g, _ in cells)
    genes = np.full((len(cells), length), pad_id, dtype=np.int64)
    values = np.full((len(cells), length), pad_value, dtype=np.float32)
    for i, (g, v) in enumerate(cells):
        genes[i, : len(g)] = g
        values[i, : len(v)] = v
    return genes, values, genes == pad_id


def cell_genes(block, col2tok: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and raw values of row ``i`` of ``block``: non-zero genes in the vocabulary, column order."""
    if sp.issparse(block):
        s, e = block.indptr[i], block.indptr[i + 1]
        cols, data = block.indices[s:e], block.data[s:e]
    else:
        row = np.asarray(block[i]).ravel()
        cols = np.flatnonzero(row)
        data = row[cols]
    tok = col2tok[cols]
    keep = (tok >= 0) & (data != 0)
    return tok[keep], data[keep]


def scan_counts(X, col2tok: np.ndarray, *, chunk_size: int = 16384) -> tuple[np.ndarray, dict]:
    """One pass over X by chunks of rows: the number of non-zero vocabulary genes of each cell, and a
    report on the values of those genes (``n_negative``, ``n_noninteger`` with an ``example``)."""
    X = _as_rows(X)
    n = X.shape[0]
    lengths = np.zeros(n, dtype=np.int64)
    report = {"n_negative": 0, "n_noninteger": 0, "example": None}
    matched_cols = np.flatnonzero(col2tok >= 0)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        chunk = X[start:stop]
        if sp.issparse(chunk):
            chunk = sp.csr_matrix(chunk)
            rows = np.repeat(np.arange(stop - start), np.diff(chunk.indptr))
            inv = col2tok[chunk.indices] >= 0
            vals, rows = chunk.data[inv], rows[inv]
        else:
            sub = np.asarray(chunk)[:, matched_cols]
            rows, cols = np.nonzero(sub)
            vals = sub[rows, cols]
        nz = vals != 0
        lengths[start:stop] = np.bincount(rows[nz], minlength=stop - start)
        bad_neg = vals < 0
        bad_int = ~np.isfinite(vals) | (vals != np.round(vals))
        report["n_negative"] += int(bad_neg.sum())
        report["n_noninteger"] += int(bad_int.sum())
        if report["example"] is None and (bad_neg.any() or bad_int.any()):
            j = int(np.flatnonzero(bad_neg | bad_int)[0])
            report["example"] = (start + int(rows[j]), float(vals[j]))
    return lengths, report


def batch_order(lengths: np.ndarray, batch_size: int, *, bucketed: bool = True) -> list[np.ndarray]:
    """Batches of non-empty cells: by increasing number of genes (``bucketed``) or in the given order."""
    cells = np.flatnonzero(lengths > 0)
    if bucketed:
        cells = cells[np.argsort(lengths[cells], kind="stable")]
    return [cells[i : i + batch_size] for i in range(0, len(cells), batch_size)]


def chunk_digest(block, cell_ids: Sequence, col2tok: np.ndarray) -> str:
    """A digest of what the model sees of a block of rows: the cell ids and, per cell, its non-zero
    vocabulary genes (token ids, in column order) with their counts.

    The key of a chunk's file in the cache, so that a chunk whose cells or counts changed is computed
    again rather than read back.
    """
    h = hashlib.sha256()
    h.update("\x00".join(map(str, cell_ids)).encode())
    h.update(b"\x01")
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        block.sort_indices()
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        cols, data = block.indices, block.data
    else:
        dense = np.asarray(block)
        rows, cols = np.nonzero(dense)
        data = dense[rows, cols]
    tok = np.asarray(col2tok)[cols]
    keep = (tok >= 0) & (data != 0)
    for arr, dtype in ((rows[keep], np.int64), (tok[keep], np.int64), (data[keep], np.float64)):
        h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return h.hexdigest()[:20]


class BatchTokens:
    """Map-style dataset: item ``b`` is batch ``b`` tokenised and padded, read from X when asked for
    (so a ``torch.utils.data.DataLoader`` with workers can prepare batches while the model runs)."""

    def __init__(self, X, batches, seeds, col2tok, *, cls_id, pad_id, pad_value, max_length):
        self.X, self.batches, self.seeds, self.col2tok = X, batches, seeds, col2tok
        self.cls_id, self.pad_id, self.pad_value, self.max_length = cls_id, pad_id, pad_value, max_length

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        idx = np.sort(self.batches[b])
        genes, values, mask = tokenize_block(
            _row_block(self.X, idx),
            self.seeds[idx],
            self.col2tok,
            cls_id=self.cls_id,
            pad_id=self.pad_id,
            pad_value=self.pad_value,
            max_length=self.max_length,
        )
        return idx, genes, values, mask, bool(mask.any())


def embed_rows(
    model,
    X,
    cell_ids: Sequence,
    col2tok: np.ndarray,
    *,
    lengths: np.ndarray | None = None,
    max_length: int = 1200,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    bucketed: bool = True,
    num_workers: int = 0,
    progress=False,
    chunks: Sequence[np.ndarray] | None = None,
    on_chunk: Callable[[int, np.ndarray], None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Embed a block of rows with a loaded :class:`~cellsymphony.models.ScGPTEncoder`.

    The unit of work of :func:`cellsymphony.pp.embed_expression` (and of its dask scale-out: each task
    gets a block of rows and their cell ids, and returns the block's embeddings). Rows
    are streamed from ``X`` (CSR, dense or an anndata backed dataset) one batch at a time, tokenised in
    ``num_workers`` DataLoader workers (0: in this process) while the device runs the previous batches.

    ``chunks`` (row indices, each sorted): embed only these rows, chunk after chunk, each cut into batches
    of its own cells (the batches :func:`embed_rows` makes of that chunk's block alone, so a chunk's result
    does not depend on the other chunks); ``on_chunk(c, values)`` is called with the ``(len(chunks[c]),
    d_model)`` embeddings of chunk ``c`` as soon as it is finished (the resumable cache saves it then).
    ``out``: a float32 ``(n_rows, d_model)`` array to write into (other rows untouched). ``progress``: show
    a bar of its own (bool), or an existing tqdm bar to update.

    Returns a (n_rows, d_model) float32 array (``out`` if given), L2-normalised rows, NaN rows for cells
    without any non-zero vocabulary gene.
    """
    import torch
    from tqdm.auto import tqdm

    from ..._utils import cell_seeds

    X = _as_rows(X)
    n = X.shape[0]
    if len(cell_ids) != n:
        raise ValueError(f"{len(cell_ids)} cell ids for {n} rows.")
    if lengths is None:
        lengths, _ = scan_counts(X, col2tok)
    lengths = np.asarray(lengths)
    if out is None:
        out = np.full((n, model.d_model), np.nan, dtype=np.float32)
    elif out.shape != (n, model.d_model) or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape {(n, model.d_model)}, got {out.dtype} {out.shape}.")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    owner: list[int] = []  # the chunk of each batch
    if chunks is None:
        batches = batch_order(lengths, batch_size, bucketed=bucketed)
    else:
        chunks = [np.asarray(rows, dtype=np.int64) for rows in chunks]
        batches = []
        for c, rows in enumerate(chunks):
            own = batch_order(lengths[rows], batch_size, bucketed=bucketed)
            batches += [rows[b] for b in own]
            owner += [c] * len(own)
    remaining = np.bincount(np.asarray(owner, dtype=np.int64), minlength=len(chunks or ()))
    data = BatchTokens(
        X,
        batches,
        cell_seeds(seed, cell_ids),
        col2tok,
        cls_id=model.cls_token_id,
        pad_id=model.pad_token_id,
        pad_value=model.pad_value,
        max_length=max_length,
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=cuda
    )
    pending: list = []

    def flush():  # one device->host copy per group of batches, so the device is not synchronised each batch
        for idx, emb in pending:
            out[idx] = emb.cpu().numpy()
        pending.clear()

    def finished(c: int) -> None:
        if on_chunk is not None:
            flush()
            on_chunk(c, out[chunks[c]])

    for c in np.flatnonzero(remaining == 0):  # chunks without a non-empty cell: nothing to compute
        finished(int(c))
    own_bar = not hasattr(progress, "update")  # a bar of the caller's (the chunk engine's) is updated, not made
    pbar = tqdm(total=int(sum(len(b) for b in batches)), unit="cell", desc="scGPT", disable=not progress) if own_bar else progress
    with torch.inference_mode(), autocast:
        for b, (idx, genes, values, mask, padded) in enumerate(loader):
            emb = model.encode_cls(
                torch.as_tensor(genes).to(dev, non_blocking=True),
                torch.as_tensor(values).to(dev, non_blocking=True),
                torch.as_tensor(mask).to(dev, non_blocking=True) if padded else None,
            ).float()
            pending.append((np.asarray(idx), emb / emb.norm(dim=1, keepdim=True)))
            if len(pending) >= 32:
                flush()
            pbar.update(len(idx))
            if owner:
                c = owner[b]
                remaining[c] -= 1
                if remaining[c] == 0:
                    finished(c)
        flush()
    if own_bar:
        pbar.close()
    return out
