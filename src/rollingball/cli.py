"""The `rollingball` command: one sub-command per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from rollingball.arguments import one_line

# Each module defines `add_parser(subparsers)` for its sub-commands; imported when the command
# line is parsed, so that `import rollingball` needs neither matplotlib nor the datasets.
COMMAND_MODULES = (
    "rollingball.landscape.cli",
    "rollingball.experiments.landscape_cli",
    "rollingball.experiments.cli",
    "rollingball.experiments.claims",
    "rollingball.experiments.frontier",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollingball", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as error:  # bad input, missing files: one line, no traceback
        print(f"rollingball {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
