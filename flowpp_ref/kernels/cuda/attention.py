"""Fused self-attention for CuPy: online-softmax forward and recomputing backward (RawKernels).

**Ran on an H200** (a GPU test compares it with the reference there); untiled, it was slower than
the plain batched-matmul path on that GPU, which is CuPy's default (``nn.attention.FUSED_DEFAULT``). The per-row math below is one C++ text built twice by
:mod:`flowpp_ref.kernels.cuda.build`: by NVRTC for CuPy (one thread per row), and by the
machine's C++ compiler in ``tests/test_fused_attention.py``, which compares the *same source*
with the plain-array reference (:func:`flowpp_ref.nn.attention.attention_ref` and
:func:`~flowpp_ref.nn.attention.attention_backward_ref`) in float64 and float32; ``nvcc``
compiles the GPU build there where it is installed.

Math: the derivation is in :mod:`flowpp_ref.kernels.numba.attention` (same formulas). Per
(batch, head) with c = 1 / sqrt(d), S = c q k^T, P = softmax_rows(S), L = row log-sum-exp::

    forward, thread = query row i (online softmax with key blocks of one key):
        s = c q_i . k_j;  if s > m: (l, o) *= exp(m - s), m = s;  l += exp(s - m);  o += exp(s - m) v_j
        A_i = o / l,  L_i = m + log l
    backward, D_i = dA_i . A_i (thread = row i), then
        thread = query row i:  dq_i = c sum_j P_ij (dA_i . v_j - D_i) k_j
        thread = key row j:    dv_j = sum_i P_ij dA_i,  dk_j = c sum_i P_ij (dA_i . v_j - D_i) q_i
    with P_ij = exp(c q_i . k_j - L_i) recomputed; nothing of size T x T is stored.

The query and key kernels each recompute the scores (no atomics; results deterministic).
Threads of a warp are consecutive rows of one (batch, head) and read the same key (or query)
at the same time. Not tiled in shared memory: a plain, checkable first version. Head
dimension at most :data:`MAX_HEAD_DIM` (a per-thread accumulator array). Arrays are C-contiguous
``[B, h, T, d]`` (the wrappers copy strided views).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.kernels.cuda import build

MAX_HEAD_DIM = 64

ELEMENT_SOURCE = r"""
#define FLOWPP_ATT_MAXD 64

template <typename T>
FLOWPP_DEVICE T att_dot(int d, const T* a, const T* b) {
    T s = 0;
    for (int e = 0; e < d; ++e) s += a[e] * b[e];
    return s;
}

// forward, one query row i of B*h*T: A_i = softmax(c q_i K^T) V, L_i = log sum_j exp(c q_i . k_j)
template <typename T>
FLOWPP_DEVICE void attention_fwd_row(long long i, int Tn, int d, const T* q, const T* k, const T* v,
                                     T* out, T* lse) {
    long long base = (i / Tn) * (long long)Tn * d;      // this (batch, head)
    const T* qi = q + i * d;
    T c = (T)1 / sqrt((T)d);
    T o[FLOWPP_ATT_MAXD];
    for (int e = 0; e < d; ++e) o[e] = 0;
    T m = -FLOWPP_INF, l = 0;
    for (int j = 0; j < Tn; ++j) {
        const T* kj = k + base + (long long)j * d;
        const T* vj = v + base + (long long)j * d;
        T s = c * att_dot<T>(d, qi, kj);
        if (s > m) {                                    // new running max: rescale by exp(m_old - m_new)
            T alpha = exp(m - s);                       // 0 on the first key (m = -inf)
            l *= alpha;
            for (int e = 0; e < d; ++e) o[e] *= alpha;
            m = s;
        }
        T p = exp(s - m);                               // <= 1: no overflow
        l += p;
        for (int e = 0; e < d; ++e) o[e] += p * vj[e];
    }
    T inv = (T)1 / l;
    for (int e = 0; e < d; ++e) out[i * d + e] = o[e] * inv;   // A = o / l
    lse[i] = m + log(l);                                       // L = m + log l
}

// D_i = dA_i . A_i (the softmax backward's row sum, from the output)
template <typename T>
FLOWPP_DEVICE void attention_rowdot_row(long long i, int d, const T* a, const T* da, T* D) {
    D[i] = att_dot<T>(d, a + i * d, da + i * d);
}

// dq_i = c sum_j P_ij (dA_i . v_j - D_i) k_j,   P_ij = exp(c q_i . k_j - L_i)
template <typename T>
FLOWPP_DEVICE void attention_bwd_q_row(long long i, int Tn, int d, const T* q, const T* k, const T* v,
                                       const T* lse, const T* da, const T* D, T* dq) {
    long long base = (i / Tn) * (long long)Tn * d;
    const T* qi = q + i * d; const T* gi = da + i * d;
    T c = (T)1 / sqrt((T)d);
    T Li = lse[i], Di = D[i];
    T acc[FLOWPP_ATT_MAXD];
    for (int e = 0; e < d; ++e) acc[e] = 0;
    for (int j = 0; j < Tn; ++j) {
        const T* kj = k + base + (long long)j * d;
        const T* vj = v + base + (long long)j * d;
        T p = exp(c * att_dot<T>(d, qi, kj) - Li);          // P = exp(S - L)
        T ds = p * (att_dot<T>(d, gi, vj) - Di);           // dS = P (dP - D),  dP = dA v^T
        for (int e = 0; e < d; ++e) acc[e] += ds * kj[e];
    }
    for (int e = 0; e < d; ++e) dq[i * d + e] = c * acc[e];
}

