"""Similar-cell search and label audit on clustered synthetic embeddings. Prints JSON.

    python bench/search.py [--n 1000000] [--dim 1536] [--out FILE] [--no-audit]
    python bench/search.py --n 10000000 --no-audit --work /big/disk   # 31 GB of vectors on disk

Data: float16 vectors (like the store) drawn from a few thousand Gaussian clusters of varying
size (Dirichlet weights) and spread (log-normal), living in a 64-d subspace of the full space,
plus a shared mean direction and isotropic noise. Each cluster carries one of 8 cell types
with Zipf-like frequencies; 5% of cells get a random other label (the planted flips).

The vectors are written to a float16 .npy file and memory-mapped (as they would be read from
the store): the index holds SQ8 codes only and re-ranks its candidates with rows read through
the map, so resident memory is the index plus whatever pages the OS keeps cached. Peak
anonymous RSS (the process's own memory) and peak file-backed RSS are reported apart.

Measures in one run: build time (kind chosen by size, nprobe tuned), peak RSS, size on disk,
recall@20 against exact brute-force inner product (faiss.knn, what IndexFlatIP computes) on
>= 1000 query cells, single-query latency p50/p95 (one query at a time, warm; unfiltered, with
"exclude same slide", and restricted to one tissue), and the audit of every cell (batched):
throughput, flagged precision/recall against the planted flips and the average precision of
the suspicion ranking. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.search.audit import label_audit, same_slide_rate  # noqa: E402
from embedstore.search.index import CellIndex, exact_knn  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


class RssSampler:
    """Peak anonymous and file-backed resident memory (/proc/self/status), sampled every 50 ms."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def now() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.05)

    def report(self) -> dict:
        cur = self.now()
        return {"peak_anon_gb": round(self.peak["RssAnon"] / 1e9, 2), "peak_file_gb": round(self.peak["RssFile"] / 1e9, 2),
                "anon_now_gb": round(cur.get("RssAnon", 0) / 1e9, 2)}  # fmt: skip


def make_data(n: int, dim: int, n_clusters: int, n_classes: int, n_slides: int, seed: int,
              latent: int = 64, chunk: int = 65_536, path: Path | None = None,
              reuse: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    cluster = rng.choice(n_clusters, size=n, p=weights).astype(np.int32)
    centers = rng.standard_normal((n_clusters, latent)).astype(np.float32)
    spread = rng.lognormal(np.log(0.6), 0.4, n_clusters).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)
    basis *= np.float32(np.sqrt(dim / latent))
    mean = rng.standard_normal(dim).astype(np.float32) * 0.8
    freq = 1.0 / np.arange(1, n_classes + 1)
    cls_of_cluster = rng.choice(n_classes, size=n_clusters, p=freq / freq.sum())
    out = {"cluster": cluster, "true": cls_of_cluster[cluster].astype(np.int64),
           "slide": rng.integers(0, n_slides, n).astype(np.int64),
           "tissue": rng.integers(0, 4, n).astype(np.int64)}
    if path is not None and path.exists() and reuse:
        x = np.load(path, mmap_mode="r")
        if x.shape == (n, dim) and x.dtype == np.float16:
            log(f"reusing the vectors in {path} (same seed and sizes)")
            return {"x": x, **out}
    x = np.empty((n, dim), np.float16) if path is None else \
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for s in range(0, n, chunk):
        c = cluster[s:s + chunk]
        z = centers[c] + spread[c, None] * rng.standard_normal((c.size, latent), dtype=np.float32)
        noise = 0.25 * rng.standard_normal((c.size, dim), dtype=np.float32)
        x[s:s + c.size] = z @ basis + mean + noise
    if path is not None:
        x.flush()
        del x
        x = np.load(path, mmap_mode="r")  # read-only map: rows are read from disk on demand
    return {"x": x, **out}


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    hit = positive[order]
    precision = np.cumsum(hit) / np.arange(1, hit.size + 1)
    return float((precision * hit).sum() / max(hit.sum(), 1))


