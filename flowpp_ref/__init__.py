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

numba's parallel kernels run on its OpenMP threading layer (GNU libgomp) where that loads
(:func:`flowpp_ref.kernels.choose_threading_layer`). libgomp's idle workers spin 300,000
iterations by default before they sleep, competing with OpenBLAS the same way; unless the user
has set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT=3000`` is put in the
environment (read when libgomp loads). Measured on 2 cores (cpu-bench step, same run, median of
5 rounds): numba's workqueue layer 1.07 s; OpenMP with spin counts 1000 / 3000 / 10000 / 100000
0.965 / 0.952 / 0.994 / 1.25 s; ``OMP_WAIT_POLICY=passive`` 0.958 s; the default spin 1.58 s
(another run, against 1.41 s for workqueue). The variables set here are listed in
``ENV_SET_BY_IMPORT``.
"""
import os as _os
import sys as _sys

ENV_SET_BY_IMPORT = []
if "numpy" not in _sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in _os.environ:
    _os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    ENV_SET_BY_IMPORT.append("OPENBLAS_THREAD_TIMEOUT")
if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "3000"
    ENV_SET_BY_IMPORT.append("GOMP_SPINCOUNT")

__version__ = "0.1.0"
