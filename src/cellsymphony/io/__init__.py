"""Readers and writers: Xenium output folders, H&E slides, SpatialData, ``.h5mu``."""

from __future__ import annotations

from ._he import HEImage
from ._read_he import read_he

__all__: list[str] = ["HEImage", "read_he"]
