import gzip
import json
import shutil

import numpy as np
import polars as pl
import pytest

from embedstore.errors import AlignmentError, CellsError
from embedstore.io.cells import validate_cells
from embedstore.io.ingest import ingest_table, ingest_xenium
from embedstore.io.xenium import (
    check_alignment,
    open_bundle,
    read_alignment,
    read_feature_matrix,
    xenium_to_he_px,
)
from tests.clirun import run_cli


def _bundle_copy(synth, tmp_path, i=0):
    """A writable copy of one synthetic bundle (the H&E link re-pointed at the real slide)."""
    s = synth.slides[i]
    dst = tmp_path / s.slide_id
    shutil.copytree(s.bundle, dst, symlinks=False, ignore=shutil.ignore_patterns("*he_image.*"))
    (dst / f"{s.slide_id}_he_image{s.path.suffix}").symlink_to(s.path)
    return dst, s


def test_xenium_alignment_recovers_true_he_positions(synth_small):
    truth = pl.read_parquet(synth_small.truth_path)
    for s in synth_small.slides:
        frame, report = ingest_xenium(s.bundle)
        assert report.n_out == report.n_in == s.n_cells and not report.dropped
        assert frame["slide_id"].unique().to_list() == [s.slide_id]
        assert frame["tissue"].unique().to_list() == [s.tissue]
        j = frame.join(truth, on=["slide_id", "cell_id"], suffix="_true")
        assert j.height == s.n_cells
        err = np.hypot(j["x_px"] - j["x_px_true"], j["y_px"] - j["y_px_true"]).to_numpy()
        assert err.max() < 0.5
        np.testing.assert_allclose(j["x_um"], j["x_px"] * 0.25)


def test_the_alignment_is_non_trivial(synth_small):
    m = read_alignment(next(synth_small.slides[0].bundle.glob("*imagealignment.csv")))
    linear = m[:2, :2]
    assert abs(np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))) > 1  # rotated
    assert np.linalg.norm(m[:2, 2]) > 10  # translated
    assert check_alignment(m, 0.2125, 0.25, "x") == pytest.approx(0.25, rel=1e-6)


def test_round_trip_he_xenium():
    m = np.array([[1.1, -0.2, 500.0], [0.2, 1.1, 80.0], [0, 0, 1]])
    x, y = np.array([0.0, 100.5, 4000.0]), np.array([0.0, 7.25, 3000.0])
    from embedstore.io.xenium import he_px_to_xenium

    xu, yu = he_px_to_xenium(x, y, m, 0.2125)
    bx, by = xenium_to_he_px(xu, yu, m, 0.2125)
    np.testing.assert_allclose(bx, x, atol=1e-9)
    np.testing.assert_allclose(by, y, atol=1e-9)


@pytest.mark.parametrize(
    "matrix,message",
    [
        ([[np.nan, 0, 0], [0, 1, 0], [0, 0, 1]], "NaN"),
        ([[1, 2, 0], [2, 4, 0], [0, 0, 1]], "singular"),
        ([[1, 0, 0], [0, 1, 0], [0.001, 0, 1]], "affine"),
        ([[1.18, 0, 0], [0, 2.5, 0], [0, 0, 1]], "stretches"),
        ([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 1]], "implies"),
        ([[0.85, 0, 0], [0, 0.85, 0], [0, 0, 1]], "--invert-alignment"),
    ],
)
def test_bad_alignment_matrices_are_rejected(matrix, message):
    with pytest.raises(AlignmentError, match=message):
        check_alignment(np.array(matrix, dtype=float), 0.2125, 0.25, "test.csv")


def test_bad_matrix_in_a_bundle_is_rejected_and_inverse_can_be_used(synth_small, tmp_path):
    bundle, s = _bundle_copy(synth_small, tmp_path)
    csv = next(bundle.glob("*imagealignment.csv"))
    m = read_alignment(csv)
    np.savetxt(csv, np.linalg.inv(m), delimiter=",")
    with pytest.raises(AlignmentError, match="--invert-alignment"):
        ingest_xenium(bundle)
    frame, _ = ingest_xenium(bundle, invert_alignment=True)
    truth = pl.read_parquet(synth_small.truth_path).filter(pl.col("slide_id") == s.slide_id)
    j = frame.join(truth, on=["slide_id", "cell_id"], suffix="_true")
    assert np.abs(j["x_px"] - j["x_px_true"]).max() < 0.5
    np.savetxt(csv, np.zeros((3, 3)), delimiter=",")
    with pytest.raises(AlignmentError, match="affine"):
        ingest_xenium(bundle)
    csv.write_text("1,0\n0,1\n")
    with pytest.raises(AlignmentError, match="3x3"):
        ingest_xenium(bundle)



