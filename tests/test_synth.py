"""Tests of the synthetic data generator (embedstore.synth)."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import openslide
import polars as pl
import pytest
import scipy.io
import tifffile
from scipy import ndimage
from threadpoolctl import threadpool_limits

from embedstore.errors import UserError
from embedstore.synth import CLASSES, make_synthetic, write_pyramid
from embedstore.synth.bundle import XENIUM_CELL_COLUMNS
from embedstore.synth.layout import build_layout
from embedstore.synth.make import CELL_COLUMNS
from embedstore.synth.render import SlideRenderer
from embedstore.synth.spec import N_NEGATIVE_PROBES, STAIN_E, STAIN_H

TRUTH_COLUMNS = ["slide_id", "cell_id", "label", "tissue", "region", "x_px", "y_px",
                 "x_um_xenium", "y_um_xenium"]
MPP = 0.25


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), seed=3, n_cells=450)


def _he_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin and eosin optical densities (..., 2) by colour deconvolution."""
    stains = np.array([STAIN_H, STAIN_E])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = -np.log((rgb[..., :3].astype(np.float32) + 1) / 256)
    inv = np.linalg.pinv(stains).astype(np.float32)  # (3, 2); no BLAS: it thrashes busy CPUs
    return np.stack([(od * inv[:, k]).sum(-1) for k in range(2)], axis=-1)


# ------------------------------------------------------------------------------- layout
def test_layout_and_columns(small) -> None:
    out = small.out_dir
    assert [s.slide_id for s in small.slides] == ["synth_s0", "synth_s1", "synth_s2"]
    assert [s.fmt for s in small.slides] == ["svs", "tiff", "svs"]
    assert [s.path.name for s in small.slides] == ["synth_s0.svs", "synth_s1.tiff",
                                                   "synth_s2.svs"]
    cells = pl.read_parquet(out / "cells.parquet")
    truth = pl.read_parquet(out / "truth.parquet")
    assert cells.columns == list(CELL_COLUMNS)
    assert truth.columns[: len(TRUTH_COLUMNS)] == TRUTH_COLUMNS
    assert {"nucleus_length_um", "nucleus_width_um", "nucleus_od"} <= set(truth.columns)
    assert cells.height == truth.height == small.n_cells == 450
    assert sum(small.class_counts.values()) == 450
    assert cells.select(["slide_id", "cell_id"]).is_unique().all()
    assert all(re.fullmatch(r"[a-p]{8}-1", c) for c in cells["cell_id"])
    np.testing.assert_allclose(cells["x_um"], cells["x_px"] * MPP)
    np.testing.assert_allclose(cells["y_um"], cells["y_px"] * MPP)
    assert cells["x_px"].dtype == pl.Float64 and cells["label"].dtype == pl.String
    for s in small.slides:
        b = out / "xenium" / s.slide_id
        assert s.bundle == b
        xc = pl.read_parquet(b / "cells.parquet")
        assert xc.columns == list(XENIUM_CELL_COLUMNS)
        assert xc["cell_id"].dtype == pl.String
        assert xc.height == s.n_cells
        assert (xc["nucleus_area"] < xc["cell_area"]).all()
        assert (xc["total_counts"] == xc["transcript_counts"] + xc["control_probe_counts"]).all()
        # inside the slide, with empty glass around the tissue
        sc = cells.filter(pl.col("slide_id") == s.slide_id)
        assert sc["x_px"].min() > 0 and sc["x_px"].max() < s.width_px
        assert sc["y_px"].min() > 0 and sc["y_px"].max() < s.height_px


def test_classes_tissues_regions(small) -> None:
    truth = pl.read_parquet(small.truth_path)
    assert len(small.classes) >= 8 and set(truth["label"]) <= set(small.classes)
    assert truth["label"].n_unique() >= 8
    assert truth["tissue"].n_unique() >= 3 and small.tissues == ("breast", "lung", "pancreas")
    assert truth["region"].n_unique() >= 6
    # each slide holds one organ, and each slide has its own mix of compartments
    per_slide = truth.group_by("slide_id").agg(pl.col("tissue").n_unique())
    assert (per_slide["tissue"] == 1).all()


