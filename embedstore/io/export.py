"""Export stored cells to AnnData (.h5ad), SpatialData (.zarr) or CSV, for scanpy/squidpy users.

AnnData layout (one row per stored cell, in store order):

- `obs_names`: "slide_id:cell_id" (unique). `X` is None (`n_vars` = 0): the vectors are
  embeddings, not measured features, so they go to `obsm` like any other representation
  (`sc.pp.neighbors(adata, use_rep="X_local")`, `sc.tl.umap`, `sc.tl.leiden` work as usual).
- `obs`: slide_id, cell_id, x_px, y_px, x_um, y_um, tissue, run_id (the extraction run that
  stored the cell); label, label_confidence, split when the store has labels; and, when a heads
  run's predictions are exported, that run's columns as written by `heads predict`:
  pred_class, pred_confidence, pred_source, local_class, local_confidence, global_class,
  global_confidence, gate, safety_class, conformal_set, set_size (columns null for every cell
  are left out; cells the run did not predict are NaN/missing). Text columns other than cell_id
  are categorical; class columns have the run's classes as categories, in the run's order
  (when they are known: class_0, class_1... placeholders are no category).
- `obsm["X_local"]`, `obsm["X_context"]`: float32 (n, dim), one per exported vector kind.
- `obsm["spatial"]`: (x_um, y_um) float64, in µm. squidpy takes `spatial` in whatever unit it
  is given (Visium keeps full-resolution pixels plus scale factors to overlay its images; the
  Xenium readers keep µm). No image is exported and slides differ in µm/px, so µm keeps radii
  and distances (`sq.gr.spatial_neighbors(adata, radius=..., library_key="slide_id")`)
  comparable across slides; pixels stay in obs for overlays on the slide.
- `obsm["proba"]`: float32 (n, n_classes) class probabilities of the exported run (the ones
  behind pred_class), columns in `uns["nuclass"]["predictions"]["classes"]` order. One run per
  export, so the key does not depend on the run's name; the run is named in uns.
- `uns["nuclass"]`: provenance as h5ad-writable nested dicts of strings/numbers: store,
  table, table_version, exported_at (UTC), package_version, vectors (obsm key, dim, backbone,
  weights_sha256 per kind), vector_config (the table's full config), extraction_runs,
  predictions (run, classes, classes_source, cells), coordinates. None values are left out;
  lists that h5ad cannot hold (e.g. of dicts) are JSON text.

Which run: `run`, else the run of `run_dir` (the folder's name), else the only run in the
store's predictions table (none: no prediction columns; several: `run` must be given). A run
given by name must have predicted some of the exported cells.

Class names: the predictions table stores probabilities without names (the class order is in
the run's checkpoint, RUN_DIR/local.json). With `run_dir` they come from there; otherwise they
are read off the stored predictions (the name of each probability column is the pred_class of
the cells where it is the largest), which names every class the run predicted at least once;
when that fails they are class_0, class_1, ... and `classes_source` says so.

SpatialData (optional extra `spatialdata`): per slide, a shapes element `cells_<slide>` of
circles (centre in µm, a nominal radius: the store holds no nucleus outline) in that slide's own
coordinate system (named after the slide, identity transform: µm), plus the AnnData above as
table `cells`, annotating them (region column `region`, instance key `cell_id`).

CSV: the obs columns, `prob_<class>` per class when predictions are exported and, with
`with_vectors`, `<kind>_0 ..` per vector dimension.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ..errors import UserError
from ..fileio import atomic_path, ensure_dir, unique_names
from ..store import DEFAULT_TABLE, PREDICTION_COLUMNS, VECTOR_KINDS, Store, StoreError

if TYPE_CHECKING:
    import anndata

#: output suffix -> format
SUFFIXES = {".h5ad": "anndata", ".zarr": "spatialdata", ".csv": "csv"}
FORMATS = {fmt: suffix for suffix, fmt in SUFFIXES.items()}
#: prediction columns always kept (the others are dropped when null for every cell)
PRED_REQUIRED = ("pred_class", "pred_confidence")
PRED_COLUMNS = [c for c in PREDICTION_COLUMNS if c not in ("run", "slide_id", "cell_id")]
CLASS_COLUMNS = ("label", "pred_class", "local_class", "global_class", "safety_class")
#: `classes_source` of class names that are only placeholders (class_0, class_1, ...)
UNKNOWN_CLASSES = "unknown"
#: nominal circle radius of a cell in the SpatialData export (µm): about a nucleus
DEFAULT_RADIUS_UM = 5.0
SPATIALDATA_HINT = "install it with `pip install 'nuclass-embedstore[spatialdata]'` (or `pip install spatialdata`)"


@dataclass
class CellExport:
    """What every format writes: one obs row per cell, vectors and probabilities in that order."""

    obs: pl.DataFrame
    vectors: dict[str, np.ndarray]
    proba: np.ndarray | None
    classes: list[str]
    provenance: dict[str, Any]


# -- collecting ---------------------------------------------------------------------------------
def collect(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    run: str | None = None,
    run_dir: str | Path | None = None,
    slides: Sequence[str] | None = None,
    vectors: Sequence[str] = VECTOR_KINDS,
) -> CellExport:
    """Cells of `table` (optionally some slides) with labels and one heads run's predictions."""
    store = Store(db)
    vectors = tuple(dict.fromkeys(vectors))  # "--vectors local,local" is local once
    loaded = store.load(table, slides=list(slides) if slides else None, vectors=vectors)
    meta = loaded.meta
    _check_cells(meta, table, slides)
    if run is None and run_dir is not None:  # --run-dir alone: the run of that folder
        run = Path(run_dir).resolve().name
    chosen = resolve_run(store, run)
    proba, classes, pred_info = None, [], None
    if chosen is not None:
        joined = _join_predictions(store, meta, chosen, run_dir)
        if joined is None and run is not None:
            raise UserError(f"run {run!r} predicted none of the exported cells of table {table!r}; run `heads predict` on them")
        if joined is not None:  # the only stored run, if it predicted none of these: no predictions
            meta, proba, classes, pred_info = joined
    provenance = _provenance(store, loaded.config, table, loaded.version, meta, vectors, pred_info)
    return CellExport(meta, loaded.vectors, proba, classes, provenance)


