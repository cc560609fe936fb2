"""Whole-slide images at exact µm/px: open, read regions, cut crops in batches.

Backends: OpenSlide (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...) first; tiffslide (tifffile)
where OpenSlide cannot open the file or sees only one level of a pyramid it stores in SubIFDs
(OME-TIFF); last, plain images (PNG/JPEG tiles, TMA cores, untiled TIFF) decoded into memory
(`PlainImage`, one level; µm/px of PNG/JPEG only from --mpp, and TIFF resolution tags at
print/screen DPI are no µm/px either). Every read returns RGB uint8; area
outside the slide is white (a tissue-neutral pad, recorded as `PAD_VALUE`) and its share is
reported per crop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SlideError
from ..geometry import CropSpec, ReadPlan, is_close_mpp

#: value used for area outside the slide (white: tissue-neutral background)
PAD_VALUE = 255
#: plausible µm per level-0 pixel; values outside are treated as broken metadata
MPP_RANGE = (0.01, 50.0)
#: slide file name endings; double ones first (`slide_id_from_path` strips the first that fits)
SLIDE_SUFFIXES = (
    ".ome.tiff", ".ome.tif", ".ome.btf", ".ome.tf2", ".ome.tf8", ".svs", ".tif", ".tiff", ".ndpi",
    ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".btf", ".tf2", ".tf8", ".qptiff",
)  # fmt: skip
#: length units (OME's, and ImageJ's as written in its TIFF description) in µm
UM_PER_UNIT = {"µm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4, "inch": 25400.0}
#: other spellings of those units; ImageJ escapes the micro sign as the text "\u00B5"
UNIT_ALIASES = {
    "um": "µm", "micron": "µm", "microns": "µm", "\\u00b5m": "µm", "μm": "µm", "\\u03bcm": "µm",
    "meter": "m", "meters": "m", "metre": "m",
}  # fmt: skip
#: TIFF resolutions in inches up to this many DPI (2.54 µm/px and coarser) are print/screen DPI
PRINT_DPI_MAX = 10_000
#: plain images opened whole into memory (tiles, regions, TMA cores); their DPI is screen DPI
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: TIFF colour storage that tifffile's readers deliver as RGB or grey (PHOTOMETRIC MINISBLACK,
#: RGB; YCBCR only JPEG-compressed: the JPEG decoder converts it); others need a conversion
READ_AS_STORED, YCBCR = (1, 2), 6
JPEG_COMPRESSIONS = (6, 7, 33003, 33005)  # old-style JPEG, JPEG, Aperio's JPEG 2000
COLOUR_NAMES = {
    "PALETTE": "palette (colour map)", "MINISWHITE": "min-is-white grey", "SEPARATED": "CMYK",
    "YCBCR": "YCbCr (not JPEG-compressed)",
}  # fmt: skip
#: largest plain image decoded into memory (RGB bytes); bigger ones must be tiled pyramids
PLAIN_IMAGE_MAX_BYTES = 2 * 1024**3

# tifffile logs what it finds wrong in a file (to stderr when logging is not set up); the errors
# raised here say it once, clearly
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def slide_id_from_path(path: str | Path) -> str:
    """The slide's id: its file name without the (possibly double) extension."""
    name = Path(path).name
    for suffix in SLIDE_SUFFIXES + PLAIN_IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def find_slides(paths: str | Path | list) -> list[Path]:
    """Slide files among `paths` (files, or directories searched one level deep).

    A directory's hidden files are skipped, and its plain images (.png/.jpg/.jpeg: tiles, TMA
    cores) are taken only when it holds no whole-slide files, so thumbnails and macro images kept
    next to slides are not slides.
    """
    items = paths if isinstance(paths, list | tuple) else [paths]
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            # hidden files are none: "._S1.svs" is macOS's AppleDouble twin of S1.svs on exFAT/SMB
            files = sorted(p for p in item.iterdir() if p.is_file() and not p.name.startswith("."))
            slides = [p for p in files if p.name.lower().endswith(SLIDE_SUFFIXES)]
            found += slides or [p for p in files if p.name.lower().endswith(PLAIN_IMAGE_SUFFIXES)]
        elif item.exists():
            found.append(item)
        else:
            raise SlideError(f"{item}: no such file or directory")
    return found


