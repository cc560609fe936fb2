"""Evaluation side of the heads: metrics, calibration, baselines, exports and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console
from scipy.special import softmax
from torchmetrics.functional.classification import multiclass_calibration_error

from embedstore.errors import UserError
from heads.baselines import KNNVote, LogisticProbe, XGBoostBaseline, run_baselines
from heads.calibration import (
    TemperatureScaler,
    expected_calibration_error,
    reliability_curve,
)
from heads.export import class_colors, predictions_frame, write_geojson, write_parquet
from heads.metrics import (
    apply_synonyms,
    complementarity,
    evaluate,
    format_results_table,
    restrict_to_present,
    results_table,
    rich_results_table,
    write_metrics_json,
)
from heads.plots import complementarity_chart, confusion_heatmap, reliability_diagram

CLASSES = ["A", "B", "C"]


def tm_ece(proba: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    return float(
        multiclass_calibration_error(
            torch.from_numpy(proba),
            torch.from_numpy(y),
            num_classes=proba.shape[1],
            n_bins=n_bins,
            norm="l1",
        )
    )


def one_hot_ish(conf: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities whose max is exactly `conf` at column `pred` (rest spread evenly)."""
    p = np.repeat(((1 - conf) / (n_classes - 1))[:, None], n_classes, axis=1)
    p[np.arange(len(conf)), pred] = conf
    return p


# --------------------------------------------------------------------------- ECE


@pytest.mark.parametrize("seed", range(5))
def test_ece_matches_torchmetrics_on_random_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 500, 5
    proba = softmax(rng.normal(scale=3.0, size=(n, c)), axis=1)
    y = rng.integers(0, c, n)
    ours = expected_calibration_error(proba, y)
    assert ours == pytest.approx(tm_ece(proba, y), abs=1e-6)
    assert 0 < ours < 1


@pytest.mark.parametrize(
    "conf",
    [
        np.linspace(0, 1, 11)[3:],  # every confidence exactly on a bin edge, including 1.0
        np.full(40, 0.7),  # all in one bin, nine bins empty
        np.array([1.0, 1.0, 0.95, 0.95, 0.91]),  # saturated: 1.0 sits in a bin of its own
        np.array([0.35, 0.36, 0.99, 0.999]),  # most bins empty
        np.array([0.5, 0.6, 0.6 - 1e-9, 0.6 + 1e-9, 0.9, 0.9 - 1e-8]),  # float32 edge rounding
    ],
)
def test_ece_matches_torchmetrics_on_adversarial_inputs(conf: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    c = 3
    conf = conf[conf >= 1 / c]  # a max probability is at least 1/C
    pred = rng.integers(0, c, len(conf))
    for hits in (np.ones(len(conf), bool), np.zeros(len(conf), bool), rng.random(len(conf)) < 0.5):
        y = np.where(hits, pred, (pred + 1) % c)
        proba = one_hot_ish(conf, pred, c)
        assert expected_calibration_error(proba, y) == pytest.approx(tm_ece(proba, y), abs=1e-6)


def test_ece_hand_computed_and_other_bin_counts() -> None:
    # two cells at 0.9 (one right), two at 0.6 (both right): |0.5-0.9|*0.5 + |1-0.6|*0.5 = 0.4
    proba = one_hot_ish(np.array([0.9, 0.9, 0.6, 0.6]), np.array([0, 0, 1, 1]), 3)
    y = np.array([0, 2, 1, 1])
    assert expected_calibration_error(proba, y) == pytest.approx(0.4)
    rng = np.random.default_rng(7)
    proba = softmax(rng.normal(scale=2.0, size=(300, 4)), axis=1)
    y = rng.integers(0, 4, 300)
    for n_bins in (1, 5, 15):
        assert expected_calibration_error(proba, y, n_bins) == pytest.approx(
            tm_ece(proba, y, n_bins), abs=1e-6
        )


def test_ece_rejects_logits_with_a_clear_message() -> None:
    with pytest.raises(UserError, match="not logits"):
        expected_calibration_error(np.array([[2.0, -1.0], [0.5, 0.1]]), np.array([0, 1]))
    with pytest.raises(UserError, match="n_bins"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([0]), n_bins=0)


def test_reliability_curve_counts_and_accuracy() -> None:
    proba = one_hot_ish(np.array([0.95, 1.0, 0.55, 0.55]), np.array([0, 0, 1, 1]), 2)
    y = np.array([0, 1, 1, 0])
    curve = reliability_curve(proba, y)
    assert curve.count.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]  # 1.0 drawn in the last bin
    assert curve.accuracy[5] == pytest.approx(0.5)
    assert curve.accuracy[9] == pytest.approx(0.5)
    assert curve.confidence[9] == pytest.approx(0.975)
    assert np.isnan(curve.accuracy[0])
    assert curve.ece == pytest.approx(tm_ece(proba, y), abs=1e-6)


