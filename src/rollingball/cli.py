"""The `rollingball` command: one sub-command per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module that defines `add_parser(subparsers)`; imported lazily so that
# `rollingball --help` stays fast and optional extras are only needed by the commands using them.
COMMANDS: dict[str, str] = {
    "demo": "rollingball.demo",
    "iron": "rollingball.landscape.cli",
    "landscape": "rollingball.landscape.cli",
    "run": "rollingball.experiments.cli",
    "compare": "rollingball.experiments.cli",
    "sweep": "rollingball.experiments.cli",
    "report": "rollingball.experiments.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollingball", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in dict.fromkeys(COMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("rollingball"):
                continue  # that part of the package is not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
