"""Trajectories on synthetic landscapes: RBO at radius 0 is SGD, centres, closure counts."""

from __future__ import annotations

import math

import pytest
import torch

from rollingball import RBO
from rollingball.landscape.functions import get_function
from rollingball.landscape.trajectories import trajectory
from rollingball.optim import ProjectionWarning

START = torch.tensor([1.3, -0.7], dtype=torch.float64)


def test_rbo_at_radius_zero_is_sgd():
    fn = get_function("wrinkled_quadratic", 2)
    sgd = trajectory(fn, START, lambda p: torch.optim.SGD(p, lr=0.05), steps=30)
    rbo = trajectory(fn, START, lambda p: RBO(p, lr=0.05, radius=0.0), steps=30)
    assert torch.equal(rbo.params, sgd.params)
    assert torch.equal(rbo.loss, sgd.loss)
    assert torch.equal(rbo.closure_calls, sgd.closure_calls)
    assert torch.equal(sgd.closure_calls, torch.arange(31))
    assert sgd.centres is None
    assert rbo.centres is not None  # radius 0: the centre is the contact point itself
    assert torch.equal(rbo.centres[:, :2], rbo.params)
    assert torch.equal(rbo.centres[:, 2], rbo.loss)


def test_records_start_and_shapes():
    fn = get_function("rosenbrock", 2)
    run = trajectory(fn, START, lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9), steps=5)
    assert run.params.shape == (6, 2)
    assert run.loss.shape == (6,)
    assert torch.equal(run.params[0], START)
    assert float(run.loss[0]) == pytest.approx(float(fn(START)), rel=1e-15)
    for k in range(6):
        assert float(run.loss[k]) == pytest.approx(float(fn(run.params[k])), rel=1e-15)
    assert torch.equal(run.end, run.params[-1])


def test_centre_is_radius_away_along_the_upward_normal():
    fn = get_function("wrinkled_quadratic", 2)
    radius = 0.4
    run = trajectory(fn, START, lambda p: RBO(p, lr=0.05, radius=radius), steps=10)
    assert run.centres is not None
    for k in range(11):
        theta = run.params[k].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(theta), theta)
        normal = torch.cat([-g, torch.ones(1, dtype=torch.float64)]) / math.sqrt(1 + g @ g)
        contact = torch.cat([run.params[k], run.loss[k : k + 1]])
        torch.testing.assert_close(run.centres[k], contact + radius * normal, rtol=0, atol=1e-12)


def test_rbo_closure_calls_and_descent():
    fn = get_function("wrinkled_quadratic", 2)
    run = trajectory(fn, START, lambda p: RBO(p, lr=0.05, radius=0.3), steps=20)
    steps = run.closure_calls.diff()
    assert torch.all(steps >= 1)  # one call at the start point, more for the projection
    assert int(steps.max()) <= 21  # at most 1 + projection_steps
    assert len(run.stats) == 20
    assert [s["grad_evals"] for s in run.stats] == steps.tolist()
    assert run.unconverged_steps == sum(not s["converged"] for s in run.stats)
    torch.testing.assert_close(run.step_lengths, run.params.diff(dim=0).norm(dim=1))
    assert float(run.loss[-1]) < float(run.loss[0])


def test_affine_loss_rbo_follows_sgd_for_any_radius():
    """On f = aᵀθ the exact projection of the moved centre is θ − η a, whatever ρ."""
    a = torch.tensor([0.6, -0.3], dtype=torch.float64)
    sgd = trajectory(lambda t: a @ t, START, lambda p: torch.optim.SGD(p, lr=0.1), steps=10)
    rbo = trajectory(lambda t: a @ t, START, lambda p: RBO(p, lr=0.1, radius=2.0), steps=10)
    torch.testing.assert_close(rbo.params, sgd.params, rtol=0, atol=1e-6)


def test_centre_sits_on_the_landscape_rbo_rolls_on():
    """With weight decay λ and loss scale κ the ball rests on κ(f + λ/2 ‖θ‖²)."""
    fn = get_function("rastrigin", 2)
    run = trajectory(
        fn, START, lambda p: RBO(p, lr=1e-3, radius=0.5, weight_decay=0.2, loss_scale=2.0), 1
    )
    theta = START.clone().requires_grad_(True)
    landscape = 2.0 * (fn(theta) + 0.1 * theta @ theta)
    (g,) = torch.autograd.grad(landscape, theta)
    s = math.sqrt(1 + g @ g)
    expected = torch.cat([START - 0.5 * g / s, (landscape.detach() + 0.5 / s).reshape(1)])
    assert run.centres is not None
    torch.testing.assert_close(run.centres[0], expected, rtol=0, atol=1e-12)


def test_sam_counts_two_closure_calls_per_step():
    sam = pytest.importorskip("pytorch_optimizer").SAM  # the experiments extra
    fn = get_function("ackley", 2)
    run = trajectory(
        fn, START, lambda p: sam(p, torch.optim.SGD, rho=0.05, lr=0.01), 8, grad_before_step=True
    )
    assert torch.equal(run.closure_calls, 2 * torch.arange(9))
    assert float(run.loss[-1]) < float(run.loss[0])


def test_refuses_negative_steps():
    with pytest.raises(ValueError, match="steps"):
        trajectory(lambda t: t.sum(), START, lambda p: torch.optim.SGD(p, lr=0.1), -1)


@pytest.mark.parametrize("maximize", [False, True])
def test_centres_sit_on_the_landscape_rbo_rolls_on(maximize):
    # RBO rolls on f = κ(σ ℓ + λ/2 ‖θ‖²), σ = −1 when maximising: the centre is
    # c = (θ − ρ ∇f/s, f + ρ/s), s = √(1 + ‖∇f‖²), computed here by hand from ℓ's gradient
    fn = get_function("wrinkled_quadratic", 2)
    decay, scale, radius = 0.3, 2.0, 0.4
    run = trajectory(
        fn,
        START,
        lambda p: RBO(
            p, lr=0.01, radius=radius, weight_decay=decay, loss_scale=scale, maximize=maximize
        ),
        steps=3,
    )
    assert run.centres is not None
    sign = -1.0 if maximize else 1.0
    for theta, centre in zip(run.params, run.centres, strict=True):
        point = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(point), point)
        f = scale * (sign * float(fn(theta)) + decay / 2 * float(theta @ theta))
        slope = scale * (sign * grad + decay * theta)
        s = math.sqrt(1 + float(slope @ slope))
        torch.testing.assert_close(centre[:2], theta - radius / s * slope, rtol=1e-14, atol=1e-14)
        assert float(centre[2]) == pytest.approx(f + radius / s, rel=1e-14)


def test_a_true_gradient_near_a_stationary_point_is_not_taken_for_clipping():
    # 20 steps that end near a stationary point of a wrinkled quadratic (‖∇f‖ ≈ 1e-5) make the
    # projection warning fire; its gradient test must step locally there (a step of
    # √eps·|f|/‖∇f‖ ≈ 1e-3 crosses the wrinkles and read a slope 3.3 times the true one)
    fn = get_function("wrinkled_quadratic", 2)
    with pytest.warns(ProjectionWarning) as caught:
        trajectory(fn, START, lambda p: RBO(p, lr=0.05, radius=0.3), steps=20)
    message = str(caught[0].message)
    assert "matches its loss" in message and "clip" not in message.split("causes are")[0]
