"""End-to-end extraction speed: the real pipeline against a naive one, same cells, same run.

    python bench/extract.py [--cells 3000] [--batch-size 32]      # test backbones, CPU
    python bench/extract.py --real --cells 4000                    # UNI2-h + DINOv3, GPU

Default mode (test backbones): cells/s of `embedstore.extract.pipeline.extract` (region reads, reader
and cutter threads, batched model calls, batched commits) against a naive pipeline (one
`read_region` per crop, one model call per batch, no prefetch, same commits), the share of
wall time spent inside the model forward, the peak RSS above the baseline for two store
sizes, and the RSS along the larger run by quarter of its cells (min, median, max) with its
slope over the run's second half. Flat memory means no climb once the allocator has warmed up
(~10-25k cells): run `--cells 100000` for a trend that says so; glibc's in-use and kept-free
heap at the end show where the warm-up went.

`--real` (needs a CUDA GPU): UNI2-h and DINOv3 ViT-L/16 with random weights of the exact
architectures, bf16 autocast; reports cells/s and achieved TFLOP/s against the same two
models fed pre-made tensors already on the GPU in the same run. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.extract.pipeline import (  # noqa: E402
    ExtractConfig,
    VectorStep,
    _rows,
    build_steps,
    extract,
    resolve_device,
    vector_config,
)
from embedstore.io.slides import Slide, find_slides, slide_id_from_path  # noqa: E402
from embedstore.store import Store  # noqa: E402
from embedstore.synth import make_synthetic  # noqa: E402

TREND_MIN_CELLS = 40_000


class RSSTrace:
    """RSS at every progress event of a run, summarised per quarter of the cells.

    RSS swings by a few hundred MB within a run (transient batch and region buffers), so a
    single peak says little; flat memory means the quarters' medians and maxima do not climb
    from the first quarter to the last, whatever the number of cells."""

    def __init__(self, total: int):
        self.proc, self.total, self.done, self.points = psutil.Process(), total, 0, []

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "progress":
            self.done += data["n"]
            self.points.append((self.done, self.proc.memory_info().rss / 1e6))

    def slope_mb_per_10k_cells(self, after: float = 0.5) -> float | None:
        """RSS growth along the run past its first `after` share of cells (least squares); None
        for runs under TREND_MIN_CELLS: the allocator warms up over the first ~10-25k cells, so
        only a long run's later half says whether memory keeps growing with the cells."""
        pts = np.array([(c, r) for c, r in self.points if c > after * self.total])
        if self.total < TREND_MIN_CELLS or len(pts) < 8:
            return None
        return round(float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0]) * 1e4, 1)

    def quarters(self) -> list[dict]:
        out = []
        for q in range(4):
            lo, hi = q * self.total / 4, (q + 1) * self.total / 4
            mb = np.array([r for c, r in self.points if lo < c <= hi])
            if mb.size:
                out.append({"cells": f"{int(lo)}-{int(hi)}", "samples": int(mb.size), "min_mb": round(float(mb.min())),
                            "median_mb": round(float(np.median(mb))), "max_mb": round(float(mb.max()))})  # fmt: skip
        return out


def glibc_heap_mb() -> dict | None:
    """glibc's heap, all arenas (mallinfo2): bytes in use and bytes freed but kept for reuse.
    What RSS gains over a run's first cells is the second: the adaptive mmap threshold moves
    batch and region buffers from mmap into the arenas, which keep their high-water mark."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except AttributeError:  # glibc < 2.33
        return None
    fn.restype = MallInfo2
    m = fn()
    return {"in_use_mb": round(m.uordblks / 1e6), "free_kept_mb": round(m.fordblks / 1e6), "mmapped_mb": round(m.hblkhd / 1e6)}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 20 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above_base_mb(self) -> float:
        return (self.peak - self.base) / 1e6


def timed_steps(steps: list[VectorStep], clock: dict) -> list[VectorStep]:
    """Wrap each step's `embed` to add its wall time to clock['model']."""
    for step in steps:
        inner = step.embed

        def embed(crops, device, _inner=inner):
            t = time.perf_counter()
            out = _inner(crops, device)
            clock["model"] += time.perf_counter() - t
            return out

        step.embed = embed
    return steps


