"""``cs.io.register_he``: register an H&E slide to a Xenium section without an alignment file."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import (
    IN_IMAGE_KEY,
    MOD_MORPH,
    MOD_RNA,
    NUCLEUS_KEY,
    REG_ALIGNMENT,
    REG_HE_MPP,
    REG_HE_PATH,
    REG_PIXEL_SIZE,
    REG_XENIUM_PATH,
    REGISTRATION_ERROR_KEY,
    REGISTRATION_KEY,
    SAMPLE_KEY,
    SAMPLES_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from .._registration import (
    NONRIGID_KEY,
    apply_affine,
    check_alignment,
    he_px_to_um,
    inside_image,
    mutual_nearest,
    um_to_he_px,
    warp_displacement,
)
from .._settings import logger
from .._utils import params_record
from .._validate import is_mudata, samples_registry
from ._he import HEImage
from ._spatial_uns import attach_spatial_images

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mudata import MuData

# QC thresholds (see the docs page "Registration")
MIN_PAIRS = 30
ERROR_RADIUS_UM = 50.0  # per-cell error: matched nuclei within this radius; NaN beyond
INLIER_UM = 3.0  # a pair is an inlier when its residual is at most this
NULL_SHIFT_UM = 25.0  # the H&E nuclei shifted by this much give the chance match rate
PASS1 = {"node_um": 200.0, "radius_um": 60.0, "pair_um": 4.0, "ransac_um": 6.0}
PASS2 = {"node_um": 100.0, "radius_um": 15.0, "pair_um": 3.0, "ransac_um": 3.0}
N_CANDIDATES = 3  # coarse candidates verified on nuclei
AFFINE_NUCLEI = 40_000  # H&E nuclei used to fit the affine (all of them for the evidence and the field)


# ---------------------------------------------------------------------------------------------- result
@dataclass
class Registration:
    """The result of :func:`cellsymphony.io.register_he`.

    Attributes
    ----------
    alignment
        3 x 3 float64: H&E level-0 pixel ``(x, y, 1)`` -> Xenium morphology pixel, the convention of 10x's
        ``*_he_imagealignment.csv``. With ``nonrigid=True`` this is the affine part; :attr:`nonrigid` holds the rest.
    qc
        Registration QC (see :func:`cellsymphony.io.register_he`); ``qc["ok"]`` says whether it can be trusted.
    residuals
        One row per matched nucleus: ``cell_id`` (Xenium), ``he_x``, ``he_y`` (H&E level-0 pixels), ``x_um``,
        ``y_um`` (Xenium nucleus centroid), ``dx_um``, ``dy_um`` (Xenium minus registered H&E), ``distance_um``
        and ``inlier``.
    nonrigid
        The smooth displacement field (``grid_um``, ``origin_px``, ``step_px``; see
        :mod:`cellsymphony._registration`), or None.
    sample, he_path, he_mpp, pixel_size, xenium_path, he_shape
        What the registry entry of :meth:`apply` records.
    """

    alignment: np.ndarray
    qc: dict
    residuals: pd.DataFrame
    nonrigid: dict | None
    sample: str
    he_path: str
    he_mpp: float
    pixel_size: float
    xenium_path: str
    he_shape: tuple[int, int]
    candidates: list = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        """The QC in one line (quoted by errors and printed by the command line)."""
        q = self.qc
        parts = [
            f"ok={bool(q.get('ok'))}",
            f"n_matched={int(q.get('n_matched', 0))}",
            f"median_um={float(q.get('median_um', np.nan)):.2f}",
            f"p95_um={float(q.get('p95_um', np.nan)):.2f}",
            f"inlier_fraction={float(q.get('inlier_fraction', np.nan)):.2f}",
            f"match_rate={float(q.get('match_rate', np.nan)):.2f}",
            f"chance_match_rate={float(q.get('chance_match_rate', np.nan)):.2f}",
            f"scale_um_per_px={float(q.get('scale_um_per_px', np.nan)):.4g}",
        ]
        if q.get("scale_estimated"):
            parts.append("scale estimated (no pixel size recorded)")
        if q.get("reason"):
            parts.append(f"reason: {q['reason']}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"Registration(sample={self.sample!r}, {self.summary()})"

    def _check_ok(self, what: str, force: bool) -> None:
        if not self.qc.get("ok") and not force:
            raise ValueError(
                f"The registration of {Path(self.he_path).name!r} to sample {self.sample!r} failed its QC "
                f"({self.summary()}); {what} refused. Look at reg.plot(); pass force=True to {what} anyway."
            )

    # ------------------------------------------------------------------ outputs
    def write_csv(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write :attr:`alignment` as 10x's ``*_he_imagealignment.csv`` (3 rows of 3 numbers, no header), which
        Xenium Explorer and :func:`cellsymphony.io.read_xenium` read. Refused (nothing written) when
        ``qc["ok"]`` is False, unless ``force``. The non-rigid part, if any, is not representable in that file."""
        self._check_ok("writing the alignment", force)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        np.savetxt(tmp, self.alignment, delimiter=",", fmt="%.10g")
        os.replace(tmp, path)
        if self.nonrigid is not None:
            logger.warning("write_csv: the non-rigid correction of sample %r is not part of the CSV (affine only); "
                           "use reg.apply(mdata) to keep it.", self.sample)
        return path

    def apply(self, mdata: MuData, *, force: bool = False) -> None:
        """Write the registration into ``mdata``, as :func:`cellsymphony.io.read_xenium` does with an alignment CSV.

        Writes ``mdata.uns["cellsymphony"]["samples"][sample]`` (``he_path``, ``alignment``, ``pixel_size``,
        ``he_mpp``, ``xenium_path``, and ``nonrigid`` when there is a non-rigid part), ``obs["in_image"]`` of the
        morphology modality, ``obs["registration_error_um"]`` on both modalities (and ``mdata.obs``): the size
        of the local mean residual of the matched nuclei within 50 um of the cell (Gaussian weights, sigma
        25 um), NaN with fewer than 3 matched nuclei within 50 um; and ``mdata.uns["he_registration"]
        ["samples"][sample]`` with the QC and the residuals table. Only this sample's cells change. Refused
        (nothing written) when ``qc["ok"]`` is False, unless ``force``.
        """
        self._check_ok("applying it", force)
        if not is_mudata(mdata):
            raise ValueError("apply needs the MuData of cs.io.read_xenium (with modalities 'rna' and 'morphology').")
        names = pd.Index(mdata.obs_names.astype(str))
        in_sample = _sample_mask(mdata, self.sample)
        nuc = _coords(mdata, names)
        cells = np.flatnonzero(in_sample)
        if len(cells) == 0:
            raise ValueError(f"No cell of mdata belongs to sample {self.sample!r}.")
        err = np.full(len(names), np.nan)
        err[cells] = local_error(nuc[cells], self.residuals, ERROR_RADIUS_UM)
        px = um_to_he_px(nuc[cells], self.alignment, self.pixel_size, self.nonrigid)
        inside = inside_image(px, self.he_shape)

        registry = mdata.uns.setdefault(UNS_KEY, {}).setdefault(SAMPLES_KEY, {})
        entry = dict(registry.get(self.sample, {}))
        entry.update({
            REG_HE_PATH: self.he_path,
            REG_ALIGNMENT: np.asarray(self.alignment, dtype=np.float64),
            REG_PIXEL_SIZE: float(self.pixel_size),
            REG_HE_MPP: float(self.he_mpp),
            REG_XENIUM_PATH: self.xenium_path or str(entry.get(REG_XENIUM_PATH, "")),
        })
        entry.pop(NONRIGID_KEY, None)
        if self.nonrigid is not None:
            entry[NONRIGID_KEY] = {k: np.asarray(v, dtype=np.float64) for k, v in self.nonrigid.items()}
        registry[self.sample] = entry
        attach_spatial_images(mdata, self.sample)

        for mod in (MOD_RNA, MOD_MORPH):
            if mod not in mdata.mod:
                continue
            a = mdata.mod[mod]
            pos = pd.Index(a.obs_names.astype(str)).get_indexer(names[cells])
            keep = pos >= 0
            col = a.obs[REGISTRATION_ERROR_KEY].to_numpy(np.float64).copy() if REGISTRATION_ERROR_KEY in a.obs \
                else np.full(a.n_obs, np.nan)
            col[pos[keep]] = err[cells][keep]
            a.obs[REGISTRATION_ERROR_KEY] = col
            if mod == MOD_MORPH:
                flags = a.obs[IN_IMAGE_KEY].to_numpy(bool).copy() if IN_IMAGE_KEY in a.obs else np.zeros(a.n_obs, bool)
                flags[pos[keep]] = inside[keep]
                a.obs[IN_IMAGE_KEY] = flags
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            mdata.update()
        col = np.full(len(names), np.nan)
        if REGISTRATION_ERROR_KEY in mdata.obs:
            col = mdata.obs[REGISTRATION_ERROR_KEY].to_numpy(np.float64).copy()
        col[cells] = err[cells]
        mdata.obs[REGISTRATION_ERROR_KEY] = col

        block = mdata.uns.get(REGISTRATION_KEY)
        samples = dict(block.get("samples", {})) if isinstance(block, dict) else {}
        samples[self.sample] = {**_h5_safe(self.qc), "residuals": self.residuals.reset_index(drop=True)}
        mdata.uns[REGISTRATION_KEY] = {
            "params": params_record(**_h5_safe(self.qc.get("params", {}))),
            "samples": samples,
        }
        logger.info(
            "register_he: applied the registration of sample %r (%s); wrote the registry, obs[%r] and uns[%r]; "
            "%d of %d cells have a local error estimate (median %.2f um).",
            self.sample, "non-rigid" if self.nonrigid is not None else "affine", REGISTRATION_ERROR_KEY,
            REGISTRATION_KEY, int(np.isfinite(err[cells]).sum()), len(cells),
            float(np.nanmedian(err[cells])) if np.isfinite(err[cells]).any() else float("nan"),
        )

    def to_um(self, he_px) -> np.ndarray:
        """H&E level-0 pixels ``(n, 2)`` -> Xenium micrometres through this registration."""
        return he_px_to_um(he_px, self.alignment, self.pixel_size, self.nonrigid)

    def plot(self, **kwargs: Any) -> Figure:
        """The registration QC figure (:func:`cellsymphony.pl.registration`)."""
        from ..pl._registration import registration

        return registration(self, **kwargs)


