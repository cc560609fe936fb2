"""`heads predict` on Ray: one actor per worker, one slide (or a few) per task.

Each actor reads the run once (`load_run`) and, per task, predicts its slides with the same
`predict_frame` as the single-process `predict`, then writes that part: a Parquet part under
OUT/parts/<job>/ (atomic), the slides' GeoJSON, and an upsert into the store's `predictions`
table (keyed by run, slide_id, cell_id, under the store's write lock). Every write replaces
what it writes, so a task retried after its worker died (`max_restarts`, `max_task_retries`)
leaves one row per cell however far the killed attempt got. At the end the driver streams the
parts, in task order, into OUT/predictions.parquet and removes them.

Row order: slides in the order their first cell appears in the store, each slide's cells in
store order. That is `predict`'s order whenever each slide's cells are stored contiguously
(e.g. a store written by one `embed extract`); otherwise the rows are the same, the order not.

The store, the run directory and OUT must be reachable at the same paths from every node.
Ray is optional: `pip install .[ray]`; nothing else in the package imports this module.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from embedstore.errors import UserError
from embedstore.fileio import atomic_path, ensure_dir
from embedstore.locking import exclusive
from embedstore.raycluster import import_ray, start_ray
from embedstore.store import DEFAULT_TABLE, Store, store_location

from . import checkpoint as ckpt
from . import runlock
from .export import write_geojson, write_parquet

Log = Callable[[str], None]
#: test hook: seconds a task sleeps after its writes, before it returns (a window for the
#: kill test to SIGKILL a worker whose task has written everything but not yet reported)
DELAY_ENV = "NUCLASS_PREDICT_TASK_DELAY_S"


class _PredictWorker:
    """Holds the run (heads, safety rule, conformal calibration) and predicts slides per call."""

    def __init__(self, run_dir: str, device: str, threads: int):
        import torch

        from .runs import load_run

        torch.set_num_threads(max(1, threads))
        self.device = device
        self.run = load_run(run_dir, device)

    def info(self) -> dict:
        import platform

        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "pid": os.getpid(),
                "host": platform.node()}  # fmt: skip

    def run_task(self, index: int, slides: list[str], db: str, table: str, out_dir: str, job: str,
                 conformal_level: float, class_conditional: bool, tissues: list[str] | None) -> dict:  # fmt: skip
        """Predict `slides` and write their part, GeoJSON and store rows (each write replaces)."""
        from .runs import predict_frame

        t0 = time.perf_counter()
        frame = predict_frame(self.run.run_dir, db, table=table, slides=slides, device=self.device, tissues=tissues,
                              conformal_level=conformal_level, class_conditional=class_conditional,
                              loaded=self.run)  # fmt: skip
        t1 = time.perf_counter()
        part = _part_path(Path(out_dir), job, index)
        with atomic_path(part) as tmp:
            write_parquet(frame, tmp)
        _write_geojson_atomic(frame, Path(out_dir) / "geojson")
        t2 = time.perf_counter()
        Store(db).write_predictions(frame)
        t3 = time.perf_counter()
        delay = float(os.environ.get(DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        return {"index": index, "slides": slides, "cells": frame.height, "part": str(part),
                "worker": self.info(), "seconds": time.perf_counter() - t0,
                "breakdown": {"predict": t1 - t0, "files": t2 - t1, "store": t3 - t2}}  # fmt: skip


def _part_path(out_dir: Path, job: str, index: int) -> Path:
    return out_dir / "parts" / job / f"part-{index:06d}.parquet"


def _write_geojson_atomic(frame: pl.DataFrame, folder: Path) -> None:
    """`write_geojson` into the shared folder, one worker at a time. Each file is written
    atomically (a worker killed mid-write leaves no truncated GeoJSON), and named against the
    files already there: written apart from it, each task named its slides alone, so "case:A"
    and "case A" (both case_A.geojson) replaced each other's file."""
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / ".geojson.lock"):
        write_geojson(frame, folder)


