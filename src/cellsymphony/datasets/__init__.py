"""Built-in data: a synthetic Xenium tumour section with its H&E, and tiny model checkpoints."""

from __future__ import annotations

from ._synthetic import synthetic, synthetic_path, synthetic_reference, synthetic_xenium

__all__: list[str] = ["synthetic", "synthetic_path", "synthetic_reference", "synthetic_xenium"]
