"""Tables and summaries from saved runs (directories with ``config.toml`` + ``metrics.jsonl``).

Runs that differ only in their seed form one group (mean ± std over seeds); runs that differ in
any other setting (learning rate, radius, batch size, ...) are kept apart, and the settings that
tell groups of one optimizer apart are shown next to its name.
"""

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
from rollingball.experiments.config import RunConfig, config_to_dict, load_config
from rollingball.experiments.optimizers import validate_hyperparameters
from rollingball.experiments.runner import CONFIG, METRICS, read_metrics

__all__ = [
    "RESULT_COLUMNS",
    "SUMMARY_COLUMNS",
    "RunRecord",
    "aggregate",
    "diverged_text",
    "find_runs",
    "group_runs",
    "markdown_table",
    "projection_table",
    "rich_table",
    "run_settings",
    "shown_settings",
    "summary_rows",
    "write_summary_csv",
]

RESULT_COLUMNS = (
    "test_accuracy",
    "test_loss",
    "train_loss",
    "grad_evals",
    "wall_seconds",
    "epochs",
    "diverged_step",  # blank unless the loss went non-finite: the first such step
)
# the first columns of summary.csv; every other setting of the runs follows them
SUMMARY_COLUMNS = ("optimizer", "radius", "lr", "seed", *RESULT_COLUMNS)
# configuration entries that do not change what a run computes, or that are averaged over
_NOT_SETTINGS = {"seed", "device", "threads", "data.data_dir", "data.download"}
_NOT_SETTINGS |= {"data.eval_batch_size", *RESULT_COLUMNS}


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def run_settings(config: RunConfig) -> dict[str, Any]:
    """Everything that sets a run apart except its seed: ``optimizer``, its hyperparameters
    (registry defaults filled in) and the other sections as ``"data.batch_size"`` etc."""
    name = config.optimizer.name
    try:
        hparams = validate_hyperparameters(name, config.optimizer.hparams)
    except ValueError:  # an optimizer no longer in the registry: what the run was given
        hparams = dict(config.optimizer.hparams)
    settings: dict[str, Any] = {"optimizer": name}
    settings.update({k: _hashable(v) for k, v in hparams.items()})
    settings["bn_first_call_only"] = config.optimizer.bn_first_call_only
    for section, table in config_to_dict(config).items():
        if not isinstance(table, dict):  # seed, device, threads, sync_batchnorm
            settings[section] = table
        elif section != "optimizer":
            settings.update({f"{section}.{k}": _hashable(v) for k, v in table.items()})
    return {k: v for k, v in settings.items() if k not in _NOT_SETTINGS}


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


def shown_settings(settings: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per optimizer, the settings that tell its groups apart: its hyperparameters that vary
    between its runs, and the other sections' entries that vary between any runs ("lr"
    first; the radius has a column of its own)."""
    by_optimizer: dict[str, list[dict[str, Any]]] = {}
    for entry in settings:
        by_optimizer.setdefault(entry["optimizer"], []).append(entry)
    common = {key for key in _varying(settings) if "." in key}
    return {
        name: sorted(
            (_varying(members) | common) - {"optimizer", "radius"},
            key=lambda k: (k != "lr", "." in k, k),
        )
        for name, members in by_optimizer.items()
    }


def _varying(settings: Sequence[dict[str, Any]]) -> set[str]:
    keys: set[str] = set().union(*settings)
    return {key for key in keys if len({entry.get(key) for entry in settings}) > 1}


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(settings: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={_format(settings[k])}" for k in keys if k in settings)


def group_runs(records: Sequence[RunRecord]) -> list[tuple[str, list[RunRecord]]]:
    """(label, runs) for each group of runs that differ only in their seed, in first-seen
    order; the label names the optimizer, its radius and the settings that vary."""
    settings = [run_settings(r.config) for r in records]
    keys = shown_settings(settings)
    groups: dict[tuple[Any, ...], tuple[str, list[RunRecord]]] = {}
    for record, entry in zip(records, settings, strict=True):
        key = tuple(sorted(entry.items(), key=lambda item: item[0]))
        varying = _describe(entry, keys[record.optimizer])
        if record.radius is not None:
            varying = f"ρ={record.radius:g}" + (", " + varying if varying else "")
        label = f"{record.optimizer} ({varying})" if varying else record.optimizer
        groups.setdefault(key, (label, []))[1].append(record)
    return list(groups.values())


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
    """One row per run: :data:`SUMMARY_COLUMNS` from its last metrics row, then every other
    setting of the run (:func:`run_settings`)."""
    rows = []
    for record in records:
        last = record.metrics[-1]
        settings = run_settings(record.config)
        rows.append(
            {
                "optimizer": record.optimizer,
                "radius": "" if record.radius is None else record.radius,
                "lr": settings.pop("lr", ""),
                "seed": record.config.seed,
                "test_accuracy": last["test_accuracy"],
                "test_loss": last["test_loss"],
                "train_loss": last["train_loss"],
                "grad_evals": last["grad_evals"],
                "wall_seconds": round(float(last["wall_seconds"]), 3),
                "epochs": last.get("epochs", last["epoch"]),
                "diverged_step": _diverged_step(last),
                **{k: v for k, v in settings.items() if k not in ("optimizer", "radius")},
            }
        )
    return rows


def _diverged_step(row: dict[str, Any]) -> int | str:
    """The step at which a run's loss went non-finite, or "" (older runs: the last step)."""
    if not row.get("diverged"):
        return ""
    return int(row.get("diverged_step") or row["step"])