def naive_extract(slides_dir: Path, cells: pl.DataFrame, db: Path, steps: list[VectorStep], device, cfg: ExtractConfig) -> float:
    """One read_region per crop (resampled on the CPU), one model call per batch, no prefetch."""
    store = Store(db, create=True)
    store.cells_table(cfg.table, {s.name: s.config()["dim"] for s in steps}, vector_config(steps))
    paths = {slide_id_from_path(p): p for p in find_slides(slides_dir)}
    t0 = time.perf_counter()
    pending, n_pending = [], 0
    for sid in cells["slide_id"].unique(maintain_order=True):
        sub = cells.filter(pl.col("slide_id") == sid)
        x, y = sub["x_px"].to_numpy(), sub["y_px"].to_numpy()
        with Slide(paths[sid]) as slide:
            for start in range(0, sub.height, cfg.batch_size):
                idx = np.arange(start, min(start + cfg.batch_size, sub.height))
                vectors, outside = {}, {}
                for step in steps:
                    got = [slide.read(float(x[i]), float(y[i]), step.crop) for i in idx]
                    vectors[step.name] = step.embed(np.stack([g[0] for g in got]), device)
                    outside[step.name] = np.array([g[1] for g in got], np.float32)
                pending.append(_rows(sub, idx, "naive", vectors, outside))
                n_pending += len(idx)
                if n_pending >= cfg.commit_every:
                    store.append(cfg.table, pa.concat_tables(pending))
                    pending, n_pending = [], 0
    if pending:
        store.append(cfg.table, pa.concat_tables(pending))
    return time.perf_counter() - t0


