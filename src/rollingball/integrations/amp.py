"""Dynamic loss scaling for float16 training with optimizers that call a closure.

``torch.amp.GradScaler.step(optimizer, closure=...)`` refuses closures: it unscales and
checks the gradients once per step, while RBO evaluates them 1 + K times. ``LossScaler`` does
the scaler's job inside every closure call instead:

    scaler = LossScaler()
    for x, y in loader:
        def loss_fn():
            with torch.autocast("cuda", dtype=torch.float16):
                return criterion(model(x), y)
        scaler.step(opt, loss_fn)

Every call zeroes the gradients and back-propagates ``scale · loss`` (so that small float16
gradients do not underflow), then divides the gradients by ``scale``. RBO sees the true loss
and the true gradients, so its geometry is unchanged. An overflow leaves a non-finite
gradient, which RBO detects at whatever closure call it happens (on every rank alike, as the
gradients are all-reduced): the step is skipped with the parameters untouched, and the
scale is multiplied by ``backoff_factor``. After ``growth_interval`` steps in a row without
an overflow it is multiplied by ``growth_factor``: the policy of ``torch.amp.GradScaler``.
Under DDP give every rank the same ``init_scale``: DDP all-reduces the scaled gradients
before they are unscaled, and as every rank skips the same steps the scales stay equal.
bfloat16 needs none of this (it has float32's range): use autocast alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LossScaler"]


class LossScaler:
    """A dynamic loss scale applied inside the closure, with GradScaler's growth and backoff.

    Args:
        init_scale: the first scale.
        growth_factor: multiplies the scale after ``growth_interval`` clean steps in a row.
        backoff_factor: multiplies the scale after a step with a non-finite gradient.
        growth_interval: clean steps in a row before the scale grows.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale}")
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0
        self.skipped_steps = 0

    def closure(self, optimizer: Optimizer, loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """The closure for one step: scaled backward, then gradients divided by the scale."""
        scale = self.scale

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn()
            (loss.float() * scale).backward()
            grads = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            if grads:
                torch._foreach_mul_(grads, 1.0 / scale)
            return loss.detach()

        return closure

    def step(self, optimizer: Optimizer, loss_fn: Callable[[], Tensor]) -> Any:
        """One optimizer step with the scaled closure, then the scale update.

        Returns the loss at the starting point, or None when the step was skipped. The
        optimizer must refuse non-finite gradients itself and say so in ``last_stats``,
        as RBO does; for the others use ``torch.amp.GradScaler``.
        """
        if not hasattr(optimizer, "last_stats"):
            raise TypeError(
                f"LossScaler.step needs an optimizer that refuses non-finite gradients and "
                f"reports it in last_stats (RBO); {type(optimizer).__name__} does not: use "
                "torch.amp.GradScaler with it"
            )
        try:
            loss = optimizer.step(self.closure(optimizer, loss_fn))  # type: ignore[arg-type]
            stats = getattr(optimizer, "last_stats", None) or {}
            skipped = bool(stats.get("skipped", False))
        except FloatingPointError:  # RBO with on_nonfinite="raise"; the step was refused
            loss, skipped = None, True
        self.update(skipped)
        return None if skipped else loss

    def update(self, skipped: bool) -> None:
        """Back off after a skipped step; grow after ``growth_interval`` clean steps."""
        if skipped:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped_steps += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """The scale and counters, for checkpoints."""
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped_steps = int(state["skipped_steps"])
