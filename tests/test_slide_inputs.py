"""Slide files as scanners, converters and copies leave them, opened and read as `embed extract`
and `embed doctor` do: TIFFs cut short by a partial copy, images whose content is not what their
file name says, and file names as labs write them."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from embedstore.doctor import blocking, check_slides
from embedstore.errors import SlideError
from embedstore.geometry import LOCAL_CROP
from embedstore.io.slides import PlainImage, Slide, find_slides, slide_id_from_path


def _image(h: int = 512, w: int = 640) -> np.ndarray:
    """Pale background with a dark 20 px square at (300, 250)."""
    img = np.full((h, w, 3), 230, np.uint8)
    img[240:260, 290:310] = (40, 20, 120)
    return img


def _tiled_tiff(path, mpp: float = 0.25, **kw) -> None:
    tifffile.imwrite(path, _image(), photometric="rgb", tile=(64, 64), compression="jpeg", metadata=None,
                     resolution=(1e4 / mpp,) * 2, resolutionunit="CENTIMETER", **kw)  # fmt: skip


# ------------------------------------------------------------------------------- partial copies
@pytest.mark.parametrize("keep", [435, 0.3])
def test_tiff_cut_off_in_its_tile_table_is_refused_at_open(tmp_path, keep):
    """A copy cut off inside the first page's tag values (435 bytes: the tile offsets are past
    the end) opened through tifffile with no tiles at all: every crop was black, and `embed
    doctor` passed the slide as ok. One cut off in its tile data failed only at the first read
    of a missing tile; both are now refused when opened, saying what is wrong."""
    good, path = tmp_path / "good.tif", tmp_path / "cut.tif"
    _tiled_tiff(good)
    data = good.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    message = r"cut\.tif: the file is corrupt or truncated \(.*\); copy it again"
    with pytest.raises(SlideError, match=message) as err:
        Slide(path)
    assert "\n" not in str(err.value)
    (check,) = blocking(check_slides([path], None))
    assert "corrupt or truncated" in check.detail and "copy the file again" in check.fix
    with Slide(good) as s:  # the whole file still reads
        crop, _ = s.read(300.0, 250.0, LOCAL_CROP)
    assert abs(crop[112, 112].astype(int) - (40, 20, 120)).max() <= 8


# ------------------------------------------------------------------ content other than the name
@pytest.mark.parametrize("name,fmt,ext", [("core.svs", "PNG", ".png"), ("core 1.ome.tif", "JPEG", ".jpg"),
                                          ("kern_ä.tif", "PNG", ".png")])  # fmt: skip
def test_png_or_jpeg_under_a_slide_name_says_what_it_is(tmp_path, name, fmt, ext):
    """A PNG/JPEG export saved as .svs/.tif was refused as "cannot open ... the file may be
    corrupt or truncated", and `embed doctor` said to copy the file again, which cannot help.
    Now the message says what the file is and the name to give it (plain images need --mpp)."""
    path = tmp_path / name
    Image.fromarray(_image()).save(path, format=fmt)
    new_name = slide_id_from_path(path) + ext
    for mpp in (None, 0.5):
        with pytest.raises(SlideError, match=rf"is a {fmt} image.*rename it to '{new_name}'.*--mpp") as err:
            Slide(path, mpp=mpp)
        assert "corrupt" not in str(err.value) and "\n" not in str(err.value)
    (check,) = blocking(check_slides([path], None))
    assert f"is a {fmt} image" in check.detail and "copy" not in check.fix and "--mpp" not in check.fix
    renamed = path.rename(tmp_path / new_name)
    with Slide(renamed, mpp=0.5) as s:  # renamed as the message says, it reads
        assert s.dimensions == (640, 512)


# ----------------------------------------------------------------- colours stored other than RGB
def _stored_as(kind: str) -> tuple[np.ndarray, dict, tuple[int, int, int]]:
    """`_image()` stored as `kind` of TIFF pixels: (data, tifffile options, the ink's true RGB)."""
    grey = _image().mean(2).astype(np.uint8)  # the ink is grey 60
    if kind == "palette":  # grey ramp, index 60 red (ImageJ's "8-bit Color", GIF-born TIFFs)
        cmap = np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))
        cmap[0, 60] = 65535
        return grey, dict(photometric="palette", colormap=cmap), (255, 60, 60)
    if kind == "miniswhite":
        return 255 - grey, dict(photometric="miniswhite"), (60, 60, 60)
    if kind == "ycbcr":  # uncompressed YCbCr (JPEG-compressed YCbCr, as in SVS, reads right)
        ycc = np.asarray(Image.fromarray(_image()).convert("YCbCr"))
        return ycc, dict(photometric="ycbcr", subsampling=(1, 1)), (40, 20, 120)
    cmyk = np.dstack([255 - _image(), np.zeros(grey.shape, np.uint8)])  # Photoshop's print CMYK
    return cmyk, dict(photometric="separated"), (40, 20, 120)


