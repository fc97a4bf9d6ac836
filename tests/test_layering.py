"""The design holds: no module imports upward, and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# From the bottom: I/O, the model, the research core, the training loop, the run, the command line.
LAYERS = [
    "utils",
    "model_class",
    "importance",
    "optimizer_lib",
    "reg_params",
    "methods",
    "model_train",
    "scenario",
    "task_agnostic",
    "presets",
    "config",
    "mas",
    "validation_scores",
    "hparam_search",
    "main",
]
# Command-line tools on top, with the data preparation behind data_prep.py: no training module
# imports it, and it imports only utils (see test_mas_data_imports_only_utils_and_itself).
TOOLS = {"data_prep": len(LAYERS), "sweep": len(LAYERS), "mas_data": len(LAYERS)}
MAX_LINES = 45
LONG_ALLOWED = {"build_parser", "build_sweep_parser"}  # argparse builders: one statement per flag


def _layer(module: str) -> int | None:
    top = module.split(".")[0]
    if top in TOOLS:
        return TOOLS[top]
    return LAYERS.index(top) if top in LAYERS else None


def _sources() -> list[Path]:
    skip = {"tests", "benchmarks", "models", "Data"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts) and "/." not in str(p)]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module) -> list[str]:
    """Imported first-party modules, outside ``if TYPE_CHECKING:`` blocks."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return [m for m in found if _layer(m) is not None]


def test_no_module_imports_upward():
    upward = []
    for path in _sources():
        name = _module_name(path)
        own = _layer(name)
        assert own is not None, f"{name} has no place in LAYERS: add it"
        for target in _imports(ast.parse(path.read_text())):
            if _layer(target) > own:
                upward.append(f"{name} imports {target}")
    assert upward == []


# Inside utils, from the bottom: the error types, CLI types and schema checks (utils, utils.cli, utils.schema);
# the process runtime (torchrun ranks, signals, the folder lock); the artefacts a run writes and reads back;
# the data pipeline.
UTILS_LAYERS = ["utils", "utils.runtime", "utils.artefacts", "utils.data"]


def _utils_layer(module: str) -> int:
    package = ".".join(module.split(".")[:2])
    return UTILS_LAYERS.index(package) if package in UTILS_LAYERS else 0


def test_utils_subpackages_import_downward_only():
    upward, seen = [], set()
    for path in _sources():
        name = _module_name(path)
        if not name.startswith("utils"):
            continue
        seen.add(".".join(name.split(".")[:2]))
        for target in _imports(ast.parse(path.read_text())):
            if _utils_layer(target) > _utils_layer(name):
                upward.append(f"{name} imports {target}")
    assert upward == [] and set(UTILS_LAYERS[1:]) <= seen


def test_utils_imports_only_utils_and_the_core_does_not_import_the_optimizer():
    for path in _sources():
        name = _module_name(path)
        imports = _imports(ast.parse(path.read_text()))
        if name.startswith("utils"):
            assert all(m.startswith("utils") for m in imports), name
        if name in ("importance", "reg_params") or name.startswith("methods"):
            assert "optimizer_lib" not in imports, name


def test_mas_data_imports_only_utils_and_itself():
    """The manifest's schema is shared through utils/data/manifest.py, never by importing the training side."""
    seen = []
    for path in _sources():
        name = _module_name(path)
        if name.startswith("mas_data"):
            seen.append(name)
            imports = _imports(ast.parse(path.read_text()))
            assert all(m.split(".")[0] in ("utils", "mas_data") for m in imports), (name, imports)
    assert "mas_data.build" in seen and "mas_data.download" in seen


def test_functions_are_short():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name not in LONG_ALLOWED:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{_module_name(path)}.{node.name}: {lines} lines")
    assert long == []
