"""PNG plots of saved runs: learning curves and the radius x learning-rate heat map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rollingball.experiments.report import RunRecord, diverged_text, group_runs

__all__ = ["CURVE_AXES", "plot_curves", "plot_heatmap"]

# file stem -> (metrics key on the x axis, axis label, log scale)
CURVE_AXES: dict[str, tuple[str, str, bool]] = {
    "accuracy_vs_epoch": ("epochs", "epoch", False),
    "accuracy_vs_grad_evals": ("grad_evals", "closure calls (forward + backward passes)", True),
    "accuracy_vs_wall_time": ("wall_seconds", "wall time (s)", True),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(
    records: Sequence[RunRecord], x_key: str, y_key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean y and std y over seeds, row by row up to the shortest run."""
    n = min(len(r.metrics) for r in records)
    xs = np.array([[float(r.metrics[i][x_key]) for i in range(n)] for r in records])
    ys = np.array([[float(r.metrics[i][y_key]) for i in range(n)] for r in records])
    return xs.mean(0), ys.mean(0), ys.std(0)


def plot_curves(
    records: Sequence[RunRecord],
    out_dir: str | Path,
    metric: str = "test_accuracy",
    title: str = "",
) -> list[Path]:
    """Mean (± std over seeds) ``metric`` vs epoch, closure calls and wall time; one PNG each.

    One curve per group of runs that differ only in their seed, labelled with the settings
    that set it apart (:func:`~rollingball.experiments.report.group_runs`); a group with a
    diverged run says "diverged at step N" in its label and ends in a cross.
    """
    plt = _pyplot()
    groups = group_runs(records)  # runs that differ only in their seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, (x_key, x_label, log_x) in CURVE_AXES.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, members in groups:
            x, y, s = _mean_curve(members, x_key, metric)
            scale = 100.0 if metric.endswith("accuracy") else 1.0
            diverged = diverged_text(
                [
                    r.metrics[-1].get("diverged_step", r.metrics[-1]["step"])
                    if r.metrics[-1].get("diverged")
                    else ""
                    for r in members
                ]
            )
            (line,) = ax.plot(
                x,
                scale * y,
                marker="o",
                markersize=2.5,
                linestyle="--" if label.startswith("rbo") else "-",  # RBO dashed: tell apart
                label=f"{label} (n={len(members)})" + (f": {diverged}" if diverged else ""),
            )
            ax.fill_between(x, scale * (y - s), scale * (y + s), color=line.get_color(), alpha=0.15)
            if diverged:
                ax.plot(x[-1:], scale * y[-1:], marker="X", markersize=10, color=line.get_color())
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric.replace("_", " ") + (" (%)" if metric.endswith("accuracy") else ""))
        ax.set_title(title or f"{metric.replace('_', ' ')} vs {x_label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_heatmap(
    radii: Sequence[float],
    lrs: Sequence[float],
    values: np.ndarray,
    path: str | Path,
    title: str = "test accuracy (%)",
) -> Path:
    """Heat map of ``values[i, j]`` at radius ``radii[i]`` and learning rate ``lrs[j]``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(lrs) + 2.5, 0.8 * len(radii) + 1.8))
    image = ax.imshow(values, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_yticks(range(len(radii)), ["as set" if np.isnan(v) else f"{v:g}" for v in radii])
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("radius ρ")
    finite = values[np.isfinite(values)]
    middle = float(finite.mean()) if finite.size else 0.0
    for i in range(len(radii)):
        for j in range(len(lrs)):
            v = values[i, j]
            text = "diverged" if not np.isfinite(v) else f"{v:.1f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                color="white" if v < middle else "black",
                fontsize=9,
            )
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
