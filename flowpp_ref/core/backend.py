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
caller; nothing in flowpp_ref draws from a global random state. A NumPy ``Generator``
given to a model on CuPy is adapted once, at the model's door (:func:`rng_for`): its
numbers are drawn on the host and copied to the device, so the same seed gives the same
noise on both backends (the training loop's data-dependent init uses this); a CuPy
generator given to a NumPy model is refused.
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


class HostDraws:
    """A NumPy ``Generator`` whose draws land on the backend ``xp`` (host draw, then one copy per call).

    The methods the models call (``random``, ``standard_normal``, ``integers``) with the NumPy
    signatures: the numbers are NumPy's, whichever backend uses them.
    """

    def __init__(self, gen: np.random.Generator, xp):
        self.gen, self.xp = gen, xp

    def random(self, size=None, dtype=np.float64):
        return asarray(self.gen.random(size, dtype=dtype), self.xp)

    def standard_normal(self, size=None, dtype=np.float64):
        return asarray(self.gen.standard_normal(size, dtype=dtype), self.xp)

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return asarray(self.gen.integers(low, high, size, dtype=dtype, endpoint=endpoint), self.xp)


def rng_for(rng, xp):
    """``rng`` made fit for a model on ``xp``: a NumPy ``Generator`` is wrapped in :class:`HostDraws`
    for CuPy; a CuPy generator for NumPy raises TypeError; anything else (a generator of the
    right backend, a keyed generator, ``None``) is returned as it is."""
    if isinstance(rng, np.random.Generator) and is_cupy(xp):
        return HostDraws(rng, xp)
    if HAVE_CUPY and xp is np and isinstance(rng, _cupy.random.Generator):
        raise TypeError("rng: a CuPy random Generator was given to a model on NumPy; pass "
                        "numpy.random.default_rng(seed) (or make_rng(seed, numpy))")
    return rng


def synchronize(xp) -> None:
    """Wait for queued GPU work (for timings); no-op on NumPy."""
    if is_cupy(xp):
        _cupy.cuda.get_current_stream().synchronize()
