"""Cells from segmenter outputs (QuPath GeoJSON, CellViT, label images) and plain images as slides."""

from __future__ import annotations

import gzip
import json
import time

import numpy as np
import polars as pl
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from embedstore.errors import CellsError, SlideError
from embedstore.geometry import CropSpec
from embedstore.io import segmenters as S
from embedstore.io import slides as slides_mod
from embedstore.io.geojson import write_geojson
from embedstore.io.segmenters import (
    area_centroid,
    detect_format,
    ingest_detections,
    label_centroids,
    slide_id_for,
)
from embedstore.io.slides import Slide, find_slides

# an L made of [0,4]x[0,1] (area 4) and [0,1]x[1,3] (area 2), moved to (1000, 2000):
# area centroid (1.5, 1.0) + offset; the vertex mean would be (1.667, 1.333) + offset
L_SHAPE = [[1000, 2000], [1004, 2000], [1004, 2001], [1001, 2001], [1001, 2003], [1000, 2003], [1000, 2000]]
L_CENTROID = (1001.5, 2001.0)
# [0,10]^2 minus the hole [1,3]^2, both wound the same way: (100*5 - 4*2) / 96
HOLED = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], [[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]]]
HOLED_CENTROID = (492 / 96, 492 / 96)


def _square(x0, y0, side):
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def _feature(geom, object_type="detection", fid=None, cls=None, **props):
    props = {"objectType": object_type, **props}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    feat = {"type": "Feature", "geometry": geom, "properties": props}
    if fid is not None:
        feat["id"] = fid
    return feat


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt") as fh:
        json.dump(data, fh)
    return path


def _qupath_collection():
    return {
        "type": "FeatureCollection",
        "features": [
            _feature({"type": "Polygon", "coordinates": [L_SHAPE]}, fid="L", cls="Tumor"),
            _feature({"type": "Polygon", "coordinates": HOLED}, fid="holed", cls="Stroma"),
            _feature({"type": "Point", "coordinates": [50.25, 60.75]}, fid="pt", cls="Tumor"),
            {**_feature({"type": "Polygon", "coordinates": [_square(100, 100, 40)]}, "cell", fid="cell1",
                        cls="Immune cells"),
             "nucleusGeometry": {"type": "Polygon", "coordinates": [_square(104, 110, 6)]}},  # as QuPath writes it
            _feature(
                {"type": "Polygon", "coordinates": [_square(200, 100, 40)]}, "cell", fid="cell2",
                nucleusGeometry={"type": "Polygon", "coordinates": [_square(210, 104, 2)]},
            ),
            _feature({"type": "MultiPolygon", "coordinates": [[_square(0, 200, 2)], [_square(10, 200, 1)]]}, fid="multi"),
            _feature({"type": "Polygon", "coordinates": [_square(0, 0, 500)]}, "annotation", fid="region", cls="Tumor"),
            _feature({"type": "Polygon", "coordinates": [_square(0, 0, 256)]}, "tile", fid="tile0"),
        ],
    }


def _by_id(frame: pl.DataFrame) -> dict[str, tuple[float, float]]:
    return {r["cell_id"]: (r["x_px"], r["y_px"]) for r in frame.iter_rows(named=True)}


# -- geometry ------------------------------------------------------------------------------------
def test_area_centroids_are_exact():
    np.testing.assert_allclose(area_centroid([[L_SHAPE]]), L_CENTROID, rtol=0, atol=1e-9)
    np.testing.assert_allclose(area_centroid([HOLED]), HOLED_CENTROID, rtol=0, atol=1e-9)
    reversed_hole = [HOLED[0], HOLED[1][::-1]]  # the hole's winding does not matter
    np.testing.assert_allclose(area_centroid([reversed_hole]), HOLED_CENTROID, rtol=0, atol=1e-9)
    # MultiPolygon: area-weighted, (4 * (1, 201) + 1 * (10.5, 200.5)) / 5
    multi = [[_square(0, 200, 2)], [_square(10, 200, 1)]]
    np.testing.assert_allclose(area_centroid(multi), (2.9, 200.9), rtol=0, atol=1e-9)
    assert area_centroid([[[[3, 4], [5, 6], [3, 4]]]]) == (4.0, 5.0)  # no area: vertex mean


