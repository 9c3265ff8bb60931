"""How the CuPy kernels are built: one C++ source, two builds.

Every CUDA kernel of flowpp_ref is written as a per-element (or per-row) C++ template
function in a plain string, plus a table of entry points. The same text is built

* for the GPU (:func:`cuda_source`, :func:`RawModuleCache`): NVRTC through
  ``cupy.RawModule``; each entry point becomes a ``__global__`` kernel with one thread per
  work item ``i < n``;
* for the CPU (:func:`host_source`): an ordinary C++ file whose entry points loop over
  ``i`` — the tests compile it with the machine's C++ compiler and compare it with the
  plain-array references, so the kernels' math is checked where no GPU is present.

Entry-point tables map a name to ``(arguments, body)``; the arguments follow
``long long n`` and may use ``{T}`` (instantiated for float as ``_f32`` and double as
``_f64``); the body is the work of item ``i``.

Run on an H200 (NVRTC builds and launches of every module but the im2col / col2im entries of
:mod:`~flowpp_ref.kernels.cuda.layers`); without a GPU the tests compile the GPU build with NVRTC
(where libnvrtc loads) and ``nvcc`` (where installed).
"""
from __future__ import annotations

import numpy as np

CUDA_PRELUDE = r"""
#define FLOWPP_DEVICE __device__ __forceinline__
#define FLOWPP_INF __int_as_float(0x7f800000)
"""
HOST_PRELUDE = r"""
#include <cmath>
using std::exp; using std::expm1; using std::log; using std::log1p; using std::fabs;
using std::fmin; using std::fmax; using std::sqrt; using std::pow;
#define FLOWPP_DEVICE inline
#define FLOWPP_INF INFINITY
"""
TYPES = (("float", "f32"), ("double", "f64"))
THREADS = 256
RAWMODULE_OPTIONS = ("--std=c++11",)   # NVRTC options of every RawModule (tests compile with the same)


def wrappers(entries: dict, kind: str) -> str:
    out = []
    for name, (args, body) in entries.items():
        for T, suffix in TYPES:
            a, b = args.format(T=T), body.format(T=T)
            if kind == "cuda":
                out.append(f'extern "C" __global__ void {name}_{suffix}(long long n, {a}) {{\n'
                           f"    long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;\n"
                           f"    if (i < n) {{ {b} }}\n}}\n")
            elif kind == "host":
                out.append(f'extern "C" void {name}_{suffix}(long long n, {a}) {{\n'
                           f"    for (long long i = 0; i < n; ++i) {{ {b} }}\n}}\n")
            else:
                raise ValueError(kind)
    return "\n".join(out)


def cuda_source(element_source: str, entries: dict) -> str:
    """The CUDA translation unit given to NVRTC."""
    return CUDA_PRELUDE + element_source + wrappers(entries, "cuda")


def host_source(element_source: str, entries: dict) -> str:
    """The same code as a C++ file for the CPU (tests only)."""
    return HOST_PRELUDE + element_source + wrappers(entries, "host")


def suffix(dtype) -> str:
    d = np.dtype(dtype)
    if d == np.float32:
        return "f32"
    if d == np.float64:
        return "f64"
    raise TypeError(f"CUDA kernels take float32 or float64 arrays, got {d}")


class RawModuleCache:
    """Compiles a source with ``cupy.RawModule`` on first use and launches its kernels."""

    def __init__(self, source_fn):
        self._source_fn = source_fn
        self._module = None

    def module(self):
        if self._module is None:
            import cupy
            self._module = cupy.RawModule(code=self._source_fn(), options=RAWMODULE_OPTIONS)
        return self._module

    def launch(self, name: str, n: int, *args):
        """Run kernel ``name`` over ``n`` work items (arguments after n, as NumPy scalars / CuPy arrays)."""
        if n == 0:
            return
        f = self.module().get_function(name)
        f(((n + THREADS - 1) // THREADS,), (THREADS,), (np.int64(n), *args))
