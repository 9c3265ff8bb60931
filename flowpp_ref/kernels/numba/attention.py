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

Two families of kernels compute these formulas: the *key-block* kernels (:func:`_forward`,
:func:`_backward`: any d, float32 and float64; SIMD lanes over keys) and, for float32 with
d = 8 (the presets' 4 heads of 8 channels), the *query-lanes* kernels (:func:`_forward_lanes`,
:func:`_backward_tiles`: SIMD lanes over queries, explicit 16-lane vectors).

Key-block kernels: parallelism and layout
------------------------------------------
The forward runs one task per (batch, head, query block of ``QUERY_BLOCK`` rows) with
``prange``; the backward one task per (batch, head), because dk and dv sum over all query
blocks (one writer per (batch, head): no race). The kernels read q, k, v from the layer's
packed ``qkv [B, T, 3, h, d]`` and A, dA from ``[B, T, h, d]`` and write A and dq, dk, dv there
(no copies around the kernels); each first transposes its (batch, head)'s k and v to
keys-major rows ``[dp, T]`` (the forward in a parallel loop of its own, the backward per
task), so that every inner loop runs over consecutive keys (SIMD lanes over keys). The
channels are handled 8 at a time (4 when d <= 4): k and v get zero channels up to dp
(d = 12 -> 16); a zero channel adds 0 to every score and product.

Each inner loop (one small function per pass over a tile's keys: see "inner loops" below)
takes *two* query rows, so that each load of a key row serves both: with one row a pass is
bound by its loads (8 rows of k and 8 of v for 512 keys are 32 KB, the size of a typical L1
data cache). The backward builds the tiles P and dS [8, KB] (S and dP fused with the exp for
d = 8 and 4), then dq += dS k two rows at a time and dk^T += (c q)^T dS, dv^T += dA^T P four
channels at a time over the 8 rows. The key tiles are long (``KEY_BLOCK`` = 512) because each
pass has a fixed cost (the loop set-up and the 8-16 horizontal sums at its end) that short
tiles pay more often. The row views handed to each pass are not reference-counted (numba
counts every view with an atomic increment and decrement): the kernels take uncounted views
of their arguments (:func:`flowpp_ref.kernels.numba.views.borrow`), and their scratch buffers
come from the caller.

The exp is :func:`softmax_exp`: fastexp's float32 polynomial with one power of two instead of two
(its arguments are <= 0; results below 2.7e-38 are returned as 0). float64 uses
:func:`flowpp_ref.kernels.numba.fastexp.fast_exp` (the on-disk cache of every kernel here is keyed on
all the sources of this folder, :mod:`flowpp_ref.kernels.numba`). The row maximum is an integer maximum
over the floats' bit patterns (:func:`_key`): a float max reduction does not vectorise without
fastmath's ``nnan``, which the project does not use.

The wrappers take any strides (other layouts than the layer's are copied once). float32 and
float64; sums accumulate in the input dtype (tests: float32 within 1e-5 of the float64
reference for T up to 517).

Work per score: the forward does 2 d multiply-adds and one exp (about 14 vector instructions),
the backward 5 d multiply-adds, one exp and 3 more; at d = 8 that is about 90 vector
instructions per 16 scores of forward + backward. The explicit path's BLAS products do the
same multiply-adds (and no second exp) but write and read the [B, h, T, T] weights.

What bounds the key-block passes is not their arithmetic but their loads: of the key / value
rows and of the registers LLVM spills (a pass holds 16-32 broadcast scalars). numba
vectorises innermost loops only, so with SIMD lanes over keys the per-query sums are
horizontal sums at the end of each pass and nothing stays in registers across passes. The
query-lanes kernels below keep the per-query sums in registers across all keys instead.

Query-lanes forward (float32, d = 8; :func:`_forward_lanes`)
------------------------------------------------------------
With explicit vectors (:mod:`flowpp_ref.kernels.numba.simd`: an LLVM ``<16 x float>`` held in a
register across loops) 16 queries run side by side, one lane each, and the keys one at a time:
c q^T (8 vectors), the sums l and o (9 vectors) stay in registers, each key's 16 numbers are
broadcast from memory into the multiply-adds (no transposes, no stored scores, no horizontal
sums). It has no running maximum: ``M_i = |c q_i| max_j |k_j| >= S_ij`` bounds every score of row i
(Cauchy-Schwarz), so l_i = sum_j exp(S_ij - M_i) and o_i = sum_j exp(S_ij - M_i) v_j give
A_i = o_i / l_i and L_i = M_i + log l_i exactly as the maximum would, as long as no term that
matters underflows. Since l_i <= T exp(max_j S_ij - M_i), l_i > T e^-60 proves
max_j S_ij - M_i > -60, and the terms lost (below exp(-86.5)) are then below e^-26 of the
largest; the extra rounding of S_ij - M_i is of the order of S_ij's own (ulp(M_i)). A block of
16 where some l_i fails the test (a loose bound: queries anti-aligned with every key; or
non-finite input) is redone with the online softmax proper, one key per step
(m' = max(m, S_ij); l and o rescaled by e^(m - m')). Sums run over 64 keys in registers and are
then added to the block's totals.

Tiled backward (float32, d = 8; :func:`_backward_tiles`)
--------------------------------------------------------
One task per (batch, head); tiles of 16 queries x 16 keys. For each key of the tile, in query
lanes: S, P = exp(S - L), dP = dA v^T and dS = P (dP - D), written as rows of two 16 x 16 tiles
(key by query); then dq += dS k over the tile's keys (accumulated across tiles in a [8, 16]
scratch row set); then both tiles are transposed in registers (``simd.transpose16x16``: 4 stages
of two-input shuffles) and dv += P^T dA, dk += dS^T (c q) run in key lanes, 16 queries a step,
into dk^T, dv^T rows of the task (row stride from :func:`_row_width`, which keeps the rows off
the cache-set period). Query lanes alone would need a horizontal sum per key and channel for
dk and dv; key lanes alone, one for dq: the transposes (64 shuffles per tile and matrix)
replace both. dq is accumulated from the stored dS tile (16 more multiply-adds per tile)
rather than kept in the key loop's registers, where it would make LLVM spill other vectors
in every key step.

Log2 units. Both query-lanes kernels scale the queries by c log2 e, so the scores are
S' = S log2 e and exp(S - M) = 2^(S' - M') is ``simd.exp2_16``: n = round(y), r = y - n
exactly, a degree-6 polynomial for 2^r (< 1 ulp), the power of two from n's bits: 7
multiply-class operations, where the natural-unit :func:`softmax_exp` (y log2 e, a two-part
ln 2 reduction, degree 7) takes 11, out of about 27 per key in the forward and 60 in the
backward. The forward stores L = M' ln 2 + log l (natural units, as the other kernels); the
backward multiplies it by log2 e (one more float32 rounding of L). Both are compiled without
reassoc (see ``LANE_OPTS``).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from flowpp_ref.kernels import NUMBA_OPTS, choose_threading_layer
from flowpp_ref.kernels.numba import fastexp
from flowpp_ref.kernels.numba.fastexp import EXACT_OPTS, fast_exp
from flowpp_ref.kernels.numba.simd import (add16, exp2_16, fma16, load16, max16, mul16, splat16, store16, sub16,
                                           transpose16x16)
from flowpp_ref.kernels.numba.views import borrow

choose_threading_layer()

QUERY_BLOCK = 8      # queries per forward task / backward tile (two per pass; dk, dv take all 8 per pass)
KEY_BLOCK = 512      # default keys per tile: long tiles pay each pass's fixed cost less often
                     # (see the module docstring)


# ---------------------------------------------------------------- exp of the softmax
_SM_LO_32, _SM_HI_32, _I126 = np.float32(-86.5), np.float32(89.0), np.int32(126)
_F32_ZERO = np.float32(0.0)


def softmax_exp(x):
    """exp(x) for the softmax's arguments x = S - m <= 0 (inside numba kernels; see the overload)."""
    return math.exp(x)


def _softmax_exp32_impl(x):
    # fastexp's float32 exp (the same reduction x = n ln2 + r and polynomial, hence the same value
    # for -86.5 <= x <= 89) with one power of two instead of two: exp(x) = (2 exp(r)) 2^(n-1),
    # 2^(n-1) normal for -125 <= n <= 128. Results below exp(-86.5) = 2.7e-38 (where 2^(n-1) would
    # be subnormal) are returned as 0: in a softmax such terms are lost against the row maximum's 1
    # anyway. Above, x is clamped at 89 (as in fastexp), where 2 exp(r) 2^127 overflows to inf.
    # nan stays nan (the comparison below is false for nan). About 6 vector instructions fewer.
    xc = min(x, _SM_HI_32)
    n = (xc * fastexp._LOG2E_32 + fastexp._ROUND_32) - fastexp._ROUND_32
    r = (xc - n * fastexp._LN2_HI_32) - n * fastexp._LN2_LO_32
    p = fastexp._C32_7
    p = p * r + fastexp._C32_6
    p = p * r + fastexp._C32_5
    p = p * r + fastexp._C32_4
    p = p * r + fastexp._C32_3
    p = p * r + fastexp._C32_2
    p = p * r + fastexp._C32_1
    p = p * r + fastexp._C32_0
    e = (p + p) * fastexp._i32_bits_as_f32((np.int32(n) + _I126) << fastexp._I23)
    return _F32_ZERO if xc < _SM_LO_32 else e