# -- QuPath GeoJSON ------------------------------------------------------------------------------
def test_qupath_feature_collection(tmp_path):
    path = _write_json(tmp_path / "S1.geojson", _qupath_collection())
    frame, report = ingest_detections(path, mpp=0.5, tissue="lung")
    cells = _by_id(frame)
    assert set(cells) == {"L", "holed", "pt", "cell1", "cell2", "multi"}
    assert frame["slide_id"].unique().to_list() == ["S1"] and frame["tissue"].unique().to_list() == ["lung"]
    np.testing.assert_allclose(cells["L"], L_CENTROID, atol=1e-9)
    np.testing.assert_allclose(cells["holed"], HOLED_CENTROID, atol=1e-9)
    assert cells["pt"] == (50.25, 60.75)
    assert cells["cell1"] == (107.0, 113.0)  # the nucleus's centre, not the cell's (120, 120)
    assert cells["cell2"] == (211.0, 105.0)
    np.testing.assert_allclose(cells["multi"], (2.9, 200.9), atol=1e-9)
    np.testing.assert_allclose(frame.filter(pl.col("cell_id") == "L")["x_um"][0], L_CENTROID[0] * 0.5)
    assert "label" not in frame.columns  # classes only when asked
    assert any("skipped 1 annotation, 1 tile objects" in n for n in report.notes), report.notes

    labelled, _ = ingest_detections(path, mpp=0.5, tissue="lung", labels_from="classification")
    labels = dict(zip(labelled["cell_id"], labelled["label"], strict=True))
    assert labels == {"L": "Tumor", "holed": "Stroma", "pt": "Tumor", "cell1": "Immune cells", "cell2": None, "multi": None}

    with_regions, report = ingest_detections(path, mpp=0.5, tissue="lung", object_types=["annotation"])
    assert with_regions["cell_id"].to_list() == ["region"] and any("skipped" in n for n in report.notes)
    with pytest.raises(CellsError, match="no objects of type tma_core.*--object-types"):
        ingest_detections(path, mpp=0.5, tissue="lung", object_types=["tma_core"])


def test_bare_list_single_feature_gzip_and_old_qupath(tmp_path):
    feats = [
        _feature({"type": "Point", "coordinates": [10, 20]}, fid="a"),
        {"type": "Feature", "id": "PathCellObject", "geometry": {"type": "Point", "coordinates": [30, 40]},
         "properties": {"name": "old1", "classification": "Tumor"}},  # QuPath 0.2 style
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [7, 8]},
         "properties": {"object_type": "annotation", "name": "ann"}},  # QuPath 0.3 style: skipped
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]}, "properties": {}},
    ]  # fmt: skip
    frame, report = ingest_detections(
        _write_json(tmp_path / "S2_detections.geojson.gz", feats), mpp=0.25, tissue="skin",
        labels_from="classification",
    )  # fmt: skip
    assert frame["slide_id"][0] == "S2"
    assert _by_id(frame) == {"a": (10.0, 20.0), "old1": (30.0, 40.0), "f3": (5.0, 6.0)}
    assert dict(zip(frame["cell_id"], frame["label"], strict=True))["old1"] == "Tumor"
    assert any("no objectType" in n for n in report.notes) and any("1 annotation" in n for n in report.notes)
    one, _ = ingest_detections(_write_json(tmp_path / "one.json", feats[0]), mpp=0.25, tissue="skin", slide_id="X")
    assert one["slide_id"].to_list() == ["X"] and one["cell_id"].to_list() == ["a"]


def test_round_trip_of_our_own_geojson(tmp_path):
    ours = pl.DataFrame({
        "slide_id": ["S9"] * 3, "cell_id": ["c1", "c2", "c3"],
        "x_px": [10.25, 200.5, 33.0], "y_px": [5.75, 40.0, 99.5], "pred_class": ["T", "S", "T"],
    })  # fmt: skip
    [path] = write_geojson(ours, tmp_path / "out")
    frame, _ = ingest_detections(path, mpp=0.5, tissue="lung", labels_from="classification")
    back = frame.sort("cell_id")
    assert back["slide_id"].unique().to_list() == ["S9"]
    assert back["cell_id"].to_list() == ["c1", "c2", "c3"]
    np.testing.assert_array_equal(back["x_px"].to_numpy(), ours["x_px"].to_numpy())
    np.testing.assert_array_equal(back["y_px"].to_numpy(), ours["y_px"].to_numpy())
    assert back["label"].to_list() == ["T", "S", "T"]


