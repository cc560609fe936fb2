"""What `heads predict` (Parquet, QuPath GeoJSON) and `embed export` (AnnData, SpatialData, CSV)
write for the inputs a lab really has: slide ids that are one file name once made safe, slides
predicted again one at a time, cells without a prediction, unfinished writes. Stores are written
directly (tests/test_search_inputs.py) and runs trained in seconds."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from embedstore.io import geojson
from heads import runs
from heads.export import predictions_frame
from heads.splits import SplitConfig
from heads.train import TrainConfig
from tests.clirun import heads
from tests.test_search_inputs import write_store

CLASSES = ["Tumor", "Stroma", "Immune"]
#: "case:A" and "case A" are both case_A once file-safe
SLIDES = ["case:A", "case A", "S1"]
CFG = TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    """A store of 3 slides x 60 cells (3 separable classes, one tissue) and a run trained on it."""
    root = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(0)
    labels = CLASSES * 60
    shift = np.array([{"Tumor": 0.0, "Stroma": 3.0, "Immune": -3.0}[c] for c in labels], np.float32)
    local = rng.normal(size=(len(labels), 8)).astype(np.float32) + shift[:, None]
    slides = [s for s in SLIDES for _ in range(60)]
    db = write_store(root / "db", local, slides=slides, labels=labels)
    run = root / "run"
    runs.train(db, run, "all", replace(CFG, seed=0), scale=False, split_config=SplitConfig(guard_um=0, seed=0),
               log=lambda m: None)  # fmt: skip
    return db, run


def features_by_slide(folder):
    """slide_id -> (file name, features) of every GeoJSON in `folder`, refusing two files of one slide."""
    out = {}
    for path in sorted(folder.glob("*.geojson")):
        feats = json.loads(path.read_text())["features"]
        if not feats:  # another tool's file
            continue
        (slide,) = {f["properties"]["metadata"]["slide_id"] for f in feats}
        assert slide not in out, f"{path.name} and {out[slide][0]} both hold slide {slide!r}"
        out[slide] = (path.name, feats)
    return out


def test_predicting_one_slide_again_keeps_the_geojson_of_a_slide_named_alike(trained, tmp_path):
    """`heads predict --slide case:A` into a folder holding every slide's GeoJSON wrote case:A to
    case_A.geojson, the file of slide "case A": that slide's GeoJSON was gone (overwritten) and
    case:A had two files, its old case_A_2.geojson left beside the new one."""
    db, run = trained
    out = tmp_path / "pred"
    assert heads("predict", "--run", run, "--db", db, "--out", out).returncode == 0
    before = features_by_slide(out / "geojson")
    assert sorted(before) == sorted(SLIDES) and len({n.lower() for n, _ in before.values()}) == 3
    proc = heads("predict", "--run", run, "--db", db, "--out", out, "--slide", "case:A", "--coverage", "0.5")
    assert proc.returncode == 0, proc.stderr
    after = features_by_slide(out / "geojson")
    assert sorted(after) == sorted(SLIDES)
    assert {s: n for s, (n, _) in after.items()} == {s: n for s, (n, _) in before.items()}  # each slide keeps its file
    assert after["case A"] == before["case A"] and after["S1"] == before["S1"]
    parquet = pl.read_parquet(out / "predictions.parquet").filter(pl.col("slide_id") == "case:A")
    got = {f["properties"]["name"]: f["properties"]["metadata"]["conformal_set"] for f in after["case:A"][1]}
    assert got == dict(zip(parquet["cell_id"], parquet["conformal_set"], strict=True))  # the new sets


def test_ray_tasks_writing_slides_named_alike_keep_each_ones_geojson(trained, tmp_path):
    """A Ray predict task wrote its slides into a private folder and renamed each file into the
    shared one: named without the files there, "case:A" and "case A" (two tasks) both became
    case_A.geojson, and one slide's GeoJSON was lost on a full predict."""
    from heads.distributed import _write_geojson_atomic

    db, run = trained
    frame = runs.predict(run, db, out_dir=tmp_path / "local", log=lambda m: None)
    for slide in SLIDES:  # one task per slide, as workers=3 would run them
        _write_geojson_atomic(frame.filter(pl.col("slide_id") == slide), tmp_path / "geojson")
    assert sorted(features_by_slide(tmp_path / "geojson")) == sorted(SLIDES)


