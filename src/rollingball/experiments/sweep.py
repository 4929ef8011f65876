"""``rollingball sweep``: the paper's radius x learning-rate grid, as a CSV and a heat map.

Without radii it sweeps the learning rate of any optimizer (one row of the heat map). With a
validation split in the configuration the heat map shows validation accuracy, which is what
the project uses to choose learning rates (test accuracy is reported, never tuned on).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rollingball.experiments.atomic import atomic_write_text
from rollingball.experiments.config import ConfigError, RunConfig
from rollingball.experiments.plots import plot_heatmap
from rollingball.experiments.runner import run

__all__ = ["SWEEP_COLUMNS", "sweep"]

SWEEP_COLUMNS = (
    "radius",
    "lr",
    "seed",
    "val_accuracy",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "grad_evals",
    "wall_seconds",
    "diverged",
)


def sweep(
    config: RunConfig,
    radii: Sequence[float] | None,
    lrs: Sequence[float],
    out: str | Path,
    *,
    seeds: int = 1,
    console: Any = None,
) -> dict[str, Any]:
    """Run ``config`` for every radius (``rbo`` only; ``None``: as configured), lr and seed.

    Writes ``out/sweep.csv`` (one row per run), ``out/heatmap.png`` (mean validation accuracy
    if the config has a validation split, else test accuracy; a diverged run shows as
    "diverged") and the runs under ``out/runs``. Finished runs are reused.
    """
    if radii and config.optimizer.name != "rbo":
        raise ConfigError(f"--radius is RBO's; the config's optimizer is {config.optimizer.name!r}")
    if not lrs:
        raise ConfigError("sweep needs at least one learning rate")
    if any(r < 0 for r in radii or []) or any(lr <= 0 or not math.isfinite(lr) for lr in lrs):
        raise ConfigError("radii must be >= 0 and learning rates > 0")
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    config.validate()
    out = Path(out)
    bundle = config.data.load(config.seed)
    axis: list[float | None] = list(radii) if radii else [None]
    rows: list[dict[str, Any]] = []
    grid = np.full((len(axis), len(lrs)), np.nan)
    for i, radius in enumerate(axis):
        for j, lr in enumerate(lrs):
            cell = [
                _run_cell(config, radius, lr, config.seed + offset, out, bundle, console)
                for offset in range(seeds)
            ]
            rows += cell
            grid[i, j] = statistics.fmean(_score(row) for row in cell)
            if console is not None:
                console.print(_cell_line(config.optimizer.name, radius, lr, cell), highlight=False)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SWEEP_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", buffer.getvalue())
    which = "validation" if config.data.val_fraction > 0 else "test"
    title = (
        f"{config.optimizer.name}: {which} accuracy (%), {config.model.name} on "
        f"{config.data.name}, {seeds} seed(s)"
    )
    labels = [math.nan if r is None else r for r in axis]
    heatmap = plot_heatmap(labels, list(lrs), grid, out / "heatmap.png", title=title)
    return {"rows": rows, "grid": grid, "heatmap": heatmap}


def _run_cell(
    config: RunConfig,
    radius: float | None,
    lr: float,
    seed: int,
    out: Path,
    bundle: Any,
    console: Any,
) -> dict[str, Any]:
    """Run (or reuse) one seed of one grid cell; its row of sweep.csv."""
    cfg = copy.deepcopy(config)
    cfg.seed = seed
    cfg.optimizer.hparams["lr"] = float(lr)
    name = f"lr{lr:g}"
    if radius is not None:
        cfg.optimizer.hparams["radius"] = float(radius)
        name = f"r{radius:g}_{name}"
    if console is not None:
        console.print(f"{config.optimizer.name} {name} seed {seed}", highlight=False)
    result = run(cfg, out / "runs" / name / f"seed{seed}", resume=True, data=bundle)
    last = result.final
    return {
        "radius": "" if radius is None else radius,
        "lr": lr,
        "seed": seed,
        "val_accuracy": last.get("val_accuracy", ""),
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "grad_evals": last["grad_evals"],
        "wall_seconds": round(float(last["wall_seconds"]), 3),
        "diverged": result.diverged,
    }


def _score(row: dict[str, Any]) -> float:
    """The heat map's value of one run: validation accuracy (%) if measured, else test."""
    if row["diverged"]:
        return math.nan
    key = "test_accuracy" if row["val_accuracy"] == "" else "val_accuracy"
    return 100 * float(row[key])


def _cell_line(optimizer: str, radius: float | None, lr: float, cell: list[dict[str, Any]]) -> str:
    """One printed line per finished cell: its accuracy over seeds and its cost."""
    where = f"{optimizer} " + ("" if radius is None else f"ρ={radius:g} ") + f"lr={lr:g}"
    which = "test" if cell[0]["val_accuracy"] == "" else "val"
    scores = [_score(row) for row in cell]
    calls = statistics.fmean(float(row["grad_evals"]) for row in cell)
    seconds = sum(float(row["wall_seconds"]) for row in cell)
    if any(math.isnan(v) for v in scores):
        accuracy = f"diverged ({sum(math.isnan(v) for v in scores)} of {len(cell)} seeds)"
    else:
        spread = f" ± {statistics.stdev(scores):.2f}" if len(scores) > 1 else ""
        accuracy = f"{which} accuracy {statistics.fmean(scores):.2f}%{spread}"
    return f"{where}: {accuracy}, {calls:,.0f} closure calls, {seconds:.1f} s ({len(cell)} seed(s))"
