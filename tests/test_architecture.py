"""The layer rule (README, Architecture), read from the imports themselves:

- `tuneserve/` is what two or more of serving/, training/, merge/ share: it imports none
  of them, nor its own CLI;
- `tuneserve/cli/` is the one composition root: it may import every feature;
- `serving/` (the gateway process), `training/` and `merge/` import `tuneserve/` (not its
  CLI) and never each other;
- `vllm_plugin/` runs inside vLLM's processes: it imports only `tuneserve/`;
- no two modules of the product import each other, directly or around a cycle.

Every import counts, also those inside functions (deferred for start-up time, they
still tie the modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.servers import ROOT

FEATURES = ("serving", "training", "merge")
PRODUCT = ("tuneserve", *FEATURES, "vllm_plugin")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of the product modules `path` imports."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in found if n.split(".")[0] in PRODUCT}


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    graph = {}
    for name, path in modules.items():
        # `from a import b` names a module when a.b is one; otherwise it names a.
        graph[name] = {n for n in imports_of(path, name) if n in modules and n != name}
    return graph


def layer(module: str) -> str:
    if module == "tuneserve.cli" or module.startswith("tuneserve.cli."):
        return "cli"
    return module.split(".")[0]


ALLOWED = {
    "tuneserve": {"tuneserve"},
    "cli": {"tuneserve", "cli", *FEATURES, "vllm_plugin"},
    **{feature: {"tuneserve", feature} for feature in FEATURES},
    "vllm_plugin": {"tuneserve", "vllm_plugin"},
}


def test_every_import_follows_the_layer_rule() -> None:
    wrong = sorted(
        f"{module} imports {target} ({layer(module)} -> {layer(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) not in ALLOWED[layer(module)]
    )
    assert wrong == [], "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    # A package's __init__ re-exporting its modules is not a cycle of logic.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    assert cycles(graph) == []


def test_the_checker_sees_what_it_must(tmp_path: Path) -> None:
    # The rule is only as good as the reader: deferred and relative imports and a cycle
    # are all found.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = tmp_path / "fake.py"
    source.write_text("import os\ndef f():\n    from training.data import x\nfrom . import limits\nfrom .engines import base\n")
    found = imports_of(source, "serving.fake")
    assert {"training.data", "serving.limits", "serving.engines.base"} <= found
    assert "os" not in found
    assert layer("tuneserve.cli.main") == "cli" and layer("tuneserve.config") == "tuneserve"


def test_benchmarks_use_the_test_support_package_not_conftest() -> None:
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "tests.conftest" not in names, path.name
