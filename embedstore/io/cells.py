"""Cells: centroids from a table (CSV/Parquet) or a Xenium bundle, normalised and checked.

The normalised form is one polars DataFrame with `slide_id, cell_id, x_px, y_px, x_um, y_um,
tissue` (level-0 pixels and slide µm of the cell's centre) plus the optional `label`,
`label_confidence` and `split` columns.

Bad rows are never dropped silently. The documented rule (`on_bad="drop"`, the default):
- a centroid with a NaN/inf coordinate is dropped;
- a repeated (slide_id, cell_id) keeps its first row, later rows are dropped;
- a centroid outside the slide (x_px not in [0, width), y_px not in [0, height)) is dropped;
- a cell whose slide_id is missing or matches no slide given is dropped.
Each kind is counted, with examples, in a `CellReport`. `on_bad="error"` raises instead.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import CellsError

REQUIRED = ["slide_id", "cell_id", "x_px", "y_px", "x_um", "y_um", "tissue"]
OPTIONAL = ["label", "label_confidence", "split"]
SPLITS = ("train", "val", "test")
#: split names as people write them, in lower case -> ours
SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}

#: candidate source column names, tried in order, for each normalised field
DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    "slide_id": ("slide_id", "slide", "sample", "image", "image_id"),
    "cell_id": ("cell_id", "id", "cell", "object_id", "Object ID"),
    "x": ("x_px", "x_um", "x", "x_centroid", "centroid_x", "Centroid X µm", "Centroid X px"),
    "y": ("y_px", "y_um", "y", "y_centroid", "centroid_y", "Centroid Y µm", "Centroid Y px"),
    "tissue": ("tissue", "organ", "tissue_type"),
    "label": ("label", "cell_type", "class", "Classification"),
    "label_confidence": ("label_confidence", "confidence"),
    "split": ("split",),
}


@dataclass(frozen=True)
class SlideGeometry:
    """The few slide facts ingestion needs: µm/px and level-0 size (from `SlideInfo`)."""

    mpp: float
    width: int | None = None
    height: int | None = None


@dataclass
class CellReport:
    """Counts and examples of what ingestion dropped, per reason."""

    n_in: int = 0
    n_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, reason: str, ids: Sequence[str]) -> None:
        if len(ids):
            self.dropped[reason] = self.dropped.get(reason, 0) + len(ids)
            self.examples.setdefault(reason, []).extend(str(i) for i in list(ids)[:5])

    def merge(self, other: CellReport) -> None:
        self.n_in += other.n_in
        self.n_out += other.n_out
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
            self.examples.setdefault(reason, []).extend(other.examples.get(reason, [])[:5])
        self.notes += other.notes

    def lines(self) -> list[str]:
        out = [f"{self.n_in} cells read, {self.n_out} kept"]
        for reason, n in self.dropped.items():
            ex = ", ".join(self.examples.get(reason, [])[:5])
            out.append(f"dropped {n} ({reason}), e.g. {ex}")
        return out + self.notes


#: delimiters a CSV-like file may use (European spreadsheets write ";")
DELIMITERS = (",", ";", "\t", "|")


def sniff_delimiter(path: Path) -> str:
    """The delimiter of a CSV-like file: the candidate that splits its header line most."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except (OSError, EOFError) as exc:
        raise CellsError(f"{path}: cannot read the table ({exc})") from exc
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


#: values of a numeric column that mean "missing" (R's NA, Excel's #N/A, pandas' NaN): the
#: row is then dropped and counted like any NaN centroid, not the whole table refused
MISSING_TOKENS = ("", "na", "n/a", "#n/a", "nan", "null", "none")


def _fold(name: str) -> str:
    """A column name compared loosely: case, surrounding blanks, and the two micro signs (U+00B5
    and Greek U+03BC, which look the same) do not matter."""
    return name.strip().casefold().replace("\u03bc", "\u00b5")


def _decoded_csv(path: Path) -> bytes:
    """The file's bytes as UTF-8: a file with a UTF-16 byte-order mark (Excel's "Unicode Text")
    is decoded as UTF-16; another that is not valid UTF-8 is read as Windows-1252, the encoding
    of CSVs saved by Excel and QuPath on Windows ("Centroid X \u00b5m")."""
    import codecs
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16").encode("utf-8")
    try:
        raw.decode("utf-8")
        return raw
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace").encode("utf-8")


