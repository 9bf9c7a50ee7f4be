"""The synthetic tumour section: compartments, cell positions, cell types and nucleus shapes (micrometres).

Everything here is geometry in micrometres; rendering to pixels lives in ``_render.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ._panel import CELL_TYPES, FINE_TYPES, FINE_WEIGHTS

# compartment codes of the raster
STROMA, TUMOUR, LYMPHOID, DUCT, DUCT_LUMEN, VESSEL_LUMEN = 0, 1, 2, 3, 4, 5
COMPARTMENTS = ("stroma", "tumour nest", "lymphoid aggregate", "normal duct", "duct lumen", "vessel")

RASTER_UM = 2.0  # compartment raster resolution
# cells per um^2 in the randomly filled compartments
DENSITY = {STROMA: 1 / 230.0, TUMOUR: 1 / 105.0, LYMPHOID: 1 / 42.0}
# cell-type mix per randomly filled compartment
MIX = {
    TUMOUR: {"tumour epithelium": 0.86, "macrophage": 0.05, "T cell": 0.05, "fibroblast": 0.03, "B cell": 0.01},
    STROMA: {"fibroblast": 0.56, "T cell": 0.15, "macrophage": 0.13, "B cell": 0.05, "endothelial": 0.07,
             "tumour epithelium": 0.04},
    LYMPHOID: {"B cell": 0.52, "T cell": 0.38, "macrophage": 0.06, "fibroblast": 0.02, "endothelial": 0.02},
}

# nucleus shape per type: semi-major axis (um, log-normal), elongation (major/minor), boundary irregularity,
# hematoxylin density (relative; higher = darker), vesicular chromatin, cytoplasm radius beyond nucleus (um)
SHAPE = {
    "tumour epithelium": dict(a=5.3, a_sd=0.21, el=1.35, el_sd=0.18, irr=0.10, dark=0.62, dark_sd=0.12,
                              vesicular=1.0, cyto=4.0),
    "normal epithelium": dict(a=4.1, a_sd=0.08, el=1.2, el_sd=0.08, irr=0.0, dark=0.95, dark_sd=0.07,
                              vesicular=0.0, cyto=3.0),
    "fibroblast": dict(a=6.4, a_sd=0.12, el=3.6, el_sd=0.45, irr=0.0, dark=1.05, dark_sd=0.08,
                       vesicular=0.0, cyto=1.0),
    "T cell": dict(a=2.95, a_sd=0.07, el=1.10, el_sd=0.05, irr=0.0, dark=1.45, dark_sd=0.08,
                   vesicular=0.0, cyto=0.8),
    "B cell": dict(a=3.0, a_sd=0.07, el=1.10, el_sd=0.05, irr=0.0, dark=1.42, dark_sd=0.08,
                   vesicular=0.0, cyto=0.9),
    "macrophage": dict(a=4.5, a_sd=0.10, el=1.55, el_sd=0.15, irr=0.07, dark=0.55, dark_sd=0.08,
                       vesicular=0.6, cyto=6.5),
    "endothelial": dict(a=6.2, a_sd=0.10, el=2.8, el_sd=0.3, irr=0.0, dark=0.9, dark_sd=0.08,
                        vesicular=0.0, cyto=0.8),
}
EXPANSION_UM = 5.0  # Xenium nucleus-expansion distance
FOV_UM = 560.0  # side of a field of view (the fov_name of each molecule)
FOV_ROWS, FOV_COLS = 26, 99  # fields of view are named A1 .. Z99
MEAN_AREA_UM2 = 133.0  # um^2 per cell, the average over the compartment mix
ASPECT = 1.15  # width / height of the section is ASPECT**2


def max_cells() -> int:
    """The largest section the model lays out: its height must fit the FOV rows A-Z (14.56 mm).

    The section is ``side * ASPECT`` by ``side / ASPECT`` um with ``side = sqrt(n * MEAN_AREA_UM2 * 1.06)``, grown by
    up to a few per cent when the first placement falls short; this bound keeps 4 % in reserve for that.
    """
    side = FOV_ROWS * FOV_UM * ASPECT / 1.04
    return int(side**2 / (MEAN_AREA_UM2 * 1.06)) // 100_000 * 100_000


@dataclass
class Tissue:
    """The section: field size, compartment raster, cells (one row each) and the fibre-orientation field."""

    width_um: float
    height_um: float
    raster: np.ndarray  # (ny, nx) uint8 compartment codes at RASTER_UM
    orientation: np.ndarray  # (ny, nx) float32 collagen fibre angle (radians)
    cells: pd.DataFrame  # x, y (um), cell_type, cell_type_fine, compartment, nucleus shape parameters


def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-9)


def _compartments(width: float, height: float, rng: np.random.Generator):
    ny, nx = int(np.ceil(height / RASTER_UM)), int(np.ceil(width / RASTER_UM))
    raster = np.full((ny, nx), STROMA, np.uint8)
    # tumour nests: thresholded two-scale smooth noise, about 40 % of the area
    field = _smooth_noise((ny, nx), 70 / RASTER_UM, rng) + 0.35 * _smooth_noise((ny, nx), 18 / RASTER_UM, rng)
    raster[field > np.quantile(field, 0.60)] = TUMOUR
    area_mm2 = width * height / 1e6
    stroma_far = ndi.distance_transform_edt(raster != TUMOUR) * RASTER_UM

    def free_spot(min_dist, radius):
        radius = min(radius, 0.45 * min(width, height))
        for _ in range(200):
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            iy, ix = int(cy / RASTER_UM), int(cx / RASTER_UM)
            if stroma_far[iy, ix] >= min_dist and raster[iy, ix] == STROMA:
                return cx, cy
        return None

    # lymphoid aggregates (tertiary lymphoid structures) in the stroma
    for _ in range(max(1, int(round(1.6 * area_mm2)))):
        r = rng.uniform(55, 110)
        spot = free_spot(r * 0.6, r)
        if spot is None:
            continue
        win, (wy, wx) = _window(raster, spot, r)
        d = np.hypot((wx - spot[0]) / r, (wy - spot[1]) / (r * rng.uniform(0.7, 1.0)))
        win[(d < 1.0) & (win == STROMA)] = LYMPHOID
    # normal ducts: lumen surrounded by a two-layer epithelium
    ducts = []
    for _ in range(max(1, int(round(2.0 * area_mm2)))):
        r_l = rng.uniform(10, 22)
        spot = free_spot(r_l + 20, r_l + 20)
        if spot is None:
            continue
        win, (wy, wx) = _window(raster, spot, r_l + 14)
        d = np.hypot(wx - spot[0], wy - spot[1])
        win[(d < r_l + 14) & (win == STROMA)] = DUCT
        win[d < r_l] = DUCT_LUMEN
        ducts.append((spot[0], spot[1], r_l))
    # vessels: small lumens lined by endothelium, in stroma and at nest borders
    vessels = []
    for _ in range(int(round(45 * area_mm2)) + 2):
        r_v = rng.uniform(4, 14)
        spot = free_spot(3, r_v + 4)
        if spot is None:
            continue
        win, (wy, wx) = _window(raster, spot, r_v + 3)
        d = np.hypot(wx - spot[0], wy - spot[1])
        if np.any(win[d < r_v + 3] == VESSEL_LUMEN):
            continue
        win[d < r_v] = VESSEL_LUMEN
        vessels.append((spot[0], spot[1], r_v))
    orientation = (np.pi * (0.5 + 0.5 * np.tanh(_smooth_noise((ny, nx), 50 / RASTER_UM, rng)))).astype(np.float32)
    return raster, orientation, ducts, vessels


def _window(raster, centre, radius):
    """A writable view of the raster around ``centre`` (um) and the um coordinates of its pixels."""
    r0 = max(0, int((centre[1] - radius) / RASTER_UM) - 1)
    r1 = min(raster.shape[0], int((centre[1] + radius) / RASTER_UM) + 2)
    c0 = max(0, int((centre[0] - radius) / RASTER_UM) - 1)
    c1 = min(raster.shape[1], int((centre[0] + radius) / RASTER_UM) + 2)
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32) * RASTER_UM
    return raster[r0:r1, c0:c1], (yy, xx)


def _lookup(raster, x, y):
    iy = np.clip((y / RASTER_UM).astype(int), 0, raster.shape[0] - 1)
    ix = np.clip((x / RASTER_UM).astype(int), 0, raster.shape[1] - 1)
    return raster[iy, ix]


def _jittered(width, height, spacing, rng):
    xs = np.arange(spacing / 2, width, spacing)
    ys = np.arange(spacing / 2, height, spacing)
    gx, gy = np.meshgrid(xs, ys)
    # hexagonal offset of every other row, then jitter
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    x = gx.ravel() + rng.uniform(-0.32, 0.32, gx.size) * spacing
    y = gy.ravel() + rng.uniform(-0.32, 0.32, gy.size) * spacing
    keep = (x > 1) & (x < width - 1) & (y > 1) & (y < height - 1)
    return x[keep], y[keep]


def _ring(cx, cy, radius, spacing, rng):
    n = max(3, int(2 * np.pi * radius / spacing))
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    ang = ang + rng.uniform(-0.15, 0.15, n) * 2 * np.pi / n
    r = radius + rng.normal(0, 0.4, n)
    return cx + r * np.cos(ang), cy + r * np.sin(ang), ang


def _place(width, height, rng):
    raster, orientation, ducts, vessels = _compartments(width, height, rng)
    parts = []
    for comp, dens in DENSITY.items():
        spacing = 1 / np.sqrt(dens * 2 / np.sqrt(3))  # hexagonal packing at this density
        x, y = _jittered(width, height, spacing, rng)
        keep = _lookup(raster, x, y) == comp
        x, y = x[keep], y[keep]
        names = list(MIX[comp])
        p = np.array([MIX[comp][n] for n in names])
        types = np.array(names, dtype=object)[rng.choice(len(names), size=len(x), p=p / p.sum())]
        parts.append(pd.DataFrame({"x": x, "y": y, "cell_type": types, "compartment": COMPARTMENTS[comp],
                                   "tangent": np.nan, "layer": ""}))
    for cx, cy, r_l in ducts:
        for radius, spacing, layer in ((r_l + 3.5, 7.5, "luminal"), (r_l + 10.0, 9.5, "basal")):
            x, y, ang = _ring(cx, cy, radius, spacing, rng)
            parts.append(pd.DataFrame({"x": x, "y": y, "cell_type": "normal epithelium",
                                       "compartment": "normal duct", "tangent": ang + np.pi / 2, "layer": layer}))
    for cx, cy, r_v in vessels:
        x, y, ang = _ring(cx, cy, r_v + 1.6, 11.0, rng)
        parts.append(pd.DataFrame({"x": x, "y": y, "cell_type": "endothelial", "compartment": "vessel",
                                   "tangent": ang + np.pi / 2, "layer": ""}))
    cells = pd.concat(parts, ignore_index=True)
    inside = (cells.x > 2) & (cells.x < width - 2) & (cells.y > 2) & (cells.y < height - 2)
    return raster, orientation, cells[inside].reset_index(drop=True)


def make_tissue(n_cells: int, rng: np.random.Generator) -> Tissue:
    """Lay out a tumour section holding exactly ``n_cells`` cells (at most :func:`max_cells`)."""
    if n_cells > max_cells():
        raise ValueError(f"n_cells={n_cells:,} is more than the tissue model can lay out ({max_cells():,}: the section "
                         f"must fit the {FOV_ROWS} field-of-view rows A-Z, {FOV_ROWS * FOV_UM / 1000:.2f} mm high)")
    side = np.sqrt(n_cells * MEAN_AREA_UM2 * 1.06)
    for _ in range(4):
        width, height = side * ASPECT, side / ASPECT
        raster, orientation, cells = _place(width, height, rng)
        if len(cells) >= n_cells:
            break
        side *= np.sqrt(n_cells / max(len(cells), 1)) * 1.04
    else:
        raise ValueError(f"the tissue model placed only {len(cells):,} of n_cells={n_cells:,} cells in four rounds")
    if height > FOV_ROWS * FOV_UM:
        raise ValueError(f"n_cells={n_cells:,} gives a section {height / 1000:.2f} mm high, more than the "
                         f"{FOV_ROWS} field-of-view rows A-Z ({FOV_ROWS * FOV_UM / 1000:.2f} mm); use fewer cells")
    # drop surplus cells at random from the randomly filled compartments (structured ones stay whole)
    surplus = len(cells) - n_cells
    if surplus > 0:
        free = np.flatnonzero(cells.compartment.isin(["stroma", "tumour nest", "lymphoid aggregate"]).to_numpy())
        if surplus > len(free):
            raise ValueError(f"the tissue model cannot lay out n_cells={n_cells:,}: the ducts and vessels of the "
                             f"section alone hold {len(cells) - len(free):,} cells")
        drop = rng.choice(free, size=surplus, replace=False)
        cells = cells.drop(index=drop).reset_index(drop=True)
    cells = _nuclei(cells, orientation, rng)
    return Tissue(width, height, raster, orientation, cells)


def _nuclei(cells: pd.DataFrame, orientation: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    n = len(cells)
    types = cells.cell_type.to_numpy()
    cols = {k: np.zeros(n) for k in ("a", "b", "phi", "c3", "p3", "c4", "p4", "dark", "vesicular", "cyto",
                                     "nuc_dx", "nuc_dy")}
    fine = np.empty(n, dtype=object)
    for t in CELL_TYPES:
        m = types == t
        k = int(m.sum())
        if k == 0:
            continue
        s = SHAPE[t]
        a = s["a"] * np.exp(rng.normal(0, s["a_sd"], k))
        el = np.maximum(1.0, s["el"] * np.exp(rng.normal(0, s["el_sd"] / s["el"], k)))
        cols["a"][m] = a
        cols["b"][m] = a / el
        cols["phi"][m] = rng.uniform(0, np.pi, k)
        cols["c3"][m] = np.abs(rng.normal(0, s["irr"], k))
        cols["c4"][m] = np.abs(rng.normal(0, s["irr"] * 0.7, k))
        cols["p3"][m] = rng.uniform(0, 2 * np.pi, k)
        cols["p4"][m] = rng.uniform(0, 2 * np.pi, k)
        cols["dark"][m] = np.clip(rng.normal(s["dark"], s["dark_sd"], k), 0.2, None)
        cols["vesicular"][m] = s["vesicular"]
        cols["cyto"][m] = s["cyto"] * np.exp(rng.normal(0, 0.15, k))
        # nucleolus position (fraction of the semi-axes)
        r, ang = 0.45 * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
        cols["nuc_dx"][m], cols["nuc_dy"][m] = r * np.cos(ang), r * np.sin(ang)
        w = np.asarray(FINE_WEIGHTS[t])
        fine[m] = np.asarray(FINE_TYPES[t], dtype=object)[rng.choice(len(w), size=k, p=w / w.sum())]
    # fibroblasts follow the collagen fibres; endothelium lies flat along its lumen; ducts: by layer
    fib = types == "fibroblast"
    cols["phi"][fib] = _lookup(orientation, cells.x.to_numpy()[fib], cells.y.to_numpy()[fib]) + rng.normal(0, 0.15, fib.sum())
    tang = cells.tangent.to_numpy()
    has_t = np.isfinite(tang)
    cols["phi"][has_t] = tang[has_t] + rng.normal(0, 0.1, has_t.sum())
    layer = cells.layer.to_numpy()
    fine[layer == "luminal"] = "Luminal epithelium"
    basal = layer == "basal"
    fine[basal] = "Basal/myoepithelial cell"
    # myoepithelial nuclei are flatter, along the duct
    cols["b"][basal] = cols["a"][basal] / 1.7
    out = cells.drop(columns=["tangent", "layer"]).assign(**cols)
    out["cell_type_fine"] = fine
    return out


def radius_factor(c3, p3, c4, p4, cos_a, sin_a):
    """Boundary irregularity h(alpha) = 1 + c3 cos 3(alpha - p3) + c4 cos 4(alpha - p4) (broadcasting)."""
    c3a = np.cos(3 * p3) * (4 * cos_a**3 - 3 * cos_a) + np.sin(3 * p3) * (3 * sin_a - 4 * sin_a**3)
    c2 = 2 * cos_a**2 - 1
    s2 = 2 * sin_a * cos_a
    cos4 = 2 * c2**2 - 1
    sin4 = 2 * s2 * c2
    c4a = np.cos(4 * p4) * cos4 + np.sin(4 * p4) * sin4
    return 1 + c3 * c3a + c4 * c4a


def nucleus_polygons(cells: pd.DataFrame, n_vertices: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (n_cells, n_vertices) x and y in um of each nucleus outline (star-shaped, counter-clockwise)."""
    alpha = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)[None, :]
    a, b = cells.a.to_numpy()[:, None], cells.b.to_numpy()[:, None]
    ca, sa = np.cos(alpha), np.sin(alpha)
    r = 1.0 / np.sqrt((ca / a) ** 2 + (sa / b) ** 2)
    r = r * radius_factor(cells.c3.to_numpy()[:, None], cells.p3.to_numpy()[:, None],
                          cells.c4.to_numpy()[:, None], cells.p4.to_numpy()[:, None], ca, sa)
    phi = cells.phi.to_numpy()[:, None]
    x = cells.x.to_numpy()[:, None] + r * np.cos(alpha + phi)
    y = cells.y.to_numpy()[:, None] + r * np.sin(alpha + phi)
    return x, y


