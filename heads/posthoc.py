"""Rules fitted on the validation cells after training: the safety rule and conformal sets.

Both are fitted once, at the end of `heads train`, and saved in the run directory, so that
`heads eval` and `heads predict` (also on other stores) apply the same rule.

Safety rule (METHOD.md stage 3, as the authors compute it): per-class precision of each path on
val (rel_A[c], rel_B[c]); per cell the baseline choice is path B when
maxp_B rel_B[argmax p_B] > maxp_A rel_A[argmax p_A], else A; a policy (τ, γ) then uses B where
g > τ and maxp_B - maxp_A > γ, and A where g < 1 - τ and maxp_B - maxp_A < -γ. The first grid
pair whose val accuracy beats the best single path and every earlier pair is kept; else the
baseline alone. The output is the chosen path's own probabilities (not p_mix).

Conformal sets: split-conformal with the APS score (adaptive prediction sets, randomised),
calibrated on val. For a cell with class probabilities π and a uniform draw u, the score of
class c is the mass of the classes more probable than c plus u π_c; the set at level 1 - α is
every class whose score is at most the ⌈(n + 1)(1 - α)⌉-th smallest calibration score. APS is
chosen over RAPS because RAPS's penalty targets the long noisy tail of 1000-class problems and
needs a second calibration split to tune (λ, k_reg); with the ~5-20 classes of cell typing it
buys little. Randomisation gives exact coverage; u comes from a hash of the cell's key, so a
cell always gets the same set. Sets may be empty: when the model is more accurate than the
target level, exact coverage needs some cells to get no class (read "no class is plausible
enough"); forcing the top class would over-cover. The class-conditional option (Mondrian)
calibrates one threshold per class, for coverage per class rather than on average.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from embedstore.errors import UserError
from embedstore.fileio import atomic_path

SAFETY_FILE = "safety.json"
CONFORMAL_FILE = "conformal.parquet"
TAUS = tuple(round(0.30 + 0.05 * i, 2) for i in range(9))  # 0.30 .. 0.70
GAMMAS = tuple(round(0.02 * i, 2) for i in range(11))  # 0 .. 0.20


# ----------------------------------------------------------------------------- safety rule


def path_precision(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class c: of the cells predicted c, the share truly c (0 where none is predicted c)."""
    predicted = np.bincount(pred, minlength=n_classes).astype(float)
    right = np.bincount(pred[pred == y], minlength=n_classes).astype(float)
    return np.divide(right, predicted, out=np.zeros(n_classes), where=predicted > 0)


def safety_choice(
    rule: dict[str, Any], p_a: np.ndarray, p_b: np.ndarray, g: np.ndarray
) -> np.ndarray:
    """Boolean per cell: True where the rule uses path B."""
    rel_a, rel_b = np.asarray(rule["rel_a"]), np.asarray(rule["rel_b"])
    pred_a, pred_b = p_a.argmax(1), p_b.argmax(1)
    max_a, max_b = p_a.max(1), p_b.max(1)
    use_b = max_b * rel_b[pred_b] > max_a * rel_a[pred_a]
    if rule.get("tau") is not None:
        use_b = _policy(use_b, max_b - max_a, g, rule["tau"], rule["gamma"])
    return use_b


def _policy(base: np.ndarray, diff: np.ndarray, g: np.ndarray, tau: float, gamma: float) -> np.ndarray:
    out = base.copy()
    out[(g > tau) & (diff > gamma)] = True
    out[(g < 1 - tau) & (diff < -gamma)] = False
    return out


