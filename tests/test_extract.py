"""Extraction into the store: exactly-once, provenance refusal, failed slides, real kills."""

import json
import os

import numpy as np
import polars as pl
import pytest

from embedstore.extract.pipeline import ExtractConfig, ExtractionFailed, extract
from embedstore.store import Store, StoreError
from tests.clirun import run_cli

from .conftest import FAST


@pytest.fixture
def extracted(extracted_store):
    return extracted_store


def _unique_keys(db, table="cells"):
    keys = Store(db).keys_frame(table)
    return keys.height, keys.unique().height


def test_every_cell_stored_once_with_vectors_and_provenance(extracted, synth_small):
    db, summary = extracted
    assert summary["written"] == synth_small.n_cells and summary["slides_failed"] == 0
    assert _unique_keys(db) == (synth_small.n_cells, synth_small.n_cells)
    store = Store(db)
    loaded = store.load()
    assert loaded.vectors["local"].shape == (synth_small.n_cells, 64)
    assert loaded.vectors["context"].dtype == np.float32
    assert np.isfinite(loaded.vectors["local"]).all() and np.isfinite(loaded.vectors["context"]).all()
    assert loaded.vectors["local"].std(axis=0).mean() > 0  # vectors vary across cells
    cfg = store.config()
    assert cfg["vectors"]["local"]["backbone"] == "test-vit-local"
    assert cfg["vectors"]["context"]["field_um"] == 256.0 and cfg["vectors"]["context"]["field_px"] == 128
    assert len(cfg["vectors"]["local"]["weights_sha256"]) == 64
    runs = store.runs()
    assert runs.height == 1 and runs["status"][0] == "finished"
    slides = json.loads(runs["slides"][0])
    plan = slides["synth_s0"]["info"]["plans"]["context"]
    # 256 µm at 128 px is 2 µm/px: read from the coarsest level (1 µm/px), halved once more
    assert (plan["level"], plan["target_mpp"], plan["scale"]) == (2, 2.0, 2.0)
    # labels from the cells table were attached, and load joins them
    assert loaded.meta["label"].null_count() == 0
    truth = pl.read_parquet(synth_small.truth_path)
    j = loaded.meta.join(truth, on=["slide_id", "cell_id"], suffix="_t")
    assert (j["label"] == j["label_t"]).all() and j.height == synth_small.n_cells


def test_rerun_adds_nothing(extracted, synth_small):
    db, _ = extracted
    again = extract(synth_small.out_dir / "slides", synth_small.cells_path, db, ExtractConfig(**FAST))
    assert again["written"] == 0 and again["already_stored"] == synth_small.n_cells
    assert _unique_keys(db) == (synth_small.n_cells, synth_small.n_cells)


def test_other_config_is_refused_unless_new_table(extracted, synth_small, tmp_path):
    db, _ = extracted
    other = ExtractConfig(**{**FAST, "context_pooling": "mean"})
    with pytest.raises(StoreError, match=r"(?s)pooling.*--table"):
        extract(synth_small.out_dir / "slides", synth_small.cells_path, db, other)
    other.table = "cells_mean"
    one = pl.read_parquet(synth_small.cells_path).filter(pl.col("slide_id") == "synth_s1")
    extract(synth_small.out_dir / "slides", one, db, other)
    assert _unique_keys(db, "cells_mean")[0] == one.height
    assert Store(db).config("cells_mean")["vectors"]["context"]["pooling"] == "mean"
    assert _unique_keys(db)[0] == synth_small.n_cells  # the first table is untouched


def test_load_filters(extracted, synth_small):
    store = Store(extracted[0])
    s1 = store.load(slides=["synth_s1"])
    assert set(s1.meta["slide_id"]) == {"synth_s1"} and len(s1) == synth_small.slides[1].n_cells
    tissue = synth_small.slides[2].tissue
    t = store.load(tissues=[tissue], vectors=("context",))
    assert set(t.meta["tissue"]) == {tissue} and set(t.vectors) == {"context"}
    full = store.load()
    key = full.meta["slide_id"] + "/" + full.meta["cell_id"]
    k1 = (s1.meta["slide_id"] + "/" + s1.meta["cell_id"]).to_list()
    idx = [key.to_list().index(k) for k in k1[:5]]
    np.testing.assert_array_equal(full.vectors["local"][idx], s1.vectors["local"][:5])


def test_labels_and_splits_can_be_replaced(extracted, synth_small, tmp_path):
    db, _ = extracted
    store = Store(db)
    keys = store.keys_frame()
    new = keys.with_columns(label=pl.lit("X"), split=pl.when(pl.int_range(pl.len()) % 4 == 0).then(pl.lit("val")).otherwise(pl.lit("train")))
    extra = pl.DataFrame({"slide_id": ["synth_s0"], "cell_id": ["nope"], "label": ["Y"], "split": ["train"]})
    counts = store.set_labels(pl.concat([new, extra]), source="relabel")
    assert counts["matched"] == keys.height and counts["unknown"] == 1
    val = store.load(splits=["val"])
    assert len(val) == (keys.height + 3) // 4 and set(val.meta["label"]) == {"X"}
    with pytest.raises(StoreError, match="appear more than once in the label table"):
        store.set_labels(pl.concat([new, new]), source="dup")
    # restore the original labels for the other tests
    store.set_labels(pl.read_parquet(synth_small.cells_path).select("slide_id", "cell_id", "label"), source="cells table")


