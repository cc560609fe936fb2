"""Example figure of a synthetic dataset: slide overview plus local / context crops per class.

    python -m embedstore.synth.figure OUT_DIR docs/img/synth_example.png

(OUT_DIR from `make_synthetic` / `embed synth`). The PNG is palette-quantised to stay small.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import openslide
import polars as pl
from PIL import Image

from .spec import CLASSES

LOCAL_UM, CONTEXT_UM = 56.0, 256.0


def _crop(slide: openslide.OpenSlide, x_px: float, y_px: float, size_um: float, mpp: float,
          out_px: int) -> np.ndarray:
    """A centred square of size_um, read at the coarsest level that is still fine enough."""
    want = size_um / out_px / mpp  # level-0 px per output px
    level = max(i for i, d in enumerate(slide.level_downsamples) if d <= want * 1.01 or i == 0)
    ds = slide.level_downsamples[level]
    side = int(round(size_um / mpp / ds))
    x0, y0 = int(round(x_px - side * ds / 2)), int(round(y_px - side * ds / 2))
    img = slide.read_region((x0, y0), level, (side, side))
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img).convert("RGB")  # outside the slide: white
    return np.asarray(img.resize((out_px, out_px), Image.Resampling.LANCZOS))


def render_example_figure(out_dir: str | Path, png: str | Path, *, seed: int = 0,
                          colors: int = 256) -> Path:
    """Overview of the first slide with cells coloured by class, and per class one local
    (56 µm) and one context (256 µm) crop. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, png = Path(out_dir), Path(png)
    truth = pl.read_parquet(out_dir / "truth.parquet")
    slides = {p.name.split(".")[0]: p for p in (out_dir / "slides").iterdir()}
    rng = np.random.default_rng(seed)
    first = sorted(slides)[0]
    cmap = plt.get_cmap("tab10")
    fig = plt.figure(figsize=(12, 8), dpi=100)
    ax = fig.add_axes((0.0, 0.04, 0.48, 0.9))
    with openslide.OpenSlide(str(slides[first])) as sl:
        mpp = float(sl.properties["openslide.mpp-x"])
        level = sl.get_best_level_for_downsample(6)
        ds = sl.level_downsamples[level]
        ax.imshow(sl.read_region((0, 0), level, sl.level_dimensions[level]).convert("RGB"))
    t = truth.filter(pl.col("slide_id") == first)
    for k, cname in enumerate(CLASSES):
        c = t.filter(pl.col("label") == cname)
        ax.scatter(c["x_px"] / ds, c["y_px"] / ds, s=4, color=cmap(k), label=cname)
    ax.set_title(f"{first} ({t['tissue'][0]}): cells coloured by class", fontsize=10)
    ax.legend(fontsize=7, markerscale=2.5, loc="upper center", bbox_to_anchor=(0.5, 0.0),
              ncol=3, frameon=False)
    ax.axis("off")
    w = 0.11
    h = w * 12 / 8
    for k, cname in enumerate(CLASSES):
        cand = truth.filter(pl.col("label") == cname)
        if cand.height == 0:
            continue
        row = cand.row(int(rng.integers(cand.height)), named=True)
        with openslide.OpenSlide(str(slides[row["slide_id"]])) as sl:
            local = _crop(sl, row["x_px"], row["y_px"], LOCAL_UM, mpp, 160)
            context = _crop(sl, row["x_px"], row["y_px"], CONTEXT_UM, mpp, 160)
        x0 = 0.50 + (k // 5) * 0.25
        y0 = 0.925 - (k % 5 + 1) * 0.185
        for j, img in enumerate((local, context)):
            a = fig.add_axes((x0 + j * (w + 0.005), y0, w, h))
            a.imshow(img)
            if j == 1:  # the local field inside the context field
                s_ = 160 * LOCAL_UM / CONTEXT_UM
                a.add_patch(plt.Rectangle((80 - s_ / 2, 80 - s_ / 2), s_, s_, fill=False,
                                          lw=0.8, color="k"))
            a.set_xticks([])
            a.set_yticks([])
            for side in a.spines.values():
                side.set_color(cmap(k))
                side.set_linewidth(2)
        fig.text(x0, y0 + h + 0.006, f"{cname}  ({row['region'].replace('_', ' ')})",
                 fontsize=7.5, color=cmap(k))
    fig.text(0.50, 0.965, "one cell per class: local 56 µm (left) | context 256 µm (right)",
             fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    img = Image.open(buf).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png, optimize=True)
    return png


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 3:
        sys.exit("usage: python -m embedstore.synth.figure SYNTH_OUT_DIR OUT.png")
    print(render_example_figure(sys.argv[1], sys.argv[2]))
