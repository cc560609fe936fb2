"""Labels and cells as labs have them: Xenium bundles and marker recipes, label tables saved by
Excel or pandas, QuPath and Cellpose outputs. Each test is one input that once gave a wrong
result or a wrong message."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

from embedstore.annotate.recipe import annotate, read_panel
from embedstore.errors import AlignmentError, UserError
from embedstore.io import xenium as X
from embedstore.io.ingest import ingest_table
from embedstore.io.labels import read_labels
from embedstore.io.segmenters import ingest_detections, slide_id_for
from embedstore.synth import make_synthetic
from tests.clirun import run_cli
from tests.test_annotate import _store_of
from tests.test_embed_cli import ok, usage_error


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """2 slides x 800 cells, 2 Xenium bundles: enough cells for Leiden clusters."""
    return make_synthetic(tmp_path_factory.mktemp("labin") / "data", seed=5, n_cells=1600, n_slides=2)


@pytest.fixture(scope="module")
def plain(synth):
    """Both bundles annotated with the panel as it is: (frame, results)."""
    return annotate([synth.out_dir / "xenium"], synth.out_dir / "panel.csv")


# -- embed annotate: synonyms, hand naming, cluster maps, the store ----------------------------


def test_synonyms_keep_the_confidence_of_the_class_they_rename(synth, plain, tmp_path):
    """Renaming classes is only renaming: the margin of a renamed class was NaN (its new name is
    no panel class), so every cell's confidence fell to 0.6 x purity and most were not kept."""
    frame, _ = plain
    classes = sorted(set(frame["label"].drop_nulls()))
    (tmp_path / "syn.json").write_text(json.dumps({c: f"{c.lower()} cells" for c in classes}))
    renamed, _ = annotate([synth.out_dir / "xenium"], synth.out_dir / "panel.csv", synonyms=tmp_path / "syn.json")
    assert renamed["label"].drop_nulls().str.ends_with(" cells").all()
    np.testing.assert_allclose(renamed["label_confidence"].fill_null(-1).to_numpy(),
                               frame["label_confidence"].fill_null(-1).to_numpy())  # fmt: skip
    assert renamed["kept"].to_list() == frame["kept"].to_list()
    # two classes renamed to one are not each other's runner-up
    pair = {"Fibroblast": "Stromal", "Tumor_Associated_Fibroblast": "Stromal"}
    (tmp_path / "pair.json").write_text(json.dumps(pair))
    merged, _ = annotate([synth.out_dir / "xenium"], synth.out_dir / "panel.csv", synonyms=tmp_path / "pair.json")
    was = frame.filter(pl.col("label").is_in(list(pair)))
    now = merged.filter(pl.col("label") == "Stromal")
    assert now["cell_id"].to_list() == was["cell_id"].to_list()
    assert now["marker_margin"].mean() > was["marker_margin"].mean()


def test_a_cluster_named_by_hand_keeps_its_cells_on_their_purity(synth, plain, tmp_path):
    """--clusters names a cluster with a class no panel class has markers for (the README's
    use: the type the panel does not cover). Its cells had margin 0, so confidence <= 0.6 x
    purity and next to none were kept, however pure the cluster."""
    _, results = plain
    res = results[0]
    big = res.clusters.sort("cells", descending=True)["cluster"][0]
    (tmp_path / "map.csv").write_text(f"cluster,class\n{big},Mystery\n")
    frame, _ = annotate([synth.slides[0].bundle], synth.out_dir / "panel.csv", clusters=tmp_path / "map.csv")
    mystery = frame.filter(pl.col("label") == "Mystery")
    assert mystery.height == res.clusters.filter(pl.col("cluster") == big)["cells"][0]
    np.testing.assert_allclose(mystery["label_confidence"].to_numpy(), mystery["purity"].to_numpy())
    assert mystery["kept"].mean() > 0.5


def test_bare_cluster_ids_are_refused_for_several_bundles_and_unknown_ones_said(synth, plain, tmp_path):
    """A cluster map row "0,Foo" renamed cluster 0 of every bundle (different cell types); a
    row naming no cluster (a typo, another sample) was ignored without a word."""
    (tmp_path / "bare.csv").write_text("cluster,class\n0,Foo\n")
    with pytest.raises(UserError, match="names no sample.*SAMPLE:ID"):
        annotate([synth.out_dir / "xenium"], synth.out_dir / "panel.csv", clusters=tmp_path / "bare.csv")
    _, results = plain
    first = results[0].clusters["cluster"][0]
    (tmp_path / "map.csv").write_text(f"cluster,class\n{first},Foo\n{results[1].sample}:99,Bar\n")
    msgs: list[str] = []
    frame, _ = annotate([synth.out_dir / "xenium"], synth.out_dir / "panel.csv", clusters=tmp_path / "map.csv", log=msgs.append)
    assert set(frame.filter(pl.col("label") == "Foo")["slide_id"]) == {results[0].sample}
    said = [m for m in msgs if "1 of its clusters" in m and ":99" in m]
    assert len(said) == 1 and said[0].startswith("warning:"), msgs
    # one bundle: a bare id names its cluster
    (tmp_path / "one.csv").write_text("cluster,class\n0,Foo\n")
    one, _ = annotate([synth.slides[0].bundle], synth.out_dir / "panel.csv", clusters=tmp_path / "one.csv")
    assert (one.filter(pl.col("cluster") == results[0].clusters["cluster"][0])["label"] == "Foo").all()


