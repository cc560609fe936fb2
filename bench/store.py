"""Store throughput: write and load 1M rows x (1536 + 1024) float16 vectors.

    python bench/store.py [--rows 1000000] [--dir DIR]

Writes the rows through `Store.append` in extraction-sized commits, compacts, then loads all
vectors with `Store.load` (the training/search path) against `numpy.load` of the same arrays
from .npy files in the same run (page cache dropped for neither: each file is read once
before timing so both come from memory, and once cold where the OS allows). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.store import Store, vectors_to_arrow  # noqa: E402

DIMS = {"local": 1536, "context": 1024}


def chunk(start: int, n: int, rng: np.random.Generator) -> tuple[pa.Table, dict[str, np.ndarray]]:
    vecs = {k: rng.standard_normal((n, d), dtype=np.float32).astype(np.float16) for k, d in DIMS.items()}
    ids = np.arange(start, start + n)
    slide = ids // 100_000
    cols = {
        "slide_id": pa.array([f"slide_{s:03d}" for s in slide]),
        "cell_id": pa.array([f"cell_{i:08d}" for i in ids]),
        "x_px": pa.array(rng.uniform(0, 1e5, n)),
        "y_px": pa.array(rng.uniform(0, 1e5, n)),
        "x_um": pa.array(rng.uniform(0, 2.5e4, n)),
        "y_um": pa.array(rng.uniform(0, 2.5e4, n)),
        "tissue": pa.array(["breast"] * n),
        "run_id": pa.array(["bench"] * n),
    }
    for k, v in vecs.items():
        cols[f"{k}_outside"] = pa.array(np.zeros(n, np.float32))
        cols[k] = vectors_to_arrow(v)
    return pa.table(cols), vecs


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--commit", type=int, default=8192, help="rows per store commit")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed loads of each kind (medians)")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_store_"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "db"
    shutil.rmtree(db, ignore_errors=True)
    rng = np.random.default_rng(0)

    store = Store(db, create=True)
    store.cells_table("cells", DIMS, {"bench": True})
    npy = {k: np.lib.format.open_memmap(work / f"{k}.npy", mode="w+", dtype=np.float16, shape=(args.rows, d)) for k, d in DIMS.items()}
    write_s = 0.0
    for start in range(0, args.rows, args.commit):
        n = min(args.commit, args.rows - start)
        table, vecs = chunk(start, n, rng)
        t = time.perf_counter()
        store.append("cells", table)
        write_s += time.perf_counter() - t
        for k, v in vecs.items():
            npy[k][start : start + n] = v
    for m in npy.values():
        m.flush()
    del npy
    t = time.perf_counter()
    store.compact("cells")
    compact_s = time.perf_counter() - t
    store_bytes = dir_bytes(db)

    def load_store():
        return Store(db).load(dtype=np.float16)

    def load_npy():
        return {k: np.load(work / f"{k}.npy") for k in DIMS}

    # interleaved repeats (the first of each only warms the page cache); medians are reported
    times: dict[str, list[float]] = {"store": [], "npy": []}
    for rep in range(args.repeats + 1):
        for name, fn in (("store", load_store), ("npy", load_npy)):
            t = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t
            arrays = out.vectors if name == "store" else out
            assert all(arrays[k].shape == (args.rows, d) for k, d in DIMS.items())
            del out, arrays
            if rep:
                times[name].append(elapsed)
    results = {k: float(np.median(v)) for k, v in times.items()}

    vec_bytes = args.rows * sum(DIMS.values()) * 2
    print(json.dumps({
        "rows": args.rows,
        "dims": DIMS,
        "write_rows_per_s": round(args.rows / write_s),
        "write_MB_per_s": round(vec_bytes / write_s / 1e6, 1),
        "compact_seconds": round(compact_s, 2),
        "bytes_on_disk_per_cell": round(store_bytes / args.rows),
        "goal_bytes_per_cell_le_5500": store_bytes / args.rows <= 5500,
        "load_store_seconds": round(results["store"], 3),
        "load_npy_seconds": round(results["npy"], 3),
        "load_repeats_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "load_store_GB_per_s": round(vec_bytes / results["store"] / 1e9, 2),
        "speed_vs_npy": round(results["npy"] / results["store"], 3),
        "speed_vs_npy_best_of_each": round(min(times["npy"]) / min(times["store"]), 3),
        "goal_speed_vs_npy_ge_0_5": results["npy"] / results["store"] >= 0.5,
    }, indent=2))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