def test_scale_and_offset(tmp_path):
    path = _write_json(tmp_path / "crop.geojson", [_feature({"type": "Point", "coordinates": [100, 50]}, fid="p")])
    frame, _ = ingest_detections(path, mpp=0.5, tissue="lung", scale=2.0, offset_px=(10, 20))
    assert _by_id(frame) == {"p": (190.0, 80.0)}
    with pytest.raises(CellsError, match="--scale"):
        ingest_detections(path, mpp=0.5, tissue="lung", scale=0.0)


def test_bad_rows_go_through_the_usual_report(tmp_path):
    text = json.dumps({"type": "FeatureCollection", "features": [
        _feature({"type": "Point", "coordinates": [1, 2]}, fid="ok"),
        _feature({"type": "Point", "coordinates": [3, 4]}, fid="dup"),
        _feature({"type": "Point", "coordinates": [5, 6]}, fid="dup"),
        _feature({"type": "Point", "coordinates": [float("nan"), 6]}, fid="nan"),
        _feature({"type": "Point", "coordinates": [None, 6]}, fid="null"),
        _feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, fid="line"),
    ]})  # fmt: skip
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    frame, report = ingest_detections(path, mpp=0.5, tissue="lung")
    assert sorted(frame["cell_id"]) == ["dup", "ok"] and _by_id(frame)["dup"] == (3.0, 4.0)
    assert report.dropped == {"NaN or infinite centroid": 2, "duplicate cell id in slide, first kept": 1}
    assert any("LineString" in n for n in report.notes)
    with pytest.raises(CellsError, match="--strict"):
        ingest_detections(path, mpp=0.5, tissue="lung", on_bad="error")
    with pytest.raises(CellsError, match="--tissue"):
        ingest_detections(path, mpp=0.5)
    with pytest.raises(CellsError, match="--mpp"):
        ingest_detections(path, tissue="lung")



def test_names_shared_by_many_objects_are_not_ids(tmp_path):
    """QuPath names detections by class ("Tumor"): as ids they would merge distinct cells."""
    feats = [_feature({"type": "Point", "coordinates": [i, i]}, name=("Tumor", "Stroma")[i % 2], cls="x") for i in range(6)]
    path = _write_json(tmp_path / "S4.geojson", {"type": "FeatureCollection", "features": feats})
    frame, report = ingest_detections(path, mpp=0.5, tissue="lung")
    assert frame.height == 6 and sorted(frame["cell_id"]) == [f"f{i}" for i in range(6)] and not report.dropped
    assert any("properties.name repeats" in n for n in report.notes), report.notes
    feats = [_feature({"type": "Point", "coordinates": [i, i]}, name=f"n{i}") for i in range(3)]  # unique: used
    frame, _ = ingest_detections(_write_json(tmp_path / "S5.geojson", feats), mpp=0.5, tissue="lung")
    assert sorted(frame["cell_id"]) == ["n0", "n1", "n2"]

# -- CellViT -------------------------------------------------------------------------------------
def _cellvit_cells():
    return {
        "wsi_metadata": {"base_mpp": 0.25, "target_patch_mpp": 0.25},
        "type_map": {"0": "Background", "1": "Neoplastic", "2": "Inflammatory"},
        "cells": [
            {"bbox": [[8, 18], [13, 23]], "centroid": [20.0, 10.0], "contour": [[18, 8], [22, 8], [22, 12]],
             "type_prob": 0.9, "type": 1},
            {"bbox": [[38, 48], [43, 53]], "centroid": [50.0, 40.0], "contour": [[48, 38], [52, 38], [52, 42]],
             "type_prob": 0.7, "type": 2},
        ],
    }  # fmt: skip


