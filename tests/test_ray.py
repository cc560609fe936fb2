"""`extract` on Ray: same rows and vectors as one process, provenance per worker, a worker
killed with kill -9 mid-slide is restarted and its slide retried without loss or duplicates,
one slide split into spatial shards, and a URI store (no file lock) written by two workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import polars as pl
import pytest

from embedstore.extract.pipeline import ExtractConfig, extract
from embedstore.store import Store, arrow_to_vectors

ray = pytest.importorskip("ray")

#: test backbones, small fields, frequent commits (progress and kills land mid-slide)
CFG = dict(local_backbone="test-vit-local", context_backbone="test-vit-context",
           context_input_px=64, batch_size=8, workers=1, commit_every=8)  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from embedstore.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("ray") / "data", seed=11, n_cells=240, n_slides=6)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (extract_ray joins it and leaves it running)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory, one_torch_thread):
    """The single-process extraction of the cohort: (db, vectors by key)."""
    db = tmp_path_factory.mktemp("ref") / "db"
    extract(cohort.out_dir / "slides", cohort.cells_path, db, ExtractConfig(**CFG))
    return db, _vectors(db)


def _vectors(db) -> pl.DataFrame:
    tb = Store(db).open("cells").to_lance().to_table(columns=["slide_id", "cell_id", "local", "context"])
    frame = pl.from_arrow(tb.select(["slide_id", "cell_id"]))
    vecs = {k: arrow_to_vectors(tb.column(k)) for k in ("local", "context")}
    return frame.with_columns(**{k: pl.Series(k, list(v)) for k, v in vecs.items()})


def _compare(got: pl.DataFrame, ref: pl.DataFrame) -> tuple[float, bool]:
    """(lowest cosine over cells and vector kinds, whether all vectors are bit-identical)."""
    assert got.height == got.select("slide_id", "cell_id").unique().height  # no duplicates
    joined = ref.join(got, on=["slide_id", "cell_id"], how="left", suffix="_got")
    assert joined.height == got.height and joined["local_got"].null_count() == 0  # same rows
    worst, same = 1.0, True
    for k in ("local", "context"):
        a, b = np.stack(joined[k].to_list()), np.stack(joined[f"{k}_got"].to_list())
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        worst, same = min(worst, float(cos.min())), same and np.array_equal(a, b)
    return worst, same


def test_ray_stores_what_one_process_stores_and_names_the_workers(cohort, cluster, reference, tmp_path):
    from embedstore.extract.distributed import extract_ray

    events: list[tuple[str, dict]] = []
    db = tmp_path / "db"
    summary = extract_ray(cohort.out_dir / "slides", cohort.cells_path, db, ExtractConfig(**CFG),
                          workers=2, on_event=lambda k, d: events.append((k, d)))  # fmt: skip
    ref_db, ref = reference
    worst, same = _compare(_vectors(db), ref)
    print(f"min cosine {worst:.7f}, bit-identical {same}")
    assert worst >= 0.9999
    assert summary["written"] == ref.height and summary["slides_done"] == 6
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["ray_workers", "start", "slide"] and kinds[-1] == "done"
    assert sum(d["n"] for k, d in events if k == "progress") == ref.height  # one bar, all cells
    # the runs table: one finished run per slide, each naming the worker (node, actor, pid)
    runs = Store(db).runs()
    assert runs.height == 6 and set(runs["status"]) == {"finished"} and set(runs["engine"]) == {"ray"}
    workers = {r["run_id"]: json.loads(r["worker"]) for r in runs.iter_rows(named=True)}
    pids = {w["pid"] for w in summary["workers"]}
    assert {w["pid"] for w in workers.values()} <= pids and all(w["node_id"] and w["actor_id"] for w in workers.values())
    by_worker = {}
    for r in runs.iter_rows(named=True):
        by_worker.setdefault(workers[r["run_id"]]["actor_id"], set()).update(json.loads(r["slides"]))
    assert by_worker == {a: set(s) for a, s in summary["tasks_by_worker"].items()}
    assert set(runs["ray_task"]) == set(cohort_slides(cohort))
    assert sorted(summary["run_ids"]) == sorted(runs["run_id"]) and set(runs["ray_job"]) == {summary["run_id"]}


def test_a_worker_killed_mid_slide_is_restarted_and_nothing_is_lost_or_doubled(cohort, cluster, reference, tmp_path):
    from embedstore.extract.distributed import extract_ray

    db = tmp_path / "db"
    killed: list[int] = []
    victim: dict = {}  # the first worker's pid, actor id and current slide

    def on_event(kind: str, data: dict) -> None:
        if kind == "ray_workers":
            victim.update(pid=data["workers"][0]["pid"], actor=data["workers"][0]["actor_id"])
        elif kind == "ray_task" and data["actor_id"] == victim["actor"]:
            victim["slide"] = data["slide_id"]
        elif kind == "progress" and not killed and 0 < _stored(db, victim["slide"]) < 30:
            os.kill(victim["pid"], signal.SIGKILL)  # mid-slide: some of its cells are committed
            killed.append(victim["pid"])

    summary = extract_ray(cohort.out_dir / "slides", cohort.cells_path, db, ExtractConfig(**CFG),
                          workers=2, poll_s=0.05, on_event=on_event)  # fmt: skip
    assert killed and summary["slides_failed"] == 0
    ref_db, ref = reference
    worst, _ = _compare(_vectors(db), ref)  # every cell once, same vectors
    assert worst >= 0.9999
    runs = Store(db).runs()
    # the killed attempt's run reads interrupted; its slide was retried by the restarted actor
    assert "interrupted" in set(runs["status"]), runs.select("run_id", "status", "slides")
    finished = runs.filter(pl.col("status") == "finished")
    assert sorted(s for r in finished["slides"] for s in json.loads(r)) == sorted(cohort_slides(cohort))
    assert killed[0] not in {json.loads(w)["pid"] for w in finished["worker"]}  # restarted: a new pid
    # the killed run names the worker it died in (tagged from its first record on)
    dead = runs.filter(pl.col("status") == "interrupted")
    assert [json.loads(w)["pid"] for w in dead["worker"]] == killed and set(dead["ray_task"]) == {victim["slide"]}
    retry = json.loads(finished.filter(pl.col("slides").str.contains(victim["slide"]))["slides"][0])[victim["slide"]]
    assert retry["already"] > 0 and retry["written"] > 0  # resumed where the kill left it, not redone


def test_a_big_slide_is_split_into_spatial_shards_with_the_whole_slides_vectors(cohort, cluster, tmp_path):
    """Bands of one slide on both workers; in tiled context mode (the case where a shard could
    differ: the tile grid is anchored to the slide, not the shard) the vectors equal one pass."""
    from embedstore.extract.distributed import extract_ray, spatial_shards

    cfg = ExtractConfig(**CFG, context="tiled", context_pooling="mean", tile_px=256, tile_overlap_px=64)
    cells = pl.read_parquet(cohort.cells_path)
    one = cells.filter(pl.col("slide_id") == cells["slide_id"][0])
    bands = spatial_shards(one, 12)
    assert len(bands) == -(-one.height // 12) >= 3 and sum(b.height for b in bands) == one.height
    assert all(a["y_px"].max() <= b["y_px"].min() for a, b in zip(bands, bands[1:], strict=False))  # top to bottom
    extract(cohort.out_dir / "slides", one, tmp_path / "whole", cfg)
    events: list[tuple[str, dict]] = []
    summary = extract_ray(cohort.out_dir / "slides", one, tmp_path / "bands", cfg, workers=2, shard_cells=12,
                          on_event=lambda k, d: events.append((k, d)))  # fmt: skip
    assert summary["tasks"] == len(bands) and summary["slides_done"] == 1
    labels = [d["task"] for k, d in events if k == "ray_task"]
    assert labels == [f"{one['slide_id'][0]}#{i + 1}/{len(bands)}" for i in range(len(bands))]
    assert len({d["actor_id"] for k, d in events if k == "ray_task"}) == 2  # both workers on one slide
    worst, same = _compare(_vectors(tmp_path / "bands"), _vectors(tmp_path / "whole"))
    print(f"tiled, {summary['tasks']} bands: min cosine {worst:.7f}, bit-identical {same}")
    assert worst >= 0.9999
    runs = Store(tmp_path / "bands").runs()
    assert sorted(runs["ray_task"]) == sorted(labels) and set(runs["status"]) == {"finished"}


def _stored(db, slide_id: str) -> int:
    return Store(db).open("cells").count_rows(f"slide_id = '{slide_id}'")


def cohort_slides(cohort) -> list[str]:
    return pl.read_parquet(cohort.cells_path)["slide_id"].unique().to_list()


def test_cli_engine_ray_into_a_uri_store_without_a_file_lock(cohort, cluster, reference, tmp_path):
    """`embed extract --engine ray --db file://...`: the object-store write path (no flock,
    keyed merge-inserts) with two workers stores the single-process rows and vectors once."""
    uri = f"file://{tmp_path / 'db'}"
    cmd = [sys.executable, "-m", "cli.embed", "extract", str(cohort.out_dir / "slides"), "--cells", str(cohort.cells_path),
           "--db", uri, "--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context",
           "--context-px", "64", "--batch-size", "8", "--commit-every", "8", "--quiet",
           "--engine", "ray", "--ray-workers", "2", "--address", cluster]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 Ray workers: 6 tasks" in out.stdout + out.stderr
    assert not Store(uri).local
    _, ref = reference
    worst, _ = _compare(_vectors(uri), ref)
    assert worst >= 0.9999
    again = extract(cohort.out_dir / "slides", cohort.cells_path, uri, ExtractConfig(**CFG))
    assert again["written"] == 0 and again["already_stored"] == ref.height


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, cohort, tmp_path):
    from embedstore.errors import UserError
    from embedstore.extract.distributed import extract_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install \.\[ray\]"):
        extract_ray(cohort.out_dir / "slides", cohort.cells_path, tmp_path / "db", ExtractConfig(**CFG))


def test_the_default_install_does_not_import_ray():
    code = "import sys, cli.embed, embedstore.extract.pipeline, embedstore.store; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
