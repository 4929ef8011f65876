"""Experiments for the paper's own claims: ironing, sharp minima, training speed, regimes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollingball.experiments.claims.common import (
    EXACT,
    cross_entropy,
    figure,
    load_task,
    make_optimizer,
    mlp,
    save,
    table,
    top_eigenvalue,
    train,
)
from rollingball.experiments.claims.laws_runs import COLOURS, _mean, _mean_std


def _run_1d(fn: Any, name: str, x0: float, lr: float, rho: float, steps: int) -> list[float]:
    """The path of a scalar parameter under one optimizer on f (float64)."""
    x = torch.nn.Parameter(torch.tensor([x0], dtype=torch.float64))
    if name == "gd":
        opt = make_optimizer("sgd", [x], lr=lr)
    elif name == "rbo":
        opt = make_optimizer("rbo", [x], lr=lr, radius=rho, **EXACT)
    elif name == "sam":
        opt = make_optimizer("sam", [x], lr=lr, rho=rho, momentum=0.0)
    else:
        opt = make_optimizer("usam", [x], lr=lr, rho=rho)

    def closure() -> Any:
        opt.zero_grad()
        loss = fn(x).sum()
        loss.backward()
        return loss

    path = [x0]
    for _ in range(steps):
        opt.step(closure)
        path.append(float(x.detach()))
    return path


def planted(x: torch.Tensor) -> torch.Tensor:
    """A sharp deep well at −1 (depth 1, width 0.1), a flat shallower one at +1 (0.8, 0.5)."""
    sharp = torch.exp(-((x + 1.0) ** 2) / (2 * 0.1**2))
    flat = 0.8 * torch.exp(-((x - 1.0) ** 2) / (2 * 0.5**2))
    return 0.05 * x**2 - sharp - flat


def sharp_flat(out: Path, tiny: bool) -> str:
    """Escape from a sharp minimum: starts inside the sharp basin, where does each run end?

    1-D planted landscape (:func:`planted`): the sharp well's curvature is 100 (radius of
    curvature 0.01), the flat one's 3.2. η = 0.01 (gradient descent is stable in both),
    200 steps from 7 evenly spaced starts in [−1.3, −0.7] (all in gradient descent's basin
    of the sharp minimum); a run ends in the flat basin if its last point is > 0, in the
    sharp one if it is within 0.5 of −1.
    """
    lr, steps = 0.01, 10 if tiny else 200
    starts = np.linspace(-1.3, -0.7, 2 if tiny else 7)
    radii = [0.1] if tiny else [0.03, 0.1, 0.3, 0.5, 1.0]

    def fractions(name: str, rho: float) -> dict[str, float]:
        ends = [_run_1d(planted, name, float(x0), lr, rho, steps)[-1] for x0 in starts]
        return {
            "flat": sum(e > 0 for e in ends) / len(ends),
            "sharp": sum(abs(e + 1) < 0.5 for e in ends) / len(ends),
        }

    results: dict[str, Any] = {
        "lr": lr,
        "steps": steps,
        "starts": starts.tolist(),
        "radii": radii,
        "gd": fractions("gd", 0.0),
    }
    from rollingball.landscape.ironing import iron

    grid = np.linspace(-3, 3, 3001)
    values = planted(torch.tensor(grid)).numpy()
    well, hump = (grid > -1.5) & (grid < -0.5), (grid > -0.9) & (grid < 0.2)

    def ironed_depth(rho: float) -> float:
        """Depth of the sharp well in the ironed landscape: the barrier minus the well's floor."""
        ironed = iron(values, grid[1] - grid[0], rho)
        return float(ironed[hump].max() - ironed[well].min())

    results["ironed_depth"] = [ironed_depth(rho) for rho in radii]
    rows = [["GD", 0.0, results["gd"]["flat"], results["gd"]["sharp"], ""]]
    for name in ("rbo", "usam", "sam"):
        results[name] = [fractions(name, rho) for rho in radii]
        for rho, frac, depth in zip(radii, results[name], results["ironed_depth"], strict=True):
            rows.append([name.upper(), rho, frac["flat"], frac["sharp"], depth])

    fig, axes = figure(1, 2, width=4.8)
    ax = axes[0][0]
    ax.plot(grid, values, color="k", lw=1, label="f")
    for colour, rho in zip(("C1", "C2", "C3"), (0.1, 0.3, 1.0), strict=True):
        ax.plot(
            grid, iron(values, grid[1] - grid[0], rho), color=colour, label=f"ironed, ρ = {rho}"
        )
    ax.set_xlabel("θ")
    ax.set_title("sharp (−1) and flat (+1) basins, ironed")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for colour, name in zip(COLOURS, ("rbo", "usam", "sam"), strict=False):
        ax.semilogx(
            radii, [f["flat"] for f in results[name]], "o-", color=colour, label=name.upper()
        )
    ax.axhline(results["gd"]["flat"], color="grey", ls="--", label="GD")
    ax.set_xlabel("radius ρ")
    ax.set_ylabel("fraction escaped to the flat basin")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    save(fig, out, "sharp_flat", results)
    header = [
        "optimizer",
        "ρ",
        "ended in the flat basin",
        "ended in the sharp basin",
        "sharp well's depth in the ironed landscape",
    ]
    return table(header, rows)


