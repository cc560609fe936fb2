"""QuPath-importable GeoJSON of cells (predictions, review queues).

GeoJSON follows QuPath's own object format (File > Import objects, or drag and drop; QuPath
>= 0.4): a FeatureCollection of Features with a geometry in level-0 pixel coordinates (origin
at the top-left of the full-resolution image, pixel i covering [i, i+1), the same convention
as `x_px`/`y_px`), and QuPath metadata in "properties": "objectType" ("detection": the type
QuPath uses for cells and other numerous small objects; annotations are meant for regions
and get slow by the tens of thousands), "classification" {"name", "color": [r, g, b]},
"measurements" {name: number} (finite numbers only), "name" (the cell id) and "metadata"
{str: str}. The Feature "id" is a UUID derived from (slide_id, cell_id), so re-exports keep
the same ids.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import UserError
from ..fileio import atomic_path, unique_names

log = logging.getLogger(__name__)
#: prefix of per-class probability columns (written as "prob <class>" measurements)
PROB_PREFIX = "prob_"

#: a qualitative palette (strong hues first, then lighter ones), indexed by class position
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


#: the first line of a GeoJSON `write_geojson` writes (one feature per line after it)
_HEADER = '{"type": "FeatureCollection", "features": [\n'
_NAMESPACE = uuid.UUID("6f1c2f0e-4c6b-4f0a-9a57-1d1b3c2e9e10")


def class_colors(classes: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """Stable RGB colour per class: by position in the (training) class list for the first
    20 classes, then a hue derived from a hash of the name. The same class list always gives
    the same colours in every export."""
    out: dict[str, tuple[int, int, int]] = {}
    for i, c in enumerate(classes):
        if i < len(_PALETTE):
            out[c] = _PALETTE[i]
        else:
            h = int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            r, g, b = colorsys.hsv_to_rgb(h, 0.65, 0.85)
            out[c] = (round(r * 255), round(g * 255), round(b * 255))
    return out


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "slide"


def folder_names(folder: Path, slides: Sequence[str]) -> dict[str, str]:
    """slide id -> file name stem in `folder`: a slide that already has a file there (by the
    slide_id of its first feature) keeps it; the others get a file-safe name, unique even on
    case-insensitive file systems and against every file there ("case:A", "case A" -> case_A,
    case_A_2, in sorted id order). Predicting "case:A" again never overwrites the file of "case A"."""
    files = sorted(folder.glob("*.geojson")) if folder.is_dir() else []
    existing: dict[str, str] = {}
    for p in files:
        slide = _slide_of(p)
        if slide is not None:
            existing.setdefault(slide, p.stem)
    out = {s: existing[s] for s in map(str, slides) if s in existing}
    new = sorted(set(map(str, slides)) - set(out))
    taken = [p.stem for p in files]
    return {**out, **dict(zip(new, unique_names([_safe_name(s) for s in new], taken), strict=True))}


def prune(folder: Path, keep: Sequence[str]) -> list[str]:
    """Remove the GeoJSON files `write_geojson` wrote in `folder` for slides not in `keep` (the
    slides of the predictions.parquet beside it: another run's classes must not stay on show
    in QuPath once that file was replaced); other tools' files stay. Returns the slides removed."""
    keep = set(map(str, keep))
    removed = []
    for p in sorted(folder.glob("*.geojson")) if folder.is_dir() else []:
        slide = _slide_of(p)
        if slide is not None and slide not in keep:
            p.unlink(missing_ok=True)
            removed.append(slide)
    return removed


