"""Fused self-attention for NumPy arrays (numba): online softmax, never the T x T weights.

Reference (plain ``xp`` code): :func:`flowpp_ref.nn.attention.attention_ref` and
:func:`flowpp_ref.nn.attention.attention_backward_ref` (explicit weights ``W [B, h, T, T]``).
Tests: ``tests/test_fused_attention.py`` (parity in float64 / float32, finite differences).

Notation (one batch element and head; T positions, head dimension d, c = 1 / sqrt(d))::

    S = c q k^T      [T, T]     W = softmax_rows(S)     A = W v   [T, d]
    L_i = log sum_j exp(S_ij)   (the row log-sum-exp: W_ij = exp(S_ij - L_i))

Forward: online softmax (FlashAttention, Dao et al. 2022). The keys are visited in blocks
J_1, J_2, ... of ``KEY_BLOCK``; for a query row i the running maximum m, sum l and
unnormalised output o after block t are::

    m_t = max(m_{t-1}, max_{j in J_t} S_ij)
    l_t = l_{t-1} exp(m_{t-1} - m_t) + sum_{j in J_t} exp(S_ij - m_t)
    o_t = o_{t-1} exp(m_{t-1} - m_t) + sum_{j in J_t} exp(S_ij - m_t) v_j       (m_0 = -inf, l_0 = 0, o_0 = 0)

By induction l_t = sum_{j seen} exp(S_ij - m_t) and o_t = sum_{j seen} exp(S_ij - m_t) v_j, so
after the last block A_i = o / l and L_i = m + log l: exactly softmax(S) v, with every exp
argument <= 0 (no overflow). Only A [T, d] and L [T] are kept for the backward (not W).

Backward (upstream dA [T, d]); with P = W recomputed block by block as P_ij = exp(S_ij - L_i)::

    dv = P^T dA                             (A = P v)
    dP = dA v^T                             (dL/dP_ij = dA_i . v_j)
    dS = P * (dP - D),  D_i = sum_j P_ij dP_ij = sum_j P_ij dA_i . v_j = dA_i . A_i
    dq = c dS k,  dk = c dS^T q             (S = c q k^T)

D = rowsum(dA * A) is the softmax backward's row sum, computed from the saved output without
the weights. Each (query block, key block) tile of S is recomputed once in the backward.

Parallelism and layout. The forward runs one task per (batch, head, query block of
``QUERY_BLOCK`` rows) with ``prange``; the backward one task per (batch, head), because dk and
dv sum over all query blocks (one writer per (batch, head): no race). k and v are passed
transposed, ``[B, h, d, T]`` C-contiguous, so that every inner loop runs over consecutive keys
(SIMD lanes over keys; d is only 8 in the paper's models); q ``[B, h, T, d]`` contiguous. The
exp is the vectorisable one of :mod:`flowpp_ref.kernels.fastexp` (numba's on-disk cache keys a
kernel on its own file only: a change to fastexp.py must also touch this file). The row maximum
is an integer maximum over the floats' bit patterns (:func:`_row_max`): a float max reduction does
not vectorise without fastmath's ``nnan``, which the project does not use.

Outputs may be strided views (the layer passes views of its merged ``[B, T, h, d]`` / qkv
gradient buffers, so no extra transposes are needed). float32 and float64; sums accumulate in the
input dtype (tests: float32 within 1e-5 of the float64 reference for T <= 70; at T = 512 the
largest difference seen was 2e-6).

Measured (benchmarks/attention_kernels.py, B = 16, 4 heads, T = 512, d = 8, float32, a 2-core
machine shared with other jobs, min over interleaved repeats), explicit path -> fused:

    1 thread each (OpenBLAS, numba), load ~1.6:  forward 43.9 -> 24.7 ms (1.8x), forward + backward 101.5 -> 66.0 ms (1.5x)
    2 threads each, load ~1.6:                   forward 41.0 -> 20.4 ms (2.0x), forward + backward  95.8 -> 63.0 ms (1.5x)
    2 threads each, load ~5-7 (other jobs):      forward 227 -> 34 ms (6.7x),    forward + backward 515 -> 80 ms (6.4x)

At d = 8 both paths do O(T^2 d) arithmetic (the fused backward recomputes the scores); the fused
forward is bound by instruction throughput (about 1.5 ns per score and thread: scores 0.35, exp
0.4, the P v reductions 0.2-0.6, the row max 0.1), so a 5x gain over the explicit path with one
thread would need about 90 GFLOP/s per core.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from . import NUMBA_OPTS, prefer_workqueue_threading
from .fastexp import EXACT_OPTS, fast_exp

prefer_workqueue_threading()

QUERY_BLOCK = 8      # queries per forward task / backward tile (dk, dv updates take 4 rows per pass)
KEY_BLOCK = 512      # default keys per tile (the score tile [8, 512] stays in L1; 512 was faster
                     # than 128 or 256 at T = 512, d = 8: longer SIMD loops)


# ---------------------------------------------------------------- inner loops (SIMD over keys)
# Each loop over the keys jj is its own small function taking 1-d views: LLVM then
# vectorises it (with at most 4 rows read, its run-time alias checks stay under its limit).
@numba.njit(**NUMBA_OPTS)
def _axpy4(y, kn, x0, x1, x2, x3, m0, m1, m2, m3):
    """y[jj] += x0 m0[jj] + x1 m1[jj] + x2 m2[jj] + x3 m3[jj]."""
    for jj in range(kn):
        y[jj] += (x0 * m0[jj] + x1 * m1[jj]) + (x2 * m2[jj] + x3 * m3[jj])


@numba.njit(**NUMBA_OPTS)
def _axpy1(y, kn, x0, m0):
    for jj in range(kn):
        y[jj] += x0 * m0[jj]


@numba.njit(**NUMBA_OPTS)
def _dot8(p, kn, zero, m0, m1, m2, m3, m4, m5, m6, m7):
    """(p . m0, ..., p . m7) over jj < kn: eight reductions share each load of p (only reads:
    no alias checks; twice as fast as two _dot4 passes at kn = 512)."""
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    a4 = zero
    a5 = zero
    a6 = zero
    a7 = zero
    for jj in range(kn):
        pj = p[jj]
        a0 += pj * m0[jj]
        a1 += pj * m1[jj]
        a2 += pj * m2[jj]
        a3 += pj * m3[jj]
        a4 += pj * m4[jj]
        a5 += pj * m5[jj]
        a6 += pj * m6[jj]
        a7 += pj * m7[jj]
    return a0, a1, a2, a3, a4, a5, a6, a7


@numba.njit(**NUMBA_OPTS)
def _dot4(p, kn, zero, m0, m1, m2, m3):
    """(p . m0, p . m1, p . m2, p . m3) over jj < kn: four reductions share each load of p."""
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    for jj in range(kn):
        pj = p[jj]
        a0 += pj * m0[jj]
        a1 += pj * m1[jj]
        a2 += pj * m2[jj]
        a3 += pj * m3[jj]
    return a0, a1, a2, a3


@numba.njit(**NUMBA_OPTS)
def _dot1(p, kn, zero, m0):
    a0 = zero
    for jj in range(kn):
        a0 += p[jj] * m0[jj]
    return a0


@numba.njit(**NUMBA_OPTS)
def _fill(y, kn, value):
    for jj in range(kn):
        y[jj] = value


@numba.njit(**NUMBA_OPTS)
def _mul(y, kn, x):
    for jj in range(kn):
        y[jj] *= x[jj]


@numba.njit(**NUMBA_OPTS)
def _exp_sum(s, kn, mx, zero):
    """s[jj] <- exp(s[jj] - mx); returns the sum."""
    rs = zero
    for jj in range(kn):
        p = fast_exp(s[jj] - mx)
        s[jj] = p
        rs += p
    return rs


@numba.njit(**NUMBA_OPTS)
def _exp_shift(s, kn, L):
    for jj in range(kn):
        s[jj] = fast_exp(s[jj] - L)


def _row_max(s, kn, mx):
    """max(mx, s[0], ..., s[kn-1]) inside numba kernels (vectorised; see the overload)."""
    return max(mx, np.max(s[:kn]))


_F32_MASK, _F64_MASK = np.int32(0x7FFFFFFF), np.int64(0x7FFFFFFFFFFFFFFF)


def _row_max_impl(itype, mask):
    # A float max reduction does not vectorise without fastmath's nnan (which the project
    # does not use: nan must stay nan). The bits of a float, as a signed integer i, map to
    # i ^ ((i >> (w-1)) & mask): a monotone map (negative floats' magnitudes reversed),
    # and an integer max vectorises. (A nan score makes the row nan anyway, through exp.)
    def impl(s, kn, mx):
        si = s.view(itype)
        t = np.empty(1, s.dtype)
        ti = t.view(itype)
        t[0] = mx
        v0 = ti[0]
        best = v0 ^ ((v0 >> (8 * ti.itemsize - 1)) & mask)
        for jj in range(kn):
            v = si[jj]
            best = max(best, v ^ ((v >> (8 * ti.itemsize - 1)) & mask))
        ti[0] = best ^ ((best >> (8 * ti.itemsize - 1)) & mask)
        return t[0]
    return impl


@overload(_row_max, jit_options=EXACT_OPTS)
def _row_max_overload(s, kn, mx):
    if s.dtype == types.float32:
        return _row_max_impl(np.int32, _F32_MASK)
    return _row_max_impl(np.int64, _F64_MASK)


# ---------------------------------------------------------------- tiles
@numba.njit(**NUMBA_OPTS)
def _rowdot(x, m, j0, kn, y):
    """y[jj] += sum_c x[c] m[c, j0 + jj] for jj < kn (m [d, T]); c unrolled by 4."""
    d = x.shape[0]
    c = 0
    while c + 4 <= d:
        _axpy4(y, kn, x[c], x[c + 1], x[c + 2], x[c + 3], m[c, j0:j0 + kn], m[c + 1, j0:j0 + kn],
               m[c + 2, j0:j0 + kn], m[c + 3, j0:j0 + kn])
        c += 4
    while c < d:
        _axpy1(y, kn, x[c], m[c, j0:j0 + kn])
        c += 1


@numba.njit(**NUMBA_OPTS)
def _rowsdot(p, m, j0, kn, o, alpha, zero):
    """o[c] = alpha o[c] + sum_jj p[jj] m[c, j0 + jj] for every c (m [d, T]); c by 8, 4, 1."""
    d = m.shape[0]
    c = 0
    while c + 8 <= d:
        a0, a1, a2, a3, a4, a5, a6, a7 = _dot8(p, kn, zero, m[c, j0:j0 + kn], m[c + 1, j0:j0 + kn],
                                               m[c + 2, j0:j0 + kn], m[c + 3, j0:j0 + kn], m[c + 4, j0:j0 + kn],
                                               m[c + 5, j0:j0 + kn], m[c + 6, j0:j0 + kn], m[c + 7, j0:j0 + kn])
        o[c] = o[c] * alpha + a0
        o[c + 1] = o[c + 1] * alpha + a1
        o[c + 2] = o[c + 2] * alpha + a2
        o[c + 3] = o[c + 3] * alpha + a3
        o[c + 4] = o[c + 4] * alpha + a4
        o[c + 5] = o[c + 5] * alpha + a5
        o[c + 6] = o[c + 6] * alpha + a6
        o[c + 7] = o[c + 7] * alpha + a7
        c += 8
    while c + 4 <= d:
        a0, a1, a2, a3 = _dot4(p, kn, zero, m[c, j0:j0 + kn], m[c + 1, j0:j0 + kn], m[c + 2, j0:j0 + kn],
                               m[c + 3, j0:j0 + kn])
        o[c] = o[c] * alpha + a0
        o[c + 1] = o[c + 1] * alpha + a1
        o[c + 2] = o[c + 2] * alpha + a2
        o[c + 3] = o[c + 3] * alpha + a3
        c += 4
    while c < d:
        o[c] = o[c] * alpha + _dot1(p, kn, zero, m[c, j0:j0 + kn])
        c += 1


@numba.njit(**NUMBA_OPTS)
def _outer_update(dst, j0, kn, coef, rows, qn):
    """dst[c, j0 + jj] += sum_{i < qn} coef[i, c] rows[i, jj] for every c (dst [d, T]); i unrolled by 4."""
    d = dst.shape[0]
    for c in range(d):
        t = dst[c, j0:j0 + kn]
        i = 0
        while i + 4 <= qn:
            _axpy4(t, kn, coef[i, c], coef[i + 1, c], coef[i + 2, c], coef[i + 3, c],
                   rows[i, :kn], rows[i + 1, :kn], rows[i + 2, :kn], rows[i + 3, :kn])
            i += 4
        while i < qn:
            _axpy1(t, kn, coef[i, c], rows[i, :kn])
            i += 1


@numba.njit(parallel=True, **NUMBA_OPTS)
def _forward(q, kT, vT, out, lse, scale, KB):
    B, h, T, d = q.shape
    QB = QUERY_BLOCK
    KB = max(1, min(KB, T))
    nqb = (T + QB - 1) // QB
    zero = scale - scale                                # 0 in the input dtype
    for task in numba.prange(B * h * nqb):
        b = task // (h * nqb)
        hh = (task // nqb) % h
        i0 = (task % nqb) * QB
        qn = min(QB, T - i0)
        kb, vb = kT[b, hh], vT[b, hh]                  # [d, T]
        s = np.empty((QB, KB), dtype=q.dtype)
        qs = np.empty((QB, d), dtype=q.dtype)
        o = np.zeros((QB, d), dtype=q.dtype)
        m = np.full(QB, -np.inf, dtype=q.dtype)
        l = np.zeros(QB, dtype=q.dtype)
        for i in range(qn):
            for c in range(d):
                qs[i, c] = q[b, hh, i0 + i, c] * scale
        for j0 in range(0, T, KB):
            kn = min(KB, T - j0)
            for i in range(qn):
                sr = s[i]
                _fill(sr, kn, zero)
                _rowdot(qs[i], kb, j0, kn, sr)         # S_ij = c q_i . k_j
                mx = _row_max(sr, kn, m[i])            # m_t = max(m_{t-1}, max_j S_ij)
                alpha = fast_exp(m[i] - mx)            # exp(m_{t-1} - m_t) (0 on the first block)
                rs = _exp_sum(sr, kn, mx, zero)        # exp(S_ij - m_t), and its sum
                l[i] = l[i] * alpha + rs               # l_t = l_{t-1} alpha + sum_j exp(S_ij - m_t)
                m[i] = mx
                _rowsdot(sr, vb, j0, kn, o[i], alpha, zero)   # o_t = o_{t-1} alpha + sum_j exp(S_ij - m_t) v_j
        for i in range(qn):
            inv = 1 / l[i]
            for c in range(d):
                out[b, hh, i0 + i, c] = o[i, c] * inv  # A = o / l
            lse[b, hh, i0 + i] = m[i] + math.log(l[i])  # L = m + log l


@numba.njit(parallel=True, **NUMBA_OPTS)
def _backward(q, kT, vT, a, lse, da, dq, dk, dv, scale, KB):
    B, h, T, d = q.shape
    QB = QUERY_BLOCK
    KB = max(1, min(KB, T))
    zero = scale - scale
    one = zero + 1
    for task in numba.prange(B * h):
        b = task // h
        hh = task % h
        kb, vb = kT[b, hh], vT[b, hh]                  # [d, T]
        dkT = np.zeros((d, T), dtype=q.dtype)          # dk^T, dv^T: consecutive keys
        dvT = np.zeros((d, T), dtype=q.dtype)
        p = np.empty((QB, KB), dtype=q.dtype)
        ds = np.empty((QB, KB), dtype=q.dtype)
        qs = np.empty((QB, d), dtype=q.dtype)          # c q of the query block
        g = np.empty((QB, d), dtype=q.dtype)           # dA of the query block
        dqb = np.empty((QB, d), dtype=q.dtype)
        for i0 in range(0, T, QB):
            qn = min(QB, T - i0)
            for i in range(qn):
                for c in range(d):
                    qs[i, c] = q[b, hh, i0 + i, c] * scale
                    g[i, c] = da[b, hh, i0 + i, c]
                    dqb[i, c] = 0
            for j0 in range(0, T, KB):
                kn = min(KB, T - j0)
                for i in range(qn):
                    pr, dr = p[i], ds[i]
                    Li = lse[b, hh, i0 + i]
                    Di = zero
                    for c in range(d):
                        Di += g[i, c] * a[b, hh, i0 + i, c]        # D_i = dA_i . A_i
                    _fill(pr, kn, zero)
                    _rowdot(qs[i], kb, j0, kn, pr)                 # S = c q k^T
                    _exp_shift(pr, kn, Li)                         # P = exp(S - L)
                    _fill(dr, kn, -Di)
                    _rowdot(g[i], vb, j0, kn, dr)                  # dP - D,  dP = dA v^T
                    _mul(dr, kn, pr)                               # dS = P (dP - D)
                    _rowsdot(dr, kb, j0, kn, dqb[i], one, zero)    # dq += dS k   (c applied below)
                _outer_update(dvT, j0, kn, g, p, qn)               # dv += P^T dA
                _outer_update(dkT, j0, kn, qs, ds, qn)             # dk += dS^T (c q)
            for i in range(qn):
                for c in range(d):
                    dq[b, hh, i0 + i, c] = dqb[i, c] * scale
        for j in range(T):
            for c in range(d):
                dk[b, hh, j, c] = dkT[c, j]
                dv[b, hh, j, c] = dvT[c, j]


def _check(q, k, v):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"fused attention: q, k, v must have one shape [B, h, T, d]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in (np.float32, np.float64) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fused attention: float32 or float64 arrays of one dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")


def _check_block(key_block):
    if int(key_block) < 1:
        raise ValueError(f"fused attention: key_block must be >= 1, got {key_block}")
    return np.int64(key_block)


def _place(buf, dst):
    """buf, or buf copied into the caller's (possibly strided) array dst."""
    if dst is None:
        return buf
    dst[...] = buf
    return dst


