"""The cost frontier of RBO's projection: test accuracy against closure calls per step.

    rollingball frontier [--out runs/frontier] [--epochs 10] [--seeds 3] [--jobs 2]
        [--nets gelu relu relu_he]

On MNIST-1D and digits (compare's MLP, batch 100, cosine schedule, compare's learning rates,
each task's from ``compare.TASK_SETTINGS``), with three networks — GELU, ReLU
with PyTorch's initialisation and ReLU with He's (`NETS`) — RBO at ρ ∈ {0.1, 0.3, 1} with the
projection budgets K ∈ {1, 2, 3, 5} (at tolerance 1e-4, so the budget decides) and the
tolerances {1e-1, 1e-2} (at K = 20), each with Anderson memory 1, and the converged
projection (K = 20, tol = 1e-4, memory 5: the former default); SGD, momentum, SAM and USAM as
baselines, all at equal epochs. Writes
``frontier.csv`` (one row per run), ``frontier.md`` (mean ± std over seeds) and
``frontier.png`` into ``--out``; finished runs are reused.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from rollingball.experiments.compare import TASK_SETTINGS
from rollingball.experiments.config import (
    BudgetConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    config_from_dict,
    config_to_dict,
)
from rollingball.experiments.runner import read_metrics, run

# the tasks, each at compare's tuned settings for its MLP (`compare.TASK_SETTINGS`)
TASKS = ("mnist1d", "digits")
# the MLP's keyword arguments per network (learning rates are compare's, tuned on GELU)
NETS: dict[str, dict[str, str]] = {
    "gelu": {"activation": "gelu"},
    "relu": {"activation": "relu"},
    "relu_he": {"activation": "relu", "init": "he"},
}
RADII = (0.1, 0.3, 1.0)
BASELINES = ("sgd", "momentum", "sam", "usam")
SETTINGS: dict[str, dict[str, Any]] = {
    **{
        f"K={k}": {"projection_steps": k, "projection_tol": 1e-4, "anderson_memory": 1}
        for k in (1, 2, 3, 5)
    },
    **{
        f"tol={tol:g}": {"projection_steps": 20, "projection_tol": tol, "anderson_memory": 1}
        for tol in (1e-1, 1e-2)
    },
    "converged": {"projection_steps": 20, "projection_tol": 1e-4, "anderson_memory": 5},
}
USAM_RHO = 0.05


@dataclass(frozen=True)
class Cell:
    """One configuration of the frontier: task, network, optimizer, radius and projection
    setting."""

    task: str
    net: str
    optimizer: str
    radius: float | None = None
    setting: str = ""

    @property
    def name(self) -> str:
        if self.radius is None:
            return f"{self.task}/{self.net}/{self.optimizer}"
        return f"{self.task}/{self.net}/rbo_r{self.radius:g}_{self.setting}"


def _hparams(task: str) -> tuple[dict[str, dict[str, Any]], dict[float, float]]:
    """The task's hyperparameters and RBO's learning rate per radius: compare's own."""
    settings = TASK_SETTINGS[(task, "mlp")]
    return settings.hparams, dict(settings.rbo_lr_by_radius)


def cells(nets: Sequence[str] = tuple(NETS)) -> list[Cell]:
    out = []
    for net in nets:  # one network after the other: a run cut short leaves whole networks
        for task in TASKS:
            out += [Cell(task, net, name) for name in BASELINES]
            out += [
                Cell(task, net, "rbo", radius, setting) for radius in RADII for setting in SETTINGS
            ]
    return out


def config(cell: Cell, seed: int, epochs: int) -> RunConfig:
    table, by_radius = _hparams(cell.task)
    if cell.optimizer == "usam":  # USAM at SGD's learning rate, SAM's radius
        hparams = {"lr": table["sgd"]["lr"], "rho": USAM_RHO}
    elif cell.optimizer == "rbo":
        assert cell.radius is not None
        hparams = {
            **table.get("rbo", {}),
            "radius": cell.radius,
            "lr": by_radius.get(cell.radius, table["rbo"]["lr"]),
            **SETTINGS[cell.setting],
        }
    else:
        hparams = dict(table[cell.optimizer])
    return RunConfig(
        seed=seed,
        threads=1,
        data=DataConfig(name=cell.task, batch_size=100),
        model=ModelConfig(name="mlp", kwargs=dict(NETS[cell.net])),
        optimizer=OptimizerConfig(name=cell.optimizer, hparams=hparams),
        schedule=ScheduleConfig(kind="cosine"),
        budget=BudgetConfig(epochs=epochs),
    ).validate()


