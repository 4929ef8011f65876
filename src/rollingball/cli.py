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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (torch's messages span several)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


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
