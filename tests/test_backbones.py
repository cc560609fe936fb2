"""Backbone registry: real architectures (meta device, no forward), weight loading, test entries."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from embedstore.errors import UserError
from embedstore.extract import backbones as bb

REAL = {"uni2-h": (681_394_176, 1536, 9), "dinov3-vitl16": (303_079_424, 1024, 5)}
TEST = ("test-vit-local", "test-vit-context")


@pytest.fixture
def no_local_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty NUCLASS_WEIGHTS_DIR and HF cache under tmp_path; the network is never asked."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("NUCLASS_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    return weights_dir


def images(px: int) -> dict[str, torch.Tensor]:
    """uint8 HWC images differing in colour, texture or shape only."""
    y, x = torch.meshgrid(torch.arange(px), torch.arange(px), indexing="ij")
    grey = torch.full((px, px, 3), 128.0)
    pink = torch.tensor([200.0, 90.0, 170.0]).expand(px, px, 3)
    stripes = (128 + 100 * torch.sin(x / 3.0)).unsqueeze(-1).expand(px, px, 3)
    hstripes = (128 + 100 * torch.sin(y / 3.0)).unsqueeze(-1).expand(px, px, 3)
    r = px / 4
    disk = (((x - px / 2) ** 2 + (y - px / 2) ** 2) < r**2).float() * 120 + 60
    square = (((x - px / 2).abs() < r) & ((y - px / 2).abs() < r)).float() * 120 + 60
    out = {"grey": grey, "pink": pink, "stripes": stripes, "hstripes": hstripes,
           "disk": disk.unsqueeze(-1).expand(px, px, 3),
           "square": square.unsqueeze(-1).expand(px, px, 3)}
    return {k: v.round().clamp(0, 255).to(torch.uint8).contiguous() for k, v in out.items()}


def random_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cheap random values for every key of the exact architecture."""
    trunk = bb._build_trunk(bb._entry(name), "meta")
    rng = np.random.default_rng(seed)  # ~10x faster than torch.rand for 681M values
    return {k: torch.from_numpy(rng.random(tuple(v.shape), dtype=np.float32))
            for k, v in trunk.state_dict().items()}


# --- registry -----------------------------------------------------------------------------------


def test_list_and_lookup() -> None:
    assert bb.list_backbones("test-*") == ["test-vit-context", "test-vit-local"]
    assert set(bb.list_backbones()) >= {*REAL, *TEST}
    assert bb.list_backbones("*dinov3*") == ["dinov3-vitl16"]
    assert bb.list_backbones("nothing-*") == []
    for name in TEST:
        assert bb.get_spec(name).is_test
    for name in REAL:
        spec = bb.get_spec(name)
        assert not spec.is_test and spec.mean == bb.IMAGENET_MEAN and spec.std == bb.IMAGENET_STD
    assert bb.get_spec("uni2-h").hub_id == "hf-hub:MahmoodLab/UNI2-h"
    assert bb.get_spec("uni2-h").input_px == 224
    assert bb.get_spec("dinov3-vitl16").hub_id == "timm/vit_large_patch16_dinov3.lvd1689m"
    assert bb.get_spec("dinov3-vitl16").input_px == 512


def test_unknown_name_lists_known() -> None:
    with pytest.raises(UserError, match="Unknown backbone 'uni2'") as err:
        bb.get_spec("uni2")
    for name in (*REAL, *TEST):
        assert name in str(err.value)
    with pytest.raises(UserError, match="Known backbones"):
        bb.build_backbone("resnet50")


def test_register_rejects_duplicates_and_bad_specs() -> None:
    spec = bb.get_spec("test-vit-local")
    with pytest.raises(ValueError, match="already registered"):
        bb.register_backbone(spec)(lambda s: torch.nn.Identity())
    fields = {**spec.__dict__, "name": "not-a-test", "is_test": True}
    with pytest.raises(ValueError, match="start 'test-'"):
        bb.BackboneSpec(**fields)
    with pytest.raises(ValueError, match="multiple of the patch"):
        bb.BackboneSpec(**{**spec.__dict__, "input_px": 225})


def test_bad_options_raise_user_errors() -> None:
    with pytest.raises(UserError, match="Pooling 'max'.*cls, mean"):
        bb.build_backbone("test-vit-local", pooling="max")
    with pytest.raises(UserError, match="multiple of its patch size 32"):
        bb.build_backbone("test-vit-context", input_px=500)
    with pytest.raises(UserError, match="multiple of its patch size 16"):
        bb.count_flops("dinov3-vitl16", input_px=1000)


