import re
import warnings

import numpy as np
import polars as pl
import pytest

from embedstore.errors import SlideError
from embedstore.geometry import CONTEXT_CROP, LOCAL_CROP, CropSpec
from embedstore.io.slides import PAD_VALUE, Slide, find_slides, slide_id_from_path
from embedstore.synth import write_pyramid


@pytest.fixture
def slide_files(tmp_path, gradient_image):
    paths = {}
    for fmt, ext in (("svs", ".svs"), ("tiff", ".tiff"), ("ome", ".ome.tif")):
        paths[fmt] = tmp_path / f"grad_{fmt}{ext}"
        write_pyramid(paths[fmt], gradient_image, 0.25, fmt, compression="zlib")
    return paths


@pytest.mark.parametrize(
    "fmt,backend,source",
    [("svs", "openslide", "openslide.mpp-x"), ("tiff", "openslide", "openslide.mpp-x"), ("ome", "tiffslide", "tiffslide.mpp-x")],
)
def test_mpp_from_each_kind_of_file(slide_files, fmt, backend, source):
    with Slide(slide_files[fmt]) as s:
        assert s.mpp == pytest.approx(0.25)
        assert s.info.backend == backend
        assert s.info.mpp_source == source
        assert len(s.info.level_dimensions) >= 2
        assert s.dimensions == (2048, 1536)


def test_ome_physical_size_is_read_when_backends_say_nothing(tmp_path, gradient_image):
    from embedstore.io.slides import _ome_mpp

    path = tmp_path / "x.ome.tif"
    write_pyramid(path, gradient_image, 0.5031, "ome", compression="zlib")
    assert _ome_mpp(path) == pytest.approx((0.5031, 0.5031))


def test_slide_without_mpp_is_refused_unless_overridden(tmp_path, gradient_image):
    path = tmp_path / "nompp.tiff"
    write_pyramid(path, gradient_image, None, "tiff", compression="zlib")
    with pytest.raises(SlideError, match="--mpp"):
        Slide(path)
    with Slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.info.mpp_source == "override"


def test_override_wins_with_a_warning(slide_files):
    with pytest.warns(UserWarning, match="overrides"):
        with Slide(slide_files["svs"], mpp=0.5) as s:
            assert s.mpp == 0.5


def test_corrupt_and_missing_slides(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(5000))
    with pytest.raises(SlideError, match="cannot open"):
        Slide(bad)
    with pytest.raises(SlideError, match="no such"):
        Slide(tmp_path / "missing.svs")
    with pytest.raises(SlideError, match="no such"):
        find_slides(tmp_path / "nowhere")


def test_slide_ids_and_discovery(slide_files):
    assert slide_id_from_path("a/b/S1.ome.tif") == "S1"
    assert slide_id_from_path("S2.svs") == "S2"
    assert slide_id_from_path("scans/big.ome.btf") == "big"
    found = find_slides(slide_files["svs"].parent)
    assert {slide_id_from_path(p) for p in found} == {"grad_svs", "grad_tiff", "grad_ome"}


@pytest.mark.parametrize("fmt", ["svs", "ome"])
def test_exact_crop_matches_the_array(slide_files, gradient_image, fmt):
    with Slide(slide_files[fmt]) as s:
        crop, outside = s.read(1000.0, 700.0, LOCAL_CROP)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8 and outside == 0.0
    # the field [888, 1112) x [588, 812) is centred exactly on the point (1000, 700)
    np.testing.assert_array_equal(crop, gradient_image[700 - 112 : 700 + 112, 1000 - 112 : 1000 + 112])


def test_coarser_target_reads_a_coarser_level(slide_files, gradient_image):
    spec = CONTEXT_CROP.resized(256)  # 256 µm at 1 µm/px -> level 2 (downsample 4)
    with Slide(slide_files["tiff"]) as s:
        plan = s.plan(spec)
        assert plan.level == 2 and plan.exact
        crop, _ = s.read(1024.0, 768.0, spec)
    ref = gradient_image.reshape(384, 4, 512, 4, 3).mean((1, 3))[192 - 128 : 192 + 128, 256 - 128 : 256 + 128]
    assert np.abs(crop.astype(float) - ref).max() <= 2


