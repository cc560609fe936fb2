"""The FAISS index of a table built from the store without holding its vectors: on Ray
(`embed index --engine ray`, rows added in shards) or in this process (`build_index_streamed`,
what `embed index` runs when the vectors would crowd memory: the same driver, rows added batch
by batch as they are read).

The driver reads only the rows it needs from the store (the training sample and the tuning
queries, by row position with Lance `take`), trains exactly as `CellIndex.build` does (same
seed, hence same sample and same quantizer) and puts the trained, empty index into the object
store once. Each task copies it, adds one contiguous range of rows [s, e) with ids s..e-1,
reading the vectors straight from the table (a scan with offset and limit, at the version the
driver read), and returns its index with the tuning queries' exact nearest neighbours among
its rows. The driver merges the shards in row order, so every inverted list holds its rows in
the order a sequential add gives; it then tunes nprobe with the store as re-rank source and
saves as `build_index` does, so `open_index` uses the index without rebuilding it.

Identity with the single-process build: same search results (tests/test_ray_index.py), and
the same bytes when the float arithmetic is the same. BLAS (PCA, coarse assignment) rounds a
row differently depending on the batch it comes in and on the thread count, and a last-bit
difference can move an SQ8 code by one step (or a row sitting on the border of two lists to
the other one). So a task adds its rows in the sequential build's batches (the global grid of
`CHUNK_ROWS`, cut at the shard's ends: no cut when `shard_rows` is a multiple of it) on
`TASK_CPUS` threads: with the single-process build also on that many threads the merged index
is byte-identical (tested); otherwise a few codes in a million differ (bench/ray_index.py).

A flat index is built the same way (flat shards are appended in row order).

Memory: the driver holds the table's cell metadata (for rows.parquet, as `build_index`), the
training sample and the merged index (~264 bytes/row for IVF), plus at most `2 * workers`
finished shards waiting for their turn to merge; a task holds one batch of vectors and its
shard's index. The store must be readable at the same path from every node (shared disk), as
for `extract --engine ray`. Ray is optional (`pip install .[ray]`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl

from .. import faults
from ..errors import UserError
from ..raycluster import import_ray, start_ray
from ..store import DEFAULT_TABLE, Store, StoreError, store_location
from . import index as search
from .explore import StoreSource, load_vectors, save_index
from .index import (
    CHUNK_ROWS,
    CellIndex,
    IVFPlan,
    TuneTruth,
    _prepare,
    _resolve_gpu,
    add_rows,
    empty_flat,
    finish_ivf,
    merge_rows,
    resolve_kind,
    train_ivf,
)

METRIC = "cosine"  # what build_index builds
SHARD_ROWS = 32 * CHUNK_ROWS  # 1,048,576 rows a task: ~280 MB of SQ8 codes and ids
MAX_RETRIES = 3  # a task whose worker dies is run again, up to this many times
TASK_CPUS = 1  # CPUs (and FAISS/BLAS threads) per task
Progress = Callable[[int, int], None]


def build_index_ray(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    kind: str = "auto",
    root: str | Path | None = None,
    address: str | None = None,
    workers: int = 2,
    shard_rows: int = SHARD_ROWS,
    use_gpu: bool | str = "auto",
    seed: int = 0,
    nlist: int | None = None,
    target_recall: float = 0.95,
    tune_queries: int = 500,
    progress: Progress | None = None,
) -> tuple[CellIndex, pl.DataFrame]:
    """Build and save the index of one table's vectors on Ray; returns (index, cell metadata).

    Same result and files as `explore.build_index` (whose defaults the keyword arguments after
    `shard_rows` mirror). `workers`: shards added at a time (local Ray started with at least
    that many CPUs, or the cluster at `address`); `progress(done_rows, n_rows)` as shards merge.
    """
    ray = import_ray()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--ray-workers must be a whole number >= 1, not {workers!r}")
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise UserError(f"shard_rows must be a whole number >= 1, not {shard_rows!r}")

    def add(job: _Job, empty: faiss.Index, tq, truth: TuneTruth, meta, phases: _Phases) -> faiss.Index:
        started = start_ray(ray, address, workers)
        try:
            phases("ray_start")
            return _add_shards(ray, job, empty, tq, truth, workers, progress)
        finally:
            if started:
                ray.shutdown()

    return _build_from_store(db, table, vector, kind, root, use_gpu, seed, nlist, target_recall, tune_queries,
                             progress, add, {"engine": "ray", "workers": workers, "shard_rows": shard_rows})  # fmt: skip


def build_index_streamed(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    kind: str = "auto",
    root: str | Path | None = None,
    use_gpu: bool | str = "auto",
    seed: int = 0,
    nlist: int | None = None,
    target_recall: float = 0.95,
    tune_queries: int = 500,
    progress: Progress | None = None,
) -> tuple[CellIndex, pl.DataFrame]:
    """`explore.build_index` in bounded memory (`embed index` past `vectors_fit`): the driver
    of `build_index_ray`, with the rows added in this process in the sequential build's batches,
    each read from the store as it is added, so the table's vectors are never all in memory
    (61 GB as float32 at 10M x 1536). The same index as `explore.build_index` (same sample, same
    batches); returns (index, cell metadata)."""

    def add(job: _Job, empty: faiss.Index, tq, truth: TuneTruth, meta, phases: _Phases) -> faiss.Index:
        from .explore import check_searchable

        source = StoreSource(Store(job.db), job.table, job.vector, version=job.version)
        for a, b in _batches(0, job.n, job.chunk_rows):
            block = source.read(a, b)
            check_searchable(meta[a:b], block, job.vector)  # names the cells, where _prepare names rows
            add_rows(empty, _prepare(block, METRIC, "vectors", a), a, truth)
            if progress is not None:
                progress(b, job.n)
        return empty

    return _build_from_store(db, table, vector, kind, root, use_gpu, seed, nlist, target_recall, tune_queries,
                             progress, add, {"engine": "local, streamed"})  # fmt: skip


def build_index_local(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    vector: str = "local",
    kind: str = "auto",
    root: str | Path | None = None,
    progress: Progress | None = None,
    notify: Callable[[str], None] = lambda msg: None,
) -> tuple[CellIndex, pl.DataFrame]:
    """`embed index` in this process: the in-memory build while the vectors fit (`vectors_fit`),
    else `build_index_streamed` (the same index)."""
    from .explore import build_index, check_vector

    try:
        source = StoreSource(Store(db), table, check_vector(vector))
        n, dim = len(source), source.dim
    except (StoreError, KeyError, ValueError):  # no such table or vector: build_index says so
        n = dim = 0
    if vectors_fit(n, dim):
        index, meta, _ = build_index(db, table=table, vector=vector, kind=kind, root=root, progress=progress)
        return index, meta
    notify(f"{n} x {dim} vectors ({n * dim * 4 / 1e9:.1f} GB as float32) would crowd this machine's memory: "
           "built batch by batch from the store")  # fmt: skip
    return build_index_streamed(db, table=table, vector=vector, kind=kind, root=root, progress=progress)


def vectors_fit(n: int, dim: int, share: float = 0.25) -> bool:
    """Whether `n` x `dim` float32 vectors (what the in-memory build loads) take under `share`
    of the memory available now: then `explore.build_index` is faster (about 1.4x at 300k x
    1536, no store reads while tuning); otherwise `build_index_streamed` keeps memory bounded."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: free pages
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return n * dim * 4 < share * avail


