"""`embed index`: single process vs Ray (1 and 2 workers) on the same synthetic store.

    python bench/ray_index.py [--n 200000] [--dim 256] [--shard-rows 65536] [--threads 1]

Builds the IVF index of one store three ways in this process (ratios are taken here, on the
same machine load): `explore.build_index` (loads every vector), then `build_index_ray` with 1
and 2 workers on one local Ray started beforehand (its start-up is reported apart; workers are
warmed up with one no-op task each). Prints JSON: build seconds and ratios, tuned nprobe,
recall@20 of each index against exact search on --queries stored rows (self excluded), index
bytes per row, how many serialised bytes differ from the single-process index, the driver's
peak resident memory during each build (sampled), and os.getloadavg() before and after.
--threads pins FAISS/BLAS threads for every build (1 = as in the Ray tasks: byte-identical).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from embedstore.search import explore  # noqa: E402
from embedstore.search import index as search
from embedstore.search.distributed import build_index_ray  # noqa: E402
from embedstore.store import Store, vectors_to_arrow  # noqa: E402


class PeakRss:
    """Peak resident set size of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.start = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def now() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    @property
    def gb(self) -> float:
        return round(self.peak / 1e9, 3)


def make_store(db: Path, n: int, dim: int, seed: int, chunk: int = 50_000) -> None:
    """Clustered vectors on a 64-d latent (so that neighbours mean something), fp16 as stored."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, 64)).astype(np.float32) * 2
    mix = rng.normal(size=(64, dim)).astype(np.float32) / 8
    store = Store(db, create=True)
    store.cells_table("cells", {"local": dim, "context": 8}, {"bench": "ray_index"})
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = centres[rng.integers(0, len(centres), m)] + rng.normal(size=(m, 64)).astype(np.float32)
        x = z @ mix + rng.normal(size=(m, dim)).astype(np.float32) * 0.3
        store.append("cells", pa.table({
            "slide_id": [f"s{i % 16}" for i in range(s, s + m)], "cell_id": [f"c{i:09d}" for i in range(s, s + m)],
            "x_px": np.zeros(m), "y_px": np.zeros(m), "x_um": np.zeros(m), "y_um": np.zeros(m),
            "tissue": ["lung"] * m, "run_id": ["bench"] * m,
            "local_outside": np.zeros(m, np.float32), "local": vectors_to_arrow(x),
            "context_outside": np.zeros(m, np.float32), "context": vectors_to_arrow(rng.normal(size=(m, 8))),
        }))  # fmt: skip


def recall(index, rows: np.ndarray, truth: np.ndarray) -> float:
    _, got = index.search_rows(rows, truth.shape[1])
    return round(float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, truth, strict=True)])), 4)


def warm(ray, workers: int) -> None:
    @ray.remote(num_cpus=1)
    def ready() -> int:
        import embedstore.search.distributed  # noqa: F401  (the imports a task pays once per worker)

        return os.getpid()

    ray.get([ready.remote() for _ in range(workers)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=2 * search.CHUNK_ROWS)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="FAISS/BLAS threads for every build")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import ray

    out: dict = {"n": args.n, "dim": args.dim, "shard_rows": args.shard_rows, "cpus": os.cpu_count(),
                 "faiss_threads": args.threads or faiss.omp_get_max_threads(), "loadavg_before": os.getloadavg()}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench_ray_index_"))
    try:
        t = time.perf_counter()
        make_store(work / "db", args.n, args.dim, args.seed)
        out["store_write_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        warm(ray, 2)
        out["ray_start_s"] = round(time.perf_counter() - t, 2)
        pin = (lambda: search._omp_threads(args.threads)) if args.threads else nullcontext
        builds = {}
        for name, workers in (("ray1", 1), ("ray2", 2), ("single", 0)):
            t = time.perf_counter()
            with PeakRss() as rss, pin():
                if workers:
                    index, _ = build_index_ray(work / "db", kind="ivf", root=work / name, workers=workers,
                                               shard_rows=args.shard_rows)  # fmt: skip
                else:
                    index, _, vectors = explore.build_index(work / "db", kind="ivf", root=work / name)
            builds[name] = index
            out[name] = {"seconds": round(time.perf_counter() - t, 2), "driver_peak_rss_gb": rss.gb,
                         "driver_rss_before_gb": round(rss.start / 1e9, 3),
                         "phases_s": index.info.get("build", {}).get("seconds"),
                         "search": index.info["search"], "tuned_recall": index.info["tuned_recall"],
                         "bytes_per_row": round((work / name / "cells" / "local" / "index.faiss").stat().st_size / args.n, 1)}  # fmt: skip
        ray.shutdown()
        out["factory"] = builds["single"].info["params"]["factory"]
        out["ray1_over_single"] = round(out["ray1"]["seconds"] / out["single"]["seconds"], 3)
        out["ray2_over_single"] = round(out["ray2"]["seconds"] / out["single"]["seconds"], 3)
        out["ray2_over_ray1"] = round(out["ray2"]["seconds"] / out["ray1"]["seconds"], 3)
        rows = np.random.default_rng(args.seed + 1).choice(args.n, args.queries, replace=False)
        _, truth = search.exact_knn(vectors, vectors[rows], 20, query_ids=rows)
        ref = faiss.serialize_index(builds["single"]._index)
        for name, index in builds.items():
            out[name]["recall_at_20"] = recall(index, rows, truth)
            got = faiss.serialize_index(index._index)
            if name != "single":
                out[name]["bytes_differing_from_single"] = int((got != ref).sum()) if got.size == ref.size else "size"
                _, a = builds["single"].search_rows(rows, 20)
                _, b = index.search_rows(rows, 20)
                out[name]["same_neighbours_as_single"] = bool(np.array_equal(a, b))
        out["loadavg_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
