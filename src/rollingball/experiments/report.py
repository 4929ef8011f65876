"""Tables and summaries from saved runs (directories with ``config.toml`` + ``metrics.jsonl``)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollingball.experiments.atomic import atomic_write_text
from rollingball.experiments.config import RunConfig, load_config
from rollingball.experiments.runner import CONFIG, METRICS, read_metrics

__all__ = [
    "SUMMARY_COLUMNS",
    "RunRecord",
    "aggregate",
    "find_runs",
    "markdown_table",
    "projection_table",
    "rich_table",
    "summary_rows",
    "write_summary_csv",
]

SUMMARY_COLUMNS = (
    "optimizer",
    "radius",
    "seed",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "grad_evals",
    "wall_seconds",
    "epochs",
)


@dataclass
class RunRecord:
    """One saved run: where it is, its configuration and its metrics."""

    path: Path
    config: RunConfig
    metrics: list[dict[str, Any]]

    @property
    def optimizer(self) -> str:
        return self.config.optimizer.name

    @property
    def radius(self) -> float | None:
        if self.optimizer != "rbo":
            return None
        return float(self.config.optimizer.hparams.get("radius", 1.0))

    @property
    def label(self) -> str:
        return self.optimizer if self.radius is None else f"rbo (ρ={self.radius:g})"


def find_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Every run under ``paths`` (a run directory, or any directory above run directories)."""
    records: list[RunRecord] = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such directory: {root}")
        candidates = (
            [root] if (root / METRICS).exists() else sorted(p.parent for p in root.rglob(METRICS))
        )
        for directory in candidates:
            if not (directory / CONFIG).exists():
                continue
            metrics = read_metrics(directory / METRICS)
            if metrics:
                records.append(RunRecord(directory, load_config(directory / CONFIG), metrics))
    return records


def summary_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run with :data:`SUMMARY_COLUMNS`, from its last metrics row."""
    rows = []
    for record in records:
        last = record.metrics[-1]
        rows.append(
            {
                "optimizer": record.optimizer,
                "radius": "" if record.radius is None else record.radius,
                "seed": record.config.seed,
                "test_accuracy": last["test_accuracy"],
                "test_loss": last["test_loss"],
                "train_loss": last["train_loss"],
                "grad_evals": last["grad_evals"],
                "wall_seconds": round(float(last["wall_seconds"]), 3),
                "epochs": last.get("epochs", last["epoch"]),
            }
        )
    return rows


def write_summary_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write ``rows`` as CSV with :data:`SUMMARY_COLUMNS`, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds for each (optimizer, radius), in first-seen order."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["optimizer"], row["radius"]), []).append(row)
    out = []
    for (optimizer, radius), members in groups.items():
        acc_mean, acc_std = _mean_std([float(m["test_accuracy"]) for m in members])
        out.append(
            {
                "optimizer": optimizer,
                "radius": radius,
                "seeds": len(members),
                "test_accuracy_mean": acc_mean,
                "test_accuracy_std": acc_std,
                "test_loss_mean": _mean_std([float(m["test_loss"]) for m in members])[0],
                "train_loss_mean": _mean_std([float(m["train_loss"]) for m in members])[0],
                "grad_evals_mean": statistics.fmean(float(m["grad_evals"]) for m in members),
                "wall_seconds_mean": statistics.fmean(float(m["wall_seconds"]) for m in members),
                "epochs_mean": statistics.fmean(float(m["epochs"]) for m in members),
            }
        )
    return out


def _cells(row: dict[str, Any]) -> list[str]:
    radius = "" if row["radius"] == "" else f"{float(row['radius']):g}"
    acc = f"{100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_std']:.2f}"
    return [
        row["optimizer"],
        radius,
        acc,
        f"{row['train_loss_mean']:.4f}",
        f"{row['grad_evals_mean']:,.0f}",
        f"{row['epochs_mean']:.3g}",
        f"{row['wall_seconds_mean']:.1f}",
    ]


HEADERS = [
    "optimizer",
    "radius",
    "test acc. % (mean ± std)",
    "final train loss",
    "closure calls",
    "epochs",
    "wall s",
]


def rich_table(aggregated: Sequence[dict[str, Any]], title: str = "") -> Any:
    """A ``rich.table.Table`` of the aggregated rows."""
    from rich.table import Table

    table = Table(title=title or None)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in aggregated:
        table.add_row(*_cells(row))
    return table


def markdown_table(aggregated: Sequence[dict[str, Any]]) -> str:
    """The aggregated rows as a Markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * len(HEADERS)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in aggregated]
    return "\n".join(lines) + "\n"


def projection_table(records: Sequence[RunRecord]) -> str:
    """Markdown table of RBO's projection statistics per radius (means over epochs and seeds)."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        if any("proj_steps_mean" in row for row in record.metrics):
            groups.setdefault(record.label, []).append(record)
    if not groups:
        return ""
    lines = [
        "| optimizer | projection iterations per step | steps converged | relative residual |",
        "|---|---|---|---|",
    ]
    for label, members in groups.items():
        rows = [row for r in members for row in r.metrics if "proj_steps_mean" in row]
        steps = statistics.fmean(float(row["proj_steps_mean"]) for row in rows)
        converged = statistics.fmean(float(row["proj_converged_frac"]) for row in rows)
        residuals = [float(row["proj_residual_mean"]) for row in rows]
        residual = statistics.median(residuals) if residuals else float("nan")
        lines.append(
            f"| {label} | {steps:.1f} | {100 * converged:.0f}% | {residual:.1e} (median) |"
        )
    return "\n".join(lines) + "\n"
