"""``cs.io.read_he``: open an H&E slide lazily."""

from __future__ import annotations

import os

from ._he import HEImage


def read_he(path: str | os.PathLike, *, mpp: float | None = None, cache_tiles: int = 256) -> HEImage:
    """Open a whole-slide H&E image lazily, without loading it into memory.

    Reads pyramidal OME-TIFF (interleaved ``YXS`` or planar ``CYX`` pixels), Aperio SVS (the slide pyramid;
    thumbnail, label and macro images are ignored) and plain tiled TIFF (with or without a pyramid in
    SubIFDs or further pages). Tiles are decoded only when a region needs them.

    Parameters
    ----------
    path
        The image file.
    mpp
        Micrometres per pixel at full resolution. Overrides the file's own record (OME ``PhysicalSizeX``,
        Aperio ``MPP``, TIFF resolution tags); required when the file records none.
    cache_tiles
        How many decoded tiles to keep in memory (least recently used are dropped first; 0 keeps none).

    Returns
    -------
    An :class:`~cellsymphony.io.HEImage` with ``.mpp``, ``.n_levels``, ``.shapes`` ``(height, width)`` per
    level, ``.downsamples``, ``.level_mpp(level)``, ``.best_level(mpp)``, ``.tile_shape(level)``,
    ``.read_region(x, y, width, height, level=0)`` (uint8 RGB, white outside the image), the counter
    ``.tiles_decoded`` and ``.close()``; usable as a context manager.

    Examples
    --------
    >>> import cellsymphony as cs
    >>> with cs.io.read_he("slide.svs") as he:  # doctest: +SKIP
    ...     patch = he.read_region(1000, 2000, 224, 224, level=he.best_level(0.5))
    """
    return HEImage(path, mpp=mpp, cache_tiles=cache_tiles)
