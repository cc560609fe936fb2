"""Tiled context mode: tile geometry, pooling against exact fields, memory bound, the pass."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from embedstore.errors import UserError
from embedstore.extract.pipeline import ExtractConfig, extract
from embedstore.extract.tiled import TiledContext, TileGrid
from embedstore.geometry import CONTEXT_CROP, CropSpec
from embedstore.io.slides import Slide, find_slides
from embedstore.store import Store
from tests.conftest import FAST


class PatchMeans(torch.nn.Module):
    """A local, linear stand-in encoder: each token is its patch's mean colour, so the mean of
    a window's tokens must equal the mean colour of the cell's exact field."""

    dim = 3

    def __init__(self, patch_px: int):
        super().__init__()
        self.patch_px = patch_px
        self.device = torch.device("cpu")

    def patch_grid(self, images: torch.Tensor, *, size: int) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return F.avg_pool2d(x, self.patch_px).permute(0, 2, 3, 1)


def _field_means(slide: Slide, x, y, crop: CropSpec) -> np.ndarray:
    return np.stack([slide.read(float(a), float(b), crop)[0].reshape(-1, 3).mean(0) for a, b in zip(x, y, strict=True)])


def test_grid_settings_are_checked():
    crop = CONTEXT_CROP.resized(512)
    g = TileGrid.for_backbone(crop, 16)
    assert (g.mpp, g.stride_px, g.core_tokens, g.margin_tokens, g.window_tokens) == (0.5, 768, 48, 8, 32)
    with pytest.raises(UserError, match="multiple of the context"):
        TileGrid.for_backbone(crop, 16, tile_px=1000)
    with pytest.raises(UserError, match="twice the patch"):
        TileGrid.for_backbone(crop, 16, overlap_px=48)
    with pytest.raises(UserError, match="smaller than the tile"):
        TileGrid.for_backbone(crop, 16, tile_px=256, overlap_px=256)
    with pytest.raises(UserError, match="--context-px"):
        TileGrid.for_backbone(CONTEXT_CROP.resized(500), 16)


@pytest.mark.parametrize("tile_px, overlap_px", [(128, 32), (64, 16), (256, 0)])
def test_window_means_equal_the_exact_fields(synth_small, tile_px, overlap_px):
    """Any tile size and overlap: every token comes from one tile and each cell's pooled
    vector is its exact field's mean (a shifted core or window would not match)."""
    cells = pl.read_parquet(synth_small.cells_path)
    path = find_slides(synth_small.out_dir / "slides")[0]
    crop = CONTEXT_CROP.resized(128)  # 2 µm/px, 8 px patches: windows of 16 x 16 tokens
    grid = TileGrid.for_backbone(crop, 8, tile_px=tile_px, overlap_px=overlap_px)
    with Slide(path) as slide, ThreadPoolExecutor(2) as pool:
        sub = cells.filter(pl.col("slide_id") == slide.slide_id).head(120)
        x, y = sub["x_px"].to_numpy(), sub["y_px"].to_numpy()
        ctx = TiledContext(slide, PatchMeans(8), grid, x, y, pool, tiles_per_batch=3)
        got = np.empty((len(x), 3), np.float32)
        peak = 0
        for chunk in ctx.chunks():
            got[chunk] = ctx.vectors(chunk)
            peak = max(peak, len(ctx.cores))
        want = _field_means(slide, x, y, crop)
        n_cols = int(ctx.c1.max() - ctx.c0.min() + 1)
        rows_needed = int((ctx.r1 - ctx.r0).max() + 1)
    assert np.abs(got - want).max() < 1.0  # 0-255 units; a one-token shift is off by several
    assert ctx.tiles_run < len(x)  # shared: fewer encoder images than cells
    # cores are dropped once no later band can use them
    assert peak <= (rows_needed + 1) * n_cols


def test_tiled_pass_stores_tiled_vectors_and_never_mixes(synth_small, tmp_path):
    db = tmp_path / "db"
    slides = synth_small.out_dir / "slides"
    cfg = ExtractConfig(**FAST, context="tiled", tile_px=256, tile_overlap_px=64, commit_every=100)
    summary = extract(slides, synth_small.cells_path, db, cfg)
    n = pl.read_parquet(synth_small.cells_path).height
    assert summary["written"] == n
    store = Store(db)
    config = store.config("cells")
    assert config["context_mode"] == "tiled"
    tiling = config["vectors"]["context"]["tiling"]
    assert (tiling["tile_px"], tiling["overlap_px"]) == (256, 64)
    assert config["vectors"]["context"]["pooling"] == "mean"
    loaded = store.load("cells")
    assert len(loaded.meta) == n and loaded.meta.select("slide_id", "cell_id").is_unique().all()
    assert np.isfinite(loaded.vectors["context"]).all() and loaded.vectors["context"].std(0).min() > 0
    # a rerun adds nothing; another tiling or the exact mode is refused for this table
    assert extract(slides, synth_small.cells_path, db, cfg)["written"] == 0
    for other in (ExtractConfig(**FAST, context="tiled", tile_px=512, tile_overlap_px=64),
                  ExtractConfig(**FAST, context_pooling="mean")):
        with pytest.raises(UserError, match="another configuration"):
            extract(slides, synth_small.cells_path, db, other)
    assert len(Store(db).load("cells").meta) == n


def test_tiled_mode_refuses_cls_pooling():
    with pytest.raises(UserError, match="--context-pooling cls needs --context exact"):
        ExtractConfig(**FAST, context="tiled", context_pooling="cls").validate()
    with pytest.raises(UserError, match="--context must be one of"):
        ExtractConfig(**FAST, context="tile").validate()


@pytest.mark.parametrize("context", ["exact", "tiled"])
def test_worker_processes_read_what_threads_read(synth_small, tmp_path, context):
    slides = synth_small.out_dir / "slides"
    cells = pl.read_parquet(synth_small.cells_path)
    cells = cells.filter(pl.col("slide_id") == cells["slide_id"][0]).head(80)
    kw = {"context": "tiled", "tile_px": 256, "tile_overlap_px": 64} if context == "tiled" else {}
    loaded = {}
    for readers in ("threads", "processes"):
        extract(slides, cells, tmp_path / readers, ExtractConfig(**FAST, readers=readers, **kw))
        got = Store(tmp_path / readers).load("cells")
        order = np.lexsort((got.meta["cell_id"].to_numpy(),))
        loaded[readers] = {k: v[order] for k, v in got.vectors.items()}
    for kind in ("local", "context"):
        np.testing.assert_array_equal(loaded["threads"][kind], loaded["processes"][kind])
    with pytest.raises(UserError, match="--readers"):
        ExtractConfig(**FAST, readers="fibers").validate()
