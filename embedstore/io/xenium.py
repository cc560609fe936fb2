"""Xenium output bundles: cells, pixel size, expression, and the H&E registration.

10x's `*_he_imagealignment.csv` (exported by Xenium Explorer) is a 3x3 matrix M that maps H&E
level-0 pixel coordinates to Xenium morphology-image pixel coordinates; morphology pixels times
`pixel_size` (from `experiment.xenium`) are the µm of `cells.parquet`. So a cell's H&E position is
`inv(M) @ [x_um / pixel_size, y_um / pixel_size, 1]`, and the H&E µm/px implied by M is
`pixel_size * sqrt(|det M[:2, :2]|)`.

Note: METHOD.md writes the implied scale as pixel_size / sqrt(|det|), which holds for the
inverse matrix (morphology -> H&E); with 10x's direction it is the product. Checked against 10x's
knowledge-base example (H&E px -> Xenium px) and the synthetic bundles.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import AlignmentError, CellsError

PIXEL_SIZE_DEFAULT_UM = 0.2125
#: relative tolerance between the slide's µm/px and the one implied by the alignment
SCALE_TOLERANCE = 0.05


@dataclass(frozen=True)
class XeniumBundle:
    """Paths and facts of one Xenium output directory."""

    root: Path
    cells_path: Path
    pixel_size: float
    experiment: dict
    alignment_path: Path | None
    he_image: Path | None

    @property
    def tissue(self) -> str | None:
        """Tissue from experiment.xenium's panel_tissue_type (e.g. 'human_breast' -> 'breast')."""
        raw = self.experiment.get("panel_tissue_type") or self.experiment.get("tissue")
        if not raw:
            return None
        raw = str(raw).lower()
        return raw.split("_", 1)[1] if raw.startswith(("human_", "mouse_")) else raw


def open_bundle(
    root: str | Path, *, alignment: str | Path | None = None, he_image: str | Path | None = None
) -> XeniumBundle:
    root = Path(root)
    if not root.is_dir():
        raise CellsError(f"{root}: not a Xenium output directory")
    cells = next((root / n for n in ("cells.parquet", "cells.csv.gz", "cells.csv") if (root / n).exists()), None)
    if cells is None:
        raise CellsError(f"{root}: no cells.parquet or cells.csv.gz; is this a Xenium output bundle?")
    exp_path = root / "experiment.xenium"
    experiment: dict = {}
    if exp_path.exists():
        try:
            experiment = json.loads(exp_path.read_text())
        except json.JSONDecodeError as exc:
            raise CellsError(f"{exp_path}: not valid JSON ({exc})") from exc
        raw_size = experiment.get("pixel_size")
        try:  # a number, or a number written as text; never a bool (JSON true is no size)
            pixel_size = None if isinstance(raw_size, bool) else float(raw_size)
        except (TypeError, ValueError):
            pixel_size = None
        if pixel_size is None or not 0 < pixel_size < 10:
            raise CellsError(f"{exp_path}: pixel_size is missing or implausible ({raw_size!r}); Xenium writes "
                             "the morphology image's µm per pixel there, e.g. 0.2125")  # fmt: skip
    else:
        raise CellsError(
            f"{root}: no experiment.xenium, so the morphology pixel size is unknown; copy it from "
            "the original Xenium output"
        )
    if alignment is None:
        alignment = _find_alignment(root)
    if he_image is None:
        found = sorted(p for p in root.glob("*he_image*") if not p.name.endswith(".csv"))
        he_image = found[0] if found else None
    return XeniumBundle(
        root=root,
        cells_path=cells,
        pixel_size=float(pixel_size),
        experiment=experiment,
        alignment_path=Path(alignment) if alignment else None,
        he_image=Path(he_image) if he_image else None,
    )


