"""`embed export`: AnnData (.h5ad), SpatialData (.zarr) and CSV exports of a store, with
labels and a heads run's predictions joined to the right cells."""

import json
import shutil
import sys
import warnings
import zlib

import numpy as np
import polars as pl
import pytest

from embedstore.errors import UserError
from embedstore.io import export as ex
from embedstore.store import Store
from heads import checkpoint
from heads.export import predictions_frame
from tests.clirun import run_cli

CLASSES = ["Tumor", "Stroma", "Immune"]


def key_class(slide_id: str, cell_id: str) -> int:
    """The class a fake run predicts for a cell: a function of its key, never of its position."""
    return zlib.crc32(f"{slide_id}:{cell_id}".encode()) % len(CLASSES)


def key_gate(slide_id: str, cell_id: str) -> float:
    return (zlib.crc32(f"gate {slide_id}:{cell_id}".encode()) % 1000) / 1000


def fake_predictions(meta: pl.DataFrame, run: str, seed: int) -> pl.DataFrame:
    """A predictions frame as `heads predict` writes it, rows shuffled."""
    keys = list(zip(meta["slide_id"], meta["cell_id"], strict=True))
    proba = np.full((meta.height, len(CLASSES)), 0.1, dtype=np.float32)
    proba[np.arange(meta.height), [key_class(*k) for k in keys]] = 0.8
    gate = np.array([key_gate(*k) for k in keys], dtype=np.float32)
    frame = predictions_frame(meta, CLASSES, proba, proba_gate=proba, gate_value=gate)
    return frame.with_columns(run=pl.lit(run)).sample(fraction=1.0, shuffle=True, seed=seed)


@pytest.fixture(scope="module")
def store(extracted_store, tmp_path_factory):
    """A copy of the extracted store (this module writes predictions) with run `r1` on the first
    two slides only; `two_runs` is a second copy that also has run `r2` on every cell."""
    src, _ = extracted_store
    db = tmp_path_factory.mktemp("export") / "db"
    shutil.copytree(src, db)
    s = Store(db)
    meta = s.load(vectors=()).meta
    slides = sorted(meta["slide_id"].unique().to_list())
    s.write_predictions(fake_predictions(meta.filter(pl.col("slide_id").is_in(slides[:2])), "r1", seed=1))
    two = db.with_name("two_runs")
    shutil.copytree(db, two)
    Store(two).write_predictions(fake_predictions(meta, "r2", seed=2))
    return db, two, slides


