"""Ingest cells from a table or a Xenium bundle into the normalised form (see `cells`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import CellsError, SlideError
from . import cells as C
from . import xenium as X
from .slides import Slide, find_slides, slide_id_from_path


def slide_geometries(slide_paths: Sequence[Path], mpp: float | None = None) -> dict[str, C.SlideGeometry]:
    """Open each slide once for its µm/px and size."""
    out: dict[str, C.SlideGeometry] = {}
    for path in slide_paths:
        with Slide(path, mpp=mpp) as slide:
            if slide.slide_id in out:
                raise SlideError(f"two slide files share the id {slide.slide_id!r}: rename one")
            out[slide.slide_id] = C.SlideGeometry(slide.mpp, slide.info.width, slide.info.height)
    return out


def slide_files_by_id(slides: str | Path | Sequence[str | Path]) -> dict[str, Path]:
    """The slide files among `slides` (see `find_slides`) by id, without opening them."""
    by_id: dict[str, Path] = {}
    for p in find_slides(list(slides) if isinstance(slides, list | tuple) else slides):
        if by_id.setdefault(slide_id_from_path(p), p) != p:
            raise SlideError(f"two slide files share the id {slide_id_from_path(p)!r}: rename one")
    return by_id


def ingest_table(
    path: str | Path,
    *,
    slides: str | Path | Sequence[str | Path] | None = None,
    mpp: float | None = None,
    unit: str | None = None,
    columns: Mapping[str, str] | None = None,
    slide_id: str | None = None,
    tissue: str | None = None,
    on_bad: str = "drop",
) -> tuple[pl.DataFrame, C.CellReport]:
    """A CSV/Parquet table of centroids -> normalised cells.

    Slide files (a directory or paths) give each slide's µm/px and bounds; without them `mpp`
    must be given and centroids cannot be checked against the slide bounds.
    """
    columns = dict(columns or {})
    table = C.read_table(path, text=[columns[k] for k in ("slide_id", "cell_id") if k in columns])
    if "x" not in columns:
        refuse_xenium_cells(table, Path(path))
    by_id = slide_files_by_id(slides) if slides is not None else None
    if slide_id is None and by_id is not None and len(by_id) == 1 and C.find_column(table, "slide_id", columns.get("slide_id")) is None:
        slide_id = next(iter(by_id))  # one slide, and the table names none: that one
    frame, unit = C.table_to_cells(table, unit=unit, columns=columns, slide_id=slide_id, tissue=tissue)
    if by_id is not None:
        frame = C.match_slide_ids(frame, list(by_id))
        named = set(frame["slide_id"].unique().to_list())
        # open only the slides the table names: other files in the folder (label images,
        # thumbnails) are none of this table's business
        geos = slide_geometries([p for sid, p in by_id.items() if sid in named], mpp)
        return C.normalise(frame, unit, geos, on_bad=on_bad, known=list(by_id))
    if mpp is not None:
        geos = {sid: C.SlideGeometry(mpp) for sid in frame["slide_id"].drop_nulls().unique().to_list()}
    else:
        raise CellsError("give the slides (--slides DIR) or their µm per pixel (--mpp) to place the cells")
    return C.normalise(frame, unit, geos, on_bad=on_bad)


#: columns of Xenium's cells.parquet that a table of H&E centroids would not have
XENIUM_COUNT_COLUMNS = ("transcript_counts", "control_probe_counts", "control_codeword_counts")


def refuse_xenium_cells(table: pl.DataFrame, path: Path) -> None:
    """Refuse a bundle's own cells table: its centroids are µm in the Xenium morphology frame,
    which only the bundle's H&E alignment maps onto the slide (read as slide µm, every cell
    lands in the wrong place). Columns named explicitly (--x-col) are taken as given."""
    if C.find_column(table, "x") != "x_centroid":
        return
    if any(c in table.columns for c in XENIUM_COUNT_COLUMNS) or (path.parent / "experiment.xenium").exists():
        raise CellsError(
            f"{path}: a Xenium cells table; its x_centroid/y_centroid are µm in the Xenium morphology "
            f"frame, not on the H&E slide. Give the bundle folder (`embed cells {path.parent}`), which "
            "applies the H&E alignment; if these coordinates are already registered to the H&E slide, "
            "name them with --x-col x_centroid --y-col y_centroid"
        )


def ingest_xenium(
    bundle_dir: str | Path,
    *,
    slide: str | Path | None = None,
    mpp: float | None = None,
    tissue: str | None = None,
    slide_id: str | None = None,
    alignment: str | Path | None = None,
    invert_alignment: bool = False,
    on_bad: str = "drop",
) -> tuple[pl.DataFrame, C.CellReport]:
    """A Xenium output bundle -> normalised cells in the H&E slide's level-0 pixels."""
    bundle = X.open_bundle(bundle_dir, alignment=alignment, he_image=slide)
    if bundle.he_image is None:
        raise CellsError(f"{bundle.root}: no H&E image found (*he_image*): pass --slide PATH")
    if bundle.alignment_path is None:
        raise CellsError(
            f"{bundle.root}: no *_he_imagealignment.csv: export the H&E alignment from Xenium "
            "Explorer and pass --alignment PATH"
        )
    with Slide(bundle.he_image, mpp=mpp) as he:
        # a bundle's H&E is often a link to the slide collection: name it after the real file
        sid = slide_id or slide_id_from_path(bundle.he_image.resolve())
        geo = C.SlideGeometry(he.mpp, he.info.width, he.info.height)
    matrix = X.read_alignment(bundle.alignment_path)
    if invert_alignment:
        if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-12:
            raise X.AlignmentError(f"{bundle.alignment_path}: the alignment matrix is not invertible")
        matrix = np.linalg.inv(matrix)
    X.check_alignment(matrix, bundle.pixel_size, geo.mpp, str(bundle.alignment_path))
    tissue = tissue or bundle.tissue
    if tissue is None:
        raise CellsError(f"{bundle.root}: experiment.xenium names no tissue: pass --tissue NAME")

    raw = X.read_xenium_cells(bundle)
    x_px, y_px = X.xenium_to_he_px(
        raw["x_centroid"].to_numpy(), raw["y_centroid"].to_numpy(), matrix, bundle.pixel_size
    )
    frame = pl.DataFrame(
        {"slide_id": sid, "cell_id": raw["cell_id"], "x": x_px, "y": y_px, "tissue": tissue}
    )
    return C.normalise(frame, "px", {sid: geo}, on_bad=on_bad)
