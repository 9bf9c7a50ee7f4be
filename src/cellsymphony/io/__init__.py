"""Readers and writers: Xenium output folders, H&E slides, SpatialData, ``.h5mu``."""

from __future__ import annotations

__all__: list[str] = []
