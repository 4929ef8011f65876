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
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle
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


def _quantile_norm(values: Array, high: float, bands: int = 32) -> BoundaryNorm:
    """A colour scale whose bands each hold an equal share of the samples of ``values`` (the
    top band reaches ``high``): a deep basin and steep walls both keep their detail."""
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bands + 1)))
    edges[-1] = max(edges[-1], high)
    return BoundaryNorm(edges, ncolors=256)


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
    norm = _quantile_norm(values, float(max(s.max() for _, s in panels)))
    extent = (grid[0][0], grid[0][-1], grid[1][0], grid[1][-1])
    levels = np.unique(np.quantile(values, np.linspace(0.02, 0.98, 12)))  # even area per band
    for ax, (name, surface) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(surface.T, origin="lower", extent=extent, norm=norm, cmap="viridis")
        ax.contour(grid[0], grid[1], surface.T, levels=levels, colors="white", linewidths=0.4)
        ax.set_title(name, fontsize=9)
        ax.locator_params(nbins=5)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    bar = fig.colorbar(image, ax=axes, shrink=0.9, spacing="uniform", format="%.3g")
    bar.set_ticks(list(norm.boundaries[:: max(len(norm.boundaries) // 8, 1)]))
    bar.set_label("loss (quantile scale)")
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
    comparison. In 1-D each radius gets the whole landscape (the ball drawn at its start and
    end) above a zoom on the part its runs visit; in 2-D the paths of θ, zoomed to them.
    """
    radii = [r for r in ironed if r > 0]
    points = [run for run in runs if run.radius == 0]
    cols = _columns(len(radii))
    rows = math.ceil(len(radii) / cols)
    if values.ndim == 1:
        fig = Figure(figsize=(5.2 * cols, 6.2 * rows + 0.4), layout="constrained")
        axes = fig.subplots(2 * rows, cols, squeeze=False, height_ratios=[1.0, 1.4] * rows)
        for k, radius in enumerate(radii):
            whole, zoom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
            balls = [run for run in runs if run.radius == radius]
            _trajectory_panels_1d(whole, zoom, grid[0], values, ironed[radius], balls, points)
            whole.set_title(f"ρ = {radius:g}", fontsize=10)
        legend_axes = axes[1, 0]
    else:
        fig = Figure(figsize=(5.2 * cols, 4.4 * rows + 0.4), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, radius in zip(axes.flat, radii, strict=False):
            balls = [run for run in runs if run.radius == radius]
            _trajectory_panel_2d(ax, grid, values, balls, points)
            ax.set_title(f"ρ = {radius:g}", fontsize=10)
        legend_axes = axes[0, 0]
    per_panel = axes.shape[0] // rows  # axes per radius, stacked: 2 in 1-D, 1 in 2-D
    for k in range(len(radii), rows * cols):
        for ax in axes[(k // cols) * per_panel : (k // cols + 1) * per_panel, k % cols]:
            ax.axis("off")
    handles, names = legend_axes.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 4), fontsize=8)
    fig.suptitle(title)
    return fig


def _trajectory_panels_1d(
    whole: Axes,
    zoom: Axes,
    x: Array,
    values: Array,
    ironed: Array,
    balls: Sequence[Run],
    points: Sequence[Run],
) -> None:
    """Above: f, its ironing, the ball at the start (dotted) and end of each RBO run and a
    frame around the runs. Below: that frame, enlarged, with every step's points."""
    whole.plot(x, values, color="0.65", lw=0.7)
    whole.plot(x, ironed, color="tab:green", lw=1.2, alpha=0.8)
    round_ball = _equal_aspect(whole, x, values)
    for run in balls:
        c = run.trajectory.centres
        radius = run.radius
        if c is not None and round_ball:
            for k, style in ((0, ":"), (-1, "-")):
                centre = (float(c[k, 0]), float(c[k, 1]))
                whole.add_patch(Circle(centre, radius, fill=False, ls=style, color="tab:orange"))
    x0, x1, y0, y1 = _zoom_box_1d(x, values, [*balls, *points])
    whole.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="0.2", lw=0.8))
    whole.set_ylabel("loss")
    _draw_runs_1d(zoom, x, values, ironed, balls, points)
    zoom.set_xlim(x0, x1)
    zoom.set_ylim(y0, y1)
    zoom.set_xlabel("θ")
    zoom.set_ylabel("loss (frame above)")


def _draw_runs_1d(
    ax: Axes, x: Array, values: Array, ironed: Array, balls: Sequence[Run], points: Sequence[Run]
) -> None:
    """The curves and the runs' points: GD's θ as rings, RBO's contacts as dots inside them
    (both sit on the graph), RBO's ball centres underneath."""
    ax.plot(x, values, color="0.65", lw=0.7, label="f")
    ax.plot(x, ironed, color="tab:green", lw=1.2, alpha=0.8, label="ironed f")
    for run in points:
        t = run.trajectory
        ax.plot(t.params[:, 0], t.loss, "o", ms=3.5, mew=0.6, mfc="none", color="tab:blue",
                zorder=3, label=f"{run.label}: θ")  # fmt: skip
        ax.plot(t.params[-1, 0], t.loss[-1], "o", ms=8, mew=1.2, mfc="none", color="tab:blue",
                zorder=3)  # fmt: skip
    for run in balls:
        t = run.trajectory
        ax.plot(t.params[:, 0], t.loss, ".", ms=3, color="tab:red", zorder=4,
                label=f"{run.label}: contact")  # fmt: skip
        if t.centres is not None:
            c = t.centres.numpy()
            ax.plot(c[:, 0], c[:, 1], ".", ms=1.5, color="tab:orange", label="ball centre")


def _zoom_box_1d(x: Array, values: Array, runs: Sequence[Run]) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) around the runs' points (θ, contacts, ball centres) and the graph
    between them, with a margin."""
    xs = [run.trajectory.params[:, 0].numpy() for run in runs]
    ys = [run.trajectory.loss.numpy() for run in runs]
    for run in runs:
        if run.trajectory.centres is not None:
            xs.append(run.trajectory.centres[:, 0].numpy())
            ys.append(run.trajectory.centres[:, 1].numpy())
    lo, hi = min(float(v.min()) for v in xs), max(float(v.max()) for v in xs)
    pad = max(0.1 * (hi - lo), 0.005 * float(x[-1] - x[0]))
    lo, hi = lo - pad, hi + pad
    ys.append(values[(x >= lo) & (x <= hi)])
    y0, y1 = min(float(v.min()) for v in ys if v.size), max(float(v.max()) for v in ys if v.size)
    margin = 0.08 * (y1 - y0) + 1e-12
    return lo, hi, y0 - margin, y1 + margin


def _trajectory_panel_2d(
    ax: Axes,
    grid: Sequence[Array],
    values: Array,
    balls: Sequence[Run],
    points: Sequence[Run],
) -> None:
    """The landscape around the runs (zoomed to their paths), RBO's paths under GD's."""
    x0, x1, y0, y1 = _zoom_box_2d(grid, [*balls, *points])
    extent = (grid[0][0], grid[0][-1], grid[1][0], grid[1][-1])
    window = values[np.ix_((grid[0] >= x0) & (grid[0] <= x1), (grid[1] >= y0) & (grid[1] <= y1))]
    shown = window if window.size else values
    ax.imshow(values.T, origin="lower", extent=extent, cmap="Greys_r", alpha=0.7,
              norm=_quantile_norm(shown, float(shown.max())), interpolation="bilinear")  # fmt: skip
    levels = np.unique(np.quantile(shown, np.linspace(0.05, 0.95, 12)))
    ax.contour(grid[0], grid[1], values.T, levels=levels, colors="0.45", linewidths=0.4)
    warm, cool = ["tab:red", "tab:orange", "tab:pink"], ["tab:blue", "tab:cyan", "tab:purple"]
    for i, run in enumerate(balls):  # RBO below, translucent: its hops may cross GD's path
        p = run.trajectory.params.numpy()
        colour = warm[i % 3]
        ax.plot(p[:, 0], p[:, 1], ".-", lw=0.6, ms=2, alpha=0.6, color=colour, label=run.label)
        ax.plot(p[0, 0], p[0, 1], "o", ms=5, color=colour, mec="black", mew=0.5, zorder=5)
        ax.plot(p[-1, 0], p[-1, 1], "*", ms=11, color=colour, mec="black", mew=0.6, zorder=5)
    for i, run in enumerate(points):  # GD on top, with a white edge
        p = run.trajectory.params.numpy()
        colour = cool[i % 3]
        edge = [patheffects.withStroke(linewidth=3.2, foreground="white")]
        ax.plot(p[:, 0], p[:, 1], "-", lw=1.8, color=colour, label=run.label, zorder=4,
                path_effects=edge)  # fmt: skip
        ax.plot(p[-1, 0], p[-1, 1], "s", ms=6, color=colour, mec="black", mew=0.6, zorder=6)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")


def _zoom_box_2d(grid: Sequence[Array], runs: Sequence[Run]) -> tuple[float, float, float, float]:
    """A square around every path (15% margin, at least a tenth of the domain), in the domain."""
    paths = np.concatenate([run.trajectory.params.numpy() for run in runs])
    lo, hi = paths.min(0), paths.max(0)
    domain_lo = np.array([grid[0][0], grid[1][0]])
    domain_hi = np.array([grid[0][-1], grid[1][-1]])
    side = max(1.3 * float((hi - lo).max()), 0.1 * float((domain_hi - domain_lo).max()))
    side = min(side, float((domain_hi - domain_lo).min()))
    centre = np.clip((lo + hi) / 2, domain_lo + side / 2, domain_hi - side / 2)
    return (
        float(centre[0] - side / 2),
        float(centre[0] + side / 2),
        float(centre[1] - side / 2),
        float(centre[1] + side / 2),
    )
