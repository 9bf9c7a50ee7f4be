"""``cs.pp.cell_patches``: nucleus-centred H&E patches in the Xenium frame."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import MOD_MORPH
from .._settings import settings
from .._validate import check_int, check_mpp, get_modality
from ._bands import BLOCK_PX, band_patches
from ._patch_geometry import spatial_order
from ._patch_source import cell_centres, ordered, sample_sources, select_cells

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from mudata import MuData


def cell_patches(
    mdata: MuData | AnnData,
    *,
    cells: Sequence | np.ndarray | None = None,
    size: int = 224,
    mpp: float = 0.5,
    sample: str | None = None,
    exact: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """H&E patches centred on each cell's nucleus, resampled into the Xenium frame.

    Each patch is the square of ``size`` x ``size`` pixels of ``mpp`` micrometres centred on the nucleus
    centroid (``obsm["nucleus_centroid"]``; the cell centroid where a cell has none), oriented as
    ``obsm["spatial"]`` (x to the right, y down), whatever the rotation, flip or scale of the H&E
    registration. It is read from the coarsest pyramid level whose pixels are at or finer than ``mpp``,
    low-pass filtered in proportion to the downsampling (antialiasing) and resampled bilinearly;
    where it leaves the image it is white.

    By default the slide is resampled once, band by band, into one global ``mpp`` grid of the Xenium
    frame, and each patch is the window of that grid nearest the nucleus: the nucleus lies within half a
    pixel of the patch centre (:func:`cellsymphony.pp._patch_geometry.grid_patch_origin` gives its exact
    position), and the cost follows the tissue area rather than the number of cells. ``exact=True``
    warps every patch on its own with the nucleus exactly at the centre (several times slower); the two
    differ by the resampling phase only. Cells are visited in spatial order either way, so the slide's
    tile cache decodes each image tile about once.

    Parameters
    ----------
    mdata
        MuData made by :func:`cellsymphony.io.read_xenium` or :func:`cellsymphony.io.read_he_cells`
        (or its ``"morphology"`` AnnData carrying the registry in ``uns``).
    cells
        Which cells: ``None`` (all), a boolean mask, obs names, or integer positions; patches come back
        in that order.
    size
        Patch side in pixels.
    mpp
        Micrometres per patch pixel (0.5 is UNI's training resolution, 20x).
    sample
        Use this sample's H&E for every selected cell; ``None`` uses each cell's ``obs["sample"]``.
    exact
        ``True``: one warp per patch, the nucleus exactly at its centre; ``False``: windows of bands
        resampled once.
    out
        The uint8 array ``(n_cells, size, size, 3)`` to write the patches into, e.g. a memory-mapped
        ``.npy`` file (``numpy.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=...)``) for more
        patches than fit in memory: a patch of 224 px is 150 KB, so 460,000 cells are 69 GB. ``None``: a new
        array, refused (before anything is read) when it would not fit in the memory available.

    Returns
    -------
    uint8 array ``(n_cells, size, size, 3)`` (RGB): ``out`` when given. Nothing is written to ``mdata``.
    """
    adata = get_modality(mdata, MOD_MORPH)
    size = check_int("size", size, min=1, hint="patch side in pixels")
    mpp = check_mpp("mpp", mpp)
    rows = select_cells(adata, cells)
    xy = cell_centres(adata)
    shape = (len(rows), size, size, 3)
    if out is None:
        _check_fits(shape)
    elif getattr(out, "dtype", None) != np.uint8 or tuple(getattr(out, "shape", ())) != shape:
        raise ValueError(
            f"out= must be a uint8 array of shape {shape} (cells, size, size, RGB), got "
            f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}."
        )
    groups = sample_sources(mdata, adata, rows, sample)
    if out is None:  # not filled: every row is written below (a pass less over the array: 0.9x the time)
        out = np.empty(shape, dtype=np.uint8)
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), desc="patches", unit="cell", disable=not settings.progress or len(rows) < 256) as bar:
        for src, where in groups:
            level = src.level_for(mpp)
            if exact:
                order = ordered(xy[rows[where]], size, mpp)
                for k in range(0, len(order), 64):
                    sel = where[order[k : k + 64]]
                    out[sel] = src.read(xy[rows[sel]], size=size, mpp=mpp, level=level)
                    bar.update(len(sel))
            else:
                finite = np.isfinite(xy[rows[where]]).all(axis=1)
                out[where[~finite]] = 255  # cells without a finite centre are white, as in the exact path (out= too)
                where = where[finite]
                order = spatial_order(xy[rows[where]], band=BLOCK_PX * mpp, anchor=0.0)
                sels = [where[order[k : k + 64]] for k in range(0, len(order), 64)]
                for i, _ in band_patches(src, [xy[rows[sel]] for sel in sels], size=size, mpp=mpp, level=level,
                                         out=out, rows=sels):
                    bar.update(len(sels[i]))
            src.close()
    return out


def _check_fits(shape: tuple[int, ...]) -> None:
    """Refuse a patch array that would not fit in the memory available (a ``ValueError`` saying its size and
    the ways out), rather than start filling it until the system kills the process."""
    from .._memory import GB, available_bytes

    need = int(np.prod(shape, dtype=np.int64))
    avail = available_bytes()
    if avail is None or need <= avail:
        return
    raise ValueError(
        f"cs.pp.cell_patches: {shape[0]:,} patches of {shape[1]} x {shape[2]} px are {need / GB:.1f} GB, but "
        f"{avail / GB:.1f} GB of memory is available. Select fewer cells (cells=), write them to disk with "
        "out=numpy.lib.format.open_memmap('patches.npy', mode='w+', dtype='uint8', shape="
        f"{tuple(shape)}), or embed them without keeping the patches (cs.pp.embed_morphology)."
    )
