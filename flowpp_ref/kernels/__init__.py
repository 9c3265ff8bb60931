"""Hot loops as kernels: numba on the CPU, CuPy on the GPU.

Each kernel sits behind a plain-array function elsewhere in the package (the
*reference*, written in ``xp`` code, which is the math a reader should study).
The public function dispatches:

* NumPy arrays and kernels enabled -> the numba kernel in ``kernels/numba_*.py``;
* CuPy arrays -> a CuPy kernel where one exists, else the reference;
* kernels disabled (``FLOWPP_KERNELS=off`` or :func:`kernels_enabled` as a context
  manager) -> always the reference.

Tests compare every kernel with its reference. All numba kernels take their
options from :data:`NUMBA_OPTS` (``cache=True``; fastmath restricted to a subset
without ``nnan``/``ninf`` so that nan/inf behave as in NumPy).
"""
from __future__ import annotations

import contextlib
import os

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


def prefer_workqueue_threading() -> None:
    """Use numba's own "workqueue" threading layer for ``parallel=True`` kernels.

    Called by the kernel modules that have parallel kernels, before their first launch.
    With the OpenMP layer, its spinning worker threads and OpenBLAS's (NumPy's matmuls)
    fight over the cores between every matmul and kernel: a coupling-layer step ran 2.5x
    slower on 2 cores. Respects a layer chosen by the user (``NUMBA_THREADING_LAYER`` or
    ``numba.config.THREADING_LAYER``). The workqueue layer must not be entered from two
    Python threads at once.
    """
    import numba
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"
