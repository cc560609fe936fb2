"""What `heads train | eval | predict` do, as a Python API: store -> CellData -> heads -> results.

A run directory holds the stage checkpoints (`local|global|gate.safetensors` + `.json`), the
split used for training (`split.parquet`: slide_id, cell_id, split) so that evaluation sees
exactly the same cells, and, after `evaluate_run`, `metrics.json` plus its plots and tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from embedstore.errors import UserError
from embedstore.fileio import atomic_path, ensure_dir
from embedstore.store import DEFAULT_TABLE, Store

from . import checkpoint as ckpt
from .baselines import run_baselines
from .calibration import TemperatureScaler, expected_calibration_error
from .data import CellData
from .export import predictions_frame, write_geojson, write_parquet
from .metrics import (
    apply_synonyms,
    complementarity,
    evaluate,
    restrict_to_present,
    results_table,
    write_metrics_json,
)
from .plots import complementarity_chart, confusion_heatmap, reliability_diagram
from .splits import Split, make_split
from .train import STAGE_CHOICES, TrainConfig, predict_all, train_stage

Log = Callable[[str], None]
SPLIT_FILE = "split.parquet"
#: path name in tables -> key of predict_all's output
PATHS = {"local (FiLM)": "p_local", "global": "p_global", "gate": "p_gate"}


def load_cell_data(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    slides: Sequence[str] | None = None,
    tissues: Sequence[str] | None = None,
    labels: str | Path | None = None,
    classes: Sequence[str] | None = None,
    tissue_vocab: Sequence[str] | None = None,
    labelled_only: bool = False,
) -> CellData:
    """Cells and vectors from the store as `CellData` (labels from the store or `labels`)."""
    loaded = Store(db).load(table, slides=list(slides or []) or None, tissues=list(tissues or []) or None)
    meta = loaded.meta
    if labels is not None:
        from embedstore.cells import check_unique_keys, clean_text_columns, read_table

        lab = read_table(labels)
        missing = [c for c in ("slide_id", "cell_id", "label") if c not in lab.columns]
        if missing:
            raise UserError(f"{labels}: no {', '.join(missing)} column; columns are {lab.columns}")
        lab = clean_text_columns(lab.with_columns(pl.col("slide_id").cast(pl.Utf8), pl.col("cell_id").cast(pl.Utf8)), ["label", "split"])
        check_unique_keys(lab, f"label table {labels}", UserError)
        keep = [c for c in ("label", "label_confidence", "split") if c in lab.columns]
        meta = meta.drop([c for c in keep if c in meta.columns]).join(
            lab.select("slide_id", "cell_id", *keep), on=["slide_id", "cell_id"], how="left", maintain_order="left"
        )
    if "label" not in meta.columns or meta["label"].null_count() == meta.height:
        if labelled_only:
            raise UserError(
                f"no labels for the cells of table {table!r} in {db}: attach them with "
                "`embed labels TABLE --db DB` or pass --labels TABLE"
            )
        if "label" not in meta.columns:
            meta = meta.with_columns(label=pl.lit(None, dtype=pl.Utf8))
    local, context = loaded.vectors["local"], loaded.vectors["context"]
    if labelled_only:
        keep_rows = np.flatnonzero(meta["label"].is_not_null().to_numpy())
        meta, local, context = meta[keep_rows], local[keep_rows], context[keep_rows]
    return CellData.from_arrays(
        meta, local, context, provenance=loaded.config, classes=classes, tissues=tissue_vocab
    )


def save_split(run_dir: Path, data: CellData, split: Split) -> None:
    names = split.labels(len(data))
    frame = data.meta.select("slide_id", "cell_id").with_columns(split=pl.Series(names.astype(str)))
    with atomic_path(run_dir / SPLIT_FILE) as tmp:
        frame.filter(pl.col("split") != "").write_parquet(tmp)


def load_split(run_dir: Path, data: CellData) -> Split:
    """The training split of `run_dir`, aligned to `data`'s rows (new cells belong to none)."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.exists():
        raise UserError(f"{path} is missing: train this run with `heads train` first")
    saved = pl.read_parquet(path)
    names = (
        data.meta.select("slide_id", "cell_id")
        .join(saved, on=["slide_id", "cell_id"], how="left", maintain_order="left")["split"]
        .fill_null("")
        .to_numpy()
    )
    if saved.height and not (names != "").any():
        ex = saved.head(2).select(pl.col("slide_id") + ":" + pl.col("cell_id")).to_series().to_list()
        raise UserError(
            f"none of the {saved.height} cells this run was trained and validated on (e.g. {ex}) "
            "are labelled cells of this store: evaluate on the run's own store, or score another "
            "store as a held-out cohort with --cohort NAME"
        )
    parts = {p: np.flatnonzero(names == p).astype(np.int64) for p in ("train", "val", "test", "holdout")}
    return Split(**parts, source="saved")


