"""Every CuPy API that flowpp_ref calls exists in the installed CuPy, with the keywords used.

Needs CuPy installed (the ``gpu`` extra) but no GPU and no driver: CuPy's wheel imports
without one. The calls are collected from the source of ``flowpp_ref/`` (its AST):

* **module calls and attributes**: ``xp.<name>``, ``xp.<sub>.<name>`` (``xp.linalg.inv``,
  ``xp.random.Generator``), where the module is ``xp``, ``self.xp`` / ``self._xp``,
  ``array_module(...)`` / ``get_xp(...)``, or ``cupy`` / ``_cupy`` / ``cp`` themselves;
* **array methods**: ``<expr>.<m>(...)`` for every public method ``m`` of ``numpy.ndarray``
  (``.astype``, ``.sum``, ``.reshape``, ...), whatever the receiver, except receivers built
  by ``np.<...>(...)`` (host arrays by construction);
* **random-generator methods**: ``<expr>.<m>(...)`` for every public method ``m`` of
  ``numpy.random.Generator``, except on generators proven to live on the host: built in
  the same function by ``np.random.default_rng(...)`` / ``_host_rng(...)``, or listed in
  :data:`HOST_RNG_FUNCTIONS` with the reason.

Each use is checked against CuPy: the attribute exists, and the call binds to the
callable's signature (positional count and keyword names). Signatures come from
``inspect.signature`` where CuPy provides one (Python functions), else from the first
line of the docstring, which Cython embeds for ``cupy.ndarray`` methods, ``cupy.ufunc``
objects (``exp(x, /, out=None, *, casting='same_kind', dtype=None)``) and
``cupy.random.Generator`` methods; Cython type words (``int axis=-1``) are dropped.

What this cannot check (say so, don't pretend): calls through ``getattr(xp, name)``;
NumPy functions applied to device arrays (``np.foo(cupy_array)``, which CuPy serves via
``__array_function__`` / ``__array_ufunc__`` or refuses at run time); methods on receivers
whose type is not visible in the source beyond the method name; semantics (CuPy reductions
return 0-d device arrays where NumPy returns scalars; dtype promotion of Python scalars);
the values and the launches of the CUDA kernels. Those need the GPU machine
(``benchmarks/gpu_check.py``).

The CUDA sources (every ``flowpp_ref.kernels.cuda`` module with an argument-free ``cuda_source()``) are
compiled here too: with NVRTC, the compiler CuPy's ``RawModule`` uses (where libnvrtc can
be loaded; it needs no GPU either), and with ``nvcc`` where it is on PATH.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'flowpp-ref[gpu]')")

PKG = Path(__file__).resolve().parents[1] / "flowpp_ref"

MODULE_NAMES = {"xp", "cupy", "_cupy", "cp"}
MODULE_FACTORIES = {"array_module", "get_xp"}
HOST_MODULES = {"np", "numpy", "math", "os", "sys", "json", "time", "pickle", "io", "ctypes", "numba",
                "tarfile", "hashlib", "shutil", "tempfile", "urllib", "subprocess", "warnings", "re"}
HOST_RNG_FACTORIES = {"np.random.default_rng", "numpy.random.default_rng", "_host_rng", "np.random.Generator"}
ARRAY_METHODS = {m for m in dir(np.ndarray) if not m.startswith("_") and callable(getattr(np.ndarray, m))}
GENERATOR_METHODS = {m for m in dir(np.random.Generator)
                     if not m.startswith("_") and callable(getattr(np.random.Generator, m))}

# (file relative to flowpp_ref/, function) -> why its generator calls are host-only
HOST_RNG_FUNCTIONS = {
    ("bijections/pointwise.py", "__init__"):
        "raises TypeError unless rng is a host np.random.Generator; W0 is drawn on the host, then asarray",
    ("datasets/common.py", "iterate_batches"):
        "batch order: documented (and checked) to take a host np.random.Generator; the images stay on the host",
}


@dataclass
class Use:
    kind: str            # "module-call", "module-attr", "array-method", "generator-method"
    name: str            # "linalg.inv", "sum", "standard_normal"
    where: str           # "file.py:123 (function)"
    nargs: int = 0
    keywords: tuple = ()
    star: bool = False   # *args or **kwargs at the call: only keyword names are checked
    func: str = ""
    file: str = ""


@dataclass
class Report:
    problems: list = field(default_factory=list)
    unchecked: list = field(default_factory=list)   # (use, why)
    checked: int = 0


# ------------------------------------------------------------------ collection
def _module_path(node):
    """['linalg', 'inv'] for xp.linalg.inv, [] for the module itself, None if not the array module."""
    if isinstance(node, ast.Name):
        return [] if node.id in MODULE_NAMES else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in MODULE_FACTORIES:
        return []
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in ("xp", "_xp"):
            return []
        base = _module_path(node.value)
        return None if base is None else base + [node.attr]
    return None


def _dotted(node):
    try:
        return ast.unparse(node)
    except Exception:
        return ""


def _is_host_expr(node):
    """An expression built by a host module's function (np.zeros(...).sum(), math...)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    if isinstance(node, ast.Call):
        f = node.func
        while isinstance(f, ast.Attribute):
            f = f.value
        return isinstance(f, ast.Name) and f.id in HOST_MODULES
    return isinstance(node, ast.Name) and node.id in HOST_MODULES


