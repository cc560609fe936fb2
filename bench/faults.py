"""Fault injection: kill -9 the writing commands at random moments, rerun, count the damage.

    python bench/faults.py [--kills 6] [--cells 160] [--seed 0] [--concurrent 3] [--keep DIR]

Commands: `embed extract`, `embed labels`, `heads predict`, `embed index`, `heads train`, each
run as a subprocess on a small synthetic cohort. Every trial kills the command one or more times with
SIGKILL, either at a random moment of its run or at a failpoint (`embedstore.faults`): inside
a Lance commit (a timer fires 0-10 ms after the commit starts), just after one, while a run
record, the label merge, the compaction, the predictions or the index are written. After
every kill the store must hold no duplicate key; after the rerun that follows, every expected
row must be there exactly once and hold the same values as an uninterrupted run (vectors to
fp16 precision: cosine >= 0.9999, labels exactly, probabilities to float32 rounding (1e-6: the heads'
matrix kernels may round another process's batches 3e-8 apart), the index answering the same neighbours);
a killed `heads train` must leave its run either whole (the old one) or refused by readers as
half-saved, never a silent mix, and its rerun must finish it.
Prints JSON: per command the kills made (and how many landed in a commit), rows lost, rows
duplicated, the largest vector difference; the last two counts must be 0. Then rounds of two
extractions into one store at once (the same cells; different slides): rows lost and
duplicated, processes failed (all must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedstore.store import Store  # noqa: E402

BACKBONES = ["--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context",
             "--context-px", "64", "--batch-size", "8", "--commit-every", "16", "--quiet"]  # fmt: skip


def cli(prog: str, *args, kill: tuple | None = None, timeout: float = 600, argv: list[str] | None = None) -> dict:
    """Run `prog args` (a console script module; or the command `argv`), killing it as `kill` says.

    kill: ("time", seconds) or ("point", "commit.during:3"). Returns returncode, killed, stderr.
    """
    env = dict(os.environ)
    env.pop("NUCLASS_KILL_AT", None)
    if kill and kill[0] == "point":
        env["NUCLASS_KILL_AT"] = kill[1]
    proc = subprocess.Popen(argv or [sys.executable, "-m", f"cli.{prog}", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if kill and kill[0] == "time":
        try:
            proc.wait(kill[1])
        except subprocess.TimeoutExpired:
            proc.kill()
    _, err = proc.communicate(timeout=timeout)
    return {"returncode": proc.returncode, "killed": proc.returncode == -9, "stderr": err[-2000:]}


def tally(out: dict, kill: tuple, result: dict) -> bool:
    """Count a kill that happened, by where it was aimed (a failpoint, or a random moment)."""
    if not result["killed"]:
        return False
    where = kill[1].split(":")[0] if kill[0] == "point" else "random moment"
    out["kills"] += 1
    out["kills_in_commit"] += where.endswith(".during")
    out["kills_at"][where] = out["kills_at"].get(where, 0) + 1
    return True


def new_tally() -> dict:
    return {"kills": 0, "kills_in_commit": 0, "kills_at": {}, "rows_lost": 0, "rows_duplicated": 0}


def keys_of(db: Path, table: str, columns=("slide_id", "cell_id")) -> pl.DataFrame:
    store = Store(db)
    if not store.has(table):
        return pl.DataFrame({c: [] for c in columns}, schema={c: pl.Utf8 for c in columns})
    return pl.from_arrow(store.open(table).to_lance().to_table(columns=list(columns)))


def damage(found: pl.DataFrame, expected: pl.DataFrame, on: list[str]) -> dict:
    """Rows of `expected` missing from `found`, and extra copies of keys in `found`."""
    lost = expected.join(found.unique(), on=on, how="anti").height
    dup = found.height - found.unique(subset=on).height
    return {"rows_lost": lost, "rows_duplicated": dup}


class Cohort:
    """Synthetic slides, an uninterrupted reference store, a trained run and its outputs."""

    def __init__(self, work: Path, n_cells: int, seed: int):
        from embedstore.synth import make_synthetic
        from heads import runs
        from heads.splits import SplitConfig
        from heads.train import TrainConfig

        self.work = work
        data = make_synthetic(work / "data", seed=seed, n_cells=n_cells, n_slides=2)
        self.slides, self.cells = data.out_dir / "slides", data.cells_path
        self.ref = work / "ref"
        t = time.perf_counter()
        out = cli("embed", "extract", self.slides, "--cells", self.cells, "--db", self.ref, *BACKBONES)
        assert out["returncode"] == 0, out["stderr"]
        self.extract_s = time.perf_counter() - t
        self.expected = keys_of(self.ref, "cells")
        self.ref_vectors = self.vectors(self.ref)
        self.run = work / "run"
        runs.train(self.ref, self.run, "all", TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=64),
                   split_config=SplitConfig(guard_um=0, min_cells=10),  # tiny slides: any trained run will do
                   scale=False, log=lambda m: None)  # fmt: skip
        rng = np.random.default_rng(seed)
        self.new_labels = self.expected.with_columns(label=pl.Series(rng.choice(["A", "B", "C"], self.expected.height)))
        self.labels_file = work / "new_labels.parquet"
        self.new_labels.write_parquet(self.labels_file)
        self.ref_pred = self.copy_ref("pred_ref")
        runs.predict(self.run, self.ref_pred, out_dir=work / "pred_ref_out", log=lambda m: None)
        self.ref_proba = self.predictions(self.ref_pred)
        from embedstore.search import explore

        self.ref_similar = explore.similar(self.ref_pred, self.first_cell(), k=10)["cell_id"].to_list()

    def copy_ref(self, name: str) -> Path:
        dst = self.work / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.ref, dst)
        return dst

    def first_cell(self) -> str:
        row = self.expected.sort("slide_id", "cell_id").row(0)
        return f"{row[0]}:{row[1]}"

    @staticmethod
    def vectors(db: Path) -> dict:
        loaded = Store(db).load(dtype=np.float32)
        order = np.lexsort((loaded.meta["cell_id"].to_numpy(), loaded.meta["slide_id"].to_numpy()))
        return {k: v[order] for k, v in loaded.vectors.items()}

    @staticmethod
    def predictions(db: Path) -> np.ndarray:
        frame = Store(db).predictions().sort("slide_id", "cell_id")
        return np.stack(frame["proba"].to_numpy())


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def trial_extract(c: Cohort, db: Path, kills: list[tuple]) -> dict:
    out = new_tally()
    args = ("embed", "extract", c.slides, "--cells", c.cells, "--db", db, *BACKBONES)
    for kill in kills:
        r = cli(*args, kill=kill)
        if not tally(out, kill, r):
            assert r["returncode"] == 0, r["stderr"]
            continue
        dup = damage(keys_of(db, "cells"), keys_of(db, "cells"), ["slide_id", "cell_id"])["rows_duplicated"]
        out["rows_duplicated"] += dup  # no duplicate may appear even between kill and rerun
    r = cli(*args)
    assert r["returncode"] == 0, r["stderr"]
    d = damage(keys_of(db, "cells"), c.expected, ["slide_id", "cell_id"])
    out["rows_lost"] += d["rows_lost"]
    out["rows_duplicated"] += d["rows_duplicated"]
    if not d["rows_lost"] and not d["rows_duplicated"]:
        got = c.vectors(db)
        out["max_abs_vector_diff"] = max(float(np.abs(got[k] - c.ref_vectors[k]).max()) for k in got)
        out["min_vector_cosine"] = min(_min_cosine(got[k], c.ref_vectors[k]) for k in got)
    runs = Store(db).runs()
    out["runs_left_running"] = int((runs["status"] == "running").sum())
    labels = Store(db).labels()
    out["labels_missing"] = c.expected.height - (0 if labels is None else labels.filter(pl.col("label").is_not_null()).height)
    return out


def trial_labels(c: Cohort, db: Path, kills: list[tuple]) -> dict:
    out = {**new_tally(), "torn": 0}
    args = ("embed", "labels", c.labels_file, "--db", db)
    for kill in kills:
        tally(out, kill, cli(*args, kill=kill))
        labels = Store(db).labels()  # the old labels or the new ones, whole, never a mix
        out["torn"] += not (labels.height == c.expected.height and labels["source"].n_unique() == 1)
    r = cli(*args)
    assert r["returncode"] == 0, r["stderr"]
    labels = Store(db).labels()
    out.update(damage(labels.select("slide_id", "cell_id"), c.expected, ["slide_id", "cell_id"]))
    j = labels.join(c.new_labels, on=["slide_id", "cell_id"], suffix="_want")
    out["wrong_values"] = int((j["label"] != j["label_want"]).sum())
    return out


def trial_predict(c: Cohort, db: Path, kills: list[tuple]) -> dict:
    out = new_tally()
    args = ("heads", "predict", "--run", c.run, "--db", db, "--out", db.parent / f"{db.name}_pred")
    for kill in kills:
        tally(out, kill, cli(*args, kill=kill))
        found = keys_of(db, "predictions", ("run", "slide_id", "cell_id"))
        out["rows_duplicated"] += found.height - found.unique().height
    r = cli(*args)
    assert r["returncode"] == 0, r["stderr"]
    d = damage(keys_of(db, "predictions", ("slide_id", "cell_id")), c.expected, ["slide_id", "cell_id"])
    out["rows_lost"] += d["rows_lost"]
    out["rows_duplicated"] += d["rows_duplicated"]
    pq = pl.read_parquet(db.parent / f"{db.name}_pred" / "predictions.parquet")
    out["parquet_complete"] = pq.height == c.expected.height
    out["max_abs_proba_diff"] = float(np.abs(c.predictions(db) - c.ref_proba).max())
    return out


def trial_index(c: Cohort, db: Path, kills: list[tuple]) -> dict:
    from embedstore.search import explore

    out = new_tally()
    args = ("embed", "index", "--db", db, "--vector", "local")
    for kill in kills:
        tally(out, kill, cli(*args, kill=kill))
    r = cli(*args)
    assert r["returncode"] == 0, r["stderr"]
    index, meta, _ = explore.open_index(db, vector="local", rebuild=False, with_vectors=False)
    rows = pl.read_parquet(explore.index_dir(db, "cells", "local") / explore.ROWS_FILE)
    out.update(damage(rows, c.expected, ["slide_id", "cell_id"]))
    out["index_complete"] = int(index.ntotal) == c.expected.height
    out["same_neighbours"] = explore.similar(db, c.first_cell(), k=10)["cell_id"].to_list() == c.ref_similar
    return out


#: `heads train --stage all` as the Cohort's run was trained (a split for its tiny slides), another seed
TRAIN = """import sys
from heads import runs
from heads.splits import SplitConfig
from heads.train import TrainConfig
runs.train(sys.argv[1], sys.argv[2], "all", TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=64, seed=7),
           split_config=SplitConfig(guard_um=0, min_cells=10, seed=7), scale=False, log=lambda m: None)
