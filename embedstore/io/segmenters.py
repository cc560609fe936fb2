"""Cells from what segmenters write: QuPath GeoJSON, CellViT/CellViT++ JSON, label images.

Each reader gives a `Detections`: a raw frame of `cell_id, x, y` (+ `label`) in the source's
level-0 pixels, already in our pixel convention (continuous coordinates, pixel i covers [i, i+1),
as `x_px` in `geometry.py` and `geojson.write_geojson`). `ingest_detections` applies
`--scale`/`--offset-px` and passes the frame through `cells.normalise`, so NaN, duplicate and
out-of-slide centroids are dropped and reported exactly as for tables.

Source conventions:
- QuPath GeoJSON: continuous level-0 pixels, the same as ours: used as they are.
- CellViT/CellViT++ `cells.json`/`cell_detection.json`: "centroid" is [x, y] from the moments of
  the nucleus mask in pixel *indices* (pixel i centred on i), rounded, in level-0 pixels (CellViT++
  rescales to the slide's base µm/px when it ran at another resolution): +0.5 here. CellViT's own
  GeoJSON exports hold the same values; read with `fmt="cellvit"` they get the same +0.5.
- Label images: label pixel (r, c) covers [c, c+1) x [r, r+1): centroid = mean index + 0.5.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..errors import CellsError
from . import cells as C
from .slides import SLIDE_SUFFIXES

#: formats `embed cells` reads; the last three are read here
FORMATS = ("auto", "table", "xenium", "geojson", "cellvit", "labels")
LABELS_FROM = ("none", "classification")
DEFAULT_OBJECT_TYPES = ("detection", "cell")
#: CellViT centroids are pixel indices (pixel i centred on i); ours centre pixel i on i + 0.5
CELLVIT_PIXEL_SHIFT = 0.5
#: QuPath <= 0.2 wrote the object class into the Feature "id"
_QUPATH_V02_IDS = {
    "PathDetectionObject": "detection", "PathCellObject": "cell", "PathAnnotationObject": "annotation",
    "PathTileObject": "tile", "TMACoreObject": "tma_core", "PathRootObject": "root",
}  # fmt: skip
#: properties of a CellViT-style "layer" feature (one feature per class, many cells in it)
_LAYER_KEYS = {"objectType", "object_type", "classification", "isLocked", "color"}
_TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz", ".parquet", ".pq")
_LABEL_SUFFIXES = (".tif", ".tiff", ".png")
_JSON_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".json.gz")
#: file stems that name the tool's output, not the slide (CellViT: <slide>/cells.json; Cellpose:
#: <slide>_cp_masks.png)
_GENERIC_STEMS = {"cells", "cell_detection", "cell_detections", "detections", "labels", "label",
                  "masks", "mask", "cp_masks", "nuclei", "objects", "segmentation"}  # fmt: skip
_TAG_SUFFIXES = tuple(f"{sep}{stem}" for stem in sorted(_GENERIC_STEMS) for sep in ("_", "-", "."))


@dataclass
class Detections:
    """Raw centroids from one file: `frame` (cell_id, x, y[, label]) in source pixels."""

    frame: pl.DataFrame
    fmt: str
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # label image (width, height)
    meta: dict[str, Any] = field(default_factory=dict)


# -- format detection ----------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """"table", "xenium", "geojson", "json" (GeoJSON or CellViT: decided by content) or "labels"."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return "xenium"
    if name.endswith(".snappy"):
        raise CellsError(
            f"{path}: snappy-compressed (CellViT --compression); decompress it first, e.g. "
            "python -c \"import snappy,sys; sys.stdout.buffer.write(snappy.decompress(open(sys.argv[1],'rb').read()))\" "
            f"{path.name} > cells.json"
        )
    if name.endswith((".geojson", ".geojson.gz")):
        return "geojson"
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith(_LABEL_SUFFIXES):
        return "labels"
    if name.endswith(_TABLE_SUFFIXES):
        return "table"
    raise CellsError(
        f"{path}: unknown cell source; give a table (.csv/.tsv/.parquet), a Xenium bundle, QuPath "
        "GeoJSON (.geojson), CellViT cells.json or a label image (.tif/.png), or name the format "
        "with --format"
    )


