"""Thread pools on the CPU: OpenBLAS (NumPy's matrix products) and numba's OpenMP kernels.

A training step alternates matrix products (OpenBLAS) with numba's parallel kernels. Both keep
idle worker threads spinning for a while before they sleep, and on a few cores those spinning
threads take the cores from the other pool. Two variables make the idle threads sleep at once:

* ``OPENBLAS_THREAD_TIMEOUT=4`` (OpenBLAS's default keeps them spinning for 2^28 cycles). OpenBLAS
  reads it when it loads, with NumPy. If NumPy is already loaded, :func:`tune_threads` has each
  OpenBLAS in the process read its environment again and stops its thread pool, which OpenBLAS
  restarts, with the new timeout, at its next threaded call (its own re-start after ``fork``).
  Measured on 2 cores: a ``small`` step is 1.4x slower with NumPy imported first and not re-tuned.
* ``GOMP_SPINCOUNT=3000`` (libgomp's default spin is 300,000 iterations); read when a libgomp
  loads. numba's OpenMP layer loads its libgomp at the first parallel kernel. If another library
  loaded a libgomp earlier (PyTorch does, into the global symbol scope), numba's calls would bind to
  that one, which read the default spin: :func:`tune_threads` records it, and
  :func:`flowpp_ref.kernels.choose_threading_layer` then loads numba's OpenMP pool with
  ``RTLD_DEEPBIND`` (Linux), so that it binds to its own libgomp, loaded after the variable was set.
  Measured on 2 cores: without both, a ``small`` step is 5.4x slower with ``import torch`` first.

:func:`tune_threads` sets the variables unless the user did (an explicit value, or ``OMP_WAIT_POLICY``
for the second). ``import flowpp_ref`` changes no environment variable: the ``flowpp`` command calls
:func:`tune_threads` before it imports NumPy, :func:`flowpp_ref.training.loop.train` calls it at its
start, and a script may do the same as its first lines (``import flowpp_ref; flowpp_ref.tune_threads()``).
:func:`thread_report` says what was done. It must not run while another thread is inside OpenBLAS.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_threads", "thread_report", "mapped_libraries", "retune_loaded_openblas"]

_state = {"openblas_retuned": [], "foreign_libgomp": []}


def mapped_libraries(fragment: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name contains ``fragment``
    (read from ``/proc/self/maps``; an empty list where that does not exist)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/") and fragment in os.path.basename(p))


def retune_loaded_openblas() -> list[str]:
    """Have every OpenBLAS in the process re-read its environment and stop its thread pool (restarted
    at its next threaded call, with the environment's ``OPENBLAS_THREAD_TIMEOUT``). Returns the file
    names of the libraries re-tuned: those exporting ``openblas_read_env`` and ``blas_thread_shutdown_``
    (OpenBLAS 0.3.x, as NumPy's and SciPy's wheels ship it)."""
    done = []
    for path in mapped_libraries("openblas"):
        try:
            lib = ctypes.CDLL(path)           # already loaded: the same handle, no second copy
            read_env, shutdown = lib.openblas_read_env, lib.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        read_env()
        shutdown()
        done.append(os.path.basename(path))
    return done


def tune_threads() -> list[str]:
    """Set the thread-pool variables above where the user has not set them, and make them take effect
    in libraries already loaded (module docstring). Returns the names of the variables it set (an
    empty list if none)."""
    changed = []
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
        changed.append("OPENBLAS_THREAD_TIMEOUT")
        if "numpy" in sys.modules:        # its OpenBLAS read the environment when it loaded
            _state["openblas_retuned"] = retune_loaded_openblas()
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "3000"
        changed.append("GOMP_SPINCOUNT")
        _state["foreign_libgomp"] = mapped_libraries("libgomp")   # loaded before the spin was bounded
    return changed


def foreign_libgomp() -> list[str]:
    """The libgomp libraries that were loaded before :func:`tune_threads` bounded the spin."""
    return list(_state["foreign_libgomp"])


def thread_report() -> dict:
    """What :func:`tune_threads` did to libraries already loaded: ``openblas_retuned`` (file names) and
    ``foreign_libgomp`` (paths of libgomp loaded before it, which numba's OpenMP pool is kept from)."""
    return {"openblas_retuned": list(_state["openblas_retuned"]),
            "foreign_libgomp": list(_state["foreign_libgomp"])}
