"""Parameter-sized buffers that RBO's step reuses instead of allocating.

On the CPU a fresh allocation of a large tensor is returned to the operating system when it
is freed and page-faulted back in at the next allocation: that costs several passes over
the memory, more than the operation that fills the tensor. A `Workspace` keeps the buffers
a step gives back and hands them out again, within the step and from one step to the next,
so that after the first step the projection allocates nothing. On other devices the caching
allocator already reuses memory: there a `Workspace` allocates (out-of-place kernels, one
pass each) and keeps nothing.

The buffers held between steps are the step's peak working set (2m + 3 parameter copies
for the Anderson solver, 2m + 4 when it gathers the gradient of many small tensors, 2 for
gd); `held()` lists them.

When the parameters share one dtype and are contiguous, a buffer is one flat tensor cut into
views shaped like the parameters (a `FlatBuffer`): a reduction or an update between two such
buffers then runs over the flat tensor in a few long kernels, not one kernel and some
microseconds of Python per parameter tensor (`flat_pair`), which is what a model of
many small tensors pays for otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

CHUNK = 1 << 18  # elements per reduction over a flat buffer: float32 sums within ~2e-7 here


class FlatBuffer(list[Tensor]):
    """Views shaped like the parameters into one contiguous tensor, `flat`; `signature`
    is theirs (shapes and dtype), kept so that the pool need not walk the views; `chunks`
    cut `flat` into pieces of `CHUNK` elements, one reduction each (made once, not at every
    reduction)."""

    flat: Tensor
    signature: tuple[Any, ...]
    chunks: tuple[Tensor, ...]


def flat_pair(a: list[Tensor], b: list[Tensor]) -> tuple[FlatBuffer, FlatBuffer] | None:
    """Two workspace buffers of one layout (`FlatBuffer`s whose views have the same shapes
    and dtype, so that the elements of their flat tensors pair up), or None."""
    if isinstance(a, FlatBuffer) and isinstance(b, FlatBuffer) and a.signature == b.signature:
        return a, b
    return None


def _signature(tensors: list[Tensor]) -> tuple[Any, ...]:
    if isinstance(tensors, FlatBuffer):
        return tensors.signature
    return tuple((t.shape, t.dtype) for t in tensors)  # the pool holds CPU tensors only


def _allocate(like: list[Tensor]) -> list[Tensor]:
    """An uninitialised buffer shaped like `like`: a `FlatBuffer` when every tensor is
    contiguous and of one dtype, else one tensor per parameter (in its memory format)."""
    dtype = like[0].dtype
    if not all(t.dtype == dtype and t.is_contiguous() for t in like):
        return [torch.empty_like(t) for t in like]
    flat = torch.empty(sum(t.numel() for t in like), dtype=dtype)
    pieces = flat.split([t.numel() for t in like])
    buffer = FlatBuffer(piece.view(t.shape) for piece, t in zip(pieces, like, strict=True))
    buffer.flat, buffer.signature, buffer.chunks = flat, _signature(like), flat.split(CHUNK)
    return buffer


class Workspace:
    """A pool of buffers shaped like a list of parameters (see the module docstring)."""

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[list[Tensor]]] = {}

    @staticmethod
    def _reuses(like: list[Tensor]) -> bool:
        """Plain CPU tensors only (a DTensor has no in-place foreach copy); a `FlatBuffer` is
        one by construction."""
        if isinstance(like, FlatBuffer):
            return True
        return bool(like) and all(t.is_cpu and type(t) in (Tensor, Parameter) for t in like)

    def held(self) -> list[Tensor]:
        """The tensors of the buffers kept for the next use."""
        return [t for pool in self._free.values() for buffers in pool for t in buffers]

    def clear(self) -> None:
        """Release every kept buffer."""
        self._free.clear()

    def give(self, buffers: list[Tensor]) -> None:
        """Hand a buffer back for reuse (its values are garbage from now on)."""
        if self._reuses(buffers):
            signature = _signature(buffers)
            if signature not in self._free:  # the parameters changed: drop the old buffers
                self._free = {signature: []}
            self._free[signature].append(buffers)

    def _take(self, like: list[Tensor]) -> list[Tensor] | None:
        """A kept buffer shaped like `like`, a new one on the CPU, None elsewhere."""
        if not self._reuses(like):
            return None
        pool = self._free.get(_signature(like))
        return pool.pop() if pool else _allocate(like)

    def copy(self, a: list[Tensor]) -> list[Tensor]:
        """A buffer holding a copy of a."""
        out = self._take(a)
        if out is None:
            return [t.clone() for t in a]
        torch._foreach_copy_(out, a)
        return out

    def scaled(self, a: list[Tensor], alpha: float | list[float]) -> list[Tensor]:
        """A buffer holding α a (α: one number, or one per tensor); one pass."""
        out = self._take(a)
        if out is None:
            return list(torch._foreach_mul(a, alpha))
        pair = flat_pair(out, a)
        if pair is not None and not isinstance(alpha, list):
            torch.mul(pair[1].flat, alpha, out=pair[0].flat)
            return out
        alphas = alpha if isinstance(alpha, list) else [alpha] * len(a)
        for target, source, factor in zip(out, a, alphas, strict=True):
            torch.mul(source, factor, out=target)  # the CPU has no fused foreach kernels
        return out

    def add(self, a: list[Tensor], b: list[Tensor], alpha: float) -> list[Tensor]:
        """A buffer holding a + α b; one pass (one kernel over flat tensors)."""
        out = self._take(a)
        if out is None:
            return list(torch._foreach_add(a, b, alpha=alpha))
        pair, other = flat_pair(out, a), flat_pair(out, b)
        if pair is not None and other is not None:
            torch.add(pair[1].flat, other[1].flat, alpha=alpha, out=pair[0].flat)
            return out
        for target, x, y in zip(out, a, b, strict=True):
            torch.add(x, y, alpha=alpha, out=target)
        return out
