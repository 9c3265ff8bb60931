"""numba kernels for layer norm over the last axis (forward and backward, fused).

References (the math, plain ``xp`` code): :func:`flowpp_ref.nn.layernorm.layernorm_forward_ref`
and :func:`flowpp_ref.nn.layernorm.layernorm_backward_ref`. Inputs are 2-d views ``[N, C]``
(rows = every position, C = channels).

Row statistics are accumulated in float64 whatever the input dtype (the reference
uses NumPy's pairwise float32 sums; the two agree to float32 round-off).

Each kernel has a serial and a parallel driver (rows split over numba's threads); the
callers pick the parallel one only for arrays of at least :data:`PARALLEL_MIN_SIZE`
elements, because waking the thread pool costs more than a small layer norm.
"""
from __future__ import annotations

import numba
import numpy as np

from flowpp_ref.kernels import NUMBA_OPTS, choose_threading_layer

choose_threading_layer()

PARALLEL_MIN_SIZE = 1 << 16


@numba.njit(**NUMBA_OPTS)
def _forward_row(x, g, b, eps, out, xhat, rstd, i):
    """out[i] = (x[i] - mean_i) * rstd_i * g + b;  writes out[i], xhat[i], rstd[i]."""
    c = x.shape[1]
    m = 0.0
    for j in range(c):
        m += x[i, j]
    m /= c
    v = 0.0
    for j in range(c):
        d = x[i, j] - m
        v += d * d
    v /= c
    r = 1.0 / np.sqrt(v + eps)
    rstd[i] = r
    for j in range(c):
        h = (x[i, j] - m) * r
        xhat[i, j] = h
        out[i, j] = h * g[j] + b[j]


@numba.njit(**NUMBA_OPTS)
def _backward_rows(dout, xhat, rstd, g, dx, dg_row, db_row, lo, hi):
    """Rows lo..hi: dx = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat)), dxh = dout * g;
    adds sum_i dout * xhat to dg_row and sum_i dout to db_row."""
    c = dout.shape[1]
    for i in range(lo, hi):
        s1 = 0.0
        s2 = 0.0
        for j in range(c):
            d = dout[i, j]
            h = xhat[i, j]
            dh = d * g[j]
            s1 += dh
            s2 += dh * h
            dg_row[j] += d * h
            db_row[j] += d
        s1 /= c
        s2 /= c
        r = rstd[i]
        for j in range(c):
            dx[i, j] = r * (dout[i, j] * g[j] - s1 - xhat[i, j] * s2)


@numba.njit(parallel=True, **NUMBA_OPTS)
def layernorm_forward_parallel(x, g, b, eps, out, xhat, rstd):
    for i in numba.prange(x.shape[0]):
        _forward_row(x, g, b, eps, out, xhat, rstd, i)


@numba.njit(**NUMBA_OPTS)
def layernorm_forward_serial(x, g, b, eps, out, xhat, rstd):
    for i in range(x.shape[0]):
        _forward_row(x, g, b, eps, out, xhat, rstd, i)


@numba.njit(parallel=True, **NUMBA_OPTS)
def layernorm_backward_parallel(dout, xhat, rstd, g, dx, dg_part, db_part):
    """``dg_part``/``db_part`` are zeroed float64 ``[P, C]`` buffers: chunk k of the rows adds
    its share of dg and db to row k (the caller sums the P rows)."""
    n = dout.shape[0]
    p = dg_part.shape[0]
    step = (n + p - 1) // p
    for k in numba.prange(p):
        _backward_rows(dout, xhat, rstd, g, dx, dg_part[k], db_part[k], k * step, min(n, (k + 1) * step))


@numba.njit(**NUMBA_OPTS)
def layernorm_backward_serial(dout, xhat, rstd, g, dx, dg_part, db_part):
    _backward_rows(dout, xhat, rstd, g, dx, dg_part[0], db_part[0], 0, dout.shape[0])
