"""Figures of ironed landscapes, trajectories and loss slices (matplotlib, Agg canvas).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global
state, no display needed); the caller saves it. Curves of a 1-D landscape are
drawn with equal axis scales whenever the ranges allow it, since the ball is only round
(and its contact geometry only visible) when both axes use the same unit.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from numpy.typing import NDArray
from PIL import Image

from rollingball.landscape.ironing import unreachable_from_ironed
from rollingball.landscape.trajectories import Trajectory

__all__ = ["Run", "plot_ironed", "plot_trajectories", "save_png"]

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Run:
    """One trajectory to draw: its label, its ball radius (0 for point optimizers), its data."""

    label: str
    radius: float
    trajectory: Trajectory


def save_png(fig: Figure, path: str | Path, dpi: int = 100, colors: int = 256) -> None:
    """Save ``fig`` as a PNG with an adaptive palette of ``colors`` colours (small files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors, method=Image.Quantize.FASTOCTREE)
        palette.save(path, optimize=True)


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.15 + 0.7 * i / max(n - 1, 1)) for i in range(n)]


def _columns(panels: int) -> int:
    """Three panels a row, but a 2 × 2 block for four."""
    return 2 if panels == 4 else min(panels, 3)


def _equal_aspect(ax: Axes, x: Array, y: Array) -> bool:
    """Use one unit on both axes when the curve's box is not too elongated."""
    ratio = (np.ptp(y) + 1e-12) / (np.ptp(x) + 1e-12)
    if 0.1 <= ratio <= 3.0:
        ax.set_aspect("equal", adjustable="datalim")
        return True
    return False


def plot_ironed(
    grid: Sequence[Array],
    values: Array,
    ironed: Mapping[float, Array],
    title: str,
    labels: Sequence[str] = ("θ₁", "θ₂"),
) -> Figure:
    """f and its ironed versions I_ρ: overlaid curves (1-D) or one map per radius (2-D)."""
    if values.ndim == 1:
        x = grid[0]
        fig = Figure(figsize=(9, 4.8), layout="constrained")
        ax = fig.subplots()
        ax.plot(x, values, color="0.6", lw=0.8, label="f (sampled)")
        for (radius, surface), colour in zip(ironed.items(), _colours(len(ironed)), strict=True):
            ax.plot(x, surface, color=colour, lw=1.6, label=f"ironed, ρ = {radius:g}")
        _equal_aspect(ax, x, values)
        ax.set_xlabel(labels[0])
        ax.set_ylabel("loss")
        ax.legend(loc="best", fontsize=8)
        ax.set_title(title)
        return fig
    panels = [("f (sampled)", values)] + [
        (f"ironed, ρ = {r:g}  ({unreachable_from_ironed(values, s, r).mean():.0%} unreachable)", s)
        for r, s in ironed.items()
    ]
    cols = _columns(len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols + 0.8, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    low, high = float(values.min()), float(max(s.max() for _, s in panels))
    extent = (grid[0][0], grid[0][-1], grid[1][0], grid[1][-1])
    levels = np.unique(np.quantile(values, np.linspace(0.02, 0.98, 12)))  # even area per band
    for ax, (name, surface) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(
            surface.T, origin="lower", extent=extent, vmin=low, vmax=high, cmap="viridis"
        )
        ax.contour(grid[0], grid[1], surface.T, levels=levels, colors="white", linewidths=0.4)
        ax.set_title(name, fontsize=9)
        ax.locator_params(nbins=5)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.9, label="loss")
    fig.suptitle(title)
    return fig


def plot_trajectories(
    grid: Sequence[Array],
    values: Array,
    ironed: Mapping[float, Array],
    runs: Sequence[Run],
    title: str,
) -> Figure:
    """One panel per ball radius: the landscape, the ironed one, the RBO runs and the GD runs.

    Runs with radius 0 (GD and other point optimizers) are drawn in every panel for
    comparison. In 1-D the RBO ball is drawn at its start and end; in 2-D the paths of θ.
    """
    radii = [r for r in ironed if r > 0]
    points = [run for run in runs if run.radius == 0]
    cols = _columns(len(radii))
    rows = math.ceil(len(radii) / cols)
    fig = Figure(figsize=(5.2 * cols, 4.4 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, radius in zip(axes.flat, radii, strict=False):
        balls = [run for run in runs if run.radius == radius]
        if values.ndim == 1:
            _trajectory_panel_1d(ax, grid[0], values, ironed[radius], radius, balls, points)
        else:
            _trajectory_panel_2d(ax, grid, values, balls, points)
        ax.set_title(f"ρ = {radius:g}", fontsize=10)
    for ax in list(axes.flat)[len(radii) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 4), fontsize=8)
    fig.suptitle(title)
    return fig


def _trajectory_panel_1d(
    ax: Axes,
    x: Array,
    values: Array,
    ironed: Array,
    radius: float,
    balls: Sequence[Run],
    points: Sequence[Run],
) -> None:
    ax.plot(x, values, color="0.65", lw=0.7, label="f")
    ax.plot(x, ironed, color="tab:green", lw=1.2, alpha=0.8, label="ironed f")
    for run in points:
        t = run.trajectory
        ax.plot(t.params[:, 0], t.loss, ".", ms=2, color="tab:blue", label=f"{run.label}: θ")
        ax.plot(t.params[-1, 0], t.loss[-1], "o", mfc="none", color="tab:blue")
    round_ball = _equal_aspect(ax, x, values)
    for run in balls:
        t = run.trajectory
        ax.plot(t.params[:, 0], t.loss, ".", ms=2, color="tab:red", label=f"{run.label}: contact")
        if t.centres is not None:
            c = t.centres.numpy()
            ax.plot(c[:, 0], c[:, 1], ".", ms=1.5, color="tab:orange", label="ball centre")
            if round_ball:
                for k, style in ((0, ":"), (-1, "-")):
                    ax.add_patch(
                        Circle((c[k, 0], c[k, 1]), radius, fill=False, ls=style, color="tab:orange")
                    )
    ax.set_xlabel("θ")
    ax.set_ylabel("loss")


def _trajectory_panel_2d(
    ax: Axes,
    grid: Sequence[Array],
    values: Array,
    balls: Sequence[Run],
    points: Sequence[Run],
) -> None:
    extent = (grid[0][0], grid[0][-1], grid[1][0], grid[1][-1])
    ax.imshow(values.T, origin="lower", extent=extent, cmap="Greys_r", alpha=0.7)
    ax.contour(grid[0], grid[1], values.T, levels=15, colors="0.5", linewidths=0.3)
    cool, warm = ["tab:cyan", "tab:blue", "tab:purple"], ["tab:red", "tab:orange", "tab:pink"]
    pairs = [(r, cool[i % 3]) for i, r in enumerate(points)]
    pairs += [(r, warm[i % 3]) for i, r in enumerate(balls)]
    for run, colour in pairs:
        p = run.trajectory.params.numpy()
        ax.plot(p[:, 0], p[:, 1], ".-", lw=0.7, ms=2, color=colour, label=run.label)
        ax.plot(p[0, 0], p[0, 1], "o", ms=4, color=colour)
        ax.plot(p[-1, 0], p[-1, 1], "*", ms=9, color=colour, mec="black", mew=0.5)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")
