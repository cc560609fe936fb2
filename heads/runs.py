"""What `heads train | eval | predict` do, as a Python API: store -> CellData -> heads -> results.

A run directory holds the stage checkpoints (`local|global|gate.safetensors` + `.json`), the
split used for training (`split.parquet`: slide_id, cell_id, split) so that evaluation sees
exactly the same cells, and, after `evaluate_run`, `metrics.json` plus its plots and tables.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from embedstore import faults
from embedstore.errors import UserError
from embedstore.fileio import atomic_path, ensure_dir
from embedstore.locking import exclusive
from embedstore.store import DEFAULT_TABLE, Store, sql_in, store_key

from . import checkpoint as ckpt
from . import runlock
from .calibration import TemperatureScaler, expected_calibration_error
from .data import CellData
from .export import (
    SET_SEPARATOR,
    check_class_names,
    predictions_frame,
    run_digest,
    write_geojson,
    write_parquet,
)
from .metrics import (
    MACRO_F1_DEFINITION,
    apply_synonyms,
    complementarity,
    evaluate,
    macro_f1,
    restrict_to_present,
    results_table,
    write_metrics_json,
)
from .posthoc import ConformalSets, apply_safety, fit_safety, load_safety, save_safety, set_coverage
from .splits import (
    PARTS,
    SPLIT_OPTIONS,
    Split,
    SplitConfig,
    check_same_settings,
    make_split,
    options_given,
    split_digest,
    split_table,
)
from .train import (
    STAGE_CHOICES,
    Heads,
    TrainConfig,
    check_holdout_scorable,
    load_heads,
    predict_all,
    train_stage,
    trained_tissues,
)

Log = Callable[[str], None]
SPLIT_FILE = "split.parquet"
SPLIT_INFO_FILE = "split.json"
#: path name in tables -> key of predict_all's output
PATHS = {"local (FiLM)": "p_local", "global": "p_global", "gate": "p_gate", "safety rule": "p_safety"}


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
    min_label_confidence: float = 0.0,
) -> CellData:
    """Cells and vectors from the store as `CellData` (labels from the store or `labels`).

    Labels whose `label_confidence` is below `min_label_confidence` are dropped (cells without
    a confidence, e.g. hand-made labels, keep theirs): `embed annotate` scores every cell and
    keeps those at >= 0.60."""
    if not 0 <= min_label_confidence <= 1:
        raise UserError(f"--min-label-confidence must be within [0, 1] as label_confidence is, not "
                        f"{min_label_confidence:g}{' (for a percentage, divide it by 100)' if 1 < min_label_confidence <= 100 else ''}")  # fmt: skip
    loaded = Store(db).load(table, slides=list(slides or []) or None, tissues=list(tissues or []) or None)
    meta = loaded.meta
    if labels is not None:
        meta = _with_file_labels(meta, labels, Store(db).keys_frame(table), f"table {table!r} in {db}")
    had_labels = "label" in meta.columns and meta["label"].null_count() < meta.height
    if min_label_confidence > 0 and "label_confidence" in meta.columns and "label" in meta.columns:
        low = pl.col("label_confidence").is_not_null() & (pl.col("label_confidence") < min_label_confidence)
        before = set(meta["label"].drop_nulls().unique().to_list())
        meta = meta.with_columns(label=pl.when(low).then(None).otherwise(pl.col("label")))
        gone = sorted(before - set(meta["label"].drop_nulls().unique().to_list()))
        if gone and len(gone) < len(before):  # none left at all: refused below
            warnings.warn(f"class(es) {', '.join(map(repr, gone))} have no label with label_confidence >= "
                          f"{min_label_confidence:g} and are left out; lower --min-label-confidence to keep them",
                          UserWarning, stacklevel=2)  # fmt: skip
    if "label" not in meta.columns or meta["label"].null_count() == meta.height:
        if labelled_only:
            if labels is not None:
                raise UserError(f"{labels} gives no label (with confidence >= {min_label_confidence:g}) "
                                f"to the cells of table {table!r} in {db}")  # fmt: skip
            if had_labels:
                raise UserError(f"every label of table {table!r} in {db} has a label_confidence below "
                                f"{min_label_confidence:g} and is left out; lower --min-label-confidence "
                                "(0 keeps every label)")  # fmt: skip
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


def _with_file_labels(meta: pl.DataFrame, path: str | Path, keys: pl.DataFrame, where: str) -> pl.DataFrame:
    """`meta` with the labels of the table at `path`, read and checked as `embed labels` reads
    them. They replace the stored labels and confidences (a label without one is a hand label);
    the stored split stays unless the table has one, or it leaves some of the table's labelled
    cells out. Rows naming no stored cell are counted."""
    import warnings

    from embedstore.io.labels import KEYS, examples, match_stored, read_labels, warn_case_variants

    lab = read_labels(path)
    if "label" not in lab.columns:
        raise UserError(f"{path}: no label column (columns: {lab.columns}); training needs labels")
    known, unknown = match_stored(lab, keys, what=where, error=UserError, hint="check its slide and cell id columns")
    if unknown.height:
        warnings.warn(f"{unknown.height} rows of {path} match no stored cell and were ignored, e.g. {examples(unknown)}",
                      UserWarning, stacklevel=2)  # fmt: skip
    warn_case_variants(known["label"].unique())
    if "label_confidence" not in known.columns:
        known = known.with_columns(label_confidence=pl.lit(None, pl.Float64))
    given = [c for c in ("label", "label_confidence", "split") if c in known.columns]
    out = meta.drop(given, strict=False).join(known.select(*KEYS, *given), on=KEYS, how="left", maintain_order="left")
    if "split" not in given and "split" in out.columns:
        stored = out.filter(pl.col("label").is_not_null())["split"]
        if 0 < stored.null_count() < stored.len():  # the stored split was made for other labels
            warnings.warn(f"the split stored in {where} covers {stored.len() - stored.null_count()} of the {stored.len()} "
                          f"cells {path} labels, so it is not used: per-slide stripes are cut instead (give {path} "
                          "a split column of train/val/test to choose the parts)", UserWarning, stacklevel=2)  # fmt: skip
            out = out.drop("split")
    return out


def save_split(run_dir: Path, data: CellData, split: Split, store: str | None = None) -> None:
    """split.parquet (slide_id, cell_id, split incl. "guard") and split.json (settings, counts
    per slide and class, leak, digest: the one the checkpoints trained on it record; `store`:
    the training store, as `store_key` gives it)."""
    frame = split_table(data.meta, split.labels(len(data)))
    info = {**split.summary(), **split.info, "digest": split_digest(frame), **({"store": store} if store else {})}
    with atomic_path(run_dir / SPLIT_FILE) as tmp:
        frame.write_parquet(tmp)
    with atomic_path(run_dir / SPLIT_INFO_FILE) as tmp:
        Path(tmp).write_text(json.dumps(info, indent=2) + "\n")


def load_split(run_dir: Path, data: CellData, *, stages: Sequence[str] = ckpt.STAGES) -> Split:
    """The training split of `run_dir`, aligned to `data`'s rows (new cells belong to none).

    Refused when a checkpoint of `stages` records another split's digest (a `heads train`
    stopped between saving a stage and its split, or a run folder mixed by hand)."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.exists():
        raise UserError(f"{path} is missing: train this run with `heads train --stage all` first")
    saved = pl.read_parquet(path)
    digest = split_digest(saved)
    other = [s for s in stages if ckpt.has_stage(run_dir, s)
             and ckpt.read_info(run_dir, s).get("split", {}).get("digest") not in (None, digest)]  # fmt: skip
    if other:
        raise UserError(
            f"the run's stages were trained on different splits: {', '.join(other)} in {run_dir} "
            f"did not train on its {SPLIT_FILE} (was `heads train` interrupted?); retrain with --stage all"
        )
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
    names = np.where(names == "holdout", "test", names)  # runs made before the test split
    parts = {p: np.flatnonzero(names == p).astype(np.int64) for p in PARTS}
    info_path = Path(run_dir) / SPLIT_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return Split(**parts, source=info.get("source", "saved"), info={**info, "digest": digest})


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
    split_config: SplitConfig | None = None,
    min_label_confidence: float = 0.6,
    log: Log = print,
    split_given: Sequence[str] | None = None,
    train_given: Collection[str] = (),
) -> dict[str, Any]:
    """Train `stage` on the store's cached vectors (labels with a confidence below
    `min_label_confidence` are left out); the split is made by stage `local` (or `all`) and
    saved just before its checkpoint (later stages reuse it and refuse split options of their
    own: `split_given` names the fields of `split_config` set explicitly, each then checked even
    at its default; None: those at their default count as not given; `check_same_settings`),
    and the conformal calibration and safety rule are fitted on its validation cells
    (`fit_posthoc`). What the old stage's models made is moved to RUN/stale/ only once the new
    stage is trained (`retire_later_stages`).

    With `scale`, small training sets get smaller batches and more epochs (`scale_for_size`),
    except for the fields of `cfg` named in `train_given` (the options typed on the command line).
    """
    if stage not in STAGE_CHOICES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_CHOICES)}")
    run_dir = ensure_dir(run_dir, "the run")
    with runlock.training(run_dir):
        data = load_cell_data(db, table=table, labels=labels, labelled_only=True, min_label_confidence=min_label_confidence)
        check_class_names(data.classes)  # "|" joins a conformal set's classes in the predictions
        log(f"{len(data)} labelled cells, {data.n_classes} classes, {data.n_tissues} tissues, "
            f"vectors {data.local_dim} + {data.context_dim}")  # fmt: skip
        if stage in ("local", "all"):
            _check_holdout_labelled(db, table, data, holdout, min_label_confidence)
            split = make_split(data.meta, holdout=holdout, config=split_config)
            unused = [n for n in options_given(split_config, split_given) if n in SPLIT_OPTIONS]
            if split.source == "column" and unused:
                shown = ", ".join(f"--{n.replace('_', '-')} {getattr(split_config, n):g}" for n in unused)
                log(f"note: {shown} not used: the labels' split column sets train/val/test "
                    "(clear that column, or leave it out of the labels table, to cut stripes)")
            if holdout:
                check_holdout_scorable(data, split, holdout)
        else:  # a later stage trains on the split its local head was trained on
            ckpt.read_info(run_dir, "local")  # no local head: say so first
            split = load_split(run_dir, data, stages=ckpt.STAGES[: ckpt.STAGES.index(stage)])
            for note in check_same_settings(split, holdout, split_config, stage, split_given):
                log(note)
        if scale:
            cfg = scale_for_size(cfg, int((data.label.numpy()[split.train] >= 0).sum()), keep=train_given, log=log)

        def before_save(name: str) -> None:
            # only now, with the stage trained: a failed or stopped run leaves the old one whole
            runlock.mark_started(run_dir, stage)  # until the post-hoc rules are fitted
            retire_later_stages(run_dir, name, log=log)
            if name == "local":
                save_split(run_dir, data, split, store=store_key(db))  # on disk before the checkpoint trained on it

        out = train_stage(stage, data, run_dir, cfg, split=split, before_save=before_save, log=log)
        # the post-hoc rules run the heads: only on val cells of tissues they were trained on
        trained = trained_tissues(ckpt.read_info(run_dir, "local"))
        val = split.val[_of_tissues(data, split.val, trained)]
        fit_posthoc(run_dir, data, replace(split, val=val), device=cfg.device, log=log)
        runlock.mark_finished(run_dir)
        return out


