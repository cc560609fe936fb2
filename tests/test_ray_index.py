"""`embed index --engine ray`: the sharded build gives the single-process index (same neighbours,
same tuned nprobe; byte-identical when both add the same batches on one thread), reads shards in
`Store.load` row order (deletions included) and is used by `open_index` as it is."""

from __future__ import annotations

import os
import warnings

import faiss
import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import UserError
from embedstore.search import explore
from embedstore.search import index as search
from embedstore.search.distributed import build_index_ray
from embedstore.search.index import CellIndex
from embedstore.store import Store, vectors_to_arrow

ray = pytest.importorskip("ray")

N = 3000
DELETED = ("c00007", "c01500", "c02999")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray for the module (build_index_ray joins it and leaves it running).

    Its workers carry a failpoint: the first to reach `index.shard` after the test removes the
    marker file KILL_MARK (the file exists, so the point is disarmed, until then) SIGKILLs
    itself mid-task."""
    mark = tmp_path_factory.mktemp("kill") / "killed"
    mark.touch()
    env = {"NUCLASS_KILL_AT": "index.shard:1", "NUCLASS_KILL_ONCE": str(mark)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by Ray's worker processes only: this one read it at import
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    yield ray.get_runtime_context().gcs_address, mark
    ray.shutdown()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """Synthetic clustered vectors (384-d local: the PCA path; 64-d context) in 3 commits, then
    3 rows deleted, so row positions and fragments do not line up."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 384)) * 2
    local = centres[rng.integers(0, 40, N)] + rng.normal(size=(N, 384))
    context = rng.normal(size=(N, 64))
    path = tmp_path_factory.mktemp("rayidx") / "db"
    store = Store(path, create=True)
    store.cells_table("cells", {"local": 384, "context": 64}, {"test": 1})
    for part in np.array_split(np.arange(N), 3):
        m = len(part)
        store.append("cells", pa.table({
            "slide_id": [f"s{i % 3}" for i in part], "cell_id": [f"c{i:05d}" for i in part],
            "x_px": np.zeros(m), "y_px": np.zeros(m), "x_um": np.zeros(m), "y_um": np.zeros(m),
            "tissue": ["lung"] * m, "run_id": ["t"] * m,
            "local_outside": np.zeros(m, np.float32), "local": vectors_to_arrow(local[part]),
            "context_outside": np.zeros(m, np.float32), "context": vectors_to_arrow(context[part]),
        }))  # fmt: skip
    store.open("cells").delete(f"cell_id IN ({', '.join(repr(c) for c in DELETED)})")
    return path


def _same_neighbours(a: CellIndex, b: CellIndex, n: int) -> None:
    rows = np.random.default_rng(0).choice(n, 300, replace=False)
    da, ia = a.search_rows(rows, 20)
    db_, ib = b.search_rows(rows, 20)
    assert np.array_equal(ia, ib)
    np.testing.assert_allclose(da, db_, atol=1e-6)


def _bytes(index: CellIndex) -> np.ndarray:
    return faiss.serialize_index(index._index)


def test_shard_rows_are_store_load_rows(db):
    store = Store(db)
    _, vectors, version = explore.load_vectors(store, "cells", "both")
    source = explore.StoreSource(store, "cells", "both", version=version)
    assert len(source) == N - len(DELETED)
    for s, e in [(0, 700), (995, 1003), (1990, 2400), (N - 10, N - len(DELETED))]:
        assert np.array_equal(source.read(s, e), vectors[s:e])  # what a shard reads
        assert np.array_equal(source.fetch(np.arange(s, e)), vectors[s:e])


