"""Benchmark: honest numbers on a synthetic store; prints JSON.

Synthetic slides (`embed synth`) -> vectors from the test backbones -> the three heads trained
twice (stage 3 with the heads `joint` and `frozen`) on the default split (val | train | test
stripes per slide, 128 µm guard band) -> `heads eval` on test and on val. Reports, per path
(local, global, gate, safety rule, baselines): test macro-F1 and ECE next to the val macro-F1
of the same model (val chose it: the difference is the selection bias), and the conformal
coverage and mean set size on test at 90% and 80%, marginal and class-conditional.

    python bench/honest.py                      # 8000 cells on 4 slides (extraction ~10 min on 2 cores)
    python bench/honest.py --db STORE --out DIR # reuse a store
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _quiet(_: str) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_honest_out"))
    ap.add_argument("--db", type=Path, default=None, help="an existing store (skips synth + extract)")
    ap.add_argument("--cells", type=int, default=8000)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--train-seeds", default="0", help="comma list: heads trained once per seed (same split)")
    ap.add_argument("--baselines", default="logreg,xgboost,knn")
    args = ap.parse_args(argv)

    from embedstore.extract.pipeline import ExtractConfig, extract
    from embedstore.synth import make_synthetic

    t_start = time.perf_counter()
    result: dict = {"load_avg_start": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    db = args.db
    if db is None:
        synth = make_synthetic(args.out / "synth", seed=args.seed, n_cells=args.cells, n_slides=args.slides)
        db = args.out / "store"
        cfg = ExtractConfig(local_backbone="test-vit-local", context_backbone="test-vit-context",
                            context_input_px=256, batch_size=32, workers=2)  # fmt: skip
        t0 = time.perf_counter()
        ex = extract(args.out / "synth" / "slides", synth.cells_path, db, cfg)
        result["extract"] = {"cells": ex["written"] + ex["already_stored"], "seconds": round(time.perf_counter() - t0, 1)}
    result["db"] = str(db)

    seeds = [int(x) for x in args.train_seeds.split(",") if x.strip()]
    result["per_seed"] = {str(seed): run_modes(db, args.out / f"seed{seed}", seed, args.baselines) for seed in seeds}
    result["mean_test_macro_f1"] = {
        mode: {path: round(sum(result["per_seed"][str(s)][mode]["test"][path]["macro_f1"] for s in seeds) / len(seeds), 4)
               for path in ("local (FiLM)", "global", "gate", "safety rule")}
        for mode in ("joint", "frozen")
    }  # fmt: skip
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["load_avg_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=2))
    return 0


def run_modes(db: Path, out_dir: Path, seed: int, baselines: str) -> dict:
    """Train all stages with stage 3 `joint` and `frozen`; evaluate on test and val."""
    from heads import runs
    from heads.train import TrainConfig

    modes = {}
    for mode in ("joint", "frozen"):
        run_dir = out_dir / f"run_{mode}"
        t0 = time.perf_counter()
        out = runs.train(db, run_dir, "all", TrainConfig(seed=seed, stage3_heads=mode), log=_quiet)
        train_s = time.perf_counter() - t0
        which = tuple(b for b in baselines.split(",") if b) if mode == "joint" else ()
        report: dict = {"train_s": round(train_s, 1)}
        for on in ("test", "val"):
            ev = runs.evaluate_run(run_dir, db, on=on, baselines=which if on == "test" else (), log=_quiet)
            report[on] = {
                r["name"]: {k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k))
                            for k in ("n", "accuracy", "macro_f1", "ece", "ece_ts", "val_macro_f1", "selection_gap")}
                for r in ev["rows"]
            }  # fmt: skip
            if on == "test":
                conformal = {}
                for level in (0.9, 0.8):
                    ev_l = runs.evaluate_run(run_dir, db, on="test", baselines=(), conformal_level=level, log=_quiet)
                    c = ev_l["conformal"]
                    conformal[str(level)] = {
                        mode_: {"coverage": round(c[mode_]["coverage"], 4), "mean_size": round(c[mode_]["mean_size"], 3),
                                "empty_share": round(c[mode_]["empty_share"], 4),
                                "within_2_points": abs(c[mode_]["coverage"] - level) <= 0.02}
                        for mode_ in ("marginal", "class_conditional")
                    }  # fmt: skip
                report["conformal_test"] = conformal
        split = out["split"]
        report["split"] = split.summary()
        report["split_leak"] = split.info.get("leak")
        report["safety_rule"] = json.loads((run_dir / "safety.json").read_text())
        for k in ("rel_a", "rel_b"):
            report["safety_rule"].pop(k, None)
        modes[mode] = report
    return modes


if __name__ == "__main__":
    raise SystemExit(main())
