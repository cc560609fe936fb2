"""Evaluation figures as PNG: reliability diagrams, confusion heatmaps, complementarity bars.

Figures are built on `matplotlib.figure.Figure` and saved through the Agg canvas, never through
pyplot, so no display is needed and no global backend state is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl
from matplotlib import rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from embedstore.errors import UserError
from heads.calibration import ReliabilityCurve, reliability_curve

_LOCAL_COLOR = "#1f77b4"
_GLOBAL_COLOR = "#ff7f0e"


def save_png(fig: Figure, out: str | Path | BinaryIO, dpi: int, *, crop: bool = False) -> Path | BinaryIO:
    """Write `fig` (built with constrained layout) as a PNG to a path or a binary buffer,
    drawing it once.

    `savefig` on a figure with a layout engine first draws it with rendering switched off to run
    the layout (every text laid out, every image resampled), then draws it again for real;
    `bbox_inches="tight"` adds a pass over every artist's extent on top. Here the layout runs
    once at the saving resolution and is then frozen (layout engine removed), so `savefig` draws
    once. Constrained layout already fits titles, labels and legends inside the canvas, so the
    figure is saved as laid out; `crop=True` also cuts it to its content plus
    `savefig.pad_inches`, as `bbox_inches="tight"` did, for a figure whose layout cannot fill
    its canvas (a square heatmap leaves bands above and below). Texts inside an axes should be
    `in_layout=False`, so that neither the layout nor the crop measures them.
    """
    if isinstance(out, str | Path):
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.set_dpi(dpi)  # lay out at the resolution the PNG is drawn at
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        fig.set_layout_engine(None)  # None, not "none": a placeholder engine would draw twice
    bbox = fig.get_tightbbox().padded(rcParams["savefig.pad_inches"]) if crop else None
    fig.savefig(out, format="png", dpi=dpi, bbox_inches=bbox)
    return out


def reliability_diagram(
    paths: Mapping[str, ReliabilityCurve | tuple[np.ndarray, np.ndarray]],
    out_path: str | Path,
    *,
    n_bins: int = 10,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Reliability diagrams of several paths side by side, one column each.

    `paths` maps a name ("local (FiLM)", "global", "gate", ...) to a `ReliabilityCurve` or to
    (proba, y_true) from which one is computed. Top: accuracy per confidence bin (bars), the
    gap to the bin's mean confidence (red), the diagonal, and the cell count per bin; bottom:
    the share of cells per bin. ECE is in each column's title.
    """
    if not paths:
        raise UserError("no prediction paths to draw")
    curves = {
        name: v if isinstance(v, ReliabilityCurve) else reliability_curve(v[0], v[1], n_bins)
        for name, v in paths.items()
    }
    k = len(curves)
    fig = Figure(figsize=(3.6 * k, 4.8), layout="constrained")
    grid = fig.add_gridspec(2, k, height_ratios=(3, 1))
    for j, (name, c) in enumerate(curves.items()):
        ax = fig.add_subplot(grid[0, j])
        lo, width = c.edges[:-1], np.diff(c.edges)
        filled = c.count > 0
        acc = np.where(filled, c.accuracy, 0.0)
        ax.bar(
            lo,
            acc,
            width=width,
            align="edge",
            color=_LOCAL_COLOR,
            edgecolor="white",
            label="accuracy",
        )
        gap = np.where(filled, c.confidence - c.accuracy, 0.0)
        ax.bar(
            lo,
            gap,
            bottom=acc,
            width=width,
            align="edge",
            color="#d62728",
            alpha=0.35,
            edgecolor="#d62728",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="0.3", lw=1)
        for x, w, a, n in zip(lo, width, acc, c.count, strict=True):
            if n:
                ax.text(
                    x + w / 2,
                    min(a, 0.93) + 0.015,
                    str(int(n)),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name}\nECE = {c.ece:.3f}  (n = {int(c.count.sum())})", fontsize=10)
        ax.set_ylabel("accuracy" if j == 0 else "")
        if j == 0:
            ax.legend(loc="upper left", fontsize=8, frameon=False)
        hx = fig.add_subplot(grid[1, j], sharex=ax)
        share = c.count / max(int(c.count.sum()), 1)
        hx.bar(lo, share, width=width, align="edge", color="0.55", edgecolor="white")
        hx.set_ylim(0, 1)
        hx.set_xlabel("confidence (max probability)")
        hx.set_ylabel("share of cells" if j == 0 else "")
    if title:
        fig.suptitle(title)
    return save_png(fig, out_path, dpi)


