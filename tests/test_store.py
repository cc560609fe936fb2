"""The store's reads and writes: `Store.load` returns every stored vector in the metadata's row
order (across record batches and fragments, in either dtype, with filters); the predictions
table keeps one row per (run, slide, cell) before and after its scalar indexes exist."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedstore import store as store_mod
from embedstore.store import Store, vectors_to_arrow


def _rows(slide: str, start: int, n: int, rng: np.random.Generator) -> tuple[pa.Table, dict]:
    vecs = {"local": rng.normal(size=(n, 24)).astype(np.float16), "context": rng.normal(size=(n, 8)).astype(np.float16)}
    ids = [f"c{i:05d}" for i in range(start, start + n)]
    table = pa.table({
        "slide_id": [slide] * n, "cell_id": ids, "x_px": np.arange(start, start + n, dtype=np.float64),
        "y_px": np.zeros(n), "x_um": np.zeros(n), "y_um": np.zeros(n),
        "tissue": ["lung" if slide == "s0" else "breast"] * n, "run_id": ["t"] * n,
        "local_outside": np.zeros(n, np.float32), "local": vectors_to_arrow(vecs["local"]),
        "context_outside": np.zeros(n, np.float32), "context": vectors_to_arrow(vecs["context"]),
    })  # fmt: skip
    return table, {(slide, c): (vecs["local"][i], vecs["context"][i]) for i, c in enumerate(ids)}


def test_load_returns_every_vector_in_row_order(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "LOAD_BATCH_ROWS_V2", 100)  # many batches, one ending mid-commit
    rng = np.random.default_rng(0)
    store = Store(tmp_path / "db", create=True)
    store.cells_table("cells", {"local": 24, "context": 8}, {"test": 1})
    truth = {}
    for slide, start, n in (("s0", 0, 250), ("s1", 0, 130), ("s0", 250, 333)):  # three fragments
        table, vecs = _rows(slide, start, n, rng)
        store.append("cells", table)
        truth.update(vecs)
    for dtype in (np.float16, np.float32):
        got = store.load(dtype=dtype)
        assert got.meta.height == len(truth) == 713
        assert got.vectors["local"].dtype == dtype and got.vectors["local"].shape == (713, 24)
        keys = list(zip(got.meta["slide_id"], got.meta["cell_id"], strict=True))
        want_local = np.stack([truth[k][0] for k in keys]).astype(dtype)
        want_context = np.stack([truth[k][1] for k in keys]).astype(dtype)
        np.testing.assert_array_equal(got.vectors["local"], want_local)
        np.testing.assert_array_equal(got.vectors["context"], want_context)
    some = store.load(slides=["s0"], vectors=("context",), dtype=np.float16)
    assert some.meta.height == 583 and set(some.meta["slide_id"]) == {"s0"} and list(some.vectors) == ["context"]
    keys = list(zip(some.meta["slide_id"], some.meta["cell_id"], strict=True))
    np.testing.assert_array_equal(some.vectors["context"], np.stack([truth[k][1] for k in keys]))
    assert store.load(tissues=["breast"], dtype=np.float16).meta.height == 130



def test_keys_frame_of_some_slides(tmp_path):
    """The keys of the slides asked for and no others (extraction attaches a cells table's labels
    through it, so it must not read the whole table nor miss a slide)."""
    rng = np.random.default_rng(1)
    store = Store(tmp_path / "db", create=True)
    store.cells_table("cells", {"local": 24, "context": 8}, {"test": 1})
    for slide, n in (("s0", 5), ("s1", 7), ("s'2", 3)):
        store.append("cells", _rows(slide, 0, n, rng)[0])
    assert store.keys_frame("cells").height == 15
    some = store.keys_frame("cells", ["s1", "s'2", "s1"])
    assert some.columns == ["slide_id", "cell_id"] and some.height == 10 and set(some["slide_id"]) == {"s1", "s'2"}
    none = store.keys_frame("cells", [])
    assert none.height == 0 and none.columns == ["slide_id", "cell_id"]

def _predictions(slide: str, n: int, run: str = "r1", value: float = 0.5):
    import polars as pl

    return pl.DataFrame({"run": [run] * n, "slide_id": [slide] * n, "cell_id": [f"c{i:05d}" for i in range(n)],
                         "pred_class": ["a"] * n, "pred_confidence": [value] * n, "prob_a": [value] * n,
                         "prob_b": [1 - value] * n})  # fmt: skip


def test_predictions_are_indexed_and_rewrites_stay_one_row_per_cell(tmp_path, monkeypatch):
    """Past PREDICTIONS_INDEX_ROWS the write check reads scalar indexes; first writes append,
    rewrites replace, before and after the indexes exist and with rows not yet indexed."""
    monkeypatch.setattr(store_mod, "PREDICTIONS_INDEX_ROWS", 50)
    store = Store(tmp_path / "db", create=True)
    store.write_predictions(_predictions("s0", 30))
    ds = store.db.open_table("predictions").to_lance()
    assert ds.describe_indices() == []  # 30 rows: below the threshold
    store.write_predictions(_predictions("s1", 30))
    indexed = {i.field_names[0] for i in store.db.open_table("predictions").to_lance().describe_indices()}
    assert indexed == {"run", "slide_id"}
    store.write_predictions(_predictions("s0", 30, value=0.9))  # a rerun: replaced, through the index
    store.write_predictions(_predictions("s2", 40))  # new rows, unindexed until 50 are
    store.write_predictions(_predictions("s2", 45, value=0.8))  # rewrite of unindexed rows + 5 new
    store.write_predictions(_predictions("s1", 30, run="r2"))  # another run, same cells
    got = store.predictions()
    assert got.height == 30 + 30 + 45 + 30
    assert got.select("run", "slide_id", "cell_id").n_unique() == got.height
    by = {(r, s): v for r, s, v in got.group_by("run", "slide_id").agg(pl_mean("pred_confidence")).iter_rows()}
    assert by == {("r1", "s0"): 0.9, ("r1", "s1"): 0.5, ("r1", "s2"): 0.8, ("r2", "s1"): 0.5}
    stats = store.db.open_table("predictions").to_lance().stats.index_stats("slide_id_idx")
    assert stats["num_unindexed_rows"] < 50  # folded in once 50 were waiting


def pl_mean(column: str):
    import polars as pl

    return pl.col(column).mean().round(6)


def test_a_failed_index_update_warns_and_keeps_the_rows(tmp_path, monkeypatch):
    def broken(ds):
        raise RuntimeError("disk full while writing the index")

    monkeypatch.setattr(store_mod, "_index_predictions", broken)
    store = Store(tmp_path / "db", create=True)
    store.write_predictions(_predictions("s0", 10))
    with pytest.warns(UserWarning, match="scalar indexes not updated .disk full"):
        store.write_predictions(_predictions("s1", 10))
    assert store.predictions().height == 20


def test_a_table_another_writer_creates_meanwhile_is_opened(tmp_path, monkeypatch):
    """A URI store has no lock: a writer that found no table may see it committed by another
    writer a moment later, and must open it, not call it a table without vectors."""
    uri = f"file://{tmp_path / 'db'}"
    first, second = Store(uri, create=True), Store(uri, create=True)
    dims, cfg = {"local": 24, "context": 8}, {"test": 1}
    real = Store.config_or_none
    looked = []

    def other_writer_commits_after_the_first_look(self, name):
        if not looked:
            looked.append(name)
            first.cells_table(name, dims, cfg)
            return None
        return real(self, name)

    monkeypatch.setattr(Store, "config_or_none", other_writer_commits_after_the_first_look)
    table = second.cells_table("cells", dims, cfg)
    assert table.count_rows() == 0 and second.config("cells") == first.config("cells")
