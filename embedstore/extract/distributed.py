"""The extraction pass on Ray: one actor per worker, one slide per task.

Each actor builds the backbones once and runs the ordinary `extract` on one task at a time: a
slide, or a spatial shard of a slide with more than `shard_cells` cells (horizontal bands of
equal cell counts, so one huge slide keeps several workers busy). Every task is its own
resumable run in the runs table, tagged from its first record with the job and the worker.
Ray restarts an actor killed mid-task (`max_restarts`) and retries its task
(`max_task_retries`); the retry skips the cells the killed attempt committed, and the store's
keyed commit (`Store.append_new`: locked on a local disk, a primary-key merge-insert on a URI
store) drops keys another writer stored meanwhile, so a cell is stored exactly once however
often a task is retried. The driver compacts the table once, after the last task.

The slides must be reachable at the same paths from every node (shared disk); the store too, or
be an object-store URI. Ray is optional: `pip install .[ray]`.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import UserError
from ..io.cells import read_table, validate_cells
from ..raycluster import import_ray, start_ray
from ..store import Store, sql_in, store_location
from .pipeline import ExtractConfig, ExtractionFailed, extract, slide_paths_by_id

#: how often the driver polls the store's stored-cell count for the progress bar
POLL_S = 0.5
#: a slide with more cells than this is split into spatial shards, one task each
SHARD_CELLS = 200_000


class _SlideWorker:
    """Holds the backbones (built once per actor process) and extracts one slide per call."""

    def __init__(self, cfg: ExtractConfig, threads: int):
        import torch

        from .pipeline import build_steps, resolve_device

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

    def run_task(self, task: str, slides, cells: pl.DataFrame, db: str, tags: dict) -> dict:
        """`extract` on one task's cells (a slide or a shard); its run row names this worker."""
        events: list[tuple[str, dict]] = []
        worker = self.info()
        t0 = time.perf_counter()
        try:
            summary = extract(slides, cells, db, self.cfg, steps=self.steps, compact=False,
                              run_tags={**tags, "worker": worker},
                              on_event=lambda kind, data: events.append((kind, data)))  # fmt: skip
            failed = {}
        except ExtractionFailed as exc:
            summary, failed = {}, {task: str(exc)}
        run_id = summary.get("run_id") or next((d["run_id"] for k, d in events if k == "start"), None)
        keep = ("warning", "slide_failed")
        return {"task": task, "run_id": run_id, "worker": worker, "failed": failed,
                "outside_dropped": summary.get("outside_dropped", 0),
                "seconds": time.perf_counter() - t0, "events": [e for e in events if e[0] in keep]}  # fmt: skip


