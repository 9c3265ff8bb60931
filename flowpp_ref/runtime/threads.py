"""Thread pools on the CPU: OpenBLAS (NumPy's matrix products) and numba's OpenMP kernels.

A training step alternates matrix products (OpenBLAS) with numba's parallel kernels. Both keep
idle worker threads spinning for a while before they sleep, and on a few cores those spinning
threads take the cores from the other pool. Two variables, each read once when its library
loads, make the idle threads sleep at once:

* ``OPENBLAS_THREAD_TIMEOUT=4`` (OpenBLAS's default keeps them spinning for 2^28 cycles);
  read when NumPy loads OpenBLAS, so it only takes effect if set before NumPy is imported;
* ``GOMP_SPINCOUNT=3000`` (libgomp's default spin is 300,000 iterations); read when numba
  loads its OpenMP threading layer (at the first parallel kernel).

:func:`tune_threads` sets them unless the user did (an explicit value, or ``OMP_WAIT_POLICY``
for the second). ``import flowpp_ref`` changes no environment variable: the ``flowpp`` command
calls :func:`tune_threads` before it imports NumPy, and a script may do the same as its first
lines (``import flowpp_ref; flowpp_ref.tune_threads()``).
"""
from __future__ import annotations

import os
import sys

__all__ = ["tune_threads"]


def tune_threads() -> list[str]:
    """Set the thread-pool variables above where they can still take effect and the user has
    not set them; returns the names of the variables it set (an empty list if none)."""
    changed = []
    if "numpy" not in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
        changed.append("OPENBLAS_THREAD_TIMEOUT")
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "3000"
        changed.append("GOMP_SPINCOUNT")
    return changed
