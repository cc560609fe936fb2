"""Tiled context mode: one context-encoder pass per overlapping tile, pooled per cell.

The exact mode runs the context encoder once per cell on the cell's own 256 µm field. On dense
tissue neighbouring fields overlap almost entirely, so the tiled mode instead runs the encoder
once per tile of the slide at the context scale and keeps its patch-token map. Tiles overlap by
`overlap_px`; each tile owns only its central *core* (the tile minus `overlap_px / 2` on every
side), so the cores partition the slide into a token grid and every token comes from the tile
where it is most central. A cell's context vector is the mean of the tokens inside its 256 µm
window, read from a summed-area table in O(1) per cell.

Geometry (all at the context scale, `mpp` µm/px, origin at the slide's top-left corner):
token (i, j) covers pixels [j p, (j + 1) p) x [i p, (i + 1) p); tile (r, c) covers
[c S - O/2, c S - O/2 + T) in x with stride S = T - O, and its core covers [c S, (c + 1) S).
A cell's window is its exact field: where its edges cut through tokens, those tokens count by
the share of their area inside (each token is taken as constant over its patch, so the window
sum is a bilinear read of the summed-area table at the window's fractional corners).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from ..geometry import CropSpec

#: defaults, in context-scale pixels (at 0.5 µm/px: 512 µm tiles, 64 µm kept on each side)
TILE_PX = 1024
OVERLAP_PX = 256


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles lie and which tokens each cell's window covers (the tiled read plan)."""

    mpp: float  # context scale, µm per pixel delivered to the encoder
    field_px: int  # a cell's window side in pixels (the exact mode's field)
    patch_px: int
    tile_px: int = TILE_PX
    overlap_px: int = OVERLAP_PX

    def __post_init__(self) -> None:
        p = self.patch_px
        if self.tile_px % p or self.tile_px <= 0:
            raise UserError(f"--tile-px {self.tile_px} must be a positive multiple of the context "
                            f"backbone's patch size ({p} px)")
        if self.overlap_px % (2 * p) or not 0 <= self.overlap_px < self.tile_px:
            raise UserError(f"--tile-overlap-px {self.overlap_px} must be a multiple of twice the patch "
                            f"size ({2 * p} px) and smaller than the tile ({self.tile_px} px)")
        if self.field_px % p:
            raise UserError(f"the context field ({self.field_px} px) must be a multiple of the patch "
                            f"size ({p} px): choose --context-px accordingly")

    @classmethod
    def for_backbone(cls, crop: CropSpec, patch_px: int, tile_px: int = TILE_PX,
                     overlap_px: int = OVERLAP_PX) -> TileGrid:
        return cls(crop.target_mpp, crop.out_px, patch_px, tile_px, overlap_px)

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def core_tokens(self) -> int:
        return self.stride_px // self.patch_px

    @property
    def margin_tokens(self) -> int:
        return self.overlap_px // 2 // self.patch_px

    @property
    def window_tokens(self) -> int:
        return self.field_px // self.patch_px

    def to_dict(self) -> dict:
        return {**asdict(self), "tile_um": self.tile_px * self.mpp, "overlap_um": self.overlap_px * self.mpp,
                "pooling": "mean of patch tokens in the cell's window"}

    def windows(self, x_px: np.ndarray, y_px: np.ndarray, slide_mpp: float) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corner (column, row) of each cell's window in token units (fractional);
        level-0 centroids in."""
        k = slide_mpp / self.mpp
        half = self.field_px / 2
        tx = (np.asarray(x_px, np.float64) * k - half) / self.patch_px
        ty = (np.asarray(y_px, np.float64) * k - half) / self.patch_px
        return tx, ty

    def tile_centre_level0(self, r: int, c: int, slide_mpp: float) -> tuple[float, float]:
        """Level-0 centre of tile (r, c)."""
        k = self.mpp / slide_mpp
        off = self.tile_px / 2 - self.overlap_px / 2
        return (c * self.stride_px + off) * k, (r * self.stride_px + off) * k

    def tile_crop(self) -> CropSpec:
        return CropSpec(self.tile_px * self.mpp, self.tile_px)


class TiledContext:
    """Context vectors of one slide's cells from shared tiles, a band of tiles at a time.

    `chunks()` orders the cells by the core row of their window's top edge; `vectors(idx)` is
    called for the chunks in that order. Tile cores are kept only while a later chunk can still
    need them, so memory is bounded by about two rows of tiles, not by the number of cells.
    """

    def __init__(self, slide, backbone, grid: TileGrid, x_px: np.ndarray, y_px: np.ndarray,
                 pool: Executor, *, precision: str = "fp32", tiles_per_batch: int = 4):
        self.slide, self.backbone, self.grid, self.pool = slide, backbone, grid, pool
        self.precision, self.tiles_per_batch = precision, max(1, tiles_per_batch)
        self.tx, self.ty = grid.windows(x_px, y_px, slide.mpp)
        s, w = grid.core_tokens, grid.window_tokens
        # cores each window touches: [r0, r1] x [c0, c1]
        self.r0 = np.floor(self.ty).astype(np.int64) // s
        self.c0 = np.floor(self.tx).astype(np.int64) // s
        self.r1 = (np.ceil(self.ty + w).astype(np.int64) - 1) // s
        self.c1 = (np.ceil(self.tx + w).astype(np.int64) - 1) // s
        self.plan = slide.plan(grid.tile_crop(), resample=False)
        self.cores: dict = {}  # (row, col) -> (core, core, dim) float32 tensor on the device
        self.tiles_run = 0

    def chunks(self) -> Iterator[np.ndarray]:
        order = np.lexsort((self.tx, self.r0))
        rows = self.r0[order]
        for start, stop in _runs(rows):
            yield order[start:stop]

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), dim) float32 mean-pooled context vectors of cells `idx` (one chunk)."""
        # one summed-area table per group of cells whose windows start in the same core
        keys = self.r0[idx] * (1 << 31) + self.c0[idx]
        order = np.argsort(keys, kind="stable")
        groups = [order[start:stop] for start, stop in _runs(keys[order])]
        boxes = [self._box(idx[g]) for g in groups]
        need = sorted({(r, c) for r0, c0, r1, c1 in boxes for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)})
        self._compute([t for t in need if t not in self.cores])
        out = np.empty((len(idx), self.backbone.dim), np.float32)
        for g, box in zip(groups, boxes, strict=True):
            out[g] = self._pool_group(idx[g], box)
        top = int(self.r0[idx].min())
        for key in [k for k in self.cores if k[0] <= top]:  # later chunks start further down
            del self.cores[key]
        return out

    def _box(self, group: np.ndarray) -> tuple[int, int, int, int]:
        """The cores (r0, c0, r1, c1) covering every window of a group."""
        return (int(self.r0[group].min()), int(self.c0[group].min()),
                int(self.r1[group].max()), int(self.c1[group].max()))

    def _pool_group(self, group: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        import torch

        s, w = self.grid.core_tokens, self.grid.window_tokens
        r0, c0, r1, c1 = box
        # on the encoder's device, in float64 (sums of up to ~10^4 tokens, then differences)
        tokens = torch.cat([torch.cat([self.cores[(r, c)] for c in range(c0, c1 + 1)], dim=1)
                            for r in range(r0, r1 + 1)], dim=0).double()
        sat = torch.zeros((tokens.shape[0] + 1, tokens.shape[1] + 1, tokens.shape[2]),
                          dtype=torch.float64, device=tokens.device)
        sat[1:, 1:] = tokens.cumsum(0).cumsum(1)
        y = torch.from_numpy(self.ty[group] - r0 * s).to(tokens.device)
        x = torch.from_numpy(self.tx[group] - c0 * s).to(tokens.device)
        total = _at(sat, y + w, x + w) - _at(sat, y, x + w) - _at(sat, y + w, x) + _at(sat, y, x)
        return (total / (w * w)).float().cpu().numpy()

    def _submit(self, tile: tuple[int, int]):
        """Read one tile on the reader pool (threads or worker processes): a future of
        (side, side, 3) uint8 at the level's own pixels."""
        from .readers import in_processes, read_regions

        cx, cy = self.grid.tile_centre_level0(tile[0], tile[1], self.slide.mpp)
        x, y = np.array([cx]), np.array([cy])
        if in_processes(self.pool):
            fut = self.pool.submit(read_regions, self.slide.path, self.slide.mpp, x, y, {"tile": self.plan})
        else:
            fut = self.pool.submit(self.slide.read_region_for, x, y, self.plan)
        return fut, x, y

    @staticmethod
    def _tile(job) -> np.ndarray:
        fut, x, y = job
        region = fut.result()
        region = region["tile"] if isinstance(region, dict) else region
        return region.cut(x, y)[0]

    def _compute(self, tiles: list[tuple[int, int]]) -> None:
        """Run the encoder over `tiles` in batches (reads prefetched on the pool), keep the cores."""
        import torch

        g, b = self.grid, self.tiles_per_batch
        m, s = g.margin_tokens, g.core_tokens
        batches = [tiles[i:i + b] for i in range(0, len(tiles), b)]
        futures = [[self._submit(t) for t in batch] for batch in batches[:2]]
        dev = self.backbone.device
        for i, batch in enumerate(batches):
            images = np.stack([self._tile(job) for job in futures[i]])
            if i + 2 < len(batches):
                futures.append([self._submit(t) for t in batches[i + 2]])
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                        enabled=self.precision == "bf16"):
                grid = self.backbone.patch_grid(torch.from_numpy(images), size=g.tile_px)
            cores = grid[:, m:m + s, m:m + s].float()  # stays on the encoder's device
            for tile, core in zip(batch, cores, strict=True):
                self.cores[tile] = core.clone()  # not a view: the batch's grid can be freed
            self.tiles_run += len(batch)


def _at(sat, y, x):
    """Bilinear read of a summed-area table at fractional (y, x): (n, dim)."""
    import torch

    iy = torch.clamp(torch.floor(y).long(), 0, sat.shape[0] - 2)
    ix = torch.clamp(torch.floor(x).long(), 0, sat.shape[1] - 2)
    fy, fx = (y - iy)[:, None], (x - ix)[:, None]
    top = sat[iy, ix] * (1 - fx) + sat[iy, ix + 1] * fx
    bottom = sat[iy + 1, ix] * (1 - fx) + sat[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _runs(sorted_keys: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return
    breaks = np.flatnonzero(np.diff(sorted_keys) != 0) + 1
    bounds = [0, *breaks.tolist(), len(sorted_keys)]
    yield from zip(bounds[:-1], bounds[1:], strict=True)

