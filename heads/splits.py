"""Train/validation/test/holdout splits of cells.

A `split` column (train/val/test), when present, is used as is. Otherwise each slide gets the
paper's validation rule: a central rectangle holding ~25% of that slide's cells. `holdout`
names slides or tissues kept out of all three (returned as a separate "holdout" split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from embedstore.errors import UserError

SPLIT_VALUES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Row indices (int64, sorted) of each part, plus how the split was made."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    holdout: np.ndarray
    source: str  # "column" or "central_rectangle"

    def labels(self, n: int) -> np.ndarray:
        """One string per row: train/val/test/holdout."""
        out = np.full(n, "", dtype=object)
        for name in ("train", "val", "test", "holdout"):
            out[getattr(self, name)] = name
        return out

    def summary(self) -> dict:
        return {
            "source": self.source,
            **{name: int(getattr(self, name).size) for name in ("train", "val", "test", "holdout")},
        }


def make_split(
    meta: pl.DataFrame,
    *,
    holdout: Sequence[str] = (),
    val_fraction: float = 0.25,
    split_col: str = "split",
    use_column: bool = True,
) -> Split:
    """Split cells; see the module docstring. Coordinates come from x_um/y_um (else x_px/y_px)."""
    n = meta.height
    held = _holdout_mask(meta, holdout)
    keep = ~held

    col = meta[split_col] if (use_column and split_col in meta.columns) else None
    if col is not None and col.null_count() == n:
        col = None  # an all-empty optional column: as if absent
    if col is not None:
        values = col.cast(pl.Utf8).to_numpy()
        if col.null_count():
            raise UserError(
                f"`{split_col}` column is empty for {col.null_count()} of {n} cells; fill it "
                f"with {'/'.join(SPLIT_VALUES)} for every cell, or clear it to use the "
                "per-slide central-rectangle validation split"
            )
        bad = sorted(set(values.tolist()) - set(SPLIT_VALUES))
        if bad:
            raise UserError(
                f"`{split_col}` column has value(s) {', '.join(map(repr, bad))}; allowed: "
                f"{', '.join(SPLIT_VALUES)}"
            )
        parts = {v: np.flatnonzero((values == v) & keep) for v in SPLIT_VALUES}
        source = "column"
    else:
        val = np.zeros(n, dtype=bool)
        x, y = _coordinates(meta)
        slides = meta["slide_id"].to_numpy() if "slide_id" in meta.columns else np.zeros(n)
        for slide in np.unique(slides[keep]):
            rows = np.flatnonzero((slides == slide) & keep)
            val[rows[central_rectangle(x[rows], y[rows], val_fraction)]] = True
        parts = {
            "train": np.flatnonzero(keep & ~val),
            "val": np.flatnonzero(keep & val),
            "test": np.zeros(0, dtype=np.int64),
        }
        source = "central_rectangle"
    return Split(
        train=parts["train"].astype(np.int64),
        val=parts["val"].astype(np.int64),
        test=parts["test"].astype(np.int64),
        holdout=np.flatnonzero(held).astype(np.int64),
        source=source,
    )


def central_rectangle(x: np.ndarray, y: np.ndarray, fraction: float = 0.25) -> np.ndarray:
    """Boolean mask of the cells inside the slide's central validation rectangle.

    The rectangle is centred on the cells' median, has the aspect ratio of their bounding box,
    and is grown until it holds at least `fraction` of them. Cell i enters at scale
    s_i = max(2|x_i - mx| / W, 2|y_i - my| / H); the rectangle is the k-th smallest s_i, with
    k = ceil(fraction * n) (ties at that scale are all inside).
    """
    n = x.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    k = max(1, math.ceil(fraction * n))
    mx, my = np.median(x), np.median(y)
    sx = _scaled_offset(x - mx, float(np.ptp(x)))
    sy = _scaled_offset(y - my, float(np.ptp(y)))
    s = np.maximum(sx, sy)
    threshold = np.partition(s, k - 1)[k - 1]
    return s <= threshold


def _scaled_offset(d: np.ndarray, extent: float) -> np.ndarray:
    if extent > 0:
        return 2.0 * np.abs(d) / extent
    # all cells share this coordinate: it never limits the rectangle
    return np.zeros_like(d, dtype=float)


def _coordinates(meta: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    for xs, ys in (("x_um", "y_um"), ("x_px", "y_px")):
        if xs in meta.columns and ys in meta.columns:
            x = meta[xs].cast(pl.Float64).to_numpy()
            y = meta[ys].cast(pl.Float64).to_numpy()
            if np.isfinite(x).all() and np.isfinite(y).all():
                return x, y
    raise UserError(
        "cannot make the validation split: cells need finite x_um/y_um (or x_px/y_px) "
        "coordinates, or a `split` column with train/val/test"
    )


def _holdout_mask(meta: pl.DataFrame, holdout: Sequence[str]) -> np.ndarray:
    n = meta.height
    held = np.zeros(n, dtype=bool)
    if not holdout:
        return held
    if isinstance(holdout, str):
        holdout = [holdout]
    slides = meta["slide_id"].cast(pl.Utf8).to_numpy() if "slide_id" in meta.columns else None
    tissues = meta["tissue"].cast(pl.Utf8).to_numpy() if "tissue" in meta.columns else None
    unknown = []
    for name in holdout:
        hit = np.zeros(n, dtype=bool)
        if slides is not None:
            hit |= slides == name
        if tissues is not None:
            hit |= tissues == name
        if not hit.any():
            unknown.append(name)
        held |= hit
    if unknown:
        raise UserError(
            f"holdout name(s) {', '.join(map(repr, unknown))} match no slide_id or tissue in the "
            "selected cells; check the spelling (names are case-sensitive)"
        )
    return held
