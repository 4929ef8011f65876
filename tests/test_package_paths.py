"""The installed package works from any directory: no path into the repository in its code,
the configurations it needs ship with it, and `frontier` is a `rollingball` sub-command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rollingball.cli import build_parser
from rollingball.experiments import frontier

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rollingball"
REPOSITORY_FOLDERS = ("docs/", "experiments/", "benchmarks/", "tests/", "examples/")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of `path` outside docstrings and `help=` texts."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            skipped.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            skipped |= {id(inner) for inner in ast.walk(node.value)}
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in skipped
    ]


def test_no_code_in_the_package_names_a_folder_of_the_repository():
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, text in _code_strings(path)
        if text.startswith(REPOSITORY_FOLDERS)
    ]
    assert found == []


def test_the_path_check_sees_a_default_path(tmp_path):
    path = tmp_path / "module.py"
    path.write_text('"""Doc: docs/x."""\nOUT = "docs/figures/claims"\nhelp_ = f(help="docs/y")\n')
    assert _code_strings(path) == [(2, "docs/figures/claims")]


def test_the_frontier_takes_compares_digits_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no repository here
    hparams, by_radius = frontier._hparams("digits")
    assert hparams["sgd"] == {"lr": 1.0}
    assert hparams["sam"] == {"lr": 0.3, "rho": 0.05}
    assert by_radius == {0.1: 0.3, 0.3: 1.0, 1.0: 1.0}
    cell = frontier.Cell("digits", "gelu", "rbo", 0.3, "K=2")
    assert frontier.config(cell, seed=0, epochs=1).optimizer.hparams["lr"] == 1.0


def test_frontier_is_a_rollingball_sub_command():
    args = build_parser().parse_args(["frontier", "--epochs", "2", "--out", "somewhere"])
    assert (args.epochs, args.seeds, args.jobs, args.out) == (2, 3, 2, "somewhere")
    assert args.func is frontier._cmd_frontier


@pytest.mark.parametrize("command", ["claims", "frontier"])
def test_outputs_go_under_runs_by_default(command):
    argv = [command, "usam"] if command == "claims" else [command]
    assert str(build_parser().parse_args(argv).out).startswith("runs/")
