"""Measure the memory an optimizer step allocates for itself, outside the closure.

`peak_step_memory(optimizer, closure)` runs one step under a dispatch mode that sees every
tensor the optimizer creates (the closure's activations and gradients are not counted) and
returns the peak of the bytes those tensors hold at once, the optimizer state's bytes, and the
bytes of the buffers the optimizer keeps for its next step (RBO's workspace, on the CPU).
A step's working set is the kept buffers plus the peak transient bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class StepMemory:
    """Bytes: the parameters, the persistent optimizer state, the buffers kept for the next
    step, the peak transient allocations."""

    param_bytes: int
    state_bytes: int
    workspace_bytes: int
    peak_transient_bytes: int

    @property
    def peak_buffers(self) -> float:
        """Peak transient allocations in units of the parameters' size."""
        return self.peak_transient_bytes / self.param_bytes

    @property
    def state_buffers(self) -> float:
        return self.state_bytes / self.param_bytes

    @property
    def step_buffers(self) -> float:
        """The step's working set, kept buffers and peak transient allocations, in units of
        the parameters' size."""
        return (self.workspace_bytes + self.peak_transient_bytes) / self.param_bytes


class _AllocationTracker(TorchDispatchMode):
    """Tracks storages created by ops while `counting` is on; frees them as tensors die."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known = known  # storages that existed before: parameters, gradients, state
        self.counting = True
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, referencing tensors]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.counting:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.known or storage.nbytes() == 0:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def _storages(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        v
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]


def workspace_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The buffers an optimizer keeps for its next step (RBO's workspace)."""
    workspace = getattr(optimizer, "workspace", None)
    return workspace.held() if workspace is not None else []


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage once (a workspace buffer can be
    views into one flat storage); 0-dimensional tensors (step counters) are left out."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.dim() > 0
    }
    return sum(storages.values())


def peak_step_memory(optimizer: torch.optim.Optimizer, closure: Callable[[], Any]) -> StepMemory:
    """One `optimizer.step(closure)`, measured: state and kept bytes after it, and the peak
    transient bytes (buffers taken from the workspace are not transient)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fixed = _storages(params + state_tensors(optimizer) + workspace_tensors(optimizer))

    def gradients() -> set[int]:
        return _storages([p.grad for p in params if p.grad is not None])

    tracker = _AllocationTracker(fixed | gradients())

    def uncounted_closure() -> Any:
        tracker.counting = False
        try:
            loss = closure()
        finally:
            tracker.counting = True
        tracker.known = fixed | gradients()  # the gradients of this call, not stale addresses
        return loss

    with tracker:
        optimizer.step(uncounted_closure)
    return StepMemory(
        param_bytes=sum(p.nbytes for p in params),
        state_bytes=storage_bytes(state_tensors(optimizer)),
        workspace_bytes=storage_bytes(workspace_tensors(optimizer)),
        peak_transient_bytes=tracker.peak,
    )
