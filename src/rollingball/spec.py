"""RBO's specification, shared by the torch optimizer, the optax transformation and the
landscape tools; imports neither torch nor jax.

- The settings' validation (`validate`), with one set of messages for both frameworks; the
  defaults live beside it in `rollingball.defaults`.
- The projection solvers and the Anderson solver's constants.
- The Anderson solver's scalar formulas at a point (φ, the Sherman–Morrison shift, ‖r‖² from
  ‖p‖²) and φ's round-off level (`phi_noise`), for floats and arrays alike.
- The landscape RBO rolls on. With loss ℓ, weight decay λ, loss scale κ and σ = −1 when
  maximising (else +1):

      f(θ) = κ (σ ℓ(θ) + λ/2 ‖θ‖²),   ∇f(θ) = κ (σ ∇ℓ(θ) + λ θ).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

SOLVERS = ("anderson", "gd")
NONFINITE_POLICIES = ("raise", "skip")

# The Anderson solver's ridge on its normal equations, relative to the largest ‖D_j‖².
ANDERSON_REGULARIZATION = 1e-10
# The blind last step's trust in the Gauss–Newton model: its predicted decrease of φ must be
# within this fraction of the last step's measured decrease.
ANDERSON_TRUST = 0.5
# The blind step must be this much shorter than the last one: ‖δ‖ ≤ contraction · ‖δ_last‖.
ANDERSON_CONTRACTION = 0.5
# A rejected plain step's γ shrinks by the factor t* that minimises the quadratic through
# φ(x_k), the slope ⟨r, δ⟩ and the rejected φ(x_k + δ), kept within these bounds.
ANDERSON_BACKTRACK = (0.1, 0.5)
# Each rejected trial point adds one evaluation to the budget, up to this many.
ANDERSON_EXTENSION = 2
# The ridge's absolute floor, so that it is > 0 when every difference is zero.
RIDGE_FLOOR = 1e-300
# φ's round-off level, in units of the dtype's eps (`phi_noise`).
PHI_NOISE = 4

# The settings that are numbers: key, name in messages, whether it must be > 0 (else >= 0).
_NUMBERS = (
    ("lr", "learning rate (lr)", False),
    ("radius", "radius", False),
    ("momentum", "momentum", False),
    ("weight_decay", "weight_decay", False),
    ("loss_scale", "loss_scale", True),
    ("projection_step_size", "projection_step_size", True),
    ("projection_tol", "projection_tol", False),
    ("max_update", "max_update", True),  # None: no bound
)
_COUNTS = ("projection_steps", "anderson_memory")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def is_number(value: Any) -> bool:
    """A real number to compute with on the host: int or float (NumPy's too), not a bool, a
    string or an array (a torch tensor or a jax array is not a `numbers.Real`)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_number(value: Any, what: str, positive: bool = False) -> None:
    """A finite int or float >= 0 (> 0 if `positive`), its type checked first, so that the
    message names a wrong type rather than a value converted from it."""
    bound = "> 0" if positive else ">= 0"
    if not is_number(value):
        hint = "; pass float(...)" if isinstance(value, str) or hasattr(value, "shape") else ""
        raise TypeError(
            f"{what} must be a finite int or float {bound}, got {type(value).__name__} "
            f"{value!r}{hint}"
        )
    number = float(value)
    _require(
        math.isfinite(number) and (number > 0 if positive else number >= 0),
        f"{what} must be a finite number {bound}, got {value!r}",
    )


def validate(settings: Mapping[str, Any], schedules: tuple[str, ...] = ()) -> None:
    """Refuse settings that have no meaning, with the reason: a wrong type raises TypeError
    naming the type, a wrong value ValueError. Keys are RBO's names; those absent are not
    checked, those in `schedules` may also be callables (optax's schedules)."""
    for key, what, positive in _NUMBERS:
        value = settings.get(key)
        if key not in settings or (value is None and key == "max_update"):
            continue
        if key in schedules and callable(value):
            continue
        require_number(value, what, positive)
    if "projection" in settings:
        _require(
            settings["projection"] in SOLVERS,
            f"unknown projection solver {settings['projection']!r}; choose one of {SOLVERS}",
        )
    for key in _COUNTS:
        if key not in settings:
            continue
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{key} must be an int >= 1, got {type(value).__name__} {value!r}")
        _require(value >= 1, f"{key} must be an int >= 1, got {value}")
    if "on_nonfinite" in settings:
        _require(
            settings["on_nonfinite"] in NONFINITE_POLICIES,
            f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {settings['on_nonfinite']!r}",
        )


def phi_noise(
    mismatch: Any, phi: Any, start_value: Any, lift: Any, eps: float, absolute: Any = abs
) -> Any:
    """φ's round-off level at a point: relative eps on φ itself and on the heights f(x), f(θ)
    and h = ỹ − f(θ) that the mismatch m = (f(x) − f(θ)) − h is made of,

        4 eps (φ + |m| (|m + f(θ) + h| + |f(θ)| + |h|)),

    for floats (`absolute=abs`) or arrays (`absolute=jnp.abs`). Changes of φ below it are
    noise, not progress."""
    heights = absolute(mismatch + start_value + lift) + absolute(start_value) + absolute(lift)
    return PHI_NOISE * eps * (phi + absolute(mismatch) * heights)


# The Anderson solver's scalars at an evaluated point, from m = f(x) − ỹ, ‖g‖², ⟨g, u⟩ and
# ‖u‖² (floats for torch, arrays for jax): the same formulas in both solvers.


def phi(offset_sq: Any, mismatch: Any) -> Any:
    """φ = ½(‖u‖² + m²)."""
    return 0.5 * (offset_sq + mismatch**2)


def newton_shift(mismatch: Any, grad_offset: Any, grad_sq: Any) -> Any:
    """c in p = (I + g gᵀ)⁻¹ r = u + c g (Sherman–Morrison): c = (m − ⟨g, u⟩)/(1 + ‖g‖²)."""
    return (mismatch - grad_offset) / (1.0 + grad_sq)


def residual_sq(newton_sq: Any, mismatch: Any, grad_offset: Any, grad_sq: Any) -> Any:
    """‖r‖² from ‖p‖² without cancellation: r = (I + g gᵀ) p, so
    ‖r‖² = ‖p‖² + ⟨g, p⟩²(2 + ‖g‖²), with ⟨g, p⟩ = (⟨g, u⟩ + m‖g‖²)/(1 + ‖g‖²)."""
    grad_newton = (grad_offset + mismatch * grad_sq) / (1.0 + grad_sq)
    return newton_sq + grad_newton**2 * (2.0 + grad_sq)


def backtrack_factor(
    slope: float, rise: float, bounds: tuple[float, float] = ANDERSON_BACKTRACK
) -> float:
    """The factor t* on γ after a rejected plain step δ: along x + t δ, φ is known at t = 0
    with slope d = ⟨r, δ⟩ and at t = 1, φ(1) − φ(0) = `rise`; the quadratic through them is
    least at t* = −d / (2(rise − d)), kept within `bounds` (their upper end where the
    quadratic says nothing). Floats; the JAX solver writes the same with `jnp.where`."""
    low, high = bounds
    curvature = rise - slope
    if not (slope < 0 and curvature > 0 and math.isfinite(curvature)):
        return high
    return min(max(-slope / (2 * curvature), low), high)


def height(
    loss: float, squared_norm: float, *, weight_decay: float, loss_scale: float, maximize: bool
) -> float:
    """f = κ (σ ℓ + λ/2 ‖θ‖²) from the loss ℓ and ‖θ‖²."""
    sign = -1.0 if maximize else 1.0
    return loss_scale * (sign * loss + 0.5 * weight_decay * squared_norm)


def slope(grad: Any, theta: Any, *, weight_decay: float, loss_scale: float, maximize: bool) -> Any:
    """∇f = κ (σ ∇ℓ + λ θ) from the loss's gradient ∇ℓ and θ (floats, tensors or arrays)."""
    sign = -1.0 if maximize else 1.0
    return loss_scale * (sign * grad + weight_decay * theta)
