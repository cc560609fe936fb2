"""Label tables: one reader and one set of checks for `embed labels`, `heads train --labels`
and `Store.set_labels` (which an extraction's cells-table labels go through too).

A label table names cells by slide and cell id and carries any of `label`, `label_confidence`
(a number in [0, 1]; none means a hand label, fully trusted) and `split` (train/val/test). Its
columns are found as `embed cells` finds them (`DEFAULT_NAMES`: QuPath's Image, Object ID and
Classification columns too). Blank labels and splits, and the missing-value tokens (NA, n/a,
#N/A, None, null, nan), mean "none".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

from ..errors import CellsError
from .cells import (
    DEFAULT_NAMES,
    MISSING_TOKENS,
    check_unique_keys,
    checked_splits,
    clean_text_columns,
    find_column,
    match_slide_ids,
    numeric_column,
    read_table,
)

KEYS = ["slide_id", "cell_id"]
FIELDS = ["label", "label_confidence", "split"]


def read_labels(path: str | Path, *, slide_id: str | None = None, columns: Mapping[str, str | None] | None = None) -> pl.DataFrame:
    """A label table as `slide_id, cell_id` and those of FIELDS it has, checked (`clean_labels`).

    `columns`: source column per field (slide_id, cell_id, label, label_confidence, split); the
    others are found by name. `slide_id`: the slide of every row (per-slide files)."""
    columns = {k: v for k, v in (columns or {}).items() if v}
    raw = read_table(path, text=[*columns.values(), *DEFAULT_NAMES["label"]])  # ids and labels verbatim
    picked = {key: find_column(raw, key, columns.get(key)) for key in [*KEYS, *FIELDS]}
    if slide_id is not None:
        picked["slide_id"] = None
    missing = [k for k in KEYS if picked[k] is None and not (k == "slide_id" and slide_id is not None)]
    if missing:
        raise CellsError(f"{path}: no {' or '.join(missing)} column (columns: {raw.columns}); name it "
                         "(`embed labels`: --cell-id-col, --slide-col, or --slide-id for a per-slide file)")  # fmt: skip
    if not any(picked[f] for f in FIELDS):
        raise CellsError(f"{path}: no label, confidence or split column (tried {', '.join(DEFAULT_NAMES['label'])}; "
                         f"columns: {raw.columns}); name it with --label-col")  # fmt: skip
    frame = raw.select(**{key: pl.col(col) for key, col in picked.items() if col is not None})
    if slide_id is not None:
        frame = frame.with_columns(slide_id=pl.lit(slide_id))
    try:
        return clean_labels(frame)
    except CellsError as exc:
        raise CellsError(f"{path}: {exc}") from None


def clean_labels(frame: pl.DataFrame, error: type[Exception] = CellsError) -> pl.DataFrame:
    """Ids as text; blank and missing-token labels and splits as null; `label_confidence` as a
    number in [0, 1] (NaN: null); splits train/val/test; one row per cell. Raises `error`."""
    frame = clean_text_columns(frame.with_columns(pl.col(KEYS).cast(pl.Utf8)), ["label", "split"])
    text = [c for c in ("label", "split") if c in frame.columns]
    frame = frame.with_columns(pl.when(pl.col(c).str.to_lowercase().is_in(MISSING_TOKENS)).then(None).otherwise(pl.col(c)).alias(c) for c in text)
    if "label_confidence" in frame.columns:
        if frame.schema["label_confidence"] == pl.Null:
            frame = frame.with_columns(pl.col("label_confidence").cast(pl.Float64))
        try:
            frame = frame.with_columns(numeric_column(frame, "label_confidence", "label confidence").fill_nan(None))
        except CellsError as exc:
            raise error(str(exc)) from None
        check_confidence(frame["label_confidence"], error)
    frame = checked_splits(frame, error)
    check_unique_keys(frame, "label table", error)
    return frame


def check_confidence(conf: pl.Series, error: type[Exception] = CellsError) -> None:
    """Refuse confidences outside [0, 1] (null means none)."""
    bad = conf.filter(~conf.is_between(0, 1))
    if bad.len():
        percent = "; they look like percentages: divide them by 100" if conf.drop_nulls().is_between(0, 100).all() else ""
        raise error(f"label_confidence must be within [0, 1]; {bad.len()} values are not, e.g. {bad.head(3).to_list()}{percent}")


def examples(frame: pl.DataFrame, n: int = 5) -> list[str]:
    """The first `n` keys of `frame` as "slide/cell"."""
    return frame.head(n).select(pl.col("slide_id") + "/" + pl.col("cell_id")).to_series().to_list()


def match_stored(frame: pl.DataFrame, keys: pl.DataFrame, *, what: str, hint: str, error: type[Exception] = CellsError) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`frame`'s rows that name a stored cell (`keys`) and the others. Slide ids written as file
    names ("S1.svs", QuPath's Image column) name the stored slide. Refuses a table none of whose
    rows is a stored cell (`what`: "... a stored cell of ..."; `hint`: how to fix it)."""
    frame = match_slide_ids(frame, keys["slide_id"].unique().to_list())
    known = frame.join(keys, on=KEYS, how="semi")
    unknown = frame.join(keys, on=KEYS, how="anti")
    if known.height == 0:
        raise error(f"none of the {frame.height} label rows matches a stored cell of {what} (e.g. {examples(unknown)}; "
                    f"stored cells look like {examples(keys, 3)}); {hint}")  # fmt: skip
    return known, unknown


def warn_case_variants(labels: Iterable[str | None]) -> None:
    """One warning naming the classes that differ only by case ("Tumor", "TUMOR"). They stay
    apart: which spelling is right (and whether case carries meaning) is the user's call."""
    groups: dict[str, set[str]] = {}
    for name in labels:
        if name is not None:
            groups.setdefault(name.casefold(), set()).add(name)
    clash = [" / ".join(sorted(g)) for g in groups.values() if len(g) > 1]
    if clash:
        warnings.warn(f"classes that differ only by case are kept apart: {'; '.join(sorted(clash))} "
                      "(rename them in the table to make one class)", UserWarning, stacklevel=2)  # fmt: skip
