"""RBO against independent computations: SGD, affine losses, brute-force projections, the
authors' update re-implemented here, and known minimisers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from rollingball import RBO

torch.set_default_dtype(torch.float32)

# The converged projection (RBO's default before the cost frontier chose a 2-call budget):
# the laws below are about the exact contact point, which far jumps need.
CONVERGED = {"projection_steps": 20, "anderson_memory": 5}


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)


def make_closure(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": 0.9},
        {"weight_decay": 1e-2},
        {"maximize": True},
        {"momentum": 0.5, "weight_decay": 0.1},
    ],
)
def test_radius_zero_is_exactly_sgd(options):
    x, y = batch()
    reference, model = small_mlp(), small_mlp()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, **options)
    rbo = RBO(model.parameters(), lr=0.1, radius=0.0, **options)
    calls = [0]
    for _ in range(20):
        sgd.step(make_closure(reference, sgd, x, y))
        rbo.step(make_closure(model, rbo, x, y, calls))
        assert rbo.last_stats["grad_evals"] == 1
    assert calls[0] == 20 and rbo.grad_evals == 20
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


class WithUnusedBranch(nn.Module):
    """A model whose second head takes no part in the loss: its parameters get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused = small_mlp(), nn.Linear(5, 3)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("options", [{"momentum": 0.9}, {"weight_decay": 0.1}])
def test_radius_zero_leaves_parameters_without_gradients_alone_like_sgd(options):
    x, y = batch()
    torch.manual_seed(3)
    reference = WithUnusedBranch()
    model = copy.deepcopy(reference)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, **options)
    rbo = RBO(model.parameters(), lr=0.1, radius=0.0, **options)
    for _ in range(5):
        sgd.step(make_closure(reference, sgd, x, y))
        rbo.step(make_closure(model, rbo, x, y))
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.unused.parameters())


def affine_problem(dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, generator=generator, dtype=torch.float64)
    theta = torch.randn(dim, generator=generator, dtype=torch.float64)
    return a, theta