@overload(softmax_exp, jit_options=EXACT_OPTS)
def _softmax_exp_overload(x):
    if x == types.float32:
        return _softmax_exp32_impl
    return lambda x: fast_exp(x)                 # float64: fastexp's (exact down to the subnormals)


# ---------------------------------------------------------------- inner loops (SIMD over keys)
# Each loop over the keys jj is its own small function taking 1-d views (rows of a [dp, T] array,
# passed one by one): LLVM then vectorises it. Two query rows share each pass, so that every load
# of a key row serves both (with one row a pass is bound by its loads: 16 rows of 512 keys are 32 KB).
# The channels run 8 at a time (4 when d <= 4; the wrappers pad d with zero channels). The rows are
# separate arguments because LLVM vectorises neither one index expression over a flattened [dp * T]
# row nor an offset added to the loop index. Hand-unrolled over the channels: numba does not unroll loops.
@numba.njit(**NUMBA_OPTS)
def _set8_2(y, r, kn, X, i, c, m0, m1, m2, m3, m4, m5, m6, m7):
    """y[jj] = X[i, c:c+8] . m[jj],  r[jj] = X[i+1, c:c+8] . m[jj]  (m_t: rows of k or v)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = (X[i, c], X[i, c + 1], X[i, c + 2], X[i, c + 3], X[i, c + 4], X[i, c + 5],
                                      X[i, c + 6], X[i, c + 7])
    z0, z1, z2, z3, z4, z5, z6, z7 = (X[i + 1, c], X[i + 1, c + 1], X[i + 1, c + 2], X[i + 1, c + 3],
                                      X[i + 1, c + 4], X[i + 1, c + 5], X[i + 1, c + 6], X[i + 1, c + 7])
    for jj in range(kn):
        a0, a1, a2, a3, a4, a5, a6, a7 = m0[jj], m1[jj], m2[jj], m3[jj], m4[jj], m5[jj], m6[jj], m7[jj]
        s0 = ((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3)) + ((x4 * a4 + x5 * a5) + (x6 * a6 + x7 * a7))
        s1 = ((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3)) + ((z4 * a4 + z5 * a5) + (z6 * a6 + z7 * a7))
        y[jj] = s0
        r[jj] = s1


@numba.njit(**NUMBA_OPTS)
def _set8_2_max(y, r, kn, X, i, c, best0, best1, m0, m1, m2, m3, m4, m5, m6, m7):
    """as _set8_2, returning max(best, the keys of the values written) per row."""
    x0, x1, x2, x3, x4, x5, x6, x7 = (X[i, c], X[i, c + 1], X[i, c + 2], X[i, c + 3], X[i, c + 4], X[i, c + 5],
                                      X[i, c + 6], X[i, c + 7])
    z0, z1, z2, z3, z4, z5, z6, z7 = (X[i + 1, c], X[i + 1, c + 1], X[i + 1, c + 2], X[i + 1, c + 3],
                                      X[i + 1, c + 4], X[i + 1, c + 5], X[i + 1, c + 6], X[i + 1, c + 7])
    for jj in range(kn):
        a0, a1, a2, a3, a4, a5, a6, a7 = m0[jj], m1[jj], m2[jj], m3[jj], m4[jj], m5[jj], m6[jj], m7[jj]
        s0 = ((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3)) + ((x4 * a4 + x5 * a5) + (x6 * a6 + x7 * a7))
        s1 = ((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3)) + ((z4 * a4 + z5 * a5) + (z6 * a6 + z7 * a7))
        y[jj] = s0
        r[jj] = s1
        best0 = max(best0, _key(s0))
        best1 = max(best1, _key(s1))
    return best0, best1


@numba.njit(**NUMBA_OPTS)
def _add8_2(y, r, kn, X, i, c, m0, m1, m2, m3, m4, m5, m6, m7):
    """y[jj] += X[i, c:c+8] . m[jj],  r[jj] += X[i+1, c:c+8] . m[jj]."""
    x0, x1, x2, x3, x4, x5, x6, x7 = (X[i, c], X[i, c + 1], X[i, c + 2], X[i, c + 3], X[i, c + 4], X[i, c + 5],
                                      X[i, c + 6], X[i, c + 7])
    z0, z1, z2, z3, z4, z5, z6, z7 = (X[i + 1, c], X[i + 1, c + 1], X[i + 1, c + 2], X[i + 1, c + 3],
                                      X[i + 1, c + 4], X[i + 1, c + 5], X[i + 1, c + 6], X[i + 1, c + 7])
    for jj in range(kn):
        a0, a1, a2, a3, a4, a5, a6, a7 = m0[jj], m1[jj], m2[jj], m3[jj], m4[jj], m5[jj], m6[jj], m7[jj]
        s0 = y[jj] + (((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3)) + ((x4 * a4 + x5 * a5) + (x6 * a6 + x7 * a7)))
        s1 = r[jj] + (((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3)) + ((z4 * a4 + z5 * a5) + (z6 * a6 + z7 * a7)))
        y[jj] = s0
        r[jj] = s1


@numba.njit(**NUMBA_OPTS)
def _add8_2_max(y, r, kn, X, i, c, best0, best1, m0, m1, m2, m3, m4, m5, m6, m7):
    """as _add8_2, returning max(best, the keys of the values written) per row."""
    x0, x1, x2, x3, x4, x5, x6, x7 = (X[i, c], X[i, c + 1], X[i, c + 2], X[i, c + 3], X[i, c + 4], X[i, c + 5],
                                      X[i, c + 6], X[i, c + 7])
    z0, z1, z2, z3, z4, z5, z6, z7 = (X[i + 1, c], X[i + 1, c + 1], X[i + 1, c + 2], X[i + 1, c + 3],
                                      X[i + 1, c + 4], X[i + 1, c + 5], X[i + 1, c + 6], X[i + 1, c + 7])
    for jj in range(kn):
        a0, a1, a2, a3, a4, a5, a6, a7 = m0[jj], m1[jj], m2[jj], m3[jj], m4[jj], m5[jj], m6[jj], m7[jj]
        s0 = y[jj] + (((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3)) + ((x4 * a4 + x5 * a5) + (x6 * a6 + x7 * a7)))
        s1 = r[jj] + (((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3)) + ((z4 * a4 + z5 * a5) + (z6 * a6 + z7 * a7)))
        y[jj] = s0
        r[jj] = s1
        best0 = max(best0, _key(s0))
        best1 = max(best1, _key(s1))
    return best0, best1


@numba.njit(**NUMBA_OPTS)
def _exp_dot8_2(p, r, kn, mx0, mx1, zero, m0, m1, m2, m3, m4, m5, m6, m7):
    """p <- exp(p - mx0), r <- exp(r - mx1); returns (sum p, p . m_0, ..., p . m_7) and those of r."""
    sp = zero
    sr = zero
    a0 = zero
    b0 = zero
    a1 = zero
    b1 = zero
    a2 = zero
    b2 = zero
    a3 = zero
    b3 = zero
    a4 = zero
    b4 = zero
    a5 = zero
    b5 = zero
    a6 = zero
    b6 = zero
    a7 = zero
    b7 = zero
    for jj in range(kn):
        u = softmax_exp(p[jj] - mx0)
        w = softmax_exp(r[jj] - mx1)
        p[jj] = u
        r[jj] = w
        sp += u
        sr += w
        a0 += u * m0[jj]
        b0 += w * m0[jj]
        a1 += u * m1[jj]
        b1 += w * m1[jj]
        a2 += u * m2[jj]
        b2 += w * m2[jj]
        a3 += u * m3[jj]
        b3 += w * m3[jj]
        a4 += u * m4[jj]
        b4 += w * m4[jj]
        a5 += u * m5[jj]
        b5 += w * m5[jj]
        a6 += u * m6[jj]
        b6 += w * m6[jj]
        a7 += u * m7[jj]
        b7 += w * m7[jj]
    return (sp, a0, a1, a2, a3, a4, a5, a6, a7), (sr, b0, b1, b2, b3, b4, b5, b6, b7)


@numba.njit(**NUMBA_OPTS)
def _dot8_2(p, r, kn, zero, m0, m1, m2, m3, m4, m5, m6, m7):
    """(p . m_0, ..., p . m_7) and (r . m_0, ...): two rows, each m load serving both (reads only)."""
    a0 = zero
    b0 = zero
    a1 = zero
    b1 = zero
    a2 = zero
    b2 = zero
    a3 = zero
    b3 = zero
    a4 = zero
    b4 = zero
    a5 = zero
    b5 = zero
    a6 = zero
    b6 = zero
    a7 = zero
    b7 = zero
    for jj in range(kn):
        u = p[jj]
        w = r[jj]
        a0 += u * m0[jj]
        b0 += w * m0[jj]
        a1 += u * m1[jj]
        b1 += w * m1[jj]
        a2 += u * m2[jj]
        b2 += w * m2[jj]
        a3 += u * m3[jj]
        b3 += w * m3[jj]
        a4 += u * m4[jj]
        b4 += w * m4[jj]
        a5 += u * m5[jj]
        b5 += w * m5[jj]
        a6 += u * m6[jj]
        b6 += w * m6[jj]
        a7 += u * m7[jj]
        b7 += w * m7[jj]
    return (a0, a1, a2, a3, a4, a5, a6, a7), (b0, b1, b2, b3, b4, b5, b6, b7)


@numba.njit(**NUMBA_OPTS)
def _p_ds8_2(p0, ds0, p1, ds1, kn, L0, D0, L1, D1, X, G, i,
             k0, k1, k2, k3, k4, k5, k6, k7, v0, v1, v2, v3, v4, v5, v6, v7):
    """d = 8, rows i and i + 1 in one pass: S = X[i] . k_jj, P = exp(S - L), dP = G[i] . v_jj,
    dS = P (dP - D) into p, ds (each k, v load serving both rows)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = X[i, 0], X[i, 1], X[i, 2], X[i, 3], X[i, 4], X[i, 5], X[i, 6], X[i, 7]
    z0, z1, z2, z3, z4, z5, z6, z7 = (X[i + 1, 0], X[i + 1, 1], X[i + 1, 2], X[i + 1, 3], X[i + 1, 4],
                                      X[i + 1, 5], X[i + 1, 6], X[i + 1, 7])
    g0, g1, g2, g3, g4, g5, g6, g7 = G[i, 0], G[i, 1], G[i, 2], G[i, 3], G[i, 4], G[i, 5], G[i, 6], G[i, 7]
    h0, h1, h2, h3, h4, h5, h6, h7 = (G[i + 1, 0], G[i + 1, 1], G[i + 1, 2], G[i + 1, 3], G[i + 1, 4],
                                      G[i + 1, 5], G[i + 1, 6], G[i + 1, 7])
    for jj in range(kn):
        a0, a1, a2, a3, a4, a5, a6, a7 = k0[jj], k1[jj], k2[jj], k3[jj], k4[jj], k5[jj], k6[jj], k7[jj]
        b0, b1, b2, b3, b4, b5, b6, b7 = v0[jj], v1[jj], v2[jj], v3[jj], v4[jj], v5[jj], v6[jj], v7[jj]
        s0 = ((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3)) + ((x4 * a4 + x5 * a5) + (x6 * a6 + x7 * a7))
        s1 = ((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3)) + ((z4 * a4 + z5 * a5) + (z6 * a6 + z7 * a7))
        e0 = ((g0 * b0 + g1 * b1) + (g2 * b2 + g3 * b3)) + ((g4 * b4 + g5 * b5) + (g6 * b6 + g7 * b7))
        e1 = ((h0 * b0 + h1 * b1) + (h2 * b2 + h3 * b3)) + ((h4 * b4 + h5 * b5) + (h6 * b6 + h7 * b7))
        q0 = softmax_exp(s0 - L0)
        q1 = softmax_exp(s1 - L1)
        p0[jj] = q0
        p1[jj] = q1
        ds0[jj] = q0 * (e0 - D0)
        ds1[jj] = q1 * (e1 - D1)


