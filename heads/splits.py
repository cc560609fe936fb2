"""Train / validation / test splits of cells, spatially separated by a guard band.

Default rule, per slide: cells are cut into three stripes across the longer axis of the slide's
cells, `val | train | test` (the direction is flipped per slide at random, seeded), holding about
`val_fraction` and `test_fraction` of the slide's cells at the ends. Cells within `guard_um / 2`
of a cut form the guard band: they are used for neither training nor scoring, so every scored
cell is at least `guard_um` from every training cell of its slide. The default band is the
context radius (128 µm): a scored cell then lies outside the context field of the training
cells near it, and shares no crop pixels with any. Stripes are the spatial region with the
shortest boundary for a given share of a slide, so the band costs as few cells as possible.

With `holdout` (slide ids or tissue names), those whole slides are the test part and the other
slides are cut into `val | train` only. A `split` column (train/val/test) wins over both rules.
Slides with fewer than `min_cells` cells are not cut: they go to train whole.

Every split carries a summary (counts per part, per slide and per class, and the share of
scored cells with a training cell of the same slide within the crop (28 µm) and the context
radius (128 µm): the leak the guard band removes, also measured for user columns).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import polars as pl
from scipy.spatial import cKDTree

from embedstore.errors import UserError
from embedstore.geometry import CONTEXT_CROP, LOCAL_CROP

SPLIT_VALUES = ("train", "val", "test")
PARTS = ("train", "val", "test", "guard")
CROP_RADIUS_UM = LOCAL_CROP.size_um / 2  # 28 µm: half of the 224 px crop at 0.25 µm/px
CONTEXT_RADIUS_UM = CONTEXT_CROP.size_um / 2  # 128 µm: half of the 1024 px context field


@dataclass(frozen=True)
class SplitConfig:
    """How the default split is made (ignored where a `split` column is used)."""

    val_fraction: float = 0.2
    test_fraction: float = 0.2  # 0 when `holdout` names the test slides
    guard_um: float = CONTEXT_RADIUS_UM
    min_cells: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise UserError(f"{name} must be in [0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise UserError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves "
                "too little to train on; keep it below 0.9"
            )
        if not self.guard_um >= 0:
            raise UserError(f"guard_um must be >= 0 µm, got {self.guard_um}")


@dataclass(frozen=True)
class Split:
    """Row indices (int64, sorted) of each part, how the split was made, and its summary."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    guard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    source: str = "stripes"  # "stripes", "column" or "saved"
    info: dict[str, Any] = field(default_factory=dict)

    def labels(self, n: int) -> np.ndarray:
        """One string per row: train/val/test/guard, "" for rows in no part."""
        out = np.full(n, "", dtype=object)
        for name in PARTS:
            out[getattr(self, name)] = name
        return out

    def summary(self) -> dict:
        """Counts per part plus how the split was made (compact; `info` has the detail)."""
        return {"source": self.source, **{p: int(getattr(self, p).size) for p in PARTS}}

    def lines(self) -> list[str]:
        """The split as a few readable lines: parts, per slide, leak of the scored parts."""
        head = ", ".join(f"{p} {n}" for p, n in self.summary().items() if p != "source")
        settings = self.info.get("settings", {})
        how = (f"stripes val|train|test per slide, guard band {settings.get('guard_um', 0):g} µm"
               if self.source == "stripes" else f"{self.source}")  # fmt: skip
        if settings.get("holdout"):
            how += f"; test = held-out {', '.join(settings['holdout'])}"
        lines = [f"split ({how}): {head}"] + [f"warning: {w}" for w in self.info.get("warnings", [])]
        per_slide = self.info.get("per_slide", [])
        for r in per_slide[:20]:
            lines.append("  " + str(r["slide_id"]) + ": " + ", ".join(f"{p} {r[p]}" for p in PARTS))
        if len(per_slide) > 20:
            lines.append(f"  ... and {len(per_slide) - 20} more slides (split.json)")
        per_class = [r for r in self.info.get("per_class", []) if r["class"] is not None]
        if per_class:
            lines.append("  per class (train/val/test/guard): " + ", ".join(
                f"{r['class']} {r['train']}/{r['val']}/{r['test']}/{r['guard']}" for r in per_class[:30]))  # fmt: skip
            if len(per_class) > 30:
                lines[-1] += f", ... and {len(per_class) - 30} more classes (split.json)"
        for part, leak in self.info.get("leak", {}).items():
            lines.append(
                f"  {part}: {leak['train_within_crop']:.1%} of cells have a training cell within 28 µm "
                f"(crop), {leak['train_within_context']:.1%} within 128 µm (context radius)"
            )
        return lines


