"""Calibration: expected calibration error, reliability curves and temperature scaling.

Everything works on plain numpy arrays: `proba` is (n_cells, n_classes) probabilities and
`y_true` holds integer class indices into its columns.

Binning convention (identical to torchmetrics' `multiclass_calibration_error(n_bins=10,
norm="l1")`, which the tests check): the confidence of a cell is its max probability; bin
edges are `linspace(0, 1, n_bins + 1)` in float32 and bins are half-open, [lo, hi). A
confidence of exactly 1.0 therefore falls in a degenerate bin [1, 1] of its own rather than
in the last bin; on saturated (over-confident) models that is where the mass goes, so the
distinction matters and we keep torchmetrics' choice for comparability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from embedstore.errors import UserError

#: slack allowed on probabilities (float16 storage, rounding) before they are rejected
PROBA_TOLERANCE = 1e-2


def check_proba(proba: np.ndarray, name: str = "proba") -> np.ndarray:
    """Validate an (n, C) array of probabilities and return it as float64 (clipped to [0, 1])."""
    p = np.asarray(proba)
    if p.ndim != 2 or p.shape[1] < 1:
        raise UserError(f"{name} must be a 2-D (n_cells, n_classes) array, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise UserError(f"{name} must hold floating-point probabilities, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    if not np.all(np.isfinite(p)):
        raise UserError(f"{name} holds NaN or infinite values")
    if p.size and (p.min() < -PROBA_TOLERANCE or p.max() > 1 + PROBA_TOLERANCE):
        raise UserError(
            f"{name} has values outside [0, 1] (min {p.min():.3g}, max {p.max():.3g}): "
            "pass probabilities, not logits (apply a softmax first)"
        )
    sums = p.sum(axis=1)
    if p.size and np.max(np.abs(sums - 1.0)) > PROBA_TOLERANCE:
        raise UserError(
            f"{name} rows must sum to 1 (found sums from {sums.min():.3g} to {sums.max():.3g}): "
            "pass probabilities, not logits or scores"
        )
    return np.clip(p, 0.0, 1.0)


def check_targets(y_true: np.ndarray, n_rows: int, n_classes: int) -> np.ndarray:
    """Validate integer class indices in [0, n_classes) matching `n_rows` predictions."""
    y = np.asarray(y_true)
    if y.ndim != 1 or len(y) != n_rows:
        raise UserError(
            f"y_true must be 1-D with {n_rows} entries (one per row), got shape {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(
            f"y_true must hold integer class indices, got dtype {y.dtype}; "
            "encode labels with heads.metrics.encode_labels first"
        )
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise UserError(
            f"y_true holds class indices outside [0, {n_classes}) (min {y.min()}, max {y.max()})"
        )
    return y.astype(np.int64, copy=False)


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise UserError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence: [k/n, (k+1)/n) -> k, and exactly 1.0 -> n (see module doc)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1).astype(np.float32)
    idx = np.searchsorted(edges, confidence.astype(np.float32), side="right") - 1
    return np.clip(idx, 0, n_bins)


def _confidence_and_hits(proba: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = check_proba(proba)
    y = check_targets(y_true, p.shape[0], p.shape[1])
    if len(y) == 0:
        raise UserError("cannot measure calibration on zero cells")
    pred = p.argmax(axis=1)
    return p[np.arange(len(y)), pred], (pred == y).astype(np.float64)


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: sum over confidence bins of |accuracy - mean confidence| x bin share.

    `proba` is (n, C) probabilities, `y_true` integer class indices. Bins follow the module's
    convention (equal-width, half-open, torchmetrics-compatible).
    """
    n_bins = _check_n_bins(n_bins)
    conf, hit = _confidence_and_hits(proba, y_true)
    idx = _bin_index(conf, n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins + 1)
    hit_sum = np.bincount(idx, weights=hit, minlength=n_bins + 1)
    return float(np.abs(hit_sum - conf_sum).sum() / len(conf))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin mean confidence, accuracy and count (NaN confidence/accuracy in empty bins).

    For display the last bin is closed, [1 - 1/n_bins, 1], so a confidence of exactly 1.0 is
    drawn in it; `ece` is still computed with the torchmetrics convention.
    """

    edges: np.ndarray  # (n_bins + 1,)
    confidence: np.ndarray  # (n_bins,)
    accuracy: np.ndarray  # (n_bins,)
    count: np.ndarray  # (n_bins,) int
    ece: float

    @property
    def n_bins(self) -> int:
        return len(self.count)


def reliability_curve(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> ReliabilityCurve:
    """Confidence, accuracy and cell count per equal-width confidence bin."""
    n_bins = _check_n_bins(n_bins)
    conf, hit = _confidence_and_hits(proba, y_true)
    idx = np.minimum(_bin_index(conf, n_bins), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=hit, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, hit_sum / count, np.nan)
    return ReliabilityCurve(
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        confidence=mean_conf,
        accuracy=acc,
        count=count.astype(np.int64),
        ece=expected_calibration_error(proba, y_true, n_bins),
    )


class TemperatureScaler:
    """One-parameter temperature scaling, fitted by minimising validation NLL.

    `fit(scores, y)` finds T > 0 minimising mean NLL of softmax(scores / T); the search runs
    over 1/T, where the NLL is convex, with scipy's bounded scalar minimiser, so the optimum
    within `bounds` is global. `transform(scores)` returns calibrated probabilities. The
    argmax never changes, so accuracy and F1 are untouched; report ECE before and after.

    inputs:
        "logits": scores are logits (the local FiLM head's z_A, the context head's z_B).
        "proba": scores are probabilities; they are scaled as log(p). Use this for the gate,
            whose output p_mix = (1 - g) p_A + g p_B is a mixture of probabilities and has no
            logits: softmax(log(p_mix) / T) = p_mix^(1/T) / sum(p_mix^(1/T)), i.e. temperature
            scaling applied to log(p_mix) as if it were a logit vector.
    bounds: search interval for T.
    eps: floor applied to probabilities before the log ("proba" inputs only).
    """

    def __init__(
        self,
        inputs: str = "logits",
        bounds: tuple[float, float] = (0.05, 20.0),
        eps: float = 1e-12,
    ) -> None:
        self.inputs = inputs
        self.bounds = bounds
        self.eps = eps

    def _validate_params(self) -> None:
        if self.inputs not in ("logits", "proba"):
            raise UserError(
                f"TemperatureScaler inputs must be 'logits' or 'proba', got {self.inputs!r}"
            )
        lo, hi = self.bounds
        if not (0 < lo < hi < np.inf):
            raise UserError(
                f"TemperatureScaler bounds must satisfy 0 < low < high, got {self.bounds}"
            )
        if not (0 < self.eps < 1):
            raise UserError(f"TemperatureScaler eps must be in (0, 1), got {self.eps}")

    def _log_scores(self, scores: np.ndarray) -> np.ndarray:
        if self.inputs == "proba":
            p = check_proba(scores, "scores")
            return np.log(np.maximum(p, self.eps))
        z = np.asarray(scores)
        if z.ndim != 2 or not np.issubdtype(z.dtype, np.floating):
            raise UserError(f"logits must be a 2-D float array (n_cells, n_classes), got {z.shape}")
        z = z.astype(np.float64, copy=False)
        if not np.all(np.isfinite(z)):
            raise UserError("logits hold NaN or infinite values")
        return z

    @staticmethod
    def _nll(z: np.ndarray, zy: np.ndarray, beta: float) -> float:
        """Mean NLL of softmax(beta * z) given zy = z[i, y_i]; z rows are max-shifted to 0."""
        lse = np.log(np.exp(beta * z).sum(axis=1))
        return float(np.mean(lse - beta * zy))

    def fit(self, scores: np.ndarray, y: np.ndarray) -> TemperatureScaler:
        """Fit T on validation scores and integer class indices; returns self."""
        self._validate_params()
        z = self._log_scores(scores)
        y = check_targets(y, z.shape[0], z.shape[1])
        if len(y) == 0:
            raise UserError("cannot fit a temperature on zero cells")
        # shifting each row by its max changes no softmax and keeps exp(beta * z) <= 1
        z = z - z.max(axis=1, keepdims=True)
        zy = z[np.arange(len(y)), y]
        lo, hi = self.bounds
        res = minimize_scalar(
            lambda beta: self._nll(z, zy, beta),
            bounds=(1.0 / hi, 1.0 / lo),
            method="bounded",
            options={"xatol": 1e-5},
        )
        self.temperature_ = float(1.0 / res.x)
        self.nll_before_ = self._nll(z, zy, 1.0)
        self.nll_after_ = float(res.fun)
        self.n_classes_ = z.shape[1]
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities softmax(scores / T) (scores as log p for `inputs="proba"`)."""
        if not hasattr(self, "temperature_"):
            raise UserError("TemperatureScaler is not fitted: call fit(scores, y) first")
        z = self._log_scores(scores)
        if z.shape[1] != self.n_classes_:
            raise UserError(f"expected {self.n_classes_} classes, got {z.shape[1]} columns")
        return softmax(z / self.temperature_, axis=1)

    def fit_transform(self, scores: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.fit(scores, y).transform(scores)
