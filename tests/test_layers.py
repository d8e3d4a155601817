"""The package's layers, bottom to top (function-level imports included): a module imports only its own layer and
those below it, and every module lives in one of them.

    base                 errors, files, paths
    kernels              d3's CPU kernels
    core.text            prompts, detokenizing, d3's own tokenizer
    core.model           loading, weights, layers and d3's own model
    core.decode          schedule, skipping, caches, the engine
    core.calibration     layer profiles, a model's calibration file
    core.session         settings, the DecodePlan, conversations, prompt batches
    evaluation, server   each on core (not on each other)
    cli                  on any
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "d3cli"
STACK = ["base", "kernels", "core.text", "core.model", "core.decode", "core.calibration", "core.session"]
ABOVE_CORE = {"evaluation": "server", "server": "evaluation"}  # each may not import the other


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name under d3cli (None for d3cli itself and its __main__)."""
    name = module.removeprefix("d3cli.")
    for layer in sorted([*STACK, *ABOVE_CORE, "cli"], key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from d3cli.core import model`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module.startswith("d3cli.")}


def allowed(importer: str, imported: str) -> bool:
    if importer in ("cli", None) or imported is None or importer == imported:  # None: d3cli.__main__
        return True
    if importer in ABOVE_CORE:
        return imported != ABOVE_CORE[importer] and imported in STACK
    return importer in STACK and imported in STACK and STACK.index(imported) < STACK.index(importer)


def test_no_module_imports_a_layer_above_its_own():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        layer = layer_of(module)
        for imported in imported_modules(path):
            if not allowed(layer, layer_of(imported)):
                offences.append(f"{module} ({layer}) imports {imported} ({layer_of(imported)})")
    assert offences == []


def test_every_module_belongs_to_a_layer():
    loose = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if layer_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)) is None
                   and path.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    assert sorted(path.name for path in (PACKAGE / "core").glob("*.py")) == ["__init__.py"]  # core is its packages


def test_no_circle_of_imports():
    """No module reaches itself again through d3cli's imports (function-level ones included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {imported for imported in imported_modules(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    circles, state = [], {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                circles.append(" -> ".join([*trail[trail.index(imported):], imported]))
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []
