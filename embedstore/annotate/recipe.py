"""Labels from Xenium expression: the paper's marker-guided recipe (METHOD.md, "Labels").

Per bundle (sample), with scanpy: cells with fewer than `min_counts` gene counts are not
labelled; the rest are normalised (total 1e4, log1p), projected (PCA 30), linked (kNN 15) and
clustered (Leiden, resolution 0.6); marker genes are ranked per cluster by Wilcoxon and by
logistic regression (mean rank, top 30).

Naming. Each gene is scaled over the sample's cells (z, clipped at 10); a class's score in a
cell is the mean z of its panel genes, each weighted by 1 / (number of panel classes listing
it), so markers two classes share count half and the genes that tell them apart decide. A
cluster takes the class whose mean score is highest when that score is at least
`min_class_score`, beats the runner-up by `name_margin`, and one of the class's genes is among
the cluster's ranked markers; otherwise it stays unnamed (label null): a cluster of a type no
panel class covers, or an ambiguous one, is not forced into a class. `--clusters` names clusters
by hand; a synonyms table maps names to final classes.

Confidence per cell (METHOD.md): 0.6 x neighbour purity (share of its 50 PCA-space neighbours
in its cluster; of its n - 1 nearest in a cluster of n <= 50, `neighbour_purity`) + 0.4 x marker margin (own class score minus the best other class's), robust
scaled to [0, 1] as clip(0.5 + 0.5 (m - median) / (3 MAD), 0, 1) over the sample's labelled
cells. A name from the synonyms table is scored as the panel class it renames (classes renamed
to one name are not each other's rivals); a class named by hand that no panel class has markers
for has no margin, and its purity stands in for it. `kept` = labelled and confidence >= 0.60.
A doublet carries two classes' markers, so its margin, hence its confidence, is low.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..errors import UserError
from ..io.cells import CellsError

GEX = "Gene Expression"
Log = Callable[[str], None]


@dataclass(frozen=True)
class AnnotateConfig:
    min_counts: int = 10  # gene counts a cell needs to be labelled
    target_sum: float = 1e4
    n_pcs: int = 30
    n_neighbors: int = 15
    resolution: float = 0.6
    top_markers: int = 30
    purity_neighbors: int = 50
    min_confidence: float = 0.60
    min_class_score: float = 0.5  # mean z of the winning class's markers in the cluster
    name_margin: float = 0.3  # over the runner-up class (z units)
    logreg_max_cells: int = 20_000  # logistic-regression ranking on a stratified subsample
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_counts < 0 or self.n_pcs < 2 or self.n_neighbors < 2 or self.purity_neighbors < 1:
            raise UserError(f"annotation settings out of range: {asdict(self)}")
        if not 0 <= self.min_confidence <= 1:
            raise UserError(f"min_confidence must be in [0, 1], got {self.min_confidence}")


# ----------------------------------------------------------------------------- inputs


def read_panel(path: str | Path) -> dict[str, list[str]]:
    """`class,gene` rows (one per marker) -> {class: [genes]}. Refuses a class with one gene."""
    from ..io.cells import read_table

    table = read_table(path)
    missing = [c for c in ("class", "gene") if c not in table.columns]
    if missing:
        raise UserError(f"{path}: the marker panel needs columns class,gene; it has {table.columns}")
    table = table.select(pl.col("class").cast(pl.Utf8).str.strip_chars(), pl.col("gene").cast(pl.Utf8).str.strip_chars())
    table = table.filter(pl.col("class").is_not_null() & pl.col("gene").is_not_null() & (pl.col("gene") != ""))
    if table.is_empty():
        raise UserError(f"{path}: the marker panel has no class,gene rows")
    panel: dict[str, list[str]] = {}
    for cls, gene in table.unique(maintain_order=True).iter_rows():
        panel.setdefault(cls, []).append(gene)
    single = {c: g for c, g in panel.items() if len(g) < 2}
    if single:
        shown = ", ".join(f"{c} ({g[0]})" for c, g in single.items())
        raise UserError(
            f"{path}: class(es) with a single marker gene: {shown}; give each class at least two "
            "markers, so that one noisy or ambient gene cannot name a cluster"
        )
    same: dict[frozenset[str], list[str]] = {}
    for cls, genes in panel.items():
        same.setdefault(frozenset(genes), []).append(cls)
    twins = [" and ".join(c) for c in same.values() if len(c) > 1]
    if twins:
        raise UserError(f"{path}: classes {'; '.join(twins)} have the same marker genes, so no cluster can be "
                        "named one rather than the other; give each a marker of its own, or merge them")  # fmt: skip
    return panel


def read_expression(root: str | Path) -> Any:
    """A bundle's feature matrix as AnnData (cells x 'Gene Expression' features, raw counts),
    with obs `n_counts` (gene counts) and `control_share` (share of the cell's counts on
    control probes, control codewords and unassigned codewords). Reads `cell_feature_matrix.h5`
    (10x HDF5) or the `cell_feature_matrix/` folder (MEX)."""
    import scanpy as sc

    root = Path(root)
    h5, mex = root / "cell_feature_matrix.h5", root / "cell_feature_matrix"
    try:
        if h5.exists():
            with warnings.catch_warnings():  # repeated names: said once, below
                warnings.filterwarnings("ignore", "Variable names are not unique")
                adata = sc.read_10x_h5(h5, gex_only=False)
        elif mex.is_dir():
            adata = sc.read_10x_mtx(mex, var_names="gene_symbols", gex_only=False, make_unique=True)
        else:
            raise CellsError(
                f"{root}: no feature matrix (cell_feature_matrix.h5 or cell_feature_matrix/): copy it "
                "from the original Xenium output bundle"
            )
    except CellsError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py/scipy errors on a damaged file
        raise CellsError(f"{root}: cannot read the feature matrix ({type(exc).__name__}: {exc})") from exc
    repeated = adata.var_names[adata.var_names.duplicated()].unique().tolist()
    if repeated:  # the MEX reader renames them already; the h5 reader would fail later
        adata.var_names_make_unique()
        warnings.warn(f"{root}: {len(repeated)} feature names repeat (e.g. {repeated[:3]}); later copies are "
                      f"read as NAME-1, NAME-2: a marker names the first copy only", stacklevel=2)  # fmt: skip
    types = adata.var["feature_types"].astype(str).to_numpy() if "feature_types" in adata.var else np.full(adata.n_vars, GEX)
    gex = types == GEX
    if not gex.any():
        raise CellsError(f"{root}: the feature matrix has no '{GEX}' features")
    counts = np.asarray(adata.X[:, gex].sum(axis=1)).ravel()
    control = np.asarray(adata.X[:, ~gex].sum(axis=1)).ravel() if (~gex).any() else np.zeros(adata.n_obs)
    out = adata[:, gex].copy()
    out.obs["n_counts"] = counts.astype(np.int64)
    total = counts + control
    out.obs["control_share"] = np.divide(control, total, out=np.zeros_like(total, dtype=float), where=total > 0)
    out.obs_names = out.obs_names.astype(str)
    return out


def read_cluster_map(path: str | Path) -> dict[str, str | None]:
    """`cluster,class` rows (cluster as SAMPLE:ID, or ID for one sample); empty class: unnamed."""
    from ..io.cells import read_table

    table = read_table(path)
    if not {"cluster", "class"} <= set(table.columns):
        raise UserError(f"{path}: the cluster map needs columns cluster,class; it has {table.columns}")
    return {str(k): (None if v is None or str(v).strip() == "" else str(v).strip())
            for k, v in table.select(pl.col("cluster").cast(pl.Utf8), pl.col("class").cast(pl.Utf8)).iter_rows()}  # fmt: skip


def read_synonyms(path: str | Path) -> dict[str, str | None]:
    """JSON {raw name: final class or null}, or a CSV with columns raw,class."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object {{raw name: class}}")
        return {str(k): (None if v is None else str(v)) for k, v in data.items()}
    from ..io.cells import read_table

    table = read_table(path)
    if not {"raw", "class"} <= set(table.columns):
        raise UserError(f"{path}: a synonyms CSV needs columns raw,class; it has {table.columns}")
    return {str(k): v for k, v in table.select(pl.col("raw").cast(pl.Utf8), pl.col("class").cast(pl.Utf8)).iter_rows()}