def latency(index: CellIndex, x: np.ndarray, rows: np.ndarray, k: int, **filters) -> dict:
    groups = filters.pop("groups", None)
    for r in rows[:20]:  # warm-up
        index.search(x[r], k, query_ids=np.array([r]), **filters)
    times = []
    for r in rows:
        kw = dict(filters)
        if groups is not None:
            kw.update(groups=groups, exclude_groups=groups[[r]])
        t = time.perf_counter()
        index.search(x[r], k, query_ids=np.array([r]), **kw)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    return {"p50": round(float(np.median(ms)), 3), "p95": round(float(np.percentile(ms, 95)), 3),
            "mean": round(float(ms.mean()), 3), "queries": int(rows.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--clusters", type=int, default=None, help="default: n / 333, <= 3000")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--flip", type=float, default=0.05, help="share of labels flipped")
    ap.add_argument("--unlabelled", type=float, default=0.1,
                    help="share of cells without a label (not audited, no vote)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--latency-queries", type=int, default=500)
    ap.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--work", type=Path, default=None, help="folder for the vectors file (default: a temp dir)")
    ap.add_argument("--in-memory", action="store_true", help="keep the vectors in RAM instead of a memory map")
    ap.add_argument("--no-audit", action="store_true", help="skip the label audit and same-slide rates")
    ap.add_argument("--reuse", action="store_true", help="reuse a vectors file of the same size in --work")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_search_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    rss = RssSampler()
    n, dim, k = args.n, args.dim, args.k
    n_clusters = args.clusters or int(max(8, min(3000, n // 333)))
    res: dict = {"n": n, "dim": dim, "clusters": n_clusters, "classes": args.classes,
                 "k": k, "cpus": os.cpu_count(), "faiss": faiss.__version__,
                 "omp_threads": faiss.omp_get_max_threads(),
                 "load_avg_start": [round(v, 2) for v in os.getloadavg()]}

    t = time.perf_counter()
    d = make_data(n, dim, n_clusters, args.classes, args.slides, args.seed,
                  path=None if args.in_memory else work / "vectors.f16.npy", reuse=args.reuse)
    res["vectors"] = "in memory" if args.in_memory else "memory-mapped .npy (float16)"
    x = d["x"]
    res["data_seconds"] = round(time.perf_counter() - t, 1)
    log(f"data {x.shape} {x.dtype} in {res['data_seconds']} s")

    t = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            log(f"  add {done}/{total}")

    saved = work / "index"
    if args.reuse and (saved / "index.json").exists():
        index, _ = CellIndex.load(saved, source=x)
        log(f"reusing the index in {saved}")
    else:
        index = CellIndex.build(x, kind=args.kind, seed=args.seed, progress=progress)
        if not args.in_memory:
            index.save(saved, {"n": n})
    res["build"] = {"seconds": index.info["build_seconds"], "kind": index.kind,
                    "params": index.info["params"], "search": index.search_params,
                    "tuned_recall": index.info["tuned_recall"],
                    "tuned_recall_se": index.info.get("tuned_recall_se"), "on_gpu": index.on_gpu}
    res["peak_rss_gb_after_build"] = round(peak_rss_gb(), 2)
    res["rss_after_build"] = rss.report()
    log(f"build {res['build']}")

    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    try:
        t = time.perf_counter()
        index.save(tmp / "idx", {"table_version": 1})
        res["save_seconds"] = round(time.perf_counter() - t, 1)
        size = sum(f.stat().st_size for f in (tmp / "idx").iterdir())
        res["index_gb_on_disk"] = round(size / 1e9, 3)
        res["index_bytes_per_vector"] = round(size / n, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rng = np.random.default_rng(args.seed + 1)
    nq = min(args.recall_queries, n)
    q = np.sort(rng.choice(n, nq, replace=False))
    t = time.perf_counter()
    cached = work / f"truth_{nq}_{k}_{args.seed}.npz"
    if args.reuse and cached.exists() and np.array_equal(np.load(cached)["q"], q):
        truth = np.load(cached)["truth"]
        log(f"reusing the exact neighbours in {cached}")
    else:
        _, truth = exact_knn(x, x[q], k, query_ids=q)
        if not args.in_memory:
            np.savez(cached, q=q, truth=truth)
    res["exact_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    _, approx = index.search(x[q], k, query_ids=q)
    batch_s = time.perf_counter() - t
    hits = (approx[:, :, None] == truth[:, None, :]).any(axis=2).sum()
    res["recall_at_k"] = round(float(hits / truth.size), 4)
    res["recall_queries"] = nq
    res["batch_search_qps"] = round(nq / batch_s, 1)
    t = time.perf_counter()
    _, excl = index.search(x[q], k, groups=d["slide"], exclude_groups=d["slide"][q], query_ids=q)
    res["batch_exclude_slide_qps"] = round(nq / (time.perf_counter() - t), 1)
    assert not (d["slide"][excl] == d["slide"][q][:, None]).any()
    log(f"recall@{k} {res['recall_at_k']} on {nq} queries (exact in {res['exact_seconds']} s)")

    lq = np.sort(rng.choice(n, min(args.latency_queries, n), replace=False))
    res["latency_ms"] = latency(index, x, lq, k)
    res["latency_exclude_slide_ms"] = latency(index, x, lq, k, groups=d["slide"])
    res["latency_one_tissue_ms"] = latency(index, x, lq, k, allowed=d["tissue"] == 0)
    log(f"latency {res['latency_ms']}")

    res["rss_after_search"] = rss.report()
    if not args.no_audit:
        audit_bench(args, index, x, d, res)
    res["peak_rss_gb"] = round(peak_rss_gb(), 2)
    res["rss_end"] = rss.report()
    res["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["goals"] = {
        "p50_le_10ms": res["latency_ms"]["p50"] <= 10,
        "recall_ge_0.95": res["recall_at_k"] >= 0.95,
        "index_le_300_bytes_per_vector": res["index_bytes_per_vector"] <= 300,
        **({"audit_ge_1000_cells_per_s": res["audit"]["cells_per_s"] >= 1000} if "audit" in res else {}),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def audit_bench(args, index: CellIndex, x: np.ndarray, d: dict, res: dict) -> None:
    n, k = args.n, args.k
    last = [0.0]
    flip_rng = np.random.default_rng(args.seed + 2)
    flipped = flip_rng.random(n) < args.flip
    labels = d["true"].copy()
    labels[flipped] = (labels[flipped] + flip_rng.integers(1, args.classes, flipped.sum())) \
        % args.classes
    labels[flip_rng.random(n) < args.unlabelled] = -1
    flipped &= labels >= 0
    classes = [f"type_{i}" for i in range(args.classes)]
    t = time.perf_counter()
    last[0] = 0.0

    def audit_progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 60:
            last[0] = time.perf_counter()
            log(f"  audit {done}/{total}")

    df = label_audit(index, x, labels, classes, k=k, progress=audit_progress)
    audit_s = time.perf_counter() - t
    rows = df["row"].to_numpy()
    pos = flipped[rows]
    flag = df["flagged"].to_numpy()
    tp = int((flag & pos).sum())
    n_flips = int(flipped.sum())
    res["audit"] = {
        "cells": int(df.height), "unlabelled": int((labels < 0).sum()),
        "seconds": round(audit_s, 1),
        "cells_per_s": round(df.height / audit_s, 1),
        "planted_flips": n_flips, "flagged": int(flag.sum()),
        "precision": round(tp / max(int(flag.sum()), 1), 4),
        "recall": round(tp / max(n_flips, 1), 4),
        "precision_at_n_flips": round(float(pos[:n_flips].mean()), 4),
        "ap_suspicion": round(average_precision(df["suspicion"].to_numpy(), pos), 4),
        "ap_one_minus_agreement": round(
            average_precision(1 - df["agreement"].to_numpy(), pos), 4),
    }
    share = df["suggested_share"].fill_null(0).to_numpy()
    other = (df["suggested"].to_numpy() != df["label"].to_numpy()) & (df["n_votes"].to_numpy() >= 5)
    tradeoff = {}
    for min_share in (0.5, 0.6, 0.75, 0.9):
        f = other & (share >= min_share)
        tp_s = int((f & pos).sum())
        tradeoff[str(min_share)] = {"precision": round(tp_s / max(int(f.sum()), 1), 4),
                                    "recall": round(tp_s / max(n_flips, 1), 4)}
    res["audit"]["flag_rule_min_share"] = tradeoff
    log(f"audit {res['audit']}")

    t = time.perf_counter()
    rates = same_slide_rate(index, x, d["slide"], k=k, sample=100)
    res["same_slide"] = {"seconds": round(time.perf_counter() - t, 1),
                         "ratio_median": round(float(rates["ratio"].median()), 3),
                         "ratio_max": round(float(rates["ratio"].max()), 3),
                         "note": "slides assigned at random: ~1 expected"}


if __name__ == "__main__":
    main()