def _check_holdout_labelled(db: str | Path, table: str, data: CellData, holdout: Sequence[str], min_conf: float) -> None:
    """Refuse --holdout names of stored slides or tissues none of whose cells is labelled:
    `make_split` sees the labelled cells only, and would call those names misspelt."""
    missing = {holdout} if isinstance(holdout, str) else set(holdout)
    missing -= set(data.meta["slide_id"].cast(pl.Utf8)) | set(data.tissues)
    if not missing:
        return
    cells = pl.from_arrow(Store(db).open(table).to_lance().to_table(columns=["slide_id", "tissue"]))
    stored = sorted(h for h in missing if h in set(cells["slide_id"].cast(pl.Utf8)) | set(cells["tissue"].drop_nulls()))
    if stored:
        raise UserError(f"--holdout {' '.join(stored)}: the stored cells of that slide or tissue have no label "
                        f"(with label_confidence >= {min_conf:g}), so there is nothing of it to test on; label "
                        "some of its cells, or hold out another slide")  # fmt: skip


#: what a run made from its models as they were (stale once a stage is retrained): `heads
#: eval`'s metrics, plots and tables (also per cohort), `heads report`'s page, `heads predict`'s
#: default folder, and the post-hoc rules fitted at the end of training (refitted after it)
DERIVED_OUTPUTS = ("metrics.json", "confusion_*.csv", "confusion_*.png", "reliability.png",
                   "complementarity.csv", "complementarity.png", "cohort-*", "eval-*", "report.html",
                   "predictions", "safety.json", "conformal.parquet", "conformal.json")  # fmt: skip


