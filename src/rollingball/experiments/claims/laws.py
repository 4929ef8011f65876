"""The exact parts of the four laws (docs/claims.md), as functions the tests and figures share.

Notation: θ the start, g = ∇f(θ), s = √(1 + ‖g‖²), H = ∇²f(θ), η the learning rate, ρ the
radius. The moved centre is c̃ = (θ − (η + ρ/s) g, f(θ) + ρ/s − η‖g‖²) and the new contact
point x solves x − t ∇f(x) = θ − (η + ρ/s) g with t = ỹ − f(x): the centre sits t·s(x)
above the graph, straight over x along the normal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "first_order_step",
    "quadratic_step",
    "rbo_linear_factor",
    "rbo_stability_threshold",
    "small_step_direction",
    "truncated_rate",
    "usam_stability_threshold",
]


def quadratic_step(
    hessian: Tensor,
    linear: Tensor,
    theta: Tensor,
    lr: float,
    radius: float,
    iterations: int = 100,
    velocity: Tensor | None = None,
) -> tuple[Tensor, float, float]:
    """RBO's exact step on f(x) = ½ xᵀHx + bᵀx: (θ⁺, t, a) with θ⁺ = θ − a (I − tH)⁻¹ g.

    Here a = η + ρ/s − t, and t is the scalar root of t = ỹ − f(θ⁺(t)), found by Newton's
    method from t = ρ/s (the root a local projection solver warm-started at θ reaches when
    I − tH stays positive definite).

    With momentum the centre moves along the velocity v = μ v_prev + g (``velocity``):
    θ̃ = θ − (ρ/s) g − η v, ỹ = f(θ) + ρ/s − η gᵀv, and the step is
    θ⁺ = θ − (I − tH)⁻¹ [η v + (ρ/s − t) g] (which is the form above when v = g; ``a`` is
    then still η + ρ/s − t, the coefficient of g alone).
    """
    eye = torch.eye(len(theta), dtype=theta.dtype)

    def f(x: Tensor) -> Tensor:
        return 0.5 * x @ hessian @ x + linear @ x

    g = hessian @ theta + linear
    v = g if velocity is None else velocity
    s = math.sqrt(1.0 + float(g @ g))
    height = float(f(theta)) + radius / s - lr * float(g @ v)

    def point(t: float) -> Tensor:
        return theta - torch.linalg.solve(eye - t * hessian, lr * v + (radius / s - t) * g)

    def mismatch(t: float) -> float:
        return t - height + float(f(point(t)))

    t = radius / s
    for _ in range(iterations):
        h = 1e-7 * max(1.0, abs(t))
        slope = (mismatch(t + h) - mismatch(t - h)) / (2 * h)
        step = mismatch(t) / slope
        t -= step
        if abs(step) <= 1e-15 * max(1.0, abs(t)):
            break
    return point(t), t, lr + radius / s - t


def small_step_direction(
    hessian: Tensor, grad: Tensor, radius: float, velocity: Tensor | None = None
) -> Tensor:
    """lim_{η→0} (θ⁺ − θ)/η for any smooth f, exact in ρ while I − (ρ/s)H is invertible.

    With M = (I − (ρ/s) H)⁻¹ and the centre moved along v (v = g without momentum,
    v = μ v_prev + g with it): −M [v − g gᵀ(M − I) v / (1 + gᵀMg)], which for v = g is
    −s² M g / (1 + gᵀMg). To first order in ρ it is −(v + (ρ/s)(H v − (gᵀHv/s²) g)): USAM's
    curvature term, applied to the velocity, less its part along g.
    """
    s2 = 1.0 + float(grad @ grad)
    v = grad if velocity is None else velocity
    eye = torch.eye(len(grad), dtype=grad.dtype)
    m = eye - (radius / math.sqrt(s2)) * hessian
    mg, mv = torch.linalg.solve(m, grad), torch.linalg.solve(m, v)
    # M[v − g gᵀ(M − I)v / (1 + gᵀMg)] = Mv − Mg (gᵀMv − gᵀv) / (1 + gᵀMg)
    return -(mv - mg * float(grad @ mv - grad @ v) / (1.0 + float(grad @ mg)))


def first_order_step(
    lr: float, radius: float, grad: Tensor, velocity: Tensor, hv: Tensor
) -> Tensor:
    """RBO's step to first order in ρ and second in η: Δ = −η [v + (ρ/s)(Hv − (gᵀHv/s²) g)
    + (η/2)(vᵀHv/s²) g], with v the velocity (g without momentum) and ``hv`` = H v.

    The error is O(ηρ² + η²ρ + η³) (in units of ‖v‖); for v = g it is
    Δ_USAM(ρ/s) + η (ρ/s − η/2) κ g with κ = gᵀHg/s² (docs/claims.md, H1).
    """
    s2 = 1.0 + float(grad @ grad)
    along = (radius / math.sqrt(s2)) * float(grad @ hv) - 0.5 * lr * float(velocity @ hv)
    return -lr * (velocity + (radius / math.sqrt(s2)) * hv - (along / s2) * grad)


def truncated_rate(lr: float, step_size: float, steps: int, grad_sq: float) -> float:
    """Effective rate of K steps x ← x − γ r(x) from θ on an affine f: η [1 − (1 − γ s²)^K]."""
    return lr * (1.0 - (1.0 - step_size * (1.0 + grad_sq)) ** steps)


def rbo_linear_factor(lr: float, radius: float, curvature: float) -> float:
    """RBO's linear map near a minimum along an eigenvector of H: 1 − ηλ/(1 − ρλ)."""
    return 1.0 - lr * curvature / (1.0 - radius * curvature)


def rbo_stability_threshold(lr: float, radius: float) -> float:
    """The largest stable curvature of RBO near a minimum: λ < 2/(η + 2ρ)."""
    return 2.0 / (lr + 2.0 * radius)


def usam_stability_threshold(lr: float, rho: float) -> float:
    """USAM's: ηλ(1 + ρλ) < 2, i.e. λ < (√(1 + 8ρ/η) − 1)/(2ρ) (2/η at ρ = 0)."""
    if rho == 0:
        return 2.0 / lr
    return (math.sqrt(1.0 + 8.0 * rho / lr) - 1.0) / (2.0 * rho)
