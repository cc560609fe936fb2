""""Cells like this one" and label audits over the store (the store-facing side of `search`).

A FAISS index lives next to the store, in `<db>/_faiss/<table>/<vector>/`: the index, its JSON
(with the table version it was built from) and `rows.parquet` (slide_id, cell_id of each index
row). When the table has changed since (a later extraction, a compaction), the index is stale:
it is rebuilt, or refused with a message when `rebuild=False`. The version's commit time is
recorded too: another store's table (an `--index-dir` shared by two stores), or a store made
again, can reach the same version number with other vectors. Labels are read fresh from the
store at every query, so relabelling never needs a rebuild.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from .. import faults
from ..errors import UserError
from ..fileio import atomic_path
from ..geometry import CONTEXT_CROP
from ..locking import exclusive
from ..store import DEFAULT_TABLE, Store, StoreError, arrow_to_vectors, is_uri
from .audit import MIN_VOTES, flag_summary, label_audit, plot_same_slide_rate, same_slide_rate
from .index import CellIndex, VectorSource, check_k, is_stale

VECTORS = ("local", "context", "both")
ROWS_FILE = "rows.parquet"
INDEX_LOCK = ".index.lock"
Progress = Callable[[int, int], None]


def check_vector(vector: str) -> str:
    if vector not in VECTORS:
        raise UserError(f"--vector must be one of {', '.join(VECTORS)}, not {vector!r}")
    return vector


def index_dir(db: str | Path, table: str, vector: str, root: str | Path | None = None) -> Path:
    check_vector(vector)
    if root is None:
        if is_uri(db):
            raise UserError("the store is remote: give a local --index-dir for the FAISS index")
        root = Path(db) / "_faiss"
    return Path(root) / table / vector


class StoreSource(VectorSource):
    """Full vectors for re-ranking read from the store on demand (Lance `take` of the
    candidates' rows), so an IVF search needs neither the vectors in memory nor a copy."""

    def __init__(self, store: Store, table: str, vector: str, version: int | None = None):
        check_vector(vector)
        self.kinds = ("local", "context") if vector == "both" else (vector,)
        self.ds = store.open(table).to_lance()
        if version is not None and self.ds.version != version:  # rows as of that version
            self.ds = self.ds.checkout_version(version)
        self.n = self.ds.count_rows()
        self._dim = sum(self.ds.schema.field(k).type.list_size for k in self.kinds)

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self.n

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors(self.ds.take(np.asarray(rows, np.int64), columns=list(self.kinds)))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in a scan (the `Store.load` order): ~2.5x faster than `fetch`."""
        return self._vectors(self.ds.to_table(columns=list(self.kinds), offset=start, limit=stop - start))

    def _vectors(self, got) -> np.ndarray:
        parts = [arrow_to_vectors(got.column(k)) for k in self.kinds]
        if len(parts) == 1:
            return parts[0]
        return np.hstack([_unit(v) for v in parts])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def load_vectors(
    store: Store, table: str, vector: str, *, with_vectors: bool = True
) -> tuple[pl.DataFrame, np.ndarray | None, int]:
    """(cell metadata with labels, float32 vectors, table version) for one vector choice.

    `both` concatenates the L2-normalised local and context vectors, so that each counts
    equally in cosine distance.
    """
    check_vector(vector)
    kinds = ("local", "context") if vector == "both" else (vector,)
    loaded = store.load(table, vectors=kinds if with_vectors else ())
    if not with_vectors:
        return loaded.meta, None, loaded.version
    if vector == "both":
        parts = [_unit(v) for v in loaded.vectors.values()]
        vectors = np.hstack(parts).astype(np.float32)
    else:
        vectors = loaded.vectors[vector]
    return loaded.meta, vectors, loaded.version


def check_searchable(meta: pl.DataFrame, vectors: np.ndarray, vector: str) -> None:
    """Refuse, naming the cells, vectors a cosine index cannot hold (all zeros, inf or NaN)."""
    bad: list[int] = []
    step = 1 << 16  # in blocks: a mask of the whole array would be as large as the vectors
    for start in range(0, len(vectors), step):
        block = vectors[start:start + step]
        bad += (start + np.flatnonzero(~np.isfinite(block).all(axis=1) | ~np.any(block != 0, axis=1))).tolist()
    if bad:
        shown = ", ".join(f"{r['slide_id']}:{r['cell_id']}" for r in meta[bad[:3]].iter_rows(named=True))
        raise UserError(f"{len(bad)} cells have {vector} vectors that cosine search cannot use (all zeros, or "
                        f"inf/NaN from a float16 overflow), e.g. {shown}: extract their slides again (into a new "
                        "--table if the backbone is at fault), or index the other vectors (--vector)")  # fmt: skip


def build_index(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    kind: str = "auto",
    root: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[CellIndex, pl.DataFrame, np.ndarray]:
    """Build and save the index of one table's vectors; returns (index, meta, vectors)."""
    store = Store(db)
    meta, vectors, version = load_vectors(store, table, vector)
    if meta.height == 0:
        raise UserError(f"table {table!r} of {db} holds no cells yet: there is nothing to index; run "
                        f"`embed extract SLIDES --cells CELLS --db {db}` first")  # fmt: skip
    check_searchable(meta, vectors, vector)
    index = CellIndex.build(vectors, kind=kind, progress=progress)
    save_index(index, meta, db, table=table, vector=vector, version=version, root=root)
    return index, meta, vectors


def committed_at(store: Store, table: str, version: int | None = None) -> str:
    """When `version` (default: the current one) of `table` was committed, as ISO text: with
    the version number, what tells this table from another one that reached the same number."""
    ds = store.open(table).to_lance()
    if version is not None and ds.version != version:
        ds = ds.checkout_version(version)
    if hasattr(ds, "get_version"):  # the loaded manifest's own entry: nothing listed
        stamp = ds.get_version()["timestamp"]
    else:
        stamp = next(v["timestamp"] for v in ds.versions() if v["version"] == ds.version)
    return stamp.isoformat()


def save_index(index: CellIndex, meta: pl.DataFrame, db: str | Path, *, table: str, vector: str,
               version: int, root: str | Path | None = None) -> Path:
    """Write the index with its rows' keys and the table version (and its commit time) that
    `open_index` checks. Savers of one index folder take turns (`embed index` twice at once):
    its three files always come from one build."""
    out = index_dir(db, table, vector, root)
    out.mkdir(parents=True, exist_ok=True)
    committed = committed_at(Store(db), table, version)
    with exclusive(out / INDEX_LOCK):  # CellIndex.save's temporaries have fixed names
        faults.point("index.during")
        with atomic_path(out / ROWS_FILE) as tmp:
            meta.select("slide_id", "cell_id").write_parquet(tmp)
        faults.pause("index.save")  # tests: another `embed index` starts here
        index.save(out, meta={"table": table, "vector": vector, "table_version": version,
                              "table_committed": committed, "n": meta.height})
    return out


def open_index(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    root: str | Path | None = None,
    rebuild: bool = True,
    with_vectors: bool = True,
    progress: Progress | None = None,
    notify: Callable[[str], None] = lambda msg: None,
) -> tuple[CellIndex, pl.DataFrame, np.ndarray | None]:
    """The index (built or rebuilt when missing or stale) with the cells' current metadata
    (labels included) and, if asked, their vectors, in index row order."""
    where = index_dir(db, table, vector, root)
    store = Store(db)
    current = store.open(table).version
    if (where / ROWS_FILE).exists() and (where / "index.json").exists():
        try:
            index, imeta = CellIndex.load(where)
        except UserError as exc:  # an older index format, or a damaged file: rebuild it
            index, imeta = None, {"table_version": None, "error": str(exc)}
        committed = committed_at(store, table, current)
        fresh = index is not None and not is_stale(imeta, current)
        other = fresh and imeta.get("table_committed") != committed
        if fresh and not other:
            meta, vectors, loaded = load_vectors(store, table, vector, with_vectors=with_vectors)
            rows = pl.read_parquet(where / ROWS_FILE)
            # a writer may commit between the version check and the load: the rows must be the
            # index's version's, and the re-ranking vectors read from that same version
            if loaded == current and rows.height == meta.height and rows.equals(meta.select("slide_id", "cell_id")):
                if index.kind == "ivf":
                    index.attach(vectors if vectors is not None else StoreSource(store, table, vector, version=loaded))
                return index, meta, vectors
            current = loaded
        if other:
            reason = (f"built from another table {table!r} at version {current} (committed "
                      f"{imeta.get('table_committed') or 'at an unrecorded time'}, this one {committed}): "
                      "another store's, or this store before it was made again")  # fmt: skip
        else:
            reason = f"built from table version {imeta.get('table_version')}, the table is now at {current}"
        reason = imeta.get("error") or reason
        if not rebuild:
            raise StoreError(
                f"the {vector} index in {where} is stale ({reason}); rebuild it with "
                f"`embed index --db {db} --vector {vector}`"
            )
        notify(f"index is stale ({reason}): rebuilding")
    elif not rebuild:
        raise StoreError(f"no {vector} index in {where}: build it with `embed index --db {db} --vector {vector}`")
    else:
        notify(f"no {vector} index yet: building it")
    if with_vectors:  # the caller needs them all in memory anyway
        return build_index(db, table=table, vector=vector, root=root, progress=progress)
    from .distributed import build_index_local  # batch by batch when the vectors would not fit

    index, meta = build_index_local(db, table=table, vector=vector, root=root, progress=progress, notify=notify)
    return index, meta, None


def parse_cell(ref: str) -> tuple[str, str]:
    if ":" not in ref:
        raise UserError(f"--cell {ref!r}: write it as SLIDE:CELL_ID (e.g. synth_s0:aaacdbjl-1)")
    slide, cell = ref.split(":", 1)
    return slide, cell


def resolve_cell(ref: str, keys: pl.DataFrame) -> tuple[str, str]:
    """SLIDE:CELL_ID as the stored (slide_id, cell_id) it names: ids may hold ':' themselves
    ("case:A" slides, "det:50" cells), so every ':' is tried as the cut; the first cut is
    returned when none (or, ambiguously, several) name a stored cell, for the message."""
    slide, cell = parse_cell(ref)
    cuts = [(ref[:i], ref[i + 1 :]) for i, ch in enumerate(ref) if ch == ":"]
    if len(cuts) > 1:
        found = keys.filter(pl.col("slide_id").is_in([c[0] for c in cuts]))
        hits = [c for c in cuts if found.filter((pl.col("slide_id") == c[0]) & (pl.col("cell_id") == c[1])).height]
        if len(hits) > 1:
            raise UserError(f"--cell {ref!r} names {len(hits)} stored cells ({', '.join(f'slide {s!r} cell {c!r}' for s, c in hits)})")
        if hits:
            return hits[0]
    return slide, cell


def _row_of(meta: pl.DataFrame, slide: str, cell: str) -> int:
    hits = np.flatnonzero(((meta["slide_id"] == slide) & (meta["cell_id"] == cell)).to_numpy())
    if hits.size == 0:
        known = meta.filter(pl.col("slide_id") == slide)
        hint = (
            f"slide {slide!r} has {known.height} cells, e.g. {known['cell_id'].head(3).to_list()}"
            if known.height
            else f"no slide {slide!r}; slides are {sorted(meta['slide_id'].unique().to_list())[:10]}"
        )
        raise UserError(f"cell {slide}:{cell} is not in the store ({hint})")
    return int(hits[0])


def _allowed(meta: pl.DataFrame, tissues: Sequence[str] | None, splits: Sequence[str] | None) -> np.ndarray | None:
    mask = np.ones(meta.height, dtype=bool)
    if tissues:
        mask &= meta["tissue"].is_in(list(tissues)).to_numpy()
    if splits:
        if "split" not in meta.columns or meta["split"].null_count() == meta.height:
            raise UserError("no splits are stored; attach them with `embed labels` first")
        mask &= meta["split"].is_in(list(splits)).fill_null(False).to_numpy()
    if not mask.any():
        raise UserError(f"no stored cells match the filters (tissues {tissues}, splits {splits})")
    return None if mask.all() else mask


def similar(
    db: str | Path,
    cell: str,
    k: int = 20,
    *,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    exclude_same_slide: bool = False,
    tissues: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    root: str | Path | None = None,
    notify: Callable[[str], None] = lambda msg: None,
) -> pl.DataFrame:
    """The k cells most like `cell` ("SLIDE:CELL_ID"), nearest first, with the query as rank 0."""
    parse_cell(cell), check_k(k)  # bad arguments fail before any index is built
    index, meta, _ = open_index(
        db, table=table, vector=vector, root=root, with_vectors=False, notify=notify
    )
    row = _row_of(meta, *resolve_cell(cell, meta))
    groups = meta["slide_id"].to_numpy() if exclude_same_slide else None
    scores, rows = index.search_rows(
        np.array([row]), k, allowed=_allowed(meta, tissues, splits), groups=groups,
        exclude_same_group=exclude_same_slide,
    )  # fmt: skip
    found = rows[0] >= 0
    rows_k, sims = rows[0][found], scores[0][found]
    cols = [c for c in ("slide_id", "cell_id", "x_um", "y_um", "x_px", "y_px", "tissue", "label", "split") if c in meta.columns]
    out = meta[np.concatenate([[row], rows_k])].select(cols)
    distance = np.concatenate([[0.0], 1.0 - sims]) if index.metric == "cosine" else np.concatenate([[0.0], sims])
    return out.with_columns(
        rank=pl.Series(np.arange(len(out)), dtype=pl.Int32),
        distance=pl.Series(distance.astype(np.float32)),
    ).select("rank", *cols, "distance")


def audit(
    db: str | Path,
    *,
    k: int = 20,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    other_slides_only: bool = False,
    exclude_near_um: float | None = None,
    min_label_confidence: float = 0.6,
    root: str | Path | None = None,
    progress: Progress | None = None,
    notify: Callable[[str], None] = lambda msg: None,
    **kwargs,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(review queue of labelled cells sorted by suspicion, per-class flagged shares).

    `exclude_near_um`: same-slide neighbours closer than this do not vote; default the context
    radius (128 µm) for context vectors (they share most of their field), 0 for local ones.
    Labels with a `label_confidence` below `min_label_confidence` (0.6, the cut `heads train`
    uses) neither vote nor are audited: marker-guided labels the annotation did not keep would
    otherwise outvote the kept ones and fill the queue with cells training never sees. A label
    without a confidence (a hand label) is trusted.
    """
    check_k(k)
    if not 0 < kwargs.get("min_share", 0.75) <= 1:
        raise UserError(f"--min-share {kwargs['min_share']} must lie in (0, 1]")
    index, meta, vectors = _open_for_queries(db, table, vector, root, notify)
    if "label" not in meta.columns or meta["label"].null_count() == meta.height:
        raise UserError("no labels are stored: attach them with `embed labels TABLE --db DB` first")
    if not 0 <= min_label_confidence <= 1:
        raise UserError(f"--min-label-confidence {min_label_confidence} must lie in [0, 1]")
    label = meta["label"]
    if "label_confidence" in meta.columns:
        low = (meta["label_confidence"] < min_label_confidence).fill_null(False) & label.is_not_null()
        if int(low.sum()) == label.drop_nulls().len():
            raise UserError(f"all {int(low.sum())} stored labels have a label_confidence below {min_label_confidence:g}: "
                            "nothing to audit; lower --min-label-confidence (0 audits every label)")  # fmt: skip
        if low.any():
            notify(f"{int(low.sum())} of {label.drop_nulls().len()} labels have a label_confidence below "
                   f"{min_label_confidence:g}: they neither vote nor are audited (--min-label-confidence 0 keeps them)")  # fmt: skip
            label = pl.select(pl.when(low).then(None).otherwise(label).alias("label")).to_series()
    classes = sorted(label.drop_nulls().unique().to_list())
    codes = label.replace_strict({c: i for i, c in enumerate(classes)}, default=-1, return_dtype=pl.Int64).to_numpy()
    if exclude_near_um is None:
        exclude_near_um = CONTEXT_CROP.size_um / 2 if vector != "local" else 0.0
    xy = meta.select("x_um", "y_um").to_numpy() if exclude_near_um > 0 else None
    result = label_audit(
        index, vectors, codes, classes, k=k, groups=meta["slide_id"].to_numpy(),
        other_groups_only=other_slides_only, progress=progress, xy_um=xy,
        exclude_radius_um=exclude_near_um, **kwargs,
    )  # fmt: skip
    cols = [c for c in ("slide_id", "cell_id", "x_um", "y_um", "x_px", "y_px", "tissue", "label_confidence") if c in meta.columns]
    queue = pl.concat([meta[result["row"].to_numpy()].select(cols), result.drop("row", "label", "suggested").rename({"label_name": "label", "suggested_name": "suggested"})], how="horizontal")
    min_votes = kwargs.get("min_votes", MIN_VOTES)
    mute = int((queue["n_votes"] < min_votes).sum())
    if mute:  # "0 flagged" must not read as "all checked and fine"
        notify(f"warning: {mute} of {queue.height} labelled cells had fewer than {min_votes} labelled neighbours "
               f"voting among their {k} (too few labels{', or none on other slides' if other_slides_only else ''}); "
               "they could not be audited")  # fmt: skip
    return queue, flag_summary(result, classes)


def _open_for_queries(db: str | Path, table: str, vector: str, root: str | Path | None,
                      notify: Callable[[str], None]) -> tuple[CellIndex, pl.DataFrame, np.ndarray | None]:
    """`open_index` for a caller querying with indexed rows (audit, batch effect): with the
    vectors in memory while they fit (`vectors_fit`: one scan), else without (None): the
    queries are then the index's own, read batch by batch (`audit._queries`)."""
    from .distributed import vectors_fit

    check_vector(vector)
    t = Store(db).open(table)
    dim = sum(t.schema.field(k).type.list_size for k in (("local", "context") if vector == "both" else (vector,)))
    fit = vectors_fit(t.count_rows(), dim)
    return open_index(db, table=table, vector=vector, root=root, notify=notify, with_vectors=fit)


def batch_effect(
    db: str | Path,
    out_png: str | Path,
    *,
    k: int = 20,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    root: str | Path | None = None,
    notify: Callable[[str], None] = lambda msg: None,
) -> pl.DataFrame:
    """How often a cell's nearest neighbours come from its own slide, against chance (+ PNG).

    A table of one cell has no neighbours to measure: no rows, and no PNG (an earlier one is
    removed, so that it cannot pass for this table's)."""
    check_k(k)
    index, meta, vectors = _open_for_queries(db, table, vector, root, notify)
    if index.ntotal < 2:
        Path(out_png).unlink(missing_ok=True)
        return pl.DataFrame(schema={"group": pl.Utf8, "n_cells": pl.Int64, "n_queries": pl.Int64,
                                    "observed": pl.Float64, "expected": pl.Float64, "ratio": pl.Float64})
    rates = same_slide_rate(index, vectors, meta["slide_id"].to_numpy(), k=k)
    plot_same_slide_rate(rates, out_png, title=f"Same-slide neighbours ({vector} vectors, k={k})")
    return rates


def slide_paths(db: str | Path, slides=None) -> dict[str, Path]:
    """Slide files by id: those recorded by the extraction runs (latest run first wins), then
    those found in `slides` (files, folders or globs, as `embed extract` takes them), which win:
    slides moved since extraction. A `slides` path that does not exist is a SlideError."""
    import json

    from ..io.slides import find_slides, slide_id_from_path

    runs = Store(db).runs()
    out: dict[str, Path] = {}
    if runs.height:
        for recorded in reversed(runs.sort("started")["slides"].to_list()):
            for sid, rec in json.loads(recorded or "{}").items():
                if rec.get("path") and sid not in out:
                    out[sid] = Path(rec["path"])
    if slides is not None:
        out.update({slide_id_from_path(p): Path(p) for p in find_slides(slides)})
    return out


def gallery(
    db: str | Path,
    neighbours: pl.DataFrame,
    out_png: str | Path,
    *,
    slides: str | Path | None = None,
    crop_um: float = 56.0,
    columns: int = 6,
) -> Path:
    """The query crop beside its neighbours' crops, read from the slides, with labels."""
    from matplotlib.figure import Figure

    from ..geometry import CropSpec
    from ..io.slides import Slide

    paths = slide_paths(db, slides)
    spec = CropSpec(crop_um, 224)
    n = neighbours.height
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(2.2 * columns, 2.9 * rows))
    opened: dict[str, Slide] = {}
    try:
        for i, rec in enumerate(neighbours.iter_rows(named=True)):
            ax = fig.add_subplot(rows, columns, i + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            sid = rec["slide_id"]
            if sid not in paths or not Path(paths[sid]).exists():
                raise UserError(f"slide file of {sid!r} not found (recorded: {paths.get(sid)}); pass --slides DIR")
            if sid not in opened:
                opened[sid] = Slide(paths[sid])
            img, _ = opened[sid].read(rec["x_px"], rec["y_px"], spec)
            ax.imshow(img)
            label = rec.get("label") or "unlabelled"
            title = "query" if rec["rank"] == 0 else f"#{rec['rank']} d={rec['distance']:.3f}"
            ax.set_title(f"{title}\n{label}\n{sid}", fontsize=7)
            if rec["rank"] == 0:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(3)
    finally:
        for s in opened.values():
            s.close()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