def test_alignment_files_as_people_save_them(synth_small, tmp_path):
    """A header row, a BOM, quotes, tabs and pandas' index column read as the same matrix; a
    keypoints file says what it is; an IF alignment beside the H&E one is not taken."""
    bundle, _ = _bundle_copy(synth_small, tmp_path)
    csv = next(bundle.glob("*he_imagealignment.csv"))
    m = read_alignment(csv)
    rows = [[f"{v!r}" for v in row] for row in m.tolist()]
    layouts = {
        "header": "a,b,c\n" + "\n".join(",".join(r) for r in rows),
        "bom_quotes_tabs": "\ufeff" + "\n".join("\t".join(f'"{v}"' for v in r) for r in rows),
        "pandas": ",0,1,2\n" + "\n".join(f"{i}," + ",".join(r) for i, r in enumerate(rows)),
    }
    for name, text in layouts.items():
        (tmp_path / f"{name}.csv").write_text(text, encoding="utf-8")
        np.testing.assert_array_equal(read_alignment(tmp_path / f"{name}.csv"), m, err_msg=name)
    keypoints = tmp_path / "k.csv"
    keypoints.write_text("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,4\n")
    with pytest.raises(AlignmentError, match="keypoints file"):
        read_alignment(keypoints)
    (bundle / "IF_DAPI_imagealignment.csv").write_text("1.1765,0,0\n0,1.1765,0\n0,0,1\n")
    (bundle / "x_he_imagealignment_keypoints.csv").write_text("fixedX,fixedY,alignmentX,alignmentY\n")
    assert open_bundle(bundle).alignment_path == csv
    (bundle / "other_he_imagealignment.csv").write_text(csv.read_text())
    with pytest.raises(AlignmentError, match="several alignment files"):
        open_bundle(bundle)
    exp = json.loads((bundle / "experiment.xenium").read_text())
    for size, ok in (("0.2125", True), (True, False)):
        (bundle / "experiment.xenium").write_text(json.dumps({**exp, "pixel_size": size}))
        if ok:
            assert open_bundle(bundle, alignment=csv).pixel_size == 0.2125
        else:
            with pytest.raises(CellsError, match="pixel_size is missing or implausible"):
                open_bundle(bundle, alignment=csv)

def test_bundle_errors_and_csv_cells(synth_small, tmp_path):
    bundle, s = _bundle_copy(synth_small, tmp_path)
    cells = pl.read_parquet(bundle / "cells.parquet")
    (bundle / "cells.parquet").unlink()
    with gzip.open(bundle / "cells.csv.gz", "wb") as fh:
        cells.write_csv(fh)
    frame, _ = ingest_xenium(bundle)
    assert frame.height == s.n_cells
    (bundle / "experiment.xenium").unlink()
    with pytest.raises(CellsError, match="experiment.xenium"):
        ingest_xenium(bundle)
    with pytest.raises(CellsError, match="not a Xenium"):
        ingest_xenium(tmp_path / "nothing")


def test_bundle_without_tissue_needs_one(synth_small, tmp_path):
    import json

    bundle, s = _bundle_copy(synth_small, tmp_path)
    exp = json.loads((bundle / "experiment.xenium").read_text())
    exp.pop("tissue", None)
    exp.pop("panel_tissue_type", None)
    (bundle / "experiment.xenium").write_text(json.dumps(exp))
    with pytest.raises(CellsError, match="--tissue"):
        ingest_xenium(bundle)
    frame, _ = ingest_xenium(bundle, tissue="colon")
    assert set(frame["tissue"]) == {"colon"}


