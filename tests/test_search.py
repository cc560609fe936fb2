"""CellIndex: filters, exact vs approximate agreement, persistence, input errors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from embedstore.errors import UserError
from embedstore.search.index import CellIndex, exact_knn, gpu_available, is_stale


def clustered(n: int, dim: int, n_clusters: int = 30, seed: int = 0, latent: int = 16,
              noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters in a low-dim subspace plus isotropic noise, float16 like the store."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, latent))
    cl = rng.integers(0, n_clusters, n)
    z = centers[cl] + 0.4 * rng.standard_normal((n, latent))
    x = z @ rng.standard_normal((latent, dim)) + noise * rng.standard_normal((n, dim))
    return x.astype(np.float16), cl


def recall(approx: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(t)) / len(t) for a, t in zip(approx, truth, strict=True)]))


def brute_force(data: np.ndarray, queries: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Every (query, row) score in float64, straight from the raw vectors: cosine similarity
    or squared Euclidean distance. Shares nothing with `embedstore.search.index`."""
    x, q = data.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        return (q**2).sum(1)[:, None] - 2 * q @ x.T + (x**2).sum(1)[None, :]
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return q @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T


def check_top_k(scores: np.ndarray, ids: np.ndarray, truth: np.ndarray, atol: float = 1e-5,
                higher_is_better: bool = True) -> None:
    """`ids` are a best-k under `truth` (nq x n scores, -inf/+inf where a row is not allowed)
    and `scores` are their true scores, best first. Checked by score, so that ties at the k-th
    place may go either way."""
    k = ids.shape[1]
    sign = 1.0 if higher_is_better else -1.0
    best = sign * -np.sort(-sign * truth, axis=1)[:, :k]
    np.testing.assert_allclose(np.take_along_axis(truth, ids, axis=1), scores, atol=atol)
    np.testing.assert_allclose(scores, best, atol=atol)
    assert all(len(set(row)) == k for row in ids)  # no row twice


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(3000, 48)


@pytest.fixture(scope="module")
def flat(data) -> CellIndex:
    return CellIndex.build(data[0], kind="flat", use_gpu=False)


@pytest.fixture(scope="module")
def ivf(data) -> CellIndex:
    return CellIndex.build(data[0], kind="ivf", use_gpu=False, seed=1)


def test_flat_is_exact(data, flat):
    x = data[0]
    q = np.arange(0, 3000, 37)
    truth = brute_force(x, x[q])
    truth[np.arange(len(q)), q] = -np.inf  # a query's own row is never returned
    d1, i1 = flat.search(x[q], 10, query_ids=q)
    check_top_k(d1, i1, truth)
    d2, i2 = exact_knn(x, x[q], 10, query_ids=q)  # the ground truth used for tuning, too
    check_top_k(d2, i2, truth)
    assert np.all(np.diff(d1, axis=1) <= 1e-6)  # cosine similarities, best first
    assert d1.max() <= 1.0 + 1e-5


@pytest.mark.parametrize("dim", [48, 320])  # 320 > 256 goes through the PCA stage
def test_ivf_recall_against_exact(dim):
    x, _ = clustered(3000, dim, seed=2)
    index = CellIndex.build(x, kind="ivf", use_gpu=False)
    info = index.info
    assert info["kind"] == "ivf" and info["params"]["pca_dim"] == (256 if dim > 256 else 0)
    assert info["tuned_recall"] >= 0.96 and 1 <= info["search"]["nprobe"] <= info["params"]["nlist"]
    q = np.random.default_rng(3).choice(3000, 300, replace=False)
    scores = brute_force(x, x[q])
    scores[np.arange(len(q)), q] = -np.inf
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    d_a, approx = index.search(x[q], 20, query_ids=q)
    assert recall(approx, truth) >= 0.95
    # scores are the found rows' cosine similarities (re-ranked on fp16 vectors)
    found = approx >= 0
    real = np.take_along_axis(scores, np.where(found, approx, 0), axis=1)
    np.testing.assert_allclose(d_a[found], real[found], atol=2e-3)