@pytest.mark.parametrize("kind", ["palette", "miniswhite", "cmyk", "ycbcr"])
def test_tiffs_storing_colours_other_than_rgb_are_never_read_in_wrong_colours(tmp_path, kind):
    """Untiled, such TIFFs were read through tifffile as stored: palette indices as grey levels,
    min-is-white grey inverted, CMYK as RGBA (its K as alpha: all white), YCbCr as if RGB. An
    OME pyramid of them in SubIFDs went the same way although OpenSlide reads its level 0 right.
    Now the untiled one is refused saying how to convert it; the pyramid is read by OpenSlide."""
    data, kw, ink = _stored_as(kind)
    res = dict(resolution=(1e4 / 0.25,) * 2, resolutionunit="CENTIMETER")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, data, metadata=None, **res, **kw)
    message = r"flat\.tif: .* pixels, which .*convert it to RGB, e.g. `vips colourspace"
    with pytest.raises(SlideError, match=message) as err:
        Slide(flat)
    assert "\n" not in str(err.value)
    pyramid = tmp_path / "pyramid.ome.tif"
    levels = [data, data[::2, ::2], data[::4, ::4]]
    md = dict(axes="YXS" if data.ndim == 3 else "YX", PhysicalSizeX=0.25, PhysicalSizeY=0.25)
    with tifffile.TiffWriter(pyramid, ome=True) as tw:
        tw.write(levels[0], tile=(64, 64), subifds=2, metadata=md, **kw)
        for level in levels[1:]:
            tw.write(level, tile=(64, 64), subfiletype=1, metadata=None, **kw)
    with Slide(pyramid) as s:
        crop, _ = s.read(300.0, 250.0, LOCAL_CROP)
        assert s.info.backend == "openslide" and s.mpp == pytest.approx(0.25)
    for got, want in ((crop[112, 112], ink), (crop[0, 0], (230, 230, 230))):
        assert np.abs(got.astype(int) - want).max() <= 3, (got, want)  # YCbCr rounds


def test_a_tiled_label_image_marked_reduced_is_not_read_as_a_pyramid_level(tmp_path):
    """A generic tiled TIFF whose label/macro image (another shape) is a tiled page marked
    reduced-resolution: OpenSlide lists it as a level (downsample 5.2 from the mean of its sides)
    and a coarse field (8 µm/px) was cut from the label image: the crop showed no tissue. Levels
    that are not level 0 scaled by one factor are now never read."""
    from embedstore.geometry import CropSpec

    path = tmp_path / "with_label.tif"
    big = np.kron(_image(), np.ones((4, 4, 1), np.uint8))  # 2560x2048, the ink square at the centre
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate([big, big[::2, ::2]]):
            tw.write(level, tile=(256, 256), photometric="rgb", subfiletype=1 if i else 0, metadata=None,
                     resolution=(1e4 / (0.25 * 2**i),) * 2, resolutionunit="CENTIMETER")  # fmt: skip
        tw.write(np.full((300, 700, 3), 10, np.uint8), tile=(64, 64), photometric="rgb", subfiletype=1, metadata=None)
    spec = CropSpec(512.0, 64)  # 8 µm/px
    with Slide(path) as s:
        assert s.info.level_dimensions[2] == (700, 300)  # as OpenSlide lists it
        assert s.plan(spec).level == 1
        crop, _ = s.read(1200.0, 1000.0, spec)
    assert np.median(crop) == 230 and crop.min() < 200  # the tissue image, the ink square in it


