"""Hessian routines and sharpness on losses whose Hessian is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rollingball.landscape.sharpness import (
    average_sharpness,
    dataset_loss,
    hessian_top_eigenvalue,
    hessian_trace,
    worst_case_sharpness,
)


def least_squares(n: int = 200, d: int = 12, seed: int = 0):
    """f(w, b) = (1/N) ‖X w + b − y‖²: Hessian 2/N [X 1]ᵀ[X 1], exactly, for any (w, b)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    batches = [(x[:70], y[:70, None]), (x[70:], y[70:, None])]  # two uneven batches
    loss_fn = dataset_loss(model, nn.functional.mse_loss, batches)
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    hessian = 2 / n * design.T @ design
    return model, loss_fn, hessian, (x, y)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_untouched(model: nn.Module, before: list[torch.Tensor]) -> None:
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
        assert p.grad is None


def test_dataset_loss_is_the_per_sample_mean():
    model, loss_fn, _, (x, y) = least_squares()
    with torch.no_grad():
        full = loss_fn()
        direct = ((x @ model.weight.T + model.bias).squeeze(1) - y).square().mean()
    assert float(full) == pytest.approx(float(direct), rel=1e-13)


def test_top_eigenvalue_of_least_squares():
    model, loss_fn, hessian, _ = least_squares()
    before = snapshot(model)
    top = hessian_top_eigenvalue(loss_fn, list(model.parameters()))
    exact = float(torch.linalg.eigvalsh(hessian)[-1])
    assert top == pytest.approx(exact, rel=1e-4)
    assert abs(top - exact) / exact < 1e-8  # Lanczos in 13 dimensions is exact to round-off
    assert_untouched(model, before)


def test_top_eigenvalue_converges_early_on_a_larger_problem():
    """A 301-parameter quadratic with a clear gap: 50 Lanczos steps give 1e-4 relative."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(301, 301, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([10.0, 7.0]), torch.rand(299, generator=g) * 5])
    a = q @ torch.diag(spectrum.double()) @ q.T
    theta = torch.randn(301, generator=g, dtype=torch.float64, requires_grad=True)
    top = hessian_top_eigenvalue(lambda: 0.5 * theta @ a @ theta, [theta], iterations=50)
    assert top == pytest.approx(10.0, rel=1e-4)


def test_trace_of_least_squares_within_five_percent():
    model, loss_fn, hessian, _ = least_squares()
    before = snapshot(model)
    for seed in range(3):
        estimate = hessian_trace(
            loss_fn, list(model.parameters()), generator=torch.Generator().manual_seed(seed)
        )
        assert estimate == pytest.approx(float(hessian.trace()), rel=0.05)
    assert_untouched(model, before)


def test_trace_is_exact_for_a_diagonal_hessian():
    """Rademacher vᵀ D v = tr D for every v: Hutchinson has zero variance on diagonals."""
    theta = torch.randn(20, dtype=torch.float64, requires_grad=True)
    scales = torch.linspace(1, 3, 20, dtype=torch.float64)
    estimate = hessian_trace(lambda: 0.5 * (scales * theta**2).sum(), [theta], samples=3)
    assert estimate == pytest.approx(float(scales.sum()), rel=1e-12)


def quadratic(n: int = 6):
    """½ θᵀAθ at θ = 0: average sharpness ρ² tr A / (2n), worst case ½ λ_max ρ²."""
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.tensor([4.0, 2.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64)[:n]
    a = q @ torch.diag(spectrum) @ q.T
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    return theta, (lambda: 0.5 * theta @ a @ theta), spectrum


def test_average_sharpness_of_a_quadratic():
    theta, loss_fn, spectrum = quadratic()
    value = average_sharpness(
        loss_fn, [theta], radius=0.3, samples=4000, generator=torch.Generator().manual_seed(0)
    )
    exact = 0.3**2 * float(spectrum.sum()) / (2 * 6)
    assert value == pytest.approx(exact, rel=0.03)  # Monte Carlo, 4000 draws
    assert torch.equal(theta, torch.zeros(6, dtype=torch.float64))


def test_worst_case_sharpness_of_a_quadratic():
    theta, loss_fn, spectrum = quadratic()
    value = worst_case_sharpness(loss_fn, [theta], radius=0.3, steps=40)
    exact = 0.5 * float(spectrum.max()) * 0.3**2
    assert value <= exact * (1 + 1e-12)  # never above the true maximum
    assert value == pytest.approx(exact, rel=1e-3)
    assert torch.equal(theta, torch.zeros(6, dtype=torch.float64))


def test_worst_case_is_at_least_the_sam_point_and_beats_average():
    model, loss_fn, _, _ = least_squares()
    before = snapshot(model)
    params = list(model.parameters())
    worst = worst_case_sharpness(loss_fn, params, radius=0.1)
    average = average_sharpness(loss_fn, params, radius=0.1, samples=50)
    assert worst > average
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params)
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
    with torch.no_grad():
        base = float(loss_fn())
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=0.1 / norm)
        sam = float(loss_fn()) - base
        for p, q in zip(params, before, strict=True):
            p.copy_(q)
    assert worst >= sam
    assert_untouched(model, before)


def test_mode_is_left_to_the_caller():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double()
    model.eval()
    x = torch.randn(16, 3, dtype=torch.float64)
    loss_fn = dataset_loss(model, nn.functional.mse_loss, [(x, torch.zeros(16, 1).double())])
    hessian_top_eigenvalue(loss_fn, list(model.parameters()), iterations=5)
    assert not model.training
    model.train()
    average_sharpness(loss_fn, list(model.parameters()), radius=0.1, samples=2)
    assert model.training
