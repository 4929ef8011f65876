"""Project metadata and documents: an SPDX licence that installs without warnings, plain words."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_licence_is_an_spdx_expression_that_setuptools_takes_without_warnings():
    setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml")
    from setuptools.dist import Distribution

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # PEP 639 from 77 on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = setuptools_config.apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
    assert [str(w.message) for w in caught if "license" in str(w.message).lower()] == []


def test_the_documents_speak_of_processes_not_people():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "engineer" not in path.read_text().lower(), path
