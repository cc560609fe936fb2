"""`heads predict` on Ray vs one process: cells/s with 1 and 2 Ray workers and the
single-process `predict`, on the same store, in the same process.

    python bench/ray_predict.py [--cells 240] [--slides 4] [--cell-copies 25] [--slide-copies 4]

A small synthetic cohort is extracted with the test backbones and a tiny run trained on it;
the store is then grown by storing every cell again under new cell ids and every slide again
under new slide ids, so the predict pass has real volume without hours of extraction. CPU, one torch
thread per worker, one local Ray for both Ray runs (its start is not timed; each run's actor
start-up is, and reported apart). Prints JSON with `os.getloadavg()` before and after: on a
shared machine the ratios move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

# the repository's `heads` package, not bench/heads.py next to this script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build(
    root: Path, cells: int, slides: int, cell_copies: int, slide_copies: int
) -> tuple[Path, Path, int]:
    """(db, run dir, stored cells): extract, train, then store every cell again under new cell
    ids (`cell_copies` times per slide) and every slide again under new slide ids."""
    import polars as pl

    from embedstore.extract.pipeline import ExtractConfig, extract
    from embedstore.store import Store
    from embedstore.synth import make_synthetic
    from heads.runs import train
    from heads.splits import SplitConfig
    from heads.train import TrainConfig

    syn = make_synthetic(root / "data", seed=3, n_cells=cells, n_slides=slides)
    db = root / "db"
    extract(syn.out_dir / "slides", syn.cells_path, db,
            ExtractConfig(local_backbone="test-vit-local", context_backbone="test-vit-context",
                          context_input_px=64, batch_size=16, workers=1, commit_every=256))  # fmt: skip
    cfg = TrainConfig(epochs=2, global_epochs=2, gate_epochs=1, batch_size=64)
    train(
        db,
        root / "run",
        "all",
        cfg,
        scale=False,
        split_config=SplitConfig(guard_um=40),
        log=lambda m: None,
    )
    store = Store(db)
    base = store.open("cells").to_arrow()
    schema = base.schema
    frame = pl.from_arrow(base)
    copies = [frame.with_columns(pl.col("cell_id") + f"-c{k}") for k in range(1, cell_copies)]
    grown = pl.concat([frame, *copies]).sort("slide_id", maintain_order=True)
    extra = [grown.with_columns(pl.col("slide_id") + f"-s{k}") for k in range(1, slide_copies)]
    store.db.drop_table("cells")  # rewritten slide by slide: each slide stored contiguously
    store.db.create_table("cells", data=pl.concat([grown, *extra]).to_arrow().cast(schema))
    return db, root / "run", store.open("cells").count_rows()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=int, default=240, help="cells of the extracted cohort")
    ap.add_argument("--slides", type=int, default=4, help="slides of the extracted cohort")
    ap.add_argument(
        "--cell-copies", type=int, default=25, help="times each cell is stored (new cell ids)"
    )
    ap.add_argument(
        "--slide-copies", type=int, default=4, help="times each slide is stored (new slide ids)"
    )
    args = ap.parse_args()
    import ray
    import torch

    from heads.distributed import predict_ray
    from heads.runs import predict

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        db, run_dir, n = _build(root, args.cells, args.slides, args.cell_copies, args.slide_copies)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        predict(run_dir, db, out_dir=root / "local", log=lambda m: None)
        local_s = time.perf_counter() - t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(
                num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False
            )
        rays = {}
        try:
            for w in (1, 2):
                s = predict_ray(
                    run_dir, db, out_dir=root / f"ray{w}", workers=w, log=lambda m: None
                )
                busy = s["seconds"] - s["startup_seconds"]
                rays[w] = {"seconds": round(s["seconds"], 2), "startup_s": round(s["startup_seconds"], 2),
                           "cells_per_s": round(s["cells_per_s"], 1), "cells_per_s_after_startup": round(s["cells"] / busy, 1),
                           "task_seconds": round(s["task_seconds"], 2),
                           "task_breakdown_s": {k: round(v, 2) for k, v in s["task_breakdown"].items()}}  # fmt: skip
        finally:
            ray.shutdown()
    local_rate = n / local_s
    print(json.dumps({
        "cells": n, "slides": args.slides * args.slide_copies, "build_s": round(build_s, 1), "cpus": os.cpu_count(),
        "local": {"seconds": round(local_s, 2), "cells_per_s": round(local_rate, 1)},
        "ray_1_worker": rays[1], "ray_2_workers": rays[2],
        "ratio_2_vs_1_workers": round(rays[2]["cells_per_s"] / rays[1]["cells_per_s"], 2),
        "ratio_2_vs_1_workers_after_startup": round(rays[2]["cells_per_s_after_startup"] / rays[1]["cells_per_s_after_startup"], 2),
        "ratio_ray2_vs_local": round(rays[2]["cells_per_s"] / local_rate, 2),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