def test_auto_kind_is_flat_when_small(data):
    assert CellIndex.build(data[0][:500], use_gpu=False).kind == "flat"


def test_l2_metric_matches_exact(data):
    x = data[0][:800]
    index = CellIndex.build(x, kind="flat", metric="l2", use_gpu=False)
    truth = brute_force(x, x[:20], metric="l2")
    truth[np.arange(20), np.arange(20)] = np.inf
    d1, i1 = index.search(x[:20], 5, query_ids=np.arange(20))
    check_top_k(d1, i1, truth, atol=1e-3, higher_is_better=False)  # norms² ~ 900
    d2, i2 = exact_knn(x, x[:20], 5, metric="l2", query_ids=np.arange(20))
    check_top_k(d2, i2, truth, atol=1e-3, higher_is_better=False)
    assert np.all(np.diff(d1, axis=1) >= 0)  # squared distances, nearest first


@pytest.mark.parametrize("which", ["flat", "ivf"])
@pytest.mark.parametrize("selectors", [True, False])
def test_allowed_subset(data, flat, ivf, which, selectors):
    index = flat if which == "flat" else ivf
    index._use_selectors = selectors
    try:
        x = data[0]
        allowed = np.zeros(3000, bool)
        allowed[np.random.default_rng(4).choice(3000, 900, replace=False)] = True
        q = np.arange(0, 3000, 50)
        d, i = index.search(x[q], 15, allowed=allowed, query_ids=q)
        assert np.all(i >= 0) and np.all(allowed[i]) and not np.any(i == q[:, None])
        # the result is the best of the subset: brute force over the allowed rows only
        truth = brute_force(x, x[q])
        truth[:, ~allowed] = -np.inf
        truth[np.arange(len(q)), q] = -np.inf
        if which == "flat":
            check_top_k(d, i, truth)
        else:
            best = np.argsort(-truth, axis=1, kind="stable")[:, :15]
            assert recall(i, best) >= 0.9
    finally:
        index._use_selectors = True


@pytest.mark.parametrize("which", ["flat", "ivf"])
@pytest.mark.parametrize("selectors", [True, False])
def test_exclude_own_group_and_self(data, flat, ivf, which, selectors):
    index = flat if which == "flat" else ivf
    index._use_selectors = selectors
    try:
        x, cl = data
        groups = (cl % 3).astype(np.int64)  # a group holds whole clusters: neighbours must leave
        q = np.arange(0, 3000, 30)
        d, i = index.search(x[q], 10, groups=groups, exclude_groups=groups[q], query_ids=q)
        assert np.all(i >= 0)
        assert not np.any(groups[i] == groups[q][:, None])
        assert not np.any(i == q[:, None])
        assert np.all(np.diff(d, axis=1) <= 1e-5)
        # the same filter written as an allowed mask gives the same rows (flat: exact)
        if which == "flat":
            for j in range(3):
                sel = groups[q] == j
                _, i2 = index.search(x[q[sel]], 10, allowed=groups != j)
                np.testing.assert_array_equal(i[sel], i2)
    finally:
        index._use_selectors = True


def test_never_returns_itself_even_with_duplicates():
    x, _ = clustered(400, 16, seed=5)
    x[1] = x[0]  # exact duplicate: the other copy is a fine neighbour, the query itself is not
    index = CellIndex.build(x, kind="flat", use_gpu=False)
    _, i = index.search(x[[0, 1]], 3, query_ids=np.array([0, 1]))
    assert i[0, 0] == 1 and i[1, 0] == 0
    _, i = index.search_rows(np.array([0, 1]), 3)
    assert 0 not in i[0] and 1 not in i[1]


