"""BatchNorm under optimizers that call their closure several times per step.

RBO, SAM and Entropy-SGD evaluate the loss several times per step on the same minibatch.
In training mode each forward pass would update the BatchNorm running statistics, so a
step of RBO with 8 evaluations would move them 8 times as far as a step of SGD, on
perturbed weights. ``first_call_updates_batchnorm`` wraps a closure so that only its first
call in a step updates them: it snapshots the running statistics (``running_mean``,
``running_var`` and ``num_batches_tracked``) right after the first call and restores them
after every later call, also one that raises. The batch statistics used inside each forward
pass are unchanged.

    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            return loss
        opt.step(first_call_updates_batchnorm(model, closure))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["first_call_updates_batchnorm", "running_stat_buffers"]

T = TypeVar("T")


def running_stat_buffers(model: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every normalisation layer of ``model`` that tracks them."""
    buffers: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(module, name, None)
                if isinstance(buffer, Tensor):
                    buffers.append(buffer)
    return buffers


def first_call_updates_batchnorm(model: nn.Module, closure: Callable[[], T]) -> Callable[[], T]:
    """Wrap ``closure`` (for one step) so only its first call updates running statistics.

    Make a new wrapper for every step. A model without such layers gets ``closure`` back.
    """
    buffers = running_stat_buffers(model)
    if not buffers:
        return closure
    saved: list[Tensor] = []

    def wrapped() -> T:
        if not saved:
            result = closure()
            saved.extend(b.detach().clone() for b in buffers)
            return result
        try:
            return closure()
        finally:  # also when a later call raises, from wherever its forward got
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)

    return wrapped