def _check_cells(meta: pl.DataFrame, table: str, slides: Sequence[str] | None) -> None:
    if slides:
        missing = sorted(set(slides) - set(meta["slide_id"].unique().to_list()))
        if missing:
            raise UserError(f"table {table!r} holds no cells of slide(s) {missing}; see `embed info`")
    if meta.height == 0:
        raise UserError(f"table {table!r} holds no cells to export")
    dup = meta.select("slide_id", "cell_id").is_duplicated()
    if dup.any():
        raise UserError(
            f"table {table!r} holds {int(dup.sum())} rows whose (slide_id, cell_id) is stored twice; "
            "rerun `embed extract` on the same slides (it removes the extra copies), then export"
        )


def stored_runs(store: Store) -> list[str]:
    if not store.has("predictions"):
        return []
    runs = store.db.open_table("predictions").to_lance().to_table(columns=["run"])
    return sorted(pl.from_arrow(runs)["run"].unique().to_list())


def resolve_run(store: Store, run: str | None) -> str | None:
    """The heads run to export: `run`, else the only run with stored predictions, else none."""
    runs = stored_runs(store)
    if run is None:
        if len(runs) > 1:
            raise UserError(f"the store holds predictions of {len(runs)} runs ({', '.join(runs)}); pick one with --run")
        return runs[0] if runs else None
    if run not in runs:
        have = f"runs with predictions: {', '.join(runs)}" if runs else "it holds no predictions yet"
        raise UserError(f"{store.uri}: no predictions of run {run!r} ({have}); run `heads predict --run RUN_DIR --db {store.uri}`")
    return run