def _h5_safe(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _h5_safe(v)
        elif isinstance(v, bool | np.bool_):
            out[k] = bool(v)
        elif v is None:
            out[k] = ""
        else:
            out[k] = v
    return out


def _sample_mask(mdata, sample: str) -> np.ndarray:
    for src in [mdata, *mdata.mod.values()]:
        if SAMPLE_KEY in src.obs:
            col = src.obs[SAMPLE_KEY].astype(str).reindex(mdata.obs_names)
            return (col == str(sample)).to_numpy()
    return np.ones(mdata.n_obs, dtype=bool)


def _coords(mdata, names: pd.Index) -> np.ndarray:
    """Nucleus centroids (cell centroids where missing) of every cell of the MuData, micrometres."""
    for src in [mdata, *mdata.mod.values()]:
        for key in (NUCLEUS_KEY, SPATIAL_KEY):
            if key in src.obsm and src.obsm[key] is not None:
                arr = np.asarray(src.obsm[key], dtype=np.float64)[:, :2]
                frame = pd.DataFrame(arr, index=src.obs_names.astype(str))
                if names.isin(frame.index).all():
                    out = frame.loc[names].to_numpy().copy()
                    if key == NUCLEUS_KEY and SPATIAL_KEY in src.obsm:
                        cell = pd.DataFrame(np.asarray(src.obsm[SPATIAL_KEY], float)[:, :2],
                                            index=src.obs_names.astype(str)).loc[names].to_numpy()
                        bad = ~np.isfinite(out).all(axis=1)
                        out[bad] = cell[bad]
                    return out
    raise ValueError(f"No cell coordinates: obsm[{NUCLEUS_KEY!r}] is missing; read the data with cs.io.read_xenium.")


def local_error(xy_um: np.ndarray, residuals: pd.DataFrame, radius: float = ERROR_RADIUS_UM,
                min_pairs: int = 3) -> np.ndarray:
    """Per point: the length of the Gaussian-weighted (sigma ``radius / 2``) mean residual vector of the matched
    nuclei within ``radius``; NaN with fewer than ``min_pairs`` of them."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    out = np.full(len(xy), np.nan)
    if residuals is None or len(residuals) == 0:
        return out
    res = residuals[residuals["inlier"].to_numpy(bool)] if "inlier" in residuals else residuals
    if len(res) < min_pairs:
        return out
    pts = res[["x_um", "y_um"]].to_numpy(np.float64)
    vec = res[["dx_um", "dy_um"]].to_numpy(np.float64)
    ok = np.flatnonzero(np.isfinite(xy).all(axis=1))
    if not len(ok):
        return out
    sig2 = (radius / 2.0) ** 2
    step = 50_000
    tree = cKDTree(pts)
    for s in range(0, len(ok), step):
        idx = ok[s : s + step]
        m = cKDTree(xy[idx]).sparse_distance_matrix(tree, radius, output_type="coo_matrix")
        w = np.exp(-(m.data**2) / (2 * sig2))
        n = np.bincount(m.row, minlength=len(idx))
        sw = np.bincount(m.row, w, minlength=len(idx))
        sx = np.bincount(m.row, w * vec[m.col, 0], minlength=len(idx))
        sy = np.bincount(m.row, w * vec[m.col, 1], minlength=len(idx))
        with np.errstate(invalid="ignore", divide="ignore"):
            e = np.hypot(sx / sw, sy / sw)
        e[n < min_pairs] = np.nan
        out[idx] = e
    return out


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class _Xenium:
    sample: str
    cell_ids: np.ndarray
    nuclei_um: np.ndarray  # (n, 2), NaN where unknown
    pixel_size: float
    folder: Path | None
    dapi: Path | None
    extent: tuple[float, float]  # (width, height) um
    nucleus_source: str


def _xenium_inputs(xenium, sample: str | None) -> _Xenium:
    from ._morphology_image import MorphologyImage, find_dapi
    from ._xenium_files import (
        default_sample_id,
        pixel_size_of,
        read_cells_table,
        read_experiment,
        read_nucleus_centroids,
    )

    if is_mudata(xenium):
        mdata = xenium
        reg = samples_registry(mdata)
        present = []
        for src in [mdata, *mdata.mod.values()]:
            if SAMPLE_KEY in src.obs:
                present = sorted(pd.unique(src.obs[SAMPLE_KEY].astype(str)))
                break
        if sample is None:
            known = present or sorted(reg)
            if len(known) != 1:
                raise ValueError(f"The MuData holds several samples {known}: pass sample= naming the section to register.")
            sample = known[0]
        sample = str(sample)
        if present and sample not in present:
            raise ValueError(f"No cell has obs[{SAMPLE_KEY!r}] == {sample!r} (samples present: {present}).")
        entry = reg.get(sample, {})
        if REG_PIXEL_SIZE not in entry:
            raise ValueError(
                f"Sample {sample!r} has no registry entry with the Xenium pixel size "
                "(mdata.uns['cellsymphony']['samples']); read the section with cs.io.read_xenium."
            )
        names = pd.Index(mdata.obs_names.astype(str))
        mask = _sample_mask(mdata, sample)
        nuc = _coords(mdata, names[mask])
        folder = Path(str(entry.get(REG_XENIUM_PATH, "") or "")) if entry.get(REG_XENIUM_PATH) else None
        ps = float(entry[REG_PIXEL_SIZE])
        ids, source = names[mask].to_numpy(), "mudata"
    else:
        folder = Path(xenium)
        if not folder.is_dir():
            raise FileNotFoundError(f"Xenium folder {str(folder)!r} does not exist or is not a folder; check the path.")
        specs = read_experiment(folder)
        ps = pixel_size_of(specs, str(folder / "experiment.xenium"))
        table, _ = read_cells_table(folder)
        ids = table["cell_id"].to_numpy()
        cells = table[["x_centroid", "y_centroid"]].to_numpy(np.float64)
        found = read_nucleus_centroids(folder, ids)
        if found is None:
            nuc, source = cells, "cells"
            logger.info("register_he: no nucleus_boundaries.parquet in %s; matching H&E nuclei to cell centroids.",
                        folder)
        else:
            nuc = found[0].copy()
            bad = ~np.isfinite(nuc).all(axis=1)
            nuc[bad] = cells[bad]
            source = "nucleus_boundaries"
        sample = str(sample) if sample is not None else default_sample_id(specs, folder)
    dapi = find_dapi(folder) if folder is not None and folder.is_dir() else None
    ok = np.isfinite(nuc).all(axis=1)
    if ok.sum() < MIN_PAIRS:
        raise ValueError(f"Sample {sample!r} has {int(ok.sum())} cells with coordinates; at least {MIN_PAIRS} are "
                         "needed to register an H&E.")
    if dapi is not None:
        with MorphologyImage(dapi, ps) as m:
            h, w = m.shapes[0]
        extent = (w * ps, h * ps)
    else:
        hi = np.nanmax(nuc[ok], axis=0) + 20.0
        extent = (float(hi[0]), float(hi[1]))
    return _Xenium(sample, np.asarray(ids).astype(str), nuc, ps, folder, dapi, extent, source)


class _XeniumImage:
    """The Xenium nuclear image at a requested resolution: DAPI when there is one, else binned centroids."""

    def __init__(self, x: _Xenium) -> None:
        from ._morphology_image import MorphologyImage

        self.x = x
        self.extent = x.extent
        self.dapi = MorphologyImage(x.dapi, x.pixel_size) if x.dapi is not None else None
        self.source = "dapi" if self.dapi is not None else "nuclei"

    @property
    def tissue_area_um2(self) -> float:
        """Area of the section's tissue: 10-um squares holding nucleus centroids, closed and filled."""
        from ._reg_coarse import nuclei_density, tissue_mask

        r = 10.0
        return float(tissue_mask(nuclei_density(self.x.nuclei_um, self.extent, r), 0.5).sum() * r * r)

    def __call__(self, r: float) -> tuple[np.ndarray, float]:
        from ._reg_coarse import nuclei_density

        if self.dapi is not None:
            return self.dapi.read(r)
        from scipy import ndimage as ndi

        img = nuclei_density(self.x.nuclei_um, self.extent, r)
        return ndi.gaussian_filter(img, 0.5), r

    def close(self) -> None:
        if self.dapi is not None:
            self.dapi.close()


def _open_he(he_image, he_mpp: float | None) -> tuple[HEImage, bool, float, str]:
    """The opened H&E, whether we opened it, the prior pixel size (NaN if none) and where it came from."""
    if isinstance(he_image, HEImage):
        if he_mpp is not None:
            raise ValueError("he_mpp cannot be combined with an opened HEImage; pass mpp= to cs.io.read_he instead.")
        return he_image, False, float(he_image.mpp), "image"
    if he_mpp is not None:
        he_mpp = float(he_mpp)
        if not (he_mpp > 0 and np.isfinite(he_mpp)):
            raise ValueError(f"he_mpp must be a positive number of micrometres per pixel, got {he_mpp}.")
        return HEImage(he_image, mpp=he_mpp, cache_tiles=64), True, he_mpp, "he_mpp"
    try:
        he = HEImage(he_image, cache_tiles=64)
        return he, True, float(he.mpp), "file"
    except ValueError as err:
        if "records no pixel size" not in str(err):
            raise
    # unknown pixel size: any placeholder works, every geometry below is measured
    return HEImage(he_image, mpp=1.0, cache_tiles=64), True, float("nan"), "estimated"


def _he_nuclei_from_file(nuclei, he: HEImage, mpp_prior: float) -> np.ndarray:
    from ._nuclei import read_nuclei

    table = read_nuclei(nuclei, guess_columns=True, drop_invalid=True)
    xy = table[["x", "y"]].to_numpy(np.float64)
    if table.attrs.get("units") == "um":
        if not np.isfinite(mpp_prior):
            raise ValueError(
                f"{table.attrs.get('source', 'nuclei')}: the centroids are in micrometres but the H&E records no "
                "pixel size to turn them into pixels; pass he_mpp= (the pixel size the detection tool used)."
            )
        xy = xy / mpp_prior
    h, w = he.shapes[0]
    inside = inside_image(xy, (h, w))
    if inside.mean() < 0.5:
        raise ValueError(
            f"{table.attrs.get('source', 'nuclei')}: {int((~inside).sum())} of {len(xy)} nuclei lie outside the "
            f"H&E image ({w} x {h} px): the coordinates must be level-0 pixels of this H&E image."
        )
    return xy[inside]


# ---------------------------------------------------------------------------------------------- main
def register_he(
    xenium: str | os.PathLike | MuData,
    he_image: str | os.PathLike | HEImage,
    *,
    sample: str | None = None,
    he_mpp: float | None = None,
    nuclei: str | os.PathLike | pd.DataFrame | None = None,
    nonrigid: bool = False,
    flips: bool = True,
    max_windows: int = 400,
    max_median_um: float = 2.0,
    min_match_rate: float = 0.3,
    seed: int = 0,
) -> Registration:
    """Register a post-Xenium H&E slide to its Xenium section, without an alignment file.

    Coarse to fine (see the docs page *Registration*): (1) the hematoxylin channel of a low-resolution H&E
    level is matched to the DAPI morphology image reduced to the same resolution, over every rotation, both
    mirror images and a range of scales (masked normalised cross-correlation over all translations, refined
    on finer images); (2) H&E nuclei (detected in the hematoxylin channel window by window, or read from
    ``nuclei=``) are matched to the Xenium nucleus centroids through local offsets, and an affine is fitted by
    RANSAC and trimmed least squares; (3) with ``nonrigid=True``, a thin-plate spline through the remaining
    residuals corrects smooth local deformation. Nothing is written anywhere: use :meth:`Registration.apply`
    or :meth:`Registration.write_csv`.

    Parameters
    ----------
    xenium
        A Xenium output folder, or a MuData from :func:`cellsymphony.io.read_xenium` (its registry gives the
        pixel size and the folder of the DAPI image; without the folder only the nuclei are used).
    he_image
        The H&E image (pyramidal OME-TIFF, SVS or tiled TIFF; a path or an opened
        :class:`~cellsymphony.io.HEImage`). One-channel and RGBA images are read as RGB.
    sample
        The section: default the folder's sample id (as :func:`~cellsymphony.io.read_xenium`), or the only
        sample of the MuData.
    he_mpp
        Micrometres per H&E pixel at level 0, overriding the file's record. The scale is measured either way
        (within +-45 % of this value, or between 0.1 and 2 um/px when neither the file nor ``he_mpp`` gives one:
        ``qc["scale_estimated"]`` is then True).
    nuclei
        H&E nucleus detections to use instead of the built-in detector: any file or table
        :func:`cellsymphony.io.read_he_cells` accepts, in level-0 pixels (or micrometres, with a known pixel
        size). Ids and classes are ignored: nuclei are matched by position.
    nonrigid
        Add a smooth non-rigid correction (thin-plate spline) for sections that deformed between imaging and
        staining. It is stored in the registry by :meth:`Registration.apply` and used by the patch reader and
        :func:`cellsymphony.pp.transfer_nucleus_labels`; the CSV holds the affine part only.
    flips
        Also search the mirror image of the H&E (a slide scanned face down).
    max_windows
        Most detection windows (tiles of the detection level, about 280 um at 0.5 um/px) read from the H&E; a
        larger section is sampled on a regular lattice.
    max_median_um
        QC: largest median residual of the matched nuclei (um) for ``qc["ok"]``.
    min_match_rate
        QC: smallest fraction of the nuclei (the fewer of the two sides, in the detection windows) that are
        matched.
    seed
        Seed of the RANSAC sampling.

    Returns
    -------
    A :class:`~cellsymphony.io.Registration` with ``.alignment`` (3 x 3, H&E level-0 pixel -> Xenium morphology
    pixel), ``.residuals``, ``.nonrigid``, ``.write_csv(path)``, ``.apply(mdata)``, ``.plot()`` and ``.qc``: a
    dict with ``ok`` (bool), ``reason`` (why not, ``""`` when ok), ``n_matched``, ``median_um``, ``p95_um``
    (residuals of the matched nuclei), ``inlier_fraction`` (residual <= 3 um), ``match_rate`` and
    ``chance_match_rate`` (with the H&E nuclei shifted by 25 um), ``n_he_nuclei``, ``n_xenium_nuclei`` (in the
    detection windows), ``scale_um_per_px`` (measured), ``scale_estimated`` (no pixel size was known),
    ``mpp_recorded`` (NaN when none), ``mpp_source``, ``scale_ratio`` (measured / recorded), ``angle_deg``,
    ``flipped``, ``coarse_score``, ``coarse_source`` (``"dapi"`` or ``"nuclei"``), ``nucleus_source``,
    ``nonrigid``, ``nonrigid_max_um`` (largest displacement of the field), ``affine_median_um`` (before the
    non-rigid step), the timings ``time_*_s`` and ``params``.

    Examples
    --------
    >>> import cellsymphony as cs
    >>> reg = cs.io.register_he("outs/", "outs/slide_he.ome.tif")  # doctest: +SKIP
    >>> reg.qc["ok"], reg.qc["median_um"]  # doctest: +SKIP
    >>> reg.write_csv("outs/slide_he_imagealignment.csv")  # doctest: +SKIP
    """
    from ._reg_coarse import HEHematoxylin, search

    t0 = time.perf_counter()
    params = {
        "sample": "" if sample is None else str(sample), "he_mpp": float("nan") if he_mpp is None else float(he_mpp),
        "nuclei": "" if nuclei is None else (str(nuclei) if isinstance(nuclei, str | os.PathLike) else "DataFrame"),
        "nonrigid": bool(nonrigid), "flips": bool(flips), "max_windows": int(max_windows),
        "max_median_um": float(max_median_um), "min_match_rate": float(min_match_rate), "seed": int(seed),
    }
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}.")
    x = _xenium_inputs(xenium, sample)
    he, opened, mpp_prior, mpp_source = _open_he(he_image, he_mpp)
    ximg = None
    try:
        he_nuclei = _he_nuclei_from_file(nuclei, he, mpp_prior) if nuclei is not None else None
        ximg = _XeniumImage(x)
        t_in = time.perf_counter()
        hem = HEHematoxylin(he)
        cands = search(ximg, hem, mpp_prior=mpp_prior if np.isfinite(mpp_prior) else None, flips=flips)
        t_coarse = time.perf_counter()
        tried = []
        for cand in cands[:N_CANDIDATES]:
            res = _fine(he, x, cand, he_nuclei, nonrigid=nonrigid, max_windows=max_windows,
                        max_median_um=max_median_um, min_match_rate=min_match_rate, seed=seed)
            tried.append(res)
            if res["qc"]["ok"]:
                break
        best = max(tried, key=lambda r: (r["qc"]["ok"], r["qc"]["n_matched"] * r["qc"]["inlier_fraction"]))
        t_end = time.perf_counter()
        qc = best["qc"]
        scale = qc["scale_um_per_px"]
        qc.update({
            "scale_estimated": mpp_source == "estimated",
            "mpp_recorded": mpp_prior,
            "mpp_source": mpp_source,
            "scale_ratio": scale / mpp_prior if np.isfinite(mpp_prior) else float("nan"),
            "coarse_score": float(best["candidate"].score),
            "coarse_source": ximg.source,
            "nucleus_source": x.nucleus_source,
            "n_candidates_tried": len(tried),
            "time_inputs_s": t_in - t0,
            "time_coarse_s": t_coarse - t_in,
            "time_fine_s": t_end - t_coarse,
            "time_total_s": t_end - t0,
            "params": params,
        })
        he_mpp_out = mpp_prior if np.isfinite(mpp_prior) else scale
        reg = Registration(
            alignment=best["alignment"],
            qc=qc,
            residuals=best["residuals"],
            nonrigid=best["nonrigid"],
            sample=x.sample,
            he_path=str(Path(he.path).resolve()),
            he_mpp=float(he_mpp_out),
            pixel_size=x.pixel_size,
            xenium_path=str(x.folder.resolve()) if x.folder is not None else "",
            he_shape=tuple(int(v) for v in he.shapes[0]),
            candidates=cands,
        )
    finally:
        if ximg is not None:
            ximg.close()
        if opened:
            he.close()
    if qc["ok"] and np.isfinite(mpp_prior) and abs(np.log(qc["scale_ratio"])) > np.log(1.05):
        logger.warning("register_he: the measured H&E pixel size %.4g um differs from the recorded %.4g um (%s) by %.0f%%.",
                       scale, mpp_prior, mpp_source, 100 * (qc["scale_ratio"] - 1))
    log = logger.info if qc["ok"] else logger.warning
    log("register_he: sample %r: %s (%.1f s)", x.sample, reg.summary(), qc["time_total_s"])
    return reg


