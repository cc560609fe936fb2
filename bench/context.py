"""Tiled against exact context mode, in one run: speed, per-cell agreement, heads macro-F1.

    python bench/context.py                          # 8000 cells, 4 dense slides, test backbones
    python bench/context.py --cells 2000 --slides 2 --train-seeds ""   # speed + agreement only

One synthetic cohort at dense tissue (`--density`, cells/mm²) is extracted twice into one
store with the same local backbone: table `exact` (one 256 µm field per cell, mean-pooled
patch tokens, the comparable pooling) and table `tiled` (`embed extract --context tiled`).
Reports the wall time of each whole pass and of its context part alone (and their ratios; the
goal is the context's: the local crops cost both modes the same, so the whole pass's speed-up
is bounded by `speedup_whole_pass_ceiling`, exact time / tiled time less its context part),
the agreement per cell (cosine after subtracting each table's mean vector), and the test
macro-F1 of the heads trained on each table with the same split (mean over `--train-seeds`, with
the paired gap's sd and standard error: one training seed moves macro-F1 by ~0.02 here).
Goals (issue 11): context speed-up >= 5x at dense tissue; heads within 0.02 macro-F1. Prints
JSON; the load average is printed with the figures (timings here vary with machine load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.extract import pipeline as extract_mod  # noqa: E402
from embedstore.extract import tiled as tiled_mod  # noqa: E402
from embedstore.extract.pipeline import ExtractConfig, extract  # noqa: E402
from embedstore.store import Store  # noqa: E402
from embedstore.synth import make_synthetic  # noqa: E402


def _timed_context(clock: dict):
    """Patch the two context code paths to add their wall time to clock['context']."""
    embed, vectors, compute = extract_mod.VectorStep.embed, tiled_mod.TiledContext.vectors, tiled_mod.TiledContext._compute

    def timed_embed(self, crops, device):
        t = time.perf_counter()
        out = embed(self, crops, device)
        if self.name == "context":
            clock["context"] += time.perf_counter() - t
        return out

    def timed_vectors(self, idx):
        t = time.perf_counter()
        out = vectors(self, idx)
        clock["context"] += time.perf_counter() - t
        return out

    def counted_compute(self, tiles):
        clock["tiles"] += len(tiles)
        return compute(self, tiles)

    def restore():
        extract_mod.VectorStep.embed, tiled_mod.TiledContext.vectors = embed, vectors
        tiled_mod.TiledContext._compute = compute

    extract_mod.VectorStep.embed, tiled_mod.TiledContext.vectors = timed_embed, timed_vectors
    tiled_mod.TiledContext._compute = counted_compute
    return restore


def run_pass(slides: Path, cells: Path, db: Path, mode: str, args) -> dict:
    cfg = ExtractConfig(
        local_backbone="test-vit-local", context_backbone="test-vit-context",
        context_input_px=args.context_px, context_pooling="mean" if mode == "exact" else None,
        batch_size=args.batch_size, workers=2, table=mode, context=mode, device=args.device,
        tile_px=args.tile_px, tile_overlap_px=args.overlap_px,
    )  # fmt: skip
    clock = {"context": 0.0, "tiles": 0}
    restore = _timed_context(clock)
    try:
        t0 = time.perf_counter()
        summary = extract(slides, cells, db, cfg)
        seconds = time.perf_counter() - t0
    finally:
        restore()
    out = {"cells": summary["written"], "seconds": round(seconds, 2), "context_seconds": round(clock["context"], 2),
           "cells_per_s": round(summary["written"] / seconds, 1)}  # fmt: skip
    if mode == "tiled":
        out["tiles"] = clock["tiles"]
        out["cells_per_tile"] = round(summary["written"] / max(1, clock["tiles"]), 1)
    return out


def agreement(db: Path) -> dict:
    store = Store(db)
    a, b = store.load("exact", vectors=("context",)), store.load("tiled", vectors=("context",))
    ka = a.meta.select("slide_id", "cell_id").with_row_index("ia")
    kb = b.meta.select("slide_id", "cell_id").with_row_index("ib")
    j = ka.join(kb, on=["slide_id", "cell_id"])
    va, vb = a.vectors["context"], b.vectors["context"]
    x = va[j["ia"].to_numpy()] - va.mean(0)
    y = vb[j["ib"].to_numpy()] - vb.mean(0)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    q = np.percentile(cos, [5, 25, 50, 75, 95])
    return {"cells": int(len(cos)), "mean": round(float(cos.mean()), 4),
            **{f"p{p}": round(float(v), 4) for p, v in zip((5, 25, 50, 75, 95), q, strict=True)}}  # fmt: skip


def heads_f1(db: Path, out: Path, seeds: list[int]) -> dict:
    from heads import runs
    from heads.train import TrainConfig

    result: dict = {}
    for table in ("exact", "tiled"):
        per_seed = []
        for seed in seeds:
            run_dir = out / f"run_{table}_{seed}"
            runs.train(db, run_dir, "all", TrainConfig(seed=seed), table=table, log=lambda _: None)
            ev = runs.evaluate_run(run_dir, db, table=table, on="test", baselines=(), log=lambda _: None)
            per_seed.append({r["name"]: r["macro_f1"] for r in ev["rows"]})
        result[table] = {k: round(float(np.mean([s[k] for s in per_seed])), 4) for k in per_seed[0]}
        result[table]["per_seed"] = per_seed
    result["tiled_minus_exact"] = {k: round(result["tiled"][k] - result["exact"][k], 4)
                                   for k in result["exact"] if k != "per_seed"}  # fmt: skip
    if len(seeds) > 1:  # the same seed trains both tables, so the gap is a paired difference
        gaps = {k: np.array([t[k] - e[k] for e, t in zip(result["exact"]["per_seed"], result["tiled"]["per_seed"], strict=True)])
                for k in result["tiled_minus_exact"]}  # fmt: skip
        result["tiled_minus_exact_sd"] = {k: round(float(g.std(ddof=1)), 4) for k, g in gaps.items()}
        result["tiled_minus_exact_se"] = {k: round(float(g.std(ddof=1) / np.sqrt(len(g))), 4) for k, g in gaps.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=8000)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--density", type=float, default=3000.0, help="cells per mm² of tissue (dense: 3000)")
    ap.add_argument("--context-px", type=int, default=512, help="context scale: 256 µm / this many px")
    ap.add_argument("--tile-px", type=int, default=tiled_mod.TILE_PX)
    ap.add_argument("--overlap-px", type=int, default=tiled_mod.OVERLAP_PX)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-seeds", default="0,1,2,3,4",
                    help="comma list; the gap is the mean over them (one seed's sd is ~0.02); empty: skip the heads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    args = ap.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_context_"))
    result: dict = {"load_avg_start": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}  # fmt: skip
    try:
        synth = make_synthetic(work / "synth", seed=args.seed, n_cells=args.cells, n_slides=args.slides,
                               density_per_mm2=args.density)  # fmt: skip
        db = work / "store"
        passes = {m: run_pass(work / "synth" / "slides", synth.cells_path, db, m, args) for m in ("exact", "tiled")}
        result["passes"] = passes
        e, t = passes["exact"], passes["tiled"]
        result["speedup_whole_pass"] = round(e["seconds"] / t["seconds"], 2)
        result["speedup_context"] = round(e["context_seconds"] / max(t["context_seconds"], 1e-9), 2)
        # the whole pass's speed-up were the tiled context free: what the local crops (read,
        # embedded, written) leave; tiling the context cannot pass it
        result["speedup_whole_pass_ceiling"] = round(e["seconds"] / max(t["seconds"] - t["context_seconds"], 1e-9), 2)
        result["agreement_centred_cosine"] = agreement(db)
        seeds = [int(s) for s in args.train_seeds.split(",") if s.strip()]
        if seeds:
            result["heads_test_macro_f1"] = heads_f1(db, work, seeds)
        gaps = result.get("heads_test_macro_f1", {}).get("tiled_minus_exact", {})
        result["goals"] = {
            "speedup_context >= 5": result["speedup_context"] >= 5,
            **({"heads within 0.02 macro-F1": all(abs(v) <= 0.02 for v in gaps.values())} if gaps else {}),
        }
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