def test_annotate_into_a_store_says_how_many_stored_labels_it_clears(synth, plain, tmp_path):
    """`annotate --db` merges: the cells the recipe leaves unlabelled lose the labels they had
    in the store. `embed labels --merge` says so and how to undo it; annotate said nothing."""
    from embedstore.store import Store

    cells = pl.read_parquet(synth.cells_path)
    db = _store_of(cells, tmp_path / "db")
    Store(db).set_labels(cells.select("slide_id", "cell_id", label=pl.lit("hand")), source="user")
    bundle = synth.slides[0].bundle
    proc = run_cli("cli.embed", "annotate", bundle, "--markers", synth.out_dir / "panel.csv",
                   "--out", tmp_path / "l.parquet", "--db", db, "--no-report")  # fmt: skip
    out = ok(proc)
    frame = pl.read_parquet(tmp_path / "l.parquet")
    cleared = frame.join(cells, on=["slide_id", "cell_id"], how="semi")["label"].null_count()
    assert cleared > 0
    line = [ln for ln in out.splitlines() if f"{cleared} stored cells lost their label" in ln]
    assert len(line) == 1 and "--restore" in line[0], out
    assert Store(db).labels()["label"].null_count() == cleared


def test_classes_with_the_same_markers_are_refused(tmp_path):
    """Two classes with one marker set score the same in every cell: neither could ever be
    named, and every cluster of either type stayed unnamed without a word."""
    (tmp_path / "p.csv").write_text("class,gene\nCD4_T,CD3E\nCD4_T,CD3D\nCD8_T,CD3D\nCD8_T,CD3E\nB,MS4A1\nB,CD79A\n")
    with pytest.raises(UserError, match="CD4_T and CD8_T have the same marker genes"):
        read_panel(tmp_path / "p.csv")
    (tmp_path / "ok.csv").write_text("class,gene\nCD4_T,CD3E\nCD4_T,CD4\nCD8_T,CD3E\nCD8_T,CD8A\n")
    assert read_panel(tmp_path / "ok.csv") == {"CD4_T": ["CD3E", "CD4"], "CD8_T": ["CD3E", "CD8A"]}


# -- Xenium bundles ----------------------------------------------------------------------------


def test_an_alignment_to_xenium_um_gets_its_own_hint(synth):
    """A matrix to Xenium µm (not morphology pixels) was told to check the slide or --mpp."""
    src = synth.slides[0]
    matrix = X.read_alignment(next(src.bundle.glob("*he_imagealignment.csv")))
    to_um = matrix.copy()
    to_um[:2] *= X.PIXEL_SIZE_DEFAULT_UM
    with pytest.raises(AlignmentError, match=r"matrix to Xenium µm.*divide its first two rows by the pixel size \(0.2125\)"):
        X.check_alignment(to_um, X.PIXEL_SIZE_DEFAULT_UM, src.mpp, "a.csv")
    X.check_alignment(matrix, X.PIXEL_SIZE_DEFAULT_UM, src.mpp, "a.csv")  # the pixel one passes


def test_a_bundle_without_its_experiment_file_is_named_so(synth, tmp_path):
    bundle = tmp_path / "xenium" / "run1"
    shutil.copytree(synth.slides[0].bundle, bundle, symlinks=True)
    (bundle / "experiment.xenium").unlink()
    proc = run_cli("cli.embed", "cells", bundle, "--out", tmp_path / "c.parquet")
    usage_error(proc, "no experiment.xenium", "copy it")


# -- tables as spreadsheets and scripts save them -----------------------------------------------


def test_excel_unicode_text_tables_are_read(synth, tmp_path):
    """Excel's "Unicode Text" (UTF-16 with a byte-order mark, tab-separated): read as
    Windows-1252, its columns came out as "ÿþs\\x00l\\x00..." and nothing was found."""
    labels = tmp_path / "labels.txt"
    labels.write_bytes("slide_id\tcell_id\tlabel\r\nS1\t007\tTumor\r\nS1\t8\tStroma\r\n".encode("utf-16"))
    assert read_labels(labels).to_dicts() == [{"slide_id": "S1", "cell_id": "007", "label": "Tumor"},
                                              {"slide_id": "S1", "cell_id": "8", "label": "Stroma"}]  # fmt: skip
    cells = tmp_path / "cells.txt"
    cells.write_bytes("cell_id\tx_px\ty_px\r\n1\t10\t20\r\n".encode("utf-16"))
    frame, _ = ingest_table(cells, slides=synth.slides[0].path, tissue="breast")
    assert frame.select("cell_id", "x_px", "y_px").row(0) == ("1", 10.0, 20.0)


