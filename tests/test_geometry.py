import numpy as np
import pytest

from embedstore.geometry import (
    CONTEXT_CROP,
    LOCAL_CROP,
    CropSpec,
    ReadPlan,
    choose_level,
    px_to_um,
    um_to_px,
)


@pytest.mark.parametrize("mpp", [0.25, 0.2125, 0.5031, 1.0])
def test_px_um_round_trip(mpp):
    rng = np.random.default_rng(0)
    px = rng.uniform(0, 1e5, 1000)
    np.testing.assert_allclose(um_to_px(px_to_um(px, mpp), mpp), px, rtol=0, atol=1e-9)
    assert px_to_um(400.0, 0.25) == 100.0


def test_crop_specs():
    assert LOCAL_CROP.target_mpp == pytest.approx(0.25)
    assert CONTEXT_CROP.target_mpp == pytest.approx(0.25)
    assert CONTEXT_CROP.resized(512).target_mpp == pytest.approx(0.5)
    with pytest.raises(ValueError):
        CropSpec(0, 224)


def test_choose_level_takes_coarsest_level_not_coarser_than_target():
    ds = (1.0, 2.0, 4.0, 8.0)
    assert choose_level(ds, 0.25, 0.25) == 0
    assert choose_level(ds, 0.25, 0.5) == 1
    assert choose_level(ds, 0.25, 0.9) == 1  # level 2 (1.0) would be coarser than 0.9
    assert choose_level(ds, 0.25, 1.0) == 2
    assert choose_level(ds, 0.25, 100.0) == 3
    # a slide coarser than the target: fall back to level 0 (the finest there is)
    assert choose_level(ds, 0.5, 0.25) == 0
    # near-exact downsamples (e.g. 4.0003) still count as matching within the tolerance
    assert choose_level((1.0, 4.0003), 0.25, 1.0) == 1


def test_read_plan_exact_and_resampled():
    plan = ReadPlan.for_slide((1.0, 2.0, 4.0), 0.25, LOCAL_CROP)
    assert plan.level == 0 and plan.exact and plan.size_level_px == 224
    x0, y0 = plan.field_origin_level(np.array([1000.5]), np.array([2000.5]))
    assert (x0[0], y0[0]) == (889.0, 1889.0)  # centre pixel 1000 sits at crop index 111/112
    ctx = ReadPlan.for_slide((1.0, 2.0, 4.0), 0.25, CONTEXT_CROP.resized(512))
    assert ctx.level == 1 and ctx.exact
    odd = ReadPlan.for_slide((1.0, 2.0, 4.0), 0.2631, LOCAL_CROP)
    assert odd.level == 0 and not odd.exact
    assert odd.scale == pytest.approx(0.25 / 0.2631)
    bx0, by0, bx1, by1 = odd.read_box_level(np.array([500.0]), np.array([500.0]))
    assert bx1[0] - bx0[0] >= odd.size_level_px + 4


def test_outside_fraction():
    plan = ReadPlan.for_slide((1.0,), 0.25, LOCAL_CROP)  # 224 px field
    frac = plan.outside_fraction(np.array([1000.0, 0.0, 0.0]), np.array([1000.0, 1000.0, 0.0]), 5000, 5000)
    np.testing.assert_allclose(frac, [0.0, 0.5, 0.75])
