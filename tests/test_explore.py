"""Store-level search and audit: similar cells, filters, stale indexes, planted label flips."""

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from embedstore.errors import UserError
from embedstore.search import explore
from embedstore.store import Store, StoreError, vectors_to_arrow
from tests.clirun import run_cli


def clustered_store(path, n_per=40, n_classes=6, n_slides=3, flip=0.05, seed=0):
    """A store whose local vectors cluster by class; returns (db, set of flipped keys)."""
    rng = np.random.default_rng(seed)
    n = n_per * n_classes
    y = np.repeat(np.arange(n_classes), n_per)
    centres = rng.normal(size=(n_classes, 32)) * 3
    local = centres[y] + rng.normal(size=(n, 32))
    context = rng.normal(size=(n, 16))
    slides = np.array([f"s{i % n_slides}" for i in range(n)])
    ids = np.array([f"c{i:04d}" for i in range(n)])
    store = Store(path, create=True)
    store.cells_table("cells", {"local": 32, "context": 16}, {"test": 1})
    store.append("cells", pa.table({
        "slide_id": slides, "cell_id": ids, "x_px": rng.uniform(0, 1000, n), "y_px": rng.uniform(0, 1000, n),
        "x_um": rng.uniform(0, 250, n), "y_um": rng.uniform(0, 250, n),
        "tissue": np.where(np.arange(n) % 2, "lung", "breast"), "run_id": ["t"] * n,
        "local_outside": np.zeros(n, np.float32), "local": vectors_to_arrow(local),
        "context_outside": np.zeros(n, np.float32), "context": vectors_to_arrow(context),
    }))  # fmt: skip
    flipped = rng.random(n) < flip
    labels = np.where(flipped, (y + 1 + rng.integers(0, n_classes - 1, n)) % n_classes, y)
    store.set_labels(pl.DataFrame({"slide_id": slides, "cell_id": ids, "label": [f"k{v}" for v in labels]}), source="t")
    return path, {f"{s}/{c}" for s, c, f in zip(slides, ids, flipped, strict=True) if f}


def test_similar_filters_and_errors(tmp_path):
    db, _ = clustered_store(tmp_path / "db")
    found = explore.similar(db, "s0:c0000", k=10)
    assert found["rank"].to_list() == list(range(11)) and found["cell_id"][0] == "c0000"
    assert found["distance"][0] == 0 and (np.diff(found["distance"].to_numpy()[1:]) >= -1e-6).all()
    assert "c0000" not in found["cell_id"].to_list()[1:]
    assert (found["label"][1:] == "k0").mean() >= 0.8  # same cluster
    other = explore.similar(db, "s0:c0000", k=10, exclude_same_slide=True)
    assert set(other["slide_id"][1:]) <= {"s1", "s2"}
    lung = explore.similar(db, "s0:c0000", k=10, tissues=["lung"])
    assert set(lung["tissue"][1:]) == {"lung"}
    with pytest.raises(UserError, match="not in the store"):
        explore.similar(db, "s0:nope", k=5)
    with pytest.raises(UserError, match="SLIDE:CELL_ID"):
        explore.similar(db, "c0000", k=5)
    with pytest.raises(UserError, match="splits"):
        explore.similar(db, "s0:c0000", k=5, splits=["val"])


def test_stale_index_is_rebuilt_or_refused(tmp_path):
    db, _ = clustered_store(tmp_path / "db")
    explore.build_index(db, vector="local")
    explore.open_index(db, vector="local", rebuild=False)  # fresh: fine
    store = Store(db)
    one = store.open("cells").to_lance().to_table(limit=1)
    store.append("cells", one.set_column(1, "cell_id", pa.array(["extra"])))  # a new version
    with pytest.raises(StoreError, match="stale"):
        explore.open_index(db, vector="local", rebuild=False)
    notes = []
    explore.open_index(db, vector="local", notify=notes.append)
    assert any("stale" in n for n in notes)
    explore.open_index(db, vector="local", rebuild=False)  # rebuilt: fresh again
    with pytest.raises(StoreError, match="no context index"):
        explore.open_index(db, vector="context", rebuild=False)
    with pytest.raises(UserError, match="--vector"):
        explore.build_index(db, vector="nucleus")


def test_audit_finds_planted_flips(tmp_path):
    db, flipped = clustered_store(tmp_path / "db", n_per=80, flip=0.05)
    queue, summary = explore.audit(db, k=15)
    keys = (queue["slide_id"] + "/" + queue["cell_id"]).to_list()
    flagged = {k for k, f in zip(keys, queue["flagged"], strict=True) if f}
    tp = len(flagged & flipped)
    assert tp / len(flipped) >= 0.8 and tp / max(len(flagged), 1) >= 0.8, (tp, len(flipped), len(flagged))
    # most suspicious first: the top len(flipped) of the queue are (nearly) all planted flips.
    # Measured precision 1.0 for seeds 0-5 (16-26 flips among 480 cells); a queue in store
    # order would reach ~0.05.
    n = len(flipped)
    precision = len(set(keys[:n]) & flipped) / n
    assert precision >= 0.9, (precision, n)
    assert flipped <= set(keys[: 2 * n])  # and none is buried below the first 2n
    assert {"label", "suggested", "agreement", "suspicion", "flagged"} <= set(queue.columns)
    assert summary["n_flagged"].sum() == len(flagged)


