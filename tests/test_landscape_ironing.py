"""`iron`: exact against a brute-force closing, and the laws of a morphological closing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rollingball.landscape.ironing import (
    centre_height,
    iron,
    monotonicity_gap,
    unreachable,
    unreachable_from_ironed,
)


def brute_force(f: np.ndarray, spacing: tuple[float, ...], radius: float):
    """C and I from all pairs of grid points: C(x) = max_z f(z) + b(z−x), I = min_x C(x) − b."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in f.shape], indexing="ij"), -1)
    points = index.reshape(-1, f.ndim)
    diff = (points[:, None, :] - points[None, :, :]) * np.asarray(spacing)
    dist2 = (diff**2).sum(-1)
    inside = dist2 <= radius**2
    cap = np.sqrt(np.where(inside, radius**2 - dist2, 0.0))
    flat = f.reshape(-1)
    centre = np.where(inside, flat[None, :] + cap, -np.inf).max(1)  # row x, column z
    ironed = np.where(inside, centre[None, :] - cap, np.inf).min(1)  # row z, column x
    return centre.reshape(f.shape), ironed.reshape(f.shape)


values_1d = arrays(np.float64, st.integers(2, 40), elements=st.floats(-5, 5))
values_2d = arrays(
    np.float64, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.floats(-5, 5)
)
spacings = st.sampled_from([0.05, 0.1, 0.3, 1.0])
radii = st.floats(0.0, 2.0)