@numba.njit(**NUMBA_OPTS)
def _set4_2(y, r, kn, X, i, c, m0, m1, m2, m3):
    """y[jj] = X[i, c:c+4] . m[jj],  r[jj] = X[i+1, c:c+4] . m[jj]  (m_t: rows of k or v)."""
    x0, x1, x2, x3 = X[i, c], X[i, c + 1], X[i, c + 2], X[i, c + 3]
    z0, z1, z2, z3 = X[i + 1, c], X[i + 1, c + 1], X[i + 1, c + 2], X[i + 1, c + 3]
    for jj in range(kn):
        a0, a1, a2, a3 = m0[jj], m1[jj], m2[jj], m3[jj]
        s0 = ((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3))
        s1 = ((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3))
        y[jj] = s0
        r[jj] = s1


@numba.njit(**NUMBA_OPTS)
def _set4_2_max(y, r, kn, X, i, c, best0, best1, m0, m1, m2, m3):
    """as _set4_2, returning max(best, the keys of the values written) per row."""
    x0, x1, x2, x3 = X[i, c], X[i, c + 1], X[i, c + 2], X[i, c + 3]
    z0, z1, z2, z3 = X[i + 1, c], X[i + 1, c + 1], X[i + 1, c + 2], X[i + 1, c + 3]
    for jj in range(kn):
        a0, a1, a2, a3 = m0[jj], m1[jj], m2[jj], m3[jj]
        s0 = ((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3))
        s1 = ((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3))
        y[jj] = s0
        r[jj] = s1
        best0 = max(best0, _key(s0))
        best1 = max(best1, _key(s1))
    return best0, best1


@numba.njit(**NUMBA_OPTS)
def _exp_dot4_2(p, r, kn, mx0, mx1, zero, m0, m1, m2, m3):
    """p <- exp(p - mx0), r <- exp(r - mx1); returns (sum p, p . m_0, ..., p . m_3) and those of r."""
    sp = zero
    sr = zero
    a0 = zero
    b0 = zero
    a1 = zero
    b1 = zero
    a2 = zero
    b2 = zero
    a3 = zero
    b3 = zero
    for jj in range(kn):
        u = softmax_exp(p[jj] - mx0)
        w = softmax_exp(r[jj] - mx1)
        p[jj] = u
        r[jj] = w
        sp += u
        sr += w
        a0 += u * m0[jj]
        b0 += w * m0[jj]
        a1 += u * m1[jj]
        b1 += w * m1[jj]
        a2 += u * m2[jj]
        b2 += w * m2[jj]
        a3 += u * m3[jj]
        b3 += w * m3[jj]
    return (sp, a0, a1, a2, a3), (sr, b0, b1, b2, b3)


@numba.njit(**NUMBA_OPTS)
def _dot4_2(p, r, kn, zero, m0, m1, m2, m3):
    """(p . m_0, ..., p . m_3) and (r . m_0, ...): two rows, each m load serving both (reads only)."""
    a0 = zero
    b0 = zero
    a1 = zero
    b1 = zero
    a2 = zero
    b2 = zero
    a3 = zero
    b3 = zero
    for jj in range(kn):
        u = p[jj]
        w = r[jj]
        a0 += u * m0[jj]
        b0 += w * m0[jj]
        a1 += u * m1[jj]
        b1 += w * m1[jj]
        a2 += u * m2[jj]
        b2 += w * m2[jj]
        a3 += u * m3[jj]
        b3 += w * m3[jj]
    return (a0, a1, a2, a3), (b0, b1, b2, b3)


@numba.njit(**NUMBA_OPTS)
def _p_ds4_2(p0, ds0, p1, ds1, kn, L0, D0, L1, D1, X, G, i,
             k0, k1, k2, k3, v0, v1, v2, v3):
    """d = 4, rows i and i + 1 in one pass: S = X[i] . k_jj, P = exp(S - L), dP = G[i] . v_jj,
    dS = P (dP - D) into p, ds (each k, v load serving both rows)."""
    x0, x1, x2, x3 = X[i, 0], X[i, 1], X[i, 2], X[i, 3]
    z0, z1, z2, z3 = X[i + 1, 0], X[i + 1, 1], X[i + 1, 2], X[i + 1, 3]
    g0, g1, g2, g3 = G[i, 0], G[i, 1], G[i, 2], G[i, 3]
    h0, h1, h2, h3 = G[i + 1, 0], G[i + 1, 1], G[i + 1, 2], G[i + 1, 3]
    for jj in range(kn):
        a0, a1, a2, a3 = k0[jj], k1[jj], k2[jj], k3[jj]
        b0, b1, b2, b3 = v0[jj], v1[jj], v2[jj], v3[jj]
        s0 = ((x0 * a0 + x1 * a1) + (x2 * a2 + x3 * a3))
        s1 = ((z0 * a0 + z1 * a1) + (z2 * a2 + z3 * a3))
        e0 = ((g0 * b0 + g1 * b1) + (g2 * b2 + g3 * b3))
        e1 = ((h0 * b0 + h1 * b1) + (h2 * b2 + h3 * b3))
        q0 = softmax_exp(s0 - L0)
        q1 = softmax_exp(s1 - L1)
        p0[jj] = q0
        p1[jj] = q1
        ds0[jj] = q0 * (e0 - D0)
        ds1[jj] = q1 * (e1 - D1)


@numba.njit(**NUMBA_OPTS)
def _p_ds(p, ds, kn, L, D):
    """p[jj] <- P = exp(S - L) (p holds S);  ds[jj] <- dS = P (dP - D) (ds holds dP)."""
    for jj in range(kn):
        pj = softmax_exp(p[jj] - L)
        p[jj] = pj
        ds[jj] = pj * (ds[jj] - D)


@numba.njit(**NUMBA_OPTS)
def _axpy8x4(y0, y1, y2, y3, kn, X, c, r0, r1, r2, r3, r4, r5, r6, r7):
    """y_t[jj] += sum_i X[i, c + t] r_i[jj] (i < 8, t < 4): the 8 rows r read once for 4 outputs."""
    a0, a1, a2, a3, a4, a5, a6, a7 = X[0, c], X[1, c], X[2, c], X[3, c], X[4, c], X[5, c], X[6, c], X[7, c]
    b0, b1, b2, b3, b4, b5, b6, b7 = (X[0, c + 1], X[1, c + 1], X[2, c + 1], X[3, c + 1], X[4, c + 1],
                                      X[5, c + 1], X[6, c + 1], X[7, c + 1])
    e0, e1, e2, e3, e4, e5, e6, e7 = (X[0, c + 2], X[1, c + 2], X[2, c + 2], X[3, c + 2], X[4, c + 2],
                                      X[5, c + 2], X[6, c + 2], X[7, c + 2])
    f0, f1, f2, f3, f4, f5, f6, f7 = (X[0, c + 3], X[1, c + 3], X[2, c + 3], X[3, c + 3], X[4, c + 3],
                                      X[5, c + 3], X[6, c + 3], X[7, c + 3])
    for jj in range(kn):
        v0, v1, v2, v3, v4, v5, v6, v7 = r0[jj], r1[jj], r2[jj], r3[jj], r4[jj], r5[jj], r6[jj], r7[jj]
        y0[jj] += ((a0 * v0 + a1 * v1) + (a2 * v2 + a3 * v3)) + ((a4 * v4 + a5 * v5) + (a6 * v6 + a7 * v7))
        y1[jj] += ((b0 * v0 + b1 * v1) + (b2 * v2 + b3 * v3)) + ((b4 * v4 + b5 * v5) + (b6 * v6 + b7 * v7))
        y2[jj] += ((e0 * v0 + e1 * v1) + (e2 * v2 + e3 * v3)) + ((e4 * v4 + e5 * v5) + (e6 * v6 + e7 * v7))
        y3[jj] += ((f0 * v0 + f1 * v1) + (f2 * v2 + f3 * v3)) + ((f4 * v4 + f5 * v5) + (f6 * v6 + f7 * v7))


