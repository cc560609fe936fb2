"""`heads train | eval | predict` on a store extracted from synthetic slides."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

from embedstore.errors import UserError
from embedstore.store import Store
from heads import runs
from heads.train import TrainConfig
from tests.clirun import heads
from tests.test_embed_cli import usage_error

QUICK = ["--epochs", "2", "--global-epochs", "2", "--gate-epochs", "1", "--batch-size", "64", "--no-scale", "--threads", "1"]
# the test slides are ~0.5 mm wide: the default 128 µm band would take most of their cells
GUARD = ["--guard-um", "40"]


def cli(*args):
    return heads(*args)  # in-process (tests/clirun.py)


@pytest.fixture(scope="module")
def trained(extracted_store, tmp_path_factory):
    """A run trained through the CLI, on a copy of the session's store: this module writes
    predictions, which other modules sharing the session store (one xdist worker) must not see."""
    db = tmp_path_factory.mktemp("heads_cli") / "db"
    shutil.copytree(extracted_store[0], db)
    run = tmp_path_factory.mktemp("run") / "r"
    proc = cli("train", "--db", db, "--out", run, *QUICK, *GUARD)
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
    assert set(split["split"]) == {"train", "val", "test", "guard"}
    shown = json.loads((run / "split.json").read_text())
    assert shown["source"] == "stripes" and shown["settings"]["guard_um"] == 40.0
    assert shown["leak"]["test"]["nearest_train_um_min"] >= 40.0 and shown["per_slide"]
    # post-hoc rules fitted on val at the end of training
    assert (run / "safety.json").exists() and (run / "conformal.parquet").exists()


def _ece(proba, y, n_bins=10):
    """Top-label ECE written out here: equal-width bins [k/n, (k+1)/n), confidence 1.0 alone."""
    conf = proba.max(1)
    hit = (proba.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1).astype(np.float32)
    idx = np.clip(np.searchsorted(edges, conf.astype(np.float32), side="right") - 1, 0, n_bins)
    gap = [abs(hit[idx == b].sum() - conf[idx == b].sum()) for b in range(n_bins + 1)]
    return float(np.sum(gap) / len(y))


def test_eval_writes_metrics_plots_and_baselines(trained):
    db, run = trained
    proc = cli("eval", "--run", run, "--db", db, "--baselines", "logreg,knn")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"local (FiLM)", "global", "gate", "logreg[both]", "knn[context]"} <= set(metrics["paths"])
    assert metrics["info"]["on"] == "test" and metrics["info"]["selection_cells"] is False
    # recompute every head path on the run's own test cells, independently of evaluate()
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    from heads.train import predict_all

    info = json.loads((run / "local.json").read_text())
    classes = info["classes"]
    data = runs.load_cell_data(db, labelled_only=True, classes=classes,
                               tissue_vocab=info["tissues"])  # fmt: skip
    split = runs.load_split(run, data)
    y_all = data.label.numpy()
    rows = split.test[y_all[split.test] >= 0]
    saved = pl.read_parquet(run / "split.parquet").filter(pl.col("split") == "test")
    assert len(rows) == saved.height > 20 and metrics["info"]["cells"] == len(rows)
    y = y_all[rows]
    present = np.unique(y)
    probs = predict_all(data.subset(rows), run)
    val_rows = split.val[y_all[split.val] >= 0]
    val_probs = predict_all(data.subset(val_rows), run)
    for path, key in runs.PATHS.items():
        if key == "p_safety":
            continue  # checked in test_posthoc
        m, p = metrics["paths"][path], probs[key]
        val_f1 = f1_score(y_all[val_rows], val_probs[key].argmax(1), labels=np.unique(y_all[val_rows]),
                          average="macro", zero_division=0)  # fmt: skip
        assert m["val_macro_f1"] == pytest.approx(val_f1, abs=1e-9), path
        assert m["selection_gap"] == pytest.approx(val_f1 - m["macro_f1"], abs=1e-9), path
        pred = p.argmax(1)
        assert m["n"] == len(rows)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-9), path
        # macro-F1 averages over the classes present in the scored cells (heads/metrics.py doc)
        f1 = f1_score(y, pred, labels=present, average="macro", zero_division=0)
        assert m["macro_f1"] == pytest.approx(f1, abs=1e-9), path
        bal = recall_score(y, pred, labels=present, average="macro", zero_division=0)
        assert m["balanced_accuracy"] == pytest.approx(bal, abs=1e-9), path
        assert m["ece"] == pytest.approx(_ece(p, y), abs=1e-6), path
        per_class = f1_score(y, pred, labels=present, average=None, zero_division=0)
        assert [m["per_class_f1"][classes[c]] for c in present] == pytest.approx(per_class), path
        assert {"per_class_f1", "ece_ts"} <= set(m) and 0 <= m["ece_ts"] <= 1
    # the gate path learnt something. Chance (a constant or random guess) scores balanced
    # accuracy 1/C and macro-F1 below 1/C over the C = 8 classes present in the 62 test cells;
    # this 2-epoch run on 219 training cells and random test backbones measured 0.31 and 0.25
    gate = metrics["paths"]["gate"]
    chance = 1 / len(present)
    assert gate["balanced_accuracy"] >= 2 * chance, (gate["balanced_accuracy"], chance)
    assert gate["macro_f1"] >= 1.5 * chance, (gate["macro_f1"], chance)
    for png in ("reliability.png", "confusion_gate.png", "complementarity.png"):
        assert (run / png).stat().st_size > 5000
    confusion = pl.read_csv(run / "confusion_gate.csv")
    assert confusion.height == len(classes)
    np.testing.assert_allclose(confusion.drop("true").to_numpy(), gate["confusion"]["normalized"])


def test_eval_on_val_says_these_cells_chose_the_model(trained, tmp_path):
    """... and writes beside the test results, not over them: `--on val` replaced RUN/metrics.json
    and its plots, so `heads report` then showed the optimistic val scores as the run's."""
    db, run = trained
    # the default is the test split; --json prints the results on stdout
    proc = cli("eval", "--run", run, "--db", db, "--baselines", "none", "--json")
    assert proc.returncode == 0, proc.stderr
    as_json = json.loads(proc.stdout)
    assert as_json["selection"] is False and any("gate" in r["name"] for r in as_json["results"])
    tested = (run / "metrics.json").read_bytes()
    info = json.loads(tested)["info"]
    assert info["on"] == "test" and info["selection_cells"] is False and "warning" not in info
    assert info["conformal"]["level"] == 0.9 and info["conformal"]["marginal"]["n"] == info["cells"]
    proc = cli("eval", "--run", run, "--db", db, "--on", "val", "--baselines", "none")
    assert proc.returncode == 0, proc.stderr
    assert "chose the model" in proc.stdout  # the results table is data: stdout
    info = json.loads((run / "eval-val" / "metrics.json").read_text())["info"]
    assert info["on"] == "val" and info["selection_cells"] is True and "optimistic" in info["warning"]
    assert (run / "eval-val" / "reliability.png").exists() and (run / "metrics.json").read_bytes() == tested