# --------------------------------------------------------------------------- temperature


def test_temperature_scaling_recovers_temperature_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    n, c, t_true = 6000, 6, 3.0
    true_logits = rng.normal(scale=2.0, size=(n, c))
    y = np.array([rng.choice(c, p=p) for p in softmax(true_logits, axis=1)])
    overconfident = true_logits * t_true  # the model's logits are 3x too sharp
    before = expected_calibration_error(softmax(overconfident, axis=1), y)
    ts = TemperatureScaler().fit(overconfident, y)
    after = expected_calibration_error(ts.transform(overconfident), y)
    assert ts.temperature_ == pytest.approx(t_true, rel=0.15)
    assert after < before / 3
    assert ts.nll_after_ < ts.nll_before_
    # the argmax never changes
    assert np.array_equal(ts.transform(overconfident).argmax(1), overconfident.argmax(1))


def test_temperature_scaling_on_gate_probabilities() -> None:
    rng = np.random.default_rng(1)
    n, c = 4000, 4
    logits = rng.normal(scale=1.5, size=(n, c))
    y = np.array([rng.choice(c, p=p) for p in softmax(logits, axis=1)])
    sharp = softmax(logits * 2.5, axis=1)  # a mixture-like output with no logits available
    ts = TemperatureScaler(inputs="proba").fit(sharp, y)
    assert ts.temperature_ == pytest.approx(2.5, rel=0.15)
    out = ts.transform(sharp)
    assert np.allclose(out.sum(1), 1)
    assert expected_calibration_error(out, y) < expected_calibration_error(sharp, y)