def read_table(path: str | Path, text: Sequence[str] = ()) -> pl.DataFrame:
    """A CSV/TSV (optionally gzipped; delimiter , ; tab or | from the header) or Parquet file.

    In a CSV, id columns (any name among the slide and cell id candidates, and the names in
    `text`) are read as text, verbatim: inferring numbers would turn "001" and "01" into the
    same id 1. In a CSV not separated by commas, other columns of decimal-comma numbers ("12,5")
    are read as numbers. Integral float ids (pandas writes int ids with a NaN as float: 12.0 in a
    Parquet file, "12.0" in a CSV) lose their ".0".
    """
    path = Path(path)
    if not path.exists():
        raise CellsError(f"{path}: no such table")
    if path.is_dir():
        raise CellsError(f"{path}: a directory, not a table (.csv, .tsv or .parquet)")
    name = path.name.lower()
    try:
        ids = {_fold(c) for c in (*DEFAULT_NAMES["slide_id"], *DEFAULT_NAMES["cell_id"], *text)}
        if name.endswith(".parquet") or name.endswith(".pq"):
            frame = pl.read_parquet(path)
            return frame.with_columns(_integral_as_text(frame[c]) for c in frame.columns if _fold(c) in ids and frame[c].dtype.is_float())
        if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            sep = sniff_delimiter(path)
            data = _decoded_csv(path)
            header = pl.read_csv(io.BytesIO(data), separator=sep, n_rows=0).columns
            as_text = {c: pl.Utf8 for c in header if _fold(c) in ids}
            frame = pl.read_csv(io.BytesIO(data), separator=sep, infer_schema_length=10000, schema_overrides=as_text)
            frame = frame.with_columns(_float_text_as_integer(frame[c]) for c in as_text)
            return frame if sep == "," else _decimal_commas(frame, skip=as_text)
    except CellsError:
        raise
    except Exception as exc:  # noqa: BLE001 - polars raises many kinds
        raise CellsError(f"{path}: cannot read the table ({exc})") from exc
    raise CellsError(f"{path}: unknown table format; use .csv, .tsv (optionally .gz) or .parquet")


#: a number written with a decimal comma ("12,5"), or a whole number among such ("13")
DECIMAL_COMMA = r"^-?\d+(,\d+)?$"


def _decimal_commas(frame: pl.DataFrame, skip: Collection[str]) -> pl.DataFrame:
    """Text columns (other than `skip`) whose values are all decimal-comma numbers or missing
    tokens, as Float64: European spreadsheets save "12,5" in ;-separated files.

    Not polars' `decimal_comma=True`: that leaves a column holding "NA" as text "12,5". Not for
    comma-separated files either, where a quoted "1,234" may as well be a thousands separator.
    """
    numbers = {}
    for name in frame.columns:
        if name in skip or frame.schema[name] != pl.Utf8:
            continue
        text = frame[name].str.strip_chars()
        given = text.filter(~text.str.to_lowercase().is_in(MISSING_TOKENS))
        if given.len() and given.str.contains(DECIMAL_COMMA).all() and given.str.contains(",").any():
            numbers[name] = text.str.replace(",", ".").cast(pl.Float64, strict=False)  # missing: null
    return frame.with_columns(**numbers)


def _integral_as_text(column: pl.Series) -> pl.Series:
    finite = column.drop_nulls()
    if finite.len() and (finite == finite.round(0)).all():
        return column.cast(pl.Int64).cast(pl.Utf8)
    return column


def _float_text_as_integer(column: pl.Series) -> pl.Series:
    """Ids written as floats ("12.0", pandas' way with an int column holding a NaN) as "12", when
    every given id of the column is so written; "001" and "12.5" are left as they are."""
    given = column.str.strip_chars().drop_nulls()
    given = given.filter(~given.str.to_lowercase().is_in(MISSING_TOKENS))
    if given.len() and given.str.contains(r"^-?\d+\.0+$").all():
        return column.str.strip_chars().str.replace(r"\.0+$", "")
    return column


