"""Hand-crafted nucleus features: a weights-free local "backbone" (`hc-nucleus`).

NOT a foundation model. Each local crop (56 µm field, nucleus at the centre) becomes a fixed,
documented list of classical features, so CPU-only users get vectors in seconds and a
"cells like this one" search has a meaning one can read off the feature names:

1. stain separation: Ruifrok-Johnston colour deconvolution (scikit-image's `hed_from_rgb`)
   to hematoxylin (H) and eosin (E) optical density;
2. a nucleus mask: Otsu threshold of H per crop (never below `MIN_H`, none on a flat crop),
   specks removed, holes filled, touching nuclei split by a distance-transform watershed
   (h-maxima seeds); the nucleus is the component at (or within `MAX_OFFSET_UM` of) the
   crop centre;
3. size and shape of that nucleus, in µm;
4. mean/std of H, E and brightness inside the nucleus, in a ring around it (cytoplasm) and
   over the whole crop;
5. chromatin texture: GLCM properties of the quantised H channel inside the nucleus, and a
   uniform-LBP histogram of its pixels;
6. crowding: the other nuclei in the crop.

Cosine search L2-normalises vectors, so raw features (areas in tens of µm², fractions in 0..1)
are standardised with fixed robust centres/scales (median, IQR/1.349) measured once on real
H&E (see `REFERENCE`), then clipped to +-`CLIP`. A missing value (no nucleus found, no other
nucleus) becomes the reference centre, 0. `FEATURES_VERSION` changes whenever the list, the
computation or the constants change; it goes into the vectors' provenance.

scikit-image is imported on first use, so importing the backbone registry stays fast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..geometry import LOCAL_CROP

#: bump on any change of the features, their computation or the reference constants
FEATURES_VERSION = "hc-nucleus-1"

#: the field the local crop covers (56 µm at 224 px: 0.25 µm/px)
FIELD_UM = LOCAL_CROP.size_um

SHAPE = ("found", "area_um2", "perimeter_um", "eccentricity", "solidity", "extent",
         "major_axis_um", "minor_axis_um", "circularity", "centre_offset_um")
REGIONS = ("nuc", "ring", "crop")
CHANNELS = ("h", "e", "bright")
INTENSITY = tuple(f"{r}_{c}_{s}" for r in REGIONS for c in CHANNELS for s in ("mean", "std"))
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
LBP_P, LBP_R = 8, 1
TEXTURE = (*(f"glcm_{p}" for p in GLCM_PROPS), *(f"lbp_{i}" for i in range(LBP_P + 2)))
CROWDING = ("n_other", "other_area_mean_um2", "nearest_other_um", "nuclear_fraction")

#: the feature order of every vector (groups: shape, intensity, texture, crowding)
FEATURE_NAMES: tuple[str, ...] = (*SHAPE, *INTENSITY, *TEXTURE, *CROWDING)
GROUPS = {"shape": SHAPE, "intensity": INTENSITY, "texture": TEXTURE, "crowding": CROWDING}
N_FEATURES = len(FEATURE_NAMES)

# segmentation parameters (µm where physical; H in scikit-image rgb2hed units)
MIN_H = 0.03  # Otsu is never trusted below this: pale or empty crops have no nucleus
FLAT_H = 1e-3  # H range below which a crop is blank (all white, all dark, uniform)
MIN_AREA_UM2 = 4.0  # specks smaller than this are not nuclei
SPLIT_UM = 1.0  # depth of the waist (distance-map saddle) that splits touching nuclei
MAX_OFFSET_UM = 5.0  # the centre nucleus lies within this distance of the crop centre
RING_UM = 3.0  # width of the cytoplasm ring around the nucleus
GLCM_LEVELS = 16
H_RANGE = 0.2  # H quantised over [0, H_RANGE] for GLCM/LBP (fixed: comparable across crops)
CLIP = 5.0

# Reference centres and scales: median and IQR/1.349 of the raw features of the 148 nuclei
# that this module's own segmentation finds in /tmp/histo/histo.jpg (the 500x300 H&E tile of
# the stardist wheel, public; taken at 0.5 µm/px) at least 28 µm from the tile's edge, each
# in the 56 µm crop centred on it, resized to 224 px as `Backbone.preprocess` does. Made by
# `python bench/hc_reference.py --python` (without --python: JSON); a scale of 0 (a constant
# feature, e.g. "found") falls back to the std, then 1. New numbers need a new FEATURES_VERSION.
# One tile means one stain: on other slides the intensity and crowding features often sit
# several scales away (clipped at +-CLIP); see bench/neighbours.py for what that costs.
REFERENCE = {"source": "histo.jpg, 0.5 um/px", "n_crops": 148, "n_found": 148}
_REF = {  # name: (centre, scale)
    "found": (1, 1),
    "area_um2": (37.125, 34.3542),
    "perimeter_um": (25.2405, 11.6222),
    "eccentricity": (0.801996, 0.123884),
    "solidity": (0.929097, 0.0644692),
    "extent": (0.686162, 0.0966699),
    "major_axis_um": (9.51962, 4.4623),
    "minor_axis_um": (5.59099, 2.18383),
    "circularity": (0.749016, 0.188457),
    "centre_offset_um": (0.454324, 0.600289),
    "nuc_h_mean": (0.0884158, 0.0100845),
    "nuc_h_std": (0.0169668, 0.00546055),
    "nuc_e_mean": (0.0233548, 0.00230359),
    "nuc_e_std": (0.0052652, 0.00154842),
    "nuc_bright_mean": (0.349564, 0.0299749),
    "nuc_bright_std": (0.0506568, 0.0123495),
    "ring_h_mean": (0.0323842, 0.00303431),
    "ring_h_std": (0.0128517, 0.001456),
    "ring_e_mean": (0.018741, 0.00210372),
    "ring_e_std": (0.00369774, 0.000996556),
    "ring_bright_mean": (0.582392, 0.0228116),
    "ring_bright_std": (0.0839383, 0.0160898),
    "crop_h_mean": (0.0495664, 0.00335432),
    "crop_h_std": (0.0315527, 0.00140783),
    "crop_e_mean": (0.0205403, 0.000769687),
    "crop_e_std": (0.00557426, 0.000569637),
    "crop_bright_mean": (0.511164, 0.010991),
    "crop_bright_std": (0.139448, 0.00613069),
    "glcm_contrast": (0.412879, 0.131927),
    "glcm_homogeneity": (0.813825, 0.0430826),
    "glcm_energy": (0.330561, 0.0819387),
    "glcm_correlation": (0.869636, 0.057808),
    "lbp_0": (0.00706723, 0.00377561),
    "lbp_1": (0.0178312, 0.0076795),
    "lbp_2": (0.0306535, 0.00890537),
    "lbp_3": (0.196114, 0.0256218),
    "lbp_4": (0.538843, 0.0619731),
    "lbp_5": (0.147404, 0.032366),
    "lbp_6": (0.0240667, 0.0154461),
    "lbp_7": (0.00753788, 0.00840802),
    "lbp_8": (0.00695053, 0.0082398),
    "lbp_9": (0.0199802, 0.0107268),
    "n_other": (27, 3.70645),
    "other_area_mean_um2": (34.5853, 5.01749),
    "nearest_other_um": (8.17707, 1.68172),
    "nuclear_fraction": (0.311523, 0.0564581),
}
REF_CENTRE = np.array([_REF[n][0] for n in FEATURE_NAMES], np.float64)
REF_SCALE = np.array([_REF[n][1] for n in FEATURE_NAMES], np.float64)


def fingerprint() -> str:
    """SHA-256 of what defines the vectors (version, names, constants): the 'weights' hash."""
    blob = json.dumps({"version": FEATURES_VERSION, "names": FEATURE_NAMES,
                       "centre": np.round(REF_CENTRE, 12).tolist(),
                       "scale": np.round(REF_SCALE, 12).tolist(), "clip": CLIP})
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# stains and masks


def stains(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in 0..1 -> (..., 3) H, E, D optical density (scikit-image rgb2hed units).

    The same computation as `skimage.color.rgb2hed`, in float32 on the whole batch at once
    (about 3x faster than its float64 path).
    """
    from skimage.color import hed_from_rgb

    log_rgb = np.log(np.maximum(rgb, 1e-6, dtype=np.float32)) / np.float32(np.log(1e-6))
    return np.maximum(log_rgb @ hed_from_rgb.astype(np.float32), 0)


