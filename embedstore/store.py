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
rerun skips the keys already present, so each cell is stored exactly once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from .errors import UserError

CONFIG_KEY = b"nuclass.vector_config"
DEFAULT_TABLE = "cells"
META_COLUMNS = ["slide_id", "cell_id", "x_px", "y_px", "x_um", "y_um", "tissue", "run_id"]
LABEL_COLUMNS = ["label", "label_confidence", "split"]
PREDICTION_COLUMNS = [
    "run", "slide_id", "cell_id", "pred_class", "pred_confidence", "pred_source", "local_class",
    "local_confidence", "global_class", "global_confidence", "gate",
]  # fmt: skip
VECTOR_KINDS = ("local", "context")
#: Lance file format of vector tables, chosen by bench/store.py: reading 1M x 2560 float16
#: vectors took 0.7 s in the "legacy" (v0.1) format and 10-15 s in v2.1 on this machine
#: (pylance 14). NUCLASS_LANCE_FORMAT=2.1 selects the newer format should legacy go away.
STORAGE_VERSION = os.environ.get("NUCLASS_LANCE_FORMAT", "legacy")
VECTOR_FIELD_META = {"lance-encoding:structural-encoding": "fullzip"}
#: rows per record batch when loading (measured best for the legacy format: 65536)
LOAD_BATCH_ROWS = 65536
#: threads copying record batches into the output arrays
LOAD_THREADS = max(1, min(4, os.cpu_count() or 1))


class StoreError(UserError):
    """The store is missing, mismatched, or asked for something it does not hold."""


def _sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(column: str, values) -> str:
    return f"{column} IN ({', '.join(_sql_str(v) for v in values)})"


