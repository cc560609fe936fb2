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
        pixel_size = experiment.get("pixel_size")
        if not isinstance(pixel_size, int | float) or not 0 < pixel_size < 10:
            raise CellsError(f"{exp_path}: pixel_size is missing or implausible ({pixel_size!r})")
    else:
        raise CellsError(
            f"{root}: no experiment.xenium, so the morphology pixel size is unknown; copy it from "
            "the original Xenium output"
        )
    if alignment is None:
        found = sorted(root.glob("*imagealignment*.csv"))
        alignment = found[0] if found else None
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


def read_alignment(path: str | Path) -> np.ndarray:
    """The 3x3 alignment matrix from a comma-separated file (no header)."""
    path = Path(path)
    try:
        rows = [
            [float(v) for v in line.replace(";", ",").split(",") if v.strip()]
            for line in path.read_text().splitlines()
            if line.strip()
        ]
        matrix = np.array(rows, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise AlignmentError(f"{path}: cannot read a 3x3 numeric matrix ({exc})") from exc
    if matrix.shape != (3, 3):
        raise AlignmentError(f"{path}: expected a 3x3 matrix, found shape {matrix.shape}")
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
        hint = (
            " It looks like the inverse (Xenium -> H&E) matrix: pass --invert-alignment."
            if abs(inverse / slide_mpp - 1) <= SCALE_TOLERANCE
            else " Check that this alignment belongs to this slide, or fix the slide's µm/px with --mpp."
        )
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
