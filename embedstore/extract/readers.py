"""Where the extraction pass reads slide regions: reader threads (default) or worker processes.

OpenSlide decodes tiles in C with the GIL released, so threads already read in parallel; the
Python work around each read (colour conversion, padding, Region assembly) is serialised by the
GIL. `processes` moves all of it to worker processes, each with its own open slide handles,
for machines whose many cores feed a fast GPU. Regions come back pickled (one copy).
"""

from __future__ import annotations

import multiprocessing
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..geometry import ReadPlan
from ..io.slides import Region, Slide

READERS = ("threads", "processes")

#: slides opened in this (worker) process, by (path, µm/px)
_OPEN: dict[tuple[str, float], Slide] = {}
_MAX_OPEN = 4


def make_pool(kind: str, workers: int) -> Executor:
    if kind == "threads":
        return ThreadPoolExecutor(max(1, workers), thread_name_prefix="reader")
    if kind == "processes":
        # spawn: never fork a process that holds CUDA or OpenMP state
        return ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn"))
    raise UserError(f"--readers must be one of {', '.join(READERS)}, not {kind!r}")


def in_processes(pool: Executor) -> bool:
    return isinstance(pool, ProcessPoolExecutor)


def _slide(path: Path, mpp: float) -> Slide:
    key = (str(path), float(mpp))
    slide = _OPEN.get(key)
    if slide is None:
        if len(_OPEN) >= _MAX_OPEN:
            for old in _OPEN.values():
                old.close()
            _OPEN.clear()
        with warnings.catch_warnings():  # an --mpp override was already reported by the parent
            warnings.simplefilter("ignore")
            slide = _OPEN[key] = Slide(path, mpp=mpp)
    return slide


def read_regions(path: Path, mpp: float, x_px: np.ndarray, y_px: np.ndarray,
                 plans: dict[str, ReadPlan]) -> dict[str, Region]:
    """One region per plan holding the fields of the cells at (x_px, y_px); runs in a worker."""
    slide = _slide(path, mpp)
    return {name: slide.read_region_for(x_px, y_px, plan) for name, plan in plans.items()}
