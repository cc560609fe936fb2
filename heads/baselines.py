"""Baselines on the same cached vectors and splits as the heads: a logistic-regression probe,
XGBoost, and a FAISS kNN vote.

Each estimator follows scikit-learn's shape: the constructor stores parameters, `fit(X, y)`
validates them once and returns self, `predict_proba(X)` returns (n, len(classes_))
probabilities with columns in `classes_` order (the sorted unique training labels).
`run_baselines` expands columns to the full training class list and evaluates.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import LabelEncoder, StandardScaler
from xgboost import XGBClassifier

from embedstore.errors import UserError
from heads.metrics import encode_labels, evaluate, macro_f1

log = logging.getLogger(__name__)

BASELINES = ("logreg", "xgboost", "knn")


def _check_xy(X: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise UserError(f"features must be a non-empty 2-D (n_cells, dim) array, got {X.shape}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.all(np.isfinite(X)):
        raise UserError("features hold NaN or infinite values")
    if y is None:
        return X, None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != X.shape[0]:
        raise UserError(f"{len(y)} labels for {X.shape[0]} feature rows")
    return X, y


def _check_fitted(est: Any) -> None:
    if not hasattr(est, "classes_"):
        raise UserError(f"{type(est).__name__} is not fitted: call fit(X, y) first")


def _check_dim(est: Any, X: np.ndarray) -> None:
    if X.shape[1] != est.n_features_in_:
        name = type(est).__name__
        raise UserError(f"{name} was fitted on {est.n_features_in_}-d features, got {X.shape[1]}-d")


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise UserError(f"{name} must be a positive integer, got {v!r}")


class LogisticProbe:
    """Multinomial logistic regression on standardised features (a linear probe).

    lbfgs on float32 input (half the time of float64); `max_iter` bounds the cost (one or two
    passes over the data per iteration), so it may stop before full convergence on very large
    sets: that is the probe's intended budget, and the ConvergenceWarning is silenced. C is
    not swept: the default (0.1, fairly strong L2 on standardised features) converges in far
    fewer iterations than C=1 and generalised better on our synthetic checks; pass C to tune.
    """

    def __init__(
        self,
        C: float = 0.1,
        max_iter: int = 100,
        tol: float = 1e-4,
        standardize: bool = True,
        class_weight: str | None = None,
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.class_weight = class_weight

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticProbe:
        if not (isinstance(self.C, int | float) and self.C > 0):
            raise UserError(f"LogisticProbe C must be > 0, got {self.C!r}")
        _positive_int("LogisticProbe max_iter", self.max_iter)
        if self.class_weight not in (None, "balanced"):
            raise UserError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        X, y = _check_xy(X, y)
        if len(np.unique(y)) < 2:
            raise UserError("LogisticProbe needs at least two classes in the training labels")
        lr = LogisticRegression(
            C=self.C, max_iter=self.max_iter, tol=self.tol, class_weight=self.class_weight
        )
        self.model_ = make_pipeline(StandardScaler(), lr) if self.standardize else lr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_.fit(X, y)
        self.classes_ = self.model_.classes_
        self.n_features_in_ = X.shape[1]
        self.n_iter_ = int(np.max(lr.n_iter_))
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        _check_fitted(self)
        X, _ = _check_xy(X)
        _check_dim(self, X)
        return self.model_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class XGBoostBaseline:
    """Gradient-boosted trees (XGBoost, `hist` method) with early stopping on a stratified
    `valid_fraction` slice of the training rows (mlogloss).

    By default the trees see a `pca_components`-d PCA projection of the vectors (fitted on at
    most `pca_fit_rows` training rows): on 20k x 2560 vectors and 16 classes a boosting round
    costs ~10 s on the raw dimensions (2 busy CPU cores) against <1 s on 128 PCA
    components, which also scored higher on our synthetic check. Set `pca_components=None`
    to boost on the raw vectors.
    """

    def __init__(
        self,
        n_estimators: int = 100,
        learning_rate: float = 0.3,
        max_depth: int = 5,
        max_bin: int = 64,
        subsample: float = 0.8,
        colsample_bytree: float = 0.5,
        early_stopping_rounds: int = 10,
        valid_fraction: float = 0.1,
        pca_components: int | None = 128,
        pca_fit_rows: int = 50_000,
        n_jobs: int | None = None,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.max_bin = max_bin
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.early_stopping_rounds = early_stopping_rounds
        self.valid_fraction = valid_fraction
        self.pca_components = pca_components
        self.pca_fit_rows = pca_fit_rows
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _validate_params(self) -> None:
        for name in (
            "n_estimators",
            "max_depth",
            "max_bin",
            "early_stopping_rounds",
            "pca_fit_rows",
        ):
            _positive_int(f"XGBoostBaseline {name}", getattr(self, name))
        for name in ("learning_rate", "subsample", "colsample_bytree"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v <= 1):
                raise UserError(f"XGBoostBaseline {name} must be in (0, 1], got {v!r}")
        if not (0 <= self.valid_fraction < 1):
            raise UserError(f"valid_fraction must be in [0, 1), got {self.valid_fraction!r}")
        if self.pca_components is not None:
            _positive_int("XGBoostBaseline pca_components", self.pca_components)

    def _valid_split(self, y: np.ndarray) -> np.ndarray:
        """Boolean mask of validation rows: `valid_fraction` of each class, rounded down."""
        rng = np.random.default_rng(self.random_state)
        valid = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            k = int(self.valid_fraction * len(idx))
            if k:
                valid[rng.choice(idx, size=k, replace=False)] = True
        return valid

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
    ) -> XGBoostBaseline:
        """Fit; with (X_val, y_val) early stopping watches those cells (the heads' validation
        cells) instead of a `valid_fraction` slice of the training rows."""
        self._validate_params()
        X, y = _check_xy(X, y)
        self.encoder_ = LabelEncoder().fit(y)
        yi = self.encoder_.transform(y)
        if len(self.encoder_.classes_) < 2:
            raise UserError("XGBoostBaseline needs at least two classes in the training labels")
        self.n_features_in_ = X.shape[1]
        self.pca_ = None
        if self.pca_components is not None and self.pca_components < min(X.shape):
            rng = np.random.default_rng(self.random_state)
            rows = np.sort(rng.permutation(len(X))[: self.pca_fit_rows])
            self.pca_ = PCA(
                self.pca_components, svd_solver="randomized", random_state=self.random_state
            )
            self.pca_.fit(X[rows])
            X = self.pca_.transform(X)
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if X_val is not None and y_val is not None:
            known = np.isin(y_val, self.encoder_.classes_)  # classes unseen in training: no loss
            Xv, _ = _check_xy(X_val)
            Xv = Xv[known] if self.pca_ is None else self.pca_.transform(Xv[known])
            valid = np.zeros(len(yi), bool)
            eval_set = [(Xv, self.encoder_.transform(np.asarray(y_val)[known]))] if known.any() else None
        else:
            valid = self._valid_split(yi) if self.valid_fraction > 0 else np.zeros(len(yi), bool)
            eval_set = [(X[valid], yi[valid])] if valid.any() else None
        use_es = eval_set is not None
        self.model_ = XGBClassifier(
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            max_depth=self.max_depth,
            max_bin=self.max_bin,
            subsample=self.subsample,
            colsample_bytree=self.colsample_bytree,
            tree_method="hist",
            eval_metric="mlogloss",
            early_stopping_rounds=self.early_stopping_rounds if use_es else None,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
        )
        self.model_.fit(X[~valid], yi[~valid], eval_set=eval_set, verbose=False,
                        sample_weight=None if w is None else w[~valid])
        self.classes_ = self.encoder_.classes_
        self.best_iteration_ = getattr(self.model_, "best_iteration", self.n_estimators - 1)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        _check_fitted(self)
        X, _ = _check_xy(X)
        _check_dim(self, X)
        if self.pca_ is not None:
            X = self.pca_.transform(X)
        return self.model_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def l2_normalize(X: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norm, eps)


class KNNVote:
    """k-nearest-neighbour vote with exact FAISS search on cosine similarity.

    Vectors are L2-normalised and searched with an inner-product index. Each neighbour votes
    for its label with weight 1 ("uniform") or 1 / (cosine distance + 1e-6) ("distance");
    probabilities are the vote shares. With k=1 a training vector returns its own label.
    """

    def __init__(
        self, k: int = 15, weights: str = "distance", batch_size: int = 8192, class_weight: str | None = None
    ) -> None:
        self.k = k
        self.weights = weights
        self.batch_size = batch_size
        self.class_weight = class_weight  # "balanced": each vote divided by its class's frequency

    def fit(self, X: np.ndarray, y: np.ndarray) -> KNNVote:
        _positive_int("KNNVote k", self.k)
        _positive_int("KNNVote batch_size", self.batch_size)
        if self.weights not in ("uniform", "distance"):
            raise UserError(
                f"KNNVote weights must be 'uniform' or 'distance', got {self.weights!r}"
            )
        if self.class_weight not in (None, "balanced"):
            raise UserError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        X, y = _check_xy(X, y)
        self.encoder_ = LabelEncoder().fit(y)
        self.y_ = self.encoder_.transform(y).astype(np.int64)
        counts = np.bincount(self.y_, minlength=len(self.encoder_.classes_)).astype(np.float64)
        self.class_vote_ = (counts.sum() / (len(counts) * counts) if self.class_weight == "balanced"
                            else np.ones_like(counts))  # fmt: skip
        self.index_ = faiss.IndexFlatIP(X.shape[1])
        self.index_.add(l2_normalize(X))
        self.classes_ = self.encoder_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and training-row indices of the k nearest neighbours."""
        _check_fitted(self)
        X, _ = _check_xy(X)
        _check_dim(self, X)
        k = min(self.k, self.index_.ntotal)
        sims, idx = [], []
        for s in range(0, X.shape[0], self.batch_size):
            d, i = self.index_.search(l2_normalize(X[s : s + self.batch_size]), k)
            sims.append(d)
            idx.append(i)
        return np.concatenate(sims), np.concatenate(idx)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        sims, idx = self.kneighbors(X)
        if self.weights == "uniform":
            w = np.ones_like(sims, dtype=np.float64)
        else:
            w = 1.0 / (np.maximum(1.0 - sims.astype(np.float64), 0.0) + 1e-6)
        w = w * self.class_vote_[self.y_[idx]]
        n, c = len(sims), len(self.classes_)
        cell = np.repeat(np.arange(n), sims.shape[1]) * c + self.y_[idx].ravel()
        votes = np.bincount(cell, weights=w.ravel(), minlength=n * c).reshape(n, c)
        return votes / votes.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


