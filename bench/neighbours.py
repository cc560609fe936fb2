"""Do a cell's nearest neighbours share its class? hc-nucleus vs the tiny random test ViT.

    python bench/neighbours.py [--cells 1500] [--queries 300] [--k 20] [--seed 11]

On a synthetic dataset (`embedstore.synth.make_synthetic`, ground-truth labels in
cells.parquet) the local vectors are extracted once per local backbone (the same small
`test-vit-context` context backbone for both). For `--queries` random cells, the share of
their k nearest neighbours (cosine, exact search, the query itself excluded) carrying the
query's label is reported per backbone, with the chance level sum_l p_l^2 (a random neighbour
of a random query) and the seconds per 1,000 cells spent in each local backbone alone (crops
already read). Prints one JSON object on stdout; nothing else goes there.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

LOCALS = ("hc-nucleus", "test-vit-local")


def timed_extract(data, local: str, db: Path) -> float:
    """Extract `data` with `local` as the local backbone; seconds spent in its forward."""
    from embedstore.extract.pipeline import ExtractConfig, build_steps, extract, resolve_device

    cfg = ExtractConfig(local_backbone=local, context_backbone="test-vit-context",
                        context_input_px=128, batch_size=32, workers=2, device="cpu")
    steps = build_steps(cfg, resolve_device(cfg.device))
    local_step = next(s for s in steps if s.name == "local")
    spent = [0.0]
    embed = local_step.embed

    def timed(crops, device):
        t0 = time.perf_counter()
        out = embed(crops, device)
        spent[0] += time.perf_counter() - t0
        return out

    local_step.embed = timed
    extract(data.out_dir / "slides", data.cells_path, db, cfg, steps=steps)
    return spent[0]


def same_label_share(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray,
                     k: int) -> tuple[float, dict[str, float]]:
    """Mean share of each query's k nearest neighbours with its label, overall and per class."""
    from embedstore.search.index import exact_knn

    _, ids = exact_knn(vectors, vectors[queries], k, metric="cosine", query_ids=queries)
    hits = (labels[ids] == labels[queries][:, None]).mean(1)
    per_class = {str(c): round(float(hits[labels[queries] == c].mean()), 3)
                 for c in np.unique(labels[queries])}
    return float(hits.mean()), per_class


def load_local(db: Path, cells: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(local vectors, labels) of the stored cells, labels from the ground-truth table."""
    from embedstore.store import Store

    loaded = Store(db).load(vectors=("local",))
    meta = loaded.meta.select("slide_id", "cell_id").with_row_index("row").join(
        cells.select("slide_id", "cell_id", "label"), on=["slide_id", "cell_id"], how="left",
    ).sort("slide_id", "cell_id")  # one order for every store
    return loaded.vectors["local"][meta["row"].to_numpy()], meta["label"].to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=1500)
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()

    from embedstore.synth import make_synthetic

    with tempfile.TemporaryDirectory(prefix="neighbours-") as tmp:
        work = args.out or Path(tmp)
        data = make_synthetic(work / "data", seed=args.seed, n_cells=args.cells,
                              n_slides=args.slides, overwrite=True)
        cells = pl.read_parquet(data.cells_path)
        results, labels0 = {}, None
        for name in LOCALS:
            db = work / f"db-{name}"
            seconds = timed_extract(data, name, db)
            vectors, labels = load_local(db, cells)
            if labels0 is None:
                labels0 = labels
                rng = np.random.default_rng(args.seed)
                queries = np.sort(rng.choice(len(labels), min(args.queries, len(labels)),
                                             replace=False))
            if not np.array_equal(labels, labels0):
                raise RuntimeError(f"the {name} store holds other cells than the first one")
            share, per_class = same_label_share(vectors, labels, queries, args.k)
            results[name] = {"dim": int(vectors.shape[1]), "same_label_share": round(share, 3),
                             "s_per_1k_cells_local": round(1000 * seconds / len(labels), 2),
                             "per_class": per_class}
        _, counts = np.unique(labels0, return_counts=True)
        freq = counts / counts.sum()
        print(json.dumps({
            "dataset": {"seed": args.seed, "n_cells": int(len(labels0)), "n_slides": args.slides,
                        "classes": int(len(counts))},
            "k": args.k, "n_queries": int(len(queries)), "metric": "cosine, exact",
            "chance_same_label": round(float((freq**2).sum()), 3),
            "backbones": results,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }, indent=1))


if __name__ == "__main__":
    main()