"""


def trial_train(c: Cohort, db: Path, kills: list[tuple]) -> dict:
    """Retrain a copy of the run (another seed), killed; after each kill a reader either finds the
    old run whole or is refused (the run is marked half-saved), never a mix; the rerun finishes it."""
    from embedstore.errors import UserError
    from heads import runs
    from heads.export import run_digest

    run = db.parent / f"{db.name}_run"
    shutil.copytree(c.run, run)
    old = run_digest(run)
    argv = [sys.executable, "-c", TRAIN, str(db), str(run)]
    out = {**new_tally(), "silent_mixes": 0, "refused_as_half_saved": 0, "old_run_whole": 0}
    for kill in kills:
        if not tally(out, kill, cli("", kill=kill, argv=argv)):
            continue
        try:
            runs.evaluate_run(run, db, baselines=(), log=lambda m: None)
        except UserError as exc:
            half = "stopped before it finished" in str(exc)
            out["refused_as_half_saved"] += half
            out["silent_mixes"] += not half  # refused, but not for that: a mix the marker missed
        else:
            whole = run_digest(run) == old
            out["old_run_whole"] += whole
            out["silent_mixes"] += not whole
    r = cli("", argv=argv)
    assert r["returncode"] == 0, r["stderr"]
    runs.evaluate_run(run, db, baselines=(), log=lambda m: None)
    out["finished"] = (run_digest(run) != old and not (run / ".training").exists()
                       and all((run / f).exists() for f in ("gate.json", "conformal.json", "safety.json")))  # fmt: skip
    return out


def plans(command: str, n: int, c: Cohort, rng: random.Random) -> list[list[tuple]]:
    """`n` kills for `command`, grouped into trials of one or two kills before the rerun."""
    n_commits = max(1, c.expected.height // 16)
    points = {
        "extract": [f"commit.during:{rng.randint(1, n_commits)}", f"commit.after:{rng.randint(1, n_commits)}",
                    "compact.during:1", "labels.during:1", f"run.during:{rng.randint(1, 3)}"],
        "labels": ["labels.during:1"],
        "predict": ["predictions.during:1"],
        "index": ["index.during:1"],
        "train": [f"heads.save:{rng.randint(1, 3)}", f"heads.save:{rng.randint(1, 3)}"],
    }[command]  # fmt: skip
    span = {"extract": c.extract_s, "labels": 6.0, "predict": 12.0, "index": 10.0, "train": 7.0}[command]
    kills = []
    for i in range(n):
        if i % 2 == 0:
            kills.append(("point", points[(i // 2) % len(points)]))
        else:
            kills.append(("time", rng.uniform(0.3, 1.0) * span))
    return [kills[i : i + 2] for i in range(0, len(kills), 2)]


def concurrent(c: Cohort, n: int) -> dict:
    """`n` times: two `embed extract` of the same cells into one new store at once, then two
    of different slides. Rows and unique keys must both equal the cells given."""
    cells = pl.read_parquet(c.cells)
    per_slide = []
    for sid in sorted(cells["slide_id"].unique()):
        per_slide.append(c.work / f"cells_{sid}.parquet")
        cells.filter(pl.col("slide_id") == sid).write_parquet(per_slide[-1])
    out = {"runs": 0, "failed_processes": 0, "rows_lost": 0, "rows_duplicated": 0, "cells_skipped_as_stored_by_the_other": 0}
    for i in range(n):
        for mode, inputs in (("same", [c.cells, c.cells]), ("different", per_slide[:2])):
            db = c.work / f"concurrent_{mode}_{i}"
            procs = [subprocess.Popen([sys.executable, "-m", "cli.embed", "extract", str(c.slides), "--cells", str(cf),
                                       "--db", str(db), *BACKBONES], cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL) for cf in inputs]  # fmt: skip
            out["failed_processes"] += sum(p.wait(600) != 0 for p in procs)
            out["runs"] += 1
            want = pl.concat([pl.read_parquet(cf) for cf in dict.fromkeys(inputs)]).select("slide_id", "cell_id")
            d = damage(keys_of(db, "cells"), want, ["slide_id", "cell_id"])
            out["rows_lost"] += d["rows_lost"]
            out["rows_duplicated"] += d["rows_duplicated"]
            if mode == "same":
                counts = [json.loads(x) for x in Store(db).runs()["counts"]]
                out["cells_skipped_as_stored_by_the_other"] += sum(x.get("already_stored", 0) for x in counts)
    return out


TRIALS = {"extract": trial_extract, "labels": trial_labels, "predict": trial_predict, "index": trial_index,
          "train": trial_train}


def campaign(work: Path, *, kills: int | dict[str, int] = 6, n_cells: int = 160, seed: int = 0,
             concurrent_runs: int = 0) -> dict:  # fmt: skip
    """Kill each command `kills` times (or `kills[command]` times, for the commands named)."""
    kills = kills if isinstance(kills, dict) else dict.fromkeys(TRIALS, kills)
    commands = list(kills)
    rng = random.Random(seed)
    c = Cohort(work, n_cells, seed)
    report: dict = {"cells": c.expected.height, "reference_extract_s": round(c.extract_s, 1)}
    for command in commands:
        totals: dict = {}
        for t, trial_kills in enumerate(plans(command, kills[command], c, rng)):
            db = work / f"{command}_{t}"
            if command != "extract":
                db = c.copy_ref(db.name)
            result = TRIALS[command](c, db, trial_kills)
            for k, v in result.items():
                if isinstance(v, dict):
                    totals[k] = {w: totals.get(k, {}).get(w, 0) + v.get(w, 0) for w in {*totals.get(k, {}), *v}}
                elif isinstance(v, bool):
                    totals[k] = totals.get(k, True) and v
                elif k.startswith("max_"):
                    totals[k] = max(totals.get(k, 0.0), v)
                elif k.startswith("min_"):
                    totals[k] = min(totals.get(k, 1.0), v)
                else:
                    totals[k] = totals.get(k, 0) + v
        report[command] = totals
    report["total"] = {k: sum(report[c].get(k, 0) for c in commands) for k in ("kills", "kills_in_commit", "rows_lost", "rows_duplicated")}
    if concurrent_runs:
        report["concurrent_writers"] = concurrent(c, concurrent_runs)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=6, help="kills per command")
    ap.add_argument("--cells", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrent", type=int, default=3, help="rounds of two extractions at once (same cells, other slides)")
    ap.add_argument("--keep", type=Path, help="work here and keep the files")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="nuclass-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        report = campaign(work, kills=args.kills, n_cells=args.cells, seed=args.seed, concurrent_runs=args.concurrent)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t, 1)
    report["load_avg"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
