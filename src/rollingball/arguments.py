"""What the `rollingball` sub-commands share: argparse types, the help format, one-line errors."""

from __future__ import annotations

import argparse


def comma_separated_floats(text: str) -> list[float]:
    """argparse type for "0.01,0.1,1"."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def positive_radii(text: str) -> list[float]:
    """argparse type for ball radii, "0.05,0.2": at least one, each > 0."""
    radii = comma_separated_floats(text)
    if not radii or any(r <= 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be positive, got {text!r}")
    return radii


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class DocstringHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter` that keeps the description's lines, for a module docstring."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (torch's messages span several)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