def cells_schema(dims: dict[str, int], config: dict) -> pa.Schema:
    fields = [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
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
        is_local = "://" not in self.uri
        if is_local and not create and not Path(self.uri).is_dir():
            raise StoreError(f"{self.uri}: no store here; create one with `embed extract ... --db {self.uri}`")
        self.db = lancedb.connect(self.uri)

    # -- tables -------------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        names = self.db.list_tables()
        names = getattr(names, "tables", names)
        return sorted(names)

    def has(self, name: str) -> bool:
        return name in self.table_names()

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
        stored = self.config_or_none(name)
        if stored is None:
            if self.has(name):
                raise StoreError(f"{self.uri}: table {name!r} exists but holds no vectors; pick another --table")
            return self.db.create_table(
                name,
                schema=cells_schema(dims, config),
                storage_options={"new_table_data_storage_version": STORAGE_VERSION},
            )
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
        if not self.has(name):
            return set()
        ds = self.open(name).to_lance()
        flt = f"slide_id = {_sql_str(slide_id)}" if slide_id is not None else None
        tb = ds.to_table(columns=["cell_id"], filter=flt)
        return set(tb.column("cell_id").to_pylist())

    def append(self, name: str, rows: pa.Table) -> None:
        """One atomic commit of rows (callers never pass keys already stored)."""
        self.open(name).add(rows)

    def compact(self, name: str) -> None:
        """Merge the many small fragments of a long run and drop the superseded versions'
        files (keeps loading at disk speed and the store at its data's size).

        Run by the single writer at the end of an extraction; a reader holding an older
        version open at that moment would have to reopen it.
        """
        with warnings.catch_warnings():  # the "no concurrent readers" warning: understood
            warnings.simplefilter("ignore", UserWarning)
            self.open(name).optimize(cleanup_older_than=dt.timedelta(0))

    # -- runs ---------------------------------------------------------------------------------
    def record_run(self, run: dict) -> None:
        """Insert or update one run's provenance row (keyed by run_id).

        Scalars are stored as given; dicts/lists (config, slides, counts) as JSON text.
        """
        row = pa.table({
            k: pa.array([json.dumps(v, sort_keys=True) if not isinstance(v, str) else v], pa.string())
            for k, v in sorted(run.items())
        })  # fmt: skip
        if not self.has("runs"):
            self.db.create_table("runs", data=row)
            return
        table = self.db.open_table("runs")
        table.merge_insert("run_id").when_matched_update_all().when_not_matched_insert_all().execute(row)

    def runs(self) -> pl.DataFrame:
        if not self.has("runs"):
            return pl.DataFrame()
        return pl.from_arrow(self.db.open_table("runs").to_arrow())

    # -- labels -------------------------------------------------------------------------------
    def set_labels(self, frame: pl.DataFrame, *, source: str, table: str = DEFAULT_TABLE, replace: bool = True) -> dict:
        """Attach labels/splits to stored cells (replacing all, or merging by key).

        Returns counts: matched, unknown (label rows with no stored cell: dropped, with examples).
        """
        for col in ("slide_id", "cell_id"):
            if col not in frame.columns:
                raise StoreError(f"label table lacks {col!r}; columns are {frame.columns}")
        if not any(c in frame.columns for c in LABEL_COLUMNS):
            raise StoreError(f"label table has none of {LABEL_COLUMNS}; columns are {frame.columns}")
        keys = self.keys_frame(table)
        frame = frame.with_columns(pl.col("slide_id").cast(pl.Utf8), pl.col("cell_id").cast(pl.Utf8))
        dup = frame.select(pl.struct("slide_id", "cell_id").is_duplicated()).to_series()
        if dup.any():
            ex = frame.filter(dup).head(3).select(pl.col("slide_id") + "/" + pl.col("cell_id")).to_series().to_list()
            raise StoreError(f"label table has {int(dup.sum())} rows with repeated ids, e.g. {ex}")
        known = frame.join(keys, on=["slide_id", "cell_id"], how="semi")
        unknown = frame.join(keys, on=["slide_id", "cell_id"], how="anti")
        cols = {"slide_id": pl.Utf8, "cell_id": pl.Utf8, "label": pl.Utf8, "label_confidence": pl.Float64, "split": pl.Utf8}
        known = known.select(
            [pl.col(c).cast(t) if c in known.columns else pl.lit(None, dtype=t).alias(c) for c, t in cols.items()]
        ).with_columns(source=pl.lit(source))
        arrow = known.to_arrow()
        if replace or not self.has("labels"):
            self.db.create_table("labels", data=arrow, mode="overwrite")
        else:
            self.db.open_table("labels").merge_insert(["slide_id", "cell_id"]).when_matched_update_all().when_not_matched_insert_all().execute(arrow)
        ex = unknown.head(5).select(pl.col("slide_id") + "/" + pl.col("cell_id")).to_series().to_list()
        return {"matched": known.height, "unknown": unknown.height, "unknown_examples": ex}

    def labels(self) -> pl.DataFrame | None:
        if not self.has("labels"):
            return None
        return pl.from_arrow(self.db.open_table("labels").to_arrow())

    # -- predictions --------------------------------------------------------------------------
    def write_predictions(self, frame: pl.DataFrame) -> None:
        """Upsert per-cell predictions keyed by (run, slide_id, cell_id), in one commit.

        Class probabilities go into one list column `proba` (class order in the run's
        checkpoint JSON), so runs with different classes share the table.
        """
        prob_cols = [c for c in frame.columns if c.startswith("prob_")]
        keep = [c for c in PREDICTION_COLUMNS if c in frame.columns]
        rows = frame.select(*keep, proba=pl.concat_list(prob_cols).cast(pl.List(pl.Float32)))
        arrow = rows.to_arrow()
        arrow = arrow.cast(pa.schema([
            f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in arrow.schema
        ]))  # fmt: skip
        if not self.has("predictions"):
            self.db.create_table("predictions", data=arrow)
            return
        table = self.db.open_table("predictions")
        (
            table.merge_insert(["run", "slide_id", "cell_id"])
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(arrow)
        )

    def predictions(self, run: str | None = None) -> pl.DataFrame:
        if not self.has("predictions"):
            raise StoreError(f"{self.uri}: no predictions yet; run `heads predict --run RUN --db {self.uri}`")
        ds = self.db.open_table("predictions").to_lance()
        return pl.from_arrow(ds.to_table(filter=f"run = {_sql_str(run)}" if run else None))

    # -- reading ------------------------------------------------------------------------------
    def keys_frame(self, name: str = DEFAULT_TABLE) -> pl.DataFrame:
        tb = self.open(name).to_lance().to_table(columns=["slide_id", "cell_id"])
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
        # stream record batches straight into preallocated arrays: one copy, bounded memory;
        # the copies (and the page faults of the fresh arrays) run on a few threads
        n = ds.count_rows(filter=flt)
        arrays = {v: np.empty((n, ds.schema.field(v).type.list_size), dtype) for v in vectors}
        metas, pos, pending = [], 0, deque()
        scan = ds.scanner(columns=meta_cols + list(vectors), filter=flt, batch_size=LOAD_BATCH_ROWS)
        with ThreadPoolExecutor(LOAD_THREADS) as pool:
            for batch in scan.to_batches():
                k = batch.num_rows
                for v in vectors:
                    pending.append(pool.submit(_copy_rows, arrays[v], pos, batch.column(v)))
                metas.append(batch.select(meta_cols))
                pos += k
                while len(pending) > 4 * LOAD_THREADS:
                    pending.popleft().result()
            for fut in pending:
                fut.result()
        if pos != n:
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
        if "://" in self.uri:
            return None
        return sum(f.stat().st_size for f in Path(self.uri).rglob("*") if f.is_file())

    def info(self) -> dict:
        out: dict = {"uri": self.uri, "tables": {}, "bytes_on_disk": self.size_on_disk()}
        for name in self.vector_tables():
            table = self.open(name)
            keys = self.keys_frame(name)
            per_slide = keys.group_by("slide_id").len().sort("slide_id")
            cfg = self.config(name)
            out["tables"][name] = {
                "cells": keys.height,
                "slides": dict(zip(per_slide["slide_id"], per_slide["len"], strict=True)),
                "version": table.version,
                "vectors": {k: v.get("dim") for k, v in cfg.get("vectors", {}).items()},
                "config": cfg,
            }
        labels = self.labels()
        if labels is not None:
            out["labels"] = {
                "rows": labels.height,
                "classes": labels["label"].drop_nulls().n_unique(),
                "sources": sorted(labels["source"].unique().to_list()),
            }
        runs = self.runs()
        out["runs"] = runs.to_dicts() if runs.height else []
        return out


def default_index_dir(uri: str) -> Path:
    if "://" in uri:
        raise StoreError("the store is remote: give a local --index-dir for the FAISS index")
    return Path(uri) / "_faiss"


