"""What a reader can see in the landscape figures: colour scales, zooms, which path is on top."""

from __future__ import annotations

import numpy as np
import torch

from rollingball.landscape.plots import Run, plot_ironed, plot_trajectories
from rollingball.landscape.trajectories import Trajectory


def _run(label: str, radius: float, points: list[list[float]], f) -> Run:
    params = torch.tensor(points, dtype=torch.float64)
    loss = torch.tensor([f(p) for p in points], dtype=torch.float64)
    centres = None
    if radius > 0:  # a ball straight above each point, enough for drawing
        centres = torch.cat([params, (loss + radius)[:, None]], 1)
    calls = torch.arange(len(points))
    return Run(label, radius, Trajectory(params, loss, calls, centres))


def test_the_slice_colours_hold_equal_shares_of_a_deep_basin():
    axis = np.linspace(-1, 1, 41)
    values = np.exp(8 * (axis[:, None] ** 2 + axis[None, :] ** 2))  # e^0 .. e^16: a deep basin
    figure = plot_ironed([axis, axis], values, {0.2: values + 1e-3}, "basin")
    norm = figure.axes[0].images[0].norm
    counts, _ = np.histogram(values, bins=norm.boundaries)
    assert len(counts) >= 30  # 32 bands where a linear scale puts 99% of the samples in one
    assert counts.max() - counts.min() <= 0.02 * values.size
    linear_first_band = (values < values.min() + (values.max() - values.min()) / 32).mean()
    assert linear_first_band > 0.9


def test_2d_paths_are_zoomed_and_gd_is_drawn_over_rbo():
    axis = np.linspace(-3, 3, 61)
    values = axis[:, None] ** 2 + axis[None, :] ** 2
    f = lambda p: p[0] ** 2 + p[1] ** 2  # noqa: E731
    gd = _run("GD", 0.0, [[2.0, 0.0], [1.95, 0.02], [1.9, 0.03]], f)
    rbo = _run("RBO", 0.5, [[2.0, 0.0], [1.96, 0.01], [1.9, 0.03]], f)  # the same path
    figure = plot_trajectories([axis, axis], values, {0.5: values}, [gd, rbo], "paths")
    ax = figure.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 <= 1.9 and x1 >= 2.0 and y0 <= 0.0 and y1 >= 0.03  # every point in view
    assert x1 - x0 <= 0.61 and y1 - y0 <= 0.61  # a tenth of the domain, not all of it
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["GD"].get_zorder() > lines["RBO"].get_zorder()
    assert lines["RBO"].get_alpha() < 1


def test_1d_runs_get_a_zoom_under_the_whole_landscape():
    x = np.linspace(-2, 6, 801)
    values = np.sin(3 * x)
    f = lambda p: float(np.sin(3 * p[0]))  # noqa: E731
    gd = _run("GD", 0.0, [[2.0], [1.99], [1.98]], f)
    rbo = _run("RBO", 0.1, [[2.0], [2.02], [2.05]], f)
    figure = plot_trajectories([x], values, {0.1: values}, [gd, rbo], "runs")
    whole, zoom = figure.axes[:2]
    assert whole.get_xlim()[0] <= -2 and whole.get_xlim()[1] >= 6
    x0, x1 = zoom.get_xlim()
    assert x0 <= 1.98 and x1 >= 2.05 and x1 - x0 < 0.2
    y0, y1 = zoom.get_ylim()
    assert y0 <= min(f([t]) for t in (1.98, 2.05)) and y1 >= f([2.05]) + 0.1  # centres too
    assert len(whole.patches) == 3  # the ball at its start and end, and the zoom's frame