def _slide_counts(db: str, table: str, slides: Sequence[str] | None) -> pl.DataFrame:
    """(slide_id, cells) of the stored slides, in the order their first cell is stored."""
    store = Store(db)
    keys = pl.from_arrow(store.open(table).to_lance().to_table(columns=["slide_id"]))
    counts = keys.group_by("slide_id", maintain_order=True).len("cells")
    if slides:
        wanted = [str(s) for s in slides]
        missing = sorted(set(wanted) - set(counts["slide_id"]))
        if missing:
            raise UserError(f"no cells of slide(s) {', '.join(missing)} in table {table!r} of {db}")
        counts = counts.filter(pl.col("slide_id").is_in(wanted))
    if counts.height == 0:
        raise UserError(f"table {table!r} of {db} holds no cells to predict")
    return counts


@runlock.reads_run
def predict_ray(
    run_dir: str | Path,
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    out_dir: str | Path | None = None,
    slides: Sequence[str] | None = None,
    device: str = "cpu",
    conformal_level: float = 0.9,
    class_conditional: bool = False,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0,
    cpus_per_worker: int = 1,
    slides_per_task: int = 1,
    max_retries: int = 3,
    poll_s: float = 0.5,
    log: Log = print,
    on_event: Callable[[str, dict], None] | None = None,
) -> dict:
    """`heads.runs.predict` on `workers` Ray actors (local Ray, or the cluster at `address`).

    Writes the same outputs (OUT/predictions.parquet, OUT/geojson/, the store's `predictions`
    table). Events: `ray_workers` (each worker's info), `start` (slides, cells), `ray_task`
    (slides and actor id, as a task is handed out), `progress` (n cells, as a task finishes)
    and `done` (the summary). Returns the summary: cells, slides, seconds, cells_per_s,
    startup_seconds, task_seconds, workers, slides_by_worker (actor id -> slide ids), out.
    """
    ray = import_ray()
    emit = on_event or (lambda kind, data: None)
    if workers < 1:
        raise UserError(f"--ray-workers must be a whole number >= 1, not {workers!r}")
    if slides_per_task < 1:
        raise UserError(f"slides_per_task must be >= 1, not {slides_per_task!r}")
    from .runs import (
        PREDICT_LOCK,
        _prune_geojson,
        check_slides_stored,
        predictions_dir,
        skipped,
        unknown_tissues,
    )
    from .train import trained_tissues

    run_dir = Path(run_dir).absolute()
    tissues = trained_tissues(ckpt.read_info(run_dir, "local"))  # no run: fail before anything starts
    db = store_location(db)
    check_slides_stored(db, table, slides)
    unknown = unknown_tissues(db, table, slides, tissues)  # as `predict`: what cannot be predicted
    out = Path(out_dir) if out_dir else predictions_dir(run_dir, db)
    out = ensure_dir(out, "the predictions").absolute()
    # as `predict`: one job at a time per folder
    with exclusive(out / PREDICT_LOCK, on_wait=lambda: log(f"waiting for another `heads predict` writing into {out}...")):
        counts = _slide_counts(db, table, slides)
        if unknown.height:  # slides of unknown tissue only: no task; mixed slides: their known cells
            left_out = unknown.group_by("slide_id").agg(pl.col("cells").sum())
            whole = counts.join(left_out, on="slide_id", how="inner").filter(pl.col("cells") == pl.col("cells_right"))
            counts = counts.filter(~pl.col("slide_id").is_in(whole["slide_id"].to_list()))
        earlier = pl.read_parquet(out / "predictions.parquet") if slides and (out / "predictions.parquet").exists() else None
        ids = counts["slide_id"].to_list()
        tasks = [ids[i : i + slides_per_task] for i in range(0, len(ids), slides_per_task)]
        per_slide = dict(counts.iter_rows())
        started = start_ray(ray, address, workers)
        try:
            t0 = time.perf_counter()
            actor = ray.remote(_PredictWorker).options(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=max_retries, max_task_retries=max_retries)  # fmt: skip
            handles = [actor.remote(str(run_dir), device, cpus_per_worker) for _ in range(workers)]
            infos = ray.get([h.info.remote() for h in handles])
            startup = time.perf_counter() - t0
            emit("ray_workers", {"workers": infos})
            n_cells = int(counts["cells"].sum())
            emit("start", {"slides": len(ids), "cells": n_cells, "run_id": f"ray:{workers} workers"})
            job = dt.datetime.now(dt.UTC).strftime("ray-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
            args = (db, table, str(out), job, conformal_level, class_conditional, tissues if unknown.height else None)
            named = list(zip(handles, (i["actor_id"] for i in infos), strict=True))
            results = _schedule(ray, named, tasks, args, per_slide, emit, poll_s)
            cells = _merge_parts(out, job, len(tasks), earlier, slides, log)
            kept = pl.read_parquet(out / "predictions.parquet", columns=["slide_id"])["slide_id"].unique()
            _prune_geojson(out, kept.to_list(), log)
            seconds = time.perf_counter() - t0
        finally:
            if started:
                ray.shutdown()
    by_worker: dict[str, list[str]] = {}
    for r in results:
        by_worker.setdefault(r["worker"]["actor_id"], []).extend(r["slides"])
    summary = {
        "cells": cells, "slides": len(ids), "tasks": len(tasks), "seconds": seconds, "startup_seconds": startup,
        "cells_per_s": cells / seconds if seconds > 0 else 0.0,
        "task_seconds": sum(r["seconds"] for r in results),
        "task_breakdown": {k: sum(r["breakdown"][k] for r in results) for k in ("predict", "files", "store")},
        "workers": infos, "slides_by_worker": by_worker,
        "run": run_dir.name, "out": str(out / "predictions.parquet"), "job": job,
    }  # fmt: skip
    emit("done", summary)
    log(f"{cells} predictions on {workers} Ray workers -> store table `predictions`, {summary['out']}, "
        f"{out / 'geojson'}/")  # fmt: skip
    if unknown.height:
        raise skipped(unknown, tissues, ids, cells, None)
    return summary


def _schedule(ray, workers, tasks, args, per_slide, emit, poll_s) -> list[dict]:
    """Hand each idle worker the next task; a finished task advances the bar by its cells."""
    names = dict(workers)
    todo, idle = list(enumerate(tasks)), list(names)
    running: dict = {}  # object ref -> worker
    results: list[dict] = []
    while todo or running:
        while idle and todo:
            w, (index, slides) = idle.pop(0), todo.pop(0)
            running[w.run_task.remote(index, slides, *args)] = w
            emit("ray_task", {"slides": slides, "index": index, "actor_id": names[w]})
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for ref in ready:
            w = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the task raised: stop with its message
                raise (exc.cause if isinstance(exc.cause, UserError) else exc) from None
            except ray.exceptions.RayError as exc:  # the actor died more often than max_retries
                raise UserError(f"a Ray worker died for good ({type(exc).__name__}); the parts written "
                                "so far are kept: rerun to finish") from exc  # fmt: skip
            results.append(result)
            idle.append(w)
            n = sum(per_slide[s] for s in result["slides"])
            emit("progress", {"slide_id": ",".join(result["slides"]), "n": n})
    return sorted(results, key=lambda r: r["index"])


def _merge_parts(out: Path, job: str, n_tasks: int, earlier: pl.DataFrame | None = None,
                 slides: Sequence[str] | None = None, log: Log = print) -> int:  # fmt: skip
    """Stream the parts, in task order, into OUT/predictions.parquet (one file open at a time,
    written atomically), then remove them; returns the rows predicted. With `slides`, the rows
    of this run's other slides in the file before (`earlier`) are kept, as `predict` keeps them."""
    import pyarrow.parquet as pq

    from .runs import _with_earlier_slides

    rows, writer = 0, None
    with atomic_path(out / "predictions.parquet") as tmp:
        try:
            if earlier is not None and n_tasks:
                first = pl.read_parquet(_part_path(out, job, 0))
                kept = _with_earlier_slides(first, earlier, slides, log)
                others = kept.filter(~pl.col("slide_id").is_in(list(slides))).select(first.columns).to_arrow()
                if others.num_rows:
                    writer = pq.ParquetWriter(tmp, pq.read_schema(_part_path(out, job, 0)), compression="zstd")
                    writer.write_table(others.cast(writer.schema))
            for i in range(n_tasks):
                part = pq.read_table(_part_path(out, job, i))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, part.schema, compression="zstd")
                writer.write_table(part.cast(writer.schema))
                rows += part.num_rows
        finally:
            if writer is not None:
                writer.close()
    shutil.rmtree(out / "parts" / job, ignore_errors=True)
    try:
        (out / "parts").rmdir()  # only when no other job's parts are left there
    except OSError:
        pass
    return rows
