"""Sub-commands ``run``, ``compare``, ``sweep``, ``report`` and ``study`` of ``rollingball``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rollingball.arguments import HelpFormatter, comma_separated_floats

__all__ = ["add_parser"]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``run``, ``compare``, ``sweep`` and ``report`` to the ``rollingball`` command."""
    _add_run(subparsers)
    _add_compare(subparsers)
    _add_sweep(subparsers)
    _add_report(subparsers)
    _add_study(subparsers)


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="train one configuration (TOML)",
        description=_cmd_run.__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "config", help="run configuration (TOML), e.g. experiments/paper/mnist_mlp_rbo.toml"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--data-dir", help="directory with the dataset files (overrides the config)")
    p.add_argument(
        "--download", action="store_true", help="download torchvision datasets if missing"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    from rollingball.experiments.compare import DEFAULT_OPTIMIZERS, DEFAULT_RADII
    from rollingball.experiments.data import DATASETS
    from rollingball.experiments.models import MODELS
    from rollingball.experiments.optimizers import OPTIMIZERS

    p = subparsers.add_parser(
        "compare",
        help="the main job: every optimizer on MNIST-1D, table + CSV + plots",
        description=_cmd_compare.__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run")
    p.add_argument("--seeds", type=int, default=2, help="seeds per optimizer")
    p.add_argument(
        "--budget",
        choices=["epochs", "grad_evals"],
        default="epochs",
        help="equal epochs, or an equal number of closure calls",
    )
    p.add_argument(
        "--grad-evals",
        type=int,
        help="closure calls per run under --budget grad_evals (default: 4 x SGD's for --epochs)",
    )
    p.add_argument("--data", default="mnist1d", choices=DATASETS, help="dataset")
    p.add_argument("--model", default="mlp", choices=sorted(MODELS), help="model")
    p.add_argument(
        "--optimizers",
        type=_names,
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, from: {', '.join(OPTIMIZERS)}",
    )
    p.add_argument(
        "--radii",
        type=comma_separated_floats,
        default=",".join(f"{r:g}" for r in DEFAULT_RADII),
        help="RBO radii, comma-separated",
    )
    p.add_argument("--batch-size", type=int, help="minibatch size (default: the task's, else 100)")
    p.add_argument(
        "--data-dir",
        help="directory with the dataset files (searched first; then $ROLLINGBALL_DATA, "
        "the Debian package's directory, ~/.cache/rollingball)",
    )
    p.add_argument(
        "--download", action="store_true", help="download torchvision datasets if not found"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument(
        "--hparams",
        help="TOML of per-optimizer hyperparameters (e.g. experiments/fair/*.toml)",
    )
    p.set_defaults(func=_cmd_compare)


def _add_sweep(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="radius x learning-rate heat map (PNG + CSV)",
        description=_cmd_sweep.__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", help="a run configuration (TOML); --radius needs optimizer rbo")
    p.add_argument(
        "--radius",
        type=comma_separated_floats,
        help="RBO radii, e.g. 0.1,1,5 (default: as configured)",
    )
    p.add_argument(
        "--lr", type=comma_separated_floats, required=True, help="learning rates, e.g. 0.01,0.1,1"
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per cell (config seed, +1, ...)")
    p.add_argument("--epochs", type=int, help="epochs per run (replaces the config's budget)")
    p.add_argument("--out", default="runs/sweep", help="output directory")
    p.set_defaults(func=_cmd_sweep)


def _add_study(subparsers: argparse._SubParsersAction) -> None:
    from rollingball.experiments.study import PARTS

    p = subparsers.add_parser(
        "study",
        help="the Fashion-MNIST study: tuning, fair runs, paper protocol, noisy labels, sharpness",
        description=_cmd_study.__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/fmnist", help="output directory")
    p.add_argument(
        "--quick", action="store_true", help="fewer epochs and trials, one seed (labelled quick)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument(
        "--models",
        type=_names,
        help="comma-separated: mlp, small_cnn (default: both; with --quick: mlp)",
    )
    p.add_argument(
        "--parts", type=_names, default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}"
    )
    p.add_argument(
        "--budgets",
        type=_names,
        default="epochs,calls,wall",
        help="the fair runs' budgets, in this order (wall needs the epochs runs)",
    )
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST files (searched first)")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    """Tune every optimizer on a validation split of Fashion-MNIST, run the fair comparison
    (equal epochs, closure calls, wall time), the paper's protocol, the noisy-label arm and
    the sharpness measurements; write study.md, CSVs and figures. Rerun to continue."""
    from rollingball.experiments.data import DataNotFoundError
    from rollingball.experiments.study import StudySpec, study

    spec = StudySpec(
        out=Path(args.out),
        quick=args.quick,
        jobs=args.jobs,
        models=args.models,
        parts=args.parts,
        budgets=args.budgets,
        data_dir=args.data_dir,
        log=lambda line: print(line, flush=True),
    )
    try:
        study(spec)
    except DataNotFoundError as error:
        print(f"rollingball study: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue (finished runs in {args.out} kept)")
        return 130
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="tables and plots from saved runs",
        description=_cmd_report.__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("dirs", nargs="+", help="run directories, or directories above them")
    p.add_argument(
        "--out", help="where to write summary.csv, report.md and plots (default: first DIR)"
    )
    p.set_defaults(func=_cmd_report)


def _console() -> Any:
    from rich.console import Console

    # a file or a pipe gets lines wide enough for the whole results table
    return Console(width=None if sys.stdout.isatty() else 140)


def _leave_process_group() -> None:
    """Under torchrun the run joined a process group; destroy it before the process exits
    (a gloo group left alive can abort the interpreter at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _cmd_run(args: argparse.Namespace) -> int:
    """Train one configuration; writes config.toml, metrics.jsonl and checkpoint.pt in --out."""
    code = _train_one(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun process: see exit_now
        from rollingball.experiments.distributed import exit_now

        exit_now(code)
    return code


def _train_one(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from rollingball.experiments.config import ConfigError, load_config
    from rollingball.experiments.data import DataNotFoundError
    from rollingball.experiments.runner import run

    console = _console()
    try:
        config = load_config(args.config)
        if args.data_dir:
            config.data.data_dir = args.data_dir
        if args.download:
            config.data.download = True
        if args.device:
            config.device = args.device
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
        quiet = args.no_progress or not main_rank
        with Progress(*columns, console=console, disable=quiet) as progress:
            result = run(config, args.out, resume=args.resume, progress_bar=progress)
    except (ConfigError, DataNotFoundError, FileExistsError, ValueError) as error:
        print(f"rollingball run: error: {error}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    if not main_rank:
        return 130 if result.interrupted else 0
    if result.interrupted:
        console.print(
            "interrupted; saved. Continue with: "
            f"rollingball run {args.config} --out {args.out} --resume"
        )
        return 130
    final = result.final
    console.print(
        f"done: test accuracy {100 * final['test_accuracy']:.2f}%, "
        f"train loss {final['train_loss']:.4f}, "
        f"{final['grad_evals']:,} closure calls, {final['wall_seconds']:.1f} s"
        + (" (diverged)" if result.diverged else "")
        + f" -> {args.out}"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """Train an MLP on MNIST-1D with sgd, momentum, adamw, sam, entropy_sgd and rbo (3 radii),
    2 seeds; print a table, write summary.csv, report.md and plots. Each dataset and model
    gets its own tuned hyperparameters where they exist (else the registry defaults, said so);
    a run whose loss goes non-finite is shown as "diverged at step N"."""
    from rollingball.experiments.compare import CompareSpec, compare, load_hparams
    from rollingball.experiments.data import DataNotFoundError

    hparams, by_radius = load_hparams(args.hparams) if args.hparams else (None, None)
    spec = CompareSpec(
        data=args.data,
        model=args.model,
        epochs=args.epochs,
        seeds=args.seeds,
        budget=args.budget,
        grad_evals=args.grad_evals,
        optimizers=args.optimizers,
        radii=args.radii,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        download=args.download,
    )
    if hparams is not None:
        spec.hparams = hparams
    if by_radius is not None:
        spec.rbo_lr_by_radius = by_radius
    try:
        compare(spec, args.out, jobs=args.jobs, console=_console())
    except DataNotFoundError as error:
        print(f"rollingball compare: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; rerun the same command to continue "
            f"(finished runs in {args.out} are kept)"
        )
        return 130
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run an rbo configuration over a radius x learning-rate grid; write sweep.csv, heatmap.png."""
    from rollingball.experiments.config import BudgetConfig, load_config
    from rollingball.experiments.sweep import sweep

    console = _console()
    config = load_config(args.config)
    if args.epochs is not None:
        config.budget = BudgetConfig(epochs=args.epochs)
    result = sweep(config, args.radius, args.lr, args.out, seeds=args.seeds, console=console)
    console.print(f"wrote {Path(args.out) / 'sweep.csv'} and {result['heatmap']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Summarise saved runs: print the table; write summary.csv, report.md and plots."""
    from rollingball.experiments.atomic import atomic_write_text
    from rollingball.experiments.plots import plot_curves
    from rollingball.experiments.report import (
        aggregate,
        find_runs,
        markdown_table,
        rich_table,
        summary_rows,
        write_summary_csv,
    )

    console = _console()
    records = find_runs(args.dirs)
    if not records:
        raise FileNotFoundError(
            f"no runs (metrics.jsonl + config.toml) under {', '.join(args.dirs)}"
        )
    out = Path(args.out or args.dirs[0])
    rows = summary_rows(records)
    table = aggregate(rows)
    console.print(rich_table(table, f"{len(records)} run(s)"))
    write_summary_csv(rows, out / "summary.csv")
    plots = plot_curves(records, out)
    text = (
        "# Report\n\n"
        + markdown_table(table)
        + "\n"
        + "\n".join(f"![{p.stem}]({p.name})" for p in plots)
        + "\n"
    )
    atomic_write_text(out / "report.md", text)
    console.print(f"wrote {out / 'summary.csv'}, {out / 'report.md'} and {len(plots)} plots")
    return 0
