"""The landscape RBO rolls on, defined once for every backend (imports neither torch nor jax).

With loss ℓ, weight decay λ, loss scale κ and σ = −1 when maximising (else +1):

    f(θ) = κ (σ ℓ(θ) + λ/2 ‖θ‖²),   ∇f(θ) = κ (σ ∇ℓ(θ) + λ θ).

The functions take floats or any array type with + and * (torch tensors, jax arrays).
"""

from __future__ import annotations

from typing import Any


def height(
    loss: float, squared_norm: float, *, weight_decay: float, loss_scale: float, maximize: bool
) -> float:
    """f = κ (σ ℓ + λ/2 ‖θ‖²) from the loss ℓ and ‖θ‖²."""
    sign = -1.0 if maximize else 1.0
    return loss_scale * (sign * loss + 0.5 * weight_decay * squared_norm)


def slope(
    grad: Any, theta: Any, *, weight_decay: float, loss_scale: float, maximize: bool
) -> Any:
    """∇f = κ (σ ∇ℓ + λ θ) from the loss's gradient ∇ℓ and θ."""
    sign = -1.0 if maximize else 1.0
    return loss_scale * (sign * grad + weight_decay * theta)
