"""The extraction pass: slides + cells -> local and context vectors in the store.

Per slide: cells are grouped by region; reader threads read each region once per vector kind,
a cutter thread cuts the crops into reusable batch arrays, and the main thread runs the
backbones on full batches and commits rows to the store every `commit_every` cells. A rerun skips cells
already stored, so a killed run resumes with each cell stored exactly once.

A vector kind is a `VectorStep` (a crop spec plus a backbone); the context step is one such
step. `exact` mode (the paper's): one centred field per cell. `tiled` mode: the context step
carries a `TileGrid`, and its vectors are pooled from shared tiles (embedstore.extract.tiled) one band of
tiles at a time, while the per-cell steps run on that band's cells.
"""

from __future__ import annotations

import datetime as dt
import platform
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from .. import __version__
from ..errors import SlideError, UserError
from ..geometry import CONTEXT_CROP, LOCAL_CROP, CropSpec, is_close_mpp
from ..io.cells import read_table, validate_cells
from ..io.slides import PAD_VALUE, Slide, find_slides, group_by_region
from ..locking import LifeLock
from ..store import DEFAULT_TABLE, LABEL_COLUMNS, Store, sql_in, vectors_to_arrow
from .readers import READERS, in_processes, make_pool, read_regions
from .tiled import OVERLAP_PX, TILE_PX, TiledContext, TileGrid

#: backbone provenance that is recorded per run but does not define the vectors
VOLATILE_KEYS = ("weights_source", "timm_version", "torch_version", "n_params")


class ExtractionFailed(UserError):
    """Some slides failed; the others were extracted and stored."""


