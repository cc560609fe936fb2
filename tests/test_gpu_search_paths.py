"""GPU-only paths of `embedstore.search.index`, exercised on the CPU.

No GPU runs these tests: faiss-cpu's module gets stand-ins for the GPU functions
(`StandardGpuResources`, `GpuClonerOptions`, `index_cpu_to_gpu`, `get_num_gpus`), and the flat
index "moved to the GPU" is a CPU copy wrapped in `FakeGpuIndex`, which accepts only what a
`GpuIndexFlat` does (a plain `search(q, k)` with k <= GPU_MAX_K, no search parameters).
Searches of the CPU index the `CellIndex` keeps are recorded through `SpyIndex`.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from embedstore.errors import UserError
from embedstore.search import index as ix
from embedstore.search.index import GPU_MAX_K, CellIndex


class FakeGpuIndex:
    """A GpuIndexFlat stand-in: searches a CPU copy, refuses what the GPU refuses."""

    def __init__(self, cpu: faiss.Index, calls: list):
        self._cpu, self._calls = cpu, calls
        self.ntotal, self.d = cpu.ntotal, cpu.d

    def search(self, q, k, params=None):
        assert params is None, "GPU indexes take no search parameters (IDSelector)"
        assert k <= GPU_MAX_K, f"GPU k-selection is limited to {GPU_MAX_K}, asked for {k}"
        self._calls.append(("gpu", int(k), None))
        return self._cpu.search(q, k)


class SpyIndex:
    """The CellIndex's CPU index, with its searches recorded as ("cpu", k, params)."""

    def __init__(self, index: faiss.Index, calls: list):
        self._index, self._calls = index, calls

    def search(self, q, k, params=None):
        self._calls.append(("cpu", int(k), params))
        return self._index.search(q, k, params=params)

    def __getattr__(self, name):
        return getattr(self._index, name)


@pytest.fixture
def fake_gpu(monkeypatch):
    """faiss with one fake GPU; returns the list of recorded searches and copies."""
    calls: list = []

    class Options:
        useFloat16 = False

    def cpu_to_gpu(res, device, index, options=None):
        calls.append(("to_gpu", type(index).__name__, int(index.ntotal)))
        clone = faiss.clone_index(index)
        # an empty flat index is the k-means assigner of train_ivf: it must stay a real index
        return clone if index.ntotal == 0 else FakeGpuIndex(clone, calls)

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert ix.gpu_available()
    return calls


