"""hc-nucleus: hand-crafted nucleus features as a weights-free backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from embedstore.errors import UserError
from embedstore.extract import backbones as bb
from embedstore.extract import handcrafted as hc

NAME = "hc-nucleus"
PX = 224
MPP = hc.FIELD_UM / PX  # 0.25 µm/px
BACKGROUND = (0.92, 0.80, 0.88)  # pale pink
NUCLEUS = (0.35, 0.20, 0.55)  # dark purple


def ellipse(radius_px: float, aspect: float = 1.0, angle: float = 0.3) -> np.ndarray:
    """(PX, PX, 3) RGB in 0..1: a dark purple ellipse (semi-axes aspect*r, r) at the centre."""
    y, x = np.mgrid[0:PX, 0:PX].astype(np.float64) - (PX - 1) / 2
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    inside = (u / (radius_px * aspect)) ** 2 + (v / radius_px) ** 2 <= 1
    img = np.broadcast_to(np.array(BACKGROUND), (PX, PX, 3)).copy()
    img[inside] = NUCLEUS
    return img.astype(np.float32)


def raw(img: np.ndarray) -> dict[str, float]:
    return dict(zip(hc.FEATURE_NAMES, hc.raw_features(img[None], MPP)[0], strict=True))


@pytest.fixture(scope="module")
def model() -> bb.Backbone:
    return bb.build_backbone(NAME)


# --- the features ------------------------------------------------------------------------------


def test_feature_list_is_consistent() -> None:
    assert len(hc.FEATURE_NAMES) == hc.N_FEATURES == len(set(hc.FEATURE_NAMES))
    assert sum(len(g) for g in hc.GROUPS.values()) == hc.N_FEATURES
    assert hc.REF_CENTRE.shape == hc.REF_SCALE.shape == (hc.N_FEATURES,)
    assert (hc.REF_SCALE > 0).all() and np.isfinite(hc.REF_CENTRE).all()
    assert hc.FEATURES_VERSION


def test_shape_and_finite_on_random_blank_and_dark() -> None:
    rng = np.random.default_rng(0)
    crops = np.concatenate([rng.random((2, PX, PX, 3)), np.ones((1, PX, PX, 3)),
                            np.zeros((1, PX, PX, 3)), ellipse(16)[None]]).astype(np.float32)
    vecs = hc.features(crops, MPP)
    assert vecs.shape == (5, hc.N_FEATURES) and vecs.dtype == np.float32
    assert np.isfinite(vecs).all() and (np.abs(vecs) <= hc.CLIP).all()
    found = vecs[:, hc.FEATURE_NAMES.index("found")]
    assert (found[2:4] < 0).all() and found[4] == 0  # blank and dark: no nucleus; disc: found


def test_disc_area_in_um2_and_circularity() -> None:
    for r in (14, 24):
        f = raw(ellipse(r))
        true_area = np.pi * r**2 * MPP**2
        assert f["area_um2"] == pytest.approx(true_area, rel=0.1)
        assert f["circularity"] == pytest.approx(1.0, abs=0.1)
        assert f["major_axis_um"] == pytest.approx(2 * r * MPP, rel=0.1)
        assert f["centre_offset_um"] < 0.5 and f["n_other"] == 0
    assert raw(ellipse(24))["area_um2"] > raw(ellipse(14))["area_um2"] * 2


def test_elongated_ellipse_is_more_eccentric_and_stays_one_nucleus() -> None:
    disc, long = raw(ellipse(16)), raw(ellipse(14, aspect=2.5))
    assert long["eccentricity"] > 0.85 > 0.2 > disc["eccentricity"]
    assert long["circularity"] < disc["circularity"]
    assert long["n_other"] == 0  # not split by the watershed


def test_touching_nuclei_are_split_and_counted() -> None:
    img = ellipse(16)
    shifted = ellipse(16)[:, list(range(PX - 28, PX)) + list(range(PX - 28))]  # 28 px right
    both = np.minimum(img, shifted)
    f = raw(both)
    assert f["n_other"] == 1
    assert f["area_um2"] == pytest.approx(np.pi * 16**2 * MPP**2, rel=0.15)
    assert f["nearest_other_um"] == pytest.approx(28 * MPP, rel=0.15)


def test_deterministic() -> None:
    rng = np.random.default_rng(1)
    img = np.clip(ellipse(18) + rng.normal(0, 0.03, (PX, PX, 3)), 0, 1).astype(np.float32)
    a = hc.features(img[None], MPP)
    b = hc.features(np.stack([img, img]), MPP)
    assert np.array_equal(a[0], b[0]) and np.array_equal(b[0], b[1])


# --- the registry entry -----------------------------------------------------------------------


def test_registry_entry_needs_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUCLASS_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert NAME in bb.list_backbones() and NAME not in bb.list_backbones("test-*")
    spec = bb.get_spec(NAME)
    assert spec.weights_free and not spec.is_test and spec.n_params == 0
    assert spec.dim == hc.N_FEATURES and spec.poolings == ("cls",)
    assert "NOT a foundation model" in spec.description
    assert bb.weights_status(NAME).startswith("none needed")
    model = bb.build_backbone(NAME)
    prov = model.provenance()
    assert prov["features_version"] == hc.FEATURES_VERSION
    assert prov["weights_sha256"] == hc.fingerprint() and len(hc.fingerprint()) == 64
    assert prov["n_params"] == 0 and prov["timm_model"] == "" and prov["dim"] == hc.N_FEATURES
    assert bb.count_flops(NAME) == 0


def test_backbone_turns_uint8_crops_into_vectors(model: bb.Backbone) -> None:
    crop = (ellipse(16) * 255).round().astype(np.uint8)
    half = crop[::2, ::2]  # a crop at the slide level's own pixels: the backbone resizes it
    out = model(torch.from_numpy(crop[None]))
    assert out.shape == (1, hc.N_FEATURES) and out.dtype == torch.float32
    direct = hc.features(crop[None].astype(np.float32) / 255, MPP)[0]
    assert np.allclose(out[0].numpy(), direct, atol=1e-4)
    resized = model(torch.from_numpy(np.ascontiguousarray(half[None])))[0]
    area = hc.FEATURE_NAMES.index("area_um2")
    assert abs(resized[area] - out[0, area]) < 0.1  # same nucleus, same µm², half the pixels


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"pooling": "mean"}, "no patch\\s+tokens.*--context tiled"),
    ({"input_px": 512}, "local backbone.*not as the context backbone"),
    ({"weights": "model.safetensors"}, "takes no\\s+weights"),
])
def test_refusals(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        bb.build_backbone(NAME, **kwargs)


def test_refused_as_tiled_or_512px_context() -> None:
    from embedstore.extract.pipeline import ExtractConfig, build_steps

    for cfg in (ExtractConfig(local_backbone="test-vit-local", context_backbone=NAME,
                              context="tiled"),
                ExtractConfig(local_backbone="test-vit-local", context_backbone=NAME),
                # at 224 px it would fit, but would measure a 256 µm field as if it were 56 µm
                ExtractConfig(local_backbone="test-vit-local", context_backbone=NAME, context_input_px=224)):
        with pytest.raises(UserError, match=f"{NAME}.*--local-backbone"):
            build_steps(cfg, torch.device("cpu"))


def test_patch_grid_refused(model: bb.Backbone) -> None:
    with pytest.raises(UserError, match="no patch tokens"):
        model.patch_grid(torch.zeros((1, PX, PX, 3), dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda(model: bb.Backbone) -> None:
    crop = torch.from_numpy((ellipse(16) * 255).round().astype(np.uint8))[None]
    gpu = bb.build_backbone(NAME, device="cuda")
    out = gpu(crop.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), model(crop), atol=1e-3)


# --- end to end -------------------------------------------------------------------------------


def test_extract_stores_hand_crafted_vectors(synth_small, tmp_path: Path) -> None:
    from embedstore.extract.pipeline import ExtractConfig, extract
    from embedstore.store import Store

    from .conftest import FAST

    cells = pl.read_parquet(synth_small.cells_path)
    cells = cells.group_by("slide_id", maintain_order=True).head(12)  # 36 cells: keeps it fast
    cfg = ExtractConfig(**{**FAST, "local_backbone": NAME})
    db = tmp_path / "db"
    summary = extract(synth_small.out_dir / "slides", cells, db, cfg)
    assert summary is not None
    loaded = Store(db).load(vectors=("local", "context"))
    local = loaded.vectors["local"]
    assert local.shape == (cells.height, hc.N_FEATURES) and np.isfinite(local).all()
    assert loaded.vectors["context"].shape[1] == bb.get_spec("test-vit-context").dim
    found = local[:, hc.FEATURE_NAMES.index("found")]
    assert (found == 0).mean() > 0.8  # the synthetic nuclei are found (0 = the reference's 1)
    stored = loaded.config["vectors"]["local"]
    assert stored["backbone"] == NAME and stored["features_version"] == hc.FEATURES_VERSION
