"""The architecture as imports: no import cycle among our modules, the vLLM surface
at the bottom importing nothing of ours, and production code never importing the
test oracle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moa_vllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Our modules ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("moa_vllm", "moa_kernels")}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph(top_level_only: bool) -> dict[str, set[str]]:
    return {m: {i for i in imports(p, top_level_only) if i in MODULES and i != m}
            for m, p in MODULES.items()}


def test_no_import_cycle():
    edges = graph(top_level_only=True)
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])


SURFACE = "moa_vllm.engine.vllm_surface"
SHARED = {"span_mask", "paged_kv", "envs", "plan", "span_classes", "plan_report", "tasks",
          "plan_discovery"}
MAY_IMPORT = {  # layer -> the layers it may import from, lazy imports included
    "shared": {"shared"},
    "engine": {"shared", "engine"},
    "serving": {"shared", "engine", "serving"},
    "evaluation": {"shared", "engine", "evaluation"},
    "planner": {"shared", "planner"},
}


def layer(module: str) -> str:
    """shared, engine, serving, evaluation, planner, or top (may import anything)."""
    parts = module.split(".")
    if parts[0] == "moa_kernels":
        return "engine"  # kernels free of engine knowledge; only the engine calls them
    if len(parts) > 2 or parts[-1] in MAY_IMPORT:
        return parts[1]
    return "shared" if parts[-1] in SHARED or module == "moa_vllm" else "top"


def test_imports_run_down_the_layers_lazy_ones_included():
    wrong = [f"{m} -> {i}" for m, deps in graph(top_level_only=False).items()
             if layer(m) in MAY_IMPORT for i in deps
             if layer(i) not in MAY_IMPORT[layer(m)] and i != "moa_vllm"]
    assert wrong == []


def test_the_vllm_surface_imports_nothing_of_ours():
    """Every contact with vLLM internals sits at the bottom: its modules import only
    each other (lazy imports included)."""
    surface = [m for m in MODULES if m.startswith(SURFACE)]
    assert len(surface) > 1
    wrong = {m: deps for m in surface
             if (deps := {d for d in imports(MODULES[m], top_level_only=False)
                          if not d.startswith(SURFACE)})}
    assert wrong == {}


def test_production_code_does_not_import_the_oracle():
    users = [m for m, deps in graph(top_level_only=False).items() if "moa_vllm.oracle" in deps]
    assert users == []


def test_the_graph_sees_real_imports():
    """The checks above read real edges (a parser that saw none would pass them)."""
    edges = graph(top_level_only=True)
    assert "moa_vllm.engine.vllm_surface.kv_manager" in edges["moa_vllm.engine.kv_cache"]
    assert "moa_vllm.plan" in edges["moa_vllm.plan_report"]


def test_every_environment_variable_is_in_the_readme():
    from moa_vllm.envs import VARIABLES

    readme = (ROOT / "README.md").read_text()
    assert [v.name for v in VARIABLES if f"| `{v.name}` |" not in readme] == []
