"""Exact ironing of a sampled landscape: the closing of its graph by a ball of radius ρ.

For samples f on a regular 1-D or 2-D grid G and the cap b(v) = √(ρ² − |v|²) on |v| ≤ ρ:

    centre height   C(x) = max_{z ∈ G, |z − x| ≤ ρ} f(z) + b(z − x)       (dilation)
    ironed surface  I(z) = min_{x ∈ G, |x − z| ≤ ρ} C(x) − b(x − z)       (erosion)

C(x) is the height of the centre of a ball resting on the samples above x, and I is the
lower envelope of all such resting balls: what a ball of radius ρ rolling on top can touch.
Only grid points enter both the maxima and the minima; near the edges a ball may rest on
fewer samples (so I can be higher there than on an infinite grid). The dilation and erosion
use the same grid and the same cap, so they are adjoint and the closing keeps its laws
exactly: I ≥ f, ironing twice is ironing once, and ρ below the spacing returns f.

The work is a loop over the grid offsets of the ball, vectorised over the grid:
O(grid size × offsets in the ball) with NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "centre_height",
    "iron",
    "monotonicity_gap",
    "unreachable",
    "unreachable_from_ironed",
]

Spacing = float | Sequence[float]


def _ball_offsets(
    ndim: int, spacing: Spacing, radius: float
) -> tuple[list[tuple[int, ...]], NDArray[np.float64]]:
    """The grid offsets o with |o·Δ| ≤ ρ and the cap b(o) − ρ = √(ρ² − |o·Δ|²) − ρ ≤ 0.

    The cap is shifted by −ρ so that the centre offset contributes exactly 0 (even when ρ²
    underflows): then a ball that holds only its centre gives f back bit for bit.
    """
    steps = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
    if np.any(steps <= 0) or radius < 0:
        raise ValueError(f"need spacing > 0 and radius >= 0, got {spacing} and {radius}")
    reach = [int(np.floor(radius / h)) + 1 for h in steps]  # filtered by `inside` below
    axes = [np.arange(-r, r + 1) for r in reach]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, ndim)
    dist2 = ((grid * steps) ** 2).sum(-1)
    inside = dist2 <= radius**2
    inner = dist2[inside]
    caps = np.zeros_like(inner)
    away = inner > 0  # √(ρ² − d²) − ρ = −d² / (√(ρ² − d²) + ρ): no cancellation, 0 at d = 0
    caps[away] = -inner[away] / (np.sqrt(radius**2 - inner[away]) + radius)
    return [tuple(int(v) for v in o) for o in grid[inside]], caps


def _window(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[tuple[slice, ...], ...]:
    """Slices (dst, src) with dst[i] paired to src[i + offset], both inside the grid."""
    dst = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, shape, strict=True))
    src = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, shape, strict=True))
    return dst, src


def _check(values: ArrayLike) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim not in (1, 2) or 0 in array.shape:
        raise ValueError(f"values must be a non-empty 1-D or 2-D grid, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("values must be finite")
    return array


def _dilate(f: NDArray[np.float64], spacing: Spacing, radius: float) -> NDArray[np.float64]:
    """C(x) − ρ = max_{z ∈ G, |z−x| ≤ ρ} f(z) + b(z − x) − ρ."""
    out = np.full_like(f, -np.inf)
    for offset, cap in zip(*_ball_offsets(f.ndim, spacing, radius), strict=True):
        if any(abs(o) >= n for o, n in zip(offset, f.shape, strict=True)):
            continue
        dst, src = _window(offset, f.shape)
        np.maximum(out[dst], f[src] + cap, out=out[dst])
    return out


def _erode(c: NDArray[np.float64], spacing: Spacing, radius: float) -> NDArray[np.float64]:
    """I(z) = min_{x ∈ G, |x−z| ≤ ρ} (C(x) − ρ) − (b(x − z) − ρ)."""
    out = np.full_like(c, np.inf)
    for offset, cap in zip(*_ball_offsets(c.ndim, spacing, radius), strict=True):
        if any(abs(o) >= n for o, n in zip(offset, c.shape, strict=True)):
            continue
        dst, src = _window(offset, c.shape)
        np.minimum(out[dst], c[src] - cap, out=out[dst])
    return out


def centre_height(values: ArrayLike, spacing: Spacing, radius: float) -> NDArray[np.float64]:
    """C(x) = max_{z ∈ G, |z − x| ≤ ρ} f(z) + √(ρ² − |z − x|²): the resting ball's centre.

    ``values`` holds f on a regular 1-D or 2-D grid with ``spacing`` Δ (a float, or one per
    axis); the result has the same shape.
    """
    f = _check(values)
    return _dilate(f, spacing, radius) + radius


def iron(values: ArrayLike, spacing: Spacing, radius: float) -> NDArray[np.float64]:
    """I(z) = min_{x ∈ G, |x − z| ≤ ρ} C(x) − √(ρ² − |x − z|²): the ironed landscape.

    The morphological closing of the sampled graph by the ball of radius ρ, exact for the
    samples (max/min over grid points only). Rounding of the final subtraction is clamped
    so that I ≥ f holds exactly, as it does in exact arithmetic.
    """
    f = _check(values)
    return np.maximum(_erode(_dilate(f, spacing, radius), spacing, radius), f)


def unreachable(
    values: ArrayLike, spacing: Spacing, radius: float, atol: float | None = None
) -> NDArray[np.bool_]:
    """The samples no ball of radius ρ resting on the graph touches: I(z) > f(z) + atol.

    See `unreachable_from_ironed` for the default ``atol``.
    """
    f = _check(values)
    return unreachable_from_ironed(f, iron(f, spacing, radius), radius, atol)


def monotonicity_gap(spacing: Spacing, small: float, large: float, ndim: int = 1) -> float:
    """γ = max_o b_L(o) − (b_L ∘ b_S)(o): how far the sampled large cap is from being open.

    Here b_S, b_L are the caps of radii ``small`` ≤ ``large`` sampled on the grid offsets
    and b_L ∘ b_S is the grey-scale opening of b_L by b_S (the upper envelope of the
    translates, by grid offsets, of b_S that fit under b_L). For every sampled f,

        iron(f, ρ_S) ≤ iron(f, ρ_L) + γ,

    since closing by an opening of b_L is monotone and b_L exceeds it by at most γ. In the
    continuum γ = 0; on a grid γ > 0 in general and the bound is attained, so ironing is
    monotone in ρ only up to γ. ``inf`` if some offset of b_L is covered by no translate.
    """
    if not 0 <= small <= large:
        raise ValueError(f"need 0 <= small <= large, got {small} and {large}")
    small_offsets, small_caps = _ball_offsets(ndim, spacing, small)
    large_offsets, large_caps = _ball_offsets(ndim, spacing, large)
    large_cap = dict(zip(large_offsets, large_caps + large, strict=True))
    opening = dict.fromkeys(large_offsets, -np.inf)
    small_pairs = list(zip(small_offsets, small_caps + small, strict=True))
    for shift in large_offsets:
        moved = [tuple(a + b for a, b in zip(q, shift, strict=True)) for q, _ in small_pairs]
        if not all(m in large_cap for m in moved):
            continue  # this translate of the small ball's footprint leaves the large one
        lift = min(large_cap[m] - cap for m, (_, cap) in zip(moved, small_pairs, strict=True))
        for m, (_, cap) in zip(moved, small_pairs, strict=True):
            opening[m] = max(opening[m], cap + lift)
    return max(float(large_cap[o] - opening[o]) for o in large_offsets)


def unreachable_from_ironed(
    values: ArrayLike, ironed: ArrayLike, radius: float, atol: float | None = None
) -> NDArray[np.bool_]:
    """I(z) > f(z) + atol for an already ironed surface: the samples no ball touches.

    ``atol`` defaults to 1e-12 (1 + max |f| + ρ), far above rounding and far below any
    geometric gap on a reasonable grid.
    """
    f, surface = np.asarray(values, dtype=np.float64), np.asarray(ironed, dtype=np.float64)
    if atol is None:
        atol = 1e-12 * (1.0 + float(np.abs(f).max()) + radius)
    return surface > f + atol
