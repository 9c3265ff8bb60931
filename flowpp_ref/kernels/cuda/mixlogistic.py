"""Mixture-of-logistics kernels for CuPy: fused log F / log(1-F) / log p, its backward,
and the hybrid (safeguarded Newton) inverse CDF, one GPU thread per element.

**Run on an H200** (the GPU tests compare them with the references on the device). The per-element math below is plain C++ (templates over
float / double), built twice by
:mod:`flowpp_ref.kernels.cuda.build`: by NVRTC for CuPy (one thread per element), and
by the machine's C++ compiler for the tests, which compare the *same source text* with
the plain-array references of :mod:`flowpp_ref.bijections.mixlogistic` on machines without a GPU
(``tests/test_cuda_kernels_on_host.py``).

What the CPU compilation cannot check: that NVRTC accepts the source, the launch
configuration, and device-specific rounding (the tests' tolerances allow for it).

Math (the module docstring of :mod:`flowpp_ref.bijections.mixlogistic` derives it), per element,
everything in log space with an online (running-max) log-sum-exp over the K components::

    log w_k = l_k - LSE(l),  z_k = (x - mu_k) exp(-s_k),  L = log1p(exp(-|z_k|))
    log sig(z) = min(z,0) - L,  log sig(-z) = -max(z,0) - L
    log F = LSE_k[log w_k + log sig(z_k)],  log(1-F) = LSE_k[log w_k + log sig(-z_k)]
    log p = LSE_k[log w_k + log sig(z_k) + log sig(-z_k) - s_k]

Backward (responsibilities rF, rG, rP; upstream gF, gG, gP)::

    c_k = gF rF_k + gG rG_k + gP rP_k;  dl_k = c_k - w_k (gF + gG + gP)
    dz_k = gF rF_k sig(-z_k) - gG rG_k sig(z_k) + gP rP_k (sig(-z_k) - sig(z_k))
    dx = sum_k dz_k exp(-s_k);  dmu_k = -dz_k exp(-s_k);  ds_k = -dz_k z_k - gP rP_k

Inverse: rtsafe on g(x) = log F - log(1-F) - logit(y), bracket [min_k q_k, max_k q_k]
with q_k = mu_k + exp(s_k) logit(y), start sum_k w_k q_k; per-element stopping rule
(``|step| <= tol`` or bracket narrower than tol), exactly as ``_ref_invcdf_hybrid``.
The release's bisection has a *global* stopping rule (all elements at once), so it stays
on the plain-array reference on every backend (on CuPy with the rule evaluated on the device,
no host read per iteration: ``_ref_invcdf_bisection_device`` in
:mod:`flowpp_ref.bijections.mixlogistic`). :func:`invcdf_hybrid` returns per-element counts and
flags as device arrays; nothing here reads them back.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.kernels.cuda import build

# --------------------------------------------------------------------------- source
# Per-element functions. FLOWPP_DEVICE / FLOWPP_INF come from the prelude of each build.
ELEMENT_SOURCE = r"""
template <typename T>
struct LSE {                       // online log-sum-exp: value = m + log(s)
    T m; T s;
    FLOWPP_DEVICE void init() { m = -FLOWPP_INF; s = 0; }
    FLOWPP_DEVICE void add(T a) {
        if (a == -FLOWPP_INF) return;                 // exp(-inf) adds nothing
        if (a > m) { s = s * exp(m - a) + (T)1; m = a; }
        else { s += exp(a - m); }
    }
    FLOWPP_DEVICE T value() const { return m + log(s); }
};

template <typename T>
FLOWPP_DEVICE T lse_logits(int K, const T* l) {
    LSE<T> acc; acc.init();
    for (int k = 0; k < K; ++k) acc.add(l[k]);
    return acc.value();
}

// log sig(z) and log sig(-z) without cancellation
template <typename T>
FLOWPP_DEVICE void log_sigmoid_pair(T z, T* lsp, T* lsn) {
    T L = log1p(exp(-fabs(z)));
    *lsp = fmin(z, (T)0) - L;
    *lsn = -fmax(z, (T)0) - L;
}

