"""Built-in data: a synthetic Xenium tumour section with its H&E, and tiny model checkpoints."""

from __future__ import annotations

from ._synthetic import synthetic, synthetic_path, synthetic_reference, synthetic_xenium
from ._synthetic_he import stain_shift, synthetic_he
from ._tiny_scgpt import tiny_scgpt_checkpoint

__all__: list[str] = ["stain_shift", "synthetic", "synthetic_he", "synthetic_path", "synthetic_reference", "synthetic_xenium", "tiny_scgpt_checkpoint"]
