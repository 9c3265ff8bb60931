"""numba kernels of the "SAME", stride-1 convolution of :class:`flowpp_ref.nn.weightnorm.Conv2d`.

Reference (plain ``xp`` code, the math to study): :func:`flowpp_ref.nn.weightnorm.im2col`,
``Conv2d.forward`` / ``Conv2d.backward`` with kernels off (one im2col matrix of the input,
zero-filled then filled by 9 slice copies, and one matmul; the backward rebuilds it for dW
and adds 9 matmuls into shifted slices of dx).

Notation: taps t = (i, j) with input shifts s_t = (di_t, dj_t), pixels p, q;
``x[q]`` is zero outside the image. The convolution is

    out[p, o] = b[o] + sum_t sum_c x[p + s_t, c] W[t, c, o].

Two equivalent orders of the same sums (the kernels here are the data movement of each):

* columns of the input (``gather_cols``, im2col without the zero fill: one pass)::

      cols[p, t, c] = x[p + s_t, c]           out = cols @ W.reshape(T*Cin, Cout) + b

* matmul first, then shift (``shift_sum``)::

      Y[q, t, o] = sum_c x[q, c] W[t, c, o]   (one matmul x @ W', W'[c, (t, o)] = W[t, c, o])
      out[p, o]  = b[o] + sum_t Y[p + s_t, t, o]

  whose buffer is T*Cout wide instead of T*Cin: the thin choice when Cout < Cin
  (the gated resnet's first convolution: 2F -> F).

Backward, with D the columns of dout at the negated shifts, ``D[q, t, o] = dout[q - s_t, o]``
(zero where q - s_t is outside the image), since dL/dx[q, c] = sum_t sum_o dout[q - s_t, o] W[t, c, o]::

      dx = D @ M,  M[(t, o), c] = W[t, c, o];      dW[t, c, o] = sum_q x[q, c] D[q, t, o] = (x^T D)[c, (t, o)]

or, when Cin < Cout, with the columns of x (``cols`` as above) and ``shift_sum`` at the negated shifts::

      dW = cols^T dout;   Z = dout @ M',  M'[o, (t, c)] = W[t, c, o];   dx[q, c] = sum_t Z[q - s_t, t, c]

Either way the wide buffer is T * min(Cin, Cout) per pixel, written once and read once.
Loops run over the rows (b, h) in parallel (numba ``prange``); the innermost loop is over
channels (contiguous, vectorised).
"""
from __future__ import annotations

import numba
import numpy as np

from flowpp_ref.kernels import NUMBA_OPTS, choose_threading_layer

choose_threading_layer()


@numba.njit(parallel=True, **NUMBA_OPTS)
def _gather_cols(x, di, dj, cols):
    # cols[b, h, w, t, :] = x[b, h + di[t], w + dj[t], :]  (0 outside the image)
    B, H, W, C = x.shape
    T = di.shape[0]
    for bh in numba.prange(B * H):
        b = bh // H
        h = bh - b * H
        for w in range(W):
            for t in range(T):
                hh = h + di[t]
                ww = w + dj[t]
                if hh >= 0 and hh < H and ww >= 0 and ww < W:
                    for c in range(C):
                        cols[b, h, w, t, c] = x[b, hh, ww, c]
                else:
                    for c in range(C):
                        cols[b, h, w, t, c] = 0


@numba.njit(parallel=True, **NUMBA_OPTS)
def _shift_sum(y, di, dj, bias, out):
    # out[b, h, w, :] = bias + sum_t y[b, h + di[t], w + dj[t], t, :]  (terms outside the image skipped)
    B, H, W, T, C = y.shape
    for bh in numba.prange(B * H):
        b = bh // H
        h = bh - b * H
        for w in range(W):
            for c in range(C):
                out[b, h, w, c] = bias[c]
            for t in range(T):
                hh = h + di[t]
                ww = w + dj[t]
                if hh >= 0 and hh < H and ww >= 0 and ww < W:
                    for c in range(C):
                        out[b, h, w, c] += y[b, hh, ww, t, c]


def _shifts(shifts):
    s = np.asarray(shifts, dtype=np.int64).reshape(-1, 2)
    return np.ascontiguousarray(s[:, 0]), np.ascontiguousarray(s[:, 1])


def gather_cols(x, shifts, out=None):
    """``cols[b,h,w,t,:] = x[b, h+di_t, w+dj_t, :]`` (zero outside); ``shifts`` = [(di, dj), ...] -> [B,H,W,T,C].

    ``out``: a C-contiguous array of that shape and x's dtype to fill (every entry is written)."""
    x = np.ascontiguousarray(x)
    di, dj = _shifts(shifts)
    B, H, W, C = x.shape
    shape = (B, H, W, di.shape[0], C)
    if out is None:
        cols = np.empty(shape, dtype=x.dtype)
    elif out.shape != shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"gather_cols: out must be a C-contiguous {x.dtype} array of shape {shape}, "
                         f"got {out.dtype} {out.shape}")
    else:
        cols = out
    _gather_cols(x, di, dj, cols)
    return cols


def shift_sum(y, shifts, bias=None):
    """``out[b,h,w,:] = bias + sum_t y[b, h+di_t, w+dj_t, t, :]`` (terms outside skipped); y [B,H,W,T,C]."""
    y = np.ascontiguousarray(y)
    di, dj = _shifts(shifts)
    B, H, W, T, C = y.shape
    if T != di.shape[0]:
        raise ValueError(f"shift_sum: y has {T} taps, {di.shape[0]} shifts given")
    bias = np.zeros(C, dtype=y.dtype) if bias is None else np.ascontiguousarray(bias, dtype=y.dtype)
    out = np.empty((B, H, W, C), dtype=y.dtype)
    _shift_sum(y, di, dj, bias, out)
    return out
