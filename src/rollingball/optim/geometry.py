"""The geometry of a ball on the graph Γ = {(θ, f(θ))}, on lists of tensors.

Every function works on all parameter tensors at once with `torch._foreach_*` kernels and
returns Python floats (float64) for scalars, so that the decisions of a step are taken on
exactly the same numbers on every process.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def squared_norm(tensors: list[Tensor]) -> float:
    """‖a‖² = Σ_t ‖a_t‖², accumulated in float64."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    return float(torch.stack([n.double() for n in norms]).square().sum())


def inner(a: list[Tensor], b: list[Tensor]) -> float:
    """⟨a, b⟩ = Σ_t ⟨a_t, b_t⟩, each term in its own dtype, the sum in float64."""
    if not a:
        return 0.0
    terms = [torch.vdot(x.reshape(-1), y.reshape(-1)).double() for x, y in zip(a, b, strict=True)]
    return float(torch.stack(terms).sum())


def slope_factor(grad_squared_norm: float) -> float:
    """s = √(1 + ‖g‖²): the length of the graph's upward vector (−g, 1) before normalising."""
    return math.sqrt(1.0 + grad_squared_norm)


def ball_centre(
    params: list[Tensor], grads: list[Tensor], loss: float, radius: float
) -> tuple[list[Tensor], float]:
    """Centre of the ball of radius ρ resting on Γ at θ: c = (θ − ρ g/s, f + ρ/s).

    The upward unit normal of the graph is ν = (−g, 1)/s with s = √(1 + ‖g‖²).
    """
    s = slope_factor(squared_norm(grads))
    centre = torch._foreach_add(params, grads, alpha=-radius / s)
    return list(centre), loss + radius / s


def distance_to_graph_squared(offset: list[Tensor], height_mismatch: float) -> float:
    """2φ(x) = ‖x − θ̃‖² + (f(x) − ỹ)², from the offset x − θ̃ and the mismatch f(x) − ỹ."""
    return squared_norm(offset) + height_mismatch**2
