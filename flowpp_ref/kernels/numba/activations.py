"""Fused numba kernels for concat_elu and gate (forward and backward).

References (the math these must match): ``concat_elu_reference``,
``concat_elu_backward_reference``, ``gate_reference``, ``gate_backward_reference``
in :mod:`flowpp_ref.nn.activations`. Each kernel makes one pass over its data
instead of the references' several temporaries: loops over the rows of a ``[N, C]`` view
(N = product of the leading axes), split over numba's threads for big arrays. exp and expm1 are the vectorisable ones of
:mod:`flowpp_ref.kernels.numba.fastexp`.

Each loop stores to one contiguous run of a row, and the gate's divisions are compiled with
``error_model="numpy"``, so that every loop vectorises.
"""
from __future__ import annotations

import numba
import numpy as np

from flowpp_ref.kernels import NUMBA_OPTS, choose_threading_layer
from flowpp_ref.kernels.numba.fastexp import fast_exp, fast_expm1

choose_threading_layer()


@numba.njit(**NUMBA_OPTS)
def _concat_elu_fwd(x, out, r0, r1):
    # One expm1 per element serves both halves: e = expm1(-|v|), and
    # elu(v) = max(v, e), elu(-v) = max(-v, e)   (since expm1(z) >= z, and e < 0 <= |v|)
    # Two passes over a row (e first parked in the second half): each loop then stores to one
    # contiguous run and vectorises (one loop storing to both halves does not vectorise).
    C = x.shape[1]
    for r in range(r0, r1):
        xr = x[r]
        o = out[r]
        for c in range(C):
            o[C + c] = fast_expm1(-np.abs(xr[c]))
        for c in range(C):
            v = xr[c]
            e = o[C + c]
            o[c] = max(v, e)
            o[C + c] = max(-v, e)


@numba.njit(**NUMBA_OPTS)
def _concat_elu_bwd(dout, x, dx, r0, r1):
    # dx = d1 * elu'(x) - d2 * elu'(-x);  elu'(z) = 1 (z > 0), exp(z) otherwise
    C = x.shape[1]
    for r in range(r0, r1):
        for c in range(C):
            v = x[r, c]
            d1 = dout[r, c]
            d2 = dout[r, C + c]
            if v > 0:
                dx[r, c] = d1 - d2 * fast_exp(-v)
            else:
                dx[r, c] = d1 * fast_exp(v) - d2


# error_model="numpy": a float division without numba's ZeroDivisionError branch (which keeps
# these loops from vectorising); 1 + e >= 1 here, so it never divides by zero.
# ONE is a float32 1: float32 data stays float32 (the int 1 promoted it to float64), float64 stays exact.
GATE_OPTS = dict(NUMBA_OPTS, error_model="numpy")
ONE = np.float32(1.0)


@numba.njit(**GATE_OPTS)
def _gate_fwd(x, out, r0, r1):
    # out = h1 * sigmoid(h2);  sigmoid(z) = t (z >= 0) or e t (z < 0), e = exp(-|z|), t = 1 / (1 + e)
    C = x.shape[1] // 2
    for r in range(r0, r1):
        xr = x[r]
        o = out[r]
        for c in range(C):
            z = xr[C + c]
            e = fast_exp(-np.abs(z))
            t = ONE / (ONE + e)
            o[c] = xr[c] * (t if z >= 0 else e * t)


@numba.njit(**GATE_OPTS)
def _gate_bwd(dout, x, dx, r0, r1):
    # dh1 = dout * s;  dh2 = dout * h1 * s * (1 - s),  s (1 - s) = e t^2 (no cancellation)
    # (two loops, one per half of dx: each stores one contiguous run and vectorises)
    C = x.shape[1] // 2
    for r in range(r0, r1):
        xr = x[r]
        dr = dout[r]
        o = dx[r]
        for c in range(C):
            z = xr[C + c]
            e = fast_exp(-np.abs(z))
            t = ONE / (ONE + e)
            o[c] = dr[c] * (t if z >= 0 else e * t)
        for c in range(C):
            z = xr[C + c]
            e = fast_exp(-np.abs(z))
            t = ONE / (ONE + e)
            o[C + c] = dr[c] * xr[c] * (e * t * t)


# Parallel drivers: rows split into one contiguous range per thread (the same serial loops run on
# each range, so the results do not depend on the thread count); arrays below PARALLEL_MIN_SIZE
# elements run serially (waking the pool costs more).
PARALLEL_MIN_SIZE = 1 << 15


@numba.njit(parallel=True, **NUMBA_OPTS)
def _concat_elu_fwd_par(x, out, parts):
    N = x.shape[0]
    for t in numba.prange(parts):
        _concat_elu_fwd(x, out, t * N // parts, (t + 1) * N // parts)


@numba.njit(parallel=True, **NUMBA_OPTS)
def _concat_elu_bwd_par(dout, x, dx, parts):
    N = x.shape[0]
    for t in numba.prange(parts):
        _concat_elu_bwd(dout, x, dx, t * N // parts, (t + 1) * N // parts)


@numba.njit(parallel=True, **GATE_OPTS)
def _gate_fwd_par(x, out, parts):
    N = x.shape[0]
    for t in numba.prange(parts):
        _gate_fwd(x, out, t * N // parts, (t + 1) * N // parts)


@numba.njit(parallel=True, **GATE_OPTS)
def _gate_bwd_par(dout, x, dx, parts):
    N = x.shape[0]
    for t in numba.prange(parts):
        _gate_bwd(dout, x, dx, t * N // parts, (t + 1) * N // parts)


def _run(serial, parallel, *arrays):
    """serial(*arrays, 0, N) for small arrays, else parallel(*arrays, threads)."""
    N = arrays[0].shape[0]
    parts = int(numba.config.NUMBA_NUM_THREADS)
    if parts > 1 and arrays[-1].size >= PARALLEL_MIN_SIZE and N >= parts:
        parallel(*arrays, np.int64(parts))
    else:
        serial(*arrays, np.int64(0), np.int64(N))


def _rows(a, C):
    return np.ascontiguousarray(a).reshape(-1, C)


def concat_elu_numba(x):
    C = x.shape[-1]
    out = np.empty((*x.shape[:-1], 2 * C), dtype=x.dtype)
    _run(_concat_elu_fwd, _concat_elu_fwd_par, _rows(x, C), out.reshape(-1, 2 * C))
    return out


def concat_elu_backward_numba(dout, x):
    C = x.shape[-1]
    dt = np.result_type(dout.dtype, x.dtype)
    dx = np.empty(x.shape, dtype=dt)
    _run(_concat_elu_bwd, _concat_elu_bwd_par, _rows(dout.astype(dt, copy=False), 2 * C),
         _rows(x.astype(dt, copy=False), C), dx.reshape(-1, C))
    return dx


def gate_numba(x):
    C2 = x.shape[-1]
    out = np.empty((*x.shape[:-1], C2 // 2), dtype=x.dtype)
    _run(_gate_fwd, _gate_fwd_par, _rows(x, C2), out.reshape(-1, C2 // 2))
    return out


def gate_backward_numba(dout, x):
    C2 = x.shape[-1]
    dt = np.result_type(dout.dtype, x.dtype)
    dx = np.empty(x.shape, dtype=dt)
    _run(_gate_bwd, _gate_bwd_par, _rows(dout.astype(dt, copy=False), C2 // 2),
         _rows(x.astype(dt, copy=False), C2), dx.reshape(-1, C2))
    return dx