class _Collector(ast.NodeVisitor):
    def __init__(self, file):
        self.file, self.uses, self.funcs, self.host_rngs = file, [], ["<module>"], [set()]

    def _where(self, node):
        return f"{self.file}:{node.lineno} ({self.funcs[-1]})"

    def visit_FunctionDef(self, node):
        host = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and _dotted(n.value.func) in HOST_RNG_FACTORIES:
                host |= {t.id for t in n.targets if isinstance(t, ast.Name)}
        self.funcs.append(node.name)
        self.host_rngs.append(host)
        self.generic_visit(node)
        self.funcs.pop()
        self.host_rngs.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node):
        path = _module_path(node)
        if path:
            self.uses.append(Use("module-attr", ".".join(path), self._where(node), func=self.funcs[-1], file=self.file))
            return   # the prefixes (xp.linalg of xp.linalg.inv) are implied
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute):
            star = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            common = dict(where=self._where(node), nargs=len(node.args),
                          keywords=tuple(k.arg for k in node.keywords if k.arg), star=star,
                          func=self.funcs[-1], file=self.file)
            path = _module_path(f)
            if path:
                self.uses.append(Use("module-call", ".".join(path), **common))
                for a in [*node.args, *node.keywords]:     # not node.func: its attribute is this call
                    self.visit(a)
                return
            if not _is_host_expr(f.value) and _module_path(f.value) is None:
                recv = f.value
                host_rng = (isinstance(recv, ast.Name) and recv.id in self.host_rngs[-1]) or (
                    isinstance(recv, ast.Call) and _dotted(recv.func) in HOST_RNG_FACTORIES) or (
                    (self.file, self.funcs[-1]) in HOST_RNG_FUNCTIONS)
                if f.attr in GENERATOR_METHODS and not host_rng:
                    self.uses.append(Use("generator-method", f.attr, **common))
                elif f.attr in ARRAY_METHODS:
                    self.uses.append(Use("array-method", f.attr, **common))
        self.generic_visit(node)


def collect_uses(source: str, file: str = "<snippet>"):
    c = _Collector(file)
    c.visit(ast.parse(textwrap.dedent(source)))
    return c.uses


def collect_package_uses(root: Path = PKG):
    uses = []
    for p in sorted(root.rglob("*.py")):
        uses += collect_uses(p.read_text(), str(p.relative_to(root)))
    return uses


