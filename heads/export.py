"""Exports of per-cell predictions: a polars frame, Parquet, and QuPath-importable GeoJSON.

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

import numpy as np
import polars as pl

from embedstore.errors import UserError
from heads.calibration import check_proba

#: columns `predictions_frame` needs from the cell metadata
META_COLUMNS = ("slide_id", "cell_id", "x_um", "y_um", "x_px", "y_px")
#: optional metadata columns carried through when present
PASSTHROUGH_COLUMNS = ("tissue", "label", "split")
PROB_PREFIX = "prob_"

#: a qualitative palette (strong hues first, then lighter ones), indexed by class position
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip

log = logging.getLogger(__name__)

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


def _path_columns(
    prefix: str, proba: np.ndarray, classes: list[str], n: int, name: str
) -> dict[str, pl.Series]:
    p = check_proba(proba, name)
    if p.shape != (n, len(classes)):
        raise UserError(f"{name} has shape {p.shape}, expected ({n}, {len(classes)})")
    idx = p.argmax(axis=1)
    return {
        f"{prefix}class": pl.Series(classes, dtype=pl.String).gather(idx),
        f"{prefix}confidence": pl.Series(p[np.arange(n), idx].astype(np.float32)),
    }


def predictions_frame(
    meta: pl.DataFrame,
    classes: Sequence[str],
    proba_local: np.ndarray,
    proba_global: np.ndarray | None = None,
    proba_gate: np.ndarray | None = None,
    gate_value: np.ndarray | None = None,
) -> pl.DataFrame:
    """One row per cell: ids and coordinates, the predicted class and confidence, each
    path's class and confidence, the gate value and one `prob_<class>` column per class.

    The prediction (`pred_class`, `pred_confidence`, `prob_*`) comes from the gate when given,
    else from the global path, else from the local path; `pred_source` says which. Per-path
    columns are `local_class`/`local_confidence` and `global_class`/`global_confidence`.
    `gate` is g, the weight of the global path in p_mix = (1 - g) p_A + g p_B (null when
    absent). Metadata columns tissue/label/split are carried through when present.
    """
    cls = [str(c) for c in classes]
    if not cls or len(set(cls)) != len(cls):
        raise UserError(f"classes must be a non-empty list of unique names, got {cls}")
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise UserError(f"cell metadata lacks columns {missing} (needs {list(META_COLUMNS)})")
    n = meta.height
    cols = [c for c in (*META_COLUMNS, *PASSTHROUGH_COLUMNS) if c in meta.columns]
    out = meta.select(cols).with_columns(
        pl.col("slide_id").cast(pl.String), pl.col("cell_id").cast(pl.String)
    )
    per_path = _path_columns("local_", proba_local, cls, n, "proba_local")
    if proba_global is not None:
        per_path.update(_path_columns("global_", proba_global, cls, n, "proba_global"))
    if proba_gate is not None:
        source, final = "gate", proba_gate
    elif proba_global is not None:
        source, final = "global", proba_global
    else:
        source, final = "local", proba_local
    final = check_proba(final, f"proba_{source}")
    if final.shape != (n, len(cls)):
        raise UserError(f"proba_{source} has shape {final.shape}, expected ({n}, {len(cls)})")
    if gate_value is None:
        gate = pl.Series([None] * n, dtype=pl.Float32)
    else:
        gv = np.asarray(gate_value, dtype=np.float32).reshape(-1)
        if gv.shape != (n,):
            raise UserError(f"gate_value has {gv.size} values for {n} cells")
        gate = pl.Series(gv)
    idx = final.argmax(axis=1)
    return out.with_columns(
        pred_class=pl.Series(cls, dtype=pl.String).gather(idx),
        pred_confidence=pl.Series(final[np.arange(n), idx].astype(np.float32)),
        pred_source=pl.Series([source] * n, dtype=pl.String),
        **per_path,
        gate=gate,
        **{
            f"{PROB_PREFIX}{c}": pl.Series(final[:, i].astype(np.float32))
            for i, c in enumerate(cls)
        },
    )


def frame_classes(frame: pl.DataFrame) -> list[str]:
    """The class list of a predictions frame, from its `prob_<class>` columns (in order)."""
    return [c[len(PROB_PREFIX) :] for c in frame.columns if c.startswith(PROB_PREFIX)]


def write_parquet(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write a predictions frame as zstd-compressed Parquet (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, compression="zstd")
    return path


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "slide"


#: numeric columns written as QuPath measurements (when present and finite)
_MEASUREMENTS = {
    "pred_confidence": "confidence",
    "gate": "gate",
    "local_confidence": "local confidence",
    "global_confidence": "global confidence",
}
#: string columns written as QuPath metadata
_METADATA = ("slide_id", "cell_id", "pred_source", "local_class", "global_class", "tissue", "label")


def _features(
    frame: pl.DataFrame,
    colors: Mapping[str, tuple[int, int, int]],
    include_probabilities: bool,
    digits: int,
) -> Iterator[dict[str, Any]]:
    meas_cols = [c for c in _MEASUREMENTS if c in frame.columns]
    prob_cols = (
        [c for c in frame.columns if c.startswith(PROB_PREFIX)] if include_probabilities else []
    )
    meta_cols = [c for c in _METADATA if c in frame.columns]
    for row in frame.iter_rows(named=True):
        x, y = row["x_px"], row["y_px"]
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        cls = row["pred_class"]
        measurements = {
            _MEASUREMENTS[c]: float(row[c])
            for c in meas_cols
            if row[c] is not None and math.isfinite(row[c])
        }
        measurements.update(
            {
                f"prob {c[len(PROB_PREFIX) :]}": float(row[c])
                for c in prob_cols
                if row[c] is not None
            }
        )
        props = {
            "objectType": "detection",
            "name": str(row["cell_id"]),
            "classification": {"name": cls, "color": list(colors[cls])},
            "measurements": measurements,
            "metadata": {c: str(row[c]) for c in meta_cols if row[c] is not None},
        }
        yield {
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{row['slide_id']}/{row['cell_id']}")),
            "geometry": {"type": "Point", "coordinates": [round(x, digits), round(y, digits)]},
            "properties": props,
        }


def _write_collection(
    frame: pl.DataFrame,
    path: Path,
    colors: Mapping[str, tuple[int, int, int]],
    include_probabilities: bool,
    digits: int,
) -> int:
    n = 0
    with path.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for feat in _features(frame, colors, include_probabilities, digits):
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
) -> list[Path]:
    """Write predictions as QuPath GeoJSON point detections in level-0 pixel coordinates.

    One file per slide: with `slide_id`, only that slide is written, to `path`. Otherwise, if
    `path` ends in .geojson/.json the frame must hold a single slide; any other `path` is a
    folder that receives `<slide_id>.geojson` per slide. Colours come from `class_colors` over
    the frame's class list unless `colors` is given. `include_probabilities` adds one
    "prob <class>" measurement per class. Returns the written paths.
    """
    missing = [
        c for c in ("slide_id", "cell_id", "x_px", "y_px", "pred_class") if c not in frame.columns
    ]
    if missing:
        raise UserError(
            f"predictions frame lacks columns {missing}: build it with predictions_frame"
        )
    path = Path(path)
    classes = frame_classes(frame)
    for c in sorted(frame["pred_class"].unique().drop_nulls().to_list()):
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
    names = {s: _safe_name(str(s)) for s in slides}
    clash = len(set(names.values())) < len(names)
    if clash and not is_file:
        raise UserError(
            f"slide ids {slides} give clashing file names once made file-safe; "
            "write them one at a time with slide_id and explicit file paths"
        )
    written = []
    for s in slides:
        target = path if is_file else path / f"{names[s]}.geojson"
        target.parent.mkdir(parents=True, exist_ok=True)
        sub = frame.filter(pl.col("slide_id") == s) if len(slides) > 1 else frame
        n = _write_collection(sub, target, cmap, include_probabilities, digits)
        if n < sub.height:
            log.warning("%s: %d cells without finite x_px/y_px left out", target, sub.height - n)
        written.append(target)
    return written
