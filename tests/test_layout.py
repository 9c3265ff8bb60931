"""The package's shape, checked from its source: no import cycle, internal imports at the top of
each module (function-level imports only for optional dependencies), no function over 80 lines
outside ``kernels/``, no project history in the package."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "flowpp_ref")

# Function-level imports that are allowed, and why: optional dependencies (CuPy, mpi4py, numba's
# OpenMP pool), the entry point that must tune the thread pools before NumPy loads, heavy plotting
# libraries loaded only to draw.
LAZY_OK = {
    "cupy": "optional: the GPU backend", "mpi4py": "optional: distributed runs",
    "numba.np.ufunc": "optional: numba's OpenMP pool may be missing",
    "PIL": "loaded only to decode or write images", "matplotlib": "loaded only to draw",
    "tqdm": "loaded only when a progress bar is shown",
    "safetensors": "optional: weights files (the weights extra)",
}
LAZY_OK_IN = {("flowpp_ref.cli", "flowpp_ref.cli.commands"): "the CLI tunes the thread pools before NumPy loads"}


def _modules():
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _tree(path):
    with open(path) as f:
        return ast.parse(f.read())


def _imported(node, modules):
    """flowpp_ref modules an import statement loads (a `from pkg import mod` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    base = node.module or ""
    out = [base] if base in modules else []
    out += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return out


def test_no_import_cycle_between_modules():
    graph = {}
    for mod, path in MODULES.items():
        deps = set()
        for node in _tree(path).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _imported(node, MODULES) if d != mod)
        graph[mod] = deps
    pkg_inits = {m for m, p in MODULES.items() if p.endswith("__init__.py")}
    # a package's __init__ re-exporting its own submodules is not a cycle: drop parent -> child edges
    for m in pkg_inits:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_internal_imports_are_at_the_top():
    bad = []
    for mod, path in sorted(MODULES.items()):
        tree = _tree(path)
        in_functions = [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f)]
        for node in in_functions:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if any(name == k or name.startswith(k + ".") for k in LAZY_OK):
                    continue
                if any((mod, name) == k or (mod, f"{name}.{a.name}") == k for k in LAZY_OK_IN for a in node.names):
                    continue
                bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {name} inside a function")
    assert not bad, "\n".join(bad)


def test_no_function_over_80_lines_outside_kernels():
    long = []
    for mod, path in sorted(MODULES.items()):
        if ".kernels" in mod:
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


# "issue N", the benchmark diary and files a user of the package does not have
HISTORY = re.compile(r"(?i:\bissues? #?\d+|DESIGN\.md|STYLE\.md|RESULTS\.md|HISTORY\.md|tried and not kept)"
                     r"|\bruns? [A-R](?:\b| and [A-R]\b)")


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_project_history_in_the_package(mod):
    with open(MODULES[mod]) as f:
        hits = [f"{i}: {line.strip()}" for i, line in enumerate(f, 1) if HISTORY.search(line)]
    assert not hits, "\n".join(hits)
