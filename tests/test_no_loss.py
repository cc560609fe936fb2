"""No silent loss: concurrent writers, label replacement, blank labels, dead runs, duplicates."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from embedstore.extract.pipeline import ExtractConfig, extract
from embedstore.store import Store, StoreError, cells_schema, vectors_to_arrow

from .conftest import FAST


def _extract_cmd(slides, cells, db) -> list[str]:
    return [sys.executable, "-m", "cli.embed", "extract", str(slides), "--cells", str(cells), "--db", str(db),
            "--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context",
            "--context-px", "64", "--batch-size", "8", "--commit-every", "16", "--quiet"]  # fmt: skip


def _run_together(*cmds) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    out = []
    for p, c in zip(procs, cmds, strict=True):
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


def _rows_and_keys(db, table="cells") -> tuple[int, int]:
    keys = Store(db).open(table).to_lance().to_table(columns=["slide_id", "cell_id"])
    return keys.num_rows, pl.from_arrow(keys).unique().height


@pytest.mark.slow
def test_two_extractors_on_the_same_cells_store_each_cell_once(synth_small, tmp_path):
    cells = pl.read_parquet(synth_small.cells_path).filter(pl.col("slide_id") == "synth_s0").head(64)
    path = tmp_path / "cells.parquet"
    cells.write_parquet(path)
    db = tmp_path / "db"
    cmd = _extract_cmd(synth_small.out_dir / "slides", path, db)
    a, b = _run_together(cmd, cmd)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert _rows_and_keys(db) == (cells.height, cells.height)
    runs = Store(db).runs()
    counts = [json.loads(c) for c in runs["counts"]]
    # between them the two runs wrote every cell exactly once
    assert sum(c["written"] for c in counts) == cells.height, counts
    assert set(runs["status"]) == {"finished"}


@pytest.mark.slow
def test_two_extractors_on_different_slides_both_finish(synth_small, tmp_path):
    all_cells = pl.read_parquet(synth_small.cells_path).group_by("slide_id", maintain_order=True).head(40)
    paths = []
    for sid in ("synth_s1", "synth_s2"):
        paths.append(tmp_path / f"{sid}.parquet")
        all_cells.filter(pl.col("slide_id") == sid).write_parquet(paths[-1])
    db = tmp_path / "db"
    a, b = _run_together(*(_extract_cmd(synth_small.out_dir / "slides", p, db) for p in paths))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    n = all_cells.filter(pl.col("slide_id") != "synth_s0").height
    assert _rows_and_keys(db) == (n, n)
    assert set(Store(db).keys_frame()["slide_id"]) == {"synth_s1", "synth_s2"}
    assert Store(db).labels().height == n  # both runs' labels attached


def small_store(path, n=40) -> Store:
    rng = np.random.default_rng(0)
    store = Store(path, create=True)
    store.cells_table("cells", {"local": 8, "context": 4}, {"test": 1})
    store.append("cells", _rows(rng, [f"c{i}" for i in range(n)]))
    return store


def _rows(rng, ids, slide="s0") -> pa.Table:
    n = len(ids)
    return pa.table({
        "slide_id": [slide] * n, "cell_id": ids, "x_px": rng.uniform(0, 100, n), "y_px": rng.uniform(0, 100, n),
        "x_um": rng.uniform(0, 25, n), "y_um": rng.uniform(0, 25, n), "tissue": ["lung"] * n, "run_id": ["t"] * n,
        "local_outside": np.zeros(n, np.float32), "local": vectors_to_arrow(rng.normal(size=(n, 8))),
        "context_outside": np.zeros(n, np.float32), "context": vectors_to_arrow(rng.normal(size=(n, 4))),
    })  # fmt: skip


def test_append_new_skips_keys_another_writer_stored(tmp_path):
    rng = np.random.default_rng(1)
    mine = small_store(tmp_path / "db", n=10)
    assert mine.stored_keys("cells", "s0") == {f"c{i}" for i in range(10)}  # the caller skips these
    assert mine.append_new("cells", _rows(rng, ["c10"])) == 1  # nobody else wrote: no check needed
    Store(tmp_path / "db").append("cells", _rows(rng, ["c11", "c12", "c13"]))  # another writer
    assert mine.append_new("cells", _rows(rng, ["c11", "c14"])) == 1  # its c11 is dropped
    # c12 was stored by the other writer before that check, which looked at c11 and c14 only;
    # nobody has committed since, but this batch is checked all the same (a CI run once
    # stored 96 rows for 64 cells when it was not)
    assert mine.append_new("cells", _rows(rng, ["c12", "c15"])) == 1
    assert _rows_and_keys(tmp_path / "db") == (16, 16)


_URI_WRITER = """
import sys, time
import numpy as np
from embedstore.store import Store
from tests.test_no_loss import _rows
uri, seed, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
store, rng = Store(uri), np.random.default_rng(seed)
while time.time() < start:
    time.sleep(0.001)
