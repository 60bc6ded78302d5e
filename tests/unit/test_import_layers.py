"""Dependencies point one way: a pure AST scan of every import in the product's packages.

- ``modules`` (ships in every module image) imports no other package of the project;
- ``edgemqtt`` (the MQTT layer) imports no other package of the project;
- ``agent`` never imports ``cloud`` (nor the harness);
- ``cloud`` never imports ``agent``;
- nothing imports ``harness`` but the command-line glue that registers ``edgectl simulate`` and
  ``edgectl demo`` (``cloud/cli.py``).

Every import counts: at module level, inside functions (lazy) and under ``TYPE_CHECKING``. There is
no list of exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.services import REPO_ROOT

PACKAGES = ("modules", "edgemqtt", "agent", "cloud", "harness")
FORBIDDEN: dict[str, frozenset[str]] = {
    "modules": frozenset({"edgemqtt", "agent", "cloud", "harness"}),
    "edgemqtt": frozenset({"modules", "agent", "cloud", "harness"}),
    "agent": frozenset({"cloud", "harness"}),
    "cloud": frozenset({"agent", "harness"}),
    "harness": frozenset(),
}
CLI_GLUE = frozenset({"cloud/cli.py"})
"""The only files that may import the harness."""


def imported_packages(source: str, own: str) -> set[str]:
    """The top-level names of every package ``source`` imports (relative imports name ``own``)."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(own if node.level else (node.module or "").split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sources(package):
            rel = path.relative_to(REPO_ROOT).as_posix()
            forbidden = set(FORBIDDEN[package])
            if rel in CLI_GLUE:
                forbidden.discard("harness")
            imported = imported_packages(path.read_text(encoding="utf-8"), package)
            found += [f"{rel} imports {name}" for name in sorted(imported & forbidden)]
    return found


def test_every_package_is_scanned() -> None:
    for package in PACKAGES:
        assert sources(package), f"no Python files under {package}/"
    assert all((REPO_ROOT / glue).is_file() for glue in CLI_GLUE)


def test_dependencies_point_one_way_with_no_exception() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("code", "package"),
    [
        ("import cloud.fleet", "cloud"),
        ("from agent import link", "agent"),
        ("def f():\n    from harness.simulate import Fleet", "harness"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import edgemqtt.topics", "edgemqtt"),
    ],
)
def test_the_scan_sees_every_kind_of_import(code: str, package: str) -> None:
    assert package in imported_packages(code, "modules")
    assert imported_packages("from . import contract", "modules") == {"modules"}