def retire_later_stages(run_dir: Path, stage: str, *, log: Log = print) -> Path | None:
    """Move the checkpoints of stages after `stage` and everything made from the run's models
    (DERIVED_OUTPUTS) into RUN/stale/<time>/ as `stage` is retrained: they were made from the
    old `stage` and would silently be mixed with the new one; moved, not deleted."""
    import datetime as dt

    if stage == "all":
        later = ckpt.STAGES
    else:
        later = ckpt.STAGES[ckpt.STAGES.index(stage) + 1:]
    files = [p for s in later if ckpt.has_stage(run_dir, s) for p in ckpt.stage_paths(run_dir, s)]
    files += sorted(p for pattern in DERIVED_OUTPUTS for p in run_dir.glob(pattern))
    if not files:
        return None
    dest = run_dir / "stale" / dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    dest.mkdir(parents=True)
    for f in files:
        f.rename(dest / f.name)
    log(f"retraining `{stage}`: what was made from the old one ({', '.join(sorted({f.stem for f in files}))}) "
        f"moved to {dest}")  # fmt: skip
    return dest


def fit_posthoc(run_dir: Path, data: CellData, split: Split, *, device: str = "cpu", log: Log = print) -> None:
    """Fit, on the run's validation cells, the conformal calibration of its final path (gate,
    else global, else local) and, when the gate is trained, the safety rule; both saved."""
    val = split.val[data.label.numpy()[split.val] >= 0]
    if val.size == 0:
        log("no labelled validation cells: no conformal calibration, no safety rule")
        return
    probs = predict_all(data.subset(val), run_dir, device=device)
    y = data.label.numpy()[val]
    path = next(p for p in ("gate", "global", "local") if f"p_{p}" in probs)
    ConformalSets.fit(probs[f"p_{path}"], y, cell_keys(data.meta[val]), path).save(run_dir)
    msg = f"conformal sets calibrated on {val.size} val cells ({path} path)"
    if "p_gate" in probs:
        rule = fit_safety(probs["p_local_gate"], probs["p_global_gate"], probs["gate"], y)
        save_safety(run_dir, rule)
        chosen = "baseline choice only" if rule["tau"] is None else f"tau {rule['tau']}, gamma {rule['gamma']}"
        msg += (f"; safety rule ({chosen}): val accuracy {rule['val_accuracy']:.4f} vs local "
                f"{rule['val_accuracy_local']:.4f}, global {rule['val_accuracy_global']:.4f}")  # fmt: skip
    log(msg)


def cell_keys(meta: pl.DataFrame) -> list[str]:
    """"slide:cell" per row (the key conformal draws are made from)."""
    return (meta["slide_id"].cast(pl.Utf8) + ":" + meta["cell_id"].cast(pl.Utf8)).to_list()


#: TrainConfig fields `scale_for_size` may change (`heads train` options of the same names)
SCALED_OPTIONS = ("epochs", "global_epochs", "gate_epochs", "batch_size", "patience")