def cell_polygons(cells: pd.DataFrame, n_vertices: int = 24, chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Cell outlines: the nucleus expanded by up to 5 um, stopped half-way to each neighbour (Voronoi)."""
    from scipy.spatial import cKDTree

    xy = cells[["x", "y"]].to_numpy()
    k = min(9, len(xy))
    _, nb = cKDTree(xy).query(xy, k=k)
    nb = nb[:, 1:]
    alpha = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    u = np.stack([np.cos(alpha), np.sin(alpha)], axis=1)  # (V, 2)
    a_all, b_all, phi_all = cells.a.to_numpy(), cells.b.to_numpy(), cells.phi.to_numpy()
    c3, p3, c4, p4 = (cells[c].to_numpy() for c in ("c3", "p3", "c4", "p4"))
    x = np.empty((len(xy), n_vertices))
    y = np.empty((len(xy), n_vertices))
    for s in range(0, len(xy), chunk):  # (cells, vertices, neighbours) blocks: bounded memory
        sl = slice(s, s + chunk)
        d = xy[nb[sl]] - xy[sl, None, :]  # (n, k-1, 2)
        proj = np.einsum("nkc,vc->nvk", d, u)  # distance along direction
        dist2 = np.sum(d**2, axis=2)[:, None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            lim = np.where(proj > 1e-6, dist2 / (2 * proj), np.inf).min(axis=2)  # (n, V)
        # nucleus radius in these (unrotated) directions
        rel = alpha[None, :] - phi_all[sl, None]
        a, b = a_all[sl, None], b_all[sl, None]
        ca, sa = np.cos(rel), np.sin(rel)
        r_n = 1.0 / np.sqrt((ca / a) ** 2 + (sa / b) ** 2)
        r_n = r_n * radius_factor(c3[sl, None], p3[sl, None], c4[sl, None], p4[sl, None], ca, sa)
        r = np.minimum(r_n + EXPANSION_UM, np.maximum(lim, r_n + 0.3))
        x[sl] = xy[sl, 0:1] + r * u[None, :, 0]
        y[sl] = xy[sl, 1:2] + r * u[None, :, 1]
    return x, y


@dataclass
class Deformation:
    """A smooth displacement field of the tissue (um -> um): two crossed sine waves per axis with random phases,
    scaled so that the largest displacement over the plane is ``amplitude_um``.

    It stands for the stretching of a section between Xenium imaging and H&E staining; the H&E is rendered
    through it (see :class:`~cellsymphony.datasets._render.HERenderer`).
    """

    amplitude_um: float
    wavelength_um: float
    phases: np.ndarray  # (4,)

    @classmethod
    def random(cls, amplitude_um: float, wavelength_um: float, rng: np.random.Generator) -> Deformation:
        return cls(float(amplitude_um), float(wavelength_um), rng.uniform(0, 2 * np.pi, 4))

    def __call__(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        k = 2 * np.pi / self.wavelength_um
        p = self.phases
        a = self.amplitude_um / (1.5 * np.sqrt(2.0))  # each component peaks at 1.5 a; the magnitude at amplitude
        dx = a * (np.sin(k * np.asarray(y) + p[0]) + 0.5 * np.sin(0.7 * k * np.asarray(x) + p[1]))
        dy = a * (np.sin(k * np.asarray(x) + p[2]) + 0.5 * np.sin(0.6 * k * np.asarray(y) + p[3]))
        return dx, dy

    def record(self) -> dict:
        return {"amplitude_um": self.amplitude_um, "wavelength_um": self.wavelength_um,
                "phases": [float(v) for v in self.phases]}
