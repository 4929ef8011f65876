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


# The extra (pyproject.toml) that installs everything a command needs, torch included.
COMMAND_EXTRAS = {"iron": "landscape"}  # the others, `landscape` included: experiments


def missing_package(error: ModuleNotFoundError, command: str | None) -> str:
    """One line naming the missing package and the extra that installs it (before a command
    is known: the extras of the commands, each of which brings torch)."""
    package = (error.name or "").split(".")[0] or "a package"
    if command is None:
        return (
            f"rollingball's commands need the package {package!r}, which is not installed: "
            "pip install 'rollingball[experiments]' (every command; "
            "'rollingball[landscape]' is enough for iron)"
        )
    extra = COMMAND_EXTRAS.get(command, "experiments")
    return (
        f"this command needs the package {package!r}, which is not installed: "
        f"pip install 'rollingball[{extra}]' (or -e '.[{extra}]' in a checkout)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollingball", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as error:  # the commands' modules need torch at least
        if (error.name or "").startswith("rollingball"):
            raise
        print(f"rollingball: error: {missing_package(error, None)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as error:  # an extra not installed: say which, in one line
        if (error.name or "").startswith("rollingball"):
            raise  # not a missing extra: a bug
        message = missing_package(error, args.command)
        print(f"rollingball {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # bad input, missing files: one line, no traceback
        print(f"rollingball {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