def test_density_sets_slide_size(tmp_path: Path) -> None:
    lay_lo = build_layout(np.random.default_rng(0), "a", "breast", 300, 1000.0, MPP)
    lay_hi = build_layout(np.random.default_rng(0), "a", "breast", 300, 4000.0, MPP)
    area_lo, area_hi = lay_lo.info["tissue_area_mm2"], lay_hi.info["tissue_area_mm2"]
    assert 2.5 < area_lo / area_hi < 6  # a quarter of the density -> ~4x the tissue area
    assert 300 / area_lo == pytest.approx(1000.0, rel=0.3)
    assert len(lay_lo.cells["x_px"]) == len(lay_hi.cells["x_px"]) == 300


# ------------------------------------------------------------------------------- determinism
def test_same_seed_same_output(small, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", seed=3, n_cells=450)
    for name in ("cells.parquet", "truth.parquet"):
        assert pl.read_parquet(again.out_dir / name).equals(pl.read_parquet(small.out_dir / name))
    for a, b in zip(again.slides, small.slides, strict=True):
        assert tifffile.imread(a.path).tobytes() == tifffile.imread(b.path).tobytes()
        for rel in ("cells.parquet", "cell_feature_matrix/matrix.mtx.gz",
                    f"{a.slide_id}_he_imagealignment.csv"):
            assert (a.bundle / rel).read_bytes() == (b.bundle / rel).read_bytes()
    other = make_synthetic(tmp_path / "other", seed=4, n_cells=150, n_slides=1)
    t_other = pl.read_parquet(other.truth_path)
    t_small = pl.read_parquet(small.truth_path).filter(pl.col("slide_id") == "synth_s0")
    assert not np.array_equal(t_other["x_px"].to_numpy()[:10], t_small["x_px"].to_numpy()[:10])


def test_rendering_does_not_depend_on_chunking() -> None:
    lay = build_layout(np.random.default_rng(5), "c", "lung", 200, 1500.0, MPP)
    r = SlideRenderer(lay)
    full = r.read(256, 512, 0, lay.width)
    part = r.read(301, 430, 123, 977).astype(int)
    diff = np.abs(part - full[301 - 256:430 - 256, 123:977])
    # equal up to float rounding (SIMD vs scalar exp can differ by 1 ulp -> 1 grey level)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


# ------------------------------------------------------------------------------- slides
def test_slides_open_as_pyramids_with_mpp(small) -> None:
    for s in small.slides:
        assert openslide.OpenSlide.detect_format(str(s.path)) == (
            "aperio" if s.fmt == "svs" else "generic-tiff")
        with openslide.OpenSlide(str(s.path)) as sl:
            assert sl.dimensions == (s.width_px, s.height_px)
            assert sl.level_count == s.levels >= 2
            np.testing.assert_allclose(sl.level_downsamples, 2.0 ** np.arange(sl.level_count))
            assert max(sl.level_dimensions[-1]) >= 512
            assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(MPP)
            assert float(sl.properties["openslide.mpp-y"]) == pytest.approx(MPP)
            assert sl.properties["openslide.level[0].tile-width"] == "256"
            region = np.asarray(sl.read_region((0, 0), sl.level_count - 1,
                                               sl.level_dimensions[-1]))[..., :3]
            assert region.std() > 10  # tissue, not a blank image
            assert np.median(region[:3, :3]) > 220  # glass in the corner
    link = small.slides[0].bundle / "synth_s0_he_image.svs"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == small.slides[0].path.resolve()
    assert (small.slides[1].bundle / "synth_s1_he_image.tiff").resolve().exists()


def test_ome_format_opens_with_tifffile(tmp_path: Path) -> None:
    res = make_synthetic(tmp_path, seed=1, n_cells=120, n_slides=1, formats=["ome"])
    path = res.slides[0].path
    assert path.name == "synth_s0.ome.tif"
    assert (res.slides[0].bundle / "synth_s0_he_image.ome.tif").resolve() == path.resolve()
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        levels = tf.series[0].levels
        assert len(levels) >= 2 and levels[0].shape[:2] == (res.slides[0].height_px,
                                                              res.slides[0].width_px)
        assert levels[1].shape[0] == levels[0].shape[0] // 2
        ome = tf.ome_metadata
    assert re.search(r'PhysicalSizeX="0\.25"', ome) and re.search(r'PhysicalSizeY="0\.25"', ome)
    assert 'PhysicalSizeXUnit="µm"' in ome


@pytest.mark.parametrize("fmt", ["svs", "tiff", "ome"])
def test_write_pyramid_lossless_and_without_mpp(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (700, 1100, 3), dtype=np.uint8)
    path = tmp_path / f"x.{fmt}"
    shapes = write_pyramid(path, img, None, fmt, compression="zlib")
    assert shapes == [(700, 1100), (350, 550)]
    with tifffile.TiffFile(path) as tf:
        level0 = tf.series[0].levels[0].asarray() if fmt == "ome" else tf.pages[0].asarray()
        np.testing.assert_array_equal(level0, img)
        if fmt == "ome":
            assert "PhysicalSizeX" not in tf.ome_metadata
        else:
            unit = tf.pages[0].tags.get("ResolutionUnit")
            assert unit is None or unit.value == 1  # no physical unit: no µm/px
    if fmt != "ome":
        with openslide.OpenSlide(str(path)) as sl:
            assert "openslide.mpp-x" not in sl.properties
            assert sl.level_count == 2
            np.testing.assert_array_equal(
                np.asarray(sl.read_region((0, 0), 0, (1100, 700)))[..., :3], img)


def test_write_pyramid_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="format"):
        write_pyramid(tmp_path / "a.x", np.zeros((8, 8, 3), np.uint8), 0.25, "png")
    with pytest.raises(UserError, match="uint8"):
        write_pyramid(tmp_path / "a.svs", np.zeros((8, 8), np.float32), 0.25, "svs")
    with pytest.raises(UserError, match="positive"):
        write_pyramid(tmp_path / "a.svs", np.zeros((8, 8, 3), np.uint8), -1.0, "svs")