def make_split(
    meta: pl.DataFrame,
    *,
    holdout: Sequence[str] = (),
    config: SplitConfig | None = None,
    split_col: str = "split",
    use_column: bool = True,
) -> Split:
    """Split cells; see the module docstring. Coordinates come from x_um/y_um."""
    cfg = config or SplitConfig()
    n = meta.height
    held = _holdout_mask(meta, holdout)
    col = meta[split_col] if (use_column and split_col in meta.columns) else None
    if col is not None and col.null_count() == n:
        col = None  # an all-empty optional column: as if absent
    names = np.full(n, "", dtype=object)
    if col is not None:
        names[:] = _column_parts(col, split_col)
        if held.any():
            names[held] = "test"
        source, settings = "column", {"holdout": list(holdout)}
    else:
        x, y = _coordinates(meta)
        slides = _slides(meta)
        test_fraction = 0.0 if held.any() else cfg.test_fraction
        names[held] = "test"
        for slide in np.unique(slides[~held]):
            rows = np.flatnonzero((slides == slide) & ~held)
            names[rows] = stripe_parts(
                x[rows], y[rows], val_fraction=cfg.val_fraction, test_fraction=test_fraction,
                guard_um=cfg.guard_um, min_cells=cfg.min_cells, seed=_slide_seed(cfg.seed, slide),
            )  # fmt: skip
        source = "stripes"
        settings = {**asdict(cfg), "test_fraction": test_fraction, "holdout": list(holdout)}
    parts = {p: np.flatnonzero(names == p).astype(np.int64) for p in PARTS}
    info = {"settings": settings, **split_report(meta, names)}
    info["warnings"] = _band_warnings(info["per_slide"])
    if {"slide_id", "cell_id"} <= set(meta.columns):
        info["digest"] = split_digest(split_table(meta, names))
    return Split(**parts, source=source, info=info)


def split_table(meta: pl.DataFrame, names: np.ndarray) -> pl.DataFrame:
    """slide_id, cell_id, split of the cells in a part (what a run saves as split.parquet)."""
    frame = meta.select("slide_id", "cell_id").with_columns(split=pl.Series(np.asarray(names, dtype=str)))
    return frame.filter(pl.col("split") != "")


def split_digest(table: pl.DataFrame) -> str:
    """SHA-256 of a split table's (slide_id, cell_id, split) rows, whatever their order and id
    types: checkpoints record it, so that a run's stages are known to share one split."""
    rows = table.select(
        pl.concat_str([pl.col(c).cast(pl.Utf8) for c in ("slide_id", "cell_id", "split")], separator="\t")
    ).to_series().sort()  # fmt: skip
    return hashlib.sha256("\n".join(rows.to_list()).encode()).hexdigest()


#: the options that make a split (`heads train --holdout --val-fraction --test-fraction --guard-um`)
SPLIT_OPTIONS = ("val_fraction", "test_fraction", "guard_um")


