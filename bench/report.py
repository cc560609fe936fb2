"""Benchmark: `heads report` on a synthetic store of N cells; prints JSON {cells, seconds, bytes}.

The store holds random vectors with class structure, labels, a run directory (class list,
split, metrics.json computed from fake probabilities) and the run's predictions. The cells lie
on real slide files (a small `embed synth` dataset: its slides, their sizes), so the galleries
read real crops; `--no-slides` leaves them out (skipped with a note). What is timed is `write_report` alone: the
parts that grow with the cell count (loading predictions, the gate violins, the batch-effect
index) must stay bounded so a 200k-cell page is as small and about as fast as a small one.

    python bench/report.py                 # 200k cells
    python bench/report.py --cells 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.store import Store, vectors_to_arrow  # noqa: E402
from heads import checkpoint as ckpt  # noqa: E402
from heads.export import predictions_frame  # noqa: E402
from heads.metrics import complementarity, evaluate, write_metrics_json  # noqa: E402
from heads.report import write_report  # noqa: E402

CLASSES = [f"class_{i}" for i in range(10)]


def _proba(rng: np.random.Generator, y: np.ndarray, strength: float) -> np.ndarray:
    logits = rng.normal(size=(len(y), len(CLASSES)))
    logits[np.arange(len(y)), y] += strength
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def make_store(root: Path, n: int, n_slides: int = 8, seed: int = 0,
               sizes: dict[str, tuple[int, int]] | None = None) -> tuple[Path, Path]:
    """(db, run dir) of a synthetic run with predictions for every one of `n` cells; with
    `sizes` ({slide id: (width, height) px}) the cells lie inside those slides."""
    rng = np.random.default_rng(seed)
    y = rng.choice(
        len(CLASSES),
        n,
        p=np.linspace(2, 0.5, len(CLASSES)) / np.linspace(2, 0.5, len(CLASSES)).sum(),
    )
    names = sorted(sizes) if sizes else [f"s{i}" for i in range(n_slides)]
    slides = np.asarray(names)[rng.integers(0, len(names), n)]
    wh = np.asarray([sizes[s] if sizes else (40000, 40000) for s in names], np.float64)[np.searchsorted(names, slides)]
    ids = np.array([f"c{i:07d}" for i in range(n)])
    centres = rng.normal(size=(len(CLASSES), 32)) * 2
    meta = pl.DataFrame({
        "slide_id": slides, "cell_id": ids, "x_px": rng.uniform(0, 1, n) * wh[:, 0], "y_px": rng.uniform(0, 1, n) * wh[:, 1],
        "tissue": np.where(np.arange(n) % 2, "lung", "breast"),
    }).with_columns(x_um=pl.col("x_px") * 0.25, y_um=pl.col("y_px") * 0.25)  # fmt: skip
    db = root / "db"
    store = Store(db, create=True)
    store.cells_table("cells", {"local": 32, "context": 16}, {"bench": 1})
    for lo in range(0, n, 50_000):
        sl = slice(lo, min(n, lo + 50_000))
        m = len(ids[sl])
        store.append("cells", pa.table({
            **{c: meta[c].to_numpy()[sl] for c in meta.columns}, "run_id": ["bench"] * m,
            "local_outside": np.zeros(m, np.float32), "local": vectors_to_arrow((centres[y[sl]] + rng.normal(size=(m, 32))).astype(np.float32)),
            "context_outside": np.zeros(m, np.float32), "context": vectors_to_arrow(rng.normal(size=(m, 16)).astype(np.float32)),
        }))  # fmt: skip
    labels = np.asarray(CLASSES, dtype=object)[y]
    store.set_labels(
        pl.DataFrame({"slide_id": slides, "cell_id": ids, "label": labels.tolist()}), source="bench"
    )

    run = root / "run"
    run.mkdir()
    (run / "local.safetensors").write_bytes(b"")  # read_info only checks that the weights exist
    info = {
        "format": ckpt.FORMAT,
        "format_version": ckpt.FORMAT_VERSION,
        "classes": CLASSES,
        "tissues": ["breast", "lung"],
    }
    (run / "local.json").write_text(json.dumps(info))
    split = np.asarray(["train", "val", "test", "guard"])[
        rng.choice(4, n, p=[0.6, 0.15, 0.15, 0.1])
    ]
    pl.DataFrame({"slide_id": slides, "cell_id": ids, "split": split}).write_parquet(
        run / "split.parquet"
    )
    p_local, p_global, p_gate = _proba(rng, y, 2.0), _proba(rng, y, 1.5), _proba(rng, y, 2.5)
    gate = rng.beta(2 + y % 3, 3, n).astype(np.float32)
    test = split == "test"
    rows = [{"name": name, **evaluate(y[test], p[test], CLASSES), "temperature": 1.3}
            for name, p in (("local (FiLM)", p_local), ("global", p_global), ("gate", p_gate))]  # fmt: skip
    comp = complementarity(y[test], p_local[test].argmax(1), p_global[test].argmax(1), CLASSES)
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test", "guard")}
    write_metrics_json(rows, run / "metrics.json", extra={
        "on": "test", "cells": int(test.sum()), "split": {"source": "bench", **counts},
        "complementarity": comp.to_dicts(), "classes_present": CLASSES, "classes_missing": [],
    })  # fmt: skip
    frame = predictions_frame(
        meta.with_columns(label=pl.Series(labels.tolist())),
        CLASSES,
        p_local,
        p_global,
        p_gate,
        gate,
    )
    store.write_predictions(frame.with_columns(run=pl.lit("run")))
    return db, run


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--no-slides", action="store_true", help="no slide files: galleries skipped")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes, slide_dir = None, None
        if not args.no_slides:
            from embedstore.io.slides import Slide
            from embedstore.synth import make_synthetic

            data = make_synthetic(Path(tmp) / "synth", seed=0, n_cells=400, n_slides=4)
            slide_dir = data.out_dir / "slides"
            sizes = {}
            for path in sorted(slide_dir.iterdir()):
                with Slide(path) as s:
                    sizes[s.slide_id] = s.dimensions
        db, run = make_store(Path(tmp), args.cells, sizes=sizes)
        t = time.perf_counter()
        out = write_report(run, db, slides=slide_dir, log=lambda m: print(m, file=sys.stderr))
        seconds = time.perf_counter() - t
        print(json.dumps({"cells": args.cells, "slides": len(sizes or {}), "seconds": round(seconds, 1),
                          "bytes": out.stat().st_size}))  # fmt: skip


if __name__ == "__main__":
    main()
