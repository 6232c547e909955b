"""The layout's promise: adapters/ is the contract that server/ and training/ both use, and those two never
import each other (nor does adapters/ import either). loraplex/ is the shared foundation; only its command
line dispatcher reaches into the areas it dispatches to."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "adapters": {"server", "training"},
    "server": {"training"},
    "training": {"server"},
    "loraplex": {"server", "training"},
}
DISPATCHER = REPO / "loraplex" / "cli.py"


def imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_keep_their_boundaries(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in (REPO / package).rglob("*.py")
        if imported_packages(path) & FORBIDDEN[package] and path != DISPATCHER
    }
    assert not offenders, offenders
