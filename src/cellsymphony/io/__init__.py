"""Readers and writers: Xenium output folders, H&E slides, SpatialData, ``.h5mu``."""

from __future__ import annotations

from ._concat import concat
from ._from_spatialdata import from_spatialdata
from ._he import HEImage
from ._read_he import read_he
from ._read_he_cells import read_he_cells
from ._read_xenium import read_xenium
from ._register_he import Registration, register_he
from ._to_spatialdata import to_spatialdata
from ._write import write
from ._xenium_explorer import write_xenium_explorer

__all__: list[str] = [
    "HEImage",
    "Registration",
    "concat",
    "from_spatialdata",
    "read_he",
    "read_he_cells",
    "read_xenium",
    "register_he",
    "to_spatialdata",
    "write",
    "write_xenium_explorer",
]