# ------------------------------------------------------------------------------- bundles
def test_xenium_bundle(small) -> None:
    truth = pl.read_parquet(small.truth_path)
    angles = []
    for s in small.slides:
        b = s.bundle
        exp = json.loads((b / "experiment.xenium").read_text())
        assert exp["pixel_size"] == 0.2125
        assert {"run_name", "region_name", "panel_name", "analysis_sw_version"} <= set(exp)
        m = np.loadtxt(b / f"{s.slide_id}_he_imagealignment.csv", delimiter=",")
        assert m.shape == (3, 3) and np.array_equal(m[2], [0, 0, 1])
        scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
        assert scale == pytest.approx(MPP / 0.2125)
        angles.append(abs(math.degrees(math.atan2(m[1, 0], m[0, 0]))))
        xc = pl.read_parquet(b / "cells.parquet")
        t = truth.filter(pl.col("slide_id") == s.slide_id)
        assert xc["cell_id"].to_list() == t["cell_id"].to_list()
        np.testing.assert_array_equal(xc["x_centroid"], t["x_um_xenium"])
        ps = exp["pixel_size"]
        morph = np.stack([xc["x_centroid"] / ps, xc["y_centroid"] / ps, np.ones(xc.height)])
        assert (morph[:2] > 0).all()
        he = np.linalg.inv(m) @ morph
        np.testing.assert_allclose(he[0], t["x_px"], atol=1e-6)
        np.testing.assert_allclose(he[1], t["y_px"], atol=1e-6)
        # 10x MEX: genes + negative controls x cells
        mex = b / "cell_feature_matrix"
        with gzip.open(mex / "barcodes.tsv.gz", "rt") as fh:
            assert fh.read().split() == xc["cell_id"].to_list()
        with gzip.open(mex / "features.tsv.gz", "rt") as fh:
            feats = [line.rstrip("\n").split("\t") for line in fh]
        assert all(len(f) == 3 for f in feats)
        kinds = [f[2] for f in feats]
        assert kinds.count("Negative Control Probe") == N_NEGATIVE_PROBES
        assert kinds.count("Negative Control Codeword") == 4 and kinds.count("Unassigned Codeword") == 4
        assert 40 <= kinds.count("Gene Expression") <= 100
        with gzip.open(mex / "matrix.mtx.gz", "rb") as fh:
            mat = scipy.io.mmread(fh).tocsr()
        assert mat.shape == (len(feats), xc.height)
        assert np.issubdtype(mat.dtype, np.integer)
        gene_rows = np.array(kinds) == "Gene Expression"
        np.testing.assert_array_equal(np.asarray(mat[gene_rows].sum(0)).ravel(),
                                      xc["transcript_counts"])
        np.testing.assert_array_equal(np.asarray(mat[~gene_rows].sum(0)).ravel(),
                                      xc["control_probe_counts"])
    assert all(3 <= a <= 30 for a in angles) and len(set(np.round(angles, 3))) == len(angles)


