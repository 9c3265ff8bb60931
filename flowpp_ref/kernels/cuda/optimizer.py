"""CuPy kernels of the fused optimiser step (:mod:`flowpp_ref.training.fused`): one source text built for
the GPU and, in the tests, for the CPU (:mod:`flowpp_ref.kernels.cuda.build`).

Three launches over flat buffers (parameters p, gradients g, Adam moments m, v, EMA shadow s)::

    sumsq_partial     (P work items)   partial[i] = sum_{j = i, i + P, ...} g_j^2              (double)
    step_finish       (1 work item)    ||g|| = sqrt(sum_i partial[i]),  ok = loss and ||g|| finite
                                       c = ok ? max_norm / max(||g||, max_norm) : 0       (clipping)
                                       t' = t + ok (applied updates, Adam's and the EMA's counters)
                                       scal = [||g||, ok, c, lr / (1 - b1^t'), 1 / sqrt(1 - b2^t')]
    step_update       (N work items)   if ok:  g = c g
                                               m = b1 m + (1 - b1) g
                                               v = b2 v + (1 - b2) g^2          (Adam)
                                                 = max(b2 v, |g|)               (Adamax, Glow's release)
                                               p -= lr_t m / (sqrt(v) / sqrt(1 - b2^t') + eps)             (Adam)
                                                  -= lr_t sqrt(1 - b2^t') m / (v + eps)                     (Adamax)
                                               s = d s + (1 - d) p
                                       (lr_t = lr / (1 - b1^t'); t' = max(t', 1) in the corrections)

The counters are read from one buffer and written to another (the caller alternates them), so no
work item reads a value another one writes in the same launch.

**Ran on an H200** (a GPU test compares it with the numba twin in float64). The tests compare the CPU
build of this source with :func:`flowpp_ref.training.fused.fused_step_reference`.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.kernels.cuda import build

PARTIALS = 4096      # work items of the sum of squares: each adds every PARTIALS-th g_j^2 (coalesced reads)

ELEMENT_SOURCE = r"""
template <typename T>
FLOWPP_DEVICE void sumsq_partial_item(long long i, long long P, long long N, const T* g, double* partial) {
    double acc = 0;
    for (long long j = i; j < N; j += P) { double v = (double)g[j]; acc += v * v; }
    partial[i] = acc;
}

template <typename T>
FLOWPP_DEVICE void step_finish_item(long long P, const double* partial, const T* loss, const long long* cnt_in,
                                    long long* cnt_out, double* scal, double lr, double max_norm,
                                    double b1, double b2) {
    double sq = 0;
    for (long long k = 0; k < P; ++k) sq += partial[k];
    double gn = sqrt(sq), lo = (double)loss[0];
    int ok = fabs(gn) < FLOWPP_INF && fabs(lo) < FLOWPP_INF;          // false for inf and nan
    long long t = cnt_in[0] + ok, tb = t > 1 ? t : 1;
    cnt_out[0] = t;
    cnt_out[1] = cnt_in[1] + ok;
    scal[0] = gn;
    scal[1] = ok;
    scal[2] = ok ? max_norm / fmax(gn, max_norm) : 0.0;
    scal[3] = lr / (1.0 - pow(b1, (double)tb));
    scal[4] = 1.0 / sqrt(1.0 - pow(b2, (double)tb));
}

template <typename T>
FLOWPP_DEVICE void step_update_item(long long j, const T* g, const double* scal, T* p, T* m, T* v, T* s,
                                    double b1, double b2, double eps, double decay, int adamax) {
    if (scal[1] == 0) return;                                          // skipped step: nothing changes
    double gj = (double)g[j] * scal[2];
    double mj = b1 * (double)m[j] + (1.0 - b1) * gj;
    double vj = adamax ? fmax(b2 * (double)v[j], fabs(gj)) : b2 * (double)v[j] + (1.0 - b2) * gj * gj;
    double upd = adamax ? scal[3] / scal[4] * mj / (vj + eps) : scal[3] * mj / (sqrt(vj) * scal[4] + eps);
    T pj = (T)((double)p[j] - upd);
    m[j] = (T)mj;
    v[j] = (T)vj;
    p[j] = pj;
    s[j] = (T)(decay * (double)s[j] + (1.0 - decay) * (double)pj);
}
"""

ENTRIES = {
    "sumsq_partial": ("long long N, const {T}* g, double* partial", "sumsq_partial_item<{T}>(i, n, N, g, partial);"),
    "step_finish": ("long long P, const double* partial, const {T}* loss, const long long* cnt_in, long long* cnt_out, "
                    "double* scal, double lr, double max_norm, double b1, double b2",
                    "step_finish_item<{T}>(P, partial, loss, cnt_in, cnt_out, scal, lr, max_norm, b1, b2);"),
    "step_update": ("const {T}* g, const double* scal, {T}* p, {T}* m, {T}* v, {T}* s, double b1, double b2, "
                    "double eps, double decay, int adamax",
                    "step_update_item<{T}>(i, g, scal, p, m, v, s, b1, b2, eps, decay, adamax);"),
}


def cuda_source() -> str:
    return build.cuda_source(ELEMENT_SOURCE, ENTRIES)


def host_source() -> str:
    return build.host_source(ELEMENT_SOURCE, ENTRIES)


_kernels = build.RawModuleCache(cuda_source)


def fused_step(g, p, m, v, s, loss, cnt_in, cnt_out, scal, partial, *, lr, max_norm, b1, b2, eps, decay, adamax):
    """The three launches above on CuPy arrays (flat, C-contiguous, one dtype for g, p, m, v, s, loss)."""
    sfx = build.suffix(p.dtype)
    n, P = int(p.size), int(partial.size)
    _kernels.launch(f"sumsq_partial_{sfx}", P, np.int64(n), g, partial)
    _kernels.launch(f"step_finish_{sfx}", 1, np.int64(P), partial, loss, cnt_in, cnt_out, scal, np.float64(lr),
                    np.float64(max_norm), np.float64(b1), np.float64(b2))
    _kernels.launch(f"step_update_{sfx}", n, g, scal, p, m, v, s, np.float64(b1), np.float64(b2), np.float64(eps),
                    np.float64(decay), np.int32(bool(adamax)))