def test_cellvit_cells_json(tmp_path):
    path = _write_json(tmp_path / "S7" / "cells.json", _cellvit_cells())
    frame, report = ingest_detections(path, mpp=0.25, tissue="colon", labels_from="classification")
    assert frame["slide_id"].unique().to_list() == ["S7"]  # the folder CellViT names after the slide
    assert _by_id(frame) == {"0": (20.5, 10.5), "1": (50.5, 40.5)}  # pixel indices -> centres
    assert frame["label"].to_list() == ["Neoplastic", "Inflammatory"]
    assert "cellvit" in report.notes[0]
    old = {**_cellvit_cells(), "type_map": {"Background": 0, "Neoplastic": 1, "Inflammatory": 2}}  # CellViT 1
    frame, _ = ingest_detections(
        _write_json(tmp_path / "S8" / "cell_detection.json", old), mpp=0.5, tissue="colon",
        labels_from="classification",
    )  # fmt: skip
    assert frame["label"].to_list() == ["Neoplastic", "Inflammatory"] and frame["slide_id"][0] == "S8"
    _, report = ingest_detections(path, mpp=0.5, tissue="colon")  # CellViT saw 0.25 µm/px
    assert any("--scale 0.5" in n for n in report.notes), report.notes
    with pytest.raises(CellsError, match="--format cellvit"):
        ingest_detections(path, mpp=0.25, tissue="colon", fmt="geojson")