# ---------------------------------------------------------------------------------------------- fine stage
def _decompose(t: np.ndarray) -> tuple[float, bool]:
    """Rotation angle (degrees) and mirror flip of the linear part of a px -> um affine."""
    lin = np.asarray(t, dtype=np.float64)[:2, :2]
    flipped = bool(np.linalg.det(lin) < 0)
    if flipped:
        lin = lin @ np.diag([-1.0, 1.0])
    return float(np.degrees(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]))), flipped


def _fine(he: HEImage, x: _Xenium, cand, he_nuclei, *, nonrigid: bool, max_windows: int, max_median_um: float,
          min_match_rate: float, seed: int) -> dict:
    from ._reg_nuclei import (
        HENucleusDetector,
        fit_nonrigid,
        node_offsets,
        pairs_after_offsets,
        robust_affine,
    )

    ps = x.pixel_size
    s0 = cand.matrix()
    okx = np.flatnonzero(np.isfinite(x.nuclei_um).all(axis=1))
    xen = x.nuclei_um[okx]
    out = {"candidate": cand, "nonrigid": None, "alignment": np.diag([1 / ps, 1 / ps, 1.0]) @ s0,
           "residuals": _empty_residuals()}
    qc: dict[str, Any] = {"ok": False, "reason": "", "n_matched": 0, "median_um": np.nan, "p95_um": np.nan,
                          "inlier_fraction": 0.0, "match_rate": 0.0, "chance_match_rate": np.nan,
                          "n_he_nuclei": 0, "n_xenium_nuclei": 0, "n_windows": 0, "nonrigid": bool(nonrigid),
                          "nonrigid_max_um": 0.0, "affine_median_um": np.nan}
    qc["angle_deg"], qc["flipped"] = _decompose(s0)
    qc["scale_um_per_px"] = float(np.sqrt(abs(np.linalg.det(s0[:2, :2]))))
    out["qc"] = qc

    def fail(reason: str) -> dict:
        qc["reason"] = reason
        return out

    t0 = time.perf_counter()
    if he_nuclei is None:
        det = HENucleusDetector(he, cand.scale)
        wins = det.windows_for(s0, x.extent, max_windows)
        qc["n_windows"] = len(wins)
        qc["detection_level"] = det.level
        p = det.detect(wins).xy
    else:
        u = apply_affine(s0, he_nuclei)
        m = 100.0
        keep = (u[:, 0] > -m) & (u[:, 0] < x.extent[0] + m) & (u[:, 1] > -m) & (u[:, 1] < x.extent[1] + m)
        p = he_nuclei[keep]
    qc["time_detect_s"] = time.perf_counter() - t0
    qc["n_he_nuclei"] = len(p)
    if len(p) < MIN_PAIRS:
        return fail(f"only {len(p)} H&E nuclei found where the coarse step puts the Xenium section (a blank, "
                    "out-of-focus or unstained image, or another section)")

    # passes 1 and 2 fit the affine: a random subset of a large section's nuclei is enough (and 5-10x faster);
    # the evidence and the non-rigid field below use all of them
    rng = np.random.default_rng(seed)
    ps_ = p[np.sort(rng.choice(len(p), AFFINE_NUCLEI, replace=False))] if len(p) > AFFINE_NUCLEI else p
    # pass 1: large nodes, a wide search: the coarse transform is off by up to tens of micrometres
    u = apply_affine(s0, ps_)
    _, o1, _, node1 = node_offsets(u, xen, PASS1["node_um"], PASS1["radius_um"])
    hi, xi, _ = pairs_after_offsets(u, node1, o1, xen, PASS1["pair_um"])
    if len(hi) < MIN_PAIRS:
        return fail(f"only {len(hi)} H&E nuclei match Xenium nuclei after the coarse step (another tissue or "
                    "section, or an image without visible nuclei)")
    a1, _ = robust_affine(ps_[hi], xen[xi], PASS1["ransac_um"], seed=seed)
    # pass 2: smaller nodes, a tight search
    u = apply_affine(a1, ps_)
    c2, o2, _, node2 = node_offsets(u, xen, PASS2["node_um"], PASS2["radius_um"])
    qc["n_nodes"] = len(c2)
    hi, xi, _ = pairs_after_offsets(u, node2, o2, xen, PASS2["pair_um"])
    if len(hi) < MIN_PAIRS:
        return fail(f"only {len(hi)} H&E nuclei match Xenium nuclei after the affine step")
    # RANSAC with the search radius as threshold, then trimmed least squares (the trimming adapts to the spread:
    # tight for a rigid section, loose for a deformed one, where the best affine is the global one)
    a2, inl = robust_affine(ps_[hi], xen[xi], PASS2["radius_um"], seed=seed)
    mapped = apply_affine(a2, p)
    warp = None
    if nonrigid:
        warp = fit_nonrigid(p, xen, a2, scale_um_per_px=float(np.sqrt(abs(np.linalg.det(a2[:2, :2])))))
        if warp is not None:
            qc["nonrigid_max_um"] = float(np.nanmax(np.hypot(*warp["grid_um"].reshape(-1, 2).T)))
    # the evidence: pairs found through local offsets under the final transform (so that a residual
    # deformation shows in the residuals instead of hiding as unmatched nuclei)
    hi_a, xi_a = _evidence(mapped, xen)
    if len(hi_a):
        qc["affine_median_um"] = float(np.median(np.hypot(*(xen[xi_a] - mapped[hi_a]).T)))
    if warp is not None:
        mapped = mapped + warp_displacement(warp, p)
        hi, xi = _evidence(mapped, xen)
    else:
        hi, xi = hi_a, xi_a
    if len(hi) < MIN_PAIRS:
        return fail(f"only {len(hi)} H&E nuclei match Xenium nuclei after the affine step")
    qc["time_fit_s"] = time.perf_counter() - t0 - qc["time_detect_s"]

    # ---- QC
    vec = xen[xi] - mapped[hi]
    dist = np.hypot(vec[:, 0], vec[:, 1])
    inlier = dist <= INLIER_UM
    in_field = (mapped[:, 0] >= 0) & (mapped[:, 0] <= x.extent[0]) & (mapped[:, 1] >= 0) & (mapped[:, 1] <= x.extent[1])
    from scipy.spatial import cKDTree

    d_near, _ = cKDTree(mapped[in_field]).query(xen, distance_upper_bound=15.0) if in_field.any() else (np.full(len(xen), np.inf), None)
    n_he = int(in_field.sum())
    n_xen = int(np.isfinite(d_near).sum())
    denom = max(min(n_he, n_xen), 1)
    plain = len(mutual_nearest(xen, mapped, INLIER_UM)[0])
    chance = np.mean([len(mutual_nearest(xen, mapped + np.array(s), INLIER_UM)[0])
                      for s in ((NULL_SHIFT_UM, 0), (-NULL_SHIFT_UM, 0), (0, NULL_SHIFT_UM), (0, -NULL_SHIFT_UM))])
    scale = float(np.sqrt(abs(np.linalg.det(a2[:2, :2]))))
    qc.update({
        "n_matched": int(len(hi)),
        "median_um": float(np.median(dist)),
        "p95_um": float(np.percentile(dist, 95)),
        "inlier_fraction": float(inlier.mean()),
        "match_rate": float(inlier.sum() / denom),
        "plain_match_rate": float(plain / denom),
        "chance_match_rate": float(chance / denom),
        "n_he_nuclei": n_he,
        "n_xenium_nuclei": n_xen,
        "scale_um_per_px": scale,
        "affine_inliers": int(inl.sum()),
    })
    qc["angle_deg"], qc["flipped"] = _decompose(a2)
    reasons = []
    if qc["n_matched"] < MIN_PAIRS:
        reasons.append(f"n_matched {qc['n_matched']} < {MIN_PAIRS}")
    if qc["median_um"] > max_median_um:
        # nuclei pair up locally but no affine fits them: a deformation, not a wrong image
        local = qc["n_matched"] / denom
        hint = "; the section may be deformed: try nonrigid=True" if not nonrigid and local >= min_match_rate else ""
        reasons.append(f"median residual {qc['median_um']:.2f} um > {max_median_um} um{hint}")
    if qc["match_rate"] < min_match_rate:
        reasons.append(f"match rate {qc['match_rate']:.2f} < {min_match_rate}")
    if qc["plain_match_rate"] < 3 * qc["chance_match_rate"]:
        reasons.append(f"match rate {qc['plain_match_rate']:.2f} not above chance ({qc['chance_match_rate']:.2f})")
    if qc["inlier_fraction"] < 0.5:
        reasons.append(f"inlier fraction {qc['inlier_fraction']:.2f} < 0.5")
    qc["ok"] = not reasons
    qc["reason"] = "; ".join(reasons)

    ids = x.cell_ids[okx[xi]]
    out["residuals"] = pd.DataFrame({
        "cell_id": ids.astype(str),
        "he_x": p[hi, 0], "he_y": p[hi, 1],
        "x_um": xen[xi, 0], "y_um": xen[xi, 1],
        "dx_um": vec[:, 0], "dy_um": vec[:, 1],
        "distance_um": dist, "inlier": inlier,
    })
    out["alignment"] = check_alignment(np.diag([1 / ps, 1 / ps, 1.0]) @ a2, "register_he")
    out["nonrigid"] = warp
    return out


def _evidence(mapped: np.ndarray, xen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ._reg_nuclei import node_offsets, pairs_after_offsets

    _, off, _, node = node_offsets(mapped, xen, PASS2["node_um"], PASS2["radius_um"])
    hi, xi, _ = pairs_after_offsets(mapped, node, off, xen, PASS2["pair_um"])
    return hi, xi


def _empty_residuals() -> pd.DataFrame:
    return pd.DataFrame({
        "cell_id": pd.Series([], dtype=str), **{c: pd.Series([], dtype=np.float64) for c in
                                               ("he_x", "he_y", "x_um", "y_um", "dx_um", "dy_um", "distance_um")},
        "inlier": pd.Series([], dtype=bool),
    })