def test_feature_matrix_reads(synth_small):
    bundle = synth_small.slides[0].bundle
    barcodes, genes, counts = read_feature_matrix(bundle)
    cells = pl.read_parquet(bundle / "cells.parquet")
    assert counts.shape == (len(barcodes), len(genes)) == (cells.height, len(synth_small.genes))
    assert set(barcodes) == set(cells["cell_id"])
    assert "EPCAM" in genes and not any(g.startswith("NegControl") for g in genes)


def _table(synth, unit="px"):
    truth = pl.read_parquet(synth.truth_path)
    scale = 1.0 if unit == "px" else 0.25
    return truth.select(
        "slide_id", "cell_id", "tissue", "label",
        (pl.col("x_px") * scale).alias(f"x_{unit}"), (pl.col("y_px") * scale).alias(f"y_{unit}"),
    )  # fmt: skip


@pytest.mark.parametrize("unit,fmt", [("px", "csv"), ("um", "parquet")])
def test_table_ingest_px_and_um(synth_small, tmp_path, unit, fmt):
    table = _table(synth_small, unit)
    path = tmp_path / f"cells.{fmt}"
    table.write_csv(path) if fmt == "csv" else table.write_parquet(path)
    frame, report = ingest_table(path, slides=synth_small.slides[0].path.parent)
    assert report.n_out == table.height and not report.dropped
    truth = pl.read_parquet(synth_small.truth_path)
    j = frame.join(truth, on=["slide_id", "cell_id"], suffix="_t")
    np.testing.assert_allclose(j["x_px"], j["x_px_t"], atol=1e-6)
    assert set(frame.columns) >= {"slide_id", "cell_id", "x_px", "y_px", "x_um", "y_um", "tissue", "label"}
    validate_cells(frame)


def test_table_bad_rows_are_reported_and_dropped_by_the_rule(synth_small, tmp_path):
    table = _table(synth_small).head(50).with_columns(pl.col("x_px").cast(pl.Float64))
    extra = pl.concat([
        table.head(2),  # duplicates
        table.slice(2, 1).with_columns(x_px=pl.lit(float("nan"))),
        table.slice(3, 1).with_columns(cell_id=pl.lit("far"), x_px=pl.lit(1e7)),
        table.slice(4, 1).with_columns(cell_id=pl.lit("neg"), y_px=pl.lit(-3.0)),
        table.slice(5, 1).with_columns(cell_id=pl.lit("ghost"), slide_id=pl.lit("no_such_slide")),
    ])  # fmt: skip
    path = tmp_path / "bad.parquet"
    pl.concat([table, extra]).write_parquet(path)
    slides = synth_small.slides[0].path.parent
    frame, report = ingest_table(path, slides=slides)
    assert report.dropped == {
        "slide not found; known slides: synth_s0, synth_s1, synth_s2": 1,
        "NaN or infinite centroid": 1,
        "duplicate cell id in slide, first kept": 2,
        "centroid outside the slide": 2,
    }
    assert any("far" in e for e in report.examples["centroid outside the slide"])
    assert frame.height == 50 and frame.select(pl.struct("slide_id", "cell_id").is_unique().all()).item()
    with pytest.raises(CellsError, match="--strict"):
        ingest_table(path, slides=slides, on_bad="error")


def test_table_errors(synth_small, tmp_path):
    t = _table(synth_small).rename({"x_px": "xx", "y_px": "yy"})
    path = tmp_path / "t.csv"
    t.write_csv(path)
    with pytest.raises(CellsError, match="no x column"):
        ingest_table(path, mpp=0.25)
    with pytest.raises(CellsError, match="--unit"):
        ingest_table(path, mpp=0.25, columns={"x": "xx", "y": "yy"})
    frame, rep = ingest_table(path, mpp=0.25, unit="px", columns={"x": "xx", "y": "yy"})
    assert frame.height == t.height and any("not checked" in n for n in rep.notes)
    with pytest.raises(CellsError, match="--mpp"):
        ingest_table(path, unit="px", columns={"x": "xx", "y": "yy"})
    with pytest.raises(CellsError, match="no such"):
        ingest_table(tmp_path / "missing.csv", mpp=0.25)


