"""Synthetic loss landscapes as torch functions, differentiated by autograd.

Every function takes ``theta`` of shape ``(..., d)`` and returns the loss of shape ``(...)``,
so one call evaluates a whole grid. Gradients come from autograd, never from hand-written
formulas. `SyntheticFunction` bundles a function with a plotting domain and its known global
minimisers where they are known; `get_function` builds one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FUNCTIONS",
    "GaussianWells",
    "SyntheticFunction",
    "ackley",
    "get_function",
    "rastrigin",
    "rosenbrock",
    "weierstrass",
    "weierstrass_like",
    "wrinkled_quadratic",
]


def weierstrass_like(theta: Tensor, n: int = 100) -> Tensor:
    """f_n(θ) = Σ_i Σ_{k=1}^{n} sin(k² θ_i) / k², summed over the coordinates θ_i.

    The paper's Fig. 2 landscape (partial sum of Riemann's function). The gradient is
    ∂f/∂θ_i = Σ_k cos(k² θ_i) (no 1/k²), of size up to n: the wrinkles are steep.
    At θ_i = 4π/3 (mod 2π), k² ≡ 1 (mod 3) for 3 ∤ k gives f = −(√3/2) Σ_{k≤n, 3∤k} 1/k² per
    coordinate (→ −2√3π²/27); no sample of f_100 on a fine grid lies lower (numerical fact).
    """
    k2 = torch.arange(1, n + 1, dtype=theta.dtype, device=theta.device) ** 2
    return (torch.sin(theta[..., None] * k2) / k2).sum(dim=(-1, -2))


def weierstrass(theta: Tensor, a: float = 0.5, b: int = 3, n: int = 20) -> Tensor:
    """W(θ) = Σ_i Σ_{k=0}^{n-1} a^k cos(b^k π θ_i), the classical Weierstrass function.

    For odd b every term is −a^k at odd integers, so the global minimisers are the points
    with all coordinates odd integers, with value −d (1 − a^n) / (1 − a).
    ``n = 20`` keeps b^k π θ well inside float64 precision; later terms are below 1e-6.
    """
    k = torch.arange(n, dtype=theta.dtype, device=theta.device)
    return (a**k * torch.cos(b**k * math.pi * theta[..., None])).sum(dim=(-1, -2))


def wrinkled_quadratic(theta: Tensor, a: float = 0.1, b: float = 10.0) -> Tensor:
    """q(θ) = ½‖θ‖² + a Σ_i sin(b θ_i).

    Stationary points satisfy θ_i = −a b cos(b θ_i), so every minimiser lies in
    |θ_i| ≤ a b; q is convex (one minimiser) when a b² < 1, wrinkled otherwise.
    """
    return 0.5 * (theta**2).sum(-1) + a * torch.sin(b * theta).sum(-1)


def rastrigin(theta: Tensor, a: float = 10.0) -> Tensor:
    """R(θ) = a d + Σ_i (θ_i² − a cos(2π θ_i)); global minimum 0 at θ = 0."""
    return a * theta.shape[-1] + (theta**2 - a * torch.cos(2 * math.pi * theta)).sum(-1)


def rosenbrock(theta: Tensor) -> Tensor:
    """ρ(θ) = Σ_{i<d} 100 (θ_{i+1} − θ_i²)² + (1 − θ_i)²; global minimum 0 at θ = 1 (d ≥ 2)."""
    x, y = theta[..., :-1], theta[..., 1:]
    return (100.0 * (y - x**2) ** 2 + (1.0 - x) ** 2).sum(-1)


def ackley(theta: Tensor, a: float = 20.0, b: float = 0.2, c: float = 2 * math.pi) -> Tensor:
    """A(θ) = −a exp(−b √(mean θ_i²)) − exp(mean cos(c θ_i)) + a + e; minimum 0 at θ = 0.

    The cone tip at 0 is not differentiable; autograd returns the subgradient 0 there
    (the square root is guarded so that no NaN appears).
    """
    ms = (theta**2).mean(-1)
    positive = ms > 0
    rms = torch.where(positive, torch.sqrt(torch.where(positive, ms, torch.ones_like(ms))), 0.0)
    return -a * torch.exp(-b * rms) - torch.exp(torch.cos(c * theta).mean(-1)) + a + math.e


class GaussianWells:
    """G(θ) = −Σ_{i=1}^{m} exp(−‖θ − m_i‖² / (2σ²)) + ‖θ‖², wells m_i ~ U[−3, 3]^d.

    The wells are drawn with ``numpy.random.RandomState(seed).uniform(-3, 3, (m, d))``,
    which for ``seed=0, d=2`` are exactly the wells of the authors' experiment.
    No minimiser is known in closed form.
    """

    def __init__(self, dim: int = 2, wells: int = 1000, sigma: float = 0.1, seed: int = 0) -> None:
        centres = np.random.RandomState(seed).uniform(-3.0, 3.0, (wells, dim))
        self.centres = torch.from_numpy(centres)
        self.sigma = sigma

    def __call__(self, theta: Tensor) -> Tensor:
        centres = self.centres.to(dtype=theta.dtype, device=theta.device)
        r2 = ((theta[..., None, :] - centres) ** 2).sum(-1)
        return -torch.exp(-r2 / (2 * self.sigma**2)).sum(-1) + (theta**2).sum(-1)


@dataclass(frozen=True)
class SyntheticFunction:
    """A landscape with its plotting box and, where known, its global minimisers."""

    name: str
    fn: Callable[[Tensor], Tensor]
    dim: int
    domain: tuple[float, float]  # the same interval for every coordinate
    start: float  # default start coordinate (every coordinate) for trajectories
    minimizers: Tensor | None = None  # shape (k, dim): some known global minimisers
    minimum: float | None = None

    def __call__(self, theta: Tensor) -> Tensor:
        return self.fn(theta)


def _weierstrass_like(dim: int) -> SyntheticFunction:  # minimum established numerically
    low = -math.sqrt(3) / 2 * sum(1 / k**2 for k in range(1, 101) if k % 3)
    argmin = torch.full((1, dim), 4 * math.pi / 3, dtype=torch.float64)
    return SyntheticFunction(
        "weierstrass_like", weierstrass_like, dim, (0.0, 5.0), 2.0, argmin, dim * low
    )


def _weierstrass(dim: int) -> SyntheticFunction:
    n, a = 20, 0.5
    return SyntheticFunction(
        "weierstrass", weierstrass, dim, (-1.5, 1.5), 0.6,
        torch.ones(1, dim, dtype=torch.float64), -dim * (1 - a**n) / (1 - a),
    )  # fmt: skip


def _wrinkled_quadratic(dim: int) -> SyntheticFunction:
    return SyntheticFunction("wrinkled_quadratic", wrinkled_quadratic, dim, (-2.0, 2.0), 1.8)


def _rastrigin(dim: int) -> SyntheticFunction:
    zero = torch.zeros(1, dim, dtype=torch.float64)
    return SyntheticFunction("rastrigin", rastrigin, dim, (-5.12, 5.12), 4.5, zero, 0.0)


def _rosenbrock(dim: int) -> SyntheticFunction:
    if dim < 2:
        raise ValueError("rosenbrock needs dim >= 2")
    one = torch.ones(1, dim, dtype=torch.float64)
    return SyntheticFunction("rosenbrock", rosenbrock, dim, (-2.0, 2.0), -1.5, one, 0.0)


def _ackley(dim: int) -> SyntheticFunction:
    zero = torch.zeros(1, dim, dtype=torch.float64)
    return SyntheticFunction("ackley", ackley, dim, (-4.0, 4.0), 3.2, zero, 0.0)


def _gaussian_wells(dim: int) -> SyntheticFunction:
    return SyntheticFunction("gaussian_wells", GaussianWells(dim), dim, (-3.0, 3.0), 2.0)


FUNCTIONS: dict[str, Callable[[int], SyntheticFunction]] = {
    "weierstrass_like": _weierstrass_like,
    "weierstrass": _weierstrass,
    "wrinkled_quadratic": _wrinkled_quadratic,
    "rastrigin": _rastrigin,
    "rosenbrock": _rosenbrock,
    "ackley": _ackley,
    "gaussian_wells": _gaussian_wells,
}


def get_function(name: str, dim: int = 1) -> SyntheticFunction:
    """The synthetic landscape ``name`` (a key of `FUNCTIONS`) in ``dim`` dimensions."""
    try:
        make = FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown function {name!r}; choose from {sorted(FUNCTIONS)}") from None
    return make(dim)
