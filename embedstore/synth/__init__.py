"""Synthetic H&E slides with Xenium-like bundles and ground truth, for tests, demos, benchmarks.

See docs/synthetic-data.md. Main entry points: `make_synthetic` and `write_pyramid`.
"""

from .make import SynthResult, SynthSlide, make_synthetic
from .pyramid import EXTENSIONS, FORMATS, ArraySource, TileSource, level_shapes, write_pyramid
from .spec import CLASSES, REGIONS, TISSUES, gene_panel

__all__ = [
    "CLASSES",
    "EXTENSIONS",
    "FORMATS",
    "REGIONS",
    "TISSUES",
    "ArraySource",
    "SynthResult",
    "SynthSlide",
    "TileSource",
    "gene_panel",
    "level_shapes",
    "make_synthetic",
    "write_pyramid",
]