# --- real architectures, no forward pass ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_architectures_exact(name: str) -> None:
    n_params, dim, n_prefix = REAL[name]
    spec = bb.get_spec(name)
    trunk = bb._build_trunk(bb._entry(name), "meta")
    assert sum(p.numel() for p in trunk.parameters()) == n_params == spec.n_params
    assert trunk.num_features == dim == spec.dim
    assert trunk.num_prefix_tokens == n_prefix == spec.n_prefix_tokens
    # shapes only (meta): any multiple of the patch size goes through the trunk
    for px in (spec.input_px, 2 * spec.patch_px * 5):
        tokens = trunk.forward_features(torch.empty(1, 3, px, px, device="meta"))
        assert tuple(tokens.shape) == (1, n_prefix + (px // spec.patch_px) ** 2, dim)


def test_uni2h_config_matches_method() -> None:
    kw = bb.get_spec("uni2-h").timm_kwargs
    assert bb.get_spec("uni2-h").timm_name == "vit_giant_patch14_224"
    assert kw["reg_tokens"] == 8 and kw["no_embed_class"] and kw["dynamic_img_size"]
    assert kw["mlp_ratio"] == 2.66667 * 2 and kw["init_values"] == 1e-5
    assert kw["mlp_layer"] is timm.layers.SwiGLUPacked
    assert kw["act_layer"] is torch.nn.SiLU


def test_dinov3_meta_checkpoint_layout_is_converted() -> None:
    """Meta's original key names (storage_tokens, ls1.gamma, zero qkv.bias) map onto timm's."""
    entry = bb._entry("dinov3-vitl16")
    trunk = bb._build_trunk(entry, "meta")
    expected = trunk.state_dict()
    meta_sd: dict[str, torch.Tensor] = {}
    for k, v in expected.items():
        k = k.replace("reg_token", "storage_tokens")
        k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        meta_sd[k] = v
    meta_sd["mask_token"] = torch.empty(1, 1024, device="meta")
    meta_sd["rope_embed.periods"] = torch.empty(16, device="meta")
    meta_sd["blocks.0.attn.qkv.bias"] = torch.zeros(3 * 1024)
    converted = entry.convert(meta_sd, trunk)
    assert set(converted) == set(expected)
    bb._check_keys(converted, expected, entry.spec, "meta-layout")


# --- weight loading through the real path ------------------------------------------------------------


@pytest.mark.slow
def test_uni2h_bin_roundtrip(tmp_path: Path, no_local_weights: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    sd = random_state_dict("uni2-h", seed=1)
    keep = {k: sd[k].clone() for k in ("cls_token", "reg_token", "blocks.23.mlp.fc2.weight")}
    torch.save({"state_dict": sd}, path)  # wrapped, as training checkpoints often are
    del sd
    try:
        model = bb.build_backbone("uni2-h", weights=tmp_path)  # a folder: finds the .bin
        state = model.trunk.state_dict()
        for k, v in keep.items():
            assert torch.equal(state[k], v), k
        assert not any(t.is_meta for t in state.values())
        with open(path, "rb") as f:
            assert model.weights_sha256 == hashlib.file_digest(f, "sha256").hexdigest()
        assert model.weights_source == str(path)
        prov = model.provenance()
        assert prov["n_params"] == 681_394_176 and prov["weights_sha256"] == model.weights_sha256
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
    finally:
        path.unlink()


@pytest.mark.slow
def test_dinov3_safetensors_roundtrip_from_weights_dir(no_local_weights: Path) -> None:
    folder = no_local_weights / "dinov3-vitl16"
    folder.mkdir()
    path = folder / "model.safetensors"
    sd = random_state_dict("dinov3-vitl16", seed=2)
    keep = {k: sd[k].clone() for k in ("reg_token", "blocks.0.gamma_1", "norm.weight")}
    save_file(sd, str(path))
    del sd
    try:
        assert bb.weights_status("dinov3-vitl16") == f"found: {path}"
        model = bb.build_backbone("dinov3-vitl16")  # weights=None: $NUCLASS_WEIGHTS_DIR/<name>/
        state = model.trunk.state_dict()
        for k, v in keep.items():
            assert torch.equal(state[k], v), k
        periods = model.trunk.rope.periods  # non-persistent, recomputed after loading
        assert not periods.is_meta and torch.isfinite(periods).all() and (periods > 0).all()
        with open(path, "rb") as f:
            assert model.weights_sha256 == hashlib.file_digest(f, "sha256").hexdigest()
        assert model.input_px == 512 and model.pooling == "cls"
    finally:
        path.unlink()


@pytest.mark.parametrize("name", TEST)
def test_test_entry_reloads_through_file_path(name: str, tmp_path: Path) -> None:
    """Seeded weights saved and reloaded (meta build, strict check, buffers) give equal vectors."""
    ref = bb.build_backbone(name)
    path = tmp_path / "w.safetensors"
    save_file(ref.trunk.state_dict(), str(path))
    loaded = bb.build_backbone(name, weights=path)
    x = torch.stack(list(images(ref.input_px).values()))
    torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=0)
    assert loaded.weights_sha256 == bb.sha256_file(path) != ref.weights_sha256
    # a .pth with a {"model": ...} wrapper and DDP's "module." prefix loads the same
    pth = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in ref.trunk.state_dict().items()},
                "epoch": 3}, pth)
    torch.testing.assert_close(bb.build_backbone(name, weights=pth)(x), ref(x), rtol=0, atol=0)


