"""Finding and loading morphology-encoder weights: local file or folder, environment variable,
an already-populated Hugging Face cache, or the hub when online; strict loading."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..._errors import InputFileError, InputFileNotFoundError, reading

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.safetensors")

_CHECKSUMS: dict[tuple[str, int, int], str] = {}


def find_weight_file(path: str | os.PathLike, *, source: str = "weights") -> Path:
    """The checkpoint file named by ``path``: the file itself, or the one checkpoint in a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.pth"))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(
                f"{source}: the folder {p} holds several checkpoints ({[f.name for f in found]}); "
                "pass the path of one file."
            )
        raise ValueError(
            f"{source}: the folder {p} holds no checkpoint (looked for {', '.join(WEIGHT_FILES)}, "
            "*.safetensors, *.bin, *.pth)."
        )
    raise InputFileNotFoundError(p, f"the {source} checkpoint", "it does not exist",
                                 "Check the path of the weights.")


def file_checksum(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file (memoised by path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKSUMS:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _CHECKSUMS[key] = "sha256:" + h.hexdigest()
    return _CHECKSUMS[key]


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a checkpoint (``pytorch_model.bin`` state dict, or safetensors) onto the CPU."""
    p = Path(path)
    fix = "The file is truncated or damaged: download the weights again."
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        with reading(p, "the safetensors checkpoint", fix):
            return load_file(str(p), device="cpu")
    import torch

    with reading(p, "the checkpoint", "It is no torch state dict, or " + fix[0].lower() + fix[1:]):
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    # some trainers save {"state_dict": ...} or {"model": ...}
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise InputFileError(p, "the checkpoint", f"it holds a {type(sd).__name__}, not a state dict",
                             "Pass the checkpoint of the encoder's weights (pytorch_model.bin or *.safetensors).")
    return sd


def _strip_prefix(sd: dict, expected: set[str]) -> dict:
    """Drop a ``module.`` / ``model.`` prefix that wraps every key, when that makes the keys fit."""
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if sd and all(k.startswith(prefix) for k in sd):
            stripped = {k[len(prefix) :]: v for k, v in sd.items()}
            if len(set(stripped) & expected) > len(set(sd) & expected):
                return stripped
    return sd


def load_strict(module, sd: dict, *, source: str) -> None:
    """Load ``sd`` into ``module`` strictly; on any mismatch raise a ``ValueError`` listing the keys."""
    own = module.state_dict()
    sd = _strip_prefix(sd, set(own))
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:

        def show(keys):
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {show(shapes)}")
        raise ValueError(
            f"The weights in {source} do not fit the architecture: " + "; ".join(parts) + ". "
            "Check that the checkpoint belongs to this model (UNI2-h and UNI are different architectures)."
        )
    module.load_state_dict(sd, strict=True)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (a fast check, so offline runs fail at once
    instead of after the hub client's retries)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def hf_cached_file(repo_id: str, *, allow_download: bool) -> Path | None:
    """A checkpoint of ``repo_id`` from the local Hugging Face cache (or the hub when allowed), else None.

    Any failure (not cached, offline, gated without a token, hub library missing) gives None; the
    caller then explains how to get the weights.
    """
    try:
        from huggingface_hub import get_token, hf_hub_download
    except ImportError:
        return None
    # the MahmoodLab models are gated: a download needs a token of an account granted access, so
    # without one we do not spend the hub client's retries on a request that must fail
    online = allow_download and get_token() is not None and hub_reachable()
    modes = [True, False] if online else [True]
    for local_only in modes:
        for filename in WEIGHT_FILES[:2]:
            try:
                return Path(hf_hub_download(repo_id, filename=filename, local_files_only=local_only))
            except Exception:  # noqa: BLE001 - not cached / offline / gated / absent file
                continue
    return None