def test_failed_slide_is_recorded_and_others_stored(synth_small, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    ok = synth_small.slides[0]
    (slides / ok.path.name).symlink_to(ok.path)
    (slides / "broken.svs").write_bytes(b"II*\x00" + os.urandom(4096))
    cells = pl.read_parquet(synth_small.cells_path).filter(pl.col("slide_id") == ok.slide_id)
    ghost = cells.head(3).with_columns(slide_id=pl.lit("broken"))
    missing = cells.head(2).with_columns(slide_id=pl.lit("not_there"))
    path = tmp_path / "cells.parquet"
    pl.concat([cells, ghost, missing]).write_parquet(path)
    db = tmp_path / "db"
    proc = run_cli("cli.embed", "extract", slides, "--cells", path, "--db", db, "--local-backbone", "test-vit-local",
                   "--context-backbone", "test-vit-context", "--context-px", "64", "--quiet")  # fmt: skip
    assert proc.returncode != 0
    assert "broken" in proc.stderr and "not_there" in proc.stderr and "Traceback" not in proc.stderr
    assert _unique_keys(db) == (cells.height, cells.height)
    runs = Store(db).runs()
    assert runs["status"][0] == "failed"
    assert json.loads(runs["counts"][0])["slides_failed"] == 2



def test_cells_made_at_another_mpp_fail_their_slide(synth_small, tmp_path):
    """A cells table made with a wrong --mpp (x_um / x_px != the slide's µm/px) would put every
    crop in the wrong place: its slide fails with the two scales named, the others are stored."""
    cells = pl.read_parquet(synth_small.cells_path)
    wrong = cells.with_columns(
        pl.when(pl.col("slide_id") == "synth_s0").then(pl.col(c) * 2).otherwise(pl.col(c)).alias(c) for c in ("x_um", "y_um")
    )  # fmt: skip
    events = []
    with pytest.raises(ExtractionFailed, match=r"synth_s0: the cells table places its cells at 0\.5 µm/px .* slide reads at 0\.25"):
        extract(synth_small.out_dir / "slides", wrong, tmp_path / "db", ExtractConfig(**FAST),
                on_event=lambda k, d: events.append((k, d)))  # fmt: skip
    assert set(Store(tmp_path / "db").keys_frame()["slide_id"]) == set(cells["slide_id"]) - {"synth_s0"}

def test_centroids_outside_are_skipped_and_reported(synth_small, tmp_path):
    cells = pl.read_parquet(synth_small.cells_path).filter(pl.col("slide_id") == "synth_s0").head(20)
    bad = cells.head(2).with_columns(cell_id=pl.lit("out") + pl.col("cell_id"), x_px=pl.lit(-50.0))
    events = []
    summary = extract(synth_small.out_dir / "slides", pl.concat([cells, bad]), tmp_path / "db",
                      ExtractConfig(**FAST), on_event=lambda k, d: events.append((k, d)))  # fmt: skip
    assert summary["written"] == 20 and summary["outside_dropped"] == 2
    assert any(k == "warning" and "outside" in d["message"] for k, d in events)


def test_bad_cells_table_is_refused(synth_small, tmp_path):
    cells = pl.read_parquet(synth_small.cells_path)
    with pytest.raises(Exception, match="NaN"):
        extract(synth_small.out_dir / "slides", cells.with_columns(x_px=pl.lit(float("nan"))), tmp_path / "db", ExtractConfig(**FAST))
    with pytest.raises(Exception, match="appear more than once in the cell table"):
        extract(synth_small.out_dir / "slides", pl.concat([cells, cells.head(1)]), tmp_path / "db", ExtractConfig(**FAST))
    assert not (tmp_path / "db").exists() or not Store(tmp_path / "db").vector_tables()


def test_info_reports_tables_and_size(extracted, synth_small):
    proc = run_cli("cli.embed", "info", extracted[0], "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["tables"]["cells"]["cells"] == synth_small.n_cells
    assert info["tables"]["cells"]["vectors"] == {"local": 64, "context": 48}
    assert info["bytes_on_disk"] > synth_small.n_cells * (64 + 48) * 2
    # data, not JSON text inside JSON: `jq .runs[0].counts.written` works; every key is always there
    run = info["runs"][0]
    assert isinstance(run["counts"], dict) and run["counts"]["written"] > 0 and isinstance(run["config"], dict)
    assert "labels" in info and not any(v == "" for v in run.values())


def test_each_stored_vector_belongs_to_its_cell(extracted, synth_small, one_torch_thread):
    """Re-embed a sample of cells from their own crops, one read per cell (not the batch
    reader): each stored vector must be nearest (cosine) to its own cell's fresh vector.
    Catches vectors written against the wrong rows of a batch."""
    import torch

    from embedstore.extract.pipeline import build_steps
    from embedstore.io.slides import Slide

    db, _ = extracted
    stored = Store(db).load()
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(stored), size=150, replace=False))
    meta = stored.meta[sample]
    steps = build_steps(ExtractConfig(**FAST), torch.device("cpu"))
    paths = {s.slide_id: s.path for s in synth_small.slides}
    fresh = {s.name: [] for s in steps}
    for sid, x, y in meta.select("slide_id", "x_px", "y_px").iter_rows():
        with Slide(paths[sid]) as slide:
            for step in steps:
                crop, _ = slide.read(x, y, step.crop)
                fresh[step.name].append(step.embed(crop[None], torch.device("cpu"))[0])
    for step in steps:
        a = stored.vectors[step.name][sample]
        b = np.stack(fresh[step.name])
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        nearest = (a @ b.T).argmax(axis=1)
        own = int((nearest == np.arange(len(sample))).sum())
        assert own == len(sample), f"{step.name}: {own}/{len(sample)} stored vectors nearest their own cell"