def _find_alignment(root: Path) -> Path | None:
    """The bundle's H&E alignment matrix: `*he_imagealignment.csv` first (an IF image's
    alignment may sit beside it); keypoint files are not matrices. Several candidates of the
    same kind are refused rather than one picked by name order."""
    found = [p for p in sorted(root.glob("*imagealignment*.csv")) if "keypoints" not in p.name.lower()]
    he = [p for p in found if "he_imagealignment" in p.name.lower()]
    pick = he or found
    if len(pick) > 1:
        raise AlignmentError(f"{root}: several alignment files ({', '.join(p.name for p in pick)}): "
                             "name the H&E one with --alignment PATH")  # fmt: skip
    return pick[0] if pick else None


def _numbers(line: str) -> list[float] | None:
    """The numbers of one CSV line (, ; or tab separated, values possibly quoted), or None
    when one field is not a number (a header row)."""
    fields = [f.strip().strip("\"'") for f in line.replace(";", ",").replace("\t", ",").split(",")]
    try:
        return [float(f) for f in fields if f]
    except ValueError:
        return None


def read_alignment(path: str | Path) -> np.ndarray:
    """The 3x3 alignment matrix from a CSV file: Xenium Explorer's (no header), or one saved
    with a header row and/or a row-index column (pandas' `to_csv`), with a BOM or quotes."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise AlignmentError(f"{path}: cannot read the alignment file ({exc})") from exc
    if lines and any(k in lines[0].lower() for k in ("fixedx", "alignmentx")):
        raise AlignmentError(f"{path}: a keypoints file, not the transformation matrix; in Xenium Explorer's "
                             "image alignment, download the 3x3 matrix (*_he_imagealignment.csv)")  # fmt: skip
    rows = [_numbers(ln) for ln in lines]
    if rows and rows[0] is None:
        rows = rows[1:]  # a header row
    if any(r is None for r in rows):
        bad = lines[[r is None for r in rows].index(True) + (len(lines) - len(rows))]
        raise AlignmentError(f"{path}: cannot read a 3x3 numeric matrix (line {bad[:60]!r} is not numbers)")
    if len(rows) == 4 and rows[0] == [0, 1, 2]:
        rows = rows[1:]  # pandas' header of column numbers (",0,1,2")
    if len(rows) == 3 and all(len(r) == 4 for r in rows) and [r[0] for r in rows] == [0, 1, 2]:
        rows = [r[1:] for r in rows]  # pandas' row index
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        raise AlignmentError(f"{path}: expected a 3x3 matrix, found {len(rows)} rows of {[len(r) for r in rows]} values")
    matrix = np.array(rows, dtype=np.float64)
    return matrix


def check_alignment(matrix: np.ndarray, pixel_size: float, slide_mpp: float | None, where: str) -> float:
    """Validate an H&E px -> morphology px matrix; return the H&E µm/px it implies."""
    if not np.all(np.isfinite(matrix)):
        raise AlignmentError(f"{where}: the alignment matrix has NaN or infinite entries")
    if not np.allclose(matrix[2], [0, 0, 1], atol=1e-6):
        raise AlignmentError(
            f"{where}: the last row is {matrix[2].tolist()}, not [0, 0, 1]; only affine "
            "alignments (as exported by Xenium Explorer) are supported"
        )
    linear = matrix[:2, :2]
    det = float(np.linalg.det(linear))
    sv = np.linalg.svd(linear, compute_uv=False)
    if abs(det) < 1e-12 or sv[-1] <= 1e-9 * sv[0]:
        raise AlignmentError(
            f"{where}: the alignment matrix is singular (det {det:.3g}); re-export it from "
            "Xenium Explorer (Image alignment -> download the transformation matrix)"
        )
    if sv[0] / sv[-1] > 1.2:
        raise AlignmentError(
            f"{where}: the alignment stretches one axis {sv[0] / sv[-1]:.2f}x more than the "
            "other; H&E and Xenium images should differ by scale, rotation and shift only"
        )
    implied = pixel_size * float(np.sqrt(abs(det)))
    if slide_mpp is not None and abs(implied / slide_mpp - 1) > SCALE_TOLERANCE:
        inverse = pixel_size / float(np.sqrt(abs(det)))
        to_um = float(np.sqrt(abs(det)))  # a matrix to Xenium µm implies this µm per H&E pixel
        if abs(inverse / slide_mpp - 1) <= SCALE_TOLERANCE:
            hint = " It looks like the inverse (Xenium -> H&E) matrix: pass --invert-alignment."
        elif abs(to_um / slide_mpp - 1) <= SCALE_TOLERANCE:
            hint = (f" It looks like a matrix to Xenium µm, not to morphology-image pixels: divide its first two "
                    f"rows by the pixel size ({pixel_size:g}) and pass the result with --alignment.")  # fmt: skip
        else:
            hint = " Check that this alignment belongs to this slide, or fix the slide's µm/px with --mpp."
        raise AlignmentError(
            f"{where}: the alignment implies {implied:.4f} µm per H&E pixel but the slide says "
            f"{slide_mpp:.4f} (more than {SCALE_TOLERANCE:.0%} apart).{hint}"
        )
    return implied


def xenium_to_he_px(x_um: np.ndarray, y_um: np.ndarray, matrix: np.ndarray, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Xenium µm -> H&E level-0 px through the inverse of `matrix`."""
    morph = np.stack([np.asarray(x_um) / pixel_size, np.asarray(y_um) / pixel_size, np.ones(len(x_um))])
    he = np.linalg.solve(matrix, morph)
    return he[0] / he[2], he[1] / he[2]