def otsu_threshold(h: np.ndarray) -> float:
    """Otsu's threshold of one crop's H channel, never below MIN_H; inf on a flat crop."""
    from skimage.filters import threshold_otsu

    if float(h.max() - h.min()) < FLAT_H:
        return float("inf")
    return max(float(threshold_otsu(h)), MIN_H)


def nuclei_labels(h: np.ndarray, mpp: float) -> np.ndarray:
    """Labelled nuclei of one crop: H > Otsu, specks removed, holes filled, watershed split."""
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.morphology import h_maxima, remove_small_objects
    from skimage.segmentation import watershed

    mask = h > otsu_threshold(h)
    if not mask.any():
        return np.zeros(h.shape, np.int32)
    mask = ndi.binary_opening(mask)
    mask = ndi.binary_fill_holes(mask)
    min_px = max(1, int(round(MIN_AREA_UM2 / mpp**2)))
    mask = remove_small_objects(mask, max_size=min_px)
    if not mask.any():
        return np.zeros(h.shape, np.int32)
    dist = ndi.distance_transform_edt(mask)
    blobs = label(mask)
    # one seed per distance maximum at least SPLIT_UM above the saddle to its neighbour:
    # a waist that deep splits two touching nuclei, an elongated nucleus stays whole. Seeds
    # are found on every other pixel (h_maxima sorts all pixels: 4x faster, same nuclei).
    markers = np.zeros(h.shape, np.int32)
    markers[::2, ::2] = label(h_maxima(dist[::2, ::2], SPLIT_UM / mpp))
    lab = watershed(-dist, markers, mask=mask)
    left = mask & (lab == 0)  # a blob without a seed keeps its own label
    if left.any():
        lab[left] = blobs[left] + lab.max()
    return lab.astype(np.int32)