def test_temperature_scaler_validates_params_and_state() -> None:
    with pytest.raises(UserError, match="inputs"):
        TemperatureScaler(inputs="scores").fit(np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(UserError, match="bounds"):
        TemperatureScaler(bounds=(2.0, 1.0)).fit(np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(UserError, match="not fitted"):
        TemperatureScaler().transform(np.zeros((2, 2)))


# --------------------------------------------------------------------------- metrics


def test_evaluate_hand_computed() -> None:
    # true: A A B B C ; pred: A B B B A
    y = np.array(["A", "A", "B", "B", "C"])
    pred = np.array([0, 1, 1, 1, 0])
    proba = np.full((5, 3), 0.1)
    proba[np.arange(5), pred] = 0.8
    r = evaluate(y, proba, CLASSES)
    assert r["accuracy"] == pytest.approx(3 / 5)
    # F1: A p=1/2 r=1/2 -> 0.5 ; B p=2/3 r=1 -> 0.8 ; C p=nan(never predicted) r=0 -> 0
    assert r["per_class"]["A"]["f1"] == pytest.approx(0.5)
    assert r["per_class"]["B"]["f1"] == pytest.approx(0.8)
    assert r["per_class"]["C"]["f1"] == pytest.approx(0.0)
    assert r["per_class"]["C"]["precision"] is None
    assert r["per_class"]["B"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["B"]["support"] == 2
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert r["confusion"]["normalized"] == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert r["confusion"]["counts"][0] == [1, 1, 0]
    assert r["ece"] == pytest.approx(abs(0.6 - 0.8))


def test_evaluate_with_classes_absent_from_labels() -> None:
    classes = ["A", "B", "C", "D"]
    y = np.array([0, 0, 1, 1])
    proba = np.array(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.7, 0.1, 0.1]] * 1
        + [[0.1, 0.7, 0.1, 0.1]]
    )
    r = evaluate(y, proba, classes)
    assert r["present_classes"] == ["A", "B"]
    assert r["per_class"]["C"] == {"f1": None, "recall": None, "precision": None, "support": 0}
    # D is absent but predicted once: recall undefined, precision 0, F1 0
    assert r["per_class"]["D"]["recall"] is None
    assert r["per_class"]["D"]["precision"] == 0.0
    # macro-F1 over present classes only: A (p=1, r=.5 -> 2/3), B (p=1, r=1 -> 1)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["confusion"]["normalized"][2] == [0.0, 0.0, 0.0, 0.0]
    json.dumps(r, allow_nan=False)  # strict JSON, no NaN


def test_evaluate_rejects_bad_labels() -> None:
    with pytest.raises(UserError, match="not in the class list"):
        evaluate(np.array(["A", "Z"]), np.full((2, 3), 1 / 3), CLASSES)
    with pytest.raises(UserError, match="columns"):
        evaluate(np.array([0, 1]), np.full((2, 2), 0.5), CLASSES)


def test_apply_synonyms_and_restrict() -> None:
    classes = ["B_Cell", "T_Cell", "Fibroblast", "Acinar"]
    raw = ["B cell", "t-cell", "CAF", "Fibroblast", "Unknown", None, "doublet", "CAF"]
    synonyms = {"CAF": "Fibroblast", "doublet": None}
    labels, keep, dropped = apply_synonyms(raw, synonyms, classes)
    assert keep.tolist() == [True, True, True, True, False, False, False, True]
    assert labels[keep].tolist() == ["B_Cell", "T_Cell", "Fibroblast", "Fibroblast", "Fibroblast"]
    assert dropped == {"Unknown": 1, "<missing>": 1, "doublet": 1}
    with pytest.raises(UserError, match="not training classes"):
        apply_synonyms(raw, {"CAF": "Stroma"}, classes)

    present = sorted(set(labels[keep]))
    proba = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0]])
    r = restrict_to_present(proba, classes, present)
    assert np.allclose(r[0], [0.1 / 0.6, 0.2 / 0.6, 0.3 / 0.6, 0.0])
    assert np.allclose(r[1], [1 / 3, 1 / 3, 1 / 3, 0.0])  # no mass left: uniform over present
    assert r.argmax(1).tolist() == [2, 0]  # Acinar (absent) can no longer win
    with pytest.raises(UserError, match="not training classes"):
        restrict_to_present(proba, classes, ["Stroma"])


def test_complementarity_hand_made() -> None:
    y = np.array(["A", "A", "A", "A", "B", "B"])
    local = np.array(["A", "A", "B", "B", "B", "A"])
    glob = np.array(["A", "B", "A", "B", "A", "A"])
    f = complementarity(y, local, glob, CLASSES)
    a = f.row(0, named=True)
    assert a["support"] == 4
    assert (a["both"], a["only_local"], a["only_global"], a["neither"]) == (0.25, 0.25, 0.25, 0.25)
    b = f.row(1, named=True)
    assert (b["only_local"], b["only_global"], b["both"], b["neither"]) == (0.5, 0.0, 0.0, 0.5)
    c = f.row(2, named=True)
    assert c["support"] == 0 and c["only_local"] is None
    # probabilities are accepted too
    proba = np.eye(3)[[0, 0, 1, 1, 1, 0]]
    assert complementarity(y, proba, glob, CLASSES).equals(f)