@dataclass(frozen=True)
class SlideInfo:
    """What is known about one slide; stored as provenance next to its vectors."""

    path: str
    slide_id: str
    backend: str
    vendor: str
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CropBatch:
    """Crops of one group of cells: `index` into the caller's cell arrays, one image stack per spec."""

    index: np.ndarray
    images: dict[str, np.ndarray]  # name -> (n, out_px, out_px, 3) uint8
    outside: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) share padded


class Slide:
    """One whole-slide image. Use as a context manager or call `close()`."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(f"{self.path}: no such slide file")
        if (missing := _missing_data(self.path)) is not None:
            raise SlideError(
                f"{self.path}: the file is corrupt or truncated ({missing}); copy it again from "
                "where the slide was made"
            )
        self._handle, backend = _open_backend(self.path)
        read_w, read_h = self._handle.dimensions
        # vendor formats (SVS, NDPI, BIF, SCN...) say where level 0 is; a generic TIFF does not
        generic = backend != "openslide" or self._handle.properties.get("openslide.vendor") == "generic-tiff"
        if generic and (larger := _larger_page(self.path, read_w, read_h)) is not None:
            self.close()
            page, w, h = larger
            raise SlideError(
                f"{self.path}: page {page} ({w}x{h} px) is larger than the image {backend} reads as "
                f"full resolution ({read_w}x{read_h} px): a pyramid stored smallest first, or an "
                f"overview before the scan. Re-save it largest first, e.g. `vips tiffsave "
                f"'{self.path}[page={page}]' out.tif --tile --pyramid`"
            )
        # OpenSlide handles are thread-safe; serialise reads through other backends
        self._lock = threading.Lock() if backend != "openslide" else contextlib.nullcontext()
        props = dict(self._handle.properties)
        meta_mpp, meta_mpp_y, source = _mpp_from_metadata(self.path, props, backend)
        if mpp is not None:
            if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
                self.close()
                raise SlideError(
                    f"--mpp {mpp} is not a plausible µm per pixel (expected {MPP_RANGE[0]}-{MPP_RANGE[1]:g})"
                )
            if meta_mpp is not None and not is_close_mpp(mpp, meta_mpp):
                warnings.warn(
                    f"{self.path.name}: --mpp {mpp} overrides the file's {meta_mpp:.4f} µm/px",
                    stacklevel=2,
                )
            # one size for both axes, as the user says: no warning about the file's x/y below
            meta_mpp, meta_mpp_y, source = float(mpp), None, "override"
        if meta_mpp is None:
            self.close()
            if backend == "plain" and self.path.name.lower().endswith(PLAIN_IMAGE_SUFFIXES):
                raise SlideError(
                    f"{self.path}: a PNG/JPEG image has no µm per pixel (its DPI field is for "
                    "screens and printers, never the microscope's). Pass --mpp with the µm per "
                    "pixel it was captured at, e.g. --mpp 0.5 for a 20x scan."
                )
            dpi = source.removeprefix("print-dpi ") if source.startswith("print-dpi") else ""
            dpi = dpi and f"; its TIFF resolution, {dpi} DPI, is a print/screen setting"
            raise SlideError(
                f"{self.path}: no µm per pixel in the file's metadata (looked for "
                f"openslide.mpp-x, TIFF resolution tags, OME PhysicalSizeX, ImageJ unit{dpi}). "
                "Pass --mpp with the scanner's µm per pixel at full resolution, e.g. --mpp 0.25 "
                "for a 40x scan."
            )
        if meta_mpp_y is not None and not is_close_mpp(meta_mpp, meta_mpp_y):
            _warn_non_square(self.path, meta_mpp, meta_mpp_y, source)
        h = self._handle
        self.info = SlideInfo(
            path=str(self.path),
            slide_id=slide_id_from_path(self.path),
            backend=backend,
            vendor=str(props.get("openslide.vendor", props.get("tiffslide.vendor", props.get("plain.format", "unknown")))),
            width=int(h.dimensions[0]),
            height=int(h.dimensions[1]),
            level_dimensions=tuple((int(w), int(hh)) for w, hh in h.level_dimensions),
            level_downsamples=tuple(float(d) for d in h.level_downsamples),
            mpp=float(meta_mpp),
            mpp_source=source,
        )

    # -- basic properties -------------------------------------------------------------------
    @property
    def slide_id(self) -> str:
        return self.info.slide_id

    @property
    def mpp(self) -> float:
        return self.info.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.width, self.info.height

    def plan(self, crop: CropSpec, *, resample: bool = True) -> ReadPlan:
        # a level that does not hold all of level 0 (a tiled label or macro image OpenSlide lists
        # as a level) is never chosen
        level0 = self.info.level_dimensions[0]
        downsamples = tuple(
            ds if _is_level_of(level0, dims, ds) else math.inf
            for ds, dims in zip(self.info.level_downsamples, self.info.level_dimensions, strict=True)
        )
        return ReadPlan.for_slide(downsamples, self.info.mpp, crop, resample=resample)

    def close(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"Slide({i.slide_id!r}, {i.width}x{i.height} px, {i.mpp:.4f} µm/px, {i.backend})"

    # -- reading ----------------------------------------------------------------------------
    def read_level(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of level pixels [x0, x0+width) x [y0, y0+height).

        Only the part inside the slide is read; the rest is PAD_VALUE.
        """
        lw, lh = self.info.level_dimensions[level]
        out = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + width, lw), min(y0 + height, lh)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        ds = self.info.level_downsamples[level]
        loc = (int(round(ix0 * ds)), int(round(iy0 * ds)))
        try:
            with self._lock:
                region = self._handle.read_region(loc, level, (ix1 - ix0, iy1 - iy0))
        except Exception as exc:  # noqa: BLE001 - backend errors vary; report them uniformly
            raise SlideError(
                f"{self.path}: reading level {level} at {loc} failed ({exc}); the file may be "
                "corrupt or truncated"
            ) from exc
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = _to_rgb(region)
        return out

    def read_region_for(self, x_px: np.ndarray, y_px: np.ndarray, plan: ReadPlan) -> Region:
        """One region read at the plan's level: the union of the cells' fields (plus margin)."""
        bx0, by0, bx1, by1 = plan.read_box_level(x_px, y_px)
        rx0, ry0 = int(bx0.min()), int(by0.min())
        buffer = self.read_level(plan.level, rx0, ry0, int(bx1.max()) - rx0, int(by1.max()) - ry0)
        return Region(buffer, rx0, ry0, plan, self.info.width, self.info.height)

    def read(self, x_px: float, y_px: float, crop: CropSpec) -> tuple[np.ndarray, float]:
        """One crop centred on level-0 point (x_px, y_px): (out_px, out_px, 3) uint8, outside share.

        One region read per call; use `iter_crops` for many cells.
        """
        x, y = np.array([x_px], dtype=np.float64), np.array([y_px], dtype=np.float64)
        region = self.read_region_for(x, y, self.plan(crop))
        return region.cut(x, y)[0], float(region.outside(x, y)[0])

    def iter_crops(
        self,
        x_px: np.ndarray,
        y_px: np.ndarray,
        crops: Mapping[str, CropSpec],
        *,
        region_um: float = 512.0,
        max_cells: int = 64,
        resample: bool = True,
    ) -> Iterator[CropBatch]:
        """Crops for many cells, reading each large region once per spec.

        Cells are grouped by the `region_um` x `region_um` grid cell holding their centroid
        (row-major order); per group one region is read per spec, and crops are cut from it
        in batches of at most `max_cells` (so memory stays bounded on dense tissue).
        """
        x_px = np.asarray(x_px, dtype=np.float64)
        y_px = np.asarray(y_px, dtype=np.float64)
        plans = {name: self.plan(spec, resample=resample) for name, spec in crops.items()}
        for index in group_by_region(x_px, y_px, region_um / self.info.mpp):
            gx, gy = x_px[index], y_px[index]
            regions = {name: self.read_region_for(gx, gy, plan) for name, plan in plans.items()}
            for start in range(0, len(index), max_cells):
                sl = slice(start, start + max_cells)
                yield CropBatch(
                    index=index[sl],
                    images={k: r.cut(gx[sl], gy[sl]) for k, r in regions.items()},
                    outside={k: r.outside(gx[sl], gy[sl]) for k, r in regions.items()},
                )