@pytest.mark.parametrize("radius", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_affine_loss_steps_exactly_like_gradient_descent(radius, momentum):
    """For f(θ) = aᵀθ + 3 the exact projection is θ − η v (v = g, or the heavy-ball velocity)."""
    a, theta0 = affine_problem(7, seed=3)
    theta = theta0.clone().requires_grad_(True)
    opt = RBO([theta], lr=0.05, radius=radius, momentum=momentum)

    def closure():
        opt.zero_grad()
        loss = a @ theta + 3.0
        loss.backward()
        return loss

    expected, velocity = theta0.clone(), torch.zeros_like(theta0)
    for _ in range(5):
        opt.step(closure)
        velocity = momentum * velocity + a
        expected = expected - 0.05 * velocity
        assert opt.last_stats["converged"]
        assert opt.last_stats["grad_evals"] == 2  # one Gauss–Newton step is exact on a plane
    torch.testing.assert_close(theta.detach(), expected, rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@example(radius=4.0, lr=1e-4, slope=[1e-4])  # φ ≈ 8 changes by 1e-16: its round-off must not reject
@given(
    radius=st.floats(0.0, 20.0),
    lr=st.floats(1e-4, 2.0),
    slope=st.lists(st.floats(-5, 5), min_size=1, max_size=6),
)
def test_affine_law_holds_for_all_radii_and_rates(radius, lr, slope):
    a = torch.tensor(slope, dtype=torch.float64)
    theta = torch.ones_like(a).requires_grad_(True)
    opt = RBO([theta], lr=lr, radius=radius)

    def closure():
        opt.zero_grad()
        loss = a @ theta
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(theta.detach(), 1.0 - lr * a, rtol=1e-9, atol=1e-9)


def test_per_group_learning_rates_on_an_affine_loss():
    a, b = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    u = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = RBO([{"params": [u], "lr": 0.1}, {"params": [w], "lr": 1.0}], radius=2.0)

    def closure():
        opt.zero_grad()
        loss = a @ u + b @ w
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(u.detach(), -0.1 * a, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.detach(), -1.0 * b, rtol=0, atol=1e-12)


def test_loss_scale_stretches_the_vertical_axis():
    """κ f is the landscape: on a plane the step is θ − η κ g."""
    a, theta0 = affine_problem(4, seed=5)
    theta = theta0.clone().requires_grad_(True)
    opt = RBO([theta], lr=0.1, radius=0.5, loss_scale=3.0)

    def closure():
        opt.zero_grad()
        loss = a @ theta
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(theta.detach(), theta0 - 0.3 * a, rtol=0, atol=1e-12)


# --- brute force: the new parameter is the nearest point of the graph to the moved centre ---

FUNCTIONS_1D = {
    "quadratic": lambda x: 0.7 * x**2,
    "quartic": lambda x: 0.25 * x**4 - x + 0.5,
    "wiggly": lambda x: 0.5 * x**2 + 0.3 * torch.sin(3 * x),
    "log_cosh": lambda x: torch.log(torch.cosh(2 * x)),
}


def moved_centre(f, theta: torch.Tensor, lr: float, radius: float):
    """c̃ = (θ − ρ g/s − η g, f + ρ/s − η ‖g‖²), computed here from DESIGN §2."""
    x = theta.clone().requires_grad_(True)
    value = f(x).sum()
    (g,) = torch.autograd.grad(value, x)
    s = math.sqrt(1 + float(g @ g))
    return (theta - radius * g / s - lr * g).detach(), value.item() + radius / s - lr * float(g @ g)


def nearest_point_1d(
    f, centre: float, height: float, half_width: float = 3.0
) -> tuple[float, float]:
    """Dense search of argmin_x (x − θ̃)² + (f(x) − ỹ)², refined twice; also the runner-up's gap."""
    grid = np.linspace(centre - half_width, centre + half_width, 600_001)
    values = f(torch.from_numpy(grid)).numpy()
    distance = (grid - centre) ** 2 + (values - height) ** 2
    best = int(np.argmin(distance))
    step = grid[1] - grid[0]
    for _ in range(2):
        fine = np.linspace(grid[best] - step, grid[best] + step, 20_001)
        fine_distance = (fine - centre) ** 2 + (f(torch.from_numpy(fine)).numpy() - height) ** 2
        grid, best, step = fine, int(np.argmin(fine_distance)), fine[1] - fine[0]
    # local minima of the coarse distance other than the best one, to check uniqueness
    coarse = (distance[1:-1] < distance[:-2]) & (distance[1:-1] < distance[2:])
    minima = np.sort(distance[1:-1][coarse])
    gap = float(minima[1] - minima[0]) if len(minima) > 1 else math.inf
    return float(grid[best]), gap


@pytest.mark.parametrize("name", sorted(FUNCTIONS_1D))
@pytest.mark.parametrize(
    ("theta0", "lr", "radius"), [(1.3, 0.1, 0.2), (-0.8, 0.3, 0.5), (2.0, 0.05, 0.05)]
)
def test_default_solver_finds_the_nearest_graph_point_1d(name, theta0, lr, radius):
    f = FUNCTIONS_1D[name]
    theta = torch.tensor([theta0], dtype=torch.float64)
    target, height = moved_centre(f, theta, lr, radius)
    expected, gap = nearest_point_1d(f, float(target), height)
    assert gap > 1e-3, "the nearest point must be unique for this check"
    x = theta.clone().requires_grad_(True)
    opt = RBO([x], lr=lr, radius=radius, projection_tol=1e-10, projection_steps=50)

    def closure():
        opt.zero_grad()
        loss = f(x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_stats["converged"]
    assert abs(x.item() - expected) < 1e-5


def surface(p: torch.Tensor) -> torch.Tensor:
    return 0.5 * p[..., 0] ** 2 + 1.5 * p[..., 1] ** 2 + 0.2 * torch.sin(2 * p[..., 0] + p[..., 1])


def nearest_point_2d(centre: np.ndarray, height: float) -> np.ndarray:
    """Dense 2-D search on a grid around θ̃, zoomed in three times."""
    best, half = centre.copy(), 1.5
    for _ in range(4):
        axis = np.linspace(-half, half, 801)
        xs, ys = np.meshgrid(best[0] + axis, best[1] + axis, indexing="ij")
        points = torch.from_numpy(np.stack([xs, ys], axis=-1))
        values = surface(points).numpy()
        distance = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 + (values - height) ** 2
        i, j = np.unravel_index(np.argmin(distance), distance.shape)
        best, half = np.array([xs[i, j], ys[i, j]]), 4 * (axis[1] - axis[0])
    return best


@pytest.mark.parametrize(
    ("start", "lr", "radius"), [((1.0, 0.6), 0.1, 0.3), ((-0.5, 1.0), 0.2, 0.1)]
)
def test_default_solver_finds_the_nearest_graph_point_2d(start, lr, radius):
    theta = torch.tensor(start, dtype=torch.float64)
    target, height = moved_centre(surface, theta, lr, radius)
    expected = nearest_point_2d(target.numpy(), height)
    x = theta.clone().requires_grad_(True)
    opt = RBO([x], lr=lr, radius=radius, projection_tol=1e-10, projection_steps=50)

    def closure():
        opt.zero_grad()
        loss = surface(x)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_stats["converged"]
    np.testing.assert_allclose(x.detach().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "radius"),
    # the ball fits everywhere: ρ is below the smallest radius of curvature 1/max f''
    [("wiggly", 0.05), ("wiggly", 0.25), ("quadratic", 0.6)],
)
def test_reseated_ball_touches_the_graph(name, radius):
    """After a converged step the ball x* + ρ ν(x*) lies at distance exactly ρ from the graph."""
    f = FUNCTIONS_1D[name]
    x = torch.tensor([1.1], dtype=torch.float64, requires_grad=True)
    opt = RBO([x], lr=0.2, radius=radius, projection_tol=1e-10, projection_steps=50)

    def closure():
        opt.zero_grad()
        loss = f(x).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        assert opt.last_stats["converged"]
        point = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(point).sum(), point)
        s = math.sqrt(1 + float(g) ** 2)
        x0, height = point.item(), f(point).sum().item()
        cx, cy = x0 - radius * float(g) / s, height + radius / s
        grid = np.linspace(cx - 3 * radius, cx + 3 * radius, 2_000_001)
        gaps = np.hypot(grid - cx, f(torch.from_numpy(grid)).numpy() - cy)
        assert abs(gaps.min() - radius) < 1e-7


# --- the authors' scheme, re-implemented here from DESIGN §2 ---


def authors_update(
    loss_fn, theta: torch.Tensor, lr: float, radius: float, steps: int, gamma: float
):
    """K steps of x ← x − γ r(x) from x = θ, r re-evaluated at every x (K + 1 evaluations)."""

    def value_and_grad(point):
        point = point.detach().requires_grad_(True)
        value = loss_fn(point)
        (grad,) = torch.autograd.grad(value, point)
        return value.item(), grad

    value, g = value_and_grad(theta)
    s = torch.sqrt(1 + g @ g)
    target = theta - radius * g / s - lr * g
    height = value + radius / s - lr * (g @ g)
    x = theta.clone()
    for _ in range(steps):
        fx, gx = value_and_grad(x)
        x = x - gamma * ((x - target) + (fx - height) * gx)
    return x.detach()


def test_gd_mode_reproduces_the_authors_scheme():
    torch.manual_seed(0)
    x_data, y_data = torch.randn(64, 4), torch.randn(64)
    w1, w2 = torch.randn(4 * 8) * 0.5, torch.randn(8) * 0.5
    theta0 = torch.cat([w1, w2])

    def loss_fn(flat):
        hidden = torch.tanh(x_data @ flat[:32].view(4, 8))
        return ((hidden @ flat[32:] - y_data) ** 2).mean()

    theta = theta0.clone().requires_grad_(True)
    steps, gamma = 5, 0.1
    opt = RBO(
        [theta],
        lr=0.1,
        radius=0.5,
        projection="gd",
        projection_steps=steps,
        projection_step_size=gamma,
        projection_tol=0,
    )
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    reference = theta0.clone()
    for _ in range(50):
        opt.step(closure)
        assert opt.last_stats["grad_evals"] == steps
        reference = authors_update(loss_fn, reference, 0.1, 0.5, steps, gamma)
    assert calls[0] == 50 * steps
    torch.testing.assert_close(theta.detach(), reference, rtol=0, atol=1e-6)


def strongly_convex_quadratic():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = q @ q.T / 6 + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    return a, b, torch.linalg.solve(a, b), float(torch.linalg.eigvalsh(a).max())


def roll_on_quadratic(a, b, lr: float, radius: float, steps: int) -> list[torch.Tensor]:
    theta = torch.zeros(len(b), dtype=torch.float64, requires_grad=True)
    opt = RBO([theta], lr=lr, radius=radius, **CONVERGED)

    def closure():
        opt.zero_grad()
        loss = 0.5 * theta @ a @ theta - b @ theta
        loss.backward()
        return loss

    path = []
    for _ in range(steps):
        opt.step(closure)
        path.append(theta.detach().clone())
    return path


# Near a minimum with curvature λ the projection magnifies the centre's step by 1/(1 − ρλ)
# (radial projection from the centre of curvature), so RBO is gradient descent with the
# effective rate η/(1 − ρλ): it converges iff ρ < ρ_c = (1 − ηλ/2)/λ. Here λ_max ≈ 3.23,
# η = 0.3, so ρ_c ≈ 0.16.
@pytest.mark.parametrize("radius", [0.01, 0.05, 0.1, 0.15])
def test_converges_to_the_minimiser_of_a_strongly_convex_quadratic(radius):
    a, b, minimiser, curvature = strongly_convex_quadratic()
    assert radius < (1 - 0.3 * curvature / 2) / curvature
    path = roll_on_quadratic(a, b, lr=0.3, radius=radius, steps=400)
    torch.testing.assert_close(path[-1], minimiser, rtol=0, atol=1e-8)


@pytest.mark.parametrize("radius", [0.25, 0.5, 2.0])
def test_above_the_critical_radius_the_contact_point_bounces_around_the_minimiser(radius):
    """Past ρ_c the contact point alternates between the valley's walls: a 2-cycle whose
    midpoint is the minimiser, while the ball itself sits still above it."""
    a, b, minimiser, _ = strongly_convex_quadratic()
    *_, before, last = roll_on_quadratic(a, b, lr=0.3, radius=radius, steps=400)
    assert float((last - minimiser).norm()) > 0.1
    torch.testing.assert_close((before + last) / 2, minimiser, rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    ("curvature", "lr", "radius"), [(2.0, 0.1, 0.2), (1.0, 0.5, 0.4), (4.0, 0.05, 0.1)]
)
def test_effective_learning_rate_near_a_minimum(curvature, lr, radius):
    """x_{k+1}/x_k → 1 − ηλ/(1 − ρλ) on f = λx²/2."""
    x = torch.tensor([1e-4], dtype=torch.float64, requires_grad=True)
    opt = RBO([x], lr=lr, radius=radius, projection_tol=1e-12, projection_steps=50)

    def closure():
        opt.zero_grad()
        loss = 0.5 * curvature * x.pow(2).sum()
        loss.backward()
        return loss

    before = x.item()
    opt.step(closure)
    expected = 1 - lr * curvature / (1 - radius * curvature)
    assert abs(x.item() / before - expected) < 1e-6


def wrinkled(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x**2 + 0.05 * torch.sin(50 * x)


def roll_on_wrinkles(radius: float, steps: int = 3000) -> tuple[float, float]:
    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = RBO([x], lr=0.01, radius=radius, **CONVERGED)

    def closure():
        opt.zero_grad()
        loss = wrinkled(x).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return x.item(), float(wrinkled(x.detach()).sum())


@pytest.mark.parametrize("radius", [0.0, 0.001, 0.01])
def test_small_balls_stay_in_the_first_wrinkle(radius):
    x, f = roll_on_wrinkles(radius)
    assert abs(x - 1.96) < 0.01
    assert abs(f - 1.89) < 0.01


@pytest.mark.parametrize("radius", [0.2, 0.5, 1.0])
def test_large_balls_iron_the_wrinkles_out(radius):
    _, f = roll_on_wrinkles(radius)
    assert f < 0.5


def test_reductions_are_accurate_and_do_not_overflow_in_half_precision():
    """‖a‖² and ⟨a, b⟩ as the step computes them: float32 sums of 10⁶ terms agree with float64
    to 1e-5, and float16 tensors whose inner product exceeds float16's 65504 stay finite."""
    from rollingball.optim.geometry import inner_device, squared_norm_device, to_host

    generator = torch.Generator().manual_seed(0)
    a = [torch.rand(1_000_000, generator=generator) + 0.5, torch.rand(3, 5, generator=generator)]
    b = [torch.rand(1_000_000, generator=generator), torch.rand(3, 5, generator=generator)]
    exact_sq = sum(float((t.double() ** 2).sum()) for t in a)
    exact_inner = sum(float((s.double() * t.double()).sum()) for s, t in zip(a, b, strict=True))
    norm_sq, product = to_host([squared_norm_device(a), inner_device(a, b)])
    assert norm_sq == pytest.approx(exact_sq, rel=1e-5)
    assert product == pytest.approx(exact_inner, rel=1e-5)
    half = [torch.full((100_000,), 2.0, dtype=torch.float16)]
    norm_sq, product = to_host([squared_norm_device(half), inner_device(half, half)])
    assert norm_sq == pytest.approx(400_000.0, rel=1e-3)
    assert product == pytest.approx(400_000.0, rel=1e-3)


@pytest.mark.parametrize(
    ("lr", "options"),
    [(0.5, {}), (0.5, {"projection_steps": 5, "anderson_memory": 2}), (8.0, {})],
)
def test_a_first_newton_step_left_as_a_multiple_of_the_offset_gives_the_same_steps(
    monkeypatch, lr, options
):
    """Without momentum p₀ = (s + c) g is not formed: the first move goes along g, u = s' g,
    and the first difference is p₁ − (s + c)/s' · u. Forming p₀ from g (what float16
    parameters do) takes the same steps, whether the first trial point is accepted (lr 0.5)
    or rejected by the safeguard (lr 8: p₀ is then formed from u, to go back)."""
    from rollingball.optim import projection

    def train(formed: bool) -> tuple[list[torch.Tensor], int]:
        if formed:
            monkeypatch.setattr(projection, "WIDE_RANGE", ())
        model = small_mlp().double()
        x, y = batch()
        opt = RBO(model.parameters(), lr=lr, radius=0.3, **options)
        rejected = 0
        for _ in range(6):
            opt.step(make_closure(model, opt, x.double(), y))
            rejected += opt.last_stats["safeguard_steps"]
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()], rejected

    (lazy, lazy_rejected), (formed, formed_rejected) = train(False), train(True)
    assert lazy_rejected == formed_rejected
    assert (lazy_rejected >= 1) == (lr == 8.0)  # lr 8: the first trial point is rejected
    for a, b in zip(lazy, formed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
