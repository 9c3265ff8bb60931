"""One array code for NumPy and CuPy.

Every function in flowpp_ref is written against an array module ``xp`` that is
either :mod:`numpy` or :mod:`cupy`. The backend is chosen explicitly:

* by argument: ``get_xp("cupy")``, or the ``xp=`` / ``backend=`` arguments of the
  model constructors and the CLI's ``--backend``;
* by environment variable: ``FLOWPP_BACKEND=numpy|cupy`` (default ``numpy``).

Inside a computation, the module is recovered from the arrays themselves with
:func:`array_module`, so a layer never mixes host and device arrays.

Dtype policy: float32 for training (``DEFAULT_DTYPE``), float64 for every
derivative check (the tests pass ``dtype=np.float64`` explicitly).

Randomness: a seeded ``xp.random.Generator`` (:func:`make_rng`) is passed by the
caller; nothing in flowpp_ref draws from a global random state.
"""
from __future__ import annotations

import os

import numpy as np

DEFAULT_DTYPE = np.float32
BACKENDS = ("numpy", "cupy")

try:  # CuPy is optional (the ``gpu`` extra).
    import cupy as _cupy  # noqa: F401

    HAVE_CUPY = True
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None
    HAVE_CUPY = False


class BackendError(RuntimeError):
    """The requested array backend is unknown or not available on this machine."""


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if not HAVE_CUPY:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(name: str | None = None):
    """Return the array module for ``name`` (or ``$FLOWPP_BACKEND``, default numpy)."""
    if name is None:
        name = os.environ.get("FLOWPP_BACKEND", "numpy")
    if not isinstance(name, str):  # already a module
        if name in (np,) or (HAVE_CUPY and name is _cupy):
            return name
        raise BackendError(f"expected a backend name in {BACKENDS} or the numpy/cupy module, got {name!r}")
    name = name.lower()
    if name == "numpy":
        return np
    if name == "cupy":
        if not HAVE_CUPY:
            raise BackendError("backend 'cupy' requested but CuPy is not installed "
                               "(pip install 'flowpp-ref[gpu]')")
        if not gpu_available():
            raise BackendError("backend 'cupy' requested but no CUDA device is visible")
        return _cupy
    raise BackendError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def array_module(*arrays):
    """numpy or cupy, whichever owns the arrays (numpy for scalars and None)."""
    if HAVE_CUPY:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def is_cupy(xp) -> bool:
    return HAVE_CUPY and xp is _cupy


def to_numpy(a):
    """Host copy of an array (no-op for NumPy arrays); scalars become NumPy scalars."""
    if HAVE_CUPY and isinstance(a, _cupy.ndarray):
        return a.get()
    return np.asarray(a)


def asarray(a, xp, dtype=None):
    """Move ``a`` onto the backend ``xp`` (host -> device when xp is cupy)."""
    if is_cupy(xp):
        return _cupy.asarray(a, dtype=dtype)
    return np.asarray(to_numpy(a), dtype=dtype)


def make_rng(seed, xp=np):
    """A seeded random Generator of the backend ``xp``."""
    if is_cupy(xp):
        return _cupy.random.default_rng(seed)
    return np.random.default_rng(seed)


def synchronize(xp) -> None:
    """Wait for queued GPU work (for timings); no-op on NumPy."""
    if is_cupy(xp):
        _cupy.cuda.get_current_stream().synchronize()