@dataclass
class Region:
    """A region of one pyramid level held in memory, from which crops are cut."""

    buffer: np.ndarray
    x0: int  # level pixel of buffer[0, 0]
    y0: int
    plan: ReadPlan
    slide_width: int
    slide_height: int

    def cut(self, x_px: np.ndarray, y_px: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The fields of cells at level-0 (x_px, y_px), (n, out_px, out_px, 3) uint8.

        Exact plans copy pixels; others resample the (sub-pixel) field box with PIL's
        antialiased bilinear filter straight to `plan.out_px`.
        """
        plan, n, size = self.plan, len(x_px), self.plan.out_px
        if out is None:
            out = np.empty((n, size, size, 3), dtype=np.uint8)
        fx0, fy0 = plan.field_origin_level(x_px, y_px)
        fx0, fy0 = fx0 - self.x0, fy0 - self.y0
        if plan.exact:
            for i in range(n):
                ox, oy = int(fx0[i]), int(fy0[i])
                out[i] = self.buffer[oy : oy + size, ox : ox + size]
            return out
        image = Image.fromarray(self.buffer)
        side = plan.size_level_px
        for i in range(n):
            box = (fx0[i], fy0[i], fx0[i] + side, fy0[i] + side)
            out[i] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))
        return out

    def outside(self, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
        return self.plan.outside_fraction(x_px, y_px, self.slide_width, self.slide_height)


def group_by_region(x_px: np.ndarray, y_px: np.ndarray, region_px: float) -> list[np.ndarray]:
    """Indices of cells grouped by the square grid cell (side `region_px`) holding them."""
    if len(x_px) == 0:
        return []
    gx = np.floor(x_px / region_px).astype(np.int64)
    gy = np.floor(y_px / region_px).astype(np.int64)
    order = np.lexsort((x_px, gx, gy))
    keys = np.stack([gy[order], gx[order]], axis=1)
    breaks = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    return np.split(order, breaks)


# -- backends and metadata ----------------------------------------------------------------------
def _probe(handle):
    """Touch what lazy backends only parse on first use, so a broken file fails at open; returns
    one pixel of the last level."""
    dict(handle.properties)
    last = handle.level_count - 1
    _ = handle.level_dimensions, handle.level_downsamples
    return handle.read_region((0, 0), last, (1, 1))


def _open_backend(path: Path):
    """(handle, backend name): OpenSlide unless tiffslide sees more pyramid levels."""
    import openslide

    errors = []
    handle = None
    if (shift := _shallow_colour_depth(path)) is not None:  # OpenSlide would keep the high byte: black
        try:
            handle = _ShallowTiffSlide(path, shift)
            _probe(handle)
            return handle, "tiffslide"
        except Exception as exc:  # noqa: BLE001 - backend errors vary; reported together below
            if handle is not None:
                handle.close()
            handle, errors = None, [f"tiffslide ({16 - shift}-bit samples): {exc}"]
    try:
        handle = openslide.OpenSlide(str(path))
        _probe(handle)
    except Exception as exc:  # noqa: BLE001 - backend errors vary; reported together below
        if handle is not None:
            handle.close()
        handle, errors = None, [f"OpenSlide: {exc}"]
    if handle is not None and handle.level_count > 1:
        return handle, "openslide"
    alt = None
    try:
        import tiffslide

        alt = tiffslide.TiffSlide(str(path))
        _as_rgb_pixels(path, np.asarray(_probe(alt)))  # tifffile also opens label images
        # colour planes stored as pages (axes CYX): OpenSlide reads only the first, as grey
        planes = "C" in str(alt.properties.get("tiffslide.series-axes", ""))
        if handle is None or alt.level_count > handle.level_count or planes:
            if (colours := _stored_colours(alt.ts_tifffile.pages[0])) is None:
                if handle is not None:
                    handle.close()
                return alt, "tiffslide"
            if handle is None:  # OpenSlide converts them; tifffile reads what is stored
                raise SlideError(_colours_message(path, colours))
        alt.close()
    except Exception as exc:  # noqa: BLE001
        if alt is not None:
            alt.close()
        if isinstance(exc, SlideError):  # a label image or mask, whoever else opened it
            if handle is not None:
                handle.close()
            raise
        errors.append(f"tifffile: {type(exc).__name__}: {exc}")
    if handle is not None:
        return handle, "openslide"
    if path.name.lower().endswith(PLAIN_IMAGE_SUFFIXES + (".tif", ".tiff")):
        try:
            return PlainImage(path), "plain"
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL/tifffile errors vary
            errors.append(f"plain image: {type(exc).__name__}: {exc}")
    if (empty := _empty(path)) is not None:
        raise SlideError(f"{path}: {empty}; copy it again from where the slide was made")
    if (fmt := _plain_format(path)) is not None:
        raise SlideError(
            f"{path}: the file is a {fmt} image, not the slide format its name says; rename it to "
            f"'{slide_id_from_path(path)}.{fmt.lower().replace('jpeg', 'jpg')}' and pass --mpp "
            "with the µm/px it was captured at (a PNG/JPEG image holds none)"
        )
    raise SlideError(
        f"{path}: cannot open as a whole-slide image ({'; '.join(errors)}). Supported: the "
        "formats OpenSlide reads (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...), tiled "
        "(OME-)TIFF pyramids and plain PNG/JPEG/TIFF images; the file may be corrupt or truncated."
    )


def _is_level_of(level0: tuple[int, int], level: tuple[int, int], downsample: float) -> bool:
    """Whether `level` is level 0 scaled down: by one factor (each side rounded to a pixel), or
    holding all of it at `downsample` (sides padded to whole tiles). A label or macro image of
    another shape listed as a level (its downsample the mean of its sides' ratios) is neither."""
    (w0, h0), (w, h) = level0, level
    low = max(w0 / (w + 1), h0 / (h + 1))
    high = min(w0 / (w - 1) if w > 1 else math.inf, h0 / (h - 1) if h > 1 else math.inf)
    return low <= high or ((w + 1) * downsample >= w0 and (h + 1) * downsample >= h0)


def _larger_page(path: Path, width: int, height: int, max_pages: int = 64) -> tuple[int, int, int] | None:
    """(index, width, height) of the largest top-level TIFF page where it has more pixels than
    the `width` x `height` a backend opened as level 0 (it takes the first page's pyramid), else
    None (also for files tifffile does not read)."""
    if path.name.lower().endswith(PLAIN_IMAGE_SUFFIXES):
        return None
    largest = None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            for i in range(min(len(tif.pages), max_pages)):
                page = tif.pages[i]
                w, h = int(page.imagewidth), int(page.imagelength)
                if w * h > (largest[1] * largest[2] if largest else width * height):
                    largest = (i, w, h)
    except Exception:  # noqa: BLE001 - not a TIFF, or one only the backends read
        return None
    return largest


def _missing_data(path: Path, max_pages: int = 256) -> str | None:
    """What a TIFF lacks that its images need: tile/strip offsets, or bytes past the end of the
    file (a partial copy, which backends read as black tiles or fail on later); None where all
    is there (also for files tifffile does not read)."""
    if path.name.lower().endswith(PLAIN_IMAGE_SUFFIXES):
        return None
    try:
        import tifffile

        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            pages = (p for series in tif.series for level in series.levels for p in level.pages)
            for page in itertools.islice(pages, max_pages):
                if page.parent is not tif:  # a page of another file of a multi-file OME-TIFF
                    continue
                offsets, counts = page.dataoffsets, page.databytecounts
                if len(offsets) == 0:
                    return "an image has no tile or strip offsets"
                n = min(len(offsets), len(counts))
                ends = np.asarray(offsets[:n], np.int64) + np.asarray(counts[:n], np.int64)
                end = int(ends.max())
                if end > size:
                    return f"its images need {end} bytes, the file has {size}"
    except Exception:  # noqa: BLE001 - not a TIFF, or one only the backends read
        return None
    return None


def _plain_format(path: Path) -> str | None:
    """The image format ("PNG" or "JPEG") the file's first bytes say it is, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(b"\x89PNG\r\n"):
        return "PNG"
    return "JPEG" if head.startswith(b"\xff\xd8\xff") else None


def _empty(path: Path) -> str | None:
    """What is plainly wrong with a file no backend opens: it is empty, or a TIFF without images."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            n = tif.tiff.offsetsize  # the header ends with the first image's offset, at byte n
            tif.filehandle.seek(n)
            no_images = len(tif.pages) == 0 and not any(tif.filehandle.read(n))
    except Exception:  # noqa: BLE001 - not a TIFF: the caller's message covers it
        return None
    return "the TIFF has no images" if no_images else None


@contextlib.contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit, raised for one open (our own byte limit applies)."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_PIL_LIMIT_LOCK = threading.Lock()


class PlainImage:
    """A plain image (PNG, JPEG, untiled TIFF) held in memory behind OpenSlide's handle interface.

    One level; `read_region` returns RGBA uint8 like OpenSlide (outside the image: transparent).
    Only 8-bit grey/RGB(A) and 16-bit RGB(A) (scaled by its depth, `_depth_shift`) images are
    H&E: 16/32-bit or float single-channel images are label images or masks and are refused, as
    are images over `PLAIN_IMAGE_MAX_BYTES` decoded.
    """

    level_count = 1

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.name.lower().endswith((".tif", ".tiff")):
            self._pixels, fmt = _decode_tiff(path), "TIFF"
        else:
            self._pixels, fmt = _decode_pil(path)
        height, width = self._pixels.shape[:2]
        self.properties = {"plain.format": fmt, "plain.width": str(width), "plain.height": str(height)}
        self.dimensions = (width, height)
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if level != 0:
            raise ValueError(f"a plain image has one level, not level {level}")
        (x0, y0), (w, h) = location, size
        out = np.zeros((h, w, 4), dtype=np.uint8)
        W, H = self.dimensions
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        if ix1 > ix0 and iy1 > iy0:
            src = self._pixels[iy0:iy1, ix0:ix1]
            dst = out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            dst[..., :3] = src[..., :3] if src.shape[2] >= 3 else src[..., :1]
            dst[..., 3] = src[..., 3] if src.shape[2] == 4 else 255
        return out

    def close(self) -> None:
        self._pixels = None


def _check_plain_size(path: Path, width: int, height: int) -> None:
    nbytes = width * height * 3
    if nbytes > PLAIN_IMAGE_MAX_BYTES:
        raise SlideError(
            f"{path}: a plain image of {width}x{height} px ({nbytes / 1024**3:.1f} GiB decoded) is "
            f"too large to hold in memory (limit {PLAIN_IMAGE_MAX_BYTES / 1024**3:.1f} GiB); convert "
            "it to a tiled pyramidal TIFF, e.g. `vips tiffsave IN OUT.tif --tile --pyramid`"
        )


def _depth_shift(max_value: int, max_sample: int | None = None) -> int:
    """Bits to drop to bring 16-bit colour samples to 8: 8 for full-range data, fewer for the
    10-14-bit data of cameras stored in 16-bit samples (which, cut to the high byte as OpenSlide
    does, reads almost black). The depth is the TIFF's MaxSampleValue where it gives one, else
    that of the brightest sample seen: brightfield slides have a white background, so 16-bit
    full-range data does not stay below 2^14."""
    top = max_sample if max_sample is not None and 0 < max_sample < 0xFFFF else max_value
    bits = int(top).bit_length()
    return 8 if bits > 14 else max(0, bits - 8)


def _to_8_bit(arr: np.ndarray, shift: int) -> np.ndarray:
    return np.minimum(arr >> shift, 255).astype(np.uint8)


def _shallow_colour_depth(path: Path, max_segments: int = 256) -> int | None:
    """For a 16-bit colour TIFF whose samples hold fewer bits (12-bit camera data), the shift
    that brings them to 8 bits (`_depth_shift`); None for every other file. Looks at the
    MaxSampleValue tag, else at the smallest pyramid level's first `max_segments` tiles."""
    if path.name.lower().endswith(PLAIN_IMAGE_SUFFIXES):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.bitspersample != 16 or page.samplesperpixel < 3 or page.photometric != 2:  # RGB
                return None
            tag = page.tags.get("MaxSampleValue")
            max_sample = int(np.max(tag.value)) if tag is not None else None
            top = 0
            if max_sample is None or max_sample >= 0xFFFF:
                smallest = tif.series[0].levels[-1].pages[0] if tif.series else page
                for i, seg in enumerate(smallest.segments()):
                    top = max(top, int(np.asarray(seg[0])[..., :3].max()))
                    if i + 1 >= max_segments:
                        break
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: the backends decide
        return None
    shift = _depth_shift(top, max_sample)
    return shift if shift < 8 else None


class _ShallowTiffSlide:
    """A tiffslide handle whose 16-bit colour samples hold fewer bits (see
    `_shallow_colour_depth`): regions come scaled by that depth to 8 bits, not cut to their
    nearly empty high byte."""

    def __init__(self, path: Path, shift: int):
        import tiffslide

        self._slide, self._shift = tiffslide.TiffSlide(str(path)), shift

    def __getattr__(self, name: str):
        return getattr(self._slide, name)

    def read_region(self, location, level, size) -> np.ndarray:
        return _to_8_bit(self._slide.read_region(location, level, size, as_array=True), self._shift)

    def close(self) -> None:
        self._slide.close()


def _as_rgb_pixels(path: Path, arr: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with C in 1, 3, 4; 16-bit RGB(A) scaled by its depth (`_depth_shift`);
    refuses label images and masks (single-channel, not 8-bit) and other pixel types."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise SlideError(f"{path}: an image of shape {arr.shape} is neither grey nor RGB(A)")
    if arr.dtype == np.uint16 and arr.shape[2] > 1:
        arr = _to_8_bit(arr, _depth_shift(int(arr[..., :3].max())))
    if arr.dtype != np.uint8 and arr.shape[2] == 1:
        raise SlideError(
            f"{path}: single-channel {arr.dtype} pixels, not 8-bit grey: a label image or mask "
            "is not a slide (give label images to `embed cells`, not as slides)"
        )
    if arr.dtype != np.uint8:
        raise SlideError(f"{path}: {arr.dtype} colour pixels; slides are 8- or 16-bit RGB")
    return arr


def _decode_pil(path: Path) -> tuple[np.ndarray, str]:
    with _pil_pixel_limit(None), Image.open(path) as im:
        _check_plain_size(path, *im.size)
        fmt = str(im.format or "image")
        if im.mode in ("P", "PA", "LA", "RGBa", "CMYK", "YCbCr", "1"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        arr = np.asarray(im)
    return _as_rgb_pixels(path, arr), fmt


def _decode_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if (colours := _stored_colours(page)) is not None:
            raise SlideError(_colours_message(path, colours))
        _check_plain_size(path, int(page.imagewidth), int(page.imagelength))
        arr = page.asarray()
        if page.axes.startswith("S") and arr.ndim == 3:  # planar RGB (PlanarConfiguration 2)
            arr = np.moveaxis(arr, 0, -1)
    return _as_rgb_pixels(path, arr)


def _stored_colours(page) -> str | None:
    """How a tifffile page stores colours where tifffile reads them unconverted (palette
    indices, min-is-white grey, CMYK, Lab), else None."""
    photometric = page.photometric
    jpeg = page.compression in JPEG_COMPRESSIONS
    if photometric in READ_AS_STORED or (photometric == YCBCR and jpeg):
        return None
    name = getattr(photometric, "name", f"photometric {photometric}")
    return COLOUR_NAMES.get(name, name)


def _colours_message(path: Path, colours: str) -> str:
    return (
        f"{path}: {colours} pixels, which the TIFF reader used for this file does not turn into "
        f"RGB; convert it to RGB, e.g. `vips colourspace '{path}' out.tif[tile,pyramid] srgb`"
    )


def _plausible(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or not (MPP_RANGE[0] <= value <= MPP_RANGE[1]):
        return None
    return float(value)


def _mpp_from_metadata(
    path: Path, props: Mapping, backend: str
) -> tuple[float | None, float | None, str]:
    """µm per level-0 pixel across (x) and down (y) from the file, and where they came from.

    y comes from the same source as x (None where it gives none). TIFF resolution tags in inches
    at print/screen DPI (at most `PRINT_DPI_MAX`) are no scan's µm/px: what the backends made of
    them is ignored, and without another µm/px the source is "print-dpi N".
    """
    tiff_mpp, tiff_mpp_y, unit, tiff_source = _tiff_resolution_mpp(path)
    print_dpi = unit == "inch" and 25400.0 / tiff_mpp <= PRINT_DPI_MAX
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        value = _plausible(_number(props.get(key)))
        if value is not None and not (print_dpi and is_close_mpp(value, tiff_mpp)):
            return value, _plausible(_number(props.get(key.removesuffix("x") + "y"))), key
    ome_mpp, ome_mpp_y = _ome_mpp(path)
    if (value := _plausible(ome_mpp)) is not None:
        return value, _plausible(ome_mpp_y), "ome"
    if print_dpi:
        return None, None, f"print-dpi {25400.0 / tiff_mpp:g}"
    if (value := _plausible(tiff_mpp)) is not None:
        return value, _plausible(tiff_mpp_y), tiff_source
    return None, None, "none"


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _unit_name(unit) -> str:
    """A length unit's name as `UM_PER_UNIT` spells it."""
    name = str(unit).strip()
    return UNIT_ALIASES.get(name.lower(), name)


def _um_per_unit(unit) -> float:
    """µm in one `unit`; NaN for an unknown one (ImageJ's "pixel" too)."""
    return UM_PER_UNIT.get(_unit_name(unit), math.nan)


def _warn_non_square(path: Path, mpp_x: float, mpp_y: float, source: str) -> None:
    """Crops take square fields at the x size: cells come out resized vertically by x/y."""
    change = mpp_x / mpp_y - 1
    warnings.warn(
        f"{path.name}: pixels are {mpp_x:.4g} µm wide but {mpp_y:.4g} µm tall ({source}); crops "
        f"use the x size, so cells are {'stretched' if change > 0 else 'squashed'} vertically "
        f"by {abs(change):.0%}. Re-export the slide with square pixels for true cell shapes.",
        UserWarning,
        stacklevel=3,
    )


def _ome_mpp(path: Path) -> tuple[float | None, float | None]:
    """PhysicalSizeX and PhysicalSizeY of the first OME Pixels element, converted to µm (None
    where it has none: a later image's, e.g. a macro's, is not the slide's)."""
    if not path.name.lower().endswith((".tif", ".tiff", ".btf", ".tf2", ".tf8")):
        return None, None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
    except Exception:  # noqa: BLE001
        return None, None
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    for elem in root.iter():
        if elem.tag.endswith("Pixels"):  # the first image's: the one read as the slide
            if "PhysicalSizeX" not in elem.attrib:
                return None, None
            sizes = []
            for axis in "XY":
                unit = elem.attrib.get(f"PhysicalSize{axis}Unit", "µm")
                size = _number(elem.attrib.get(f"PhysicalSize{axis}"))
                sizes.append(None if size is None else size * _um_per_unit(unit))
            return sizes[0], sizes[1]
    return None, None


def _tiff_resolution_mpp(path: Path) -> tuple[float | None, float | None, str | None, str]:
    """µm/px across and down from the first page's X/YResolution, their unit and the source.

    The unit is ResolutionUnit's (inch or cm, source "tiff-resolution"); where that is NONE,
    the unit ImageJ (Fiji, QuPath) writes into its description (source "imagej").
    """
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit_tag = tags.get("ResolutionUnit")
            xres, yres = tags.get("XResolution"), tags.get("YResolution")
            if unit_tag is None or xres is None:
                return None, None, None, "none"
            unit = unit_y = {2: "inch", 3: "cm"}.get(int(unit_tag.value))
            source = "tiff-resolution"
            if unit is None and tif.is_imagej:
                meta = tif.imagej_metadata or {}
                unit, source = meta.get("unit"), "imagej"
                unit_y = meta.get("yunit", unit)  # written only where it differs
            per_unit = _ratio(xres.value)
            per_unit_y = _ratio(yres.value) if yres is not None else None
    except Exception:  # noqa: BLE001
        return None, None, None, "none"
    if unit is None or not per_unit:
        return None, None, None, "none"
    unit = _unit_name(unit)
    mpp = _um_per_unit(unit) / per_unit
    mpp_y = _um_per_unit(unit_y) / per_unit_y if per_unit_y else None
    return mpp, mpp_y, unit, source


def _ratio(value: tuple[int, int]) -> float | None:
    """A TIFF RATIONAL as a positive number (None for zero or negative)."""
    num, den = value
    return num / den if den and num / den > 0 else None


def _to_rgb(region) -> np.ndarray:
    """RGB uint8 from a backend's region (PIL RGBA or array), compositing alpha onto white."""
    arr = np.asarray(region)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4]
        rgb = arr[..., :3]
        if alpha.min() == 255:
            return rgb
        a = alpha.astype(np.float32) / 255.0
        return (rgb * a + PAD_VALUE * (1.0 - a) + 0.5).astype(np.uint8)
    return arr[..., :3]
