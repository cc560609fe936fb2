"""Extraction from slide files and cell tables as a lab has them: real TIFF layouts (pyramid
levels as top-level pages, Aperio descriptions, OME in nm, RGBA/grey/16-bit pages, 20x scans),
tables with awkward rows, files renamed, given twice or broken. Crops are checked for place and
scale with a marker of known size at a known centroid."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import tifffile
import torch

from embedstore.errors import CellsError, SlideError
from embedstore.extract.pipeline import ExtractConfig, build_steps, extract
from embedstore.geometry import LOCAL_CROP
from embedstore.io.cells import validate_cells
from embedstore.io.slides import Slide
from embedstore.store import Store
from tests.clirun import run_cli
from tests.conftest import FAST, pyramid_levels

CFG = {**FAST, "context_input_px": 64}
CLI = ["--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context", "--context-px", "64",
       "--batch-size", "16", "--quiet"]  # fmt: skip
INK = (40, 20, 120)


def _marked(h: int, w: int, cx: int, cy: int, side: int) -> np.ndarray:
    """Pale background with a dark `side` px square centred on (cx, cy) (pixel centres)."""
    img = np.full((h, w, 3), 230, np.uint8)
    img[cy - side // 2 : cy + side - side // 2, cx - side // 2 : cx + side - side // 2] = INK
    return img


def _pages(path, level0, mpp=None, *, order=None, convert=None, photometric="rgb", first=None,
           desc=None, min_side=64):
    """A pyramid with its levels as top-level pages (what OpenSlide reads), µm/px as resolution
    tags in px/cm per page; `order` lists the levels in the order written; `first` an untiled
    image written before them (a macro/overview)."""
    levels = pyramid_levels(level0, min_side)
    with tifffile.TiffWriter(path) as tw:
        if first is not None:
            tw.write(first, photometric="rgb", metadata=None)
        for i in order or range(len(levels)):
            kw = dict(tile=(64, 64), photometric=photometric, compression="zlib", metadata=None,
                      subfiletype=1 if i else 0)  # OpenSlide takes marked reduced pages as levels
            if mpp is not None:
                kw.update(resolution=(1e4 / (mpp * 2**i),) * 2, resolutionunit="CENTIMETER")
            if desc is not None and i == 0:
                kw["description"] = desc
            tw.write(convert(levels[i]) if convert else levels[i], **kw)
    return levels


def _cells(slide_id, xs, ys, mpp, ids=None):
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    return pl.DataFrame({"slide_id": slide_id, "cell_id": ids if ids is not None else [f"c{i}" for i in range(len(xs))],
                         "x_px": xs, "y_px": ys, "x_um": xs * mpp, "y_um": ys * mpp, "tissue": "breast"})  # fmt: skip


def _marker_stats(images: torch.Tensor) -> torch.Tensor:
    """Per crop: centre of the dark pixels and the side of their square, as fractions of the
    crop (whatever pixel size the crop comes at), padded to 64 values."""
    dark = (images.float().mean(-1) < 135).float()  # (B, H, W)
    n = images.shape[1]
    ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    area = dark.sum((1, 2)).clamp(min=1)
    cx, cy = (dark * xs).sum((1, 2)) / area / n, (dark * ys).sum((1, 2)) / area / n
    out = torch.zeros((len(images), 64))
    out[:, 0], out[:, 1], out[:, 2] = cx, cy, area.sqrt() / n
    return out


# ---------------------------------------------------------------------- place and scale of crops
@pytest.mark.parametrize("mpp", [0.5, 0.2520])
def test_stored_crops_are_centred_on_the_cell_at_the_right_scale(tmp_path, mpp):
    """A 20x scan (0.5 µm/px: the 0.25 µm/px crop is upsampled) and an Aperio 40x one: a 10 µm
    square at the centroid fills 10/56 of the nucleus crop, centred, through the whole pass."""
    side = round(10 / mpp)
    cx, cy = 301, 257
    desc = f"Aperio Image Library v12.0.15\r\n640x512 [0,0 640x512] (64x64) Deflate|AppMag = 40|MPP = {mpp:.4f}"
    (tmp_path / "slides").mkdir()
    _pages(tmp_path / "slides" / "S.svs", _marked(512, 640, cx, cy, side), desc=desc)
    centre = (cx - side // 2 + side / 2, cy - side // 2 + side / 2)
    cfg = ExtractConfig(**CFG)
    steps = build_steps(cfg, torch.device("cpu"))
    steps[0].backbone.forward = _marker_stats
    extract(tmp_path / "slides", _cells("S", [centre[0]], [centre[1]], mpp), tmp_path / "db", cfg, steps=steps)
    with Slide(tmp_path / "slides" / "S.svs") as s:
        assert s.mpp == pytest.approx(mpp) and s.info.backend == "openslide"
    v = Store(tmp_path / "db").load().vectors["local"][0]
    assert v[0] == pytest.approx(0.5, abs=0.02) and v[1] == pytest.approx(0.5, abs=0.02)
    assert v[2] == pytest.approx(side * mpp / 56, rel=0.1)


# ------------------------------------------------------------------------------- slide layouts
def test_level0_that_is_not_the_first_page_is_refused_not_read_as_a_thumbnail(tmp_path):
    """A pyramid written smallest first, or an overview before the scan: the backends take the
    first page for the slide. Refused in one line naming the largest page, not read small."""
    img = _marked(512, 640, 300, 250, 20)
    rev, macro = tmp_path / "reverse.tif", tmp_path / "macro_first.tif"
    n = len(_pages(rev, img, 0.25, order=[3, 2, 1, 0]))
    _pages(macro, img, 0.25, first=np.full((100, 150, 3), 90, np.uint8))
    for path, page in ((rev, n - 1), (macro, 1)):
        with pytest.raises(SlideError, match=rf"page {page} \(640x512 px\).*\[page={page}\]") as err:
            Slide(path, mpp=0.25)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["rgba", "grey", "rgb16", "ome-nm"])
def test_page_kinds_read_as_rgb_in_place(tmp_path, kind):
    img = _marked(512, 640, 300, 250, 40)
    path = tmp_path / "s.tif"
    if kind == "ome-nm":  # levels in SubIFDs (read by tiffslide), PhysicalSize in nm
        path = tmp_path / "s.ome.tif"
        levels = pyramid_levels(img, 64)
        md = dict(axes="YXS", PhysicalSizeX=250.0, PhysicalSizeY=250.0, PhysicalSizeXUnit="nm", PhysicalSizeYUnit="nm")
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(levels[0], tile=(64, 64), photometric="rgb", subifds=len(levels) - 1, metadata=md)
            for lev in levels[1:]:
                tw.write(lev, tile=(64, 64), photometric="rgb", subfiletype=1, metadata=None)
    else:
        convert = {"rgba": lambda a: np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]),
                   "grey": lambda a: a.mean(2).astype(np.uint8),
                   "rgb16": lambda a: a.astype(np.uint16) * 257}[kind]  # fmt: skip
        _pages(path, img, 0.25, convert=convert, photometric="minisblack" if kind == "grey" else "rgb")
    with Slide(path) as s:
        assert s.mpp == pytest.approx(0.25) and len(s.info.level_dimensions) > 1
        crop, outside = s.read(300.0, 250.0, LOCAL_CROP)
    want = np.array(INK) if kind != "grey" else np.full(3, np.mean(INK).astype(np.uint8))
    assert outside == 0 and np.abs(crop[112, 112].astype(int) - want).max() <= 2
    dark = crop.mean(2) < 135
    assert dark.sum() == 40 * 40 and (crop[0, 0] == 230).all()


def test_untiled_planar_rgb_tiff_is_a_slide(tmp_path):
    """RGB stored as three planes (PlanarConfiguration 2), untiled: read like interleaved RGB."""
    img = _marked(300, 400, 200, 150, 20)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(img, 2, 0), photometric="rgb", planarconfig="separate",
                     resolution=(1e4 / 0.5,) * 2, resolutionunit="CENTIMETER")
    with Slide(path) as s:
        assert s.mpp == pytest.approx(0.5) and s.dimensions == (400, 300)
        np.testing.assert_array_equal(s.read_level(0, 0, 0, 400, 300), img)


# ---------------------------------------------------------------------- small slides, tiled mode
def test_slide_smaller_than_a_field_and_a_tile_exact_and_tiled(tmp_path):
    """A 100x75 µm core at 0.5 µm/px, cells on its borders: both modes store every cell, the
    context vectors of the two modes point the same way (mean pooling in both)."""
    (tmp_path / "slides").mkdir()
    _pages(tmp_path / "slides" / "core.tif", _marked(150, 200, 100, 75, 10), 0.5, min_side=32)
    cells = _cells("core", [0, 199.99, 100, 0.5, 199.5], [0, 149.99, 75, 149.5, 0.5], 0.5)
    for mode in ("exact", "tiled"):
        cfg = ExtractConfig(**CFG, context=mode, table=mode, tile_px=128, tile_overlap_px=64, context_pooling="mean" if mode == "exact" else None)
        summary = extract(tmp_path / "slides", cells, tmp_path / "db", cfg)
        assert summary["written"] == 5 and summary["outside_dropped"] == 0
    store = Store(tmp_path / "db")
    a, b = (store.load(t) for t in ("exact", "tiled"))
    order = [b.meta["cell_id"].to_list().index(c) for c in a.meta["cell_id"]]
    ca, cb = a.vectors["context"], b.vectors["context"][order]
    cos = (ca * cb).sum(1) / np.linalg.norm(ca, axis=1) / np.linalg.norm(cb, axis=1)
    assert cos.min() > 0.8


# --------------------------------------------------------------------------- files given, moved
def _slides_dir(tmp_path, names=("S1",), mpp=0.5):
    d = tmp_path / "slides"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    frames = []
    for name in names:
        _pages(d / f"{name}.tif", rng.integers(0, 255, (256, 320, 3), dtype=np.uint8), mpp)
        frames.append(_cells(name, rng.uniform(0, 320, 6), rng.uniform(0, 256, 6), mpp))
    pl.concat(frames).write_parquet(tmp_path / "cells.parquet")
    return d


def _extract_cli(tmp_path, *slides):
    return run_cli("cli.embed", "extract", *slides, "--cells", tmp_path / "cells.parquet", "--db", tmp_path / "db", *CLI)


def _keys(tmp_path):
    k = Store(tmp_path / "db").keys_frame("cells")
    return k.height, k.unique().height


def test_one_slide_file_given_twice_is_one_slide(tmp_path):
    """`embed extract slides/ slides/S1.tif` (a folder and a glob that overlap): one slide."""
    d = _slides_dir(tmp_path)
    r = _extract_cli(tmp_path, d, d / "S1.tif", d / ".." / "slides" / "S1.tif")
    assert r.returncode == 0, r.stderr
    assert _keys(tmp_path) == (6, 6)


def test_slide_renamed_between_runs_is_not_stored_twice_nor_failed(tmp_path):
    d = _slides_dir(tmp_path)
    assert _extract_cli(tmp_path, d).returncode == 0
    (d / "S1.tif").rename(d / "S1.svs")  # same id: its cells are there already
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 0 and "0 new cells (6 already there)" in r.stderr
    (d / "S1.svs").rename(d / "S1_HE.svs")  # another id: S1's cells are all stored, nothing to read
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 0, r.stderr
    assert _keys(tmp_path) == (6, 6)


def test_missing_slide_with_cells_to_extract_names_a_case_twin(tmp_path):
    d = _slides_dir(tmp_path, ("S1", "S2"))
    (d / "S2.tif").rename(d / "s2.tif")
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "S2: no slide file with this id" in r.stderr and "'s2'" in r.stderr
    assert _keys(tmp_path) == (6, 6)  # S1 stored


def test_corrupt_slide_among_good_ones_is_named_and_the_others_stored(tmp_path):
    d = _slides_dir(tmp_path, ("good1", "bad", "good2"))
    data = bytearray((d / "bad.tif").read_bytes())
    n = len(data)
    data[n // 10 : n // 2] = bytes(n // 2 - n // 10)  # tile data zeroed, header intact
    (d / "bad.tif").write_bytes(bytes(data))
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "1 slide(s) failed" in r.stderr and "bad: " in r.stderr and "corrupt or truncated" in r.stderr
    assert _keys(tmp_path) == (12, 12)
    assert set(Store(tmp_path / "db").keys_frame("cells")["slide_id"]) == {"good1", "good2"}


# --------------------------------------------------------------------------------- cell tables
def test_int_ids_and_border_and_outside_cells(tmp_path):
    d = _slides_dir(tmp_path)
    cells = _cells("S1", [0.0, 319.999, 320.0, -0.01, 100.0], [0.0, 255.999, 10.0, 10.0, 100.0], 0.5, ids=[1, 2, 3, 4, 5])
    cells.write_parquet(tmp_path / "cells.parquet")
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 0 and "2 centroids outside the slide" in r.stderr
    assert sorted(Store(tmp_path / "db").keys_frame("cells")["cell_id"]) == ["1", "2", "5"]
    r = _extract_cli(tmp_path, d)  # ints again: the stored text ids match
    assert r.returncode == 0 and "0 new cells (3 already there)" in r.stderr


def test_missing_micrometres_in_a_cells_table_are_refused_in_one_line():
    cells = _cells("S1", [10.0, 20.0], [10.0, 20.0], 0.5).with_columns(x_um=pl.lit(None, pl.Float64))
    with pytest.raises(CellsError, match=r"x_um.*embed cells") as err:
        validate_cells(cells)
    assert "\n" not in str(err.value)


def test_null_centroids_in_a_cells_table_are_refused_not_dropped_as_outside(tmp_path):
    """Arrow/polars write a missing coordinate as null (pandas as NaN): both are refused."""
    d = _slides_dir(tmp_path)
    cells = _cells("S1", [10.0, 20.0], [10.0, 20.0], 0.5).with_columns(
        x_px=pl.Series([None, 20.0], dtype=pl.Float64))
    cells.write_parquet(tmp_path / "cells.parquet")
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "1 cells have missing or NaN/inf centroids, e.g. ['c0']" in r.stderr


def test_slide_id_written_as_a_file_name_names_the_slide_it_means(tmp_path):
    d = _slides_dir(tmp_path)
    pl.read_parquet(tmp_path / "cells.parquet").with_columns(slide_id=pl.lit("S1.svs")).write_parquet(tmp_path / "cells.parquet")
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 2 and "S1.svs: no slide file with this id" in r.stderr and "gives the id 'S1'" in r.stderr


def test_two_files_of_one_id_are_refused_saying_how_to_fix(tmp_path):
    d = _slides_dir(tmp_path)
    (d / "S1.svs").write_bytes((d / "S1.tif").read_bytes())  # S1.svs and S1.tif: one id, two files
    r = _extract_cli(tmp_path, d)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "share the id 'S1'" in r.stderr and "give one of them" in r.stderr
