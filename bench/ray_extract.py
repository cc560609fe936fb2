"""Extraction on Ray: throughput with 1 vs 2 local workers, and Ray's overhead per slide.

    python bench/ray_extract.py [--cells 480] [--slides 8] [--big-slide-cells 320]

Test backbones on CPU, one torch thread per worker, the same synthetic cohort for every run,
one local Ray for all runs. Prints JSON: cells/s per worker count (wall, and after the actors
are up), their ratio, the single-process `extract` for reference, the median round trip of a
no-op actor call, and per slide the worker time not spent inside tasks
((wall after startup x workers - time in tasks) / slides: dispatch, polling, load imbalance).
Then one big slide on 2 workers, as one task vs in 4 spatial shards (the shards keep both
workers busy), and the cohort on 2 workers into a `file://` URI store (the lock-free
merge-insert commit path of object stores) vs a local directory (locked appends).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path


def _cfg():
    from embedstore.extract.pipeline import ExtractConfig

    return ExtractConfig(local_backbone="test-vit-local", context_backbone="test-vit-context",
                         context_input_px=64, batch_size=16, workers=1, commit_every=64)  # fmt: skip


def _ping_ms(ray, n: int = 50) -> float:
    from embedstore.extract.distributed import _SlideWorker

    worker = ray.remote(_SlideWorker).options(num_cpus=1).remote(_cfg(), 1)
    ray.get(worker.ping.remote())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        ray.get(worker.ping.remote())
        times.append(time.perf_counter() - t)
    ray.kill(worker)
    return 1e3 * sorted(times)[n // 2]


def _one(syn, db, workers: int, cells=None, shard_cells: int = 200_000) -> dict:
    from embedstore.extract.distributed import extract_ray

    s = extract_ray(syn.out_dir / "slides", syn.cells_path if cells is None else cells, db, _cfg(), workers=workers,
                    shard_cells=shard_cells)  # fmt: skip
    busy = s["seconds"] - s["startup_seconds"]
    return {"written": s["written"], "seconds": round(s["seconds"], 2), "startup_s": round(s["startup_seconds"], 2),
            "cells_per_s": round(s["cells_per_s"], 1), "cells_per_s_after_startup": round(s["written"] / busy, 1),
            "tasks": s["tasks"], "idle_per_task_s": round((busy * workers - s["task_seconds"]) / s["tasks"], 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=int, default=480)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--big-slide-cells", type=int, default=320)
    args = ap.parse_args()
    import ray
    import torch

    from embedstore.extract.pipeline import extract
    from embedstore.synth import make_synthetic

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        syn = make_synthetic(root / "data", seed=5, n_cells=args.cells, n_slides=args.slides)
        t = time.perf_counter()
        local = extract(syn.out_dir / "slides", syn.cells_path, root / "db_local", _cfg())
        local_s = time.perf_counter() - t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        try:
            runs = {w: _one(syn, root / f"db{w}", w) for w in (1, 2)}
            uri = _one(syn, f"file://{root / 'db_uri'}", 2)
            big = make_synthetic(root / "big", seed=6, n_cells=args.big_slide_cells, n_slides=1)
            whole = _one(big, root / "big_whole", 2)
            sharded = _one(big, root / "big_sharded", 2, shard_cells=-(-args.big_slide_cells // 4))
            ping = _ping_ms(ray)
        finally:
            ray.shutdown()
    out = {
        "cells": args.cells, "slides": args.slides, "cpus": os.cpu_count(),
        "local_engine": {"cells_per_s": round(local["written"] / local_s, 1), "seconds": round(local_s, 2)},
        "ray_1_worker": runs[1], "ray_2_workers": runs[2],
        "ratio_2_vs_1": round(runs[2]["cells_per_s"] / runs[1]["cells_per_s"], 2),
        "ratio_2_vs_1_after_startup": round(runs[2]["cells_per_s_after_startup"] / runs[1]["cells_per_s_after_startup"], 2),
        "noop_actor_round_trip_ms": round(ping, 2),
        "uri_store_2_workers": uri, "uri_vs_directory_after_startup":
            round(uri["cells_per_s_after_startup"] / runs[2]["cells_per_s_after_startup"], 2),
        "big_slide": {"cells": args.big_slide_cells, "one_task": whole, "four_shards": sharded,
                      "ratio_shards_vs_one_task_after_startup":
                          round(sharded["cells_per_s_after_startup"] / whole["cells_per_s_after_startup"], 2)},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