def _build_from_store(db, table, vector, kind, root, use_gpu, seed, nlist, target_recall, tune_queries, progress,
                      add, engine: dict) -> tuple[CellIndex, pl.DataFrame]:  # fmt: skip
    """The driver both engines share: read the sample, train as `CellIndex.build` does, have
    `add` put every row in, tune against the store, save as `build_index` does."""
    if not 0 < target_recall <= 1:
        raise UserError(f"target_recall={target_recall} must lie in (0, 1].")
    db = store_location(db)
    store = Store(db)
    meta, _, version = load_vectors(store, table, vector, with_vectors=False)
    source = StoreSource(store, table, vector, version=version)
    n, d = len(source), source.dim
    if n != meta.height:
        raise StoreError(f"table {table!r} changed while reading it ({meta.height} cells, then {n}); retry")
    if n == 0:
        raise UserError(f"table {table!r} of {db} holds no cells yet: there is nothing to index; run "
                        f"`embed extract SLIDES --cells CELLS --db {db}` first")  # fmt: skip
    gpu = _resolve_gpu(use_gpu)
    kind = resolve_kind(kind, n, d, gpu)
    t0 = time.perf_counter()
    phases = _Phases()
    if progress is not None:
        progress(0, n)  # training comes first and reports nothing else
    info: dict[str, Any] = {"kind": kind, "metric": METRIC, "n": n, "dim": d,
                            "faiss_version": faiss.__version__, "seed": seed}  # fmt: skip
    plan, tq = None, None
    if kind == "ivf":
        plan = IVFPlan(n, d, nlist, seed, tune_queries)
        xt = _prepare(source.fetch(plan.train_rows), METRIC, "vectors")
        if plan.tune_rows.size:
            tq = _prepare(source.fetch(plan.tune_rows), METRIC, "vectors")
        phases("read_sample")
        empty = train_ivf(plan, xt, gpu)
        del xt
        phases("train")
    else:
        empty = empty_flat(d, METRIC)
    truth = TuneTruth(tq, plan.tune_k if plan else 1)
    job = _Job(db, table, vector, version, n, engine.get("shard_rows", n), search.CHUNK_ROWS)
    index = add(job, empty, tq, truth, meta, phases)
    phases("add_and_merge")
    if plan is None:
        info.update(params={}, search={}, tuned_recall=1.0, target_recall=target_recall)
    else:
        finish_ivf(index, plan, info, target_recall, tq, truth, source)
        phases("tune")
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    info["build"] = {**engine, "shards": len(job.shards()), "seconds": phases.seconds}
    built = CellIndex(index, info, use_gpu=gpu, source=source if plan is not None else None)
    save_index(built, meta, db, table=table, vector=vector, version=version, root=root)
    return built, meta