def test_results_table_and_metrics_json(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    rows = []
    for name in ("local (FiLM)", "global", "gate"):
        proba = softmax(rng.normal(size=(50, 3)) + 2 * np.eye(3)[y], axis=1)
        rows.append({"name": name, **evaluate(y, proba, CLASSES)})
    rows[2]["ece_ts"] = 0.01
    t = results_table(rows)
    assert t.columns == ["name", "n", "accuracy", "macro_f1", "ece", "ece_ts"]
    assert t["name"].to_list() == ["local (FiLM)", "global", "gate"]
    assert t["ece_ts"].to_list()[:2] == [None, None]
    text = format_results_table(t)
    assert "local (FiLM)" in text and f"{rows[0]['macro_f1']:.3f}" in text
    console = Console(record=True, width=120)
    console.print(rich_results_table(t, title="val"))
    rendered = console.export_text()
    assert "gate" in rendered and f"{rows[1]['accuracy']:.3f}" in rendered
    out = write_metrics_json(rows, tmp_path / "m" / "metrics.json", extra={"split": "val"})
    doc = json.loads(out.read_text())
    assert set(doc["paths"]) == {"local (FiLM)", "global", "gate"}
    g = doc["paths"]["gate"]
    assert g["macro_f1"] == pytest.approx(rows[2]["macro_f1"])
    assert set(g["per_class_f1"]) == set(CLASSES)
    assert g["ece"] == pytest.approx(rows[2]["ece"])
    with pytest.raises(UserError, match="lack"):
        results_table([{"name": "x"}])


# --------------------------------------------------------------------------- baselines


def blobs(n: int, d: int, c: int, seed: int, spread: float = 1.0):
    """Separable classes: c random centres in d dims plus isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(c, d))
    y = rng.integers(0, c, n)
    return (centres[y] + rng.normal(scale=spread, size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize(
    "est",
    [
        LogisticProbe(max_iter=100),
        XGBoostBaseline(n_estimators=20, max_depth=3),
        XGBoostBaseline(n_estimators=20, max_depth=3, pca_components=6),
        KNNVote(k=5),
        KNNVote(k=5, weights="uniform"),
    ],
    ids=["logreg", "xgboost", "xgboost-pca", "knn-distance", "knn-uniform"],
)
def test_baselines_beat_chance_on_separable_data(est) -> None:
    X, y = blobs(600, 16, 4, seed=0)
    est.fit(X[:400], y[:400])
    proba = est.predict_proba(X[400:])
    assert proba.shape == (200, 4)
    assert np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (est.predict(X[400:]) == y[400:]).mean() > 0.9  # chance is 0.25
    if isinstance(est, XGBoostBaseline) and est.pca_components == 6:
        assert est.pca_ is not None and est.pca_.n_components_ == 6


def test_knn_k1_returns_training_labels_and_labels_can_be_strings() -> None:
    X, y = blobs(300, 8, 5, seed=1, spread=4.0)  # heavily overlapping classes
    names = np.array(list("vwxyz"))[y]
    knn = KNNVote(k=1).fit(X, names)
    assert np.array_equal(knn.predict(X), names)
    assert knn.classes_.tolist() == list("vwxyz")


def test_baselines_validate_params() -> None:
    X, y = blobs(50, 4, 2, seed=2)
    with pytest.raises(UserError, match="k must be a positive integer"):
        KNNVote(k=0).fit(X, y)
    with pytest.raises(UserError, match="weights"):
        KNNVote(weights="gaussian").fit(X, y)
    with pytest.raises(UserError, match="C must be"):
        LogisticProbe(C=-1).fit(X, y)
    with pytest.raises(UserError, match="learning_rate"):
        XGBoostBaseline(learning_rate=2.0).fit(X, y)
    with pytest.raises(UserError, match="not fitted"):
        KNNVote().predict_proba(X)
    with pytest.raises(UserError, match="4-d"):
        KNNVote().fit(X, y).predict_proba(X[:, :3])


def test_run_baselines_rows_and_unseen_classes() -> None:
    X, y = blobs(500, 12, 3, seed=3)
    u, c = X[:, :8], X[:, 8:]
    classes = ["A", "B", "C", "D"]  # D never appears: its probability column must be 0
    train = np.zeros(500, bool)
    train[:350] = True
    rows = run_baselines(
        {"local": u, "context": c, "both": [u, c]},
        y,
        train,
        ~train,
        classes,
        which=("logreg", "knn", "xgboost"),
        params={"knn": {"k": 3}, "xgboost": {"n_estimators": 8, "max_depth": 2}},
        return_proba=True,
    )
    assert [r["name"] for r in rows][:3] == ["logreg[local]", "knn[local]", "xgboost[local]"]
    assert len(rows) == 9
    for r in rows:
        assert r["n"] == 150 and r["fit_s"] >= 0
        assert r["proba"].shape == (150, 4) and np.all(r["proba"][:, 3] == 0)
        assert r["accuracy"] > 0.6  # chance is 1/3
    assert results_table(rows).height == 9
    with pytest.raises(UserError, match="overlap"):
        run_baselines({"u": u}, y, train, np.ones(500, bool), classes, which=("knn",))
    with pytest.raises(UserError, match="unknown baselines"):
        run_baselines({"u": u}, y, train, ~train, classes, which=("svm",))


# --------------------------------------------------------------------------- exports


def make_meta(n: int, slides=("s1",)) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    x_px = rng.uniform(0, 4000, n)
    y_px = rng.uniform(0, 3000, n)
    return pl.DataFrame(
        {
            "slide_id": [slides[i % len(slides)] for i in range(n)],
            "cell_id": [f"c{i}" for i in range(n)],
            "x_um": x_px * 0.25,
            "y_um": y_px * 0.25,
            "x_px": x_px,
            "y_px": y_px,
            "tissue": ["lung"] * n,
        }
    )


def three_paths(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pa = softmax(rng.normal(size=(n, 3)) * 2, axis=1)
    pb = softmax(rng.normal(size=(n, 3)) * 2, axis=1)
    g = rng.uniform(size=n)
    return pa, pb, (1 - g)[:, None] * pa + g[:, None] * pb, g


def test_predictions_frame_columns_and_values() -> None:
    meta = make_meta(20)
    pa, pb, pm, g = three_paths(20)
    f = predictions_frame(meta, CLASSES, pa, pb, pm, g)
    for col in (
        "slide_id", "cell_id", "x_um", "y_um", "x_px", "y_px", "tissue", "pred_class",
        "pred_confidence", "local_class", "local_confidence", "global_class",
        "global_confidence", "gate", "prob_A", "prob_B", "prob_C",
    ):  # fmt: skip
        assert col in f.columns
    assert f["pred_class"].to_list() == [CLASSES[i] for i in pm.argmax(1)]
    assert f["local_class"].to_list() == [CLASSES[i] for i in pa.argmax(1)]
    assert np.allclose(f["global_confidence"].to_numpy(), pb.max(1), atol=1e-6)
    assert np.allclose(f["gate"].to_numpy(), g, atol=1e-6)
    assert np.allclose(f.select("prob_A", "prob_B", "prob_C").to_numpy(), pm, atol=1e-6)
    assert set(f["pred_source"].to_list()) == {"gate"}
    local_only = predictions_frame(meta, CLASSES, pa)
    assert local_only["pred_class"].to_list() == local_only["local_class"].to_list()
    assert local_only["gate"].null_count() == 20
    with pytest.raises(UserError, match="lacks columns"):
        predictions_frame(meta.drop("x_px"), CLASSES, pa)
    with pytest.raises(UserError, match="shape"):
        predictions_frame(meta, CLASSES, pa[:10])


def test_geojson_is_qupath_shaped_in_pixels(tmp_path) -> None:
    meta = make_meta(12)
    pa, pb, pm, g = three_paths(12)
    f = predictions_frame(meta, CLASSES, pa, pb, pm, g)
    (out,) = write_geojson(f, tmp_path / "cells.geojson")
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 12
    colors = class_colors(CLASSES)
    for feat, row in zip(doc["features"], f.iter_rows(named=True), strict=True):
        assert feat["type"] == "Feature"
        assert feat["geometry"]["type"] == "Point"
        x, y = feat["geometry"]["coordinates"]
        assert x == pytest.approx(row["x_px"], abs=0.01) and y == pytest.approx(
            row["y_px"], abs=0.01
        )
        assert not (x == pytest.approx(row["x_um"], abs=0.01))  # pixels, not micrometres
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == row["pred_class"]
        assert props["classification"]["color"] == list(colors[row["pred_class"]])
        m = props["measurements"]
        assert m["confidence"] == pytest.approx(row["pred_confidence"], abs=1e-6)
        assert m["gate"] == pytest.approx(row["gate"], abs=1e-6)
        assert props["name"] == row["cell_id"]
    ids = [feat["id"] for feat in doc["features"]]
    assert len(set(ids)) == 12
    (again,) = write_geojson(f, tmp_path / "again.geojson")
    assert [ft["id"] for ft in json.loads(again.read_text())["features"]] == ids  # stable ids


def test_geojson_one_file_per_slide_and_parquet_roundtrip(tmp_path) -> None:
    meta = make_meta(30, slides=("slide/a", "b"))
    pa, pb, pm, g = three_paths(30)
    f = predictions_frame(meta, CLASSES, pa, pb, pm, g)
    paths = write_geojson(f, tmp_path / "geo", include_probabilities=True)
    assert sorted(p.name for p in paths) == ["b.geojson", "slide_a.geojson"]
    for p in paths:
        feats = json.loads(p.read_text())["features"]
        assert len(feats) == 15
        assert {"prob A", "prob B", "prob C"} <= set(feats[0]["properties"]["measurements"])
    with pytest.raises(UserError, match="single file"):
        write_geojson(f, tmp_path / "all.geojson")
    (one,) = write_geojson(f, tmp_path / "b.geojson", slide_id="b")
    assert len(json.loads(one.read_text())["features"]) == 15
    pq = write_parquet(f, tmp_path / "pred" / "cells.parquet")
    assert pl.read_parquet(pq).equals(f)


def test_class_colors_are_stable_and_distinct() -> None:
    classes = [f"class_{i}" for i in range(24)]
    a, b = class_colors(classes), class_colors(classes)
    assert a == b
    assert len(set(list(a.values())[:20])) == 20
    assert all(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb) for rgb in a.values())


# --------------------------------------------------------------------------- plots


def is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 2000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 3, n)
    pa, pb, pm, _ = three_paths(n)
    curves = {"local (FiLM)": (pa, y), "global": (pb, y), "gate": (pm, y)}
    p1 = reliability_diagram(curves, tmp_path / "reliability.png", title="val")
    r = evaluate(y, pm, CLASSES)
    p2 = confusion_heatmap(
        r["confusion"]["normalized"], CLASSES, tmp_path / "cm.png", counts=r["confusion"]["counts"]
    )
    comp = complementarity(
        y, pa.argmax(1), pb.argmax(1), ["A", "B", "C", "D"]
    )  # D has no cells: left out
    p3 = complementarity_chart(comp, tmp_path / "sub" / "comp.png")
    for p in (p1, p2, p3):
        assert is_png(p)
    with pytest.raises(UserError, match="shape"):
        confusion_heatmap(np.eye(2), CLASSES, tmp_path / "bad.png")


def test_no_nan_leaks_into_json_outputs() -> None:
    r = evaluate(np.array([0, 0]), np.array([[0.6, 0.4, 0.0], [0.6, 0.4, 0.0]]), CLASSES)
    assert all(
        v is None or math.isfinite(v)
        for c in r["per_class"].values()
        for v in (c["f1"], c["recall"], c["precision"])
    )


def test_geojson_file_names_never_clash(tmp_path) -> None:
    """Slide ids that are one file name once made file-safe, or on a case-insensitive file
    system (macOS, Windows), get a file each, in a stable order."""
    from embedstore.io.geojson import write_geojson

    slides = ["case:A", "case A", "S1", "s1"]
    frame = pl.DataFrame({"slide_id": slides, "cell_id": ["1"] * 4, "x_px": [1.0] * 4, "y_px": [2.0] * 4,
                          "pred_class": ["T"] * 4})  # fmt: skip
    written = write_geojson(frame, tmp_path / "g")
    assert len({p.name.lower() for p in written}) == 4
    by_slide = {json.loads(p.read_text())["features"][0]["properties"]["metadata"]["slide_id"]: p.name for p in written}
    assert by_slide == {"S1": "S1.geojson", "case A": "case_A.geojson", "case:A": "case_A_2.geojson", "s1": "s1_2.geojson"}
