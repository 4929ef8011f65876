"""The claims ledger (docs/claims.md): one experiment per law or claim, one command each.

    rollingball claims NAME [--out DIR] [--tiny]
    python -m rollingball.experiments.claims NAME [--out DIR] [--tiny]

Each experiment writes NAME-specific ``.png`` and ``.json`` files into ``--out`` (default
``docs/figures/claims``) and prints its table; ``all`` runs every experiment in turn.
``--tiny`` shrinks every experiment to a smoke test of a few seconds. The report's header
gives the wall time and the CPU time (the wall time on an idle core: all runs use one thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["EXPERIMENTS", "add_parser", "main", "run"]


def _experiments() -> dict[str, Callable[[Path, bool], str]]:
    from rollingball.experiments.claims import laws_runs, paper_runs

    return {
        "h1": laws_runs.h1,
        "h2": laws_runs.h2,
        "h3": laws_runs.h3,
        "h4": laws_runs.h4,
        "ironing": paper_runs.ironing,
        "sharp_flat": paper_runs.sharp_flat,
        "training": paper_runs.training,
        "regimes": paper_runs.regimes,
    }


EXPERIMENTS = ("h1", "h2", "h3", "h4", "ironing", "sharp_flat", "training", "regimes")


def run(name: str, out: Path, tiny: bool = False) -> str:
    """Run experiment ``name`` (or ``all``) into ``out``; returns the printed report."""
    import torch

    names = EXPERIMENTS if name == "all" else (name,)
    reports = []
    for each in names:
        torch.set_num_threads(1)
        wall, cpu = time.perf_counter(), time.process_time()
        table = _experiments()[each](out, tiny)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        reports.append(f"## {each} ({wall:.0f} s wall, {cpu:.0f} s CPU)\n\n{table}\n")
    return "\n".join(reports)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="the experiment to run")
    parser.add_argument("--out", default="docs/figures/claims", help="directory for PNG + JSON")
    parser.add_argument("--tiny", action="store_true", help="smoke-test size (seconds)")
    parser.set_defaults(func=_cmd_claims)


def _cmd_claims(args: argparse.Namespace) -> int:
    """Run one experiment of the claims ledger (docs/claims.md) and print its table."""
    print(run(args.name, Path(args.out), args.tiny))
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