def test_marker_genes_follow_the_classes(small) -> None:
    truth = pl.read_parquet(small.truth_path)
    marker = {"Epithelial_Malignant": "CEACAM6", "Ductal": "KRT7", "Fibroblast": "DCN",
              "Tumor_Associated_Fibroblast": "FAP", "Smooth_Muscle": "MYH11",
              "Endothelial": "VWF", "Endothelial_TumorAssociated": "PLVAP", "T_Cell": "CD3E",
              "B_Cell": "MS4A1", "Macrophage": "CD68"}
    rows, labels = [], []
    for s in small.slides:
        mex = s.bundle / "cell_feature_matrix"
        with gzip.open(mex / "features.tsv.gz", "rt") as fh:
            names = [line.split("\t")[1] for line in fh]
        with gzip.open(mex / "matrix.mtx.gz", "rb") as fh:
            mat = scipy.io.mmread(fh).tocsr()
        rows.append(mat[[names.index(g) for g in marker.values()]].toarray().T)
        labels += truth.filter(pl.col("slide_id") == s.slide_id)["label"].to_list()
    x, lab = np.concatenate(rows), np.array(labels)
    for j, cname in enumerate(marker):
        means = {c: x[lab == c, j].mean() for c in CLASSES if (lab == c).sum() >= 5}
        assert max(means, key=means.get) == cname, (cname, means)
        # noisy: spill-over and ambient RNA put some marker counts into other classes
        assert (x[lab != cname, j] > 0).mean() > 0.02


# ------------------------------------------------------------------------------- pixels
def test_nuclei_are_where_the_tables_say(small) -> None:
    truth = pl.read_parquet(small.truth_path)
    checked = 0
    for s in small.slides:
        t = truth.filter(pl.col("slide_id") == s.slide_id)
        xy = np.column_stack([t["x_px"], t["y_px"]])
        d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        inside = ((xy > 60) & (xy < np.array([s.width_px, s.height_px]) - 60)).all(axis=1)
        isolated = np.nonzero((d.min(axis=1) > 100) & inside)[0][:6]  # 25 µm from others
        with openslide.OpenSlide(str(s.path)) as sl:
            for i in isolated:
                x, y = xy[i]
                x0, y0 = int(x) - 48, int(y) - 48
                h = _he_od(np.asarray(sl.read_region((x0, y0), 0, (96, 96))))[..., 0]
                h = ndimage.gaussian_filter(h, 1.0)
                bg = np.median(np.concatenate([h[:4].ravel(), h[-4:].ravel()]))
                peak = np.percentile(h[40:56, 40:56], 95)
                blob, _ = ndimage.label(ndimage.binary_fill_holes(h > bg + 0.2 * (peak - bg)))
                lab = blob[int(y) - y0, int(x) - x0]
                assert lab > 0, (s.slide_id, t["label"][int(i)])
                cy, cx = ndimage.center_of_mass(blob == lab)
                err = math.hypot(x0 + cx + 0.5 - x, y0 + cy + 0.5 - y)
                assert err < 1.0, (s.slide_id, t["label"][int(i)], err)
                checked += 1
    assert checked >= 10


