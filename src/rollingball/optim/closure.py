"""How RBO calls its closure: the same minibatch landscape at every call of one step.

RBO evaluates the loss several times per step and needs every call to see the same
function. :class:`StepClosure` calls a step's closure so that ordinary training code gives
it one:

- the gradients are set to None before every call, so a closure that forgets
  ``zero_grad()`` still returns the gradient of its own loss;
- with ``fixed_randomness``, every call starts from the random state the first call
  started from (torch's CPU generator, and the CUDA generators of the parameters' devices
  when CUDA is initialised), so Dropout masks and random augmentations drawn inside the
  closure repeat; after the step the generators are where one call left them, so a step
  draws the random numbers of one SGD step;
- the closure's contract is checked: it must return a scalar loss and call backward.

Generators the closure creates or receives itself (``torch.Generator``, Python's
``random``, NumPy) are not touched: a closure that draws from them must fix them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepClosure"]


class _RandomState:
    """A copy of torch's CPU generator and of the CUDA generators of ``devices``."""

    def __init__(self, devices: list[int]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


def _cuda_devices(params: list[Tensor]) -> list[int]:
    if not torch.cuda.is_initialized():
        return []
    indices = {p.device.index for p in params if p.device.type == "cuda"}
    return sorted(torch.cuda.current_device() if i is None else i for i in indices)


class StepClosure:
    """One step's closure, called as RBO needs it (see the module docstring).

    Args:
        closure: the user's closure: forward and backward on one minibatch, returns the loss.
        params: the parameters whose gradients are cleared before every call.
        fixed_randomness: give every call the random state of the first.
    """

    def __init__(
        self, closure: Callable[[], Any], params: list[Tensor], fixed_randomness: bool
    ) -> None:
        self.closure = closure
        self.params = params
        self.calls = 0
        self.devices = _cuda_devices(params) if fixed_randomness else None
        self._start: _RandomState | None = None
        self._after_first: _RandomState | None = None

    def __call__(self) -> Any:
        """One call of the closure; returns its loss."""
        for p in self.params:
            p.grad = None
        if self.devices is not None:
            if self._start is None:
                self._start = _RandomState(self.devices)
            else:
                if self._after_first is None:  # nothing draws between two calls of a step
                    self._after_first = _RandomState(self.devices)
                self._start.restore()
        self.calls += 1
        with torch.enable_grad():
            loss = self.closure()
        if loss is None:
            raise RuntimeError("the closure must return the loss")
        if isinstance(loss, Tensor) and loss.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss, got a tensor of shape "
                f"{tuple(loss.shape)}; reduce it (e.g. loss.mean()) before backward and return it"
            )
        if all(p.grad is None for p in self.params):
            raise RuntimeError(
                "the closure must call loss.backward(): no parameter received a gradient "
                f"at closure call {self.calls}"
            )
        return loss

    def finish(self) -> None:
        """Leave the random generators where the first call left them (one call's draws)."""
        if self._after_first is not None:
            self._after_first.restore()
