"""The one-shot GPU benchmark (run it through bench/gpu.sh): model rates, then the full pass.

    bench/gpu.sh                        # a CUDA machine: UNI2-h + DINOv3-L/16, random weights
    bench/gpu.sh --device cpu --small   # the same code path with the test backbones (CI, laptops)

Prints one JSON document:
1. pure-model images/s and TFLOP/s (uint8 crops already on the device, resize and normalise
   included, bf16 autocast on CUDA): the local encoder at 224 px, the context encoder at its
   per-cell field (512 px) and at the tiled mode's tile (1024 px); on CUDA also with
   `torch.compile`, reported as the ratio to eager;
2. the feed rate: the full pipeline with encoders that return zeros at once, i.e. how many
   cells/s the slide reads, crop cutting, copies and store commits can deliver;
3. the full pipeline's cells/s in exact and tiled context mode on synthetic dense slides, each
   as a share of the pure-model rate for the same work (local crops + context fields or tiles).
Goals (issue 11, one H200): exact >= 500 cells/s, tiled >= 1,500 cells/s, pipeline >= 70% of
the pure-model rate. On CPU the figures only show that the code path runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.extract.pipeline import (  # noqa: E402
    ExtractConfig,
    VectorStep,
    extract,
    resolve_device,
    resolve_precision,
)
from embedstore.extract.tiled import TileGrid  # noqa: E402
from embedstore.geometry import CONTEXT_CROP, LOCAL_CROP  # noqa: E402
from embedstore.synth import make_synthetic  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def backbones(small: bool, device, context_px: int):
    """(local, context) encoders: the real architectures with random weights, or the test ones."""
    from embedstore.extract.backbones import build_backbone, build_random_backbone

    if small:
        return (build_backbone("test-vit-local", device=device),
                build_backbone("test-vit-context", input_px=context_px, pooling="mean", device=device))  # fmt: skip
    return (build_random_backbone("uni2-h", input_px=224, pooling="cls", device=device, source="random (benchmark)"),
            build_random_backbone("dinov3-vitl16", input_px=context_px, pooling="mean", device=device,
                                  source="random (benchmark)"))  # fmt: skip


def pure_rate(model, px: int, batch: int, device, precision: str, seconds: float, *, tokens: bool = False) -> float:
    """Images/s of one encoder on uint8 images already on the device (warm, synchronised)."""
    import torch

    x = torch.randint(0, 255, (batch, px, px, 3), dtype=torch.uint8, device=device)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model.patch_grid(x, size=px) if tokens else model(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        sync()
        if time.perf_counter() - t0 >= seconds and n >= 2:
            break
    return n * batch / (time.perf_counter() - t0)


def model_rates(local, context, args, device, precision: str) -> dict:
    from embedstore.extract.backbones import count_flops

    names = {"local": local.spec.name, "context": context.spec.name}
    runs = {"local_224": (local, 224, False), f"context_{args.context_px}": (context, args.context_px, False),
            f"context_tile_{args.tile_px}": (context, args.tile_px, True)}  # fmt: skip
    out = {}
    for key, (model, px, tokens) in runs.items():
        batch = max(1, args.batch_size // 16) if tokens else args.batch_size  # tiles per call, as in extract
        rate = pure_rate(model, px, batch, device, precision, args.seconds, tokens=tokens)
        flops = count_flops(model.spec.name, px)
        out[key] = {"backbone": model.spec.name, "px": px, "batch": batch, "images_per_s": round(rate, 2),
                    "gflop_per_image": round(flops / 1e9, 2), "tflop_per_s": round(rate * flops / 1e12, 2)}  # fmt: skip
        log(f"{key}: {out[key]}")
    if args.compile:
        import torch

        for key, part in (("local_224", "local"), (f"context_{args.context_px}", "context")):
            model = local if part == "local" else context
            eager_trunk = model.trunk
            model.trunk = torch.compile(eager_trunk)
            try:
                rate = pure_rate(model, out[key]["px"], out[key]["batch"], device, precision, args.seconds)
                out[key]["compiled_vs_eager"] = round(rate / out[key]["images_per_s"], 3)
            except Exception as exc:  # noqa: BLE001 - reported, the eager figures stand
                out[key]["compiled_vs_eager"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            finally:
                model.trunk = eager_trunk
    out["backbones"] = names
    return out


class Zeros:
    """An encoder stand-in that returns zeros at once: measures everything but the model."""

    def __init__(self, real):
        import torch

        self.spec, self.dim, self.input_px = real.spec, real.dim, real.input_px
        self._device = real.device
        self._torch = torch

    @property
    def device(self):
        return self._device

    def __call__(self, images):
        images.to(self._device, non_blocking=True)  # the host-to-device copy stays in the feed
        return self._torch.zeros(images.shape[0], self.dim, device=self._device)

    def patch_grid(self, images, *, size: int, resize: bool = True):
        p = self.spec.patch_px
        return self._torch.zeros(images.shape[0], size // p, size // p, self.dim, device=self._device)

    def provenance(self) -> dict:
        return {"backbone": f"zeros({self.spec.name})", "weights_sha256": "none"}


def steps_for(local, context, mode: str, args, precision: str) -> list[VectorStep]:
    ctx_crop = CONTEXT_CROP.resized(args.context_px)
    tiling = TileGrid.for_backbone(ctx_crop, context.spec.patch_px, args.tile_px, args.overlap_px) if mode == "tiled" else None
    return [VectorStep("local", LOCAL_CROP.resized(224), local, precision),
            VectorStep("context", ctx_crop, context, precision, tiling)]  # fmt: skip


def pipeline(slides: Path, cells: pl.DataFrame, db: Path, steps, args, device) -> dict:
    cfg = ExtractConfig(batch_size=args.batch_size, workers=args.workers, device=str(device), commit_every=4096)
    extract(slides, cells.head(args.batch_size), db.with_name(db.name + "_warm"), cfg, steps=steps)
    tiles = {"n": 0}
    from embedstore.extract import tiled

    inner = tiled.TiledContext._compute

    def counting(self, todo):
        tiles["n"] += len(todo)
        return inner(self, todo)

    tiled.TiledContext._compute = counting
    try:
        t = time.perf_counter()
        summary = extract(slides, cells, db, cfg, steps=steps)
        wall = time.perf_counter() - t
    finally:
        tiled.TiledContext._compute = inner
    return {"cells": summary["written"], "seconds": round(wall, 2), "cells_per_s": round(summary["written"] / wall, 1),
            "tiles": tiles["n"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--small", action="store_true", help="test backbones and a small slide (CPU check of the script)")
    ap.add_argument("--cells", type=int, default=None, help="cells on the synthetic slides (default 20000; small 300)")
    ap.add_argument("--density", type=float, default=3000.0, help="cells per mm² (dense tissue)")
    ap.add_argument("--batch-size", type=int, default=None, help="crops per model call (default 128; small 16)")
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default: CPU cores - 2, at least 2)")
    ap.add_argument("--context-px", type=int, default=512)
    ap.add_argument("--tile-px", type=int, default=1024)
    ap.add_argument("--overlap-px", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per pure-model rate (default 10; small 1)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time torch.compile (default: on CUDA only)")
    args = ap.parse_args(argv)
    args.cells = args.cells or (300 if args.small else 20000)
    args.batch_size = args.batch_size or (16 if args.small else 128)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.small else 10.0)
    args.workers = args.workers or max(2, (os.cpu_count() or 4) - 2)

    import torch

    device = resolve_device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    precision = resolve_precision("auto", device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "small": args.small, "precision": precision, "torch": torch.__version__, "python": platform.python_version(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "settings": {k: v for k, v in vars(args).items()},
    }  # fmt: skip
    local, context = backbones(args.small, device, args.context_px)
    result["model"] = rates = model_rates(local, context, args, device, precision)

    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        log(f"synthetic slides: {args.cells} cells at {args.density:g}/mm²")
        synth = make_synthetic(work / "synth", seed=0, n_cells=args.cells, n_slides=1, density_per_mm2=args.density)
        cells = pl.read_parquet(synth.cells_path)
        slides = work / "synth" / "slides"
        feed = pipeline(slides, cells, work / "feed", steps_for(Zeros(local), Zeros(context), "exact", args, precision), args, device)
        result["feed_exact_zero_model"] = feed
        log(f"feed (zero model): {feed}")
        runs = {}
        for mode in ("exact", "tiled"):
            run = pipeline(slides, cells, work / mode, steps_for(local, context, mode, args, precision), args, device)
            n = run["cells"]
            model_s = n / rates["local_224"]["images_per_s"]
            if mode == "exact":
                model_s += n / rates[f"context_{args.context_px}"]["images_per_s"]
            else:
                model_s += run["tiles"] / rates[f"context_tile_{args.tile_px}"]["images_per_s"]
            run["pure_model_cells_per_s"] = round(n / model_s, 1)
            run["share_of_pure_model_rate"] = round(model_s / run["seconds"], 3)
            runs[mode] = run
            log(f"{mode}: {run}")
        result["pipeline"] = runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if device.type == "cuda" and not args.small:
        result["goals"] = {
            "exact >= 500 cells/s": runs["exact"]["cells_per_s"] >= 500,
            "tiled >= 1500 cells/s": runs["tiled"]["cells_per_s"] >= 1500,
            "exact pipeline >= 70% of pure model": runs["exact"]["share_of_pure_model_rate"] >= 0.7,
            "tiled pipeline >= 70% of pure model": runs["tiled"]["share_of_pure_model_rate"] >= 0.7,
        }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
