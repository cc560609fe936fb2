"""The LanceDB store: one row per (slide_id, cell_id) with float16 vectors, plus provenance.

Tables in a store (a directory, or any URI LanceDB accepts):
- `cells` (or another name given with `table=`): slide_id, cell_id, x_px, y_px, x_um, y_um,
  tissue, run_id, `<vector>_outside` (share of that field padded outside the slide) and one
  fixed-size float16 list per vector kind (`local`, `context`). The table's schema metadata
  holds its *vector config* (backbones, weight hashes, input sizes, pooling, crop geometry):
  rows with another config are refused, so vectors are never mixed silently.
- `runs`: one row per extraction run (provenance: config, slides and their read plans, code
  version, times, counts, status).
- `labels`: slide_id, cell_id, label, label_confidence, split, source. Kept apart from the
  vectors so labels and splits can be replaced without rewriting (or re-extracting) anything.
- `predictions`: written by `heads predict`.

Every write is one Lance commit (atomic): a killed writer leaves no partial rows, and a
rerun skips the keys already present, so each cell is stored exactly once. Writers hold the
store's write lock (`embedstore.locking`) around "which keys are stored?" and the commit, so
concurrent writers (two extractions, an extraction and `embed labels`) never store a key twice.
A store given as a URI (s3://, gs://, az://, file://) has no file lock: there the keys are
declared the table's (unenforced) primary key and new cells go in with a Lance merge-insert,
whose commit conflicts with any concurrent commit that inserted one of the same keys and is
then retried against the new version, so concurrent writers still store each key once.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import json
import os
import platform
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from . import faults, locking
from .errors import UserError
from .io.labels import KEYS, clean_labels, examples, match_stored, warn_case_variants

CONFIG_KEY = b"nuclass.vector_config"
DEFAULT_TABLE = "cells"
META_COLUMNS = ["slide_id", "cell_id", "x_px", "y_px", "x_um", "y_um", "tissue", "run_id"]
LABEL_COLUMNS = ["label", "label_confidence", "split"]
PREDICTION_COLUMNS = [
    "run", "slide_id", "cell_id", "pred_class", "pred_confidence", "pred_source", "local_class",
    "local_confidence", "global_class", "global_confidence", "gate", "safety_class",
    "conformal_set", "set_size",
]  # fmt: skip
#: which run folder made each prediction row: `run` is only the folder's name, so two runs named
#: alike share it; these tell them apart (`heads.export.run_predictions`). Not exported.
PREDICTION_RUN_COLUMNS = ["run_digest", "run_dir"]
VECTOR_KINDS = ("local", "context")
#: Lance file format of new vector tables, chosen by bench/store.py (issue 11): 2.2, the stable
#: format of pylance 14. The legacy (0.1) format read fastest but is deprecated (Lance lists it
#: as writable up to 0.34 only). In 2.2 the encoding matters more than the version: a vector
#: column in "fullzip" layout (Lance's choice for wide rows) loaded 5-8x slower than numpy,
#: "miniblock" without compression about 2x, read in small record batches. Tables keep the
#: format they were created with; NUCLASS_LANCE_FORMAT overrides it for new tables.
#: Load speed vs numpy.load, 200k rows, 2-core shared VM (pylance 14.0.2, bench/store.py):
#: 2.2 miniblock 0.46-0.48x with a warm page cache (0.15x before the malloc settings and
#: 1024-row batches below), 0.90x from disk; legacy 0.35-0.55x. Warm loads are CPU-bound:
#: Lance's scan of the vector columns alone (batches dropped) costs about 2x numpy.load's CPU,
#: and with the copy into the arrays and the metadata a load takes 0.71-0.77 CPU-s against
#: numpy's 0.19-0.21, which caps the ratio at ~0.55x on 2 cores; 2.1, fullzip without
#: compression, larger batches, copy thread pools, per-column or per-fragment parallel scans,
#: readahead knobs and to_table + one zero-copy view measured no better.
STORAGE_VERSION = os.environ.get("NUCLASS_LANCE_FORMAT", "2.2")
VECTOR_FIELD_META = {"lance-encoding:structural-encoding": "miniblock", "lance-encoding:compression": "none"}
#: rows per record batch when loading: large for the legacy format, cache-sized for 2.x
#: (1024 rows: ~5 MB per batch; 4096 or more decoded slower, with more page faults)
LOAD_BATCH_ROWS = {"0.1": 65536, "legacy": 65536}
LOAD_BATCH_ROWS_V2 = 1024
#: the predictions table's `run` and `slide_id` get scalar indexes at this many rows, and rows
#: are folded into them at this many unindexed: the check before each write then costs ~1 ms
#: instead of a scan of two columns (~60 ms per million rows; bench/predictions.py)
PREDICTIONS_INDEX_ROWS = 500_000
#: glibc malloc settings applied before the first load (`_reuse_read_buffers`): Lance's page
#: and batch buffers (up to ~25 MB) then come from the heap and are reused between reads
#: instead of being mmapped and page-faulted afresh each time. Measured (2.2 miniblock,
#: 200k rows): page faults per load 80-180k -> 20-35k, load ~15-25% faster. These are the
#: values glibc's dynamic threshold grows to by itself at most, fixed from the start, so
#: at most 64 MB of freed memory per arena stays mapped. NUCLASS_MALLOPT=0 leaves malloc alone.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
#: in a local store directory: the writers' lock and the live runs' lock files
WRITE_LOCK = ".nuclass-write.lock"
RUN_LOCKS = ".nuclass-runs"
#: field metadata declaring (slide_id, cell_id) the vector tables' primary key: Lance then
#: detects concurrent merge-inserts of the same new key (the lock-free write path of URI stores)
PK_META = "lance-schema:unenforced-primary-key"
KEY_COLUMNS = ("slide_id", "cell_id")
#: URI stores (no lock): compaction keeps the files of versions younger than this
REMOTE_CLEANUP_AGE = dt.timedelta(hours=1)
#: rows per delete commit when removing duplicate rows
DELETE_CHUNK = 10_000


class StoreError(UserError):
    """The store is missing, mismatched, or asked for something it does not hold."""


def _sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(column: str, values) -> str:
    return f"{column} IN ({', '.join(_sql_str(v) for v in values)})"


def cells_schema(dims: dict[str, int], config: dict) -> pa.Schema:
    fields = [
        *(pa.field(k, pa.string(), nullable=False, metadata=_key_meta(i)) for i, k in enumerate(KEY_COLUMNS)),
        pa.field("x_px", pa.float64()),
        pa.field("y_px", pa.float64()),
        pa.field("x_um", pa.float64()),
        pa.field("y_um", pa.float64()),
        pa.field("tissue", pa.string()),
        pa.field("run_id", pa.string()),
    ]
    for kind, dim in dims.items():
        fields.append(pa.field(f"{kind}_outside", pa.float32()))
        fields.append(pa.field(kind, pa.list_(pa.float16(), dim), metadata=VECTOR_FIELD_META))
    return pa.schema(fields, metadata={CONFIG_KEY: json.dumps(config, sort_keys=True).encode()})


def is_uri(location: str | Path) -> bool:
    """Whether a store location is a URI (s3://, gs://, file:/...) rather than a directory.

    A scheme of two or more letters, so that a Windows drive (C:) stays a path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.\-]+:", str(location)) is not None


