"""Benchmark: train the three NuClass heads (stage all) on synthetic cached vectors; prints JSON.

Vectors are generated here with class and tissue structure (float32): half of the classes
differ in the local vector, the other half come in pairs that share their local mean and
differ only in context; each tissue shifts the local vector; class sizes are imbalanced.
Reports per stage: wall time, peak RSS, cells/s per epoch, validation macro-F1, and the
training time until the val macro-F1 first came within 0.005 of its best. As a baseline in the
same process, a bare PyTorch loop (the stage-1 layer sizes, AdamW, cross-entropy, no validation,
no data checks) runs over the same training tensors; the heads' stage-1 training cells/s is
reported as a share of it (goal >= 0.8).

    python bench/heads.py                       # 200k cells, 1536 + 1024 dims, defaults
    python bench/heads.py --cells 20000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.data import CellData  # noqa: E402
from heads.splits import make_split  # noqa: E402
from heads.train import TrainConfig, macro_f1, predict_all, train_stage  # noqa: E402


class PeakRSS:
    """Samples this process's RSS in a thread; `peak` is the max since `reset`."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.proc, self.interval = psutil.Process(), interval_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def reset(self) -> None:
        self.peak = self.proc.memory_info().rss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_cells(
    n: int, du: int, dc: int, n_classes: int, n_tissues: int, n_slides: int, seed: int,
    separation: float = 3.5, chunk: int = 16384,
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prevalence = 1.0 / np.arange(1, n_classes + 1) ** 0.7  # imbalanced classes
    y = rng.choice(n_classes, size=n, p=prevalence / prevalence.sum())
    slide = rng.integers(0, n_slides, n)
    slide_tissue = np.arange(n_slides) % n_tissues
    t = slide_tissue[slide]
    # class means ~`separation` noise s.d. apart (Bayes error per pair ~ Phi(-separation / 2))
    mu_l = rng.normal(0, separation / np.sqrt(2 * du), (n_classes, du)).astype(np.float32)
    mu_c = rng.normal(0, separation / np.sqrt(2 * dc), (n_classes, dc)).astype(np.float32)
    half = n_classes // 2
    for k in range(half, n_classes - 1, 2):  # context-only pairs: same local mean
        mu_l[k + 1] = mu_l[k]
    mu_c[:half] *= 0.3  # local-defined classes carry little context signal
    shift = rng.normal(0, 0.1, (n_tissues, du)).astype(np.float32)  # tissue batch effect
    local = np.empty((n, du), dtype=np.float32)
    context = np.empty((n, dc), dtype=np.float32)
    for i in range(0, n, chunk):
        sl = slice(i, min(i + chunk, n))
        m = sl.stop - sl.start
        local[sl] = rng.standard_normal((m, du), dtype=np.float32)
        local[sl] += mu_l[y[sl]] + shift[t[sl]]
        context[sl] = rng.standard_normal((m, dc), dtype=np.float32)
        context[sl] += mu_c[y[sl]]
    x_um = rng.uniform(0, 8000, n)
    y_um = rng.uniform(0, 6000, n)
    meta = pl.DataFrame(
        {
            "slide_id": pl.Series([f"slide{s:02d}" for s in range(n_slides)])[slide],
            "cell_id": np.arange(n),
            "x_px": x_um / 0.25,
            "y_px": y_um / 0.25,
            "x_um": x_um,
            "y_um": y_um,
            "tissue": pl.Series([f"tissue{k}" for k in range(n_tissues)])[t],
            "label": pl.Series([f"class{k:02d}" for k in range(n_classes)])[y],
        }
    )
    return meta, local, context


def bare_loop_cells_per_s(
    u: torch.Tensor, t: torch.Tensor, y: torch.Tensor, n_tissues: int, n_classes: int, cfg: TrainConfig,
    epochs: int = 1,
) -> float:
    """A plain PyTorch training loop with the FiLM head's layer sizes: the baseline rate."""
    torch.manual_seed(0)
    d = u.shape[1]
    emb = torch.nn.Embedding(n_tissues, 64)
    film = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 2 * d))
    norm = torch.nn.LayerNorm(d)
    mlp = torch.nn.Sequential(torch.nn.Dropout(cfg.dropout), torch.nn.Linear(d, cfg.hidden), torch.nn.SiLU(),
                              torch.nn.Dropout(cfg.dropout), torch.nn.Linear(cfg.hidden, n_classes))  # fmt: skip
    params = [*emb.parameters(), *film.parameters(), *norm.parameters(), *mlp.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, bs = u.shape[0], cfg.batch_size
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            gamma, beta = film(emb.weight)[t[idx]].chunk(2, dim=1)  # per tissue, as the head does
            logits = mlp(norm(u[idx]) * (1 + gamma) + beta)
            loss = torch.nn.functional.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return epochs * n / (time.perf_counter() - t0)


def seconds_to_near_best(hist: list[dict], tol: float = 0.005) -> float | None:
    """Training seconds (sum of epoch times) until val macro-F1 first came within `tol` of its best."""
    best = max(r["val_macro_f1"] for r in hist)
    total = 0.0
    for r in hist:
        total += r["seconds"]
        if r["val_macro_f1"] >= best - tol:
            return round(total, 1)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=None, help="stage 1 and 2 epochs")
    ap.add_argument("--gate-epochs", type=int, default=None)
    ap.add_argument("--local-dim", type=int, default=1536)
    ap.add_argument("--context-dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--tissues", type=int, default=8)
    ap.add_argument("--slides", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=None, help="keep checkpoints here (default: temp dir)")
    ap.add_argument("--stages", default="local,global,gate",
                    help="stages to train (later ones read earlier checkpoints from --run-dir)")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch log lines on stderr")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = TrainConfig(seed=args.seed, device=args.device)
    if args.epochs is not None:
        cfg.epochs, cfg.global_epochs = args.epochs, args.epochs
    if args.gate_epochs is not None:
        cfg.gate_epochs = args.gate_epochs

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    mem = PeakRSS()
    rss0 = mem.proc.memory_info().rss
    t0 = time.perf_counter()
    meta, local, context = synthetic_cells(
        args.cells, args.local_dim, args.context_dim, args.classes, args.tissues, args.slides,
        args.seed,
    )
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = CellData.from_arrays(meta, local, context, provenance={"bench": "synthetic"})
    split = make_split(data.meta)
    load_s = time.perf_counter() - t0
    result: dict = {
        "cells": args.cells,
        "dims": {"local": args.local_dim, "context": args.context_dim},
        "classes": args.classes,
        "tissues": args.tissues,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "split": split.summary(),
        "settings": {k: cfg.to_dict()[k] for k in (
            "epochs", "global_epochs", "gate_epochs", "batch_size", "lr", "warmup_steps",
            "patience", "gate_lr", "gate_head_lr")},
        "generate_s": round(gen_s, 2),
        "celldata_and_split_s": round(load_s, 2),
        "rss_after_data_mb": round(mem.proc.memory_info().rss / 2**20),
        "rss_before_data_mb": round(rss0 / 2**20),
        "stages": {},
    }
    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_heads_")
        run_dir = tmp.name
    total = 0.0
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    for stage in stages:
        mem.reset()
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = train_stage(stage, data, run_dir, cfg, split=split, log=log)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        total += wall
        _, hist = out[stage]
        result["stages"][stage] = {
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),  # process CPU time: less sensitive to other load than wall
            "peak_rss_mb": round(mem.peak / 2**20),
            "epochs_run": len(hist),
            "cells_per_s": [round(r["cells_per_s"]) for r in hist],
            "epoch_s": [round(r["seconds"], 1) for r in hist],
            "val_macro_f1": [round(r["val_macro_f1"], 4) for r in hist],
            "best_val_macro_f1": round(max(r["val_macro_f1"] for r in hist), 4),
            "train_s_to_within_0.005_of_best": seconds_to_near_best(hist),
        }
    result["train_total_s"] = round(total, 1)
    if "local" in result["stages"]:
        labelled = split.train[data.label.numpy()[split.train] >= 0]
        rows = torch.from_numpy(labelled)
        bare = bare_loop_cells_per_s(data.local[rows], data.tissue[rows], data.label[rows], data.n_tissues,
                                     data.n_classes, cfg)  # fmt: skip
        heads_rate = float(np.median(result["stages"]["local"]["cells_per_s"]))
        result["bare_torch_loop"] = {
            "cells_per_s": round(bare),
            "local_stage_cells_per_s_median": round(heads_rate),
            "share_of_bare": round(heads_rate / bare, 3),
            "goal_share_at_least": 0.8,
        }
    if len(stages) == 3:
        result["goal_under_300_s"] = total < 300

    mem.reset()
    t0 = time.perf_counter()
    val = split.val
    pred = predict_all(data.subset(val), run_dir, device=args.device)
    result["predict_val"] = {
        "cells": int(val.size),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(mem.peak / 2**20),
    }
    y = data.label.numpy()[val]
    # local/global: the stage-1/2 heads as trained; *_gate: the gate model's fine-tuned paths
    paths = [p for p in ("local", "global", "gate", "local_gate", "global_gate")
             if f"pred_{p}" in pred]
    result["val_macro_f1"] = {p: round(macro_f1(y, pred[f"pred_{p}"]), 4) for p in paths}
    result["val_accuracy"] = {p: round(float((pred[f"pred_{p}"] == y).mean()), 4) for p in paths}
    if "gate" in pred:
        g = pred["gate"]
        result["gate_mean_by_group"] = {  # context-only classes should lean on the global path
            "local_defined_classes": round(float(g[y < args.classes // 2].mean()), 3),
            "context_only_classes": round(float(g[y >= args.classes // 2].mean()), 3),
        }
    result["peak_rss_process_mb"] = round(
        max(mem.peak, psutil.Process().memory_info().rss) / 2**20
    )
    try:  # the kernel's own high-water mark of the process (Linux)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                result["vm_hwm_mb"] = round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    result["load_avg_end"] = list(os.getloadavg())
    mem.stop()
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
