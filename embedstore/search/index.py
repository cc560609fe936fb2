"""Find cells like a given cell: FAISS indexes over per-cell vectors, on plain numpy arrays.

Metrics
-------
``cosine`` (default) is inner product on L2-normalised vectors: rows and queries are normalised
here, so callers pass raw embeddings. Results are similarities (1 = same direction), sorted
descending. ``l2`` returns squared Euclidean distances, sorted ascending.

Index kinds (``kind="auto"`` chooses by size; measured on a 2-core AVX2 CPU, see bench/search.py)
--------------------------------------------------------------------------------------------------
``flat``: exact. One query scans every row: ~0.5-0.7 ns per stored float on a busy 2-core CPU
(10k x 1536-d: 9.6 ms p50; 60k x 384-d: 11.7 ms), and batched audits fall below 1,000 cells/s
near the same size. ``auto`` uses it while rows * dim <= ``FLAT_MAX_ELEMENTS`` (2**23: ~5.5k
rows of 1536-d, ~8k of 1024-d, well inside both goals), or up to ``GPU_FLAT_MAX_ROWS`` rows on
a GPU, where exact batched search is cheap.

``ivf``: approximate, with exact re-ranking. Candidates come from an IVF index (nlist ~
4 * sqrt(N), HNSW coarse quantizer once nlist >= 1024) over PCA-reduced (256-d) vectors stored as
SQ8 codes (256 bytes/row, so a probe scans little memory); the best ``k * k_factor`` candidates
are re-ranked with their full vectors read from a :class:`VectorSource`: the caller's array (a
``np.memmap`` works: only the candidates' rows are read) or the store itself (Lance ``take``,
see ``embedstore.search.explore.StoreSource``). The index holds no copy of the vectors: ~264 bytes per
row (codes + ids), so 10M cells fit in ~2.7 GB. For cosine the
index works in L2 on the normalised vectors (same ranking, ``sim = 1 - d / 2``), because PCA
preserves L2, not inner products. nprobe is tuned at build time on a sample of the data's own
rows (self matches excluded): the smallest nprobe whose recall@20 against exact search, minus
max(two standard errors, 0.01), still reaches ``target_recall``; the tuned value and the recall
it reached are saved with the index.
Measured figures (recall@20, p50, bytes per row, RSS at 1M and 3M rows): bench/search.py.

Filters
-------
``allowed`` (bool per row) restricts results to a subset; ``groups`` (a code per row) with
``exclude_groups`` (a code per query) drops rows of the query's own group ("exclude same slide");
``query_ids`` (the query's own row, -1 for outside queries) keeps a query from returning itself.
On CPU these run as FAISS ``IDSelectorBitmap`` pre-filters; an IVF search that finds fewer than
k admissible rows is repeated with a doubled nprobe until it finds k or has scanned every list.
GPU indexes ignore selectors, so there the search over-fetches and filters, widening k, and hands
queries it still cannot serve to the CPU index. Missing results are ``-1`` ids with NaN scores.

GPU
---
With faiss-gpu and a visible GPU (``use_gpu="auto"``), a flat index is copied to the GPU (fp16)
for searching and the IVF k-means runs there; IVF search itself stays on the CPU, where it
already meets the latency goal. The CPU index is always kept: it is what :meth:`CellIndex.save`
writes and what serves filtered queries the GPU cannot.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedstore.errors import UserError

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)``."""

METRICS = ("cosine", "l2")
KINDS = ("auto", "flat", "ivf")
FORMAT_VERSION = 2  # 2: IVF without an fp16 copy (re-ranked from a VectorSource)
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
VERSION_KEY = "table_version"
"""Key of the caller's meta that :func:`is_stale` compares."""