def he_px_to_xenium(x_px: np.ndarray, y_px: np.ndarray, matrix: np.ndarray, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """H&E level-0 px -> Xenium µm (the forward direction of `matrix`)."""
    morph = matrix @ np.stack([np.asarray(x_px), np.asarray(y_px), np.ones(len(x_px))])
    return morph[0] * pixel_size, morph[1] * pixel_size


def read_xenium_cells(bundle: XeniumBundle) -> pl.DataFrame:
    """cells.parquet / cells.csv.gz with cell_id as string and float centroids (µm)."""
    path = bundle.cells_path
    try:
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise CellsError(f"{path}: cannot read ({exc})") from exc
    for col in ("cell_id", "x_centroid", "y_centroid"):
        if col not in df.columns:
            raise CellsError(f"{path}: no {col} column; columns are {df.columns}")
    if df["cell_id"].dtype == pl.Binary:
        df = df.with_columns(pl.col("cell_id").cast(pl.Utf8))
    return df.with_columns(
        pl.col("cell_id").cast(pl.Utf8),
        pl.col("x_centroid").cast(pl.Float64),
        pl.col("y_centroid").cast(pl.Float64),
    )


def read_feature_matrix(root: str | Path) -> tuple[list[str], list[str], object]:
    """The 10x MEX cell_feature_matrix: (cell ids, gene names, scipy CSR cells x genes).

    Only 'Gene Expression' features are kept (control probes are dropped).
    """
    from scipy.io import mmread

    mex = Path(root) / "cell_feature_matrix"
    if not mex.is_dir():
        raise CellsError(f"{root}: no cell_feature_matrix/ directory (10x MEX layout)")

    def lines(name: str) -> list[list[str]]:
        path = mex / name
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            return [line.rstrip("\n").split("\t") for line in fh if line.strip()]

    barcodes = [row[0] for row in lines("barcodes.tsv.gz")]
    features = lines("features.tsv.gz")
    with gzip.open(mex / "matrix.mtx.gz", "rb") as fh:
        matrix = mmread(fh).tocsr()  # genes x cells
    keep = [i for i, row in enumerate(features) if len(row) < 3 or row[2] == "Gene Expression"]
    genes = [features[i][1] if len(features[i]) > 1 else features[i][0] for i in keep]
    return barcodes, genes, matrix[keep].T.tocsr()
