"""``cs.pp.embed_morphology``: per-cell UNI2-h (or other) embeddings of nucleus-centred H&E."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import IN_IMAGE_KEY, MOD_MORPH
from .._docs import inject_docs
from .._settings import logger, resolve_device, settings
from .._utils import file_stamp, params_record
from .._validate import (
    check_choice,
    check_float,
    check_int,
    check_mpp,
    check_not_empty,
    get_modality,
    is_mudata,
    set_latest,
)
from ..models.encoders import encoder_kind
from ._chunks import Chunk, cache_folder, chunk_file, fingerprint, run_chunks
from ._handcrafted_bands import BAND_PX, HandcraftedBandJob, plan_chunks
from ._morphology_runner import embed_cells, plan, run_batches
from ._patch_source import cell_centres, sample_sources

if TYPE_CHECKING:
    from anndata import AnnData
    from distributed import Client
    from mudata import MuData
    from torch import nn

MODES = ("cell", "tile")
POOLS = ("nucleus", "cls", "mean")


def _identity(x):
    return x


def _build_encoder(model, weights, device: str, mpp: float):
    if isinstance(model, str) and model.lower() == "handcrafted":
        from ..models.encoders._handcrafted import HandcraftedEncoder

        if weights is not None:
            raise ValueError("model='handcrafted' has no weights: leave weights=None.")
        return HandcraftedEncoder(mpp)
    from ..models.encoders._morphology import load_morphology_encoder

    return load_morphology_encoder(model, weights=weights, device=device)


def _module_checksum(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _cache_name(src, names: np.ndarray, xy: np.ndarray, params: dict) -> str:
    """The fingerprint of one sample's cache folder ``<key>-<sample>-<fingerprint>`` (the same as before
    the chunk engine, so existing caches are reused): the run's parameters, the slide (path, pixel sizes,
    sample, file size and modification time: an H&E re-exported to the same path must not reuse chunks
    computed from the old pixels), the registration, and the cells (names and nucleus positions)."""
    return fingerprint(
        params,
        [src.he_path, src.pixel_size, src.he_mpp, src.sample],
        list(file_stamp(src.he_path)),
        src.geometry_bytes(),
        "\x00".join(map(str, names)).encode(),
        np.ascontiguousarray(xy, dtype=np.float64).tobytes(),
    )


# ------------------------------------------------------------------------------------------------ the chunk job
class _MorphologyJob:
    """The chunk engine's job (:class:`~cellsymphony.pp._chunks.ChunkJob`) for morphology embeddings.

    Each chunk's ``work`` is ``(PatchSource, [Batch])``, batch rows being output positions. In this
    process the pending chunks of a sample stream through one DataLoader; on a cluster each chunk is
    :func:`_chunk_on_worker` with the sample's source and the chunk's nucleus positions."""

    kind = "morphology"
    desc = "embed_morphology"

    def __init__(self, encoder, out, xy, *, enc_ref, run, device, requested_device, num_workers):
        self.encoder, self.out, self.xy, self.enc_ref = encoder, out, xy, enc_ref
        self.dim = int(encoder.embed_dim)
        self.run, self.device, self.requested_device, self.num_workers = run, device, requested_device, num_workers

    def stream(self, chunks, progress, done) -> None:
        p = self.run
        radius_px = None if p["pool_radius_um"] is None else float(p["pool_radius_um"]) / p["mpp"]
        start = 0
        while start < len(chunks):  # the consecutive chunks of one sample share its slide and loader
            src = chunks[start].work[0]
            stop = start
            while stop < len(chunks) and chunks[stop].work[0] is src:
                stop += 1
            owner = [i for i in range(start, stop) for _ in chunks[i].work[1]]
            batches = [b for i in range(start, stop) for b in chunks[i].work[1]]
            remaining = {i: len(chunks[i].work[1]) for i in range(start, stop)}
            try:
                for j, feats in run_batches(
                    self.encoder, src, batches, size=p["size"], mpp=p["mpp"], pool=p["pool"], radius_px=radius_px,
                    layer=p["layer"], device=self.device, num_workers=self.num_workers, progress=progress,
                    exact=p["exact"],
                ):
                    self.out[batches[j].rows] = feats
                    remaining[owner[j]] -= 1
                    if remaining[owner[j]] == 0:
                        done(owner[j], None)
            finally:
                src.close()
            start = stop

    def task(self, chunk):
        p = self.run
        params = {k: p[k] for k in ("mode", "pool", "pool_radius_um", "layer", "size", "mpp", "tile_stride", "batch_size",
                                    "exact")}
        return _chunk_on_worker, (self.enc_ref, chunk.work[0], self.xy[chunk.rows]), {
            "params": params, "device": self.requested_device,
        }


# ------------------------------------------------------------------------------------------------ the cluster side
class RemoteEncoder:
    """What the client needs to know about an encoder that only the cluster's workers load."""

    def __init__(self, info: dict, ref: tuple):
        self.__dict__.update(info)
        self.ref = ref

    def __repr__(self) -> str:
        return f"RemoteEncoder({self.name!r}, embed_dim={self.embed_dim}, weights={self.weights_checksum[:19]})"


