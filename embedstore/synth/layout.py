"""Slide layout: tissue outline, compartments (regions), glands, vessels and cells.

Everything is decided here, before any pixel is drawn, on a coarse grid of `f` level-0 pixels
per cell (about 4 µm). Rendering (render.py) only reads these arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

from .spec import (
    CLASS_MORPH,
    CLASSES,
    MORPHS,
    REGION_LOOKS,
    REGIONS,
    REQUIRED_ZONES,
    RID,
    STAIN_E,
    STAIN_H,
    TISSUE_STYLES,
    TUMOUR_REGIONS,
    ZONES,
)
from .textures import FIBRE_ANGLES_DEG

TISSUE_RADIUS = 0.45  # tissue ellipse radii as a share of the slide width / height
TISSUE_FRACTION = math.pi * TISSUE_RADIUS**2  # share of the slide rectangle covered by the tissue ellipse
ZONE_SIZE_UM = 330.0
CID = {name: i for i, name in enumerate(CLASSES)}
FIELDS = ("od_h", "od_e", "fib0", "fib1", "fib2", "fat", "gran")
N_HARMONICS = 4  # outline harmonics k = 2..5


@dataclass
class SlideLayout:
    """Everything needed to render one slide and write its tables (positions in level-0 px)."""

    slide_id: str
    tissue: str
    mpp: float
    width: int
    height: int
    f: int  # level-0 px per coarse cell
    region: np.ndarray  # (Hc, Wc) int8 region id, -1 = glass
    fields: np.ndarray  # (len(FIELDS), Hc, Wc) float32 background parameters
    stain: np.ndarray  # (2, 3) OD vectors of haematoxylin and eosin
    light: np.ndarray  # (3,) glass brightness 0..255
    tex_offset: tuple[int, int]
    cells: dict[str, np.ndarray]
    glands: dict[str, np.ndarray]
    vessels: dict[str, np.ndarray]
    rbcs: dict[str, np.ndarray]
    info: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- noise helpers
def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise (sd 1) with correlation length `sigma` grid cells."""
    k = max(1.0, sigma / 4.0)
    small = (int(math.ceil(shape[0] / k)) + 3, int(math.ceil(shape[1] / k)) + 3)
    noise = ndimage.gaussian_filter(rng.standard_normal(small), sigma / k, mode="wrap")
    out = ndimage.zoom(noise, k, order=1)[: shape[0], : shape[1]]
    if out.shape != shape:  # zoom rounding: pad by edge values
        out = np.pad(out, [(0, shape[0] - out.shape[0]), (0, shape[1] - out.shape[1])], "edge")
    return ((out - out.mean()) / (out.std() + 1e-9)).astype(np.float32)


def coarse_factor(mpp: float) -> int:
    """Level-0 px per coarse cell: a power of two near 4 µm, so 256-px tiles hold whole cells."""
    return int(2 ** min(6, max(0, round(math.log2(4.0 / mpp)))))


def slide_size(n_cells: int, density_per_mm2: float, mpp: float, aspect: float) -> tuple[int, int]:
    """Level-0 (width, height) in px, multiples of 256, for `n_cells` at the given density."""
    tissue_um2 = n_cells / density_per_mm2 * 1e6
    box_um2 = tissue_um2 / TISSUE_FRACTION
    h_um = math.sqrt(box_um2 / aspect)
    w_px = max(1024, int(math.ceil(h_um * aspect / mpp / 256)) * 256)
    h_px = max(768, int(math.ceil(h_um / mpp / 256)) * 256)
    return w_px, h_px


