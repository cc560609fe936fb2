"""Cost of `Store.write_predictions` (the per-slide upsert `heads predict` makes) as the
`predictions` table grows, against a plain append of the same rows in the same process.

    python bench/predictions.py [--slides 40] [--cells 25000] [--classes 8]

Each step upserts one new slide's predictions (run "r1") into the store and appends the same
Arrow rows to a scratch LanceDB table; at the end the first slide is upserted again (a retried
task: rows replaced, none added). The upsert is a merge on (run, slide_id, cell_id), so its
cost is expected to grow with the table while the append's does not; the JSON gives each
step's seconds, the ratio upsert/append, the medians of the first and last quarter of the
steps (the store indexes `run` and `slide_id` past `PREDICTIONS_INDEX_ROWS`, a one-off step
each time) and the least-squares growth in seconds per million stored rows, with
`os.getloadavg()` before and after.
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

from embedstore.store import Store  # noqa: E402


def slide_frame(slide: int, cells: int, classes: int, rng: np.random.Generator) -> pl.DataFrame:
    """One slide's predictions, shaped as `heads.runs.predict_frame` returns them."""
    names = [f"class_{i}" for i in range(classes)]
    proba = rng.dirichlet(np.ones(classes), size=cells).astype(np.float32)
    top = proba.argmax(1)
    pred = np.asarray(names)[top]
    conf = proba.max(1)
    cols = {
        "run": ["r1"] * cells,
        "slide_id": [f"slide_{slide:04d}"] * cells,
        "cell_id": [f"cell_{i:07d}" for i in range(cells)],
        "pred_class": pred, "pred_confidence": conf, "pred_source": ["gate"] * cells,
        "local_class": pred, "local_confidence": conf, "global_class": pred, "global_confidence": conf,
        "gate": rng.uniform(0, 1, cells).astype(np.float32), "safety_class": pred,
        "conformal_set": pred, "set_size": np.ones(cells, np.int32),
    }  # fmt: skip
    frame = pl.DataFrame(cols)
    return frame.with_columns(pl.Series(f"prob_{n}", proba[:, i]) for i, n in enumerate(names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--cells", type=int, default=25_000, help="cells per slide")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_predictions_", dir=args.dir))
    rng = np.random.default_rng(0)
    store = Store(root / "db", create=True)
    scratch = store.db  # the append baseline: a second table in the same LanceDB
    load_before = [round(v, 2) for v in os.getloadavg()]
    steps, first = [], None
    for s in range(args.slides):
        frame = slide_frame(s, args.cells, args.classes, rng)
        first = frame if first is None else first
        rows_before = store.db.open_table("predictions").count_rows() if store.has("predictions") else 0
        t = time.perf_counter()
        store.write_predictions(frame)
        upsert = time.perf_counter() - t
        arrow = store.db.open_table("predictions").to_lance().to_table(filter=f"slide_id = 'slide_{s:04d}'")
        t = time.perf_counter()
        if s == 0:
            baseline = scratch.create_table("append_baseline", data=arrow)
        else:
            baseline.add(arrow)
        append = time.perf_counter() - t
        steps.append({"rows_before": rows_before, "upsert_s": round(upsert, 3), "append_s": round(append, 3),
                      "upsert_over_append": round(upsert / append, 2)})  # fmt: skip
        print(f"slide {s + 1}/{args.slides}: {rows_before:,} rows, upsert {upsert:.2f} s, append {append:.2f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    rows = store.db.open_table("predictions").count_rows()
    t = time.perf_counter()
    store.write_predictions(first)  # a retried task: same keys, rows replaced
    retry = time.perf_counter() - t
    after = store.db.open_table("predictions").count_rows()
    x = np.array([s["rows_before"] for s in steps]) / 1e6
    y = np.array([s["upsert_s"] for s in steps])
    ya = np.array([s["append_s"] for s in steps])
    slope, intercept = np.polyfit(x, y, 1)
    slope_a, _ = np.polyfit(x, ya, 1)
    result = {
        "slides": args.slides, "cells_per_slide": args.cells, "classes": args.classes,
        "rows_at_end": rows, "rows_after_retry": after, "retry_added_rows": after - rows,
        "retry_upsert_s": round(retry, 3),
        "upsert_s_first_slide": steps[0]["upsert_s"], "upsert_s_last_slide": steps[-1]["upsert_s"],
        "upsert_s_median_first_quarter": round(float(np.median(y[: max(1, len(y) // 4)])), 3),
        "upsert_s_median_last_quarter": round(float(np.median(y[-max(1, len(y) // 4):])), 3),
        "upsert_growth_s_per_million_rows": round(float(slope), 3),
        "upsert_s_at_zero_rows_fit": round(float(intercept), 3),
        "append_growth_s_per_million_rows": round(float(slope_a), 3),
        "median_upsert_over_append": round(float(np.median([s["upsert_over_append"] for s in steps])), 2),
        "last_upsert_over_append": steps[-1]["upsert_over_append"],
        "steps": steps, "load_avg_before": load_before, "load_avg_after": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.dir is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
