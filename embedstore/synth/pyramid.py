"""Write a tiled multi-level TIFF pyramid (Aperio SVS, generic TIFF or OME-TIFF), streaming.

Level 0 is pulled from a tile source strip by strip (never held whole in memory); each strip is
also averaged 2x2 into level 1, which is kept in RAM (a quarter of level 0) and halved again for
the smaller levels. Levels are separate top-level pages ("svs", "tiff") or SubIFDs ("ome").
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import tifffile

from ..errors import UserError

FORMATS = ("svs", "tiff", "ome")
EXTENSIONS = {"svs": ".svs", "tiff": ".tiff", "ome": ".ome.tif"}
TILE = 256
MIN_LEVEL_PX = 512  # levels are halved while the next one still has a side >= this
APERIO_HEADER = "Aperio Image Library v12.0.15"


class TileSource(Protocol):
    """Anything with a level-0 size that can render a rectangle as RGB uint8 (h, w, 3)."""

    height: int
    width: int

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...


class ArraySource:
    """A TileSource over an in-memory (H, W, 3) uint8 array."""

    def __init__(self, image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"write_pyramid needs an (H, W, 3) uint8 RGB array, got "
                            f"{image.shape} {image.dtype}; convert it with np.asarray(..., "
                            f"np.uint8) and drop any alpha channel")
        self.image = image
        self.height, self.width = image.shape[:2]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.image[y0:y1, x0:x1]


def level_shapes(height: int, width: int, step: int = 2) -> list[tuple[int, int]]:
    """(h, w) of each level: divided by `step` (rounded up) while the next level keeps a
    side >= 512. step 2 is the usual generic-TIFF/NDPI pyramid, 4 the usual Aperio SVS one."""
    shapes = [(height, width)]
    while max(shapes[-1]) // step >= MIN_LEVEL_PX:
        h, w = shapes[-1]
        shapes.append((-(-h // step), -(-w // step)))
    return shapes


def _reduce(img: np.ndarray, step: int) -> np.ndarray:
    """Downsample by a power of two with repeated 2x2 means."""
    while step > 1:
        img, step = _halve(img), step // 2
    return img


def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 mean with rounding; odd edges are padded by repeating the last row / column."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    pairs = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 6)  # 2x2 blocks, contiguous
    s = pairs[:, 0].astype(np.uint16)
    s += pairs[:, 1]
    s = s[..., :3] + s[..., 3:]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def _tiles(img: np.ndarray) -> Iterator[np.ndarray]:
    for y in range(0, img.shape[0], TILE):
        for x in range(0, img.shape[1], TILE):
            yield img[y:y + TILE, x:x + TILE]


def _aperio_description(shapes: list[tuple[int, int]], level: int, mpp: float | None,
                        codec: str, name: str) -> str:
    h0, w0 = shapes[0]
    h, w = shapes[level]
    size = f"{w0}x{h0} [0,0 {w0}x{h0}] ({TILE}x{TILE})"
    if level:
        size += f" -> {w}x{h}"
    mag = f"AppMag = {round(10 / mpp)}" if mpp is not None else "AppMag = 40"
    fields = [f"{APERIO_HEADER}\r\n{size} {codec}", mag,
              f"Filename = {name}", "Title = synthetic H&E (nuclass-embedstore)"]
    if mpp is not None:
        fields.append(f"MPP = {mpp:.4f}")
    return "|".join(fields)


def write_pyramid(path: str | os.PathLike, level0: np.ndarray | TileSource, mpp: float | None,
                  fmt: str, *, quality: int = 90, compression: str = "jpeg",
                  name: str | None = None, workers: int = 2, level_step: int = 2,
                  progress: Callable[[float], None] | None = None) -> list[tuple[int, int]]:
    """Write `level0` as a tiled 256x256 pyramid TIFF; returns the (h, w) of every level.

    Each level is `level_step` (2, 4 or 8) times smaller than the one before.

    fmt: "svs" (Aperio: levels as pages, MPP in the description; opens as "aperio" in
    OpenSlide), "tiff" (generic tiled TIFF, µm/px as resolution tags in px/cm, reduced levels
    marked subfiletype=1) or "ome" (OME-TIFF, levels in SubIFDs, PhysicalSizeX/Y in µm).
    mpp=None writes no µm/px at all (for testing readers on slides without it).
    compression: "jpeg" (RGB, `quality`) or "zlib" (lossless). workers: threads rendering
    level-0 strips ahead (numpy releases the GIL) and encoding tiles.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown slide format {fmt!r}; use one of {', '.join(FORMATS)}")
    if mpp is not None and not mpp > 0:
        raise UserError(f"µm/px must be positive, got {mpp}; pass e.g. 0.25 (or None for none)")
    if compression not in ("jpeg", "zlib"):
        raise UserError(f"unknown compression {compression!r}; use 'jpeg' or 'zlib'")
    src = ArraySource(level0) if isinstance(level0, np.ndarray) else level0
    path = Path(path)
    name = name or path.name
    if level_step not in (2, 4, 8):
        raise UserError(f"level_step must be 2, 4 or 8, got {level_step}")
    shapes = level_shapes(src.height, src.width, level_step)
    opts: dict = dict(tile=(TILE, TILE), photometric="rgb", compression=compression,
                      maxworkers=max(1, workers), buffersize=32 << 20)
    if compression == "jpeg":
        opts["compressionargs"] = {"level": quality}
    bigtiff = src.height * src.width * 3 * 4 // 3 > 3_500_000_000

    def level_opts(level: int) -> dict:
        kw = dict(opts)
        if fmt == "svs":
            codec = f"JPEG/RGB Q={quality}" if compression == "jpeg" else "Deflate/RGB"
            kw["description"] = _aperio_description(shapes, level, mpp, codec, name)
            kw["metadata"] = None
        elif fmt == "tiff":
            kw["metadata"] = None
            if mpp is not None:
                res = 1e4 / (mpp * level_step**level)
                kw.update(resolution=(res, res), resolutionunit="CENTIMETER")
        else:  # ome: physical size goes into the OME-XML of the first write only
            if mpp is not None:
                res = 1e4 / (mpp * level_step**level)
                kw.update(resolution=(res, res), resolutionunit="CENTIMETER")
            if level:
                kw["metadata"] = None
        if level and fmt != "svs":
            kw["subfiletype"] = 1
        return kw

    level1 = np.empty(shapes[1] + (3,), np.uint8) if len(shapes) > 1 else None
    n_strips = -(-src.height // TILE)

    def read_strip(y: int) -> np.ndarray:
        return np.ascontiguousarray(src.read(y, min(y + TILE, src.height), 0, src.width))

    def strips() -> Iterator[np.ndarray]:
        """Level-0 strips in order; with workers > 1 the next strips render meanwhile."""
        ys = range(0, src.height, TILE)
        if workers <= 1:
            yield from map(read_strip, ys)
            return
        with ThreadPoolExecutor(workers) as pool:
            pending: deque[Future] = deque()
            for y in ys:
                pending.append(pool.submit(read_strip, y))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def level0_tiles() -> Iterator[np.ndarray]:
        for k, strip in enumerate(strips()):
            y = k * TILE
            y1 = y + strip.shape[0]
            if level1 is not None:
                level1[y // level_step:-(-y1 // level_step)] = _reduce(strip, level_step)
            yield from _tiles(strip)
            if progress is not None:
                progress((k + 1) / n_strips)

    ome = fmt == "ome"
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as tw:
        first = level_opts(0)
        if ome:
            md: dict = {"axes": "YXS", "Name": name}
            if mpp is not None:
                md.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm",
                          PhysicalSizeYUnit="µm")
            first["metadata"] = md
            first["subifds"] = len(shapes) - 1
        tw.write(level0_tiles(), shape=shapes[0] + (3,), dtype=np.uint8, **first)
        img = level1
        for level in range(1, len(shapes)):
            assert img is not None
            tw.write(_tiles(img), shape=img.shape, dtype=np.uint8, **level_opts(level))
            if level + 1 < len(shapes):
                img = _reduce(img, level_step)
    return shapes
