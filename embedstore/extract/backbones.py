"""Backbone registry: a name maps to a frozen `BackboneSpec` and a builder of the timm trunk.

Shaped like timm's model registry: `register_backbone(spec)` decorates a builder,
`list_backbones("test-*")` filters names, `get_spec(name)` returns the spec, and
`build_backbone(name, weights=...)` returns a frozen `Backbone` that turns uint8 HWC crops into
float32 vectors and records the provenance of every vector it makes (weights SHA-256, input
size, pooling, mean/std, timm configuration).

Weights follow one path for every entry: the trunk is built on the meta device (no memory, no
init), the state dict is read from a file (safetensors, or a torch pickle read with
`weights_only=True`), checked key by key and shape by shape, and assigned. Test entries
(`test-*`) are tiny and, without a weights file, initialised from a fixed seed. Weights-free
entries (`hc-nucleus`: hand-crafted nucleus features, embedstore.extract.handcrafted) have no file at
all; their hash covers the feature version and constants.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from embedstore.errors import UserError
from embedstore.extract import handcrafted

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOLINGS = ("cls", "mean")

#: environment variable naming a folder with one sub-folder of weights per backbone name
WEIGHTS_DIR_ENV = "NUCLASS_WEIGHTS_DIR"

#: file names tried, in order, inside a weights directory
PREFERRED_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

#: keys under which training checkpoints commonly nest the state dict
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "net")
#: prefixes stripped when every key carries them (DDP, wrapper modules)
_STRIP_PREFIXES = ("module.", "backbone.")

_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to use a backbone; `timm_name` + `timm_kwargs` rebuild the trunk."""

    name: str
    description: str
    dim: int
    input_px: int
    patch_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    poolings: tuple[str, ...]
    n_params: int
    licence: str
    timm_name: str
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    hub_id: str | None = None
    #: files tried, in order, when downloading from the hub
    hub_filenames: tuple[str, ...] = PREFERRED_WEIGHT_FILES
    #: cls + register tokens at the start of the token sequence
    n_prefix_tokens: int = 1
    is_test: bool = False
    #: seed of the built-in random weights (test entries only)
    seed: int | None = None
    #: computed features, not a network: no weights file, one vector per crop, no patch tokens
    weights_free: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", self.name):
            raise ValueError(f"backbone name {self.name!r}: use lower-case letters, digits, '-', '.'")
        if self.is_test != self.name.startswith("test-"):
            raise ValueError(f"backbone {self.name!r}: test entries, and only they, start 'test-'")
        if self.is_test and self.seed is None:
            raise ValueError(f"test backbone {self.name!r} needs a fixed seed")
        if self.pooling not in self.poolings or not set(self.poolings) <= set(POOLINGS):
            raise ValueError(f"backbone {self.name!r}: bad pooling {self.pooling!r}/{self.poolings}")
        if self.weights_free and (self.hub_id or self.poolings != ("cls",)):
            raise ValueError(f"weights-free backbone {self.name!r}: no hub id, pooling 'cls' only")
        if self.input_px % self.patch_px:
            raise ValueError(f"backbone {self.name!r}: input {self.input_px} px not a multiple "
                             f"of the patch size {self.patch_px} px")

    @property
    def repo_id(self) -> str | None:
        """Hub repository id without timm's `hf-hub:` prefix."""
        if self.hub_id is None:
            return None
        return self.hub_id.removeprefix("hf-hub:")

    @property
    def model_url(self) -> str | None:
        return None if self.repo_id is None else f"https://huggingface.co/{self.repo_id}"