def test_resampled_crop_is_centred(tmp_path):
    # a slide at 0.2 µm/px: a 56 µm crop is 280 level px resampled to 224
    img = np.full((1200, 1200, 3), 240, np.uint8)
    img[595:605, 795:805] = 0  # a dark 10x10 square centred on (800, 600)
    path = tmp_path / "fine.tiff"
    write_pyramid(path, img, 0.2, "tiff", compression="zlib")
    with Slide(path) as s:
        plan = s.plan(LOCAL_CROP)
        assert not plan.exact and plan.scale == pytest.approx(1.25)
        crop, _ = s.read(800.0, 600.0, LOCAL_CROP)
    dark = crop.mean(axis=2) < 120
    ys, xs = np.nonzero(dark)
    assert abs(xs.mean() + 0.5 - 112) < 0.6 and abs(ys.mean() + 0.5 - 112) < 0.6
    assert dark.sum() == pytest.approx(64, abs=16)  # 10 px * 0.8 = 8 px square


def test_out_of_slide_is_white_and_reported(slide_files):
    with Slide(slide_files["svs"]) as s:
        crop, outside = s.read(0.0, 0.0, LOCAL_CROP)
        assert outside == pytest.approx(0.75)
        assert (crop[:112, :112] == PAD_VALUE).all() and not (crop[112:, 112:] == PAD_VALUE).all()
        crop, outside = s.read(-5000.0, 10.0, LOCAL_CROP)
        assert outside == 1.0 and (crop == PAD_VALUE).all()


@pytest.mark.parametrize("mpp", [0.25, 0.2])
def test_batch_reader_equals_per_cell_reads(tmp_path, gradient_image, mpp):
    path = tmp_path / "s.svs"
    write_pyramid(path, gradient_image, mpp, "svs", compression="zlib")
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-50, 2100, 60), rng.uniform(-50, 1600, 60)
    specs = {"local": LOCAL_CROP, "context": CONTEXT_CROP.resized(256)}
    with Slide(path) as s:
        seen = np.zeros(60, int)
        n_groups = 0
        for batch in s.iter_crops(x, y, specs, region_um=128.0):
            n_groups += 1
            for k, i in enumerate(batch.index):
                seen[i] += 1
                for name, spec in specs.items():
                    single, outside = s.read(x[i], y[i], spec)
                    diff = np.abs(batch.images[name][k].astype(int) - single.astype(int)).max()
                    assert diff <= 1, (name, i, diff)
                    assert batch.outside[name][k] == pytest.approx(outside)
    assert (seen == 1).all() and 1 < n_groups < 60


def test_crop_is_centred_on_a_synthetic_nucleus(tmp_path):
    """The nucleus' own ellipse (truth size and angle), slid over the crop, covers the most
    haematoxylin when placed at the crop's centre."""
    from embedstore.synth import make_synthetic

    res = make_synthetic(tmp_path / "syn", seed=3, n_cells=200, n_slides=1)
    truth = pl.read_parquet(res.truth_path)
    spec = CropSpec(16.0, 64)  # a 16 µm window at 0.25 µm/px
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    shifts = [(dx, dy) for dx in range(-6, 7) for dy in range(-6, 7)]
    offsets = []
    with Slide(res.slides[0].path) as s:
        for row in truth.head(60).iter_rows(named=True):
            crop, _ = s.read(row["x_px"], row["y_px"], spec)
            od = -np.log((crop.astype(float) + 1) / 256).sum(axis=2)  # optical density
            a = row["nucleus_length_um"] / 2 / 0.25
            b = row["nucleus_width_um"] / 2 / 0.25
            c, s_ = np.cos(np.radians(row["nucleus_angle_deg"])), np.sin(np.radians(row["nucleus_angle_deg"]))

            def inside(dx, dy, a=a, b=b, c=c, s_=s_):
                u = (xx - 32 - dx) * c + (yy - 32 - dy) * s_
                v = -(xx - 32 - dx) * s_ + (yy - 32 - dy) * c
                return (u / a) ** 2 + (v / b) ** 2 <= 1

            score = [od[inside(dx, dy)].mean() for dx, dy in shifts]
            dx, dy = shifts[int(np.argmax(score))]
            offsets.append(np.hypot(dx, dy))
    assert np.median(offsets) <= 1.0, offsets
    assert np.mean(np.array(offsets) <= 2) >= 0.8, offsets


