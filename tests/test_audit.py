"""Label audit, per-class flag summary and the same-slide (batch effect) rate."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from embedstore.errors import UserError
from embedstore.search.audit import flag_summary, label_audit, plot_same_slide_rate, same_slide_rate
from embedstore.search.index import CellIndex


def clustered(n: int, dim: int, n_clusters: int, seed: int = 0, latent: int = 16
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered float16 vectors; returns (vectors, cluster ids, latent->dim basis)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, latent)) * 1.5
    cl = rng.integers(0, n_clusters, n)
    basis = rng.standard_normal((latent, dim))
    z = centers[cl] + 0.4 * rng.standard_normal((n, latent))
    x = z @ basis + 0.3 * rng.standard_normal((n, dim))
    return x.astype(np.float16), cl, basis


def plant_flips(labels: np.ndarray, n_classes: int, rate: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    flipped = rng.random(labels.size) < rate
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, flipped.sum())) % n_classes
    return noisy, flipped


@pytest.fixture(scope="module")
def problem():
    x, cl, _ = clustered(3000, 32, n_clusters=12, seed=1)
    classes = [f"type_{c}" for c in range(12)]
    noisy, flipped = plant_flips(cl, 12, 0.05, seed=2)
    return x, cl, noisy, flipped, classes


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_planted_flips_are_found(problem, kind):
    x, _, noisy, flipped, classes = problem
    index = CellIndex.build(x, kind=kind, use_gpu=False)
    df = label_audit(index, x, noisy, classes, k=15, batch_size=512)
    assert df.height == 3000
    assert df["suspicion"].is_sorted(descending=True, nulls_last=True)
    flag = np.zeros(3000, bool)
    flag[df.filter(pl.col("flagged"))["row"].to_numpy()] = True
    tp = (flag & flipped).sum()
    precision, recall = tp / max(flag.sum(), 1), tp / flipped.sum()
    assert recall >= 0.8 and precision >= 0.5, (precision, recall)  # chance precision is 0.05
    # the ranking puts the flips first: precision in the top len(flips) far above 5%
    top = df.head(int(flipped.sum()))["row"].to_numpy()
    assert flipped[top].mean() >= 0.7
    # the vote suggests the true class for flagged flips
    flagged_flips = df.filter(pl.col("flagged") & pl.col("row").is_in(np.flatnonzero(flipped)))
    true = problem[1][flagged_flips["row"].to_numpy()]
    assert (flagged_flips["suggested"].to_numpy() == true).mean() >= 0.9


def test_audit_columns_and_batching(problem):
    x, _, noisy, _, classes = problem
    index = CellIndex.build(x, kind="flat", use_gpu=False)
    a = label_audit(index, x, noisy, classes, k=10, batch_size=4096)
    b = label_audit(index, x, noisy, classes, k=10, batch_size=333)  # last batch: 3 rows
    assert a.equals(b)
    assert {"row", "label", "label_name", "n_votes", "agreement", "suggested", "suggested_name",
            "suggested_share", "support", "suspicion", "flagged"} <= set(a.columns)
    r = a.filter(pl.col("row") == 0).row(0, named=True)
    assert r["label_name"] == classes[noisy[0]] and r["n_votes"] == 10
    np.testing.assert_allclose(r["suspicion"], 1 - r["support"], atol=1e-6)


def test_unlabelled_cells_do_not_vote_and_are_not_audited(problem):
    x, _, noisy, _, classes = problem
    lab = noisy.copy()
    rng = np.random.default_rng(3)
    lab[rng.random(3000) < 0.4] = -1
    index = CellIndex.build(x, kind="flat", use_gpu=False)
    df = label_audit(index, x, lab, classes, k=10)
    assert df.height == int((lab >= 0).sum()) and set(df["row"].to_list()) <= set(
        np.flatnonzero(lab >= 0).tolist())
    # votes = labelled neighbours among the k found
    _, nbr = index.search(x[df["row"].to_numpy()], 10, query_ids=df["row"].to_numpy())
    np.testing.assert_array_equal(df["n_votes"].to_numpy(), (lab[nbr] >= 0).sum(1))
    # a labelled cell whose neighbours are all unlabelled has no votes: never flagged, last
    lone = lab.copy()
    lone[:] = -1
    lone[0] = 3
    one = label_audit(index, x, lone, classes, k=10)
    assert one.height == 1 and one["n_votes"][0] == 0 and not one["flagged"][0]
    assert one["suspicion"][0] is None and one["suggested"][0] == -1


def test_other_groups_only_stops_a_slide_vouching_for_itself():
    # two slides with the same cell types; slide 1 is shifted (batch effect) and its labels are
    # systematically wrong (every cell called type 0). Within slide 1 the wrong labels agree.
    x, cl, basis = clustered(1600, 32, n_clusters=4, seed=4)
    slide = (np.arange(1600) >= 800).astype(np.int64)
    shift = (np.random.default_rng(5).standard_normal(16) * 6) @ basis
    x = (x.astype(np.float32) + slide[:, None] * shift).astype(np.float16)
    lab = np.where(slide == 1, 0, cl)
    classes = ["a", "b", "c", "d"]
    index = CellIndex.build(x, kind="flat", use_gpu=False)
    wrong = (slide == 1) & (cl != 0)
    within = label_audit(index, x, lab, classes, k=10)
    across = label_audit(index, x, lab, classes, k=10, groups=slide, other_groups_only=True)

    def flagged(df: pl.DataFrame) -> np.ndarray:
        f = np.zeros(1600, bool)
        f[df.filter(pl.col("flagged"))["row"].to_numpy()] = True
        return f

    assert flagged(within)[wrong].mean() < 0.2  # neighbours on its own slide agree with it
    assert flagged(across)[wrong].mean() > 0.8  # the other slide disagrees
    with pytest.raises(UserError, match="needs groups"):
        label_audit(index, x, lab, classes, other_groups_only=True)


def test_flag_summary(problem):
    x, _, noisy, _, classes = problem
    index = CellIndex.build(x, kind="flat", use_gpu=False)
    df = label_audit(index, x, noisy, classes + ["never_used"], k=10)
    s = flag_summary(df, classes + ["never_used"])
    assert s.height == 13 and s["class"].to_list() == classes + ["never_used"]
    assert s["n_flagged"].sum() == df["flagged"].sum()
    assert s["n_labelled"].sum() == df.height
    last = s.row(12, named=True)
    assert last["n_labelled"] == 0 and last["flagged_share"] is None
    row = s.row(0, named=True)
    assert row["flagged_share"] == pytest.approx(row["n_flagged"] / row["n_labelled"])
    with pytest.raises(UserError, match="label_audit"):
        flag_summary(pl.DataFrame({"x": [1]}), classes)


def test_same_slide_rate_mixed_vs_offset(tmp_path):
    x, cl, basis = clustered(2400, 32, n_clusters=6, seed=6)
    slides = np.random.default_rng(7).integers(0, 6, 2400)
    index = CellIndex.build(x, kind="flat", use_gpu=False)
    mixed = same_slide_rate(index, x, slides, k=10, sample=200)
    assert mixed.height == 6 and (mixed["n_queries"] == 200).all()
    assert mixed["ratio"].min() > 0.6 and mixed["ratio"].max() < 1.5
    np.testing.assert_allclose(
        mixed.sort("group")["expected"].to_numpy(),
        (np.bincount(slides) - 1) / 2399)
    # now give each slide its own offset: neighbours come from the same slide
    offsets = np.random.default_rng(8).standard_normal((6, 16)) * 4
    shifted = (x.astype(np.float32) + offsets[slides] @ basis).astype(np.float16)
    idx2 = CellIndex.build(shifted, kind="flat", use_gpu=False)
    batch = same_slide_rate(idx2, shifted, np.array([f"s{v}" for v in slides]), k=10, sample=None)
    assert batch["ratio"].min() > 3 and (batch["observed"] > 0.8).all()
    assert batch["n_queries"].sum() == 2400
    png = plot_same_slide_rate(batch, tmp_path / "figs" / "batch.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(problem):
    x, _, noisy, _, classes = problem
    index = CellIndex.build(x[:500], kind="flat", use_gpu=False)
    with pytest.raises(UserError, match="same rows"):
        label_audit(index, x, noisy, classes)
    with pytest.raises(UserError, match="integer class codes"):
        label_audit(index, x[:500], noisy, classes)
    with pytest.raises(UserError, match="outside"):
        label_audit(index, x[:500], noisy[:500] + 20, classes)
    with pytest.raises(UserError, match="empty"):
        label_audit(index, x[:500], noisy[:500], [])
    with pytest.raises(UserError, match="batch_size"):
        label_audit(index, x[:500], noisy[:500], classes, batch_size=0)
    with pytest.raises(UserError, match="positive integer"):
        label_audit(index, x[:500], noisy[:500], classes, k=0)
    with pytest.raises(UserError, match="one entry per row"):
        same_slide_rate(index, x[:500], np.zeros(3))


def test_exclude_radius_keeps_same_slide_neighbours_within_it_from_voting():
    """Context-like vectors: a smooth function of position, so a cell's nearest vectors are its
    spatial neighbours (they share its field). With a radius, none of them may vote."""
    rng = np.random.default_rng(5)
    n = 1500
    xy = rng.uniform(0, 2000, (n, 2))
    slide = rng.integers(0, 2, n)
    freqs = rng.normal(0, 1 / 300, (2, 24))
    x = np.concatenate([np.sin(xy @ freqs), np.cos(xy @ freqs)], 1) + 0.01 * rng.standard_normal((n, 48))
    x = x.astype(np.float32)
    labels = rng.integers(0, 3, n)
    index = CellIndex.build(x, kind="flat", use_gpu=False)
    classes = ["a", "b", "c"]
    plain = label_audit(index, x, labels, classes, k=10)
    far = label_audit(index, x, labels, classes, k=10, groups=slide, xy_um=xy, exclude_radius_um=128)
    # recompute the voters by hand: search widely, drop same-slide cells within 128 µm, keep 10
    rows = far["row"].to_numpy()
    _, nbr = index.search(x[rows], 80, query_ids=rows)
    near = (slide[nbr] == slide[rows][:, None]) & (np.linalg.norm(xy[nbr] - xy[rows][:, None], axis=2) < 128)
    expect = np.minimum((~near).sum(1), 10)
    np.testing.assert_array_equal(far["n_votes"].to_numpy(), expect)
    # without the radius most voters are such near cells
    _, nbr10 = index.search(x[rows], 10, query_ids=rows)
    near10 = (slide[nbr10] == slide[rows][:, None]) & (np.linalg.norm(xy[nbr10] - xy[rows][:, None], axis=2) < 128)
    assert near10.mean() > 0.4 and plain["n_votes"].min() == 10  # ~half the voters: the other slide
    with pytest.raises(UserError, match="needs finite"):
        label_audit(index, x, labels, classes, k=10, groups=slide, exclude_radius_um=128)
