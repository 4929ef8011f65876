"""Every default that README.md and docs/*.md state is the code's default.

The documents state a default in one of these forms, which this test reads:

- `` `name` (default VALUE) ``                    memory m = `anderson_memory` (default 1)
- `` `name=VALUE` (default) `` or ``, the default``  `projection="anderson"` (default)
- default(s), then `` `name=VALUE` `` items      the defaults `projection_steps=2`, ...
- `` `name`, on by default `` (or off)            `fixed_randomness`, on by default
- default(s) (SYMBOL = VALUE, ...)                 RBO defaults (K = 2, m = 1)
- the default SYMBOL = VALUE                       the default K = 2
- `` `--flag VALUE`, the default ``               a `rollingball` sub-command's option
- in code, a comment `# defaults: name=VALUE, SYMBOL=VALUE`

with the symbols of docs/algorithm.md: K (`projection_steps`), m or memory
(`anderson_memory`), tol (`projection_tol`), γ (`projection_step_size`), "N trial points"
(`projection_steps=N`), "Anderson" (`projection="anderson"`). Each name is looked up in the
signatures of `rollingball.RBO`, `rollingball.optax.rbo` and the landscape's sharpness
functions, and an option `--flag` in the `rollingball` sub-command named before it in its
paragraph (in every sub-command that has it, if none is named); a stated value must equal the
default of every one that has the name. Someone else's defaults ("the authors' defaults",
"Lightning's", "the former default") are not read as the code's.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rollingball import RBO
from rollingball.cli import build_parser
from rollingball.landscape import sharpness

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SYMBOLS = {
    "K": "projection_steps",
    "m": "anderson_memory",
    "memory": "anderson_memory",
    "tol": "projection_tol",
    "γ": "projection_step_size",
}
ALIASES = {"learning_rate": "lr"}  # the optax name of RBO's lr

VALUE = r"(?:\"[^\"]*\"|'[^']*'|[-+\w.]+)"
ASSIGNMENT = rf"(\w+)\s*=\s*({VALUE})"
ASSIGNMENTS = rf"`\w+\s*=\s*{VALUE}(?:,\s*\w+\s*=\s*{VALUE})*`"
# up to 80 characters of the same clause (a period inside backticks does not end it)
SAME_CLAUSE = r"(?:[^.`\n);]|`[^`\n]*`|\n(?!\n)){0,80}?"
FORMS: dict[str, re.Pattern[str]] = {
    "name (default value)": re.compile(rf"`(\w+)`\s*\(default:?\s+({VALUE})\)"),
    "name=value (default)": re.compile(rf"`{ASSIGNMENT}`(?:\s*\(default\)|,?\s+\(?the default\b)"),
    "default name=value": re.compile(
        rf"\b[Dd]efaults?\b{SAME_CLAUSE}((?:{ASSIGNMENTS}(?:,\s*|\s+and\s+)?)+)"
    ),
    "name, on by default": re.compile(r"`(\w+)`,\s+(on|off) by default"),
    "default (symbols)": re.compile(r"\b[Dd]efaults?(?: \w+)?,? \(([^()\n]*(?:\n[^()\n]*)?)\)"),
    "the default symbol": re.compile(rf"\bthe default (?:\w+ )?(K|m|tol|γ) = ({VALUE})"),
    "--flag value, the default": re.compile(r"`(--[\w-]+)[ =]([^`\s]+)`,?\s+\(?the default\b"),
    "# defaults: name=value": re.compile(r"#\s*defaults?:\s*([^\n]*)"),
}
# someone else's defaults, not the code's: "the authors' defaults (η = 1, ...)"
OTHERS = re.compile(r"(authors'|paper's|former|Lightning's|their)\s+\S*$")
COMMAND = re.compile(r"`rollingball (\w+)")


@dataclass(frozen=True)
class Stated:
    """A default that a document states: `name` is a parameter or, with the sub-command
    `command` named before it in its paragraph (if any), an option of `rollingball`."""

    path: str
    line: int
    name: str
    text: str  # the value as written
    command: str | None = None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _symbol_item(item: str) -> tuple[str, str] | None:
    """One item of a "defaults (K = 2, m = 1)" list as (name, value), or None if it is not one."""
    item = item.strip().strip("`")
    if match := re.fullmatch(r"(\d+) trial points", item):
        return "projection_steps", match[1]
    if item == "Anderson":
        return "projection", '"anderson"'
    if match := re.fullmatch(rf"(K|m|tol|γ|memory)\s*=?\s*({VALUE})", item):
        return SYMBOLS[match[1]], match[2]
    return None


def _pairs(form: str, match: re.Match[str]) -> list[tuple[str, str]]:
    """The (name, value) pairs that one match of `form` states."""
    if form == "default name=value":
        return re.findall(ASSIGNMENT, match[1])
    if form == "# defaults: name=value":
        return [
            (SYMBOLS.get(name, name), value) for name, value in re.findall(ASSIGNMENT, match[1])
        ]
    if form == "name, on by default":
        return [(match[1], str(match[2] == "on"))]
    if form == "default (symbols)":
        items = (_symbol_item(item) for item in re.split(r",\s*", match[1]))
        return [pair for pair in items if pair is not None]
    return [(SYMBOLS.get(match[1], match[1]), match[2])]


def statements(text: str, path: str = "<text>") -> Iterator[Stated]:
    """Every default `text` states, in the forms of the module's docstring."""
    for form, pattern in FORMS.items():
        for match in pattern.finditer(text):
            before = text[: match.start()]
            if OTHERS.search(before[-40:]):
                continue
            line = before.count("\n") + 1
            commands = COMMAND.findall(before[before.rfind("\n\n") + 1 :])
            for name, value in _pairs(form, match):
                command = commands[-1] if name.startswith("--") and commands else None
                yield Stated(path, line, name, value, command)


