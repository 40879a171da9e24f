"""The package's layers, read from its source: arrows only point down, and the method stays pure.

Every module's imports are read with ``ast`` (top-level and inside functions alike: a lazy import
is still an arrow). The layers, lowest first: ``core`` (the method, torch only), ``distributed``
(a leaf: it imports nothing of the package), ``optim``, ``files``, ``engines``, ``integrations``, ``recipes``; the top-level alias
modules (``smt_dist.deepspeed``, ``smt_dist.trainer``, ``smt_dist.merge``, ``smt_dist``) may
import anything below them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "smt_dist"
LAYERS = ["core", "distributed", "optim", "files", "engines", "integrations", "recipes"]
# The optimizer's update math; BlockShardedAdamW itself moves tensors between ranks.
PURE_OPTIM = {"smt_dist.optim.adamw", "smt_dist.optim.ownership"}
FORBIDDEN_IN_MATH = ("torch.distributed", "deepspeed")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from smt_dist.core import surgery`` imports the module smt_dist.core.surgery
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {i for i in imports_of(path) if i in MODULES and i != name} for name, path in MODULES.items()}


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) >= 2 and parts[1] in LAYERS else None


def test_the_package_has_its_layers():
    assert {name.split(".")[1] for name in MODULES if name.count(".") >= 2} >= set(LAYERS)


def test_no_import_cycle():
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            cycle = [*stack[stack.index(name) :], name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        stack.append(name)
        for target in sorted(GRAPH[name]):
            # A package's __init__ re-exports what is below it; importing it is no arrow back up.
            if not name.startswith(target + "."):
                visit(target)
        stack.pop()
        done.add(name)

    for name in MODULES:
        visit(name)


@pytest.mark.parametrize("name", [n for n in MODULES if layer_of(n) is not None])
def test_arrows_point_down(name):
    own = layer_of(name)
    upward = {t for t in GRAPH[name] if (layer_of(t) if layer_of(t) is not None else len(LAYERS)) > own}
    assert not upward, f"{name} ({LAYERS[own]}) imports from a layer above it: {sorted(upward)}"


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("smt_dist.core") or n in PURE_OPTIM])
def test_the_math_knows_nothing_of_distribution(name):
    found = {i for i in imports_of(MODULES[name]) if i.startswith(FORBIDDEN_IN_MATH)}
    assert not found, f"{name} imports {sorted(found)}"


def test_the_leaf_imports_nothing_of_the_package():
    for name in (n for n in MODULES if n.startswith("smt_dist.distributed")):
        outside = {t for t in GRAPH[name] if not t.startswith("smt_dist.distributed")}
        assert not outside, f"{name} imports {sorted(outside)}"


def test_deepspeed_is_imported_at_the_top_of_one_module_only():
    """Elsewhere only inside functions that run for DeepSpeed's own parameters or ZeRO-3."""
    at_top = []
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                    at_top.append(name)
    assert sorted(set(at_top)) == ["smt_dist.engines.deepspeed"]