# ----------------------------------------------------------------------------- one sample


@dataclass
class SampleResult:
    """One bundle's labels (frame) plus what its report needs."""

    sample: str
    frame: pl.DataFrame
    clusters: pl.DataFrame  # cluster, cells, class, best/second score, top markers
    adata: Any  # the QC-passed cells, log-normalised, with obs leiden/label/confidence
    missing_genes: list[str]


def class_scores(adata: Any, panel: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """(cells x classes) marker scores: weighted mean z of each class's genes (module doc)."""
    genes = list(adata.var_names)
    col = {g: j for j, g in enumerate(genes)}
    classes = list(panel)
    listed: dict[str, int] = {}
    for gs in panel.values():
        for g in set(gs):
            listed[g] = listed.get(g, 0) + 1
    used = sorted({g for gs in panel.values() for g in gs if g in col})
    x = adata[:, used].X
    x = np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=np.float64)
    sd = x.std(axis=0)
    z = np.clip((x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0), -10, 10)
    zcol = {g: j for j, g in enumerate(used)}
    scores = np.zeros((adata.n_obs, len(classes)))
    for k, cls in enumerate(classes):
        gs = [g for g in panel[cls] if g in zcol]
        if gs:
            w = np.array([1.0 / listed[g] for g in gs])
            scores[:, k] = z[:, [zcol[g] for g in gs]] @ w / w.sum()
        else:
            scores[:, k] = -np.inf
    return scores, classes