def _signatures() -> dict[str, list[tuple[str, Any]]]:
    """Parameter name -> [(owner, default)] over the documented callables."""
    owners: list[tuple[str, Callable[..., Any]]] = [("RBO", RBO.__init__)]
    owners += [
        (f"sharpness.{name}", function)
        for name, function in inspect.getmembers(sharpness, inspect.isfunction)
        if not name.startswith("_") and function.__module__ == sharpness.__name__
    ]
    try:
        from rollingball.optax import rbo
    except ImportError:  # the jax extra is not installed: RBO's signature alone
        pass
    else:
        owners.append(("optax.rbo", rbo))
    table: dict[str, list[tuple[str, Any]]] = {}
    for owner, function in owners:
        for parameter in inspect.signature(function).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                name = ALIASES.get(parameter.name, parameter.name)
                table.setdefault(name, []).append((owner, parameter.default))
    return table


def _cli_defaults() -> dict[str, list[tuple[str, Any]]]:
    """Option string -> [(sub-command, default)] over the `rollingball` sub-commands."""
    table: dict[str, list[tuple[str, Any]]] = {}
    commands = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command, parser in commands[0].choices.items():
        for action in parser._actions:
            for option in action.option_strings:
                table.setdefault(option, []).append((command, action.default))
    return table


def _same(stated: str, default: Any) -> bool:
    value = _literal(stated)
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return float(value) == float(default)
    return value == default or str(value) == str(default)


def drifts(found: list[Stated]) -> list[str]:
    """The statements that disagree with the code, or name nothing the code has."""
    signatures, options = _signatures(), _cli_defaults()
    wrong = []
    for stated in found:
        table = options if stated.name.startswith("--") else signatures
        owners = [
            (owner, default)
            for owner, default in table.get(stated.name, [])
            if stated.command in (None, owner)
        ]
        where = f"{stated.path}:{stated.line}: {stated.name} = {stated.text}"
        if not owners:
            wrong.append(f"{where}, but no documented signature has it")
        for owner, default in owners or []:
            if not _same(stated.text, default):
                wrong.append(f"{where}, but {owner}'s default is {default!r}")
    return wrong


def _all_statements() -> list[Stated]:
    return [
        stated
        for path in DOCUMENTS
        for stated in statements(path.read_text(), str(path.relative_to(ROOT)))
    ]


def test_every_default_the_documents_state_is_the_codes_default():
    assert drifts(_all_statements()) == []


def test_the_documents_state_the_projection_defaults_where_a_reader_looks_for_them():
    """The test above reads these; a rewrite that leaves the forms it reads would fail here."""
    found = {(stated.path, stated.name) for stated in _all_statements()}
    projection = {"projection", "projection_steps", "projection_tol", "anderson_memory"}
    assert {("README.md", name) for name in projection} <= found
    assert {("docs/algorithm.md", "projection"), ("docs/algorithm.md", "anderson_memory")} <= found
    assert {("docs/jax.md", name) for name in projection} <= found


@pytest.mark.parametrize(
    ("text", "name", "code"),
    [
        ("memory m = `anderson_memory` (default 5): with", "anderson_memory", 1),
        (
            "It chose the defaults `projection_steps=20`, `anderson_memory=1`.",
            "projection_steps",
            2,
        ),
        ('### `projection="gd"` (default): the authors', "projection", "anderson"),
        ("RBO defaults (K = 2, m = 5) | 0 | 4", "anderson_memory", 1),
        ("the default K = 20 is not enough", "projection_steps", 2),
        ("with the default budget of 3 trial points (`projection_steps=3`)", "projection_steps", 2),
        ("RBO's `fixed_randomness`, off by default: every", "fixed_randomness", True),
        ("By default (`fixed_randomness=False`) every call", "fixed_randomness", True),
        ('# defaults: projection="anderson", K=2, tol=1e-2, m=1', "projection_tol", 1e-4),
        ("`rollingball claims all` runs (`--jobs 3`, the default: one", "--jobs", 2),
    ],
)
def test_a_drifted_default_is_caught(text, name, code):
    found = [stated for stated in statements(text) if stated.name == name]
    assert len(found) == 1
    wrong = drifts(found)  # once per signature that has the name (RBO's and rbo's)
    assert wrong
    assert all(f"default is {code!r}" in line for line in wrong)


def test_an_unknown_name_with_a_default_is_caught():
    wrong = drifts(list(statements("the defaults `projection_budget=2` and more")))
    assert wrong == ["<text>:1: projection_budget = 2, but no documented signature has it"]


def test_the_readme_states_the_python_that_pyproject_requires():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    stated = set(re.findall(r"Python (3\.\d+) or later", (ROOT / "README.md").read_text()))
    assert stated == {requires.removeprefix(">=")}


def test_rbo_has_rbos_defaults_as_the_documents_say():
    """README.md and docs/jax.md: `rbo(...)  # other arguments and defaults as RBO's`."""
    for path in (ROOT / "README.md", ROOT / "docs" / "jax.md"):
        assert "defaults as RBO's" in path.read_text(), path
    pytest.importorskip("jax")
    both = {
        name: dict(table)
        for name, table in _signatures().items()
        if {"RBO", "optax.rbo"} <= {owner for owner, _ in table}
    }
    assert {"lr", "radius", "projection", "projection_steps", "anderson_memory"} <= set(both)
    for name, defaults in both.items():
        assert defaults["RBO"] == defaults["optax.rbo"], name
