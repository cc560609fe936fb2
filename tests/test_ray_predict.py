"""`heads predict` on Ray: the rows, values and GeoJSON of the single-process `predict`, one
store row per (run, cell) after a rerun, and a worker killed with kill -9 mid-task is
restarted and its slide retried without loss or duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from embedstore.store import Store

ray = pytest.importorskip("ray")

#: test backbones, small fields: a 4-slide store in a few seconds
CFG = dict(local_backbone="test-vit-local", context_backbone="test-vit-context",
           context_input_px=64, batch_size=16, workers=1, commit_every=64)  # fmt: skip
#: every Ray task sleeps this long after its writes: the kill test's window (set for the module's Ray)
DELAY_S = "0.3"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module; its workers inherit the test-only task delay."""
    from heads.distributed import DELAY_ENV

    old = os.environ.get(DELAY_ENV)
    os.environ[DELAY_ENV] = DELAY_S
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    finally:
        if old is None:
            os.environ.pop(DELAY_ENV)
        else:
            os.environ[DELAY_ENV] = old
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """A labelled 4-slide store and a tiny run trained on it (all three stages): (db, run dir)."""
    from embedstore.extract.pipeline import ExtractConfig, extract
    from embedstore.synth import make_synthetic
    from heads import runs
    from heads.splits import SplitConfig
    from heads.train import TrainConfig

    root = tmp_path_factory.mktemp("raypred")
    syn = make_synthetic(root / "data", seed=5, n_cells=240, n_slides=4)
    db = root / "db"
    extract(syn.out_dir / "slides", syn.cells_path, db, ExtractConfig(**CFG))
    cfg = TrainConfig(epochs=2, global_epochs=2, gate_epochs=1, batch_size=64)
    runs.train(
        db,
        root / "run",
        "all",
        cfg,
        scale=False,
        split_config=SplitConfig(guard_um=40),
        log=lambda m: None,
    )
    return db, root / "run"


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """The single-process `predict` output (its own store copy is not needed: it only upserts)."""
    from heads.runs import predict

    db, run_dir = run
    out = tmp_path_factory.mktemp("ref")
    frame = predict(run_dir, db, out_dir=out, log=lambda m: None)
    return frame, out


def _same(got: pl.DataFrame, ref: pl.DataFrame) -> None:
    """Same columns, same keys once each, equal values (floats within 1e-6)."""
    assert got.columns == ref.columns and got.schema == ref.schema
    assert got.select("slide_id", "cell_id").is_unique().all()
    key = ["slide_id", "cell_id"]
    a, b = got.sort(key), ref.sort(key)
    assert a.select(key).equals(b.select(key))
    for c in ref.columns:
        if ref.schema[c].is_float():
            diff = np.abs(a[c].to_numpy().astype(np.float64) - b[c].to_numpy().astype(np.float64))
            assert np.nanmax(diff, initial=0.0) <= 1e-6, c
            assert (np.isnan(a[c].to_numpy()) == np.isnan(b[c].to_numpy())).all()
        else:
            assert a[c].equals(b[c]), c


def _same_geojson(got: Path, ref: Path) -> None:
    """The same features in the same order; numbers within 1e-6: a batch of one slide and one of
    all slides may round a float32 sum differently (the matrix kernel depends on the batch size
    on some CPUs: 6e-8 on an AVX-512 Xeon)."""
    a, b = json.loads(got.read_text()), json.loads(ref.read_text())

    def same(x, y, where):
        if isinstance(x, float) or isinstance(y, float):
            assert abs(x - y) <= 1e-6, where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    same(a, b, got.name)


def _one_row_per_cell(db, run_name: str, n: int) -> None:
    stored = Store(db).predictions(run_name)
    assert stored.height == n and stored.select("slide_id", "cell_id").is_unique().all()


def test_ray_predict_equals_single_process(run, reference, cluster, tmp_path):
    from heads.distributed import predict_ray

    db, run_dir = run
    ref, ref_out = reference
    events: list[tuple[str, dict]] = []
    summary = predict_ray(run_dir, db, out_dir=tmp_path, workers=2, log=lambda m: None,
                          on_event=lambda k, d: events.append((k, d)))  # fmt: skip
    got = pl.read_parquet(tmp_path / "predictions.parquet")
    _same(got, ref)
    # a store written by one `extract` keeps each slide together: the same row order too
    assert got.select("slide_id", "cell_id").equals(ref.select("slide_id", "cell_id"))
    assert not (tmp_path / "parts").exists()  # parts merged and removed
    for path in sorted((ref_out / "geojson").glob("*.geojson")):
        _same_geojson(tmp_path / "geojson" / path.name, path)
    assert summary["cells"] == ref.height and summary["slides"] == 4
    assert sorted(s for v in summary["slides_by_worker"].values() for s in v) == sorted(
        ref["slide_id"].unique()
    )
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["ray_workers", "start"] and kinds[-1] == "done"
    assert sum(d["n"] for k, d in events if k == "progress") == ref.height  # one bar, all cells
    # the reference predict upserted the same run already: still one row per (run, cell)
    _one_row_per_cell(db, run_dir.name, ref.height)
    # one slide again: the file keeps the other slides' rows, as the single-process predict does
    one = ref["slide_id"][0]
    again = predict_ray(run_dir, db, out_dir=tmp_path, workers=1, slides=[one], log=lambda m: None)
    assert again["cells"] == int((ref["slide_id"] == one).sum())
    _same(pl.read_parquet(tmp_path / "predictions.parquet"), ref)