FLAT_MAX_ELEMENTS = 2**23  # rows * dim; see the module docstring for the measurement
GPU_FLAT_MAX_ROWS = 1_000_000
PCA_DIM = 256
TUNE_K = 20
TUNE_MARGIN = 0.01
CHUNK_ROWS = 32_768
PREAD_THREADS = 16  # parallel row reads when re-ranking from a file (disk queue depth)
RERANK_QUERIES = 128  # queries re-ranked at a time (bounds the gathered candidate block)
SMALL_BATCH = 4  # batches this small run single-threaded: OpenMP fork/join costs more
GPU_MAX_K = 2048
_NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768,
                  1024, 1536, 2048, 3072, 4096, 6144, 8192)


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_nlist(n: int) -> int:
    """~4 * sqrt(N) inverted lists, at least 8 rows per list."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 8)))


def is_stale(meta: dict[str, Any] | None, current_version: Any) -> bool:
    """True when an index saved with ``meta`` does not match the store's ``current_version``.

    Compares ``meta["table_version"]`` (:data:`VERSION_KEY`); meta without it counts as stale,
    since nothing proves it matches.
    """
    if not meta or VERSION_KEY not in meta:
        return True
    return meta[VERSION_KEY] != current_version


# ---------------------------------------------------------------------------------------------
# input checks


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UserError(f"{what}={value!r} is not supported: use one of {', '.join(choices)}.")
    return value


def _as_matrix(x: Any, what: str, dim: int | None = None, allow_1d: bool = False) -> np.ndarray:
    arr = np.asarray(x)
    if allow_1d and arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise UserError(f"{what} must be a 2-D array (rows x dims), got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{what} must hold floats (float16 or float32), got dtype {arr.dtype}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{what} is empty (shape {arr.shape}): there is nothing to index or search.")
    if dim is not None and arr.shape[1] != dim:
        raise UserError(
            f"{what} have {arr.shape[1]} dims but the index holds {dim}-d vectors: use the same "
            "vector column (local, context or fused) the index was built on."
        )
    return arr


def _prepare(chunk: np.ndarray, metric: str, what: str, offset: int = 0) -> np.ndarray:
    """float32, C-contiguous, finite, L2-normalised for cosine."""
    out = np.array(chunk, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        bad = offset + int(np.flatnonzero(~finite)[0])
        raise UserError(
            f"{what} row {bad} holds NaN or infinite values ({int((~finite).sum())} such rows "
            "in this block): re-extract those cells or drop them before indexing."
        )
    if metric == "cosine":
        norms = np.linalg.norm(out, axis=1)
        if (norms == 0).any():
            bad = offset + int(np.flatnonzero(norms == 0)[0])
            raise UserError(
                f"{what} row {bad} is all zeros: cosine similarity is undefined for it; drop it "
                "or use metric='l2'."
            )
        out /= norms[:, None]
    return out


def _chunks(x: np.ndarray, metric: str, what: str, rows: int | None = None
            ) -> Iterator[tuple[int, np.ndarray]]:
    rows = CHUNK_ROWS if rows is None else rows  # read when called: tests shrink the batches
    for s in range(0, x.shape[0], rows):
        yield s, _prepare(x[s:s + rows], metric, what, s)


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise UserError(f"k={k!r} is not a positive integer: ask for at least 1 neighbour.")
    return int(k)


def _check_rows(values: Any, what: str, n: int, length: int, allow_minus1: bool) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (length,) or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{what} must be {length} integer row numbers, got {arr.dtype} "
                        f"shape {arr.shape}.")
    lo = -1 if allow_minus1 else 0
    if length and (arr.min() < lo or arr.max() >= n):
        raise UserError(f"{what} has row numbers outside [{lo}, {n - 1}]: the index holds {n} "
                        "rows; rebuild it if the table grew.")
    return arr.astype(np.int64)


def _check_mask(allowed: Any, n: int) -> np.ndarray | None:
    if allowed is None:
        return None
    arr = np.asarray(allowed)
    if arr.dtype != np.bool_ or arr.shape != (n,):
        raise UserError(f"allowed must be a boolean array with one entry per indexed row ({n}), "
                        f"got {arr.dtype} shape {arr.shape}.")
    return arr


def _group_codes(groups: Any, exclude_groups: Any, n: int, nq: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer codes for rows and queries; query values absent from ``groups`` become -1."""
    if groups is None and exclude_groups is None:
        return None
    if groups is None or exclude_groups is None:
        raise UserError("exclude_groups needs groups (one group code per indexed row) and "
                        "groups needs exclude_groups (one code per query): pass both.")
    g = np.asarray(groups)
    e = np.asarray(exclude_groups)
    if g.shape != (n,):
        raise UserError(f"groups must have one entry per indexed row ({n}), got shape {g.shape}.")
    if e.shape != (nq,):
        raise UserError(f"exclude_groups must have one entry per query ({nq}), got shape "
                        f"{e.shape}.")
    if np.issubdtype(g.dtype, np.integer) and np.issubdtype(e.dtype, np.integer):
        return g.astype(np.int64, copy=False), e.astype(np.int64, copy=False)
    uniq, gc = np.unique(g, return_inverse=True)
    pos = np.searchsorted(uniq, e)
    pos_c = np.minimum(pos, len(uniq) - 1)
    ec = np.where(uniq[pos_c] == e, pos_c, -1)
    return gc.astype(np.int64), ec.astype(np.int64)


