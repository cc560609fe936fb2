"""The main job end to end on built-in synthetic data, offline (`./justw demo`).

synth slides + Xenium bundles -> ingest the bundles (registration) -> extract with the test
backbones into a LanceDB store -> store summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl

from cli.common import console


def step(title: str) -> float:
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", type=int, default=1500)
    ap.add_argument("--slides", type=int, default=3)
    args = ap.parse_args(argv)

    from cli.embed import ExtractProgress
    from embedstore.cells import CellReport
    from embedstore.extract import ExtractConfig, extract
    from embedstore.ingest import ingest_xenium
    from embedstore.store import Store
    from embedstore.synth import make_synthetic

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    summary: dict = {}

    t = step("1. synthetic slides and Xenium bundles")
    data_dir = out / "synth"
    result = make_synthetic(data_dir, seed=args.seed, n_cells=args.cells, n_slides=args.slides)
    truth = pl.read_parquet(result.truth_path)
    console.print(
        f"{result.n_cells} cells, {len(result.slides)} slides, "
        f"{truth['label'].n_unique()} classes, {truth['tissue'].n_unique()} tissues "
        f"in {time.perf_counter() - t:.1f} s -> {data_dir}"
    )

    t = step("2. ingest the Xenium bundles (H&E registration)")
    frames, report = [], CellReport()
    for bundle in sorted((data_dir / "xenium").iterdir()):
        frame, rep = ingest_xenium(bundle)
        report.merge(rep)
        frames.append(frame)
    cells = pl.concat(frames)
    for line in report.lines():
        console.print(line, highlight=False)
    joined = cells.join(truth.select("slide_id", "cell_id", "label", tx="x_px", ty="y_px"), on=["slide_id", "cell_id"])
    err = np.hypot(joined["x_px"] - joined["tx"], joined["y_px"] - joined["ty"]).to_numpy()
    console.print(f"registration error vs truth: median {np.median(err):.3f} px, max {err.max():.3f} px")
    cells = joined.drop("tx", "ty")
    cells_path = out / "cells.parquet"
    cells.write_parquet(cells_path)
    summary["cells"] = cells.height
    summary["registration_max_err_px"] = float(err.max())

    t = step("3. extract vectors with the test backbones (offline, random weights)")
    db = out / "store"
    cfg = ExtractConfig(local_backbone="test-vit-local", context_backbone="test-vit-context", batch_size=32, workers=2)
    with ExtractProgress(quiet=False) as events:
        ex = extract(data_dir / "slides", cells_path, db, cfg, on_event=events)
    console.print(f"{ex['written']} cells in {ex['seconds']:.1f} s ({ex['cells_per_s']:.1f} cells/s)")
    summary["extract"] = {k: ex[k] for k in ("written", "already_stored", "cells_per_s")}

    step("4. store summary (`embed info`)")
    info = Store(db).info()
    for name, tinfo in info["tables"].items():
        console.print(f"table {name}: {tinfo['cells']} cells over {len(tinfo['slides'])} slides, vectors {tinfo['vectors']}")
    if info["bytes_on_disk"]:
        console.print(f"{info['bytes_on_disk'] / 1e6:.1f} MB on disk")
    summary["store"] = {n: t["cells"] for n, t in info["tables"].items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[green]done[/]: summary in {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
