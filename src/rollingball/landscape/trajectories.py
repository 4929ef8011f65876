"""Optimizer trajectories on synthetic landscapes, recorded step by step.

`trajectory` runs any ``torch.optim.Optimizer`` that accepts a closure (RBO, SGD, momentum,
SAM, ...) on a function of one parameter vector and records, for k = 0..steps: the
parameters θ_k, the loss f(θ_k), the closure calls spent so far and, for RBO, the ball
centre c_k = (θ_k − ρ g/s, f(θ_k) + ρ/s), s = √(1 + ‖g‖²), g = ∇f(θ_k), on the landscape
RBO rolls on: κ(±f + λ/2 ‖θ‖²) with its loss scale κ, weight decay λ and the sign of
`maximize` (`rollingball.spec`).
The loss and gradient used for the record are evaluated outside the optimizer's closure and
are not counted as its cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from rollingball.optim.geometry import ball_centre
from rollingball.optim.rbo import RBO
from rollingball.spec import height, slope

__all__ = ["Trajectory", "trajectory"]


@dataclass(frozen=True)
class Trajectory:
    """Per-step record of one run: row k is the state after k optimizer steps."""

    params: Tensor  # (steps + 1, d)
    loss: Tensor  # (steps + 1,)
    closure_calls: Tensor  # (steps + 1,) int64, cumulative; closure_calls[0] == 0
    centres: Tensor | None  # (steps + 1, d + 1): ball centre (θ part, height) for RBO
    stats: list[dict[str, Any]] = field(default_factory=list)  # optimizer.last_stats per step

    @property
    def end(self) -> Tensor:
        """θ after the last step."""
        return self.params[-1]

    @property
    def unconverged_steps(self) -> int:
        """Steps whose projection stopped before reaching its tolerance (RBO's stats)."""
        return sum(1 for s in self.stats if not s.get("converged", True))

    @property
    def step_lengths(self) -> Tensor:
        """‖θ_{k+1} − θ_k‖ for each step."""
        return self.params.diff(dim=0).norm(dim=1)


def _value_and_grad(fn: Callable[[Tensor], Tensor], theta: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        point = theta.detach().requires_grad_(True)
        value = fn(point)
        (grad,) = torch.autograd.grad(value, point)
    return value.detach(), grad


def trajectory(
    fn: Callable[[Tensor], Tensor],
    start: Tensor,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    steps: int,
    grad_before_step: bool = False,
) -> Trajectory:
    """Run ``make_optimizer([θ])`` for ``steps`` steps on ``fn`` from ``start``; record each step.

    ``fn`` maps a (d,) tensor to a scalar; ``start`` is copied (float64 is recommended).
    The optimizer's closure zeroes the gradient, evaluates f, back-propagates and counts
    itself. ``grad_before_step=True`` calls the closure once before every step (counted),
    for optimizers such as SAM that expect ``.grad`` to be filled when ``step`` starts.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    theta = start.detach().clone().reshape(-1).requires_grad_(True)
    optimizer = make_optimizer([theta])
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = fn(theta)
        loss.backward()
        return loss

    params, losses, counts, centres, stats = [], [], [], [], []
    for k in range(steps + 1):
        value, grad = _value_and_grad(fn, theta)
        params.append(theta.detach().clone())
        losses.append(value)
        counts.append(calls)
        if isinstance(optimizer, RBO):
            group = optimizer.param_groups[0]
            shape = {k: group[k] for k in ("weight_decay", "loss_scale", "maximize")}
            point = theta.detach()
            f = height(float(value), float(point.square().sum()), **shape)
            centre, top = ball_centre([point], [slope(grad, point, **shape)], f, group["radius"])
            centres.append(torch.cat([centre[0].reshape(-1), theta.new_tensor([top])]))
        if k < steps:
            if grad_before_step:
                closure()
            optimizer.step(cast(Callable[[], float], closure))  # torch types it as float
            last = getattr(optimizer, "last_stats", None)
            if isinstance(last, dict):
                stats.append(dict(last))
    return Trajectory(
        params=torch.stack(params),
        loss=torch.stack(losses),
        closure_calls=torch.tensor(counts, dtype=torch.int64),
        centres=torch.stack(centres) if centres else None,
        stats=stats,
    )