def _run(raw: dict[str, Any], out_dir: str) -> None:
    torch.set_num_threads(1)
    run(config_from_dict(raw), out_dir, resume=True)


def measure(
    out: Path, epochs: int, seeds: int, jobs: int, nets: Sequence[str] = tuple(NETS)
) -> list[dict[str, Any]]:
    """Run every cell and seed (reusing finished runs); one row per run."""
    jobs_list = [(cell, seed) for cell in cells(nets) for seed in range(seeds)]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_run, config_to_dict(config(c, s, epochs)), str(out / c.name / f"seed{s}"))
            for c, s in jobs_list
        ]
        for future in futures:
            future.result()
    rows = []
    for cell, seed in jobs_list:
        final = read_metrics(out / cell.name / f"seed{seed}" / "metrics.jsonl")[-1]
        rows.append(
            {
                "task": cell.task,
                "net": cell.net,
                "optimizer": cell.optimizer,
                "radius": "" if cell.radius is None else cell.radius,
                "setting": cell.setting,
                "seed": seed,
                "test_accuracy": final["test_accuracy"],
                "train_loss": final["train_loss"],
                "calls_per_step": final["grad_evals"] / final["step"],
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (task, net, optimizer, radius, setting)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["task"], row["net"], row["optimizer"], row["radius"], row["setting"])
        groups.setdefault(key, []).append(row)
    out = []
    for (task, net, optimizer, radius, setting), members in groups.items():
        accuracy = [100 * m["test_accuracy"] for m in members]
        out.append(
            {
                "task": task,
                "net": net,
                "optimizer": optimizer,
                "radius": radius,
                "setting": setting,
                "accuracy": statistics.mean(accuracy),
                "std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                "calls": statistics.mean(m["calls_per_step"] for m in members),
                "n": len(members),
            }
        )
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| task | net | optimizer | radius | projection | test accuracy % | closure calls / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['task']} | {s['net']} | {s['optimizer']} | {s['radius']} | {s['setting']} | "
            f"{s['accuracy']:.2f} ± {s['std']:.2f} | {s['calls']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(s["net"] for s in summary))
    panels = [(task, net) for net in nets for task in TASKS]
    fig, grid = plt.subplots(
        len(nets), len(TASKS), figsize=(6 * len(TASKS), 4.5 * len(nets)), squeeze=False
    )
    markers = {0.1: "o", 0.3: "s", 1.0: "^"}
    for ax, (task, net) in zip(grid.flat, panels, strict=True):
        rows = [s for s in summary if s["task"] == task and s["net"] == net]
        for radius, marker in markers.items():
            points = sorted(
                (s["calls"], s["accuracy"], s["std"], s["setting"])
                for s in rows
                if s["radius"] == radius
            )
            xs, ys, es, labels = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=f"RBO ρ = {radius:g}")
            for x, y, label in zip(xs, ys, labels, strict=True):
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for s in rows:
            if s["optimizer"] != "rbo":
                ax.errorbar(
                    s["calls"],
                    s["accuracy"],
                    yerr=s["std"],
                    marker="*",
                    ms=12,
                    linestyle="none",
                    capsize=3,
                    label=s["optimizer"],
                )
        ax.set_xscale("log")
        ax.set_xlabel("closure calls per step (log)")
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(f"{task}, MLP {net}: equal epochs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``frontier`` to the ``rollingball`` command."""
    from rollingball.arguments import DocstringHelpFormatter

    parser = subparsers.add_parser(
        "frontier",
        help="the cost frontier of RBO's projection: accuracy against closure calls per step",
        description=__doc__,
        formatter_class=DocstringHelpFormatter,
    )
    parser.add_argument("--out", default="runs/frontier", help="output directory")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument(
        "--nets", nargs="+", choices=tuple(NETS), default=list(NETS), help="the MLPs to run"
    )
    parser.set_defaults(func=_cmd_frontier)


def _cmd_frontier(args: argparse.Namespace) -> int:
    out = Path(args.out)
    started = time.perf_counter()
    rows = measure(out, args.epochs, args.seeds, args.jobs, args.nets)
    with open(out / "frontier.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    table = markdown(summary)
    (out / "frontier.md").write_text(table)
    plot(summary, out / "frontier.png")
    print(table)
    print(f"{len(rows)} runs, {args.epochs} epochs each, {time.perf_counter() - started:.0f} s")
    return 0
