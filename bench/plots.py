"""Benchmark: the figures `heads eval` writes, saved by `heads.plots.save_png` (laid out once,
drawn once) against the plain `savefig(bbox_inches="tight")` they used before (constrained
layout draws the figure twice, the tight box measures it again), in one process, interleaved;
medians of CPU seconds (figure built + saved). Prints JSON.

    python bench/plots.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import heads.plots as hp  # noqa: E402
from heads.metrics import complementarity  # noqa: E402

#: long real-world class names: the layout has to make room for them
CLASSES = [
    "cancer-associated fibroblast", "tumour-infiltrating lymphocyte", "plasma cell", "neutrophil",
    "eosinophil", "macrophage", "endothelial cell", "smooth muscle cell", "epithelial cell (normal)",
    "tumour cell", "mitotic figure", "apoptotic body", "adipocyte", "nerve cell", "mast cell",
    "dendritic cell", "myoepithelial cell", "pericyte", "keratinocyte", "melanocyte", "hepatocyte",
    "red blood cell", "necrotic debris", "stromal cell (other)", "unknown / ambiguous",
]  # fmt: skip


def tight_save(fig, out, dpi, **_):
    """The baseline: what `heads.plots` did before `save_png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
    return out


def figures(rng: np.random.Generator) -> dict:
    n = 5000
    y = rng.integers(0, 10, n)

    def proba(noise):
        logits = np.eye(10)[y] * 3 + rng.standard_normal((n, 10)) * noise
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def confusion(c):
        m = rng.dirichlet(np.ones(c) * 0.3, c) * 0.5 + np.eye(c) * 0.5
        return m / m.sum(1, keepdims=True), (m * rng.integers(50, 3000, c)[:, None]).astype(int)

    local, glob, gate = proba(2.0), proba(2.5), proba(1.6)
    (m10, c10), (m25, c25) = confusion(10), confusion(25)
    comp = complementarity(y, local.argmax(1), glob.argmax(1), CLASSES[:10])
    return {
        "confusion_10_classes": lambda o: hp.confusion_heatmap(m10, CLASSES[:10], o, counts=c10, title="gate"),
        "confusion_25_classes": lambda o: hp.confusion_heatmap(m25, CLASSES, o, counts=c25, title="gate"),
        "reliability_3_paths": lambda o: hp.reliability_diagram(
            {"local (FiLM)": (local, y), "global": (glob, y), "gate": (gate, y)}, o, title="Reliability"),
        "complementarity": lambda o: hp.complementarity_chart(comp, o),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    figs = figures(np.random.default_rng(0))
    savers = {"save_png": hp.save_png, "tight_savefig": tight_save}
    cpu: dict[tuple[str, str], list[float]] = {}
    load_start = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats + 1):  # the first round warms fonts and caches
            for name, draw in figs.items():
                for saver, fn in savers.items():
                    hp.save_png = fn  # the module's figure functions look it up at call time
                    try:
                        c = time.process_time()
                        draw(Path(tmp) / f"{name}.{saver}.png")
                        if rep:
                            cpu.setdefault((name, saver), []).append(time.process_time() - c)
                    finally:
                        hp.save_png = savers["save_png"]
    out: dict = {"repeats": args.repeats, "load_avg_start": load_start, "figures": {}}
    total = dict.fromkeys(savers, 0.0)
    for name in figs:
        med = {s: statistics.median(cpu[(name, s)]) for s in savers}
        for s in savers:
            total[s] += med[s]
        out["figures"][name] = {**{f"{s}_cpu_s": round(v, 3) for s, v in med.items()},
                                "speedup": round(med["tight_savefig"] / med["save_png"], 2)}  # fmt: skip
    out["all_figures"] = {**{f"{s}_cpu_s": round(v, 3) for s, v in total.items()},
                          "speedup": round(total["tight_savefig"] / total["save_png"], 2)}  # fmt: skip
    out["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