def test_key_mismatch_names_keys_and_architecture(tmp_path: Path) -> None:
    sd = bb.build_backbone("test-vit-local").trunk.state_dict()
    del sd["blocks.1.attn.proj.weight"]
    sd["blocks.9.extra.weight"] = torch.zeros(3)
    sd["norm.weight"] = torch.ones(65)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UserError) as err:
        bb.build_backbone("test-vit-local", weights=path)
    msg = str(err.value)
    assert "1 missing keys: blocks.1.attn.proj.weight" in msg
    assert "1 unexpected keys: blocks.9.extra.weight" in msg
    assert "norm.weight file (65,) vs model (64,)" in msg
    assert "vit_small_patch14_reg4_dinov2" in msg and str(path) in msg


def test_many_missing_keys_are_truncated(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(2) for i in range(25)}, str(path))
    with pytest.raises(UserError) as err:
        bb.build_backbone("test-vit-context", weights=path)
    msg = str(err.value)
    assert "25 unexpected keys" in msg and "(15 more)" in msg
    assert "missing keys" in msg and "more)" in msg.split("missing keys")[1]


def test_unreadable_weights_files(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module, not a state dict
    with pytest.raises(UserError, match="weights_only=True.*state_dict"):
        bb.build_backbone("test-vit-local", weights=pickled)
    with pytest.raises(UserError, match="does not exist"):
        bb.build_backbone("test-vit-local", weights=tmp_path / "missing.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="unknown type"):
        bb.build_backbone("test-vit-local", weights=tmp_path / "w.txt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="Cannot read safetensors"):
        bb.build_backbone("test-vit-local", weights=junk)


def test_directory_lookup(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="No weights file in .*--local-weights"):
        bb.build_backbone("test-vit-local", weights=empty)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.pth").write_bytes(b"")
    (two / "b.pth").write_bytes(b"")
    with pytest.raises(UserError, match="Several weight files.*a.pth, b.pth"):
        bb.build_backbone("test-vit-local", weights=two)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_entry_without_weights_explains_how_to_get_them(
    name: str, no_local_weights: Path
) -> None:
    spec = bb.get_spec(name)
    assert bb.weights_status(name) == "not found"
    with pytest.raises(UserError) as err:
        bb.build_backbone(name)
    msg = str(err.value)
    assert spec.hub_id in msg and "--local-weights" in msg
    assert f"https://huggingface.co/{spec.repo_id}" in msg
    assert f"hf download {spec.repo_id} --local-dir DIR" in msg
    assert "huggingface-cli login" in msg and "NUCLASS_WEIGHTS_DIR" in msg
    assert str(no_local_weights / name) in msg


def test_local_search_order(no_local_weights: Path, tmp_path: Path) -> None:
    snap = tmp_path / "hf" / "hub" / "models--MahmoodLab--UNI2-h" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123\n")
    (snap / "pytorch_model.bin").write_bytes(b"")
    assert bb.weights_status("uni2-h") == f"found: {snap / 'pytorch_model.bin'}"
    ours = no_local_weights / "uni2-h"
    ours.mkdir()
    (ours / "uni2h.safetensors").write_bytes(b"")
    assert bb.find_local_weights("uni2-h") == ours / "uni2h.safetensors"  # the weights dir first
    assert bb.weights_status("dinov3-vitl16") == "not found"
    assert bb.weights_status("test-vit-local") == "built-in (test)"


def test_hub_names_go_through_the_hub_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    ref = bb.build_backbone("test-vit-local")
    path = tmp_path / "model.safetensors"
    save_file(ref.trunk.state_dict(), str(path))
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    model = bb.build_backbone("test-vit-local", weights="hf-hub:someone/tiny-vit")
    assert calls == [("someone/tiny-vit", "model.safetensors")]
    assert model.weights_source.startswith("hf-hub:someone/tiny-vit")
    assert model.weights_sha256 == bb.sha256_file(path)

    def offline(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(UserError, match="Cannot reach the Hugging Face hub.*--local-weights"):
        bb.build_backbone("uni2-h", weights="hf-hub:MahmoodLab/UNI2-h")
    # the spec's hub id without the prefix is a hub name too; every known file name is tried
    calls.clear()
    with pytest.raises(UserError, match="Cannot reach.*https://huggingface.co/timm/vit_large"):
        bb.build_backbone("dinov3-vitl16", weights="timm/vit_large_patch16_dinov3.lvd1689m")
    repo = "timm/vit_large_patch16_dinov3.lvd1689m"
    assert calls == [(repo, "model.safetensors"), (repo, "pytorch_model.bin")]


# --- test entries: forward behaviour -----------------------------------------------------------------


@pytest.mark.parametrize("name", TEST)
def test_test_entries_are_deterministic(name: str) -> None:
    x = torch.stack(list(images(bb.get_spec(name).input_px).values()))
    torch.manual_seed(1)
    a = bb.build_backbone(name)
    torch.manual_seed(2)
    rng = torch.get_rng_state()
    b = bb.build_backbone(name)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not moved
    assert a.weights_sha256 == b.weights_sha256 == bb.state_dict_sha256(a.trunk.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    spec = bb.get_spec(name)
    assert sum(p.numel() for p in a.trunk.parameters()) == spec.n_params < 300_000


@pytest.mark.parametrize("name", TEST)
def test_output_shape_dtype_and_resize(name: str) -> None:
    model = bb.build_backbone(name)
    spec = model.spec
    x = torch.randint(0, 256, (3, 300, 260, 3), dtype=torch.uint8)
    out = model(x)
    assert out.shape == (3, spec.dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the wrapper resizes with bilinear antialiasing and normalises with the spec's mean/std;
    # on the CPU the resize runs on uint8 (torch's fast path), so allow one grey level
    want = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(spec.input_px, spec.input_px),
                         mode="bilinear", align_corners=False, antialias=True)
    want = (want / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(
        spec.std).view(1, 3, 1, 1)
    one_level = 1.0 / 255 / min(spec.std) + 1e-5
    torch.testing.assert_close(model.preprocess(x), want, rtol=0, atol=one_level)
    with pytest.raises(ValueError, match="uint8"):
        model(x.float())


@pytest.mark.parametrize("name", TEST)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vectors_follow_image_content(name: str, pooling: str) -> None:
    model = bb.build_backbone(name, pooling=pooling)
    imgs = images(model.input_px)
    vec = dict(zip(imgs, model(torch.stack(list(imgs.values()))), strict=True))
    pairs = [("grey", "pink"), ("grey", "stripes"), ("stripes", "hstripes"), ("disk", "square")]
    for a, b in pairs:
        rel = (vec[a] - vec[b]).norm() / vec[a].norm()
        # float noise is ~1e-6; a disk and a square of similar area are the closest pair
        # (~0.01 with CLS pooling), colour and texture changes move the vector by ~0.1 or more
        assert rel > 0.004, (a, b, float(rel))


@pytest.mark.parametrize("name", TEST)
def test_cls_and_mean_pooling_differ(name: str) -> None:
    x = torch.stack(list(images(bb.get_spec(name).input_px).values()))
    cls = bb.build_backbone(name, pooling="cls")
    mean = bb.build_backbone(name, pooling="mean")
    assert cls.provenance()["pooling"] == "cls" and mean.provenance()["pooling"] == "mean"
    tokens = mean.forward_tokens(x)
    torch.testing.assert_close(mean(x), tokens[:, 5:].mean(1))  # registers and CLS excluded
    torch.testing.assert_close(cls(x), tokens[:, 0])
    assert not torch.allclose(cls(x), mean(x), atol=1e-3)


def test_other_input_sizes_and_patch_grid() -> None:
    model = bb.build_backbone("test-vit-context", input_px=256)
    x = torch.randint(0, 256, (2, 1024, 1024, 3), dtype=torch.uint8)
    assert model(x).shape == (2, 48)
    assert model.patch_grid(x).shape == (2, 8, 8, 48)
    assert model.patch_grid(x[:, :96, :64], resize=False).shape == (2, 3, 2, 48)
    assert model.provenance()["input_px"] == 256
    local = bb.build_backbone("test-vit-local", input_px=112)
    assert local(torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)).shape == (1, 64)


def test_provenance_is_complete_and_json_ready() -> None:
    import json

    prov = bb.build_backbone("test-vit-local").provenance()
    for key in ("backbone", "dim", "input_px", "pooling", "mean", "std", "weights_sha256",
                "weights_source", "n_params", "timm_model", "timm_kwargs"):
        assert key in prov
    assert json.loads(json.dumps(prov)) == prov
    uni_kwargs = {k: bb._jsonable(v) for k, v in bb.get_spec("uni2-h").timm_kwargs.items()}
    assert uni_kwargs["mlp_layer"] == "timm.layers.SwiGLUPacked"
    assert uni_kwargs["act_layer"] == "torch.nn.modules.activation.SiLU"
    assert uni_kwargs["mlp_ratio"] == 2.66667 * 2
    json.dumps(uni_kwargs)


def test_works_under_autocast_and_returns_float32() -> None:
    model = bb.build_backbone("test-vit-local")
    x = torch.stack(list(images(224).values()))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out, ref).min() > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TEST)
def test_cuda_bf16_autocast(name: str) -> None:
    model = bb.build_backbone(name, device="cuda")
    x = torch.stack(list(images(bb.get_spec(name).input_px).values()))  # on the CPU
    ref = bb.build_backbone(name)(x)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert F.cosine_similarity(out.cpu(), ref).min() > 0.98


# --- FLOPs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEST)
def test_count_flops_scales_with_input(name: str) -> None:
    spec = bb.get_spec(name)
    base = bb.count_flops(name)
    assert base > 0
    assert bb.count_flops(name, batch=3) == base
    ratio = bb.count_flops(name, input_px=2 * spec.input_px) / base
    assert 4 <= ratio <= 16, ratio  # linear layers x4 tokens, attention x16
    # the bulk: 2 FLOPs per multiply-add, at least once per parameter and token
    tokens = (spec.input_px // spec.patch_px) ** 2
    assert base > 2 * tokens * (spec.n_params - 3 * spec.patch_px**2 * spec.dim) * 0.5


def test_count_flops_real_model_is_plausible() -> None:
    flops = bb.count_flops("uni2-h")
    tokens = 9 + 16 * 16
    assert 2 * 681e6 * tokens * 0.9 < flops < 2 * 681e6 * tokens * 1.5
    assert math.isfinite(flops / 1e12)


def test_random_backbone_is_marked_seeded_and_checked() -> None:
    """Timing-only models: the registry's architecture, seeded, and never passed off as weights."""
    x = torch.stack(list(images(bb.get_spec("test-vit-local").input_px).values()))
    rng = torch.get_rng_state()
    a = bb.build_random_backbone("test-vit-local", seed=3)
    b = bb.build_random_backbone("test-vit-local", seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.weights_sha256 == "random" and a.weights_source == "random (timing only)"
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    m = bb.build_random_backbone("test-vit-context", input_px=64, pooling="mean")
    assert (m.input_px, m.pooling) == (64, "mean")
    with pytest.raises(UserError, match="Pooling 'max'"):
        bb.build_random_backbone("test-vit-local", pooling="max")


def test_how_to_get_weights_names_the_licence_page() -> None:
    spec = bb.get_spec("uni2-h")
    assert f"https://huggingface.co/{spec.repo_id}" in bb.how_to_get_weights("uni2-h")


def test_hints_name_the_weights_option_of_the_backbones_role(no_local_weights: Path) -> None:
    """A missing context backbone's hint said --local-weights (the registry did not know the role)."""
    from embedstore.doctor import check_weights
    from embedstore.extract.pipeline import ExtractConfig, build_steps

    cfg = ExtractConfig(local_backbone="test-vit-local", context_backbone="dinov3-vitl16", device="cpu")
    with pytest.raises(UserError) as err:
        build_steps(cfg, torch.device("cpu"))
    assert "--context-weights" in str(err.value) and "--local-weights" not in str(err.value)
    (local, context) = check_weights(["uni2-h", "dinov3-vitl16"])
    assert "--local-weights" in local.fix and "--context-weights" not in local.fix
    assert "--context-weights" in context.fix and "--local-weights" not in context.fix
