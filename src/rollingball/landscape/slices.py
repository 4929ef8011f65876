"""Loss slices of real models along filter-normalised random directions (Li et al. 2018).

A 2-D slice is L(α, β) = f(θ + α d + β e) on a grid of (α, β), with d, e random directions
rescaled filter by filter to the norms of the parameters' filters, so that the slice's
scale means the same for every layer. The parameters are restored bit for bit afterwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from rollingball.landscape.ironing import iron

__all__ = ["filter_normalized_direction", "ironed_slices", "loss_slice"]


def filter_normalized_direction(
    params: Sequence[Tensor],
    include_1d: bool = False,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """A Gaussian direction d with each filter rescaled: d_{i,j} ← d_{i,j} ‖θ_{i,j}‖ / ‖d_{i,j}‖.

    A filter is a slice along the first axis of a tensor of two or more dimensions (an output
    unit's weights). One-dimensional tensors (biases, BatchNorm/LayerNorm weights) get a zero
    direction by default; with ``include_1d`` they are rescaled as one filter each.
    """
    directions = []
    for p in params:
        if p.dim() <= 1 and not include_1d:
            directions.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        d = d.to(dtype=p.dtype, device=p.device)
        rows, filters = d.reshape(len(d), -1), p.detach().reshape(len(p), -1)
        if p.dim() <= 1:
            rows, filters = d.reshape(1, -1), p.detach().reshape(1, -1)
        scale = filters.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        directions.append((rows * scale).reshape(p.shape))
    return directions


@torch.no_grad()
def loss_slice(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    coords: Sequence[ArrayLike],
    progress: bool = False,
) -> NDArray[np.float64]:
    """L[i, j] = f(θ + αᵢ d + βⱼ e) (or L[i] = f(θ + αᵢ d) for one direction).

    ``directions`` holds one or two directions (each a list shaped like ``params``) and
    ``coords`` the matching 1-D coordinate arrays. ``loss_fn`` evaluates the loss on the
    data set (see `dataset_loss`), run under ``torch.no_grad()``; the model's mode is the
    caller's choice. The parameters are restored bit for bit, even on error.
    """
    if len(directions) not in (1, 2) or len(directions) != len(coords):
        raise ValueError("give one or two directions and as many coordinate arrays")
    from rich.progress import Progress  # the landscape extra; the rest needs torch and numpy

    params = list(params)
    axes = [np.asarray(c, dtype=np.float64).reshape(-1) for c in coords]
    saved = [p.detach().clone() for p in params]
    out = np.empty([len(a) for a in axes])
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("loss slice", total=out.size)
            for index in itertools.product(*(range(len(a)) for a in axes)):
                for k, p in enumerate(params):
                    moved = saved[k]
                    for axis, i in enumerate(index):
                        moved = moved + float(axes[axis][i]) * directions[axis][k]
                    p.copy_(moved)
                out[index] = float(loss_fn())
                bar.advance(task)
    finally:
        for p, p0 in zip(params, saved, strict=True):
            p.copy_(p0)
    return out


def ironed_slices(
    values: ArrayLike, coords: Sequence[ArrayLike], radii: Sequence[float]
) -> dict[float, NDArray[np.float64]]:
    """`iron` applied to a slice at each radius; ``coords`` must be evenly spaced.

    The ball measures α, β and the loss in one metric, so the slice's units matter.
    """
    steps = []
    for c in coords:
        axis = np.asarray(c, dtype=np.float64).reshape(-1)
        gaps = np.diff(axis)
        if len(axis) < 2 or not np.allclose(gaps, gaps[0], rtol=1e-9, atol=0):
            raise ValueError("slice coordinates must be evenly spaced with at least 2 points")
        steps.append(float(axis[-1] - axis[0]) / (len(axis) - 1))
    return {float(r): iron(values, steps if len(steps) > 1 else steps[0], r) for r in radii}