def wrinkled(x: torch.Tensor) -> torch.Tensor:
    """½x² + 0.05 sin(50x): wrinkles of radius of curvature 1/125 = 0.008 on a parabola."""
    return 0.5 * x**2 + 0.05 * torch.sin(50 * x)


def ironing(out: Path, tiny: bool) -> str:
    """Wrinkled parabola from x = 2, η = 0.01, 600 steps: where GD, RBO(ρ) and USAM(ρ) end up.

    'end f' is the mean of f over the last 100 steps (RBO's contact point can 2-cycle).
    """
    lr, steps = 0.01, 150 if tiny else 600
    radii = [0.1] if tiny else [0.003, 0.01, 0.03, 0.1, 0.2, 0.5]

    def end_value(path: list[float]) -> float:
        tail = torch.tensor(path[-min(100, len(path)) :], dtype=torch.float64)
        return float(wrinkled(tail).mean())

    gd = _run_1d(wrinkled, "gd", 2.0, lr, 0.0, steps)
    results: dict[str, Any] = {"lr": lr, "steps": steps, "radii": radii, "gd": end_value(gd)}
    paths: dict[str, list[float]] = {"GD": gd}
    rows = [["GD", 0.0, gd[-1], results["gd"]]]
    for name in ("rbo", "usam"):
        results[name] = []
        for rho in radii:
            path = _run_1d(wrinkled, name, 2.0, lr, rho, steps)
            results[name].append(end_value(path))
            rows.append([name.upper(), rho, path[-1], results[name][-1]])
            if rho == 0.2 or tiny:
                paths[f"{name.upper()} ρ = {rho}"] = path

    from rollingball.landscape.ironing import iron

    grid = np.linspace(-2.2, 2.2, 4401)
    values = wrinkled(torch.tensor(grid)).numpy()
    fig, axes = figure(1, 3, width=4.2)
    ax = axes[0][0]
    ax.plot(grid, values, color="k", lw=0.6, label="f")
    for colour, rho in zip(("C1", "C2"), (0.01, 0.2), strict=True):
        ax.plot(
            grid, iron(values, grid[1] - grid[0], rho), color=colour, label=f"ironed, ρ = {rho}"
        )
    ax.set_title("½x² + 0.05 sin 50x")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for colour, (label, path) in zip(COLOURS, paths.items(), strict=False):
        ax.plot(path, color=colour, lw=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("x")
    ax.legend(fontsize=7)
    ax = axes[0][2]
    ax.semilogx(radii, results["rbo"], "o-", color="C0", label="RBO")
    ax.semilogx(radii, results["usam"], "s-", color="C1", label="USAM")
    ax.axhline(results["gd"], color="grey", ls="--", label="GD")
    ax.axvline(1 / 125, color="k", lw=0.6, ls=":", label="wrinkle curvature radius")
    ax.set_xlabel("radius ρ")
    ax.set_ylabel("f at the end")
    ax.legend(fontsize=7)
    save(fig, out, "ironing", results)
    return table(["optimizer", "ρ", "end x", "end f (mean of last 100)"], rows)


TRAINING = {  # task -> (learning rate shared by all, epochs, batch)
    "mnist1d": (1.0, 10, 100),
    "digits": (0.3, 10, 100),
}


def training(out: Path, tiny: bool) -> str:
    """Training loss per epoch and per closure call, test accuracy: SGD, USAM(ρ), RBO(ρ).

    GELU MLP 100-100 (the compare model), float64, one constant learning rate shared by all
    optimizers (MNIST-1D 1, digits 0.3), batch 100, 10 epochs, 2 seeds; RBO with the exact
    projection. Full training loss measured at the end of each epoch.
    """
    seeds = [0] if tiny else [0, 1]
    radii = [0.1] if tiny else [0.1, 0.3]
    results: dict[str, Any] = {"setup": TRAINING, "tasks": {}}
    rows = []
    for task_name, (lr, epochs, batch) in TRAINING.items():
        task = load_task(task_name, n_train=200 if tiny else None, n_test=100 if tiny else None)
        epochs = 1 if tiny else epochs
        runs: dict[str, tuple[str, dict[str, Any]]] = {"SGD": ("sgd", {})}
        for rho in radii:
            runs[f"USAM ρ = {rho}"] = ("usam", {"rho": rho})
            runs[f"RBO ρ = {rho}"] = ("rbo", {"radius": rho, **EXACT})
        by_run: dict[str, Any] = {}
        for label, (name, hp) in runs.items():
            curves = []
            for seed in seeds:
                model = mlp(task.features, [100, 100], seed=seed, activation="gelu")
                curves.append(train(model, name, task, epochs, batch, seed=seed, lr=lr, **hp))
            by_run[label] = curves
            half = len(curves[0]["train_loss"]) // 2
            rows.append(
                [
                    task_name,
                    label,
                    _mean([c["train_loss"][half] for c in curves]),
                    _mean([c["train_loss"][-1] for c in curves]),
                    _mean_std([c["test_accuracy"][-1] for c in curves]),
                    curves[0]["calls"][-1],
                    _mean([c["converged_fraction"] for c in curves]),
                ]
            )
        results["tasks"][task_name] = by_run

    fig, axes = figure(2, 3, width=4.2)
    for row, task_name in enumerate(TRAINING):
        for colour, (label, curves) in zip(
            COLOURS, results["tasks"][task_name].items(), strict=False
        ):
            style = "--" if label.startswith("RBO") else "-"
            loss = np.mean([c["train_loss"] for c in curves], axis=0)
            acc = np.mean([c["test_accuracy"] for c in curves], axis=0)
            epochs_axis, calls = curves[0]["epoch"], curves[0]["calls"]
            axes[row][0].semilogy(epochs_axis, loss, style, color=colour, label=label)
            axes[row][1].loglog(np.maximum(calls, 1), loss, style, color=colour, label=label)
            axes[row][2].plot(epochs_axis, acc, style, color=colour, label=label)
        lr = TRAINING[task_name][0]
        axes[row][0].set_title(f"{task_name}, lr {lr}: train loss per epoch")
        axes[row][1].set_title("train loss per closure call")
        axes[row][2].set_title("test accuracy %")
        axes[row][0].set_xlabel("epoch")
        axes[row][1].set_xlabel("closure calls")
        axes[row][2].set_xlabel("epoch")
        axes[row][0].legend(fontsize=7)
    save(fig, out, "training", results)
    header = [
        "task",
        "optimizer",
        "train loss, mid-run",
        "final train loss",
        "test acc. %",
        "closure calls (seed 0)",
        "steps converged",
    ]
    return table(header, rows)


def regimes(out: Path, tiny: bool) -> str:
    """Radius sweep at one learning rate on digits: where the ball stops being SGD and breaks.

    GELU MLP 100-100, float64, lr 0.3, batch 100, 10 epochs, seed 0, exact projection;
    ρ·λ_max measured on the full training loss at the end of training.
    """
    task = load_task("digits", n_train=200 if tiny else None, n_test=100 if tiny else None)
    lr, epochs = 0.3, 1 if tiny else 10
    radii = [0.0, 1.0] if tiny else [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    results: dict[str, Any] = {"lr": lr, "epochs": epochs, "radii": radii, "runs": []}
    rows = []
    for rho in radii:
        model = mlp(task.features, [100, 100], seed=0, activation="gelu")
        run = train(model, "rbo", task, epochs, 100, seed=0, lr=lr, radius=rho, **EXACT)
        lam = (
            top_eigenvalue(model, cross_entropy, task.x, task.y)
            if not run["diverged"]
            else math.nan
        )
        entry = {
            "radius": rho,
            "test_accuracy": run["test_accuracy"][-1],
            "train_loss": run["train_loss"][-1],
            "converged_fraction": run["converged_fraction"],
            "calls_per_step": run["calls"][-1] / max(run["steps"], 1),
            "lambda_max": lam,
            "rho_lambda": rho * lam,
            "diverged": run["diverged"],
        }
        results["runs"].append(entry)
        rows.append(
            [
                rho,
                entry["test_accuracy"],
                entry["train_loss"],
                entry["converged_fraction"],
                entry["calls_per_step"],
                lam,
                rho * lam,
            ]
        )

    runs = [r for r in results["runs"] if r["radius"] > 0]
    base = results["runs"][0]
    xs = [r["radius"] for r in runs]
    fig, axes = figure(1, 3, width=4.2)
    ax = axes[0][0]
    ax.semilogx(xs, [r["test_accuracy"] for r in runs], "o-", label="RBO")
    ax.axhline(base["test_accuracy"], color="grey", ls="--", label="ρ = 0 (SGD)")
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.semilogx(xs, [r["converged_fraction"] for r in runs], "o-", label="steps converged")
    ax.semilogx(
        xs, [r["calls_per_step"] / 101 for r in runs], "s-", label="closure calls per step / 101"
    )
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax = axes[0][2]
    ax.loglog(xs, [r["rho_lambda"] for r in runs], "o-")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("ρ · λ_max at the end")
    for ax in axes[0]:
        ax.set_xlabel("radius ρ")
    axes[0][0].set_title(f"digits, lr {lr}, {epochs} epochs")
    save(fig, out, "regimes", results)
    header = [
        "ρ",
        "test acc. %",
        "final train loss",
        "steps converged",
        "calls / step",
        "λ_max (end)",
        "ρ·λ_max",
    ]
    return table(header, rows)
