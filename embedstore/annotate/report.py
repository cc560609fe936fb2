"""The report of `embed annotate`: PNG figures and a Markdown summary beside the labels.

Per sample: clusters on a UMAP of up to `umap_cells` cells (a seeded subsample: UMAP of 100k
cells costs minutes) and a dot plot of the panel's markers per cluster. Over all samples: class
counts (kept / not kept), the confidence histogram with the 0.60 cut, and the kept share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from .recipe import AnnotateConfig, SampleResult, cluster_order  # noqa: E402


def _umap_png(res: SampleResult, path: Path, cfg: AnnotateConfig, umap_cells: int) -> Path | None:
    import scanpy as sc

    a = res.adata
    if a.n_obs < 20 or "leiden" not in a.obs:
        return None
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(a.n_obs, size=min(umap_cells, a.n_obs), replace=False))
    sub = a[idx].copy()
    sc.pp.neighbors(sub, n_neighbors=cfg.n_neighbors, n_pcs=sub.obsm["X_pca"].shape[1], random_state=cfg.seed)
    sc.tl.umap(sub, random_state=cfg.seed)
    xy = sub.obsm["X_umap"]
    names = {c: (n if n is not None else "unnamed") for c, n in zip(
        res.clusters["cluster"].str.split(":").list.last(), res.clusters["class"], strict=True)}  # fmt: skip
    groups = sub.obs["leiden"].astype(str).to_numpy()
    fig, ax = plt.subplots(figsize=(8, 6.5))
    cmap = plt.get_cmap("tab20")
    for k, g in enumerate(sorted(set(groups), key=cluster_order)):
        m = groups == g
        ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(k % 20), label=f"{g}: {names.get(g, '?')}", rasterized=True)
        cx, cy = np.median(xy[m], axis=0)
        ax.text(cx, cy, g, fontsize=9, weight="bold", ha="center", va="center")
    ax.set_title(f"{res.sample}: Leiden clusters (UMAP of {idx.size} of {a.n_obs} cells)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dotplot_png(res: SampleResult, panel: Mapping[str, Sequence[str]], path: Path) -> Path | None:
    import scanpy as sc

    a = res.adata
    if a.n_obs < 20 or "leiden" not in a.obs:
        return None
    genes = set(map(str, a.var_names))
    var_names = {c: [g for g in gs if g in genes] for c, gs in panel.items()}
    var_names = {c: gs for c, gs in var_names.items() if gs}
    names = dict(zip(res.clusters["cluster"].str.split(":").list.last(), res.clusters["class"], strict=True))
    a.obs["cluster_name"] = [f"{g} {names.get(g) or '(unnamed)'}" for g in a.obs["leiden"].astype(str)]
    order = sorted(set(a.obs["cluster_name"]), key=lambda s: cluster_order(s.split(" ")[0]))
    a.obs["cluster_name"] = a.obs["cluster_name"].astype("category").cat.reorder_categories(order)
    axes = sc.pl.dotplot(a, var_names, groupby="cluster_name", show=False, standard_scale="var")
    fig = axes["mainplot_ax"].figure
    fig.suptitle(f"{res.sample}: panel markers per cluster", y=1.02)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(
    frame: pl.DataFrame,
    results: Sequence[SampleResult],
    panel: Mapping[str, Sequence[str]],
    out_dir: str | Path,
    cfg: AnnotateConfig,
    *,
    umap_cells: int = 5000,
) -> Path:
    """Figures + report.md in `out_dir`; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, Path]] = []
    for res in results:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in res.sample)
        for title, fn in (("clusters", lambda r, p: _umap_png(r, p, cfg, umap_cells)),
                          ("markers", lambda r, p: _dotplot_png(r, panel, p))):  # fmt: skip
            p = fn(res, out / f"{safe}_{title}.png")
            if p is not None:
                figs.append((f"{res.sample}: {title}", p))

    labelled = frame.filter(pl.col("label").is_not_null())
    counts = labelled.group_by("label").agg(kept=pl.col("kept").sum(), not_kept=(~pl.col("kept")).sum()).sort("label")
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(counts.height, 4) + 1.2))
    y = np.arange(counts.height)
    ax.barh(y, counts["kept"], color="#2b8cbe", label=f"kept (confidence >= {cfg.min_confidence:.2f})")
    ax.barh(y, counts["not_kept"], left=counts["kept"], color="#bdbdbd", label="not kept")
    ax.set_yticks(y, counts["label"].to_list())
    ax.invert_yaxis()
    ax.set_xlabel("cells")
    ax.set_title("cells per class")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "class_counts.png", dpi=110)
    plt.close(fig)
    figs.append(("class counts", out / "class_counts.png"))

    conf = labelled["label_confidence"].drop_nulls().to_numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(conf, bins=40, range=(0, 1), color="#636363")
    ax.axvline(cfg.min_confidence, color="#e34a33", ls="--", label=f"kept >= {cfg.min_confidence:.2f}")
    ax.set_xlabel("label confidence (0.6 purity + 0.4 marker margin)")
    ax.set_ylabel("cells")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "confidence.png", dpi=110)
    plt.close(fig)
    figs.append(("confidence", out / "confidence.png"))

    n = frame.height
    lines = [
        "# Labels from Xenium expression",
        "",
        f"{n} cells in {len(results)} sample(s): {labelled.height} labelled "
        f"({labelled.height / max(n, 1):.1%}), {int(frame['kept'].sum())} kept ({frame['kept'].mean():.1%}); "
        f"{int((frame['n_counts'] < cfg.min_counts).sum())} cells had fewer than {cfg.min_counts} gene counts "
        "(not labelled).",
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in cfg.__dict__.items()),
        "",
    ]
    for res in results:
        lines += [f"## {res.sample}", ""]
        if res.missing_genes:
            lines += [f"Panel genes not in the matrix: {', '.join(res.missing_genes)}", ""]
        lines += ["| cluster | cells | class | best (score) | runner-up (score) | top markers |", "|---|---|---|---|---|---|"]
        for r in res.clusters.iter_rows(named=True):
            lines.append(
                f"| {r['cluster']} | {r['cells']} | {r['class'] or '**unnamed**'} | {r.get('best_class')} "
                f"({r.get('best_score', float('nan')):.2f}) | {r.get('second_class')} ({(r.get('second_score') or float('nan')):.2f}) "
                f"| {r.get('top_markers', '')} |"
            )
        lines.append("")
    lines += ["## Classes", "", "| class | kept | not kept |", "|---|---|---|"]
    lines += [f"| {r['label']} | {r['kept']} | {r['not_kept']} |" for r in counts.iter_rows(named=True)]
    lines += [""] + [f"![{t}]({p.name})" for t, p in figs] + [""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md
