"""CUDA-only code paths, exercised on the CPU.

No GPU runs these tests: each one reaches a branch taken only on CUDA by standing in for the
device (a default-device context, a backbone that reports a CUDA device, a fake clock and
`torch.cuda.synchronize`), so that what would go wrong on a GPU shows here.
"""

from __future__ import annotations

import torch

from embedstore.extract import backbones as bb
from heads import train as heads_train
from heads.data import CellData
from heads.splits import make_split
from tests.test_heads_train import PROV, synthetic


def test_seeded_init_draws_on_the_cpu_whatever_the_default_device():
    """`build_random_backbone("test-...", device="cuda")` builds the trunk inside a
    `torch.device("cuda")` context, where `torch.randn(..., generator=<CPU generator>)` asks
    for a CUDA tensor from a CPU generator and raises. A meta default device stands in for
    CUDA: the seeded weights must not depend on the default device."""
    spec = bb.get_spec("test-vit-local")
    want = bb._build_seeded(spec).state_dict()
    with torch.random.fork_rng(devices=[]):
        model = bb._create(spec)  # on the CPU, as a CUDA build's parameters are real tensors
    with torch.device("meta"):
        bb._seeded_init(model, spec.seed)
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_random_backbone_gets_the_cuda_memory_layout_of_build_backbone(monkeypatch):
    """On CUDA `preprocess` hands the trunk NHWC input and `build_backbone` turns the conv
    weights NHWC to match; the timing-only `build_random_backbone` must do the same, or the
    GPU benchmarks and `doctor` time another layout than the extraction runs."""
    monkeypatch.setattr(bb.Backbone, "device", property(lambda self: torch.device("cuda")))
    nhwc = torch.channels_last
    real = bb.build_backbone("test-vit-local")
    assert real.trunk.patch_embed.proj.weight.is_contiguous(memory_format=nhwc)
    rand = bb.build_random_backbone("test-vit-local")
    assert rand.trunk.patch_embed.proj.weight.is_contiguous(memory_format=nhwc)
    assert not rand.trunk.patch_embed.proj.weight.is_contiguous()


def test_elapsed_waits_for_the_queued_cuda_work_before_reading_the_clock(monkeypatch):
    """CUDA kernels run asynchronously: an epoch's time read without a sync misses the steps
    still queued, and cells/s comes out too high."""
    events: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    monkeypatch.setattr(heads_train.time, "perf_counter", lambda: events.append("clock") or 12.5)
    cuda = torch.device("cuda")
    assert heads_train._elapsed(10.0, cuda) == 2.5
    assert events == [("sync", cuda), "clock"]
    events.clear()
    assert heads_train._elapsed(10.0, torch.device("cpu")) == 2.5
    assert events == ["clock"]


def test_every_stage_times_its_epochs_on_the_training_device(monkeypatch, one_torch_thread):
    """Stages 1-3 read their epoch times through `_elapsed`, with the device they train on."""
    seen: list[torch.device] = []
    real = heads_train._elapsed

    def spy(t0: float, device: torch.device) -> float:
        seen.append(device)
        return real(t0, device)

    monkeypatch.setattr(heads_train, "_elapsed", spy)
    meta, local, context = synthetic(n=600)
    data = CellData.from_arrays(meta, local, context, provenance=PROV)
    split = make_split(data.meta)
    cfg = heads_train.TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=128, hidden=16,
                                  proj=8, gate_proj=8, gate_hidden=(8, 8), stage3_heads="joint")
    quiet = lambda line: None  # noqa: E731
    head, hist_local = heads_train.train_local(data, split, cfg, quiet)
    context_head, hist_global = heads_train.train_global(data, split, head, cfg, quiet)
    _, hist_gate = heads_train.train_gate(data, split, head, context_head, cfg, quiet)
    assert len(seen) == len(hist_local) + len(hist_global) + len(hist_gate) >= 4
    assert all(d.type == "cpu" for d in seen)