# ---------------------------------------------------------------------------- compartments
def _zones(rng: np.random.Generator, tissue_mask: np.ndarray, cu: float, tissue: str
           ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Warped Voronoi compartments over the tissue. Returns zone map, kinds, seeds, warped xy."""
    hc, wc = tissue_mask.shape
    area_um2 = tissue_mask.sum() * cu * cu
    zone_um = min(ZONE_SIZE_UM, math.sqrt(area_um2 / 8.0))
    n_zones = max(len(REQUIRED_ZONES) + 1, int(round(area_um2 / zone_um**2)))
    iy, ix = np.nonzero(tissue_mask)
    min_d = 0.55 * zone_um / cu
    seeds: list[tuple[float, float]] = []
    for _ in range(60 * n_zones):
        j = rng.integers(len(iy))
        p = (iy[j] + rng.random(), ix[j] + rng.random())
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > min_d**2 for q in seeds):
            seeds.append(p)
            if len(seeds) == n_zones:
                break
    seed_arr = np.array(seeds)
    amp = 0.35 * zone_um / cu
    wy = smooth_field(rng, (hc, wc), 0.4 * zone_um / cu) * amp
    wx = smooth_field(rng, (hc, wc), 0.4 * zone_um / cu) * amp
    yy, xx = np.mgrid[0:hc, 0:wc].astype(np.float32) + 0.5
    warped = np.stack([yy + wy, xx + wx], axis=-1)
    _, zone = cKDTree(seed_arr).query(warped.reshape(-1, 2))
    zone = zone.reshape(hc, wc).astype(np.int32)
    zone[~tissue_mask] = -1
    # required kinds go to the zones with most tissue, the rest is drawn by the organ's weights
    areas = np.bincount(zone[tissue_mask], minlength=len(seeds))
    order = np.argsort(-areas, kind="stable")
    required = list(REQUIRED_ZONES)
    rest = list(rng.permutation(required[1:]))
    kinds: list[str] = [""] * len(seeds)
    kinds[order[0]] = "tumour"  # the largest zone: room for nests and desmoplastic stroma
    for z, kind in zip(order[1:], rest, strict=False):
        kinds[z] = kind
    weights = TISSUE_STYLES[tissue].zone_weights
    p = np.array([weights.get(z, 0.0) for z in ZONES])
    for z in order[len(required):]:
        kinds[z] = ZONES[rng.choice(len(ZONES), p=p / p.sum())]
    return zone, kinds, seed_arr, warped


def _regions(rng: np.random.Generator, zone: np.ndarray, kinds: list[str], seeds: np.ndarray,
             warped: np.ndarray, cu: float) -> np.ndarray:
    shape = zone.shape
    region = np.full(shape, -1, np.int8)
    simple = {"stroma": "normal_stroma", "gland": "gland", "vessel": "vessel_rich",
              "muscle": "muscle", "adipose": "adipose"}
    nest_noise = smooth_field(rng, shape, 16.0 / cu)
    blob_noise = smooth_field(rng, shape, 25.0 / cu)
    for z, kind in enumerate(kinds):
        m = zone == z
        if not m.any():
            continue
        if kind in simple:
            region[m] = RID[simple[kind]]
        elif kind == "tumour":
            thr = np.quantile(nest_noise[m], 0.52)
            region[m & (nest_noise > thr)] = RID["tumour_nest"]
            region[m & (nest_noise <= thr)] = RID["desmoplastic_stroma"]
        else:  # lymphoid: a rounded aggregate inside normal stroma
            r_eq = math.sqrt(m.sum() / math.pi)
            d = np.hypot(warped[..., 0] - seeds[z, 0], warped[..., 1] - seeds[z, 1]) / r_eq
            agg = m & (d + 0.18 * blob_noise < 0.8)
            region[m] = RID["normal_stroma"]
            region[agg] = RID["lymphoid_aggregate"]
    # desmoplastic rim: normal stroma / vessel-rich tissue close to tumour nests
    nests = region == RID["tumour_nest"]
    if nests.any():
        dist_um = ndimage.distance_transform_edt(~nests) * cu
        rim = (dist_um < 45.0) & np.isin(region, [RID["normal_stroma"], RID["vessel_rich"]])
        region[rim] = RID["desmoplastic_stroma"]
    return region


def _background_fields(rng: np.random.Generator, region: np.ndarray, zone: np.ndarray,
                       kinds: list[str], cu: float) -> np.ndarray:
    shape = region.shape
    looks = [REGION_LOOKS[r] for r in REGIONS]
    table = np.array([[lk.od_h, lk.od_e, lk.fibres, lk.fat, lk.granular] for lk in looks],
                     np.float32)
    tissue = region >= 0
    rid = np.where(tissue, region, 0)
    vals = table[rid]  # (Hc, Wc, 5)
    vals[~tissue] = 0.0
    n_z = len(kinds)
    jit = np.exp(rng.normal(0, 0.08, size=(n_z + 1, 2))).astype(np.float32)
    zj = jit[np.where(zone >= 0, zone, n_z)]
    od_h = vals[..., 0] * zj[..., 0] * (1 + 0.15 * smooth_field(rng, shape, 12.0 / cu))
    od_e = vals[..., 1] * zj[..., 1] * (1 + 0.12 * smooth_field(rng, shape, 12.0 / cu))
    # fibre orientation: wandering in stroma, aligned within each muscle zone
    theta = 1.6 * smooth_field(rng, shape, 40.0 / cu)
    zone_angle = rng.uniform(0, np.pi, size=n_z + 1).astype(np.float32)
    muscle = region == RID["muscle"]
    theta[muscle] = (zone_angle[zone[muscle]] + 0.35 * theta[muscle])
    fib = []
    for ang in FIBRE_ANGLES_DEG:
        fib.append(np.exp(2.5 * np.cos(2 * (theta - np.deg2rad(ang)))))
    fsum = np.sum(fib, axis=0) + 1e-6
    fib = [vals[..., 2] * w / fsum for w in fib]
    stack = np.stack([od_h, od_e, *fib, vals[..., 3], vals[..., 4]]).astype(np.float32)
    # soft borders (about one coarse cell) between compartments and at the tissue edge
    return ndimage.gaussian_filter(stack, sigma=(0, 0.8, 0.8), mode="nearest").astype(np.float32)


# ---------------------------------------------------------------------------- structures
def _in_region(region: np.ndarray, f_um: float, y_um: np.ndarray, x_um: np.ndarray) -> np.ndarray:
    iy = np.clip((y_um / f_um).astype(int), 0, region.shape[0] - 1)
    ix = np.clip((x_um / f_um).astype(int), 0, region.shape[1] - 1)
    return region[iy, ix]


def _sample_points(rng: np.random.Generator, region: np.ndarray, rid: int, n: int, cu: float
                   ) -> np.ndarray:
    """n uniform random points (y, x in µm) inside the coarse cells of region `rid`."""
    iy, ix = np.nonzero(region == rid)
    if len(iy) == 0 or n <= 0:
        return np.zeros((0, 2))
    j = rng.integers(len(iy), size=n)
    return np.column_stack([(iy[j] + rng.random(n)) * cu, (ix[j] + rng.random(n)) * cu])


class DiscSet:
    """Discs (y, x, radius in µm) with a grid hash for fast "does a new disc collide?" checks."""

    def __init__(self, cell_um: float = 40.0) -> None:
        self.cell = cell_um
        self.grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
        self.items: list[tuple[float, float, float]] = []
        self.rmax = 0.0

    def hits(self, y: float, x: float, r: float, gap: float) -> bool:
        cy, cx = int(y // self.cell), int(x // self.cell)
        reach = int((r + gap + self.rmax) // self.cell) + 1
        for gy in range(cy - reach, cy + reach + 1):
            for gx in range(cx - reach, cx + reach + 1):
                for py, px, pr in self.grid.get((gy, gx), ()):
                    if (py - y) ** 2 + (px - x) ** 2 < (pr + r + gap) ** 2:
                        return True
        return False

    def add(self, y: float, x: float, r: float) -> None:
        self.grid.setdefault((int(y // self.cell), int(x // self.cell)), []).append((y, x, r))
        self.items.append((y, x, r))
        self.rmax = max(self.rmax, r)


Nuclei = list[tuple[float, float, float]]  # (y_um, x_um, orientation in radians)


def _glands(rng: np.random.Generator, region: np.ndarray, cu: float, need_nuclei: float,
            taken: DiscSet) -> tuple[dict[str, list[float]], Nuclei]:
    """Glands (epithelial rings round a lumen) in gland regions, and their ductal nuclei."""
    gid = RID["gland"]
    out: dict[str, list[float]] = {k: [] for k in ("y", "x", "a", "b", "angle", "ring")}
    nuclei: Nuclei = []
    if need_nuclei <= 0:
        return out, nuclei
    n_try = int(need_nuclei / 6 * 8) + 20
    cand = _sample_points(rng, region, gid, n_try, cu)
    a = rng.uniform(14, 30, n_try)
    b = a / rng.uniform(1.0, 1.4, n_try)
    ang = rng.uniform(0, np.pi, n_try)
    ok = np.ones(n_try, bool)
    for t in np.linspace(0, 2 * np.pi, 8, endpoint=False):  # whole gland inside the region
        ok &= _in_region(region, cu, cand[:, 0] + (a + 3) * np.sin(t),
                         cand[:, 1] + (a + 3) * np.cos(t)) == gid
    idx = np.nonzero(ok)[0]
    for i in idx:
        if len(nuclei) >= need_nuclei:
            break
        if taken.hits(cand[i, 0], cand[i, 1], a[i], 6.0):
            continue
        taken.add(cand[i, 0], cand[i, 1], a[i])
        ring = rng.uniform(7.0, 9.0)
        for key, val in zip(out, (cand[i, 0], cand[i, 1], a[i], b[i], ang[i], ring), strict=True):
            out[key].append(val)
        # nuclei on the mid-ring ellipse, equally spaced in arc length, oriented radially
        am, bm = a[i] - 0.55 * ring, b[i] - 0.55 * ring
        t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
        ex, ey = am * np.cos(t), bm * np.sin(t)
        arc = np.concatenate([[0], np.cumsum(np.hypot(np.diff(ex), np.diff(ey)))])
        n = max(4, int(arc[-1] / 9.5))
        start = rng.uniform(0, arc[-1] / n)
        for s in start + np.arange(n) * arc[-1] / n:
            if rng.random() > 0.9:
                continue
            k = int(np.searchsorted(arc, s)) % len(t)
            lx, ly = ex[k], ey[k]
            c, si = math.cos(ang[i]), math.sin(ang[i])
            x = cand[i, 1] + lx * c - ly * si
            y = cand[i, 0] + lx * si + ly * c
            radial = math.atan2(ly * am**2, lx * bm**2) + ang[i]  # ellipse normal direction
            nuclei.append((y + rng.normal(0, 0.4), x + rng.normal(0, 0.4),
                           radial + rng.normal(0, 0.17)))
    return out, nuclei


def _vessels(rng: np.random.Generator, region: np.ndarray, cu: float, rid: int,
             need_nuclei: float, taken: DiscSet
             ) -> tuple[dict[str, list[float]], Nuclei, Nuclei]:
    """Vessels (lumen, endothelial wall, smooth-muscle media when large) in region `rid`."""
    out: dict[str, list[float]] = {k: [] for k in ("y", "x", "r", "media")}
    endo: Nuclei = []
    smc: Nuclei = []
    if need_nuclei <= 0:
        return out, endo, smc
    n_try = int(need_nuclei / 2.5 * 4) + 10
    cand = _sample_points(rng, region, rid, n_try, cu)
    big = rid == RID["vessel_rich"]
    r = rng.uniform(4, 16, n_try) if big else rng.uniform(3, 8, n_try)
    media = np.where(r > 9, rng.uniform(5, 9, n_try), 0.0)
    for i in range(n_try):
        if len(endo) >= need_nuclei:
            break
        outer = r[i] + 1.5 + media[i]
        if _in_region(region, cu, cand[i:i + 1, 0], cand[i:i + 1, 1])[0] != rid:
            continue
        if taken.hits(cand[i, 0], cand[i, 1], outer, 3.0):
            continue
        taken.add(cand[i, 0], cand[i, 1], outer)
        for key, val in zip(out, (cand[i, 0], cand[i, 1], r[i], media[i]), strict=True):
            out[key].append(val)
        n_e = int(np.clip(round(2 * np.pi * r[i] / 14), 2, 8))
        phase = rng.uniform(0, 2 * np.pi)
        for t in phase + 2 * np.pi * (np.arange(n_e) + rng.uniform(-0.2, 0.2, n_e)) / n_e:
            rr = r[i] + 0.9
            endo.append((cand[i, 0] + rr * np.sin(t), cand[i, 1] + rr * np.cos(t),
                         t + np.pi / 2 + rng.normal(0, 0.1)))
        if media[i] > 0:
            rm = r[i] + 1.5 + 0.5 * media[i]
            n_m = int(2 * np.pi * rm / 15)
            for t in rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n_m) / n_m:
                if rng.random() < 0.75:
                    smc.append((cand[i, 0] + rm * np.sin(t), cand[i, 1] + rm * np.cos(t),
                                t + np.pi / 2 + rng.normal(0, 0.1)))
    return out, endo, smc


# ---------------------------------------------------------------------------- cells
def sample_nuclei(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Draw nucleus (and cytoplasm halo) parameters per cell from its class's Morph."""
    n = len(labels)
    out = {k: np.zeros(n, np.float32) for k in (
        "length_um", "width_um", "od", "contrast", "irregular", "taper", "blunt", "halo_um",
        "halo_h", "halo_e", "foamy", "nucleolus_um", "nucleolus_dx", "nucleolus_dy")}
    out["grain"] = np.zeros(n, np.int8)
    out["harm_amp"] = np.zeros((n, N_HARMONICS), np.float32)
    out["harm_phase"] = rng.uniform(0, 2 * np.pi, (n, N_HARMONICS)).astype(np.float32)
    for cname, mname in CLASS_MORPH.items():
        idx = np.nonzero(labels == CID[cname])[0]
        if len(idx) == 0:
            continue
        m = MORPHS[mname]
        k = len(idx)
        length = np.maximum(rng.normal(*m.length, k), 0.6 * m.length[0])
        aspect = np.maximum(rng.normal(*m.aspect, k), 1.0)
        out["length_um"][idx] = length
        out["width_um"][idx] = length / aspect
        out["od"][idx] = np.clip(rng.normal(*m.od, k), 0.3, 2.0)
        out["contrast"][idx] = np.clip(rng.normal(*m.contrast, k), 0.02, 0.8)
        out["grain"][idx] = rng.choice(3, size=k, p=np.asarray(m.grain) / sum(m.grain))
        amps = m.irregular * np.abs(rng.normal(0, 1, (k, N_HARMONICS)))
        amps /= np.arange(2, 2 + N_HARMONICS) ** 0.7
        out["harm_amp"][idx] = np.minimum(amps, 0.18)
        out["irregular"][idx] = amps.sum(axis=1)
        out["taper"][idx] = np.clip(m.taper + rng.normal(0, 0.05, k), 0, 0.85) if m.taper else 0
        out["blunt"][idx] = m.blunt
        has_nuc = rng.random(k) < m.nucleolus
        out["nucleolus_um"][idx] = np.where(has_nuc, rng.uniform(0.7, 1.6, k), 0.0)
        out["nucleolus_dx"][idx] = rng.uniform(-0.25, 0.25, k)
        out["nucleolus_dy"][idx] = rng.uniform(-0.25, 0.25, k)
        out["halo_um"][idx] = np.maximum(rng.normal(*m.halo, k), 0.0)
        out["halo_h"][idx] = m.halo_od[0] * np.exp(rng.normal(0, 0.12, k))
        out["halo_e"][idx] = m.halo_od[1] * np.exp(rng.normal(0, 0.12, k))
        out["foamy"][idx] = m.foamy
    return out


def _thin(points: np.ndarray, radii: np.ndarray, n_forced: int) -> np.ndarray:
    """Greedy acceptance in order: a point is kept unless it overlaps an already kept one.

    The first `n_forced` points are always kept. Returns a boolean keep mask.
    """
    n = len(points)
    keep = np.zeros(n, bool)
    keep[:n_forced] = True
    if n == n_forced:
        return keep
    pairs = cKDTree(points).query_pairs(r=2 * float(radii.max()), output_type="ndarray")
    if len(pairs):
        d = np.hypot(*(points[pairs[:, 0]] - points[pairs[:, 1]]).T)
        pairs = pairs[d < radii[pairs[:, 0]] + radii[pairs[:, 1]]]
    both = np.concatenate([pairs, pairs[:, ::-1]]) if len(pairs) else np.zeros((0, 2), int)
    adj = csr_matrix((np.ones(len(both), bool), (both[:, 0], both[:, 1])), shape=(n, n))
    ptr, nbr = adj.indptr, adj.indices
    for i in range(n_forced, n):
        if not keep[nbr[ptr[i]:ptr[i + 1]]].any():
            keep[i] = True
    return keep


def _free_labels(rng: np.random.Generator, rid: int, n: int, tissue: str) -> np.ndarray:
    mix = dict(REGION_LOOKS[REGIONS[rid]].free_mix)
    for cname, boost in TISSUE_STYLES[tissue].mix_boost.items():
        if cname in mix:
            mix[cname] *= boost
    names = list(mix)
    p = np.array([mix[c] for c in names])
    return np.array([CID[names[j]] for j in rng.choice(len(names), size=n, p=p / p.sum())],
                    dtype=np.int16)


def build_layout(rng: np.random.Generator, slide_id: str, tissue: str, n_cells: int,
                 density_per_mm2: float, mpp: float) -> SlideLayout:
    aspect = rng.uniform(1.1, 1.5)
    width, height = slide_size(n_cells, density_per_mm2, mpp, aspect)
    f = coarse_factor(mpp)
    cu = f * mpp
    hc, wc = height // f, width // f
    yy, xx = (np.mgrid[0:hc, 0:wc] + 0.5) / np.array([hc, wc])[:, None, None]
    rad = np.hypot((yy - 0.5) / TISSUE_RADIUS, (xx - 0.5) / TISSUE_RADIUS)
    edge = 1 + 0.05 * smooth_field(rng, (hc, wc), 0.06 * min(hc, wc))
    tissue_mask = rad < edge
    zone, kinds, seeds, warped = _zones(rng, tissue_mask, cu, tissue)
    region = _regions(rng, zone, kinds, seeds, warped, cu)
    fields = _background_fields(rng, region, zone, kinds, cu)

    # expected cells per region kind, scaled so that the slide holds n_cells
    areas = np.bincount(region[region >= 0].ravel(), minlength=len(REGIONS)) * cu * cu
    dens_w = np.array([REGION_LOOKS[r].density for r in REGIONS])
    expected = n_cells * areas * dens_w / max((areas * dens_w).sum(), 1e-9)

    taken = DiscSet()
    gl, ductal = _glands(rng, region, cu, 0.62 * expected[RID["gland"]], taken)
    vessels = {k: [] for k in ("y", "x", "r", "media")}
    struct: list[tuple[float, float, float, int]] = [(y, x, o, CID["Ductal"]) for y, x, o in ductal]
    n_struct = np.zeros(len(REGIONS))
    n_struct[RID["gland"]] = len(ductal)
    for rid, name in enumerate(REGIONS):
        need = REGION_LOOKS[name].vessels * expected[rid]
        vs, endo, smc = _vessels(rng, region, cu, rid, need, taken)
        for k in vessels:
            vessels[k].extend(vs[k])
        e_cls = CID["Endothelial_TumorAssociated" if rid in TUMOUR_REGIONS else "Endothelial"]
        struct += [(y, x, o, e_cls) for y, x, o in endo]
        struct += [(y, x, o, CID["Smooth_Muscle"]) for y, x, o in smc]
        n_struct[rid] += len(endo) + len(smc)
    st = np.array(struct, dtype=np.float64).reshape(-1, 4)
    # lumens and glands are no place for free cells
    obstacles = [(y, x, r + 1.0) for y, x, r in taken.items]

    def free_candidates(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts, labs = [], []
        for rid in range(len(REGIONS)):
            p = _sample_points(rng, region, rid, int(round(counts[rid])), cu)
            pts.append(p)
            labs.append(_free_labels(rng, rid, len(p), tissue))
        pts_a, labs_a = np.concatenate(pts), np.concatenate(labs)
        if obstacles and len(pts_a):
            ob = np.array(obstacles)
            d, j = cKDTree(ob[:, :2]).query(pts_a, k=4, distance_upper_bound=40.0)
            inside = np.zeros(len(pts_a), bool)
            for c in range(d.shape[1]):
                ok = np.isfinite(d[:, c])
                inside[ok] |= d[ok, c] < ob[j[ok, c], 2]
            pts_a, labs_a = pts_a[~inside], labs_a[~inside]
        return pts_a, labs_a

    pts = st[:, :2]
    labels = st[:, 3].astype(np.int16)
    orient = st[:, 2]
    nuc = sample_nuclei(rng, labels)
    n_forced = len(st)
    deficit = np.maximum(expected - n_struct, 0) * 1.3
    for round_ in range(6):
        fp, fl = free_candidates(deficit)
        pts = np.concatenate([pts, fp])
        labels = np.concatenate([labels, fl])
        orient = np.concatenate([orient, np.full(len(fp), np.nan)])
        new = sample_nuclei(rng, fl)
        nuc = {k: np.concatenate([nuc[k], new[k]]) for k in nuc}
        radii = 0.5 * np.sqrt(nuc["length_um"] * nuc["width_um"]) + 0.4
        keep = _thin(pts, radii.astype(np.float64), n_forced)
        if round_ == 5:  # give up on spacing: fill the rest regardless of overlap
            short = n_cells - keep.sum()
            if short > 0:
                keep[np.nonzero(~keep)[0][:short]] = True
        pts, labels, orient = pts[keep], labels[keep], orient[keep]
        nuc = {k: v[keep] for k, v in nuc.items()}
        n_forced = len(pts)
        short = n_cells - len(pts)
        if short <= 0:
            break
        rid_now = _in_region(region, cu, pts[:, 0], pts[:, 1])
        have = np.bincount(rid_now[rid_now >= 0], minlength=len(REGIONS))
        deficit = np.maximum(expected - have, 0)
        deficit = deficit / max(deficit.sum(), 1e-9) * short * 2.0 + 1
    # exactly n_cells: drop surplus free cells (and structured ones only if it must)
    if len(pts) > n_cells:
        free = np.nonzero(np.isnan(orient))[0]
        order = np.concatenate([rng.permutation(free), rng.permutation(np.nonzero(
            ~np.isnan(orient))[0])])
        keep = np.ones(len(pts), bool)
        keep[order[: len(pts) - n_cells]] = False
        pts, labels, orient = pts[keep], labels[keep], orient[keep]
        nuc = {k: v[keep] for k, v in nuc.items()}

    # orientation of free cells: spindles follow the fibres, the rest is random
    rid_cell = _in_region(region, cu, pts[:, 0], pts[:, 1])
    iy = np.clip((pts[:, 0] / cu).astype(int), 0, hc - 1)
    ix = np.clip((pts[:, 1] / cu).astype(int), 0, wc - 1)
    w = fields[2:5, iy, ix]
    fib_angle = np.deg2rad(np.asarray(FIBRE_ANGLES_DEG))[np.argmax(w, axis=0)]
    no_fib = w.sum(axis=0) < 1e-3
    spindly = np.isin(labels, [CID[c] for c in ("Fibroblast", "Tumor_Associated_Fibroblast",
                                                "Smooth_Muscle")])
    free = np.isnan(orient)
    sd = np.where(labels == CID["Smooth_Muscle"], 0.12, 0.3)
    rand = rng.uniform(0, np.pi, len(pts))
    orient = np.where(free & spindly & ~no_fib, fib_angle + rng.normal(0, 1, len(pts)) * sd,
                      np.where(free, rand, orient))
    # cells sorted in reading order (like a segmentation scan), ids follow that order
    order = np.lexsort((pts[:, 1], np.floor(pts[:, 0] / 200.0)))
    pts, labels, orient, rid_cell = pts[order], labels[order], orient[order], rid_cell[order]
    nuc = {k: v[order] for k, v in nuc.items()}
    cells: dict[str, np.ndarray] = {
        "x_px": pts[:, 1] / mpp, "y_px": pts[:, 0] / mpp, "label": labels,
        "region": rid_cell.astype(np.int8), "angle": orient.astype(np.float32), **nuc,
    }
    cells["tex_x"] = rng.integers(0, 4096, len(pts))
    cells["tex_y"] = rng.integers(0, 4096, len(pts))

    # red blood cells inside lumens
    rb = {k: [] for k in ("y", "x", "r")}
    for y, x, r in zip(vessels["y"], vessels["x"], vessels["r"], strict=True):
        n_rbc = int(rng.uniform(0.1, 0.6) * r * r / 3.5**2)
        rr = (r - 3.0) * np.sqrt(rng.random(n_rbc))
        t = rng.uniform(0, 2 * np.pi, n_rbc)
        rb["y"] += list(y + rr * np.sin(t))
        rb["x"] += list(x + rr * np.cos(t))
        rb["r"] += list(rng.uniform(3.0, 3.8, n_rbc))

    def to_px(d: dict, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float64) / (mpp if k in keys else 1.0) for k, v in d.items()}

    style = TISSUE_STYLES[tissue]
    h_vec = np.asarray(STAIN_H) + np.asarray(style.h_shift) + rng.normal(0, 0.02, 3)
    e_vec = np.asarray(STAIN_E) + np.asarray(style.e_shift) + rng.normal(0, 0.02, 3)
    stain = np.stack([h_vec / np.linalg.norm(h_vec) * rng.uniform(0.92, 1.08),
                      e_vec / np.linalg.norm(e_vec) * rng.uniform(0.92, 1.08)])
    light = np.clip(rng.normal(244, 2.0, 3), 236, 252)
    return SlideLayout(
        slide_id=slide_id, tissue=tissue, mpp=mpp, width=width, height=height, f=f,
        region=region, fields=fields, stain=stain.astype(np.float32),
        light=light.astype(np.float32),
        tex_offset=(int(rng.integers(0, 10_000)), int(rng.integers(0, 10_000))),
        cells=cells,
        glands=to_px(gl, ("y", "x", "a", "b", "ring")),
        vessels=to_px(vessels, ("y", "x", "r", "media")),
        rbcs=to_px(rb, ("y", "x", "r")),
        info={"tissue_area_mm2": float(areas.sum() / 1e6), "n_zones": float(len(kinds))},
    )
