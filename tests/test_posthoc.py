"""Parity with the authors' code on hand-checkable cases (safety rule, stage-2 details) and the
conformal prediction sets (APS scores by hand, coverage on a calibrated synthetic model)."""

import math

import numpy as np
import pytest
import torch

from heads.context import ContextHead, alpha_at
from heads.posthoc import (
    ConformalSets,
    apply_safety,
    aps_scores,
    cell_uniforms,
    conformal_quantile,
    fit_safety,
    path_precision,
    safety_choice,
    set_coverage,
)

# --------------------------------------------------------------------------- safety rule

# five validation cells, two classes. Path A is right on cells 0, 1, 3, 4; path B on 2, 3.
Y = np.array([0, 0, 1, 1, 0])
P_A = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.4, 0.6], [0.55, 0.45]])
P_B = np.array([[0.2, 0.8], [0.45, 0.55], [0.1, 0.9], [0.3, 0.7], [0.4, 0.6]])
G = np.array([0.2, 0.5, 0.62, 0.9, 0.4])


def test_path_precision_hand_computed():
    # A predicts class 0 for cells 0, 1, 2, 4 (3 right) and class 1 for cell 3 (right)
    assert path_precision(P_A.argmax(1), Y, 2) == pytest.approx([0.75, 1.0])
    # B predicts class 1 everywhere (2 of 5 right) and never class 0: precision 0
    assert path_precision(P_B.argmax(1), Y, 2) == pytest.approx([0.0, 0.4])


def test_safety_rule_fit_hand_computed():
    """Baseline: maxp x rel of A is .675 .45 .525 .6 .4125 against B's .32 .22 .36 .28 .24, so A
    everywhere (val accuracy 0.8 = A's; B's is 0.4). Policy: B where g > τ and maxp_B - maxp_A
    (-.1 -.05 .2 .1 .05) > γ. Cell 2 (only B right) switches for τ < .62, γ < .2; cell 4 (only A
    right) also switches for τ < .4, γ < .05. Grid order τ = .30 first: γ = 0, .02, .04 switch
    both (0.8, not better), γ = .06 switches only cell 2: accuracy 1.0, kept; nothing beats it."""
    rule = fit_safety(P_A, P_B, G, Y)
    assert rule["rel_a"] == pytest.approx([0.75, 1.0]) and rule["rel_b"] == pytest.approx([0.0, 0.4])
    assert (rule["tau"], rule["gamma"]) == (0.30, 0.06)
    assert rule["val_accuracy_local"] == 0.8 and rule["val_accuracy_global"] == 0.4
    assert rule["val_accuracy_baseline"] == 0.8 and rule["val_accuracy"] == 1.0
    # B for cell 2 and cell 3 (g .9 > .3, gap .1 > .06); the chosen path's own probabilities
    assert safety_choice(rule, P_A, P_B, G).tolist() == [False, False, True, True, False]
    out = apply_safety(rule, P_A, P_B, G)
    np.testing.assert_array_equal(out, np.stack([P_A[0], P_A[1], P_B[2], P_B[3], P_A[4]]))


