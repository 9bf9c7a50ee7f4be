"""Morphology encoders: UNI2-h, UNI, any timm model, any ``nn.Module``, a ``tiny`` test preset.

:func:`load_morphology_encoder` turns a name (or a module) plus a weight source into a
:class:`MorphologyEncoder`, a thin wrapper that normalises RGB input and returns the prefix
(class and register) tokens and the grid of spatial (patch) tokens of any layer.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._weights import (
    file_checksum,
    find_weight_file,
    hf_cached_file,
    hub_reachable,
    load_state_dict,
    load_strict,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uni2h_kwargs() -> dict:
    import timm

    # the recipe published on the MahmoodLab/UNI2-h model card
    return {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }


def _uni_kwargs() -> dict:
    # UNI (v1), ViT-L/16, as on the MahmoodLab/uni model card
    return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}


def _tiny_kwargs() -> dict:
    # the UNI2-h family (SwiGLU, SiLU, 8 register tokens, 14 px patches) at a toy size
    kw = _uni2h_kwargs()
    kw.update(depth=2, num_heads=2, embed_dim=32)
    return kw


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder: the timm architecture and kwargs, where its weights live, and its default key."""

    name: str
    timm_name: str
    kwargs: Any  # callable returning the timm kwargs (timm is imported lazily)
    key: str
    hf_repo: str = ""
    env_var: str = ""
    needs_weights: bool = True
    description: str = ""
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    aliases: tuple = field(default_factory=tuple)


PRESETS: dict[str, EncoderSpec] = {
    "uni2-h": EncoderSpec(
        "uni2-h",
        "vit_giant_patch14_224",
        _uni2h_kwargs,
        key="X_uni2",
        hf_repo="MahmoodLab/UNI2-h",
        env_var="CELLSYMPHONY_UNI2H_WEIGHTS",
        description="UNI2-h, ViT-H/14 with 8 register tokens, 1536-d, 681M parameters (gated weights)",
        aliases=("uni2", "uni2h", "UNI2-h"),
    ),
    "uni": EncoderSpec(
        "uni",
        "vit_large_patch16_224",
        _uni_kwargs,
        key="X_uni",
        hf_repo="MahmoodLab/uni",
        env_var="CELLSYMPHONY_UNI_WEIGHTS",
        description="UNI (v1), ViT-L/16, 1024-d, 303M parameters (gated weights)",
        aliases=("uni1", "UNI"),
    ),
    "tiny": EncoderSpec(
        "tiny",
        "vit_giant_patch14_224",
        _tiny_kwargs,
        key="X_tiny",
        needs_weights=False,
        description="UNI2-h architecture family at toy size (2 blocks, 32-d), random weights, for tests",
    ),
}
NON_DEEP = {"handcrafted": "nucleus morphometrics, stain statistics and texture (scikit-image), no weights"}


def known_models() -> list[str]:
    """Names accepted by :func:`load_morphology_encoder` besides timm model names."""
    return [*PRESETS, *NON_DEEP]


def _canonical(name: str) -> str | None:
    low = name.lower()
    for key, spec in PRESETS.items():
        if low == key or low in {a.lower() for a in spec.aliases}:
            return key
    return low if low in NON_DEEP else None


def default_key(model: Any) -> str:
    """Default ``obsm`` key for a model: ``X_uni2`` for UNI2-h, ``X_<name>`` otherwise."""
    if isinstance(model, MorphologyEncoder):
        return model.key
    if isinstance(model, nn.Module):
        return f"X_{type(model).__name__.lower()}"
    canon = _canonical(str(model))
    if canon in PRESETS:
        return PRESETS[canon].key
    name = str(model).lower().replace("/", "_").replace("-", "_").replace(".", "_")
    return f"X_{name}"


def how_to_get_weights(spec: EncoderSpec) -> str:
    """The instructions shown when a gated model's weights cannot be found."""
    return (
        f"No weights found for {spec.name!r} ({spec.description}). The weights are gated on Hugging Face: "
        f"1) log in at https://huggingface.co/{spec.hf_repo} and request access (accept the licence); "
        f"2) once granted, download pytorch_model.bin from that page (or run "
        f"`huggingface-cli login` then `huggingface-cli download {spec.hf_repo} pytorch_model.bin`); "
        f"3) pass the file or its folder as weights='/path/to/pytorch_model.bin', or set the environment "
        f"variable {spec.env_var}=/path/to/pytorch_model.bin. An already-downloaded Hugging Face cache is "
        f"found automatically. For a quick run without weights use model='tiny' (untrained) or "
        f"model='handcrafted'; weights='random' builds the full architecture with random weights (timing only)."
    )