def test_cli_cells_writes_and_fails_cleanly(synth_small, tmp_path):
    out = tmp_path / "cells.parquet"
    ok = run_cli("cli.embed", "cells", synth_small.out_dir / "xenium", "--out", out)
    assert ok.returncode == 0, ok.stderr
    assert pl.read_parquet(out).height == synth_small.n_cells
    bad = run_cli("cli.embed", "cells", tmp_path / "nope.csv", "--out", out, "--mpp", "0.25")
    assert bad.returncode != 0 and "no such table" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_cells_per_bundle_options_and_two_regions_of_one_slide(synth_small, tmp_path):
    from typer.testing import CliRunner

    from cli.embed import app

    def cells(*args):
        return CliRunner().invoke(app, ["cells", *map(str, args), "--out", str(tmp_path / "o.parquet")])

    result = cells(synth_small.out_dir / "xenium", "--slide-id", "S1")  # would name every bundle's cells S1
    assert isinstance(result.exception, CellsError) and "--slide-id belong(s) to one bundle" in str(result.exception)
    two = tmp_path / "regions"
    for region in ("region_1", "region_2"):  # Xenium cell ids repeat between regions of one slide
        shutil.copytree(synth_small.slides[0].bundle, two / region)
    result = cells(two)
    assert isinstance(result.exception, CellsError), result.output
    assert "bundles region_1, region_2 put" in str(result.exception) and "cells with the same ids on slide" in str(result.exception)
    assert not (tmp_path / "o.parquet").exists()

@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_tables_with_other_delimiters_are_read(tmp_path, sep):
    path = tmp_path / "cells.csv"
    path.write_text(sep.join(["slide_id", "cell_id", "x_um", "y_um", "tissue"]) + "\n"
                    + sep.join(["s", "1", "10.5", "20.25", "lung"]) + "\n")  # fmt: skip
    frame, _ = ingest_table(path, mpp=0.25)
    assert frame.row(0, named=True) == {
        "slide_id": "s", "cell_id": "1", "x_px": 42.0, "y_px": 81.0, "x_um": 10.5, "y_um": 20.25, "tissue": "lung"
    }  # fmt: skip


def _tiff_slide(path, size=64, mpp=0.5):
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def test_tables_as_other_tools_write_them(tmp_path):
    """Ids verbatim ("01" is not "1"), R's NA, Greek μ, Windows-1252 files, QuPath's Image column
    holding file names, decomposed Unicode file names, and a folder holding other TIFFs."""
    import unicodedata

    slides = tmp_path / "slides"
    slides.mkdir()
    nfd = unicodedata.normalize("NFD", "café")
    _tiff_slide(slides / f"{nfd}.tif")
    (slides / "café_labels.tif").write_bytes(b"not a slide")  # never opened: no table names it
    path = tmp_path / "cells.csv"
    path.write_text("slide_id,cell_id,x_px,y_px,tissue\n" + "".join(
        f"café,{cid},{x},10,lung\n" for cid, x in (("1", 5), ("01", 6), ("001", 7), ("2", "NA"))))  # fmt: skip
    frame, report = ingest_table(path, slides=slides)
    assert sorted(frame["cell_id"]) == ["001", "01", "1"] and set(frame["slide_id"]) == {nfd}
    assert report.dropped == {"NaN or infinite centroid": 1}
    # QuPath's measurement export: Windows-1252, "Image" with the file name, µm in the header
    qupath = tmp_path / "measurements.tsv"
    qupath.write_bytes("Image\tObject ID\tCentroid X µm\tCentroid Y µm\n".encode("cp1252")
                       + "".join(f"café.tif\t{i:04d}\t{2 + i}\t3\n" for i in range(3)).encode("cp1252"))  # fmt: skip
    frame, report = ingest_table(qupath, slides=slides, tissue="lung")
    assert frame["cell_id"].to_list() == ["0000", "0001", "0002"] and not report.dropped
    np.testing.assert_allclose(frame["x_px"].to_numpy(), [4.0, 6.0, 8.0])  # µm / 0.5 µm/px
    greek = tmp_path / "greek.csv"
    greek.write_text("id,Centroid X \u03bcm,Centroid Y \u03bcm\n7,1.5,2\n")
    frame, _ = ingest_table(greek, slides=slides / f"{nfd}.tif", tissue="lung")  # one slide: its id
    assert frame.row(0, named=True)["x_px"] == 3.0 and frame["slide_id"].to_list() == [nfd]
    floats = tmp_path / "floats.parquet"
    pl.DataFrame({"slide_id": ["s", "s"], "cell_id": [0.0, 12.0], "x_px": [1.0, 2.0], "y_px": [1.0, 2.0],
                  "tissue": ["lung"] * 2}).write_parquet(floats)  # fmt: skip
    assert ingest_table(floats, mpp=0.5)[0]["cell_id"].to_list() == ["0", "12"]