def test_a_worker_killed_mid_task_is_restarted_and_nothing_is_lost_or_doubled(
    run, reference, cluster, tmp_path
):
    from heads.distributed import predict_ray

    db, run_dir = run
    ref, _ = reference
    Store(db).db.drop_table("predictions")  # so the killed attempt's rows are the only ones
    killed: list[int] = []
    victim: dict = {}

    def kill_when_written(pid: int, slide: str) -> None:
        """SIGKILL the worker once its first task's rows are in the store (it then sleeps
        DELAY_S before reporting back): the retry writes part, GeoJSON and rows again."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if Store(db).has("predictions") and Store(db).open("predictions").count_rows(
                f"slide_id = '{slide}'"
            ):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    def on_event(kind: str, data: dict) -> None:
        if kind == "ray_workers":
            victim.update(pid=data["workers"][0]["pid"], actor=data["workers"][0]["actor_id"])
        elif kind == "ray_task" and data["actor_id"] == victim["actor"] and "thread" not in victim:
            victim["thread"] = threading.Thread(
                target=kill_when_written, args=(victim["pid"], data["slides"][0])
            )
            victim["thread"].start()

    summary = predict_ray(run_dir, db, out_dir=tmp_path, workers=1, slides_per_task=2, poll_s=0.05,
                          log=lambda m: None, on_event=on_event)  # fmt: skip
    victim["thread"].join()
    assert killed, "the worker was not killed mid-task"
    _same(pl.read_parquet(tmp_path / "predictions.parquet"), ref)
    _one_row_per_cell(db, run_dir.name, ref.height)
    assert summary["cells"] == ref.height


def test_cli_engine_ray_reruns_without_duplicates(run, reference, cluster, tmp_path):
    db, run_dir = run
    ref, _ = reference
    cmd = [sys.executable, "-m", "cli.heads", "predict", "--run", str(run_dir), "--db", str(db), "--out", str(tmp_path),
           "--engine", "ray", "--ray-workers", "2", "--address", cluster, "--quiet"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 Ray workers" in out.stdout + out.stderr
    _same(pl.read_parquet(tmp_path / "predictions.parquet"), ref)
    # the store's predictions were written by the kill test's run already: a rerun replaces them
    _one_row_per_cell(db, run_dir.name, ref.height)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, run, tmp_path):
    from embedstore.errors import UserError
    from heads.distributed import predict_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install \.\[ray\]"):
        predict_ray(run[1], run[0], out_dir=tmp_path)


def test_cells_of_a_tissue_the_run_never_saw_are_left_out_as_in_one_process(run, cluster, tmp_path):
    """A slide of an unknown tissue gets no task; a slide mixing tissues has its known cells
    predicted; the error names what was left out and the rows are the single process's."""
    import shutil

    from heads import runs
    from heads.distributed import predict_ray

    db, run_dir = run
    db = shutil.copytree(db, tmp_path / "db")  # the module's store stays as the other tests expect
    store = Store(db)
    rows = store.open("cells").to_lance().to_table()
    slides = sorted(set(rows.column("slide_id").to_pylist()))
    whole = pl.from_arrow(rows).filter(pl.col("slide_id") == slides[0])
    new = pl.concat([
        whole.with_columns(slide_id=pl.lit("kidney_slide"), tissue=pl.lit("kidney")),  # a slide of kidney only
        whole.head(5).with_columns(cell_id=pl.col("cell_id") + "_k", tissue=pl.lit("kidney")),  # mixed: 5 cells
    ])  # fmt: skip
    store.append("cells", new.to_arrow().cast(rows.schema))
    with pytest.raises(runs.SlidesSkipped) as one:
        runs.predict(run_dir, db, out_dir=tmp_path / "one", log=lambda m: None)
    with pytest.raises(runs.SlidesSkipped) as on_ray:
        predict_ray(run_dir, db, out_dir=tmp_path / "ray", workers=1, log=lambda m: None)
    assert str(on_ray.value) == str(one.value)
    assert "kidney_slide (kidney: " in str(on_ray.value) and f"{slides[0]} (kidney: 5 cells)" in str(on_ray.value)
    ref = pl.read_parquet(tmp_path / "one" / "predictions.parquet")
    got = pl.read_parquet(tmp_path / "ray" / "predictions.parquet")
    _same(got, ref)
    assert "kidney_slide" not in got["slide_id"].to_list() and not got["cell_id"].str.ends_with("_k").any()
    assert got.height == rows.num_rows  # every cell of a trained tissue, the mixed slide's too