def test_ome_tiff_with_colour_channels_as_planes_is_read_in_colour(tmp_path):
    """Bio-Formats can write RGB as three one-channel planes (axes CYX). Tiled, OpenSlide opens
    it as a generic TIFF of one grey page, its red plane: every crop came out grey."""
    path = tmp_path / "planes.ome.tif"
    md = dict(axes="CYX", PhysicalSizeX=0.25, PhysicalSizeY=0.25)
    tifffile.imwrite(path, np.moveaxis(_image(), 2, 0).copy(), ome=True, photometric="minisblack",
                     tile=(64, 64), metadata=md)  # fmt: skip
    with Slide(path) as s:
        assert s.mpp == pytest.approx(0.25) and s.dimensions == (640, 512)
        np.testing.assert_array_equal(s.read_level(0, 0, 0, 640, 512), _image())


# ------------------------------------------------------------------------------------ file names
@pytest.mark.parametrize("name", ["S1.ome.tf2", "S1.ome.tf8", "S1.tf2"])
def test_bio_formats_bigtiff_names_are_slides_with_their_ome_mpp(tmp_path, name):
    """bfconvert names the BigTIFFs it writes .ome.tf2/.ome.tf8: a folder of them was "no slide
    files found", and one given by name was refused for want of --mpp although its OME-XML says
    0.25 µm/px."""
    path = tmp_path / name
    md = dict(axes="YXS", PhysicalSizeX=250.0, PhysicalSizeY=250.0,
              PhysicalSizeXUnit="nm", PhysicalSizeYUnit="nm")  # fmt: skip
    tifffile.imwrite(path, _image(), ome=True, bigtiff=True, photometric="rgb", tile=(64, 64), metadata=md)
    (tmp_path / "S1_thumb.png").write_bytes(b"")  # a plain image next to it is no slide
    assert find_slides(tmp_path) == [path] and slide_id_from_path(path) == "S1"
    with Slide(path) as s:
        assert s.mpp == pytest.approx(0.25) and s.info.mpp_source == "ome"


def test_macos_appledouble_files_in_a_slide_folder_are_not_slides(tmp_path):
    """Slides copied from a Mac onto an exFAT/SMB share sit next to 4 KB "._S1.svs" AppleDouble
    files. A folder scan took them as slides: `embed doctor` failed the run on each ("cannot
    open as a whole-slide image"). Hidden files are now left out of folder scans; a hidden file
    named on the command line is still a slide."""
    slide, apple = tmp_path / "S1.tif", tmp_path / "._S1.tif"
    _tiled_tiff(slide)
    apple.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))
    assert find_slides(tmp_path) == [slide]
    assert find_slides([tmp_path, apple]) == [slide, apple]
    checks = check_slides([tmp_path], None)
    assert [c.name for c in checks] == ["S1.tif"] and not blocking(checks)