def _named_encoder(model: str, weights, device: str | None):
    """The worker's cached encoder for a registry / timm name (loaded once per process and device)."""
    from .._distributed import worker_cache
    from ..models.encoders._morphology import load_morphology_encoder

    dev = resolve_device(device)
    w = None if weights is None else str(weights)
    return worker_cache().model(("morphology", model, w, dev), lambda: load_morphology_encoder(model, weights=w, device=dev))


def _encoder_info(model: str, weights, device: str | None) -> dict:
    """Task: load (and keep) the encoder on a worker; return its facts for the client's checks."""
    enc = _named_encoder(model, weights, device)
    return {
        "name": enc.name, "embed_dim": int(enc.embed_dim), "patch_size": enc.patch_size, "n_layers": int(enc.n_layers),
        "key": enc.key, "weights_checksum": enc.weights_checksum, "weights_path": str(enc.weights_path or ""),
        "untrained": bool(getattr(enc, "untrained", False)), "kind": encoder_kind(enc),
    }


def _remote_encoder(client, model, weights, device: str | None, mpp: float):
    """The encoder as the client sees it: a deep model named by a string is loaded by the workers only
    (one task loads it and reports its dimensions, checksum and key); an ``nn.Module`` or the
    handcrafted encoder is built here on the CPU and shipped to the workers."""
    import uuid

    if isinstance(model, str) and model.lower() != "handcrafted":
        fut = client.submit(_encoder_info, model, weights, device, key=f"cs-morphology-encoder-{uuid.uuid4().hex[:10]}",
                            pure=False)  # fmt: skip
        info = fut.result()
        fut.release()
        # every worker loads the very file the first one resolved (not its own environment's)
        return RemoteEncoder(info, ("named", model, info["weights_path"] or weights, info["weights_checksum"]))
    return _build_encoder(model, weights, "cpu", mpp)


def _chunk_on_worker(enc_ref, src, xy_um, *, params: dict, device: str | None) -> np.ndarray:
    """One chunk's embeddings ``(k, D)`` on a cluster worker (all cells inside the image)."""
    from .._distributed import worker_cache

    cache = worker_cache()
    if isinstance(enc_ref, tuple):
        _, model, weights, checksum = enc_ref
        encoder = _named_encoder(model, weights, device)
        if encoder.weights_checksum != checksum:
            raise ValueError(
                f"Worker {os.uname().nodename} loaded {model!r} weights {encoder.weights_checksum[:19]}, "
                f"not the {checksum[:19]} of the first worker: give every worker the same weights (weights=path)."
            )
    else:  # a module or the handcrafted encoder shipped by the client
        encoder = enc_ref
        if hasattr(encoder, "to"):
            with cache.lock:
                encoder.to(resolve_device(device))
    return embed_cells(encoder, cache.source(src), np.asarray(xy_um, dtype=np.float64), num_workers=0,
                       device=resolve_device(device), **params)  # fmt: skip