_F32_MASK, _F64_MASK = np.int32(0x7FFFFFFF), np.int64(0x7FFFFFFFFFFFFFFF)


# A float max reduction does not vectorise without fastmath's nnan (which the project does not
# use: nan must stay nan). The bits of a float, as a signed integer i, map to the key
# i ^ ((i >> (w-1)) & mask): a monotone map (negative floats' magnitudes reversed; it is its own
# inverse), and an integer max vectorises. A nan score (positive nan bits: a key above inf's)
# becomes the row maximum, so the row is nan, as it should be.
@intrinsic
def _bits(typingctx, x):
    """The bits of a float32 / float64 as an int32 / int64 (an LLVM bitcast)."""
    ity = types.int32 if x == types.float32 else types.int64

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(ity.bitwidth))

    return ity(x), codegen


@intrinsic
def _from_bits(typingctx, i, like):
    """The float32 / float64 (the type of ``like``) with the bits of the int32 / int64 ``i``."""
    fty = ir.FloatType() if like == types.float32 else ir.DoubleType()

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], fty)

    return like(i, like), codegen


def _key(x):
    """The monotone integer key of a float (see above; inside numba kernels)."""
    return x


def _unkey(k, like):
    """The float of a key (``like``: a float of the type to return)."""
    return like


@overload(_key, jit_options=EXACT_OPTS)
def _key_overload(x):
    if x == types.float32:
        return lambda x: np.int32(_bits(x) ^ ((_bits(x) >> np.int32(31)) & _F32_MASK))   # (numba widens int32 ops)
    return lambda x: _bits(x) ^ ((_bits(x) >> np.int64(63)) & _F64_MASK)


@overload(_unkey, jit_options=EXACT_OPTS)
def _unkey_overload(k, like):
    if like == types.float32:
        return lambda k, like: _from_bits(np.int32(k ^ ((k >> np.int32(31)) & _F32_MASK)), like)
    return lambda k, like: _from_bits(k ^ ((k >> np.int64(63)) & _F64_MASK), like)


# ---------------------------------------------------------------- tiles
@numba.njit(**NUMBA_OPTS)
def _rows_2(y, r, kn, X, i, m, j0):
    """y[jj] = X[i] . m[:, j0 + jj], r[jj] = X[i + 1] . m[:, j0 + jj] over all channels (m [dp, T])."""
    dp = m.shape[0]
    if dp == 4:
        _set4_2(y, r, kn, X, i, 0, m[0, j0:j0 + kn], m[1, j0:j0 + kn], m[2, j0:j0 + kn], m[3, j0:j0 + kn])
        return
    for c in range(0, dp, 8):
        r0, r1, r2, r3 = m[c, j0:j0 + kn], m[c + 1, j0:j0 + kn], m[c + 2, j0:j0 + kn], m[c + 3, j0:j0 + kn]
        r4, r5, r6, r7 = m[c + 4, j0:j0 + kn], m[c + 5, j0:j0 + kn], m[c + 6, j0:j0 + kn], m[c + 7, j0:j0 + kn]
        if c == 0:
            _set8_2(y, r, kn, X, i, c, r0, r1, r2, r3, r4, r5, r6, r7)
        else:
            _add8_2(y, r, kn, X, i, c, r0, r1, r2, r3, r4, r5, r6, r7)


@numba.njit(**NUMBA_OPTS)
def _rows_2_max(y, r, kn, X, i, m, j0, best0, best1):
    """_rows_2, returning max(best0, the keys of y) and max(best1, the keys of r)."""
    dp = m.shape[0]
    if dp == 4:
        return _set4_2_max(y, r, kn, X, i, 0, best0, best1, m[0, j0:j0 + kn], m[1, j0:j0 + kn],
                           m[2, j0:j0 + kn], m[3, j0:j0 + kn])
    for c in range(0, dp, 8):
        r0, r1, r2, r3 = m[c, j0:j0 + kn], m[c + 1, j0:j0 + kn], m[c + 2, j0:j0 + kn], m[c + 3, j0:j0 + kn]
        r4, r5, r6, r7 = m[c + 4, j0:j0 + kn], m[c + 5, j0:j0 + kn], m[c + 6, j0:j0 + kn], m[c + 7, j0:j0 + kn]
        last = c + 8 == dp
        if c == 0 and last:
            best0, best1 = _set8_2_max(y, r, kn, X, i, c, best0, best1, r0, r1, r2, r3, r4, r5, r6, r7)
        elif c == 0:
            _set8_2(y, r, kn, X, i, c, r0, r1, r2, r3, r4, r5, r6, r7)
        elif last:
            best0, best1 = _add8_2_max(y, r, kn, X, i, c, best0, best1, r0, r1, r2, r3, r4, r5, r6, r7)
        else:
            _add8_2(y, r, kn, X, i, c, r0, r1, r2, r3, r4, r5, r6, r7)
    return best0, best1