def load_json(path: Path) -> Any:
    """A (possibly gzipped) JSON file; NaN/Infinity literals are read as floats."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CellsError(f"{path}: cannot read it as JSON ({exc})") from exc


def json_kind(data: Any, path: Path) -> str:
    """"cellvit" for a dict with a `cells` list, "geojson" for Features; else a CellsError."""
    if isinstance(data, dict) and isinstance(data.get("cells"), list):
        return "cellvit"
    if isinstance(data, list) or (isinstance(data, dict) and data.get("type") in ("FeatureCollection", "Feature")):
        return "geojson"
    keys = list(data)[:8] if isinstance(data, dict) else type(data).__name__
    raise CellsError(
        f"{path}: neither GeoJSON (a FeatureCollection, Feature or list of Features) nor CellViT "
        f"JSON (a 'cells' list); found {keys}"
    )


# -- geometry ------------------------------------------------------------------------------------
def _xy(coords: Any) -> np.ndarray:
    """(n, 2) float array of positions; malformed input gives NaN (reported downstream)."""
    try:
        arr = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        return np.full((1, 2), np.nan)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] == 0:
        return np.full((1, 2), np.nan)
    return arr[:, :2]


def _ring_moments(ring: Any) -> tuple[float, float, float, np.ndarray]:
    """Signed area and first moments (shoelace) of one ring, and its vertices."""
    xy = _xy(ring)
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    ox, oy = xy[0]  # moments about the first vertex: no precision loss far from the origin
    x, y = xy[:, 0] - ox, xy[:, 1] - oy
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2.0
    mx = ((x + x1) * cross).sum() / 6.0 + ox * area
    my = ((y + y1) * cross).sum() / 6.0 + oy * area
    return float(area), float(mx), float(my), xy


def _polygon_moments(rings: Sequence[Any]) -> tuple[float, float, float, np.ndarray]:
    """Area and moments of a polygon: exterior ring minus its holes, whatever their winding."""
    if not rings:
        return 0.0, 0.0, 0.0, np.full((1, 2), np.nan)
    total = np.zeros(3)
    exterior = None
    for k, ring in enumerate(rings):
        a, mx, my, xy = _ring_moments(ring)
        sign = 1.0 if a >= 0 else -1.0
        part = sign * np.array([a, mx, my])  # positive area orientation
        total += part if k == 0 else -part
        exterior = xy if k == 0 else exterior
    return float(total[0]), float(total[1]), float(total[2]), exterior


def area_centroid(polygons: Sequence[Sequence[Any]]) -> tuple[float, float]:
    """Area centroid of polygons (each a list of rings: exterior, then holes), area-weighted.

    A polygon of zero area (a line or a point) falls back to the mean of its exterior vertices.
    """
    area = mx = my = 0.0
    vertices = []
    for rings in polygons:
        a, x, y, xy = _polygon_moments(rings)
        area, mx, my = area + a, mx + x, my + y
        vertices.append(xy)
    if not math.isfinite(area) or abs(area) < 1e-12:
        pts = np.concatenate(vertices) if vertices else np.full((1, 2), np.nan)
        return float(pts[:, 0].mean()), float(pts[:, 1].mean())
    return mx / area, my / area


def geometry_centroids(geom: Any, *, split_multi_polygon: bool = False) -> tuple[np.ndarray, bool] | None:
    """Centroids of one GeoJSON geometry: ((n, 2), split) or None for an unsupported type.

    Point and Polygon give one centroid; MultiPoint one per point (split=True); MultiPolygon one
    area-weighted centroid, or one per polygon with `split_multi_polygon` (CellViT layers).
    """
    if not isinstance(geom, Mapping):
        return None
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Point":
        return _xy(coords)[:1], False
    if kind == "MultiPoint":
        return _xy(coords), True
    if kind == "Polygon":
        return np.array([area_centroid([coords or []])]), False
    if kind == "MultiPolygon":
        polys = coords or []
        if split_multi_polygon:
            return np.array([area_centroid([p]) for p in polys]).reshape(-1, 2), True
        return np.array([area_centroid(polys)]), False
    return None


# -- QuPath GeoJSON ------------------------------------------------------------------------------
def _features(data: Any, path: Path) -> list[dict]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    else:
        feats = data
    if not isinstance(feats, list):
        raise CellsError(f"{path}: GeoJSON 'features' is not a list")
    bad = [i for i, f in enumerate(feats) if not isinstance(f, dict)]
    if bad:
        raise CellsError(f"{path}: {len(bad)} GeoJSON features are not objects, e.g. index {bad[0]}")
    if not feats:
        raise CellsError(f"{path}: the GeoJSON holds no features: no cells to ingest")
    return feats


def _props(feat: Mapping) -> Mapping:
    props = feat.get("properties")
    return props if isinstance(props, Mapping) else {}


def object_type(feat: Mapping) -> str | None:
    """QuPath's objectType (lower case): "objectType" (>= 0.4), "object_type" (0.3) or the
    object class QuPath 0.2 wrote as the Feature "id" ("PathCellObject")."""
    props = _props(feat)
    t = props.get("objectType", props.get("object_type"))
    if t is None and isinstance(feat.get("id"), str):
        t = _QUPATH_V02_IDS.get(feat["id"])
    return str(t).lower() if t is not None else None


#: where a Feature's cell id is looked for, in order
ID_SOURCES = ("metadata.cell_id", "Feature id", "properties.name", "properties.id")


def _id_candidates(feat: Mapping) -> list[str | None]:
    props = _props(feat)
    meta = props.get("metadata")
    raw = (meta.get("cell_id") if isinstance(meta, Mapping) else None, feat.get("id"), props.get("name"), props.get("id"))
    out = [None if v is None else str(v).strip() for v in raw]
    return [v if v and v not in _QUPATH_V02_IDS else None for v in out]


def feature_ids(feats: Sequence[Mapping], chosen: Sequence[int]) -> tuple[list[str], str | None]:
    """One id per chosen feature: its first candidate among ID_SOURCES, else `f<index>` (its
    place in the file); and a note when names were passed over.

    properties.name is a display name: QuPath names objects by their class ("Tumor", "Stroma"),
    and taking those as ids would merge distinct cells, so names are used only when no two
    features share one. A repeat of a real id field (the Feature id) is a duplicate cell and
    goes through the usual bad-row rule.
    """
    cand = [_id_candidates(feats[i]) for i in chosen]
    name = ID_SOURCES.index("properties.name")
    names = [c[name] for c in cand if c[name] is not None]
    use_names = len(set(names)) == len(names)
    ids = [next((v for k, v in enumerate(c) if v is not None and (use_names or k != name)), f"f{i}")
           for i, c in zip(chosen, cand, strict=True)]  # fmt: skip
    note = None if use_names else f"properties.name repeats ({len(names) - len(set(names))} times), so it was not used as a cell id"
    return ids, note


def _class_name(cls: Mapping) -> str | None:
    """A QuPath classification object as QuPath writes the class in its tables ("Tumor: Positive"):
    `name`, or a derived class's `names` list (>= 0.4), or `name` under its `parentClass` chain
    (<= 0.3)."""
    names = cls.get("names")
    if isinstance(names, list) and names:
        return ": ".join(map(str, names))
    if cls.get("name") is None:
        return None
    parent = cls.get("parentClass")
    above = _class_name(parent) if isinstance(parent, Mapping) else None
    return f"{above}: {cls['name']}" if above else str(cls["name"])


def feature_label(feat: Mapping) -> str | None:
    """properties.classification (see `_class_name`), the old classification string, else
    properties.name."""
    props = _props(feat)
    cls = props.get("classification")
    named = _class_name(cls) if isinstance(cls, Mapping) else None
    if named is not None:
        return named
    if isinstance(cls, str) and cls.strip():
        return cls
    name = props.get("name")
    return str(name) if name is not None else None


def _is_layer(feat: Mapping) -> bool:
    """A CellViT-style feature: many cells of one class in one Multi* annotation."""
    geom = feat.get("geometry")
    kind = geom.get("type") if isinstance(geom, Mapping) else None
    return kind in ("MultiPoint", "MultiPolygon") and set(_props(feat)) <= _LAYER_KEYS


def read_geojson(
    data: Any,
    path: Path,
    *,
    object_types: Iterable[str] = DEFAULT_OBJECT_TYPES,
    labels_from: str = "none",
    layers: bool | None = None,
) -> Detections:
    """QuPath GeoJSON (FeatureCollection, bare list or one Feature) -> raw centroids.

    Only objects of `object_types` are read (features without objectType count as detections);
    the others are counted in a note. A "cell" with `nucleusGeometry` is placed at its nucleus.
    `layers` (CellViT exports: one feature per class) reads every feature and gives each point or
    polygon of a Multi* geometry its own cell `<feature id>-<i>`, in CellViT's pixel-index
    convention (+0.5); None decides from the file: a file with no objects of `object_types` whose
    features are all Multi* annotations is read as layers (without the shift, QuPath convention).
    """
    feats = _features(data, path)
    types = [object_type(f) or "detection" for f in feats]
    wanted = {t.strip().lower() for t in object_types if t.strip()}
    notes: list[str] = []
    n_untyped = sum(object_type(f) is None for f in feats)
    if n_untyped:
        notes.append(f"{n_untyped} features have no objectType: read as detections")
    chosen = [i for i, t in enumerate(types) if t in wanted]
    shift = 0.0
    if layers:
        chosen, shift = list(range(len(feats))), CELLVIT_PIXEL_SHIFT
    elif layers is None and not chosen and all(_is_layer(f) for f in feats):
        layers, chosen = True, list(range(len(feats)))
        notes.append(
            f"no {'/'.join(sorted(wanted))} objects; the {len(feats)} Multi* annotations were read as "
            "cell layers (one cell per point/polygon, as CellViT writes them; pass --format cellvit "
            "for CellViT's pixel-index convention)"
        )
    skipped = Counter(types[i] for i in sorted(set(range(len(feats))) - set(chosen)))
    if skipped:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(skipped.items()))
        notes.append(f"skipped {kinds} objects (read: {', '.join(sorted(wanted))}; choose with --object-types)")
    if not chosen:
        found = ", ".join(f"{n} {t}" for t, n in sorted(Counter(types).items()))
        raise CellsError(
            f"{path}: no objects of type {', '.join(sorted(wanted))} among {len(feats)} features "
            f"({found}); choose the types with --object-types, e.g. --object-types annotation"
        )
    ids: list[str] = []
    xy: list[np.ndarray] = []
    labels: list[str | None] = []
    unsupported: Counter = Counter()
    base_ids, id_note = feature_ids(feats, chosen)
    if id_note:
        notes.append(id_note)
    for i, base in zip(chosen, base_ids, strict=True):
        feat = feats[i]
        geom = feat.get("geometry")
        # QuPath writes a cell's nucleus beside "geometry"; accept it among the properties too
        nucleus = feat.get("nucleusGeometry", _props(feat).get("nucleusGeometry"))
        if types[i] == "cell" and isinstance(nucleus, Mapping):
            geom = nucleus
        got = geometry_centroids(geom, split_multi_polygon=bool(layers))
        if got is None:
            unsupported[geom.get("type") if isinstance(geom, Mapping) else "no"] += 1
            continue
        pts, split = got
        ids += [f"{base}-{j}" for j in range(len(pts))] if split else [base]
        xy.append(pts)
        labels += [feature_label(feat)] * len(pts)
    if unsupported:
        kinds = ", ".join(f"{n} with {t} geometry" for t, n in sorted(unsupported.items()))
        notes.append(f"skipped {kinds} (no centroid)")
    pts = np.concatenate(xy) if xy else np.zeros((0, 2))
    columns: dict[str, Any] = {"cell_id": ids, "x": pts[:, 0] + shift, "y": pts[:, 1] + shift}
    if labels_from == "classification":
        columns["label"] = pl.Series(labels, dtype=pl.Utf8)
    return Detections(pl.DataFrame(columns), "cellvit-geojson" if layers else "geojson", notes)


# -- CellViT JSON --------------------------------------------------------------------------------
def cellvit_type_map(raw: Any) -> dict[int, str]:
    """{type number: name} from CellViT++'s {"1": "Neoplastic"} or CellViT 1's {"Neoplastic": 1}."""
    if not isinstance(raw, Mapping):
        return {}
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            try:
                out[int(v)] = str(k)
            except (TypeError, ValueError):
                continue
    return out


def read_cellvit(data: Mapping, path: Path, *, labels_from: str = "none") -> Detections:
    """CellViT/CellViT++ cells.json or cell_detection.json -> raw centroids (+0.5, see module doc).

    Cells have no id in these files: the id is the cell's index in the "cells" list.
    """
    cells = data["cells"]
    if not cells:
        raise CellsError(f"{path}: the CellViT file lists no cells")
    xy = np.full((len(cells), 2), np.nan)
    types: list[Any] = []
    for i, cell in enumerate(cells):
        cell = cell if isinstance(cell, Mapping) else {}
        xy[i] = _xy(cell.get("centroid"))[0]
        types.append(cell.get("type"))
    columns: dict[str, Any] = {
        "cell_id": [str(i) for i in range(len(cells))],
        "x": xy[:, 0] + CELLVIT_PIXEL_SHIFT,
        "y": xy[:, 1] + CELLVIT_PIXEL_SHIFT,
    }
    notes: list[str] = []
    if labels_from == "classification":
        tmap = cellvit_type_map(data.get("type_map"))
        labels = [tmap.get(_as_int(t), None if t is None else str(t)) for t in types]
        unknown = sorted({str(t) for t in types if t is not None and _as_int(t) not in tmap})
        if unknown:
            notes.append(f"type numbers {unknown[:10]} are not in the file's type_map: kept as numbers")
        columns["label"] = pl.Series(labels, dtype=pl.Utf8)
    meta = data.get("wsi_metadata") if isinstance(data.get("wsi_metadata"), Mapping) else {}
    return Detections(pl.DataFrame(columns), "cellvit", notes, meta=dict(meta))


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- label images --------------------------------------------------------------------------------
def load_label_image(path: Path) -> np.ndarray:
    """A 2-D integer label image (TIFF or PNG); refuses colour images, masks and fractions."""
    try:
        if path.name.lower().endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA"):
                    raise CellsError(_rgb_message(path, im.mode))
                arr = np.asarray(im)
    except CellsError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile/PIL raise many kinds
        raise CellsError(f"{path}: cannot read it as a label image ({type(exc).__name__}: {exc})") from exc
    return as_label_array(arr, path)


def _rgb_message(path: Path, what: str) -> str:
    return (
        f"{path}: a colour ({what}) image, not a label image: a label image (StarDist, InstanSeg, "
        "Cellpose) has one integer channel, 0 = background and one value per nucleus. Save the "
        "labels themselves (e.g. tifffile.imwrite('labels.tif', labels)), not a coloured rendering."
    )


def as_label_array(arr: np.ndarray, path: Path) -> np.ndarray:
    """Check and convert to a 2-D non-negative integer array."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise CellsError(_rgb_message(path, f"{arr.shape[-1]}-channel"))
    if arr.ndim != 2:
        raise CellsError(f"{path}: a label image must be 2-D, this one has shape {arr.shape}")
    if arr.dtype == bool:
        raise CellsError(
            f"{path}: a binary mask, not a label image: label its connected nuclei first "
            "(scipy.ndimage.label) so that each nucleus has its own integer"
        )
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all() or not np.array_equal(arr, np.floor(arr)):
            raise CellsError(
                f"{path}: a float image with non-integer or NaN values (e.g. probabilities), not a "
                "label image: save the integer instance labels"
            )
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise CellsError(f"{path}: {arr.dtype} pixels, not integer labels")
    if arr.size and arr.min() < 0:
        raise CellsError(f"{path}: negative labels (min {arr.min()}); 0 is background, nuclei are 1, 2, ...")
    if arr.size == 0 or arr.max() == 0:
        raise CellsError(f"{path}: the label image has no labels (all background): no cells")
    return arr


