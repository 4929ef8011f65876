"""Projection of the moved ball centre c̃ = (θ̃, ỹ) back onto the graph of the loss.

The new contact point is a stationary point of

    φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)²,   r(x) = ∇φ(x) = (x − θ̃) + (f(x) − ỹ) ∇f(x),

found by a local solver warm-started at x₀ = θ, where r(θ) is known without a closure call.
Every evaluation of r at a new point costs one closure call (forward + backward).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from rollingball.optim.geometry import copy_, inner

SOLVERS = ("anderson", "gd")


class ProjectionProblem(Protocol):
    """What a solver sees: the iterate x (the parameters) and residual evaluations."""

    def move(self, direction: list[Tensor], alpha: float = 1.0) -> None:
        """x ← x + α·direction."""

    def evaluate(self, newton: bool) -> tuple[list[Tensor], float, float]:
        """(direction, ‖r(x)‖, φ(x)) at the current x; direction is r(x), or with `newton`
        the Gauss–Newton direction (I + ∇f ∇fᵀ)⁻¹ r(x).

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
    Safeguard: an accelerated iterate with φ(x_{k+1}) > φ(x_k) is rejected; the solver goes
    back to x_k, forgets its history and takes the plain step x_k − γ p_k instead.
    Stops when ‖r(x)‖ ≤ tol·‖r(θ)‖; every trial point costs one closure call, at most K.
    Extra memory: 2m + 1 parameter-sized buffers (the differences and the previous p).
    """

    max_steps: int
    step_size: float
    tol: float
    memory: int
    regularization: float = 1e-10

    def solve(self, problem: ProjectionProblem) -> ProjectionResult:
        direction, initial, phi_current = problem.evaluate(newton=True)
        previous = [d.clone() for d in direction]
        x_steps: deque[list[Tensor]] = deque(maxlen=self.memory)
        p_steps: deque[list[Tensor]] = deque(maxlen=self.memory)
        norm, calls, safeguards = initial, 0, 0
        while calls < self.max_steps and norm > self.tol * initial:
            accelerated = len(x_steps) > 0
            step = self._step(previous, x_steps, p_steps)
            problem.move(step)
            direction, new_norm, phi = problem.evaluate(newton=True)
            calls += 1
            if accelerated and phi > phi_current:
                problem.move(step, -1.0)
                x_steps.clear()
                p_steps.clear()
                if calls == self.max_steps:
                    break  # back at x_k, whose residual `norm` is known
                step = self._step(previous, x_steps, p_steps)
                problem.move(step)
                direction, new_norm, phi = problem.evaluate(newton=True)
                calls += 1
                safeguards += 1
            x_steps.append(step)
            p_steps.append(list(torch._foreach_sub(direction, previous)))
            copy_(previous, direction)
            norm, phi_current = new_norm, phi
        return ProjectionResult(calls, initial, norm, safeguards)

    def _step(
        self,
        direction: list[Tensor],
        x_steps: deque[list[Tensor]],
        p_steps: deque[list[Tensor]],
    ) -> list[Tensor]:
        """δ = −ΔX α − γ (p − ΔP α), α from the regularised normal equations of ‖p − ΔP α‖."""
        step = list(torch._foreach_mul(direction, -self.step_size))
        if not x_steps:
            return step
        m = len(p_steps)
        gram = torch.empty(m, m, dtype=torch.float64)
        rhs = torch.empty(m, dtype=torch.float64)
        for i in range(m):
            rhs[i] = inner(p_steps[i], direction)
            for j in range(i + 1):
                gram[i, j] = gram[j, i] = inner(p_steps[i], p_steps[j])
        ridge = self.regularization * float(gram.diagonal().max()) + 1e-300
        alpha = torch.linalg.solve(gram + ridge * torch.eye(m, dtype=torch.float64), rhs)
        for a, dx, dp in zip(alpha.tolist(), x_steps, p_steps, strict=True):
            torch._foreach_add_(step, dx, alpha=-a)
            torch._foreach_add_(step, dp, alpha=self.step_size * a)
        return step


def make_solver(
    name: str, max_steps: int, step_size: float, tol: float, memory: int
) -> GradientDescentProjection | AndersonProjection:
    """The projection solver called `name` ("anderson" or "gd")."""
    if name == "gd":
        return GradientDescentProjection(max_steps, step_size, tol)
    if name == "anderson":
        return AndersonProjection(max_steps, step_size, tol, memory)
    raise ValueError(f"unknown projection solver {name!r}; choose one of {SOLVERS}")
