"""The exact parts of the laws H1–H4 (docs/claims.md), against RBO itself, in float64."""

import itertools
import math

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.baselines import USAM
from rollingball.experiments.claims.laws import (
    first_order_step,
    quadratic_step,
    rbo_linear_factor,
    rbo_stability_threshold,
    small_step_direction,
    truncated_rate,
    usam_stability_threshold,
)
from stepping import flat_params, loss_closure, one_step

CONVERGED = {
    "projection": "anderson",
    "projection_steps": 300,
    "projection_tol": 1e-13,
    "anderson_memory": 5,
}


def _quadratic(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([2.0, 1.0, 0.5, 0.2, -0.3], dtype=torch.float64)
    hessian = q @ torch.diag(eigenvalues) @ q.T
    return hessian, torch.randn(n, generator=g, dtype=torch.float64)


def _rbo_step(fn, theta, **kw):
    """One RBO step whose projection must converge."""
    moved, stats = _rbo_step_and_stats(fn, theta, **kw)
    assert stats["converged"]
    return moved


@pytest.mark.parametrize(("lr", "radius"), [(0.1, 0.2), (0.5, 0.3), (0.3, 0.01)])
def test_quadratic_step_is_exact(lr, radius):
    # θ⁺ = θ − a (I − tH)⁻¹ g with a = η + ρ/s − t, t the centre's height over the contact point
    hessian, linear = _quadratic()
    theta = 0.5 * torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    predicted, t, a = quadratic_step(hessian, linear, theta, lr, radius)
    moved = _rbo_step(
        lambda x: 0.5 * x @ hessian @ x + linear @ x, theta, lr=lr, radius=radius, **CONVERGED
    )
    assert torch.allclose(moved, predicted, rtol=0, atol=1e-12)
    g = hessian @ theta + linear
    s = math.sqrt(1 + float(g @ g))
    assert a == pytest.approx(lr + radius / s - t, abs=1e-15)


def test_near_a_minimum_the_step_is_the_resolvent_form():
    # ‖g‖ ≈ 7e-4: s = 1 + O(‖g‖²), t = ρ + O(‖g‖²), so θ⁺ = θ − η (I − ρH)⁻¹ g to O(‖g‖²)
    hessian, _ = _quadratic()
    hessian = hessian + 0.5 * torch.eye(5, dtype=torch.float64)  # positive definite
    minimum = torch.linspace(-1, 1, 5, dtype=torch.float64)
    theta = minimum + 1e-4 * torch.tensor([1.0, -2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    lr, radius = 0.2, 0.3

    def f(x):
        return 0.5 * (x - minimum) @ hessian @ (x - minimum)

    moved = _rbo_step(f, theta, lr=lr, radius=radius, **CONVERGED)
    g = hessian @ (theta - minimum)
    resolvent = theta - lr * torch.linalg.solve(
        torch.eye(5, dtype=torch.float64) - radius * hessian, g
    )
    step = (moved - theta).norm()
    assert (moved - resolvent).norm() / step < 2e-6  # measured 3.3e-7
    assert (moved - (theta - lr * g)).norm() / step > 0.3  # and the ball does act


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    return model, x, y


def _step(model, x, y, opt_class, **kw):
    """The change one step of `opt_class` makes, from a copy of the model."""
    after, _ = one_step(model, x, y, opt_class, **kw)
    return after - flat_params(model.parameters())


def _grad_hvp(model, x, y):
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in grads])
    hg = torch.autograd.grad(g @ g.detach(), params)
    return g.detach(), torch.cat([t.reshape(-1) for t in hg])


def test_small_radius_rbo_is_usam_at_radius_rho_over_s_up_to_rho_squared():
    # Δ_RBO = Δ_USAM(ρ/s) + η (ρ/s − η/2) κ g + O(η ρ²) + O(η² ρ), κ = gᵀHg / s²
    model, x, y = _net()
    lr = 1e-3
    g, hg = _grad_hvp(model, x, y)
    s = math.sqrt(1 + float(g @ g))
    kappa = float(g @ hg) / s**2
    errors, sizes = [], []
    for radius in (0.2, 0.1, 0.05):
        rbo = _step(model, x, y, RBO, lr=lr, radius=radius, **CONVERGED)
        usam = _step(model, x, y, USAM, lr=lr, rho=radius / s)
        law = usam + lr * (radius / s - lr / 2) * kappa * g
        errors.append(float((rbo - law).norm()))
        sizes.append(float((rbo + lr * g).norm()))  # what RBO adds to SGD, O(η ρ)
    # measured: error / size = 0.107, 0.053, 0.027 and error ratios 4.25, 4.1
    assert errors[-1] < 0.04 * sizes[-1]
    for big, small in itertools.pairwise(errors):  # halving ρ divides it by ≈ 4
        assert 3.5 < big / small < 4.6


def _net_loss(model, x, y):
    """The net's loss as a function of its flat parameter vector, and that vector."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = flat_params(params)

    def f(vector):
        chunks, start = {}, 0
        for name, p in zip(names, params, strict=True):
            chunks[name] = vector[start : start + p.numel()].view_as(p)
            start += p.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)

    return f, flat


def test_small_step_direction_is_the_limit_of_the_step():
    # lim_{η→0} Δ/η = −s² M g / (1 + gᵀMg), M = (I − (ρ/s)H)⁻¹, at any radius with ρλ/s < 1
    model, x, y = _net()
    f, flat = _net_loss(model, x, y)
    hessian = torch.autograd.functional.hessian(f, flat, vectorize=True)
    g = torch.autograd.functional.jacobian(f, flat)
    radius = 0.5
    assert radius * float(torch.linalg.eigvalsh(hessian)[-1]) < 1
    direction = small_step_direction(hessian, g, radius)
    for lr, tol in ((1e-3, 2e-3), (1e-4, 2e-4)):  # the error is O(η)
        delta = _step(model, x, y, RBO, lr=lr, radius=radius, **CONVERGED)
        assert (delta / lr - direction).norm() / direction.norm() < tol
    assert (direction + g).norm() / g.norm() > 0.01  # not the gradient


def test_truncated_projection_rate_on_an_affine_loss():
    # K steps x ← x − γ r(x) from θ: Δ = −η [1 − (1 − γ s²)^K] g for every radius
    slope = torch.tensor([0.6, -0.8, 1.2], dtype=torch.float64)
    theta = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    grad_sq = float(slope @ slope)
    for radius in (0.1, 10.0):
        moved = _rbo_step_any(
            lambda p: slope @ p + 1.0,
            theta,
            lr=1.0,
            radius=radius,
            projection="gd",
            projection_step_size=1e-3,
            projection_steps=100,
            projection_tol=0.0,
        )
        rate = truncated_rate(1.0, 1e-3, 100, grad_sq)
        assert torch.allclose(moved, theta - rate * slope, rtol=0, atol=1e-14)
    assert rate == pytest.approx(1 - (1 - 1e-3 * 3.44) ** 100) and rate < 0.3


def _rbo_on(fn, theta, **kw):
    """A parameter at θ, an RBO over it, and the closure of the loss fn(p)."""
    p = nn.Parameter(theta.clone())
    opt = RBO([p], **kw)
    return p, opt, loss_closure(opt, lambda: fn(p))


def _rbo_step_and_stats(fn, theta, **kw):
    """One RBO step from θ: the new point and the step's `last_stats`."""
    p, opt, closure = _rbo_on(fn, theta, **kw)
    opt.step(closure)
    return p.detach(), opt.last_stats


def _rbo_step_any(fn, theta, **kw):
    """One RBO step, converged or not."""
    return _rbo_step_and_stats(fn, theta, **kw)[0]


def test_linear_factor_and_the_edge_of_stability():
    # f = ½λx² near 0: x⁺ / x = 1 − ηλ/(1 − ρλ); |·| < 1 iff λ < 2/(η + 2ρ)
    lr, radius = 0.5, 0.25
    edge = rbo_stability_threshold(lr, radius)
    assert edge == pytest.approx(2.0)
    assert rbo_linear_factor(lr, radius, edge) == pytest.approx(-1.0)
    for curvature in (0.5, 1.9, 2.1):
        x0 = torch.tensor([1e-5], dtype=torch.float64)
        moved = _rbo_step_any(
            lambda p, c=curvature: 0.5 * c * (p**2).sum(), x0, lr=lr, radius=radius, **CONVERGED
        )
        assert float(moved / x0) == pytest.approx(
            rbo_linear_factor(lr, radius, curvature), rel=1e-8
        )
    # USAM's map is exactly linear: x⁺ / x = 1 − ηλ(1 + ρλ), = −1 at its threshold
    usam_edge = usam_stability_threshold(lr, radius)
    assert 1 - lr * usam_edge * (1 + radius * usam_edge) == pytest.approx(-1.0)
    assert usam_stability_threshold(lr, 0.0) == 2 / lr


# With heavy-ball momentum μ: v = μ v_prev + g, the centre moves to θ̃ = θ − (ρ/s) g − η v,
# ỹ = f + ρ/s − η gᵀv. RBO's first step has v = g (v_prev = g, as torch.optim.SGD), so these
# tests take a plain first step and compare the second.


def _two_steps(fn, theta, first_lr, lr, radius, momentum, tol=CONVERGED["projection_tol"]):
    """Step 1: radius 0 at first_lr (gradient descent, buffer = g₀); step 2 at (lr, radius).

    Returns θ₁, the velocity buffer after step 1, and θ₂ − θ₁. Step 1 does not depend on
    (lr, radius), so neither do θ₁ and v_prev = g₀.
    """
    settings = {**CONVERGED, "projection_tol": tol}
    p, opt, closure = _rbo_on(fn, theta, lr=first_lr, radius=0.0, momentum=momentum, **settings)
    opt.step(closure)
    theta1 = p.detach().clone()
    buffer = opt.state[p]["momentum_buffer"].clone()
    opt.param_groups[0].update(lr=lr, radius=radius)
    opt.step(closure)
    assert opt.last_stats["converged"]
    return theta1, buffer, p.detach() - theta1


@pytest.mark.parametrize(("lr", "radius"), [(0.1, 0.2), (0.3, 0.01)])
def test_quadratic_step_with_momentum_is_exact(lr, radius):
    # θ⁺ = θ − (I − tH)⁻¹ [η v + (ρ/s − t) g], t the centre's height over the contact point
    hessian, linear = _quadratic()
    theta = 0.5 * torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu = 0.9

    def f(x):
        return 0.5 * x @ hessian @ x + linear @ x

    theta1, buffer, delta = _two_steps(f, theta, 0.05, lr, radius, mu)
    g0, g1 = hessian @ theta + linear, hessian @ theta1 + linear
    # autograd's gradient and H θ + b are two arithmetic paths: equal to round-off, not bits
    torch.testing.assert_close(buffer, g0, rtol=1e-14, atol=1e-14)
    v = mu * g0 + g1
    predicted, _, _ = quadratic_step(hessian, linear, theta1, lr, radius, velocity=v)
    assert torch.allclose(theta1 + delta, predicted, rtol=0, atol=1e-12)
    # the momentum matters: the no-momentum form is far off
    plain, _, _ = quadratic_step(hessian, linear, theta1, lr, radius)
    assert (plain - predicted).norm() > 0.3 * delta.norm()


def test_small_radius_rbo_with_momentum_follows_the_first_order_law():
    # Δ = −η [v + (ρ/s)(Hv − (gᵀHv/s²) g) + (η/2)(vᵀHv/s²) g] + O(ηρ² + η²ρ + η³):
    # USAM's curvature term acts on the whole velocity v, not on g
    f, flat = _net_loss(*_net())
    mu, lr = 0.9, 1e-3
    # at η = 1e-3 the relative residual's round-off floor is about ε f / (η ‖g‖) ≈ 1e-13 (the
    # cancellation in f(x) − ỹ), so tol 1e-13 converges or not by the CPU's kernels; 1e-10
    # moves θ₂ by ≈ 1e-10 η ‖g‖, far below the O(ηρ²) errors measured here
    errors, sizes, naive = [], [], []
    for radius in (0.2, 0.1, 0.05):
        theta1, buffer, delta = _two_steps(f, flat, 0.5, lr, radius, mu, tol=1e-10)
        g = torch.func.grad(f)(theta1)
        v = mu * buffer + g
        hv = torch.func.jvp(torch.func.grad(f), (theta1,), (v,))[1]
        hg = torch.func.jvp(torch.func.grad(f), (theta1,), (g,))[1]
        law = first_order_step(lr, radius, g, v, hv)
        s = math.sqrt(1 + float(g @ g))
        errors.append(float((delta - law).norm()))
        sizes.append(float((delta + lr * v).norm()))  # what RBO adds to heavy ball, O(ηρ)
        # the same heavy ball with USAM's term on g alone (its buffer = RBO's) misses μρHv_prev
        naive.append(float((delta + lr * (v + radius / s * hg)).norm()))
    # measured: error / size = 0.110, 0.055, 0.028; error ratios 4.25, 4.11; naive 0.55-0.59
    assert errors[-1] < 0.04 * sizes[-1]
    for big, small in itertools.pairwise(errors):  # halving ρ divides it by ≈ 4
        assert 3.5 < big / small < 4.6
    assert min(n / size for n, size in zip(naive, sizes, strict=True)) > 0.3


def test_small_step_direction_with_momentum_is_the_limit_of_the_step():
    # lim_{η→0} Δ/η = −M [v − g gᵀ(M − I) v / (1 + gᵀMg)], M = (I − (ρ/s)H)⁻¹, ρλ/s < 1
    f, flat = _net_loss(*_net())
    mu, radius = 0.9, 0.5
    for lr, tol in ((1e-3, 3e-4), (1e-4, 3e-5)):  # the error is O(η): measured 1.4e-4, 1.4e-5
        theta1, buffer, delta = _two_steps(f, flat, 0.5, lr, radius, mu)
        hessian = torch.autograd.functional.hessian(f, theta1, vectorize=True)
        g = torch.func.grad(f)(theta1)
        assert radius * float(torch.linalg.eigvalsh(hessian)[-1]) < 1
        v = mu * buffer + g
        direction = small_step_direction(hessian, g, radius, velocity=v)
        assert (delta / lr - direction).norm() / direction.norm() < tol
    assert (direction + v).norm() / v.norm() > 0.01  # not the heavy-ball step
    assert (direction - small_step_direction(hessian, g, radius)).norm() > direction.norm() / 2


def test_usam_with_momentum_is_rbo_with_momentum_on_a_quadratic_near_its_minimum():
    # constant H and ‖g‖ → 0: USAM's buffer b = Σ μᵏ (I + ρH) g_k = (I + ρH) v, so its step
    # −η (I + ρH) v is RBO's −η (I − ρH)⁻¹ v to O(ηρ²): whole trajectories agree to O(ρ²)
    hessian, _ = _quadratic()
    hessian = hessian + 0.5 * torch.eye(5, dtype=torch.float64)  # positive definite
    theta = 1e-3 * torch.tensor([1.0, -2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    lr, mu, steps = 0.05, 0.9, 20

    def f(x):
        return 0.5 * x @ hessian @ x

    def path(opt_class, **kw):
        p = nn.Parameter(theta.clone())
        opt = opt_class([p], lr=lr, momentum=mu, **kw)
        closure = loss_closure(opt, lambda: f(p))
        for _ in range(steps):
            opt.step(closure)
        return p.detach()

    errors, sizes = [], []
    for radius in (0.1, 0.05, 0.025):
        rbo = path(RBO, radius=radius, **CONVERGED)
        usam = path(USAM, rho=radius)
        heavy_ball = path(torch.optim.SGD)
        errors.append(float((rbo - usam).norm()))
        sizes.append(float((rbo - heavy_ball).norm()))
    # measured: error / size = 0.22, 0.12, 0.061; error ratios 3.9, 4.4
    assert errors[-1] < 0.1 * sizes[-1]
    for big, small in itertools.pairwise(errors):
        assert 3.5 < big / small < 4.6
