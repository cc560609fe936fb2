"""`heads train | eval | predict` on a store extracted from synthetic slides."""

import json
import subprocess
import sys

import polars as pl
import pytest

from embedstore.errors import UserError
from embedstore.store import Store
from heads import runs
from heads.train import TrainConfig

QUICK = ["--epochs", "2", "--global-epochs", "2", "--gate-epochs", "1", "--batch-size", "64", "--no-scale", "--threads", "1"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.heads", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(extracted_store, tmp_path_factory):
    db, _ = extracted_store
    run = tmp_path_factory.mktemp("run") / "r"
    proc = cli("train", "--db", db, "--out", run, *QUICK)
    assert proc.returncode == 0, proc.stderr
    return db, run


def test_train_writes_checkpoints_and_split(trained):
    _, run = trained
    for stage in ("local", "global", "gate"):
        assert (run / f"{stage}.safetensors").exists() and (run / f"{stage}.json").exists()
    info = json.loads((run / "local.json").read_text())
    assert info["tissues"] == ["breast", "lung", "pancreas"] and len(info["classes"]) >= 8
    assert info["provenance"]["vectors"]["local"]["backbone"] == "test-vit-local"
    split = pl.read_parquet(run / "split.parquet")
    assert set(split["split"]) == {"train", "val"}


def test_eval_writes_metrics_plots_and_baselines(trained):
    db, run = trained
    proc = cli("eval", "--run", run, "--db", db, "--baselines", "logreg,knn")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"local (FiLM)", "global", "gate", "logreg[both]", "knn[context]"} <= set(metrics["paths"])
    for path in ("local (FiLM)", "global", "gate"):
        m = metrics["paths"][path]
        assert {"accuracy", "macro_f1", "per_class_f1", "ece", "ece_ts"} <= set(m)
        assert 0 <= m["ece"] <= 1 and 0 <= m["macro_f1"] <= 1
    for png in ("reliability.png", "confusion_gate.png", "complementarity.png"):
        assert (run / png).stat().st_size > 5000
    assert pl.read_csv(run / "confusion_gate.csv").height == len(json.loads((run / "local.json").read_text())["classes"])


def test_predict_writes_store_parquet_geojson(trained, tmp_path):
    db, run = trained
    proc = cli("predict", "--run", run, "--db", db, "--out", tmp_path / "pred")
    assert proc.returncode == 0, proc.stderr
    frame = pl.read_parquet(tmp_path / "pred" / "predictions.parquet")
    n = Store(db).keys_frame().height
    assert frame.height == n and {"pred_class", "gate", "pred_confidence"} <= set(frame.columns)
    stored = Store(db).predictions(run.name)
    assert stored.height == n and len(stored["proba"][0]) == len(json.loads((run / "local.json").read_text())["classes"])
    geo = sorted((tmp_path / "pred" / "geojson").glob("*.geojson"))
    assert len(geo) == 3
    feat = json.loads(geo[0].read_text())["features"][0]
    assert feat["properties"]["objectType"] == "detection" and feat["geometry"]["type"] == "Point"
    # rerun: predictions are replaced, not duplicated
    assert cli("predict", "--run", run, "--db", db, "--out", tmp_path / "pred").returncode == 0
    assert Store(db).predictions(run.name).height == n


def test_bad_inputs_are_refused(trained, tmp_path):
    db, run = trained
    data = runs.load_cell_data(db, labelled_only=True)
    # a tissue unseen in training
    with pytest.raises(UserError, match="not seen in training"):
        runs.load_cell_data(db, tissue_vocab=["breast"])
    # no labels at all
    store = Store(db)
    saved = store.labels()
    try:
        store.set_labels(saved.select("slide_id", "cell_id").with_columns(label=pl.lit(None, dtype=pl.Utf8)), source="none")
        proc = cli("train", "--db", db, "--out", tmp_path / "r2", *QUICK)
        assert proc.returncode != 0 and "no labels" in proc.stderr and "Traceback" not in proc.stderr
        # a single class
        store.set_labels(saved.select("slide_id", "cell_id").with_columns(label=pl.lit("T_Cell")), source="one")
        with pytest.raises(UserError, match="class"):
            runs.train(db, tmp_path / "r3", "local", TrainConfig(epochs=1), log=lambda m: None)
    finally:
        store.set_labels(saved.drop("source"), source="cells table")
    # vectors whose dims do not match the checkpoint
    import torch

    from heads.data import CellData
    from heads.train import predict_all

    wrong = CellData.from_arrays(data.meta, torch.zeros(len(data), 7), data.context, provenance=data.provenance,
                                 classes=data.classes, tissues=data.tissues)  # fmt: skip
    with pytest.raises(UserError):
        predict_all(wrong, run)


def test_cohort_eval_maps_synonyms_and_restricts_classes(trained):
    db, run = trained
    store = Store(db)
    saved = store.labels()
    raw = saved.with_columns(
        label=pl.when(pl.col("label") == "T_Cell").then(pl.lit("T lymphocyte"))
        .when(pl.col("label") == "B_Cell").then(pl.lit("Plasma cell"))
        .otherwise(pl.col("label"))
    ).drop("source")  # fmt: skip
    try:
        store.set_labels(raw, source="cohort")
        result = runs.evaluate_run(
            run, db, cohort="ext", synonyms={"T lymphocyte": "T_Cell", "Plasma cell": None},
            baselines=(), log=lambda m: None,
        )  # fmt: skip
    finally:
        store.set_labels(saved.drop("source"), source="cells table")
    metrics = json.loads((run / "cohort-ext" / "metrics.json").read_text())
    present = metrics["info"]["classes_present"]
    assert "T_Cell" in present and "B_Cell" not in present
    n_b = saved.filter(pl.col("label") == "B_Cell").height
    assert metrics["info"]["cells"] == saved.height - n_b
    gate = metrics["paths"]["gate"]
    assert set(gate["per_class_f1"]) >= set(present)
    assert result["out_dir"] == run / "cohort-ext"