def _rgb(h=512, w=512):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "resolution,unit,mpp",
    [(600, "INCH", None), (300, "INCH", None), (101600, "INCH", 0.25), (20000, "CENTIMETER", 0.5), (5000, "CENTIMETER", 2.0)],
)
def test_print_dpi_is_not_a_scan_resolution(tmp_path, resolution, unit, mpp):
    import tifffile

    path = tmp_path / f"res_{resolution}.tif"
    tifffile.imwrite(path, _rgb(), resolution=(resolution, resolution), resolutionunit=unit)
    if mpp is None:  # 600 DPI would be 42.3 µm/px, inside MPP_RANGE: still no scan's
        with pytest.raises(SlideError, match=rf"{resolution} DPI, is a print/screen setting.*--mpp"):
            Slide(path)
        with Slide(path, mpp=0.5) as s:
            assert s.mpp == 0.5
    else:
        with Slide(path) as s:
            assert s.mpp == pytest.approx(mpp)


def test_16_bit_rgb_tiff_is_read_as_8_bit_like_openslide(tmp_path):
    import tifffile

    rgb = _rgb()
    untiled, tiled = tmp_path / "rgb16.tif", tmp_path / "rgb16_tiled.tif"
    tifffile.imwrite(untiled, rgb.astype(np.uint16) * 257, photometric="rgb")
    tifffile.imwrite(tiled, rgb.astype(np.uint16) * 257, photometric="rgb", tile=(256, 256))
    with Slide(untiled, mpp=0.5) as a, Slide(tiled, mpp=0.5) as b:
        np.testing.assert_array_equal(a.read_level(0, 0, 0, 512, 512), rgb)
        np.testing.assert_array_equal(b.read_level(0, 0, 0, 512, 512), rgb)


