"""Property-based tests (hypothesis) for the geometry: crop specs, level choice, read plans,
crops cut from slides, and the Xenium <-> H&E alignment.

Conventions under test (embedstore/geometry.py, README "Geometry, in one paragraph"): pixel i of
a level covers [i, i+1); centroids are centres; a crop is read from the coarsest level that is
not coarser than the target µm/px (within MPP_TOLERANCE) and never upsampled beyond it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from embedstore.errors import AlignmentError
from embedstore.geometry import (
    MPP_TOLERANCE,
    CropSpec,
    ReadPlan,
    choose_level,
    px_to_um,
    um_to_px,
)
from embedstore.io.slides import PAD_VALUE, Region, Slide
from embedstore.io.xenium import check_alignment, he_px_to_xenium, xenium_to_he_px
from embedstore.synth import write_pyramid

# no example database: nothing is written into the repository
FAST = settings(max_examples=60, deadline=None, database=None)
SLOW = settings(max_examples=30, deadline=None, database=None)

# -- strategies -------------------------------------------------------------------------------
mpps = st.floats(0.05, 2.0)
targets = st.floats(0.02, 20.0)
downsample_values = st.floats(1.0, 64.0)
#: pyramids as slides report them: level 0 first (downsample 1), then coarser levels
pyramids = st.lists(downsample_values, min_size=0, max_size=5).map(lambda ds: (1.0, *sorted(ds)))
#: any downsample tuple, in any order (choose_level must not depend on the order)
any_downsamples = st.lists(downsample_values, min_size=1, max_size=6).map(tuple)
pow2_pyramids = st.lists(st.integers(1, 6), min_size=0, max_size=4, unique=True).map(
    lambda ks: (1.0, *(float(2**k) for k in sorted(ks)))
)
crops = st.builds(CropSpec, st.floats(1.0, 600.0), st.integers(1, 1100))
coords = st.floats(-1e5, 1e5)


def qualifies(ds: float, mpp: float, target: float) -> bool:
    """A level is fine enough when its µm/px is not coarser than the target (with tolerance)."""
    return mpp * ds <= target * (1 + MPP_TOLERANCE)


# -- CropSpec, px <-> µm ----------------------------------------------------------------------
@FAST
@given(size_um=st.floats(1e-3, 1e4), out_px=st.integers(1, 4096), other=st.integers(1, 4096))
def test_crop_spec_target_mpp_and_resize(size_um, out_px, other):
    spec = CropSpec(size_um, out_px)
    assert spec.target_mpp * out_px == pytest.approx(size_um, rel=1e-12)
    small = spec.resized(other)
    assert small.size_um == size_um and small.out_px == other  # same field, other pixels
    assert small.target_mpp == pytest.approx(spec.target_mpp * out_px / other, rel=1e-12)


@FAST
@given(size_um=st.floats(-1e4, 0.0) | st.just(float("nan")), out_px=st.integers(-10, 10))
@example(size_um=0.0, out_px=0)
@example(size_um=-0.0, out_px=1)
def test_crop_spec_rejects_non_positive_sizes(size_um, out_px):
    with pytest.raises(ValueError, match="positive"):
        CropSpec(size_um, out_px)
    with pytest.raises(ValueError, match="positive"):
        CropSpec(56.0, min(out_px, 0))


@FAST
@given(
    px=st.lists(st.floats(-1e7, 1e7), min_size=1, max_size=20).map(np.array),
    mpp=st.floats(1e-3, 100.0),
)
def test_px_um_round_trips(px, mpp):
    um = px_to_um(px, mpp)
    np.testing.assert_allclose(um_to_px(um, mpp), px, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(px_to_um(um_to_px(px, mpp), mpp), px, rtol=1e-12, atol=1e-9)
    # µm grow with px at a rate of mpp; scalars behave like arrays
    np.testing.assert_allclose(um, px * mpp, rtol=1e-12, atol=0)
    assert px_to_um(float(px[0]), mpp) == pytest.approx(float(um[0]), rel=1e-12, abs=1e-12)


# -- choose_level -----------------------------------------------------------------------------
@FAST
@given(ds=any_downsamples, mpp=mpps, target=targets)
def test_choose_level_is_the_coarsest_fine_enough_level(ds, mpp, target):
    level = choose_level(ds, mpp, target)
    assert 0 <= level < len(ds)
    fine = [d for d in ds if qualifies(d, mpp, target)]
    if fine:
        # it qualifies, and no coarser level qualifies too
        assert qualifies(ds[level], mpp, target)
        assert ds[level] == max(fine)
        # so it never upsamples beyond the tolerance
        assert mpp * ds[level] <= target * (1 + MPP_TOLERANCE)
    else:
        # nothing is fine enough: the finest level there is
        assert ds[level] == min(ds)


@FAST
@given(ds=pyramids, mpp=mpps, k=st.integers(0, 5), slack=st.floats(0.0, 0.99))
def test_choose_level_honours_the_tolerance(ds, mpp, k, slack):
    """A level whose µm/px is coarser than the target by less than MPP_TOLERANCE still counts."""
    d = ds[k % len(ds)]
    target = mpp * d / (1 + slack * MPP_TOLERANCE)
    assert ds[choose_level(ds, mpp, target)] >= d
    # and one coarser by clearly more than the tolerance does not
    too_fine_target = mpp * d / (1 + 2 * MPP_TOLERANCE)
    assert ds[choose_level(ds, mpp, too_fine_target)] < d or d == min(ds)


@FAST
@given(ds=any_downsamples, mpp=mpps, t1=targets, t2=targets, seed=st.integers(0, 2**32 - 1))
def test_choose_level_is_monotone_and_order_free(ds, mpp, t1, t2, seed):
    lo, hi = sorted((t1, t2))
    # a coarser target never picks a finer level
    assert ds[choose_level(ds, mpp, lo)] <= ds[choose_level(ds, mpp, hi)]
    # listing the levels in another order picks a level with the same downsample
    picked = ds[choose_level(ds, mpp, lo)]
    shuffled = tuple(np.random.default_rng(seed).permutation(ds).tolist())
    for other in (shuffled, ds[::-1], tuple(sorted(ds))):
        assert other[choose_level(other, mpp, lo)] == picked


# -- ReadPlan ---------------------------------------------------------------------------------
@FAST
@given(ds=pyramids, mpp=mpps, crop=crops, resample=st.booleans())
def test_read_plan_fields_are_consistent(ds, mpp, crop, resample):
    plan = ReadPlan.for_slide(ds, mpp, crop, resample=resample)
    assert plan.level == choose_level(ds, mpp, crop.target_mpp)
    assert plan.downsample == ds[plan.level]
    assert plan.level_mpp == pytest.approx(mpp * plan.downsample, rel=1e-12)
    assert plan.slide_mpp == mpp and plan.target_mpp == crop.target_mpp
    assert plan.size_um == crop.size_um
    assert plan.exact == (plan.scale == 1.0)
    if resample:
        # the field is crop.size_um wide whatever level it is read from
        assert plan.out_px == crop.out_px
        assert plan.size_level_px * plan.level_mpp == pytest.approx(crop.size_um, rel=1e-9)
        assert plan.scale == pytest.approx(crop.target_mpp / plan.level_mpp, rel=1e-5)
        assert plan.exact == (abs(crop.target_mpp / plan.level_mpp - 1) < 1e-6)
        if any(qualifies(d, mpp, crop.target_mpp) for d in ds):
            # never upsample (more than the tolerance allows)
            assert plan.scale >= 1 / (1 + MPP_TOLERANCE) - 1e-12
    else:
        # delivered at the level's own pixels: whole pixels covering the field to half a pixel
        assert plan.exact and plan.scale == 1.0 and plan.out_px >= 1
        assert plan.out_px == max(1, round(crop.size_um / plan.level_mpp))
        if plan.out_px > 1:
            assert abs(plan.size_level_px * plan.level_mpp - crop.size_um) <= plan.level_mpp / 2
    assert ReadPlan(**plan.to_dict()) == plan


@FAST
@given(ds=pow2_pyramids, mpp=mpps, k=st.integers(0, 4), out_px=st.integers(1, 1024))
def test_read_plan_is_exact_at_a_level_resolution(ds, mpp, k, out_px):
    """A target µm/px that some level has is read from that level without resampling."""
    d = ds[k % len(ds)]
    crop = CropSpec(out_px * mpp * d, out_px)
    plan = ReadPlan.for_slide(ds, mpp, crop)
    assert plan.downsample == d and plan.exact and plan.size_level_px == out_px


@FAST
@given(ds=pow2_pyramids, mpp=mpps, crop=crops, resample=st.booleans())
def test_read_plan_does_not_depend_on_finer_levels(ds, mpp, crop, resample):
    """Dropping the levels finer than the chosen one (re-basing the pyramid there) gives the
    same plan, one level index lower per dropped level."""
    plan = ReadPlan.for_slide(ds, mpp, crop, resample=resample)
    d = plan.downsample
    rebased = tuple(x / d for x in ds[plan.level :])
    sub = ReadPlan.for_slide(rebased, mpp * d, crop, resample=resample)
    assert sub.level == 0
    assert sub.level_mpp == pytest.approx(plan.level_mpp, rel=1e-12)
    assert (sub.out_px, sub.exact) == (plan.out_px, plan.exact)
    assert sub.scale == pytest.approx(plan.scale, rel=1e-12)


@FAST
@given(
    ds=pyramids, mpp=mpps, crop=crops, resample=st.booleans(),
    x=st.lists(coords, min_size=1, max_size=8), dy=coords,
)  # fmt: skip
def test_field_is_centred_on_the_centroid(ds, mpp, crop, resample, x, dy):
    plan = ReadPlan.for_slide(ds, mpp, crop, resample=resample)
    x_px = np.array(x)
    y_px = (x_px + dy)[::-1].copy()
    x0, y0 = plan.field_origin_level(x_px, y_px)
    s = plan.size_level_px
    for origin, c in ((x0, x_px), (y0, y_px)):
        centre = origin + s / 2  # level px
        err = np.abs(centre - c / plan.downsample)
        if plan.exact:
            # whole-pixel corners; the centroid within half a level pixel of the crop's centre
            assert np.all(origin == np.round(origin))
            assert np.all(err <= 0.5 + 1e-9 * (1 + np.abs(c)))
        else:
            np.testing.assert_allclose(centre, c / plan.downsample, rtol=1e-12, atol=1e-7)
        # in level-0 px: within half a level pixel, i.e. ds/2 level-0 px
        assert np.all(np.abs(centre * plan.downsample - c) <= plan.downsample * (0.5 + 1e-7))


@FAST
@given(
    ds=pyramids, mpp=mpps, crop=crops, resample=st.booleans(),
    x=st.lists(coords, min_size=1, max_size=8), dy=coords,
)  # fmt: skip
def test_read_box_holds_the_field(ds, mpp, crop, resample, x, dy):
    plan = ReadPlan.for_slide(ds, mpp, crop, resample=resample)
    x_px = np.array(x)
    y_px = (x_px - dy)[::-1].copy()
    boxes = plan.read_box_level(x_px, y_px)
    assert all(b.dtype.kind == "i" for b in boxes)
    bx0, by0, bx1, by1 = boxes
    s = plan.size_level_px
    x0, y0 = plan.field_origin_level(x_px, y_px)
    for lo, hi, origin, c in ((bx0, bx1, x0, x_px), (by0, by1, y0, y_px)):
        # the centroid is in the box (to rounding: a centroid 1e-16 px left of a pixel edge
        # may land in the pixel to its right)
        tol = 1e-9 * (1 + np.abs(c))
        assert np.all((lo <= c / plan.downsample + tol) & (c / plan.downsample - tol <= hi))
        if plan.exact:
            # exactly the field's pixels, centred on the centroid to half a pixel
            np.testing.assert_array_equal(hi - lo, np.full(len(c), plan.out_px))
            assert np.all(np.abs((lo + hi) / 2 - c / plan.downsample) <= 0.5 + 1e-9 * (1 + abs(c)))
        else:
            # the continuous field [c - s/2, c + s/2) plus the resampling filter's support
            support = max(plan.scale, 1.0)
            field_lo = c / plan.downsample - s / 2
            assert np.all(lo <= np.floor(field_lo - support))
            assert np.all(hi >= np.ceil(field_lo + s + support))
            np.testing.assert_allclose(origin, field_lo, rtol=1e-12, atol=1e-7)


# -- outside_fraction -------------------------------------------------------------------------
plans = st.builds(
    lambda ds, mpp, crop, resample: ReadPlan.for_slide(ds, mpp, crop, resample=resample),
    pyramids,
    mpps,
    crops,
    st.booleans(),
)
slide_sides = st.integers(1, 20000)


def half_field_px(plan: ReadPlan) -> float:
    return plan.size_um / plan.slide_mpp / 2


@FAST
@given(plan=plans, w=slide_sides, h=slide_sides, x=coords, y=coords)
def test_outside_fraction_is_a_share(plan, w, h, x, y):
    frac = plan.outside_fraction(np.array([x]), np.array([y]), w, h)
    assert frac.shape == (1,)
    assert 0.0 <= frac[0] <= 1.0


def test_outside_fraction_is_exactly_zero_inside():
    """Found by the properties below: 1 - ix*iy/(2*half)**2 gave -2.7e-15 .. 6e-15 inside."""
    plan = ReadPlan.for_slide((1.0,), 1.0625, CropSpec(1.0, 1))
    assert plan.outside_fraction(np.array([1.0]), np.array([1.0]), 2, 2)[0] == 0.0  # -2.2e-16
    plan = ReadPlan.for_slide((1.0, 4.0), 0.2631, CropSpec(56.0, 224))  # a 0.2631 µm/px slide
    rng = np.random.default_rng(0)
    x, y = rng.uniform(200, 4800, 1000), rng.uniform(200, 4800, 1000)
    frac = plan.outside_fraction(x, y, 5000, 5000)
    assert frac.min() >= 0.0 and frac.max() == 0.0


@FAST
@given(plan=plans, w=slide_sides, h=slide_sides, u=st.floats(0, 1), v=st.floats(0, 1))
def test_outside_fraction_is_zero_inside_and_one_far_outside(plan, w, h, u, v):
    half = half_field_px(plan)
    assume(2 * half <= min(w, h))
    x, y = half + u * (w - 2 * half), half + v * (h - 2 * half)  # field inside the slide
    assert plan.outside_fraction(np.array([x]), np.array([y]), w, h)[0] == pytest.approx(
        0.0, abs=1e-9
    )
    far = [
        (-half - 1 - u * 1e4, y),
        (w + half + 1 + u, y),
        (x, -half - 1 - v),
        (x, h + half + 1 + v),
    ]
    fx, fy = map(np.array, zip(*far, strict=True))
    np.testing.assert_array_equal(plan.outside_fraction(fx, fy, w, h), np.ones(4))


@FAST
@given(
    plan=plans, w=slide_sides, h=slide_sides, y=coords,
    steps=st.lists(st.floats(0, 1e4), min_size=2, max_size=10),
)  # fmt: skip
def test_outside_fraction_grows_as_the_centroid_moves_out(plan, w, h, y, steps):
    """Moving away from the slide's centre line never decreases the share outside, on either
    side and along either axis; mirror images have the same share."""
    d = np.cumsum(steps)  # increasing distances from the centre line
    ys = np.full(len(d), y)
    for xs in (w / 2 - d, w / 2 + d):
        frac = plan.outside_fraction(xs, ys, w, h)
        assert np.all(np.diff(frac) >= -1e-9), frac
    left = plan.outside_fraction(w / 2 - d, ys, w, h)
    right = plan.outside_fraction(w / 2 + d, ys, w, h)
    np.testing.assert_allclose(left, right, atol=1e-9)
    # the same along y, at a fixed x
    xs = np.full(len(d), y)
    for ys_out in (h / 2 - d, h / 2 + d):
        assert np.all(np.diff(plan.outside_fraction(xs, ys_out, w, h)) >= -1e-9)


@FAST
@given(plan=plans, w=st.integers(1, 3000), h=st.integers(1, 3000), u=st.floats(-0.5, 1.5),
       v=st.floats(-0.5, 1.5))  # fmt: skip
def test_outside_fraction_matches_a_sampled_area(plan, w, h, u, v):
    """The share equals the share of a fine grid of points in the field that miss the slide."""
    half = half_field_px(plan)
    x, y = u * w, v * h
    n = 200
    t = (np.arange(n) + 0.5) / n * 2 * half - half
    inside_x = ((x + t >= 0) & (x + t < w)).mean()
    inside_y = ((y + t >= 0) & (y + t < h)).mean()
    frac = plan.outside_fraction(np.array([x]), np.array([y]), w, h)[0]
    # each axis' sampled share is within 1/n of the exact interval share
    assert frac == pytest.approx(1 - inside_x * inside_y, abs=2.5 / n)


# -- crops cut from slides --------------------------------------------------------------------
def encode(h: int, w: int, block: int = 1) -> np.ndarray:
    """An RGB image whose pixel (x, y) holds (x // block, y // block): R, G the low bytes, B the
    high nibbles. B stays below 255, so no slide pixel looks like the white pad."""
    yy, xx = np.mgrid[0:h, 0:w] // block
    assert xx.max() < 15 * 256 and yy.max() < 15 * 256
    img = np.stack([xx & 255, yy & 255, (xx >> 8) | ((yy >> 8) << 4)], axis=2)
    return img.astype(np.uint8)


def decode(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, pad) per pixel of an `encode`d crop."""
    c = crop.astype(np.int64)
    pad = (c == PAD_VALUE).all(axis=2)
    x = c[..., 0] | ((c[..., 2] & 15) << 8)
    y = c[..., 1] | ((c[..., 2] >> 4) << 8)
    return x, y, pad


def check_exact_crop(crop, x_lvl, y_lvl, width, height):
    """`crop` is a window of whole pixels of a level (width x height, `encode`d) whose centre is
    within half a pixel of the level point (x_lvl, y_lvl); pixels outside the level are the pad
    value. Returns the padded share."""
    n = crop.shape[0]
    assert crop.shape == (n, n, 3) and crop.dtype == np.uint8
    eps = 1e-9 * (1 + abs(x_lvl) + abs(y_lvl))
    dx, dy, pad = decode(crop)
    jj, ii = np.meshgrid(np.arange(n), np.arange(n))
    if pad.all():
        # no slide pixel: the field centred on the point (to half a pixel) misses the level
        assert (
            x_lvl + n / 2 <= 0.5 + eps
            or x_lvl - n / 2 >= width - 0.5 - eps
            or y_lvl + n / 2 <= 0.5 + eps
            or y_lvl - n / 2 >= height - 0.5 - eps
        )
        return 1.0
    # a plain window: each slide pixel's coordinate is its crop index plus one offset
    offsets_x, offsets_y = np.unique((dx - jj)[~pad]), np.unique((dy - ii)[~pad])
    assert len(offsets_x) == 1 and len(offsets_y) == 1, (offsets_x, offsets_y)
    ox, oy = int(offsets_x[0]), int(offsets_y[0])
    # centred: the window's centre (pixel i covers [i, i+1)) within half a pixel of the point
    assert abs(ox + n / 2 - x_lvl) <= 0.5 + eps and abs(oy + n / 2 - y_lvl) <= 0.5 + eps
    # pad exactly where the window leaves the level
    inside = (jj + ox >= 0) & (jj + ox < width) & (ii + oy >= 0) & (ii + oy < height)
    np.testing.assert_array_equal(pad, ~inside)
    # the centre pixel is the centroid's pixel (floor) to one pixel; for odd sizes the centre
    # pixel's own centre is within half a pixel of the point
    c = n // 2
    if inside[c, c]:
        assert abs(dx[c, c] - math.floor(x_lvl)) <= 1 and abs(dy[c, c] - math.floor(y_lvl)) <= 1
        if n % 2:
            assert abs(dx[c, c] + 0.5 - x_lvl) <= 0.5 + eps
            assert abs(dy[c, c] + 0.5 - y_lvl) <= 0.5 + eps
    return 1 - inside.mean()


W0, H0, MPP0 = 300, 200, 0.25  # single-level slide
W2, H2 = 1024, 520  # two-level slide (downsample 2), level 1 is 512 x 260


@pytest.fixture(scope="module")
def coded_slides(tmp_path_factory):
    """Small zlib (lossless) pyramids: a coordinate-coded single-level slide, a two-level one
    coded in level-1 pixels (2x2 blocks), and a ramp (R = x, G = y) for resampled reads."""
    root = tmp_path_factory.mktemp("coded")
    one = root / "one.tiff"
    write_pyramid(one, encode(H0, W0), MPP0, "tiff", compression="zlib")
    two = root / "two.svs"
    shapes = write_pyramid(two, encode(H2, W2, block=2), MPP0, "svs", compression="zlib")
    assert shapes == [(H2, W2), (H2 // 2, W2 // 2)]
    ramp = root / "ramp.tiff"
    yy, xx = np.mgrid[0:H0, 0 : W0 - 50]
    img = np.stack([xx, yy, np.zeros_like(xx)], axis=2).astype(np.uint8)
    write_pyramid(ramp, img, MPP0, "tiff", compression="zlib")
    slides = {"one": Slide(one), "two": Slide(two), "ramp": Slide(ramp)}
    assert slides["two"].info.level_downsamples == (1.0, 2.0)
    yield slides
    for s in slides.values():
        s.close()


@SLOW
@given(
    out_px=st.integers(1, 48),
    x=st.floats(-40.0, W0 + 40.0),
    y=st.floats(-40.0, H0 + 40.0),
)
def test_exact_slide_crop_is_the_window_centred_on_the_centroid(coded_slides, out_px, x, y):
    s = coded_slides["one"]
    spec = CropSpec(out_px * MPP0, out_px)
    assert s.plan(spec).exact and s.plan(spec).level == 0
    crop, outside = s.read(x, y, spec)
    pad_share = check_exact_crop(crop, x, y, W0, H0)
    # the reported share (continuous field) and the padded pixels' share (rounded field)
    # differ by at most the half-pixel rounding on each side
    assert outside == pytest.approx(pad_share, abs=1.25 / out_px)
    if pad_share == 0:
        assert outside <= 1.25 / out_px


@SLOW
@given(
    out_px=st.integers(1, 40),
    x=st.floats(-80.0, W2 + 80.0),
    y=st.floats(-80.0, H2 + 80.0),
)
def test_exact_crop_from_a_coarser_level(coded_slides, out_px, x, y):
    s = coded_slides["two"]
    spec = CropSpec(out_px * MPP0 * 2, out_px)  # 0.5 µm/px: level 1, no resampling
    plan = s.plan(spec)
    assert plan.exact and plan.level == 1 and plan.downsample == 2.0
    crop, _ = s.read(x, y, spec)
    check_exact_crop(crop, x / 2, y / 2, W2 // 2, H2 // 2)


@SLOW
@given(
    out_px=st.integers(2, 40),
    target_mpp=st.floats(0.15, 0.6).filter(lambda t: abs(t / MPP0 - 1) > 1e-3),
    u=st.floats(0.0, 1.0),
    v=st.floats(0.0, 1.0),
)
def test_resampled_slide_crop_is_centred(coded_slides, out_px, target_mpp, u, v):
    """On a ramp (R = x, G = y per level-0 pixel, i.e. value c - 0.5 at continuous c), output
    pixel j of a resampled crop samples x + (j + 0.5 - out_px / 2) * scale."""
    s = coded_slides["ramp"]
    w, h = s.dimensions
    spec = CropSpec(out_px * target_mpp, out_px)
    plan = s.plan(spec)
    assert not plan.exact and plan.scale == pytest.approx(target_mpp / MPP0)
    x, y = 20 + u * (w - 40), 20 + v * (h - 40)
    crop, _ = s.read(x, y, spec)
    t = (np.arange(out_px) + 0.5 - out_px / 2) * plan.scale
    sx, sy = x + t, y + t  # sample positions, level-0 px
    support = max(plan.scale, 1.0) + 1
    ok_x = (sx >= support) & (sx <= w - support)
    ok_y = (sy >= support) & (sy <= h - support)
    # pixels whose filter support lies inside the slide (pad is not a ramp)
    ok = ok_y[:, None] & ok_x[None, :]
    got_x = crop[:, :, 0].astype(float)  # R along x
    got_y = crop[:, :, 1].astype(float)  # G along y
    err_x = np.abs(got_x - (sx - 0.5)[None, :])[ok]
    err_y = np.abs(got_y - (sy - 0.5)[:, None])[ok]
    assert np.all(err_x <= 0.6), err_x.max()
    assert np.all(err_y <= 0.6), err_y.max()


def read_level_in_memory(level: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Level pixels [x0, x0 + w) x [y0, y0 + h), the pad value outside the level."""
    out = np.full((h, w, 3), PAD_VALUE, np.uint8)
    lh, lw = level.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = level[iy0:iy1, ix0:ix1]
    return out


@SLOW
@given(
    ds=pyramids, mpp=mpps, k=st.integers(0, 5), out_px=st.integers(1, 24),
    points=st.lists(st.tuples(st.floats(-0.3, 1.3), st.floats(-0.3, 1.3)), min_size=1,
                    max_size=6),
)  # fmt: skip
def test_region_cut_centres_every_cell_at_any_level(ds, mpp, k, out_px, points):
    """Cut from one region read at any level (any downsample), each exact crop is the level's
    window centred on its cell, pad outside: the same as cutting each cell on its own."""
    d = ds[k % len(ds)]
    plan = ReadPlan.for_slide(ds, mpp, CropSpec(out_px * mpp * d, out_px))
    assume(plan.exact)
    lw, lh = 64, 48  # the level's size in its own pixels
    level = encode(lh, lw)
    width0, height0 = math.ceil(lw * plan.downsample), math.ceil(lh * plan.downsample)
    x = np.array([p[0] for p in points]) * width0
    y = np.array([p[1] for p in points]) * height0
    bx0, by0, bx1, by1 = plan.read_box_level(x, y)
    rx0, ry0 = int(bx0.min()), int(by0.min())
    buf = read_level_in_memory(level, rx0, ry0, int(bx1.max()) - rx0, int(by1.max()) - ry0)
    region = Region(buf, rx0, ry0, plan, width0, height0)
    cut = region.cut(x, y)
    assert cut.shape == (len(x), out_px, out_px, 3)
    for i in range(len(x)):
        check_exact_crop(cut[i], x[i] / plan.downsample, y[i] / plan.downsample, lw, lh)


# -- Xenium alignment -------------------------------------------------------------------------
def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty], [0.0, 0.0, 1.0]])


angles = st.floats(-math.pi, math.pi)
scales = st.floats(0.2, 5.0)
shifts = st.floats(-5e4, 5e4)
pixel_sizes = st.floats(0.05, 2.0)
alignments = st.builds(similarity, scales, angles, shifts, shifts)
points_um = st.lists(st.floats(-2e4, 2e4), min_size=1, max_size=20).map(np.array)


@FAST
@given(m=alignments, pixel_size=pixel_sizes, x=points_um, seed=st.integers(0, 2**32 - 1))
def test_xenium_and_he_px_maps_are_inverses(m, pixel_size, x, seed):
    y = np.random.default_rng(seed).uniform(-2e4, 2e4, len(x))
    hx, hy = xenium_to_he_px(x, y, m, pixel_size)
    bx, by = he_px_to_xenium(hx, hy, m, pixel_size)
    np.testing.assert_allclose(bx, x, rtol=0, atol=1e-6 * (1 + np.abs(m).max()))
    np.testing.assert_allclose(by, y, rtol=0, atol=1e-6 * (1 + np.abs(m).max()))
    # and the other way round, from H&E px
    px, py = he_px_to_xenium(x, y, m, pixel_size)
    ax, ay = xenium_to_he_px(px, py, m, pixel_size)
    np.testing.assert_allclose(ax, x, rtol=0, atol=1e-6 * (1 + np.abs(m).max()))
    np.testing.assert_allclose(ay, y, rtol=0, atol=1e-6 * (1 + np.abs(m).max()))
    # the forward map is the matrix applied to H&E px, scaled to µm
    fx, fy = he_px_to_xenium(np.array([0.0, 1.0]), np.array([0.0, 0.0]), m, pixel_size)
    assert (fx[0], fy[0]) == pytest.approx((m[0, 2] * pixel_size, m[1, 2] * pixel_size))
    step = math.hypot(fx[1] - fx[0], fy[1] - fy[0])  # one H&E px in µm
    assert step == pytest.approx(pixel_size * math.sqrt(abs(np.linalg.det(m[:2, :2]))))


@FAST
@given(m=alignments, pixel_size=pixel_sizes, off=st.floats(-0.04, 0.04), mirror=st.booleans())
def test_check_alignment_accepts_similarities_with_the_slides_scale(m, pixel_size, off, mirror):
    if mirror:  # a flip is still a similarity: no shear, same scale
        m = m @ np.diag([1.0, -1.0, 1.0])
    implied = pixel_size * math.sqrt(abs(np.linalg.det(m[:2, :2])))
    got = check_alignment(m, pixel_size, implied * (1 + off), "a.csv")
    assert got == pytest.approx(implied, rel=1e-9)
    assert check_alignment(m, pixel_size, None, "a.csv") == pytest.approx(implied, rel=1e-9)


@FAST
@given(m=alignments, pixel_size=pixel_sizes, off=st.floats(0.06, 3.0), coarser=st.booleans())
def test_check_alignment_rejects_a_scale_the_slide_does_not_have(m, pixel_size, off, coarser):
    implied = pixel_size * math.sqrt(abs(np.linalg.det(m[:2, :2])))
    slide_mpp = implied * (1 + off) if coarser else implied / (1 + off)
    with pytest.raises(AlignmentError, match=r"a\.csv: the alignment implies .* µm per H&E pixel"):
        check_alignment(m, pixel_size, slide_mpp, "a.csv")


@FAST
@given(scale=scales.filter(lambda s: abs(s * s - 1) > 0.12), angle=angles, tx=shifts, ty=shifts,
       pixel_size=pixel_sizes)  # fmt: skip
def test_check_alignment_spots_an_inverted_matrix(scale, angle, tx, ty, pixel_size):
    m = similarity(scale, angle, tx, ty)
    slide_mpp = check_alignment(m, pixel_size, None, "a.csv")
    with pytest.raises(AlignmentError, match="--invert-alignment"):
        check_alignment(np.linalg.inv(m), pixel_size, slide_mpp, "a.csv")


@FAST
@given(m=alignments, i=st.integers(0, 2), j=st.integers(0, 2),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))  # fmt: skip
def test_check_alignment_rejects_non_finite_entries(m, i, j, bad):
    m = m.copy()
    m[i, j] = bad
    with pytest.raises(AlignmentError, match="a.csv: .*NaN or infinite"):
        check_alignment(m, 0.2125, None, "a.csv")


@FAST
@given(
    m=alignments, j=st.integers(0, 2), delta=st.floats(1e-3, 10.0), sign=st.sampled_from([-1, 1])
)
def test_check_alignment_rejects_non_affine_matrices(m, j, delta, sign):
    m = m.copy()
    m[2, j] += sign * delta
    with pytest.raises(AlignmentError, match=r"last row is .*not \[0, 0, 1\].*affine"):
        check_alignment(m, 0.2125, None, "a.csv")


@pytest.mark.filterwarnings("ignore:divide by zero encountered in det:RuntimeWarning")
@FAST
@given(
    u=st.tuples(st.floats(-3, 3), st.floats(-3, 3)),
    v=st.tuples(st.floats(-3, 3), st.floats(-3, 3)),
    tx=shifts, ty=shifts,
)  # fmt: skip
def test_check_alignment_rejects_singular_matrices(u, v, tx, ty):
    linear = np.outer(u, v)  # rank 1 (or 0)
    m = np.array([[*linear[0], tx], [*linear[1], ty], [0.0, 0.0, 1.0]])
    with pytest.raises(AlignmentError, match="singular"):
        check_alignment(m, 0.2125, None, "a.csv")


@FAST
@given(m=alignments, shear=st.floats(0.3, 3.0) | st.floats(-3.0, -0.3),
       stretch=st.floats(1.25, 4.0), kind=st.sampled_from(["shear", "stretch"]))  # fmt: skip
def test_check_alignment_rejects_shear_and_stretch(m, shear, stretch, kind):
    distort = np.eye(3)
    if kind == "shear":
        distort[0, 1] = shear
    else:
        distort[0, 0] = stretch
    bad = m @ distort
    sv = np.linalg.svd(bad[:2, :2], compute_uv=False)
    assert sv[0] / sv[1] > 1.2  # the distortion is more than the check's slack
    implied = 0.2125 * math.sqrt(abs(np.linalg.det(bad[:2, :2])))
    with pytest.raises(AlignmentError, match=r"stretches one axis .*x more than the other"):
        check_alignment(bad, 0.2125, implied, "a.csv")