def test_audit_cli_writes_queue_geojson_and_batch_effect(tmp_path):
    db, _ = clustered_store(tmp_path / "db")
    out = tmp_path / "review" / "queue.parquet"
    proc = run_cli("cli.embed", "audit", "--db", db, "--out", out, "-k", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    q = pl.read_parquet(out)
    summary = json.loads(proc.stdout)  # data on stdout, the one-line summary on stderr
    assert summary["labelled"] == q.height and summary["flagged"] == int(q["flagged"].sum())
    assert sum(c["n_labelled"] for c in summary["classes"]) == q.height
    assert q.height == 240 and q["suspicion"].is_sorted(descending=True, nulls_last=True)
    assert (tmp_path / "review" / "queue.csv").exists()
    assert list((tmp_path / "review" / "queue_geojson").glob("*.geojson"))
    assert (tmp_path / "review" / "queue_batch_effect.png").stat().st_size > 1000


def test_batch_effect_rates(tmp_path):
    db, _ = clustered_store(tmp_path / "db")
    rates = explore.batch_effect(db, tmp_path / "be.png", k=10)
    assert set(rates["group"]) == {"s0", "s1", "s2"}
    assert rates["ratio"].median() == pytest.approx(1.0, abs=0.35)  # slides are mixed at random


def test_similar_on_extracted_slides_with_gallery(extracted_store, tmp_path):
    db, _ = extracted_store
    keys = Store(db).keys_frame().row(0, named=True)
    ref = f"{keys['slide_id']}:{keys['cell_id']}"
    proc = run_cli("cli.embed", "similar", "--db", db, "--cell", ref, "-k", "5", "--vector", "both",
                   "--out", tmp_path / "nn.parquet", "--gallery", tmp_path / "g.png")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    nn = pl.read_parquet(tmp_path / "nn.parquet")
    assert nn.height == 6 and nn["cell_id"][0] == keys["cell_id"]
    assert (tmp_path / "g.png").stat().st_size > 10_000


@pytest.mark.parametrize("vector", ["local", "both"])
def test_ivf_index_reranks_from_the_store(tmp_path, vector):
    """An IVF index holds no copy of the vectors: reopened without them it re-ranks with rows
    read from the store (Lance take), giving what the in-memory vectors give."""
    db, _ = clustered_store(tmp_path / "db", n_per=60)
    built, meta, vectors = explore.build_index(db, vector=vector, kind="ivf")
    index, meta2, none = explore.open_index(db, vector=vector, rebuild=False, with_vectors=False)
    assert none is None and isinstance(index.source, explore.StoreSource)
    rows = np.arange(0, meta.height, 7)
    np.testing.assert_allclose(index.reconstruct(rows), built.reconstruct(rows), atol=1e-6)
    d1, i1 = built.search_rows(rows, 10)
    d2, i2 = index.search_rows(rows, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-5)
    # an index saved in an older format is rebuilt, not an error
    (db / "_faiss" / "cells" / vector / "index.json").write_text('{"format_version": 1, "index": {}}')
    notes = []
    explore.open_index(db, vector=vector, notify=notes.append)
    assert any("rebuild" in n for n in notes)


def test_audit_cli_prints_labels_verbatim_and_replaces_its_last_outputs(tmp_path):
    """Class names are data: "[m1]" is no markup and ":x:" no emoji. A dotted --out keeps its
    dots in the CSV's name. A rerun flagging nothing leaves no earlier GeoJSON to import, and
    cells too sparsely labelled to be voted on are said, not reported as fine."""
    from typer.testing import CliRunner

    from cli.embed import app

    db, _ = clustered_store(tmp_path / "db")
    store = Store(db)
    names = {"k0": "macrophage [m1]", "k1": "macrophage [m2]", "k2": "T:x:cell", "k3": "tumour [/stroma]"}
    labels = store.labels().select("slide_id", "cell_id", pl.col("label").replace(names))
    store.set_labels(labels, source="t")
    out = tmp_path / "review" / "q.k10.parquet"
    first = CliRunner().invoke(app, ["audit", "--db", str(db), "--out", str(out), "-k", "10"])
    assert first.exit_code == 0, (first.output, first.exception)
    assert all(n in first.stdout for n in names.values()), first.stdout
    assert (tmp_path / "review" / "q.k10.csv").exists() and not (tmp_path / "review" / "q.csv").exists()
    geojson = tmp_path / "review" / "q.k10_geojson"
    assert list(geojson.glob("*.geojson"))
    store.set_labels(labels.head(3).with_columns(label=pl.lit("k0")), source="t")  # 3 labels: nobody can be outvoted
    second = CliRunner().invoke(app, ["audit", "--db", str(db), "--out", str(out), "-k", "10"])
    assert second.exit_code == 0, (second.output, second.exception)
    assert "0 of 3 labelled cells flagged" in second.stderr
    assert "3 of 3 labelled cells had fewer than 5 labelled neighbours" in second.stderr
    assert not list(geojson.glob("*.geojson"))
    bad = CliRunner().invoke(app, ["audit", "--db", str(db), "--out", str(tmp_path / "q.csv")])
    assert isinstance(bad.exception, UserError) and "is a .parquet file" in str(bad.exception)


def test_cells_named_across_colons_in_slide_and_cell_ids():
    keys = pl.DataFrame({"slide_id": ["case:A", "case", "a", "a:b"], "cell_id": ["det:50", "x", "b:c", "c"]})
    assert explore.resolve_cell("case:A:det:50", keys) == ("case:A", "det:50")
    assert explore.resolve_cell("case:x", keys) == ("case", "x")
    assert explore.resolve_cell("case:nope:1", keys) == ("case", "nope:1")  # no hit: the first cut, for the message
    with pytest.raises(UserError, match="names 2 stored cells"):
        explore.resolve_cell("a:b:c", keys)