Builder = Callable[[BackboneSpec], nn.Module]
Converter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _Entry:
    spec: BackboneSpec
    builder: Builder
    convert: Converter | None


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    spec: BackboneSpec, *, convert: Converter | None = None
) -> Callable[[Builder], Builder]:
    """Register `builder(spec) -> trunk` under `spec.name`.

    The builder returns a timm ViT-style trunk (with `forward_features` and
    `num_prefix_tokens`) built on the current default device; `convert`, if given, maps a
    foreign checkpoint layout onto the trunk's keys before the strict check.
    """

    def decorate(builder: Builder) -> Builder:
        if spec.name in _REGISTRY:
            raise ValueError(f"backbone {spec.name!r} is already registered")
        _REGISTRY[spec.name] = _Entry(spec, builder, convert)
        return builder

    return decorate


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered names matching an fnmatch pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"Unknown backbone {name!r}. Known backbones: {', '.join(list_backbones())}."
        ) from None


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under `name`; UserError listing the known names otherwise."""
    return _entry(name).spec


# ---------------------------------------------------------------------------------------------
# Real entries (configurations from docs/METHOD.md)


def _create(spec: BackboneSpec) -> nn.Module:
    return timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)


@register_backbone(
    BackboneSpec(
        name="uni2-h",
        description="UNI2-h (MahmoodLab): ViT-H/14, 8 register tokens; CLS after the final norm",
        dim=1536,
        input_px=224,
        patch_px=14,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        poolings=POOLINGS,
        n_params=681_394_176,
        licence="CC-BY-NC-ND-4.0, gated, research use only",
        timm_name="vit_giant_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": timm.layers.SwiGLUPacked,
            "act_layer": torch.nn.SiLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        hub_filenames=("pytorch_model.bin", "model.safetensors"),
        n_prefix_tokens=9,
    )
)
def _uni2_h(spec: BackboneSpec) -> nn.Module:
    return _create(spec)


def _dinov3_from_meta(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map Meta's original DINOv3 checkpoint layout (`storage_tokens`, `ls1.gamma`) to timm's."""
    if "storage_tokens" not in sd:
        return sd
    from timm.models.eva import checkpoint_filter_fn

    params = dict(model.named_parameters())
    sd = dict(sd)
    for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
        if k.replace("qkv.bias", "q_bias") not in params and not bool(sd[k].any()):
            del sd[k]  # the distilled ViT-L ships all-zero qkv biases; timm's trunk has none
    return checkpoint_filter_fn(sd, model)


@register_backbone(
    BackboneSpec(
        name="dinov3-vitl16",
        description="DINOv3 ViT-L/16 (Meta, LVD-1689M): 4 register tokens, RoPE; context encoder",
        dim=1024,
        input_px=512,
        patch_px=16,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        poolings=POOLINGS,
        n_params=303_079_424,
        licence="DINOv3 License (Meta), gated",
        timm_name="vit_large_patch16_dinov3",
        # dynamic_img_size=True and RoPE (no absolute position table) are timm's defaults for
        # this model, so any multiple of 16 px works with the same weights.
        timm_kwargs={"num_classes": 0},
        hub_id="timm/vit_large_patch16_dinov3.lvd1689m",
        hub_filenames=("model.safetensors", "pytorch_model.bin"),
        n_prefix_tokens=5,
    ),
    convert=_dinov3_from_meta,
)
def _dinov3_vitl16(spec: BackboneSpec) -> nn.Module:
    return _create(spec)


# ---------------------------------------------------------------------------------------------
# Test entries: tiny, seeded, same interface


def _seeded_init(model: nn.Module, seed: int) -> None:
    """Fill every parameter from a private generator (the global RNG is neither read nor moved).

    Fan-in-scaled weights and unit-scale tokens, no layer-scale: unlike timm's small-std
    init, the outputs then depend clearly on colour, texture and shape.
    """
    if any(p.is_meta for p in model.parameters()):
        return  # shapes only; weights come from a file
    gen = torch.Generator().manual_seed(seed)
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    owners = {f"{m_name}.{p_name}".lstrip("."): mod
              for m_name, mod in model.named_modules()
              for p_name, _ in mod.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if isinstance(owners[name], norm_types):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            if name.endswith(("cls_token", "reg_token")):
                std = 1.0
            elif name.endswith("pos_embed"):
                std = 0.5
            elif p.ndim >= 2:
                std = 1.0 / math.sqrt(p[0].numel())
            else:
                std = 0.1
            # drawn where the generator lives (the CPU), whatever the default device (a
            # `torch.device("cuda")` context in build_random_backbone), then copied: the same
            # weights on every device, and no CPU generator asked for a CUDA tensor
            p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) * std)