def diverged_text(steps: Sequence[Any]) -> str:
    """ "diverged at step N" for a group's runs ("" if none diverged; "k of n seeds" if some)."""
    hit = [int(s) for s in steps if s != "" and s is not None]
    if not hit:
        return ""
    where = f"step {hit[0]}" if len(set(hit)) == 1 else f"steps {', '.join(map(str, hit))}"
    share = "" if len(hit) == len(steps) else f" ({len(hit)} of {len(steps)} seeds)"
    return f"diverged at {where}{share}"


def write_summary_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write ``rows`` as CSV, atomically: :data:`SUMMARY_COLUMNS`, then the other settings
    (optimizer hyperparameters, then the other sections; blank where a run has no such key)."""
    extra = {key for row in rows for key in row} - set(SUMMARY_COLUMNS)
    columns = [*SUMMARY_COLUMNS, *sorted(extra, key=lambda k: ("." in k, k))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _row_settings(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in _NOT_SETTINGS}


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds for each group of runs that differ only in their
    seed, in first-seen order; ``settings`` names what sets the group apart (radius aside)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = tuple(sorted(_row_settings(row).items(), key=lambda item: item[0]))
        groups.setdefault(key, []).append(row)
    keys = shown_settings([_row_settings(members[0]) for members in groups.values()])
    out = []
    for members in groups.values():
        acc_mean, acc_std = _mean_std([float(m["test_accuracy"]) for m in members])
        out.append(
            {
                "optimizer": members[0]["optimizer"],
                "radius": members[0]["radius"],
                "settings": _describe(members[0], keys[members[0]["optimizer"]]),
                "seeds": len(members),
                "test_accuracy_mean": acc_mean,
                "test_accuracy_std": acc_std,
                "test_loss_mean": _mean_std([float(m["test_loss"]) for m in members])[0],
                "train_loss_mean": _mean_std([float(m["train_loss"]) for m in members])[0],
                "grad_evals_mean": statistics.fmean(float(m["grad_evals"]) for m in members),
                "wall_seconds_mean": statistics.fmean(float(m["wall_seconds"]) for m in members),
                "epochs_mean": statistics.fmean(float(m["epochs"]) for m in members),
                "diverged": diverged_text([m.get("diverged_step", "") for m in members]),
            }
        )
    return out


HEADERS = [
    "optimizer",
    "radius",
    "test acc. % (mean ± std)",
    "final train loss",
    "closure calls",
    "epochs",
    "wall s",
]


def _headers(aggregated: Sequence[dict[str, Any]]) -> list[str]:
    """:data:`HEADERS`, with a "settings" column when some group has settings to show."""
    if any(row.get("settings") for row in aggregated):
        return [*HEADERS[:2], "settings", *HEADERS[2:]]
    return list(HEADERS)


def _cells(row: dict[str, Any], with_settings: bool) -> list[str]:
    radius = "" if row["radius"] == "" else f"{float(row['radius']):g}"
    acc = f"{100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_std']:.2f}"
    if row.get("diverged"):  # never a silent 10.00 ± 0.00
        acc = row["diverged"]
    return [
        row["optimizer"],
        radius,
        *([row.get("settings", "")] if with_settings else []),
        acc,
        f"{row['train_loss_mean']:.4f}",
        f"{row['grad_evals_mean']:,.0f}",
        f"{row['epochs_mean']:.3g}",
        f"{row['wall_seconds_mean']:.1f}",
    ]


def rich_table(aggregated: Sequence[dict[str, Any]], title: str = "") -> Any:
    """A ``rich.table.Table`` of the aggregated rows."""
    from rich.table import Table

    headers = _headers(aggregated)
    table = Table(title=title or None)
    for header in headers:
        numeric = header not in ("optimizer", "radius", "settings")
        table.add_column(header, justify="right" if numeric else "left")
    for row in aggregated:
        table.add_row(*_cells(row, len(headers) > len(HEADERS)))
    return table


def markdown_table(aggregated: Sequence[dict[str, Any]]) -> str:
    """The aggregated rows as a Markdown table."""
    headers = _headers(aggregated)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += [
        "| " + " | ".join(_cells(row, len(headers) > len(HEADERS))) + " |" for row in aggregated
    ]
    return "\n".join(lines) + "\n"


def projection_table(records: Sequence[RunRecord]) -> str:
    """Markdown table of RBO's projection statistics per group (means over epochs and seeds)."""
    groups = [
        (label, members)
        for label, members in group_runs(records)
        if any("proj_steps_mean" in row for r in members for row in r.metrics)
    ]
    if not groups:
        return ""
    lines = [
        "| optimizer | projection iterations per step | steps converged | relative residual |",
        "|---|---|---|---|",
    ]
    for label, members in groups:
        rows = [row for r in members for row in r.metrics if "proj_steps_mean" in row]
        steps = statistics.fmean(float(row["proj_steps_mean"]) for row in rows)
        converged = statistics.fmean(float(row["proj_converged_frac"]) for row in rows)
        residuals = [float(row["proj_residual_mean"]) for row in rows]
        residual = statistics.median(residuals) if residuals else float("nan")
        lines.append(
            f"| {label} | {steps:.1f} | {100 * converged:.0f}% | {residual:.1e} (median) |"
        )
    return "\n".join(lines) + "\n"