@settings(max_examples=150, deadline=None)
@given(values_1d, spacings, radii)
def test_matches_brute_force_1d(f, spacing, radius):
    centre, ironed = brute_force(f, (spacing,), radius)
    np.testing.assert_allclose(centre_height(f, spacing, radius), centre, rtol=0, atol=1e-12)
    np.testing.assert_allclose(iron(f, spacing, radius), ironed, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(values_2d, spacings, spacings, radii)
def test_matches_brute_force_2d(f, dx, dy, radius):
    centre, ironed = brute_force(f, (dx, dy), radius)
    np.testing.assert_allclose(centre_height(f, (dx, dy), radius), centre, rtol=0, atol=1e-12)
    np.testing.assert_allclose(iron(f, (dx, dy), radius), ironed, rtol=0, atol=1e-12)


def test_large_ball_matches_brute_force():
    rng = np.random.default_rng(1)
    f = np.cumsum(rng.normal(size=300)) * 0.05
    _, ironed = brute_force(f, (0.01,), 1.0)  # the ball spans the whole grid
    np.testing.assert_allclose(iron(f, 0.01, 1.0), ironed, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.one_of(values_1d, values_2d), spacings, radii)
def test_extensive_and_idempotent(f, spacing, radius):
    once = iron(f, spacing, radius)
    assert np.all(once >= f)
    np.testing.assert_allclose(iron(once, spacing, radius), once, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.one_of(values_1d, values_2d), spacings, st.floats(0.0, 0.999))
def test_ball_below_spacing_returns_f_exactly(f, spacing, fraction):
    np.testing.assert_array_equal(iron(f, spacing, fraction * spacing), f)


@settings(max_examples=150, deadline=None)
@given(values_1d, spacings, radii, st.floats(0.0, 2.0))
def test_monotone_in_radius_up_to_the_sampled_gap_1d(f, spacing, small, extra):
    large = small + extra
    gap = monotonicity_gap(spacing, small, large)
    assert np.isfinite(gap)  # in 1-D every large footprint is a union of small ones
    assert np.all(iron(f, spacing, small) <= iron(f, spacing, large) + gap + 1e-12)


@settings(max_examples=60, deadline=None)
@given(values_2d, st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_monotone_in_radius_up_to_the_sampled_gap_2d(f, small, extra):
    gap = monotonicity_gap(0.1, small, small + extra, ndim=2)
    if np.isfinite(gap):
        assert np.all(iron(f, 0.1, small) <= iron(f, 0.1, small + extra) + gap + 1e-12)


def test_monotonicity_fails_on_the_grid_and_the_gap_is_attained():
    """Not exact: a ball of radius 1 sits higher than one of 1.86 over [1.3, −0.8, −0.9]."""
    f = np.array([1.3, -0.8, -0.9])
    small, large = iron(f, 1.0, 1.0), iron(f, 1.0, 1.86)
    gap = monotonicity_gap(1.0, 1.0, 1.86)
    assert small[1] == pytest.approx(0.1, abs=1e-12)
    assert large[1] == pytest.approx(1.86 - np.sqrt(1.86**2 - 1) - 0.9 + 0.0, abs=1e-12)
    assert small[1] - large[1] == pytest.approx(gap, abs=1e-12)
    assert gap == pytest.approx(0.7083111936, abs=1e-9)
    assert monotonicity_gap(1.0, 0.5, 3.0) == 0.0  # ρ below the spacing: nothing to break
    assert monotonicity_gap(0.01, 0.05, 0.1) == pytest.approx(0.013589, abs=1e-6)


def test_monotonicity_2d_can_fail_without_bound():
    """In 2-D the gap is infinite when a grid disc is no union of smaller grid discs.

    Grid spacing 1, radii 1 and 1.5: the small footprint is a plus, the large one a 3×3
    square whose corners no plus inside it covers; the violation then grows with the data.
    """
    assert monotonicity_gap(1.0, 1.0, 1.5, ndim=2) == np.inf
    assert monotonicity_gap(0.01, 0.1, 0.2, ndim=2) == np.inf
    assert monotonicity_gap(1.0, 1.5, 2.3, ndim=2) == pytest.approx(0.51383571, abs=1e-8)
    worst = {}
    for scale in (1.0, 100.0):
        worst[scale] = max(
            float(np.max(iron(f, 1.0, 1.0) - iron(f, 1.0, 1.5)))
            for f in (scale * np.random.default_rng(s).normal(size=(5, 5)) for s in range(50))
        )
    assert 0.1 < worst[1.0] < 2.0
    assert worst[100.0] > 50 * worst[1.0]


@pytest.mark.parametrize(("spacing", "radius", "curvature_radius"), [
    (0.01, 0.5, 1.0), (0.02, 0.25, 0.5), (0.01, 0.2, 2.0), (0.05, 0.5, 1.0),
])  # fmt: skip
def test_wide_paraboloid_is_unchanged_up_to_the_grid_bound_1d(spacing, radius, curvature_radius):
    """f = x²/(2R), R ≥ 2ρ: 0 ≤ I − f ≤ (Δ/2)² (1 + p²)^{3/2} / ρ away from the edges.

    p = |x|/R + ρ/R bounds the slope within reach of the ball; the bound is the error of the
    nearest grid centre to the true touching centre (attained to 0.1% at R = 2ρ).
    """
    x = np.arange(-round(1.5 / spacing), round(1.5 / spacing) + 1) * spacing
    f = x**2 / (2 * curvature_radius)
    error = iron(f, spacing, radius) - f
    slope = (np.abs(x) + radius) / curvature_radius
    bound = (spacing / 2) ** 2 * (1 + slope**2) ** 1.5 / radius
    interior = np.abs(x) <= 1.5 - radius - spacing
    assert np.all(error >= 0)
    assert np.all(error[interior] <= bound[interior])


def test_wide_paraboloid_is_unchanged_up_to_the_grid_bound_2d():
    spacing, radius, curvature_radius = 0.05, 0.4, 0.8
    x = np.arange(-30, 31) * spacing
    xx, yy = np.meshgrid(x, x, indexing="ij")
    f = (xx**2 + yy**2) / (2 * curvature_radius)
    error = iron(f, spacing, radius) - f
    slope = (np.hypot(xx, yy) + radius) / curvature_radius
    bound = 2 * (spacing / 2) ** 2 * (1 + slope**2) ** 1.5 / radius  # δ² = d (Δ/2)², d = 2
    interior = np.maximum(np.abs(xx), np.abs(yy)) <= x[-1] - radius - spacing
    assert np.all(error >= 0)
    assert np.all(error[interior] <= bound[interior])


def test_sharp_minima_are_unreachable_1d():
    """Wells (1 − cos kx)·c/k² have curvature c = 2/ρ at their minima: the ball cannot reach."""
    radius, k = 0.2, 8.0
    x = np.linspace(0, 4 * np.pi / k * 3, 1201)
    f = (1 - np.cos(k * x)) * (2 / radius) / k**2
    mask = unreachable(f, x[1] - x[0], radius)
    minima = np.isclose(np.mod(x, 2 * np.pi / k), 0, atol=1e-9) | np.isclose(
        np.mod(x, 2 * np.pi / k), 2 * np.pi / k, atol=1e-9
    )
    interior = (x > radius) & (x < x[-1] - radius)
    assert np.all(mask[minima & interior])
    ironed = iron(f, x[1] - x[0], radius)
    np.testing.assert_array_equal(unreachable_from_ironed(f, ironed, radius), mask)
    assert np.all((ironed - f)[minima & interior] > 1e-3)
    maxima = np.isclose(np.mod(x - np.pi / k, 2 * np.pi / k), 0, atol=1e-9)
    assert not np.any(mask[maxima])  # the tops are touched
    # curvature 1/(2ρ): every sample is reached, up to the grid error (Δ/2)² (1 + p²)^{3/2}/ρ
    wide = (1 - np.cos(k * x)) * (0.5 / radius) / k**2
    grid_error = ((x[1] - x[0]) / 2) ** 2 * 1.2 / radius  # slopes here are at most 0.32
    assert not np.any(unreachable(wide, x[1] - x[0], radius, atol=grid_error)[interior])


def test_sharp_minima_are_unreachable_2d():
    """Rastrigin's wells have curvature 2 + 40π² ≫ 2/ρ: the ball misses their bottoms."""
    x = np.linspace(-2.5, 2.5, 101)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    f = 20 + xx**2 - 10 * np.cos(2 * np.pi * xx) + yy**2 - 10 * np.cos(2 * np.pi * yy)
    mask = unreachable(f, x[1] - x[0], 0.1)
    for i in (-2, -1, 0, 1, 2):
        for j in (-2, -1, 0, 1, 2):
            assert mask[np.argmin(np.abs(x - i)), np.argmin(np.abs(x - j))]
    for i in (-1.5, -0.5, 0.5, 1.5):  # the local maxima, where the ball rests, are reached
        for j in (-1.5, -0.5, 0.5, 1.5):
            assert not mask[np.argmin(np.abs(x - i)), np.argmin(np.abs(x - j))]


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="spacing"):
        iron(np.zeros(4), 0.0, 1.0)
    with pytest.raises(ValueError, match="radius"):
        iron(np.zeros(4), 0.1, -1.0)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        iron(np.zeros((2, 2, 2)), 0.1, 1.0)
    with pytest.raises(ValueError, match="finite"):
        iron(np.array([0.0, np.nan]), 0.1, 1.0)