def _build_seeded(spec: BackboneSpec) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # timm's own init draws from the global RNG
        model = _create(spec)
    assert spec.seed is not None
    _seeded_init(model, spec.seed)
    return model


@register_backbone(
    BackboneSpec(
        name="test-vit-local",
        description="TEST ONLY: tiny random ViT-14 with 4 registers standing in for uni2-h",
        dim=64,
        input_px=224,
        patch_px=14,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        poolings=POOLINGS,
        n_params=154_752,
        licence="built-in random weights (no licence, not a pathology model)",
        timm_name="vit_small_patch14_reg4_dinov2",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 2,
            "init_values": None,
            "reg_tokens": 4,
            "no_embed_class": True,
            "dynamic_img_size": True,
            "num_classes": 0,
        },
        n_prefix_tokens=5,
        is_test=True,
        seed=20251117,
    )
)
def _test_vit_local(spec: BackboneSpec) -> nn.Module:
    return _build_seeded(spec)


@register_backbone(
    BackboneSpec(
        name="test-vit-context",
        description="TEST ONLY: tiny random RoPE ViT-32 with 4 registers standing in for dinov3",
        dim=48,
        input_px=512,
        patch_px=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        poolings=POOLINGS,
        n_params=204_288,
        licence="built-in random weights (no licence, not a pathology model)",
        timm_name="vit_small_patch16_dinov3",
        timm_kwargs={
            "img_size": 512,
            "patch_size": 32,
            "embed_dim": 48,
            "depth": 2,
            "num_heads": 2,
            "init_values": None,
            "num_classes": 0,
        },
        n_prefix_tokens=5,
        is_test=True,
        seed=20251118,
    )
)
def _test_vit_context(spec: BackboneSpec) -> nn.Module:
    return _build_seeded(spec)


# ---------------------------------------------------------------------------------------------
# Weights-free entries: computed features, same interface


@register_backbone(
    BackboneSpec(
        name="hc-nucleus",
        description="Hand-crafted nucleus features (shape, H/E intensity, chromatin texture, "
                    "crowding; embedstore.extract.handcrafted), NOT a foundation model; no weights",
        dim=handcrafted.N_FEATURES,
        input_px=224,
        patch_px=224,
        mean=(0.0, 0.0, 0.0),  # the trunk receives RGB in 0..1
        std=(1.0, 1.0, 1.0),
        pooling="cls",
        poolings=("cls",),
        n_params=0,
        licence="none needed (computed features, scikit-image)",
        timm_name="",
        weights_free=True,
    )
)
def _hc_nucleus(spec: BackboneSpec) -> nn.Module:
    return handcrafted.NucleusFeatures()


def _weights_free_refusal(spec: BackboneSpec, pooling: str, px: int) -> UserError | None:
    """Why a weights-free backbone cannot run with these options (None when it can)."""
    if pooling != "cls":
        return UserError(
            f"Backbone {spec.name!r} computes one hand-crafted vector per crop and has no patch "
            f"tokens, so pooling {pooling!r} (and --context tiled, which pools patch tokens) is "
            "not available. Use it as --local-backbone, with a ViT context backbone."
        )
    if px != spec.input_px:
        return UserError(
            f"Backbone {spec.name!r} measures the 56 µm local field at {spec.input_px} px "
            f"(features in µm); it takes no other input size ({px} px asked). It is a local "
            "backbone: use it as --local-backbone, not as the context backbone."
        )
    return None


