"""Stain estimation, normalisation and augmentation of H&E pixels (numpy), and a patch source that applies them.

Two normalisations, both written here in a few lines of numpy (see the docs page *H&E-only slides* for
why no library is used):

- **Macenko** (Macenko et al., ISBI 2009): pixels are turned into optical density (OD); the plane of the
  two main directions of the tissue OD holds both stains; the extreme angles in that plane (robust
  percentiles) are the hematoxylin and eosin vectors. Each pixel's stain concentrations are its OD
  solved against those vectors; normalising rescales the concentrations to the reference's robust
  maximum and recomposes them with the reference's vectors.
- **Reinhard** (Reinhard et al., 2001): the mean and standard deviation of each CIE-Lab channel of the
  tissue pixels are matched to the reference's.

A *stain record* is a flat dict of numbers and arrays (safe in ``uns``): ``{"method": "macenko",
"stain_matrix": (3, 2), "max_concentrations": (2,)}`` or ``{"method": "reinhard", "lab_mean": (3,),
"lab_std": (3,)}``. A *transform* maps patches of one slide (its record) to a reference record;
``{"method": "jitter", ...}`` instead perturbs each patch at random (training-time augmentation).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ._patch_source import PatchSource

METHODS = ("macenko", "reinhard")
OD_THRESHOLD = 0.15  # OD (summed over channels / 3 in Macenko's paper: per channel here) below which a pixel is glass
ANGLE_PERCENTILE = 1.0  # robust extreme angles (percent) of Macenko's method
CONCENTRATION_PERCENTILE = 99.0  # robust maximum of each stain's concentration


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-log((I + 1) / 256)`` of uint8 RGB values, any shape ``(..., 3)``."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


def tissue_pixels(rgb: np.ndarray, threshold: float = OD_THRESHOLD) -> np.ndarray:
    """The ``(n, 3)`` uint8 pixels of ``rgb`` whose OD exceeds ``threshold`` in every channel (not glass)."""
    px = np.asarray(rgb).reshape(-1, 3)
    return px[(optical_density(px) > threshold).all(axis=1)]


def macenko_estimate(pixels: np.ndarray) -> dict:
    """Macenko stain record of tissue pixels ``(n, 3)`` uint8 (at least a few hundred).

    Returns ``{"method": "macenko", "stain_matrix": (3, 2) unit OD vectors (hematoxylin, eosin),
    "max_concentrations": (2,)}``.
    """
    px = np.asarray(pixels).reshape(-1, 3)
    if len(px) < 100:
        raise ValueError(f"Macenko stain estimation needs at least 100 tissue pixels, got {len(px)} (is the slide blank?).")
    od = optical_density(px)
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, [2, 1]]  # the two largest directions
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # hematoxylin absorbs red most (relative to blue): the vector with the larger R/B ratio
    h, e = (v1, v2) if v1[0] / max(v1[2], 1e-6) > v2[0] / max(v2[2], 1e-6) else (v2, v1)
    matrix = np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)], axis=1)
    conc = np.linalg.lstsq(matrix, od.T, rcond=None)[0]
    max_c = np.percentile(conc, CONCENTRATION_PERCENTILE, axis=1)
    return {"method": "macenko", "stain_matrix": matrix, "max_concentrations": np.maximum(max_c, 1e-6)}


def _rgb2lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.uint8).reshape(-1, 1, 3)).reshape(-1, 3)


def reinhard_estimate(pixels: np.ndarray) -> dict:
    """Reinhard stain record (``lab_mean``, ``lab_std``) of tissue pixels ``(n, 3)`` uint8."""
    px = np.asarray(pixels).reshape(-1, 3)
    if len(px) < 100:
        raise ValueError(f"Reinhard stain estimation needs at least 100 tissue pixels, got {len(px)} (is the slide blank?).")
    lab = _rgb2lab(px)
    return {"method": "reinhard", "lab_mean": lab.mean(axis=0), "lab_std": np.maximum(lab.std(axis=0), 1e-6)}


def estimate(pixels: np.ndarray, method: str) -> dict:
    """The stain record of ``method`` (``"macenko"`` or ``"reinhard"``) of tissue pixels."""
    if method == "macenko":
        return macenko_estimate(pixels)
    if method == "reinhard":
        return reinhard_estimate(pixels)
    raise ValueError(f"method={method!r} is not one of {list(METHODS)}.")


def normalize(rgb: np.ndarray, source: dict, reference: dict) -> np.ndarray:
    """``rgb`` (uint8, ``(..., 3)``) of a slide with stain record ``source`` mapped to the ``reference`` stain.

    Glass (pixels below the OD threshold in every channel) is left as it is by Reinhard's method; Macenko's
    maps it through the same linear model, which keeps it near white.
    """
    method = str(source["method"])
    if str(reference["method"]) != method:
        raise ValueError(f"The stain records use different methods: {method!r} and {reference['method']!r}.")
    arr = np.asarray(rgb, dtype=np.uint8)
    px = arr.reshape(-1, 3)
    if method == "macenko":
        od = optical_density(px)
        conc = np.linalg.lstsq(np.asarray(source["stain_matrix"]), od.T, rcond=None)[0]
        conc *= (np.asarray(reference["max_concentrations"]) / np.asarray(source["max_concentrations"]))[:, None]
        out = _from_od((np.asarray(reference["stain_matrix"]) @ conc).T)
    elif method == "reinhard":
        from skimage.color import lab2rgb

        lab = _rgb2lab(px)
        lab = (lab - np.asarray(source["lab_mean"])) / np.asarray(source["lab_std"])
        lab = lab * np.asarray(reference["lab_std"]) + np.asarray(reference["lab_mean"])
        out = (np.clip(lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3), 0, 1) * 255).round().astype(np.uint8)
        glass = ~(optical_density(px) > OD_THRESHOLD).any(axis=1)
        out[glass] = px[glass]
    else:
        raise ValueError(f"Unknown stain method {method!r}: one of {list(METHODS)}.")
    return out.reshape(arr.shape)


# standard hematoxylin / eosin / residual OD vectors of Ruifrok & Johnston, for the augmentation
_RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """One random stain perturbation of one patch (HED augmentation, Tellez et al. 2018, plus a hue turn).

    The patch is deconvolved into hematoxylin, eosin and residual concentrations (Ruifrok's vectors); each
    concentration is scaled by ``U(1 - strength, 1 + strength)`` and shifted by ``U(-strength, strength) / 10``,
    the hematoxylin and eosin vectors are turned by up to ``strength`` radians, and the patch recomposed.
    """
    arr = np.asarray(rgb, dtype=np.uint8)
    od = optical_density(arr.reshape(-1, 3))
    basis = _RUIFROK / np.linalg.norm(_RUIFROK, axis=1, keepdims=True)
    conc = od @ np.linalg.inv(basis)
    conc = conc * rng.uniform(1 - strength, 1 + strength, 3) + rng.uniform(-strength, strength, 3) / 10.0
    turned = basis.copy()
    for i in (0, 1):
        v = turned[i] + rng.normal(0, strength, 3)
        turned[i] = np.abs(v) / np.linalg.norm(v)
    return _from_od(conc @ turned).reshape(arr.shape)


def _patch_seed(seed: int, xy: np.ndarray) -> list[int]:
    """A seed per patch from its centre (so a patch gets the same draw in any batch or worker)."""
    q = np.round(np.asarray(xy, dtype=np.float64) * 100).astype(np.int64)
    return [int.from_bytes(hashlib.blake2b(np.r_[seed, row].tobytes(), digest_size=8).digest(), "little") for row in q]


def apply_transform(patches: np.ndarray, transform: dict, xy_um: np.ndarray) -> np.ndarray:
    """Apply a transform (``{"method": ..., "source": record, "reference": record}`` or a jitter) to patches."""
    method = str(transform["method"])
    if method == "jitter":
        seeds = _patch_seed(int(transform["seed"]), xy_um)
        out = np.empty_like(patches)
        for i, p in enumerate(patches):
            out[i] = jitter(p, np.random.default_rng(seeds[i]), float(transform["strength"]))
        return out
    return normalize(patches, transform["source"], transform["reference"])


@dataclass
class StainedSource(PatchSource):
    """A :class:`PatchSource` whose patches go through a stain transform (normalisation or jitter)."""

    transform: dict = field(default_factory=dict)

    @classmethod
    def wrap(cls, src: PatchSource, transform: dict) -> StainedSource:
        """The same slide and registration as ``src``, read through ``transform``."""
        return cls(src.he_path, src.alignment, src.pixel_size, he_mpp=src.he_mpp, sample=src.sample,
                   cache_tiles=src.cache_tiles, warp=src.warp, transform=transform)

    @property
    def has_transform(self) -> bool:
        """Patches cut from bands go through :meth:`transform_patches`."""
        return True

    def transform_patches(self, patches: np.ndarray, xy_um: np.ndarray) -> np.ndarray:
        """The stain transform of patches centred on ``xy_um`` (cut from bands)."""
        return apply_transform(patches, self.transform, np.asarray(xy_um, dtype=np.float64).reshape(-1, 2))

    def read(self, xy_um: np.ndarray, *, size: int = 224, mpp: float = 0.5, level: int | None = None) -> np.ndarray:
        """Patches as :meth:`PatchSource.read`, then transformed."""
        patches = super().read(xy_um, size=size, mpp=mpp, level=level)
        return apply_transform(patches, self.transform, np.asarray(xy_um, dtype=np.float64).reshape(-1, 2))


def record_arrays(record: dict) -> dict:
    """A stain record read back from ``uns`` with its arrays as numpy float arrays and its method as str."""
    out = {}
    for k, v in record.items():
        out[k] = str(v) if k == "method" else np.asarray(v, dtype=np.float64)
    return out