def test_another_runs_geojson_goes_with_its_predictions(trained, tmp_path):
    """Run r2 predicted every slide; run r1 then predicted one slide into the same folder.
    predictions.parquet was replaced by r1's one slide (and said so), but r2's GeoJSON of the
    other slides stayed, showing another model's classes in QuPath."""
    db, run = trained
    other = tmp_path / "r2"
    runs.train(db, other, "all", replace(CFG, seed=1), scale=False, split_config=SplitConfig(guard_um=0, seed=0),
               log=lambda m: None)  # fmt: skip
    out = tmp_path / "pred"
    runs.predict(other, db, out_dir=out, log=lambda m: None)
    (out / "geojson" / "notes.geojson").write_text('{"type": "FeatureCollection", "features": []}')  # not ours
    said = []
    runs.predict(run, db, out_dir=out, slides=["S1"], log=said.append)
    assert sorted(features_by_slide(out / "geojson")) == ["S1"]
    assert (out / "geojson" / "notes.geojson").exists()
    assert any("removed the GeoJSON of 2 slide(s)" in m for m in said)


def test_geojson_of_cells_without_a_prediction_or_with_nan_probabilities(tmp_path):
    """A frame of exported cells (`embed export`: a cell the run did not predict has no class and
    NaN probabilities) died in the middle of the file: KeyError on the missing class, ValueError
    ("Out of range float values are not JSON compliant") on a NaN probability, leaving a truncated
    GeoJSON that QuPath cannot read."""
    frame = pl.DataFrame({
        "slide_id": ["S"] * 3, "cell_id": ["1", "2", "3"], "x_px": [10.0, 20.0, 30.0], "y_px": [5.0, 6.0, 7.0],
        "pred_class": ["T", None, "T"], "prob_T": [0.9, float("nan"), float("inf")], "prob_S": [0.1, None, 0.0],
    })  # fmt: skip
    (path,) = geojson.write_geojson(frame, tmp_path / "S.geojson", include_probabilities=True)
    feats = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the GeoJSON"))["features"]
    assert len(feats) == 3
    assert feats[0]["properties"]["classification"]["name"] == "T"
    assert "classification" not in feats[1]["properties"]  # QuPath: an unclassified detection
    assert feats[1]["properties"]["measurements"] == {}
    assert feats[2]["properties"]["measurements"] == {"prob S": 0.0}
    assert all(math.isfinite(v) for f in feats for v in f["properties"]["measurements"].values())


def test_a_geojson_write_that_fails_keeps_the_earlier_file(tmp_path, monkeypatch):
    """The GeoJSON was written in place: a write that failed (or a `heads predict` killed) half-way
    left a truncated file where the earlier, complete one had been."""
    meta = pl.DataFrame({"slide_id": ["S"] * 4, "cell_id": list("abcd"), "x_um": [1.0] * 4, "y_um": [1.0] * 4,
                         "x_px": [4.0, 5.0, 6.0, 7.0], "y_px": [4.0] * 4})  # fmt: skip
    frame = predictions_frame(meta, CLASSES, np.full((4, 3), 1 / 3))
    (path,) = geojson.write_geojson(frame, tmp_path / "S.geojson")
    earlier = path.read_bytes()
    features = geojson._features

    def failing(*args):  # the disk fills up after two cells
        for i, feat in enumerate(features(*args)):
            if i == 2:
                raise OSError(28, "No space left on device")
            yield feat

    monkeypatch.setattr(geojson, "_features", failing)
    with pytest.raises(OSError, match="No space left"):
        geojson.write_geojson(frame.with_columns(x_px=pl.col("x_px") + 1), path)
    assert path.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == ["S.geojson"]


def test_unnamed_classes_are_no_categories_of_the_label_and_class_columns(tmp_path):
    """When the stored predictions do not name every class (a class never predicted, no
    --run-dir), the placeholders class_0, class_1... were made categories of `label` and
    `pred_class`: scanpy's legend of the pathologist's labels listed classes no cell has."""
    import anndata as ad

    from embedstore.io import export as ex
    from embedstore.store import Store

    rng = np.random.default_rng(1)
    labels = ["Tumor", "Stroma", None, "Tumor"] * 3
    db = write_store(tmp_path / "db", rng.normal(size=(12, 8)).astype(np.float32), labels=labels)
    meta = Store(db).load(vectors=()).meta
    proba = np.tile([0.1, 0.8, 0.1], (meta.height, 1))  # every cell Stroma: Tumor, Immune never predicted
    Store(db).write_predictions(predictions_frame(meta, CLASSES, proba).with_columns(run=pl.lit("r")))
    summary = ex.export(db, tmp_path / "cells.h5ad")
    assert summary["run"] == "r" and summary["predicted"] == 12
    adata = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert adata.uns["nuclass"]["predictions"]["classes_source"].startswith("unknown")
    assert list(adata.obs["label"].cat.categories) == ["Stroma", "Tumor"]
    assert list(adata.obs["pred_class"].cat.categories) == ["Stroma"]
    assert adata.obsm["proba"].shape == (12, 3)
    ex.export(db, tmp_path / "cells.csv")  # the probability columns keep their placeholder names
    assert [c for c in pl.read_csv(tmp_path / "cells.csv").columns if c.startswith("prob_")] == [
        "prob_class_0", "prob_class_1", "prob_class_2"]  # fmt: skip


