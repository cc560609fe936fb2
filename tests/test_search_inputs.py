"""Search, audit and export against what a lab really feeds them: sparse labels, tiny stores,
shared index folders, concurrent `embed index`, odd output paths. Stores are written directly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from embedstore.search import explore
from embedstore.store import Store, vectors_to_arrow
from tests.clirun import embed

ROOT = Path(__file__).resolve().parents[1]


def write_store(path, local, *, slides=None, ids=None, labels=None, seed=0):
    """A store of `local` vectors (n x d) with 4-d context vectors; labels merged when given."""
    rng = np.random.default_rng(seed)
    n = len(local)
    slides = slides or [f"s{i % 2}" for i in range(n)]
    ids = ids or [f"c{i:03d}" for i in range(n)]
    store = Store(path, create=True)
    if not store.has("cells"):
        store.cells_table("cells", {"local": local.shape[1], "context": 4}, {"test": 1})
    store.append("cells", pa.table({
        "slide_id": slides, "cell_id": ids, "x_px": rng.uniform(0, 4000, n), "y_px": rng.uniform(0, 4000, n),
        "x_um": rng.uniform(0, 1000, n), "y_um": rng.uniform(0, 1000, n), "tissue": ["lung"] * n,
        "run_id": ["t"] * n, "local_outside": np.zeros(n, np.float32), "local": vectors_to_arrow(local),
        "context_outside": np.zeros(n, np.float32), "context": vectors_to_arrow(rng.normal(size=(n, 4))),
    }))  # fmt: skip
    if labels is not None:
        frame = pl.DataFrame({"slide_id": slides, "cell_id": ids, "label": labels})
        store.set_labels(frame.filter(pl.col("label").is_not_null()), source="t", replace=False)
    return path


def assert_one_line_error(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_audit_with_few_labels_writes_the_queue_when_the_first_cell_gets_no_vote(tmp_path):
    # two tight clusters; cluster A holds one labelled cell (row 0, audited first), which has
    # no labelled neighbour among its k; cluster B's labelled cells vote for each other
    rng = np.random.default_rng(0)
    local = np.repeat(rng.normal(size=(2, 16)) * 5, 30, axis=0) + 0.1 * rng.normal(size=(60, 16))
    labels = ["a"] + [None] * 29 + ["b"] * 10 + [None] * 20
    db = write_store(tmp_path / "db", local, labels=labels)
    out = tmp_path / "q.parquet"
    r = embed("audit", "--db", db, "--out", out, "-k", "5", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["labelled"] == 11
    queue = pl.read_parquet(out)
    first = queue.filter(pl.col("cell_id") == "c000")
    assert first["n_votes"].to_list() == [0] and first["suggested"].to_list() == [None]
    assert set(queue.filter(pl.col("n_votes") > 0)["suggested"]) == {"b"}


def test_audit_sets_aside_labels_the_annotation_did_not_keep(tmp_path):
    """Marker-guided labels below the confidence `heads train` keeps (0.6) used to vote: in a
    cluster of 8 kept "T" cells and 22 unkept "S" ones, the kept cells were flagged as
    mislabelled and the unkept ones filled the queue."""
    rng = np.random.default_rng(1)
    local = np.repeat(rng.normal(size=(2, 16)) * 5, 30, axis=0) + 0.1 * rng.normal(size=(60, 16))
    db = write_store(tmp_path / "db", local)
    ids = [f"c{i:03d}" for i in range(60)]
    Store(db).set_labels(pl.DataFrame({
        "slide_id": [f"s{i % 2}" for i in range(60)], "cell_id": ids,
        "label": ["T"] * 8 + ["S"] * 52, "label_confidence": [0.9] * 8 + [0.3] * 22 + [None] * 30,
    }), source="t")  # fmt: skip
    said = []
    queue, _ = explore.audit(db, k=25, min_share=0.6, notify=said.append)
    assert queue.height == 38 and "label_confidence" in queue.columns
    assert not queue.filter(pl.col("label") == "T")["flagged"].any()
    assert any("22 of 60 labels have a label_confidence below 0.6" in m for m in said)
    everything, _ = explore.audit(db, k=25, min_share=0.6, min_label_confidence=0)
    assert everything.height == 60 and everything.filter(pl.col("label") == "T")["flagged"].all()
    r = embed("audit", "--db", db, "--out", tmp_path / "q.parquet", "--min-label-confidence", "0.95")
    assert r.returncode == 0 and pl.read_parquet(tmp_path / "q.parquet").height == 30, r.stderr
    Store(db).set_labels(pl.DataFrame({"slide_id": ["s0"], "cell_id": ["c000"], "label": ["T"], "label_confidence": [0.1]}),
                         source="t")  # fmt: skip
    assert_one_line_error(embed("audit", "--db", db, "--out", tmp_path / "q.parquet"), "all 1 stored labels")


def test_audit_of_a_one_cell_store_finishes_without_a_plot(tmp_path):
    db = write_store(tmp_path / "db", np.ones((1, 8)), labels=["a"])
    out = tmp_path / "q.parquet"
    (tmp_path / "q_batch_effect.png").write_bytes(b"an earlier audit's plot")
    r = embed("audit", "--db", db, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["labelled"] == 1 and doc["same_slide_ratio_median"] is None
    assert pl.read_parquet(out).height == 1
    assert not (tmp_path / "q_batch_effect.png").exists()  # no plot, and not the old one
    assert "not measurable" in r.stderr and "batch_effect.png" not in r.stderr


def test_an_index_in_a_shared_index_dir_never_answers_for_another_store(tmp_path):
    # two stores with the same cells at the same table version, other vectors (a re-extraction
    # with other weights, say), and one --index-dir
    rng = np.random.default_rng(1)
    va, vb = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    a = write_store(tmp_path / "A", va)
    b = write_store(tmp_path / "B", vb)
    root = tmp_path / "faiss"
    assert embed("index", "--db", a, "--index-dir", root).returncode == 0
    notes = []
    found = explore.similar(b, "s0:c000", 3, root=root, notify=notes.append)
    unit = vb / np.linalg.norm(vb, axis=1, keepdims=True)
    truth = np.argsort(-(unit @ unit[0]), kind="stable")[1:4]
    assert found["cell_id"].to_list()[1:] == [f"c{i:03d}" for i in truth]
    assert any("another" in n for n in notes), notes
    # and the other way round: A's index was replaced by B's, so A is rebuilt too
    found_a = explore.similar(a, "s0:c000", 3, root=root)
    unit = va / np.linalg.norm(va, axis=1, keepdims=True)
    truth = np.argsort(-(unit @ unit[0]), kind="stable")[1:4]
    assert found_a["cell_id"].to_list()[1:] == [f"c{i:03d}" for i in truth]


def test_a_moved_store_keeps_its_index(tmp_path):
    db = write_store(tmp_path / "db", np.random.default_rng(2).normal(size=(12, 8)))
    explore.build_index(db)
    moved = tmp_path / "elsewhere" / "db"
    shutil.move(db, moved)
    index, meta, _ = explore.open_index(moved, rebuild=False, with_vectors=False)
    assert index.ntotal == meta.height == 12


def test_embed_index_twice_at_once_leaves_the_newer_table_indexed(tmp_path):
    # `embed index` (a process) is held in the middle of its save; meanwhile the store grows
    # and a second `embed index` runs. Both finish, and the index left matches the store.
    rng = np.random.default_rng(5)
    db = write_store(tmp_path / "db", rng.normal(size=(40, 8)))
    go = tmp_path / "go"
    env = {**os.environ, "NUCLASS_PAUSE_AT": "index.save", "NUCLASS_PAUSE_FILE": str(go)}
    first = subprocess.Popen([sys.executable, "-m", "cli.embed", "index", "--db", str(db)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{go}.reached").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first `embed index` never reached its save"
            time.sleep(0.05)
        write_store(db, rng.normal(size=(5, 8)), ids=[f"new{i}" for i in range(5)], seed=1)  # a new slide's cells
        second = {}
        runner = threading.Thread(target=lambda: second.update(r=embed("index", "--db", db)))
        runner.start()
        runner.join(1.0)  # with the first save under way, the second waits for it
        go.touch()
        runner.join(60)
        _, err = first.communicate(timeout=60)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert second["r"].returncode == 0, second["r"].stderr
    index, meta, _ = explore.open_index(db, rebuild=False, with_vectors=False)
    assert index.ntotal == meta.height == 45


def test_export_with_a_vector_kind_named_twice(tmp_path):
    db = write_store(tmp_path / "db", np.random.default_rng(6).normal(size=(6, 8)))
    r = embed("export", "--db", db, "--out", tmp_path / "x.h5ad", "--vectors", "local,local")
    assert r.returncode == 0, r.stderr
    import anndata

    adata = anndata.read_h5ad(tmp_path / "x.h5ad")
    assert list(adata.obsm) == ["X_local", "spatial"] and adata.obsm["X_local"].shape == (6, 8)


def test_similar_and_audit_refuse_an_out_folder_before_searching(tmp_path):
    db = write_store(tmp_path / "db", np.random.default_rng(7).normal(size=(10, 8)), labels=["a", "b"] * 5)
    folder = tmp_path / "nn.parquet"
    folder.mkdir()
    r = embed("similar", "--db", db, "--cell", "s0:c000", "--out", folder)
    assert_one_line_error(r, str(folder), "folder")
    assert r.stdout == ""  # refused before any result was printed
    r = embed("audit", "--db", db, "--out", folder)
    assert_one_line_error(r, str(folder), "folder")
    assert not explore.index_dir(db, "cells", "local").exists()  # nothing was built


def test_index_of_a_table_without_cells_says_to_extract_first(tmp_path):
    db = tmp_path / "db"
    Store(db, create=True).cells_table("cells", {"local": 8, "context": 4}, {"test": 1})
    assert_one_line_error(embed("index", "--db", db), "holds no cells yet", "embed extract")
    write_store(tmp_path / "small", np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32))
    assert_one_line_error(embed("index", "--db", tmp_path / "small", "--kind", "ivf"), "--kind flat")


def test_vectors_cosine_search_cannot_use_are_named_by_cell(tmp_path):
    local = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    local[4] = 0
    local[7, 2] = np.inf
    db = write_store(tmp_path / "db", local)
    assert_one_line_error(embed("index", "--db", db), "2 cells", "s0:c004, s1:c007", "--vector")
    assert embed("index", "--db", db, "--vector", "context").returncode == 0


def test_embed_index_streams_the_rows_and_builds_the_in_memory_index(tmp_path, monkeypatch):
    """`embed index` reads the table batch by batch when its vectors would crowd memory (10M x
    1536 do not fit in 24 GB) and must build the index `explore.build_index` builds from the
    loaded vectors: the same bytes with the same batches and one thread, for IVF (PCA path) and flat."""
    import faiss

    from embedstore.search import index as search
    from embedstore.search.distributed import build_index_streamed

    rng = np.random.default_rng(5)
    local = (rng.normal(size=(40, 384)) * 2)[rng.integers(0, 40, 3000)] + rng.normal(size=(3000, 384))
    db = write_store(tmp_path / "db", local.astype(np.float32))
    Store(db).open("cells").delete("cell_id IN ('c007', 'c1500')")  # row positions shift
    monkeypatch.setattr(search, "CHUNK_ROWS", 500)
    with search._omp_threads(1):
        for kind in ("ivf", "flat"):
            ref, meta, _ = explore.build_index(db, kind=kind, root=tmp_path / f"ref-{kind}")
            got, meta2 = build_index_streamed(db, kind=kind, root=tmp_path / f"got-{kind}")
            assert meta2.equals(meta) and got.info["build"]["engine"] == "local, streamed"
            assert got.info["search"] == ref.info["search"] and got.info.get("params") == ref.info.get("params")
            assert np.array_equal(faiss.serialize_index(got._index), faiss.serialize_index(ref._index)), kind
    # the CLI's local engine: in memory while the vectors fit, else streamed
    from embedstore.search import distributed

    assert embed("index", "--db", db).returncode == 0
    assert "build" not in explore.open_index(db, rebuild=False, with_vectors=False)[0].info
    monkeypatch.setattr(distributed, "vectors_fit", lambda n, dim: False)
    result = embed("index", "--db", db)
    assert result.returncode == 0 and "built batch by batch from the store" in result.stderr, result.stderr
    assert explore.open_index(db, rebuild=False, with_vectors=False)[0].info["build"]["engine"] == "local, streamed"


def test_similar_builds_a_missing_index_batch_by_batch_when_the_vectors_would_not_fit(tmp_path, monkeypatch):
    """`embed similar` on a store without an index loaded every vector to build one (61 GB at
    10M x 1536); it needs none of them, so it now builds as `embed index` does."""
    from embedstore.search import distributed

    rng = np.random.default_rng(6)
    db = write_store(tmp_path / "db", rng.normal(size=(300, 32)).astype(np.float32))
    ref = explore.similar(db, "s0:c000", k=5, root=tmp_path / "ref")
    monkeypatch.setattr(distributed, "vectors_fit", lambda n, dim: False)
    said = []
    got = explore.similar(db, "s0:c000", k=5, notify=said.append)
    assert any("built batch by batch" in m for m in said)
    assert explore.open_index(db, rebuild=False, with_vectors=False)[0].info["build"]["engine"] == "local, streamed"
    assert got.drop("distance").equals(ref.drop("distance"))
    np.testing.assert_allclose(got["distance"].to_numpy(), ref["distance"].to_numpy(), atol=1e-5)


def test_a_commit_between_the_version_check_and_the_load_is_not_served_by_the_old_index(tmp_path, monkeypatch):
    """A slide extracted again with the same cell ids between `open_index`'s version check and
    its load: the keys still matched, so the old index was served (and its re-ranking read the
    newest vectors), as if it were fresh."""
    rng = np.random.default_rng(7)
    local = rng.normal(size=(200, 16)).astype(np.float32)
    slides = ["s0"] * 100 + ["s1"] * 100
    db = write_store(tmp_path / "db", local, slides=slides)
    explore.build_index(db, kind="flat")
    load = explore.load_vectors

    def a_writer_commits_first(store, table, vector, **kw):
        if not getattr(a_writer_commits_first, "done", False):
            a_writer_commits_first.done = True
            store.open(table).delete("slide_id = 's1'")
            write_store(db, rng.normal(size=(100, 16)).astype(np.float32), slides=["s1"] * 100,
                        ids=[f"c{i:03d}" for i in range(100, 200)])  # fmt: skip
        return load(store, table, vector, **kw)

    monkeypatch.setattr(explore, "load_vectors", a_writer_commits_first)
    index, meta, vectors = explore.open_index(db)
    assert meta.select("slide_id", "cell_id").equals(pl.DataFrame({"slide_id": slides, "cell_id": [f"c{i:03d}" for i in range(200)]}))
    monkeypatch.undo()
    explore.open_index(db, rebuild=False)  # rebuilt at the new version: not stale
    fresh = explore.build_index(db, kind="flat", root=tmp_path / "fresh")[0]
    rows = np.arange(100, 200)  # the new s1 cells' neighbours, as a new index finds them
    assert np.array_equal(index.search_rows(rows, 3)[1], fresh.search_rows(rows, 3)[1])


def test_an_opened_ivf_index_re_ranks_with_the_vectors_of_its_own_version(tmp_path, monkeypatch):
    """Without vectors in memory, an IVF index re-ranks from the store. A slide extracted again
    (same ids) after `open_index` loaded the rows but before it opened the re-ranking source
    mixed the new vectors into the old index's answers; once opened, the index reads its own
    version whatever is committed later."""
    rng = np.random.default_rng(8)
    local = rng.normal(size=(2000, 32)).astype(np.float32)
    db = write_store(tmp_path / "db", local, slides=["s0"] * 1000 + ["s1"] * 1000)
    explore.build_index(db, kind="ivf")
    load = explore.load_vectors

    def extract_s1_again():
        Store(db).open("cells").delete("slide_id = 's1'")
        write_store(db, rng.normal(size=(1000, 32)).astype(np.float32), slides=["s1"] * 1000,
                    ids=[f"c{i:03d}" for i in range(1000, 2000)])  # fmt: skip

    def then_a_writer_commits(store, table, vector, **kw):
        out = load(store, table, vector, **kw)
        extract_s1_again()
        return out

    monkeypatch.setattr(explore, "load_vectors", then_a_writer_commits)
    index, _, _ = explore.open_index(db, rebuild=False, with_vectors=False)
    monkeypatch.undo()
    np.testing.assert_allclose(index.source.fetch(np.array([0, 1500])), local[[0, 1500]], rtol=1e-3)
    extract_s1_again()
    np.testing.assert_allclose(index.source.fetch(np.array([0, 1500])), local[[0, 1500]], rtol=1e-3)


@pytest.mark.parametrize("kind", ["ivf", "flat"])
def test_audit_of_vectors_that_would_not_fit_queries_through_the_index(tmp_path, monkeypatch, kind):
    """`embed audit` (and the batch-effect plot) loaded every vector of the table as float32
    before the first query (61 GB at 10M x 1536): past this machine's memory they now query each
    batch with the index's own vectors (re-ranking ones read from the store), with the same
    results."""
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(3, 32)) * 4
    cls = rng.integers(0, 3, 1200)
    local = (centres[cls] + rng.normal(size=(1200, 32))).astype(np.float32)
    labels = np.array(["a", "b", "c"], dtype=object)[cls]
    flipped = rng.choice(np.flatnonzero(cls > 0), 30, replace=False)
    labels[flipped] = "a"  # planted errors among b and c
    db = write_store(tmp_path / "db", local, labels=list(labels))
    explore.build_index(db, kind=kind)
    queue, summary = explore.audit(db, k=10)
    rates = explore.batch_effect(db, tmp_path / "a.png", k=10)
    loaded = []
    real_load = explore.load_vectors

    def spy(store, table, vector, *, with_vectors=True):
        loaded.append(with_vectors)
        return real_load(store, table, vector, with_vectors=with_vectors)

    monkeypatch.setattr(explore, "load_vectors", spy)
    from embedstore.search import distributed

    monkeypatch.setattr(distributed, "vectors_fit", lambda n, dim: False)
    streamed, summary2 = explore.audit(db, k=10)
    assert explore.batch_effect(db, tmp_path / "b.png", k=10).equals(rates)  # its queries too
    assert loaded == [False, False]
    found = set(queue.filter("flagged")["cell_id"].to_list())
    assert len(found & {f"c{i:03d}" for i in flipped}) >= 25, found
    assert streamed.equals(queue) and summary2.equals(summary)