written = 0
for i in range(25):  # batches overlapping each other and the other writers' batches
    written += store.append_new("cells", _rows(rng, [f"c{j}" for j in range(5 * i, 5 * i + 10)]))
print(written)
"""


def test_writers_of_a_uri_store_store_each_key_once_without_a_lock(tmp_path):
    """A URI store (s3://, gs://, here file://) has no flock: three processes append
    overlapping keys at the same moment and the primary-key merge-insert must still store each
    key once. The table starts as one made before the key was declared (upgraded on write)."""
    uri = f"file://{tmp_path / 'db'}"
    store = Store(uri, create=True)
    assert not store.local
    schema = cells_schema({"local": 8, "context": 4}, {"test": 1})
    old = pa.schema([f.remove_metadata() if f.name in ("slide_id", "cell_id") else f for f in schema], metadata=schema.metadata)
    store.db.create_table("cells", schema=old)  # as made before the key was declared
    store.append("cells", _rows(np.random.default_rng(9), ["c0", "c1", "c2"]))
    assert not any(Store(uri).open("cells").schema.field(k).metadata for k in ("slide_id", "cell_id"))
    start = str(__import__("time").time() + 5)  # all three start together, after their imports
    cmds = [[sys.executable, "-c", _URI_WRITER, uri, str(i), start] for i in range(3)]
    procs = _run_together(*cmds)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    n_keys = 5 * 24 + 10  # c0 .. c129
    assert _rows_and_keys(uri) == (n_keys, n_keys)
    assert sum(int(p.stdout) for p in procs) == n_keys - 3  # c0..c2 were there before
    assert Store(uri).open("cells").schema.field("cell_id").metadata  # the key is now declared


def test_duplicate_rows_are_reported_and_removed_by_a_rerun(tmp_path):
    store = small_store(tmp_path / "db", n=10)
    store.append("cells", store.open("cells").to_lance().to_table().slice(0, 4))  # old unlocked writer
    info = store.info()["tables"]["cells"]
    assert info["cells"] == 10 and info["duplicate_rows"] == 4
    first = store.load().vectors["local"][:4].copy()
    with pytest.warns(UserWarning, match="removed 4 duplicate rows"):
        assert store.stored_keys("cells", "s0") == {f"c{i}" for i in range(10)}
    assert _rows_and_keys(tmp_path / "db") == (10, 10)
    np.testing.assert_array_equal(store.load().vectors["local"][:4], first)


def test_labels_replace_refuses_no_match_and_can_be_restored(tmp_path):
    store = small_store(tmp_path / "db")
    keys = store.keys_frame()
    store.set_labels(keys.with_columns(label=pl.lit("A")), source="first")
    v = store.db.open_table("labels").version
    with pytest.raises(StoreError, match="nothing was changed"):
        store.set_labels(pl.DataFrame({"slide_id": ["x"], "cell_id": ["c1"], "label": ["B"]}), source="typo")
    assert store.db.open_table("labels").version == v and store.labels().height == keys.height
    counts = store.set_labels(keys.head(5).with_columns(label=pl.lit("B")), source="five")
    assert counts["matched"] == 5 and counts["unlabelled"] == keys.height - 5
    assert store.labels().height == 5
    assert store.restore_labels(counts["previous_version"]) == keys.height
    assert set(store.labels()["label"]) == {"A"}


def test_blank_labels_and_splits_are_no_label(tmp_path):
    store = small_store(tmp_path / "db", n=6)
    keys = store.keys_frame()
    store.set_labels(keys.with_columns(label=pl.Series(["A", "", "  ", None, "B ", "B"]),
                                       split=pl.Series(["train", "", "val", None, " val", "train"])), source="t")  # fmt: skip
    labels = store.labels().sort("cell_id")
    assert labels["label"].to_list() == ["A", None, None, None, "B", "B"]
    assert labels["split"].to_list() == ["train", None, "val", None, "val", "train"]


def test_blank_labels_are_not_a_class_when_training(tmp_path):
    from heads.runs import load_cell_data

    store = small_store(tmp_path / "db", n=40)
    keys = store.keys_frame()
    labels = ["A", "B", ""] * 13 + ["A"]
    store.set_labels(keys.with_columns(label=pl.Series(labels)), source="t")
    data = load_cell_data(tmp_path / "db", labelled_only=True)
    assert list(data.classes) == ["A", "B"] and len(data) == 27
    path = tmp_path / "labels.csv"
    keys.with_columns(label=pl.Series(labels[::-1])).write_csv(path)
    data = load_cell_data(tmp_path / "db", labels=path, labelled_only=True)
    assert list(data.classes) == ["A", "B"] and len(data) == 27


def test_runs_of_dead_processes_read_interrupted(tmp_path):
    store = small_store(tmp_path / "db")
    store.record_run({"run_id": "r1", "status": "running", "table": "cells"})
    assert store.runs()["status"].to_list() == ["interrupted"]  # no live process holds it
    from embedstore.locking import LifeLock

    life = LifeLock(store.run_lock_path("r2"))
    store.record_run({"run_id": "r2", "status": "running", "table": "cells", "new_field": {"a": 1}})
    status = dict(store.runs().select("run_id", "status").iter_rows())
    assert status == {"r1": "interrupted", "r2": "running"}
    assert store.reap_runs() == ["r1"]
    stored = dict(pl.from_arrow(store.db.open_table("runs").to_arrow()).select("run_id", "status").iter_rows())
    assert stored == {"r1": "interrupted", "r2": "running"}
    life.release()
    assert dict(store.runs().select("run_id", "status").iter_rows())["r2"] == "interrupted"


def test_a_crash_mid_run_marks_the_run_failed(synth_small, tmp_path):
    from embedstore.extract.pipeline import build_steps, resolve_device

    cfg = ExtractConfig(**FAST)
    steps = build_steps(cfg, resolve_device("cpu"))

    def broken(images):
        raise RuntimeError("CUDA error: device-side assert (simulated)")

    steps[1].backbone.forward = broken
    cells = pl.read_parquet(synth_small.cells_path).head(20)
    with pytest.raises(RuntimeError, match="simulated"):
        extract(synth_small.out_dir / "slides", cells, tmp_path / "db", cfg, steps=steps)
    runs = Store(tmp_path / "db").runs()
    assert runs["status"].to_list() == ["failed"] and "simulated" in runs["reason"][0]


def test_precision_is_part_of_the_vectors_identity(synth_small, tmp_path):
    cells = pl.read_parquet(synth_small.cells_path).head(8)
    extract(synth_small.out_dir / "slides", cells, tmp_path / "db", ExtractConfig(**FAST))
    cfg = Store(tmp_path / "db").config()
    assert cfg["vectors"]["local"]["compute"] == {"device_type": "cpu", "precision": "fp32"}
    with pytest.raises(StoreError, match=r"(?s)compute\.precision: stored 'fp32', now 'bf16'.*--table"):
        extract(synth_small.out_dir / "slides", cells, tmp_path / "db", ExtractConfig(**FAST, precision="bf16"))
