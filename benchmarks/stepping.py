"""Closures and single RBO steps shared by the benchmarks and the tests.

The benchmarks import this module from their own folder; the tests find it through pytest's
``pythonpath`` (pyproject.toml). Closures written differently on purpose (no ``zero_grad``,
clipping, poisoned values, counted calls, Dropout masks) stay in the tests that are about them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from rollingball import RBO


def loss_closure(opt: torch.optim.Optimizer, loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """The standard closure: ``opt.zero_grad(); loss = loss_fn(); loss.backward(); return loss``."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def model_closure(
    opt: torch.optim.Optimizer,
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> Callable[[], Tensor]:
    """The standard closure of ``loss(model(x), y)`` (cross-entropy unless told)."""
    return loss_closure(opt, lambda: loss(model(x), y))


def flat_params(params: Iterable[Tensor]) -> Tensor:
    """The parameters, detached, as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def digits(rows: int = 256, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """The first ``rows`` of scikit-learn's bundled digits: pixels / 16 in float64, labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:rows] / 16.0, dtype=torch.float64, device=device)
    return x, torch.tensor(data.target[:rows], device=device)


def sgd_steps(model: nn.Module, x: Tensor, y: Tensor, lr: float, steps: int) -> nn.Module:
    """``steps`` steps of plain SGD on the cross-entropy of ``model(x)``; returns the model."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()
    return model


def one_step(
    start: nn.Module, x: Tensor, y: Tensor, opt_class: Any = RBO, **options: Any
) -> tuple[Tensor, dict[str, Any]]:
    """One step of ``opt_class`` (RBO unless told) on the cross-entropy of ``model(x)``, from a
    copy of ``start``: the parameters after it as one vector, and the step's ``last_stats``."""
    model = copy.deepcopy(start)
    opt = opt_class(model.parameters(), **options)
    opt.step(model_closure(opt, model, x, y))
    return flat_params(model.parameters()), opt.last_stats


def roll_once(
    f: Callable[[Tensor], Tensor], theta: Tensor, **options: Any
) -> tuple[RBO, Tensor, list[Tensor]]:
    """One RBO step on f from θ: the optimizer, the new point and every point the closure saw."""
    x = theta.detach().clone().requires_grad_(True)
    opt = RBO([x], **options)
    points = []

    def closure() -> Tensor:
        points.append(x.detach().clone())
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    opt.step(closure)
    return opt, x.detach(), points


def moved_centre(
    f: Callable[[Tensor], Tensor], theta: Tensor, lr: float, radius: float
) -> tuple[Tensor, float]:
    """The moved ball's centre θ̃ = θ − ρ g/s − η g and height ỹ = f(θ) + ρ/s − η‖g‖²,
    s = √(1 + ‖g‖²), computed independently of the optimizer."""
    x = theta.detach().clone().requires_grad_(True)
    value = f(x)
    (g,) = torch.autograd.grad(value, x)
    value = value.detach()
    s = math.sqrt(1 + float(g @ g))
    return theta - radius * g / s - lr * g, float(value) + radius / s - lr * float(g @ g)


def phi(f: Callable[[Tensor], Tensor], x: Tensor, centre: Tensor, height: float) -> float:
    """φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)², computed independently of the optimizer."""
    with torch.no_grad():
        return 0.5 * float((x - centre).square().sum()) + 0.5 * (float(f(x)) - height) ** 2


def smooth_bowl(
    curvature: list[float], quartic: float, bump: float, width: float, at: list[float]
) -> Callable[[Tensor], Tensor]:
    """½ Σ λ_i x_i² + q/4 Σ x_i⁴ + b exp(−‖x − c‖²/2w²), c = ``at``."""
    scale = torch.tensor(curvature, dtype=torch.float64)
    centre = torch.tensor(at, dtype=torch.float64)

    def f(x: Tensor) -> Tensor:
        well = torch.exp(-(x - centre).square().sum() / (2 * width**2))
        return 0.5 * (scale * x * x).sum() + 0.25 * quartic * (x**4).sum() + bump * well

    return f
