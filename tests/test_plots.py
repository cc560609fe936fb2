"""heads.plots saving: each figure is drawn once, keeps its look (the confusion heatmap still
cropped as `bbox_inches="tight"` did), every value stays printed and no label is cut off."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import heads.plots as hp
from heads.metrics import complementarity

LONG = ["cancer-associated fibroblast", "tumour-infiltrating lymphocyte", "plasma cell",
        "neutrophil", "eosinophil", "macrophage", "endothelial cell", "smooth muscle cell",
        "epithelial cell (normal)", "tumour cell", "mitotic figure", "apoptotic body"]


def tight_save(fig, out_path, dpi, **_):
    """How figures were saved before: savefig(bbox_inches="tight") on the constrained layout."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_path, format="png", dpi=dpi, bbox_inches="tight")
    return out_path


def confusion(c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    m = rng.dirichlet(np.ones(c) * 0.3, c) * 0.5 + np.eye(c) * 0.5
    counts = (m * rng.integers(50, 3000, c)[:, None]).astype(int)
    counts[-1] = 0  # a class without cells: its row prints no values
    return m / m.sum(1, keepdims=True), counts


def paths(n: int = 3000, c: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)

    def proba(noise):
        z = np.eye(c)[y] * 3 + rng.standard_normal((n, c)) * noise
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    return y, {"local (FiLM)": (proba(2.0), y), "global": (proba(2.5), y), "gate": (proba(1.6), y)}


def draw_all(out, classes):
    """The three figure kinds, written under `out`; returns {name: path}."""
    m, counts = confusion(len(classes))
    y, curves = paths()
    comp = complementarity(y, curves["local (FiLM)"][0].argmax(1), curves["global"][0].argmax(1),
                           LONG[:6])
    return {
        "confusion": hp.confusion_heatmap(m, classes, out / "cm.png", counts=counts, title="gate"),
        "reliability": hp.reliability_diagram(curves, out / "rel.png", title="Reliability"),
        "complementarity": hp.complementarity_chart(comp, out / "comp.png"),
    }


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def content(a: np.ndarray) -> np.ndarray:
    """The image cut to what is not (near) white."""
    ys, xs = np.nonzero((a < 250).any(2))
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


@pytest.fixture
def figures(monkeypatch):
    """Records every Figure built and every Figure.draw (the real draws and the layout pre-draws)."""
    built: list[Figure] = []
    draws: list[Figure] = []
    init, draw = Figure.__init__, Figure.draw

    def keep_init(self, *a, **kw):
        init(self, *a, **kw)
        built.append(self)

    def count_draw(self, renderer):
        draws.append(self)
        return draw(self, renderer)

    monkeypatch.setattr(Figure, "__init__", keep_init)
    monkeypatch.setattr(Figure, "draw", count_draw)
    return built, draws


def test_each_figure_is_drawn_once(figures, tmp_path) -> None:
    built, draws = figures
    out = draw_all(tmp_path, LONG[:10])
    assert len(built) == 3
    assert [draws.count(f) for f in built] == [1, 1, 1]  # was 2: a layout pre-draw, then the PNG
    for p in out.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_look_as_the_tight_save(tmp_path, monkeypatch) -> None:
    classes = LONG[:10]
    now = draw_all(tmp_path / "now", classes)
    monkeypatch.setattr(hp, "save_png", tight_save)
    before = draw_all(tmp_path / "before", classes)
    # the heatmap is cropped as before: the same PNG
    a, b = pixels(now["confusion"]), pixels(before["confusion"])
    assert a.shape == b.shape and (np.abs(a - b).max(2) > 0).mean() < 1e-3
    # the others fill their canvas: the same content, only the white margin differs
    for name in ("reliability", "complementarity"):
        a, b = content(pixels(now[name])), content(pixels(before[name]))
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() <= 32 and (np.abs(a - b).max(2) > 0).mean() < 0.01, name


def test_values_printed_and_labels_inside(figures, tmp_path) -> None:
    n_classes = len(LONG)
    built, _ = figures
    classes = LONG[:n_classes]
    out = draw_all(tmp_path, classes)
    cm, rel, comp = built
    r = cm.canvas.get_renderer()
    (ax, _cbar) = cm.axes
    values = [t for t in ax.texts]
    assert len(values) == n_classes * (n_classes - 1)  # every cell but the empty class's row
    m, _ = confusion(n_classes)
    assert sorted(t.get_text() for t in values) == sorted(
        f"{v:.2f}" for v in m[:-1].ravel())
    image = ax.get_images()[0].get_window_extent(r)
    for t in values:  # inside the heatmap: the crop need not measure them
        e = t.get_window_extent(r)
        assert image.x0 <= e.x0 and e.x1 <= image.x1 and image.y0 <= e.y0 and e.y1 <= image.y1
    # the saved heatmap holds all labels: the PNG is the crop of everything laid out
    with Image.open(out["confusion"]) as im:
        w, h = im.size
    box = cm.get_tightbbox(r).padded(0.1)
    assert abs(w - box.width * cm.dpi) <= 2 and abs(h - box.height * cm.dpi) <= 2
    labels = [*ax.get_xticklabels(), *ax.get_yticklabels()]
    assert {t.get_text() for t in ax.get_xticklabels()} == set(classes)
    for t in labels:
        e = t.get_window_extent(r)
        assert box.x0 * cm.dpi - 1 <= e.x0 and e.x1 <= box.x1 * cm.dpi + 1
        assert box.y0 * cm.dpi - 1 <= e.y0 and e.y1 <= box.y1 * cm.dpi + 1
    # saved uncropped: all that is drawn (titles, tick labels, counts, legend) fits the canvas
    for fig, path in ((rel, out["reliability"]), (comp, out["complementarity"])):
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
        assert drawn.x0 >= 0 and drawn.y0 >= 0, path
        assert drawn.x1 <= fig.get_figwidth() and drawn.y1 <= fig.get_figheight(), path
        with Image.open(path) as im:
            assert im.size == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))


def test_save_to_a_new_folder(tmp_path) -> None:
    fig = Figure(layout="constrained")
    fig.add_subplot().plot([0, 1], [0, 1])
    p = hp.save_png(fig, tmp_path / "a" / "b" / "f.png", 50)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (320, 240)  # 6.4 x 4.8 in at 50 dpi: uncropped
