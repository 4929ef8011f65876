"""USAM, unnormalized sharpness-aware minimization (Andriushchenko & Flammarion, ICML 2022).

One step on one minibatch, two closure calls, with L the closure's loss:

    g  = ∇L(θ)                      closure call 1 (its loss is what ``step`` returns)
    d  = ∇L(θ + ρ g) + λ θ          closure call 2 at the perturbed point; λ = weight_decay
    b  ← μ b + d  (b = d at the first step)      heavy ball as torch.optim.SGD (μ = momentum)
    θ  ← θ − η b                    (η = lr; with μ = 0 this is θ − η ∇L(θ + ρ ∇L(θ)))

Unlike SAM, the perturbation ρ g is not normalized by ‖g‖. Without momentum it is, to first
order in ρ, RBO's step at radius ρ/s, s = √(1 + ‖g‖²) (docs/claims.md, law H1). Weight decay
enters the update only, as in torch.optim.SGD and in SAM: the perturbation uses the closure's
gradient.

With momentum this is the usual USAM/SAM heavy ball (the buffer accumulates perturbed
gradients, the perturbation follows g), which is *not* RBO with momentum to first order in ρ.
RBO's step is −η [v + (ρ/s)(I − g gᵀ/s²) H v + O(ρ² + η)] with v = μ v_prev + g: the
curvature term acts on the whole velocity, i.e. ≈ −η [μ v_prev + ∇L(θ + (ρ/s) v)], a heavy
ball of plain gradients whose new gradient is taken a step ρ/s ahead along the velocity. The
two agree only where H is constant over the momentum's memory (on a quadratic, b = (I + ρH) v
and both steps are −η (I + ρH) v to O(ρ²); docs/claims.md, H1 with momentum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from rollingball.spec import require_number

__all__ = ["USAM"]


class USAM(Optimizer):
    """Unnormalized SAM: θ ← θ − η ∇L(θ + ρ ∇L(θ)), through torch.optim.SGD's heavy ball.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: η, the learning rate.
        rho: ρ >= 0, the perturbation scale (ρ = 0 is SGD, at twice the closure calls).
        momentum: μ, heavy-ball momentum on the perturbed gradient (torch.optim.SGD's, no
            dampening).
        weight_decay: λ, added to the perturbed gradient as λ θ.

    ``step(closure)`` makes two closure calls and returns the loss of the first, at θ;
    ``last_stats`` is ``{"grad_evals": 2, "loss": ...}``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        rho: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, rho=rho, momentum=momentum, weight_decay=weight_decay)
        for name, value in defaults.items():
            require_number(value, f"USAM: {name}")
        super().__init__(params, defaults)
        self.last_stats: dict[str, Any] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Two closure calls (at θ and at θ + ρ∇L(θ)) and one update; returns the loss at θ."""
        if closure is None:
            raise RuntimeError("USAM.step needs a closure (it evaluates the loss twice)")
        with torch.enable_grad():
            loss = closure()
        # parameters without a gradient at θ sit the step out, as in torch.optim
        live = [
            [p for p in group["params"] if p.requires_grad and p.grad is not None]
            for group in self.param_groups
        ]
        for params in live:
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("USAM does not support sparse gradients")
        start = [[p.clone() for p in params] for params in live]
        try:
            for group, params in zip(self.param_groups, live, strict=True):
                if params and group["rho"]:
                    grads = [p.grad for p in params]
                    torch._foreach_add_(params, grads, alpha=group["rho"])
            with torch.enable_grad():
                closure()
        finally:  # θ comes back bit for bit, even when the second call raises
            for params, saved in zip(live, start, strict=True):
                if params:
                    torch._foreach_copy_(params, saved)
        for group, params in zip(self.param_groups, live, strict=True):
            self._update(group, [p for p in params if p.grad is not None])
        self.last_stats = {"grad_evals": 2, "loss": float(loss)}
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch.optim.SGD's update (no dampening, no Nesterov) with the perturbed gradient."""
        if not params:
            return
        steps = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        if group["weight_decay"]:
            torch._foreach_add_(steps, params, alpha=group["weight_decay"])
        mu = group["momentum"]
        if mu:
            for i, p in enumerate(params):
                buffer = self.state[p].get("momentum_buffer")
                if buffer is None:
                    buffer = self.state[p]["momentum_buffer"] = steps[i].clone()
                else:
                    buffer.mul_(mu).add_(steps[i])
                steps[i] = buffer
        torch._foreach_add_(params, steps, alpha=-group["lr"])