template <typename T>
FLOWPP_DEVICE void mixlog_forward_elem(int K, T x, const T* l, const T* mu, const T* s,
                                       T* logF, T* log1mF, T* logp) {
    T lz = lse_logits<T>(K, l);
    LSE<T> aF, aG, aP; aF.init(); aG.init(); aP.init();
    for (int k = 0; k < K; ++k) {
        T lw = l[k] - lz;
        T z = (x - mu[k]) * exp(-s[k]);
        T lsp, lsn; log_sigmoid_pair<T>(z, &lsp, &lsn);
        aF.add(lw + lsp);
        aG.add(lw + lsn);
        aP.add(lw + lsp + lsn - s[k]);
    }
    *logF = aF.value(); *log1mF = aG.value(); *logp = aP.value();
}

template <typename T>
FLOWPP_DEVICE void mixlog_backward_elem(int K, T x, const T* l, const T* mu, const T* s,
                                        T gF, T gG, T gP, T* dx, T* dl, T* dmu, T* ds) {
    T logF, log1mF, logp;
    mixlog_forward_elem<T>(K, x, l, mu, s, &logF, &log1mF, &logp);
    T lz = lse_logits<T>(K, l);
    T gsum = gF + gG + gP;
    T acc = 0;
    for (int k = 0; k < K; ++k) {
        T lw = l[k] - lz;
        T ik = exp(-s[k]);
        T z = (x - mu[k]) * ik;
        T lsp, lsn; log_sigmoid_pair<T>(z, &lsp, &lsn);
        T rF = exp(lw + lsp - logF);                   // w sig(z) / F
        T rG = exp(lw + lsn - log1mF);                 // w sig(-z) / (1-F)
        T rP = exp(lw + lsp + lsn - s[k] - logp);      // w p_k / p
        T sp = exp(lsp), sn = exp(lsn);
        T c = gF * rF + gG * rG + gP * rP;             // dL/dlog w_k
        dl[k] = c - exp(lw) * gsum;                    // log-softmax backward
        T dz = gF * rF * sn - gG * rG * sp + gP * rP * (sn - sp);
        acc += dz * ik;                                // dL/dx = sum_k dz_k exp(-s_k)
        dmu[k] = -dz * ik;
        ds[k] = -dz * z - gP * rP;
    }
    *dx = acc;
}

