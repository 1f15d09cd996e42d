"""The package's import graph: each layer imports only the layers below it, with no circle, and the
library never imports the experiment runner (function-local imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
#: layers from the bottom up; a module may import its own layer and those below
LAYERS = [
    {
        "multifi.errors",
        "multifi.units",
        "multifi.validation",
        "multifi.files",
        "multifi.logs",
        "multifi.ranks",
        "multifi.devices",
        "multifi.allocator",
        "multifi.keys",
        "multifi",
    },
    {"multifi.config"},
    {"multifi.data"},
    {"multifi.nn"},
    {"multifi.models"},
    {"multifi.train"},
    {
        "multifi.predict",
        "multifi.calculator",
        "multifi.aot",
        "multifi.scripted",
        "multifi.deploy",
        "multifi.card",
        "multifi.plots",
        "multifi.config_reference",
        "multifi.uncertainty",
        "multifi.select",
        "multifi.trained_on",
        "multifi.evaluation",
    },
    {"multifi.cli", "multifi.demo"},
    {"multifi_experiments"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every multifi / multifi_experiments module `path` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("multifi", "multifi_experiments")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        # an imported name resolves to the longest module prefix that exists
        edges[name] = {next(m for m in _prefixes(i) if m in files) for i in imports_of(path)} - {name}
    return edges


def _prefixes(name: str):
    parts = name.split(".")
    return (".".join(parts[:k]) for k in range(len(parts), 0, -1))


def layer_of(module: str) -> int:
    for k in range(len(LAYERS) - 1, -1, -1):
        if (
            any(module == top or module.startswith(top + ".") for top in LAYERS[k] if top != "multifi")
            or module in LAYERS[k]
        ):
            return k
    raise AssertionError(f"{module}: in no layer of tests/test_layering.py; add it")


def test_every_import_points_down_or_sideways():
    """(The package root `multifi` is the public facade: its lazy `multifi.Calculator` is not an arrow.)"""
    upward = [f"{a} → {b}" for a, bs in graph().items() for b in bs if layer_of(b) > layer_of(a) and a != "multifi"]
    assert upward == []


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_library_knows_no_experiment():
    library = [p for p in (SRC / "multifi").rglob("*.py")]
    assert not [str(p) for p in library if any(i.startswith("multifi_experiments") for i in imports_of(p))]
    import re

    claim = re.compile(r"\bclaims?\b|Oerder", re.IGNORECASE)
    assert not [str(p) for p in library if claim.search(p.read_text())]


def test_import_sets_only_a_passive_openmp_wait_and_keeps_a_users_value():
    import os
    import subprocess
    import sys

    code = "import os, multifi; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in __import__('sys').modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]  # set before torch loads; torch not imported by the package
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "ACTIVE"
