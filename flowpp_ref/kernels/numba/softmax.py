"""numba kernels for the row softmax of self-attention and its backward, in place.

References (plain ``xp`` code): :func:`flowpp_ref.nn.attention.softmax_ref` and
:func:`flowpp_ref.nn.attention.softmax_backward_ref`. Inputs are C-contiguous 2-d views
``[N, T]`` (N = batch * heads * T query rows, T keys). Working in place keeps one
``[B, heads, T, T]`` buffer per attention layer instead of the several temporaries
that the NumPy expression allocates.

Each kernel has a serial and a parallel driver (rows split over numba's threads); the
caller picks the parallel one only for big arrays (:data:`PARALLEL_MIN_SIZE`), because
waking the thread pool costs more than a small softmax. The exp is the vectorisable one of
:mod:`flowpp_ref.kernels.numba.fastexp` (``np.exp`` in a numba loop is a libm call that does not
vectorise).
"""
from __future__ import annotations

import numba
import numpy as np

from flowpp_ref.kernels import NUMBA_OPTS, choose_threading_layer
from flowpp_ref.kernels.numba.fastexp import fast_exp

choose_threading_layer()

PARALLEL_MIN_SIZE = 1 << 16   # elements; below this the serial drivers run


@numba.njit(**NUMBA_OPTS)
def _softmax_row(s, i):
    """s[i] <- exp(s[i] - max s[i]) / sum_j exp(s[i, j] - max s[i])."""
    t = s.shape[1]
    m = s[i, 0]
    for j in range(1, t):
        if s[i, j] > m:
            m = s[i, j]
    z = 0.0
    for j in range(t):
        e = fast_exp(s[i, j] - m)            # vectorisable exp (fastexp.py)
        s[i, j] = e
        z += e
    inv = 1.0 / z
    for j in range(t):
        s[i, j] = s[i, j] * inv


@numba.njit(**NUMBA_OPTS)
def _softmax_backward_row(w, dw, i):
    """dw[i] <- w[i] * (dw[i] - sum_j dw[i, j] * w[i, j])  (dL/dS from dL/dW, W = softmax(S))."""
    t = w.shape[1]
    s = 0.0
    for j in range(t):
        s += dw[i, j] * w[i, j]
    for j in range(t):
        dw[i, j] = w[i, j] * (dw[i, j] - s)


@numba.njit(parallel=True, **NUMBA_OPTS)
def softmax_rows_parallel(s):
    for i in numba.prange(s.shape[0]):
        _softmax_row(s, i)


@numba.njit(**NUMBA_OPTS)
def softmax_rows_serial(s):
    for i in range(s.shape[0]):
        _softmax_row(s, i)


@numba.njit(parallel=True, **NUMBA_OPTS)
def softmax_backward_rows_parallel(w, dw):
    for i in numba.prange(w.shape[0]):
        _softmax_backward_row(w, dw, i)


@numba.njit(**NUMBA_OPTS)
def softmax_backward_rows_serial(w, dw):
    for i in range(w.shape[0]):
        _softmax_backward_row(w, dw, i)


def softmax_rows_inplace(s):
    """Softmax of every row of the 2-d array ``s``, in place."""
    (softmax_rows_parallel if s.size >= PARALLEL_MIN_SIZE else softmax_rows_serial)(s)


def softmax_backward_rows_inplace(w, dw):
    """``dw <- w * (dw - rowsum(dw * w))`` for 2-d arrays, in place on dw."""
    (softmax_backward_rows_parallel if w.size >= PARALLEL_MIN_SIZE else softmax_backward_rows_serial)(w, dw)