def test_safety_rule_falls_back_to_the_baseline_when_no_pair_helps():
    # B is never right alone: no policy can beat path A, so no (τ, γ) is kept
    y = np.array([0, 0, 1])
    p_a = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    p_b = np.array([[0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    rule = fit_safety(p_a, p_b, np.array([0.9, 0.9, 0.9]), y)
    assert rule["tau"] is None and rule["gamma"] is None
    assert rule["val_accuracy"] == rule["val_accuracy_baseline"]


# --------------------------------------------------------------------------- stage-2 details


def test_alpha_schedules_hand_computed():
    # per step (default): linear from 0.25 to 1 over two epochs
    assert [alpha_at(e) for e in (0, 0.5, 1, 2, 5)] == pytest.approx([0.25, 0.4375, 0.625, 1.0, 1.0])
    # the authors' per-epoch steps: 0.25, 0.625, 1.0, constant within an epoch
    assert [alpha_at(e, "epoch") for e in (0, 0.9, 1, 1.5, 2, 3)] == pytest.approx(
        [0.25, 0.25, 0.625, 0.625, 1.0, 1.0])
    with pytest.raises(ValueError):
        alpha_at(1, "batch")


def test_context_dropout_zeroes_the_raw_context_before_its_layernorm():
    """As in the authors' code: c' becomes the projection of the LayerNorm bias."""
    torch.manual_seed(0)
    head = ContextHead(6, 5, 3, proj=4, hidden=8, context_dropout=1.0)  # always drop
    with torch.no_grad():
        head.norm_c.bias.normal_()
    head.train()
    u, c = torch.randn(3, 6), torch.randn(3, 5)
    _, c_p = head.projections(u, c)
    expect = head.proj_c(head.norm_c.bias).expand(3, -1)
    torch.testing.assert_close(c_p, expect)
    assert not torch.allclose(c_p, torch.zeros_like(c_p))  # not c' = 0 (the earlier rule)
    assert head.gate[0].out_features == 256  # the internal gate's width in the authors' code


# --------------------------------------------------------------------------- conformal sets


def test_aps_scores_and_quantile_hand_computed():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    s = aps_scores(p, np.array([0.5, 1.0]))
    # cell 0 (u .5): class 0 = 0 + .25, class 1 = .5 + .15, class 2 = .8 + .1
    # cell 1 (u 1): class 1 = .6, class 2 = .6 + .3, class 0 = .9 + .1
    np.testing.assert_allclose(s, [[0.25, 0.65, 0.9], [1.0, 0.6, 0.9]])
    scores = np.arange(1, 10) / 10  # 0.1 .. 0.9, n = 9
    assert conformal_quantile(scores, 0.8) == pytest.approx(0.8)  # ceil(10 x 0.8) = 8th
    assert conformal_quantile(scores, 0.5) == pytest.approx(0.5)  # ceil(5) = 5th
    assert math.isinf(conformal_quantile(scores, 0.95))  # ceil(9.5) = 10 > 9: every class


def test_cell_uniforms_are_reproducible_and_uniform():
    keys = [f"s{i % 7}:{i}" for i in range(20000)]
    u = cell_uniforms(keys)
    assert (u == cell_uniforms(keys)).all() and u.min() >= 0 and u.max() < 1
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx([2000] * 10, rel=0.1)


def _calibrated(n, n_classes, rng):
    """A perfectly calibrated model: labels drawn from the model's own probabilities."""
    logits = rng.normal(0, 2.0, (n, n_classes))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(n_classes, p=row) for row in p])
    return p, y


@pytest.mark.parametrize("level", [0.9, 0.8])
def test_conformal_coverage_on_held_out_cells(level):
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(6)]
    p_cal, y_cal = _calibrated(3000, 6, rng)
    p_test, y_test = _calibrated(6000, 6, rng)
    cal_keys = [f"cal:{i}" for i in range(3000)]
    test_keys = [f"test:{i}" for i in range(6000)]
    sets_model = ConformalSets.fit(p_cal, y_cal, cal_keys, "gate")
    marginal = set_coverage(sets_model.predict_sets(p_test, test_keys, level), y_test, classes)
    assert abs(marginal["coverage"] - level) < 0.02, marginal["coverage"]
    assert 1 <= marginal["mean_size"] < 6
    per_class = set_coverage(sets_model.predict_sets(p_test, test_keys, level, True), y_test, classes)
    for c, r in per_class["per_class"].items():
        assert abs(r["coverage"] - level) < 0.05, (c, r)
    # a higher level never gives smaller sets
    higher = sets_model.predict_sets(p_test, test_keys, min(level + 0.05, 0.99))
    assert (higher.sum(1) >= sets_model.predict_sets(p_test, test_keys, level).sum(1)).all()


def test_conformal_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    p, y = _calibrated(500, 4, rng)
    keys = [f"k{i}" for i in range(500)]
    fitted = ConformalSets.fit(p, y, keys, "global")
    fitted.save(tmp_path)
    loaded = ConformalSets.load(tmp_path)
    assert loaded.path == "global" and loaded.n_classes == 4
    np.testing.assert_array_equal(loaded.predict_sets(p, keys, 0.8), fitted.predict_sets(p, keys, 0.8))
    assert ConformalSets.load(tmp_path / "nothing") is None
