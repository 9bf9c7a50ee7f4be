"""``cs.pp.embed_morphology``: per-cell UNI2-h (or other) embeddings of nucleus-centred H&E."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import IN_IMAGE_KEY, MOD_MORPH
from .._docs import inject_docs
from .._settings import logger, resolve_device, settings
from .._utils import load_chunk, params_record, save_chunk
from .._validate import check_choice, get_modality, is_mudata, set_latest
from ._morphology_runner import plan, run_batches
from ._patch_source import cell_centres, sample_sources

if TYPE_CHECKING:
    from anndata import AnnData
    from distributed import Client
    from mudata import MuData
    from torch import nn

MODES = ("cell", "tile")
POOLS = ("nucleus", "cls", "mean")


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


def _fingerprint(src, names: np.ndarray, xy: np.ndarray, params: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(json.dumps([src.he_path, src.pixel_size, src.he_mpp, src.sample]).encode())
    # the slide itself (size and modification time, as a full hash of a multi-GB file is too slow): an H&E
    # re-exported to the same path must not reuse chunks computed from the old pixels
    st = os.stat(src.he_path)
    h.update(json.dumps([st.st_size, st.st_mtime_ns]).encode())
    h.update(src.geometry_bytes())
    h.update("\x00".join(map(str, names)).encode())
    h.update(np.ascontiguousarray(xy, dtype=np.float64).tobytes())
    return h.hexdigest()[:20]


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

    Cells whose centre lies outside the H&E get a NaN row and ``in_image`` False. Memory beyond the
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
        morphometrics, stain and texture statistics of the central 32 um; no weights; cell mode only), any timm model
        name, or an ``nn.Module`` (see :func:`cellsymphony.models.load_morphology_encoder`).
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
    copy
        {copy}

    Returns
    -------
    ``None`` (or a modified copy with ``copy=True``); writes

    - ``mdata["morphology"].obsm[key_added]``: float32 ``(n_cells, embed_dim)``, NaN rows off-image;
    - ``mdata["morphology"].obs["in_image"]``: whether the cell's centre lies in its H&E;
    - ``mdata["morphology"].uns[key_added]["params"]``: model, weights checksum, mode, pool, mpp, size
      and the other arguments, with the package version;
    - ``mdata.uns["cellsymphony"]["latest"]["morphology"] = key_added``.
    """
    # ---- validate everything before loading a model or writing anything
    check_choice("mode", mode, MODES)
    check_choice("pool", pool, POOLS)
    if int(size) != size or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}.")
    size = int(size)
    if not (isinstance(mpp, int | float) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}.")
    if tile_stride is None:
        tile_stride = size // 2
    if int(tile_stride) != tile_stride or not 1 <= tile_stride <= size:
        raise ValueError(f"tile_stride must be an integer in [1, size={size}], got {tile_stride!r}.")
    if pool_radius_um is not None and not pool_radius_um >= 0:
        raise ValueError(f"pool_radius_um must be >= 0 (or None), got {pool_radius_um!r}.")
    if pool_radius_um is not None and pool != "nucleus":
        raise ValueError("pool_radius_um applies to pool='nucleus' only.")
    batch_size = int(batch_size or settings.batch_size)
    num_workers = int(settings.num_workers if num_workers is None else num_workers)
    if batch_size < 1 or num_workers < 0 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1 and num_workers >= 0.")
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
    else:  # cellsymphony._distributed: named models are loaded by the workers only
        from .._distributed import remote_morphology_encoder

        encoder = remote_morphology_encoder(client, model, weights, requested_device, mpp, _build_encoder)
    handcrafted = not hasattr(encoder, "forward_tokens")
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
    dim = int(encoder.embed_dim)
    out = np.full((adata.n_obs, dim), np.nan, dtype=np.float32)
    in_image = np.zeros(adata.n_obs, dtype=bool)
    radius_px = None if pool_radius_um is None else float(pool_radius_um) / mpp
    from tqdm.auto import tqdm

    n_resumed = 0
    if client is not None:  # scale-out: the chunks run as tasks on the cluster (cellsymphony._distributed)
        from .._distributed import morphology_on_cluster

        n_resumed = morphology_on_cluster(
            client, encoder, groups, xy, adata.obs_names.to_numpy(), out, in_image, key=key,
            run_params=run_params, cache_dir=cache_dir, device=requested_device,
        )
        groups = []
    try:
        for src, pos in groups:
            inside = src.in_image(xy[pos])
            in_image[pos] = inside
            valid = pos[inside]
            chunks = plan(
                xy[valid], mode=mode, size=size, mpp=float(mpp), batch_size=batch_size, chunk_size=int(chunk_size),
                tile_stride=int(tile_stride),
            )
            folder = None
            if cache_dir is not None:
                fp = _fingerprint(src, adata.obs_names[valid].to_numpy(), xy[valid], run_params)
                folder = Path(cache_dir) / f"{key}-{src.sample or 'sample'}-{fp}"
                folder.mkdir(parents=True, exist_ok=True)
            pending, remaining = [], {}
            for ch in chunks:
                if folder is not None:
                    cached = load_chunk(folder / f"chunk_{ch.index:06d}.npy", (len(ch.rows), dim))
                    if cached is not None:
                        out[valid[ch.rows]] = cached
                        n_resumed += 1
                        continue
                pending.append(ch)
                remaining[ch.index] = len(ch.batches)
            batches = [b for ch in pending for b in ch.batches]
            owner_chunk = [ch for ch in pending for _ in ch.batches]
            total = int(sum(len(ch.rows) for ch in pending))
            with tqdm(total=total, desc=f"embed_morphology {src.sample}".strip(), unit="cell",
                      disable=not settings.progress or total == 0) as bar:
                for i, feats in run_batches(
                    encoder, src, batches, size=size, mpp=float(mpp), pool=pool, radius_px=radius_px, layer=layer,
                    device=device, num_workers=num_workers, progress=bar,
                ):
                    out[valid[batches[i].rows]] = feats
                    ch = owner_chunk[i]
                    remaining[ch.index] -= 1
                    if remaining[ch.index] == 0 and folder is not None:
                        save_chunk(folder / f"chunk_{ch.index:06d}.npy", out[valid[ch.rows]])
            src.close()
    finally:
        for src, _ in groups:
            src.close()
    if n_resumed:
        logger.info("embed_morphology: resumed %d finished chunk(s) from %s", n_resumed, cache_dir)

    adata.obsm[key] = out
    adata.obs[IN_IMAGE_KEY] = in_image
    params = params_record(**run_params, cache_dir=cache_dir, n_cells=int(in_image.sum()))
    params["weights_path"] = str(getattr(encoder, "weights_path", "") or "")
    entry: dict[str, Any] = {"params": params}
    if handcrafted:
        entry["feature_names"] = np.asarray(encoder.feature_names)
    adata.uns[key] = entry
    set_latest(mdata, MOD_MORPH, key)
    if is_mudata(mdata):
        mdata.update()
    logger.info(
        "added mdata[%r].obsm[%r] (%d x %d; %d cells off the image are NaN), uns[%r]['params']",
        MOD_MORPH, key, out.shape[0], dim, int((~in_image).sum()), key,
    )
    return mdata if copy else None