template <typename T>
FLOWPP_DEVICE void mixlog_invcdf_hybrid_elem(int K, T y, const T* l, const T* mu, const T* s,
                                             T tol, int max_iters, T* xout, long long* evals,
                                             signed char* converged) {
    T t = log(y) - log1p(-y);                          // logit(y)
    T lz = lse_logits<T>(K, l);
    T lb = FLOWPP_INF, ub = -FLOWPP_INF, xs = 0;
    for (int k = 0; k < K; ++k) {                      // q_k = mu_k + exp(s_k) logit(y)
        T q = mu[k] + exp(s[k]) * t;
        lb = fmin(lb, q); ub = fmax(ub, q);
        xs += exp(l[k] - lz) * q;                      // start: sum_k w_k q_k
    }
    T x = fmin(fmax(xs, lb), ub);
    long long n = 0;
    if (!(ub - lb > tol)) {                            // K = 1 (or a tight bracket): done
        *xout = (lb + ub) / 2; *evals = 0; *converged = 1; return;
    }
    T dx = ub - lb, dx_old = dx;
    signed char done = 0;
    for (int it = 0; it < max_iters; ++it) {
        T lF, lG, lP;
        mixlog_forward_elem<T>(K, x, l, mu, s, &lF, &lG, &lP);
        ++n;
        T g = lF - lG - t;                             // logit F(x) - logit y
        if (g < 0) lb = x;                             // F(x) < y: root right of x
        if (g > 0) ub = x;
        T d = exp(lP - lF - lG);                       // d logit F / dx = p / (F (1-F))
        T nstep = -g / d;
        T newton = x + nstep;
        bool ok = (newton - newton == 0) && newton > lb && newton < ub
                  && fabs(2 * g) <= fabs(dx_old * d);  // inside the bracket and at least halving
        ok = ok || fabs(nstep) <= tol;                 // converged (may round onto x itself)
        T x_new = ok ? newton : (lb + ub) / 2;
        if (g == 0) x_new = x;
        T step = x_new - x;
        dx_old = dx; dx = step; x = x_new;
        if (fabs(step) <= tol || ub - lb <= tol) { done = 1; break; }
    }
    *xout = x; *evals = n; *converged = done;
}
"""

# Entry points: name -> (arguments after "long long n", per-element call with index i)
ENTRIES = {
    "mixlog_forward": (
        "int K, const {T}* x, const {T}* l, const {T}* mu, const {T}* s, {T}* logF, {T}* log1mF, {T}* logp",
        "mixlog_forward_elem<{T}>(K, x[i], l + i * K, mu + i * K, s + i * K, logF + i, log1mF + i, logp + i);"),
    "mixlog_backward": (
        "int K, const {T}* x, const {T}* l, const {T}* mu, const {T}* s, const {T}* gF, const {T}* gG, "
        "const {T}* gP, {T}* dx, {T}* dl, {T}* dmu, {T}* ds",
        "mixlog_backward_elem<{T}>(K, x[i], l + i * K, mu + i * K, s + i * K, gF[i], gG[i], gP[i], "
        "dx + i, dl + i * K, dmu + i * K, ds + i * K);"),
    "mixlog_invcdf_hybrid": (
        "int K, const {T}* y, const {T}* l, const {T}* mu, const {T}* s, double tol, int max_iters, "
        "{T}* x, long long* evals, signed char* converged",
        "mixlog_invcdf_hybrid_elem<{T}>(K, y[i], l + i * K, mu + i * K, s + i * K, ({T})tol, max_iters, "
        "x + i, evals + i, converged + i);"),
}


def cuda_source() -> str:
    """The CUDA translation unit given to NVRTC."""
    return build.cuda_source(ELEMENT_SOURCE, ENTRIES)


def host_source() -> str:
    """The same per-element code as a C++ file for the CPU (tests only)."""
    return build.host_source(ELEMENT_SOURCE, ENTRIES)


# --------------------------------------------------------------------------- CuPy launch
_kernels = build.RawModuleCache(cuda_source)


def cdf_pdf_forward(x, logits, means, logscales):
    """(log F, log(1-F), log p) of flat x [N] and params [N, K] (C-contiguous CuPy arrays)."""
    import cupy
    n, K = logits.shape
    outs = tuple(cupy.empty((n,), dtype=x.dtype) for _ in range(3))
    _kernels.launch(f"mixlog_forward_{build.suffix(x.dtype)}", n, np.int32(K), x, logits, means, logscales, *outs)
    return outs


def cdf_pdf_backward(x, logits, means, logscales, gF, gG, gP):
    """(dx [N], dlogits, dmeans, dlogscales [N, K]) for upstream gradients gF, gG, gP [N]."""
    import cupy
    n, K = logits.shape
    dx = cupy.empty((n,), dtype=x.dtype)
    dl, dm, ds = (cupy.empty((n, K), dtype=x.dtype) for _ in range(3))
    _kernels.launch(f"mixlog_backward_{build.suffix(x.dtype)}", n, np.int32(K), x, logits, means, logscales,
                    gF, gG, gP, dx, dl, dm, ds)
    return dx, dl, dm, ds


def invcdf_hybrid(y, logits, means, logscales, tol, max_iters):
    """(x [N], evaluations [N] int64, converged [N] int8) of the hybrid inverse CDF."""
    import cupy
    n, K = logits.shape
    x = cupy.empty((n,), dtype=y.dtype)
    evals = cupy.empty((n,), dtype=np.int64)
    conv = cupy.empty((n,), dtype=np.int8)
    _kernels.launch(f"mixlog_invcdf_hybrid_{build.suffix(y.dtype)}", n, np.int32(K), y, logits, means,
                    logscales, np.float64(tol), np.int32(max_iters), x, evals, conv)
    return x, evals, conv