# The kernels always get C-contiguous arrays (copies of strided views cost O(B h T d), against the
# kernels' O(B h T^2 d)), so each compiles once per dtype: fewer signatures to compile and cache.
def attention_forward(q, k, v, out=None, key_block=KEY_BLOCK):
    """(A, L) of softmax(q k^T / sqrt(d)) v for q, k, v ``[B, h, T, d]`` (any strides).

    ``A`` ``[B, h, T, d]`` is written into ``out`` when given (may be a strided view);
    ``L`` ``[B, h, T]`` is the row log-sum-exp of the scores (what the backward needs).
    ``key_block``: keys per tile of the online softmax (tests use small ones to run the recurrence
    over many blocks).
    """
    _check(q, k, v)
    B, h, T, d = q.shape
    scale = q.dtype.type(1.0 / math.sqrt(d))
    a = np.empty(q.shape, dtype=q.dtype)
    lse = np.empty((B, h, T), dtype=q.dtype)
    _forward(np.ascontiguousarray(q), np.ascontiguousarray(k.swapaxes(-1, -2)),
             np.ascontiguousarray(v.swapaxes(-1, -2)), a, lse, scale, _check_block(key_block))
    return _place(a, out), lse


def attention_backward(q, k, v, a, lse, da, dq=None, dk=None, dv=None, key_block=KEY_BLOCK):
    """(dq, dk, dv) ``[B, h, T, d]`` from the forward's inputs, output ``a``, ``lse`` and upstream ``da``.

    The outputs are written into ``dq``, ``dk``, ``dv`` when given (strided views allowed).
    """
    _check(q, k, v)
    B, h, T, d = q.shape
    if a.shape != q.shape or da.shape != q.shape or lse.shape != (B, h, T):
        raise ValueError(f"fused attention backward: a and da must have q's shape {q.shape} and lse "
                         f"{(B, h, T)}; got {a.shape}, {da.shape}, {lse.shape}")
    scale = q.dtype.type(1.0 / math.sqrt(d))
    gq, gk, gv = (np.empty(q.shape, q.dtype) for _ in range(3))
    c = lambda x: np.ascontiguousarray(x, dtype=q.dtype)  # noqa: E731
    _backward(c(q), c(k.swapaxes(-1, -2)), c(v.swapaxes(-1, -2)), c(a), c(lse), c(da), gq, gk, gv, scale,
              _check_block(key_block))
    return _place(gq, dq), _place(gk, dk), _place(gv, dv)