def spatial_shards(cells: pl.DataFrame, max_cells: int) -> list[pl.DataFrame]:
    """One slide's cells in horizontal bands of (nearly) equal counts, each <= `max_cells`.

    Bands keep each shard's reads local on the slide (and, in tiled context mode, recompute
    only the tile rows that straddle a cut).
    """
    k = -(-cells.height // max(1, max_cells))
    if k <= 1:
        return [cells]
    ordered = cells.sort("y_px", "x_px")
    edges = np.linspace(0, cells.height, k + 1).round().astype(int)
    return [ordered[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


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
    shard_cells: int = SHARD_CELLS,
    max_retries: int = 3,
    poll_s: float = POLL_S,
    on_event: Callable[[str, dict], None] | None = None,
) -> dict:
    """Extract on `workers` Ray actors (local Ray, or the cluster at `address`).

    Events use `extract`'s vocabulary (start, slide, progress, warning, slide_failed, done), as
    one bar over all slides, plus `ray_workers` (each worker's info, before the first task) and
    `ray_task` (task label, slide id and actor id, as a task is handed to a worker).
    Returns a summary like `extract`'s, with `run_ids`, `tasks` and `tasks_by_worker`.
    """
    ray = import_ray()
    emit = on_event or (lambda kind, data: None)
    cfg.validate()
    if workers < 1:
        raise UserError(f"--ray-workers must be a whole number >= 1, not {workers!r}")
    if shard_cells < 1:
        raise UserError(f"--shard-cells must be a whole number >= 1, not {shard_cells!r}")
    cells = validate_cells(cells if isinstance(cells, pl.DataFrame) else read_table(cells))
    paths = slide_paths_by_id(slides)
    db = store_location(db)
    tasks = _tasks(cells, paths, slides, shard_cells)
    started = start_ray(ray, address, workers)
    try:
        pool = _make_workers(ray, cfg, workers, gpus_per_worker, cpus_per_worker, max_retries)
        return _Driver(ray, db, cfg, cells, emit, poll_s).run(pool, tasks)
    finally:
        if started:
            ray.shutdown()


@dataclass
class _Task:
    label: str  # the slide id, or "slide#i/k" for a shard
    slide_id: str
    cells: pl.DataFrame
    slides: object  # what the worker opens: the slide's own path when known


def _tasks(cells: pl.DataFrame, paths: dict, slides, shard_cells: int) -> list[_Task]:
    out = []
    for sid in cells["slide_id"].unique(maintain_order=True).to_list():
        target = [str(Path(paths[sid]).absolute())] if sid in paths else slides
        shards = spatial_shards(cells.filter(pl.col("slide_id") == sid), shard_cells)
        for i, sub in enumerate(shards):
            label = sid if len(shards) == 1 else f"{sid}#{i + 1}/{len(shards)}"
            out.append(_Task(label, sid, sub, target))
    return out


def _make_workers(ray, cfg: ExtractConfig, n: int, gpus: float, cpus: int, max_retries: int) -> list:
    actor = ray.remote(_SlideWorker).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=max_retries, max_task_retries=max_retries)  # fmt: skip
    return [actor.remote(cfg, cpus) for _ in range(n)]


class _Driver:
    """Hands each idle worker the next task and feeds one progress bar from the store."""

    def __init__(self, ray, db: str, cfg: ExtractConfig, cells: pl.DataFrame, emit, poll_s: float):
        self.ray, self.db, self.cfg, self.cells, self.emit, self.poll_s = ray, db, cfg, cells, emit, poll_s
        self.store = Store(db, create=True)
        self.slide_ids = cells["slide_id"].unique(maintain_order=True).to_list()
        self.shown = 0
        self.job = dt.datetime.now(dt.UTC).strftime("ray-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]

    def run(self, workers: list, tasks: list[_Task]) -> dict:
        ray, cfg, cells, emit = self.ray, self.cfg, self.cells, self.emit
        t0 = time.perf_counter()
        before = _stored_of(self.store, cfg.table, cells)
        infos = ray.get([w.info.remote() for w in workers])
        startup = time.perf_counter() - t0  # actors up, backbones built
        emit("ray_workers", {"workers": infos})
        emit("start", {"slides": len(self.slide_ids), "cells": cells.height, "run_id": f"ray:{len(workers)} workers"})
        emit("slide", {"slide_id": f"{len(self.slide_ids)} slides in {len(tasks)} tasks on {len(workers)} Ray workers",
                       "total": cells.height, "todo": cells.height - before})  # fmt: skip
        self.shown = _stored(self.store, cfg.table, self.slide_ids) or 0
        results = self._schedule(dict(zip(workers, (i["actor_id"] for i in infos), strict=True)), tasks)
        if self.store.has(cfg.table):
            self.store.compact(cfg.table)  # once, after every task (tasks skip their own)
        after = _stored_of(self.store, cfg.table, cells)
        seconds = time.perf_counter() - t0
        failed = {label: r["failed"][label] for label, r in results.items() if r.get("failed")}
        by_worker: dict[str, list[str]] = {}
        for label, r in results.items():
            by_worker.setdefault(r["worker"]["actor_id"], []).append(label)
        written = after - before
        summary = {
            "cells_in_table": cells.height, "written": written, "already_stored": before,
            "slides_done": len({t.slide_id for t in tasks} - {results[f]["slide_id"] for f in failed}),
            "slides_failed": len({results[f]["slide_id"] for f in failed}), "tasks": len(tasks),
            "run_id": self.job,  # the runs' `ray_job`; each task is its own run (run_ids)
            "run_ids": [r["run_id"] for r in results.values() if r.get("run_id")],
            "seconds": seconds, "startup_seconds": startup, "cells_per_s": written / seconds if seconds > 0 else 0.0,
            "task_seconds": sum(r.get("seconds", 0.0) for r in results.values()),
            "workers": infos, "tasks_by_worker": by_worker, "failed": failed,
        }  # fmt: skip
        emit("done", summary)
        if failed:
            raise ExtractionFailed(f"{len(failed)} task(s) failed (the others were stored; fix these and rerun):\n  "
                                   + "\n  ".join(f"{s}: {r}" for s, r in failed.items()))  # fmt: skip
        return summary

    def _schedule(self, names: dict, tasks: list[_Task]) -> dict[str, dict]:
        """Hand each idle worker the next task; meanwhile feed `progress` from the store's count."""
        todo, idle = list(tasks), list(names)
        running: dict = {}  # object ref -> (worker, task)
        results: dict[str, dict] = {}
        tags = {"engine": "ray", "ray_job": self.job}
        while todo or running:
            while idle and todo:
                w, t = idle.pop(0), todo.pop(0)
                running[w.run_task.remote(t.label, t.slides, t.cells, self.db, {**tags, "ray_task": t.label})] = (w, t)
                self.emit("ray_task", {"task": t.label, "slide_id": t.slide_id, "actor_id": names[w]})
            if not running:  # every worker is dead: the rest cannot run
                for t in todo:
                    results[t.label] = self._lost(t, "no live Ray worker left")
                break
            ready, _ = self.ray.wait(list(running), num_returns=1, timeout=self.poll_s)
            for ref in ready:
                w, t = running.pop(ref)
                results[t.label], alive = self._result(ref, t)
                if alive:
                    idle.append(w)
            self._progress()
        self._progress()
        return results

    def _progress(self) -> None:
        now = _stored(self.store, self.cfg.table, self.slide_ids)
        if now is not None and now > self.shown:
            self.emit("progress", {"slide_id": "ray", "n": now - self.shown})
            self.shown = now

    def _lost(self, t: _Task, reason: str) -> dict:
        self.emit("slide_failed", {"slide_id": t.label, "reason": reason})
        return {"slide_id": t.slide_id, "run_id": None, "worker": {"actor_id": "lost"}, "failed": {t.label: reason}}

    def _result(self, ref, t: _Task) -> tuple[dict, bool]:
        """(a task's result, whether its worker is still alive). A task whose worker died more
        often than `max_retries` counts as failed; a UserError in a task (e.g. the table holds
        another configuration) stops the job with its message."""
        ray = self.ray
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            return self._lost(t, f"{type(exc.cause).__name__}: {str(exc.cause)[:300]}"), True
        except ray.exceptions.RayError as exc:  # the actor died for good
            return self._lost(t, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"), False
        for kind, data in result["events"]:
            self.emit(kind, data)
        if result["outside_dropped"]:  # never stored: the bar counts them done, as `extract` does
            self.emit("progress", {"slide_id": t.label, "n": result["outside_dropped"]})
        return {**result, "slide_id": t.slide_id}, True
