"""The batch-effect figure (`plot_same_slide_rate`): a linear 0..1 share per slide, the chance
level on each bar and the observed/chance ratio written next to it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

from embedstore.errors import UserError
from embedstore.search.audit import plot_same_slide_rate


def rates(n: int, seed: int = 0, single_cell_slide: bool = False) -> pl.DataFrame:
    """A table shaped like `same_slide_rate`'s output (sorted by ratio, nulls last)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 5000, n)
    if single_cell_slide:
        sizes[-1] = 1
    expected = (sizes - 1) / (sizes.sum() - 1)
    observed = np.clip(expected * rng.lognormal(1.0, 1.0, n), 0, 1)
    observed[0] = 1.0  # a full bar: its ratio label lies right of the axes
    if single_cell_slide:
        observed[-1] = 0.0
    ratio = np.where(expected > 0, observed / np.where(expected > 0, expected, 1), np.nan)
    df = pl.DataFrame({
        "group": [f"TCGA-{i:02d}-A{1000 + i}-01Z-00-DX1" for i in range(n)],
        "n_cells": sizes, "observed": observed, "expected": expected, "ratio": ratio,
    }).with_columns(pl.col("ratio").fill_nan(None))
    return df.sort("ratio", descending=True, nulls_last=True)


def label(r: float | None) -> str:
    return "n/a" if r is None else f"×{r:.1f}" if r < 10 else f"×{r:.0f}"


@pytest.fixture
def drawn(monkeypatch):
    """Calls plot_same_slide_rate and returns (png path, the Figure it saved, drawn)."""
    figs: list[Figure] = []
    save = Figure.savefig

    def keep(self, *a, **kw):
        figs.append(self)
        return save(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)

    def draw(table, path, **kw):
        out = plot_same_slide_rate(table, path, **kw)
        assert len(figs) == 1
        fig = figs.pop()
        FigureCanvasAgg(fig).draw()
        return out, fig

    return draw


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def extents(fig, artists):
    r = fig.canvas.get_renderer()
    return [a.get_window_extent(r) for a in artists if a.get_text()]


def assert_no_overlap_and_inside(fig, artists) -> None:
    boxes = extents(fig, artists)
    for b in boxes:  # nothing cut off at the figure's edges
        assert fig.bbox.x0 - 0.5 <= b.x0 and b.x1 <= fig.bbox.x1 + 0.5, b
        assert fig.bbox.y0 - 0.5 <= b.y0 and b.y1 <= fig.bbox.y1 + 0.5, b
    ys = sorted((b.y0, b.y1) for b in boxes)
    for (_, top), (bottom, _) in zip(ys, ys[1:], strict=False):  # one row per label, no overlap
        assert top <= bottom + 0.5


def test_linear_share_chance_ticks_and_ratio_labels(drawn, tmp_path) -> None:
    table = rates(6, single_cell_slide=True)
    png, fig = drawn(table, tmp_path / "figs" / "batch.png", title="Same-slide (local, k=20)")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear"
    assert ax.get_xlim() == (0.0, 1.0)  # the share on its true scale, no floor
    # slides top to bottom by ratio, each with its ratio written next to its bar
    assert [t.get_text() for t in ax.get_yticklabels()] == table["group"].to_list()
    want = [label(r) for r in table["ratio"].to_list()]
    assert texts(ax) == want and want[-1] == "n/a" and want[0].startswith("×")
    for t, obs, exp in zip(ax.texts, table["observed"], table["expected"], strict=True):
        assert t.xy[0] == pytest.approx(max(obs, exp))  # just right of the bar and the tick
    # the chance level: one tick per slide at x = expected
    (ticks,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    xs = sorted(seg[0][0] for seg in ticks.get_segments())
    assert xs == pytest.approx(sorted(table["expected"].to_list()))
    title = fig.get_suptitle()
    assert title == "Same-slide (local, k=20)"  # all slides drawn: no "(top N of M)"
    assert "near ×1: slides mix" in ax.get_title() and "n/a" in ax.get_title()
    assert_no_overlap_and_inside(fig, ax.texts)
    assert_no_overlap_and_inside(fig, ax.get_yticklabels())


def test_many_slides_top_ratios_readable(drawn, tmp_path) -> None:
    table = rates(100, seed=1)
    png, fig = drawn(table, tmp_path / "batch.png", max_groups=80)
    ax = fig.axes[0]
    assert fig.get_suptitle().endswith("(top 80 of 100)")
    top = table.head(80)
    assert [t.get_text() for t in ax.get_yticklabels()] == top["group"].to_list()
    assert texts(ax) == [label(r) for r in top["ratio"].to_list()]
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 7
    assert_no_overlap_and_inside(fig, ax.get_yticklabels())
    assert_no_overlap_and_inside(fig, ax.texts)
    with Image.open(png) as im:
        assert im.size[0] < 1500  # grows downwards, not into an unreadably wide strip


def test_default_title_and_all_slides(drawn, tmp_path) -> None:
    table = rates(3)
    _, fig = drawn(table, tmp_path / "batch.png")
    assert fig.get_suptitle() == "Same-slide neighbours: observed vs chance"
    assert "n/a" not in fig.axes[0].get_title()


def test_table_without_the_columns_is_refused(tmp_path) -> None:
    with pytest.raises(UserError, match=r"lacks columns \['expected', 'ratio'\]"):
        plot_same_slide_rate(pl.DataFrame({"group": ["a"], "observed": [0.5]}), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