def _join_predictions(
    store: Store, meta: pl.DataFrame, run: str, run_dir: str | Path | None
) -> tuple[pl.DataFrame, np.ndarray, list[str], dict[str, Any]] | None:
    """Predictions of `run` joined to the cells by key (never by position); None when the run
    predicted none of them. With `run_dir`, only the rows that run folder itself made (its
    digest): another folder of the same name, or the run before a retraining, never slips in."""
    if run_dir is not None:
        from heads.checkpoint import read_info
        from heads.export import run_predictions

        if Path(run_dir).resolve().name != run:
            raise UserError(f"--run-dir {run_dir} is run {Path(run_dir).resolve().name!r}, not the run {run!r} exported")
        preds = run_predictions(store.uri, run_dir, read_info(run_dir, "local")["classes"],
                                log=lambda m: warnings.warn(m.removeprefix("warning: "), stacklevel=2))  # fmt: skip
    else:
        preds = store.predictions(run)
    cols = [c for c in PRED_COLUMNS if c in preds.columns]
    made_by = ["run_digest", "run_dir"] if run_dir is None and "run_digest" in preds.columns else []
    joined = meta.join(
        preds.select("slide_id", "cell_id", *cols, "proba", *made_by), on=["slide_id", "cell_id"], how="left",
        maintain_order="left",
    )  # fmt: skip
    has = joined["proba"].is_not_null()
    n_pred = int(has.sum())
    if n_pred == 0:
        return None
    # the exported cells' own predictions say the class names: rows of this name on cells not
    # exported (another table's, a run of the same name) may hold other classes
    mine = joined.filter(has)
    if made_by:
        _check_one_run_folder(mine, run)
        joined = joined.drop(made_by)
    width = mine["proba"].list.len().unique().to_list()
    if len(width) != 1:
        raise StoreError(f"predictions of run {run!r} have probability lists of lengths {width}; rerun `heads predict`")
    k = int(width[0])
    classes, source = run_classes(run_dir, mine, k)
    proba = np.full((joined.height, k), np.nan, dtype=np.float32)
    proba[has.to_numpy()] = joined["proba"].filter(has).list.to_array(k).to_numpy().astype(np.float32, copy=False)
    keep = [c for c in cols if c in PRED_REQUIRED or joined[c].null_count() < joined.height]
    joined = joined.drop([c for c in cols if c not in keep] + ["proba"])
    info = {"run": run, "classes": classes, "classes_source": source, "cells": n_pred,
            "cells_without": joined.height - n_pred, "obsm_key": "proba"}  # fmt: skip
    if run_dir is not None:
        info["run_dir"] = str(Path(run_dir).resolve())
    return joined, proba, classes, info


def _check_one_run_folder(rows: pl.DataFrame, run: str) -> None:
    """Refuse exported cells whose predictions named `run` several run folders made (runs named
    alike, or one retrained between two predicts): their classes would be mixed in one column."""
    made = rows.filter(pl.col("run_digest").is_not_null()).unique("run_digest")
    if made.height > 1:
        folders = ", ".join(sorted(set(made["run_dir"].drop_nulls().to_list()))) or "not recorded"
        raise UserError(f"the exported cells' predictions named {run!r} were made by {made.height} different runs "
                        f"(run folders: {folders}: runs named alike, or one retrained between predicts): pass --run-dir RUN "
                        "to export that run's, or predict every slide again with one run")  # fmt: skip


def run_classes(run_dir: str | Path | None, preds: pl.DataFrame, k: int) -> tuple[list[str], str]:
    """The run's class names in probability order, and where they came from."""
    if run_dir is not None:
        from heads import checkpoint

        classes = [str(c) for c in checkpoint.read_info(run_dir, "local")["classes"]]
        if len(classes) != k:
            raise UserError(f"{run_dir} has {len(classes)} classes but the stored predictions have {k} probabilities: another run?")
        _check_names(classes, preds, run_dir)
        return classes, f"checkpoint {Path(run_dir) / 'local.json'}"
    named = _classes_from_argmax(preds, k)
    if named is not None:
        return named, "stored predictions (pred_class of each probability's argmax)"
    return [f"class_{i}" for i in range(k)], f"{UNKNOWN_CLASSES}: some class was never predicted; pass --run-dir for the names"