@contextmanager
def _omp_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _compact(dist: np.ndarray, ids: np.ndarray, valid: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the first k valid results per row (order preserved); count valid per row."""
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    ids2 = np.take_along_axis(ids, order, axis=1)
    dist2 = np.take_along_axis(dist, order, axis=1).astype(np.float32, copy=False)
    ok = np.take_along_axis(valid, order, axis=1)
    ids2 = np.where(ok, ids2, -1)
    dist2 = np.where(ok, dist2, np.nan).astype(np.float32)
    if ids2.shape[1] < k:
        pad = k - ids2.shape[1]
        ids2 = np.pad(ids2, ((0, 0), (0, pad)), constant_values=-1)
        dist2 = np.pad(dist2, ((0, 0), (0, pad)), constant_values=np.nan)
    return dist2, ids2, valid.sum(axis=1)


def exact_knn(data: np.ndarray, queries: np.ndarray, k: int, *, metric: str = "cosine",
              query_ids: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS,
              progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``data`` for each query, streaming ``data`` in float32 chunks.

    Needs no index (ground truth for recall and tuning). ``query_ids`` drops each query's own
    row. Scores follow the module's conventions (cosine similarity or squared L2).
    """
    _check_choice(metric, METRICS, "metric")
    k = check_k(k)
    data = _as_matrix(data, "data")
    q = _prepare(_as_matrix(queries, "queries", data.shape[1], allow_1d=True), metric, "queries")
    extra = 0 if query_ids is None else 1
    kk = min(k + extra, data.shape[0])
    heap = faiss.ResultHeap(q.shape[0], kk, keep_max=metric == "cosine")
    mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    for s, xb in _chunks(data, metric, "data", chunk_rows):
        dist, ids = faiss.knn(q, xb, min(kk, xb.shape[0]), metric=mt)
        heap.add_result(dist, ids + s)
        if progress is not None:
            progress(s + xb.shape[0], data.shape[0])
    heap.finalize()
    valid = heap.I >= 0
    if query_ids is not None:
        valid &= heap.I != np.asarray(query_ids, dtype=np.int64)[:, None]
    dist, ids, _ = _compact(heap.D, heap.I, valid, k)
    return dist, ids


# ---------------------------------------------------------------------------------------------
# full vectors for re-ranking


class VectorSource:
    """Full-precision rows for re-ranking: ``fetch(rows)`` -> (len(rows), dim) floats.

    Rows arrive sorted and unique. This one reads from an array in the caller's row order. For
    a whole memory-mapped file (``np.load(..., mmap_mode="r")``) it reads the rows with
    parallel ``pread`` calls instead of page faults: through the map each fault pulls in the
    kernel's readahead window (~40x a 3 KB row) and faults are served one after another, which
    at 10M rows (31 GB, more than RAM) made every query wait on ~80 serial disk reads.
    """

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self._file = _file_of(vectors)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        if self._file is None:
            return self.vectors[rows]
        fd, offset, row_bytes = self._file
        out = np.empty((len(rows), self.dim), self.vectors.dtype)
        view = memoryview(out).cast("B")

        def read(part: np.ndarray) -> None:
            for i in part:
                got = os.preadv(fd, [view[i * row_bytes:(i + 1) * row_bytes]], offset + int(rows[i]) * row_bytes)
                if got != row_bytes:
                    raise UserError(f"{self.vectors.filename}: short read at row {rows[i]}; the file changed or is truncated")

        parts = np.array_split(np.arange(len(rows)), min(len(rows), PREAD_THREADS)) if len(rows) else []
        if len(parts) <= 1:
            for part in parts:
                read(part)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PREAD_THREADS, thread_name_prefix="rerank-read")
            list(self._pool.map(read, parts))
        return out

    def __del__(self):
        file, pool = getattr(self, "_file", None), getattr(self, "_pool", None)
        if file is not None:
            os.close(file[0])
        if pool is not None:
            pool.shutdown(wait=False)


