"""``rollingball compare``: every optimizer on one small task, several seeds, one table.

With no options: an MLP on MNIST-1D with sgd, momentum, adamw, sam, entropy_sgd and rbo at
three radii, 2 seeds each, the same number of epochs for all (``--budget grad_evals`` gives
each the same number of closure calls instead). Each (dataset, model) pair has its own tuned
hyperparameters and batch size (:data:`TASK_SETTINGS`, chosen on a validation split as
docs/results.md describes); a pair without them runs at the registry defaults and says so.
Runs already finished in ``--out`` are reused, so an interrupted compare continues where it
stopped.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from rollingball.experiments.atomic import atomic_write_text
from rollingball.experiments.config import (
    BudgetConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    config_from_dict,
    config_to_dict,
)
from rollingball.experiments.data import load_data, num_batches
from rollingball.experiments.optimizers import optimizer_defaults
from rollingball.experiments.plots import plot_curves
from rollingball.experiments.report import (
    aggregate,
    find_runs,
    markdown_table,
    projection_table,
    rich_table,
    summary_rows,
    write_summary_csv,
)
from rollingball.experiments.runner import run

__all__ = [
    "COMPARE_HPARAMS",
    "TASK_SETTINGS",
    "CompareSpec",
    "TaskSettings",
    "compare",
    "compare_configs",
    "load_hparams",
    "task_settings",
]

DEFAULT_OPTIMIZERS = ("sgd", "momentum", "adamw", "sam", "entropy_sgd", "rbo")
DEFAULT_RADII = (0.1, 0.3, 1.0)

# learning rates etc. for the compare task (MLP on MNIST-1D, batch 100, cosine schedule),
# chosen on a validation split as docs/results.md describes; everything else is the
# registry default (rollingball.experiments.optimizers)
COMPARE_HPARAMS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 2.0},
    "momentum": {"lr": 0.5},
    "adamw": {"lr": 0.01},
    "sam": {"lr": 0.1, "rho": 0.05},
    "entropy_sgd": {"lr": 100.0},
    "rbo": {"lr": 1.0},
}


# RBO's learning rate per radius for the compare task; other radii use COMPARE_HPARAMS["rbo"]
RBO_LR_BY_RADIUS: dict[float, float] = {0.1: 2.0, 0.3: 2.0, 1.0: 2.0}


@dataclass(frozen=True)
class TaskSettings:
    """What ``compare`` uses for one (dataset, model) pair unless told otherwise."""

    hparams: dict[str, dict[str, Any]]
    rbo_lr_by_radius: dict[float, float]
    batch_size: int
    source: str  # where the numbers come from (a report states it)


TASK_SETTINGS: dict[tuple[str, str], TaskSettings] = {
    ("mnist1d", "mlp"): TaskSettings(
        COMPARE_HPARAMS,
        RBO_LR_BY_RADIUS,
        100,
        "tuned on MNIST-1D's validation split "
        "(docs/results.md; experiments/fair/compare_mnist1d.toml)",
    ),
    ("digits", "mlp"): TaskSettings(
        {
            "sgd": {"lr": 1.0},
            "momentum": {"lr": 0.3},
            "adamw": {"lr": 0.003},
            "sam": {"lr": 0.3, "rho": 0.05},
            "entropy_sgd": {"lr": 100.0},
            "rbo": {"lr": 0.3},
        },
        {0.1: 0.3, 0.3: 1.0, 1.0: 1.0},
        100,
        "tuned on digits' validation split (docs/results.md)",
    ),
    ("fashion_mnist", "mlp"): TaskSettings(
        {
            "sgd": {"lr": 0.3},
            "momentum": {"lr": 0.1},
            "adamw": {"lr": 0.003},
            "sam": {"lr": 0.1, "rho": 0.05},
            "usam": {"lr": 0.3, "rho": 0.02},
            "rbo": {"lr": 0.3},
        },
        {0.1: 0.3, 0.3: 0.3, 1.0: 0.3, 3.0: 0.3},
        128,
        "tuned on Fashion-MNIST's validation split by `rollingball study` (5 epochs a trial; "
        "docs/results.md); entropy_sgd was not tuned there: the registry defaults",
    ),
}


def task_settings(data: str, model: str) -> TaskSettings | None:
    """The tuned settings of ``model`` on ``data``, or None where none were tuned."""
    return TASK_SETTINGS.get((data, model))


@dataclass
class CompareSpec:
    """What ``compare`` runs."""

    data: str = "mnist1d"
    model: str = "mlp"
    epochs: int = 30
    seeds: int = 2
    budget: str = "epochs"  # or "grad_evals"
    grad_evals: int | None = None  # default: 4 x the closure calls of `epochs` epochs of SGD
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS
    radii: Sequence[float] = DEFAULT_RADII
    batch_size: int | None = None  # None: the task's (TASK_SETTINGS), else 100
    data_dir: str | None = None
    download: bool = False
    # None: GELU for the MLP (a smooth landscape, on which RBO's projection converges)
    model_kwargs: dict[str, Any] | None = None
    # None: the task's tuned settings (TASK_SETTINGS), else the registry defaults
    hparams: dict[str, dict[str, Any]] | None = None
    # RBO's learning rate at each radius (the best on validation at that radius)
    rbo_lr_by_radius: dict[float, float] | None = None
    source: str = field(default="", init=False)  # where hparams came from, once resolved

    def resolve(self) -> CompareSpec:
        """Fill what was left as None from :data:`TASK_SETTINGS` (or the registry defaults)."""
        tuned = task_settings(self.data, self.model)
        if self.hparams is None:
            self.hparams = dict(tuned.hparams) if tuned else {}
            self.source = (
                tuned.source
                if tuned
                else f"none tuned for {self.model} on {self.data}: the registry defaults"
            )
        else:
            self.source = self.source or "given (--hparams)"
        if self.rbo_lr_by_radius is None:
            self.rbo_lr_by_radius = dict(tuned.rbo_lr_by_radius) if tuned else {}
        if self.batch_size is None:
            self.batch_size = tuned.batch_size if tuned else 100
        return self

    def validate(self) -> None:
        if self.budget not in ("epochs", "grad_evals"):
            raise ValueError(f"--budget must be 'epochs' or 'grad_evals', got {self.budget!r}")
        if self.epochs < 1 or self.seeds < 1:
            raise ValueError("--epochs and --seeds must be >= 1")
        if self.grad_evals is not None and self.grad_evals < 1:
            raise ValueError("--grad-evals must be >= 1")
        if "rbo" in self.optimizers and not self.radii:
            raise ValueError("rbo needs at least one radius (--radii)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")


def load_hparams(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[float, float] | None]:
    """Per-optimizer hyperparameters for ``compare`` from a TOML file.

    One table per optimizer (``[sgd]``, ``[rbo]``, ...) replaces that optimizer's defaults;
    ``[rbo.lr_by_radius]`` maps a radius (a quoted key, e.g. ``"0.3" = 1.0``) to RBO's
    learning rate. Returns the merged tables and the radius map (``None``: keep the default).
    """
    import tomllib

    from rollingball.experiments.optimizers import OPTIMIZERS, validate_hyperparameters

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hyperparameter file not found: {path}")
    raw = tomllib.loads(path.read_text())
    hparams = dict(COMPARE_HPARAMS)
    by_radius: dict[float, float] | None = None
    for name, table in raw.items():
        if name not in OPTIMIZERS or not isinstance(table, dict):
            raise ConfigError(
                f"{path}: [{name}] is not an optimizer; choose from {', '.join(OPTIMIZERS)}"
            )
        table = dict(table)
        if name == "rbo":
            by_radius = {float(k): float(v) for k, v in table.pop("lr_by_radius", {}).items()}
        try:
            validate_hyperparameters(name, table)
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from None
        hparams[name] = table
    return hparams, by_radius


def _model_kwargs(spec: CompareSpec) -> dict[str, Any]:
    if spec.model_kwargs is not None:
        return dict(spec.model_kwargs)
    return {"activation": "gelu"} if spec.model == "mlp" else {}


def _slug(name: str, radius: float | None) -> str:
    return name if radius is None else f"rbo_r{radius:g}"


def compare_configs(spec: CompareSpec, steps_per_epoch: int) -> list[tuple[str, RunConfig]]:
    """(run directory name, configuration) for every optimizer, radius and seed."""
    spec.validate()
    spec.resolve()
    assert spec.hparams is not None and spec.rbo_lr_by_radius is not None
    assert spec.batch_size is not None
    if spec.budget == "epochs":
        budget = BudgetConfig(epochs=spec.epochs)
    else:
        budget = BudgetConfig(grad_evals=spec.grad_evals or 4 * spec.epochs * steps_per_epoch)
    out = []
    for name in spec.optimizers:
        for radius in spec.radii if name == "rbo" else [None]:
            hparams = dict(spec.hparams.get(name, {}))
            if radius is not None:
                hparams["radius"] = float(radius)
                hparams["lr"] = spec.rbo_lr_by_radius.get(float(radius), hparams.get("lr", 1.0))
            for seed in range(spec.seeds):
                config = RunConfig(
                    seed=seed,
                    device="cpu",
                    threads=1,
                    data=DataConfig(
                        name=spec.data,
                        batch_size=spec.batch_size,
                        data_dir=spec.data_dir,
                        download=spec.download,
                    ),
                    model=ModelConfig(name=spec.model, kwargs=_model_kwargs(spec)),
                    optimizer=OptimizerConfig(name=name, hparams=hparams),
                    schedule=ScheduleConfig(kind="cosine"),
                    budget=budget,
                )
                out.append((f"{_slug(name, radius)}/seed{seed}", config.validate()))
    return out


def _run_in_worker(raw: dict[str, Any], out_dir: str) -> str:
    torch.set_num_threads(1)
    run(config_from_dict(raw), out_dir, resume=True)
    return out_dir


def compare(
    spec: CompareSpec, out: str | Path, *, jobs: int = 1, console: Any = None
) -> dict[str, Any]:
    """Run the comparison into ``out``; print the table; write summary.csv, report.md, plots."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    out = Path(out)
    started = time.perf_counter()
    spec.validate()
    spec.resolve()
    assert spec.batch_size is not None
    # fails early if the data is missing
    bundle = load_data(spec.data, spec.data_dir, download=spec.download)
    steps = num_batches(bundle.train, spec.batch_size)
    runs = compare_configs(spec, steps)
    runs_dir = out / "runs"
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("runs", total=len(runs), info="")
        if jobs <= 1:
            for name, config in runs:
                progress.update(overall, info=name)
                run(config, runs_dir / name, resume=True, data=bundle, progress_bar=progress)
                progress.advance(overall)
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                futures = [
                    pool.submit(_run_in_worker, config_to_dict(config), str(runs_dir / name))
                    for name, config in runs
                ]
                for future in as_completed(futures):
                    progress.update(
                        overall, info=Path(future.result()).relative_to(runs_dir).as_posix()
                    )
                    progress.advance(overall)
    elapsed = time.perf_counter() - started
    order = {(runs_dir / name).resolve(): i for i, (name, _) in enumerate(runs)}
    found = [r for r in find_runs([runs_dir]) if r.path.resolve() in order]
    records = sorted(found, key=lambda r: order[r.path.resolve()])
    rows = summary_rows(records)
    table = aggregate(rows)
    budget_text = (
        f"{spec.epochs} epoch{'s' if spec.epochs > 1 else ''} each"
        if spec.budget == "epochs"
        else f"{runs[0][1].budget.grad_evals:,} closure calls each"
    )
    model_text = spec.model + "".join(f" {k}={v}" for k, v in _model_kwargs(spec).items())
    title = f"{model_text} on {spec.data}: {budget_text}, {spec.seeds} seed(s)"
    console.print(rich_table(table, title))
    console.print(f"hyperparameters: {spec.source}", highlight=False)
    write_summary_csv(rows, out / "summary.csv")
    plots = plot_curves(records, out, title="")
    atomic_write_text(
        out / "report.md",
        _report_markdown(spec, runs, table, plots, title, elapsed, jobs, projection_table(records)),
    )
    console.print(
        f"wrote {out / 'summary.csv'}, {out / 'report.md'} and {len(plots)} plots ({elapsed:.0f} s)"
    )
    return {"rows": rows, "table": table, "plots": plots, "seconds": elapsed}