def centre_label(labels: np.ndarray, mpp: float) -> int:
    """The label at the crop centre, else the nearest within MAX_OFFSET_UM; 0 when none."""
    cy, cx = labels.shape[0] // 2, labels.shape[1] // 2
    if labels[cy, cx]:
        return int(labels[cy, cx])
    ys, xs = np.nonzero(labels)
    if len(ys) == 0:
        return 0
    d2 = (ys - (labels.shape[0] - 1) / 2) ** 2 + (xs - (labels.shape[1] - 1) / 2) ** 2
    i = int(np.argmin(d2))
    return int(labels[ys[i], xs[i]]) if np.sqrt(d2[i]) * mpp <= MAX_OFFSET_UM else 0


# ---------------------------------------------------------------------------------------------
# features


def _stats(values: np.ndarray) -> tuple[float, float]:
    return (float(values.mean()), float(values.std())) if values.size else (np.nan, np.nan)


def _texture(h_win: np.ndarray, inside: np.ndarray) -> list[float]:
    """GLCM properties (distance 1, mean of 4 angles) and the uniform-LBP histogram of the
    nucleus pixels, on H quantised over the fixed range [0, H_RANGE]."""
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    scaled = np.clip(h_win / H_RANGE, 0.0, 1.0)
    q = np.minimum((scaled * GLCM_LEVELS).astype(np.uint8), GLCM_LEVELS - 1) + 1
    q[~inside] = 0  # level 0 = outside the nucleus, dropped from the co-occurrence counts
    angles = [0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    glcm = graycomatrix(q, [1], angles, levels=GLCM_LEVELS + 1, symmetric=True)[1:, 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        glcm_feats = [float(np.nanmean(graycoprops(glcm, p))) for p in GLCM_PROPS]
    lbp = local_binary_pattern((scaled * 255).astype(np.uint8), LBP_P, LBP_R, method="uniform")
    hist = np.bincount(lbp[inside].astype(np.int64), minlength=LBP_P + 2)[: LBP_P + 2]
    return glcm_feats + (hist / max(1, hist.sum())).tolist()


def _nucleus_features(p, labels: np.ndarray, h: np.ndarray, e: np.ndarray, bright: np.ndarray,
                      mpp: float) -> dict[str, float]:
    """Shape, nucleus/ring intensity and texture of the region `p` (skimage RegionProps)."""
    from scipy import ndimage as ndi

    centre = (np.array(labels.shape) - 1) / 2
    area, perim = float(p.area), float(p.perimeter)
    out = {
        "found": 1.0, "area_um2": area * mpp**2, "perimeter_um": perim * mpp,
        "eccentricity": float(p.eccentricity), "solidity": float(p.solidity),
        "extent": float(p.extent), "major_axis_um": float(p.axis_major_length) * mpp,
        "minor_axis_um": float(p.axis_minor_length) * mpp,
        "circularity": 4 * np.pi * area / perim**2 if perim > 0 else np.nan,
        "centre_offset_um": float(np.hypot(*(np.array(p.centroid) - centre))) * mpp,
    }
    # a window around the nucleus, wide enough for the ring
    r = int(np.ceil(RING_UM / mpp))
    y0, x0, y1, x1 = p.bbox
    win = (slice(max(0, y0 - r), y1 + r), slice(max(0, x0 - r), x1 + r))
    nuc = labels[win] == p.label
    ring = (ndi.distance_transform_edt(~nuc) <= r) & (labels[win] == 0)
    for region, m in (("nuc", nuc), ("ring", ring)):
        for name, ch in (("h", h), ("e", e), ("bright", bright)):
            out[f"{region}_{name}_mean"], out[f"{region}_{name}_std"] = _stats(ch[win][m])
    out.update(zip(TEXTURE, _texture(h[win], nuc), strict=True))
    return out


def crop_features(h: np.ndarray, e: np.ndarray, bright: np.ndarray, mpp: float) -> np.ndarray:
    """Raw features of one crop (NaN where missing), crop-wide statistics excluded."""
    from skimage.measure import regionprops

    labels = nuclei_labels(h, mpp)
    c = centre_label(labels, mpp)
    props = {p.label: p for p in regionprops(labels)}
    vals: dict[str, float] = {"found": 0.0}
    if c:
        vals.update(_nucleus_features(props[c], labels, h, e, bright, mpp))
    others = [p for k, p in props.items() if k != c]
    vals["n_other"] = float(len(others))
    vals["nuclear_fraction"] = float((labels > 0).mean())
    if others:
        origin = np.array(props[c].centroid) if c else (np.array(labels.shape) - 1) / 2
        cents = np.array([p.centroid for p in others])
        vals["other_area_mean_um2"] = float(np.mean([p.area for p in others])) * mpp**2
        vals["nearest_other_um"] = float(np.sqrt(((cents - origin) ** 2).sum(1)).min()) * mpp
    return np.array([vals.get(n, np.nan) for n in FEATURE_NAMES])


def raw_features(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """(B, H, W, 3) RGB in 0..1, nucleus at the centre -> (B, N_FEATURES) raw float64."""
    rgb = np.asarray(rgb, np.float32)
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) RGB, got {rgb.shape}")
    hed = stains(rgb)
    h, e, bright = hed[..., 0], hed[..., 1], rgb.mean(-1)
    out = np.stack([crop_features(h[i], e[i], bright[i], mpp) for i in range(len(rgb))]) \
        if len(rgb) else np.empty((0, N_FEATURES))
    for name, ch in (("h", h), ("e", e), ("bright", bright)):  # crop-wide: vectorised
        out[:, FEATURE_NAMES.index(f"crop_{name}_mean")] = ch.mean((1, 2))
        out[:, FEATURE_NAMES.index(f"crop_{name}_std")] = ch.std((1, 2))
    return out


def standardise(raw: np.ndarray) -> np.ndarray:
    """Robust z-scores against the reference, missing -> 0, clipped to +-CLIP; float32."""
    z = (raw - REF_CENTRE) / REF_SCALE
    return np.clip(np.nan_to_num(z, nan=0.0), -CLIP, CLIP).astype(np.float32)


def features(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """(B, H, W, 3) RGB in 0..1 -> (B, N_FEATURES) standardised float32 vectors."""
    return standardise(raw_features(rgb, mpp))


def reference_constants(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust centre (median) and scale (IQR/1.349, else std, else 1) of raw feature rows."""
    centre = np.nanmedian(raw, axis=0)
    q75, q25 = np.nanpercentile(raw, [75, 25], axis=0)
    scale = (q75 - q25) / 1.349
    std = np.nanstd(raw, axis=0)
    scale = np.where(scale > 1e-9, scale, np.where(std > 1e-9, std, 1.0))
    return np.nan_to_num(centre), scale


# ---------------------------------------------------------------------------------------------
# the trunk the backbone registry wraps


class NucleusFeatures(nn.Module):
    """A parameter-free trunk: `forward_features` maps the preprocessed crops (B, 3, px, px),
    RGB in 0..1 (the spec's mean 0 / std 1), to one token per crop, (B, 1, N_FEATURES).

    Computed on the CPU in numpy whatever the input's device; the result goes back to it.
    """

    num_prefix_tokens = 1
    version = FEATURES_VERSION

    def __init__(self, feature_fn: Callable[[np.ndarray, float], np.ndarray] = features) -> None:
        super().__init__()
        self.feature_fn = feature_fn

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
        rgb = x.detach().float().permute(0, 2, 3, 1).cpu().numpy().clip(0.0, 1.0)
        vecs = self.feature_fn(rgb, FIELD_UM / x.shape[-1])
        return torch.from_numpy(vecs).to(x.device)[:, None, :]