def _file_of(a: np.ndarray) -> tuple[int, int, int] | None:
    """(fd, byte offset, bytes per row) for a whole C-ordered memory-mapped file, else None."""
    if not (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename
            and a.flags.c_contiguous and a.ndim == 2):
        return None
    fd = os.open(a.filename, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead on this descriptor
    return fd, int(a.offset), int(a.shape[1] * a.itemsize)


# ---------------------------------------------------------------------------------------------
# the index


class CellIndex:
    """A FAISS index over N cell vectors (rows 0..N-1 in the caller's order).

    Build with :meth:`build`, reopen with :meth:`load`; the constructor is internal.
    """

    def __init__(self, index: faiss.Index, info: dict[str, Any], use_gpu: bool | str = False,
                 source: VectorSource | None = None):
        self._index = index  # always a CPU index (saved, and the filter fallback on GPU)
        self.info = info
        self.source: VectorSource | None = None
        if source is not None:
            self.attach(source)
        self._gpu_index: Any = None
        self._gpu_res: Any = None
        self._use_selectors = True  # False: over-fetch path (GPU; tests force it on CPU)
        self._ivf = faiss.extract_index_ivf(index) if info["kind"] == "ivf" else None
        if self._ivf is not None:
            self._ivf.parallel_mode = 0
        if _resolve_gpu(use_gpu) and info["kind"] == "flat":
            try:
                self._to_gpu()
            except RuntimeError as exc:  # faiss's CUDA errors, e.g. out of GPU memory
                self._gpu_index = self._gpu_res = None
                self._use_selectors = True
                what = f"the flat index ({index.ntotal} x {index.d}) could not be copied to the GPU ({str(exc).strip()[:200]})"
                if use_gpu is True:
                    raise UserError(f"{what}: free GPU memory, or search on the CPU (use_gpu=False)") from None
                warnings.warn(f"{what}: searching on the CPU", stacklevel=2)

    def attach(self, source: VectorSource | np.ndarray) -> CellIndex:
        """Set where an IVF index reads full vectors for re-ranking (rows in index order)."""
        src = source if isinstance(source, VectorSource) else VectorSource(source)
        if len(src) != self.ntotal or src.dim != self.dim:
            raise UserError(f"the re-rank vectors are {len(src)} x {src.dim} but the index holds "
                            f"{self.ntotal} x {self.dim}: pass the vectors the index was built on.")
        self.source = src
        return self

    # -- properties --------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def metric(self) -> str:
        return str(self.info["metric"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def on_gpu(self) -> bool:
        return self._gpu_index is not None

    @property
    def search_params(self) -> dict[str, Any]:
        return dict(self.info.get("search", {}))

    # -- build -------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, *, metric: str = "cosine", kind: str = "auto",
              use_gpu: bool | str = "auto", seed: int = 0, progress: Progress | None = None,
              target_recall: float = 0.95, nlist: int | None = None,
              tune_queries: int = 500) -> CellIndex:
        """Index ``vectors`` (N x D, float16 or float32; row i becomes id i).

        ``kind``: "auto" (flat while small, see module docstring), "flat" (exact) or "ivf".
        ``use_gpu``: "auto" (when a GPU and faiss-gpu are present), True or False. On GPU a flat
        index searches on the GPU and IVF k-means trains there; the saved index is always CPU.
        ``target_recall``: recall@20 the IVF search parameters are tuned to reach.
        ``progress(done_rows, n_rows)`` reports the add pass. An IVF index keeps ``vectors``
        (not a copy) to re-rank from: a ``np.memmap`` keeps them on disk.
        """
        _check_choice(metric, METRICS, "metric")
        _check_choice(kind, KINDS, "kind")
        x = _as_matrix(vectors, "vectors")
        if not 0 < target_recall <= 1:
            raise UserError(f"target_recall={target_recall} must lie in (0, 1].")
        gpu = _resolve_gpu(use_gpu)
        n, d = x.shape
        kind = resolve_kind(kind, n, d, gpu)
        t0 = time.perf_counter()
        if progress is not None:
            progress(0, n)  # IVF training (k-means) comes first and reports nothing else
        info: dict[str, Any] = {"kind": kind, "metric": metric, "n": n, "dim": d,
                                "faiss_version": faiss.__version__, "seed": seed}
        if kind == "flat":
            index = empty_flat(d, metric)
            for s, xb in _chunks(x, metric, "vectors"):
                index.add(xb)
                if progress is not None:
                    progress(s + xb.shape[0], n)
            info.update(params={}, search={}, tuned_recall=1.0, target_recall=target_recall)
        else:
            # the caller's own array: a np.memmap stays one (np.asarray drops the subclass)
            source = VectorSource(vectors if isinstance(vectors, np.ndarray) else x)
            index = _build_ivf(x, metric, nlist, seed, gpu, progress, target_recall,
                               tune_queries, info, source)
        info["build_seconds"] = round(time.perf_counter() - t0, 3)
        return cls(index, info, use_gpu=use_gpu if gpu else False,  # "auto" falls back to the CPU
                   source=source if kind == "ivf" else None)

    # -- search ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
               exclude_groups: np.ndarray | None = None, groups: np.ndarray | None = None,
               query_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k most similar rows per query: ``(scores (nq, k) float32, rows (nq, k) int64)``.

        ``queries``: (nq, D) or (D,) floats. ``allowed``: bool per indexed row, results come
        only from True rows. ``groups``: a code per indexed row (int codes are fastest; strings
        work) and ``exclude_groups``: a code per query; rows sharing the query's code are
        skipped (pass the query's own slide to exclude its slide). ``query_ids``: each query's
        own row (-1 if it is not an indexed row), never returned. Missing results (fewer
        admissible rows than k) are -1 with NaN scores. Batches of <= 4 queries run on one
        OpenMP thread (a process-wide FAISS setting, restored afterwards): on a busy CPU the
        fork/join of a parallel region costs more than the search.
        """
        q = _prepare(_as_matrix(queries, "queries", self.dim, allow_1d=True), self.metric,
                     "queries")
        k = check_k(k)
        n, nq = self.ntotal, q.shape[0]
        mask = _check_mask(allowed, n)
        codes = _group_codes(groups, exclude_groups, n, nq)
        qids = None if query_ids is None else _check_rows(query_ids, "query_ids", n, nq, True)
        threads = 1 if nq <= SMALL_BATCH else None
        with _omp_threads(threads):
            return self._filtered(q, k, mask, codes, qids)

    def search_rows(self, rows: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
                    groups: np.ndarray | None = None, exclude_same_group: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of indexed rows ("cells like this one"); a row never returns itself.

        With ``exclude_same_group`` (needs ``groups``), rows of the query row's group are
        skipped too.
        """
        r = _check_rows(np.atleast_1d(rows), "rows", self.ntotal, np.atleast_1d(rows).size,
                        False)
        if exclude_same_group and groups is None:
            raise UserError("exclude_same_group needs groups: one group code (slide) per row.")
        ex = np.asarray(groups)[r] if exclude_same_group else None
        return self.search(self.reconstruct(r), k, allowed=allowed, query_ids=r,
                           groups=groups if exclude_same_group else None, exclude_groups=ex)

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` as searched (float32, normalised for cosine)."""
        r = _check_rows(np.atleast_1d(rows), "rows", self.ntotal, np.atleast_1d(rows).size,
                        False)
        if self.kind == "ivf":
            return _prepare(self._source().fetch(r), self.metric, "re-rank vectors")
        return self._index.reconstruct_batch(r)

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
        """Write the (CPU) index and a JSON description to ``directory``.

        ``meta`` is the caller's (e.g. ``table_version`` for :func:`is_stale`, row ids); numpy
        arrays in it are saved as ``.npy`` files beside the JSON and come back from :meth:`load`.
        Files are written to temporaries and renamed, so a crash leaves the old index whole.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        user: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for key, val in (meta or {}).items():
            if isinstance(val, np.ndarray):
                if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(key)):
                    raise UserError(f"meta key {key!r} holds an array and so names a file: use "
                                    "letters, digits, '_' or '-' only.")
                arrays[str(key)] = val
                user[str(key)] = {"__npy__": f"meta.{key}.npy"}
            else:
                user[str(key)] = val
        doc = {"format_version": FORMAT_VERSION, "index": self.info, "meta": user}
        try:
            text = json.dumps(doc, indent=2, default=_json_default)
        except TypeError as e:
            raise UserError(f"index meta cannot be written as JSON ({e}): pass plain numbers, "
                            "strings, lists, dicts or numpy arrays.") from e
        for key, val in arrays.items():
            tmp = out / f"meta.{key}.tmp.npy"
            np.save(tmp, val, allow_pickle=False)
            os.replace(tmp, out / f"meta.{key}.npy")
        tmp_idx = out / (INDEX_FILE + ".tmp")
        faiss.write_index(self._index, str(tmp_idx))
        os.replace(tmp_idx, out / INDEX_FILE)
        tmp_meta = out / (META_FILE + ".tmp")
        tmp_meta.write_text(text)
        os.replace(tmp_meta, out / META_FILE)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, use_gpu: bool | str = "auto",
             source: VectorSource | np.ndarray | None = None) -> tuple[CellIndex, dict[str, Any]]:
        """Reopen an index written by :meth:`save`: ``(index, caller's meta)``. An IVF index
        needs ``source`` (the vectors it was built on, in its row order) before searching;
        :meth:`attach` sets it later."""
        src = Path(directory)
        idx_path, meta_path = src / INDEX_FILE, src / META_FILE
        if not idx_path.is_file() or not meta_path.is_file():
            raise UserError(f"no saved index in {src} (expected {INDEX_FILE} and {META_FILE}): "
                            "build one first, or point at the right directory.")
        try:
            doc = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{meta_path} is not readable JSON ({e}): rebuild the index.") from e
        if doc.get("format_version") != FORMAT_VERSION or "index" not in doc:
            raise UserError(f"{meta_path} has index format {doc.get('format_version')!r}, this "
                            f"version reads {FORMAT_VERSION}: rebuild the index.")
        try:
            index = faiss.read_index(str(idx_path))
        except RuntimeError as e:
            raise UserError(f"{idx_path} is not a readable FAISS index ({e}): rebuild it.") from e
        info = doc["index"]
        if int(index.ntotal) != int(info["n"]) or int(index.d) != int(info["dim"]):
            raise UserError(f"{idx_path} holds {index.ntotal} x {index.d} vectors but "
                            f"{meta_path} says {info['n']} x {info['dim']}: rebuild the index.")
        meta: dict[str, Any] = {}
        for key, val in doc.get("meta", {}).items():
            if isinstance(val, dict) and set(val) == {"__npy__"}:
                path = src / val["__npy__"]
                if not path.is_file():
                    raise UserError(f"{path} is missing (meta key {key!r}): rebuild the index.")
                meta[key] = np.load(path, allow_pickle=False)
            else:
                meta[key] = val
        return cls(index, info, use_gpu=use_gpu, source=source), meta

    # -- internals ---------------------------------------------------------------------------
    def _to_gpu(self) -> None:
        self._gpu_res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index, co)
        self._use_selectors = False  # GPU indexes ignore IDSelectors

    def _source(self) -> VectorSource:
        if self.source is None:
            raise UserError("this IVF index re-ranks with the full vectors it was built on: "
                            "attach them first (CellIndex.load(..., source=vectors) or .attach()).")
        return self.source

    def _nprobe(self) -> int | None:
        return self.info["search"].get("nprobe") if self._ivf is not None else None

    def _raw(self, q: np.ndarray, k: int, nprobe: int | None, sel: Any = None,
             cpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS search; scores converted to the public convention."""
        if self._gpu_index is not None and not cpu and sel is None and k <= GPU_MAX_K:
            dist, ids = self._gpu_index.search(q, k)
            return dist, ids
        if self._ivf is None:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
            dist, ids = self._index.search(q, k, params=params)
            return dist, ids
        nprobe = int(min(nprobe or 1, self._ivf.nlist))
        s = self.info["search"]
        ivf_p = faiss.SearchParametersIVF(nprobe=nprobe)
        if sel is not None:
            ivf_p.sel = sel
        keep: list[Any] = [ivf_p, sel]
        if self.info["params"].get("quantizer") == "hnsw":
            qp = faiss.SearchParametersHNSW(efSearch=max(int(s.get("quantizer_ef", 64)),
                                                         2 * nprobe))
            ivf_p.quantizer_params = qp
            keep.append(qp)
        base_p: Any = ivf_p
        if self.info["params"].get("pca_dim"):
            base_p = faiss.SearchParametersPreTransform(index_params=ivf_p)
            keep.append(base_p)
        kk = int(min(self.ntotal, max(k, round(k * float(s.get("k_factor", 4))))))
        _, cand = self._index.search(q, kk, params=base_p)
        del keep
        return self._rerank(q, cand, k)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates from the full vectors; the best k per query."""
        nq = q.shape[0]
        dist = np.full((nq, k), np.inf if self.metric == "l2" else -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        for s in range(0, nq, RERANK_QUERIES):
            c = cand[s:s + RERANK_QUERIES]
            uniq, inv = np.unique(c[c >= 0], return_inverse=True)
            if uniq.size == 0:
                continue
            x = _prepare(self._source().fetch(uniq), self.metric, "re-rank vectors")
            pos = np.full(c.shape, -1, np.int64)
            pos[c >= 0] = inv
            g = x[pos.clip(0)]  # (b, kk, d)
            ip = np.einsum("bkd,bd->bk", g, q[s:s + c.shape[0]])
            if self.metric == "cosine":
                score = np.where(pos >= 0, ip, -np.inf)
                order = np.argsort(-score, axis=1, kind="stable")[:, :k]
            else:
                qn = (q[s:s + c.shape[0]] ** 2).sum(1)[:, None]
                score = np.where(pos >= 0, qn + (g ** 2).sum(2) - 2 * ip, np.inf)
                order = np.argsort(score, axis=1, kind="stable")[:, :k]
            m = order.shape[1]
            dist[s:s + c.shape[0], :m] = np.take_along_axis(score, order, axis=1)
            ids[s:s + c.shape[0], :m] = np.where(np.isfinite(dist[s:s + c.shape[0], :m]),
                                                 np.take_along_axis(c, order, axis=1), -1)
        return dist, ids

    def _filtered(self, q: np.ndarray, k: int, mask: np.ndarray | None,
                  codes: tuple[np.ndarray, np.ndarray] | None, qids: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Search in buckets of queries that share one admissible-row mask (one per group)."""
        nq, n = q.shape[0], self.ntotal
        out_D = np.full((nq, k), np.nan, np.float32)
        out_I = np.full((nq, k), -1, np.int64)
        if codes is None:
            buckets = [(-1, np.arange(nq))]
        else:
            ucodes, inv = np.unique(codes[1], return_inverse=True)
            order = np.argsort(inv, kind="stable")
            bounds = np.searchsorted(inv[order], np.arange(len(ucodes) + 1))
            buckets = [(int(c), order[bounds[i]:bounds[i + 1]]) for i, c in enumerate(ucodes)]
        for code, rows in buckets:
            m = mask
            if code >= 0:
                other = codes[0] != code  # type: ignore[index]
                m = other if m is None else m & other
            avail = n if m is None else int(m.sum())
            if avail == 0:
                continue
            own = None if qids is None else qids[rows]
            # the most results each query can get: k, or what its admissible rows allow
            if own is None:
                self_in = np.zeros(rows.size, bool)
            else:
                self_in = (own >= 0) & (True if m is None else m[own.clip(0)])
            need = np.minimum(k, avail - self_in)
            if not self._use_selectors:
                short = self._overfetch(q, k, m, avail, rows, own, need, out_D, out_I)
                if short.size == 0:
                    continue
                rows, need = rows[short], need[short]
                own = None if own is None else own[short]
            self._cpu_search(q, k, m, avail, rows, own, need, out_D, out_I)
        return out_D, out_I

    def _cpu_search(self, q: np.ndarray, k: int, m: np.ndarray | None, avail: int,
                    rows: np.ndarray, own: np.ndarray | None, need: np.ndarray,
                    out_D: np.ndarray, out_I: np.ndarray) -> None:
        """Pre-filtered CPU search; IVF queries short of results retry with doubled nprobe."""
        bitmap = None if m is None else np.packbits(m, bitorder="little")
        sel = None if bitmap is None else faiss.IDSelectorBitmap(bitmap)
        kk = min(k + (own is not None), avail)
        nprobe = self._nprobe()
        todo = np.arange(rows.size)
        while todo.size:
            dist, ids = self._raw(q[rows[todo]], kk, nprobe, sel, cpu=True)
            valid = ids >= 0
            if own is not None:
                valid &= ids != own[todo, None]
            dist2, ids2, cnt = _compact(dist, ids, valid, k)
            out_D[rows[todo]], out_I[rows[todo]] = dist2, ids2
            short = cnt < need[todo]
            if self._ivf is None or nprobe is None or nprobe >= self._ivf.nlist or not short.any():
                break
            todo = todo[short]
            nprobe = min(self._ivf.nlist, nprobe * 2)
        del sel, bitmap

    def _overfetch(self, q: np.ndarray, k: int, m: np.ndarray | None, avail: int,
                   rows: np.ndarray, own: np.ndarray | None, need: np.ndarray,
                   out_D: np.ndarray, out_I: np.ndarray) -> np.ndarray:
        """Search unfiltered for more than k, then filter; widen k (and nprobe) for queries
        still short. Returns positions in ``rows`` left for the CPU pre-filtered search."""
        n = self.ntotal
        extra = 0 if own is None else 1
        nprobe = self._nprobe()
        nlist = self._ivf.nlist if self._ivf is not None else None
        cap = GPU_MAX_K if self._gpu_index is not None else n
        # never more than the GPU serves: past it `_raw` would run an unfiltered CPU search for
        # up to n results per query (a full scan and an (nq, n) result); queries still short
        # at the cap go to the CPU's pre-filtered search instead
        if self._gpu_index is not None and m is None and k + extra > cap:
            return np.arange(rows.size)  # more than the GPU serves, and nothing to filter
        kk = min(cap, n, k + extra if m is None else int(math.ceil((k + 1) * n / avail * 1.5)) + 8)
        todo = np.arange(rows.size)
        while True:
            dist, ids = self._raw(q[rows[todo]], kk, nprobe)
            valid = ids >= 0
            if m is not None:
                valid &= m[ids.clip(0)]
            if own is not None:
                valid &= ids != own[todo, None]
            dist2, ids2, cnt = _compact(dist, ids, valid, k)
            out_D[rows[todo]], out_I[rows[todo]] = dist2, ids2
            if kk >= n and (nlist is None or (nprobe or 0) >= nlist):
                return todo[:0]  # searched everything: what is missing does not exist
            todo = todo[cnt < need[todo]]
            if todo.size == 0:
                return todo
            can_probe = nlist is not None and (nprobe or 0) < nlist
            if kk >= min(cap, n) and not can_probe:
                return todo
            kk = min(cap, n, kk * 4)
            if can_probe:
                nprobe = min(nlist, (nprobe or 1) * 2)  # type: ignore[type-var]


# ---------------------------------------------------------------------------------------------
# build helpers


def _resolve_gpu(use_gpu: bool | str) -> bool:
    if use_gpu == "auto":
        return gpu_available()
    if use_gpu is True:
        if not gpu_available():
            raise UserError("use_gpu=True but FAISS sees no GPU (install faiss-gpu and check "
                            "CUDA_VISIBLE_DEVICES), or pass use_gpu=False / 'auto'.")
        return True
    if use_gpu is False:
        return False
    raise UserError(f"use_gpu={use_gpu!r} is not one of 'auto', True, False.")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def resolve_kind(kind: str, n: int, d: int, gpu: bool) -> str:
    """``kind`` with "auto" decided by size (see the module docstring); checks IVF's minimum."""
    _check_choice(kind, KINDS, "kind")
    if kind == "auto":
        small = n <= GPU_FLAT_MAX_ROWS if gpu else n * d <= FLAT_MAX_ELEMENTS
        kind = "flat" if small else "ivf"
    if kind == "ivf" and n < 64:
        raise UserError(f"kind='ivf' (--kind ivf) needs at least 64 rows to train on, got {n}: use "
                        "kind='flat' (--kind flat: exact, and fast at this size).")
    return kind


def empty_flat(d: int, metric: str) -> faiss.Index:
    return faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)


# An IVF build in steps, so that the add pass can also run in shards (embedstore.search.distributed):
# IVFPlan (layout and sampled rows, from n and d only) -> train_ivf (the trained, empty
# index) -> add_rows over row chunks, in row order or per shard, also feeding TuneTruth ->
# finish_ivf (search parameters, nprobe tuned against TuneTruth).


class IVFPlan:
    """What an IVF build decides before reading any vector: the factory string and the
    training and tuning rows, drawn from ``seed`` (sorted row numbers)."""

    def __init__(self, n: int, d: int, nlist: int | None, seed: int, tune_queries: int):
        nlist = default_nlist(n) if nlist is None else int(nlist)
        if not 1 <= nlist <= n:
            raise UserError(f"nlist={nlist} must lie in [1, {n}] (the number of rows).")
        self.n, self.d, self.nlist, self.seed = n, d, nlist, seed
        self.pca = PCA_DIM if d > PCA_DIM else 0
        self.quantizer = "hnsw" if nlist >= 1024 else "flat"  # search stays on CPU, GPU or not
        qkey = f"IVF{nlist}_HNSW32" if self.quantizer == "hnsw" else f"IVF{nlist}"
        self.key = (f"PCA{self.pca}," if self.pca else "") + f"{qkey},SQ8"
        rng = np.random.default_rng(seed)
        self.n_train = int(min(n, max(24 * nlist, 4 * (self.pca or d))))
        self.train_rows = np.sort(rng.choice(n, self.n_train, replace=False))
        nt = int(min(tune_queries, n - 1))
        self.tune_rows = (np.sort(rng.choice(n, nt, replace=False)) if nt > 0
                          else np.zeros(0, np.int64))
        self.tune_k = int(min(TUNE_K + 1, n))  # + 1: a tuning row finds itself

    @property
    def params(self) -> dict[str, Any]:
        return {"factory": self.key, "nlist": self.nlist, "pca_dim": self.pca,
                "quantizer": self.quantizer, "codes": "SQ8",
                "refine": "full vectors from the VectorSource", "n_train": self.n_train}


def train_ivf(plan: IVFPlan, xt: np.ndarray, gpu: bool) -> faiss.Index:
    """The trained, empty index (L2: cosine ranks the same once normalised); ``xt`` is the
    prepared (float32, normalised for cosine) rows ``plan.train_rows``."""
    index = faiss.index_factory(plan.d, plan.key, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10
    ivf.cp.seed = plan.seed
    ivf.cp.min_points_per_centroid = 4
    ivf.cp.max_points_per_centroid = 1 << 30  # we subsample ourselves
    if plan.quantizer == "hnsw":
        faiss.downcast_index(ivf.quantizer).hnsw.efConstruction = 80
    gpu_keep = None
    if gpu:  # k-means on the GPU: the expensive part of training
        gpu_res = faiss.StandardGpuResources()
        flat = faiss.IndexFlatL2(plan.pca or plan.d)
        gpu_keep = (gpu_res, faiss.index_cpu_to_gpu(gpu_res, 0, flat))
        ivf.clustering_index = gpu_keep[1]  # a raw pointer: gpu_keep holds the Python refs
    index.train(xt)
    if gpu:
        ivf.clustering_index = None
    del gpu_keep
    return index


class TuneTruth:
    """Exact L2 k nearest rows of the tuning queries, fed chunk by chunk as rows are added
    (the ground truth nprobe is tuned against). A shard's finished heap (:meth:`partial`) is
    fed into the driver's with :meth:`merge`."""

    def __init__(self, tq: np.ndarray | None, k: int):
        self.tq, self.k = tq, k
        self.heap = faiss.ResultHeap(tq.shape[0], k, keep_max=False) if tq is not None else None

    def add(self, xb: np.ndarray, start: int) -> None:
        if self.heap is not None:
            dist, ids = faiss.knn(self.tq, xb, min(self.k, xb.shape[0]), metric=faiss.METRIC_L2)
            self.heap.add_result(dist, ids + start)

    def merge(self, dist: np.ndarray, ids: np.ndarray) -> None:
        if self.heap is not None:
            self.heap.add_result(dist, ids)

    def partial(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.heap is None:
            return None
        self.heap.finalize()
        return self.heap.D, self.heap.I

    def truth(self, tune_rows: np.ndarray) -> np.ndarray:
        """The k - 1 nearest rows of each query other than itself."""
        self.heap.finalize()
        valid = (self.heap.I >= 0) & (self.heap.I != tune_rows[:, None])
        _, truth, _ = _compact(self.heap.D, self.heap.I, valid, self.k - 1)
        return truth


def add_rows(index: faiss.Index, xb: np.ndarray, start: int, truth: TuneTruth | None = None
             ) -> None:
    """Add prepared rows ``start .. start + len(xb) - 1`` as ids of the same numbers.

    In row order the ids are implicit (an index numbers rows ntotal, ntotal + 1, ...); a
    shard's IVF index starts empty at row ``start``, so its ids are passed explicitly. (A
    shard's flat index keeps no ids: merged in row order, its rows get the right numbers.)
    """
    if start == index.ntotal or not _is_ivf(index):
        index.add(xb)
    else:
        index.add_with_ids(xb, np.arange(start, start + xb.shape[0], dtype=np.int64))
    if truth is not None:
        truth.add(xb, start)


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def merge_rows(index: faiss.Index, shard: faiss.Index) -> None:
    """Append ``shard``'s rows to ``index`` (both from the same trained index), emptying it.

    IVF lists are appended to, so merging shards in row order gives the lists (and ids) a
    sequential add would have; a pre-transform wrapper's own ntotal is kept in step.
    """
    if _is_ivf(index):
        faiss.extract_index_ivf(index).merge_from(faiss.extract_index_ivf(shard), 0)
        index.ntotal = faiss.extract_index_ivf(index).ntotal
    else:
        index.merge_from(shard, 0)


def finish_ivf(index: faiss.Index, plan: IVFPlan, info: dict[str, Any], target_recall: float,
               tq: np.ndarray | None, truth: TuneTruth, source: VectorSource) -> None:
    """Record the build parameters in ``info`` and tune nprobe (when there are tuning rows)."""
    nt = int(plan.tune_rows.size)
    search: dict[str, Any] = {"nprobe": min(8, plan.nlist), "k_factor": 4, "quantizer_ef": 64}
    info.update(params=plan.params, search=search, target_recall=target_recall,
                tuned_recall=None, tune_queries=nt)
    if nt:
        _tune(index, faiss.extract_index_ivf(index), info, tq, plan.tune_rows,
              truth.truth(plan.tune_rows), target_recall, source)


def _build_ivf(x: np.ndarray, metric: str, nlist: int | None, seed: int, gpu: bool,
               progress: Progress | None, target_recall: float, tune_queries: int,
               info: dict[str, Any], source: VectorSource) -> faiss.Index:
    n, d = x.shape
    plan = IVFPlan(n, d, nlist, seed, tune_queries)
    index = train_ivf(plan, _prepare(x[plan.train_rows], metric, "vectors"), gpu)
    tq = _prepare(x[plan.tune_rows], metric, "vectors") if plan.tune_rows.size else None
    truth = TuneTruth(tq, plan.tune_k)
    for s, xb in _chunks(x, metric, "vectors"):
        add_rows(index, xb, s, truth)
        if progress is not None:
            progress(s + xb.shape[0], n)
    finish_ivf(index, plan, info, target_recall, tq, truth, source)
    return index


def _tune(index: faiss.Index, ivf: Any, info: dict[str, Any], tq: np.ndarray,
          tune_rows: np.ndarray, truth: np.ndarray, target_recall: float,
          source: VectorSource) -> None:
    """Smallest nprobe (k_factor 4, else 16) whose recall@20 on the sample clears the target.

    "Clears" means the mean minus two standard errors (over the sample's queries) and the mean
    minus ``TUNE_MARGIN`` both reach ``target_recall``, so unseen queries meet it too.
    """
    probe = CellIndex(index, info, use_gpu=False, source=source)
    ladder = sorted({p for p in _NPROBE_LADDER if p < ivf.nlist} | {int(ivf.nlist)})
    k = truth.shape[1]
    best: tuple[float, float, int, int] = (-1.0, 0.0, ivf.nlist, 16)
    denom = np.maximum((truth >= 0).sum(axis=1), 1)
    for kf in (4, 16):
        info["search"]["k_factor"] = kf
        for nprobe in ladder:
            dist, ids = probe._raw(tq, k + 1, nprobe)
            valid = (ids >= 0) & (ids != tune_rows[:, None])
            _, ids2, _ = _compact(dist, ids, valid, k)
            hits = ((ids2[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)).any(2)
            per_query = hits.sum(axis=1) / denom
            r = float(per_query.mean())
            se = float(per_query.std(ddof=1) / np.sqrt(per_query.size)) if per_query.size > 1 \
                else 0.0
            if r > best[0]:
                best = (r, se, nprobe, kf)
            if r - max(2 * se, TUNE_MARGIN) >= target_recall or r >= 1.0:
                best = (r, se, nprobe, kf)
                break
        else:
            continue
        break
    r, se, nprobe, kf = best
    info["search"].update(nprobe=nprobe, k_factor=kf, quantizer_ef=max(64, 2 * nprobe))
    info["tuned_recall"] = round(r, 4)
    info["tuned_recall_se"] = round(se, 4)
    if r - max(2 * se, TUNE_MARGIN) < target_recall and r < 1.0:
        warnings.warn(f"IVF search reached recall@{k} {r:.3f} at most (target {target_recall}); "
                      "use kind='flat' (--kind flat) for exact results", stacklevel=3)
