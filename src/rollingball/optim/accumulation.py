"""Gradient accumulation for optimizers that call their closure: one closure, many micro-batches.

RBO evaluates the loss and its gradient several times per step on the same batch. When the
batch does not fit in memory, every evaluation must run over all of its micro-batches and
return exactly what one pass over the whole batch would: the mean loss, with the gradient
of that mean in ``.grad``. ``micro_batch_closure`` builds that closure:

    closure = micro_batch_closure(opt, lambda x, y: criterion(model(x), y),
                                  split_batch(x, y, size=32), model=model)
    opt.step(closure)

Each micro-batch's mean loss is weighted by its share of the examples (n_i / N), so uneven
micro-batches are handled; pass ``weights`` for other reductions (e.g. all 1 for summed
losses). Under DistributedDataParallel, pass the wrapped ``model``: all micro-batches but
the last run under ``no_sync()``, so the gradients are all-reduced once per evaluation.
Layers whose output depends on the batch (BatchNorm in training mode) see micro-batch
statistics, so for them accumulation is not the same as the whole batch.

Code that runs backward itself on the loss it is given (Lightning's ``training_step`` under
automatic optimisation) uses ``accumulated_loss``: it back-propagates every micro-batch but
the last and returns a loss whose value is the whole batch's and whose backward adds the
last micro-batch's gradient (docs/scaling.md shows the Lightning recipe).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["accumulated_loss", "micro_batch_closure", "split_batch"]


def split_batch(*tensors: Tensor, size: int) -> list[tuple[Tensor, ...]]:
    """Split tensors that share their first dimension into micro-batches of ``size`` rows."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    if not tensors:
        raise ValueError("split_batch needs at least one tensor")
    rows = {len(t) for t in tensors}
    if len(rows) != 1:
        raise ValueError(f"tensors must share their first dimension, got sizes {sorted(rows)}")
    return list(zip(*(t.split(size) for t in tensors), strict=True))


def _size(micro_batch: Any) -> int:
    first = micro_batch[0] if isinstance(micro_batch, (tuple, list)) else micro_batch
    if not isinstance(first, Tensor) or first.dim() == 0:
        raise ValueError(
            "cannot tell the size of a micro-batch whose first element is not a batched "
            "tensor; pass weights="
        )
    return len(first)


def _weighted(
    micro_batches: Iterable[Any], weights: Sequence[float] | None
) -> tuple[list[Any], list[float]]:
    batches = list(micro_batches)
    if not batches:
        raise ValueError("gradient accumulation needs at least one micro-batch")
    if weights is None:
        sizes = [_size(b) for b in batches]
        total = sum(sizes)
        weights = [n / total for n in sizes]
    elif len(weights) != len(batches):
        raise ValueError(f"got {len(weights)} weights for {len(batches)} micro-batches")
    return batches, [float(w) for w in weights]


def _loss(loss_fn: Callable[..., Tensor], batch: Any) -> Tensor:
    return loss_fn(*batch) if isinstance(batch, (tuple, list)) else loss_fn(batch)


def accumulated_loss(
    loss_fn: Callable[..., Tensor],
    micro_batches: Iterable[Any],
    *,
    weights: Sequence[float] | None = None,
    model: nn.Module | None = None,
) -> Tensor:
    """Back-propagate every micro-batch but the last; return the loss to call backward on.

    The returned loss's value is the weighted loss of all micro-batches (the whole batch's),
    and its backward adds the last micro-batch's gradient to those already in ``.grad``:
    after ``accumulated_loss(...).backward()`` the gradients are the whole batch's. The
    arguments are those of ``micro_batch_closure``; the earlier micro-batches run under
    ``model.no_sync()`` if the model has it.
    """
    batches, factors = _weighted(micro_batches, weights)
    no_sync = getattr(model, "no_sync", None)
    earlier: Tensor | None = None
    for batch, weight in zip(batches[:-1], factors[:-1], strict=True):
        with contextlib.nullcontext() if no_sync is None else no_sync():
            loss = _loss(loss_fn, batch)
            (loss * weight).backward()
        term = loss.detach() * weight
        earlier = term if earlier is None else earlier + term
    last = _loss(loss_fn, batches[-1]) * factors[-1]
    return last if earlier is None else last + earlier


def micro_batch_closure(
    optimizer: Optimizer,
    loss_fn: Callable[..., Tensor],
    micro_batches: Iterable[Any],
    *,
    weights: Sequence[float] | None = None,
    model: nn.Module | None = None,
) -> Callable[[], Tensor]:
    """A closure over micro-batches that equals the closure over their concatenation.

    Args:
        optimizer: its ``zero_grad`` starts every evaluation.
        loss_fn: ``loss_fn(*micro_batch)`` (or ``loss_fn(micro_batch)`` for a lone tensor)
            returns the mean loss on one micro-batch.
        micro_batches: the micro-batches, kept for every call of the closure.
        weights: the weight of each micro-batch's loss; by default its share of the
            examples, n_i / Σ n_j, read from the first dimension of its first tensor.
        model: the DistributedDataParallel model, if any, so that gradients are all-reduced
            once per call instead of once per micro-batch.

    Each call zeroes the gradients, runs forward and backward on every micro-batch and
    returns the weighted loss, detached: the whole batch's loss.
    """
    batches, factors = _weighted(micro_batches, weights)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = accumulated_loss(loss_fn, batches, weights=factors, model=model)
        loss.backward()
        return loss.detach()

    return closure
