"""The DAPI morphology image of a Xenium output folder, opened lazily and read at low resolution.

Xenium writes the DAPI image as a pyramidal OME-TIFF (``uint16``, ``pixel_size`` micrometres per pixel at
level 0): ``morphology_focus/morphology_focus_0000.ome.tif`` (Xenium 2.0; channel 0 is DAPI),
``morphology_focus/ch0000_dapi.ome.tif`` (later versions), ``morphology_focus.ome.tif`` or
``morphology_mip.ome.tif`` (1.x). Only the levels needed for a requested resolution are read, and a level
larger than a few hundred megabytes is reduced band by band, so a full-resolution image is never held whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._errors import reading
from .._registration import exact_downsample

# in order of preference (the 2.0 focus channel 0 is DAPI; 1.x writes the focus and the MIP side by side)
DAPI_CANDIDATES = (
    "morphology_focus/morphology_focus_0000.ome.tif",
    "morphology_focus/ch0000_dapi.ome.tif",
    "morphology_focus.ome.tif",
    "morphology_mip.ome.tif",
)
_BAND_PIXELS = 16_000_000  # pixels of a level read at once when reducing it


def find_dapi(folder: Path) -> Path | None:
    """The DAPI morphology image of a Xenium folder, or None when there is none."""
    folder = Path(folder)
    for name in DAPI_CANDIDATES:
        p = folder / name
        if p.is_file():
            return p
    # experiment.xenium may name it (e.g. a renamed export)
    try:
        images = json.loads((folder / "experiment.xenium").read_text()).get("images", {})
    except (OSError, ValueError, AttributeError):
        images = {}
    for key in ("morphology_focus_filepath", "morphology_mip_filepath"):
        rel = images.get(key) if isinstance(images, dict) else None
        if isinstance(rel, str) and (folder / rel).is_file():
            return folder / rel
    return None


class MorphologyImage:
    """A single-channel (DAPI) pyramidal TIFF opened lazily; levels are read whole only when small."""

    def __init__(self, path: str | Path, pixel_size: float) -> None:
        import tifffile
        import zarr

        self.path = Path(path)
        self.pixel_size = float(pixel_size)
        with reading(self.path, "the morphology image", "Copy it again from the Xenium output."):
            self._tif = tifffile.TiffFile(self.path)
        try:
            series = self._tif.series[0]
            self._arrays, self._index = [], []
            for i in range(len(series.levels)):
                arr = zarr.open(series.aszarr(level=i), mode="r")
                axes = series.levels[i].axes.upper()
                if "Y" not in axes or "X" not in axes:
                    raise ValueError(f"{str(self.path)!r}: no Y / X axes (axes {axes!r}).")
                # channel 0 (DAPI), first plane of every other axis
                index = tuple(slice(None) if a in "YX" else 0 for a in axes)
                self._arrays.append(arr)
                self._index.append((index, axes.index("Y") < axes.index("X")))
            self.shapes = []
            for arr, (index, yx) in zip(self._arrays, self._index, strict=True):
                dims = [int(n) for n, ix in zip(arr.shape, index, strict=True) if isinstance(ix, slice)]
                self.shapes.append((dims[0], dims[1]) if yx else (dims[1], dims[0]))
            order = sorted(range(len(self.shapes)), key=lambda i: -self.shapes[i][0] * self.shapes[i][1])
            self._arrays = [self._arrays[i] for i in order]
            self._index = [self._index[i] for i in order]
            self.shapes = [self.shapes[i] for i in order]
        except Exception:
            self.close()
            raise
        h0, w0 = self.shapes[0]
        self.downsamples = [exact_downsample((h0 / h + w0 / w) / 2.0) for h, w in self.shapes]

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> MorphologyImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, level: int, r0: int, r1: int) -> np.ndarray:
        index, yx = self._index[level]
        index = list(index)
        pos = [i for i, ix in enumerate(index) if isinstance(ix, slice)]
        index[pos[0] if yx else pos[1]] = slice(r0, r1)  # the Y axis
        band = np.asarray(self._arrays[level][tuple(index)], dtype=np.float32)
        return band if yx else band.T

    def read(self, um_per_px: float) -> tuple[np.ndarray, float]:
        """The image reduced to about ``um_per_px`` micrometres per pixel (block means of the finest level
        at or finer than that), float32, and the exact micrometres per pixel of the result.

        The result pixel ``(i, j)`` covers level-0 pixels ``[j f, (j + 1) f)`` (``f`` the total reduction).
        """
        want = max(float(um_per_px) / self.pixel_size, 1.0)  # level-0 pixels per output pixel
        level = max(i for i, d in enumerate(self.downsamples) if d <= want * (1 + 1e-6)) if self.downsamples else 0
        ds = self.downsamples[level]
        f = max(1, int(np.floor(want / ds + 1e-6)))
        h, w = self.shapes[level]
        oh, ow = h // f, w // f
        if oh == 0 or ow == 0:
            f, oh, ow = 1, h, w
        out = np.empty((oh, ow), np.float32)
        rows = max(f, (_BAND_PIXELS // max(w, 1)) // f * f)
        for r0 in range(0, oh * f, rows):
            r1 = min(oh * f, r0 + rows)
            band = self._rows(level, r0, r1)[:, : ow * f]
            out[r0 // f : r1 // f] = band.reshape((r1 - r0) // f, f, ow, f).mean(axis=(1, 3))
        return out, self.pixel_size * ds * f

    def read_window(self, x0: float, y0: float, x1: float, y1: float, um_per_px: float) -> tuple[np.ndarray, float, float, float]:
        """The part ``[x0, x1) x [y0, y1)`` (micrometres) at about ``um_per_px``, read from the finest level at or
        finer than that (only that window is decoded) and reduced by block means. Returns the image and the um
        position of its pixel ``(0, 0)`` corner ``(x, y)`` and its exact micrometres per pixel."""
        want = max(float(um_per_px) / self.pixel_size, 1.0)
        level = max(i for i, d in enumerate(self.downsamples) if d <= want * (1 + 1e-6))
        ds = self.downsamples[level]
        f = max(1, int(np.floor(want / ds + 1e-6)))
        h, w = self.shapes[level]
        step = self.pixel_size * ds  # um per level pixel
        c0 = max(int(np.floor(x0 / step)) // f * f, 0)
        r0 = max(int(np.floor(y0 / step)) // f * f, 0)
        c1 = min(int(np.ceil(x1 / step)), w)
        r1 = min(int(np.ceil(y1 / step)), h)
        c1 = c0 + max((c1 - c0) // f, 1) * f
        r1 = r0 + max((r1 - r0) // f, 1) * f
        index, yx = self._index[level]
        index = list(index)
        pos = [i for i, ix in enumerate(index) if isinstance(ix, slice)]
        iy, ix = (pos[0], pos[1]) if yx else (pos[1], pos[0])
        index[iy], index[ix] = slice(r0, r1), slice(c0, c1)
        a = np.asarray(self._arrays[level][tuple(index)], dtype=np.float32)
        a = a if yx else a.T
        hh, ww = a.shape[0] // f, a.shape[1] // f
        if hh == 0 or ww == 0:
            return np.zeros((0, 0), np.float32), c0 * step, r0 * step, step * f
        a = a[: hh * f, : ww * f].reshape(hh, f, ww, f).mean(axis=(1, 3))
        return a, c0 * step, r0 * step, step * f