def test_ids_pandas_wrote_as_floats_match_the_stored_ids(tmp_path):
    """pandas writes an int id column holding a NaN as floats: "12.0" in a CSV matched no stored
    cell "12", so every label of the table was dropped as unknown. Ids that are not all so
    written ("001", "12.5", a mix) stay verbatim."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,cell_id,label\nS1,12.0,Tumor\nS1,7.00,Stroma\nS1,,Stroma\n")
    assert read_labels(labels)["cell_id"].to_list()[:2] == ["12", "7"]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("slide_id,cell_id,label\nS1,12.0,Tumor\nS1,001,Stroma\nS1,12.5,Stroma\n")
    assert read_labels(mixed)["cell_id"].to_list() == ["12.0", "001", "12.5"]


def test_split_names_as_people_write_them_are_read_as_ours(tmp_path):
    """A split column of "Train", "Validation", "TEST" (a spreadsheet's, scikit-learn users')
    was refused as "values other than train, val, test"."""
    table = tmp_path / "labels.csv"
    table.write_text("slide_id,cell_id,label,split\nS1,1,T,Train\nS1,2,T,Validation\nS1,3,T, TEST\n"
                     "S1,4,T,testing\nS1,5,T,valid\nS1,6,T,\n")  # fmt: skip
    assert read_labels(table)["split"].to_list() == ["train", "val", "test", "test", "val", None]
    table.write_text("slide_id,cell_id,label,split\nS1,1,T,holdout\n")
    with pytest.raises(UserError, match="values other than train, val, test"):
        read_labels(table)


def test_rows_without_a_slide_id_are_dropped_and_counted(synth, tmp_path):
    """A blank slide cell: with --slides the row vanished (3 read, 2 kept, no reason); with
    --mpp the command died with a TypeError traceback."""
    sid = synth.slides[0].slide_id
    table = tmp_path / "cells.csv"
    table.write_text(f"slide_id,cell_id,x_px,y_px,tissue\n{sid},1,10,10,lung\n,2,20,20,lung\n{sid},3,30,30,lung\n")
    frame, report = ingest_table(table, slides=synth.out_dir / "slides")
    assert frame["cell_id"].to_list() == ["1", "3"] and report.dropped == {"no slide id": 1}
    assert "dropped 1 (no slide id), e.g. 2" in report.lines()
    proc = run_cli("cli.embed", "cells", table, "--mpp", "0.5", "--out", tmp_path / "c.parquet")
    assert "dropped 1 (no slide id)" in ok(proc)
    assert pl.read_parquet(tmp_path / "c.parquet").height == 2
    proc = run_cli("cli.embed", "cells", table, "--mpp", "0.5", "--strict", "--out", tmp_path / "s.parquet")
    usage_error(proc, "no slide id")


# -- segmenter outputs ---------------------------------------------------------------------------


def test_qupath_derived_classes_are_read_whole(tmp_path):
    """QuPath >= 0.4 writes a derived class as {"names": ["Tumor", "Positive"]}, <= 0.3 as
    {"name": "Positive", "parentClass": {"name": "Tumor"}}; the first fell back to the object's
    display name, the second lost "Tumor". QuPath's tables write "Tumor: Positive"."""
    point = {"type": "Point", "coordinates": [10, 10]}
    feats = [
        {"type": "Feature", "id": "a", "geometry": point, "properties": {
            "objectType": "cell", "name": "cell 1", "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}}},
        {"type": "Feature", "id": "b", "geometry": point, "properties": {
            "objectType": "cell", "classification": {"name": "Positive", "colorRGB": -1,
                                                     "parentClass": {"name": "Tumor", "colorRGB": -2}}}},
        {"type": "Feature", "id": "c", "geometry": point, "properties": {
            "objectType": "cell", "classification": {"name": "Stroma", "color": [1, 2, 3]}}},
    ]  # fmt: skip
    path = tmp_path / "S1.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    frame, _ = ingest_detections(path, mpp=0.5, tissue="lung", labels_from="classification")
    assert frame.sort("cell_id")["label"].to_list() == ["Tumor: Positive", "Tumor: Positive", "Stroma"]


def test_cellpose_mask_file_names_give_the_slide_id():
    """Cellpose saves <image>_cp_masks.png: the slide id was "<image>_cp", no slide's name."""
    assert slide_id_for("out/S12_cp_masks.png") == "S12"
    assert slide_id_for("out/S12_cp_masks.tif") == "S12"
    assert slide_id_for("out/S12_masks.tif") == "S12"


def test_a_small_well_separated_cluster_is_wholly_pure():
    """Purity over 50 neighbours capped a 20-cell cluster at 19/50 = 0.38, so a rare type split out
    by re-clustering was never kept; in a cluster of n <= 50 cells its n - 1 nearest count."""
    from embedstore.annotate.recipe import neighbour_purity

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (300, 5)), rng.normal(40, 1, (20, 5))])
    groups = np.array(["0"] * 300 + ["1"] * 20, dtype=object)
    pur = neighbour_purity(x, groups, 50)
    assert np.allclose(pur, 1.0)
    groups[-1] = "2"  # a cluster of one cell: nothing to be pure about
    pur = neighbour_purity(x, groups, 50)
    assert pur[-1] == 0 and (pur[300:319] >= 17 / 18).all()  # the one cell may be among their 18 nearest