@dataclass
class ExtractConfig:
    local_backbone: str = "uni2-h"
    context_backbone: str = "dinov3-vitl16"
    local_weights: str | None = None
    context_weights: str | None = None
    context_pooling: str | None = None
    context_input_px: int | None = 512
    device: str = "auto"
    batch_size: int = 64
    workers: int = 2
    table: str = DEFAULT_TABLE
    mpp: float | None = None
    region_um: float = 512.0
    commit_every: int = 4096
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16
    readers: str = "threads"  # threads or processes (see embedstore.extract.readers)
    context: str = "exact"  # exact (one field per cell) or tiled (shared tiles, mean-pooled)
    tile_px: int = TILE_PX  # tiled mode: tile side at the context scale
    tile_overlap_px: int = OVERLAP_PX

    def validate(self) -> ExtractConfig:
        """Refuse settings that cannot work, before anything is opened or stored."""
        for name in ("batch_size", "workers", "commit_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a whole number >= 1, not {value!r}")
        for name in ("region_um", "mpp"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, not {value!r}")
        if self.context_input_px is not None and not 16 <= self.context_input_px <= 4096:
            raise UserError(f"--context-px must be between 16 and 4096, not {self.context_input_px}")
        if self.readers not in READERS:
            raise UserError(f"--readers must be one of {', '.join(READERS)}, not {self.readers!r}")
        if self.context not in CONTEXT_MODES:
            raise UserError(f"--context must be one of {', '.join(CONTEXT_MODES)}, not {self.context!r}")
        if self.context == "tiled" and self.context_pooling not in (None, "mean"):
            raise UserError("--context tiled pools the patch tokens in each cell's window (mean); "
                            f"--context-pooling {self.context_pooling} needs --context exact")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if problem := bad_table_name(self.table):
            raise UserError(problem)
        return self


def bad_table_name(name: str) -> str | None:
    """What is wrong with a vector table's name (None: nothing)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        return f"--table {name!r}: use letters, digits, '_' and '-' only"
    return None


#: numeric precision of the backbone forward (part of the vectors' identity)
PRECISIONS = ("auto", "fp32", "bf16")
CONTEXT_MODES = ("exact", "tiled")


def resolve_precision(precision: str, device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass
class VectorStep:
    """One vector kind: the field cut around each cell and the backbone that embeds it."""

    name: str
    crop: CropSpec  # field size in µm and the pixel size delivered to the backbone
    backbone: object  # embedstore.extract.backbones.Backbone
    precision: str = "fp32"  # fp32, or bf16 (autocast)
    tiling: TileGrid | None = None  # tiled context mode: vectors pooled from shared tiles

    def provenance(self) -> dict:
        """Everything known about how these vectors are made (stored with each run)."""
        return {**self.backbone.provenance(), **self.config()}

    def config(self) -> dict:
        """What defines these vectors: two tables' vectors are comparable iff this matches.

        Where the weights file lies and library versions are provenance, not identity.
        """
        prov = {k: v for k, v in self.backbone.provenance().items() if k not in VOLATILE_KEYS}
        return {
            **prov,
            "dim": int(self.backbone.dim),
            "field_um": self.crop.size_um,
            "field_px": self.crop.out_px,
            "field_mpp": self.crop.target_mpp,
            "compute": {"device_type": self.backbone.device.type, "precision": self.precision},
            **({"tiling": self.tiling.to_dict()} if self.tiling else {}),
        }

    def embed(self, crops: np.ndarray, device) -> np.ndarray:
        import torch

        images = torch.from_numpy(crops)  # pinned on CUDA (see _BufferRing): async copy
        if device.type == "cuda":
            images = images.to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.backbone(images)
        return out.float().cpu().numpy()


@dataclass
class SlideResult:
    slide_id: str
    path: str | None
    status: str  # done | skipped (all stored) | failed
    written: int = 0
    already: int = 0
    outside_dropped: int = 0
    reason: str = ""
    info: dict = field(default_factory=dict)
    seconds: float = 0.0


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def build_steps(cfg: ExtractConfig, device) -> list[VectorStep]:
    from .backbones import build_backbone, get_spec

    if get_spec(cfg.context_backbone).weights_free:
        raise UserError(f"{cfg.context_backbone!r} measures one nucleus in a 56 µm crop: use it as "
                        "--local-backbone, with a context backbone such as dinov3-vitl16")  # fmt: skip
    local = build_backbone(cfg.local_backbone, weights=cfg.local_weights, device=device, role="local")
    tiled = cfg.context == "tiled"
    context = build_backbone(
        cfg.context_backbone, weights=cfg.context_weights,
        pooling="mean" if tiled else cfg.context_pooling, input_px=cfg.context_input_px, device=device,
        role="context",
    )  # fmt: skip
    precision = resolve_precision(cfg.precision, device)
    context_crop = CONTEXT_CROP.resized(context.input_px)
    tiling = TileGrid.for_backbone(context_crop, context.spec.patch_px, cfg.tile_px, cfg.tile_overlap_px) if tiled else None
    return [
        VectorStep("local", LOCAL_CROP.resized(local.input_px), local, precision),
        VectorStep("context", context_crop, context, precision, tiling),
    ]


def vector_config(steps: list[VectorStep]) -> dict:
    """What must match for vectors to share a table (weights, geometry, dtype, padding)."""
    return {
        "vectors": {s.name: s.config() for s in steps},
        "dtype": "float16",
        "pad_value": PAD_VALUE,
        "context_mode": "tiled" if any(s.tiling for s in steps) else "exact",
    }


def slide_paths_by_id(slides) -> dict[str, Path]:
    from ..io.slides import slide_id_from_path

    out: dict[str, Path] = {}
    for path in find_slides(slides):
        sid = slide_id_from_path(path)
        if sid in out and out[sid].resolve() == path.resolve():
            continue  # one file given twice (a folder and a file in it, overlapping globs)
        if sid in out:
            raise SlideError(f"two slide files share the id {sid!r}: {out[sid]} and {path}; give one "
                             "of them (a slide's id is its file name without the extension)")
        out[sid] = path
    return out


class _Stop(Exception):
    pass


def _crop_batches(
    slide: Slide, x: np.ndarray, y: np.ndarray, steps: list[VectorStep], cfg: ExtractConfig,
    pool: Executor, pin: bool, ring: _BufferRing | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(cell indices, crops per step, outside share per step), `cfg.batch_size` cells at a time.

    Reader threads (`pool`) read one region per cell group and step, a few groups ahead; a
    cutter thread cuts each batch's crops straight into one of a few reusable (pinned, on
    CUDA) arrays; the caller's thread only runs the models. Crops come at the pyramid level's
    own pixels (`resample=False`); the backbone resizes them on its device.
    """
    plans = {s.name: slide.plan(s.crop, resample=False) for s in steps}
    groups = group_by_region(x, y, cfg.region_um / slide.mpp)
    bs = cfg.batch_size
    # 5 buffers: one with the caller, two queued, one being cut, one spare
    ring = ring or _BufferRing({n: p.out_px for n, p in plans.items()}, bs, n=5, pin=pin)
    out_q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                out_q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def read(idx: np.ndarray) -> dict:
        return {n: slide.read_region_for(x[idx], y[idx], p) for n, p in plans.items()}

    def submit_read(idx: np.ndarray):
        if in_processes(pool):
            return pool.submit(read_regions, slide.path, slide.mpp, x[idx], y[idx], plans)
        return pool.submit(read, idx)

    def produce() -> None:
        try:
            todo = iter(groups)
            pending: deque = deque()

            def submit() -> None:
                idx = next(todo, None)
                if idx is not None:
                    pending.append((idx, submit_read(idx)))

            for _ in range(max(1, cfg.workers) + 1):
                submit()
            crops, outside, cells, fill = ring.next(), {n: np.empty(bs, np.float32) for n in plans}, np.empty(bs, np.int64), 0
            while pending:
                idx, fut = pending.popleft()
                submit()
                regions = fut.result()
                pos = 0
                while pos < len(idx):
                    take = min(bs - fill, len(idx) - pos)
                    sl = idx[pos : pos + take]
                    for name, region in regions.items():
                        region.cut(x[sl], y[sl], out=crops[name][fill : fill + take])
                        outside[name][fill : fill + take] = region.outside(x[sl], y[sl])
                    cells[fill : fill + take] = sl
                    fill, pos = fill + take, pos + take
                    if fill == bs:
                        put((cells, crops, outside))
                        crops, outside, cells, fill = ring.next(), {n: np.empty(bs, np.float32) for n in plans}, np.empty(bs, np.int64), 0
            if fill:
                put((cells[:fill], {k: v[:fill] for k, v in crops.items()}, {k: v[:fill] for k, v in outside.items()}))
            put(None)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            try:
                put(exc)
            except _Stop:
                pass

    thread = threading.Thread(target=produce, name="cutter", daemon=True)
    thread.start()
    try:
        while True:
            item = out_q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _BufferRing:
    """A few reusable crop arrays per step (pinned memory on CUDA for async copies)."""

    def __init__(self, sides: dict[str, int], batch: int, n: int, pin: bool):
        import torch

        def alloc(side: int) -> np.ndarray:
            t = torch.empty((batch, side, side, 3), dtype=torch.uint8, pin_memory=pin)
            return t.numpy()

        self.buffers = [{k: alloc(side) for k, side in sides.items()} for _ in range(n)]
        self.i = 0

    def next(self) -> dict[str, np.ndarray]:
        self.i = (self.i + 1) % len(self.buffers)
        return self.buffers[self.i]


def _rows(cells: pl.DataFrame, idx: np.ndarray, run_id: str, vectors: dict, outside: dict) -> pa.Table:
    sub = cells[idx]
    cols = {
        "slide_id": sub["slide_id"].to_arrow(),
        "cell_id": sub["cell_id"].to_arrow(),
        "x_px": sub["x_px"].to_arrow(),
        "y_px": sub["y_px"].to_arrow(),
        "x_um": sub["x_um"].to_arrow(),
        "y_um": sub["y_um"].to_arrow(),
        "tissue": sub["tissue"].to_arrow(),
        "run_id": pa.array([run_id] * len(idx), pa.string()),
    }
    for name, vec in vectors.items():
        cols[f"{name}_outside"] = pa.array(outside[name].astype(np.float32))
        cols[name] = vectors_to_arrow(vec)
    return pa.table({k: (v.cast(pa.string()) if pa.types.is_large_string(v.type) else v) for k, v in cols.items()})


def extract(
    slides,
    cells: pl.DataFrame | str | Path,
    db: str | Path,
    cfg: ExtractConfig,
    *,
    steps: list[VectorStep] | None = None,
    on_event: Callable[[str, dict], None] | None = None,
    run_tags: dict | None = None,
    compact: bool = True,
) -> dict:
    """Run the extraction pass; returns a summary dict. Raises ExtractionFailed at the end
    (after storing every slide that worked) when any slide failed.

    `run_tags`: extra fields of this run's row in the runs table, written from its first
    record on (so a run killed mid-way still says e.g. which worker ran it). `compact=False`
    leaves compaction to the caller (the Ray driver compacts once after all its tasks)."""
    emit = on_event or (lambda kind, data: None)
    cfg.validate()
    if not isinstance(cells, pl.DataFrame):
        cells = read_table(cells)
    cells = validate_cells(cells)
    paths = slide_paths_by_id(slides)
    device = resolve_device(cfg.device)
    steps = steps or build_steps(cfg, device)
    config = vector_config(steps)

    store = Store(db, create=True)
    store.cells_table(cfg.table, {s.name: s.config()["dim"] for s in steps}, config)
    for dead in store.reap_runs():
        emit("warning", {"slide_id": "store", "message": f"run {dead} ended without finishing (killed or crashed); marked interrupted"})
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    run = {
        "run_id": run_id, "table": cfg.table, "status": "running",
        "started": dt.datetime.now(dt.UTC).isoformat(), "finished": "",
        "code_version": __version__, "host": platform.node(), "device": str(device),
        "settings": asdict(cfg), "config": config, "slides": {}, "counts": {},
        "backbones": {s.name: s.provenance() for s in steps}, **(run_tags or {}),
    }  # fmt: skip
    lock_path = store.run_lock_path(run_id)
    life = LifeLock(lock_path) if lock_path else None  # held while this run lives
    try:
        store.record_run(run)
        return _run_slides(cells, paths, steps, store, cfg, run, device, emit, compact)
    except BaseException as exc:
        if run["status"] == "running":  # crashed or interrupted (Ctrl-C) mid-run
            run["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            run["reason"] = f"{type(exc).__name__}: {exc}"[:500]
            run["finished"] = dt.datetime.now(dt.UTC).isoformat()
            store.record_run(run)
        raise
    finally:
        if life:
            life.release()


def _run_slides(
    cells: pl.DataFrame, paths: dict[str, Path], steps: list[VectorStep], store: Store,
    cfg: ExtractConfig, run: dict, device, emit, compact: bool = True,
) -> dict:
    run_id = run["run_id"]
    slide_ids = cells["slide_id"].unique(maintain_order=True).to_list()
    emit("start", {"slides": len(slide_ids), "cells": cells.height, "run_id": run_id})
    results: list[SlideResult] = []
    t_start = time.perf_counter()
    with make_pool(cfg.readers, cfg.workers) as pool:
        for sid in slide_ids:
            sub = cells.filter(pl.col("slide_id") == sid)
            result = _extract_slide(sid, sub, paths.get(sid), steps, store, cfg, run_id, device, pool, emit, known=paths)
            results.append(result)
            run["slides"][sid] = {k: v for k, v in asdict(result).items() if k != "slide_id"}
            store.record_run(run)
    if compact:
        store.compact(cfg.table)
    written = sum(r.written for r in results)
    _attach_table_labels(store, cells, cfg.table, run_id)

    failed = [r for r in results if r.status == "failed"]
    run["counts"] = {
        "cells_in_table": cells.height, "written": written,
        "already_stored": sum(r.already for r in results),
        "outside_dropped": sum(r.outside_dropped for r in results),
        "slides_done": sum(r.status != "failed" for r in results), "slides_failed": len(failed),
    }  # fmt: skip
    run["status"] = "failed" if failed else "finished"
    run["finished"] = dt.datetime.now(dt.UTC).isoformat()
    store.record_run(run)
    seconds = time.perf_counter() - t_start
    summary = {**run["counts"], "run_id": run_id, "seconds": seconds,
               "cells_per_s": written / seconds if seconds > 0 else 0.0,
               "failed": {r.slide_id: r.reason for r in failed}}  # fmt: skip
    emit("done", summary)
    if failed:
        raise ExtractionFailed(
            f"{len(failed)} slide(s) failed (the other {len(results) - len(failed)} were stored; "
            "fix these and rerun the same command to add them):\n  "
            + "\n  ".join(f"{r.slide_id}: {r.reason}" for r in failed)
        )
    return summary


def _attach_table_labels(store: Store, cells: pl.DataFrame, table: str, run_id: str) -> None:
    """The cells table's labels/splits go to the cells this run stored, and to those of earlier
    runs that ended (killed, crashed) before attaching theirs, each such run adopted once.
    Cells stored before keep what they have: `embed labels` may have changed or removed their
    labels since, and a rerun must not bring the table's back."""
    cols = [c for c in LABEL_COLUMNS if c in cells.columns]
    if not cols:
        return
    with store.writing():  # another writer's labels (or compaction) cannot slip in between
        orphans = _runs_without_labels(store, table, run_id)
        flt = f"{sql_in('run_id', [run_id, *orphans['run_id']])} AND {sql_in('slide_id', cells['slide_id'].unique().to_list())}"
        ours = pl.from_arrow(store.open(table).to_lance().to_table(columns=["slide_id", "cell_id"], filter=flt))
        frame = cells.select(["slide_id", "cell_id", *cols]).join(ours, on=["slide_id", "cell_id"], how="semi")
        labelled = store.labels()
        if labelled is not None:
            frame = frame.join(labelled.select("slide_id", "cell_id"), on=["slide_id", "cell_id"], how="anti")
        if frame.height:
            store.set_labels(frame, source="cells table", table=table, replace=False)
        for row in orphans.iter_rows(named=True):
            store.record_run({**row, "labels_adopted_by": run_id})


def _runs_without_labels(store: Store, table: str, run_id: str) -> pl.DataFrame:
    """Earlier runs into `table` that ended before attaching their cells table's labels (their
    counts are written just after) and whose cells no later run adopted."""
    runs = store.runs()
    if runs.is_empty():
        return pl.DataFrame({"run_id": []}, schema={"run_id": pl.Utf8})
    ended = (pl.col("run_id") != run_id) & (pl.col("table") == table) & (pl.col("status") != "running")
    unlabelled = pl.col("counts").fill_null("{}") == "{}"
    if "labels_adopted_by" in runs.columns:
        unlabelled &= pl.col("labels_adopted_by").is_null()
    return runs.filter(ended & unlabelled)


def _table_mpp(cells: pl.DataFrame) -> float | None:
    """The µm/px a cells table was made with along x (the size `Slide.mpp` gives): the median
    of x_um / x_px over cells away from the left edge (None when none is). Mixing in y refused
    a right table of a slide with non-square pixels (x 0.25, y 0.30 µm/px read as 0.27)."""
    px, um = cells["x_px"].to_numpy(), cells["x_um"].to_numpy()
    far = px > 8
    return float(np.median(um[far] / px[far])) if far.any() else None


def _extract_slide(
    sid: str, cells: pl.DataFrame, path: Path | None, steps: list[VectorStep], store: Store,
    cfg: ExtractConfig, run_id: str, device, pool: Executor, emit, known=(),
) -> SlideResult:
    """`known`: the ids of the slide files given (to name a near miss when `path` is None)."""
    t0 = time.perf_counter()
    stored = store.stored_keys(cfg.table, sid)
    todo = cells.filter(~pl.col("cell_id").is_in(list(stored))) if stored else cells
    result = SlideResult(sid, None if path is None else str(path), "done", already=cells.height - todo.height)
    if todo.height == 0:  # all stored: no file needed (it may have been moved or renamed since)
        result.status = "skipped"
        emit("slide", {"slide_id": sid, "total": cells.height, "todo": 0})
        return result
    if path is None:
        from ..io.slides import slide_id_from_path

        near = {sid.casefold(), slide_id_from_path(sid).casefold()}  # "s1", "S1.svs" for S1
        twins = [k for k in known if k.casefold() in near]
        hint = (f" (a file gives the id {twins[0]!r}: an id is the file's name without its extension, "
                "case-sensitive; rename the file or fix the table)") if twins else ""
        result.status, result.reason = "failed", f"no slide file with this id among the slides given{hint}"
        return result
    try:
        slide = Slide(path, mpp=cfg.mpp)
    except SlideError as exc:
        result.status, result.reason = "failed", str(exc)
        emit("slide_failed", {"slide_id": sid, "reason": str(exc)})
        return result
    with slide:
        table_mpp = _table_mpp(todo)
        if table_mpp is not None and not is_close_mpp(table_mpp, slide.mpp):
            result.status = "failed"
            result.reason = (f"the cells table places its cells at {table_mpp:.4g} µm/px (x_um / x_px), but the slide "
                             f"reads at {slide.mpp:.4g} µm/px ({slide.info.mpp_source}): crops would be cut in the wrong "
                             "place. Make the cells with the slide (`embed cells ... --slides`) or with the --mpp "
                             "given here")  # fmt: skip
            emit("slide_failed", {"slide_id": sid, "reason": result.reason})
            return result
        result.info = {**slide.info.to_dict(), "plans": {s.name: slide.plan(s.crop).to_dict() for s in steps}}
        w, h = slide.dimensions
        x, y = todo["x_px"].to_numpy(), todo["y_px"].to_numpy()
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        if not inside.all():
            bad = todo.filter(~pl.Series(inside))["cell_id"].head(5).to_list()
            result.outside_dropped = int((~inside).sum())
            emit("warning", {"slide_id": sid, "message": f"{result.outside_dropped} centroids outside the slide ({w}x{h} px) skipped, e.g. {bad}"})
            todo = todo.filter(pl.Series(inside))
            x, y = x[inside], y[inside]
        emit("slide", {"slide_id": sid, "total": cells.height, "todo": todo.height})
        pending: list[pa.Table] = []
        n_pending = 0
        try:
            for idx, vectors, outside in _slide_batches(slide, x, y, steps, cfg, pool, device):
                pending.append(_rows(todo, idx, run_id, vectors, outside))
                n_pending += len(idx)
                if n_pending >= cfg.commit_every:
                    _commit(store, cfg.table, pending, result)
                    pending, n_pending = [], 0
                emit("progress", {"slide_id": sid, "n": len(idx)})
            if pending:
                _commit(store, cfg.table, pending, result)
        except SlideError as exc:
            result.status, result.reason = "failed", str(exc)
            emit("slide_failed", {"slide_id": sid, "reason": str(exc)})
    result.seconds = time.perf_counter() - t0
    return result


def _slide_batches(
    slide: Slide, x: np.ndarray, y: np.ndarray, steps: list[VectorStep], cfg: ExtractConfig,
    pool: Executor, device,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(cell indices, vectors per step, outside share per step) for one slide's cells.

    Per-cell steps embed crops; a tiled step (at most one) pools shared tiles one band at a
    time, and the per-cell steps then run on that band's cells, so memory does not grow with
    the number of cells.
    """
    per_cell = [s for s in steps if s.tiling is None]
    tiled = [s for s in steps if s.tiling is not None]
    if len(tiled) > 1:
        raise ValueError("at most one tiled step")
    names = [s.name for s in steps]
    pin = device.type == "cuda"
    if not tiled:
        for idx, crops, outside in _crop_batches(slide, x, y, per_cell, cfg, pool, pin):
            yield idx, {s.name: s.embed(crops[s.name], device) for s in per_cell}, outside
        return
    step = tiled[0]
    context = TiledContext(slide, step.backbone, step.tiling, x, y, pool, precision=step.precision,
                           tiles_per_batch=max(1, cfg.batch_size // 16))
    field = slide.plan(step.crop)
    w, h = slide.dimensions
    # one set of (pinned) crop buffers for all bands: pinned allocations are slow
    ring = _BufferRing({s.name: slide.plan(s.crop, resample=False).out_px for s in per_cell},
                       cfg.batch_size, n=5, pin=pin)
    for chunk in context.chunks():
        pooled = context.vectors(chunk)
        cx, cy = x[chunk], y[chunk]
        for sub, crops, outside in _crop_batches(slide, cx, cy, per_cell, cfg, pool, pin, ring):
            vectors = {s.name: s.embed(crops[s.name], device) for s in per_cell}
            vectors[step.name] = pooled[sub]
            outside[step.name] = field.outside_fraction(cx[sub], cy[sub], w, h)
            yield chunk[sub], {n: vectors[n] for n in names}, {n: outside[n] for n in names}


def _commit(store: Store, table: str, pending: list[pa.Table], result: SlideResult) -> None:
    """One commit of the pending rows; keys another writer stored meanwhile are skipped."""
    rows = pa.concat_tables(pending)
    written = store.append_new(table, rows)
    result.written += written
    result.already += rows.num_rows - written