def check_same_settings(
    saved: Split,
    holdout: Sequence[str],
    config: SplitConfig | None,
    stage: str,
    given: Collection[str] | None = None,
) -> list[str]:
    """Refuse split options given to a later stage (`global`, `gate`) that differ from the saved
    split's: that stage trains on the split its local head was trained on.

    `given`: the names of `config`'s fields set explicitly (`heads train` passes the options
    typed on its command line): each of SPLIT_OPTIONS among them is compared with the saved
    split's, even at its default value; the others are not looked at. None (Python callers
    passing a plain SplitConfig): options at their default count as not given. A `holdout` is
    given when not empty. `test_fraction` is not compared when the saved split held slides out:
    with `--holdout` the held-out slides are the test part, whatever the fraction.

    The seed is never refused: `--seed` also seeds the stage's training, which may differ from
    the local stage's; the split keeps the seed it was made with. Returns notes to log (a seed
    other than the split's)."""
    settings = saved.info.get("settings", {})
    names = options_given(config, given)
    said = {}
    if holdout and sorted(holdout) != sorted(settings.get("holdout", [])):
        said["holdout"] = list(holdout)
    for name in SPLIT_OPTIONS:
        if name not in names or (name == "test_fraction" and settings.get("holdout")):
            continue
        value = getattr(config, name)
        if value != settings.get(name):
            said[name] = value
    if said:
        shown = ", ".join(f"--{k.replace('_', '-')} {_show(v)}" for k, v in said.items())
        kept = ", ".join(f"{k} {_show(settings[k])}" for k in ("holdout", *SPLIT_OPTIONS) if k in settings)
        raise UserError(
            f"{shown} cannot apply to --stage {stage}: the split comes from the local stage (this "
            f"run's: source {saved.source}, {kept}; split.json). Drop the option, or retrain with "
            "--stage all to make a new split"
        )
    notes = []
    if "seed" in names and "seed" in settings and config.seed != settings["seed"]:
        notes.append(f"note: --seed {config.seed} seeds the training of stage {stage} only; its split is the "
                     f"local stage's, made with seed {settings['seed']}")  # fmt: skip
    return notes


def options_given(config: SplitConfig | None, given: Collection[str] | None) -> list[str]:
    """The fields of `config` set by the user: those named in `given` (the options typed), or
    when None those away from their default."""
    defaults = {f.name: f.default for f in fields(SplitConfig)}
    if config is None:
        return []
    if given is None:
        return [name for name, value in defaults.items() if getattr(config, name) != value]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"given names no SplitConfig field: {', '.join(unknown)}")
    return list(given)


def _show(value: Any) -> str:
    return (" ".join(map(str, value)) or "none") if isinstance(value, list) else f"{value:g}"


def _band_warnings(per_slide: list[dict[str, Any]], limit: float = 0.3) -> list[str]:
    """Slides whose guard band takes more than `limit` of their cells (small tissue)."""
    heavy = [(r["slide_id"], r["guard"] / max(1, sum(r[p] for p in PARTS))) for r in per_slide]
    heavy = [(s, f) for s, f in heavy if f > limit]
    if not heavy:
        return []
    shown = ", ".join(f"{s} {f:.0%}" for s, f in heavy[:5]) + (" ..." if len(heavy) > 5 else "")
    return [
        f"the guard band takes more than {limit:.0%} of the cells of {len(heavy)} slide(s) ({shown}): "
        "the tissue is small for stripes; hold out whole slides with --holdout (TMA cores, crops) "
        "or narrow the band with --guard-um"
    ]