# ---------------------------------------------------------------- kernels
@numba.njit(parallel=True, **NUMBA_OPTS)
def _forward(qkv_, out_, lse_, scale, KB, work_, kT_, vT_):
    # qkv [B, T, 3, h, d] (q, k, v of head hh: qkv[:, :, 0 / 1 / 2, hh]); out [B, T, h, d] (A, heads
    # merged); lse [B h, T]; kT, vT [B h, dp, T] filled here (keys consecutive, channels d..dp-1 zero:
    # dp is 4 or a multiple of 8); work [threads, 2 QB + 2, max(dp, KB)]: each thread's buffers
    qkv, out, lse, work = borrow(qkv_), borrow(out_), borrow(lse_), borrow(work_)
    kT, vT = borrow(kT_), borrow(vT_)
    B, T, _, h, d = qkv.shape
    BH = B * h
    dp = kT.shape[1]
    QB = QUERY_BLOCK
    KB = max(1, min(KB, T))
    nqb = (T + QB - 1) // QB
    zero = scale - scale                                # 0 in the input dtype
    for bh in numba.prange(BH):                         # k^T, v^T of every (batch, head)
        _keys_major_into(kT[bh], vT[bh], qkv, bh // h, bh % h, zero)
    for task in numba.prange(BH * nqb):
        bh = task // nqb
        b, hh = bh // h, bh % h
        i0 = (task % nqb) * QB
        qn = min(QB, T - i0)
        kb, vb = kT[bh], vT[bh]                         # [dp, T]
        w = work[numba.get_thread_id()]
        s, s2 = w[0], w[1]                              # two rows of scores, then of weights
        xs = w[2:2 + QB]                                # c q of the block (rows >= qn and channels >= d: 0)
        o = w[2 + QB:2 + 2 * QB]                        # running outputs o
        m = np.full(QB, -np.inf, dtype=qkv.dtype)       # running maxima m, sums l
        l = np.zeros(QB, dtype=qkv.dtype)
        for i in range(QB):
            for c in range(dp):
                xs[i, c] = qkv[b, i0 + i, 0, hh, c] * scale if (i < qn and c < d) else zero
                o[i, c] = zero
        for j0 in range(0, T, KB):
            kn = min(KB, T - j0)
            for i in range(0, qn, 2):                   # rows i, i + 1 (i + 1 may be a padding row)
                b0, b1 = _rows_2_max(s, s2, kn, xs, i, kb, j0, _key(m[i]), _key(m[i + 1]))   # S_ij = c q_i . k_j
                mx0, mx1 = _unkey(b0, zero), _unkey(b1, zero)                             # m_t = max(m_{t-1}, max_j S_ij)
                al0, al1 = softmax_exp(m[i] - mx0), softmax_exp(m[i + 1] - mx1)         # exp(m_{t-1} - m_t)
                if dp == 4:
                    f0, f1 = _exp_dot4_2(s, s2, kn, mx0, mx1, zero, vb[0, j0:j0 + kn], vb[1, j0:j0 + kn],
                                         vb[2, j0:j0 + kn], vb[3, j0:j0 + kn])
                    l[i] = l[i] * al0 + f0[0]
                    l[i + 1] = l[i + 1] * al1 + f1[0]
                    for t in range(4):
                        o[i, t] = o[i, t] * al0 + f0[1 + t]
                        o[i + 1, t] = o[i + 1, t] * al1 + f1[1 + t]
                else:
                    # s <- exp(S_ij - m_t): l_t = l_{t-1} alpha + sum_j exp(S_ij - m_t),
                    #                       o_t = o_{t-1} alpha + sum_j exp(S_ij - m_t) v_j
                    e0, e1 = _exp_dot8_2(s, s2, kn, mx0, mx1, zero, vb[0, j0:j0 + kn], vb[1, j0:j0 + kn],
                                         vb[2, j0:j0 + kn], vb[3, j0:j0 + kn], vb[4, j0:j0 + kn],
                                         vb[5, j0:j0 + kn], vb[6, j0:j0 + kn], vb[7, j0:j0 + kn])
                    l[i] = l[i] * al0 + e0[0]
                    l[i + 1] = l[i + 1] * al1 + e1[0]
                    for t in range(8):
                        o[i, t] = o[i, t] * al0 + e0[1 + t]
                        o[i + 1, t] = o[i + 1, t] * al1 + e1[1 + t]
                    for c in range(8, dp, 8):
                        u, v = _dot8_2(s, s2, kn, zero, vb[c, j0:j0 + kn], vb[c + 1, j0:j0 + kn],
                                       vb[c + 2, j0:j0 + kn], vb[c + 3, j0:j0 + kn], vb[c + 4, j0:j0 + kn],
                                       vb[c + 5, j0:j0 + kn], vb[c + 6, j0:j0 + kn], vb[c + 7, j0:j0 + kn])
                        for t in range(8):
                            o[i, c + t] = o[i, c + t] * al0 + u[t]
                            o[i + 1, c + t] = o[i + 1, c + t] * al1 + v[t]
                m[i] = mx0
                m[i + 1] = mx1
        for i in range(qn):
            inv = 1 / l[i]
            for c in range(d):
                out[b, i0 + i, hh, c] = o[i, c] * inv           # A = o / l
            lse[bh, i0 + i] = m[i] + math.log(l[i])             # L = m + log l


@numba.njit(parallel=True, **NUMBA_OPTS)
def _backward(qkv_, a_, lse_, da_, dqkv_, scale, KB, dp, tiles_, work_):
    # qkv, dqkv [B, T, 3, h, d] (q, k, v of head hh and their gradients at [:, :, 0 / 1 / 2, hh]);
    # a, da [B, T, h, d] (A and dA, heads merged); lse [B h, T];
    # dp: the channels computed (4, or d rounded up to a multiple of 8);
    # tiles [threads, 2 QB, >= KB], work [threads, 4 dp + 3 QB, >= max(dp, T)]: each thread's buffers
    # (rows wider than used: see _row_width)
    qkv, a, lse, da, dqkv = borrow(qkv_), borrow(a_), borrow(lse_), borrow(da_), borrow(dqkv_)
    tiles, work = borrow(tiles_), borrow(work_)
    B, T, _, h, d = qkv.shape
    BH = B * h
    QB = QUERY_BLOCK
    KB = max(1, min(KB, T))
    zero = scale - scale
    for bh in numba.prange(BH):
        b, hh = bh // h, bh % h
        tid = numba.get_thread_id()
        P = tiles[tid, 0:QB]                            # the tile of P [QB, KB]
        DS = tiles[tid, QB:2 * QB]                      # the tile of dS
        w = work[tid]
        dkT = w[0:dp]                                   # dk^T, dv^T [dp, T]: consecutive keys
        dvT = w[dp:2 * dp]
        xs = w[2 * dp:2 * dp + QB]                      # c q of the query block (rows >= qn: 0)
        g = w[2 * dp + QB:2 * dp + 2 * QB]              # dA of the query block
        dqb = w[2 * dp + 2 * QB:2 * dp + 3 * QB]        # dq of the query block (before the factor c)
        kb = w[2 * dp + 3 * QB:3 * dp + 3 * QB]         # k^T, v^T [dp, T] of this (batch, head)
        vb = w[3 * dp + 3 * QB:4 * dp + 3 * QB]
        _keys_major_into(kb, vb, qkv, b, hh, zero)
        Dv = np.zeros(QB, dtype=qkv.dtype)              # D_i = dA_i . A_i
        for c in range(dp):
            for j in range(T):
                dkT[c, j] = zero
                dvT[c, j] = zero
        for i0 in range(0, T, QB):
            qn = min(QB, T - i0)
            for i in range(QB):
                Di = zero
                for c in range(dp):
                    if i < qn and c < d:
                        xs[i, c] = qkv[b, i0 + i, 0, hh, c] * scale
                        g[i, c] = da[b, i0 + i, hh, c]
                        Di += g[i, c] * a[b, i0 + i, hh, c]
                    else:
                        xs[i, c] = zero
                        g[i, c] = zero
                    dqb[i, c] = zero
                Dv[i] = Di
            for j0 in range(0, T, KB):
                kn = min(KB, T - j0)
                # P = exp(S - L), dS = P (dP - D) of the tile (S = c q k^T, dP = dA v^T), two rows a pass
                for i in range(0, qn, 2):
                    L0, L1 = lse[bh, i0 + i], lse[bh, min(i0 + i + 1, T - 1)]
                    if dp == 8:
                        _p_ds8_2(P[i], DS[i], P[i + 1], DS[i + 1], kn, L0, Dv[i], L1, Dv[i + 1], xs, g, i,
                                 kb[0, j0:j0 + kn], kb[1, j0:j0 + kn], kb[2, j0:j0 + kn], kb[3, j0:j0 + kn],
                                 kb[4, j0:j0 + kn], kb[5, j0:j0 + kn], kb[6, j0:j0 + kn], kb[7, j0:j0 + kn],
                                 vb[0, j0:j0 + kn], vb[1, j0:j0 + kn], vb[2, j0:j0 + kn], vb[3, j0:j0 + kn],
                                 vb[4, j0:j0 + kn], vb[5, j0:j0 + kn], vb[6, j0:j0 + kn], vb[7, j0:j0 + kn])
                    elif dp == 4:
                        _p_ds4_2(P[i], DS[i], P[i + 1], DS[i + 1], kn, L0, Dv[i], L1, Dv[i + 1], xs, g, i,
                                 kb[0, j0:j0 + kn], kb[1, j0:j0 + kn], kb[2, j0:j0 + kn], kb[3, j0:j0 + kn],
                                 vb[0, j0:j0 + kn], vb[1, j0:j0 + kn], vb[2, j0:j0 + kn], vb[3, j0:j0 + kn])
                    else:                                                  # S and dP chunk by chunk
                        _rows_2(P[i], P[i + 1], kn, xs, i, kb, j0)
                        _rows_2(DS[i], DS[i + 1], kn, g, i, vb, j0)
                        _p_ds(P[i], DS[i], kn, L0, Dv[i])
                        _p_ds(P[i + 1], DS[i + 1], kn, L1, Dv[i + 1])
                for i in range(qn, QB):                                    # padding rows: P = dS = 0
                    for jj in range(kn):
                        P[i, jj] = zero
                        DS[i, jj] = zero
                for i in range(0, qn, 2):                                  # dq += dS k
                    if dp == 4:
                        u4, v4 = _dot4_2(DS[i], DS[i + 1], kn, zero, kb[0, j0:j0 + kn], kb[1, j0:j0 + kn],
                                         kb[2, j0:j0 + kn], kb[3, j0:j0 + kn])
                        for t in range(4):
                            dqb[i, t] += u4[t]
                            dqb[i + 1, t] += v4[t]
                    else:
                        for c in range(0, dp, 8):
                            u, v = _dot8_2(DS[i], DS[i + 1], kn, zero, kb[c, j0:j0 + kn], kb[c + 1, j0:j0 + kn],
                                           kb[c + 2, j0:j0 + kn], kb[c + 3, j0:j0 + kn], kb[c + 4, j0:j0 + kn],
                                           kb[c + 5, j0:j0 + kn], kb[c + 6, j0:j0 + kn], kb[c + 7, j0:j0 + kn])
                            for t in range(8):
                                dqb[i, c + t] += u[t]
                                dqb[i + 1, c + t] += v[t]
                for c in range(0, dp, 4):                                  # dv += P^T dA,  dk += dS^T (c q)
                    _axpy8x4(dvT[c, j0:j0 + kn], dvT[c + 1, j0:j0 + kn], dvT[c + 2, j0:j0 + kn],
                             dvT[c + 3, j0:j0 + kn], kn, g, c, P[0, :kn], P[1, :kn], P[2, :kn], P[3, :kn],
                             P[4, :kn], P[5, :kn], P[6, :kn], P[7, :kn])
                    _axpy8x4(dkT[c, j0:j0 + kn], dkT[c + 1, j0:j0 + kn], dkT[c + 2, j0:j0 + kn],
                             dkT[c + 3, j0:j0 + kn], kn, xs, c, DS[0, :kn], DS[1, :kn], DS[2, :kn], DS[3, :kn],
                             DS[4, :kn], DS[5, :kn], DS[6, :kn], DS[7, :kn])
            for i in range(qn):
                for c in range(d):
                    dqkv[b, i0 + i, 0, hh, c] = dqb[i, c] * scale         # dq = c dS k
        for j in range(T):
            for c in range(d):
                dqkv[b, j, 1, hh, c] = dkT[c, j]
                dqkv[b, j, 2, hh, c] = dvT[c, j]


# ---------------------------------------------------------------- forward, query lanes (float32, d = 8)
# The query-lanes kernels are compiled without fastmath's reassoc: with it, LLVM turns each score's
# two independent 4-deep multiply-add chains (and the subtraction of M or L) into one 9-deep chain,
# and the loops become bound by that latency. The offsets -M, -L, -D are the first multiply-add's
# addends (one dependent step fewer).
LANE_OPTS = dict(NUMBA_OPTS, fastmath=set(NUMBA_OPTS["fastmath"]) - {"reassoc"})
LANES = 16                 # queries per task of the query-lanes forward: one f32x16 value per channel
LANE_KEYS = 64             # keys summed in registers before they are added to the task's totals


@numba.njit(**LANE_OPTS)
def _score16(qkv, b, j, hh, x0, x1, x2, x3, x4, x5, x6, x7):
    """x_i . k_j for the 16 queries of the lanes of x_c (x = (c log2 e) q^T: S_ij log2 e) and key j of head hh."""
    return add16(fma16(x3, splat16(qkv[b, j, 1, hh, 3]), fma16(x2, splat16(qkv[b, j, 1, hh, 2]),
                 fma16(x1, splat16(qkv[b, j, 1, hh, 1]), mul16(x0, splat16(qkv[b, j, 1, hh, 0]))))),
                 fma16(x7, splat16(qkv[b, j, 1, hh, 7]), fma16(x6, splat16(qkv[b, j, 1, hh, 6]),
                 fma16(x5, splat16(qkv[b, j, 1, hh, 5]), mul16(x4, splat16(qkv[b, j, 1, hh, 4]))))))


@numba.njit(**LANE_OPTS)
def _fma_row8(u, qkv, b, j, s, hh, a0, a1, a2, a3, a4, a5, a6, a7):
    """a_c + u qkv[b, j, s, hh, c] for c < 8 (s = 1: k_j, s = 2: v_j), one multiply-add each."""
    return (fma16(u, splat16(qkv[b, j, s, hh, 0]), a0), fma16(u, splat16(qkv[b, j, s, hh, 1]), a1),
            fma16(u, splat16(qkv[b, j, s, hh, 2]), a2), fma16(u, splat16(qkv[b, j, s, hh, 3]), a3),
            fma16(u, splat16(qkv[b, j, s, hh, 4]), a4), fma16(u, splat16(qkv[b, j, s, hh, 5]), a5),
            fma16(u, splat16(qkv[b, j, s, hh, 6]), a6), fma16(u, splat16(qkv[b, j, s, hh, 7]), a7))


@numba.njit(**LANE_OPTS)
def _score16_minus(qkv, b, j, hh, x0, x1, x2, x3, x4, x5, x6, x7, nm):
    """_score16 + nm (nm = -M or -L, log2 units) with the offset as the first multiply-add's addend."""
    return add16(fma16(x3, splat16(qkv[b, j, 1, hh, 3]), fma16(x2, splat16(qkv[b, j, 1, hh, 2]),
                 fma16(x1, splat16(qkv[b, j, 1, hh, 1]), fma16(x0, splat16(qkv[b, j, 1, hh, 0]), nm)))),
                 fma16(x7, splat16(qkv[b, j, 1, hh, 7]), fma16(x6, splat16(qkv[b, j, 1, hh, 6]),
                 fma16(x5, splat16(qkv[b, j, 1, hh, 5]), mul16(x4, splat16(qkv[b, j, 1, hh, 4]))))))


@numba.njit(**NUMBA_OPTS)
def _load8(a, off, stride):
    """The 8 vectors a[off + c stride : off + c stride + 16], c < 8 (a channel-major block of 16 lanes)."""
    return (load16(a, off), load16(a, off + stride), load16(a, off + 2 * stride), load16(a, off + 3 * stride),
            load16(a, off + 4 * stride), load16(a, off + 5 * stride), load16(a, off + 6 * stride),
            load16(a, off + 7 * stride))


@numba.njit(**NUMBA_OPTS)
def _store8(a, off, stride, v0, v1, v2, v3, v4, v5, v6, v7):
    """a[off + c stride : off + c stride + 16] = v_c, c < 8."""
    store16(a, off, v0)
    store16(a, off + stride, v1)
    store16(a, off + 2 * stride, v2)
    store16(a, off + 3 * stride, v3)
    store16(a, off + 4 * stride, v4)
    store16(a, off + 5 * stride, v5)
    store16(a, off + 6 * stride, v6)
    store16(a, off + 7 * stride, v7)


@numba.njit(**LANE_OPTS)
def _add_rows(w, l, o0, o1, o2, o3, o4, o5, o6, o7):
    """w[9] += l, w[10 + c] += o_c (the query-lanes forward's totals, one row of 16 lanes each)."""
    store16(w[9], 0, add16(load16(w[9], 0), l))
    store16(w[10], 0, add16(load16(w[10], 0), o0))
    store16(w[11], 0, add16(load16(w[11], 0), o1))
    store16(w[12], 0, add16(load16(w[12], 0), o2))
    store16(w[13], 0, add16(load16(w[13], 0), o3))
    store16(w[14], 0, add16(load16(w[14], 0), o4))
    store16(w[15], 0, add16(load16(w[15], 0), o5))
    store16(w[16], 0, add16(load16(w[16], 0), o6))
    store16(w[17], 0, add16(load16(w[17], 0), o7))
_LOOSE_32 = np.float32(math.exp(-60.0))
_L2E_32 = np.float32(1.0 / math.log(2.0))       # log2 e: the query-lanes kernels' scores are in log2 units
_LN2 = math.log(2.0)
_L2E = 1.0 / math.log(2.0)


@numba.njit(parallel=True, **LANE_OPTS)
def _forward_lanes(qkv_, out_, lse_, scale, work_, kmax_):
    # float32, d = 8. qkv [B, T, 3, h, 8]; out [B, T, h, 8] (A); lse [B h, T]; kmax [B h] (filled here:
    # max_j |k_j|); work [threads, 18, 16]: rows 0-7 (c log2 e) q^T of the 16 queries, 8 the bound M (then
    # the maximum m), 9 the sums l, 10-17 the outputs o (channel-major: one row of 16 lanes per channel).
    # Scores, M and m are in log2 units (S' = S log2 e, exp(S - M) = 2^(S' - M'): simd.exp2_16); the
    # formulas below are written in natural units.
    # Forward of 16 queries i (lanes) at once, keys j one by one, every per-query value an f32x16:
    #   fast path:  M_i = |c q_i| max_j |k_j| >= S_ij (Cauchy-Schwarz), so with no running maximum
    #               l_i = sum_j exp(S_ij - M_i),  o_i = sum_j exp(S_ij - M_i) v_j,  A = o / l,  L = M + log l
    #               (stored as L = M' ln 2 + log l);
    #   exact when no term that matters underflows: l_i <= T exp(max_j S_ij - M_i), so l_i > T e^-60
    #   gives max_j S_ij - M_i > -60 and the terms lost below exp(-86.5) are < e^-26 of the largest.
    #   Otherwise (or for non-finite input) the 16 queries are redone with the running maximum
    #   (the online softmax, one key per step): m' = max(m, S_ij), l = l e^(m - m') + e^(S_ij - m'),
    #   o = o e^(m - m') + e^(S_ij - m') v_j.
    qkv, out, lse, work, kmax = borrow(qkv_), borrow(out_), borrow(lse_), borrow(work_), borrow(kmax_)
    B, T, _, h, d = qkv.shape
    BH = B * h
    nqb = (T + LANES - 1) // LANES
    zero = scale - scale
    loose = np.float32(T) * _LOOSE_32
    for bh in numba.prange(BH):
        b, hh = bh // h, bh % h
        best = zero
        for j in range(T):
            n2 = zero
            for c in range(8):
                n2 += qkv[b, j, 1, hh, c] * qkv[b, j, 1, hh, c]
            best = max(best, n2)
        kmax[bh] = math.sqrt(best)
    for task in numba.prange(BH * nqb):
        bh = task // nqb
        b, hh = bh // h, bh % h
        i0 = (task % nqb) * LANES
        qn = min(LANES, T - i0)
        w = work[numba.get_thread_id()]
        for t in range(LANES):
            n2 = zero
            for c in range(8):
                x = (qkv[b, i0 + t, 0, hh, c] * scale) * _L2E_32 if t < qn else zero   # log2 units
                w[c, t] = x
                n2 += x * x
            w[8, t] = math.sqrt(n2) * kmax[bh]
        x0, x1, x2, x3 = load16(w[0], 0), load16(w[1], 0), load16(w[2], 0), load16(w[3], 0)
        x4, x5, x6, x7 = load16(w[4], 0), load16(w[5], 0), load16(w[6], 0), load16(w[7], 0)
        M = load16(w[8], 0)
        z = splat16(zero)
        nM = sub16(z, M)
        for r in range(9, 18):
            store16(w[r], 0, z)
        for j0 in range(0, T, LANE_KEYS):                           # sums of 64 keys, then added up:
            l, o0, o1, o2, o3, o4, o5, o6, o7 = z, z, z, z, z, z, z, z, z   # rounding ~ (64 + T / 64) eps
            j1 = min(j0 + LANE_KEYS, T)
            for j in range(j0, j1 - 1, 2):                          # two keys a step (independent chains)
                u = exp2_16(_score16_minus(qkv, b, j, hh, x0, x1, x2, x3, x4, x5, x6, x7, nM))   # exp(S_ij - M_i)
                e = exp2_16(_score16_minus(qkv, b, j + 1, hh, x0, x1, x2, x3, x4, x5, x6, x7, nM))
                l = add16(add16(l, u), e)
                o0, o1, o2, o3, o4, o5, o6, o7 = _fma_row8(u, qkv, b, j, 2, hh, o0, o1, o2, o3, o4, o5, o6, o7)
                o0, o1, o2, o3, o4, o5, o6, o7 = _fma_row8(e, qkv, b, j + 1, 2, hh, o0, o1, o2, o3, o4, o5, o6, o7)
            if (j1 - j0) % 2 == 1:                                  # the odd key
                j = j1 - 1
                u = exp2_16(_score16_minus(qkv, b, j, hh, x0, x1, x2, x3, x4, x5, x6, x7, nM))
                l = add16(l, u)
                o0, o1, o2, o3, o4, o5, o6, o7 = _fma_row8(u, qkv, b, j, 2, hh, o0, o1, o2, o3, o4, o5, o6, o7)
            _add_rows(w, l, o0, o1, o2, o3, o4, o5, o6, o7)
        exact = True
        for t in range(qn):
            if not w[9, t] > loose:                                 # also for nan
                exact = False
        if not exact:
            m = splat16(np.float32(-np.inf))
            l, o0, o1, o2, o3, o4, o5, o6, o7 = z, z, z, z, z, z, z, z, z
            for j in range(T):
                s = _score16(qkv, b, j, hh, x0, x1, x2, x3, x4, x5, x6, x7)
                mn = max16(s, m)                                    # m' = max(m, S_ij)
                al = exp2_16(sub16(m, mn))                            # e^(m - m')
                u = exp2_16(sub16(s, mn))                             # e^(S_ij - m')
                l = fma16(l, al, u)
                o0 = fma16(o0, al, mul16(u, splat16(qkv[b, j, 2, hh, 0])))
                o1 = fma16(o1, al, mul16(u, splat16(qkv[b, j, 2, hh, 1])))
                o2 = fma16(o2, al, mul16(u, splat16(qkv[b, j, 2, hh, 2])))
                o3 = fma16(o3, al, mul16(u, splat16(qkv[b, j, 2, hh, 3])))
                o4 = fma16(o4, al, mul16(u, splat16(qkv[b, j, 2, hh, 4])))
                o5 = fma16(o5, al, mul16(u, splat16(qkv[b, j, 2, hh, 5])))
                o6 = fma16(o6, al, mul16(u, splat16(qkv[b, j, 2, hh, 6])))
                o7 = fma16(o7, al, mul16(u, splat16(qkv[b, j, 2, hh, 7])))
                m = mn
            store16(w[8], 0, m)
            for r in range(9, 18):
                store16(w[r], 0, z)
            _add_rows(w, l, o0, o1, o2, o3, o4, o5, o6, o7)
        for t in range(qn):
            inv = 1 / w[9, t]
            for c in range(8):
                out[b, i0 + t, hh, c] = w[10 + c, t] * inv                  # A = o / l
            lse[bh, i0 + t] = w[8, t] * _LN2 + math.log(w[9, t])            # L = M ln 2 + log l (or m ln 2 + log l)


@numba.njit(parallel=True, **LANE_OPTS)
def _backward_tiles(qkv_, a_, lse_, da_, dqkv_, scale, Tp, work_):
    # float32, d = 8; one task per (batch, head) (the only writer of its dk, dv). work [threads, W]:
    # xs, gs [8, 16] (c q^T, dA^T of a block of 16 queries), ld [2, 16] (L log2 e, D), dq [8, 16],
    # tiles P, dS [16 keys, 16 queries] and their transposes, dkT, dvT [8, Tp] (Tp: the row stride, >= T
    # rounded up to 16; see _row_width).
    # Per tile of 16 queries (lanes) x 16 keys: P = exp(S - L) = 2^(S log2 e - L log2 e) (scores in log2
    # units as in the forward: the registers x hold (c log2 e) q^T), dP = dA v^T, dS = P (dP - D) built
    # key by key in query lanes and stored as tiles; dq += dS k over the tile's keys (from the stored
    # dS, added to the dq scratch); then P and dS transposed (16 x 16 shuffles) and dv += P^T dA,
    # dk += dS^T (c q) accumulated in key lanes.
    qkv, a, lse, da, dqkv, work = borrow(qkv_), borrow(a_), borrow(lse_), borrow(da_), borrow(dqkv_), borrow(work_)
    B, T, _, h, d = qkv.shape
    BH = B * h
    zero = scale - scale
    inf = np.float32(np.inf)
    for bh in numba.prange(BH):
        b, hh = bh // h, bh % h
        w = work[numba.get_thread_id()]
        xs, gs, ld, dqs = w[0:128], w[128:256], w[256:288], w[288:416]
        pt, dst, ptt, dstt = w[416:672], w[672:928], w[928:1184], w[1184:1440]
        dkT, dvT = w[1440:1440 + 8 * Tp], w[1440 + 8 * Tp:1440 + 16 * Tp]
        for t in range(16 * Tp):
            w[1440 + t] = zero
        for i0 in range(0, T, LANES):
            qn = min(LANES, T - i0)
            for t in range(LANES):
                Dt = zero
                for c in range(8):
                    if t < qn:
                        xs[16 * c + t] = qkv[b, i0 + t, 0, hh, c] * scale
                        gs[16 * c + t] = da[b, i0 + t, hh, c]
                        Dt += da[b, i0 + t, hh, c] * a[b, i0 + t, hh, c]       # D_i = dA_i . A_i
                    else:
                        xs[16 * c + t] = zero
                        gs[16 * c + t] = zero
                ld[t] = lse[bh, i0 + t] * _L2E if t < qn else inf               # L log2 e; padding rows: P = 0
                ld[16 + t] = Dt
            x0, x1, x2, x3, x4, x5, x6, x7 = _load8(xs, 0, 16)                 # c q^T, then in log2 units
            l2e = splat16(_L2E_32)                                             # (the forward's x, bit for bit)
            x0, x1, x2, x3 = mul16(x0, l2e), mul16(x1, l2e), mul16(x2, l2e), mul16(x3, l2e)
            x4, x5, x6, x7 = mul16(x4, l2e), mul16(x5, l2e), mul16(x6, l2e), mul16(x7, l2e)
            g0, g1, g2, g3, g4, g5, g6, g7 = _load8(gs, 0, 16)
            z = splat16(zero)
            nL, nD = sub16(z, load16(ld, 0)), sub16(z, load16(ld, 16))
            for r in range(0, 128, 16):
                store16(dqs, r, z)
            for j0 in range(0, T, LANES):
                kn = min(LANES, T - j0)
                for jj in range(kn):
                    j = j0 + jj
                    p = exp2_16(_score16_minus(qkv, b, j, hh, x0, x1, x2, x3, x4, x5, x6, x7, nL))   # P_ij = 2^(S_ij - L_i) (log2 units)
                    dp = add16(fma16(g3, splat16(qkv[b, j, 2, hh, 3]), fma16(g2, splat16(qkv[b, j, 2, hh, 2]),
                               fma16(g1, splat16(qkv[b, j, 2, hh, 1]), fma16(g0, splat16(qkv[b, j, 2, hh, 0]), nD)))),
                               fma16(g7, splat16(qkv[b, j, 2, hh, 7]), fma16(g6, splat16(qkv[b, j, 2, hh, 6]),
                               fma16(g5, splat16(qkv[b, j, 2, hh, 5]), mul16(g4, splat16(qkv[b, j, 2, hh, 4]))))))
                    store16(pt, 16 * jj, p)
                    store16(dst, 16 * jj, mul16(p, dp))                        # dS = P (dP - D)
                for jj in range(kn, LANES):                                    # keys beyond T: 0
                    store16(pt, 16 * jj, z)
                    store16(dst, 16 * jj, z)
                q0, q1, q2, q3, q4, q5, q6, q7 = _load8(dqs, 0, 16)
                for jj in range(kn):                                           # dq += dS k (this tile's keys)
                    j = j0 + jj
                    q0, q1, q2, q3, q4, q5, q6, q7 = _fma_row8(load16(dst, 16 * jj), qkv, b, j, 1, hh,
                                                               q0, q1, q2, q3, q4, q5, q6, q7)
                _store8(dqs, 0, 16, q0, q1, q2, q3, q4, q5, q6, q7)
                transpose16x16(pt, 0, ptt, 0)                                  # rows: queries, lanes: keys
                transpose16x16(dst, 0, dstt, 0)
                v0, v1, v2, v3, v4, v5, v6, v7 = _load8(dvT, j0, Tp)            # dv^T, dk^T of the 16 keys
                e0, e1, e2, e3, e4, e5, e6, e7 = _load8(dkT, j0, Tp)
                for t in range(qn):
                    pr, sr = load16(ptt, 16 * t), load16(dstt, 16 * t)
                    v0 = fma16(pr, splat16(gs[t]), v0)                         # dv_j += P_ij dA_i
                    v1 = fma16(pr, splat16(gs[16 + t]), v1)
                    v2 = fma16(pr, splat16(gs[32 + t]), v2)
                    v3 = fma16(pr, splat16(gs[48 + t]), v3)
                    v4 = fma16(pr, splat16(gs[64 + t]), v4)
                    v5 = fma16(pr, splat16(gs[80 + t]), v5)
                    v6 = fma16(pr, splat16(gs[96 + t]), v6)
                    v7 = fma16(pr, splat16(gs[112 + t]), v7)
                    e0 = fma16(sr, splat16(xs[t]), e0)                         # dk_j += dS_ij (c q_i)
                    e1 = fma16(sr, splat16(xs[16 + t]), e1)
                    e2 = fma16(sr, splat16(xs[32 + t]), e2)
                    e3 = fma16(sr, splat16(xs[48 + t]), e3)
                    e4 = fma16(sr, splat16(xs[64 + t]), e4)
                    e5 = fma16(sr, splat16(xs[80 + t]), e5)
                    e6 = fma16(sr, splat16(xs[96 + t]), e6)
                    e7 = fma16(sr, splat16(xs[112 + t]), e7)
                _store8(dvT, j0, Tp, v0, v1, v2, v3, v4, v5, v6, v7)
                _store8(dkT, j0, Tp, e0, e1, e2, e3, e4, e5, e6, e7)
            for t in range(qn):
                for c in range(8):
                    dqkv[b, i0 + t, 0, hh, c] = dqs[16 * c + t] * scale         # dq = c dS k
        for j in range(T):
            for c in range(8):
                dqkv[b, j, 1, hh, c] = dkT[c * Tp + j]
                dqkv[b, j, 2, hh, c] = dvT[c * Tp + j]


@numba.njit(**NUMBA_OPTS)
def _keys_major_into(kT, vT, qkv, b, hh, zero):
    # kT[c, j] = k[j, c], vT[c, j] = v[j, c] of (batch b, head hh) for c < d; 0 for d <= c < dp
    T, d, dp = qkv.shape[1], qkv.shape[4], kT.shape[0]
    for j in range(T):
        for c in range(dp):
            kT[c, j] = qkv[b, j, 1, hh, c] if c < d else zero
            vT[c, j] = qkv[b, j, 2, hh, c] if c < d else zero


def _threads():
    return int(numba.config.NUMBA_NUM_THREADS)      # the pool's size: every numba.get_thread_id() is below


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


def _merged_base(x):
    """The C-contiguous [B, T, h, d] array whose transpose (0, 2, 1, 3) is x [B, h, T, d], when x is
    such a view (SelfAttention's A, dA); else None."""
    y = x.transpose(0, 2, 1, 3)
    return y if y.flags.c_contiguous else None


def _packed_base(q, k, v):
    """The C-contiguous [B, T, 3, h, d] array qkv with q, k, v = qkv[:, :, 0 / 1 / 2].transpose(0, 2, 1, 3),
    when q, k, v are such views of one buffer (SelfAttention's split of its qkv); else None.
    Every element of that array is an element of q, k or v, so the view covers only their memory."""
    B, h, T, d = q.shape
    s = q.itemsize
    y = q.transpose(0, 2, 1, 3)
    want = (T * 3 * h * d * s, 3 * h * d * s, d * s, s)
    if y.strides != want or k.strides != q.strides or v.strides != q.strides:
        return None
    if k.ctypes.data != q.ctypes.data + h * d * s or v.ctypes.data != q.ctypes.data + 2 * h * d * s:
        return None
    return np.lib.stride_tricks.as_strided(q, shape=(B, T, 3, h, d),
                                           strides=(T * 3 * h * d * s, 3 * h * d * s, h * d * s, d * s, s))


def _packed(q, k, v, dtype):
    """q, k, v [B, h, T, d] as one C-contiguous [B, T, 3, h, d] array (no copy when they are views of one)."""
    base = _packed_base(q, k, v) if q.dtype == dtype and k.dtype == dtype and v.dtype == dtype else None
    if base is not None:
        return base
    B, h, T, d = q.shape
    out = np.empty((B, T, 3, h, d), dtype=dtype)
    for t, x in enumerate((q, k, v)):
        out[:, :, t] = x.transpose(0, 2, 1, 3)
    return out


def _merged(x, dtype):
    """x [B, h, T, d] as a C-contiguous [B, T, h, d] array (no copy when x is a transpose of one)."""
    base = _merged_base(x) if x.dtype == dtype else None
    return base if base is not None else np.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=dtype)


