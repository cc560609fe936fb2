"""Evaluation metrics on plain numpy arrays, the held-out cohort protocol, and result tables.

Labels may be given as class names (strings) or as integer indices into `classes`; `classes`
is the training class list (its order is the column order of every probability array).

Undefined values: a class listed in `classes` but absent from `y_true` has no recall and no
F1 (reported as None); a class never predicted has no precision (None). Macro-F1 averages over
the classes present in `y_true` only, so a held-out cohort with 6 of 16 training classes is not
penalised for the 10 it does not contain (predictions into absent classes still count as
errors for the true class). The row-normalised confusion matrix has all-zero rows for absent
classes.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import polars as pl
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
)

from embedstore.errors import UserError
from heads.calibration import check_proba, expected_calibration_error

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

#: columns of `results_table`, in display order; optional ones appear when any row has them
RESULT_COLUMNS = ("name", "n", "accuracy", "macro_f1", "ece")
OPTIONAL_RESULT_COLUMNS = ("ece_ts", "temperature", "val_macro_f1", "selection_gap", "fit_s")
MACRO_F1_DEFINITION = (
    "unweighted mean of per-class F1 over the classes present in the scored cells' true labels "
    "(sklearn f1_score(average='macro', labels=classes present)); classes without cells are "
    "listed as missing, not scored"
)


def _check_classes(classes: Sequence[str]) -> list[str]:
    cls = [str(c) for c in classes]
    if not cls:
        raise UserError("the class list is empty")
    dup = [c for c, k in Counter(cls).items() if k > 1]
    if dup:
        raise UserError(f"the class list has duplicates: {dup}")
    return cls


def encode_labels(labels: Sequence | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Integer indices into `classes` for labels given as class names or as indices."""
    cls = _check_classes(classes)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise UserError(f"labels must be 1-D, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.integer):
        if len(y) and (y.min() < 0 or y.max() >= len(cls)):
            raise UserError(
                f"label indices must be in [0, {len(cls)}) for {len(cls)} classes, "
                f"got min {y.min()} max {y.max()}"
            )
        return y.astype(np.int64)
    lookup = {c: i for i, c in enumerate(cls)}
    out = np.empty(len(y), dtype=np.int64)
    unknown: Counter[str] = Counter()
    for i, v in enumerate(y.tolist()):
        j = lookup.get(str(v)) if v is not None else None
        if j is None:
            unknown[str(v)] += 1
            j = -1
        out[i] = j
    if unknown:
        shown = ", ".join(f"{k!r} ({n})" for k, n in unknown.most_common(5))
        raise UserError(
            f"{sum(unknown.values())} labels are not in the class list {cls}: {shown}; "
            "map them first (heads.metrics.apply_synonyms) or drop them"
        )
    return out


def as_predictions(pred: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Predicted class indices from labels, indices, or an (n, C) probability array (argmax)."""
    p = np.asarray(pred)
    if p.ndim == 2:
        if p.shape[1] != len(classes):
            raise UserError(f"probabilities have {p.shape[1]} columns for {len(classes)} classes")
        return p.argmax(axis=1).astype(np.int64)
    return encode_labels(p, classes)


def macro_f1(y_true: Sequence | np.ndarray, y_pred: Sequence | np.ndarray) -> float:
    """The project's one macro-F1: the unweighted mean of per-class F1 over the classes present
    in `y_true`. A class that is predicted but never true adds no term of its own; the cells
    wrongly put into it still lower the recall, hence the F1, of their true classes.

    Used for early stopping, reports, baselines and benchmarks alike, so that a split lacking a
    class scores the same everywhere. 0.0 for no cells.
    """
    y, p = np.asarray(y_true), np.asarray(y_pred)
    if y.size == 0:
        return 0.0
    return float(f1_score(y, p, labels=np.unique(y), average="macro", zero_division=0))


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def evaluate(
    y_true: Sequence | np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    *,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, per-class F1/recall/precision/support,
    row-normalised confusion matrix and ECE for one prediction path.

    `proba` is (n, C) with columns in `classes` order; the prediction is its argmax. Returns a
    JSON-ready dict (see the module docstring for undefined values).
    """
    cls = _check_classes(classes)
    p = check_proba(proba)
    if p.shape[1] != len(cls):
        raise UserError(f"probabilities have {p.shape[1]} columns but there are {len(cls)} classes")
    y = encode_labels(y_true, cls)
    if len(y) != p.shape[0]:
        raise UserError(f"{len(y)} labels for {p.shape[0]} rows of probabilities")
    if len(y) == 0:
        raise UserError("nothing to evaluate: zero labelled cells")
    pred = p.argmax(axis=1)
    labels = np.arange(len(cls))
    present = np.unique(y)

    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=np.nan
    )
    counts = confusion_matrix(y, pred, labels=labels)
    row = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, row, out=np.zeros(counts.shape, dtype=np.float64), where=row > 0)
    per_class = {
        c: {
            "f1": _none_if_nan(f1[i]),
            "recall": _none_if_nan(rec[i]),
            "precision": _none_if_nan(prec[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(cls)
    }
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": macro_f1(y, pred),
        "balanced_accuracy": float(
            recall_score(y, pred, labels=present, average="macro", zero_division=0)
        ),
        "ece": expected_calibration_error(p, y, n_bins),
        "classes": cls,
        "present_classes": [cls[i] for i in present],
        "per_class": per_class,
        "confusion": {
            "classes": cls,
            "normalized": normalized.tolist(),
            "counts": counts.astype(int).tolist(),
        },
    }


# --------------------------------------------------------------------------- held-out protocol


class SynonymMapping(NamedTuple):
    """Result of `apply_synonyms`: mapped labels (None where dropped), keep mask, drop counts."""

    labels: np.ndarray  # object array of class names, None where dropped
    keep: np.ndarray  # bool
    dropped: dict[str, int]  # raw label -> number of cells dropped


def _norm_name(s: str) -> str:
    return re.sub(r"[\s_\-]+", "_", s.strip()).casefold()


def apply_synonyms(
    raw_labels: Sequence | np.ndarray,
    synonyms: Mapping[str, str | None],
    classes: Sequence[str],
) -> SynonymMapping:
    """Map a cohort's raw labels to training classes and flag labels outside them.

    Lookup order per raw label: the synonym table (exact key), the class list (exact name),
    then both again ignoring case and treating spaces, '-' and '_' alike. A synonym whose
    value is None drops that label on purpose (e.g. an ambiguous cluster). Labels that match
    nothing, and missing labels (None/NaN/""), are dropped and counted in `dropped`.
    Unpack as `labels, keep, dropped = apply_synonyms(...)`.
    """
    cls = _check_classes(classes)
    cls_set = set(cls)
    bad = {k: v for k, v in synonyms.items() if v is not None and v not in cls_set}
    if bad:
        raise UserError(
            f"synonym table maps to names that are not training classes: {bad}; "
            f"training classes are {cls}"
        )
    exact: dict[str, str | None] = {c: c for c in cls}
    exact.update({str(k): v for k, v in synonyms.items()})
    loose: dict[str, str | None] = {_norm_name(c): c for c in cls}
    loose.update({_norm_name(str(k)): v for k, v in synonyms.items()})

    raw = np.asarray(raw_labels, dtype=object)
    if raw.ndim != 1:
        raise UserError(f"raw labels must be 1-D, got shape {raw.shape}")
    mapped = np.empty(len(raw), dtype=object)
    keep = np.zeros(len(raw), dtype=bool)
    dropped: Counter[str] = Counter()
    cache: dict[Any, str | None] = {}
    for i, v in enumerate(raw.tolist()):
        if v not in cache:
            missing = v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""
            if missing:
                cache[v] = None
            else:
                s = str(v)
                cache[v] = exact[s] if s in exact else loose.get(_norm_name(s))
        target = cache[v]
        if target is None:
            dropped["<missing>" if v is None or str(v).strip() in ("", "nan") else str(v)] += 1
        else:
            mapped[i] = target
            keep[i] = True
    return SynonymMapping(mapped, keep, dict(dropped.most_common()))


def restrict_to_present(
    proba: np.ndarray, classes: Sequence[str], present: Sequence[str]
) -> np.ndarray:
    """Zero the columns of classes not in `present` and renormalise each row over the rest.

    The result keeps all columns (in `classes` order) so indices stay comparable; its argmax
    is always a present class. A row with no mass on any present class becomes uniform over
    the present classes.
    """
    cls = _check_classes(classes)
    p = check_proba(proba)
    if p.shape[1] != len(cls):
        raise UserError(f"probabilities have {p.shape[1]} columns but there are {len(cls)} classes")
    unknown = sorted(set(present) - set(cls))
    if unknown:
        raise UserError(f"present classes {unknown} are not training classes {cls}")
    mask = np.isin(np.asarray(cls, dtype=object), np.asarray(list(present), dtype=object))
    if not mask.any():
        raise UserError("no class is present: cannot restrict probabilities to an empty set")
    out = np.where(mask[None, :], p, 0.0)
    total = out.sum(axis=1, keepdims=True)
    uniform = mask / mask.sum()
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), uniform[None, :])