def store_location(db: str | Path) -> str:
    """A URI as given, a directory as an absolute path: what other processes (Ray workers)
    must be handed to open the same store."""
    return str(db) if is_uri(db) else str(Path(db).absolute())


def store_key(db: str | Path) -> str:
    """One name per store however it is given (to compare two): a directory, or a file:// URI
    of one, as its resolved path; another URI as given. `heads` records it with a run's split
    and metrics."""
    text = str(db)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif is_uri(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def _key_meta(position: int) -> dict[str, str]:
    return {PK_META: "true", f"{PK_META}:position": str(position + 1)}


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A fixed-size-list column as one (n, dim) array, zero-copy up to the dtype cast."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    flat = column.values.to_numpy(zero_copy_only=False)
    flat = flat[column.offset * dim : (column.offset + len(column)) * dim]
    out = flat.reshape(len(column), dim)
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)


def _copy_rows(out: np.ndarray, start: int, column: pa.Array) -> None:
    values = arrow_to_vectors(column, dtype=None)
    out[start : start + len(values)] = values


@functools.cache
def _reuse_read_buffers() -> bool:
    """Set glibc's mmap and trim thresholds once per process (see MALLOC_MMAP_THRESHOLD)."""
    if os.environ.get("NUCLASS_MALLOPT", "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def _has_predictions_of(table, rows: pa.Table) -> bool:
    """Whether `table` holds any row of the runs (and slides) in `rows`.

    The merge on (run, slide_id, cell_id) joins every stored key, so its cost grows with the
    table (bench/predictions.py: ~0.2 s per million rows); this filtered count lets a first
    write of a (run, slide) skip the merge, and reads scalar indexes once the table is big
    (`_index_predictions`).
    """
    runs = pc.unique(rows["run"]).to_pylist()
    slides = pc.unique(rows["slide_id"]).to_pylist()
    flt = sql_in("run", runs)
    if len(slides) <= 1000:  # else the run alone: any row of it sends the write to the merge
        flt += " AND " + sql_in("slide_id", slides)
    return table.count_rows(filter=flt) > 0


def _index_predictions(ds) -> None:
    """Scalar indexes on the predictions table's `run` and `slide_id` once it holds
    PREDICTIONS_INDEX_ROWS rows, with newer rows folded in whenever that many are unindexed."""
    have = {tuple(i.field_names): i.name for i in ds.describe_indices()}
    missing = [c for c in ("run", "slide_id") if (c,) not in have]
    if missing:
        if ds.count_rows() >= PREDICTIONS_INDEX_ROWS:
            for column in missing:  # few runs: a bitmap; thousands of slides: a B-tree
                ds.create_scalar_index(column, index_type="BITMAP" if column == "run" else "BTREE")
        return
    if ds.stats.index_stats(have[("slide_id",)])["num_unindexed_rows"] >= PREDICTIONS_INDEX_ROWS:
        ds.optimize.optimize_indices()


def config_diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) vector configs."""
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return lines


@dataclass
class LoadedCells:
    """Cells loaded for training/search: metadata plus one array per vector kind (same row order)."""

    meta: pl.DataFrame
    vectors: dict[str, np.ndarray]
    config: dict
    table: str
    version: int

    def __len__(self) -> int:
        return self.meta.height

    def tensor(self, kind: str, device: str = "cpu"):
        import torch

        return torch.from_numpy(self.vectors[kind]).to(device)


class Store:
    """A LanceDB store directory (or URI)."""

    def __init__(self, uri: str | Path, *, create: bool = False):
        import lancedb

        self.uri = str(uri)
        self.local = not is_uri(self.uri)
        if self.local and not create:
            root = Path(self.uri)
            if not root.is_dir():
                raise StoreError(f"{self.uri}: no store here; create one with `embed extract ... --db {self.uri}`")
            if not any(p.suffix == ".lance" for p in root.iterdir()):
                raise StoreError(
                    f"{self.uri}: not a store (it holds no Lance tables); give the directory "
                    "that `embed extract --db` created"
                )
        self.db = lancedb.connect(self.uri)
        # per table: the version this Store last read keys at or wrote, and the slides whose
        # stored keys its caller knows (and excludes) as of that version (see `append_new`)
        self._seen: dict[str, int] = {}
        self._covered: dict[str, set[str]] = {}

    # -- locking ------------------------------------------------------------------------------
    def writing(self):
        """The store's write lock (re-entrant; a no-op for URI stores, see the module docstring)."""
        if not self.local:
            return contextlib.nullcontext()
        return locking.exclusive(Path(self.uri) / WRITE_LOCK)

    def run_lock_path(self, run_id: str) -> Path | None:
        return Path(self.uri) / RUN_LOCKS / f"{run_id}.lock" if self.local else None

    # -- tables -------------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        """Tables with at least one commit (a table whose creation was killed has none: it
        reads as absent, and creating it again writes over the leftover files)."""
        return sorted(n for n in self._listed() if self._committed(n))

    def _listed(self) -> list[str]:
        names = self.db.list_tables()
        return list(getattr(names, "tables", names))

    def _committed(self, name: str) -> bool:
        try:
            self.db.open_table(name)
        except ValueError:  # lancedb: "Table 'x' was not found" (no manifest yet)
            return False
        return True

    def has(self, name: str) -> bool:
        return name in self._listed() and self._committed(name)

    def open(self, name: str = DEFAULT_TABLE):
        if not self.has(name):
            known = ", ".join(t for t in self.table_names() if t not in ("runs", "labels", "predictions"))
            raise StoreError(f"{self.uri}: no table {name!r} (vector tables here: {known or 'none'})")
        return self.db.open_table(name)

    def config(self, name: str = DEFAULT_TABLE) -> dict:
        meta = self.open(name).schema.metadata or {}
        return json.loads(meta.get(CONFIG_KEY, b"{}"))

    def vector_tables(self) -> list[str]:
        return [n for n in self.table_names() if self.config_or_none(n) is not None]

    def config_or_none(self, name: str) -> dict | None:
        if not self.has(name):
            return None
        meta = self.db.open_table(name).schema.metadata or {}
        return json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None

    def cells_table(self, name: str, dims: dict[str, int], config: dict):
        """Open the vector table `name`, creating it for `config`; refuse another config."""
        with self.writing():  # two writers starting at once: one creates, the other checks
            stored = self.config_or_none(name)
            if stored is None and not self.has(name):
                try:
                    return self.db.create_table(
                        name,
                        schema=cells_schema(dims, config),
                        storage_options={"new_table_data_storage_version": STORAGE_VERSION},
                    )
                except Exception:  # noqa: BLE001 - a URI store has no lock: another writer may have created it
                    if not self.has(name):
                        raise
            if stored is None:  # read again: without a lock, another writer may have committed it meanwhile
                stored = self.config_or_none(name)
            if stored is None:
                raise StoreError(f"{self.uri}: table {name!r} exists but holds no vectors; pick another --table")
        diff = config_diff(stored, config)
        if diff:
            raise StoreError(
                f"{self.uri}: table {name!r} holds vectors made with another configuration:\n  "
                + "\n  ".join(diff)
                + f"\nVectors are never mixed. Write these to a new table with --table NAME "
                f"(e.g. --table {name}_v2), or use the same backbones, weights and geometry."
            )
        return self.open(name)

    # -- keys, writing ------------------------------------------------------------------------
    def stored_keys(self, name: str, slide_id: str | None = None) -> set[str]:
        """Cell ids stored in table `name` (of one slide).

        Extra copies of a key (left by concurrent writers before the write lock existed) are
        deleted on the way, the first copy kept: a rerun of the extraction repairs the store.
        """
        with self.writing():  # no compaction (and cleanup of old files) while reading
            if not self.has(name):
                return set()
            flt = f"slide_id = {_sql_str(slide_id)}" if slide_id is not None else None
            keys = pl.from_arrow(self.open(name).to_lance().to_table(columns=["slide_id", "cell_id"], filter=flt, with_row_id=True))
            extra = keys.sort("_rowid").filter(~pl.struct("slide_id", "cell_id").is_first_distinct())["_rowid"]
            table = self.open(name)
            for start in range(0, extra.len(), DELETE_CHUNK):
                table.delete(f"_rowid IN ({', '.join(map(str, extra[start : start + DELETE_CHUNK]))})")
            if self._seen.get(name) != table.version or slide_id is None:
                self._covered[name] = set()  # what the caller knew of other slides is stale
            if slide_id is not None:
                self._covered[name].add(slide_id)
            self._seen[name] = table.version
        if extra.len():
            warnings.warn(f"table {name!r}: removed {extra.len()} duplicate rows (one copy of each cell kept)", stacklevel=2)
        return set(keys["cell_id"])

    def append(self, name: str, rows: pa.Table) -> None:
        """One atomic commit of rows, as given (see `append_new` for keyed writes)."""
        with self.writing():
            self.open(name).add(rows)

    def append_new(self, name: str, rows: pa.Table) -> int:
        """Append the rows whose (slide_id, cell_id) is not stored yet, in one commit.

        Under the write lock, the stored keys are checked (and the rows already stored
        dropped) unless nobody else has committed since this Store read the stored keys of
        the rows' slides with `stored_keys` (which its caller excluded) or last wrote. Once
        another writer has committed, every commit is checked until `stored_keys` is called
        again: the other writer may have stored keys that later rows carry too.
        Returns the number of rows written. URI stores take the lock-free path (`_merge_new`).
        """
        if not self.local:
            return self._merge_new(name, rows)
        with self.writing():
            table = self.open(name)
            slides = set(pc.unique(rows.column("slide_id")).to_pylist())
            if self._seen.get(name) != table.version:
                self._covered[name] = set()
            if not slides <= self._covered.get(name, set()):
                stored = pl.from_arrow(table.to_lance().to_table(columns=["slide_id", "cell_id"], filter=sql_in("slide_id", sorted(slides))))
                new = pl.from_arrow(rows.select(["slide_id", "cell_id"])).with_row_index("i")
                keep = new.join(stored, on=["slide_id", "cell_id"], how="anti")["i"].to_numpy()
                if len(keep) < rows.num_rows:
                    rows = rows.take(pa.array(np.sort(keep)))
            if rows.num_rows:
                faults.point("commit.during")
                table.add(rows)
                faults.point("commit.after")
            self._seen[name] = table.version
        return rows.num_rows

    def _merge_new(self, name: str, rows: pa.Table) -> int:
        """Insert the rows whose key is not stored, without a lock (URI stores).

        A Lance merge-insert on the declared primary key: if another writer commits one of the
        same new keys meanwhile, this commit conflicts and Lance reruns the merge against the new
        version, so no key is stored twice. Tables made before the key was declared get it here.
        """
        table = self.open(name)
        declared = {f.name for f in table.schema if (f.metadata or {}).get(PK_META.encode()) == b"true"}
        if declared != set(KEY_COLUMNS):
            try:
                table.to_lance().update_field_metadata({k: _key_meta(i) for i, k in enumerate(KEY_COLUMNS)})
            except OSError:  # another writer declared it first ("cannot be changed once set")
                pass
            table = self.open(name)
        keyed = pa.schema([table.schema.field(f.name) if f.name in KEY_COLUMNS else f for f in rows.schema])
        rows = rows.cast(keyed)  # Lance wants the source's key columns declared non-null too
        faults.point("commit.during")
        result = table.merge_insert(list(KEY_COLUMNS)).when_not_matched_insert_all().execute(rows)
        faults.point("commit.after")
        return int(result.num_inserted_rows)

    def compact(self, name: str) -> None:
        """Merge the many small fragments of a long run and drop the superseded versions'
        files (keeps loading at disk speed and the store at its data's size).

        Run by the single writer at the end of an extraction; a reader holding an older
        version open at that moment would have to reopen it. In a URI store, where other writers
        may be between writing their files and committing them, only versions older than
        `REMOTE_CLEANUP_AGE` are dropped.
        """
        with self.writing(), warnings.catch_warnings():  # "no concurrent readers": understood
            warnings.simplefilter("ignore", UserWarning)
            faults.point("compact.during")
            self.open(name).optimize(cleanup_older_than=dt.timedelta(0) if self.local else REMOTE_CLEANUP_AGE)

    # -- runs ---------------------------------------------------------------------------------
    def record_run(self, run: dict) -> None:
        """Insert or update one run's provenance row (keyed by run_id).

        Scalars are stored as given; dicts/lists (config, slides, counts) as JSON text. Fields
        that older runs lack become new (null) columns.
        """
        values = {k: v if isinstance(v, str) or v is None else json.dumps(v, sort_keys=True) for k, v in run.items()}
        with self.writing():
            if not self.has("runs"):
                self.db.create_table("runs", data=pa.table({k: pa.array([values[k]], pa.string()) for k in sorted(values)}))
                return
            table = self.db.open_table("runs")
            missing = [k for k in sorted(values) if k not in table.schema.names]
            if missing:
                table.add_columns({k: "CAST(NULL AS STRING)" for k in missing})
            names = table.schema.names
            row = pa.table({k: pa.array([values.get(k)], pa.string()) for k in names})
            faults.point("run.during")
            table.merge_insert("run_id").when_matched_update_all().when_not_matched_insert_all().execute(row)

    def runs(self) -> pl.DataFrame:
        """The runs table; a run still marked `running` whose process is gone reads `interrupted`."""
        if not self.has("runs"):
            return pl.DataFrame()
        runs = pl.from_arrow(self.db.open_table("runs").to_arrow())
        dead = self._dead(runs)
        return runs.with_columns(
            status=pl.when(pl.col("run_id").is_in(dead)).then(pl.lit("interrupted")).otherwise(pl.col("status"))
        )

    def _dead(self, runs: pl.DataFrame) -> list[str]:
        """Runs marked `running` whose process no longer holds the run's life lock (a remote
        store has no such locks: its runs are taken to be alive)."""
        running = runs.filter(pl.col("status") == "running")["run_id"].to_list()
        return [r for r in running if (p := self.run_lock_path(r)) is not None and not locking.LifeLock.is_alive(p)]

    def reap_runs(self) -> list[str]:
        """Mark runs whose process died (killed, crashed) as `interrupted`; returns their ids."""
        if not self.has("runs"):
            return []
        with self.writing():
            runs = pl.from_arrow(self.db.open_table("runs").to_arrow())
            dead = runs.filter(pl.col("run_id").is_in(self._dead(runs)))
            for row in dead.iter_rows(named=True):
                self.record_run({**row, "status": "interrupted",
                                 "reason": "the process ended without finishing (killed or crashed); rerun the same command to resume"})  # fmt: skip
                self.run_lock_path(row["run_id"]).unlink(missing_ok=True)
        return dead["run_id"].to_list()

    # -- labels -------------------------------------------------------------------------------
    def set_labels(self, frame: pl.DataFrame, *, source: str, table: str = DEFAULT_TABLE, replace: bool = True) -> dict:
        """Attach labels/splits to stored cells (replacing all, or merging by key).

        The table is checked by `clean_labels` (blank and missing-token labels and splits mean
        none; confidences within [0, 1]); its slide ids may be slide file names ("S1.svs").
        Refuses (changing nothing) a table none of whose rows is a stored cell. A merge keeps
        the columns the table lacks, but a label given without a confidence gets none (a hand
        label: full trust). Warns when the stored classes differ only by case.

        Returns counts: matched, unknown (label rows with no stored cell: dropped, with
        examples), and `lost`: per column, the cells that had a value and have none now (not
        named by a replace, or blank in a merge; `unlabelled` = lost labels). What was stored
        before stays readable as `previous_version` of the labels table (`restore_labels`).
        """
        for col in KEYS:
            if col not in frame.columns:
                raise StoreError(f"label table lacks {col!r}; columns are {frame.columns}")
        if not any(c in frame.columns for c in LABEL_COLUMNS):
            raise StoreError(f"label table has none of {LABEL_COLUMNS}; columns are {frame.columns}")
        frame = clean_labels(frame, StoreError)
        cols = {"slide_id": pl.Utf8, "cell_id": pl.Utf8, "label": pl.Utf8, "label_confidence": pl.Float64, "split": pl.Utf8}
        with self.writing():
            known, unknown = match_stored(frame, self.keys_frame(table), what=f"table {table!r}", error=StoreError,
                                          hint="nothing was changed; check the slide and cell id columns (--slide-id, --slide-col, --cell-id-col)")  # fmt: skip
            new = known.select(
                [pl.col(c).cast(t) if c in known.columns else pl.lit(None, dtype=t).alias(c) for c, t in cols.items()]
            ).with_columns(source=pl.lit(source))
            old = self.labels()
            kept = [c for c in LABEL_COLUMNS if c not in frame.columns and not (c == "label_confidence" and "label" in frame.columns)]
            if not replace and old is not None and kept:  # a merge keeps what it does not give
                new = new.drop(kept).join(old.select(*KEYS, *kept), on=KEYS, how="left").select(*cols, "source")
            final = new if replace or old is None else pl.concat([old.join(new, on=KEYS, how="anti"), new], how="vertical_relaxed")
            lost = {c: 0 if old is None else _lost(old, final, c) for c in LABEL_COLUMNS}
            counts = {"matched": new.height, "unknown": unknown.height, "unknown_examples": examples(unknown),
                      "lost": lost, "unlabelled": lost["label"]}  # fmt: skip
            arrow = new.to_arrow()
            faults.point("labels.during")
            if old is None:
                self.db.create_table("labels", data=arrow)
            else:
                counts["previous_version"] = self.db.open_table("labels").version
                if replace:
                    self.db.create_table("labels", data=arrow, mode="overwrite")
                else:
                    self.db.open_table("labels").merge_insert(KEYS).when_matched_update_all().when_not_matched_insert_all().execute(arrow)
        warn_case_variants(final["label"].unique())
        return counts

    def restore_labels(self, version: int) -> int:
        """Make an earlier version of the labels table the current one (a new commit: the
        versions in between stay readable). Returns the number of label rows now current."""
        if not self.has("labels"):
            raise StoreError(f"{self.uri}: no labels table to restore")
        with self.writing():
            table = self.db.open_table("labels")
            versions = sorted(v["version"] for v in table.list_versions())
            if version not in versions:
                raise StoreError(f"labels table has no version {version}; versions: {versions}")
            table.restore(version)
            return self.db.open_table("labels").count_rows()

    def labels(self) -> pl.DataFrame | None:
        if not self.has("labels"):
            return None
        return pl.from_arrow(self.db.open_table("labels").to_arrow())

    # -- predictions --------------------------------------------------------------------------
    def write_predictions(self, frame: pl.DataFrame) -> None:
        """Upsert per-cell predictions keyed by (run, slide_id, cell_id), in one commit
        (`run_digest` and `run_dir`, when given, say which run folder made each row).

        Class probabilities go into one list column `proba` (class order in the run's
        checkpoint JSON), so runs with different classes share the table.
        """
        prob_cols = [c for c in frame.columns if c.startswith("prob_")]
        keep = [c for c in (*PREDICTION_COLUMNS, *PREDICTION_RUN_COLUMNS) if c in frame.columns]
        rows = frame.select(*keep, proba=pl.concat_list(prob_cols).cast(pl.List(pl.Float32)))
        arrow = rows.to_arrow()
        arrow = arrow.cast(pa.schema([
            f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in arrow.schema
        ]))  # fmt: skip
        with self.writing():
            faults.point("predictions.during")
            if not self.has("predictions"):
                try:
                    self.db.create_table("predictions", data=arrow)
                    return
                except (ValueError, OSError):  # a URI store: another writer created it first
                    if self.local or not self.has("predictions"):
                        raise
            table = self.db.open_table("predictions")
            missing = {f.name: f.type for f in arrow.schema if f.name not in table.schema.names}
            if missing:  # a table made before these columns existed
                sql = {pa.string(): "STRING", pa.int32(): "INT", pa.float32(): "FLOAT"}
                table.add_columns({k: f"CAST(NULL AS {sql.get(t, 'STRING')})" for k, t in missing.items()})
            absent = [f for f in table.schema if f.name not in arrow.schema.names]
            for f in absent:  # e.g. a run without a gate into a table that has the columns
                arrow = arrow.append_column(f, pa.nulls(arrow.num_rows, f.type))
            if self.local and not _has_predictions_of(table, arrow):
                table.add(arrow)  # nothing to replace, and the lock keeps it so: a plain append
            else:
                (
                    table.merge_insert(["run", "slide_id", "cell_id"])
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(arrow)
                )
            if self.local:
                try:
                    _index_predictions(table.to_lance())
                except (OSError, RuntimeError, ValueError) as exc:  # the rows are written already
                    warnings.warn(f"predictions table: scalar indexes not updated ({exc}); "
                                  "writes stay correct, only slower", stacklevel=2)  # fmt: skip

    def predictions(self, run: str | None = None) -> pl.DataFrame:
        if not self.has("predictions"):
            raise StoreError(f"{self.uri}: no predictions yet; run `heads predict --run RUN --db {self.uri}`")
        ds = self.db.open_table("predictions").to_lance()
        return pl.from_arrow(ds.to_table(filter=f"run = {_sql_str(run)}" if run else None))

    # -- reading ------------------------------------------------------------------------------
    def keys_frame(self, name: str = DEFAULT_TABLE, slides: list[str] | None = None) -> pl.DataFrame:
        """(slide_id, cell_id) of every stored row, or of the rows of `slides`."""
        ds = self.open(name).to_lance()
        if slides is not None and not slides:
            return pl.from_arrow(ds.schema.empty_table().select(["slide_id", "cell_id"]))
        flt = sql_in("slide_id", sorted(set(slides))) if slides is not None else None
        tb = ds.to_table(columns=["slide_id", "cell_id"], filter=flt)
        return pl.from_arrow(tb)

    def load(
        self,
        name: str = DEFAULT_TABLE,
        *,
        slides: list[str] | None = None,
        tissues: list[str] | None = None,
        splits: list[str] | None = None,
        labelled_only: bool = False,
        vectors: tuple[str, ...] = VECTOR_KINDS,
        dtype=np.float32,
    ) -> LoadedCells:
        """Cells matching the filters, with labels joined and vectors as (n, dim) arrays."""
        table = self.open(name)
        ds = table.to_lance()
        missing = [v for v in vectors if v not in ds.schema.names]
        if missing:
            raise StoreError(f"table {name!r} has no vector column(s) {missing}")
        filters = []
        if slides:
            filters.append(sql_in("slide_id", slides))
        if tissues:
            filters.append(sql_in("tissue", tissues))
        meta_cols = [c for c in META_COLUMNS if c in ds.schema.names]
        flt = " AND ".join(filters) or None
        # vectors: record batches streamed straight into preallocated arrays (one copy, bounded
        # memory), copied on this thread while Lance decodes the next ones on its own; metadata
        # in a second scan of the same version, run alongside: mixing the string columns into
        # the vector scan made loads ~2x slower in 2.2
        _reuse_read_buffers()
        n = ds.count_rows(filter=flt)
        arrays = {v: np.empty((n, ds.schema.field(v).type.list_size), dtype) for v in vectors}
        pos = 0
        batch_rows = LOAD_BATCH_ROWS.get(str(ds.data_storage_version), LOAD_BATCH_ROWS_V2)
        with ThreadPoolExecutor(1) as pool:
            meta_scan = pool.submit(lambda: ds.to_table(columns=meta_cols, filter=flt).to_batches())
            if vectors:
                for batch in ds.scanner(columns=list(vectors), filter=flt, batch_size=batch_rows).to_batches():
                    if pos + batch.num_rows > n:
                        break  # cannot happen on one version; reported below
                    for v in vectors:
                        _copy_rows(arrays[v], pos, batch.column(v))
                    pos += batch.num_rows
            metas = meta_scan.result()
        if (vectors and pos != n) or sum(b.num_rows for b in metas) != n:
            raise StoreError(f"table {name!r} changed while loading ({pos} rows read, {n} expected); retry")
        meta = pl.from_arrow(pa.Table.from_batches(metas, schema=pa.schema([ds.schema.field(c) for c in meta_cols])))
        labels = self.labels()
        if labels is not None:
            meta = meta.join(labels.drop("source"), on=["slide_id", "cell_id"], how="left", maintain_order="left")
        keep = None
        if splits:
            if "split" not in meta.columns:
                raise StoreError("no splits are stored; attach them with `embed labels`")
            keep = meta["split"].is_in(splits).fill_null(False)
        if labelled_only:
            if "label" not in meta.columns:
                raise StoreError("no labels are stored; attach them with `embed labels`")
            lab = meta["label"].is_not_null()
            keep = lab if keep is None else keep & lab
        if keep is not None:
            idx = np.flatnonzero(keep.to_numpy())
            meta = meta[idx]
            arrays = {k: a[idx] for k, a in arrays.items()}
        return LoadedCells(meta, arrays, self.config(name), name, table.version)

    # -- summary ------------------------------------------------------------------------------
    def size_on_disk(self) -> int | None:
        if not self.local:
            return None
        return sum(f.stat().st_size for f in Path(self.uri).rglob("*") if f.is_file())

    def info(self) -> dict:
        out: dict = {"uri": self.uri, "tables": {}, "bytes_on_disk": self.size_on_disk()}
        for name in self.vector_tables():
            table = self.open(name)
            keys = self.keys_frame(name)
            per_slide = keys.unique().group_by("slide_id").len().sort("slide_id")
            cfg = self.config(name)
            unique = keys.unique().height
            out["tables"][name] = {
                "cells": unique,
                "duplicate_rows": keys.height - unique,  # 0 unless written by unlocked writers
                "slides": dict(zip(per_slide["slide_id"], per_slide["len"], strict=True)),
                "version": table.version,
                "vectors": {k: v.get("dim") for k, v in cfg.get("vectors", {}).items()},
                "config": cfg,
            }
        labels = self.labels()
        out["labels"] = None if labels is None else {
            "rows": labels.height,
            "labelled": labels.height - labels["label"].null_count(),  # rows may hold only a split
            "classes": labels["label"].drop_nulls().n_unique(),
            "sources": sorted(labels["source"].unique().to_list()),
        }  # fmt: skip
        runs = self.runs()
        out["runs"] = [_run_fields(r) for r in runs.to_dicts()] if runs.height else []
        return out


def _run_fields(row: dict) -> dict:
    """A runs-table row as data: the JSON text `record_run` stores (config, counts, slides...)
    decoded, and "" (a field a run has not reached, e.g. `finished`) as None."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = None if value == "" else value
    return out


def _lost(old: pl.DataFrame, now: pl.DataFrame, column: str) -> int:
    """Cells that had a value of `column` in `old` and have none in `now` (a confidence: cells
    that keep a label without it; a cell that loses its label is counted there)."""
    had = old.filter(pl.col(column).is_not_null()).select(KEYS)
    if column == "label_confidence":
        return had.join(now.filter(pl.col("label").is_not_null() & pl.col(column).is_null()), on=KEYS, how="semi").height
    return had.join(now.filter(pl.col(column).is_not_null()).select(KEYS), on=KEYS, how="anti").height


def default_index_dir(uri: str) -> Path:
    if is_uri(uri):
        raise StoreError("the store is remote: give a local --index-dir for the FAISS index")
    return Path(uri) / "_faiss"


