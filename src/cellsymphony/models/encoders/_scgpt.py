"""An scGPT-compatible expression encoder that loads published scGPT checkpoints.

The module tree mirrors the parts of scGPT's ``TransformerModel`` that compute a cell embedding,
with identical state-dict keys:

- ``encoder`` (gene-token embedding + ``enc_norm`` LayerNorm),
- ``value_encoder`` (``linear1`` -> ReLU -> ``linear2`` -> ``norm``, input clamped at ``max_value``),
- ``transformer_encoder.layers.N`` (post-norm encoder layers: ``self_attn.in_proj_weight``,
  ``self_attn.in_proj_bias``, ``self_attn.out_proj``, ``linear1``, ``linear2``, ``norm1``, ``norm2``).

A published ``best_model.pt`` therefore loads strictly once the flash-attention names
(``self_attn.Wqkv.*``) are renamed to ``self_attn.in_proj_*`` and the heads not used for embedding
(``decoder``, ``mvc_decoder``, ``cls_decoder``, ...) are dropped. Attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention`, which picks flash / memory-efficient
kernels where the device has them, so flash-attn need not be installed.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._errors import InputFileError, InputFileNotFoundError, reading, require_dir
from ..._settings import logger

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
#: modules of the state dict that take part in the cell embedding
USED_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")
#: args.json keys that define the architecture (all needed, as in scGPT's embed_data)
REQUIRED_ARGS = ("embsize", "nheads", "d_hid", "nlayers", "pad_token", "pad_value")
#: key set to true in args.json by cs.datasets.tiny_scgpt_checkpoint
UNTRAINED_FLAG = "cellsymphony_untrained"
#: names of the flash-attention implementations -> torch.nn.MultiheadAttention names
_RENAME_RULES = (
    (re.compile(r"self_attn\._impl\.Wqkv\."), "self_attn.in_proj_"),
    (re.compile(r"self_attn\.Wqkv\."), "self_attn.in_proj_"),
    (re.compile(r"self_attn\._impl\.out_proj\."), "self_attn.out_proj."),
)


class GeneEncoder(nn.Module):
    """Gene-token embedding followed by LayerNorm (scGPT's ``GeneEncoder``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    """Per-token value -> vector: clamp at ``max_value``, Linear(1, d), ReLU, Linear(d, d), LayerNorm."""

    def __init__(self, d_model: int, max_value: float = 512):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: Tensor) -> Tensor:
        # as scGPT: clipped from above only (the <cls> value, pad_value = -2, passes unchanged)
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, computed by SDPA."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"embsize={d_model} is not divisible by nheads={nhead}.")
        self.nhead = nhead
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, attn_mask: Tensor | None, query_first_only: bool = False) -> Tensor:
        b, n, d = x.shape
        h = self.nhead
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (b, n, 3d): q | k | v, heads contiguous
        q, k, v = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (b, h, n, d/h)
        if query_first_only:
            q = q[:, :, :1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, q.shape[2], d)
        return self.out_proj(out)


class PostNormEncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (post-norm, ReLU, eval mode) with attention through SDPA."""

    def __init__(self, d_model: int, nhead: int, d_hid: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, first_only: bool = False) -> Tensor:
        """``attn_mask``: bool (batch, 1, 1, seq), True where a key takes part. ``first_only``: return
        only position 0 (the ``<cls>`` token), computed exactly as in the full layer."""
        attn = self.self_attn(x, attn_mask, query_first_only=first_only)
        if first_only:
            x = x[:, :1]
        x = self.norm1(x + attn)
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class _LayerStack(nn.Module):
    """Holds ``layers`` so that keys read ``transformer_encoder.layers.N.*`` as in scGPT."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ScGPTEncoder(nn.Module):
    """The embedding part of scGPT's ``TransformerModel`` (continuous value input, post-norm, no batch labels).

    Parameters
    ----------
    ntoken
        Vocabulary size (including ``<pad>``, ``<cls>``, ``<eoc>``).
    d_model
        ``embsize`` of args.json.
    nhead
        ``nheads``.
    d_hid
        ``d_hid`` (feed-forward width).
    nlayers
        ``nlayers``.
    pad_token_id
        Index of the padding token (the embedding's ``padding_idx``).
    max_value
        Values are clamped at this before the value encoder (512 in scGPT).

    Notes
    -----
    Attributes set by :func:`load_scgpt`: ``vocab`` (gene -> token id), ``args`` (args.json),
    ``pad_token_id``, ``cls_token_id``, ``pad_value``, ``model_dir``, ``untrained``.
    """

    def __init__(
        self,
        ntoken: int,
        d_model: int,
        nhead: int,
        d_hid: int,
        nlayers: int,
        *,
        pad_token_id: int | None = None,
        max_value: float = 512,
    ):
        super().__init__()
        self.d_model = d_model
        self.encoder = GeneEncoder(ntoken, d_model, padding_idx=pad_token_id)
        self.value_encoder = ContinuousValueEncoder(d_model, max_value=max_value)
        self.transformer_encoder = _LayerStack(
            [PostNormEncoderLayer(d_model, nhead, d_hid) for _ in range(nlayers)]
        )
        self.vocab: dict[str, int] = {}
        self.args: dict = {}
        self.pad_token_id = pad_token_id
        self.cls_token_id: int | None = None
        self.pad_value: float = 0.0
        self.model_dir = ""
        self.untrained = False

    def forward(self, genes: Tensor, values: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """Transformer output for every position, (batch, seq, d_model), as scGPT's ``_encode``.

        ``src_key_padding_mask`` is True at padding positions (torch's convention).
        """
        x, mask = self._embed(genes, values, src_key_padding_mask)
        for layer in self.transformer_encoder.layers:
            x = layer(x, mask)
        return x

    def encode_cls(self, genes: Tensor, values: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """Output at position 0 (the ``<cls>`` token), (batch, d_model); equal to ``forward(...)[:, 0]``
        but the last layer is evaluated for that position only."""
        x, mask = self._embed(genes, values, src_key_padding_mask)
        layers = self.transformer_encoder.layers
        for i, layer in enumerate(layers):
            x = layer(x, mask, first_only=i == len(layers) - 1)
        return x[:, 0]

    def _embed(self, genes: Tensor, values: Tensor, src_key_padding_mask: Tensor | None):
        x = self.encoder(genes) + self.value_encoder(values)
        mask = None  # (no .any() test here: it would synchronise a CUDA stream; pass None when unpadded)
        if src_key_padding_mask is not None:
            mask = (~src_key_padding_mask.bool())[:, None, None, :]
        return x, mask


# ---------------------------------------------------------------------------------------------
# loading published checkpoints


_SCGPT_FIX = ("A scGPT model folder holds args.json, vocab.json and best_model.pt as downloaded from the scGPT "
              "model zoo: download the folder again (or write a test folder with "
              "cs.datasets.tiny_scgpt_checkpoint).")


def _require(model_dir: Path, name: str) -> Path:
    path = model_dir / name
    if not path.is_file():
        raise InputFileNotFoundError(path, f"scGPT {name}", f"{name} not found in {model_dir}", _SCGPT_FIX)
    return path


def read_args(path: str | Path) -> dict:
    """scGPT's ``args.json`` (the architecture), checked for the keys needed to build the model."""
    with reading(path, "scGPT args.json", _SCGPT_FIX), open(path, encoding="utf-8") as f:
        args = json.load(f)
    if not isinstance(args, dict):
        raise InputFileError(path, "scGPT args.json", f"it holds a JSON {type(args).__name__}, not an object",
                             _SCGPT_FIX)
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        raise InputFileError(path, "scGPT args.json", f"it lacks the keys {missing} needed to build the scGPT model",
                             _SCGPT_FIX)
    return args


def read_checkpoint(path: str | Path) -> Mapping[str, Tensor]:
    """The state dict of scGPT's ``best_model.pt`` on the CPU (tensors only: ``weights_only=True``)."""
    with reading(path, "scGPT best_model.pt", "The file is truncated or is no torch checkpoint. " + _SCGPT_FIX):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise InputFileError(path, "scGPT best_model.pt", f"it holds a {type(state).__name__}, not a state dict",
                             _SCGPT_FIX)
    return state


def read_vocab(path: str | Path) -> dict[str, int]:
    """Read scGPT's ``vocab.json`` (token -> index, indices 0..n-1) and append ``<pad>``, ``<cls>``,
    ``<eoc>`` where missing, in that order, as ``scgpt.tasks.embed_data`` does."""
    what = "scGPT vocab.json"
    with reading(path, what, _SCGPT_FIX), open(path, encoding="utf-8") as f:
        token2idx = json.load(f)
    if not isinstance(token2idx, dict) or not token2idx:
        raise InputFileError(path, what, "it is not a scGPT vocabulary (a JSON object mapping gene symbols to "
                             "indices)", _SCGPT_FIX)  # fmt: skip
    with reading(path, what, _SCGPT_FIX, problem="its token indices are not all integers"):
        indices = sorted(int(i) for i in token2idx.values())
    if indices != list(range(len(indices))):
        raise InputFileError(path, what, f"the token indices must be 0..{len(indices) - 1} without gaps or repeats",
                             _SCGPT_FIX)
    vocab = {str(t): int(i) for t, i in token2idx.items()}
    for tok in SPECIAL_TOKENS:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab


def rename_checkpoint_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename flash-attention keys to ``torch.nn.MultiheadAttention`` names
    (``self_attn.Wqkv.weight`` -> ``self_attn.in_proj_weight``, also the ``_impl.`` variants written by
    newer scGPT code) and strip a DistributedDataParallel ``module.`` prefix."""
    keys = list(state)
    strip = bool(keys) and all(k.startswith("module.") for k in keys)
    out = {}
    for k, v in state.items():
        if strip:
            k = k[len("module.") :]
        for pattern, repl in _RENAME_RULES:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def split_unused(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Keep the tensors of the embedding path; return them and ``{dropped module: n tensors}``."""
    kept, dropped = {}, Counter()
    for k, v in state.items():
        if k.startswith(USED_PREFIXES):
            kept[k] = v
        else:
            dropped[k.split(".")[0]] += 1
    return kept, dict(dropped)


def _list_keys(keys, limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``, raising a ``ValueError`` that lists missing, unexpected and
    mis-shaped keys (instead of silently keeping random weights, as a non-strict load would)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_list_keys(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the model: {_list_keys(unexpected)}")
        if shapes:
            parts.append(f"shape (checkpoint vs args.json/vocab.json): {_list_keys(shapes)}")
        raise ValueError(
            f"The {source} does not match the architecture of args.json / vocab.json; "
            + "; ".join(parts)
            + ". Check that args.json, vocab.json and best_model.pt come from the same scGPT model."
        )
    model.load_state_dict(dict(state), strict=True)


def load_scgpt(model_dir: str | Path, *, device: str | None = None) -> ScGPTEncoder:
    """Load a scGPT model folder (``args.json``, ``vocab.json``, ``best_model.pt``) as a :class:`ScGPTEncoder`.

    Parameters
    ----------
    model_dir
        Folder of a published scGPT model (e.g. ``scGPT_human``, the whole-human model) or one written by
        :func:`cellsymphony.datasets.tiny_scgpt_checkpoint`.
    device
        Torch device to move the model to; ``None`` keeps it on the CPU.

    Returns
    -------
    The encoder in eval mode, with ``vocab``, ``args``, ``pad_token_id``, ``cls_token_id``, ``pad_value``,
    ``model_dir`` and ``untrained`` set.
    """
    model_dir = require_dir(model_dir, "the scGPT model folder", _SCGPT_FIX)
    args_path = _require(model_dir, "args.json")
    vocab_path = _require(model_dir, "vocab.json")
    weights_path = _require(model_dir, "best_model.pt")

    args = read_args(args_path)
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ValueError(
            f"{args_path}: input_emb_style={style!r}; only the 'continuous' value encoder of the published "
            "scGPT models is supported."
        )
    if args.get("n_bins", 51) != 51:
        logger.warning(
            "args.json has n_bins=%s; values are binned into 51 bins as scgpt.tasks.embed_data does.",
            args["n_bins"],
        )
    vocab = read_vocab(vocab_path)
    pad_token = args["pad_token"]
    if pad_token not in vocab:
        raise InputFileError(args_path, "scGPT args.json", f"its pad_token {pad_token!r} is not in {vocab_path}",
                             "Check that args.json and vocab.json come from the same scGPT model.")
    state = read_checkpoint(weights_path)

    state, dropped = split_unused(rename_checkpoint_keys(state))

    model = ScGPTEncoder(
        len(vocab),
        int(args["embsize"]),
        int(args["nheads"]),
        int(args["d_hid"]),
        int(args["nlayers"]),
        pad_token_id=vocab[pad_token],
    )
    load_state_strict(model, state, source=str(weights_path))
    if dropped:
        logger.info(
            "scGPT checkpoint: dropped modules not used for cell embeddings: %s",
            ", ".join(f"{k} ({n} tensors)" for k, n in sorted(dropped.items())),
        )
    model.vocab = vocab
    model.args = args
    model.cls_token_id = vocab["<cls>"]
    model.pad_value = float(args["pad_value"])
    model.model_dir = str(model_dir)
    model.untrained = bool(args.get(UNTRAINED_FLAG, False))
    if model.untrained:
        warnings.warn(
            f"The scGPT checkpoint in {model_dir} has random, untrained weights (written by "
            "cs.datasets.tiny_scgpt_checkpoint): its embeddings carry no biological meaning. Use a "
            "published scGPT model (e.g. scGPT_human) for real analyses.",
            UserWarning,
            stacklevel=2,
        )
    model.eval()
    if device is not None:
        model.to(device)
    return model