def test_ivf_matches_single_process(cluster, db, tmp_path, monkeypatch):
    # 500-row add batches, 1000-row shards: each shard adds the sequential build's own batches
    # and one FAISS/BLAS thread everywhere, as in the tasks: the same float rounding
    monkeypatch.setattr(search, "CHUNK_ROWS", 500)
    with search._omp_threads(1):
        ref, meta, _ = explore.build_index(db, vector="local", kind="ivf", root=tmp_path / "ref")
        got, meta2 = build_index_ray(db, vector="local", kind="ivf", root=tmp_path / "ray",
                                     address=cluster[0], workers=2, shard_rows=1000)  # fmt: skip
    assert meta2.equals(meta) and got.info["build"]["shards"] == 3
    assert got.info["search"] == ref.info["search"]  # same tuned nprobe and k_factor
    assert got.info["tuned_recall"] == ref.info["tuned_recall"]
    assert got.info["params"] == ref.info["params"]
    assert np.array_equal(_bytes(got), _bytes(ref))
    _same_neighbours(ref, got, meta.height)
    opened, _, _ = explore.open_index(db, vector="local", root=tmp_path / "ray", rebuild=False,
                                      with_vectors=False)  # fmt: skip
    assert opened.info.get("build", {}).get("engine") == "ray"  # used as saved, not rebuilt
    assert isinstance(opened.source, explore.StoreSource)
    _same_neighbours(ref, opened, meta.height)


def test_ivf_hnsw_quantizer_odd_shards(cluster, db):
    """Shards that split add batches (700 rows on 32k batches) and an HNSW quantizer."""
    store = Store(db)
    _, vectors, _ = explore.load_vectors(store, "cells", "both")
    ref = CellIndex.build(vectors, kind="ivf", nlist=1024, use_gpu=False)
    got, _ = build_index_ray(db, vector="both", kind="ivf", nlist=1024, root=db.parent / "hnsw",
                             address=cluster[0], workers=2, shard_rows=700)  # fmt: skip
    assert got.info["params"]["quantizer"] == "hnsw" and got.info["build"]["shards"] == 5
    assert got.info["search"] == ref.info["search"]
    a, b = _bytes(ref), _bytes(got)
    assert a.size == b.size and (a != b).sum() <= 64  # at most a few SQ8 codes off by rounding
    _same_neighbours(ref, got, len(vectors))


def test_flat(cluster, db, tmp_path):
    ref, meta, _ = explore.build_index(db, vector="context", kind="flat", root=tmp_path / "ref")
    got, _ = build_index_ray(db, vector="context", kind="flat", root=tmp_path / "ray",
                             address=cluster[0], workers=2, shard_rows=1100)  # fmt: skip
    assert got.kind == "flat" and got.info["build"]["shards"] == 3
    assert np.array_equal(_bytes(got), _bytes(ref))
    _same_neighbours(ref, got, meta.height)
    explore.open_index(db, vector="context", root=tmp_path / "ray", rebuild=False)


def test_cli_and_errors(cluster, db, tmp_path):
    from typer.testing import CliRunner

    from cli.embed import app

    out = CliRunner().invoke(app, ["index", "--db", str(db), "--vector", "context", "--index-dir",
                                   str(tmp_path), "--engine", "ray", "--address", cluster[0]])  # fmt: skip
    assert out.exit_code == 0, out.output
    index, _, _ = explore.open_index(db, vector="context", root=tmp_path, rebuild=False)
    assert index.info["build"]["engine"] == "ray"
    with pytest.raises(UserError, match="--ray-workers"):
        build_index_ray(db, workers=0)
    with pytest.raises(UserError, match="--engine"):
        CliRunner().invoke(app, ["index", "--db", str(db), "--engine", "spark"], catch_exceptions=False)


def test_a_worker_killed_mid_shard_is_retried_and_the_index_is_the_same(cluster, db, tmp_path):
    address, mark = cluster
    ref, meta, _ = explore.build_index(db, vector="context", kind="ivf", root=tmp_path / "ref")
    mark.unlink()  # arm: the first task to add a batch SIGKILLs its worker process
    got, _ = build_index_ray(db, vector="context", kind="ivf", root=tmp_path / "ray",
                             address=address, workers=2, shard_rows=1000)  # fmt: skip
    assert mark.exists()  # a worker died mid-shard; Ray ran its shard again
    assert got.ntotal == meta.height and got.info["build"]["shards"] == 3  # every row once
    assert got.info["search"] == ref.info["search"]
    _same_neighbours(ref, got, meta.height)