def cluster_order(name: str) -> tuple[int, ...]:
    """Sort key of cluster names: "3" < "10", and "6" < "6,1" (a part split off cluster 6)."""
    return tuple(int(p) for p in str(name).split(","))


def _score_name(mean: np.ndarray, classes: Sequence[str], cfg: AnnotateConfig) -> str | None:
    order = np.argsort(-mean)
    gap = mean[order[0]] - (mean[order[1]] if len(order) > 1 else -np.inf)
    return classes[order[0]] if mean[order[0]] >= cfg.min_class_score and gap >= cfg.name_margin else None


def _split_mixed_clusters(adata: Any, scores: np.ndarray, classes: Sequence[str], cfg: AnnotateConfig) -> None:
    """Split off a rare type merged into a cluster of a type it shares most markers with.

    A cluster where a second class also scores high (mean >= `min_class_score`) is re-clustered
    on its own (Leiden at twice the resolution: scanpy's `restrict_to`) and its parts named by
    score. Only when parts get different classes is the cluster split, and then by class (parts
    with one name together; unnamed parts stay with the largest): re-clustering alone would
    fragment every cluster and lower every cell's neighbour purity."""
    import scanpy as sc

    if scores.shape[1] < 2:
        return
    groups = adata.obs["leiden"].astype(str).to_numpy()
    new = groups.astype(object).copy()
    for c in sorted(set(groups), key=cluster_order):
        rows = groups == c
        if rows.sum() < 4 * cfg.n_neighbors or np.sort(scores[rows].mean(axis=0))[-2] < cfg.min_class_score:
            continue
        sc.tl.leiden(adata, resolution=2 * cfg.resolution, restrict_to=("leiden", [c]), key_added="_sub",
                     flavor="igraph", n_iterations=2, directed=False, random_state=cfg.seed)  # fmt: skip
        sub = adata.obs.pop("_sub").astype(str).to_numpy()
        parts = {p: _score_name(scores[sub == p].mean(axis=0), classes, cfg) for p in set(sub[rows])}
        named = {n for n in parts.values() if n is not None}
        if len(named) < 2:
            continue
        size = {n: sum(int((sub == p).sum()) for p, m in parts.items() if m == n) for n in named}
        main = max(size, key=lambda n: (size[n], n))
        others = sorted(named - {main})
        for p, n in parts.items():
            new[sub == p] = c if n in (None, main) else f"{c},{others.index(n) + 1}"
    import pandas as pd

    adata.obs["leiden"] = pd.Categorical(new.astype(str))  # an array: assigned by position