def test_slide_ids_written_as_file_names_match_only_through_slide_suffixes():
    from embedstore.io.cells import match_slide_ids

    frame = pl.DataFrame({"slide_id": ["S1.svs", "S1.2", "scans\\S1.ome.tiff", "S1"]})
    assert match_slide_ids(frame, ["S1"])["slide_id"].to_list() == ["S1", "S1.2", "S1", "S1"]


def test_decimal_comma_tables_read_as_their_point_version(tmp_path):
    """QuPath on a German Windows: ;-separated, Windows-1252, "12,5"; ids stay verbatim ("1,5"
    is no number), "NA" is a missing centroid, whole numbers may sit among decimal-comma ones."""
    ids, xs, ys = ["001", "1,5", "7", "8"], ["12,5", "13", "NA", "-0,25"], ["3,75", "4", "5", "6,5"]
    german = tmp_path / "german.csv"
    german.write_bytes("Image;Object ID;Centroid X µm;Centroid Y µm\n".encode("cp1252") + "".join(
        f"s.tif;{i};{x};{y}\n" for i, x, y in zip(ids, xs, ys, strict=True)).encode("cp1252"))  # fmt: skip
    points = tmp_path / "points.csv"
    pl.DataFrame({"Image": "s.tif", "Object ID": ids, "Centroid X µm": [12.5, 13.0, None, -0.25],
                  "Centroid Y µm": [3.75, 4.0, 5.0, 6.5]}).write_csv(points)  # fmt: skip
    (frame, report), (want, _) = (ingest_table(p, mpp=0.5, tissue="lung") for p in (german, points))
    assert frame["cell_id"].to_list() == ["001", "1,5", "8"] and report.dropped == {"NaN or infinite centroid": 1}
    assert frame.equals(want)
    np.testing.assert_allclose(frame["x_um"].to_numpy(), [12.5, 13.0, -0.25])
    # comma-separated, a quoted "12,5" may as well be a thousands separator: refused
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('slide_id,cell_id,x_um,y_um\ns,1,"12,5",3\n')
    with pytest.raises(CellsError, match="decimal commas: convert them to points"):
        ingest_table(quoted, mpp=0.5, tissue="lung")


def test_a_xenium_cells_table_is_refused_unless_its_columns_are_named(synth_small, tmp_path):
    """A bundle's cells.parquet holds µm in the Xenium morphology frame, not on the H&E slide:
    ingested as a table, every cell would land in the wrong place without a word."""
    bundle, s = _bundle_copy(synth_small, tmp_path)
    raw = bundle / "cells.parquet"
    opts = dict(unit="um", slide_id=s.slide_id, tissue="lung")
    with pytest.raises(CellsError, match="Xenium cells table") as err:
        ingest_table(raw, slides=s.path, **opts)
    assert f"`embed cells {bundle}`" in str(err.value) and "--x-col x_centroid --y-col y_centroid" in str(err.value)
    centroids = pl.read_parquet(raw).select("cell_id", "x_centroid", "y_centroid")
    centroids.write_csv(bundle / "centroids.csv")  # no count columns, but in a bundle folder
    with pytest.raises(CellsError, match="Xenium cells table"):
        ingest_table(bundle / "centroids.csv", mpp=0.25, **opts)
    centroids.write_csv(tmp_path / "centroids.csv")  # x_centroid alone is no Xenium table
    assert ingest_table(tmp_path / "centroids.csv", mpp=0.25, **opts)[0].height == s.n_cells
    # registered to the H&E already: named explicitly, taken as given
    frame, _ = ingest_table(raw, mpp=0.25, columns={"x": "x_centroid", "y": "y_centroid"}, **opts)
    assert frame.height == s.n_cells
    np.testing.assert_allclose(frame["x_um"].to_numpy(), pl.read_parquet(raw)["x_centroid"].to_numpy())