# ---------------------------------------------------------------------------------------------
# Weights: where they are, how they are read, how they are checked


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, streamed in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (key, dtype, shape, raw bytes) of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hf_cache_dir() -> Path:
    """The hub cache folder, read from the environment at call time (no network)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _find_in_dir(folder: Path) -> Path | None:
    """The weights file in a folder: a preferred name, else the only file with a known suffix."""
    for fname in PREFERRED_WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(found) > 1:
        raise UserError(
            f"Several weight files in {folder}: {', '.join(p.name for p in found)}. "
            "Pass the one to use as the file path instead of the folder."
        )
    return found[0] if found else None


def _local_candidates(spec: BackboneSpec) -> list[Path]:
    """Folders searched, in order, when no weights are given for a real backbone."""
    out = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        out.append(Path(os.environ[WEIGHTS_DIR_ENV]).expanduser() / spec.name)
    if spec.repo_id:
        repo = _hf_cache_dir() / ("models--" + spec.repo_id.replace("/", "--"))
        snaps = repo / "snapshots"
        ref = repo / "refs" / "main"
        if ref.is_file():
            out.append(snaps / ref.read_text().strip())
        if snaps.is_dir():
            others = [p for p in snaps.iterdir() if p.is_dir() and p not in out]
            out.extend(sorted(others, key=lambda p: p.stat().st_mtime, reverse=True))
        else:
            out.append(snaps)  # named in the error message even when absent
    return out


def find_local_weights(name: str) -> Path | None:
    """The local weights file for a real backbone: $NUCLASS_WEIGHTS_DIR/<name>/, then HF cache."""
    spec = get_spec(name)
    for folder in _local_candidates(spec):
        if folder.is_dir() and (found := _find_in_dir(folder)) is not None:
            return found
    return None


def weights_status(name: str) -> str:
    """One word for a listing: "found: PATH", "built-in (test)", "none needed" or "not found"."""
    if get_spec(name).weights_free:
        return "none needed (hand-crafted)"
    if get_spec(name).is_test:
        return "built-in (test)"
    try:
        found = find_local_weights(name)
    except UserError as e:  # e.g. several candidate files in one folder
        return f"not found ({e})"
    return f"found: {found}" if found is not None else "not found"


def _how_to_get(spec: BackboneSpec, role: str | None = None) -> str:
    """`role`: local or context, the extract option that gives this backbone's weights."""
    repo = spec.repo_id
    option = f"--{role}-weights" if role else "--local-weights (or --context-weights)"
    return (
        f"The weights of {spec.name!r} are gated (licence: {spec.licence}). To use them: "
        f"(1) open {spec.model_url}, log in and accept the licence; "
        f"(2) either run `huggingface-cli login` (or `hf auth login`) and pass "
        f"{option} {spec.hub_id}, or download them with "
        f"`hf download {repo} --local-dir DIR` and pass {option} DIR; "
        f"(3) or put the file in ${WEIGHTS_DIR_ENV}/{spec.name}/ and set {WEIGHTS_DIR_ENV}."
    )


def _not_found_error(spec: BackboneSpec, role: str | None = None) -> UserError:
    looked = [str(p) for p in _local_candidates(spec)]
    if not os.environ.get(WEIGHTS_DIR_ENV):
        looked.insert(0, f"${WEIGHTS_DIR_ENV}/{spec.name} ({WEIGHTS_DIR_ENV} is not set)")
    return UserError(
        f"No local weights for backbone {spec.name!r} (hub id {spec.hub_id}); looked in: "
        f"{'; '.join(looked)}. " + _how_to_get(spec, role)
    )


