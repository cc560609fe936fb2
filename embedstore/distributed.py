"""The extraction pass on Ray: one actor per worker, one slide per task.

Each actor builds the backbones once and runs the ordinary `extract` on one slide per task,
so every task is its own resumable run in the runs table. Ray restarts an actor killed mid-task
(`max_restarts`) and retries its slide (`max_task_retries`); the retry skips the cells the
killed attempt committed, and the store's locked `append_new` drops keys another writer stored
meanwhile, so a cell is stored exactly once however often a slide is retried.

Slides are the unit of work: one huge slide is not split into spatial shards (yet).
The slides and the store must be reachable at the same paths from every node (shared disk).
Ray is optional: `pip install .[ray]`; nothing else in the package imports this module.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import polars as pl

from .cells import read_table, validate_cells
from .errors import UserError
from .extract import ExtractConfig, ExtractionFailed, extract, slide_paths_by_id
from .store import Store, sql_in

#: how often the driver polls the store's stored-cell count for the progress bar
POLL_S = 0.5


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise UserError("--engine ray needs Ray: pip install .[ray]  (or pip install 'ray>=2.9')") from exc
    return ray


class _SlideWorker:
    """Holds the backbones (built once per actor process) and extracts one slide per call."""

    def __init__(self, cfg: ExtractConfig, threads: int):
        import torch

        from .extract import build_steps, resolve_device

        torch.set_num_threads(max(1, threads))
        self.cfg = cfg
        self.steps = build_steps(cfg, resolve_device(cfg.device))

    def info(self) -> dict:
        """Who this worker is: recorded with every run it writes."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "pid": os.getpid(),
                "host": platform.node()}  # fmt: skip

    def ping(self) -> float:
        """A no-op round trip (scheduling overhead in bench/ray_extract.py)."""
        return time.perf_counter()

    def run_slide(self, slide_id: str, slides, cells: pl.DataFrame, db: str, job: str) -> dict:
        """`extract` on one slide's cells; the run row then names this worker."""
        events: list[tuple[str, dict]] = []
        worker = self.info()
        t0 = time.perf_counter()
        try:
            summary = extract(slides, cells, db, self.cfg, steps=self.steps,
                              on_event=lambda kind, data: events.append((kind, data)))  # fmt: skip
            failed = {}
        except ExtractionFailed as exc:
            summary, failed = {}, {slide_id: str(exc)}
        run_id = summary.get("run_id") or next((d["run_id"] for k, d in events if k == "start"), None)
        if run_id:
            _tag_run(Store(db), run_id, {"engine": "ray", "ray_job": job, "worker": worker})
        keep = ("warning", "slide_failed")
        return {"slide_id": slide_id, "run_id": run_id, "worker": worker, "failed": failed,
                "outside_dropped": summary.get("outside_dropped", 0),
                "seconds": time.perf_counter() - t0, "events": [e for e in events if e[0] in keep]}  # fmt: skip


def _tag_run(store: Store, run_id: str, tags: dict) -> None:
    """Add `engine`, `ray_job` (shared by one `extract_ray` call's runs) and `worker` (node id,
    actor id, pid, host) to a finished run's row.

    `record_run` writes whole rows, so the stored row is read back and written with the extra
    fields (new nullable columns: older runs read null there).
    """
    rows = pl.from_arrow(store.db.open_table("runs").to_arrow()).filter(pl.col("run_id") == run_id)
    if rows.height:
        store.record_run({**rows.row(0, named=True), **tags})


def _start(ray, address: str | None, workers: int) -> bool:
    """Start a local Ray (or join `address`); True when this call started it."""
    if ray.is_initialized():
        return False
    with warnings.catch_warnings():  # lance/lancedb warn at fork; Ray's fork is followed by exec
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", "lance is not fork-safe")
        _init(ray, address, workers)
    return True


def _init(ray, address: str | None, workers: int) -> None:
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # GPUs are detected by Ray; every worker gets a CPU slot even on a small machine
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)


def _stored(store: Store, table: str, slide_ids: list[str]) -> int | None:
    """Rows stored for these slides (None while the table is missing or being compacted)."""
    try:
        return store.open(table).count_rows(sql_in("slide_id", slide_ids)) if store.has(table) else 0
    except Exception:  # noqa: BLE001 - a compaction removed the files of the version we read
        return None


def _stored_of(store: Store, table: str, cells: pl.DataFrame) -> int:
    """How many of these cells are stored (exact, by key)."""
    if not store.has(table):
        return 0
    return cells.select("slide_id", "cell_id").join(store.keys_frame(table), on=["slide_id", "cell_id"], how="semi").height


def extract_ray(
    slides,
    cells: pl.DataFrame | str | Path,
    db: str | Path,
    cfg: ExtractConfig,
    *,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0,
    cpus_per_worker: int = 1,
    max_retries: int = 3,
    poll_s: float = POLL_S,
    on_event: Callable[[str, dict], None] | None = None,
) -> dict:
    """Extract on `workers` Ray actors (local Ray, or the cluster at `address`).

    Events use `extract`'s vocabulary (start, slide, progress, warning, slide_failed, done), as
    one bar over all slides, plus `ray_workers` (each worker's info, before the first task) and
    `ray_task` (slide id and actor id, as a slide is handed to a worker).
    Returns a summary like `extract`'s, with `run_ids` and `slides_by_worker`.
    """
    ray = _ray()
    emit = on_event or (lambda kind, data: None)
    cfg.validate()
    if workers < 1:
        raise UserError(f"--ray-workers must be a whole number >= 1, not {workers!r}")
    cells = validate_cells(cells if isinstance(cells, pl.DataFrame) else read_table(cells))
    paths = slide_paths_by_id(slides)
    db = str(Path(db).absolute()) if "://" not in str(db) else str(db)
    started = _start(ray, address, workers)
    try:
        return _drive(ray, slides, cells, paths, db, cfg, workers, gpus_per_worker, cpus_per_worker, max_retries, emit, poll_s)
    finally:
        if started:
            ray.shutdown()