def resolve_weights(spec: EncoderSpec, weights: str | os.PathLike | None) -> tuple[Path | None, str]:
    """Find the checkpoint of a preset: ``weights`` path, env var, HF cache, hub. Returns (path, origin)."""
    if weights is not None and str(weights) != "random":
        return find_weight_file(weights, source="weights"), "weights argument"
    if weights is not None:
        return None, "random"
    if spec.env_var and os.environ.get(spec.env_var):
        return find_weight_file(os.environ[spec.env_var], source=f"${spec.env_var}"), f"${spec.env_var}"
    if not spec.needs_weights:
        return None, "random"
    if spec.hf_repo:
        path = hf_cached_file(spec.hf_repo, allow_download=True)
        if path is not None:
            return path, f"Hugging Face {spec.hf_repo}"
    raise ValueError(how_to_get_weights(spec))


class MorphologyEncoder(nn.Module):
    """An image encoder with the token interface used by :func:`cellsymphony.pp.embed_morphology`.

    Input: a uint8 or float batch, either ``(B, H, W, 3)`` or ``(B, 3, H, W)``; uint8 / values above
    1 are scaled to [0, 1], then normalised with ``mean`` / ``std``.

    Attributes
    ----------
    name
        Registry name (``"uni2-h"``, ``"tiny"``, a timm name, or the wrapped module's class name).
    embed_dim
        Feature dimension of each token.
    patch_size
        Input pixels per token along each axis (the token stride).
    num_prefix_tokens
        Class + register tokens before the spatial ones (9 for UNI2-h, 1 for UNI, 0 for a CNN).
    img_size
        The native input size (224 for UNI / UNI2-h).
    weights_checksum
        ``sha256:...`` of the loaded checkpoint, or ``"random"`` / ``"timm-pretrained"`` / ``"module"``.
    key
        Default ``obsm`` key of its embeddings.
    kind
        ``"tokens"``: the encoder kind :func:`cellsymphony.pp.embed_morphology` pools tokens from
        (``forward_tokens``); see :data:`cellsymphony.models.encoders.ENCODER_KINDS`.
    """

    kind = "tokens"

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        embed_dim: int,
        patch_size: int | None,
        num_prefix_tokens: int,
        img_size: int = 224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_checksum: str = "random",
        weights_path: str = "",
        key: str | None = None,
        untrained: bool = False,
    ):
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.patch_size = patch_size
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.img_size = int(img_size)
        self.weights_checksum = weights_checksum
        self.weights_path = weights_path
        self.key = key or default_key(name)
        self.untrained = untrained
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def __repr__(self) -> str:
        return (
            f"MorphologyEncoder({self.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, weights={self.weights_checksum[:19]})"
        )

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks (1 for models without a ``blocks`` list)."""
        blocks = getattr(self.model, "blocks", None)
        return len(blocks) if blocks is not None else 1

    def grid(self, size: int) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` for a square ``size`` px input."""
        if self.patch_size:
            return size // self.patch_size, size // self.patch_size
        with torch.inference_mode():
            _, toks = self.forward_tokens(torch.zeros(1, 3, size, size, device=self.mean.device))
        return tuple(toks.shape[1:3])

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 / [0, 1] RGB (channels last or first) -> normalised float ``(B, 3, H, W)``."""
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (B, H, W, 3) or (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.to(self.mean.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        else:  # floats: [0, 1] as they are, 0..255 (any value above 1) scaled, as documented
            x = x.float()
            if x.numel() and bool(x.amax() > 1.0):
                x = x / 255.0
        return (x - self.mean) / self.std

    def forward_tokens(self, x: torch.Tensor, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix tokens ``(B, P, D)`` and spatial token grid ``(B, rows, cols, D)`` of block ``layer``.

        ``layer=-1`` is the model's final (normed) output, as its default features; another index is
        that block's output.
        """
        x = self.normalise(x)
        m = self.model
        n_blocks = self.n_layers
        if layer < 0:
            layer += n_blocks
        if not 0 <= layer < n_blocks:
            raise ValueError(f"layer must be in [-{n_blocks}, {n_blocks - 1}] for {self.name!r}, got {layer}.")
        if layer == n_blocks - 1:
            out = m.forward_features(x) if hasattr(m, "forward_features") else m(x)
        else:
            if not (hasattr(m, "blocks") and hasattr(m, "_pos_embed")):
                raise ValueError(f"layer={layer}: intermediate layers need a timm VisionTransformer.")
            out = m.patch_embed(x)
            out = m._pos_embed(out)
            out = m.patch_drop(out)
            out = m.norm_pre(out)
            for blk in m.blocks[: layer + 1]:
                out = blk(out)
        return self._split(out, x.shape[-2:])

    def _split(self, out: torch.Tensor, hw) -> tuple[torch.Tensor, torch.Tensor]:
        if out.ndim == 4:  # (B, C, h, w) feature map of a CNN
            b = out.shape[0]
            return out.new_zeros(b, 0, out.shape[1]), out.permute(0, 2, 3, 1)
        if out.ndim == 3:
            p = self.num_prefix_tokens
            prefix, spatial = out[:, :p], out[:, p:]
            n = spatial.shape[1]
            if self.patch_size:
                rows, cols = hw[0] // self.patch_size, hw[1] // self.patch_size
            else:
                rows = cols = int(round(n**0.5))
            if rows * cols != n:
                raise ValueError(
                    f"{self.name!r} returned {n} spatial tokens, not a {rows} x {cols} grid: check "
                    "num_prefix_tokens / patch_size of the module."
                )
            return prefix, spatial.reshape(out.shape[0], rows, cols, out.shape[-1])
        if out.ndim == 2:  # only a global feature
            return out[:, None, :], out.new_zeros(out.shape[0], 0, 0, out.shape[1])
        raise ValueError(f"{self.name!r} returned an output of shape {tuple(out.shape)}; expected 2, 3 or 4 dims.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The global (class token, else mean token) feature ``(B, D)``."""
        prefix, spatial = self.forward_tokens(x)
        if prefix.shape[1]:
            return prefix[:, 0]
        return spatial.mean(dim=(1, 2))


def _seeded(fn, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _from_timm(model: nn.Module, name: str, **kw) -> MorphologyEncoder:
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(ps, tuple | list):
        ps = int(ps[0])
    return MorphologyEncoder(
        model,
        name=name,
        embed_dim=int(getattr(model, "embed_dim", getattr(model, "num_features", 0))),
        patch_size=ps,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        **kw,
    )


def wrap_module(module: nn.Module, *, name: str | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> MorphologyEncoder:
    """Wrap a user's ``nn.Module`` (see :func:`load_morphology_encoder` for the contract)."""
    if isinstance(module, MorphologyEncoder):
        return module
    name = name or type(module).__name__
    ps = getattr(module, "patch_size", None)
    pe = getattr(module, "patch_embed", None)
    if ps is None and pe is not None:
        ps = getattr(pe, "patch_size", None)
    if isinstance(ps, tuple | list):
        ps = int(ps[0])
    dim = getattr(module, "embed_dim", None) or getattr(module, "num_features", None)
    size = getattr(module, "img_size", 224)
    if isinstance(size, tuple | list):
        size = size[0]
    mean = getattr(module, "mean", mean)
    std = getattr(module, "std", std)
    if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
        mean, std = tuple(torch.as_tensor(mean).flatten().tolist()), tuple(torch.as_tensor(std).flatten().tolist())
    enc = MorphologyEncoder(
        module,
        name=name,
        embed_dim=int(dim or 0),
        patch_size=ps,
        num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
        img_size=int(size),
        mean=mean,
        std=std,
        weights_checksum="module",
        key=default_key(module),
    )
    if not enc.embed_dim:
        with torch.inference_mode():
            prefix, spatial = enc.forward_tokens(torch.zeros(1, 3, enc.img_size, enc.img_size))
        enc.embed_dim = int(spatial.shape[-1] if spatial.numel() or spatial.shape[-1] else prefix.shape[-1])
    return enc


def _timm_pretrained(model: str) -> nn.Module:
    """timm's pretrained weights from the local Hugging Face cache, else the hub when it is reachable."""
    import huggingface_hub.constants as hc
    import timm

    errors = []
    for offline in (True, False):
        if not offline and not hub_reachable():
            errors.append("the Hugging Face hub is not reachable")
            break
        saved = hc.HF_HUB_OFFLINE
        hc.HF_HUB_OFFLINE = offline
        try:
            return timm.create_model(model, pretrained=True, num_classes=0)
        except Exception as err:  # noqa: BLE001 - not cached / offline / no pretrained tag
            errors.append(f"{type(err).__name__}: {str(err)[:200]}")
        finally:
            hc.HF_HUB_OFFLINE = saved
    raise ValueError(
        f"Could not get timm's pretrained weights for {model!r} ({'; '.join(errors)}). "
        "Pass weights='/path/to/checkpoint' (pytorch_model.bin or .safetensors), or weights='random'."
    )


def load_morphology_encoder(
    model: str | nn.Module = "uni2-h",
    *,
    weights: str | os.PathLike | None = None,
    device: str | None = None,
) -> MorphologyEncoder:
    """Build a morphology encoder and load its weights.

    Parameters
    ----------
    model
        ``"uni2-h"`` (UNI2-h, built with timm from the published recipe), ``"uni"`` (UNI v1, ViT-L/16),
        ``"tiny"`` (the UNI2-h family at toy size, random weights, for tests and demos; its features are
        untrained), any timm model name, or an ``nn.Module``. A module's contract: it takes a normalised
        float batch ``(B, 3, H, W)`` and ``forward_features`` (or ``forward``) returns tokens ``(B, N, D)``
        (with attribute ``num_prefix_tokens`` counting leading class/register tokens, default 0, and the
        rest a square grid; ``patch_size`` gives the token stride in pixels), a feature map
        ``(B, D, h, w)``, or a global feature ``(B, D)`` (then only ``pool="cls"`` is possible). Optional
        attributes ``mean`` / ``std`` (tuples) replace the ImageNet normalisation.
        ``"handcrafted"`` is not a torch model: use it through :func:`cellsymphony.pp.embed_morphology`.
    weights
        A checkpoint file (``pytorch_model.bin`` state dict or ``*.safetensors``) or a folder holding one.
        ``None``: for ``uni2-h`` / ``uni`` the environment variable ``CELLSYMPHONY_UNI2H_WEIGHTS`` /
        ``CELLSYMPHONY_UNI_WEIGHTS``, then the local Hugging Face cache, then the hub (with a token);
        for a timm name, timm's pretrained weights. ``"random"`` builds the architecture with random
        weights (for timing). Weights are loaded strictly.
    device
        Torch device; ``None`` leaves the model on the CPU.

    Returns
    -------
    The :class:`MorphologyEncoder`, in eval mode.
    """
    if isinstance(model, nn.Module):
        enc = wrap_module(model)
        if weights is not None and str(weights) != "random":
            path = find_weight_file(weights)
            load_strict(enc.model, load_state_dict(path), source=str(path))
            enc.weights_checksum, enc.weights_path = file_checksum(path), str(path)
        return enc.to(device) if device else enc
    if not isinstance(model, str):
        raise ValueError(f"model must be a name or an nn.Module, got {type(model).__name__}.")
    import timm

    canon = _canonical(model)
    if canon in NON_DEEP:
        raise ValueError(f"model={model!r} has no torch encoder; use it through cs.pp.embed_morphology.")
    if canon in PRESETS:
        spec = PRESETS[canon]
        path, origin = resolve_weights(spec, weights)
        net = _seeded(lambda: timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs()))
        untrained = path is None
        checksum = "random"
        if path is not None:
            load_strict(net, load_state_dict(path), source=f"{path} ({origin})")
            checksum = file_checksum(path)
        if untrained:
            warnings.warn(
                f"morphology encoder {spec.name!r} has random weights: its features are untrained "
                "(fine for tests and timing, meaningless for biology).",
                UserWarning,
                stacklevel=2,
            )
        enc = _from_timm(
            net, spec.name, img_size=224, mean=spec.mean, std=spec.std, weights_checksum=checksum,
            weights_path=str(path or ""), key=spec.key, untrained=untrained,
        )
        return enc.to(device) if device else enc
    if not timm.is_model(model):
        raise ValueError(
            f"Unknown morphology model {model!r}. Known names: {known_models()}; or any timm model name "
            "(timm.list_models()), or an nn.Module."
        )
    if weights is None:
        net = _timm_pretrained(model)
        checksum = "timm-pretrained"
        path = None
    else:
        net = _seeded(lambda: timm.create_model(model, pretrained=False, num_classes=0))
        path = None if str(weights) == "random" else find_weight_file(weights)
        checksum = "random"
        if path is not None:
            load_strict(net, load_state_dict(path), source=str(path))
            checksum = file_checksum(path)
        else:
            warnings.warn(f"morphology encoder {model!r} has random weights: its features are untrained.", UserWarning, stacklevel=2)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    enc = _from_timm(
        net, model, img_size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
        weights_checksum=checksum, weights_path=str(path or ""), key=default_key(model), untrained=path is None and checksum == "random",
    )
    return enc.to(device) if device else enc
