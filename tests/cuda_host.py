"""Build a CUDA kernel source's CPU twin (``cuda_build.host_source``) and call it through ctypes."""
import ctypes
import shutil
import subprocess

import numpy as np

CXX = shutil.which("g++") or shutil.which("c++")
NO_CXX = "no C++ compiler (g++/c++) on PATH to build the CUDA kernels' source for the CPU"


def build_host_library(source: str, directory, name: str):
    src, so = directory / f"{name}.cpp", directory / f"{name}.so"
    src.write_text(source)
    r = subprocess.run([CXX, "-O2", "-std=c++11", "-shared", "-fPIC", str(src), "-o", str(so)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"the kernels' source does not compile as C++:\n{r.stderr}"
    return ctypes.CDLL(str(so))


def nvcc_compile(source: str, directory, name: str):
    """Compile the GPU build to device code with nvcc (no GPU needed); returns (ok, stderr)."""
    src = directory / f"{name}.cu"
    src.write_text(source)
    r = subprocess.run(["nvcc", "-std=c++11", "-c", str(src), "-o", str(directory / f"{name}.o")],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stderr


def call(lib, name, n, *args):
    """lib.name(n, *args): NumPy arrays (C-contiguous) as pointers, np.float64 / np.int32 / np.int64 as scalars."""
    conv = []
    for a in args:
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous
            conv.append(ctypes.c_void_p(a.ctypes.data))
        elif isinstance(a, np.float64):
            conv.append(ctypes.c_double(float(a)))
        elif isinstance(a, np.int32):
            conv.append(ctypes.c_int(int(a)))
        elif isinstance(a, np.int64):
            conv.append(ctypes.c_longlong(int(a)))
        else:
            raise TypeError(type(a))
    getattr(lib, name)(ctypes.c_longlong(n), *conv)


def suffix(dtype):
    return "f32" if np.dtype(dtype) == np.float32 else "f64"