def _ranked_markers(adata: Any, cfg: AnnotateConfig) -> dict[str, list[str]]:
    """Per cluster, the top genes by the mean of their Wilcoxon and logistic-regression ranks."""
    import scanpy as sc

    groups = adata.obs["leiden"]
    clusters = list(groups.cat.categories)
    if len(clusters) < 2:
        return {c: list(adata.var_names[: cfg.top_markers]) for c in clusters}
    sc.tl.rank_genes_groups(adata, "leiden", method="wilcoxon", key_added="wilcoxon", n_genes=adata.n_vars)
    sub = adata
    if adata.n_obs > cfg.logreg_max_cells:  # stratified subsample: logreg cost grows with cells
        rng = np.random.default_rng(cfg.seed)
        share = cfg.logreg_max_cells / adata.n_obs
        keep = np.zeros(adata.n_obs, bool)
        for c in clusters:
            idx = np.flatnonzero((groups == c).to_numpy())
            keep[rng.choice(idx, size=max(1, int(round(share * idx.size))), replace=False)] = True
        sub = adata[keep].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence: the ranking, not the fit, is used
        sc.tl.rank_genes_groups(sub, "leiden", method="logreg", key_added="logreg", n_genes=adata.n_vars,
                                max_iter=200, random_state=cfg.seed)  # fmt: skip
    out = {}
    for c in clusters:
        ranks: dict[str, list[int]] = {}
        for key, data in (("wilcoxon", adata), ("logreg", sub)):
            names = list(data.uns[key]["names"][c])
            for r, g in enumerate(names):
                ranks.setdefault(g, []).append(r)
        mean_rank = sorted(ranks, key=lambda g: (np.mean(ranks[g]), g))
        out[c] = mean_rank[: cfg.top_markers]
    return out