def label_centroids(labels: np.ndarray, *, chunk_px: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label values, x, y) of every label > 0: pixel-count centroids, +0.5 (pixel centres).

    One pass of `np.bincount` over row blocks (memory stays at `chunk_px`), so 1e5 labels cost
    no more than one label; labels sparse in value are first renumbered with `np.unique`.
    """
    height, width = labels.shape
    values = None
    if int(labels.max()) > max(labels.size, 1 << 20):
        values, inverse = np.unique(labels, return_inverse=True)
        labels = inverse.reshape(labels.shape)
    n = int(labels.max()) + 1
    counts, sx, sy = np.zeros(n), np.zeros(n), np.zeros(n)
    cols = np.arange(width, dtype=np.float64)
    step = max(1, chunk_px // max(width, 1))
    for r0 in range(0, height, step):
        block = labels[r0 : r0 + step].astype(np.intp, copy=False)
        flat = block.ravel()
        counts += np.bincount(flat, minlength=n)
        sx += np.bincount(flat, weights=np.broadcast_to(cols, block.shape).ravel(), minlength=n)
        rows = np.repeat(np.arange(r0, r0 + block.shape[0], dtype=np.float64), width)
        sy += np.bincount(flat, weights=rows, minlength=n)
    present = np.flatnonzero(counts)
    present = present[present > 0] if values is None else present[values[present] > 0]
    ids = present if values is None else values[present]
    return ids, sx[present] / counts[present] + 0.5, sy[present] / counts[present] + 0.5


def read_label_image(path: Path) -> Detections:
    """A StarDist/InstanSeg/Cellpose label image -> one cell per label, id = the label value."""
    labels = load_label_image(path)
    ids, x, y = label_centroids(labels)
    frame = pl.DataFrame({"cell_id": [str(int(i)) for i in ids], "x": x, "y": y})
    height, width = labels.shape
    return Detections(frame, "labels", size=(width, height))


# -- entry points --------------------------------------------------------------------------------
def read_detections(
    path: str | Path,
    *,
    fmt: str = "auto",
    labels_from: str = "none",
    object_types: Iterable[str] = DEFAULT_OBJECT_TYPES,
) -> Detections:
    """Read one segmenter output in format `fmt` ("auto", "geojson", "cellvit", "labels")."""
    path = Path(path)
    if not path.exists():
        raise CellsError(f"{path}: no such file")
    if path.is_dir():
        raise CellsError(f"{path}: a directory; give the segmenter's output file")
    if fmt not in ("auto", "geojson", "cellvit", "labels"):
        raise CellsError(f"--format {fmt!r} is not a segmenter format (geojson, cellvit, labels)")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind in ("table", "xenium"):
        raise CellsError(f"{path}: a {kind}, not a segmenter output; read it with `embed cells` --format {kind}")
    if kind == "labels":
        if labels_from != "none":
            raise CellsError(f"{path}: a label image carries no classes: drop --labels-from")
        return read_label_image(path)
    data = load_json(path)
    content = json_kind(data, path)
    if content == "cellvit":
        if fmt == "geojson":
            raise CellsError(f"{path}: a CellViT cells.json, not GeoJSON: use --format cellvit (or auto)")
        return read_cellvit(data, path, labels_from=labels_from)
    layers = True if fmt == "cellvit" else None
    return read_geojson(data, path, object_types=object_types, labels_from=labels_from, layers=layers)


def slide_id_for(path: str | Path) -> str:
    """The slide id a segmenter output names: `S1.geojson`, `S1_cells.geojson.gz`, `S1_labels.tif`
    -> "S1"; a generic name (`cells.json`, CellViT's `<slide>/cell_detection.geojson`) -> the folder."""
    path = Path(path)
    name = path.name
    low = name.lower()
    for ext in (".gz",) + _JSON_SUFFIXES + _LABEL_SUFFIXES:
        if low.endswith(ext):
            name, low = name[: -len(ext)], low[: -len(ext)]
    if low in _GENERIC_STEMS:
        name = path.parent.resolve().name
    else:
        for tag in _TAG_SUFFIXES:
            if low.endswith(tag) and len(low) > len(tag):
                name = name[: -len(tag)]
                break
    for suffix in SLIDE_SUFFIXES + (".ome",):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    if not name.strip():
        raise CellsError(f"{path}: cannot tell the slide from the file name: pass --slide-id")
    return name


def _check_label_size(det: Detections, sid: str, geo: C.SlideGeometry | None, scale: float, offset: tuple[float, float], path: Path) -> None:
    """Refuse a label image whose size (times `scale`) is not the slide's level-0 size."""
    if det.size is None or geo is None or geo.width is None or offset != (0.0, 0.0):
        return
    lw, lh = det.size
    sw, sh = geo.width, geo.height
    tol = max(1.0, scale)
    if abs(lw * scale - sw) <= tol and abs(lh * scale - sh) <= tol:
        return
    scaled = f" (x{scale:g} = {lw * scale:.0f}x{lh * scale:.0f})" if scale != 1.0 else ""
    raise CellsError(
        f"{path}: the label image is {lw}x{lh} px{scaled} but slide {sid!r} is {sw}x{sh} px at level 0. "
        f"If the labels were made on a downsampled image, pass --scale {sw / lw:.6g} (slide px per "
        "label px); if on a larger image the slide was cropped from, pass --offset-px X,Y (the "
        "crop's top-left corner in label px)."
    )


def _check_cellvit_mpp(det: Detections, geo: C.SlideGeometry | None) -> None:
    base = det.meta.get("base_mpp")
    try:
        base = float(base)
    except (TypeError, ValueError):
        return
    if geo is not None and math.isfinite(base) and base > 0 and abs(base / geo.mpp - 1) > 0.1:
        det.notes.append(
            f"CellViT ran on an image of {base:g} µm/px but the slide has {geo.mpp:g} µm/px: if "
            f"CellViT saw another scan or level, pass --scale {base / geo.mpp:.6g}"
        )


def ingest_detections(
    path: str | Path,
    *,
    slides: str | Path | Sequence[str | Path] | None = None,
    mpp: float | None = None,
    slide_id: str | None = None,
    tissue: str | None = None,
    fmt: str = "auto",
    labels_from: str = "none",
    object_types: Iterable[str] = DEFAULT_OBJECT_TYPES,
    scale: float = 1.0,
    offset_px: tuple[float, float] = (0.0, 0.0),
    on_bad: str = "drop",
) -> tuple[pl.DataFrame, C.CellReport]:
    """A segmenter's output (QuPath GeoJSON, CellViT JSON, label image) -> normalised cells.

    Source coordinates x become `x * scale - offset_px[0]` level-0 slide pixels (same for y):
    `scale` for labels made on a downsample, `offset_px` for coordinates made on a parent image
    of which the slide is a crop. The slide id is `slide_id`, else the one slide given, else from
    the file name (`slide_id_for`). Slides give µm/px and bounds as in `ingest_table`.
    """
    from .ingest import slide_files_by_id, slide_geometries

    path = Path(path)
    if labels_from not in LABELS_FROM:
        raise CellsError(f"--labels-from must be one of {', '.join(LABELS_FROM)}, not {labels_from!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise CellsError(f"--scale must be a positive number, not {scale}")
    ox, oy = (float(v) for v in offset_px)
    if not (math.isfinite(ox) and math.isfinite(oy)):
        raise CellsError(f"--offset-px must be two finite numbers, not {offset_px}")
    if tissue is None:
        raise CellsError(f"{path}: a segmenter's output names no tissue: pass --tissue NAME")
    det = read_detections(path, fmt=fmt, labels_from=labels_from, object_types=object_types)
    if slides is not None:
        by_id = slide_files_by_id(slides)
        if not by_id:
            raise CellsError(f"no slide files found in {slides}")
        sid = slide_id or (next(iter(by_id)) if len(by_id) == 1 else slide_id_for(path))
        if sid not in by_id:
            raise CellsError(f"{path}: no slide with id {sid!r} among {', '.join(sorted(by_id))}: pass --slide-id")
        geos = slide_geometries([by_id[sid]], mpp)  # only this file's slide is opened
    elif mpp is not None:
        sid = slide_id or slide_id_for(path)
        geos = {sid: C.SlideGeometry(mpp)}
    else:
        raise CellsError("give the slides (--slides DIR) or their µm per pixel (--mpp) to place the cells")
    _check_label_size(det, sid, geos.get(sid), scale, (ox, oy), path)
    _check_cellvit_mpp(det, geos.get(sid))
    frame = det.frame.with_columns(
        x=pl.col("x") * scale - ox, y=pl.col("y") * scale - oy,
        slide_id=pl.lit(sid), tissue=pl.lit(tissue),
    )  # fmt: skip
    if "label" in frame.columns:
        frame = C.clean_text_columns(frame, ["label"])
    out, report = C.normalise(frame, "px", geos, on_bad=on_bad)
    report.notes = [f"{path.name}: {det.fmt}, slide {sid}"] + det.notes + report.notes
    return out, report
