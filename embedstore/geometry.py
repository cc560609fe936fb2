"""Geometry objects: crop specs, level choice and read plans, with units in every name.

Conventions (see docs/DESIGN.md): coordinates are continuous, pixel i of a level covers
[i, i+1); `x_px`/`y_px` are level-0 slide pixels, `x_um`/`y_um` micrometres from the slide's
top-left corner; centroids are centres, never corners.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

#: relative slack when matching a pyramid level's µm/px against the target µm/px
MPP_TOLERANCE = 0.02


@dataclass(frozen=True)
class CropSpec:
    """A square field centred on a cell: `size_um` µm on a side, resampled to `out_px` pixels."""

    size_um: float
    out_px: int

    def __post_init__(self) -> None:
        if not (self.size_um > 0 and self.out_px > 0):
            raise ValueError(f"crop size must be positive, got {self.size_um} µm -> {self.out_px} px")

    @property
    def target_mpp(self) -> float:
        return self.size_um / self.out_px

    def resized(self, out_px: int) -> CropSpec:
        """The same field of view delivered at another pixel size (e.g. 1024 px -> 512 px)."""
        return CropSpec(self.size_um, out_px)


#: the paper's two scales at 0.25 µm/px: 224 px nucleus crop, 1024 px context field
LOCAL_CROP = CropSpec(56.0, 224)
CONTEXT_CROP = CropSpec(256.0, 1024)


def px_to_um(px: np.ndarray | float, mpp: float) -> np.ndarray | float:
    return px * mpp


def um_to_px(um: np.ndarray | float, mpp: float) -> np.ndarray | float:
    return um / mpp


def choose_level(level_downsamples: tuple[float, ...], mpp: float, target_mpp: float) -> int:
    """Index of the coarsest pyramid level that is still at least as fine as `target_mpp`.

    Reading from that level and downsampling the rest of the way is the cheapest read that
    never upsamples (unless level 0 itself is coarser than the target, where level 0 is used).
    """
    fine_enough = [
        i for i, ds in enumerate(level_downsamples) if mpp * ds <= target_mpp * (1 + MPP_TOLERANCE)
    ]
    if not fine_enough:
        return int(np.argmin(level_downsamples))
    return max(fine_enough, key=lambda i: level_downsamples[i])


@dataclass(frozen=True)
class ReadPlan:
    """How one CropSpec is read from one slide: which level, and at what resampling factor.

    `scale` is level pixels per output pixel; 1.0 means crops are cut without resampling.
    With `resample=False` crops are delivered at the chosen level's own pixels (`out_px` =
    the field's side in level pixels, scale 1) and the consumer resizes them, e.g. the
    backbone on the GPU: the cheapest path when a pyramid has no level at the target µm/px.
    Logged and stored as provenance with every vector.
    """

    level: int
    downsample: float  # level-0 px per level px
    slide_mpp: float  # µm/px at level 0
    level_mpp: float
    target_mpp: float
    size_um: float
    out_px: int
    scale: float

    @classmethod
    def for_slide(
        cls,
        level_downsamples: tuple[float, ...],
        slide_mpp: float,
        crop: CropSpec,
        *,
        resample: bool = True,
    ) -> ReadPlan:
        level = choose_level(level_downsamples, slide_mpp, crop.target_mpp)
        ds = float(level_downsamples[level])
        level_mpp = slide_mpp * ds
        scale = crop.target_mpp / level_mpp
        out_px = crop.out_px
        if not resample:
            out_px, scale = max(1, int(round(crop.size_um / level_mpp))), 1.0
        if abs(scale - 1.0) < 1e-6:
            scale = 1.0
        return cls(level, ds, slide_mpp, level_mpp, crop.target_mpp, crop.size_um, out_px, scale)

    @property
    def exact(self) -> bool:
        """True when crops are plain pixel copies of the level (no resampling)."""
        return self.scale == 1.0

    @property
    def size_level_px(self) -> float:
        """Side of the field in this level's pixels."""
        return self.out_px * self.scale

    def field_origin_level(self, x_px: np.ndarray, y_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corner of each cell's field in this level's (continuous) pixel coordinates.

        On the exact path the corner is rounded to whole pixels, so the cell sits within half a
        pixel of the crop's centre and no interpolation is needed.
        """
        half = self.size_level_px / 2
        x0 = np.asarray(x_px, dtype=np.float64) / self.downsample - half
        y0 = np.asarray(y_px, dtype=np.float64) / self.downsample - half
        if self.exact:
            x0, y0 = np.floor(x0 + 0.5), np.floor(y0 + 0.5)
        return x0, y0

    def read_box_level(self, x_px: np.ndarray, y_px: np.ndarray) -> tuple[np.ndarray, ...]:
        """Integer level-pixel boxes (x0, y0, x1, y1) that hold each field plus an interpolation margin."""
        x0, y0 = self.field_origin_level(x_px, y_px)
        # resampling reads a little beyond the field: the filter's support is ~scale px per side
        margin = 0 if self.exact else int(np.ceil(2 * self.scale)) + 1
        s = self.size_level_px
        return (
            np.floor(x0).astype(np.int64) - margin,
            np.floor(y0).astype(np.int64) - margin,
            np.ceil(x0 + s).astype(np.int64) + margin,
            np.ceil(y0 + s).astype(np.int64) + margin,
        )

    def outside_fraction(
        self, x_px: np.ndarray, y_px: np.ndarray, width_px: int, height_px: int
    ) -> np.ndarray:
        """Share of each field's area that lies outside the slide (0 = fully inside)."""
        half = self.size_um / self.slide_mpp / 2
        x_px = np.asarray(x_px, dtype=np.float64)
        y_px = np.asarray(y_px, dtype=np.float64)
        # the lengths cut off on each side (0 when inside: exact, no rounding of x + h - (x - h))
        cut_x = np.clip(half - x_px, 0, 2 * half) + np.clip(x_px + half - width_px, 0, 2 * half)
        cut_y = np.clip(half - y_px, 0, 2 * half) + np.clip(y_px + half - height_px, 0, 2 * half)
        inside = np.clip(1.0 - cut_x / (2 * half), 0, 1) * np.clip(1.0 - cut_y / (2 * half), 0, 1)
        return 1.0 - inside

    def to_dict(self) -> dict:
        return asdict(self)


def tiles_for_cells(
    plan: ReadPlan, x_px: np.ndarray, y_px: np.ndarray, tile_level_px: int
) -> np.ndarray:
    """Group cells by the grid tile (in the plan's level) that holds their centroid.

    Returns one int64 key per cell; cells sharing a key are read from one region.
    """
    tx = np.floor(np.asarray(x_px) / plan.downsample / tile_level_px).astype(np.int64)
    ty = np.floor(np.asarray(y_px) / plan.downsample / tile_level_px).astype(np.int64)
    return ty * (1 << 31) + tx


def is_close_mpp(a: float, b: float, rel: float = MPP_TOLERANCE) -> bool:
    return math.isclose(a, b, rel_tol=rel)
