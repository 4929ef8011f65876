"""A reference RBO step: the algorithm of docs/algorithm.md, written to be read.

`rbo_step` takes one step of the Rolling Ball Optimizer with the same decisions as
`rollingball.RBO` (rbo.py and projection.py) and none of its performance machinery: the
parameters are one flat vector θ ∈ Rⁿ, every vector the math names is formed, and every
inner product is taken when it is needed. It is the specification that the fast path is
tested against (tests/test_reference.py), as torch.optim tests its foreach kernels against
a plain loop. It is slow: use `rollingball.RBO` to train.

One step on one minibatch, with f and g = ∇f at θ from closure call 1:

    f = κ(±loss + Σ λ/2 ‖θ‖²)        the landscape (λ weight decay, κ loss scale, − to maximize)
    v = g, or v = μ v + g            the tangent direction (heavy ball)
    s = √(1 + ‖g‖²),  a = ρ/s        the centre c = (θ − a g, f + a)
    θ̃ = θ − a g − η v,  ỹ = f + a − ⟨g, η v⟩     the moved centre c̃ = c − η (v, ⟨g, v⟩)
    θ ← x* = argmin_x φ(x),   φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)²

The projection carries u = x − θ̃ (u = a g + η v at x = θ) along x and the height mismatch
m = f(x) − ỹ = (f(x) − f(θ)) − h with h = ỹ − f(θ) = a − ⟨g, η v⟩: both stay small and
exact as x moves, where x − θ̃ would cancel. Then φ = ½(‖u‖² + m²) and r = ∇φ = u + m g.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rollingball import defaults
from rollingball.optim.closure import StepClosure
from rollingball.spec import (
    ANDERSON_CONTRACTION,
    ANDERSON_EXTENSION,
    ANDERSON_REGULARIZATION,
    ANDERSON_TRUST,
    RIDGE_FLOOR,
    SOLVERS,
    backtrack_factor,
    phi_noise,
)


def rbo_step(
    params: Sequence[Tensor] | Sequence[Sequence[Tensor]],
    closure: Callable[[], Any],
    *,
    lr: float | Sequence[float],
    radius: float,
    projection: str = defaults.PROJECTION,
    projection_steps: int = defaults.PROJECTION_STEPS,
    projection_step_size: float = defaults.PROJECTION_STEP_SIZE,
    projection_tol: float = defaults.PROJECTION_TOL,
    momentum: float | Sequence[float] = 0.0,
    weight_decay: float | Sequence[float] = 0.0,
    loss_scale: float = 1.0,
    maximize: bool = False,
    anderson_memory: int = defaults.ANDERSON_MEMORY,
    momentum_buffers: dict[Tensor, Tensor] | None = None,
    fixed_randomness: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """One RBO step, in place on `params`; returns the closure's loss at θ and the step's
    statistics (the keys of `RBO.last_stats`).

    `params` is a list of tensors or a list of groups (lists of tensors); `lr`, `momentum`
    and `weight_decay` are one number or one per group; the other settings are `RBO`'s.
    With momentum, `momentum_buffers` maps each parameter to its v and is updated. The
    closure is called as `RBO` calls it (`StepClosure`: gradients set to None before every
    call, every call from the first call's random state when `fixed_randomness`). A
    non-finite loss or gradient raises FloatingPointError and leaves `params` as they were.
    """
    groups = _groups(params)
    lrs, mus, decays = (_per_group(value, len(groups)) for value in (lr, momentum, weight_decay))
    _check(projection, projection_steps, anderson_memory, mus, momentum_buffers)
    tensors = [p for group in groups for p in group]
    caller = StepClosure(closure, tensors, fixed_randomness and radius > 0)
    before = [p.detach().clone() for p in tensors]
    try:
        loss = caller()
        # as in torch.optim, a parameter without a gradient at θ sits out the step
        active = [[p for p in group if p.grad is not None] for group in groups]
        flat = [p for group in active for p in group]
        eta, decay = _coordinates(active, lrs), _coordinates(active, decays)
        landscape = _Landscape(caller, flat, decay, -1.0 if maximize else 1.0, loss_scale)
        theta = _flatten(flat)
        value, g = landscape.read(loss, theta)
        v = _direction(active, mus, g, momentum_buffers)
        if radius == 0:  # no ball: exactly SGD
            x, stats = theta - eta * v, dict(_SGD_STATS)
        else:
            a = radius / math.sqrt(1.0 + _dot(g, g))
            lift = a - _dot(g, eta * v)  # h = ỹ − f(θ)
            problem = _Projection(landscape, theta, value, lift, a * g + eta * v, g)
            if projection == "gd":
                outcome = _gd(problem, projection_steps, projection_step_size, projection_tol)
            else:
                outcome = _anderson(
                    problem,
                    projection_steps,
                    projection_step_size,
                    projection_tol,
                    anderson_memory,
                )
            x, stats = outcome.x, outcome.stats(projection_tol)
        _write(flat, x)
    except BaseException:  # nothing is lost
        _write(tensors, before)
        raise
    finally:
        caller.finish()
    _keep_momentum(active, mus, v, momentum_buffers)
    return loss, {**stats, "grad_evals": caller.calls, "skipped": False, "loss": _float(loss)}


_SGD_STATS = {
    "projection_steps": 0,
    "safeguard_steps": 0,
    "residual": 0.0,
    "converged": True,
    "blind_step": False,
}


# ---------------------------------------------------------------------------------------------
# The landscape and the projection problem


@dataclass
class _Landscape:
    """f(x) = κ(±loss + Σ λ/2 ‖x‖²) and g = ∇f(x) = κ(±∇loss + λ x), λ per coordinate."""

    closure: StepClosure
    params: list[Tensor]
    decay: Tensor
    sign: float
    scale: float

    def __call__(self, x: Tensor) -> tuple[float, Tensor]:
        """f(x) and ∇f(x): one closure call at x."""
        _write(self.params, x)
        return self.read(self.closure(), x)

    def read(self, loss: Any, x: Tensor) -> tuple[float, Tensor]:
        """f(x) and ∇f(x) from the closure's loss at x and the `.grad` it left."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        if any(grad.is_sparse for grad in grads):
            raise RuntimeError("RBO does not support sparse gradients")
        value = self.scale * (self.sign * _float(loss) + 0.5 * _dot(self.decay * x, x))
        g = self.scale * (self.sign * _flatten(grads) + self.decay * x)
        if not (math.isfinite(value) and bool(torch.isfinite(g).all())):
            raise FloatingPointError(f"non-finite loss or gradient at call {self.closure.calls}")
        return value, g


@dataclass
class _Point:
    """An evaluated point: x, u = x − θ̃, m = f(x) − ỹ, g = ∇f(x)."""

    x: Tensor
    u: Tensor
    m: float
    g: Tensor

    @property
    def phi(self) -> float:
        """φ = ½‖u‖² + ½m²."""
        return 0.5 * (_dot(self.u, self.u) + self.m**2)

    @property
    def residual(self) -> Tensor:
        """r = ∇φ = u + m g."""
        return self.u + self.m * self.g

    def newton(self) -> Tensor:
        """The Gauss–Newton step p = (I + g gᵀ)⁻¹ r = r − g ⟨g, r⟩/(1 + ‖g‖²) (Sherman–Morrison)."""
        r = self.residual
        return r - (_dot(self.g, r) / (1.0 + _dot(self.g, self.g))) * self.g


class _Projection:
    """φ around the moved centre: the start x₀ = θ (known without a closure call), and the
    evaluation of a trial point (one call)."""

    def __init__(
        self, landscape: _Landscape, theta: Tensor, value: float, lift: float, u: Tensor, g: Tensor
    ) -> None:
        self.landscape = landscape
        self.value = value  # f(θ)
        self.lift = lift  # h = ỹ − f(θ)
        self.start = _Point(theta, u, -lift, g)  # m(θ) = f(θ) − ỹ = −h
        self.eps = torch.finfo(theta.dtype).eps

    def evaluate(self, x: Tensor, u: Tensor) -> _Point:
        value, g = self.landscape(x)
        return _Point(x, u, (value - self.value) - self.lift, g)

    def noise(self, point: _Point) -> float:
        """φ's round-off level at a point: on φ itself and on the heights f(x), f(θ) and h
        that m = (f(x) − f(θ)) − h is made of."""
        return phi_noise(point.m, point.phi, self.value, self.lift, self.eps)


@dataclass
class _Outcome:
    """Where a projection ends: x, the trial points it evaluated, ‖r‖ at θ and at the last
    evaluated point, the rejected trial points, and whether it ended with a blind step."""

    x: Tensor
    steps: int
    initial: float
    final: float
    rejected: int = 0
    blind: bool = False

    def stats(self, tol: float) -> dict[str, Any]:
        residual = self.final / self.initial if self.initial > 0 else 0.0
        return {
            "projection_steps": self.steps,
            "safeguard_steps": self.rejected,
            "residual": residual,
            "converged": residual <= tol,
            "blind_step": self.blind,
        }


# ---------------------------------------------------------------------------------------------
# projection="gd": the authors' scheme


def _gd(problem: _Projection, budget: int, step_size: float, tol: float) -> _Outcome:
    """x_{k+1} = x_k − γ r(x_k) from x₀ = θ, K iterations at most; the K-th is taken blind.

    Stops when ‖r(x)‖ ≤ tol·‖r(θ)‖. With tol = 0 (the authors' code) ‖r‖ is looked at only at
    the first and the last iteration, as the fast solver does."""
    point = problem.start
    initial = norm = _checked_norm(point.residual)
    for k in range(budget):
        r = point.residual
        norm = _checked_norm(r)
        looks = tol > 0 or k in (0, budget - 1)
        if looks and norm <= tol * initial:
            return _Outcome(point.x, k, initial, norm)
        if k == budget - 1:  # r(x_K) would only decide a step not taken: the last one is blind
            return _Outcome(point.x - step_size * r, k, initial, norm, blind=True)
        point = problem.evaluate(point.x - step_size * r, point.u - step_size * r)
    raise AssertionError("unreachable: the last iteration returns")


# ---------------------------------------------------------------------------------------------
# projection="anderson": Anderson-accelerated Gauss–Newton with a safeguard and a blind step


@dataclass
class _LastStep:
    """The accepted step δ_last from `before` to the current point, as the blind rule sees it:
    ⟨g, δ_last⟩ at `before` and ‖δ_last‖²."""

    before: _Point
    grad_step: float
    step_sq: float


@dataclass
class _Verdict:
    """What the safeguard and the budget decide after a trial point."""

    accepted: bool
    step_size: float  # γ for the next trial step
    budget_left: bool  # another trial point may be evaluated


def _judge(
    problem: _Projection,
    point: _Point,
    trial: _Point,
    delta: Tensor,
    accelerated: bool,
    step_size: float,
    evaluated: int,
    rejected: int,
    budget: int,
) -> _Verdict:
    """The safeguard and the budget, in one place. A trial point x_k + δ whose φ exceeds
    φ(x_k) by more than round-off is rejected (the solver stays at x_k, forgets its history
    and takes the plain step next). A rejected plain step δ = −γ p shrinks γ by backtracking:
    along x_k + t δ, φ is known at t = 0 with slope d = ⟨r(x_k), δ⟩ and at t = 1, and the
    quadratic through them is least at t* = −d / (2(φ(1) − φ(0) − d)); γ ← γ t*, t* kept
    within ANDERSON_BACKTRACK (`rollingball.spec.backtrack_factor`). The budget is
    K trial points, plus one for each rejected one, up to ANDERSON_EXTENSION. What follows a
    spent budget is the blind step (`_blind_step_is_safe`)."""
    accepted = not trial.phi > point.phi + problem.noise(trial)
    rejected += not accepted
    if not accepted and not accelerated:
        step_size *= backtrack_factor(_dot(point.residual, delta), trial.phi - point.phi)
    extended = budget + min(rejected, ANDERSON_EXTENSION)
    return _Verdict(accepted, step_size, evaluated < extended)


def _anderson(
    problem: _Projection, budget: int, step_size: float, tol: float, memory: int
) -> _Outcome:
    """Iterate G(x) = x − γ p(x) with Anderson acceleration of memory m from x₀ = θ:
        α = argmin_α ‖p_k − D α‖,   x_{k+1} = x_k − ΔX α − γ (p_k − D α),
    ΔX_j = x_{j+1} − x_j and D_j = p_{j+1} − p_j the last m differences. Each trial point is
    judged by `_judge`; when the budget is spent before ‖r(x)‖ ≤ tol·‖r(θ)‖, the next step is
    taken unevaluated if `_blind_step_is_safe`."""
    point = problem.start
    p = point.newton()
    initial = norm = _checked_norm(point.residual)
    history: list[tuple[Tensor, Tensor]] = []  # (ΔX_j, D_j), oldest first
    last: _LastStep | None = None  # the step to `point`, if the blind rule may judge it
    after_rejection = False
    evaluated = rejected = 0
    budget_left = True
    while norm > tol * initial and budget_left:
        accelerated = bool(history)
        delta = _anderson_step(history, p, step_size)
        if len(history) == memory:
            history.pop(0)
        trial = problem.evaluate(point.x + delta, point.u + delta)
        evaluated += 1
        verdict = _judge(
            problem, point, trial, delta, accelerated, step_size, evaluated, rejected, budget
        )
        step_size, budget_left = verdict.step_size, verdict.budget_left
        if not verdict.accepted:
            history.clear()
            rejected += 1
            last, after_rejection = None, True
            continue
        # After a rejection the fast solver no longer holds g at x_k (it holds g at the
        # rejected point), so it judges no blind step after a step from there.
        step = _LastStep(point, _dot(point.g, delta), _dot(delta, delta))
        last = None if after_rejection else step
        new_p = trial.newton()
        history.append((delta, new_p - p))
        point, p, after_rejection = trial, new_p, False
        norm = _checked_norm(point.residual)
    x, blind = point.x, False
    if norm > tol * initial and last is not None:
        delta = _anderson_step(history, p, step_size)
        blind = _blind_step_is_safe(problem, point, last, delta)
        x = point.x + delta if blind else x
    return _Outcome(x, evaluated, initial, norm, rejected, blind)


def _anderson_step(history: list[tuple[Tensor, Tensor]], p: Tensor, step_size: float) -> Tensor:
    """δ = −ΔX α − γ (p − D α), α = (DᵀD + εI)⁻¹ Dᵀp, ε = ANDERSON_REGULARIZATION ·
    max_i ‖D_i‖² + RIDGE_FLOOR (the plain step −γ p without a history).

    DᵀD and Dᵀp are taken in the parameters' dtype, as the fast solver takes them: their
    round-off, amplified by the conditioning of the least squares, is the largest of a step
    (which a float32 run of this function then shows)."""
    delta = -step_size * p
    if not history:
        return delta
    dx = torch.stack([pair[0] for pair in history], dim=1)
    d = torch.stack([pair[1] for pair in history], dim=1)
    gram, rhs = (d.T @ d).double(), (d.T @ p).double()
    ridge = ANDERSON_REGULARIZATION * float(gram.diagonal().max()) + RIDGE_FLOOR
    eye = torch.eye(len(history), dtype=torch.float64)
    alpha = torch.linalg.solve(gram + ridge * eye, rhs).to(p.dtype)
    return delta - dx @ alpha + step_size * (d @ alpha)


def _blind_step_is_safe(
    problem: _Projection, point: _Point, last: _LastStep, delta: Tensor
) -> bool:
    """The blind last step δ from x_K is taken when

    1. the Gauss–Newton model φ̂(δ') = ½‖u + δ'‖² + ½(m + ⟨g, δ'⟩)² at x_{K−1} predicted
       φ(x_K) for the last step δ' within ANDERSON_TRUST · (its predicted decrease), which
       must exceed round-off;
    2. the iteration contracts: ‖δ‖ ≤ ANDERSON_CONTRACTION · ‖δ'‖;
    3. the model at x_K, charged twice the last step's model error scaled by ‖δ‖/‖δ'‖, still
       predicts φ(x_K + δ) < φ(x_K).
    """
    before = last.before
    predicted = 0.5 * _dot(point.u, point.u) + 0.5 * (before.m + last.grad_step) ** 2
    decrease = before.phi - predicted
    error = abs(point.phi - predicted)
    if not (decrease > problem.noise(point) and error <= ANDERSON_TRUST * decrease):
        return False
    step_sq = _dot(delta, delta)
    if step_sq > ANDERSON_CONTRACTION**2 * last.step_sq:
        return False
    landed = point.u.double() + delta.double()  # u at x_K + δ, not rounded
    model = 0.5 * _dot(landed, landed) + 0.5 * (point.m + _dot(point.g, delta)) ** 2
    return model + 2 * error * math.sqrt(step_sq / last.step_sq) < point.phi


# ---------------------------------------------------------------------------------------------
# Small helpers


def _check(
    projection: str,
    steps: int,
    memory: int,
    momentum: list[float],
    buffers: dict[Tensor, Tensor] | None,
) -> None:
    if projection not in SOLVERS:
        raise ValueError(f"unknown projection solver {projection!r}; choose one of {SOLVERS}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"projection_steps must be an int >= 1, got {steps}")
    if not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"anderson_memory must be an int >= 1, got {memory}")
    if any(momentum) and buffers is None:
        raise ValueError("momentum needs momentum_buffers: a dict kept from one step to the next")


def _groups(params: Sequence[Tensor] | Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
    """The parameters that require a gradient, as a list of groups."""
    if all(isinstance(p, Tensor) for p in params):
        return [[p for p in params if isinstance(p, Tensor) and p.requires_grad]]
    return [
        [p for p in group if p.requires_grad] for group in params if not isinstance(group, Tensor)
    ]


def _per_group(value: float | Sequence[float], groups: int) -> list[float]:
    values = [float(value)] * groups if isinstance(value, (int, float)) else list(value)
    if len(values) != groups:
        raise ValueError(f"one value per group is needed: {groups} groups, got {len(values)}")
    return values


def _coordinates(groups: list[list[Tensor]], values: list[float]) -> Tensor:
    """A group's value at each coordinate of θ (η, μ or λ as a vector)."""
    dtype = next(p.dtype for group in groups for p in group)
    pieces = [
        torch.full((p.numel(),), value, dtype=dtype, device=p.device)
        for group, value in zip(groups, values, strict=True)
        for p in group
    ]
    return torch.cat(pieces)


def _per_tensor(
    groups: list[list[Tensor]], values: list[float]
) -> tuple[list[Tensor], list[float]]:
    """The parameters in order, and each one's group value."""
    params = [p for group in groups for p in group]
    return params, [value for group, value in zip(groups, values, strict=True) for _ in group]


def _direction(
    groups: list[list[Tensor]],
    momentum: list[float],
    g: Tensor,
    buffers: dict[Tensor, Tensor] | None,
) -> Tensor:
    """v = g, or v = μ v_prev + g with momentum μ (v = g at the first step)."""
    params, mus = _per_tensor(groups, momentum)
    pieces = []
    for p, p_g, mu in zip(params, _split(g, params), mus, strict=True):
        previous = None if buffers is None or mu == 0 else buffers.get(p)
        pieces.append(p_g if previous is None else mu * previous.reshape(-1) + p_g)
    return torch.cat(pieces)


def _keep_momentum(
    groups: list[list[Tensor]],
    momentum: list[float],
    v: Tensor,
    buffers: dict[Tensor, Tensor] | None,
) -> None:
    """Store v for the next step, once the step succeeded (groups with momentum only)."""
    params, mus = _per_tensor(groups, momentum)
    for p, p_v, mu in zip(params, _split(v, params), mus, strict=True):
        if mu != 0 and buffers is not None:
            buffers[p] = p_v.view_as(p).clone()


def _flatten(tensors: list[Tensor]) -> Tensor:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise ValueError(f"the reference step needs parameters of one dtype, got {dtypes}")
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _split(x: Tensor, params: list[Tensor]) -> list[Tensor]:
    return list(x.split([p.numel() for p in params]))


@torch.no_grad()
def _write(params: list[Tensor], x: Tensor | list[Tensor]) -> None:
    """θ ← x (a flat vector, or one tensor per parameter)."""
    pieces = _split(x, params) if isinstance(x, Tensor) else x
    for p, piece in zip(params, pieces, strict=True):
        p.copy_(piece.view_as(p))


def _dot(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ in float64."""
    return float(torch.dot(a.double(), b.double()))


def _checked_norm(r: Tensor) -> float:
    """‖r‖; a non-finite one (an overflow) ends the step as a non-finite gradient does."""
    norm = float(torch.linalg.vector_norm(r, dtype=torch.float64))
    if not math.isfinite(norm):
        raise FloatingPointError(f"non-finite projection residual {norm}")
    return norm


def _float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