def _slide_of(path: Path) -> str | None:
    """The slide_id of a GeoJSON `_write_collection` wrote (its first feature, on line 2), or None
    (another tool's file is not read through)."""
    try:
        with path.open() as f:
            if f.readline(len(_HEADER) + 1) != _HEADER:
                return None
            first = json.loads(f.readline(1 << 20).rstrip().rstrip(","))
        slide = first["properties"]["metadata"]["slide_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return slide if isinstance(slide, str) else None


def _features(
    frame: pl.DataFrame,
    colors: Mapping[str, tuple[int, int, int]],
    include_probabilities: bool,
    digits: int,
    class_col: str,
    measurement_names: Mapping[str, str],
    metadata: Sequence[str],
) -> Iterator[dict[str, Any]]:
    meas_cols = [c for c in measurement_names if c in frame.columns]
    prob_cols = (
        [c for c in frame.columns if c.startswith(PROB_PREFIX)] if include_probabilities else []
    )
    meta_cols = [c for c in metadata if c in frame.columns]
    for row in frame.iter_rows(named=True):
        x, y = row["x_px"], row["y_px"]
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        cls = row[class_col]
        measurements = {
            measurement_names[c]: float(row[c])
            for c in meas_cols
            if row[c] is not None and math.isfinite(row[c])
        }
        measurements.update(
            {
                f"prob {c[len(PROB_PREFIX) :]}": float(row[c])
                for c in prob_cols
                if row[c] is not None and math.isfinite(row[c])
            }
        )
        props = {
            "objectType": "detection",
            "name": str(row["cell_id"]),
            "measurements": measurements,
            "metadata": {c: str(row[c]) for c in meta_cols if row[c] is not None},
        }
        if cls is not None:  # no class (a cell not predicted): an unclassified detection
            props["classification"] = {"name": str(cls), "color": list(colors[cls])}
        yield {
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{row['slide_id']}/{row['cell_id']}")),
            "geometry": {"type": "Point", "coordinates": [round(x, digits), round(y, digits)]},
            "properties": props,
        }


def _write_collection(features: Iterator[dict[str, Any]], path: Path) -> int:
    """Stream features into a FeatureCollection file, atomically (a write that fails or is
    killed leaves the earlier file, never a truncated one); returns how many were written."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w") as f:
        f.write(_HEADER)
        for feat in features:
            f.write((",\n" if n else "") + json.dumps(feat, allow_nan=False))
            n += 1
        f.write("\n]}\n")
    return n


def write_geojson(
    frame: pl.DataFrame,
    path: str | Path,
    *,
    slide_id: str | None = None,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    include_probabilities: bool = False,
    digits: int = 2,
    class_col: str = "pred_class",
    measurements: Mapping[str, str] | None = None,
    metadata: Sequence[str] = ("slide_id", "cell_id"),
    classes: Sequence[str] | None = None,
) -> list[Path]:
    """Write cells as QuPath GeoJSON point detections in level-0 pixel coordinates.

    One file per slide: with `slide_id`, only that slide is written, to `path`. Otherwise, if
    `path` ends in .geojson/.json the frame must hold a single slide; any other `path` is a
    folder that receives `<slide_id>.geojson` per slide (made file-safe and unique; a slide
    that has a file there already keeps it, so writing some slides leaves the others' files
    as they are). Colours come from `class_colors` over
    the frame's class list unless `colors` is given. `include_probabilities` adds one
    "prob <class>" measurement per class. `class_col` names the column shown as the QuPath
    classification, `measurements` maps numeric columns to measurement names, `metadata` lists
    string columns kept as metadata, and `classes` fixes the colour order (default: sorted
    classes of `class_col`). Returns the written paths.
    """
    measurements = measurements or {}
    missing = [
        c for c in ("slide_id", "cell_id", "x_px", "y_px", class_col) if c not in frame.columns
    ]
    if missing:
        raise UserError(f"cell frame lacks columns {missing} needed for GeoJSON export")
    path = Path(path)
    classes = list(classes or [])
    for c in sorted(frame[class_col].unique().drop_nulls().to_list()):
        if c not in classes:
            classes.append(c)
    cmap = dict(class_colors(classes))
    if colors:
        cmap.update({k: tuple(int(v) for v in rgb) for k, rgb in colors.items()})
    if slide_id is not None:
        frame = frame.filter(pl.col("slide_id") == str(slide_id))
        if frame.height == 0:
            raise UserError(f"no cells of slide {slide_id!r} in the predictions")
    slides = frame["slide_id"].unique(maintain_order=True).to_list()
    is_file = path.suffix.lower() in (".geojson", ".json")
    if is_file and len(slides) > 1:
        raise UserError(
            f"{len(slides)} slides in the predictions but {path} is a single file: pass a folder "
            "(one <slide_id>.geojson per slide) or choose one slide with slide_id"
        )
    names = {} if is_file else folder_names(path, slides)
    written = []
    for s in slides:
        target = path if is_file else path / f"{names[str(s)]}.geojson"
        target.parent.mkdir(parents=True, exist_ok=True)
        sub = frame.filter(pl.col("slide_id") == s) if len(slides) > 1 else frame
        feats = _features(
            sub, cmap, include_probabilities, digits, class_col, measurements, metadata
        )
        n = _write_collection(feats, target)
        if n < sub.height:
            log.warning("%s: %d cells without finite x_px/y_px left out", target, sub.height - n)
        written.append(target)
    return written