_ESTIMATORS = {"logreg": LogisticProbe, "xgboost": XGBoostBaseline, "knn": KNNVote}


def _rows_index(mask: np.ndarray, n: int, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype == bool:
        if m.shape != (n,):
            raise UserError(f"{name} must have one entry per cell ({n}), got shape {m.shape}")
        idx = np.flatnonzero(m)
    elif np.issubdtype(m.dtype, np.integer):
        idx = np.unique(m)
        if len(idx) and (idx[0] < 0 or idx[-1] >= n):
            raise UserError(f"{name} holds row indices outside [0, {n})")
    else:
        raise UserError(f"{name} must be a boolean mask or integer row indices, got {m.dtype}")
    if len(idx) == 0:
        raise UserError(f"{name} selects no cells")
    return idx


def _gather(
    blocks: np.ndarray | Sequence[np.ndarray], rows: np.ndarray, normalize_blocks: bool
) -> np.ndarray:
    """Rows of one feature set; a sequence of blocks is concatenated (each block unit-normed
    first when `normalize_blocks`, so they weigh equally in a cosine)."""
    if isinstance(blocks, np.ndarray):
        return np.ascontiguousarray(blocks[rows], dtype=np.float32)
    parts = [np.asarray(b[rows], dtype=np.float32) for b in blocks]
    if normalize_blocks:
        parts = [l2_normalize(p) for p in parts]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def _n_rows(name: str, blocks: np.ndarray | Sequence[np.ndarray]) -> int:
    arrs = [blocks] if isinstance(blocks, np.ndarray) else list(blocks)
    if not arrs:
        raise UserError(f"feature set {name!r} is empty")
    lens = {len(a) for a in arrs}
    if len(lens) != 1 or any(np.ndim(a) != 2 for a in arrs):
        raise UserError(f"feature set {name!r} must be 2-D arrays with equal row counts")
    return lens.pop()


def expand_proba(proba: np.ndarray, fitted_classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Place columns of an estimator fitted on class indices `fitted_classes` into a
    (n, n_classes) array; classes never seen in training get probability 0."""
    out = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    out[:, np.asarray(fitted_classes, dtype=np.int64)] = proba
    return out


#: hyper-parameters each baseline chooses on the validation cells (first best on ties)
SELECTION_GRIDS: dict[str, list[dict[str, Any]]] = {
    "logreg": [{"C": 0.03}, {"C": 0.1}, {"C": 0.3}],
    "knn": [{"k": 5}, {"k": 15}, {"k": 45}],
    "xgboost": [{}],  # early stopping on the validation cells chooses the number of trees
}


def balanced_sample_weight(y: np.ndarray) -> np.ndarray:
    """n / (C n_c) per cell: every class weighs the same in total (sklearn's "balanced")."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    return (len(y) / (len(classes) * counts))[inverse]


def _fit_one(model: str, kwargs: dict[str, Any], X: np.ndarray, y: np.ndarray,
             X_val: np.ndarray | None, y_val: np.ndarray | None, balanced: bool) -> Any:
    if model == "xgboost":
        est = XGBoostBaseline(**kwargs)
        return est.fit(X, y, X_val, y_val, sample_weight=balanced_sample_weight(y) if balanced else None)
    extra = {"class_weight": "balanced"} if balanced else {}
    return _ESTIMATORS[model](**{**extra, **kwargs}).fit(X, y)


def run_baselines(
    features: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    y: Sequence | np.ndarray,
    train_mask: np.ndarray,
    eval_mask: np.ndarray,
    classes: Sequence[str],
    which: Sequence[str] = BASELINES,
    *,
    val_mask: np.ndarray | None = None,
    balanced: bool = False,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    return_proba: bool = False,
) -> list[dict[str, Any]]:
    """Fit each baseline in `which` on each feature set and evaluate it on the eval rows.

    features: name -> (n, d) array, or a list of arrays concatenated column-wise
        (e.g. {"local": u, "context": c, "both": [u, c]}; for kNN each block is unit-normed
        before concatenation).
    y: labels (class names or indices into `classes`) for all n cells.
    train_mask / eval_mask / val_mask: boolean masks or row indices (train must overlap neither).
    val_mask: the heads' validation cells; the baselines then follow the heads' selection
        rules there: each picks its hyper-parameters from `SELECTION_GRIDS` by validation
        macro-F1, and XGBoost early-stops on them. Without it, the defaults are used as is.
    balanced: class-balanced training (logreg/kNN class weights, XGBoost sample weights).
    params: fixed constructor arguments per baseline, e.g. {"knn": {"k": 5}} (not searched).
    Returns result rows {"name": "logreg[local]", "model", "features", "selected", "fit_s",
    "predict_s", "val_macro_f1", **evaluate(...)} (plus "proba" when `return_proba`).
    """
    unknown = [w for w in which if w not in _ESTIMATORS]
    if unknown:
        raise UserError(f"unknown baselines {unknown}; choose from {list(_ESTIMATORS)}")
    params = dict(params or {})
    bad = [k for k in params if k not in _ESTIMATORS]
    if bad:
        raise UserError(f"params given for unknown baselines {bad}")
    if not features:
        raise UserError("no feature sets given")
    yi = encode_labels(y, classes)
    n = len(yi)
    for name, blocks in features.items():
        if _n_rows(name, blocks) != n:
            raise UserError(f"feature set {name!r} has {_n_rows(name, blocks)} rows for {n} labels")
    tr = _rows_index(train_mask, n, "train_mask")
    ev = _rows_index(eval_mask, n, "eval_mask")
    va = None if val_mask is None else _rows_index(val_mask, n, "val_mask")
    if np.intersect1d(tr, ev).size or (va is not None and np.intersect1d(tr, va).size):
        raise UserError("train rows overlap the eval or val rows: baselines must be scored on held-out cells")

    rows: list[dict[str, Any]] = []
    for feat, blocks in features.items():
        for model in which:
            fixed = dict(params.get(model, {}))
            grid = SELECTION_GRIDS[model] if va is not None else [{}]
            candidates = [dict(t) for t in dict.fromkeys(
                tuple(sorted({**c, **fixed}.items())) for c in grid)]  # fmt: skip
            norm = model == "knn"
            X_tr = _gather(blocks, tr, normalize_blocks=norm)
            X_va = None if va is None else _gather(blocks, va, normalize_blocks=norm)
            t0 = time.perf_counter()
            best, best_score, best_kwargs = None, -1.0, {}
            for kwargs in candidates:
                est = _fit_one(model, kwargs, X_tr, yi[tr], X_va, None if va is None else yi[va], balanced)
                if X_va is None:
                    best, best_kwargs, best_score = est, kwargs, None
                    break
                score = macro_f1(yi[va], est.classes_[est.predict_proba(X_va).argmax(1)])
                if score > best_score:
                    best, best_score, best_kwargs = est, score, kwargs
            fit_s = time.perf_counter() - t0
            del X_tr, X_va
            X_ev = _gather(blocks, ev, normalize_blocks=norm)
            t0 = time.perf_counter()
            proba = expand_proba(best.predict_proba(X_ev), best.classes_, len(classes))
            predict_s = time.perf_counter() - t0
            name = f"{model}[{feat}]"
            log.info("%s: fit %.1f s, predict %.1f s", name, fit_s, predict_s)
            if model == "xgboost":
                best_kwargs = {**best_kwargs, "trees": int(best.best_iteration_) + 1}
            row: dict[str, Any] = {
                "name": name,
                "model": model,
                "features": feat,
                "selected": best_kwargs,
                "balanced": balanced,
                "fit_s": fit_s,
                "predict_s": predict_s,
                "val_macro_f1": best_score,
                **evaluate(yi[ev], proba, classes),
            }
            if return_proba:
                row["proba"] = proba
            rows.append(row)
    return rows
