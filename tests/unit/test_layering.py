"""The dependency rule of DESIGN.md, checked on every import in the tree.

``cloud → modules ← agent``: agent never imports cloud, cloud never imports agent, modules imports
neither; and the scoring runtime that ships in every image imports only light packages at module
level (heavy or optional ones are imported inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "agent": {"cloud"},
    "cloud": {"agent"},
    "modules": {"agent", "cloud"},
}

EXCEPTIONS = {
    # Issue 6 asks for `edgectl simulate`: N real agents (planner, link, state, health) in the
    # operator's process. The command imports the agent inside its functions; nothing else in
    # cloud may, and the agent never imports cloud.
    "cloud/commands/simulate.py",
}

SCORING_TOP_LEVEL_ALLOWED = {
    "aiohttp",
    "numpy",
    "onnxruntime",
    "orjson",
    "pydantic",
    "yaml",
    "modules",
}


def _imports(path: Path, *, top_level_only: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_in_the_allowed_direction(package: str) -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in _python_files(package)
        if str(path.relative_to(ROOT)) not in EXCEPTIONS
        for line, name in _imports(path, top_level_only=False)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not problems, "\n".join(problems)


def test_the_scoring_runtime_imports_only_light_packages_at_module_level() -> None:
    stdlib = __import__("sys").stdlib_module_names
    problems = [
        f"{path.relative_to(ROOT)}:{line}: imports {name} at module level"
        for path in _python_files("modules/scoring")
        for line, name in _imports(path, top_level_only=True)
        if name.split(".")[0] not in stdlib
        and name.split(".")[0] not in SCORING_TOP_LEVEL_ALLOWED
        and name != "__future__"
    ]
    assert not problems, "\n".join(problems)