def _check_names(classes: list[str], preds: pl.DataFrame, run_dir: str | Path) -> None:
    """Refuse a checkpoint whose class order does not name the stored predictions: each cell's
    pred_class must be a class of its highest probability (ties allowed)."""
    rows = preds.filter(pl.col("proba").is_not_null() & pl.col("pred_class").is_not_null())
    if rows.height == 0:
        return
    proba = rows["proba"].list.to_array(len(classes)).to_numpy()
    col = {c: i for i, c in enumerate(classes)}
    idx = np.array([col.get(c, -1) for c in rows["pred_class"].to_list()])
    ok = (idx >= 0) & (proba[np.arange(rows.height), idx.clip(0)] >= proba.max(axis=1) - 1e-6)
    if not ok.all():
        bad = rows.filter(pl.Series(~ok))["pred_class"].head(3).to_list()
        raise UserError(f"{run_dir}: its classes {classes[:6]} do not name the stored predictions ({int((~ok).sum())} "
                        f"of {rows.height} cells, e.g. predicted {bad}, have their highest probability elsewhere): "
                        "the checkpoint of another run?")  # fmt: skip


def _classes_from_argmax(preds: pl.DataFrame, k: int) -> list[str] | None:
    rows = preds.filter(pl.col("proba").is_not_null() & pl.col("pred_class").is_not_null())
    if rows.height == 0:
        return None
    idx = rows["proba"].list.to_array(k).to_numpy().argmax(axis=1)
    pairs = pl.DataFrame({"i": idx, "c": rows["pred_class"]}).unique()
    if pairs.height != k or pairs["i"].n_unique() != k or pairs["c"].n_unique() != k:
        return None  # a class never predicted, or ties that map one index to two names
    return pairs.sort("i")["c"].to_list()