def _hub_download(spec: BackboneSpec, hub_name: str, role: str | None = None) -> Path:
    """Download (or reuse from the cache) the weights file of a hub repo."""
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id = hub_name.removeprefix("hf-hub:")
    offline = False
    for fname in spec.hub_filenames:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, fname))
        except GatedRepoError:
            raise UserError(
                f"Access to {repo_id} is gated and this account has not been granted it. "
                + _how_to_get(spec, role)
            ) from None
        except RepositoryNotFoundError:
            raise UserError(
                f"Hub repository {repo_id!r} not found, or private and you are not logged in. "
                + _how_to_get(spec, role)
            ) from None
        except LocalEntryNotFoundError:
            offline = True  # not cached and the hub cannot be reached; try the next name
        except (RemoteEntryNotFoundError, EntryNotFoundError):
            continue
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise UserError(f"Could not download {fname} from {repo_id}: {e}. "
                            + _how_to_get(spec, role)) from None
    if offline:
        raise UserError(
            f"Cannot reach the Hugging Face hub for {repo_id} (offline, or blocked) and its "
            f"weights are not in the local cache {_hf_cache_dir()}. " + _how_to_get(spec, role)
        )
    raise UserError(
        f"Hub repository {repo_id} has none of {', '.join(spec.hub_filenames)}. "
        f"Download the weights file yourself and pass its path with --{role or 'local'}-weights."
    )