# ------------------------------------------------------------------------------- api
def test_progress_and_user_errors(tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []
    make_synthetic(tmp_path / "p", seed=0, n_cells=60, n_slides=2,
                   progress=lambda msg, frac: seen.append((msg, frac)))
    fracs = [f for _, f in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and 0 <= fracs[0] < 0.5
    with pytest.raises(UserError, match="already has files"):
        make_synthetic(tmp_path / "p", seed=1, n_cells=60, n_slides=2)  # other parameters
    make_synthetic(tmp_path / "p", n_cells=60, n_slides=1, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "p" / "slides").iterdir()) == ["synth_s0.svs"]
    with pytest.raises(UserError, match="format"):
        make_synthetic(tmp_path / "q", formats=["jpg"])
    with pytest.raises(UserError, match="too few"):
        make_synthetic(tmp_path / "q", n_cells=5, n_slides=3)
    with pytest.raises(UserError, match="density"):
        make_synthetic(tmp_path / "q", density_per_mm2=0)


# ------------------------------------------------------------------------------- the method
def _local_features(img: np.ndarray, x: np.ndarray, y: np.ndarray, half: int = 32
                    ) -> np.ndarray:
    """Nucleus-window statistics (16 µm window): radial H/E profiles, blob size, shape, texture."""
    pad = np.pad(img, ((half, half), (half, half), (0, 0)), constant_values=245)
    j = np.arange(-half, half)
    win = pad[(y.astype(int) + half)[:, None, None] + j[None, :, None],
              (x.astype(int) + half)[:, None, None] + j[None, None, :]]
    od = _he_od(win)
    h, e = od[..., 0], od[..., 1]
    yy, xx = np.meshgrid(j + 0.5, j + 0.5, indexing="ij")
    r = np.hypot(yy, xx)
    rbin = np.minimum((r / 4).astype(int), 7).ravel()
    onehot = (np.eye(8)[rbin] / np.bincount(rbin, minlength=8)).astype(np.float32)
    with threadpool_limits(1):
        prof_h = h.reshape(len(h), -1) @ onehot
        prof_e = e.reshape(len(e), -1) @ onehot
    m = (h > 0.4) & (r < half)
    area = m.sum((1, 2)) + 1.0
    mean_h = (h * m).sum((1, 2)) / area
    std_h = np.sqrt(np.maximum((h * h * m).sum((1, 2)) / area - mean_h**2, 0))
    myy = (m * yy * yy).sum((1, 2)) / area
    mxx = (m * xx * xx).sum((1, 2)) / area
    mxy = (m * xx * yy).sum((1, 2)) / area
    tr, det = mxx + myy, mxx * myy - mxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-3)
    grad = (np.abs(np.diff(h, axis=1))[:, :, :-1] + np.abs(np.diff(h, axis=2))[:, :-1, :])
    tex = (grad * m[:, :-1, :-1]).sum((1, 2)) / area
    return np.column_stack([prof_h, prof_e[:, :4], np.log(area), mean_h, std_h,
                            np.log(l1), np.log(l2), np.log(l1 / l2), tex])