def train(
    db: str | Path,
    run_dir: str | Path,
    stage: str,
    cfg: TrainConfig,
    *,
    table: str = DEFAULT_TABLE,
    holdout: Sequence[str] = (),
    labels: str | Path | None = None,
    scale: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Train `stage` on the store's cached vectors; the split is made once and saved.

    With `scale`, small training sets get smaller batches and more epochs (`scale_for_size`).
    """
    if stage not in STAGE_CHOICES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_CHOICES)}")
    run_dir = ensure_dir(run_dir, "the run")
    data = load_cell_data(db, table=table, labels=labels, labelled_only=True)
    log(f"{len(data)} labelled cells, {data.n_classes} classes, {data.n_tissues} tissues, "
        f"vectors {data.local_dim} + {data.context_dim}")  # fmt: skip
    if stage in ("local", "all") or not (run_dir / SPLIT_FILE).exists():
        split = make_split(data.meta, holdout=holdout)
    else:
        split = load_split(run_dir, data)
    if scale:
        cfg = scale_for_size(cfg, int((data.label.numpy()[split.train] >= 0).sum()), log=log)
    out = train_stage(stage, data, run_dir, cfg, split=split, log=log)
    save_split(run_dir, data, split)
    return out


def scale_for_size(cfg: TrainConfig, n_train: int, *, min_steps: int = 400, log: Log = print) -> TrainConfig:
    """Settings for a small training set: the defaults are sized for ~200k cells, where 4
    epochs of 1024-cell batches are ~600 optimiser steps; a few thousand cells would get a
    handful. Batches shrink to ~1/16 of the set (>= 32 cells) and epochs and patience grow
    until every stage sees at least `min_steps` steps. Large sets are left unchanged."""
    from dataclasses import replace

    bs = min(cfg.batch_size, max(32, n_train // 16))
    steps_per_epoch = max(1, -(-n_train // bs))
    factor = max(1, -(-min_steps // (steps_per_epoch * cfg.gate_epochs)))
    factor_local = max(1, -(-min_steps // (steps_per_epoch * cfg.epochs)))
    if bs == cfg.batch_size and factor == 1 and factor_local == 1:
        return cfg
    new = replace(
        cfg, batch_size=bs, epochs=cfg.epochs * factor_local,
        global_epochs=cfg.stage2_epochs * factor_local, gate_epochs=cfg.gate_epochs * factor,
        patience=cfg.patience * factor_local, warmup_steps=min(cfg.warmup_steps, steps_per_epoch),
    )  # fmt: skip
    log(f"small training set ({n_train} cells): batch {bs}, epochs {new.epochs}/"
        f"{new.stage2_epochs}/{new.gate_epochs}, patience {new.patience} (>= {min_steps} steps a stage)")  # fmt: skip
    return new


EVAL_ON = ("val", "test", "holdout", "all")


def _eval_rows(run_dir: Path, data: CellData, split: Split, on: str) -> np.ndarray:
    if on == "all":
        return np.concatenate([split.train, split.val, split.test, split.holdout])
    rows = getattr(split, on)
    if rows.size == 0:
        raise UserError(f"the run's split has no `{on}` cells (it has {split.summary()})")
    return rows


def evaluate_run(
    run_dir: str | Path,
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    on: str = "val",
    cohort: str | None = None,
    synonyms: dict[str, str | None] | None = None,
    baselines: Sequence[str] = ("logreg", "xgboost", "knn"),
    temperature: bool = True,
    labels: str | Path | None = None,
    device: str = "cpu",
    log: Log = print,
) -> dict[str, Any]:
    """Metrics, calibration, complementarity and baselines for every path of a run.

    `on`: which part of the run's own split to score (val, test, holdout, all). With `cohort`
    (a name), every labelled cell of `db` is a held-out cohort: raw labels are mapped to the
    training classes through `synonyms`, others dropped, and probabilities restricted to the
    classes present before the argmax (baselines then train on nothing from it: skipped).
    Writes metrics.json, per-path confusion matrices (CSV + PNG), the reliability diagram and
    the complementarity table/chart into RUN_DIR (or RUN_DIR/cohort-NAME).
    """
    run_dir = Path(run_dir)
    if on not in EVAL_ON:
        raise UserError(f"--on must be one of {', '.join(EVAL_ON)}, not {on!r}")
    info = ckpt.read_info(run_dir, "local")
    classes, tissues = info["classes"], info["tissues"]
    out_dir = ensure_dir(run_dir / (f"cohort-{cohort}" if cohort else ""), "the evaluation outputs")

    if cohort:
        data = load_cell_data(db, table=table, labels=labels, labelled_only=True, tissue_vocab=tissues)
        mapped = apply_synonyms(data.meta["label"].to_list(), synonyms or {}, classes)
        log(f"cohort {cohort}: {int(mapped.keep.sum())} of {len(data)} cells have a training class"
            + (f"; dropped {dict(mapped.dropped)}" if mapped.dropped else ""))  # fmt: skip
        data = data.subset(np.flatnonzero(mapped.keep))
        data = CellData.from_arrays(
            data.meta.with_columns(label=pl.Series(np.asarray(mapped.labels, dtype=object)[mapped.keep].tolist())),
            data.local, data.context, provenance=data.provenance, classes=classes, tissues=tissues,
        )  # fmt: skip
        rows = np.arange(len(data))
        split = None
    else:
        data = load_cell_data(db, table=table, labels=labels, labelled_only=True, classes=classes, tissue_vocab=tissues)
        ckpt.check_compatible(info, data, where=str(run_dir / "local.json"))
        split = load_split(run_dir, data)
        rows = _eval_rows(run_dir, data, split, on)
        rows = rows[data.label.numpy()[rows] >= 0]

    probs = predict_all(data.subset(rows), run_dir, device=device)
    y = data.label.numpy()[rows]
    present = sorted({classes[i] for i in np.unique(y)})
    if cohort:
        probs = {k: restrict_to_present(v, classes, present) if k.startswith("p_") else v for k, v in probs.items()}

    result_rows, curves = [], {}
    val_probs = None
    if temperature and split is not None and on != "val" and split.val.size:
        val_rows = split.val[data.label.numpy()[split.val] >= 0]
        val_probs = predict_all(data.subset(val_rows), run_dir, device=device), data.label.numpy()[val_rows]
    for name, key in PATHS.items():
        if key not in probs:
            continue
        p = probs[key]
        row = {"name": name, **evaluate(y, p, classes)}
        if temperature:
            row.update(_temperature(p, y, val_probs[0][key] if val_probs else None, val_probs[1] if val_probs else None))
        result_rows.append(row)
        curves[name] = (p, y)
        cm = np.asarray(row["confusion"]["normalized"], dtype=float)
        safe = name.split(" ")[0]
        pl.DataFrame({"true": classes, **{c: cm[:, j] for j, c in enumerate(classes)}}).write_csv(out_dir / f"confusion_{safe}.csv")
        confusion_heatmap(cm, classes, out_dir / f"confusion_{safe}.png", title=f"{name}: row-normalised confusion")
    reliability_diagram(curves, out_dir / "reliability.png", title="Reliability (10 bins)")
    comp = None
    if "p_global" in probs:
        comp = complementarity(y, probs["p_local"].argmax(1), probs["p_global"].argmax(1), classes)
        comp.write_csv(out_dir / "complementarity.csv")
        complementarity_chart(comp, out_dir / "complementarity.png")

    if baselines and split is not None:
        labelled_train = split.train[data.label.numpy()[split.train] >= 0]
        u, c = data.local.numpy(), data.context.numpy()
        n = len(data)
        train_mask = np.zeros(n, bool)
        train_mask[labelled_train] = True
        eval_mask = np.zeros(n, bool)
        eval_mask[rows] = True
        log(f"baselines {', '.join(baselines)} on {int(train_mask.sum())} train cells...")
        base = run_baselines({"local": u, "context": c, "both": [u, c]}, data.label.numpy(), train_mask, eval_mask, classes, which=tuple(baselines))
        result_rows += base

    table_df = results_table(result_rows)
    extra = {"run": str(run_dir), "db": str(db), "table": table, "on": cohort or on, "cells": int(len(rows)),
             "classes_present": present}  # fmt: skip
    if comp is not None:
        extra["complementarity"] = comp.to_dicts()
    write_metrics_json(result_rows, out_dir / "metrics.json", extra=extra)
    return {"table": table_df, "rows": result_rows, "out_dir": out_dir, "complementarity": comp}


def _temperature(p: np.ndarray, y: np.ndarray, p_val: np.ndarray | None, y_val: np.ndarray | None) -> dict:
    """ECE after temperature scaling fitted on validation cells.

    When the scored cells *are* the validation cells, fit on one half and score the other
    (and vice versa), so the reported ECE is never measured on the cells it was fitted on.
    """
    if p_val is not None:
        ts = TemperatureScaler(inputs="proba").fit(p_val, y_val)
        return {"ece_ts": expected_calibration_error(ts.transform(p), y), "temperature": ts.temperature_}
    if len(y) < 20:
        return {}
    rng = np.random.default_rng(0)
    half = rng.permutation(len(y)) < len(y) // 2
    scaled = np.empty_like(p)
    temps = []
    for fit, apply in ((half, ~half), (~half, half)):
        ts = TemperatureScaler(inputs="proba").fit(p[fit], y[fit])
        scaled[apply] = ts.transform(p[apply])
        temps.append(ts.temperature_)
    return {"ece_ts": expected_calibration_error(scaled, y), "temperature": float(np.mean(temps))}


def predict(
    run_dir: str | Path,
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    out_dir: str | Path | None = None,
    slides: Sequence[str] | None = None,
    device: str = "cpu",
    log: Log = print,
) -> pl.DataFrame:
    """Per-cell predictions of every stored cell: a `predictions` table in the store (one
    row per run and cell, replaced on rerun) plus Parquet and QuPath GeoJSON (one per slide)."""
    run_dir = Path(run_dir)
    info = ckpt.read_info(run_dir, "local")
    out_dir = ensure_dir(Path(out_dir) if out_dir else run_dir / "predictions", "the predictions")
    data = load_cell_data(db, table=table, slides=slides, classes=info["classes"], tissue_vocab=info["tissues"])
    probs = predict_all(data, run_dir, device=device)
    frame = predictions_frame(
        data.meta, info["classes"], probs["p_local"], probs.get("p_global"), probs.get("p_gate"), probs.get("gate"),
    ).with_columns(run=pl.lit(run_dir.resolve().name))
    with atomic_path(out_dir / "predictions.parquet") as tmp:
        write_parquet(frame, tmp)
    write_geojson(frame, out_dir / "geojson")
    Store(db).write_predictions(frame)
    log(f"{frame.height} predictions -> store table `predictions`, {out_dir / 'predictions.parquet'}, {out_dir / 'geojson'}/")
    return frame


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps([{k: r[k] for k in ("name", "accuracy", "macro_f1", "ece") if k in r} for r in result["rows"]], indent=2)