def _resolve_weights(
    spec: BackboneSpec, weights: str | os.PathLike[str] | None, role: str | None = None
) -> tuple[Path | None, str]:
    """(file to load or None for built-in weights, human-readable source); `role` (local or
    context) names the option the hints point to."""
    if spec.weights_free:
        if weights is not None:
            raise UserError(f"Backbone {spec.name!r} computes hand-crafted features and takes no "
                            f"weights; drop the weights option ({os.fspath(weights)!r} given).")
        return None, f"none (hand-crafted features {handcrafted.FEATURES_VERSION})"
    if weights is None:
        if spec.is_test:
            return None, f"built-in (seed {spec.seed})"
        found = find_local_weights(spec.name)
        if found is None:
            raise _not_found_error(spec, role)
        return found, str(found)
    text = os.fspath(weights)
    is_hub_id = spec.repo_id is not None and text in (spec.hub_id, spec.repo_id)
    if text.startswith("hf-hub:") or (is_hub_id and not Path(text).exists()):
        path = _hub_download(spec, text, role)
        return path, f"{text} ({path})"
    path = Path(text).expanduser()
    if path.is_dir():
        found = _find_in_dir(path)
        if found is None:
            raise UserError(
                f"No weights file in {path}: expected {' or '.join(PREFERRED_WEIGHT_FILES)}, "
                f"or one file ending {', '.join(WEIGHT_SUFFIXES)}. "
                f"Point --{role or 'local'}-weights at the folder holding the {spec.name} weights."
            )
        return found, str(found)
    if not path.is_file():
        hub = f", or the hub id {spec.hub_id}" if spec.hub_id else ""
        raise UserError(
            f"Weights path {path} does not exist. Pass an existing weights file or folder{hub}."
        )
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise UserError(
            f"Weights file {path} has an unknown type: use {', '.join(WEIGHT_SUFFIXES)}."
        )
    return path, str(path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise UserError(
            f"{path} holds a {type(obj).__name__}, not a state dict. Save the weights with "
            "torch.save(model.state_dict(), PATH) or as safetensors."
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        keys = ", ".join(map(str, list(obj)[:10]))
        raise UserError(f"{path} holds no tensors (top-level keys: {keys}); expected a state dict.")
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or (with `weights_only=True`) .bin/.pth/.pt."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"Cannot read safetensors file {path}: {e}.") from None
    if suffix in (".bin", ".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"Cannot read {path} as a PyTorch state dict with weights_only=True ({first}). "
                "If it is a whole pickled model, re-save it with "
                "torch.save(model.state_dict(), PATH) or convert it to safetensors."
            ) from None
        return _unwrap(obj, path)
    raise UserError(f"Weights file {path} has an unknown type: use {', '.join(WEIGHT_SUFFIXES)}.")


def _arch_text(spec: BackboneSpec) -> str:
    kwargs = ", ".join(f"{k}={_jsonable(v)}" for k, v in spec.timm_kwargs.items())
    return f"timm {spec.timm_name}({kwargs}), {spec.n_params:,} parameters"


def _check_keys(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
    spec: BackboneSpec, source: str,
) -> None:
    """UserError naming missing/unexpected keys and wrong shapes; silent when all match."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(expected[k].shape))
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return

    def few(items: Sequence[Any], n: int = 10) -> str:
        more = f", ... ({len(items) - n} more)" if len(items) > n else ""
        return ", ".join(map(str, items[:n])) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: "
                     + few([f"{k} file {a} vs model {b}" for k, a, b in shapes]))
    origin = f" (hub id {spec.hub_id})" if spec.hub_id else ""
    raise UserError(
        f"Weights {source} do not match backbone {spec.name!r}: " + "; ".join(parts)
        + f". Expected the architecture {_arch_text(spec)}. Check that the file holds the "
        f"{spec.name} weights{origin}."
    )


def _materialise_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Allocate and compute the non-persistent buffers (e.g. RoPE periods) left on meta."""
    for mod in model.modules():
        meta = [n for n, b in mod.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        init = getattr(mod, "init_non_persistent_buffers", None)
        if init is None:
            raise RuntimeError(f"{type(mod).__name__} has buffers {meta} that are neither in the "
                               "checkpoint nor computable (no init_non_persistent_buffers)")
        for n in meta:
            setattr(mod, n, torch.empty_like(getattr(mod, n), device=device))
        init()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:10]}")


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_trunk(entry: _Entry, device: torch.device | str | None = None) -> nn.Module:
    """The trunk from its builder, checked against the registered parameter count."""
    spec = entry.spec
    if device is None:
        model = entry.builder(spec)
    else:
        with torch.device(device):
            model = entry.builder(spec)
    n = _count_params(model)
    if n != spec.n_params:
        raise UserError(
            f"timm {timm.__version__} builds {n:,} parameters for backbone {spec.name!r}, "
            f"expected {spec.n_params:,} ({_arch_text(spec)}). Install the timm version in "
            "pyproject.toml (pip install -e .)."
        )
    return model


def _load_weights(entry: _Entry, path: Path, source: str) -> nn.Module:
    """Build on meta, check the file's keys strictly, assign its tensors (one copy in memory)."""
    spec = entry.spec
    model = _build_trunk(entry, "meta")
    sd = load_state_dict_file(path)
    if entry.convert is not None:
        sd = entry.convert(sd, model)
    expected = model.state_dict()
    _check_keys(sd, expected, spec, source)
    sd = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    _materialise_buffers(model, "cpu")
    return model


def _jsonable(v: Any) -> Any:
    """A timm kwarg as JSON: layers and classes by their import name, partials spelled out."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    for attr in dir(timm.layers):
        if getattr(timm.layers, attr) is v:
            return f"timm.layers.{attr}"
    if isinstance(v, type):
        return f"{v.__module__}.{v.__qualname__}"
    if isinstance(v, functools.partial):
        args = [str(_jsonable(v.func))] + [f"{k}={_jsonable(x)}" for k, x in v.keywords.items()]
        return f"functools.partial({', '.join(args)})"
    return repr(v)


# ---------------------------------------------------------------------------------------------
# The model wrapper


class Backbone(nn.Module):
    """A frozen trunk plus its preprocessing: uint8 (B, H, W, 3) crops -> (B, dim) float32.

    Parameters never require grad, but `forward` does not force no-grad either, so Grad-CAM
    hooks on the trunk still work; the extraction pass wraps calls in `torch.inference_mode`.
    """

    def __init__(self, spec: BackboneSpec, trunk: nn.Module, *, pooling: str, input_px: int,
                 weights_sha256: str, weights_source: str) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.pooling = pooling
        self.input_px = input_px
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source
        self.n_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", spec.n_prefix_tokens))
        # mean/std in 0..255 units, so uint8 input needs one subtract and one divide
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0,
                             persistent=False)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: torch.Tensor, *, resize: bool = True,
                   size: int | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> normalised float32 (B, 3, px, px) on ours.

        `px` is `size` when given (e.g. a context tile), else the backbone's input size.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got "
                             f"{images.dtype} {tuple(images.shape)}")
        dev = self.device
        with torch.autocast(device_type=dev.type, enabled=False):
            x = images.to(dev, non_blocking=True).permute(0, 3, 1, 2)
            size = (size or self.input_px,) * 2
            if resize and tuple(x.shape[-2:]) != size:
                # torch's CPU kernel has a fast uint8 path (~6x faster than float here);
                # CUDA resizes in float
                x = x if dev.type == "cpu" else x.float()
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                  antialias=True)
            x = (x.float() - self.pixel_mean) / self.pixel_std
            # NHWC feeds the patch-embedding convolution's tensor-core kernels on CUDA
            return x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x

    def forward_tokens(self, images: torch.Tensor, *, resize: bool = True,
                       size: int | None = None) -> torch.Tensor:
        """All tokens after the final norm, (B, prefix + patches, dim), in the trunk's dtype.

        With `resize=False` the crops keep their size (a multiple of the patch size), e.g.
        for the tiled context mode, which pools patch tokens itself.
        """
        x = self.preprocess(images, resize=resize, size=size)
        if not resize and (x.shape[-1] % self.spec.patch_px or x.shape[-2] % self.spec.patch_px):
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the "
                             f"patch size {self.spec.patch_px}")
        return self.trunk.forward_features(x)

    def patch_grid(self, images: torch.Tensor, *, resize: bool = True,
                   size: int | None = None) -> torch.Tensor:
        """Patch tokens as a float32 grid (B, H/patch, W/patch, dim), resized to `size` px
        (default: the input size) unless `resize=False`."""
        if self.spec.weights_free:
            raise UserError(f"Backbone {self.spec.name!r} has no patch tokens (one hand-crafted "
                            "vector per crop): it cannot feed the tiled context mode.")
        h, w = ((size or self.input_px),) * 2 if resize else images.shape[1:3]
        tokens = self.forward_tokens(images, resize=resize, size=size)[:, self.n_prefix_tokens:]
        p = self.spec.patch_px
        return tokens.float().reshape(tokens.shape[0], h // p, w // p, tokens.shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(images)
        if self.pooling == "cls":
            return tokens[:, 0].float()
        return tokens[:, self.n_prefix_tokens:].float().mean(dim=1)

    def provenance(self) -> dict[str, Any]:
        """What a stored vector must carry to never be mixed with vectors of other weights."""
        s = self.spec
        return {
            "backbone": s.name,
            "dim": s.dim,
            "input_px": self.input_px,
            "patch_px": s.patch_px,
            "pooling": self.pooling,
            "resize": "bilinear, antialias",
            "mean": list(s.mean),
            "std": list(s.std),
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            "n_params": _count_params(self.trunk),
            "is_test": s.is_test,
            "hub_id": s.hub_id,
            "timm_model": s.timm_name,
            "timm_kwargs": {k: _jsonable(v) for k, v in s.timm_kwargs.items()},
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            **({"features_version": self.trunk.version} if s.weights_free else {}),
        }


def _check_options(spec: BackboneSpec, pooling: str | None,
                   input_px: int | None) -> tuple[str, int]:
    pooling = spec.pooling if pooling is None else pooling
    if pooling not in spec.poolings and not spec.weights_free:
        raise UserError(f"Pooling {pooling!r} is not available for backbone {spec.name!r}: "
                        f"choose one of {', '.join(spec.poolings)}.")
    px = spec.input_px if input_px is None else input_px
    if spec.weights_free and (refusal := _weights_free_refusal(spec, pooling, px)) is not None:
        raise refusal
    if isinstance(px, bool) or not isinstance(px, int) or px < spec.patch_px or px % spec.patch_px:
        raise UserError(f"Input size {input_px!r} px is not valid for backbone {spec.name!r}: "
                        f"use a positive multiple of its patch size {spec.patch_px} px "
                        f"(default {spec.input_px}).")
    return pooling, px


def build_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    pooling: str | None = None,
    input_px: int | None = None,
    device: torch.device | str = "cpu",
    role: str | None = None,
) -> Backbone:
    """A frozen `Backbone` in eval mode on `device`.

    `weights`: None (test entries: the seeded init; real entries: $NUCLASS_WEIGHTS_DIR/<name>/,
    then the Hugging Face cache, never the network), a file, a folder, or a hub name
    (`hf-hub:ORG/NAME`, or the spec's hub id), downloaded when online and authorised.
    `role`: local or context, so that hints name `--local-weights` or `--context-weights`.
    """
    entry = _entry(name)
    spec = entry.spec
    pooling, px = _check_options(spec, pooling, input_px)
    path, source = _resolve_weights(spec, weights, role)
    if path is None:
        trunk = _build_trunk(entry)
        # a weights-free trunk's "weights" are its feature version and reference constants
        sha = (handcrafted.fingerprint() if spec.weights_free
               else state_dict_sha256(trunk.state_dict()))
    else:
        trunk = _load_weights(entry, path, source)
        sha = sha256_file(path)
    trunk.eval().requires_grad_(False)
    model = Backbone(spec, trunk, pooling=pooling, input_px=px, weights_sha256=sha,
                     weights_source=source)
    return _to_device(model, device)


def _to_device(model: Backbone, device: torch.device | str) -> Backbone:
    """`model` in eval mode on `device`; on CUDA its conv weights NHWC, as `preprocess` makes
    the input."""
    model = model.to(device).eval()
    if model.device.type == "cuda":
        model.trunk.to(memory_format=torch.channels_last)  # conv weights to NHWC, as the input
    return model


def build_random_backbone(
    name: str,
    *,
    pooling: str | None = None,
    input_px: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    source: str = "random (timing only)",
) -> Backbone:
    """The exact architecture of `name` with seeded random weights, for timing and FLOPs only.

    Never for embeddings that are stored: its `weights_sha256` is "random" and its weights
    source says so. Real entries build on `device` directly (no CPU copy of a 1B-parameter
    trunk) from `seed`; test entries keep their own seeded init. The registry's parameter
    count is checked as in `build_backbone`.
    """
    entry = _entry(name)
    pooling, px = _check_options(entry.spec, pooling, input_px)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = _build_trunk(entry, device).eval().requires_grad_(False)
    model = Backbone(entry.spec, trunk, pooling=pooling, input_px=px, weights_sha256="random",
                     weights_source=source)
    return _to_device(model, device)  # the memory layout build_backbone gives, so timings match


def how_to_get_weights(name: str, role: str | None = None) -> str:
    """What a user does to obtain the (gated) weights of `name` (as the `role` backbone)."""
    return _how_to_get(get_spec(name), role)


def count_flops(name: str, input_px: int | None = None, batch: int = 1) -> int:
    """Forward FLOPs per image of the trunk (a multiply-add counts 2), counted on meta.

    0 for a weights-free backbone: its numpy features are not torch operations to count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    entry = _entry(name)
    _, px = _check_options(entry.spec, None, input_px)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if entry.spec.weights_free:
        return 0
    trunk = _build_trunk(entry, "meta").eval()
    x = torch.empty(batch, 3, px, px, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        trunk.forward_features(x)
    return counter.get_total_flops() // batch