# ------------------------------------------------------------------ checking
def _split_top(s):
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def signature_from_doc(obj):
    """The signature in the first docstring line that Cython embeds ('name(self, a, int b=1) -> T'), or None."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    if not doc:
        return None
    first = doc.splitlines()[0].replace("\\*", "*")
    m = re.match(r"^[\w.]*\((.*)\)\s*(->.*)?$", first)
    if not m:
        return None
    params = []
    for i, p in enumerate(_split_top(m.group(1))):
        p = p.strip()
        if p in ("/", "*") or p.startswith("**"):
            params.append(p)
            continue
        if p.startswith("*"):
            params.append("*" + p[1:].split()[-1])
            continue
        name, eq, _ = p.partition("=")
        name = name.split()[-1] if name.split() else name
        if i == 0 and name == "self":
            continue
        params.append(f"{name}=None" if eq else name)
    ns = {}
    try:
        exec(f"def _f({', '.join(params)}): pass", ns)
    except SyntaxError:
        return None
    return inspect.signature(ns["_f"])


def cupy_signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return signature_from_doc(obj)


def _resolve(root, dotted):
    obj = root
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return None, part
        obj = getattr(obj, part)
    return obj, None


def check_uses(uses, xp=None) -> Report:
    xp = cupy if xp is None else xp
    roots = {"module-call": xp, "module-attr": xp, "array-method": xp.ndarray,
             "generator-method": xp.random.Generator}
    labels = {"module-call": "cupy.", "module-attr": "cupy.", "array-method": "cupy.ndarray.",
              "generator-method": "cupy.random.Generator."}
    rep = Report()
    for u in uses:
        obj, missing = _resolve(roots[u.kind], u.name)
        label = labels[u.kind] + u.name
        if obj is None:
            rep.problems.append(f"{u.where}: {label} does not exist in CuPy {xp.__version__} (no {missing!r})")
            continue
        if u.kind == "module-attr":
            rep.checked += 1
            continue
        sig = cupy_signature(obj)
        if sig is None:
            rep.unchecked.append((u, f"{label}: no signature (inspect or docstring)"))
            continue
        has_varkw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        try:
            if u.star:
                bad = [k for k in u.keywords if k not in sig.parameters and not has_varkw]
                if bad:
                    raise TypeError(f"unexpected keyword(s) {bad}")
            else:
                sig.bind(*([None] * u.nargs), **{k: None for k in u.keywords})
        except TypeError as e:
            rep.problems.append(f"{u.where}: {label}{sig} does not accept {u.nargs} positional argument(s) "
                                f"and keywords {list(u.keywords)}: {e}")
            continue
        rep.checked += 1
    return rep


# ------------------------------------------------------------------ tests
def test_flowpp_ref_calls_only_cupy_apis_that_exist_with_those_keywords():
    uses = collect_package_uses()
    kinds = {u.kind for u in uses}
    assert {"module-call", "array-method", "generator-method"} <= kinds, kinds   # the collector found them
    rep = check_uses(uses)
    assert not rep.problems, "CuPy API mismatches:\n" + "\n".join(rep.problems)
    # what could not be checked is listed, and stays small (ufuncs and Cython methods parse from their docs)
    assert len(rep.unchecked) <= 5, "\n".join(f"{u.where}: {why}" for u, why in rep.unchecked)
    assert rep.checked >= 0.95 * len(uses)


def test_host_rng_allowlist_is_not_stale():
    """Every HOST_RNG_FUNCTIONS entry still names a function that calls a generator method."""
    for (file, func), _ in HOST_RNG_FUNCTIONS.items():
        tree = ast.parse((PKG / file).read_text())
        fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func]
        assert fns, f"{file}: no function {func}"
        calls = [n for f in fns for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr in GENERATOR_METHODS]
        assert calls, f"{file}:{func} no longer calls a generator method; drop it from HOST_RNG_FUNCTIONS"


SNIPPET = """
import numpy as np
from flowpp_ref.core.backend import array_module