def test_run_dir_alone_names_the_run_to_export(tmp_path):
    """`embed export --run-dir RUN` on a store holding predictions of two runs was refused ("pick
    one with --run") although the folder names the run; the run had to be typed twice."""
    import anndata as ad

    from embedstore.store import Store
    from heads import checkpoint
    from heads.export import run_digest
    from tests.clirun import embed

    rng = np.random.default_rng(2)
    db = write_store(tmp_path / "db", rng.normal(size=(12, 8)).astype(np.float32))
    meta = Store(db).load(vectors=()).meta
    run_dir = tmp_path / "r2"
    run_dir.mkdir()
    (run_dir / "local.safetensors").write_bytes(b"")
    renamed = ["T", "S", "I"]
    info = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "classes": renamed}
    (run_dir / "local.json").write_text(json.dumps(info))
    proba = np.tile([0.1, 0.8, 0.1], (meta.height, 1))
    for run, names in (("r1", CLASSES), ("r2", renamed)):
        frame = predictions_frame(meta, names, proba).with_columns(
            run=pl.lit(run), run_digest=pl.lit(run_digest(run_dir) if run == "r2" else "0" * 16),
            run_dir=pl.lit(str(run_dir.resolve() if run == "r2" else tmp_path / run)))  # fmt: skip
        Store(db).write_predictions(frame)
    proc = embed("export", "--db", db, "--out", tmp_path / "cells.h5ad", "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert "run r2" in proc.stderr
    adata = ad.read_h5ad(tmp_path / "cells.h5ad")
    prov = adata.uns["nuclass"]["predictions"]
    assert prov["run"] == "r2" and list(prov["classes"]) == renamed and prov["classes_source"].startswith("checkpoint")
    assert list(adata.obs["pred_class"].cat.categories) == renamed
    # a --run that is not the folder's run is still refused
    bad = embed("export", "--db", db, "--out", tmp_path / "x.h5ad", "--run", "r1", "--run-dir", run_dir)
    assert bad.returncode == 2 and "is run 'r2', not the run 'r1'" in bad.stderr


def test_predictions_of_two_runs_named_alike_are_never_exported_as_one(tmp_path):
    """Two run folders both named `run` predicted different slides (or one run was retrained
    between two `heads predict --slide`): `embed export` without --run-dir put both runs'
    predictions in one pred_class column and one proba matrix, as if one model had made them."""
    from embedstore.io import export as ex
    from embedstore.store import Store
    from tests.clirun import embed

    rng = np.random.default_rng(3)
    db = write_store(tmp_path / "db", rng.normal(size=(12, 8)).astype(np.float32))  # slides s0, s1
    meta = Store(db).load(vectors=()).meta
    proba = np.tile([0.1, 0.8, 0.1], (meta.height, 1))
    for slide, folder in (("s0", tmp_path / "C" / "run"), ("s1", tmp_path / "D" / "run")):
        part = meta.filter(pl.col("slide_id") == slide)
        Store(db).write_predictions(predictions_frame(part, CLASSES, proba[: part.height]).with_columns(
            run=pl.lit("run"), run_digest=pl.lit(folder.parent.name * 16), run_dir=pl.lit(str(folder))))  # fmt: skip
    proc = embed("export", "--db", db, "--out", tmp_path / "cells.h5ad")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "made by 2 different runs" in proc.stderr and "C/run" in proc.stderr and "--run-dir" in proc.stderr
    assert not (tmp_path / "cells.h5ad").exists()
    one = ex.to_anndata(db, slides=["s1"], vectors=())  # the cells of one run: exported
    assert one.uns["nuclass"]["predictions"]["cells"] == one.n_obs