class _Phases:
    """Seconds spent in each step of the build (recorded with the index)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now


class _Job:
    """What every task needs to find its rows: the table at one version, and the row grid."""

    def __init__(self, db: str, table: str, vector: str, version: int, n: int, shard_rows: int,
                 chunk_rows: int):  # fmt: skip
        self.db, self.table, self.vector, self.version = db, table, vector, version
        self.n, self.shard_rows, self.chunk_rows = n, shard_rows, chunk_rows

    def shards(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.shard_rows)) for s in range(0, self.n, self.shard_rows)]


def _batches(start: int, stop: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """[start, stop) cut on the global grid of `chunk_rows` (the sequential build's batches)."""
    a = start
    while a < stop:
        b = min(stop, (a // chunk_rows + 1) * chunk_rows)
        yield a, b
        a = b


def add_shard(job: _Job, empty: np.ndarray, tq: np.ndarray | None, tune_k: int, start: int,
              stop: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:  # fmt: skip
    """One task: rows [start, stop) added to a copy of the trained index.

    Returns (serialised shard index, the tuning queries' partial kNN (D, I) or None).
    Rows are positions in a scan of the table at `job.version`, the order `Store.load` reads.
    """
    source = StoreSource(Store(job.db), job.table, job.vector, version=job.version)
    if len(source) != job.n:
        raise StoreError(f"table {job.table!r} version {job.version} has {len(source)} rows, "
                         f"the driver read {job.n}")  # fmt: skip
    index = faiss.deserialize_index(np.asarray(empty, np.uint8))
    truth = TuneTruth(tq, tune_k)
    with search._omp_threads(TASK_CPUS):
        for a, b in _batches(start, stop, job.chunk_rows):
            xb = _prepare(source.read(a, b), METRIC, "vectors", a)
            add_rows(index, xb, a, truth)
            faults.point("index.shard")  # kill tests: a worker dying mid-task
    return faiss.serialize_index(index), truth.partial()


def _add_shards(ray, job: _Job, empty: faiss.Index, tq: np.ndarray | None, truth: TuneTruth,
                workers: int, progress: Progress | None) -> faiss.Index:  # fmt: skip
    """Run the shards (at most `2 * workers` unmerged at a time) and merge them in row order
    into `empty`, feeding their partial kNN into `truth`."""
    task = ray.remote(num_cpus=TASK_CPUS, max_retries=MAX_RETRIES)(add_shard)
    shards = job.shards()
    refs = (ray.put(job), ray.put(faiss.serialize_index(empty)), ray.put(tq))
    tune_k = truth.k
    running: dict[Any, int] = {}  # object ref -> shard number
    finished: dict[int, Any] = {}  # shard number -> its result's ref, waiting to be merged
    submitted = merged = 0
    while merged < len(shards):
        while submitted < len(shards) and len(running) + len(finished) < 2 * workers and len(running) < workers:
            running[task.remote(*refs, tune_k, *shards[submitted])] = submitted
            submitted += 1
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            finished[running.pop(ref)] = ref
        while merged in finished:
            blob, part = _get(ray, finished.pop(merged), shards[merged])
            merge_rows(empty, faiss.deserialize_index(np.asarray(blob, np.uint8)))
            if part is not None:
                truth.merge(*part)
            del blob, part
            merged += 1
            if progress is not None:
                progress(shards[merged - 1][1], job.n)
    return empty


def _get(ray, ref, rows: tuple[int, int]):
    """A task's result; its UserError as such, other failures (after retries) with the rows."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):  # StoreError included
            raise exc.cause from None
        raise UserError(f"indexing rows {rows[0]}-{rows[1] - 1} failed: "
                        f"{type(exc.cause).__name__}: {str(exc.cause)[:300]}") from exc  # fmt: skip
    except ray.exceptions.RayError as exc:  # the worker died more than MAX_RETRIES times
        raise UserError(f"indexing rows {rows[0]}-{rows[1] - 1} failed after {MAX_RETRIES} "
                        f"retries: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc  # fmt: skip
