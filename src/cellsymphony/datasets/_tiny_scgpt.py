"""A tiny random-weight scGPT checkpoint in the published folder layout."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .._settings import logger
from .._utils import atomic_path
from .._validate import check_int


def tiny_scgpt_checkpoint(
    path: str | os.PathLike,
    genes: Sequence[str],
    *,
    seed: int = 0,
    embsize: int = 32,
    nheads: int = 4,
    d_hid: int = 64,
    nlayers: int = 2,
    n_extra_genes: int = 16,
    specials_in_vocab: bool = True,
) -> Path:
    """Write a small scGPT model folder with random weights, laid out as the published models.

    The folder holds ``args.json`` (scGPT's keys, plus ``"cellsymphony_untrained": true`` so that the
    loader warns the weights are untrained), ``vocab.json`` (``genes``, ``n_extra_genes`` made-up genes
    and, with ``specials_in_vocab``, ``<pad>``, ``<cls>``, ``<eoc>`` at the end as in the whole-human
    vocabulary) and ``best_model.pt``: a state dict with flash-attention key names
    (``transformer_encoder.layers.N.self_attn.Wqkv.weight``) and the heads that the cell-embedding path
    does not use (``decoder``, ``mvc_decoder``, ``cls_decoder``), as a pretrained checkpoint has them.

    Parameters
    ----------
    path
        Folder to write (created if needed; files already there are replaced).
    genes
        Gene symbols of the vocabulary.
    seed
        Seed of the random weights.
    embsize
        Width of the model (scGPT: 512).
    nheads
        Attention heads (scGPT: 8).
    d_hid
        Feed-forward width (scGPT: 512).
    nlayers
        Transformer layers (scGPT: 12).
    n_extra_genes
        Made-up genes appended to the vocabulary (not in any panel).
    specials_in_vocab
        Write ``<pad>``, ``<cls>``, ``<eoc>`` into ``vocab.json``; otherwise the loader appends them.

    Returns
    -------
    The folder path.
    """
    import torch

    from ..models.encoders._scgpt import SPECIAL_TOKENS, UNTRAINED_FLAG, ScGPTEncoder

    seed = check_int("seed", seed)
    embsize, nheads = check_int("embsize", embsize, min=1), check_int("nheads", nheads, min=1)
    if embsize % nheads:
        raise ValueError(f"embsize={embsize} must be divisible by nheads={nheads}.")
    d_hid, nlayers = check_int("d_hid", d_hid, min=1), check_int("nlayers", nlayers, min=1)
    n_extra_genes = check_int("n_extra_genes", n_extra_genes, min=0)
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        raise ValueError("genes contains duplicates; a vocabulary maps each symbol to one token.")
    clash = [g for g in genes if g in SPECIAL_TOKENS]
    if clash:
        raise ValueError(f"genes must not contain the special tokens {clash}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokens = genes + [f"CSFAKE{i}" for i in range(n_extra_genes)]
    vocab = {g: i for i, g in enumerate(tokens)}
    full = dict(vocab)
    for tok in SPECIAL_TOKENS:  # the model always has them (the loader appends missing ones)
        full[tok] = len(full)
    if specials_in_vocab:
        vocab = full

    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # module initialisers
    model = ScGPTEncoder(len(full), embsize, nheads, d_hid, nlayers, pad_token_id=full["<pad>"])
    with torch.no_grad():
        model.encoder.embedding.weight.uniform_(-0.1, 0.1, generator=gen)  # as scGPT's init_weights
        for name, p in model.named_parameters():  # LayerNorms away from identity, so tests see them
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("norm.bias", "norm1.bias", "norm2.bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    state = {}
    for k, v in model.state_dict().items():
        state[k.replace("self_attn.in_proj_", "self_attn.Wqkv.")] = v.clone()

    def rand(*shape):
        return 0.05 * torch.randn(*shape, generator=gen)

    d = embsize
    # heads of the pretrained TransformerModel that the embedding path drops
    for i, (o, n) in enumerate([(d, d), (d, d), (1, d)]):
        state[f"decoder.fc.{2 * i}.weight"], state[f"decoder.fc.{2 * i}.bias"] = rand(o, n), rand(o)
    state["mvc_decoder.gene2query.weight"], state["mvc_decoder.gene2query.bias"] = rand(d, d), rand(d)
    state["mvc_decoder.W.weight"] = rand(d, d)
    for i in range(3):
        state[f"cls_decoder._decoder.{3 * i}.weight"] = rand(d, d)
        state[f"cls_decoder._decoder.{3 * i}.bias"] = rand(d)
        state[f"cls_decoder._decoder.{3 * i + 2}.weight"] = 1 + rand(d)
        state[f"cls_decoder._decoder.{3 * i + 2}.bias"] = rand(d)
    state["cls_decoder.out_layer.weight"], state["cls_decoder.out_layer.bias"] = rand(1, d), rand(1)

    args = {
        "embsize": embsize,
        "nheads": nheads,
        "d_hid": d_hid,
        "nlayers": nlayers,
        "n_layers_cls": 3,
        "dropout": 0.2,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "input_emb_style": "continuous",
        "n_bins": 51,
        "max_seq_len": 1200,
        "fast_transformer": True,
        "MVC": True,
        UNTRAINED_FLAG: True,
        "seed": int(seed),
    }
    with atomic_path(path / "args.json") as tmp:
        tmp.write_text(json.dumps(args, indent=2))
    with atomic_path(path / "vocab.json") as tmp:
        tmp.write_text(json.dumps(vocab, indent=2))
    with atomic_path(path / "best_model.pt") as tmp:
        torch.save(state, tmp)
    logger.info("wrote a tiny untrained scGPT checkpoint (%d tokens, %d-d, %d layers) to %s", len(full), d, nlayers, path)
    return path