def _projection_defaults() -> str:
    """RBO's projection settings in the registry, as a report states them."""
    rbo = optimizer_defaults("rbo")
    return (
        f"at most {rbo['projection_steps']} trial points and a blind last step, tolerance "
        f"{rbo['projection_tol']:g} relative to the starting residual, Anderson memory "
        f"{rbo['anderson_memory']}"
    )


def _report_markdown(
    spec: CompareSpec,
    runs: list[tuple[str, RunConfig]],
    table: list[dict[str, Any]],
    plots: list[Path],
    title: str,
    elapsed: float,
    jobs: int,
    projections: str,
) -> str:
    lines = [
        f"# {title}",
        "",
        f"Batch size {spec.batch_size}, cosine learning-rate schedule, CPU, one thread per run, "
        f"{jobs} run(s) at a time. Test accuracy is measured after the last step; the final "
        "train loss is the mean minibatch loss over the last epoch, measured at the start of "
        "each step. Closure calls are forward + backward passes (RBO: 1 + projection "
        "iterations per step; SAM: 2; Entropy-SGD: L).",
        "",
        markdown_table(table),
        f"Hyperparameters: {spec.source}.",
        "",
    ]
    if projections:
        lines += [
            "RBO's projection (means over all steps; the registry's projection settings "
            f"unless listed below: {_projection_defaults()}):",
            "",
            projections,
        ]
    lines += [
        "Hyperparameters (all other values are the registry defaults):",
        "",
    ]
    seen = set()
    for _, config in runs:
        key = (config.optimizer.name, tuple(sorted(config.optimizer.hparams.items())))
        if key in seen:
            continue
        seen.add(key)
        settings = ", ".join(f"{k} = {v}" for k, v in sorted(config.optimizer.hparams.items()))
        lines.append(f"- `{config.optimizer.name}`: {settings or 'defaults'}")
    lines += ["", "Plots:", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += [
        "",
        f"Total time {elapsed:.0f} s on {platform.machine()} with torch {torch.__version__} "
        f"({platform.processor() or 'unknown CPU'}).",
        "",
    ]
    return "\n".join(lines)