# -- provenance ---------------------------------------------------------------------------------
def _provenance(
    store: Store, config: dict, table: str, version: int, meta: pl.DataFrame,
    vectors: Sequence[str], predictions: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    vec_cfg = config.get("vectors", {})
    out: dict[str, Any] = {
        "store": str(Path(store.uri).resolve()) if store.local else store.uri,
        "table": table,
        "table_version": int(version),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "package_version": package_version(),
        "vectors": {
            v: {"obsm_key": f"X_{v}", **{k: vec_cfg.get(v, {}).get(k) for k in ("dim", "backbone", "weights_sha256")}}
            for v in vectors
        },
        "vector_config": config,
        "extraction_runs": _extraction_runs(store, meta),
        "coordinates": {"spatial": "x_um, y_um (µm)", "pixels": "x_px, y_px in obs (level-0 pixels of each slide)"},
    }
    if predictions is not None:
        out["predictions"] = predictions
    return h5ad_safe(out)


def _extraction_runs(store: Store, meta: pl.DataFrame) -> dict[str, Any]:
    if "run_id" not in meta.columns:
        return {}
    ids = set(meta["run_id"].drop_nulls().unique().to_list())
    runs = store.runs()
    if runs.height == 0:
        return {r: {} for r in sorted(ids)}
    keep = [c for c in ("run_id", "status", "started", "finished", "code_version", "host", "device") if c in runs.columns]
    rows = runs.filter(pl.col("run_id").is_in(sorted(ids))).select(keep).to_dicts()
    unfinished = [f"{r['run_id']} ({r['status']})" for r in rows if r.get("status") in ("running", "interrupted")]
    if unfinished:  # killed mid-slide: its last slide holds only part of its cells
        warnings.warn(f"cells of extraction run(s) that did not finish: {', '.join(unfinished)}; their slides may be "
                      "incomplete: rerun `embed extract` with the same arguments to finish them, then export again",
                      stacklevel=2)  # fmt: skip
    return {r.pop("run_id"): r for r in rows}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nuclass-embedstore")
    except PackageNotFoundError:
        return "unknown"


def h5ad_safe(value: Any) -> Any:
    """`value` as what h5ad/zarr can store in uns: dicts of str/number/bool/homogeneous lists;
    None is dropped, other lists (mixed, nested, of dicts) become JSON text."""
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        items = list(value)
        if items and (all(isinstance(v, str) for v in items) or all(_is_number(v) for v in items)):
            return items
        return json.dumps(items, sort_keys=True, default=str)
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    return str(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# -- AnnData ------------------------------------------------------------------------------------
def to_anndata(
    db: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    run: str | None = None,
    run_dir: str | Path | None = None,
    slides: Sequence[str] | None = None,
    vectors: Sequence[str] = VECTOR_KINDS,
) -> anndata.AnnData:
    """Stored cells as AnnData (layout in the module docstring); vectors loaded once, as float32,
    and handed to anndata without another copy."""
    cells = collect(db, table=table, run=run, run_dir=run_dir, slides=slides, vectors=vectors)
    return cells_to_anndata(cells)


def cells_to_anndata(cells: CellExport) -> anndata.AnnData:
    import anndata as ad

    source = cells.provenance.get("predictions", {}).get("classes_source", "")
    named = [] if source.startswith(UNKNOWN_CLASSES) else cells.classes  # class_0..: no class's name
    obs = _obs_frame(cells.obs, named)
    obsm: dict[str, np.ndarray] = {f"X_{k}": v for k, v in cells.vectors.items()}
    obsm["spatial"] = np.column_stack([cells.obs["x_um"].to_numpy(), cells.obs["y_um"].to_numpy()]).astype(np.float64)
    if cells.proba is not None:
        obsm["proba"] = cells.proba
    return ad.AnnData(obs=obs, obsm=obsm, uns={"nuclass": cells.provenance})


def _obs_frame(meta: pl.DataFrame, classes: list[str]):
    """obs as pandas: text columns categorical (class columns with the run's classes first)."""
    import pandas as pd

    obs = meta.to_pandas()
    for col in obs.columns:
        if col == "cell_id" or meta.schema[col] != pl.String:
            continue
        cats = sorted(obs[col].dropna().unique())
        if col in CLASS_COLUMNS and classes:
            cats = classes + [c for c in cats if c not in classes]
        obs[col] = pd.Categorical(obs[col], categories=cats)
    obs.index = pd.Index(_obs_names(meta), dtype=object)
    return obs


def _obs_names(meta: pl.DataFrame) -> list[str]:
    """"slide_id:cell_id", unique: ids holding ":" can make two cells' names alike ("a:b" + "c"
    and "a" + "b:c"); a repeat then gets "-1", "-2"... (as AnnData's obs_names_make_unique),
    with a warning. The slide_id and cell_id columns keep the true keys."""
    names = (meta["slide_id"] + ":" + meta["cell_id"]).to_list()
    if len(set(names)) == len(names):
        return names
    taken, seen, out = set(names), {}, []
    for name in names:
        if name not in seen:
            seen[name] = 0
            out.append(name)
            continue
        while True:
            seen[name] += 1
            candidate = f"{name}-{seen[name]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        out.append(candidate)
    clashes = sorted(n for n, k in seen.items() if k)
    warnings.warn(f"{len(clashes)} obs name(s) \"slide_id:cell_id\" were alike for different cells (ids holding "
                  f"':'; e.g. {clashes[0]!r}): repeats got -1, -2...; the slide_id and cell_id columns are exact",
                  stacklevel=2)  # fmt: skip
    return out


def write_anndata(adata: anndata.AnnData, path: str | Path) -> Path:
    """Write .h5ad atomically (a temporary file in the same folder, renamed when complete)."""
    path = check_suffix(path, "anndata")
    with atomic_path(path) as tmp:
        # cell_id stays text: anndata would make it categorical wherever ids repeat across slides
        adata.write_h5ad(tmp, convert_strings_to_categoricals=False)
    return path


# -- CSV ----------------------------------------------------------------------------------------
def write_csv(
    db: str | Path,
    path: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    run: str | None = None,
    run_dir: str | Path | None = None,
    slides: Sequence[str] | None = None,
    vectors: Sequence[str] = VECTOR_KINDS,
    with_vectors: bool = False,
) -> CellExport:
    """The obs columns (+ prob_<class>, + `<kind>_<i>` with `with_vectors`) as CSV, atomically."""
    path = check_suffix(path, "csv")
    cells = collect(db, table=table, run=run, run_dir=run_dir, slides=slides, vectors=vectors if with_vectors else ())
    write_cells_csv(cells, path)
    return cells


def write_cells_csv(cells: CellExport, path: str | Path) -> Path:
    """Missing values are empty fields throughout: a cell the run did not predict has empty
    probabilities (NaN in the h5ad's matrix), as it has an empty pred_class."""
    frame = cells.obs
    if cells.proba is not None:
        proba = _matrix_frame(cells.proba, [f"prob_{c}" for c in cells.classes])
        frame = frame.hstack(proba.with_columns(pl.all().fill_nan(None)))
    for kind, vec in cells.vectors.items():
        frame = frame.hstack(_matrix_frame(vec, [f"{kind}_{i}" for i in range(vec.shape[1])]))
    with atomic_path(path) as tmp:
        frame.write_csv(tmp)
    return Path(path)


def _matrix_frame(values: np.ndarray, names: list[str]) -> pl.DataFrame:
    return pl.DataFrame({n: values[:, i] for i, n in enumerate(names)})


# -- SpatialData --------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Hide spatialdata's dependencies' notices about their own next releases (one per array)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ome_zarr")
        warnings.filterwarnings("ignore", category=FutureWarning, module="(spatialdata|dask|anndata|xarray)")
        yield


def _spatialdata():
    try:
        with _quiet_zarr():
            import spatialdata
    except ImportError as exc:
        raise UserError(f"the SpatialData export needs the `spatialdata` package ({exc}); {SPATIALDATA_HINT}") from None
    return spatialdata


def write_spatialdata(adata: anndata.AnnData, path: str | Path, *, radius_um: float = DEFAULT_RADIUS_UM) -> Path:
    """A SpatialData zarr: per slide, circles at the cells (µm, own coordinate system), and
    `adata` as table `cells` annotating them. Written to a temporary folder, then renamed."""
    path = check_suffix(path, "spatialdata")
    sdata = to_spatialdata(adata, radius_um=radius_um)
    with _atomic_dir(path) as tmp, _quiet_zarr():
        sdata.write(tmp)
    return path


def to_spatialdata(adata: anndata.AnnData, *, radius_um: float = DEFAULT_RADIUS_UM):
    """The SpatialData object of `write_spatialdata` (`adata` itself is not changed)."""
    import anndata as ad

    sd = _spatialdata()
    from spatialdata.models import TableModel

    names = element_names(adata.obs["slide_id"].astype(str).unique().tolist())
    shapes = {names[s]: _circles(sd, adata, s, coordinate_system(names[s]), radius_um) for s in names}
    obs = adata.obs.copy()
    obs["region"] = obs["slide_id"].astype(str).map(names).astype("category")
    table = ad.AnnData(obs=obs, obsm=dict(adata.obsm), uns=dict(adata.uns))  # shares the arrays
    table = TableModel.parse(table, region=list(names.values()), region_key="region", instance_key="cell_id")
    return sd.SpatialData(shapes=shapes, tables={"cells": table})


def _circles(sd, adata: anndata.AnnData, slide: str, system: str, radius_um: float):
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    obs = adata.obs[adata.obs["slide_id"].astype(str) == slide]
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(obs), float(radius_um))},
        geometry=gpd.points_from_xy(obs["x_um"].to_numpy(), obs["y_um"].to_numpy()),
        index=_str_index(obs["cell_id"]),
    )
    return ShapesModel.parse(gdf, transformations={system: Identity()})


