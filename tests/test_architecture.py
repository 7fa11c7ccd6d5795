"""The layering the README describes, checked on the source (every import, lazy ones included):

    core (config, quant, pool, radix policy, attention reference)   imports no SGLang, nothing above it
    kernels                                                         core only, no SGLang
    patches (the only place that touches SGLang internals)          core and kernels
    eval (demo, quality, launcher, workloads, ...)                  core, cpu_shims; never patches
    cli                                                             eval

and no import cycle anywhere in the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Installed package name -> source folder (pyproject's package-dir).
ROOTS = {"fade_sglang": REPO / "fade_sglang", "fade_sglang.kernels": REPO / "kernels",
         "fade_sglang.patches": REPO / "patches"}
CORE = ("fade_sglang", "fade_sglang.config", "fade_sglang.quant", "fade_sglang.pool", "fade_sglang.radix",
        "fade_sglang.attention")
ALLOWED = {  # layer -> layers it may import
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "patches": {"core", "kernels", "patches"},
    "eval": {"core", "eval", "cpu_shims"},
    "cpu_shims": {"cpu_shims"},
    "cli": {"cli", "core", "eval"},
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if "site" in rel.parts or (pkg == "fade_sglang" and rel.parts[0] in ("kernels", "patches")):
                continue  # cpu_shims/site is a PYTHONPATH folder, not package code
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


MODULES = _modules()


def _layer(mod: str) -> str:
    for prefix, layer in (("fade_sglang.kernels", "kernels"), ("fade_sglang.patches", "patches"),
                          ("fade_sglang.eval", "eval"), ("fade_sglang.cpu_shims", "cpu_shims"),
                          ("fade_sglang.cli", "cli")):
        if mod == prefix or mod.startswith(prefix + "."):
            return layer
    assert any(mod == c or mod.startswith(c + ".") for c in CORE), f"{mod} belongs to no layer"
    return "core"


def _imports(mod: str) -> set[str]:
    """Absolute names of everything ``mod`` imports (module level and inside functions)."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def _internal(name: str) -> str | None:
    """The package module ``name`` refers to (longest known prefix), or None for third-party names."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


GRAPH = {m: {t for t in (_internal(n) for n in _imports(m)) if t and t != m} for m in MODULES}


def test_every_module_has_a_layer() -> None:
    assert {"fade_sglang.pool.tiered_store", "fade_sglang.patches.pool", "fade_sglang.eval.demo",
            "fade_sglang.kernels.dispatch"} <= set(MODULES)
    for mod in MODULES:
        _layer(mod)


@pytest.mark.parametrize("layer", ["core", "kernels"])
def test_core_and_kernels_import_no_sglang(layer: str) -> None:
    bad = {m: sorted(n for n in _imports(m) if n == "sglang" or n.startswith("sglang."))
           for m in MODULES if _layer(m) == layer}
    assert not {m: n for m, n in bad.items() if n}


def test_layers_import_only_downward() -> None:
    bad = [f"{m} ({_layer(m)}) -> {t} ({_layer(t)})" for m, targets in GRAPH.items() for t in targets
           if _layer(t) not in ALLOWED[_layer(m)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_a_cycle_and_a_layer_break() -> None:
    """The graph is real: known edges are present (so an empty result above is not a parsing failure)."""
    assert "fade_sglang.pool.tiered_store" in GRAPH["fade_sglang.patches.pool"]
    assert "fade_sglang.kernels.decode" in GRAPH["fade_sglang.kernels.dispatch"]
    assert "fade_sglang.eval.launcher" in GRAPH["fade_sglang.eval.demo"]
