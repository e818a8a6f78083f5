"""The package layout as a contract: import layers point one way, no import circle, no file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tpsvit"
MAX_LINES = 500

# layer -> the tpsvit layers it may import (tpsvit.errors is below everything). Tools sit on top and may use each other.
LOWER = {
    "errors": set(),
    "core": {"errors", "core"},
    "families": {"errors", "core", "families"},
    "runtime": {"errors", "core", "families"},
    "patch": {"errors", "core", "families", "runtime"},
}
MODEL_LIBRARIES = ("timm", "transformers")


def _module_name(path: Path) -> str:
    parts = ("tpsvit", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, at module level or inside functions (AST walk)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # a submodule imported from its package depends on the submodule only
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


def _internal(target: str) -> str | None:
    """The tpsvit module an import names (``from tpsvit.x import f`` -> tpsvit.x), or None outside tpsvit."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {name: {t for t in map(_internal, _imports(name)) if t and t != name} for name in MODULES}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tpsvit"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("layer", sorted(LOWER))
def test_layers_import_only_the_layers_below(layer):
    for module, deps in GRAPH.items():
        if _layer(module) != layer:
            continue
        above = sorted(d for d in deps if _layer(d) not in LOWER[layer])
        assert not above, f"{module} ({layer}) imports {above}; a {layer} module may import {sorted(LOWER[layer])}"


def test_core_imports_no_model_library():
    for module in (m for m in MODULES if _layer(m) == "core"):
        libraries = sorted(i for i in _imports(module) if i.split(".")[0] in MODEL_LIBRARIES)
        assert not libraries, f"{module} imports {libraries}: core takes tensors, not models"


def test_the_graph_sees_imports_inside_functions():
    assert "tpsvit.io.hf_loading" in GRAPH["tpsvit.io.loading"]  # imported inside load_model
    assert "tpsvit.families.registry" in GRAPH["tpsvit.families.timm_vit"]


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


MOVED_EXAMPLES = [("tpsvit.trace", "tpsvit.core.trace"), ("tpsvit.loading", "tpsvit.io.loading"),
                  ("tpsvit.flops", "tpsvit.measure.flops"), ("tpsvit.hf", "tpsvit.families.hf_common")]


@pytest.mark.parametrize("old, new", MOVED_EXAMPLES)
def test_old_module_paths_give_the_moved_module(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)  # an earlier test may have imported the old name already
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        moved = importlib.import_module(old)
    assert moved is importlib.import_module(new)


def test_old_families_names_keep_working():
    from tpsvit.families import Family, family_of, gather_rope, logits_of  # the pre-package names

    assert callable(family_of) and callable(gather_rope) and callable(logits_of) and isinstance(Family, type)