def test_predict_writes_store_parquet_geojson(trained, tmp_path):
    db, run = trained
    proc = cli("predict", "--run", run, "--db", db, "--out", tmp_path / "pred")
    assert proc.returncode == 0, proc.stderr
    frame = pl.read_parquet(tmp_path / "pred" / "predictions.parquet")
    n = Store(db).keys_frame().height
    assert frame.height == n and {"pred_class", "gate", "pred_confidence"} <= set(frame.columns)
    # each cell's conformal set (90%: classes joined by "|") and its size; the safety rule's class
    assert {"conformal_set", "set_size", "safety_class"} <= set(frame.columns)
    sizes = frame["conformal_set"].str.split("|").list.eval(pl.element().filter(pl.element() != "")).list.len()
    assert (sizes == frame["set_size"]).all() and frame["set_size"].max() >= 1
    stored = Store(db).predictions(run.name)
    assert {"conformal_set", "set_size", "safety_class"} <= set(stored.columns)
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
    with pytest.raises(UserError, match=r"local\b.*\b64\b.*\b7\b"):  # names both dims
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


# -- usage errors: non-zero exit, one clear line, no traceback --------------------------------



@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A labelled store without extraction (the usage errors need a real store, not vectors)."""
    from tests.test_explore import clustered_store

    return clustered_store(tmp_path_factory.mktemp("small") / "db")[0]


@pytest.mark.parametrize(("command", "missing"), [("eval", "--run"), ("predict", "--db")])
def test_missing_required_option_is_a_usage_error(small_store, tmp_path, command, missing):
    given = {"--run": tmp_path / "r", "--db": small_store}
    args = [a for opt, v in given.items() if opt != missing for a in (opt, v)]
    usage_error(cli(command, *args), "missing", missing)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_run_dir_that_does_not_exist(small_store, tmp_path, command):
    run = tmp_path / "no-such-run"
    usage_error(cli(command, "--run", run, "--db", small_store), str(run), "checkpoint", "train")
    assert not run.exists()  # nothing written for a run that is not there


def test_eval_when_a_class_has_no_validation_cells(trained):
    """The complementarity table printed None shares as numbers and crashed (TypeError)."""
    db, run = trained
    store = Store(db)
    saved = store.labels()
    val = pl.read_parquet(run / "split.parquet").filter(pl.col("split").is_in(["val", "test"]))
    gone = saved.join(val, on=["slide_id", "cell_id"], how="semi")["label"].value_counts().sort("count")["label"][0]
    # the class keeps its training cells, but none of its val or test cells is labelled any more
    in_val = saved.join(val.select("slide_id", "cell_id", v=pl.lit(True)), on=["slide_id", "cell_id"], how="left")["v"].fill_null(False)
    relabel = saved.with_columns(label=pl.when((pl.col("label") == gone) & in_val).then(None).otherwise(pl.col("label")))
    try:
        store.set_labels(relabel.drop("source"), source="no val")
        proc = cli("eval", "--run", run, "--db", db, "--baselines", "none")
    finally:
        store.set_labels(saved.drop("source"), source="cells table")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    comp = proc.stdout[proc.stdout.index("complementarity"):]
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in comp.splitlines() if ln.count("│") >= 5]
    row = next(c for c in cells if c[0] == gone)
    assert row[1:] == ["0", "-", "-"], row  # no cells: shares shown as "-", not numbers
    assert gone not in json.loads((run / "metrics.json").read_text())["info"]["classes_present"]
