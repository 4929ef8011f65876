"""Synthetic landscapes: values, known minima, autograd gradients, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rollingball.landscape.functions import (
    FUNCTIONS,
    GaussianWells,
    ackley,
    get_function,
    weierstrass_like,
    wrinkled_quadratic,
)


def grad(fn, theta: torch.Tensor) -> torch.Tensor:
    point = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(point), point)
    return g


def test_weierstrass_like_gradient_is_the_correct_one():
    """∂/∂θ Σ sin(k²θ)/k² = Σ cos(k²θ); the authors' demo used Σ cos(k²θ)/k² instead."""
    k = np.arange(1, 101)
    for x in (0.3, 2.0, 4.1):
        g = grad(weierstrass_like, torch.tensor([x], dtype=torch.float64))
        assert float(g) == pytest.approx(np.cos(k**2 * x).sum(), rel=1e-12, abs=1e-12)
        assert abs(float(g) - (np.cos(k**2 * x) / k**2).sum()) > 0.05  # not the demo's


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_batched_evaluation_matches_single_points(name):
    fn = get_function(name, 2)
    g = torch.Generator().manual_seed(0)
    lo, hi = fn.domain
    points = lo + (hi - lo) * torch.rand(3, 4, 2, generator=g, dtype=torch.float64)
    batched = fn(points)
    assert batched.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert float(fn(points[i, j])) == pytest.approx(float(batched[i, j]), rel=1e-12)


SMOOTH = sorted(set(FUNCTIONS) - {"weierstrass", "weierstrass_like"})


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("dim", [2, 3])
def test_autograd_gradient_matches_finite_differences(name, dim):
    fn = get_function(name, dim)
    lo, hi = fn.domain
    theta = lo + (hi - lo) * torch.rand(dim, generator=torch.Generator().manual_seed(dim))
    theta = theta.double()
    g = grad(fn, theta)
    h = 1e-6
    for i in range(dim):
        e = torch.zeros(dim, dtype=torch.float64)
        e[i] = h
        central = (float(fn(theta + e)) - float(fn(theta - e))) / (2 * h)
        assert float(g[i]) == pytest.approx(central, rel=1e-5, abs=1e-5)


def test_weierstrass_gradient_is_the_series_derivative():
    """Too rough for finite differences: compare with −Σ a^k b^k π sin(b^k π θ) per coordinate."""
    theta = torch.tensor([0.37, -1.21], dtype=torch.float64)
    k = np.arange(20)
    expected = [
        -(0.5**k * 3.0**k * np.pi * np.sin(3.0**k * np.pi * t)).sum() for t in (0.37, -1.21)
    ]
    np.testing.assert_allclose(grad(get_function("weierstrass", 2), theta), expected, rtol=1e-9)


@pytest.mark.parametrize("name", ["weierstrass", "rastrigin", "rosenbrock", "ackley"])
@pytest.mark.parametrize("dim", [2, 3])
def test_known_global_minima(name, dim):
    fn = get_function(name, dim)
    assert fn.minimizers is not None and fn.minimum is not None
    assert float(fn(fn.minimizers[0])) == pytest.approx(fn.minimum, abs=1e-12)
    lo, hi = fn.domain
    samples = lo + (hi - lo) * torch.rand(20000, dim, generator=torch.Generator().manual_seed(0))
    assert float(fn(samples.double()).min()) >= fn.minimum - 1e-12


def test_weierstrass_minimum_value():
    """Odd integers: every term is −a^k, so W = −d (1 − 0.5^20) / (1 − 0.5)."""
    fn = get_function("weierstrass", 2)
    for point in ([1.0, -1.0], [3.0, 1.0], [-3.0, 5.0]):
        assert float(fn(torch.tensor(point, dtype=torch.float64))) == pytest.approx(
            -2 * (1 - 0.5**20) / 0.5, abs=1e-12
        )


def test_weierstrass_like_minimum_on_a_fine_grid():
    fn = get_function("weierstrass_like", 1)
    assert fn.minimum == pytest.approx(-math.sqrt(3) / 2 * 1.4555, abs=1e-3)
    assert float(fn(fn.minimizers[0])) == pytest.approx(fn.minimum, abs=1e-12)
    x = torch.linspace(0, 2 * math.pi, 100_001, dtype=torch.float64)[:, None]
    assert float(fn(x).min()) >= fn.minimum - 1e-12


@pytest.mark.parametrize(("a", "b"), [(0.1, 10.0), (0.5, 3.0), (0.05, 2.0)])
def test_wrinkled_quadratic_minimisers_lie_in_the_stated_box(a, b):
    """Stationary points satisfy θ = −a b cos(bθ): every local minimum has |θ| ≤ a b."""
    x = torch.linspace(-5, 5, 200_001, dtype=torch.float64)
    q = wrinkled_quadratic(x[:, None], a, b).numpy()
    minima = x.numpy()[1:-1][(q[1:-1] < q[:-2]) & (q[1:-1] < q[2:])]
    assert len(minima) >= 1
    assert np.all(np.abs(minima) <= a * b + 1e-4)
    if a * b**2 < 1:  # convex: one minimiser
        assert len(minima) == 1


def test_ackley_gradient_at_its_minimum_is_finite():
    g = grad(ackley, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(g, torch.zeros(3, dtype=torch.float64))


def test_gaussian_wells_are_the_authors_wells():
    wells = GaussianWells(dim=2, wells=1000, sigma=0.1, seed=0)
    expected = np.random.RandomState(0).uniform(-3, 3, (1000, 2))
    np.testing.assert_array_equal(wells.centres.numpy(), expected)
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    r2 = ((theta.numpy() - expected) ** 2).sum(1)
    value = -np.exp(-r2 / 0.02).sum() + float(theta.square().sum())
    assert float(wells(theta)) == pytest.approx(value, rel=1e-12)


def test_unknown_function_and_bad_dimension_are_refused():
    with pytest.raises(ValueError, match="unknown function"):
        get_function("himmelblau")
    with pytest.raises(ValueError, match="dim >= 2"):
        get_function("rosenbrock", 1)