def _data(n: int = 3000, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _gpu_flat(x: np.ndarray, calls: list) -> CellIndex:
    index = CellIndex.build(x, kind="flat", use_gpu=True)
    assert index.on_gpu and isinstance(index._gpu_index, FakeGpuIndex)
    index._index = SpyIndex(index._index, calls)
    calls.clear()
    return index


def test_filtered_gpu_search_never_runs_an_unfiltered_cpu_search_past_the_gpu_k(fake_gpu):
    """On the GPU a filtered search over-fetches `(k + 1) * n / allowed * 1.5` results. When
    that was more than the GPU's k limit, `_raw` quietly ran it on the CPU index without a
    selector: a full scan asking for up to n results per query (at 1M rows and a small
    `allowed` set, an (nq, 1M) result: gigabytes), and then the pre-filtered CPU search
    scanned again for the queries still short. The over-fetch must stop at the GPU's limit."""
    x = _data()
    ref = CellIndex.build(x, kind="flat", use_gpu=False)
    gpu = _gpu_flat(x, fake_gpu)
    q = x[::300]
    allowed = np.zeros(len(x), bool)
    allowed[[3, 50, 700, 1200, 2999]] = True
    d_ref, i_ref = ref.search(q, 10, allowed=allowed)
    d_gpu, i_gpu = gpu.search(q, 10, allowed=allowed)
    np.testing.assert_array_equal(i_gpu, i_ref)  # all 5 allowed rows, then -1
    np.testing.assert_allclose(d_gpu, d_ref, rtol=1e-5)
    unfiltered_cpu = [k for where, k, params in fake_gpu if where == "cpu" and params is None]
    assert unfiltered_cpu == [], f"unfiltered CPU searches for k={unfiltered_cpu}"
    assert max(k for _, k, _ in fake_gpu) <= GPU_MAX_K


def test_half_allowed_gpu_search_is_served_by_the_gpu(fake_gpu):
    """k=1000 among half the rows over-fetches 3011 > GPU_MAX_K: the GPU's 2048 hold ~1024
    allowed rows, enough for most queries; only those still short may go to the CPU, and
    only through its pre-filtered (selector) search."""
    x = _data()
    ref = CellIndex.build(x, kind="flat", use_gpu=False)
    gpu = _gpu_flat(x, fake_gpu)
    q = x[::150]
    allowed = np.arange(len(x)) % 2 == 0
    _, i_ref = ref.search(q, 1000, allowed=allowed)
    _, i_gpu = gpu.search(q, 1000, allowed=allowed)
    assert (i_gpu >= 0).all() and allowed[i_gpu].all()
    # fp16 on a real GPU may swap near-ties; the fake is exact
    assert np.mean([len(set(a) & set(b)) / 1000 for a, b in zip(i_gpu, i_ref, strict=True)]) > 0.999
    assert any(where == "gpu" and k == GPU_MAX_K for where, k, _ in fake_gpu)
    assert all(params is not None for where, _, params in fake_gpu if where == "cpu")


def test_unfiltered_gpu_search_past_the_gpu_k_is_one_cpu_search(fake_gpu):
    """Without a filter, k beyond the GPU's limit is served by one exact CPU search (no GPU
    search at the cap first, no filter to widen for)."""
    x = _data()
    ref = CellIndex.build(x, kind="flat", use_gpu=False)
    gpu = _gpu_flat(x, fake_gpu)
    q = x[:3]
    d_ref, i_ref = ref.search(q, GPU_MAX_K + 10, query_ids=np.arange(3))
    d_gpu, i_gpu = gpu.search(q, GPU_MAX_K + 10, query_ids=np.arange(3))
    np.testing.assert_array_equal(i_gpu, i_ref)
    assert [where for where, _, _ in fake_gpu] == ["cpu"]
    fake_gpu.clear()
    gpu.search(q, 10, query_ids=np.arange(3))  # within the limit: the GPU alone
    assert [(where, k) for where, k, _ in fake_gpu] == [("gpu", 11)]


def test_an_index_that_does_not_fit_the_gpu_is_searched_on_the_cpu_under_auto(fake_gpu, monkeypatch):
    """With use_gpu="auto" (every command's default), a flat index too large for the GPU's
    free memory failed the whole search (faiss's "cudaMalloc ... out of memory" traceback),
    although the CPU could serve it. "auto" now searches on the CPU and says why; use_gpu=True,
    which asks for the GPU, is refused in one line."""
    x = _data(500)
    ref = CellIndex.build(x, kind="flat", use_gpu=False)

    def out_of_memory(res, device, index, options=None):
        raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl::allocMemory: "
                           "Error: 'err == cudaSuccess' failed: cudaMalloc error out of memory [2]")  # fmt: skip

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", out_of_memory)
    with pytest.warns(UserWarning, match=r"flat index \(500 x 16\) could not be copied to the GPU .*out of memory.*on the CPU"):
        index = CellIndex.build(x, kind="flat", use_gpu="auto")
    assert not index.on_gpu
    allowed = np.arange(500) % 3 == 0
    for kw in ({}, {"allowed": allowed}):
        np.testing.assert_array_equal(index.search(x[:5], 7, **kw)[1], ref.search(x[:5], 7, **kw)[1])
    with pytest.raises(UserError, match=r"could not be copied to the GPU .*free GPU memory, or search on the CPU \(use_gpu=False\)"):
        CellIndex.build(x, kind="flat", use_gpu=True)
