"""Crops per second: the batch reader against one read_region per cell, same cells, same run.

    python bench/crops.py [--cells 6000] [--density 1500] [--per-cell 300] [--out DIR]

Writes a synthetic slide at the given density (cells per mm², >= 1,000 is realistic), then
times `Slide.iter_crops` (one region read per ~512 µm tile, all crops cut from it) and
`Slide.read` (one `read_region` per cell) for the local (224 px) and the context (1024 px)
field, both at 0.25 µm/px, on the same cells. Prints JSON; rates are per core (one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.geometry import CONTEXT_CROP, LOCAL_CROP  # noqa: E402
from embedstore.io.slides import Slide  # noqa: E402
from embedstore.synth import make_synthetic  # noqa: E402


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=6000)
    ap.add_argument("--density", type=float, default=1500.0, help="cells per mm²")
    ap.add_argument("--per-cell", type=int, default=300, help="cells timed with per-cell reads")
    ap.add_argument("--region-um", type=float, default=512.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the synthetic slide here")
    args = ap.parse_args()

    workdir = args.out or Path(tempfile.mkdtemp(prefix="bench_crops_"))
    t0 = time.perf_counter()
    res = make_synthetic(workdir, seed=args.seed, n_cells=args.cells, n_slides=1, density_per_mm2=args.density)
    synth_s = time.perf_counter() - t0
    cells = pl.read_parquet(res.cells_path)
    slide_info = res.slides[0]
    x, y = cells["x_px"].to_numpy(), cells["y_px"].to_numpy()
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(len(x), size=min(args.per_cell, len(x)), replace=False))

    out: dict = {
        "cells": int(len(x)),
        "slide_px": [slide_info.width_px, slide_info.height_px],
        "area_mm2": slide_info.width_px * slide_info.height_px * 0.25**2 / 1e6,
        "density_param_cells_per_mm2_tissue": args.density,
        "cells_per_mm2_over_whole_slide": round(len(x) / (slide_info.width_px * slide_info.height_px * 0.25**2 / 1e6), 1),
        "region_um": args.region_um,
        "per_cell_sample": int(len(sample)),
        "threads": 1,
        "synth_seconds": round(synth_s, 2),
        "cpu_count": os.cpu_count(),
    }
    with Slide(slide_info.path) as slide:
        for name, spec in (("local_224px", LOCAL_CROP), ("context_1024px", CONTEXT_CROP)):
            # warm the OS page cache and the backend's tile cache equally for both methods
            slide.read(float(x[0]), float(y[0]), spec)
            t = time.perf_counter()
            n = 0
            for batch in slide.iter_crops(x, y, {name: spec}, region_um=args.region_um):
                n += len(batch.index)
            batch_s = time.perf_counter() - t
            t = time.perf_counter()
            for i in sample:
                slide.read(float(x[i]), float(y[i]), spec)
            single_s = time.perf_counter() - t
            b, s = rate(n, batch_s), rate(len(sample), single_s)
            out[name] = {
                "batch_crops_per_s_per_core": round(b, 1),
                "per_cell_crops_per_s_per_core": round(s, 1),
                "ratio": round(b / s, 2),
                "batch_seconds": round(batch_s, 2),
                "per_cell_seconds": round(single_s, 2),
            }
    out["goal_context_ratio_ge_5"] = out["context_1024px"]["ratio"] >= 5
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