def _row_width(n, itemsize):
    """A row width (elements) >= n for the backward's tiles and scratch rows: n rounded up to 16, plus 16
    when the row would be a multiple of 2 KB long. Rows 2 KB apart (T = 512 in float32) put the 20
    rows a backward pass reads and writes at one offset into two of the L1 cache's sets (8 ways
    each), where they evict each other; 64 bytes more per row spreads them over distinct sets."""
    w = -(-n // 16) * 16
    return w + 16 if (w * itemsize) % 2048 == 0 else w


def _padded_dim(d):
    """The channels the kernels compute with: 4 for d <= 4, else d rounded up to a multiple of 8."""
    return 4 if d <= 4 else -(-d // 8) * 8


# The kernels take the layer's own layouts, C-contiguous: q, k, v packed as qkv [B, T, 3, h, d]
# (SelfAttention's proj1 output) and A, dA as [B, T, h, d] (heads merged); they transpose k and v
# to keys-major rows themselves (in parallel, per (batch, head)) and write A and dq, dk, dv in place.
# Callers with other layouts get one copy here. One signature per dtype to compile and cache.
def attention_forward(q, k, v, out=None, key_block=KEY_BLOCK, query_lanes=True):
    """(A, L) of softmax(q k^T / sqrt(d)) v for q, k, v ``[B, h, T, d]`` (any strides).

    ``A`` ``[B, h, T, d]`` is written into ``out`` when given (may be a strided view), else returned
    as the transposed view of a new ``[B, T, h, d]`` array; ``L`` ``[B, h, T]`` is the row
    log-sum-exp of the scores (what the backward needs).
    No copies when q, k, v are the views ``qkv[:, :, 0 / 1 / 2].transpose(0, 2, 1, 3)`` of one
    C-contiguous ``qkv [B, T, 3, h, d]`` and ``out`` the view ``A.transpose(0, 2, 1, 3)`` of a
    C-contiguous ``[B, T, h, d]`` (as SelfAttention passes them); otherwise one copy each.
    ``key_block``: keys per tile of the online softmax (tests use small ones to run the recurrence
    over many blocks). float32 with d = 8 runs the query-lanes kernel :func:`_forward_lanes` (16
    queries per vector, no key blocks; ``query_lanes=False`` forces the key-block kernel).
    """
    _check(q, k, v)
    B, h, T, d = q.shape
    dtype = q.dtype
    dp = _padded_dim(d)
    scale = dtype.type(1.0 / math.sqrt(d))
    kb = int(_check_block(key_block))
    base = _merged_base(out) if out is not None and out.shape == q.shape and out.dtype == dtype else None
    a = base if base is not None else np.empty((B, T, h, d), dtype=dtype)
    lse = np.empty((B * h, T), dtype=dtype)
    if query_lanes and dtype == np.float32 and d == 8:
        _forward_lanes(_packed(q, k, v, dtype), a, lse, scale, np.empty((_threads(), 18, LANES), dtype=dtype),
                       np.empty(B * h, dtype=dtype))
    else:
        work = np.empty((_threads(), 2 * QUERY_BLOCK + 2, max(dp, min(kb, T))), dtype=dtype)
        kT, vT = np.empty((B * h, dp, T), dtype=dtype), np.empty((B * h, dp, T), dtype=dtype)
        _forward(_packed(q, k, v, dtype), a, lse, scale, np.int64(kb), work, kT, vT)
    A = a.transpose(0, 2, 1, 3)
    if out is None:
        return A, lse.reshape(B, h, T)
    if base is None:
        out[...] = A
    return out, lse.reshape(B, h, T)


def attention_backward(q, k, v, a, lse, da, dq=None, dk=None, dv=None, key_block=KEY_BLOCK, query_lanes=True):
    """(dq, dk, dv) ``[B, h, T, d]`` from the forward's inputs, output ``a``, ``lse`` and upstream ``da``.

    The outputs are written into ``dq``, ``dk``, ``dv`` when given (strided views allowed; no copy
    when they are the three views of one C-contiguous ``[B, T, 3, h, d]``, as for q, k, v in
    :func:`attention_forward`), else returned as such views of a new array. float32 with d = 8
    runs the tiled kernel :func:`_backward_tiles` (``query_lanes=False``: the key-block kernel).
    """
    _check(q, k, v)
    B, h, T, d = q.shape
    if a.shape != q.shape or da.shape != q.shape or lse.shape != (B, h, T):
        raise ValueError(f"fused attention backward: a and da must have q's shape {q.shape} and lse "
                         f"{(B, h, T)}; got {a.shape}, {da.shape}, {lse.shape}")
    dtype = q.dtype
    dp = _padded_dim(d)
    scale = dtype.type(1.0 / math.sqrt(d))
    kb = int(_check_block(key_block))
    given = dq is not None and dk is not None and dv is not None
    base = _packed_base(dq, dk, dv) if given and dq.shape == q.shape and dk.shape == q.shape and \
        dv.shape == q.shape and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype else None
    dqkv = base if base is not None else np.empty((B, T, 3, h, d), dtype=dtype)
    args = (_packed(q, k, v, dtype), _merged(a, dtype), np.ascontiguousarray(lse, dtype=dtype).reshape(B * h, T),
            _merged(da, dtype), dqkv, scale)
    if query_lanes and dtype == np.float32 and d == 8:
        Tp = _row_width(T, dtype.itemsize)
        _backward_tiles(*args, np.int64(Tp), np.empty((_threads(), 1440 + 16 * Tp), dtype=dtype))
    else:
        tiles = np.empty((_threads(), 2 * QUERY_BLOCK, _row_width(min(kb, T), dtype.itemsize)), dtype=dtype)
        work = np.empty((_threads(), 4 * dp + 3 * QUERY_BLOCK, _row_width(max(dp, T), dtype.itemsize)), dtype=dtype)
        _backward(*args, np.int64(kb), np.int64(dp), tiles, work)
    grads = [dqkv[:, :, t].transpose(0, 2, 1, 3) for t in range(3)]
    if base is None:
        for t, dst in enumerate((dq, dk, dv)):
            if dst is not None:
                dst[...] = grads[t]
                grads[t] = dst
    return tuple(grads)