def _str_index(values):
    import pandas as pd

    return pd.Index(values.astype(str).to_numpy(), dtype=object, name=None)


def coordinate_system(element: str) -> str:
    """The coordinate system (units: µm) of a slide's shapes element (see `element_names`):
    its name without "cells_", so one per slide even where safe names clash ("a:b", "a b")."""
    return element.removeprefix("cells_")


def element_names(slides: list[str]) -> dict[str, str]:
    """slide id -> shapes element name (`cells_<slide>`, only characters SpatialData allows,
    unique even ignoring case)."""
    return dict(zip(slides, unique_names([f"cells_{_safe_name(s)}" for s in slides]), strict=True))


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in s).lstrip("_") or "slide"


def check_replaceable(path: Path, fmt: str) -> None:
    """Refuse an --out that an export must not replace: a folder where a file goes, or a zarr
    that is not an earlier export. Checked before the work and again before the rename."""
    if fmt != "spatialdata" and path.is_dir():
        raise UserError(f"--out {path} is a folder; give the path of a {FORMATS[fmt]} file")
    if fmt == "spatialdata" and path.exists() and not _is_our_export(path):
        raise UserError(f"{path} exists and is not an earlier `embed export` (a zarr of our cell shapes and "
                        "table only, nothing else); it is left as it is: remove it or choose another --out")  # fmt: skip


