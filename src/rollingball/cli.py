"""The `rollingball` command: one sub-command per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `add_parser(subparsers)` for its sub-commands; imported when the command
# line is parsed, so that `import rollingball` needs neither matplotlib nor the datasets.
COMMAND_MODULES = (
    "rollingball.landscape.cli",
    "rollingball.experiments.cli",
    "rollingball.experiments.claims",
)


def comma_separated_floats(text: str) -> list[float]:
    """argparse type for "0.01,0.1,1"."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollingball", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
