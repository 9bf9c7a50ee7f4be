"""Built-in data: a synthetic Xenium tumour section with its H&E, and tiny model checkpoints."""

from __future__ import annotations

__all__: list[str] = []
