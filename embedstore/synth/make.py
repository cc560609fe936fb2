"""`make_synthetic`: slides + Xenium-like bundles + normalised cell and truth tables."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import UserError
from .bundle import KINDS, PIXEL_SIZE_UM, cell_ids, write_bundle
from .layout import build_layout
from .pyramid import EXTENSIONS, FORMATS, write_pyramid
from .render import SlideRenderer
from .spec import CLASSES, REGIONS, TISSUES, annotation_panel, gene_panel

DEFAULT_FORMATS = ("svs", "tiff")
CELL_COLUMNS = ("slide_id", "cell_id", "x_px", "y_px", "x_um", "y_um", "tissue", "label")


@dataclass(frozen=True)
class SynthSlide:
    slide_id: str
    path: Path
    bundle: Path
    fmt: str
    tissue: str
    width_px: int
    height_px: int
    levels: int
    mpp: float
    n_cells: int


@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    slides: tuple[SynthSlide, ...]
    cells_path: Path
    truth_path: Path
    classes: tuple[str, ...]
    tissues: tuple[str, ...]
    regions: tuple[str, ...]
    genes: tuple[str, ...]
    n_cells: int
    class_counts: dict[str, int]
    seed: int

    @property
    def slide_paths(self) -> list[Path]:
        return [s.path for s in self.slides]

    @property
    def bundle_paths(self) -> list[Path]:
        return [s.bundle for s in self.slides]


#: written first (complete=false) and last (complete=true): marks OUT as this generator's
MANIFEST = "synth.json"


def _check_args(out_dir: Path, n_cells: int, n_slides: int, density: float, mpp: float,
                formats: Sequence[str]) -> None:
    if n_slides < 1:
        raise UserError(f"n_slides must be >= 1, got {n_slides}")
    if n_cells < 10 * n_slides:
        raise UserError(f"n_cells={n_cells} is too few for {n_slides} slides; ask for at least "
                        f"{10 * n_slides} cells (e.g. --cells 600)")
    if not (density > 0 and math.isfinite(density)):
        raise UserError(f"density_per_mm2 must be a positive number, got {density}")
    if not (0.05 <= mpp <= 4.0):
        raise UserError(f"mpp={mpp} µm/px is outside 0.05..4; real H&E scans are 0.1..1")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown slide format(s) {bad or '(none given)'}; "
                        f"use {', '.join(FORMATS)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is a file; pass a directory")
    for sub in ("slides", "xenium"):
        d = out_dir / sub
        if d.is_dir() and any(d.iterdir()):
            raise UserError(f"{d} already has files; pass an empty or new directory, or "
                            f"use overwrite=True (CLI: --overwrite) to replace them")


def make_synthetic(out_dir: str | Path, *, seed: int = 0, n_cells: int = 600, n_slides: int = 3,
                   density_per_mm2: float = 1500.0, mpp: float = 0.25,
                   formats: Sequence[str] | None = None,
                   progress: Callable[[str, float], None] | None = None,
                   overwrite: bool = False, level_step: int = 2) -> SynthResult:
    """Generate synthetic H&E slides with Xenium-like bundles, deterministically from `seed`.

    Slide i has organ TISSUES[i % 3] and container formats[i % len(formats)]; pyramid levels
    are `level_step` (2 or 4, as in most Aperio SVS files) times smaller each. Cells are split
    evenly over slides; each slide is sized for `density_per_mm2` cells over its tissue.
    Layout of OUT: slides/, xenium/<slide_id>/, cells.parquet, truth.parquet (see
    docs/synthetic-data.md).
    """
    out = Path(out_dir)
    formats = tuple(formats) if formats is not None else DEFAULT_FORMATS
    params = {"seed": seed, "n_cells": n_cells, "n_slides": n_slides,
              "density_per_mm2": density_per_mm2, "mpp": mpp, "formats": list(formats),
              "level_step": level_step}
    manifest = out / MANIFEST
    # rerunning the same command (e.g. after a kill) replaces that command's own output
    same = manifest.exists() and json.loads(manifest.read_text()).get("params") == params
    if overwrite or same:
        for sub in ("slides", "xenium"):
            shutil.rmtree(out / sub, ignore_errors=True)
    _check_args(out, n_cells, n_slides, density_per_mm2, mpp, formats)
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"params": params, "complete": False}))
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "xenium").mkdir(parents=True, exist_ok=True)
    report = progress or (lambda msg, frac: None)

    root = np.random.SeedSequence(seed)
    id_rng, *slide_seeds = [np.random.default_rng(s) for s in root.spawn(n_slides + 1)]
    per_slide = [n_cells // n_slides + (i < n_cells % n_slides) for i in range(n_slides)]
    all_ids = cell_ids(id_rng, n_cells)
    slides: list[SynthSlide] = []
    cell_tables, truth_tables = [], []
    start = 0
    for i, (rng, n) in enumerate(zip(slide_seeds, per_slide, strict=True)):
        slide_id, tissue, fmt = f"synth_s{i}", TISSUES[i % len(TISSUES)], formats[i % len(formats)]
        base = i / n_slides
        report(f"{slide_id}: layout", base)
        lay = build_layout(rng, slide_id, tissue, n, density_per_mm2, mpp)
        path = out / "slides" / f"{slide_id}{EXTENSIONS[fmt]}"
        shapes = write_pyramid(
            path, SlideRenderer(lay), mpp, fmt, name=path.name, level_step=level_step,
            progress=lambda fr, b=base, s=slide_id: report(f"{s}: pixels",
                                                           b + 0.9 * fr / n_slides))
        c = lay.cells
        ids = all_ids[start:start + n]
        start += n
        labels = c["label"].astype(np.int64)
        nuc_area = math.pi / 4 * c["length_um"] * c["width_um"]
        halo = np.maximum(c["halo_um"], 1.5)
        cell_area = math.pi / 4 * (c["length_um"] + 2 * halo) * (c["width_um"] + 2 * halo)
        bdir = out / "xenium" / slide_id
        report(f"{slide_id}: bundle", base + 0.9 / n_slides)
        xen_x, xen_y, kind, partner = write_bundle(
            bdir, slide_id=slide_id, slide_path=path, tissue=tissue, ids=ids,
            x_px=c["x_px"], y_px=c["y_px"], labels=labels, he_mpp=mpp,
            nucleus_area_um2=nuc_area, cell_area_um2=cell_area, rng=rng,
            run_name=f"synthetic_seed{seed}", width_px=lay.width, height_px=lay.height)
        names = np.asarray(CLASSES)[labels]
        region = np.asarray(REGIONS)[c["region"].astype(np.int64)]
        cell_tables.append(pl.DataFrame({
            "slide_id": [slide_id] * n, "cell_id": ids,
            "x_px": c["x_px"], "y_px": c["y_px"],
            "x_um": c["x_px"] * mpp, "y_um": c["y_px"] * mpp,
            "tissue": [tissue] * n, "label": names,
        }))
        truth_tables.append(pl.DataFrame({
            "slide_id": [slide_id] * n, "cell_id": ids, "label": names, "tissue": [tissue] * n,
            "region": region, "x_px": c["x_px"], "y_px": c["y_px"],
            "x_um_xenium": xen_x, "y_um_xenium": xen_y,
            "expression_kind": np.asarray(KINDS)[kind],
            "expression_partner": [CLASSES[p] if p >= 0 else None for p in partner],
            "nucleus_length_um": c["length_um"].astype(np.float64),
            "nucleus_width_um": c["width_um"].astype(np.float64),
            "nucleus_angle_deg": np.degrees(c["angle"].astype(np.float64)) % 180.0,
            "nucleus_od": c["od"].astype(np.float64),
            "chromatin_contrast": c["contrast"].astype(np.float64),
            "chromatin_grain": c["grain"].astype(np.int64),
            "outline_irregularity": c["irregular"].astype(np.float64),
            "taper": c["taper"].astype(np.float64),
            "end_bluntness": c["blunt"].astype(np.float64),
            "nucleolus_um": c["nucleolus_um"].astype(np.float64),
            "cytoplasm_um": c["halo_um"].astype(np.float64),
        }))
        slides.append(SynthSlide(slide_id, path, bdir, fmt, tissue, lay.width, lay.height,
                                 len(shapes), mpp, n))
    cells = pl.concat(cell_tables)
    truth = pl.concat(truth_tables)
    cells.write_parquet(out / "cells.parquet")
    truth.write_parquet(out / "truth.parquet")
    pl.DataFrame(annotation_panel(), schema=["class", "gene"], orient="row").write_csv(out / "panel.csv")
    manifest.write_text(json.dumps({"params": params, "complete": True}))
    counts = dict(zip(*np.unique(truth["label"].to_numpy(), return_counts=True), strict=True))
    report("done", 1.0)
    return SynthResult(
        out_dir=out, slides=tuple(slides), cells_path=out / "cells.parquet",
        truth_path=out / "truth.parquet", classes=CLASSES,
        tissues=tuple(dict.fromkeys(s.tissue for s in slides)), regions=REGIONS,
        genes=gene_panel(), n_cells=n_cells,
        class_counts={k: int(counts.get(k, 0)) for k in CLASSES}, seed=seed)


__all__ = ["SynthResult", "SynthSlide", "make_synthetic", "PIXEL_SIZE_UM"]
