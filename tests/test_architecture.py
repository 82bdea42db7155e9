"""The package's layers (docs/architecture.md): a module imports only its own layer and the ones below.

    errors, _ext, _platform          (no torch-level dependencies on the rest)
    ops, _triton, estimators, ...    the estimator maths
    nn                               binary layers, conversion, the indicator tracker
    models, data                     architectures; data sets and loaders
    train                            config, run folder, the loop
    analysis, deploy                 reading runs; exporting and running 1-bit models
    cli, */commands                  the command table and each area's commands (parsing, printing)

Read from the source with ``ast`` (imports inside functions count too: a lazy import of a
higher layer is still a dependency on it), so the test needs no import of the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "reste"

#: rank of each top-level part of the package; a module may import parts of equal or lower rank
LAYERS = {
    "errors": 0,
    "_ext": 0,
    "_platform": 0,
    "ops": 1,
    "_triton": 1,
    "estimators": 1,
    "schedules": 1,
    "nn": 2,
    "models": 3,
    "data": 3,
    "train": 4,
    "analysis": 5,
    "deploy": 5,
    "cli": 6,
    "__main__": 6,
}
#: the parts of equal rank that must not import each other
SIBLINGS_APART = {("models", "data"), ("data", "models"), ("analysis", "deploy"), ("deploy", "analysis")}


def _part(module: str) -> str:
    if module.endswith((".commands", ".__main__")):  # an area's command-line glue sits with the command table
        return "cli"
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, path


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of the reste modules ``path`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "reste"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "reste":
                continue
            if target == "reste" or (node.level and not node.module):
                found |= {f"{target}.{a.name}" for a in node.names}  # from . import x: x may be a module
            else:
                found.add(target)
    return found


MODULES = dict(_modules())


def test_every_part_has_a_layer():
    parts = {_part(name) for name in MODULES if name != "reste"}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "reste"))
def test_no_module_imports_a_higher_layer(name):
    part = _part(name)
    bad = []
    for target in sorted(_imports(name, MODULES[name])):
        if target == "reste":
            bad.append("reste (the package itself: import the module that defines the name)")
            continue
        other = _part(target)
        if other not in LAYERS:
            continue  # a name re-exported by the package __init__, e.g. reste.__version__
        if LAYERS[other] > LAYERS[part] or (part, other) in SIBLINGS_APART:
            bad.append(target)
    assert not bad, f"{name} ({part}, layer {LAYERS[part]}) imports {bad}"


def test_architecture_doc_names_only_paths_that_exist():
    doc = SRC.parents[1] / "docs" / "architecture.md"
    named = set(re.findall(r"src/reste/[\w/]+\.(?:py|c|h)\b", doc.read_text()))
    assert named, "docs/architecture.md names no src/reste/... path"
    missing = sorted(p for p in named if not (SRC.parents[1] / p).is_file())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
