"""Lazy access to whole-slide H&E images: pyramidal OME-TIFF, Aperio SVS, plain tiled TIFF."""

from __future__ import annotations

import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InputFileError, InputFileNotFoundError, reading

# series that are not the slide itself
_SKIP_SERIES = ("thumbnail", "label", "macro", "overview")
# micrometres per unit, by OME length unit symbol
_OME_UNITS = {
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
    "pm": 1e-6,
}
# micrometres per TIFF ResolutionUnit (2 = inch, 3 = centimetre; 1 = none)
_TIFF_UNITS = {2: 25400.0, 3: 10000.0}


class HEImage:
    """A whole-slide H&E image opened lazily; regions are decoded tile by tile.

    Create it with :func:`cellsymphony.io.read_he`. Coordinates are pixels ``(x, y)`` with x to the right
    and y down; level 0 is the finest pyramid level.

    Attributes
    ----------
    path
        The image file.
    mpp
        Micrometres per pixel at level 0.
    n_levels
        Number of pyramid levels.
    shapes
        ``(height, width)`` of each level, level 0 first.
    downsamples
        Size of one pixel of each level in level-0 pixels (1.0 for level 0).
    tiles_decoded
        How many tiles have been decoded from the file so far (cache misses of :meth:`read_region`).
    """

    def __init__(self, path: str | os.PathLike, *, mpp: float | None = None, cache_tiles: int = 256) -> None:
        self.path = Path(path)
        self._mpp_arg = mpp
        self.cache_tiles = int(cache_tiles)
        if self.cache_tiles < 0:
            raise ValueError(f"cache_tiles must be >= 0, got {cache_tiles}.")
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self.tiles_decoded = 0
        self._tif = None
        self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        import tifffile
        import zarr

        path = self.path
        if not path.exists():
            raise InputFileNotFoundError(path, "H&E image", "it does not exist", "Check the path (he_image=).")
        if path.is_dir():
            raise InputFileError(path, "H&E image", "it is a folder, not a file",
                                 "Pass the image file (.ome.tif, .svs or .tif).")
        # tifffile raises several error types for damaged or foreign files
        with reading(path, "H&E image", "cs.io.read_he reads pyramidal OME-TIFF, Aperio SVS and tiled TIFF files; "
                     "check that the file is complete and in one of these formats."):  # fmt: skip
            tif = tifffile.TiffFile(path)
        self._tif = tif
        try:
            levels = self._pick_levels(tif)
            self._arrays = []
            self._layouts = []
            for series, index in levels:
                arr = zarr.open(series.aszarr(level=index), mode="r")
                lay = _layout(series.levels[index].axes, arr.shape, path)
                lay["tile"] = (int(arr.chunks[lay["y"]]), int(arr.chunks[lay["x"]]))
                lay["page"] = _direct_page(series.levels[index], lay)
                self._arrays.append(arr)
                self._layouts.append(lay)
            self.shapes = [(lay["shape"][0], lay["shape"][1]) for lay in self._layouts]
            # keep levels in order finest -> coarsest
            order = sorted(range(len(self.shapes)), key=lambda i: -self.shapes[i][0] * self.shapes[i][1])
            self._arrays = [self._arrays[i] for i in order]
            self._layouts = [self._layouts[i] for i in order]
            self.shapes = [self.shapes[i] for i in order]
            h0, w0 = self.shapes[0]
            self.downsamples = [float((h0 / h + w0 / w) / 2.0) for h, w in self.shapes]
            self.mpp = self._find_mpp(tif, self._mpp_arg)
            # decode one tile of the coarsest level so that a damaged file fails now, not mid-analysis
            self._tile(self.n_levels - 1, 0, 0)
        except Exception:
            self.close()
            raise
        finally:
            self._cache.clear()
            self.tiles_decoded = 0

    def _pick_levels(self, tif) -> list:
        if not len(tif.series):
            raise ValueError(
                f"Cannot read H&E image {str(self.path)!r}: the file holds no image (it may be truncated or "
                "damaged); copy it again."
            )
        series = [s for s in tif.series if not any(k in (s.name or "").lower() for k in _SKIP_SERIES)]
        series = [s for s in series if _is_image_series(s)]
        if not series:
            raise ValueError(
                f"H&E image {str(self.path)!r} holds no 2-D image series (only "
                f"{[s.name for s in tif.series]}); pass the slide image itself."
            )
        main = max(series, key=lambda s: _yx_area(s))
        levels = [(main, i) for i in range(len(main.levels))]
        if len(levels) == 1 and len(series) > 1:
            # a pyramid stored as separate pages (no SubIFDs): gather smaller images of the same kind
            ref = _layout(main.axes, main.shape, self.path)
            for s in series:
                if s is main or s.dtype != main.dtype:
                    continue
                try:
                    lay = _layout(s.axes, s.shape, self.path)
                except ValueError:
                    continue
                h, w = lay["shape"]
                H, W = ref["shape"]
                if (
                    lay["n_channels"] == ref["n_channels"]
                    and h < H
                    and w < W
                    and abs(H / h - W / w) / (W / w) < 0.05
                ):
                    levels.append((s, 0))
        return levels

    def _find_mpp(self, tif, mpp: float | None) -> float:
        if mpp is not None:
            mpp = float(mpp)
            if not (mpp > 0 and math.isfinite(mpp)):
                raise ValueError(f"mpp must be a positive number of micrometres per pixel, got {mpp}.")
            return mpp
        page = tif.pages[0]
        found = None
        if tif.is_svs:
            found = _svs_mpp(page.description)
        if found is None and tif.is_ome:
            found = _ome_mpp(tif.ome_metadata, self.shapes[0])
        if found is None:
            found = _tiff_mpp(page)
        if found is None:
            raise ValueError(
                f"H&E image {str(self.path)!r} records no pixel size (no OME PhysicalSizeX, no Aperio MPP, no TIFF "
                "resolution tags). Pass it: cs.io.read_he(path, mpp=...) (micrometres per pixel at full resolution, "
                "e.g. 0.25 for a 40x scan)."
            )
        return found

    # ------------------------------------------------------------------ properties
    @property
    def n_levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.shapes)

    @property
    def dtype(self) -> np.dtype:
        """Data type stored in the file (regions are always returned as uint8)."""
        return self._arrays[0].dtype

    def level_mpp(self, level: int) -> float:
        """Micrometres per pixel of a pyramid level."""
        self._check_level(level)
        return self.mpp * self.downsamples[level]

    def best_level(self, mpp: float) -> int:
        """The coarsest level whose pixels are at or finer than ``mpp`` micrometres (level 0 if none is)."""
        best = 0
        for i in range(self.n_levels):
            if self.level_mpp(i) <= float(mpp) * (1 + 1e-3):
                best = i
        return best

    def tile_shape(self, level: int = 0) -> tuple[int, int]:
        """``(height, width)`` of the tiles (or strips) stored at a level."""
        self._check_level(level)
        return self._layouts[level]["tile"]

    def _check_level(self, level: int) -> None:
        if not isinstance(level, int | np.integer) or not 0 <= level < self.n_levels:
            raise ValueError(
                f"level must be an integer in [0, {self.n_levels - 1}] for {self.path.name}, got {level}."
            )

    # ------------------------------------------------------------------ reading
    def _tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        key = (level, ty, tx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            lay = self._layouts[level]
            th, tw = lay["tile"]
            h, w = lay["shape"]
            ys = slice(ty * th, min((ty + 1) * th, h))
            xs = slice(tx * tw, min((tx + 1) * tw, w))
            index = list(lay["fixed"])
            index[lay["y"]] = ys
            index[lay["x"]] = xs
            if lay["c"] is not None:
                index[lay["c"]] = slice(None)
            try:
                page = lay["page"]
                if page is not None:
                    raw = _decode_tile(page, ty, tx, ys, xs)
                    lay = _PAGE_LAYOUT
                else:
                    raw = np.asarray(self._arrays[level][tuple(index)])
            except Exception as err:
                raise ValueError(
                    f"Cannot decode a tile of H&E image {str(self.path)!r} (level {level}, tile row {ty}, column "
                    f"{tx}): {type(err).__name__}: {err}. The file may be truncated or damaged."
                ) from None
            tile = _to_rgb8(raw, lay)
            self.tiles_decoded += 1
            if self.cache_tiles > 0:
                self._cache[key] = tile
                while len(self._cache) > self.cache_tiles:
                    self._cache.popitem(last=False)
            return tile

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Read a rectangle of a pyramid level as RGB.

        Parameters
        ----------
        x, y
            Top-left corner in pixels of ``level`` (may be negative or beyond the image).
        width, height
            Size in pixels of ``level``.
        level
            Pyramid level (0 is the finest).

        Returns
        -------
        uint8 array ``(height, width, 3)``; pixels outside the image are white (255). Only the tiles that
        overlap the rectangle are decoded (and kept in an LRU cache).
        """
        self._check_level(level)
        x, y, width, height = int(x), int(y), int(width), int(height)
        if width < 0 or height < 0:
            raise ValueError(f"width and height must be >= 0, got {width} x {height}.")
        h, w = self.shapes[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, w), min(y + height, h)
        inside = (x0, y0, x1, y1) == (x, y, x + width, y + height)  # the tiles below write every pixel
        out = np.empty((height, width, 3), dtype=np.uint8) if inside else np.full((height, width, 3), 255, dtype=np.uint8)
        if x0 >= x1 or y0 >= y1:
            return out
        th, tw = self._layouts[level]["tile"]
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, ty, tx)
                # overlap of the tile with the requested rectangle, in level pixels
                oy0, oy1 = max(y0, ty * th), min(y1, ty * th + tile.shape[0])
                ox0, ox1 = max(x0, tx * tw), min(x1, tx * tw + tile.shape[1])
                out[oy0 - y : oy1 - y, ox0 - x : ox1 - x] = tile[
                    oy0 - ty * th : oy1 - ty * th, ox0 - tx * tw : ox1 - tx * tw
                ]
        return out

    def forget_tiles(self, keys) -> None:
        """Drop these decoded tiles ``(level, row, column)`` from memory (a reader that knows it is done with them)."""
        with self._lock:
            for key in keys:
                self._cache.pop(tuple(key), None)

    def clear_cache(self) -> None:
        """Drop the decoded tiles kept in memory."""
        with self._lock:
            self._cache.clear()

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Close the file (a closed image cannot read regions)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._cache.clear()

    def __enter__(self) -> HEImage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # file handles cannot be pickled: a copy (e.g. in a DataLoader worker) reopens the file
        return {"path": str(self.path), "mpp": self.mpp, "cache_tiles": self.cache_tiles}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], mpp=state["mpp"], cache_tiles=state["cache_tiles"])

    def __repr__(self) -> str:
        levels = ", ".join(f"{w}x{h}" for h, w in self.shapes)
        return f"HEImage({self.path.name!r}, mpp={self.mpp:.4g}, levels=[{levels}])"


# ---------------------------------------------------------------------- helpers
def _is_image_series(s) -> bool:
    axes = s.axes
    return "Y" in axes and "X" in axes


def _yx_area(s) -> int:
    return int(s.shape[s.axes.index("Y")]) * int(s.shape[s.axes.index("X")])


def _layout(axes: str, shape: tuple, path: Path) -> dict:
    """Where the y, x and channel axes are, and the index for every other (length-1) axis."""
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ValueError(f"H&E image {str(path)!r}: axes {axes!r} do not match shape {shape}.")
    iy, ix = axes.index("Y"), axes.index("X")
    ic = None
    for name in ("S", "C"):
        if name in axes and shape[axes.index(name)] > 1:
            ic = axes.index(name)
            break
    fixed: list[Any] = []
    for i, (a, n) in enumerate(zip(axes, shape, strict=True)):
        if i in (iy, ix, ic):
            fixed.append(slice(None))
        elif n == 1 or a in ("S", "C"):
            fixed.append(0)
        else:
            raise ValueError(
                f"H&E image {str(path)!r} has axes {axes!r} with shape {shape}: an extra axis {a!r} of length {n}. "
                "cs.io.read_he expects one RGB (or grey) plane; pass a file holding the H&E slide only."
            )
    n_channels = shape[ic] if ic is not None else 1
    if n_channels not in (1, 3, 4):
        raise ValueError(
            f"H&E image {str(path)!r} has {n_channels} channels (axes {axes!r}, shape {shape}); an H&E image "
            "has 3 (RGB) or 4 (RGBA)."
        )
    return {
        "y": iy,
        "x": ix,
        "c": ic,
        "fixed": fixed,
        "shape": (int(shape[iy]), int(shape[ix])),
        "n_channels": int(n_channels),
        "tile": None,
    }


#: the axes of a tile decoded straight from its page (:func:`_decode_tile`): y, x, samples
_PAGE_LAYOUT = {"y": 0, "x": 1, "c": 2}


def _direct_page(level, lay: dict):
    """The TIFF page whose tiles :func:`_decode_tile` decodes straight from the file for this level, or ``None``
    (the level goes through tifffile's zarr store): one tiled page, samples interleaved, tiles of the level's
    chunk shape and no extra axis. Decoding a tile straight is the same codec call without the zarr store's
    asynchronous round trip per chunk (about 0.65x the time per 512 px JPEG tile)."""
    import tifffile

    pages = level.pages
    page = pages[0] if len(pages) == 1 else None
    if not isinstance(page, tifffile.TiffPage) or not page.is_tiled or page.tiledepth != 1 or page.parent.is_ndpi:
        return None  # (NDPI's JPEG "tiles" are cut from one stream by tifffile's own reader)
    contig = page.samplesperpixel == 1 or page.planarconfig == tifffile.PLANARCONFIG.CONTIG
    axes = level.axes.upper()
    if not contig or axes not in ("YX", "YXS") or lay["tile"] != (page.tilelength, page.tilewidth):
        return None
    if tuple(level.shape[:2]) != (page.imagelength, page.imagewidth):
        return None
    return page


def _decode_tile(page, ty: int, tx: int, ys: slice, xs: slice) -> np.ndarray:
    """Tile ``(ty, tx)`` of a :func:`_direct_page` page, ``(h, w, samples)`` cropped to the image (rows ``ys``,
    columns ``xs`` of the level); an empty tile (no bytes in the file) is zeros, as tifffile's store fills it."""
    across = -(-page.imagewidth // page.tilewidth)
    i = ty * across + tx
    h, w = ys.stop - ys.start, xs.stop - xs.start
    offset, count = page.dataoffsets[i], page.databytecounts[i]
    if not count:
        return np.zeros((h, w, page.samplesperpixel), dtype=page.dtype)
    fh = page.parent.filehandle
    with fh.lock:
        fh.seek(offset)
        data = fh.read(count)
    tile, _, _ = page.decode(data, i, jpegtables=page.jpegtables)
    return tile.reshape(page.tilelength, page.tilewidth, -1)[:h, :w]


def _to_rgb8(raw: np.ndarray, lay: dict) -> np.ndarray:
    """Bring a decoded block to (h, w, 3) uint8."""
    # after indexing, the remaining axes keep their relative order: y, x and perhaps c
    kept = sorted(i for i in (lay["y"], lay["x"], lay["c"]) if i is not None)
    names = ["y" if i == lay["y"] else "x" if i == lay["x"] else "c" for i in kept]
    if "c" in names:
        raw = np.moveaxis(raw, names.index("c"), -1)
        names.remove("c")
        names.append("c")
    if names[:2] == ["x", "y"]:
        raw = np.swapaxes(raw, 0, 1)
    if raw.ndim == 2:
        raw = raw[..., None]
    if raw.shape[-1] == 1:
        raw = np.repeat(raw, 3, axis=-1)
    elif raw.shape[-1] == 4:
        raw = raw[..., :3]
    if raw.dtype != np.uint8:
        raw = _scale_to_uint8(raw)
    return np.ascontiguousarray(raw)


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        return (a.astype(np.uint8)) * 255
    if np.issubdtype(a.dtype, np.integer):
        top = float(np.iinfo(a.dtype).max)
        return np.clip(np.round(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    a = a.astype(np.float64)
    scale = 255.0 if np.nanmax(a, initial=0) <= 1.0 else 1.0
    return np.clip(np.round(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)


def _svs_mpp(description: str | None) -> float | None:
    """The ``MPP = 0.499`` field of an Aperio ImageDescription."""
    if not description:
        return None
    m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if m is None:
        return None
    try:
        v = float(m.group(1))
    except ValueError:
        return None
    return v if v > 0 and math.isfinite(v) else None


def _ome_mpp(xml: str | None, shape: tuple[int, int] | None = None) -> float | None:
    """PhysicalSizeX in micrometres of the OME Pixels element of the slide: the one whose ``SizeY x SizeX`` is
    ``shape`` (level 0), else the first one (a file may list a macro or label image before the slide)."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib]
    if not pixels:
        return None
    el = pixels[0]
    if shape is not None:
        size = (str(shape[0]), str(shape[1]))
        el = next((p for p in pixels if (p.attrib.get("SizeY"), p.attrib.get("SizeX")) == size), el)
    try:
        v = float(el.attrib["PhysicalSizeX"])
    except ValueError:
        return None
    factor = _OME_UNITS.get(el.attrib.get("PhysicalSizeXUnit", "µm"))
    if factor is None or not (v > 0 and math.isfinite(v)):
        return None
    return v * factor


def _tiff_mpp(page) -> float | None:
    """Pixel size from the XResolution / ResolutionUnit tags (None when absent or a meaningless default)."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
    factor = _TIFF_UNITS.get(int(unit))
    if factor is None:
        return None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    mpp = factor * den / num
    # 72 / 96 dpi and similar defaults of image editors give >100 um/px: not a microscope pixel size
    if not (0 < mpp < 100):
        return None
    return float(mpp)