def _context_features(img: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """Colour/texture histogram of the field around each cell (summed-area tables)."""
    od = _he_od(img)
    h, e = od[..., 0], od[..., 1]
    hb = np.clip((h / 0.25).astype(int), 0, 5)
    eb = np.clip((e / 0.2).astype(int), 0, 5)
    chans = [hb == k for k in range(6)] + [eb == k for k in range(6)]
    chans += [(h + e) < 0.15, h > 0.6, np.abs(np.diff(e, axis=1, append=e[:, -1:]))]
    sat = np.cumsum(np.cumsum(np.stack(chans).astype(np.float64), 1), 2)
    sat = np.pad(sat, ((0, 0), (1, 0), (1, 0)))
    y0 = np.clip(y.astype(int) - half, 0, h.shape[0])
    y1 = np.clip(y.astype(int) + half, 0, h.shape[0])
    x0 = np.clip(x.astype(int) - half, 0, h.shape[1])
    x1 = np.clip(x.astype(int) + half, 0, h.shape[1])
    box = sat[:, y1, x1] - sat[:, y0, x1] - sat[:, y1, x0] + sat[:, y0, x0]
    return (box / ((y1 - y0) * (x1 - x0))).T


@pytest.mark.slow
def test_local_and_context_each_miss_classes_the_fusion_gets(tmp_path: Path) -> None:
    """Nucleus-only and context-only features each fail on some classes; together they don't.

    Hand-made features and logistic regression stand in for the UNI2-h / DINOv3 heads.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    res = make_synthetic(tmp_path, seed=11, n_cells=2400)
    truth = pl.read_parquet(res.truth_path)
    loc, ctx, labels = [], [], []
    for s in res.slides:
        t = truth.filter(pl.col("slide_id") == s.slide_id)
        x, y = t["x_px"].to_numpy(), t["y_px"].to_numpy()
        with tifffile.TiffFile(s.path) as tf:
            level0, level3 = tf.pages[0].asarray(), tf.pages[3].asarray()
        loc.append(_local_features(level0, x, y))
        ctx.append(_context_features(level3, x / 8, y / 8, half=64))  # 256 µm at 2 µm/px
        labels += t["label"].to_list()
    feats = {"local": np.concatenate(loc), "context": np.concatenate(ctx)}
    feats["fusion"] = np.hstack([feats["local"], feats["context"]])
    y = np.array(labels)
    train = np.random.default_rng(0).random(len(y)) < 0.6
    classes = [c for c in CLASSES if (y[~train] == c).sum() >= 15]
    f1, recall = {}, {}
    for name, x in feats.items():
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        with threadpool_limits(1):  # threaded BLAS on small matrices thrashes busy CPUs
            pred = clf.fit(x[train], y[train]).predict(x[~train])
        f1[name] = f1_score(y[~train], pred, labels=classes, average="macro")
        recall[name] = recall_score(y[~train], pred, labels=classes, average=None)
    print(f"\n{'class':30s}{'n':>5s}" + "".join(f"{k:>9s}" for k in feats))
    for i, c in enumerate(classes):
        print(f"{c:30s}{(y[~train] == c).sum():5d}"
              + "".join(f"{recall[k][i]:9.2f}" for k in feats))
    print("macro-F1", {k: round(v, 3) for k, v in f1.items()})
    assert len(classes) >= 8
    assert f1["fusion"] > f1["local"] + 0.05 and f1["fusion"] > f1["context"] + 0.05
    for alone in ("local", "context"):
        gap = recall["fusion"] - recall[alone]
        assert gap.max() > 0.25, (alone, dict(zip(classes, gap.round(2), strict=True)))


def test_rerunning_the_same_command_replaces_its_own_output(tmp_path):
    """A killed or repeated run of the same parameters finishes; other parameters are refused."""
    from embedstore.errors import UserError
    from embedstore.synth import make_synthetic

    out = tmp_path / "s"
    first = make_synthetic(out, seed=1, n_cells=40, n_slides=1)
    (first.slides[0].path).write_bytes(b"truncated by a kill")  # a half-written slide
    again = make_synthetic(out, seed=1, n_cells=40, n_slides=1)
    assert again.slides[0].path.stat().st_size > 1000
    with pytest.raises(UserError, match="overwrite"):
        make_synthetic(out, seed=2, n_cells=40, n_slides=1)
    assert make_synthetic(out, seed=2, n_cells=40, n_slides=1, overwrite=True).seed == 2