# --------------------------------------------------------------------------- complementarity


def complementarity(
    y_true: Sequence | np.ndarray,
    pred_local: np.ndarray,
    pred_global: np.ndarray,
    classes: Sequence[str],
) -> pl.DataFrame:
    """Per true class, the share of cells only the local path gets right, only the global
    path, both, and neither (the paper's Fig. 4). Predictions may be labels, indices or
    probability arrays. Shares are null for classes with no cells.
    """
    cls = _check_classes(classes)
    y = encode_labels(y_true, cls)
    pa, pb = as_predictions(pred_local, cls), as_predictions(pred_global, cls)
    if not (len(pa) == len(pb) == len(y)):
        raise UserError(f"lengths differ: {len(y)} labels, {len(pa)} local, {len(pb)} global")
    a, b = pa == y, pb == y
    groups = {
        "only_local": a & ~b,
        "only_global": ~a & b,
        "both": a & b,
        "neither": ~a & ~b,
    }
    support = np.bincount(y, minlength=len(cls))
    cols: dict[str, Any] = {"class": cls, "support": support.astype(np.int64)}
    for name, m in groups.items():
        n = np.bincount(y[m], minlength=len(cls))
        cols[name] = [float(n[i] / support[i]) if support[i] else None for i in range(len(cls))]
    return pl.DataFrame(cols, schema_overrides={k: pl.Float64 for k in groups})


