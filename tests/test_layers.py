"""The package's layers: core imports neither evaluation, server nor cli; evaluation and server import neither each
other nor cli (function-level imports included); and every module lives in one of the four."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "d3cli"
LOWER = {
    "core": ("d3cli.evaluation", "d3cli.server", "d3cli.cli"),
    "evaluation": ("d3cli.server", "d3cli.cli"),
    "server": ("d3cli.evaluation", "d3cli.cli"),
    "cli": (),
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_lower_layer_imports_a_higher_one():
    offences = []
    for layer, forbidden in LOWER.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            offences += [f"{path.relative_to(PACKAGE)} imports {module}" for module in imported_modules(path)
                         if module.startswith(forbidden)]
    assert offences == []


def test_every_module_belongs_to_a_layer():
    loose = sorted(path.name for path in PACKAGE.glob("*.py") if path.name not in ("__init__.py", "__main__.py"))
    assert loose == []