def clean_text_columns(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    """Strip the given text columns; empty or blank values become null (never a class)."""
    present = [c for c in columns if c in frame.columns]
    return frame.with_columns(
        pl.col(c).cast(pl.Utf8).str.strip_chars().replace("", None) for c in present
    )


def numeric_column(frame: pl.DataFrame, column: str, what: str) -> pl.Expr:
    """`column` as Float64, or a CellsError naming the values that are not numbers."""
    dtype = frame.schema[column]
    if dtype.is_numeric():
        return pl.col(column).cast(pl.Float64)
    if dtype != pl.Utf8 and dtype != pl.Null:
        raise CellsError(f"column {column!r} ({what}) holds {dtype}, not numbers")
    text = frame[column].str.strip_chars()
    missing = text.str.to_lowercase().is_in(MISSING_TOKENS)
    cast = text.cast(pl.Float64, strict=False)
    bad = frame[column].filter(cast.is_null() & frame[column].is_not_null() & ~missing)
    if bad.len():
        decimal = "; the file may use decimal commas: convert them to points" if bad.str.contains(r"^\s*-?\d+,\d+\s*$").any() else ""
        raise CellsError(
            f"column {column!r} ({what}) has {bad.len()} values that are not numbers, e.g. "
            f"{bad.head(3).to_list()}{decimal}"
        )
    return pl.col(column).str.strip_chars().cast(pl.Float64, strict=False)


def find_column(df: pl.DataFrame, key: str, given: str | None = None) -> str | None:
    """The table's column for normalised field `key` (`given`, or the first DEFAULT_NAMES match)."""
    return _pick(df, key, given, required=False)


def match_slide_ids(frame: pl.DataFrame, known: Sequence[str]) -> pl.DataFrame:
    """Slide ids written as file names ("S1.svs", "scans/S1.ome.tiff", QuPath's Image column)
    or in another Unicode form (macOS stores "é" decomposed) become the slide files' ids."""
    import unicodedata

    from .slides import PLAIN_IMAGE_SUFFIXES, SLIDE_SUFFIXES, slide_id_from_path

    nfc = {unicodedata.normalize("NFC", k): k for k in known}
    mapping = {}
    for value in frame["slide_id"].drop_nulls().unique().to_list():
        if value in known:
            continue
        is_file = value.lower().endswith(SLIDE_SUFFIXES + PLAIN_IMAGE_SUFFIXES)  # "sample.1" is no file name
        for cand in (value, slide_id_from_path(value.replace("\\", "/")) if is_file else value):
            hit = nfc.get(unicodedata.normalize("NFC", cand))
            if hit is not None:
                mapping[value] = hit
                break
    return frame.with_columns(pl.col("slide_id").replace(mapping)) if mapping else frame


def _pick(df: pl.DataFrame, key: str, given: str | None, required: bool) -> str | None:
    if given is not None:
        if given not in df.columns:
            raise CellsError(
                f"column {given!r} (for {key}) is not in the table; columns are {df.columns}"
            )
        return given
    for name in DEFAULT_NAMES[key]:
        if name in df.columns:
            return name
    folded = {_fold(c): c for c in df.columns}
    for name in DEFAULT_NAMES[key]:
        if _fold(name) in folded:
            return folded[_fold(name)]
    if required:
        raise CellsError(
            f"no {key} column found (tried {', '.join(DEFAULT_NAMES[key])}); columns are "
            f"{df.columns}. Name it with --{key.replace('_', '-')}-col."
        )
    return None


def _unit_from_name(name: str) -> str | None:
    low = _fold(name)
    if low.endswith(("_um", " µm", "_µm", "_micron", "_microns")) or "µm" in low:
        return "um"
    if low.endswith(("_px", " px", "_pixel", "_pixels")):
        return "px"
    return None


def table_to_cells(
    df: pl.DataFrame,
    *,
    unit: str | None = None,
    columns: Mapping[str, str] | None = None,
    slide_id: str | None = None,
    tissue: str | None = None,
) -> tuple[pl.DataFrame, str]:
    """Rename a raw table's columns to the normalised names; coordinates become `x`/`y`.

    Returns the frame and the coordinate unit ("px" or "um"), from `unit`, or else from the
    coordinate column's name (`x_um`, `Centroid X µm` -> um; `x_px` -> px).
    """
    if len(df.columns) == 1:
        raise CellsError(
            f"the table has a single column, {df.columns[0][:60]!r}: its delimiter was not "
            "recognised; save it with , ; tab or | between the columns"
        )
    if df.height == 0:
        raise CellsError("the table has no rows: no cells to ingest")
    columns = dict(columns or {})
    picked = {
        key: _pick(df, key, columns.get(key), required=key in ("cell_id", "x", "y"))
        for key in DEFAULT_NAMES
    }
    if unit is None:
        unit = _unit_from_name(picked["x"])
    if unit not in ("px", "um"):
        raise CellsError(
            f"cannot tell the unit of coordinate column {picked['x']!r}: pass --unit px or --unit um"
        )
    out = {"cell_id": pl.col(picked["cell_id"]).cast(pl.Utf8)}
    out["x"] = numeric_column(df, picked["x"], "x")
    out["y"] = numeric_column(df, picked["y"], "y")
    for key in ("slide_id", "tissue", "label", "split"):
        if picked[key] is not None:
            out[key] = pl.col(picked[key]).cast(pl.Utf8)
    if picked["label_confidence"] is not None:
        out["label_confidence"] = numeric_column(df, picked["label_confidence"], "label confidence")
    frame = clean_text_columns(df.select(**out), ["label", "split", "tissue"])
    nulls = frame.filter(pl.col("cell_id").is_null())
    if nulls.height:
        raise CellsError(f"{nulls.height} rows have no cell id (column {picked['cell_id']!r}); give every cell an id")
    if slide_id is not None:
        frame = frame.with_columns(slide_id=pl.lit(slide_id))
    elif "slide_id" not in frame.columns:
        raise CellsError("the table has no slide column: name it with --slide-col or pass --slide-id")
    if tissue is not None:
        frame = frame.with_columns(tissue=pl.lit(tissue))
    elif "tissue" not in frame.columns:
        raise CellsError("the table has no tissue column: name it with --tissue-col or pass --tissue")
    return frame, unit


def normalise(
    frame: pl.DataFrame,
    unit: str,
    slides: Mapping[str, SlideGeometry],
    *,
    on_bad: str = "drop",
    known: Sequence[str] | None = None,
) -> tuple[pl.DataFrame, CellReport]:
    """Convert `x`/`y` in `unit` to x_px/y_px/x_um/y_um per slide and apply the bad-row rule.

    `known`: every slide id that was found (for the message about unknown ones), when `slides`
    holds only those the table names."""
    if on_bad not in ("drop", "error"):
        raise ValueError(f"on_bad must be 'drop' or 'error', not {on_bad!r}")
    report = CellReport(n_in=frame.height)
    key = pl.col("slide_id") + pl.lit("/") + pl.col("cell_id")

    report.add("no slide id", frame.filter(pl.col("slide_id").is_null())["cell_id"].to_list())
    frame = frame.filter(pl.col("slide_id").is_not_null())
    unknown = frame.filter(~pl.col("slide_id").is_in(list(slides)))
    report.add(
        f"slide not found; known slides: {', '.join(sorted(known if known is not None else slides)) or 'none'}",
        unknown.select(key).to_series().to_list(),
    )
    frame = frame.filter(pl.col("slide_id").is_in(list(slides)))

    bad = ~(pl.col("x").is_finite() & pl.col("y").is_finite())
    report.add("NaN or infinite centroid", frame.filter(bad.fill_null(True)).select(key).to_series().to_list())
    frame = frame.filter((~bad).fill_null(False))

    dup = frame.select(key.is_first_distinct()).to_series()
    report.add("duplicate cell id in slide, first kept", frame.filter(~dup).select(key).to_series().to_list())
    frame = frame.filter(dup)

    mpp = frame.select(pl.col("slide_id").replace_strict({k: v.mpp for k, v in slides.items()}, return_dtype=pl.Float64)).to_series()
    if unit == "px":
        frame = frame.with_columns(x_px=pl.col("x"), y_px=pl.col("y"))
    else:
        frame = frame.with_columns(x_px=pl.col("x") / mpp, y_px=pl.col("y") / mpp)
    frame = frame.with_columns(x_um=pl.col("x_px") * mpp, y_um=pl.col("y_px") * mpp)

    inside = pl.lit(True)
    for sid, geo in slides.items():
        if geo.width is None or geo.height is None:
            report.notes.append(f"{sid}: no slide file, so centroids were not checked against its bounds")
            continue
        in_slide = pl.col("x_px").is_between(0, geo.width, closed="left") & pl.col("y_px").is_between(0, geo.height, closed="left")
        inside = pl.when(pl.col("slide_id") == sid).then(in_slide).otherwise(inside)
    outside = frame.filter(~inside)
    report.add("centroid outside the slide", outside.select(key).to_series().to_list())
    frame = frame.filter(inside)

    frame = checked_splits(frame)
    if on_bad == "error" and report.dropped:
        raise CellsError("bad cells (rerun without --strict to drop them):\n  " + "\n  ".join(report.lines()[1:]))
    if frame.height == 0:
        raise CellsError("no cells left to store: " + "; ".join(report.lines()))

    order = REQUIRED + [c for c in OPTIONAL if c in frame.columns]
    frame = frame.select(order).with_columns(pl.col("tissue").fill_null("unknown"))
    report.n_out = frame.height
    return frame, report


def validate_cells(frame: pl.DataFrame) -> pl.DataFrame:
    """Check that `frame` is in the normalised form (e.g. a cells.parquet given to extract)."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise CellsError(
            f"cell table lacks columns {missing}; make it with `embed cells SOURCE --out cells.parquet`"
        )
    if frame.height == 0:
        raise CellsError("the cell table has no rows: no cells to extract")
    not_num = [c for c in ("x_px", "y_px", "x_um", "y_um") if not frame.schema[c].is_numeric()]
    if not_num:
        raise CellsError(
            f"cell table columns {not_num} are {[str(frame.schema[c]) for c in not_num]}, not numbers; "
            "make the table with `embed cells SOURCE --out cells.parquet`"
        )
    for col in ("slide_id", "cell_id"):
        if frame[col].null_count():
            raise CellsError(f"{frame[col].null_count()} cells have no {col}; give every cell one")
    frame = frame.with_columns(pl.col("slide_id", "cell_id", "tissue").cast(pl.Utf8))
    frame = clean_text_columns(frame, ["label", "split"]).with_columns(pl.col("tissue").fill_null("unknown"))
    frame = checked_splits(frame)
    bad = frame.filter((~(pl.col("x_px").is_finite() & pl.col("y_px").is_finite())).fill_null(True))
    if bad.height:
        raise CellsError(f"{bad.height} cells have missing or NaN/inf centroids, e.g. {bad['cell_id'][:3].to_list()}; "
                         "drop them (`embed cells` drops and counts them)")
    bad = frame.filter((~(pl.col("x_um").is_finite() & pl.col("y_um").is_finite())).fill_null(True))
    if bad.height:
        raise CellsError(f"{bad.height} cells have no x_um/y_um (missing, NaN or inf), e.g. "
                         f"{bad['cell_id'][:3].to_list()}; make the table with `embed cells SOURCE --slides ...`, "
                         "which fills them from the slide's µm/px")
    check_unique_keys(frame, "cell table")
    return frame


def checked_splits(frame: pl.DataFrame, error: type[Exception] = CellsError) -> pl.DataFrame:
    """`frame` with its split values as ours: any case, and the long names ("Training",
    "Validation", "Testing") read as train/val/test; other values are refused (null means none)."""
    if "split" not in frame.columns:
        return frame
    if frame.schema["split"] == pl.Utf8:
        frame = frame.with_columns(pl.col("split").str.strip_chars().str.to_lowercase().replace(SPLIT_ALIASES))
    wrong = sorted(set(frame["split"].drop_nulls().cast(pl.Utf8).to_list()) - set(SPLITS))
    if wrong:
        raise error(f"split column has values other than {', '.join(SPLITS)}: {wrong[:5]}")
    return frame


def check_unique_keys(frame: pl.DataFrame, what: str, error: type[Exception] = CellsError) -> None:
    """Refuse a table in which a (slide_id, cell_id) repeats."""
    dup = frame.select(pl.struct("slide_id", "cell_id").is_duplicated()).to_series()
    if dup.any():
        keys = frame.filter(dup).select(pl.col("slide_id") + "/" + pl.col("cell_id")).to_series().unique(maintain_order=True)
        raise error(f"{keys.len()} cells appear more than once in the {what} ({int(dup.sum())} rows), "
                    f"e.g. {keys.head(3).to_list()}; give each cell one row")  # fmt: skip


def centroid_arrays(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return frame["x_px"].to_numpy().astype(np.float64), frame["y_px"].to_numpy().astype(np.float64)
