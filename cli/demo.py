"""The main job end to end on built-in synthetic data, offline (`./justw demo`).

synth slides + Xenium bundles -> ingest the bundles (H&E registration) -> labels from the
bundles' expression (`embed annotate`: no ground truth is used) -> extract (local: the
weights-free `hc-nucleus` features by default; context: the random test ViT) into a LanceDB store -> store summary -> train the three heads -> evaluate
(paths + baselines) -> predict (store, Parquet, GeoJSON) -> "cells like this one" -> label
audit with planted label flips -> the run's HTML report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
from rich.markup import escape

from cli.common import console


def step(title: str) -> float:
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--context-px", type=int, default=256, help="context field size for the test backbone")
    ap.add_argument("--local-backbone", default="hc-nucleus",
                    help="hc-nucleus (hand-crafted features, no weights) or test-vit-local (random ViT)")
    ap.add_argument("--flip", type=float, default=0.05, help="share of labels flipped before the audit")
    args = ap.parse_args(argv)

    from cli.embed import ExtractProgress
    from embedstore.annotate.recipe import AnnotateConfig
    from embedstore.extract.pipeline import ExtractConfig, extract
    from embedstore.io.cells import CellReport
    from embedstore.io.ingest import ingest_xenium
    from embedstore.search import explore
    from embedstore.store import Store
    from embedstore.synth import make_synthetic
    from heads import runs
    from heads.metrics import rich_results_table
    from heads.train import TrainConfig

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    summary: dict = {}
    def log(msg: str) -> None:  # library messages: "[local] ..." is text, not rich markup
        console.print(escape(msg), highlight=False)


    t = step("1. synthetic slides and Xenium bundles (`embed synth`)")
    data_dir = out / "synth"
    result = make_synthetic(data_dir, seed=args.seed, n_cells=args.cells, n_slides=args.slides)
    truth = pl.read_parquet(result.truth_path)
    log(f"{result.n_cells} cells, {len(result.slides)} slides, {truth['label'].n_unique()} classes, "
        f"{truth['tissue'].n_unique()} tissues in {time.perf_counter() - t:.1f} s -> {data_dir}")  # fmt: skip

    step("2. ingest the Xenium bundles through the H&E registration (`embed cells`)")
    frames, report = [], CellReport()
    for bundle in sorted((data_dir / "xenium").iterdir()):
        frame, rep = ingest_xenium(bundle)
        report.merge(rep)
        frames.append(frame)
    cells = pl.concat(frames)
    for line in report.lines():
        log(line)
    joined = cells.join(truth.select("slide_id", "cell_id", tx="x_px", ty="y_px"), on=["slide_id", "cell_id"])
    err = np.hypot(joined["x_px"] - joined["tx"], joined["y_px"] - joined["ty"]).to_numpy()
    log(f"registration error against the true H&E positions: median {np.median(err):.2e} px, max {err.max():.2e} px")
    cells = joined.drop("tx", "ty")  # no labels: they come from the expression (step 2b)
    cells_path = out / "cells.parquet"
    cells.write_parquet(cells_path)
    summary["cells"] = cells.height

    step("2b. labels from the Xenium expression with a marker panel (`embed annotate`)")
    from embedstore.annotate.recipe import annotate, read_panel
    from embedstore.annotate.report import write_report

    ann, samples = annotate([data_dir / "xenium"], data_dir / "panel.csv", log=log)
    ann.write_parquet(out / "labels.parquet")
    md = write_report(ann, samples, read_panel(data_dir / "panel.csv"), out / "labels_report", AnnotateConfig())
    checked = ann.join(truth.select("slide_id", "cell_id", truth="label", kind="expression_kind"), on=["slide_id", "cell_id"])
    kept = checked.filter(pl.col("kept"))
    acc = float((kept["label"] == kept["truth"]).mean())
    rates = {r["kind"]: r["kept"] for r in checked.group_by("kind").agg(pl.col("kept").mean()).iter_rows(named=True)}
    log(f"{kept.height} of {ann.height} cells kept; accuracy of the kept labels against the synthetic truth "
        f"{acc:.3f}; kept share: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(rates.items())) + f"; report {md}")  # fmt: skip
    summary["annotate"] = {"kept": kept.height, "accuracy_kept": acc, "kept_rate": rates}
    summary["registration_max_err_px"] = float(err.max())

    step(f"3. extract vectors: local {args.local_backbone}, context test-vit-context (`embed extract`; offline)")
    db = out / "store"
    cfg = ExtractConfig(local_backbone=args.local_backbone, context_backbone="test-vit-context",
                        context_input_px=args.context_px, batch_size=32, workers=2)  # fmt: skip
    with ExtractProgress(quiet=False) as events:
        ex = extract(data_dir / "slides", cells_path, db, cfg, on_event=events)
    log(f"{ex['written']} cells in {ex['seconds']:.1f} s ({ex['cells_per_s']:.1f} cells/s)")
    Store(db).set_labels(ann.select("slide_id", "cell_id", "label", "label_confidence"), source="annotate:xenium-markers")
    log("labels from step 2b -> the store (`embed annotate --db`): the heads train on the kept ones")
    summary["extract"] = {k: ex[k] for k in ("written", "already_stored", "cells_per_s")}

    step("4. store summary (`embed info`)")
    info = Store(db).info()
    for name, tinfo in info["tables"].items():
        log(f"table {name}: {tinfo['cells']} cells over {len(tinfo['slides'])} slides, vectors {tinfo['vectors']}, "
            f"{info['bytes_on_disk'] / 1e6:.1f} MB on disk")  # fmt: skip

    step("5. train the heads: local (FiLM) -> global (context) -> gate (`heads train --stage all`)")
    run_dir = out / "run"
    runs.train(db, run_dir, "all", TrainConfig(seed=args.seed), log=lambda m: None if "] epoch " in m else log(m))

    step("6. evaluate paths, safety rule and baselines on the held-out test stripes (`heads eval`)")
    ev = runs.evaluate_run(run_dir, db, log=log)
    console.print(rich_results_table(ev["table"], title="test stripe of each slide (val_macro_f1: the cells that chose the model)"))
    f1 = {r["name"]: r["macro_f1"] for r in ev["rows"]}
    summary["macro_f1_test"] = f1
    summary["macro_f1_val"] = {r["name"]: r.get("val_macro_f1") for r in ev["rows"]}
    ok = f1["gate"] >= max(f1["local (FiLM)"], f1["global"])
    console.print(f"gate macro-F1 {f1['gate']:.3f} vs local {f1['local (FiLM)']:.3f}, global {f1['global']:.3f}: "
                  + ("[green]gate >= each path[/]" if ok else "[red]gate below a path[/]"))  # fmt: skip
    if ev["conformal"] is not None:
        m = ev["conformal"]["marginal"]
        log(f"conformal sets at 90%: coverage {m['coverage']:.3f} on {m['n']} test cells, mean set size "
            f"{m['mean_size']:.2f}, empty sets {m['empty_share']:.1%}")  # fmt: skip
        summary["conformal_90"] = {k: m[k] for k in ("coverage", "mean_size", "empty_share")}

    step("7. predictions to the store, Parquet and QuPath GeoJSON (`heads predict`)")
    runs.predict(run_dir, db, log=log)

    step("8. cells like this one (`embed similar`)")
    query = cells.join(truth.select("slide_id", "cell_id", "label"), on=["slide_id", "cell_id"]).filter(pl.col("label") == "B_Cell").row(0, named=True)
    ref = f"{query['slide_id']}:{query['cell_id']}"
    found = explore.similar(db, ref, 8, exclude_same_slide=True, notify=log)
    log(f"query {ref} ({query['label']}); neighbours on other slides: "
        + ", ".join(label or "-" for label in found["label"].to_list()[1:]))  # fmt: skip (-: no kept label)
    gallery = explore.gallery(db, found, out / "similar.png")
    log(f"gallery -> {gallery}")
    share, chance = neighbour_label_share(db, truth, k=20, n_queries=300, seed=args.seed)
    log(f"do neighbours share the query's class? {share:.3f} of the 20 nearest {args.local_backbone} neighbours "
        f"of 300 random cells carry its true class (chance {chance:.3f})")  # fmt: skip
    summary["similar_same_class_share"] = {"local_backbone": args.local_backbone, "k": 20, "share": share, "chance": chance}

    step(f"9. label audit with {args.flip:.0%} planted label flips (`embed audit`)")
    store = Store(db)
    labels = store.labels()
    rng = np.random.default_rng(args.seed)
    classes = sorted(labels["label"].drop_nulls().unique().to_list())
    flip = (rng.random(labels.height) < args.flip) & labels["label"].is_not_null().to_numpy()
    new = [rng.choice([c for c in classes if c != old]) if f else old for old, f in zip(labels["label"], flip, strict=True)]
    store.set_labels(labels.with_columns(label=pl.Series(new)).drop("source"), source="demo: planted flips")
    queue, flags = explore.audit(db, k=15, vector="both", notify=log)
    flipped = set(labels.filter(pl.Series(flip)).select(pl.col("slide_id") + "/" + pl.col("cell_id")).to_series())
    flagged = set(queue.filter(pl.col("flagged")).select(pl.col("slide_id") + "/" + pl.col("cell_id")).to_series())
    tp = len(flipped & flagged)
    precision = tp / max(len(flagged), 1)
    recall = tp / max(len(flipped), 1)
    top = set(queue.head(len(flipped)).select(pl.col("slide_id") + "/" + pl.col("cell_id")).to_series())
    log(f"{len(flipped)} labels flipped, {len(flagged)} cells flagged: precision {precision:.2f}, recall {recall:.2f} "
        f"(chance precision {len(flipped) / labels.height:.2f}); precision in the top {len(flipped)} of the queue "
        f"{len(top & flipped) / max(len(flipped), 1):.2f}")  # fmt: skip
    store.set_labels(labels.drop("source"), source="annotate:xenium-markers")  # put the annotated labels back
    summary["audit"] = {"flipped": len(flipped), "flagged": len(flagged), "precision": precision, "recall": recall}

    step("10. the run's report: one self-contained HTML page (`heads report`)")
    from heads.report import write_report

    page = write_report(run_dir, db, log=log)
    summary["report"] = str(page)

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.rule()
    console.print(f"[green]done[/]: {out / 'summary.json'}; run directory {run_dir} (metrics.json, plots, predictions)")
    console.print(f"[bold]report[/]: open {page} in a browser")
    return summary


def neighbour_label_share(db: Path, truth: pl.DataFrame, *, k: int, n_queries: int, seed: int) -> tuple[float, float]:
    """Mean share of a random cell's k nearest local-vector neighbours (exact cosine, itself
    excluded) with its true class, and the chance level sum_c p_c^2."""
    from embedstore.search.index import exact_knn
    from embedstore.store import Store

    loaded = Store(db).load(vectors=("local",))
    labels = loaded.meta.select("slide_id", "cell_id").join(
        truth.select("slide_id", "cell_id", "label"), on=["slide_id", "cell_id"], how="left", maintain_order="left",
    )["label"].to_numpy()  # fmt: skip
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(len(labels), min(n_queries, len(labels)), replace=False))
    _, ids = exact_knn(loaded.vectors["local"], loaded.vectors["local"][queries], k, query_ids=queries)
    share = float((labels[ids] == labels[queries][:, None]).mean())
    freq = np.unique(labels, return_counts=True)[1] / len(labels)
    return share, float((freq**2).sum())


if __name__ == "__main__":
    main()