def confusion_heatmap(
    matrix: np.ndarray | Sequence[Sequence[float]],
    classes: Sequence[str],
    out_path: str | Path,
    *,
    counts: np.ndarray | Sequence[Sequence[int]] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Row-normalised confusion matrix as a heatmap (true class on rows), values printed.

    `matrix` is `evaluate(...)["confusion"]["normalized"]`; with `counts` (the raw counts),
    each row label also shows its number of cells.
    """
    m = np.asarray(matrix, dtype=np.float64)
    c = len(classes)
    if m.shape != (c, c):
        raise UserError(f"confusion matrix has shape {m.shape}, expected ({c}, {c})")
    support = None if counts is None else np.asarray(counts).sum(axis=1)
    size = max(4.0, 0.55 * c + 2.5)
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    fontsize = 8 if c <= 12 else 7
    for i in range(c):
        for j in range(c):
            if support is not None and support[i] == 0:
                continue
            v = m[i, j]
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if v > 0.5 else "black",
                in_layout=False,  # inside its cell: nothing for the layout to make room for
            )
    rows = [
        f"{name} (n={int(support[i])})" if support is not None else name
        for i, name in enumerate(classes)
    ]
    ax.set_xticks(range(c), labels=list(classes), rotation=45, ha="right", fontsize=fontsize + 1)
    ax.set_yticks(range(c), labels=rows, fontsize=fontsize + 1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix (rows normalised)")
    return save_png(fig, out_path, dpi, crop=True)  # the square heatmap leaves bands: crop them


def complementarity_chart(
    frame: pl.DataFrame,
    out_path: str | Path,
    *,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Per class, the share of cells only the local path gets right vs only the global path
    (from `heads.metrics.complementarity`); classes without cells are left out."""
    need = {"class", "only_local", "only_global"}
    if not need <= set(frame.columns):
        raise UserError(f"complementarity frame lacks columns {sorted(need - set(frame.columns))}")
    f = frame.filter(pl.col("only_local").is_not_null())
    if f.height == 0:
        raise UserError("complementarity frame has no class with cells")
    names = f["class"].to_list()
    if "support" in f.columns:
        names = [f"{n} (n={s})" for n, s in zip(names, f["support"].to_list(), strict=True)]
    y = np.arange(f.height)
    h = 0.38
    fig = Figure(figsize=(7.0, max(2.5, 0.42 * f.height + 1.3)), layout="constrained")
    ax = fig.add_subplot()
    a = f["only_local"].to_numpy()
    b = f["only_global"].to_numpy()
    ax.barh(y - h / 2, a, height=h, color=_LOCAL_COLOR, label="only local right")
    ax.barh(y + h / 2, b, height=h, color=_GLOBAL_COLOR, label="only global right")
    for yy, va, vb in zip(y, a, b, strict=True):
        ax.text(va, yy - h / 2, f" {va:.2f}", va="center", fontsize=7)
        ax.text(vb, yy + h / 2, f" {vb:.2f}", va="center", fontsize=7)
    ax.set_yticks(y, labels=names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(0.05, float(np.nanmax(np.r_[a, b])) * 1.2))
    ax.set_xlabel("share of the class's cells")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_title(title or "Complementarity: cells only one path gets right")
    return save_png(fig, out_path, dpi)