@inject_docs()
def embed_morphology(
    mdata: MuData | AnnData,
    *,
    model: str | nn.Module = "uni2-h",
    weights: str | os.PathLike | None = None,
    mode: Literal["cell", "tile"] = "cell",
    pool: Literal["nucleus", "cls", "mean"] = "nucleus",
    pool_radius_um: float | None = None,
    layer: int = -1,
    size: int = 224,
    mpp: float = 0.5,
    tile_stride: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str | None = None,
    chunk_size: int = 2048,
    key_added: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    client: Client | None = None,
    stain: str | None = None,
    allow_empty: bool = False,
    exact: bool = False,
    copy: bool = False,
) -> MuData | AnnData | None:
    """Per-cell morphology embeddings from the H&E around each nucleus (UNI2-h by default).

    ``mode="cell"`` (the method of the paper): one ``size`` px patch at ``mpp`` um/px per cell, centred
    on its nucleus (see :func:`cellsymphony.pp.cell_patches`), through the encoder; the spatial tokens
    nearest the nucleus are pooled. For UNI2-h the class and 8 register tokens are dropped and the
    rest is a 16 x 16 grid of 14 px (7 um) tokens; by default the nucleus position is interpolated
    bilinearly on that grid, which for a centred nucleus is the mean of the central 2 x 2 tokens
    (14 um). ``mode="tile"``: the encoder runs once per tile of one regular grid (tiles of ``size`` px,
    centres ``tile_stride`` px apart, anchored at the micrometre origin, so chunked runs equal whole
    runs); each cell takes the tokens at its nucleus (bilinear weights) from the tile whose centre is
    nearest, so it keeps at least ``(size - tile_stride) / 2`` px of context on every side.

    Patches are cut from bands of the slide resampled once into the ``mpp`` grid of the Xenium frame
    (antialiased, through the registration; a non-rigid field pixel by pixel), so extraction costs about
    the slide's tissue area, not cells times patch area; on CUDA the resampling and cutting run on the GPU
    while DataLoader workers decode. A cell's patch is then the window of that global grid nearest its
    nucleus: the nucleus lies within half a pixel of the patch centre and token pooling uses its true
    sub-pixel position. ``exact=True`` warps each patch on its own with the nucleus exactly at the
    centre (the extraction of earlier versions, and their cache fingerprints; several times slower).

    Cells whose centre lies outside the H&E get a NaN row, flagged in ``obs[f"{{key_added}}_empty"]``. Memory beyond the
    output does not grow with the number of cells: patches are decoded batch by batch (in
    ``num_workers`` DataLoader workers while the model runs) under ``torch.inference_mode``, with
    bf16/fp16 autocast on GPU. With ``cache_dir`` each finished chunk is saved atomically and a
    re-run with the same inputs resumes where the last one stopped, giving identical results.

    Parameters
    ----------
    mdata
        {mdata} H&E-only slides: :func:`cellsymphony.io.read_he_cells`.
    model
        ``"uni2-h"``, ``"uni"``, ``"tiny"`` (untrained, for tests), ``"handcrafted"`` (nucleus
        morphometrics, stain and texture statistics of the central 32 um; no weights; cell mode only; computed
        per band of tissue, each band read once, with ``num_workers`` workers computing chunks; with ``stain=``
        per cell patch), any timm model name, or an ``nn.Module`` (see
        :func:`cellsymphony.models.load_morphology_encoder`).
    weights
        Checkpoint file or folder (``pytorch_model.bin`` / ``*.safetensors``); ``None`` looks in
        ``$CELLSYMPHONY_UNI2H_WEIGHTS`` (``$CELLSYMPHONY_UNI_WEIGHTS``) and the Hugging Face cache;
        ``"random"`` for timing runs. Loaded strictly.
    mode
        ``"cell"`` (one patch per cell) or ``"tile"`` (one pass per tile, shared by its cells).
    pool
        ``"nucleus"``: tokens at the nucleus; ``"cls"``: the class token (the model's tile feature; in
        tile mode that of the cell's tile); ``"mean"``: all spatial tokens.
    pool_radius_um
        With ``pool="nucleus"``: average every token whose centre is within this distance of the
        nucleus instead of the bilinear 2 x 2 (``None``).
    layer
        Transformer block whose tokens are pooled; ``-1`` is the final normalised output.
    size
        Patch / tile side in pixels (224 is the models' native size; larger tiles interpolate the
        position embeddings).
    mpp
        Micrometres per patch pixel (0.5 for UNI / UNI2-h).
    tile_stride
        Distance between tile centres in pixels (tile mode); default ``size // 2``.
    batch_size
        Patches per forward pass; default ``cs.settings.batch_size``.
    num_workers
        DataLoader workers decoding patches; default ``cs.settings.num_workers``.
    device
        {device}
    chunk_size
        Cells per chunk of the resumable cache.
    key_added
        ``obsm`` key; default ``X_uni2`` for UNI2-h, ``X_<name>`` otherwise.
    cache_dir
        Folder for finished chunks (resume after an interruption); ``None`` keeps nothing.
    client
        {client} Chunks are the ``chunk_size`` chunks of the cache, so a run on a cluster and one in a
        single process share ``cache_dir``; workers decode patches themselves (``num_workers`` is not used).
    stain
        Key of a :func:`cellsymphony.pp.normalize_stain` record in ``mdata["morphology"].uns``: each patch is
        normalised from its slide's stain to the recorded reference before the encoder, and the reference is
        recorded in ``params["stain"]``. ``None``: patches as scanned.
    allow_empty
        When no cell lies inside its H&E image (every row would be NaN, e.g. a wrong alignment or unit), write
        the all-NaN embedding with a warning instead of raising a ``ValueError``; it does not become the latest
        representation.
    exact
        ``False`` (default): patches cut from resampled bands (nucleus within half a pixel of the centre,
        pooled at its true position); ``True``: one warp per patch, nucleus exactly at the centre (the
        extraction and cache fingerprints of earlier versions). Band patches are the exact warp's samples on
        the band grid; against patches centred on the nucleus they differ by up to half a pixel of phase
        (about 4 grey levels mean absolute difference on JPEG-tiled tissue). Their caches are kept apart.
        With ``model="handcrafted"``, ``False`` computes the features band by band (each cell's window still
        sampled at its exact position) and ``True`` runs the per-cell path of earlier versions.
    copy
        {copy}

    Returns
    -------
    ``None`` (or a modified copy with ``copy=True``); writes

    - ``mdata["morphology"].obsm[key_added]``: float32 ``(n_cells, embed_dim)``, NaN rows off-image;
    - ``mdata["morphology"].obs[f"{{key_added}}_empty"]``: True for the NaN rows (cells off the image);
    - ``mdata["morphology"].obs["in_image"]`` only when absent (the readers write it: whether the cell's
      nucleus lies in its H&E); earlier versions overwrote it on every run;
    - ``mdata["morphology"].uns[key_added]["params"]``: model, weights checksum, mode, pool, mpp, size,
      ``exact`` and the other arguments, with the package version;
    - ``mdata.uns["cellsymphony"]["latest"]["morphology"] = key_added``.
    """
    # ---- validate everything before loading a model or writing anything
    check_choice("mode", mode, MODES)
    check_choice("pool", pool, POOLS)
    size = check_int("size", size, min=16, hint="patch side in pixels, 224 for UNI / UNI2-h")
    mpp = check_mpp("mpp", mpp)
    if tile_stride is None:
        tile_stride = size // 2
    tile_stride = check_int("tile_stride", tile_stride, min=1, max=size)
    pool_radius_um = check_float("pool_radius_um", pool_radius_um, min=0, none=True, unit="um")
    if pool_radius_um is not None and pool != "nucleus":
        raise ValueError("pool_radius_um applies to pool='nucleus' only.")
    layer = check_int("layer", layer)
    batch_size = check_int("batch_size", settings.batch_size if batch_size is None else batch_size, min=1,
                           hint="default cs.settings.batch_size")  # fmt: skip
    num_workers = check_int("num_workers", settings.num_workers if num_workers is None else num_workers, min=0)
    chunk_size = check_int("chunk_size", chunk_size, min=1)
    adata = get_modality(mdata, MOD_MORPH)
    rows = np.arange(adata.n_obs)
    groups = sample_sources(mdata, adata, rows, None)
    xy = cell_centres(adata)
    stain_params = None
    if stain is not None:  # cellsymphony.pp._normalize_stain: per-slide transforms to the recorded reference
        from ._normalize_stain import stain_record, wrap_stained

        groups, stain_params = wrap_stained(adata, stain, groups), stain_record(adata, stain)
        if client is not None:
            raise ValueError("stain= is not supported with client= yet: embed without a client.")
    requested_device = device  # a cluster's workers resolve their own device
    device = resolve_device(device)

    if client is None:
        encoder = _build_encoder(model, weights, device, mpp)
    else:  # named models are loaded by the workers only
        from .._distributed import check_client, ensure_worker_cache

        check_client(client)
        ensure_worker_cache(client)
        encoder = _remote_encoder(client, model, weights, requested_device, mpp)
    handcrafted = encoder_kind(encoder) == "features"
    if handcrafted and (mode != "cell" or pool != "nucleus" or layer != -1):
        raise ValueError("model='handcrafted' works in mode='cell' with pool='nucleus' and layer=-1 only.")
    if not handcrafted:
        n_layers = encoder.n_layers
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer must be in [-{n_layers}, {n_layers - 1}] for {encoder.name!r}, got {layer}.")
        if encoder.patch_size and size % encoder.patch_size:
            raise ValueError(
                f"size={size} is not a multiple of {encoder.name!r}'s patch size {encoder.patch_size} "
                f"(e.g. {encoder.patch_size * max(1, size // encoder.patch_size)})."
            )
    if handcrafted:
        # its features use only the central window: read no more than that
        size = min(size, 2 * int(np.ceil(encoder.window_um / mpp / 2)))
    # handcrafted features by bands of tissue (pp/_handcrafted_bands.py); with stain= the per-cell patches
    by_band = handcrafted and stain is None and not exact and hasattr(encoder, "features_in_band")
    key = key_added or encoder.key
    checksum = encoder.weights_checksum
    if checksum == "module" and cache_dir is not None:
        checksum = _module_checksum(encoder)

    if copy:
        mdata = mdata.copy()
        adata = get_modality(mdata, MOD_MORPH)

    run_params = dict(
        model=encoder.name, weights_checksum=checksum, mode=mode, pool=pool, pool_radius_um=pool_radius_um,
        layer=layer, size=size, mpp=float(mpp), tile_stride=int(tile_stride) if mode == "tile" else None,
        batch_size=batch_size, chunk_size=int(chunk_size),
    )
    if stain_params is not None:
        run_params["stain"] = stain_params
    if by_band:  # other values than the per-cell path (windows on one pixel lattice): other cache folders
        run_params["band_px"] = BAND_PX
    # the cache fingerprint: exact=True keeps that of earlier versions (their caches are reused); band
    # patches differ slightly from exact ones, so their caches are named apart ("bands-opencv": since the CPU
    # resampling moved to OpenCV, whose rounding differs from the earlier torch resampling in a few pixels;
    # "-u8": one-tap low-passes warp the uint8 pixels in fixed point, rounded otherwise in a few pixels)
    fp_params = dict(run_params) if exact else {**run_params, "extraction": "bands-opencv-u8"}
    if by_band:  # the compiled kernels break watershed ties otherwise than the earlier vectorised features
        fp_params["features"] = "compiled"
    run_params["exact"] = bool(exact)
    dim = int(encoder.embed_dim)
    out = np.full((adata.n_obs, dim), np.nan, dtype=np.float32)
    in_image = np.zeros(adata.n_obs, dtype=bool)
    names = adata.obs_names.to_numpy()

    # ---- plan: per sample, the cells inside its H&E in chunks of batches (rows: output positions)
    chunks: list[Chunk] = []
    for src, pos in groups:
        inside = src.in_image(xy[pos])
        in_image[pos] = inside
        valid = pos[inside]
        folder = None
        if cache_dir is not None and len(valid):  # no folder for a sample without a cell on its image
            fp = _cache_name(src, names[valid], xy[valid], fp_params)
            folder = cache_folder(cache_dir, key, src.sample or "sample", fp)
        if by_band:
            for index, rows in plan_chunks(xy, valid, mpp=float(mpp), chunk_size=int(chunk_size)):
                chunks.append(Chunk(
                    index, rows, name=f"{src.sample or 'sample'}-{index:06d}",
                    file=None if folder is None else chunk_file(folder, index), work=src,
                ))  # fmt: skip
            src.close()
            continue
        for ch in plan(
            xy[valid], mode=mode, size=size, mpp=float(mpp), batch_size=batch_size, chunk_size=int(chunk_size),
            tile_stride=int(tile_stride), exact=bool(exact),
        ):
            for b in ch.work:
                b.rows = valid[b.rows]
            chunks.append(Chunk(
                ch.index, valid[ch.rows], name=f"{src.sample or 'sample'}-{ch.index:06d}",
                file=None if folder is None else chunk_file(folder, ch.index), work=(src, ch.work),
            ))  # fmt: skip
        src.close()  # reopened by whoever reads patches (this process's loader or a worker)

    n_inside = int(in_image.sum())
    empty = check_not_empty(
        n_inside, what=f"The morphology embedding {key!r}", latest=True, allow_empty=allow_empty,
        why=f"none of the {adata.n_obs} cells lies inside its H&E image (every row would be NaN). Check the "
        "alignment in mdata.uns['cellsymphony']['samples'] (cs.io.register_he), the pixel sizes, and that the "
        "cells belong to this slide.",
    )  # fmt: skip

    enc_ref = None
    if client is not None:
        if isinstance(encoder, RemoteEncoder):
            enc_ref = encoder.ref
        else:  # a user's module or the handcrafted encoder: one copy per worker, recomputable if a worker dies
            import uuid

            enc_ref = client.submit(_identity, encoder, key=f"cs-morphology-module-{uuid.uuid4().hex[:10]}", pure=False)
    if by_band:
        job = HandcraftedBandJob(encoder, xy, size=size, mpp=float(mpp), num_workers=num_workers, enc_ref=enc_ref)
    else:
        job = _MorphologyJob(
            encoder, out, xy, enc_ref=enc_ref, run=run_params, device=device, requested_device=requested_device,
            num_workers=num_workers,
        )
    try:
        run_chunks(job, chunks, out, client=client)
    finally:
        for src, _ in groups:
            src.close()
        if enc_ref is not None and not isinstance(enc_ref, tuple):
            enc_ref.release()

    finite = np.isfinite(out).all(axis=1)
    if not empty:
        empty = check_not_empty(
            int(finite.sum()), what=f"The morphology embedding {key!r}", latest=True, allow_empty=allow_empty,
            why=f"the encoder {encoder.name!r} returned NaN or inf for every cell.",
        )  # fmt: skip
    adata.obsm[key] = out
    adata.obs[f"{key}_empty"] = ~finite
    if IN_IMAGE_KEY not in adata.obs:  # the readers' flag; written here only for data built without them
        adata.obs[IN_IMAGE_KEY] = in_image
    params = params_record(**run_params, cache_dir=cache_dir, n_cells=int(in_image.sum()))
    params["weights_path"] = str(getattr(encoder, "weights_path", "") or "")
    entry: dict[str, Any] = {"params": params}
    if handcrafted:
        entry["feature_names"] = np.asarray(encoder.feature_names)
    adata.uns[key] = entry
    if not empty:
        set_latest(mdata, MOD_MORPH, key)
    if is_mudata(mdata):
        mdata.update()
    logger.info(
        "added mdata[%r].obsm[%r] (%d x %d; %d cells off the image are NaN), obs[%r], uns[%r]['params']",
        MOD_MORPH, key, out.shape[0], dim, int((~in_image).sum()), f"{key}_empty", key,
    )
    return mdata if copy else None