@pytest.mark.parametrize("tile", [None, (256, 256)])
def test_label_images_are_refused_even_with_mpp(tmp_path, tile):
    import tifffile

    labels = np.random.default_rng(0).integers(0, 1000, (384, 512), dtype=np.int32)
    path = tmp_path / "labels.tif"
    tifffile.imwrite(path, labels, tile=tile, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    for mpp in (None, 0.5):
        with pytest.raises(SlideError, match="int32 pixels.*label image or mask is not a slide"):
            Slide(path, mpp=mpp)


def test_empty_file_and_tiff_without_images_say_so(tmp_path, caplog):
    empty, no_pages = tmp_path / "empty.tif", tmp_path / "nopages.svs"
    empty.write_bytes(b"")
    no_pages.write_bytes(b"II*\x00\x00\x00\x00\x00")  # a TIFF header whose first page offset is 0
    with pytest.raises(SlideError, match=r"the file is empty \(0 bytes\)"):
        Slide(empty)
    with pytest.raises(SlideError, match="the TIFF has no images") as err:
        Slide(no_pages)
    assert "IndexError" not in str(err.value)
    assert not [r for r in caplog.records if r.name == "tifffile"]  # no stray log lines


def test_mpp_override_range_in_the_message(tmp_path):
    import tifffile

    path = tmp_path / "tile.tif"
    tifffile.imwrite(path, _rgb(64, 64))
    with Slide(path, mpp=0.01) as s:
        assert s.mpp == 0.01
    with pytest.raises(SlideError, match=r"expected 0\.01-50\)"):
        Slide(path, mpp=51)


def test_ome_bigtiff_is_found_and_read(tmp_path):
    import tifffile

    path = tmp_path / "big.ome.btf"
    md = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    tifffile.imwrite(path, _rgb(), bigtiff=True, ome=True, photometric="rgb", metadata=md)
    assert find_slides(tmp_path) == [path]
    with Slide(path) as s:
        assert s.slide_id == "big" and s.mpp == pytest.approx(0.5) and s.info.mpp_source == "ome"


def _imagej_tiff(path, unit, per_unit, tile=None):
    """A TIFF as ImageJ, Fiji and QuPath write it: ResolutionUnit NONE, X/YResolution in pixels
    per `unit`, the unit in the description (tifffile writes ASCII only: µ goes in by hand)."""
    import tifffile

    if unit.isascii():
        kw = dict(imagej=True, metadata={"unit": unit})
    else:
        desc = f"ImageJ=1.54f\nimages=1\nunit={unit}\n".encode()
        kw = dict(description=desc, metadata=None, resolutionunit="NONE")
    tifffile.imwrite(path, _rgb(), resolution=(per_unit, per_unit), tile=tile, **kw)


@pytest.mark.parametrize(
    "unit,per_unit,mpp,tile",
    [
        ("um", 1 / 0.5, 0.5, None),
        ("\\u00B5m", 1 / 0.5, 0.5, None),  # ImageJ's escaped micro sign
        ("\u00b5m", 1 / 0.5, 0.5, None),
        ("\u03bcm", 1 / 0.5, 0.5, None),  # Greek mu
        ("micron", 4, 0.25, (256, 256)),  # tiled: OpenSlide opens it, without a µm/px
        ("nm", 1 / 250, 0.25, None),
        ("mm", 2000, 0.5, None),
        ("inch", 101600, 0.25, None),  # above PRINT_DPI_MAX: a scan's resolution
    ],
)
def test_imagej_unit_gives_the_mpp(tmp_path, unit, per_unit, mpp, tile):
    from embedstore.io.slides import _mpp_from_metadata

    path = tmp_path / "fiji.tif"
    _imagej_tiff(path, unit, per_unit, tile)
    with Slide(path) as s:
        assert s.mpp == pytest.approx(mpp) and s.info.mpp_source == "imagej"
    # a backend's plausible µm/px still comes first
    mpp_x, _, source = _mpp_from_metadata(path, {"openslide.mpp-x": "0.3"}, "openslide")
    assert (mpp_x, source) == (0.3, "openslide.mpp-x")


@pytest.mark.parametrize(
    "unit,per_unit,match",
    [("pixel", 1 / 0.5, r"no µm per pixel.*--mpp"), ("inch", 600, r"600 DPI, is a print/screen")],
)
def test_imagej_pixel_unit_and_print_dpi_are_no_mpp(tmp_path, unit, per_unit, match):
    path = tmp_path / "fiji.tif"
    _imagej_tiff(path, unit, per_unit)
    with pytest.raises(SlideError, match=match):
        Slide(path)


def _write_pixel_size(path, kind, x, y):
    """A slide whose pixels are `x` by `y` µm, saying so the way `kind` of file does."""
    import tifffile

    if kind == "imagej":
        kw = dict(imagej=True, resolution=(1 / x, 1 / y), metadata={"unit": "um"})
    elif kind == "tiff":
        kw = dict(tile=(256, 256), resolution=(1e4 / x, 1e4 / y), resolutionunit="CENTIMETER")
    else:  # OME, y in nm; "ome+tags" has resolution tags too (tiffslide reads those first)
        md = dict(axes="YXS", PhysicalSizeX=x, PhysicalSizeY=y * 1e3, PhysicalSizeYUnit="nm")
        kw = dict(ome=True, photometric="rgb", metadata=md)
        if kind == "ome+tags":
            kw.update(resolution=(1e4 / x, 1e4 / y), resolutionunit="CENTIMETER")
    tifffile.imwrite(path, _rgb(), **kw)


@pytest.mark.parametrize(
    "kind,source",
    [
        ("ome", "ome"),
        ("ome+tags", "tiffslide.mpp-x"),
        ("tiff", "openslide.mpp-x"),
        ("imagej", "imagej"),
    ],
)
def test_non_square_pixels_warn_once(tmp_path, kind, source):
    path, square = tmp_path / "tall.ome.tif", tmp_path / "square.ome.tif"
    _write_pixel_size(path, kind, 0.25, 0.30)
    _write_pixel_size(square, kind, 0.25, 0.251)  # within 2%
    message = "tall.ome.tif: pixels are 0.25 µm wide but 0.3 µm tall"
    message = re.escape(message) + r".*x size.*squashed vertically by 17%.*square pixels"
    with pytest.warns(UserWarning, match=message) as record:
        with Slide(path) as s:
            assert s.mpp == pytest.approx(0.25) and s.info.mpp_source == source
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Slide(square).close()
        Slide(path, mpp=0.25).close()  # --mpp is one size for both axes