def uns_plain(value):
    """uns as read back from h5ad, with numpy values as plain Python (for json.dumps)."""
    if isinstance(value, dict):
        return {k: uns_plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def test_h5ad_round_trip_matches_the_store(store, tmp_path):
    import anndata as ad

    db, _, slides = store
    path = ex.write_anndata(ex.to_anndata(db), tmp_path / "cells.h5ad")  # the only run: r1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    adata = ad.read_h5ad(path)
    loaded = Store(db).load()
    n = len(loaded)
    assert adata.n_obs == n and adata.n_vars == 0 and adata.X is None
    assert adata.obs_names.is_unique
    # rows matched by key, so the check holds whatever the order
    keys = (loaded.meta["slide_id"] + ":" + loaded.meta["cell_id"]).to_list()
    row = adata.obs_names.get_indexer(keys)
    assert (row >= 0).all()
    for kind, dim in (("local", 64), ("context", 48)):
        got = adata.obsm[f"X_{kind}"]
        assert got.shape == (n, dim) and got.dtype == np.float32
        np.testing.assert_array_equal(got[row], loaded.vectors[kind])
    assert adata.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(adata.obsm["spatial"][row], loaded.meta.select("x_um", "y_um").to_numpy())
    obs = adata.obs.iloc[row]
    assert list(obs["cell_id"]) == loaded.meta["cell_id"].to_list()
    assert str(obs["slide_id"].dtype) == "category"
    # labels joined by key
    want = loaded.meta["label"].to_list()
    assert [None if isinstance(v, float) else v for v in obs["label"]] == want
    # predictions joined by key: r1 predicted the first two slides only
    predicted = obs["slide_id"].isin(slides[:2]).to_numpy()
    assert predicted.any() and not predicted.all()
    cls = [CLASSES[key_class(s, c)] for s, c in zip(obs["slide_id"], obs["cell_id"], strict=True)]
    assert list(obs["pred_class"][predicted]) == [c for c, p in zip(cls, predicted, strict=True) if p]
    assert obs["pred_class"][~predicted].isna().all()
    assert list(obs["pred_class"].cat.categories) == CLASSES
    gate = [key_gate(s, c) for s, c in zip(obs["slide_id"], obs["cell_id"], strict=True)]
    np.testing.assert_allclose(obs["gate"].to_numpy()[predicted], np.array(gate, np.float32)[predicted])
    proba = adata.obsm["proba"][row]
    assert proba.shape == (n, len(CLASSES))
    assert [CLASSES[i] for i in proba[predicted].argmax(1)] == list(obs["pred_class"][predicted])
    assert np.isnan(proba[~predicted]).all()
    # provenance: JSON-like, names the store, table, backbones and run
    prov = uns_plain(adata.uns["nuclass"])
    json.dumps(prov)
    assert prov["table"] == "cells" and prov["store"] == str(db.resolve())
    assert prov["vectors"]["local"]["weights_sha256"] == Store(db).config()["vectors"]["local"]["weights_sha256"]
    assert prov["predictions"]["run"] == "r1" and prov["predictions"]["classes"] == CLASSES
    assert prov["predictions"]["cells"] == int(predicted.sum())
    assert set(prov["extraction_runs"]) == set(loaded.meta["run_id"].unique())
    assert prov["exported_at"] and prov["package_version"]


def test_scanpy_neighbors_on_the_local_vectors(store):
    import scanpy as sc

    adata = ex.to_anndata(store[0], vectors=("local",))
    assert list(adata.obsm) == ["X_local", "spatial", "proba"]
    # "gauss" avoids umap's numba compilation (~30 s); the representation path is the same
    sc.pp.neighbors(adata, use_rep="X_local", n_neighbors=10, method="gauss", knn=True)
    assert adata.obsp["connectivities"].shape == (adata.n_obs, adata.n_obs)


def test_slides_and_run_choice(store):
    db, two, slides = store
    one = ex.to_anndata(db, slides=[slides[2]], vectors=())
    assert set(one.obs["slide_id"]) == {slides[2]} and not one.obsm.keys() - {"spatial"}
    assert "pred_class" not in one.obs  # the only run, r1, predicted none of them
    with pytest.raises(UserError, match="run 'r1' predicted none of the exported cells"):
        ex.to_anndata(db, run="r1", slides=[slides[2]], vectors=())
    with pytest.raises(UserError, match="predictions of 2 runs.*--run"):
        ex.to_anndata(two)
    r2 = ex.to_anndata(two, run="r2", vectors=())
    assert r2.obs["pred_class"].notna().all()


def test_csv_columns_and_rows(store, tmp_path):
    db, _, _ = store
    n = len(Store(db).load(vectors=()))
    out = tmp_path / "cells.csv"
    ex.export(db, out)
    plain = pl.read_csv(out)
    assert plain.height == n
    assert {"slide_id", "cell_id", "x_um", "y_um", "label", "pred_class", "gate"} <= set(plain.columns)
    assert [c for c in plain.columns if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
    # cells r1 did not predict: every prediction field is empty, none reads "NaN"
    assert "NaN" not in out.read_text()
    unpredicted = plain.filter(pl.col("pred_class").is_null())
    assert unpredicted.height and unpredicted.select(pl.col("^prob_.*$").is_null().all()).row(0) == (True,) * len(CLASSES)
    assert not any(c.startswith(("local_0", "context_0")) for c in plain.columns)
    ex.write_csv(db, out, with_vectors=True, vectors=("local",))
    wide = pl.read_csv(out)
    assert [c for c in wide.columns if c.startswith("local_") and c[6:].isdigit()] == [f"local_{i}" for i in range(64)]
    loaded = Store(db).load(vectors=("local",))
    joined = loaded.meta.select("slide_id", "cell_id").with_row_index("i").join(wide, on=["slide_id", "cell_id"])
    vec = joined.select([f"local_{i}" for i in range(64)]).to_numpy().astype(np.float32)
    np.testing.assert_allclose(vec, loaded.vectors["local"][joined["i"].to_numpy()], rtol=1e-6)


def test_spatialdata_round_trip(store, tmp_path):
    spatialdata = pytest.importorskip("spatialdata")
    db, _, slides = store
    adata = ex.to_anndata(db, vectors=("local",))
    before = set(adata.obs.columns)
    path = ex.write_spatialdata(adata, tmp_path / "cells.zarr")
    assert set(adata.obs.columns) == before  # the caller's AnnData is left as it was
    sdata = spatialdata.read_zarr(path)
    names = ex.element_names(slides)
    assert set(sdata.shapes) == set(names.values())
    table = sdata.tables["cells"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["instance_key"] == "cell_id" and attrs["region_key"] == "region"
    assert set(attrs["region"]) == set(names.values())
    np.testing.assert_array_equal(table.obsm["X_local"], adata.obsm["X_local"])
    for slide, element in names.items():
        shapes = sdata.shapes[element]
        assert set(spatialdata.transformations.get_transformation(shapes, get_all=True)) == {slide}
        rows = table.obs[table.obs["region"] == element].set_index("cell_id")
        assert set(rows.index) == set(shapes.index)
        np.testing.assert_allclose(shapes.geometry.x.to_numpy(), rows.loc[shapes.index, "x_um"].to_numpy())
        np.testing.assert_allclose(shapes.geometry.y.to_numpy(), rows.loc[shapes.index, "y_um"].to_numpy())


def test_zarr_output_replaces_an_export_never_other_data(tmp_path):
    def export_like(folder, version):  # the layout write_spatialdata leaves
        (folder / "tables" / "cells" / "uns" / "nuclass").mkdir(parents=True)
        (folder / "shapes" / "cells_S1").mkdir(parents=True)
        (folder / "zarr.json").write_text(version)

    path = tmp_path / "cells.zarr"
    for version in ("old", "new"):
        with ex._atomic_dir(path) as tmp:
            export_like(tmp, version)
    assert (path / "zarr.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["cells.zarr"]
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    # a user's SpatialData: a zarr, even one holding our table, but with their images beside it
    theirs = tmp_path / "sample.zarr"
    export_like(theirs, "theirs")
    (theirs / "images" / "he_image").mkdir(parents=True)
    for folder in (mine, theirs):
        with pytest.raises(UserError, match="not an earlier `embed export`"), ex._atomic_dir(folder):
            pass
    assert (mine / "keep.txt").exists() and (theirs / "images" / "he_image").is_dir()


def test_spatialdata_one_coordinate_system_per_slide_even_when_names_clash():
    pytest.importorskip("spatialdata")
    import anndata as ad
    import pandas as pd
    from spatialdata.transformations import get_transformation

    slides = ["case:A", "case A", "case_A"]
    obs = pd.DataFrame({"slide_id": np.repeat(slides, 2), "cell_id": ["1", "2"] * 3,
                        "x_um": np.arange(6.0), "y_um": np.arange(6.0)})  # fmt: skip
    obs.index = [f"{s}:{c}" for s, c in zip(obs["slide_id"], obs["cell_id"], strict=True)]
    sdata = ex.to_spatialdata(ad.AnnData(obs=obs))
    systems = [set(get_transformation(sdata.shapes[e], get_all=True)) for e in ex.element_names(slides).values()]
    assert all(len(s) == 1 for s in systems) and len(set.union(*systems)) == 3, systems


def test_class_names_from_run_dir_or_inferred(store, tmp_path):
    db, _, _ = store
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    (run_dir / "local.safetensors").write_bytes(b"")
    info = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "classes": CLASSES}
    (run_dir / "local.json").write_text(json.dumps(info))
    old = pytest.warns(UserWarning, match="made before runs were identified")  # fake rows carry no digest
    with old:
        adata = ex.to_anndata(db, run="r1", run_dir=run_dir, vectors=())
    assert adata.uns["nuclass"]["predictions"]["classes_source"].startswith("checkpoint")
    (run_dir / "local.json").write_text(json.dumps({**info, "classes": CLASSES[:2]}))
    with old, pytest.raises(UserError, match="have 3 class probabilities, this run has 2 classes"):
        ex.to_anndata(db, run="r1", run_dir=run_dir, vectors=())
    # as many classes, in another order (or another run's names): refused, not mislabelled columns
    (run_dir / "local.json").write_text(json.dumps({**info, "classes": CLASSES[::-1]}))
    with old, pytest.raises(UserError, match="do not name the stored predictions"):
        ex.to_anndata(db, run="r1", run_dir=run_dir, vectors=())
    # rows that another run folder named r1 made are never exported as this one's
    (run_dir / "local.json").write_text(json.dumps(info))
    other = tmp_path / "db"
    shutil.copytree(db, other)
    preds = Store(other).predictions("r1").with_columns(run_digest=pl.lit("0" * 16), run_dir=pl.lit("/elsewhere/r1"))
    Store(other).write_predictions(preds.with_columns(
        [pl.col("proba").list.get(i).alias(f"prob_{c}") for i, c in enumerate(CLASSES)]).drop("proba"))  # fmt: skip
    with pytest.raises(UserError, match=r"belong to another run folder \(/elsewhere/r1\)"):
        ex.to_anndata(other, run="r1", run_dir=run_dir, vectors=())
    # without the checkpoint: named from the stored predictions, unless a class was never predicted
    both = pl.DataFrame({"pred_class": ["B", "A"], "proba": [[0.2, 0.8], [0.9, 0.1]]})
    assert ex.run_classes(None, both, 2)[0] == ["A", "B"]
    only_a = pl.DataFrame({"pred_class": ["A", "A"], "proba": [[0.9, 0.1], [0.8, 0.2]]})
    names, source = ex.run_classes(None, only_a, 2)
    assert names == ["class_0", "class_1"] and "--run-dir" in source


def test_clear_errors(store, tmp_path):
    db, _, slides = store
    with pytest.raises(UserError, match="no predictions of run 'nope'.*r1"):
        ex.to_anndata(db, run="nope")
    with pytest.raises(UserError, match="no table 'other'"):
        ex.export(db, tmp_path / "x.h5ad", table="other")
    with pytest.raises(UserError, match="cannot tell the format"):
        ex.export(db, tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"anndata export is written to a \.h5ad path"):
        ex.export(db, tmp_path / "x.csv", fmt="anndata")
    with pytest.raises(UserError, match="unknown export format"):
        ex.export(db, tmp_path / "x.h5ad", fmt="loom")
    with pytest.raises(UserError, match="--with-vectors is for CSV"):
        ex.export(db, tmp_path / "x.h5ad", with_vectors=True)
    with pytest.raises(UserError, match="no cells of slide"):
        ex.export(db, tmp_path / "x.h5ad", slides=[slides[0], "missing_slide"])
    with pytest.raises(UserError, match="unknown vector kind"):
        ex.export(db, tmp_path / "x.h5ad", vectors=("local", "global"))
    assert not list(tmp_path.iterdir())
    (tmp_path / "dir.h5ad").mkdir()  # said at once, naming the user's path (not a temporary file's)
    with pytest.raises(UserError, match=r"--out .*dir\.h5ad is a folder"):
        ex.export(db, tmp_path / "dir.h5ad", table="other")


def test_spatialdata_missing_says_how_to_install(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'nuclass-embedstore\[spatialdata\]'"):
        ex.export(store[0], tmp_path / "x.zarr")


def embed(*args):
    return run_cli("cli.embed", "export", *args)  # in-process (tests/clirun.py)


def test_cli_end_to_end(store, tmp_path):
    import anndata as ad

    db, two, slides = store
    out = tmp_path / "out" / "cells.h5ad"
    proc = embed("--db", two, "--out", out, "--run", "r2", "--slide", slides[0], "--slide", slides[1], "--vectors", "local")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "cells of 2 slide(s)" in proc.stderr and "run r2" in proc.stderr and "Traceback" not in proc.stderr
    adata = ad.read_h5ad(out)
    assert set(adata.obs["slide_id"]) == set(slides[:2]) and list(adata.obsm) == ["X_local", "proba", "spatial"]
    bad = embed("--db", db, "--out", tmp_path / "x.csv", "--format", "anndata")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "a .h5ad path" in bad.stderr and "Traceback" not in bad.stderr


def test_cells_of_an_unfinished_extraction_are_said(store, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(store[0], db)
    s = Store(db)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finished extraction: nothing to say
        ex.to_anndata(db, vectors=())
    run = s.runs().row(0, named=True)
    s.record_run({**run, "status": "interrupted"})  # as a killed `embed extract` leaves it
    with pytest.warns(UserWarning, match=r"did not finish: .*\(interrupted\).*rerun `embed extract`"):
        ex.to_anndata(db, vectors=())


def test_obs_names_stay_unique_when_ids_hold_colons():
    """"a:b" + "c" and "a" + "b:c" both read "a:b:c": AnnData would hold two cells under one name."""
    meta = pl.DataFrame({"slide_id": ["a:b", "a", "a", "x"], "cell_id": ["c", "b:c", "b:c-1", "y"]})
    with pytest.warns(UserWarning, match=r"1 obs name\(s\).*'a:b:c'"):
        names = ex._obs_names(meta)
    assert names == ["a:b:c", "a:b:c-2", "a:b:c-1", "x:y"]  # "a:b:c-1" is a real cell's name: skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ex._obs_names(meta.head(1)) == ["a:b:c"]


@pytest.mark.parametrize("classes", [CLASSES[::-1], CLASSES[:2]])
def test_class_names_come_from_the_exported_cells_own_predictions(store, tmp_path, classes):
    """Another table's cells (same store, predictions named r1 too) predicted with other classes
    made the export of this table's r1 name its class columns class_0.. (a class order that
    contradicted this run's), or refuse it for "probability lists of lengths [3, 2]"."""
    db, _, _ = store
    other = tmp_path / "db"
    shutil.copytree(db, other)
    meta = Store(db).load(vectors=()).meta.head(40)
    elsewhere = meta.with_columns(slide_id=pl.lit("another_table_slide"))
    proba = np.full((40, len(classes)), 0.1 / (len(classes) - 1), np.float32)
    proba[np.arange(40), np.arange(40) % len(classes)] = 0.9  # each class predicted
    frame = predictions_frame(elsewhere, classes, proba, proba_gate=proba, gate_value=np.zeros(40, np.float32))
    Store(other).write_predictions(frame.with_columns(run=pl.lit("r1")))
    got = ex.to_anndata(other, run="r1", vectors=())
    pred = got.uns["nuclass"]["predictions"]
    assert pred["classes"] == CLASSES and pred["classes_source"].startswith("stored predictions"), pred
    assert list(got.obs["pred_class"].cat.categories) == CLASSES


def test_cell_ids_repeated_across_slides_stay_text_in_the_h5ad(tmp_path):
    """Ids numbered per slide ("1", "2", ... on every slide) came back from the .h5ad as a
    categorical cell_id (anndata converts repeated strings on write), against the documented
    layout, and `obs.cell_id.str` / joins on it behaved differently from one export to the next."""
    import anndata as ad
    import pandas as pd

    from tests.test_search_inputs import write_store

    rng = np.random.default_rng(0)
    db = write_store(tmp_path / "db", rng.normal(size=(10, 8)).astype(np.float32),
                     slides=["s0"] * 5 + ["s1"] * 5, ids=[str(i) for i in range(5)] * 2)  # fmt: skip
    ex.export(db, tmp_path / "cells.h5ad")
    back = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert back.obs["cell_id"].dtype == object and back.obs["cell_id"].tolist() == [str(i) for i in range(5)] * 2
    assert isinstance(back.obs["slide_id"].dtype, pd.CategoricalDtype)
    assert back.obs_names.tolist()[:2] == ["s0:0", "s0:1"]
