"""flowpp-ref: Flow++ (Ho et al., 2019) with every derivative written by hand.

Array code for NumPy (hot loops in numba) and CuPy; no autograd library.
See README.md for the map from the paper to the modules.

OpenBLAS's idle threads: after each matmul, OpenBLAS (NumPy's BLAS here) keeps its worker
threads spinning for 2^28 cycles before they sleep, and they then compete for the cores with
numba's parallel kernels, which run between the matmuls of every layer. When ``flowpp_ref`` is
imported before NumPy has loaded OpenBLAS (the ``flowpp`` command, a script that imports it
first) and the user has not set it, ``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles: the threads sleep
at once) is put in the environment; measured on 2 cores, the ``cpu-bench`` training step went
from 1.85-1.99 s to 1.57-1.66 s (benchmarks/RESULTS.md). Nothing else about OpenBLAS is changed,
and an explicit value of the user's is kept.
"""
import os as _os
import sys as _sys

if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