def scale_for_size(cfg: TrainConfig, n_train: int, *, min_steps: int = 400, keep: Collection[str] = (),
                   log: Log = print) -> TrainConfig:  # fmt: skip
    """Settings for a small training set: the defaults are sized for ~200k cells, where 4
    epochs of 1024-cell batches are ~600 optimiser steps; a few thousand cells would get a
    handful. Batches shrink to ~1/16 of the set (>= 32 cells) and epochs and patience grow
    until every stage sees at least `min_steps` steps. Large sets are left unchanged, and so
    are the fields named in `keep` (the options a user typed: `--epochs 2` means 2)."""
    small_bs = min(cfg.batch_size, max(32, n_train // 16))
    bs = cfg.batch_size if "batch_size" in keep else small_bs
    steps_per_epoch = max(1, -(-n_train // bs))
    factor = max(1, -(-min_steps // (steps_per_epoch * cfg.gate_epochs)))
    factor_local = max(1, -(-min_steps // (steps_per_epoch * cfg.epochs)))
    now = {"epochs": cfg.epochs, "global_epochs": cfg.stage2_epochs, "gate_epochs": cfg.gate_epochs,
           "batch_size": cfg.batch_size, "patience": cfg.patience}  # fmt: skip
    proposed = {"epochs": cfg.epochs * factor_local, "global_epochs": cfg.stage2_epochs * factor_local,
                "gate_epochs": cfg.gate_epochs * factor, "batch_size": small_bs, "patience": cfg.patience * factor_local}  # fmt: skip
    change = {k: v for k, v in proposed.items() if v != now[k] and k not in keep}
    if not change:
        return cfg
    new = replace(cfg, **change, warmup_steps=min(cfg.warmup_steps, steps_per_epoch))
    kept = [f"--{k.replace('_', '-')} {now[k]}" for k in SCALED_OPTIONS if k in keep and proposed[k] != now[k]]
    log(f"small training set ({n_train} cells): batch {new.batch_size}, epochs {new.epochs}/"
        f"{new.stage2_epochs}/{new.gate_epochs}, patience {new.patience} (>= {min_steps} steps a stage"
        f"{'; as given: ' + ', '.join(kept) if kept else ''}; --no-scale keeps every setting)")  # fmt: skip
    return new


EVAL_ON = ("test", "val", "train", "all")
SELECTION_NOTE = (
    "these are the validation cells that chose the model (early stopping, temperature, safety "
    "rule, conformal calibration, baseline hyper-parameters): their scores are optimistic; "
    "report --on test"
)


def _eval_rows(split: Split, on: str) -> np.ndarray:
    if on == "holdout":  # runs made before the test split kept held-out slides apart
        on = "test"
    if on == "all":
        return np.concatenate([split.train, split.val, split.test])
    if on not in EVAL_ON:
        raise UserError(f"--on must be one of {', '.join(EVAL_ON)}, not {on!r}")
    rows = getattr(split, on)
    if rows.size == 0:
        hint = "; retrain with the default split (or a `split` column with test rows)" if on == "test" else ""
        raise UserError(f"the run's split has no `{on}` cells (it has {split.summary()}){hint}")
    return rows


def _of_tissues(data: CellData, rows: np.ndarray, tissues: Sequence[str]) -> np.ndarray:
    """Which of `rows` are cells of `tissues` (as a mask over `rows`)."""
    return np.isin(np.asarray(data.tissues)[data.tissue.numpy()[rows]], list(tissues))


def _labels_outside(data: CellData, rows: np.ndarray) -> dict[str, int]:
    """Label -> how many of `rows` have it, for labels that are not classes of the run."""
    if data.unknown_label is None:
        return {}
    out = rows[data.unknown_label.numpy()[rows]]
    counts = data.meta["label"].cast(pl.Utf8)[out].value_counts(name="n")
    return dict(counts.sort(["n", "label"], descending=[True, False]).iter_rows())


def _outside_message(outside: dict[str, int], classes: Sequence[str]) -> str:
    shown = ", ".join(f"{k}: {v}" for k, v in list(outside.items())[:10]) + (", ..." if len(outside) > 10 else "")
    msg = f"{sum(outside.values())} scored cells have labels outside the run's classes ({shown}); they are not scored"
    by_case = {c.lower(): c for c in classes}
    case_only = [k for k in outside if k.lower() in by_case]
    if case_only:
        which = "They all" if len(case_only) == len(outside) else f"{len(case_only)} of those labels"
        pairs = ", ".join(f"{k} vs {by_case[k.lower()]}" for k in case_only[:5])
        msg += (f". {which} differ from a class of the run only in case ({pairs}): relabel them with the run's "
                "spelling (`embed labels`)")  # fmt: skip
    return msg


def _with_safety(probs: dict[str, np.ndarray], rule: dict[str, Any] | None) -> dict[str, np.ndarray]:
    if rule is not None and "p_gate" in probs:
        probs["p_safety"] = apply_safety(rule, probs["p_local_gate"], probs["p_global_gate"], probs["gate"])
    return probs


@runlock.reads_run
def evaluate_run(
    run_dir: str | Path,
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    on: str = "test",
    cohort: str | None = None,
    synonyms: dict[str, str | None] | None = None,
    baselines: Sequence[str] = ("logreg", "xgboost", "knn"),
    balanced: bool = True,
    temperature: bool = True,
    conformal_level: float = 0.9,
    labels: str | Path | None = None,
    min_label_confidence: float = 0.6,
    device: str = "cpu",
    log: Log = print,
) -> dict[str, Any]:
    """Metrics, calibration, conformal coverage, complementarity and baselines for every path.

    `on`: which part of the run's own split to score (test by default; val, train, all). Every
    row also carries its macro-F1 on the validation cells (`val_macro_f1`) and the difference
    val - scored (`selection_gap`): the optimism of the cells that chose the model. With
    `cohort` (a name), every labelled cell of `db` is a held-out cohort: raw labels are mapped
    to the training classes through `synonyms`, others dropped, and probabilities restricted to
    the classes present before the argmax (baselines are skipped: nothing to train them on).
    Writes metrics.json, per-path confusion matrices (CSV + PNG), the reliability diagram and
    the complementarity table/chart into RUN_DIR for the test cells, RUN_DIR/eval-ON for another
    part of the split, RUN_DIR/cohort-NAME for a cohort (`checkpoint.eval_dir`).
    """
    # imported here: the baselines (sklearn models, xgboost) and matplotlib take seconds to
    # import, and `predict` (a Ray worker's start-up included) needs neither
    from .baselines import run_baselines
    from .plots import complementarity_chart, confusion_heatmap, reliability_diagram

    run_dir = Path(run_dir)
    if not cohort and on not in (*EVAL_ON, "holdout"):
        raise UserError(f"--on must be one of {', '.join(EVAL_ON)}, not {on!r}")
    if cohort and on != "test":  # the cohort has no part of the run's split: all its cells are scored
        raise UserError(f"--on {on} picks a part of the run's own split; --cohort {cohort} scores every labelled cell "
                        "of --db: leave out --on, or evaluate the run's own store without --cohort")  # fmt: skip
    info = ckpt.read_info(run_dir, "local")
    classes, tissues = info["classes"], info["tissues"]
    out_dir = ensure_dir(ckpt.eval_dir(run_dir, cohort, on), "the evaluation outputs")

    val_rows = np.zeros(0, np.int64)
    if cohort:
        data = load_cell_data(db, table=table, labels=labels, labelled_only=True, tissue_vocab=tissues,
                              min_label_confidence=min_label_confidence)
        mapped = apply_synonyms(data.meta["label"].to_list(), synonyms or {}, classes)
        log(f"cohort {cohort}: {int(mapped.keep.sum())} of {len(data)} cells have a training class"
            + (f"; dropped {dict(mapped.dropped)}" if mapped.dropped else ""))  # fmt: skip
        outside = dict(mapped.dropped)
        data = data.subset(np.flatnonzero(mapped.keep))
        data = CellData.from_arrays(
            data.meta.with_columns(label=pl.Series(np.asarray(mapped.labels, dtype=object)[mapped.keep].tolist())),
            data.local, data.context, provenance=data.provenance, classes=classes, tissues=tissues,
        )  # fmt: skip
        rows = np.arange(len(data))
        split = None
    else:
        # only cells of the run's tissues: its split has no others, and a slide of a new tissue
        # added to the store since training is none of this evaluation's business
        data = load_cell_data(db, table=table, labels=labels, labelled_only=True, classes=classes, tissue_vocab=tissues,
                              tissues=tissues, min_label_confidence=min_label_confidence)  # fmt: skip
        ckpt.check_compatible(info, data, where=str(run_dir / "local.json"))
        split = load_split(run_dir, data)
        labelled = data.label.numpy() >= 0
        rows = _eval_rows(split, on)
        outside = _labels_outside(data, rows)
        rows = rows[labelled[rows]]
        val_rows = split.val[labelled[split.val]]
        if outside:
            msg = _outside_message(outside, classes)
            if rows.size == 0:
                raise UserError(f"nothing to evaluate: {msg}")
            log(f"warning: {msg}")
        # a tissue held out whole (--holdout) was never learnt: its cells are said, not scored
        trained = trained_tissues(info)
        unlearnt = ~_of_tissues(data, rows, trained)
        if unlearnt.any():
            names = np.asarray(data.tissues)[data.tissue.numpy()[rows[unlearnt]]]
            counts = ", ".join(f"{t}: {n}" for t, n in sorted(Counter(names).items()))
            msg = (f"{int(unlearnt.sum())} scored cells are of tissues the run had no training cells for ({counts}); "
                   "the local head never learnt them, so they are not scored")  # fmt: skip
            rows = rows[~unlearnt]
            if rows.size == 0:
                raise UserError(f"nothing to evaluate: {msg}")
            log(f"warning: {msg}")
        val_rows = val_rows[_of_tissues(data, val_rows, trained)]
    selection = not cohort and on == "val"
    if selection:
        log(f"warning: {SELECTION_NOTE}")

    rule = load_safety(run_dir)
    probs = _with_safety(predict_all(data.subset(rows), run_dir, device=device), rule)
    y = data.label.numpy()[rows]
    present = sorted({classes[i] for i in np.unique(y)})
    if cohort:
        probs = {k: restrict_to_present(v, classes, present) if k.startswith("p_") else v for k, v in probs.items()}
    val_probs, y_val = None, data.label.numpy()[val_rows]
    if val_rows.size:
        val_probs = _with_safety(predict_all(data.subset(val_rows), run_dir, device=device), rule)

    # two evals of one run write their files one after the other, never interleaved
    with exclusive(out_dir / ".eval.lock"):
        # metrics.json vouches for the plots and tables beside it (`heads report` embeds them): gone
        # while they are rewritten, back (in one rename) once all are, so a kill leaves none to trust
        (out_dir / "metrics.json").unlink(missing_ok=True)
        result_rows, curves = [], {}
        for name, key in PATHS.items():
            if key not in probs:
                continue
            p = probs[key]
            row = {"name": name, **evaluate(y, p, classes)}
            if val_probs is not None:
                row["val_macro_f1"] = macro_f1(y_val, val_probs[key].argmax(1))
                row["selection_gap"] = row["val_macro_f1"] - row["macro_f1"]
            if temperature:
                row.update(_temperature(p, y, val_probs[key] if val_probs and not selection else None,
                                        y_val if not selection else None))  # fmt: skip
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

        conformal = None
        sets_model = ConformalSets.load(run_dir)
        if sets_model is not None and f"p_{sets_model.path}" in probs:
            keys = cell_keys(data.meta[rows])
            conformal = {"level": conformal_level, "path": sets_model.path, "score": "aps-randomised"}
            for mode, cc in (("marginal", False), ("class_conditional", True)):
                sets = sets_model.predict_sets(probs[f"p_{sets_model.path}"], keys, conformal_level, cc)
                conformal[mode] = set_coverage(sets, y, classes)

        if baselines and split is not None and on in ("train", "all"):
            log(f"baselines left out: they are fitted on the train cells, which --on {on} scores")
        elif baselines and split is not None:
            labelled_train = split.train[data.label.numpy()[split.train] >= 0]
            u, c = data.local.numpy(), data.context.numpy()
            log(f"baselines {', '.join(baselines)} on {labelled_train.size} train cells, selected on "
                f"{val_rows.size} val cells{' (class-balanced)' if balanced else ''}...")  # fmt: skip
            base = run_baselines(
                {"local": u, "context": c, "both": [u, c]}, data.label.numpy(), labelled_train, rows, classes,
                which=tuple(baselines), val_mask=val_rows if val_rows.size else None, balanced=balanced,
            )  # fmt: skip
            for r in base:
                if r.get("val_macro_f1") is not None:
                    r["selection_gap"] = r["val_macro_f1"] - r["macro_f1"]
            result_rows += base

        table_df = results_table(result_rows)
        extra = {"run": str(run_dir), "db": str(db), "store": store_key(db), "table": table, "on": cohort or on, "cells": int(len(rows)),
                 "classes_present": present, "classes_missing": [c for c in classes if c not in present],
                 "selection_cells": selection, "macro_f1": MACRO_F1_DEFINITION,
                 "labels_outside_classes": {"cells": sum(outside.values()), "labels": outside},
                 "min_label_confidence": min_label_confidence}  # fmt: skip
        if cohort:
            extra["synonyms"] = dict(synonyms or {})  # `heads report --cohort` maps the labels as here
        if selection:
            extra["warning"] = SELECTION_NOTE
        if split is not None:
            extra["split"] = {**split.summary(), **{k: v for k, v in split.info.items() if k != "per_class"}}
        if rule is not None:
            extra["safety_rule"] = rule
        if conformal is not None:
            extra["conformal"] = conformal
        if comp is not None:
            extra["complementarity"] = comp.to_dicts()
        with atomic_path(out_dir / "metrics.json") as tmp:
            write_metrics_json(result_rows, tmp, extra=extra)
        return {"table": table_df, "rows": result_rows, "out_dir": out_dir, "complementarity": comp,
                "conformal": conformal, "selection": selection, "on": cohort or on}  # fmt: skip


PREDICT_LOCK = ".predict.lock"


def predictions_dir(run_dir: str | Path, db: str | Path) -> Path:
    """Where `heads predict` writes by default: RUN/predictions for the store the run was
    trained on (or a run that does not record it), RUN/predictions-<store>-<hash> for another
    store, so that predicting a cohort never replaces the training store's files."""
    run_dir = Path(run_dir)
    try:
        trained_on = json.loads((run_dir / SPLIT_INFO_FILE).read_text()).get("store")
    except (OSError, ValueError, AttributeError):  # no split.json (yet), or not ours: the default
        trained_on = None
    here = store_key(db)
    if trained_on is None or trained_on == here:
        return run_dir / "predictions"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", here.rstrip("/").rsplit("/", 1)[-1]).strip("._") or "store"
    return run_dir / f"predictions-{name}-{hashlib.sha256(here.encode()).hexdigest()[:6]}"


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


@dataclass
class LoadedRun:
    """A run's heads, safety rule and conformal calibration, read once: a Ray worker keeps one
    for all its tasks instead of reloading the checkpoints for every slide."""

    run_dir: Path
    infos: dict[str, dict[str, Any]]  # trained stage -> its checkpoint JSON
    heads: Heads
    rule: dict[str, Any] | None
    sets_model: ConformalSets | None
    digest: str = ""  # `run_digest`: which run made a prediction, whatever its folder's name

    @property
    def info(self) -> dict[str, Any]:
        return self.infos["local"]


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Every trained stage of `run_dir` plus its post-hoc rules (not yet checked against cells:
    `predict_frame` checks each batch of cells as `predict_all(data, run_dir)` would)."""
    run_dir = Path(run_dir)
    infos = {s: ckpt.read_info(run_dir, s) for s in ckpt.STAGES if s == "local" or ckpt.has_stage(run_dir, s)}
    return LoadedRun(run_dir, infos, load_heads(run_dir, None, device), load_safety(run_dir),
                     ConformalSets.load(run_dir), run_digest(run_dir))  # fmt: skip


def predict_frame(
    run_dir: str | Path,
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    slides: Sequence[str] | None = None,
    device: str = "cpu",
    conformal_level: float = 0.9,
    class_conditional: bool = False,
    loaded: LoadedRun | None = None,
    tissues: Sequence[str] | None = None,
) -> pl.DataFrame:
    """The predictions frame of the stored cells of `slides` (all when None) and `tissues`
    (all when None), as `predict` writes it. Every column is a function of the cell alone
    (conformal draws are keyed by cell), so frames of disjoint slide groups concatenate to the
    frame of their union, up to float32 rounding (on some CPUs the matrix kernels round a
    batch of another size differently: 6e-8). `run` is the run folder's name, `run_digest` and `run_dir` say which
    run folder it is (`heads.export.run_digest`).

    `loaded`: the run already read by `load_run` (run_dir is then only its name's source)."""
    run_dir = Path(run_dir)
    run = loaded if loaded is not None else load_run(run_dir, device)
    info = run.info
    if run.sets_model is not None:  # a run trained before such class names were refused
        check_class_names(info["classes"])
    data = load_cell_data(db, table=table, slides=slides, tissues=tissues, classes=info["classes"],
                          tissue_vocab=info["tissues"])  # fmt: skip
    for stage, stage_info in run.infos.items():  # these cells against every trained stage
        ckpt.check_compatible(stage_info, data, where=str(ckpt.stage_paths(run_dir, stage)[1]))
    probs = _with_safety(predict_all(data, run.heads, device=device), run.rule)
    sets_model = run.sets_model
    frame = predictions_frame(
        data.meta, info["classes"], probs["p_local"], probs.get("p_global"), probs.get("p_gate"), probs.get("gate"),
    ).with_columns(run=pl.lit(run_dir.resolve().name), run_digest=pl.lit(run.digest or run_digest(run_dir)),
                   run_dir=pl.lit(str(run_dir.resolve())))  # fmt: skip
    classes = np.asarray(info["classes"], dtype=object)
    if "p_safety" in probs:
        frame = frame.with_columns(safety_class=pl.Series(classes[probs["p_safety"].argmax(1)].tolist(), dtype=pl.String))
    if sets_model is not None and f"p_{sets_model.path}" in probs:
        sets = sets_model.predict_sets(probs[f"p_{sets_model.path}"], cell_keys(data.meta), conformal_level, class_conditional)
        frame = frame.with_columns(
            conformal_set=pl.Series([SET_SEPARATOR.join(classes[row]) for row in sets], dtype=pl.String),
            set_size=pl.Series(sets.sum(1).astype(np.int32)),
        )
    return frame


@runlock.reads_run
def predict(
    run_dir: str | Path,
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    out_dir: str | Path | None = None,
    slides: Sequence[str] | None = None,
    device: str = "cpu",
    conformal_level: float = 0.9,
    class_conditional: bool = False,
    log: Log = print,
) -> pl.DataFrame:
    """Per-cell predictions of every stored cell: a `predictions` table in the store (one
    row per run and cell, replaced on rerun) plus Parquet and QuPath GeoJSON (one per slide),
    in `out_dir` (default `predictions_dir`: not the training store's folder for another store).

    When the run has them: `safety_class` (the safety rule's class) and the conformal set at
    `conformal_level` (`conformal_set`: class names joined by "|", `set_size`; an empty set
    means no class is plausible enough at that level). `heads.distributed.predict_ray` does
    the same on Ray, one slide per task.

    With `slides`, predictions.parquet keeps the rows of the run's other slides (only those
    slides' rows are replaced), as the store does. Without, cells of tissues the run was not
    trained on are left out: everything else is predicted and written, then `SlidesSkipped`
    names the slides left out (the CLI exits 1); named in `slides`, they are refused."""
    run_dir = Path(run_dir)
    # no run: fail before making the output folder; a tissue without training cells is unknown
    tissues = trained_tissues(ckpt.read_info(run_dir, "local"))
    check_slides_stored(db, table, slides)
    unknown = unknown_tissues(db, table, slides, tissues)
    out_dir = ensure_dir(Path(out_dir) if out_dir else predictions_dir(run_dir, db), "the predictions")
    frame = predict_frame(run_dir, db, table=table, slides=slides, device=device, tissues=tissues if unknown.height else None,
                          conformal_level=conformal_level, class_conditional=class_conditional)  # fmt: skip
    parquet = out_dir / "predictions.parquet"
    # two predicts into one folder: one after the other, so neither drops the other's slides
    with exclusive(out_dir / PREDICT_LOCK, on_wait=lambda: log(f"waiting for another `heads predict` writing into {out_dir}...")):
        kept = _with_earlier_slides(frame, parquet, slides, log)
        faults.pause("predict.write")
        with atomic_path(parquet) as tmp:
            write_parquet(kept, tmp)
        write_geojson(frame, out_dir / "geojson")
        _prune_geojson(out_dir, kept["slide_id"].unique().to_list(), log)
        Store(db).write_predictions(frame)
    log(f"{frame.height} predictions -> store table `predictions`, {parquet} ({kept.height} rows), {out_dir / 'geojson'}/")
    if unknown.height:
        raise skipped(unknown, tissues, frame["slide_id"].unique(maintain_order=True).to_list(), frame.height, frame)
    return frame


class SlidesSkipped(UserError):
    """`predict` wrote what it could, but left out cells of tissues the run does not know;
    `frame` is what it wrote."""

    exit_code = 1

    def __init__(self, message: str, frame: pl.DataFrame | None) -> None:
        super().__init__(message)
        self.frame = frame


def check_slides_stored(db: str | Path, table: str, slides: Sequence[str] | None) -> None:
    """Refuse --slide ids the table has no cells of, naming them and the stored slides."""
    if not slides:
        return
    ds = Store(db).open(table).to_lance()
    found = set(pl.from_arrow(ds.to_table(columns=["slide_id"], filter=sql_in("slide_id", list(slides))))["slide_id"])
    missing = [s for s in slides if s not in found]
    if missing:  # only now the whole column, to list what is stored
        known = sorted(set(pl.from_arrow(ds.to_table(columns=["slide_id"]))["slide_id"]))
        shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        raise UserError(f"table {table!r} of {db} has no cells of slide(s) {', '.join(missing)} (stored: "
                        f"{shown or 'none'}): pass slide ids as `embed info {db}` lists them")  # fmt: skip


def unknown_tissues(db: str | Path, table: str, slides: Sequence[str] | None, tissues: Sequence[str]) -> pl.DataFrame:
    """(slide_id, tissue, cells) of the cells to predict whose tissue the run did not learn;
    refuses when `slides` names such slides, or when no cell is left to predict."""
    unknown = _unknown_tissue_cells(db, table, slides, tissues)
    if unknown.height and (slides or unknown["cells"].sum() == Store(db).open(table).count_rows()):
        raise UserError(f"{_describe_unknown(unknown, tissues)}: this run cannot predict them; train heads that "
                        f"include {', '.join(sorted(set(unknown['tissue'])))}")  # fmt: skip
    return unknown


def skipped(unknown: pl.DataFrame, tissues: Sequence[str], known: Sequence[str], cells: int, frame: pl.DataFrame | None) -> SlidesSkipped:
    """The error that names the slides left out, after `cells` cells of `known` were predicted."""
    named = " ".join(f"--slide {s}" for s in known) if len(known) <= 10 else "--slide SLIDE (repeatable)"
    return SlidesSkipped(
        f"{_describe_unknown(unknown, tissues)}: not predicted; the other {cells} cells were. Predict "
        f"only the slides it knows with {named}, or train heads that include "
        f"{', '.join(sorted(set(unknown['tissue'])))}", frame)  # fmt: skip


def _unknown_tissue_cells(db: str | Path, table: str, slides: Sequence[str] | None, tissues: Sequence[str]) -> pl.DataFrame:
    """(slide_id, tissue, cells) of the stored cells (of `slides`) whose tissue is not in `tissues`."""
    flt = sql_in("slide_id", list(slides)) if slides else None
    cells = pl.from_arrow(Store(db).open(table).to_lance().to_table(columns=["slide_id", "tissue"], filter=flt))
    unknown = cells.filter(pl.col("tissue").is_not_null() & ~pl.col("tissue").is_in(list(tissues)))
    return unknown.group_by("slide_id", "tissue", maintain_order=True).len("cells")


def _describe_unknown(unknown: pl.DataFrame, tissues: Sequence[str], shown: int = 10) -> str:
    parts = [f"{r['slide_id']} ({r['tissue']}: {r['cells']} cells)" for r in unknown.head(shown).iter_rows(named=True)]
    more = f" and {unknown.height - shown} more" if unknown.height > shown else ""
    return (f"slide(s) {', '.join(parts)}{more} have tissues this run was not trained on "
            f"(it knows {', '.join(tissues)})")  # fmt: skip


def _prune_geojson(out_dir: Path, slides: Sequence[str], log: Log) -> None:
    """OUT/geojson holds the slides of OUT/predictions.parquet, none other."""
    from embedstore.io import geojson

    removed = geojson.prune(out_dir / "geojson", slides)
    if removed:
        log(f"removed the GeoJSON of {len(removed)} slide(s) no longer in predictions.parquet "
            f"(another run's): {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")  # fmt: skip


def _with_earlier_slides(frame: pl.DataFrame, parquet: Path | pl.DataFrame | None, slides: Sequence[str] | None,
                         log: Log) -> pl.DataFrame:  # fmt: skip
    """What predictions.parquet should hold after predicting `slides`: `frame` plus the rows of
    the other slides already there (the file, or its rows read before), when this run (same
    `run_digest`) wrote them."""
    if not slides or parquet is None or (isinstance(parquet, Path) and not parquet.exists()):
        return frame
    old = pl.read_parquet(parquet) if isinstance(parquet, Path) else parquet
    digest = frame["run_digest"][0]
    if "run_digest" not in old.columns or not (old["run_digest"] == digest).fill_null(False).all():
        log("predictions.parquet held predictions of another run (or of this one before it was retrained): replaced")
        return frame
    return pl.concat([old.filter(~pl.col("slide_id").is_in(list(slides))), frame], how="diagonal_relaxed")


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps([{k: r[k] for k in ("name", "accuracy", "macro_f1", "ece") if k in r} for r in result["rows"]], indent=2)