def test_ome_mpp_is_the_first_images_not_its_macro_images(tmp_path):
    """An OME-TIFF whose first image (the scan, read as the slide) has no PhysicalSizeX but whose
    macro image, stored after it, has one: the slide took the macro's 1 µm/px, four times its
    own, and every field was cut four times too wide. Now --mpp is asked for."""
    path = tmp_path / "scan.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(_image(), tile=(64, 64), photometric="rgb", metadata=dict(axes="YXS", Name="scan"))
        tw.write(_image()[::4, ::4].copy(), photometric="rgb",
                 metadata=dict(axes="YXS", Name="macro", PhysicalSizeX=1.0, PhysicalSizeY=1.0))  # fmt: skip
    with pytest.raises(SlideError, match="no µm per pixel.*--mpp"):
        Slide(path)
    with Slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25


def test_a_cells_table_of_a_slide_with_non_square_pixels_is_not_refused():
    """A table with x_um = 0.25 x_px and y_um = 0.30 y_px (a slide of 0.25 x 0.30 µm pixels,
    whose `Slide.mpp` is the x size, 0.25) was read as made at 0.27 µm/px, mixing the axes, and
    every slide failed with "the cells table places its cells at 0.2727 µm/px"."""
    import polars as pl

    from embedstore.extract.pipeline import _table_mpp

    x, y = np.array([100.0, 400.0, 900.0]), np.array([800.0, 300.0, 50.0])
    cells = pl.DataFrame({"x_px": x, "y_px": y, "x_um": x * 0.25, "y_um": y * 0.30})
    assert _table_mpp(cells) == pytest.approx(0.25)


# ------------------------------------------------------------------------ 16-bit camera samples
def _pyramid_16(path, rgb16: np.ndarray, **kw) -> None:
    """A tiled 16-bit RGB pyramid, levels as top-level pages (what OpenSlide reads)."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb16, photometric="rgb", tile=(64, 64), metadata=None,
                 resolution=(1e4 / 0.25,) * 2, resolutionunit="CENTIMETER", **kw)  # fmt: skip
        tw.write(rgb16[::2, ::2], photometric="rgb", tile=(64, 64), subfiletype=1, metadata=None)


@pytest.mark.parametrize("layout", ["pyramid", "pyramid+MaxSampleValue", "untiled"])
def test_12_bit_camera_data_in_16_bit_samples_is_read_in_its_own_range(tmp_path, layout):
    """A camera's 12-bit data stored in 16-bit samples (0-4095) was cut to its high byte, as
    OpenSlide does: values 0-15, a black slide, embedded without a word. It now reads scaled
    by its own depth, the same pixels as the 8-bit image it came from."""
    img = _image()
    rgb12 = img.astype(np.uint16) << 4 | 0x9  # the 12-bit samples an 8-bit image came from
    path = tmp_path / "cam.tif"
    if layout == "untiled":
        tifffile.imwrite(path, rgb12, photometric="rgb", resolution=(1e4 / 0.25,) * 2, resolutionunit="CENTIMETER")
    else:
        tags = [(281, "H", 3, (4095,) * 3, False)] if "MaxSampleValue" in layout else []
        _pyramid_16(path, rgb12, extratags=tags)
    with Slide(path) as s:
        np.testing.assert_array_equal(s.read_level(0, 0, 0, 640, 512), img)
        crop, _ = s.read(300.0, 250.0, LOCAL_CROP)
    assert abs(crop[112, 112].astype(int) - (40, 20, 120)).max() <= 2
    if layout == "untiled":  # the in-memory reader, where the pyramid readers cannot open it
        np.testing.assert_array_equal(PlainImage(path).read_region((0, 0), 0, (640, 512))[..., :3], img)


def test_full_range_16_bit_slides_keep_their_high_byte(tmp_path):
    """Only data that stays below 2^14 is taken for camera data: a full-range 16-bit slide reads
    as before, its high byte, even where a region of it is dark."""
    img = _image()
    path = tmp_path / "full.tif"
    _pyramid_16(path, img.astype(np.uint16) * 257)
    with Slide(path) as s:
        np.testing.assert_array_equal(s.read_level(0, 0, 0, 640, 512), img)
        np.testing.assert_array_equal(s.read_level(0, 280, 230, 40, 40), img[230:270, 280:320])
