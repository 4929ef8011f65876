"""The claims ledger (docs/claims.md): one experiment per law or claim, one command each.

    rollingball claims NAME [--out DIR] [--tiny]
    python -m rollingball.experiments.claims NAME [--out DIR] [--tiny]

Each experiment writes NAME-specific ``.png`` and ``.json`` files into ``--out`` (default
``runs/claims``; ``--out docs/figures/claims`` regenerates the ledger's figures in a clone) and
prints its table; ``all`` runs every experiment, in ``--jobs`` worker processes (default 2, one
per core of the 2-core budget; ``--jobs 1`` runs them in turn in this process). ``--tiny``
shrinks every experiment to a smoke test of a few seconds. Each report's header gives the
experiment's wall time and CPU time (the wall time on an idle core: every run uses one thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["EXPERIMENTS", "add_parser", "main", "run", "run_many"]


def _experiments() -> dict[str, Callable[[Path, bool], str]]:
    from rollingball.experiments.claims import laws_runs, paper_runs

    return {
        "usam": laws_runs.usam,
        "edge_of_stability": laws_runs.edge_of_stability,
        "hidden_learning_rate": laws_runs.hidden_learning_rate,
        "large_learning_rates": laws_runs.large_learning_rates,
        "ironing": paper_runs.ironing,
        "sharp_flat": paper_runs.sharp_flat,
        "training": paper_runs.training,
        "regimes": paper_runs.regimes,
    }


EXPERIMENTS = (
    "usam",
    "edge_of_stability",
    "hidden_learning_rate",
    "large_learning_rates",
    "ironing",
    "sharp_flat",
    "training",
    "regimes",
)
# Longest first (measured CPU times), so that two worker processes finish close together.
LONGEST_FIRST = (
    "edge_of_stability",
    "hidden_learning_rate",
    "large_learning_rates",
    "sharp_flat",
    "training",
    "regimes",
    "ironing",
    "usam",
)


def _one(name: str, out: Path, tiny: bool) -> tuple[str, str, float, float]:
    """Run one experiment on one thread: (name, its table, wall seconds, CPU seconds)."""
    import torch

    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    table = _experiments()[name](out, tiny)
    return name, table, time.perf_counter() - wall, time.process_time() - cpu


def run(name: str, out: Path, tiny: bool = False, jobs: int = 1) -> str:
    """Run experiment ``name`` (or ``all``) into ``out``; returns the printed report.

    With ``jobs`` > 1, ``all`` runs its experiments in that many worker processes (one thread
    each, longest first); the report then ends with the total wall time and the CPU time
    summed over the experiments.
    """
    return run_many(EXPERIMENTS if name == "all" else (name,), out, tiny, jobs)


def run_many(names: tuple[str, ...], out: Path, tiny: bool = False, jobs: int = 1) -> str:
    """Run the named experiments, in ``jobs`` processes; the report lists them in ``names``
    order."""
    start = time.perf_counter()
    if jobs <= 1 or len(names) == 1:
        done = [_one(each, out, tiny) for each in names]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        order = sorted(names, key=lambda n: LONGEST_FIRST.index(n))
        context = multiprocessing.get_context("spawn")  # no forked torch state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            done = list(pool.map(_one, order, [out] * len(order), [tiny] * len(order)))
    by_name = {name: (table, wall, cpu) for name, table, wall, cpu in done}
    reports = []
    for each in names:
        table, wall, cpu = by_name[each]
        reports.append(f"## {each} ({wall:.0f} s wall, {cpu:.0f} s CPU)\n\n{table}\n")
    if len(names) > 1:
        total_cpu = sum(cpu for _, _, cpu in by_name.values())
        wall = time.perf_counter() - start
        reports.append(
            f"## total: {wall:.0f} s wall with {max(jobs, 1)} process(es), "
            f"{total_cpu:.0f} s CPU summed over the experiments\n"
        )
    return "\n".join(reports)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="the experiment to run")
    parser.add_argument("--out", default="runs/claims", help="directory for PNG + JSON")
    parser.add_argument("--tiny", action="store_true", help="smoke-test size (seconds)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="worker processes for 'all' (one thread each; default 2, for 2 cores)",
    )
    parser.set_defaults(func=_cmd_claims)


def _cmd_claims(args: argparse.Namespace) -> int:
    """Run one experiment of the claims ledger (docs/claims.md) and print its table."""
    print(run(args.name, Path(args.out), args.tiny, args.jobs))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``claims`` to the ``rollingball`` command."""
    parser = subparsers.add_parser(
        "claims",
        help="the claims ledger: one experiment per law or claim",
        description=_cmd_claims.__doc__,
    )
    _configure(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollingball.experiments.claims")
    _configure(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
