"""Hot loops as kernels: numba on the CPU, CuPy on the GPU.

Each kernel sits behind a plain-array function elsewhere in the package (the
*reference*, written in ``xp`` code, which is the math a reader should study).
The public function dispatches:

* NumPy arrays and kernels enabled -> the numba kernel in ``kernels/numba/``;
* CuPy arrays -> a CuPy kernel (``kernels/cuda/``) where one exists, else the reference;
* kernels disabled (``FLOWPP_KERNELS=off`` or :func:`kernels_enabled` as a context
  manager) -> always the reference.

Tests compare every kernel with its reference. All numba kernels take their
options from :data:`NUMBA_OPTS` (``cache=True``; fastmath restricted to a subset
without ``nnan``/``ninf`` so that nan/inf behave as in NumPy).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import numba

from flowpp_ref.runtime.threads import foreign_libgomp

SAFE_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
NUMBA_OPTS = dict(cache=True, nogil=True, fastmath=SAFE_FASTMATH)

_state = {"enabled": os.environ.get("FLOWPP_KERNELS", "on").lower() not in ("0", "off", "false", "reference")}


def use_kernels() -> bool:
    """Whether the kernels (rather than the plain-array references) are used."""
    return _state["enabled"]


@contextlib.contextmanager
def kernels_enabled(flag: bool):
    """Temporarily force the kernels on or off: ``with kernels_enabled(False): ...``."""
    old = _state["enabled"]
    _state["enabled"] = bool(flag)
    try:
        yield
    finally:
        _state["enabled"] = old


def choose_threading_layer() -> None:
    """numba's threading layer for the ``parallel=True`` kernels.

    Called by the kernel modules that have parallel kernels, before their first launch. Respects
    a layer chosen by the user (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``).
    A training step launches hundreds of parallel loops, so the cost of a launch matters:
    OpenMP (libgomp) starts a parallel loop with its workers still spinning, while numba's
    workqueue layer puts its workers to sleep and wakes them at every launch. libgomp's idle
    workers spin for a long time by default, and on a few cores they and OpenBLAS's take the
    cores from each other between every matrix product and kernel. So:

    * OpenMP where libgomp loads and its spin is bounded: ``GOMP_SPINCOUNT`` or
      ``OMP_WAIT_POLICY`` is set, by the user or by :func:`flowpp_ref.runtime.threads.tune_threads`
      (which the ``flowpp`` command calls first). If another library loaded a libgomp before
      ``tune_threads`` set the variable (PyTorch does), numba's OpenMP pool is loaded with
      ``RTLD_DEEPBIND`` so that it uses its own libgomp, which reads the bounded spin as it loads;
      where that cannot be done, workqueue;
    * otherwise workqueue, which never spins (slower launches, but no fight over the cores).

    GNU OpenMP is not fork-safe: a process forked after the first parallel kernel (not exec'd)
    must not run parallel kernels; flowpp_ref forks nowhere.

    Called again after ``tune_threads`` (as :func:`flowpp_ref.training.loop.train` does), it revises
    its own earlier choice as long as numba has not started its threads.
    """
    ours = _state.get("layer") == numba.config.THREADING_LAYER
    if numba.config.THREADING_LAYER != "default" and not (ours and not _numba_threads_started()):
        return
    bounded_spin = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
    numba.config.THREADING_LAYER = "omp" if bounded_spin and _load_omppool() else "workqueue"
    _state["layer"] = numba.config.THREADING_LAYER


def _numba_threads_started() -> bool:
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return bool(getattr(parallel, "_is_initialized", True)) if parallel else False


_OMPPOOL = "numba.np.ufunc.omppool"


def _load_omppool() -> bool:
    """Import numba's OpenMP pool (deep-bound to its own libgomp if a foreign one came first);
    whether it is a GNU or Intel OpenMP whose spin the environment bounds."""
    if "omppool_ok" in _state:           # loaded here before (deep-bound or not): the same answer
        return _state["omppool_ok"]
    foreign = foreign_libgomp()
    if foreign and _OMPPOOL in sys.modules:
        return False                     # loaded before the spin was bounded, and bound as it was
    flags = sys.getdlopenflags()
    deep = bool(foreign) and hasattr(os, "RTLD_DEEPBIND")
    if foreign and not deep:
        return False
    try:
        if deep:
            sys.setdlopenflags(os.RTLD_NOW | os.RTLD_DEEPBIND)
        omppool = importlib.import_module(_OMPPOOL)
    except ImportError:
        return False
    finally:
        sys.setdlopenflags(flags)
    _state["omppool_ok"] = omppool.openmp_vendor in ("GNU", "Intel")
    return _state["omppool_ok"]
