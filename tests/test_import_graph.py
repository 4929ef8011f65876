"""Imports run one way: the harness may use the optimizer and the landscape tools, never the
reverse; every import in a module counts, those inside functions included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rollingball"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The rollingball modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in found if name.startswith("rollingball")}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# room -> the rooms it must not import
FORBIDDEN = {
    "rollingball.landscape": ["rollingball.experiments", "rollingball.cli"],
    "rollingball.optim": ["rollingball.experiments", "rollingball.landscape", "rollingball.cli"],
    "rollingball.baselines": [
        "rollingball.experiments",
        "rollingball.landscape",
        "rollingball.optim",
    ],
    "rollingball.diagnostics": ["rollingball.experiments", "rollingball.landscape"],
    "rollingball.experiments": ["rollingball.cli"],
    "rollingball.optax": ["rollingball.optim", "rollingball.experiments", "rollingball.landscape"],
    # the specification both frameworks share: nothing of rollingball but the defaults
    "rollingball.spec": [
        "rollingball.optim",
        "rollingball.optax",
        "rollingball.experiments",
        "rollingball.landscape",
        "rollingball.cli",
    ],
}


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_a_room_does_not_import_what_depends_on_it(room):
    paths = [p for p in PACKAGE.rglob("*.py") if _under(_module(p), room)]
    assert paths
    wrong = [
        f"{_module(path)} imports {name}"
        for path in paths
        for name in sorted(imports(path))
        if any(_under(name, forbidden) for forbidden in FORBIDDEN[room])
    ]
    assert wrong == []


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("def f():\n    from rollingball.experiments.data import load_data\n")
    assert "rollingball.experiments.data" in imports(path)


def test_the_specification_imports_neither_torch_nor_jax():
    code = (
        "import sys, rollingball.spec, rollingball.defaults; "
        "print(sorted(m for m in ('torch', 'jax', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