@pytest.mark.parametrize("which", ["flat", "ivf"])
@pytest.mark.parametrize("selectors", [True, False])
def test_k_larger_than_subset(data, flat, ivf, which, selectors):
    index = flat if which == "flat" else ivf
    index._use_selectors = selectors
    try:
        x = data[0]
        allowed = np.zeros(3000, bool)
        allowed[[3, 700, 1500, 2200, 2999]] = True
        d, i = index.search(x[[3, 10]], 8, allowed=allowed, query_ids=np.array([3, 10]))
        assert set(i[0][i[0] >= 0]) == {700, 1500, 2200, 2999}  # the whole subset but itself
        assert set(i[1][i[1] >= 0]) == {3, 700, 1500, 2200, 2999}
        assert np.all(i[0, 4:] == -1) and np.all(np.isnan(d[0, 4:]))
        assert np.all(i[1, 5:] == -1) and not np.isnan(d[1, :5]).any()
        # k beyond the whole index
        d, i = index.search(x[:1], 5000)
        assert (i[0] >= 0).sum() == 3000 and len(set(i[0][i[0] >= 0])) == 3000
    finally:
        index._use_selectors = True


def test_empty_subset_gives_no_results(flat, data):
    d, i = flat.search(data[0][:2], 4, allowed=np.zeros(3000, bool))
    assert np.all(i == -1) and np.all(np.isnan(d))


def test_string_groups_and_search_rows(data, flat):
    x, cl = data
    slides = np.array([f"slide_{c % 4}" for c in cl])
    rows = np.array([5, 17, 2999])
    _, i = flat.search_rows(rows, 6, groups=slides, exclude_same_group=True)
    assert not np.any(slides[i] == slides[rows][:, None]) and not np.any(i == rows[:, None])
    # a query group absent from the rows excludes nothing
    _, i2 = flat.search(x[:1], 6, groups=slides, exclude_groups=np.array(["other"]))
    _, i3 = flat.search(x[:1], 6)
    np.testing.assert_array_equal(i2, i3)


def test_single_vector_query(data, flat):
    d, i = flat.search(data[0][7], 3)
    assert i.shape == (1, 3) and i[0, 0] == 7  # without query_ids a row finds itself first


def test_save_load_roundtrip(tmp_path, data, ivf):
    x = data[0]
    rows = np.arange(3000, dtype=np.int64)[::-1].copy()
    ivf.save(tmp_path / "idx", {"table_version": 7, "vector": "local", "row_ids": rows})
    loaded, meta = CellIndex.load(tmp_path / "idx", use_gpu=False)
    with pytest.raises(UserError, match="attach them first"):
        loaded.search(x[:2], 5)
    # re-ranked from the vectors on disk, through a memory map: no copy in the index
    np.save(tmp_path / "x.npy", x)
    loaded.attach(np.load(tmp_path / "x.npy", mmap_mode="r"))
    with pytest.raises(UserError, match="pass the vectors the index was built on"):
        loaded.attach(x[:100])
    index_bytes = (tmp_path / "idx" / "index.faiss").stat().st_size
    assert index_bytes < len(x) * (48 + 8) + 100_000  # SQ8 codes + ids; an fp16 copy adds 96 B/row
    assert meta["table_version"] == 7 and meta["vector"] == "local"
    np.testing.assert_array_equal(meta["row_ids"], rows)
    assert loaded.info == json.loads(json.dumps(ivf.info))
    assert loaded.kind == "ivf" and loaded.search_params == ivf.search_params
    q = np.arange(0, 3000, 100)
    d1, i1 = ivf.search(x[q], 10, query_ids=q)
    d2, i2 = loaded.search(x[q], 10, query_ids=q)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2)
    assert not is_stale(meta, 7)
    assert is_stale(meta, 8)
    assert is_stale({}, 7) and is_stale(None, 7)