# --------------------------------------------------------------------------- result tables


def results_table(rows: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """One row per model/path ("local (FiLM)", "gate", "logreg[local]", ...) with n, accuracy,
    macro-F1 and ECE (plus ece_ts / temperature / fit_s when any row carries them).

    Each row is an `evaluate` dict with a "name" key added.
    """
    if not rows:
        raise UserError("no results to tabulate")
    missing = [c for c in RESULT_COLUMNS if any(c not in r for r in rows)]
    if missing:
        raise UserError(
            f"result rows lack {missing}: build them as {{'name': ..., **evaluate(...)}}"
        )
    cols = list(RESULT_COLUMNS) + [c for c in OPTIONAL_RESULT_COLUMNS if any(c in r for r in rows)]
    schema = {c: pl.Float64 for c in cols}
    schema.update(name=pl.String, n=pl.Int64)
    return pl.DataFrame([{c: r.get(c) for c in cols} for r in rows], schema=schema)


def format_results_table(table: pl.DataFrame, digits: int = 3) -> str:
    """Plain-text rendering of `results_table` (aligned columns, fixed decimals)."""
    headers = table.columns
    cells = [
        ["-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v)) for v in row]
        for row in table.iter_rows()
    ]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        )

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


#: short headers of the CLI table (temperature and fit_s stay in metrics.json: a laptop-wide table)
RICH_HEADERS = {"name": "path", "n": "n", "accuracy": "acc", "macro_f1": "macro-F1", "ece": "ECE",
                "ece_ts": "ECE(T)", "val_macro_f1": "val F1", "selection_gap": "gap"}  # fmt: skip


def rich_results_table(table: pl.DataFrame, title: str | Text | None = None, digits: int = 3) -> Table:
    """`results_table` as a rich.table.Table (best macro-F1 in bold) for the CLI. Names and the
    title are text, never markup, on any console ("logreg [local]" prints as it is)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title) if isinstance(title, str) else title, box=box.SIMPLE_HEAD)  # no vertical rules: fits 80 columns
    cols = [c for c in RICH_HEADERS if c in table.columns]
    for i, c in enumerate(cols):
        t.add_column(RICH_HEADERS[c], justify="left" if i == 0 else "right", no_wrap=True)
    best = table["macro_f1"].max() if "macro_f1" in table.columns else None
    for row in table.select(cols).iter_rows(named=True):
        vals = [
            "-" if v is None else (f"{v:+.{digits}f}" if k == "selection_gap" else
                                   f"{v:.{digits}f}" if isinstance(v, float) else Text(str(v)))
            for k, v in row.items()
        ]  # fmt: skip
        t.add_row(*vals, style="bold" if best is not None and row["macro_f1"] == best else None)
    return t


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def metrics_json(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per path: n, accuracy, macro-F1, balanced accuracy, ECE (and ece_ts/temperature when
    present), per-class F1/recall/support and the row-normalised confusion matrix."""
    out: dict[str, Any] = {}
    for r in rows:
        if "name" not in r:
            raise UserError("every result row needs a 'name'")
        entry: dict[str, Any] = {
            k: r[k]
            for k in (
                "n",
                "accuracy",
                "macro_f1",
                "balanced_accuracy",
                "ece",
                *OPTIONAL_RESULT_COLUMNS,
            )
            if k in r
        }
        if "per_class" in r:
            entry["per_class_f1"] = {c: v["f1"] for c, v in r["per_class"].items()}
            entry["per_class_recall"] = {c: v["recall"] for c, v in r["per_class"].items()}
            entry["support"] = {c: v["support"] for c, v in r["per_class"].items()}
        if "confusion" in r:
            entry["confusion"] = {k: r["confusion"][k] for k in ("classes", "normalized")}
        out[str(r["name"])] = entry
    return _jsonable(out)


def write_metrics_json(
    rows: Sequence[Mapping[str, Any]], path: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write `metrics_json(rows)` (plus an optional top-level "info" block) as strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"paths": metrics_json(rows)}
    if extra:
        doc["info"] = _jsonable(dict(extra))
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path
