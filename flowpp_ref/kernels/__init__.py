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
