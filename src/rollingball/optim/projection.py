"""Projection of the moved ball centre c̃ = (θ̃, ỹ) back onto the graph of the loss.

The new contact point is a stationary point of

    φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)²,   r(x) = ∇φ(x) = (x − θ̃) + (f(x) − ỹ) ∇f(x),

found by a local solver warm-started at x₀ = θ, where r(θ) is known without a closure call.
Every evaluation of r at a new point costs one closure call (forward + backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from rollingball.optim.geometry import inners

SOLVERS = ("anderson", "gd")


class ProjectionProblem(Protocol):
    """What a solver sees: the iterate x (the parameters) and residual evaluations."""

    def move(self, direction: list[Tensor], alpha: float = 1.0) -> None:
        """x ← x + α·direction."""

    phi_noise: float
    """The round-off level of the last φ: changes of φ below it are noise."""

    def evaluate(self, newton: bool) -> tuple[list[Tensor], float, float]:
        """(direction, ‖r(x)‖, φ(x)) at the current x; direction is r(x), or with `newton`
        the Gauss–Newton direction (I + ∇f ∇fᵀ)⁻¹ r(x) in a new buffer of its own.

        The first call answers for x₀ = θ without a closure call; every later call costs one.
        The direction may live in the parameters' `.grad` tensors, which the next call reuses.
        """


@dataclass
class ProjectionResult:
    """Outcome of one projection: iterations and the residual norms at start and end."""

    steps: int
    initial_norm: float
    final_norm: float
    safeguard_steps: int = 0


@dataclass
class GradientDescentProjection:
    """The authors' scheme: x_{k+1} = x_k − γ r(x_k), at most K iterations.

    Stops early when ‖r(x)‖ ≤ tol·‖r(θ)‖. With tol = 0 it runs all K iterations and skips
    the pointless evaluation after the last one: K closure calls per optimizer step in all,
    where a scheme that re-evaluates r(θ) spends K + 1. Extra memory: none.
    """

    max_steps: int
    step_size: float
    tol: float

    def solve(self, problem: ProjectionProblem) -> ProjectionResult:
        residual, initial, _ = problem.evaluate(newton=False)
        norm, steps = initial, 0
        while steps < self.max_steps and norm > self.tol * initial:
            problem.move(residual, -self.step_size)
            steps += 1
            if self.tol == 0 and steps == self.max_steps:
                break
            residual, norm, _ = problem.evaluate(newton=False)
        return ProjectionResult(steps, initial, norm)


@dataclass
class AndersonProjection:
    """Anderson-accelerated Gauss–Newton iteration, with a safeguard.

    φ is a least-squares problem whose Gauss–Newton matrix is I + g gᵀ (g = ∇f(x)), so the
    fixed-point map is G(x) = x − γ p(x), p = (I + g gᵀ)⁻¹ r (Sherman–Morrison: one inner
    product). One such step from θ is exactly the gradient step θ − η g when ρ = 0, and the
    exact projection for an affine f. With the last m differences ΔX_j = x_{j+1} − x_j and
    ΔP_j = p_{j+1} − p_j,
        α = argmin_α ‖p_k − ΔP α‖,   x_{k+1} = x_k − ΔX α − γ (p_k − ΔP α).
    Safeguard: an iterate with φ(x_{k+1}) > φ(x_k) (beyond round-off) is rejected; the solver
    goes back to x_k, forgets its history and takes the plain step x_k − γ p_k instead, halving
    γ each time a plain step is rejected. So φ never increases: the solver descends to a local
    minimum of φ (a locally nearest point), never to a saddle of φ, which a bare fixed-point
    iteration can converge to when the ball is larger than the landscape's curvature radius.
    Stops when ‖r(x)‖ ≤ tol·‖r(θ)‖; every trial point costs one closure call, at most K.
    Extra memory: 2m + 3 parameter-sized buffers at the peak (m + 1 differences of each kind
    and the current p), besides the two every step holds (the snapshot and u = x − θ̃).
    """

    max_steps: int
    step_size: float
    tol: float
    memory: int
    regularization: float = 1e-10

    def solve(self, problem: ProjectionProblem) -> ProjectionResult:
        previous, initial, phi_current = problem.evaluate(newton=True)
        history = _History(self.memory)
        norm, calls, safeguards, step_size = initial, 0, 0, self.step_size
        while calls < self.max_steps and norm > self.tol * initial:
            accelerated = bool(history.x_steps)
            step = self._step(previous, history, step_size)
            problem.move(step)
            direction, new_norm, phi = problem.evaluate(newton=True)
            calls += 1
            if phi > phi_current + problem.phi_noise:  # reject: back to x_k (p_k = `previous`)
                problem.move(step, -1.0)
                history.clear()
                safeguards += 1
                if not accelerated:
                    step_size /= 2
                continue
            torch._foreach_neg_(previous)  # becomes ΔP = p_{k+1} − p_k in place
            torch._foreach_add_(previous, direction)
            history.append(step, previous)
            previous, norm, phi_current = direction, new_norm, phi
        return ProjectionResult(calls, initial, norm, safeguards)

    def _step(self, direction: list[Tensor], history: _History, step_size: float) -> list[Tensor]:
        """δ = −ΔX α − γ (p − ΔP α), α from the regularised normal equations of ‖p − ΔP α‖."""
        step = list(torch._foreach_mul(direction, -step_size))
        if not history.x_steps:
            return step
        m = len(history.p_steps)
        gram = torch.tensor(history.gram, dtype=torch.float64)
        rhs = torch.tensor(inners(history.p_steps, direction), dtype=torch.float64)
        ridge = self.regularization * float(gram.diagonal().max()) + 1e-300
        alpha = torch.linalg.solve(gram + ridge * torch.eye(m, dtype=torch.float64), rhs)
        for a, dx, dp in zip(alpha.tolist(), history.x_steps, history.p_steps, strict=True):
            torch._foreach_add_(step, dx, alpha=-a)
            torch._foreach_add_(step, dp, alpha=step_size * a)
        return step


class _History:
    """The last m differences ΔX_j, ΔP_j and the Gram matrix ⟨ΔP_i, ΔP_j⟩, kept up to date
    with m new inner products per iteration instead of m²."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.x_steps: list[list[Tensor]] = []
        self.p_steps: list[list[Tensor]] = []
        self.gram: list[list[float]] = []

    def append(self, dx: list[Tensor], dp: list[Tensor]) -> None:
        if len(self.x_steps) == self.memory:
            del self.x_steps[0], self.p_steps[0], self.gram[0]
            for row in self.gram:
                del row[0]
        products = inners([*self.p_steps, dp], dp)
        for row, product in zip(self.gram, products, strict=False):
            row.append(product)
        self.gram.append(products)
        self.x_steps.append(dx)
        self.p_steps.append(dp)

    def clear(self) -> None:
        self.x_steps.clear()
        self.p_steps.clear()
        self.gram.clear()


def make_solver(
    name: str, max_steps: int, step_size: float, tol: float, memory: int
) -> GradientDescentProjection | AndersonProjection:
    """The projection solver called `name` ("anderson" or "gd")."""
    if name == "gd":
        return GradientDescentProjection(max_steps, step_size, tol)
    if name == "anderson":
        return AndersonProjection(max_steps, step_size, tol, memory)
    raise ValueError(f"unknown projection solver {name!r}; choose one of {SOLVERS}")