// key row j (= index i of B*h*T): dv_j = sum_r P_rj dA_r,  dk_j = c sum_r dS_rj q_r
template <typename T>
FLOWPP_DEVICE void attention_bwd_kv_row(long long i, int Tn, int d, const T* q, const T* k, const T* v,
                                        const T* lse, const T* da, const T* D, T* dk, T* dv) {
    long long bh = i / Tn;
    long long base = bh * (long long)Tn * d;
    const T* kj = k + i * d; const T* vj = v + i * d;
    T c = (T)1 / sqrt((T)d);
    T ak[FLOWPP_ATT_MAXD], av[FLOWPP_ATT_MAXD];
    for (int e = 0; e < d; ++e) { ak[e] = 0; av[e] = 0; }
    for (int r = 0; r < Tn; ++r) {
        const T* qr = q + base + (long long)r * d;
        const T* gr = da + base + (long long)r * d;
        long long row = bh * Tn + r;
        T p = exp(c * att_dot<T>(d, qr, kj) - lse[row]);
        T ds = p * (att_dot<T>(d, gr, vj) - D[row]);
        for (int e = 0; e < d; ++e) { av[e] += p * gr[e]; ak[e] += ds * qr[e]; }
    }
    for (int e = 0; e < d; ++e) { dk[i * d + e] = c * ak[e]; dv[i * d + e] = av[e]; }
}
"""

# name -> (arguments after "long long n" (n = B * h * T rows), per-row call)
ENTRIES = {
    "attention_fwd": ("int Tn, int d, const {T}* q, const {T}* k, const {T}* v, {T}* out, {T}* lse",
                      "attention_fwd_row<{T}>(i, Tn, d, q, k, v, out, lse);"),
    "attention_rowdot": ("int Tn, int d, const {T}* a, const {T}* da, {T}* D",
                         "attention_rowdot_row<{T}>(i, d, a, da, D);"),
    "attention_bwd_q": ("int Tn, int d, const {T}* q, const {T}* k, const {T}* v, const {T}* lse, "
                        "const {T}* da, const {T}* D, {T}* dq",
                        "attention_bwd_q_row<{T}>(i, Tn, d, q, k, v, lse, da, D, dq);"),
    "attention_bwd_kv": ("int Tn, int d, const {T}* q, const {T}* k, const {T}* v, const {T}* lse, "
                         "const {T}* da, const {T}* D, {T}* dk, {T}* dv",
                         "attention_bwd_kv_row<{T}>(i, Tn, d, q, k, v, lse, da, D, dk, dv);"),
}


def cuda_source() -> str:
    """The CUDA translation unit given to NVRTC."""
    return build.cuda_source(ELEMENT_SOURCE, ENTRIES)


def host_source() -> str:
    """The same per-row code as a C++ file for the CPU (tests only)."""
    return build.host_source(ELEMENT_SOURCE, ENTRIES)


_kernels = build.RawModuleCache(cuda_source)


def _check(q, k, v):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"fused attention: q, k, v must have one shape [B, h, T, d]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"fused attention (CUDA): head dimension {q.shape[-1]} > {MAX_HEAD_DIM}")
    build.suffix(q.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fused attention: q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def attention_forward(q, k, v, out=None):
    """(A ``[B, h, T, d]``, L ``[B, h, T]``) for CuPy q, k, v ``[B, h, T, d]``; A into ``out`` if given."""
    import cupy
    _check(q, k, v)
    B, h, T, d = q.shape
    q, k, v = (cupy.ascontiguousarray(x) for x in (q, k, v))
    a = cupy.empty(q.shape, q.dtype)
    lse = cupy.empty((B, h, T), q.dtype)
    _kernels.launch(f"attention_fwd_{build.suffix(q.dtype)}", B * h * T, np.int32(T), np.int32(d), q, k, v, a, lse)
    if out is None:
        return a, lse
    out[...] = a
    return out, lse


def attention_backward(q, k, v, a, lse, da, dq=None, dk=None, dv=None):
    """(dq, dk, dv) ``[B, h, T, d]`` (CuPy) from the forward's inputs, output, L and upstream ``da``."""
    import cupy
    _check(q, k, v)
    B, h, T, d = q.shape
    sfx = build.suffix(q.dtype)
    q, k, v, a, da, lse = (cupy.ascontiguousarray(x) for x in (q, k, v, a, da, lse))
    n, args = B * h * T, (np.int32(T), np.int32(d))
    D = cupy.empty((B, h, T), q.dtype)
    gq, gk, gv = (cupy.empty(q.shape, q.dtype) for _ in range(3))
    _kernels.launch(f"attention_rowdot_{sfx}", n, *args, a, da, D)
    _kernels.launch(f"attention_bwd_q_{sfx}", n, *args, q, k, v, lse, da, D, gq)
    _kernels.launch(f"attention_bwd_kv_{sfx}", n, *args, q, k, v, lse, da, D, gk, gv)
    res = []
    for g, o in ((gq, dq), (gk, dk), (gv, dv)):
        if o is None:
            res.append(g)
        else:
            o[...] = g
            res.append(o)
    return tuple(res)