def _make_workers(ray, cfg: ExtractConfig, n: int, gpus: float, cpus: int, max_retries: int) -> list:
    actor = ray.remote(_SlideWorker).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=max_retries, max_task_retries=max_retries)  # fmt: skip
    return [actor.remote(cfg, cpus) for _ in range(n)]


def _drive(ray, slides, cells, paths, db, cfg, n_workers, gpus, cpus, max_retries, emit, poll_s) -> dict:
    slide_ids = cells["slide_id"].unique(maintain_order=True).to_list()
    store = Store(db, create=True)
    t0 = time.perf_counter()
    before = _stored_of(store, cfg.table, cells)
    workers = _make_workers(ray, cfg, n_workers, gpus, cpus, max_retries)
    infos = ray.get([w.info.remote() for w in workers])
    startup = time.perf_counter() - t0  # actors up, backbones built
    emit("ray_workers", {"workers": infos})
    emit("start", {"slides": len(slide_ids), "cells": cells.height, "run_id": f"ray:{len(workers)} workers"})
    emit("slide", {"slide_id": f"{len(slide_ids)} slides on {len(workers)} Ray workers", "total": cells.height,
                   "todo": cells.height - before})  # fmt: skip
    job = dt.datetime.now(dt.UTC).strftime("ray-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    named = list(zip(workers, (i["actor_id"] for i in infos), strict=True))
    results = _schedule(ray, named, slide_ids, slides, cells, paths, db, cfg.table, store, emit, poll_s, job)
    after = _stored_of(store, cfg.table, cells)
    seconds = time.perf_counter() - t0
    failed = {sid: r["failed"][sid] for sid, r in results.items() if r.get("failed")}
    by_worker: dict[str, list[str]] = {}
    for sid, r in results.items():
        by_worker.setdefault(r["worker"]["actor_id"], []).append(sid)
    written = after - before
    summary = {
        "cells_in_table": cells.height, "written": written, "already_stored": before,
        "slides_done": len(slide_ids) - len(failed), "slides_failed": len(failed),
        "run_id": job,  # the runs' `ray_job`; each slide is its own run (run_ids)
        "run_ids": [r["run_id"] for r in results.values() if r.get("run_id")],
        "seconds": seconds, "startup_seconds": startup, "cells_per_s": written / seconds if seconds > 0 else 0.0,
        "task_seconds": sum(r.get("seconds", 0.0) for r in results.values()),
        "workers": infos, "slides_by_worker": by_worker, "failed": failed,
    }  # fmt: skip
    emit("done", summary)
    if failed:
        raise ExtractionFailed(f"{len(failed)} slide(s) failed (the others were stored; fix these and rerun):\n  "
                               + "\n  ".join(f"{s}: {r}" for s, r in failed.items()))  # fmt: skip
    return summary


def _schedule(ray, workers, slide_ids, slides, cells, paths, db, table, store, emit, poll_s, job) -> dict[str, dict]:
    """Hand each idle worker the next slide; meanwhile feed `progress` from the store's count."""
    names = dict(workers)  # handle -> actor id
    todo, idle = list(slide_ids), list(names)
    running: dict = {}  # object ref -> (worker, slide id)
    results: dict[str, dict] = {}
    shown = _stored(store, table, slide_ids) or 0
    while todo or running:
        while idle and todo:
            w, sid = idle.pop(0), todo.pop(0)
            sub = cells.filter(pl.col("slide_id") == sid)
            target = [str(Path(paths[sid]).absolute())] if sid in paths else slides
            running[w.run_slide.remote(sid, target, sub, db, job)] = (w, sid)
            emit("ray_task", {"slide_id": sid, "actor_id": names[w]})
        if not running:  # every worker is dead: the rest cannot run
            for sid in todo:
                results[sid] = _lost(sid, "no live Ray worker left", emit)
            break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for ref in ready:
            w, sid = running.pop(ref)
            results[sid], alive = _result(ray, ref, sid, emit)
            if alive:
                idle.append(w)
        shown = _progress(store, table, slide_ids, shown, emit)
    _progress(store, table, slide_ids, shown, emit)
    return results


def _progress(store: Store, table: str, slide_ids: list[str], shown: int, emit) -> int:
    now = _stored(store, table, slide_ids)
    if now is not None and now > shown:
        emit("progress", {"slide_id": "ray", "n": now - shown})
        return now
    return shown


def _lost(sid: str, reason: str, emit) -> dict:
    emit("slide_failed", {"slide_id": sid, "reason": reason})
    return {"slide_id": sid, "run_id": None, "worker": {"actor_id": "lost"}, "failed": {sid: reason}}


def _result(ray, ref, sid: str, emit) -> tuple[dict, bool]:
    """(a task's result, whether its worker is still alive). A slide whose worker died more
    often than `max_retries` counts as failed; a UserError in a task (e.g. the table holds
    another configuration) stops the job with its message."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        return _lost(sid, f"{type(exc.cause).__name__}: {str(exc.cause)[:300]}", emit), True
    except ray.exceptions.RayError as exc:  # the actor died for good
        return _lost(sid, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", emit), False
    for kind, data in result["events"]:
        emit(kind, data)
    if result["outside_dropped"]:  # never stored: the bar counts them done, as `extract` does
        emit("progress", {"slide_id": sid, "n": result["outside_dropped"]})
    return result, True
