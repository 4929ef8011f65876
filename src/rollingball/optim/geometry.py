"""The geometry of a ball on the graph Γ = {(θ, f(θ))}, on lists of tensors.

Every function works on all parameter tensors at once with `torch._foreach_*` kernels and
returns Python floats (float64) for scalars, so that the decisions of a step are taken on
exactly the same numbers on every process. Parameters sharded as DTensors (FSDP2's
`fully_shard`) count with their whole global tensor: the sums over the local shards are
all-reduced over the shards' mesh, one collective per reduction and layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # a torch built without distributed support has no DTensor
    DTensor = None  # type: ignore[assignment,misc]


def squared_norm(tensors: list[Tensor]) -> float:
    """‖a‖² = Σ_t ‖a_t‖², accumulated in float64."""
    groups: dict[Any, list[Tensor]] = {}
    for t in tensors:
        layout, local = _local(t)
        groups.setdefault(layout, []).append(local)
    total = 0.0
    for layout, local_tensors in groups.items():
        norms = torch._foreach_norm(local_tensors)
        total += float(_global(torch.stack([n.double() for n in norms]).square().sum(), layout))
    return total


def inner(a: list[Tensor], b: list[Tensor]) -> float:
    """⟨a, b⟩ = Σ_t ⟨a_t, b_t⟩, each term in its own dtype, the sum in float64."""
    return inners([a], b)[0]


def inners(lefts: list[list[Tensor]], right: list[Tensor]) -> list[float]:
    """[⟨a, b⟩ for a in lefts]: one host synchronisation (and, for DTensors, one collective
    per layout) for all of them together."""
    if not lefts:
        return []
    columns: dict[Any, list[Tensor]] = {}
    for t, y in enumerate(right):
        layout, y_local = _local(y)
        terms = [torch.vdot(_local(a[t])[1].reshape(-1), y_local.reshape(-1)) for a in lefts]
        columns.setdefault(layout, []).append(torch.stack([term.double() for term in terms]))
    total = torch.zeros(len(lefts), dtype=torch.float64)
    for layout, parts in columns.items():
        total += _global(torch.stack(parts).sum(0), layout).cpu()
    return total.tolist()


def copy_(targets: list[Tensor], sources: list[Tensor]) -> None:
    """targets ← sources (tensor by tensor for DTensors, which have no `_foreach_copy_`)."""
    if DTensor is not None and any(isinstance(t, DTensor) for t in targets):
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)
    else:
        torch._foreach_copy_(targets, sources)


def _local(t: Tensor) -> tuple[Any, Tensor]:
    """(layout, local tensor): layout None for an ordinary tensor, (mesh, placements) and the
    local shard for a DTensor."""
    if DTensor is None or not isinstance(t, DTensor):
        return None, t
    if any(p.is_partial() for p in t.placements):
        raise ValueError("RBO needs sharded or replicated DTensors, not pending partial sums")
    return (t.device_mesh, tuple(t.placements)), t.to_local()


def _global(local_sum: Tensor, layout: Any) -> Tensor:
    """Sums over local shards made global: all-reduced over the mesh dimensions that shard."""
    if layout is None:
        return local_sum
    mesh, placements = layout
    summed = [Partial() if p.is_shard() else Replicate() for p in placements]
    return DTensor.from_local(local_sum, mesh, summed, run_check=False).full_tensor()


def slope_factor(grad_squared_norm: float) -> float:
    """s = √(1 + ‖g‖²): the length of the graph's upward vector (−g, 1) before normalising."""
    return math.sqrt(1.0 + grad_squared_norm)


def ball_centre(
    params: list[Tensor], grads: list[Tensor], loss: float, radius: float
) -> tuple[list[Tensor], float]:
    """Centre of the ball of radius ρ resting on Γ at θ: c = (θ − ρ g/s, f + ρ/s).

    The upward unit normal of the graph is ν = (−g, 1)/s with s = √(1 + ‖g‖²).
    """
    s = slope_factor(squared_norm(grads))
    centre = torch._foreach_add(params, grads, alpha=-radius / s)
    return list(centre), loss + radius / s