def _is_our_export(path: Path) -> bool:
    """A SpatialData zarr as `write_spatialdata` leaves it: our provenance in its one table, and
    no element a user may have added (images, labels, points, other tables or shapes)."""
    if not (path.is_dir() and (path / "tables" / "cells" / "uns" / "nuclass").is_dir()):
        return False
    elements = {p.name for p in path.iterdir() if p.is_dir()}
    tables = {p.name for p in (path / "tables").iterdir() if p.is_dir()}
    shapes = {p.name for p in (path / "shapes").iterdir() if p.is_dir()} if (path / "shapes").is_dir() else set()
    return elements <= {"shapes", "tables"} and tables == {"cells"} and all(s.startswith("cells_") for s in shapes)


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` (an earlier zarr
    export; anything else there is refused, never deleted)."""
    ensure_dir(path.parent, path.name)
    check_replaceable(path, "spatialdata")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.zarr")
    old = path.with_name(f".{path.stem}.old-{os.getpid()}.zarr")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# -- one call per format ------------------------------------------------------------------------
def check_suffix(path: str | Path, fmt: str) -> Path:
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if path.suffix.lower() != FORMATS[fmt]:
        raise UserError(f"--out {path}: a {fmt} export is written to a {FORMATS[fmt]} path, not {path.suffix or 'no suffix'}")
    return path


def infer_format(path: str | Path, fmt: str | None = None) -> str:
    """The format asked for, or the one of `path`'s suffix (.h5ad, .zarr, .csv); checks both agree."""
    path = Path(path)
    if fmt is None:
        fmt = SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise UserError(f"--out {path}: cannot tell the format from {path.suffix or 'no suffix'}; "
                            f"use {', '.join(SUFFIXES)} or give --format")  # fmt: skip
    check_suffix(path, fmt)
    return fmt


def export(
    db: str | Path,
    out: str | Path,
    *,
    fmt: str | None = None,
    table: str = DEFAULT_TABLE,
    run: str | None = None,
    run_dir: str | Path | None = None,
    slides: Sequence[str] | None = None,
    vectors: Sequence[str] = VECTOR_KINDS,
    with_vectors: bool = False,
    radius_um: float = DEFAULT_RADIUS_UM,
) -> dict[str, Any]:
    """Write one export (`embed export`); returns a summary (format, path, cells, slides, run)."""
    fmt = infer_format(out, fmt)
    if with_vectors and fmt != "csv":
        raise UserError("--with-vectors is for CSV; AnnData and SpatialData always hold the vectors (obsm X_<kind>)")
    unknown = [v for v in vectors if v not in VECTOR_KINDS]
    if unknown:
        raise UserError(f"unknown vector kind(s) {unknown}; choose from {', '.join(VECTOR_KINDS)}")
    if fmt == "spatialdata":
        _spatialdata()  # fail before loading anything when the extra is missing
    ensure_dir(Path(out).parent, Path(out).name)
    check_replaceable(Path(out), fmt)
    keep = vectors if fmt != "csv" or with_vectors else ()
    cells = collect(db, table=table, run=run, run_dir=run_dir, slides=slides, vectors=keep)
    if fmt == "csv":
        write_cells_csv(cells, out)
    elif fmt == "anndata":
        write_anndata(cells_to_anndata(cells), out)
    else:
        write_spatialdata(cells_to_anndata(cells), out, radius_um=radius_um)
    pred = cells.provenance.get("predictions", {})
    return {"format": fmt, "path": str(out), "cells": cells.obs.height, "slides": cells.obs["slide_id"].n_unique(),
            "vectors": list(cells.vectors), "run": pred.get("run"), "predicted": pred.get("cells", 0)}  # fmt: skip
