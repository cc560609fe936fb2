"""Exports of per-cell predictions: a polars frame, Parquet, and QuPath-importable GeoJSON
(point detections classified by the predicted class; format in `embedstore.io.geojson`), and
the run identity that tells whose predictions the store holds (`run_digest`, `run_predictions`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from embedstore.errors import UserError
from embedstore.io import geojson
from embedstore.io.geojson import class_colors  # noqa: F401 - part of this module's API
from embedstore.store import Store
from heads.calibration import check_proba

#: columns `predictions_frame` needs from the cell metadata
META_COLUMNS = ("slide_id", "cell_id", "x_um", "y_um", "x_px", "y_px")
#: optional metadata columns carried through when present
PASSTHROUGH_COLUMNS = ("tissue", "label", "split")
PROB_PREFIX = "prob_"
#: joins the class names of a cell's conformal set in the `conformal_set` text column
SET_SEPARATOR = "|"
#: the files of a run folder its predictions are a function of (`run_digest`)
RUN_FILES = tuple(f"{s}.{ext}" for s in ("local", "global", "gate") for ext in ("safetensors", "json")) + (
    "safety.json", "conformal.parquet", "conformal.json")  # fmt: skip

log = logging.getLogger(__name__)


def _path_columns(
    prefix: str, proba: np.ndarray, classes: list[str], n: int, name: str
) -> dict[str, pl.Series]:
    p = check_proba(proba, name)
    if p.shape != (n, len(classes)):
        raise UserError(f"{name} has shape {p.shape}, expected ({n}, {len(classes)})")
    idx = p.argmax(axis=1)
    return {
        f"{prefix}class": pl.Series(classes, dtype=pl.String).gather(idx),
        f"{prefix}confidence": pl.Series(p[np.arange(n), idx].astype(np.float32)),
    }


def predictions_frame(
    meta: pl.DataFrame,
    classes: Sequence[str],
    proba_local: np.ndarray,
    proba_global: np.ndarray | None = None,
    proba_gate: np.ndarray | None = None,
    gate_value: np.ndarray | None = None,
) -> pl.DataFrame:
    """One row per cell: ids and coordinates, the predicted class and confidence, each
    path's class and confidence, the gate value and one `prob_<class>` column per class.

    The prediction (`pred_class`, `pred_confidence`, `prob_*`) comes from the gate when given,
    else from the global path, else from the local path; `pred_source` says which. Per-path
    columns are `local_class`/`local_confidence` and `global_class`/`global_confidence`.
    `gate` is g, the weight of the global path in p_mix = (1 - g) p_A + g p_B (null when
    absent). Metadata columns tissue/label/split are carried through when present.
    """
    cls = [str(c) for c in classes]
    if not cls or len(set(cls)) != len(cls):
        raise UserError(f"classes must be a non-empty list of unique names, got {cls}")
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise UserError(f"cell metadata lacks columns {missing} (needs {list(META_COLUMNS)})")
    n = meta.height
    cols = [c for c in (*META_COLUMNS, *PASSTHROUGH_COLUMNS) if c in meta.columns]
    out = meta.select(cols).with_columns(
        pl.col("slide_id").cast(pl.String), pl.col("cell_id").cast(pl.String)
    )
    per_path = _path_columns("local_", proba_local, cls, n, "proba_local")
    if proba_global is not None:
        per_path.update(_path_columns("global_", proba_global, cls, n, "proba_global"))
    if proba_gate is not None:
        source, final = "gate", proba_gate
    elif proba_global is not None:
        source, final = "global", proba_global
    else:
        source, final = "local", proba_local
    final = check_proba(final, f"proba_{source}")
    if final.shape != (n, len(cls)):
        raise UserError(f"proba_{source} has shape {final.shape}, expected ({n}, {len(cls)})")
    if gate_value is None:
        gate = pl.Series([None] * n, dtype=pl.Float32)
    else:
        gv = np.asarray(gate_value, dtype=np.float32).reshape(-1)
        if gv.shape != (n,):
            raise UserError(f"gate_value has {gv.size} values for {n} cells")
        gate = pl.Series(gv)
    idx = final.argmax(axis=1)
    return out.with_columns(
        pred_class=pl.Series(cls, dtype=pl.String).gather(idx),
        pred_confidence=pl.Series(final[np.arange(n), idx].astype(np.float32)),
        pred_source=pl.Series([source] * n, dtype=pl.String),
        **per_path,
        gate=gate,
        **{
            f"{PROB_PREFIX}{c}": pl.Series(final[:, i].astype(np.float32))
            for i, c in enumerate(cls)
        },
    )


def frame_classes(frame: pl.DataFrame) -> list[str]:
    """The class list of a predictions frame, from its `prob_<class>` columns (in order)."""
    return [c[len(PROB_PREFIX) :] for c in frame.columns if c.startswith(PROB_PREFIX)]


def write_parquet(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write a predictions frame as zstd-compressed Parquet (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, compression="zstd")
    return path


#: numeric columns written as QuPath measurements (when present and finite)
_MEASUREMENTS = {
    "pred_confidence": "confidence",
    "gate": "gate",
    "local_confidence": "local confidence",
    "global_confidence": "global confidence",
    "set_size": "conformal set size",
}
#: string columns written as QuPath metadata
_METADATA = ("slide_id", "cell_id", "pred_source", "local_class", "global_class", "safety_class",
             "conformal_set", "tissue", "label")


def write_geojson(frame: pl.DataFrame, path: str | Path, **kwargs: Any) -> list[Path]:
    """A predictions frame as QuPath GeoJSON (classification = predicted class); see
    `embedstore.io.geojson.write_geojson` for `path` and the other options."""
    if "pred_class" not in frame.columns:
        raise UserError("predictions frame lacks `pred_class`: build it with predictions_frame")
    kwargs.setdefault("measurements", _MEASUREMENTS)
    kwargs.setdefault("metadata", _METADATA)
    kwargs.setdefault("classes", frame_classes(frame))
    return geojson.write_geojson(frame, path, **kwargs)


def check_class_names(classes: Sequence[str]) -> None:
    """Refuse class names that would make a `conformal_set` ambiguous (they hold the separator)."""
    bad = [c for c in classes if SET_SEPARATOR in str(c)]
    if bad:
        raise UserError(
            f"class name(s) {', '.join(map(repr, bad))} contain {SET_SEPARATOR!r}, which separates the classes "
            "of a conformal set: rename them in the labels (`embed labels`) and train again"
        )


def run_digest(run_dir: str | Path) -> str:
    """A run's identity: sha256 (16 hex digits) of the files its predictions come from (each
    stage's weights and JSON, the safety rule, the conformal calibration). Two run folders of
    the same name differ, a retrained run gets a new one, a copied run folder keeps it."""
    h = hashlib.sha256()
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.exists():
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def run_predictions(
    db: str | Path, run_dir: str | Path, classes: Sequence[str], log: Callable[[str], None] = print
) -> pl.DataFrame:
    """The store's predictions made by `run_dir` itself. Rows are stored under the folder's
    name (`run`): rows of that name made by another run folder, or by this one before it was
    retrained, are left out (and said), and a UserError says so when no row is this run's."""
    run_dir = Path(run_dir)
    name, digest = run_dir.resolve().name, run_digest(run_dir)
    again = f"predict again with this run (`heads predict --run {run_dir} --db {db}`)"
    preds = Store(db).predictions(name)
    if preds.height == 0:
        raise UserError(f"{db} holds no predictions of run {name!r}: run `heads predict --run {run_dir} --db {db}` first")
    if "run_digest" not in preds.columns:  # a table written before runs were identified
        preds = preds.with_columns(run_digest=pl.lit(None, pl.String), run_dir=pl.lit(None, pl.String))
    stored = preds["run_digest"]
    mine = (stored == digest).fill_null(False)
    if not mine.any() and stored.is_not_null().any():
        folders = set(preds.filter(stored.is_not_null())["run_dir"].drop_nulls().to_list())
        here = str(run_dir.resolve())
        whose = ["were made by this run folder before it was retrained"] if here in folders else []
        if folders - {here} or not folders:
            whose.append(f"belong to another run folder ({', '.join(sorted(folders - {here})) or 'not recorded'})")
        raise UserError(f"the store's predictions named {name!r} {' or '.join(whose)}: {again}")
    if mine.any():
        if not mine.all():
            log(f"warning: {preds.height - int(mine.sum())} of the store's predictions named {name!r} were made by "
                f"another run folder, or before this one was retrained: left out; {again}")  # fmt: skip
        preds = preds.filter(mine)
    else:
        log(f"warning: the store's predictions named {name!r} were made before runs were identified: they cannot be "
            f"checked to come from this run folder; {again}")  # fmt: skip
    widths = preds["proba"].list.len().unique().to_list()
    if widths != [len(classes)]:
        raise UserError(f"the store's predictions named {name!r} have {', '.join(map(str, widths))} class "
                        f"probabilities, this run has {len(classes)} classes: they are another run's; {again}")  # fmt: skip
    return preds
