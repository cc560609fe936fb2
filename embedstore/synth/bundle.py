"""Xenium-like output bundle per slide: cells.parquet, experiment.xenium, H&E alignment, MEX.

Gene counts are negative binomial (Poisson-gamma) around class-specific marker means, with
per-cell library size, spill-over from the nearest neighbour (segmentation errors) and an
organ-specific ambient background, so that marker-guided labelling recovers the classes with
some errors.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import polars as pl
import scipy.io
import scipy.sparse
from scipy.spatial import cKDTree

from .spec import (
    CLASSES,
    DOUBLET_SHARE,
    EMPTY_SHARE,
    MARKERS,
    N_CONTROL_CODEWORDS,
    N_NEGATIVE_PROBES,
    N_UNASSIGNED_CODEWORDS,
    TISSUE_STYLES,
    UNCOVERED_MARKERS,
    UNCOVERED_SHARE,
    gene_panel,
)

#: expression kinds recorded in truth.parquet (`expression_kind`)
KINDS = ("single", "doublet", "empty", "uncovered")

PIXEL_SIZE_UM = 0.2125  # Xenium morphology image µm/px
BASE_MEAN = 0.04  # mean count of a non-marker gene
NB_SHAPE = 2.5  # gamma shape of the Poisson-gamma counts (smaller: more overdispersed)

XENIUM_CELL_COLUMNS = ("cell_id", "x_centroid", "y_centroid", "transcript_counts",
                       "control_probe_counts", "total_counts", "cell_area", "nucleus_area")


def cell_ids(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct 10x-style ids ("aaacdbjl-1": 8 base-16 digits written a..p), sorted."""
    nums = np.sort(rng.choice(16**8 // 4, size=n, replace=False))
    digits = (nums[:, None] // (16 ** np.arange(7, -1, -1))[None, :]) % 16
    letters = (digits + ord("a")).astype(np.uint8)
    return [row.tobytes().decode() + "-1" for row in letters]


def alignment_matrix(rng: np.random.Generator, width_px: int, height_px: int, he_mpp: float
                     ) -> np.ndarray:
    """3x3 affine M: H&E level-0 px -> Xenium morphology px (scale, seeded rotation, shift)."""
    s = he_mpp / PIXEL_SIZE_UM
    ang = math.radians(rng.uniform(3, 30) * rng.choice([-1, 1]))
    lin = s * np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    corners = np.array([[0, 0], [width_px, 0], [0, height_px], [width_px, height_px]], float)
    mapped = corners @ lin.T
    shift = -mapped.min(axis=0) + rng.uniform(200, 2000, 2)
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = shift
    return m


def class_profiles(genes: tuple[str, ...]) -> np.ndarray:
    """(n_classes, n_genes) mean counts at a typical library size."""
    prof = np.full((len(CLASSES), len(genes)), BASE_MEAN)
    col = {g: j for j, g in enumerate(genes)}
    for k, cname in enumerate(CLASSES):
        for g, mu in MARKERS[cname].items():
            prof[k, col[g]] = mu
    return prof


def expression(rng: np.random.Generator, labels: np.ndarray, xy_um: np.ndarray,
               cell_area: np.ndarray, tissue: str, genes: tuple[str, ...]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts (cells x genes), control counts (cells x negative probes + control codewords +
    unassigned codewords), the expression kind per cell (index into KINDS) and the doublet
    partner's class (-1 if none).

    Realistic trouble: log-normal library sizes (tens to hundreds of counts) and ~2% near-empty
    cells, ~5% doublets (a cell of another class adds its transcripts), ~3% cells of a type no
    annotation-panel class covers, spill-over from the nearest neighbour, organ ambient RNA."""
    n = len(labels)
    prof = class_profiles(genes)
    lib = np.exp(rng.normal(0, 0.6, n)) * np.sqrt(cell_area / np.median(cell_area))
    mu = prof[labels]
    trouble = rng.random(n)
    kind = np.zeros(n, dtype=np.int64)
    kind[trouble < EMPTY_SHARE + DOUBLET_SHARE + UNCOVERED_SHARE] = 3
    kind[trouble < EMPTY_SHARE + DOUBLET_SHARE] = 1
    kind[trouble < EMPTY_SHARE] = 2
    partner = np.where(kind == 1, (labels + rng.integers(1, len(CLASSES), n)) % len(CLASSES), -1)
    uncovered = np.full(len(genes), BASE_MEAN)
    for g, m in UNCOVERED_MARKERS.items():
        uncovered[genes.index(g)] = m
    mu = np.where((kind == 3)[:, None], uncovered[None, :], mu)
    mu = np.where((kind == 1)[:, None], mu + prof[partner.clip(0)], mu)
    lib = np.where(kind == 2, 0.01, lib)
    if n > 1:  # spill-over from the nearest neighbour
        _, nn = cKDTree(xy_um).query(xy_um, k=2)
        phi = rng.beta(1.5, 12.0, n)[:, None]
        mu = (1 - phi) * mu + phi * prof[labels[nn[:, 1]]]
    ambient = 0.06 * prof[labels].mean(axis=0)
    for g in TISSUE_STYLES[tissue].ambient_genes:
        ambient[genes.index(g)] += 0.4
    mu = mu * lib[:, None] + ambient[None, :]
    mu = np.where((kind == 2)[:, None], mu * 0.05, mu)  # empty: ambient barely reaches them
    counts = rng.poisson(rng.gamma(NB_SHAPE, mu / NB_SHAPE)).astype(np.int32)
    n_ctrl = N_NEGATIVE_PROBES + N_CONTROL_CODEWORDS + N_UNASSIGNED_CODEWORDS
    ctrl = rng.poisson(0.015 * (1 + lib[:, None]), (n, n_ctrl)).astype(np.int32)
    return counts, ctrl, kind, partner


@contextlib.contextmanager
def _gzip_open(path: Path):
    """Byte-reproducible gzip (no timestamp, no file name in the header)."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
        yield fh


def control_features() -> list[tuple[str, str, str]]:
    """(id, name, feature type) of the control features, in matrix order after the genes."""
    out = [(f"NegControlProbe_{k + 1:05d}",) * 2 + ("Negative Control Probe",)
           for k in range(N_NEGATIVE_PROBES)]
    out += [(f"NegControlCodeword_{k + 1:04d}",) * 2 + ("Negative Control Codeword",)
            for k in range(N_CONTROL_CODEWORDS)]
    out += [(f"UnassignedCodeword_{k + 1:04d}",) * 2 + ("Unassigned Codeword",)
            for k in range(N_UNASSIGNED_CODEWORDS)]
    return out


def write_mex(dir_: Path, ids: list[str], genes: tuple[str, ...], counts: np.ndarray,
              neg: np.ndarray) -> None:
    """10x cell_feature_matrix/: barcodes, features (genes + control features), matrix."""
    dir_.mkdir(parents=True, exist_ok=True)
    with _gzip_open(dir_ / "barcodes.tsv.gz") as fh:
        fh.write("".join(f"{c}\n" for c in ids).encode())
    rows = [f"SYNG{j + 1:05d}\t{g}\tGene Expression\n" for j, g in enumerate(genes)]
    rows += [f"{i}\t{name}\t{kind}\n" for i, name, kind in control_features()[: neg.shape[1]]]
    with _gzip_open(dir_ / "features.tsv.gz") as fh:
        fh.write("".join(rows).encode())
    mat = scipy.sparse.coo_matrix(np.concatenate([counts, neg], axis=1).T)
    with _gzip_open(dir_ / "matrix.mtx.gz") as fh:
        scipy.io.mmwrite(fh, mat, field="integer")


def write_10x_h5(path: Path, ids: list[str], genes: tuple[str, ...], counts: np.ndarray,
                 ctrl: np.ndarray) -> None:
    """10x `cell_feature_matrix.h5` (HDF5 v3 layout: matrix/ as features x cells CSC data)."""
    import h5py

    m = scipy.sparse.csc_matrix(np.concatenate([counts, ctrl], axis=1).T.astype(np.int32))
    feats = [(f"SYNG{j + 1:05d}", g, "Gene Expression") for j, g in enumerate(genes)]
    feats += control_features()[: ctrl.shape[1]]
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(ids, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        ft = g.create_group("features")
        ft["id"] = np.array([f[0] for f in feats], dtype="S")
        ft["name"] = np.array([f[1] for f in feats], dtype="S")
        ft["feature_type"] = np.array([f[2] for f in feats], dtype="S")
        ft["genome"] = np.array(["GRCh38"] * len(feats), dtype="S")
        ft["_all_tag_keys"] = np.array([b"genome"])


def write_bundle(dir_: Path, *, slide_id: str, slide_path: Path, tissue: str, ids: list[str],
                 x_px: np.ndarray, y_px: np.ndarray, labels: np.ndarray, he_mpp: float,
                 nucleus_area_um2: np.ndarray, cell_area_um2: np.ndarray,
                 rng: np.random.Generator, run_name: str, width_px: int, height_px: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write one Xenium-like bundle; returns the Xenium centroids (x_um, y_um), the
    expression kind (index into KINDS) and the doublet partner class (-1: none) per cell."""
    dir_.mkdir(parents=True, exist_ok=True)
    m = alignment_matrix(rng, width_px, height_px, he_mpp)
    csv = dir_ / f"{slide_id}_he_imagealignment.csv"
    csv.write_text("\n".join(",".join(f"{v:.17g}" for v in row) for row in m) + "\n")
    m = np.loadtxt(csv, delimiter=",")  # use exactly what a reader will see
    he = np.stack([x_px, y_px, np.ones_like(x_px)])
    morph = m @ he
    x_um, y_um = morph[0] * PIXEL_SIZE_UM, morph[1] * PIXEL_SIZE_UM

    genes = gene_panel()
    xy_he_um = np.column_stack([x_px, y_px]) * he_mpp
    counts, neg, kind, partner = expression(rng, labels, xy_he_um, cell_area_um2, tissue, genes)
    tx = counts.sum(axis=1).astype(np.int64)
    ctrl = neg.sum(axis=1).astype(np.int64)
    pl.DataFrame({
        "cell_id": ids,
        "x_centroid": x_um, "y_centroid": y_um,
        "transcript_counts": tx, "control_probe_counts": ctrl, "total_counts": tx + ctrl,
        "cell_area": cell_area_um2.astype(np.float64),
        "nucleus_area": nucleus_area_um2.astype(np.float64),
    }).write_parquet(dir_ / "cells.parquet")
    write_mex(dir_ / "cell_feature_matrix", ids, genes, counts, neg)

    experiment = {
        "major_version": 5, "minor_version": 0, "patch_version": 0,
        "run_name": run_name, "run_start_time": "2024-01-01T00:00:00+00:00",
        "region_name": slide_id, "preservation_method": "ffpe",
        "num_cells": len(ids),
        "transcripts_per_cell": int(np.median(tx)) if len(tx) else 0,
        "cassette_name": "synthetic", "slide_id": "0000000", "panel_design_id": "synthetic",
        "panel_name": f"Synthetic NuClass panel ({tissue})", "panel_organism": "Human",
        "panel_num_targets_predesigned": len(genes), "panel_num_targets_custom": 0,
        "pixel_size": PIXEL_SIZE_UM, "instrument_sn": "SYNTH0001",
        "instrument_sw_version": "synthetic", "analysis_sw_version": "xenium-3.0.0.15",
        "synthetic": True, "tissue": tissue,
    }
    (dir_ / "experiment.xenium").write_text(json.dumps(experiment, indent=2) + "\n")

    ext = "".join(slide_path.suffixes[-2:]) if slide_path.name.endswith(".ome.tif") else \
        slide_path.suffix
    link = dir_ / f"{slide_id}_he_image{ext}"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(slide_path, dir_))
    return x_um, y_um, kind, partner