def neighbour_purity(x: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Per cell, the share of its k nearest neighbours (itself excluded) in its own cluster; in a
    cluster of n <= k cells, of its n - 1 nearest, so that a small, well separated cluster (a rare
    type that re-clustering split out) can be wholly pure. A cluster of one cell has purity 0."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n < 2:
        return np.zeros(n)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, nn = index.search(x, min(k + 1, n))
    same = np.cumsum(groups[nn[:, 1:]] == groups[:, None], axis=1)
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    k_cell = np.minimum(same.shape[1], sizes[inverse] - 1)
    out = np.zeros(n)
    has = k_cell > 0
    out[has] = same[has, k_cell[has] - 1] / k_cell[has]
    return out


def annotate_sample(
    adata: Any,
    panel: Mapping[str, Sequence[str]],
    cfg: AnnotateConfig,
    *,
    sample: str,
    cluster_map: Mapping[str, str | None] | None = None,
    synonyms: Mapping[str, str | None] | None = None,
) -> SampleResult:
    """Cluster, name and score the cells of one sample (see the module docstring).

    `adata`: raw counts with obs `n_counts` and `control_share` (as `read_expression` gives).
    Returns one row per cell: cell_id, label, label_confidence, kept, cluster, n_counts,
    control_share, marker_margin, purity.
    """
    import scanpy as sc

    genes = set(map(str, adata.var_names))
    missing = sorted({g for gs in panel.values() for g in gs} - genes)
    usable = {c: [g for g in gs if g in genes] for c, gs in panel.items()}
    if not any(usable.values()):
        raise UserError(
            f"{sample}: no gene of the marker panel is in the feature matrix ({adata.n_vars} genes, "
            f"e.g. {sorted(genes)[:5]}); check the gene names (symbols, case)"
        )
    qc = adata.obs["n_counts"].to_numpy() >= cfg.min_counts
    n = adata.n_obs
    label = np.full(n, None, dtype=object)
    confidence = np.full(n, np.nan)
    cluster = np.full(n, None, dtype=object)
    margin_raw = np.full(n, np.nan)
    purity = np.full(n, np.nan)
    cluster_rows: list[dict[str, Any]] = []
    a = adata[qc].copy()
    if a.n_obs >= max(cfg.n_neighbors + 1, 10):
        sc.pp.normalize_total(a, target_sum=cfg.target_sum)
        sc.pp.log1p(a)
        n_pcs = int(min(cfg.n_pcs, a.n_vars - 1, a.n_obs - 1))
        sc.pp.pca(a, n_comps=n_pcs, random_state=cfg.seed)
        sc.pp.neighbors(a, n_neighbors=cfg.n_neighbors, n_pcs=n_pcs, random_state=cfg.seed)
        sc.tl.leiden(a, resolution=cfg.resolution, flavor="igraph", n_iterations=2, directed=False,
                     random_state=cfg.seed)  # fmt: skip
        scores, classes = class_scores(a, usable)
        _split_mixed_clusters(a, scores, classes, cfg)
        markers = _ranked_markers(a, cfg)
        groups = a.obs["leiden"].astype(str).to_numpy()
        names: dict[str, str | None] = {}
        scored_as: dict[str, str | None] = {}  # the panel class whose markers a cluster's name stands for
        for c in sorted(set(groups), key=cluster_order):
            mean = scores[groups == c].mean(axis=0)
            order = np.argsort(-mean)
            best, second = order[0], (order[1] if len(order) > 1 else None)
            gap = mean[best] - (mean[second] if second is not None else -np.inf)
            cls = classes[best]
            has_marker = bool(set(usable[cls]) & set(markers[c]))
            named = cls if (mean[best] >= cfg.min_class_score and gap >= cfg.name_margin and has_marker) else None
            key = f"{sample}:{c}"
            if cluster_map is not None and (key in cluster_map or (c in cluster_map)):
                named = cluster_map.get(key, cluster_map.get(c))
            scored_as[c] = named if named in usable else None
            if named is not None and synonyms is not None and named in synonyms:
                named = synonyms[named]
            names[c] = named
            cluster_rows.append({
                "cluster": key, "cells": int((groups == c).sum()), "class": named,
                "best_class": cls, "best_score": float(mean[best]),
                "second_class": classes[second] if second is not None else None,
                "second_score": float(mean[second]) if second is not None else None,
                "top_markers": " ".join(markers[c][:10]),
            })  # fmt: skip
        lab = np.array([names[g] for g in groups], dtype=object)
        pur = neighbour_purity(a.obsm["X_pca"], groups, cfg.purity_neighbors)
        # marker margin: own class score minus the best score of a class with another final name
        # (a name given through --synonyms is scored as the panel class it renames)
        col = {c: j for j, c in enumerate(classes)}
        final = np.array([synonyms.get(c, c) if synonyms is not None else c for c in classes], dtype=object)
        rows = np.flatnonzero(lab != None)  # noqa: E711 - object array
        m = np.full(a.n_obs, np.nan)
        if rows.size:
            own = np.array([col.get(scored_as[groups[i]], -1) for i in rows])
            known = own >= 0
            s = scores[rows]
            own_s = np.where(known, s[np.arange(rows.size), own.clip(0)], np.nan)
            other = s.copy()
            for name in set(lab[rows]):
                other[np.ix_(lab[rows] == name, final == name)] = -np.inf
            other[np.arange(rows.size), own.clip(0)] = -np.inf
            m[rows] = np.where(known, own_s - other.max(axis=1), np.nan)
        scaled = robust_scale(m)
        # a class without panel markers (named by hand) has no margin: its purity stands in
        conf = 0.6 * pur + 0.4 * np.where(np.isnan(scaled), pur, scaled)
        conf = np.where(lab != None, conf, np.nan)  # noqa: E711
        qc_rows = np.flatnonzero(qc)
        label[qc_rows], cluster[qc_rows] = lab, np.array([f"{sample}:{g}" for g in groups], dtype=object)
        confidence[qc_rows], margin_raw[qc_rows], purity[qc_rows] = conf, m, pur
        a.obs["label"] = lab
        a.obs["confidence"] = conf
    kept = np.array([lbl is not None for lbl in label]) & (np.nan_to_num(confidence, nan=-1) >= cfg.min_confidence)
    frame = pl.DataFrame({
        "cell_id": pl.Series(list(map(str, adata.obs_names)), dtype=pl.Utf8),
        "label": pl.Series(label.tolist(), dtype=pl.Utf8),
        "label_confidence": pl.Series(confidence).fill_nan(None),
        "kept": kept,
        "cluster": pl.Series(cluster.tolist(), dtype=pl.Utf8),
        "n_counts": adata.obs["n_counts"].to_numpy().astype(np.int64),
        "control_share": adata.obs["control_share"].to_numpy().astype(np.float64),
        "marker_margin": pl.Series(margin_raw).fill_nan(None),
        "purity": pl.Series(purity).fill_nan(None),
    })  # fmt: skip
    clusters = pl.DataFrame(cluster_rows) if cluster_rows else pl.DataFrame(
        schema={"cluster": pl.Utf8, "cells": pl.Int64, "class": pl.Utf8})
    return SampleResult(sample, frame, clusters, a, missing)


def robust_scale(m: np.ndarray) -> np.ndarray:
    """clip(0.5 + 0.5 (m - median) / (3 MAD), 0, 1) over the finite values (NaN stays NaN)."""
    finite = np.isfinite(m)
    out = np.full(m.shape, np.nan)
    if not finite.any():
        return out
    med = float(np.median(m[finite]))
    mad = float(np.median(np.abs(m[finite] - med)))
    if mad == 0:
        out[finite] = 0.5
        return out
    out[finite] = np.clip(0.5 + 0.5 * (m[finite] - med) / (3 * mad), 0, 1)
    return out


# ----------------------------------------------------------------------------- bundles


def find_bundles(paths: Sequence[str | Path]) -> list[Path]:
    """Bundle directories: each path is a bundle (has cells.parquet/csv.gz) or holds bundles."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p}: not a directory (give Xenium output bundles or a folder of them)")
        if any((p / n).exists() for n in ("cells.parquet", "cells.csv.gz", "cells.csv")):
            out.append(p)
        else:
            kids = sorted(k for k in p.iterdir() if k.is_dir() and any((k / n).exists() for n in ("cells.parquet", "cells.csv.gz", "cells.csv")))
            if not kids:
                raise UserError(f"{p}: neither a Xenium bundle (no cells.parquet/cells.csv.gz) nor a folder of bundles")
            out += kids
    return out


@dataclass(frozen=True)
class Placement:
    """Where one bundle's cells go on its H&E slide (the options of `embed cells` for one
    bundle). `positions=False` labels the cells without H&E positions."""

    slide: str | Path | None = None
    alignment: str | Path | None = None
    slide_id: str | None = None
    mpp: float | None = None
    invert_alignment: bool = False
    positions: bool = True

    def __post_init__(self) -> None:
        if not self.positions and (self.slide is not None or self.alignment is not None):
            raise UserError("--no-positions labels cells without the H&E: drop --slide/--alignment, or --no-positions")

    def one_bundle_options(self) -> list[str]:
        given = {"--slide": self.slide, "--alignment": self.alignment, "--slide-id": self.slide_id}
        return [opt for opt, value in given.items() if value is not None]


def _he_positions(root: Path, bundle: Any, place: Placement, log: Log) -> tuple[str, pl.DataFrame | None]:
    """The slide id of a bundle's labels and its cells' H&E positions (None without them).

    A bundle with its H&E image and alignment is placed as `embed cells` places it, and a broken
    alignment fails here as it would there: labels filed under a made-up slide id would match
    no stored cell. Without the H&E or its alignment the folder name is the slide id, said."""
    from ..io.ingest import ingest_xenium

    if not place.positions:
        return place.slide_id or root.name, None
    if bundle.he_image is None or bundle.alignment_path is None:
        sid = place.slide_id or root.name
        what = "H&E image (*he_image*)" if bundle.he_image is None else "H&E alignment (*he_imagealignment.csv)"
        log(f"warning: {root.name}: no {what}: its labels carry no H&E position and the slide id {sid!r}; "
            "pass --slide/--alignment to place them (or --no-positions, with --slide-id naming the store's slide)")  # fmt: skip
        return sid, None
    positions, report = ingest_xenium(root, slide=bundle.he_image, alignment=bundle.alignment_path,
                                      slide_id=place.slide_id, mpp=place.mpp, tissue=bundle.tissue or "unknown",
                                      invert_alignment=place.invert_alignment)  # fmt: skip
    sid = str(positions["slide_id"][0])  # named as `embed cells` names it (never empty: it refuses that)
    lost = report.n_in - report.n_out
    if lost:
        why = ", ".join(f"{n} {reason}" for reason, n in report.dropped.items())
        log(f"warning: {root.name}: {lost} of {report.n_in} cells have no H&E position ({why}); "
            "they are labelled with empty x/y and cannot be matched to stored vectors")  # fmt: skip
    return sid, positions


def annotate_bundle(
    root: str | Path,
    panel: Mapping[str, Sequence[str]],
    cfg: AnnotateConfig,
    *,
    place: Placement | None = None,
    cluster_map: Mapping[str, str | None] | None = None,
    synonyms: Mapping[str, str | None] | None = None,
    log: Log = lambda m: None,
) -> SampleResult:
    """One Xenium bundle -> labels with slide_id and (when the bundle has its H&E and
    alignment, or `place` gives them) the registered H&E position of each cell."""
    from ..io import xenium as X

    root = Path(root)
    place = place or Placement()
    bundle = X.open_bundle(root, alignment=place.alignment, he_image=place.slide)
    cells = X.read_xenium_cells(bundle)
    adata = read_expression(root)
    ids = set(adata.obs_names)
    common = [c for c in cells["cell_id"].to_list() if c in ids]
    if not common:
        raise CellsError(
            f"{root}: none of the {cells.height} cell ids of {bundle.cells_path.name} (e.g. "
            f"{cells['cell_id'].head(2).to_list()}) is in the feature matrix (e.g. {list(adata.obs_names[:2])}); "
            "the matrix belongs to another run, or ids were rewritten"
        )
    if len(common) < cells.height or len(common) < adata.n_obs:
        log(f"{root.name}: {len(common)} cells in both cells table ({cells.height}) and matrix ({adata.n_obs}); the rest are skipped")
    adata = adata[common].copy()
    sample, positions = _he_positions(root, bundle, place, log)
    result = annotate_sample(adata, panel, cfg, sample=sample, cluster_map=cluster_map, synonyms=synonyms)
    frame = result.frame.with_columns(slide_id=pl.lit(sample), sample=pl.lit(root.name))
    if positions is not None:
        frame = frame.join(positions.select("cell_id", "x_px", "y_px", "x_um", "y_um"), on="cell_id", how="left")
    result.frame = frame.select("slide_id", "cell_id", *[c for c in frame.columns if c not in ("slide_id", "cell_id")])
    return result


def annotate(
    bundles: Sequence[str | Path],
    panel_path: str | Path,
    cfg: AnnotateConfig | None = None,
    *,
    clusters: str | Path | None = None,
    synonyms: str | Path | None = None,
    place: Placement | None = None,
    log: Log = lambda m: None,
) -> tuple[pl.DataFrame, list[SampleResult]]:
    """Every bundle's labels in one frame (see `annotate_bundle`), plus per-sample results.
    `place` (slide, alignment, slide id) belongs to one bundle and is refused for several."""
    cfg = cfg or AnnotateConfig()
    roots = find_bundles(bundles)
    given = place.one_bundle_options() if place is not None else []
    if given and len(roots) > 1:
        raise UserError(f"{', '.join(given)} belong(s) to one bundle, and {len(roots)} bundles were given: "
                        "annotate that bundle alone with it")  # fmt: skip
    panel = read_panel(panel_path)
    cmap = read_cluster_map(clusters) if clusters else None
    bare = [k for k in cmap or {} if ":" not in k]
    if bare and len(roots) > 1:
        raise UserError(f"{clusters}: cluster {bare[0]!r} names no sample, and {len(roots)} bundles were given: "
                        "write each cluster as SAMPLE:ID, as the report and the labels' cluster column do")  # fmt: skip
    syn = read_synonyms(synonyms) if synonyms else None
    results = []
    for root in roots:
        res = annotate_bundle(root, panel, cfg, place=place, cluster_map=cmap, synonyms=syn, log=log)
        if res.missing_genes:
            log(f"warning: {root.name}: panel genes not in the matrix: {', '.join(res.missing_genes)}")
        kept = int(res.frame["kept"].sum())
        log(f"{root.name}: {res.frame.height} cells, {res.clusters.height} clusters "
            f"({res.clusters['class'].null_count()} unnamed), {kept} kept ({kept / max(res.frame.height, 1):.0%})")  # fmt: skip
        results.append(res)
    if cmap:
        found = {k for r in results for k in r.clusters["cluster"].to_list()}
        unused = [k for k in cmap if k not in found and not any(f.endswith(f":{k}") for f in found)]
        if unused:
            log(f"warning: {clusters}: {len(unused)} of its clusters {'is' if len(unused) == 1 else 'are'} not among the clusters found "
                f"(e.g. {unused[:3]}), so they named nothing; clusters are SAMPLE:ID as in the report")  # fmt: skip
    frame = pl.concat([r.frame for r in results], how="diagonal_relaxed")
    dup = frame.group_by("slide_id", "cell_id").len().filter(pl.col("len") > 1)
    if dup.height:
        raise UserError(f"{dup.height} (slide_id, cell_id) pairs occur in more than one bundle (e.g. {dup.row(0)[:2]}): the same sample twice?")
    return frame, results
