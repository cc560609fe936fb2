"""`Store.load`: every stored vector comes back, in the metadata's row order, across record
batches and fragments, in either dtype and with filters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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