def stripe_parts(
    x: np.ndarray,
    y: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    guard_um: float,
    min_cells: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Part name per cell of one slide: stripes `val | train | test` across the longer axis.

    Cuts sit at the `val_fraction` and `1 - test_fraction` quantiles of the cells' position
    along that axis; cells closer than `guard_um / 2` to a cut are "guard". The direction is
    flipped when `seed`'s first draw says so, so val is not always on the same side.
    """
    n = x.size
    out = np.full(n, "train", dtype=object)
    if n < max(min_cells, 1):
        return out
    along = x if np.ptp(x) >= np.ptp(y) else y
    if np.random.default_rng(seed).random() < 0.5:
        along = -along
    cuts = []
    if val_fraction > 0:
        cut = float(np.quantile(along, val_fraction))
        out[along < cut] = "val"
        cuts.append(cut)
    if test_fraction > 0:
        cut = float(np.quantile(along, 1.0 - test_fraction))
        out[along > cut] = "test"
        cuts.append(cut)
    for cut in cuts:
        out[np.abs(along - cut) < guard_um / 2] = "guard"
    return out


def split_report(meta: pl.DataFrame, names: np.ndarray) -> dict[str, Any]:
    """Counts per slide and per class (part columns), and the leak of each scored part: the
    share of its cells with a training cell of the same slide within the crop and context radii."""
    frame = pl.DataFrame({
        "slide_id": _slides(meta).astype(str),
        "class": meta["label"].cast(pl.Utf8) if "label" in meta.columns else [None] * meta.height,
        "part": np.asarray(names, dtype=str),
    }).filter(pl.col("part") != "")  # fmt: skip

    def counts(by: str) -> list[dict[str, Any]]:
        if frame.is_empty():
            return []
        wide = frame.group_by(by, "part").len().pivot(on="part", index=by, values="len")
        wide = wide.with_columns([pl.lit(0, pl.UInt32).alias(p) for p in PARTS if p not in wide.columns])
        return wide.select(by, *PARTS).fill_null(0).sort(by, nulls_last=True).to_dicts()

    leak: dict[str, Any] = {}
    try:
        x, y = _coordinates(meta)
    except UserError:
        x = y = None
    if x is not None:
        slides = _slides(meta)
        for part in ("val", "test"):
            dist = np.full(meta.height, np.inf)
            for slide in np.unique(slides[names == part]):
                same = slides == slide
                train = np.flatnonzero(same & (names == "train"))
                scored = np.flatnonzero(same & (names == part))
                if train.size:
                    tree = cKDTree(np.column_stack([x[train], y[train]]))
                    dist[scored] = tree.query(np.column_stack([x[scored], y[scored]]), k=1)[0]
            d = dist[names == part]
            if d.size:
                leak[part] = {
                    "cells": int(d.size),
                    "train_within_crop": float(np.mean(d < CROP_RADIUS_UM)),
                    "train_within_context": float(np.mean(d < CONTEXT_RADIUS_UM)),
                    "nearest_train_um_min": float(d.min()) if np.isfinite(d.min()) else None,
                }
    return {"per_slide": counts("slide_id"), "per_class": counts("class"), "leak": leak}


def _column_parts(col: pl.Series, split_col: str) -> np.ndarray:
    n = col.len()
    if col.null_count():
        raise UserError(
            f"`{split_col}` column is empty for {col.null_count()} of {n} cells; fill it "
            f"with {'/'.join(SPLIT_VALUES)} for every cell, or clear it to use the default "
            "per-slide stripes with a guard band"
        )
    values = col.cast(pl.Utf8).to_numpy()
    bad = sorted(set(values.tolist()) - set(SPLIT_VALUES))
    if bad:
        raise UserError(
            f"`{split_col}` column has value(s) {', '.join(map(repr, bad))}; allowed: "
            f"{', '.join(SPLIT_VALUES)}"
        )
    return values.astype(object)


def _slide_seed(seed: int, slide: Any) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(str(slide).encode())) % 2**32


def _slides(meta: pl.DataFrame) -> np.ndarray:
    if "slide_id" in meta.columns:
        return meta["slide_id"].cast(pl.Utf8).to_numpy()
    return np.zeros(meta.height).astype(str)


def _coordinates(meta: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    if "x_um" in meta.columns and "y_um" in meta.columns:
        x = meta["x_um"].cast(pl.Float64).to_numpy()
        y = meta["y_um"].cast(pl.Float64).to_numpy()
        if np.isfinite(x).all() and np.isfinite(y).all():
            return x, y
    raise UserError(
        "cannot make the spatial split: cells need finite x_um/y_um coordinates (µm, for the "
        "guard band), or a `split` column with train/val/test"
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
    if held.all():
        raise UserError(
            "--holdout keeps every cell out of training; hold out fewer slides or tissues"
        )
    return held