def cpu_mode(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    res = make_synthetic(work / "data", seed=0, n_cells=args.cells, n_slides=args.slides,
                         density_per_mm2=args.density, level_step=args.level_step)  # fmt: skip
    cells = pl.read_parquet(res.cells_path)
    cfg = ExtractConfig(
        local_backbone="test-vit-local", context_backbone="test-vit-context",
        batch_size=args.batch_size, workers=args.workers, commit_every=1024,
        context_input_px=args.context_px, context=args.context,
    )  # fmt: skip
    device = resolve_device("cpu")
    clock = {"model": 0.0}
    steps = timed_steps(build_steps(cfg, device), clock)
    slides = work / "data" / "slides"

    n_small = args.small_cells or max(args.cells // 4, 200)
    small = cells.sample(n=min(len(cells), n_small), seed=1).sort("slide_id")
    extract(slides, small.head(64), work / "warm", cfg, steps=steps)  # warm up both paths' caches
    clock["model"] = 0.0
    with PeakRSS() as mem_small:
        extract(slides, small, work / "db_small", cfg, steps=steps)
    clock["model"] = 0.0
    trace = RSSTrace(cells.height)
    with PeakRSS() as mem_full:
        t = time.perf_counter()
        summary = extract(slides, cells, work / "db_full", cfg, steps=steps, on_event=trace)
        fast_s = time.perf_counter() - t
    heap = glibc_heap_mb()
    model_share = clock["model"] / fast_s
    naive_cells = cells.sample(n=min(len(cells), args.naive_cells), seed=2).sort("slide_id")
    clock["model"] = 0.0
    naive_s = naive_extract(slides, naive_cells, work / "db_naive", steps, device, cfg)
    naive_model_share = clock["model"] / naive_s
    fast_rate = summary["written"] / fast_s
    naive_rate = naive_cells.height / naive_s
    shutil.rmtree(work, ignore_errors=True)
    return {
        "mode": "cpu, test backbones",
        "cells": summary["written"],
        "density_cells_per_mm2": args.density,
        "pyramid_level_step": args.level_step,
        "context_input_px": steps[1].backbone.input_px,
        "context_mode": args.context,
        "batch_size": args.batch_size,
        "reader_threads": args.workers,
        "pipeline_cells_per_s": round(fast_rate, 1),
        "naive_cells_per_s": round(naive_rate, 1),
        "naive_cells": naive_cells.height,
        "speedup": round(fast_rate / naive_rate, 2),
        "goal_speedup_ge_3": fast_rate / naive_rate >= 3,
        "model_forward_share_of_wall": round(model_share, 3),
        "naive_model_forward_share_of_wall": round(naive_model_share, 3),
        "peak_rss_above_base_mb": {
            f"small_{small.height}_cells": round(mem_small.above_base_mb, 1),
            f"full_{summary['written']}_cells": round(mem_full.above_base_mb, 1),
        },
        "rss_by_quarter_of_full_run": (quarters := trace.quarters()),
        "rss_median_last_minus_first_quarter_mb": quarters[-1]["median_mb"] - quarters[0]["median_mb"] if quarters else None,
        "rss_slope_second_half_mb_per_10k_cells": trace.slope_mb_per_10k_cells(),
        "glibc_heap_after_full_run": heap,
    }


def real_mode(args) -> dict:
    import torch

    from embedstore.extract.backbones import build_random_backbone, count_flops

    if not torch.cuda.is_available():
        raise SystemExit("--real needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True

    local = build_random_backbone("uni2-h", input_px=224, device=device, source="random (benchmark)")
    context = build_random_backbone("dinov3-vitl16", input_px=args.context_px, device=device,
                                    source="random (benchmark)")
    from embedstore.geometry import CONTEXT_CROP, LOCAL_CROP

    steps = [VectorStep("local", LOCAL_CROP.resized(224), local),
             VectorStep("context", CONTEXT_CROP.resized(args.context_px), context)]  # fmt: skip
    flops = count_flops("uni2-h", 224) + count_flops("dinov3-vitl16", args.context_px)

    # pure model rate: pre-made uint8 crops already on the GPU, same batch size
    bs = args.batch_size
    x_local = torch.randint(0, 255, (bs, 224, 224, 3), dtype=torch.uint8, device=device)
    x_ctx = torch.randint(0, 255, (bs, args.context_px, args.context_px, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            local(x_local), context(x_ctx)
        torch.cuda.synchronize()
        n_iter = max(3, args.cells // bs // 4)
        t = time.perf_counter()
        for _ in range(n_iter):
            local(x_local), context(x_ctx)
        torch.cuda.synchronize()
        pure_rate = n_iter * bs / (time.perf_counter() - t)

    work = Path(tempfile.mkdtemp(prefix="bench_extract_real_"))
    res = make_synthetic(work / "data", seed=0, n_cells=args.cells, n_slides=args.slides,
                         density_per_mm2=args.density, level_step=args.level_step)  # fmt: skip
    cfg = ExtractConfig(local_backbone="uni2-h", context_backbone="dinov3-vitl16", batch_size=bs,
                        workers=args.workers, device="cuda", commit_every=4096)  # fmt: skip
    cells = pl.read_parquet(res.cells_path)
    extract(work / "data" / "slides", cells.head(2 * bs), work / "warm", cfg, steps=steps)
    t = time.perf_counter()
    summary = extract(work / "data" / "slides", cells, work / "db", cfg, steps=steps)
    wall = time.perf_counter() - t
    rate = summary["written"] / wall
    shutil.rmtree(work, ignore_errors=True)
    return {
        "mode": "gpu, uni2-h + dinov3-vitl16 (random weights), bf16",
        "gpu": torch.cuda.get_device_name(0),
        "cells": summary["written"],
        "batch_size": bs,
        "context_input_px": args.context_px,
        "reader_threads": args.workers,
        "gflop_per_cell": round(flops / 1e9, 1),
        "pipeline_cells_per_s": round(rate, 1),
        "pipeline_tflop_per_s": round(rate * flops / 1e12, 1),
        "pure_model_cells_per_s": round(pure_rate, 1),
        "pure_model_tflop_per_s": round(pure_rate * flops / 1e12, 1),
        "share_of_pure_model_rate": round(rate / pure_rate, 3),
        "goal_share_ge_0_7": rate / pure_rate >= 0.7,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--naive-cells", type=int, default=400, help="cells timed through the naive pipeline")
    ap.add_argument("--slides", type=int, default=2, help="synthetic slides the cells are spread over")
    ap.add_argument("--density", type=float, default=2000.0)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--context-px", type=int, default=512)
    ap.add_argument("--context", default="exact", choices=["exact", "tiled"], help="context mode (CPU mode)")
    ap.add_argument("--small-cells", type=int, default=None, help="cells of the smaller RSS run (default cells / 4)")
    ap.add_argument("--level-step", type=int, default=4,
                    help="pyramid downsample per level of the synthetic slides (4: Aperio SVS, 2: NDPI/MRXS)")
    args = ap.parse_args()
    if args.batch_size is None:
        args.batch_size = 128 if args.real else 32
    print(json.dumps(real_mode(args) if args.real else cpu_mode(args), indent=2))


if __name__ == "__main__":
    main()