def apply_safety(rule: dict[str, Any], p_a: np.ndarray, p_b: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The safety rule's probabilities: each cell's chosen path's own probabilities."""
    return np.where(safety_choice(rule, p_a, p_b, g)[:, None], p_b, p_a)


def fit_safety(p_a: np.ndarray, p_b: np.ndarray, g: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Fit the rule on validation cells (the gate model's two paths, its gate value, labels)."""
    y = np.asarray(y, dtype=np.int64)
    if y.size == 0:
        raise UserError("the safety rule needs labelled validation cells")
    n_classes = p_a.shape[1]
    pred_a, pred_b = p_a.argmax(1), p_b.argmax(1)
    rule: dict[str, Any] = {
        "rel_a": path_precision(pred_a, y, n_classes).tolist(),
        "rel_b": path_precision(pred_b, y, n_classes).tolist(),
        "tau": None, "gamma": None,
    }  # fmt: skip
    acc_a, acc_b = float(np.mean(pred_a == y)), float(np.mean(pred_b == y))
    base = safety_choice(rule, p_a, p_b, g)
    diff = p_b.max(1) - p_a.max(1)
    right_a, right_b = pred_a == y, pred_b == y

    def accuracy(use_b: np.ndarray) -> float:
        return float(np.mean(np.where(use_b, right_b, right_a)))

    best = max(acc_a, acc_b)
    for tau in TAUS:
        for gamma in GAMMAS:
            acc = accuracy(_policy(base, diff, g, tau, gamma))
            if acc > best:
                best, rule["tau"], rule["gamma"] = acc, tau, gamma
    rule.update(
        val_cells=int(y.size), val_accuracy_local=acc_a, val_accuracy_global=acc_b,
        val_accuracy_baseline=accuracy(base), val_accuracy=accuracy(safety_choice(rule, p_a, p_b, g)),
    )  # fmt: skip
    return rule


def save_safety(run_dir: str | Path, rule: dict[str, Any]) -> Path:
    path = Path(run_dir) / SAFETY_FILE
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(rule, indent=2) + "\n")
    return path


def load_safety(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SAFETY_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------- conformal sets


def cell_uniforms(keys: Sequence[str]) -> np.ndarray:
    """A reproducible U(0, 1) draw per cell key ("slide:cell"): the first 8 bytes of its BLAKE2b."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") / 2.0**64
         for k in keys),
        dtype=np.float64, count=len(keys),
    )  # fmt: skip


def aps_scores(proba: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(n, C) APS score of every class: mass of the more probable classes + u * own mass."""
    p = np.asarray(proba, dtype=np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    before = np.cumsum(sorted_p, axis=1) - sorted_p
    scores = np.empty_like(p)
    np.put_along_axis(scores, order, before + u[:, None] * sorted_p, axis=1)
    return scores


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ⌈(n + 1) level⌉-th smallest score (inf when n is too small for the level)."""
    n = scores.size
    k = math.ceil((n + 1) * level)
    if k > n:
        return math.inf
    return float(np.partition(scores, k - 1)[k - 1])


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise UserError(f"the conformal level must be in (0, 1), e.g. 0.9; got {level}")


class ConformalSets:
    """Split-conformal APS sets calibrated on validation scores (see the module docstring)."""

    def __init__(self, cal_scores: np.ndarray, cal_labels: np.ndarray, n_classes: int, path: str) -> None:
        self.cal_scores = np.asarray(cal_scores, dtype=np.float64)
        self.cal_labels = np.asarray(cal_labels, dtype=np.int64)
        self.n_classes, self.path = n_classes, path

    @classmethod
    def fit(cls, proba: np.ndarray, y: np.ndarray, keys: Sequence[str], path: str) -> ConformalSets:
        y = np.asarray(y, dtype=np.int64)
        if y.size == 0:
            raise UserError("conformal calibration needs labelled validation cells")
        scores = aps_scores(proba, cell_uniforms(keys))
        return cls(scores[np.arange(y.size), y], y, proba.shape[1], path)

    def thresholds(self, level: float, class_conditional: bool = False) -> np.ndarray:
        """Per class the score threshold (all equal unless class-conditional; inf where a
        class has too few calibration cells for the level: it is then always in the set)."""
        _check_level(level)
        if not class_conditional:
            return np.full(self.n_classes, conformal_quantile(self.cal_scores, level))
        return np.array([conformal_quantile(self.cal_scores[self.cal_labels == c], level)
                         for c in range(self.n_classes)])  # fmt: skip

    def predict_sets(
        self, proba: np.ndarray, keys: Sequence[str], level: float = 0.9, class_conditional: bool = False
    ) -> np.ndarray:
        """(n, C) boolean membership of each class in each cell's set."""
        return aps_scores(proba, cell_uniforms(keys)) <= self.thresholds(level, class_conditional)[None, :]

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / CONFORMAL_FILE
        frame = pl.DataFrame({"score": self.cal_scores, "label": self.cal_labels})
        with atomic_path(path) as tmp:
            frame.write_parquet(tmp, compression="zstd")
        with atomic_path(Path(run_dir) / "conformal.json") as tmp:
            info = {"path": self.path, "n_classes": self.n_classes, "score": "aps-randomised"}
            Path(tmp).write_text(json.dumps(info) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> ConformalSets | None:
        path, meta = Path(run_dir) / CONFORMAL_FILE, Path(run_dir) / "conformal.json"
        if not (path.exists() and meta.exists()):
            return None
        info = json.loads(meta.read_text())
        frame = pl.read_parquet(path)
        return cls(frame["score"].to_numpy(), frame["label"].to_numpy(), info["n_classes"], info["path"])


def set_coverage(sets: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Coverage (share of cells whose true class is in their set), mean set size and share of
    empty sets, overall and per class (None for classes with no cells)."""
    y = np.asarray(y, dtype=np.int64)
    hit = sets[np.arange(y.size), y]
    size = sets.sum(1)
    per_class = {}
    for i, c in enumerate(classes):
        m = y == i
        per_class[c] = (
            {"n": int(m.sum()), "coverage": float(hit[m].mean()), "mean_size": float(size[m].mean())}
            if m.any() else {"n": 0, "coverage": None, "mean_size": None}
        )  # fmt: skip
    return {
        "n": int(y.size),
        "coverage": float(hit.mean()) if y.size else None,
        "mean_size": float(size.mean()) if y.size else None,
        "empty_share": float((size == 0).mean()) if y.size else None,
        "per_class": per_class,
    }