def test_save_overwrites_and_load_errors(tmp_path, flat):
    flat.save(tmp_path / "a", {"table_version": 1})
    flat.save(tmp_path / "a", {"table_version": 2})
    assert CellIndex.load(tmp_path / "a", use_gpu=False)[1]["table_version"] == 2
    assert not list((tmp_path / "a").glob("*.tmp*"))
    with pytest.raises(UserError, match="no saved index"):
        CellIndex.load(tmp_path / "missing")
    (tmp_path / "a" / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        CellIndex.load(tmp_path / "a")
    (tmp_path / "a" / "index.json").write_text(json.dumps({"format_version": 99, "index": {}}))
    with pytest.raises(UserError, match="rebuild"):
        CellIndex.load(tmp_path / "a")
    with pytest.raises(UserError, match="JSON"):
        flat.save(tmp_path / "b", {"when": object()})
    with pytest.raises(UserError, match="letters"):
        flat.save(tmp_path / "b", {"bad/key": np.zeros(2)})


def test_bad_inputs(data, flat):
    x = data[0]
    with pytest.raises(UserError, match="16 dims but the index holds 48"):
        flat.search(np.zeros((2, 16), np.float32), 5)
    bad = x[:50].astype(np.float32)
    bad[17, 3] = np.nan
    with pytest.raises(UserError, match="row 17 holds NaN"):
        CellIndex.build(bad, use_gpu=False)
    with pytest.raises(UserError, match="queries row 0 holds NaN"):
        flat.search(bad[17:18], 5)
    zero = x[:50].astype(np.float32)
    zero[4] = 0
    with pytest.raises(UserError, match="row 4 is all zeros"):
        CellIndex.build(zero, use_gpu=False)
    for k in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="positive integer"):
            flat.search(x[:2], k)
    with pytest.raises(UserError, match="2-D"):
        CellIndex.build(np.zeros(10, np.float32), use_gpu=False)
    with pytest.raises(UserError, match="floats"):
        CellIndex.build(np.zeros((10, 4), np.int64), use_gpu=False)
    with pytest.raises(UserError, match="metric"):
        CellIndex.build(x[:100], metric="dot", use_gpu=False)
    with pytest.raises(UserError, match="kind"):
        CellIndex.build(x[:100], kind="hnsw", use_gpu=False)
    with pytest.raises(UserError, match="at least 64 rows"):
        CellIndex.build(x[:10], kind="ivf", use_gpu=False)
    with pytest.raises(UserError, match="allowed"):
        flat.search(x[:2], 3, allowed=np.ones(10, bool))
    with pytest.raises(UserError, match="pass both"):
        flat.search(x[:2], 3, groups=np.zeros(3000, np.int64))
    with pytest.raises(UserError, match="one entry per query"):
        flat.search(x[:2], 3, groups=np.zeros(3000, np.int64), exclude_groups=np.zeros(5))
    with pytest.raises(UserError, match="query_ids"):
        flat.search(x[:2], 3, query_ids=np.array([0, 3000]))
    with pytest.raises(UserError, match="use_gpu"):
        CellIndex.build(x[:100], use_gpu="yes")


@pytest.mark.skipif(gpu_available(), reason="checks the error raised when no GPU is present")
def test_use_gpu_true_without_gpu(data):
    with pytest.raises(UserError, match="sees no GPU"):
        CellIndex.build(data[0][:100], use_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a CUDA GPU")
def test_gpu_flat_matches_cpu(data, flat):
    x, cl = data
    g = CellIndex.build(x, kind="flat", use_gpu=True)
    assert g.on_gpu
    q = np.arange(0, 3000, 60)
    _, i_cpu = flat.search(x[q], 10, query_ids=q)
    _, i_gpu = g.search(x[q], 10, query_ids=q)
    assert recall(i_gpu, i_cpu) >= 0.99  # the GPU copy holds fp16 vectors
    groups = (cl % 3).astype(np.int64)
    _, i = g.search(x[q], 10, groups=groups, exclude_groups=groups[q], query_ids=q)
    assert np.all(i >= 0) and not np.any(groups[i] == groups[q][:, None])
    gi = CellIndex.build(x, kind="ivf", use_gpu=True)  # k-means on the GPU
    _, i = gi.search(x[q], 10, query_ids=q)
    assert recall(i, i_cpu) >= 0.95


def test_faiss_selector_bit_order():
    """IDSelectorBitmap reads bits little-endian; the filters depend on it."""
    index = faiss.IndexFlatL2(2)
    index.add(np.arange(20, dtype=np.float32).reshape(10, 2))
    mask = np.zeros(10, bool)
    mask[[1, 9]] = True
    sel = faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))
    _, i = index.search(np.zeros((1, 2), np.float32), 3, params=faiss.SearchParameters(sel=sel))
    assert list(i[0]) == [1, 9, -1]