def f(x, rng):
    xp = array_module(x)
    a = xp.frobnicate(x)                       # no such function
    b = xp.sum(x, axis=0, bogus=True)          # no such keyword
    c = xp.exp(x, out=x)                        # ufunc keyword: fine
    d = xp.linalg.inv(x) + xp.linalg.nosuch(x) # submodule attribute missing
    e = x.sum(axis=1, keepdims=True).astype(xp.float32, copy=False)   # fine
    g = x.reshape(2, -1, order="C").max(initial=0)                    # ndarray.max has no initial= in CuPy
    h = rng.normal(0.0, 1.0, size=x.shape)     # cupy.random.Generator has no normal()
    i = rng.standard_normal(x.shape, dtype=x.dtype)                   # fine
    host = np.random.default_rng(0)
    j = host.normal(0.0, 1.0)                  # host generator: not checked
    k = np.zeros(3).tofile                     # host array: not checked
    return xp.float32, xp.not_a_dtype
"""


def test_the_check_fails_on_calls_that_cupy_lacks():
    rep = check_uses(collect_uses(SNIPPET))
    text = "\n".join(rep.problems)
    for needle in ("cupy.frobnicate", "bogus", "cupy.linalg.nosuch", "initial", "cupy.random.Generator.normal",
                   "cupy.not_a_dtype"):
        assert needle in text, (needle, text)
    assert len(rep.problems) == 6, text
    for fine in ("cupy.exp", "cupy.ndarray.astype", "cupy.ndarray.sum", "Generator.standard_normal", "host"):
        assert fine not in text, (fine, text)


def test_signatures_parse_from_cython_docstrings():
    assert list(cupy_signature(cupy.ndarray.sum).parameters) == ["axis", "dtype", "out", "keepdims"]
    assert "axis" in cupy_signature(cupy.ndarray.partition).parameters        # 'int axis=-1'
    ufunc = cupy_signature(cupy.exp)
    assert "out" in ufunc.parameters and "dtype" in ufunc.parameters
    assert "size" in cupy_signature(cupy.random.Generator.standard_normal).parameters


# ------------------------------------------------------------------ CUDA sources
def _cuda_modules():
    import flowpp_ref.kernels.cuda as k
    mods = []
    for info in pkgutil.iter_modules(k.__path__):
        m = importlib.import_module(f"flowpp_ref.kernels.cuda.{info.name}")
        fn = getattr(m, "cuda_source", None)
        if callable(fn) and not [p for p in inspect.signature(fn).parameters.values()
                                 if p.default is p.empty]:   # build.cuda_source(text, entries) is the builder
            mods.append(m)
    return mods


CUDA_MODULES = _cuda_modules()


def test_cuda_sources_are_found():
    names = {m.__name__.rsplit(".", 1)[1] for m in CUDA_MODULES}
    assert {"mixlogistic", "layers", "attention"} <= names, names


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.parametrize("mod", CUDA_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_cuda_source_compiles_with_nvrtc(mod):
    """The exact text RawModule gets, compiled by NVRTC with RawModule's options (no GPU needed)."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc cannot be loaded (pip install nvidia-cuda-nvrtc, or a CUDA toolkit)")
    from flowpp_ref.kernels.cuda.build import RAWMODULE_OPTIONS
    prog = nvrtc.createProgram(mod.cuda_source(), "kernels.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [*RAWMODULE_OPTIONS, "-arch=compute_90"])
    except Exception as e:
        pytest.fail(f"NVRTC: {e}\n{nvrtc.getProgramLog(prog)}")
    assert len(nvrtc.getPTX(prog)) > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA compiler) not on PATH")
@pytest.mark.parametrize("mod", CUDA_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_cuda_source_compiles_with_nvcc(mod, tmp_path):
    from cuda_host import nvcc_compile
    ok, err = nvcc_compile(mod.cuda_source(), tmp_path, mod.__name__.rsplit(".", 1)[1])
    assert ok, err


def test_nvrtc_check_fails_on_a_broken_source():
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc cannot be loaded (pip install nvidia-cuda-nvrtc, or a CUDA toolkit)")
    prog = nvrtc.createProgram('extern "C" __global__ void k(float* x) { x[0] = no_such_fn(1.0f); }', "k.cu", [], [])
    with pytest.raises(Exception):
        nvrtc.compileProgram(prog, ["--std=c++11", "-arch=compute_90"])
    assert "no_such_fn" in nvrtc.getProgramLog(prog)