def test_cellvit_geojson_layers(tmp_path):
    layers = [  # as CellViT writes cell_detection.geojson: one MultiPoint annotation per class
        {"type": "Feature", "id": "u1", "geometry": {"type": "MultiPoint", "coordinates": [[20, 10], [30, 12]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Neoplastic", "color": [255, 0, 0]}}},
        {"type": "Feature", "id": "u2", "geometry": {"type": "MultiPoint", "coordinates": [[50, 40]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Inflammatory", "color": [0, 255, 0]}}},
    ]  # fmt: skip
    path = _write_json(tmp_path / "S7" / "cell_detection.geojson", layers)
    frame, report = ingest_detections(path, mpp=0.25, tissue="colon", labels_from="classification")
    assert _by_id(frame) == {"u1-0": (20.0, 10.0), "u1-1": (30.0, 12.0), "u2-0": (50.0, 40.0)}
    assert frame["label"].to_list() == ["Neoplastic", "Neoplastic", "Inflammatory"]
    assert frame["slide_id"][0] == "S7" and any("cell layers" in n for n in report.notes)
    frame, _ = ingest_detections(path, mpp=0.25, tissue="colon", fmt="cellvit")
    assert _by_id(frame)["u1-1"] == (30.5, 12.5)  # CellViT's pixel-index convention
    polys = [{"type": "Feature", "id": "s1", "geometry": {"type": "MultiPolygon", "coordinates": [
        [_square(0, 0, 2)], [_square(10, 10, 4)]]}, "properties": {"objectType": "annotation"}}]  # fmt: skip
    frame, _ = ingest_detections(_write_json(tmp_path / "S7" / "cells.geojson", polys), mpp=0.25, tissue="c", fmt="cellvit")
    assert _by_id(frame) == {"s1-0": (1.5, 1.5), "s1-1": (12.5, 12.5)}  # one cell per polygon


# -- label images --------------------------------------------------------------------------------
def _labels():
    lab = np.zeros((60, 80), dtype=np.uint16)
    lab[10:14, 20:30] = 5  # centre (25, 12) in our convention
    lab[40:50, 60:61] = 300  # a one-pixel-wide column: (60.5, 45)
    lab[30:33, 5:8] = 7
    lab[33, 5] = 7  # irregular: checked against scipy below
    return lab


def _slide_png(path, width=80, height=60, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_label_image_centroids(tmp_path, suffix):
    lab = _labels()
    path = tmp_path / f"S3_labels{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, lab)
    else:
        Image.fromarray(lab).save(path)
    slide = tmp_path / "slides" / "S3.png"
    slide.parent.mkdir()
    _slide_png(slide)
    frame, report = ingest_detections(path, slides=[slide], mpp=0.5, tissue="lung")
    cells = _by_id(frame)
    assert cells["5"] == (25.0, 12.0) and cells["300"] == (60.5, 45.0)
    cy, cx = ndimage.center_of_mass(lab == 7)
    np.testing.assert_allclose(cells["7"], (cx + 0.5, cy + 0.5))
    assert frame["slide_id"].unique().to_list() == ["S3"] and report.n_out == 3


def test_label_image_size_scale_and_refusals(tmp_path):
    slide = tmp_path / "S4.png"
    _slide_png(slide, width=80, height=60)
    half = tmp_path / "half.tif"
    small = np.zeros((30, 40), np.int32)
    small[10:14, 20:30] = 5
    tifffile.imwrite(half, small)
    with pytest.raises(CellsError, match=r"40x30 px.*80x60 px.*--scale 2"):
        ingest_detections(half, slides=slide, mpp=0.5, tissue="lung")
    frame, _ = ingest_detections(half, slides=slide, mpp=0.5, tissue="lung", scale=2.0)
    assert _by_id(frame)["5"] == (50.0, 24.0)  # (25, 12) at half resolution
    assert frame["slide_id"][0] == "S4"  # the one slide given
    frame, _ = ingest_detections(half, mpp=0.5, tissue="lung", offset_px=(20, 10))  # no slide: no size check
    assert _by_id(frame)["5"] == (5.0, 2.0)

    rgb = tmp_path / "rgb.png"
    _slide_png(rgb)
    with pytest.raises(CellsError, match="colour.*not a label image"):
        ingest_detections(rgb, mpp=0.5, tissue="lung", fmt="labels")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(CellsError, match="not a label image"):
        ingest_detections(tmp_path / "rgb.tif", mpp=0.5, tissue="lung")
    tifffile.imwrite(tmp_path / "prob.tif", np.full((10, 10), 0.5, np.float32))
    with pytest.raises(CellsError, match="non-integer"):
        ingest_detections(tmp_path / "prob.tif", mpp=0.5, tissue="lung")
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((10, 10), np.uint16))
    with pytest.raises(CellsError, match="no labels"):
        ingest_detections(tmp_path / "empty.tif", mpp=0.5, tissue="lung")
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, _labels().astype(np.float32))  # integer-valued floats are labels
    assert ingest_detections(whole, mpp=0.5, tissue="lung")[0].height == 3


def test_label_centroids_are_fast_and_sparse_safe():
    side, block = 1600, 5  # 320 x 320 = 102400 labels
    n = side // block
    lab = (np.arange(n * n, dtype=np.int32).reshape(n, n) + 1).repeat(block, 0).repeat(block, 1)
    t0 = time.perf_counter()
    ids, x, y = label_centroids(lab)
    assert time.perf_counter() - t0 < 5.0
    assert len(ids) == n * n and ids[0] == 1
    assert (x[0], y[0]) == (2.5, 2.5) and (x[-1], y[-1]) == (side - 2.5, side - 2.5)
    sparse = np.zeros((4, 4), np.int64)
    sparse[0, 0], sparse[3, 3] = 10**12, 7  # huge label values are renumbered, not allocated
    ids, x, y = label_centroids(sparse)
    assert ids.tolist() == [7, 10**12] and x.tolist() == [3.5, 0.5]


# -- detection and naming ------------------------------------------------------------------------
def test_format_detection_and_slide_ids(tmp_path):
    assert detect_format(tmp_path) == "xenium"
    assert detect_format("a.geojson.gz") == "geojson" and detect_format("a.json") == "json"
    assert detect_format("a.tiff") == "labels" and detect_format("a.csv") == "table"
    with pytest.raises(CellsError, match="unknown cell source"):
        detect_format("a.xlsx")
    with pytest.raises(CellsError, match="decompress"):
        detect_format("cells.json.snappy")
    bad = _write_json(tmp_path / "odd.json", {"rows": []})
    with pytest.raises(CellsError, match="neither GeoJSON"):
        ingest_detections(bad, mpp=0.5, tissue="lung")
    assert slide_id_for("x/S1.geojson") == "S1"
    assert slide_id_for("x/S1_cells.geojson.gz") == "S1"
    assert slide_id_for("x/S1.svs_detections.json") == "S1"
    assert slide_id_for("x/S1-labels.tif") == "S1"
    assert slide_id_for(tmp_path / "S5" / "cells.json") == "S5"


# -- plain images as slides ----------------------------------------------------------------------
def test_png_tile_opens_as_a_slide_and_crops_match(tmp_path):
    path = tmp_path / "tile.png"
    rgb = _slide_png(path, width=500, height=300, seed=1)
    with Slide(path, mpp=0.5) as s:
        assert s.info.backend == "plain" and s.dimensions == (500, 300) and s.slide_id == "tile"
        x = np.array([250.0, 100.5, 3.0])
        y = np.array([150.0, 60.5, 4.0])
        crops = {"local": CropSpec(16.0, 32)}  # 32 px at 0.5 µm/px: exact copies
        got = {}
        for batch in s.iter_crops(x, y, crops):
            for k, i in enumerate(batch.index):
                got[int(i)] = (batch.images["local"][k], batch.outside["local"][k])
    np.testing.assert_array_equal(got[0][0], rgb[134:166, 234:266])
    np.testing.assert_array_equal(got[1][0], rgb[45:77, 85:117])  # field [84.5, 116.5) -> rounded
    padded, outside = got[2]
    assert outside > 0 and (padded[:12, :] == 255).all()  # outside the image: white
    np.testing.assert_array_equal(padded[12:, 13:], rgb[: 32 - 12, : 32 - 13])
    with pytest.raises(SlideError, match="PNG/JPEG.*--mpp"):
        Slide(path)


def test_plain_images_discovery_and_limits(tmp_path, monkeypatch):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    _slide_png(tiles / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiles / "b.jpg")
    assert [p.name for p in find_slides(tiles)] == ["a.png", "b.jpg"]
    with Slide(tiles / "b.jpg", mpp=0.5) as s:
        assert s.info.backend == "plain" and s.read_level(0, 0, 0, 8, 8).shape == (8, 8, 3)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "S1.svs").write_bytes(b"")
    _slide_png(mixed / "S1_thumb.png")
    assert [p.name for p in find_slides(mixed)] == ["S1.svs"]  # thumbnails next to slides are no slides
    label_png = tmp_path / "lab.png"
    Image.fromarray(_labels()).save(label_png)
    with pytest.raises(SlideError, match="label image"):
        Slide(label_png, mpp=0.5)
    monkeypatch.setattr(slides_mod, "PLAIN_IMAGE_MAX_BYTES", 1000)
    with pytest.raises(SlideError, match="too large"):
        Slide(tiles / "a.png", mpp=0.5)


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_geojson_and_label_image(tmp_path):
    from cli.embed import app

    runner = CliRunner()
    gj = _write_json(tmp_path / "S1.geojson", _qupath_collection())
    out = tmp_path / "gj.parquet"
    res = runner.invoke(app, ["cells", str(gj), "--out", str(out), "--mpp", "0.5", "--tissue", "lung",
                              "--labels-from", "classification", "--scale", "2", "--offset-px", "1,1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    frame = pl.read_parquet(out)
    assert frame.height == 6 and _by_id(frame)["pt"] == (99.5, 120.5) and "label" in frame.columns

    lab = tmp_path / "S3_labels.tif"
    tifffile.imwrite(lab, _labels())
    slide = tmp_path / "S3.png"
    _slide_png(slide)
    out = tmp_path / "lab.parquet"
    res = runner.invoke(app, ["cells", str(lab), "--out", str(out), "--slides", str(slide), "--mpp", "0.5",
                              "--tissue", "lung", "--format", "labels"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _by_id(pl.read_parquet(out))["5"] == (25.0, 12.0)
    res = runner.invoke(app, ["cells", str(lab), "--out", str(out), "--slides", str(slide), "--mpp", "0.5",
                              "--tissue", "lung", "--scale", "2"])  # fmt: skip
    assert isinstance(res.exception, CellsError) and "--scale" in str(res.exception)
    res = runner.invoke(app, ["cells", str(gj), "--out", str(out), "--mpp", "0.5", "--tissue", "l", "--offset-px", "x"])
    assert isinstance(res.exception, CellsError) and "--offset-px" in str(res.exception)


def test_module_exports():
    assert S.FORMATS[0] == "auto" and "labels" in S.FORMATS
