"""Mixture of logistics: log-CDF, log(1 - CDF), log-pdf, their backward, inverse CDF.

The elementwise transform of the Flow++ coupling layer (paper sec. 3.2.1, eq. 13;
appendix 8.2, ``logistic.py``) is the CDF of a K-component logistic mixture.

Math (per element; w = softmax(logits) over the K components, s = logscales)::

    z_k      = (x - mu_k) exp(-s_k)
    F(x)     = sum_k w_k sigmoid(z_k)
    log F    = LSE_k[ log w_k + log sigmoid(z_k)  ]
    log(1-F) = LSE_k[ log w_k + log sigmoid(-z_k) ]         (never log(1 - exp(log F)))
    log p    = LSE_k[ log w_k + log sigmoid(z_k) + log sigmoid(-z_k) - s_k ]
             = LSE_k[ log w_k + z_k - s_k - 2 softplus(z_k) ]   (the release's form)

with LSE the log-sum-exp over k and, stably for any ``|z|`` (no cancellation)::

    L = log1p(exp(-|z|)),  log sigmoid(z) = min(z, 0) - L,  log sigmoid(-z) = -max(z, 0) - L

Everything stays in log space, so the tails (``|x - mu|`` of 50 scales, log-scales at
the coupling's clamp of -7, z of order 1e5) give finite log F / log(1-F) / log p.

Backward of the fused triple (log F, log(1-F), log p) with upstream gradients
gF, gG, gP; responsibilities (each sums to 1 over k)::

    rF_k = w_k sigmoid(z_k) / F,   rG_k = w_k sigmoid(-z_k) / (1-F),   rP_k = w_k p_k(x) / p(x)
    d log sigmoid(z)/dz = sigmoid(-z),  d log sigmoid(-z)/dz = -sigmoid(z),
    d log p_k/dz = sigmoid(-z) - sigmoid(z),  dz/dx = exp(-s), dz/dmu = -exp(-s), dz/ds = -z

    c_k       = gF rF_k + gG rG_k + gP rP_k                 (dL/dlog w_k)
    dL/dl_k   = c_k - w_k (gF + gG + gP)                    (log-softmax backward, sum_k c_k = gF+gG+gP)
    dL/dz_k   = gF rF_k sigmoid(-z_k) - gG rG_k sigmoid(z_k) + gP rP_k (sigmoid(-z_k) - sigmoid(z_k))
    dL/dx     = sum_k dL/dz_k exp(-s_k)
    dL/dmu_k  = -dL/dz_k exp(-s_k)
    dL/ds_k   = -dL/dz_k z_k - gP rP_k                      (the -s_k inside log p_k)

Inverse CDF (F is strictly increasing), two methods, both per element:

* ``"bisection"``: the release's ``mixlogistic_invcdf`` (appendix 8.2), start
  x = 0, bounds lb = min_k(mu_k - 20 sum_j exp(s_j)), ub = max_k(mu_k + 20 sum_j
  exp(s_j)), step ``x <- (x + lb)/2, ub <- x`` if F(x) > y else ``x <- (x + ub)/2,
  lb <- x``, stop when ``max |x_new - x| <= tol`` over the whole array (the
  release's criterion is global) or after ``max_iters`` steps. One deviation: the
  bounds are widened to the component quantiles ``mu_k + exp(s_k) logit(y)``
  (see below) when these lie outside; this only happens for y < ~2e-9 or
  y > 1 - 2e-9, where the release's bounds do not bracket the root (the coupling
  clips its targets to [1e-5, 1 - 1e-5], so the coupling is unaffected).
* ``"hybrid"``: safeguarded Newton (Numerical Recipes' ``rtsafe``) on
  ``g(x) = logit F(x) - logit y`` with ``g'(x) = p / (F (1-F))`` =
  ``exp(log p - log F - log(1-F))``. logit F is exactly linear in x for K = 1 and
  asymptotically linear in both tails, so Newton converges in a few steps. The
  bracket is the tightest one available for free: F is a convex combination of
  the component CDFs, so the root lies between the component quantiles,
  ``[min_k q_k, max_k q_k]`` with ``q_k = mu_k + exp(s_k) logit(y)``; the start
  is ``sum_k w_k q_k``. Each evaluation shrinks the bracket; a Newton step that
  leaves it (or does not at least halve the step before last) is replaced by a
  bisection step, unless the Newton step is already ``<= tol`` (then it is
  accepted: near the root ``x + step`` may round to x, i.e. onto the bracket's
  end). Stops when the last step is ``<= tol`` or the bracket is narrower than
  tol. K = 1 needs no evaluation (the bracket is the root).

Tolerances per dtype (:func:`invcdf_defaults`): float64 uses the release's
``tol = 1e-10, max_iters = 100``; float32 uses ``tol = 1e-6`` (about 8 ulp at
``|x| = 1``; the release's 1e-10 lies below float32's resolution for any ``|x| > 1e-3``)
and ``max_iters = 64`` (enough to shrink a bracket of width 2^40 to below
float32 resolution; bisection usually stops earlier, when the midpoint stops
moving).

Shapes: x (or y) ``[...]``; logits, means, logscales ``[..., K]`` (last axis = the
components; the leading axes must equal x's exactly, no broadcasting).

Dispatch: with NumPy arrays and :func:`flowpp_ref.kernels.use_kernels` the fused
forward, its backward and the inverse CDF run as numba kernels
(:mod:`flowpp_ref.kernels.numba.mixlogistic`: the same math, summed in linear
space with a log-space fallback in the deep tails, component loops in the
inputs' dtype); with CuPy arrays the fused forward, its backward and the hybrid
inverse run as CUDA kernels (:mod:`flowpp_ref.kernels.cuda.mixlogistic`: log space,
one thread per element; run against the references on an H200 by the GPU tests, and their source
is checked on the CPU);
otherwise the plain-``xp`` references ``_ref_*`` below run (the math to read). ``mixlogistic_logcdf``,
``mixlogistic_log1mcdf`` and ``mixlogistic_logpdf`` are reference code only.
The kernels' results agree with the references to round-off, not bit for bit.

Host reads on CuPy: the inverse CDF's value checks (finite y and parameters, y in (0, 1)), with those
of its caller (:func:`~flowpp_ref.bijections.coupling_transforms.mixlogistic_coupling_inverse`: finite
y, a, b), are one device flag vector read once (:class:`~flowpp_ref.core.validation.DeferredChecks`);
the detailed message is computed only when a flag says invalid. The bisection's global stopping rule
stays on the device (:func:`_ref_invcdf_bisection_device`): the number of steps is bounded from the
bracket width, which travels in the same read, and a step after the rule has stopped changes nothing,
so x, the iteration count and ``converged`` are the reference's. The info dict's counts stay on the
device until asked for (:class:`InverseInfo`). Sampling therefore waits on the host once per coupling.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module, is_cupy, to_numpy
from flowpp_ref.core.validation import DeferredChecks, FlowInputError, check_array
from flowpp_ref.kernels import use_kernels
from flowpp_ref.kernels.cuda import mixlogistic as ck
from flowpp_ref.kernels.numba import mixlogistic as nk

INVCDF_DEFAULTS = {
    np.dtype(np.float64): dict(tol=1e-10, max_iters=100),   # the release's values
    np.dtype(np.float32): dict(tol=1e-6, max_iters=64),     # 1e-10 is below float32 resolution
}
INVCDF_METHODS = ("bisection", "hybrid")


def invcdf_defaults(dtype) -> tuple[float, int]:
    """``(tol, max_iters)`` of the inverse CDF for float32 / float64."""
    d = INVCDF_DEFAULTS[_check_dtype(dtype, "dtype")]
    return d["tol"], d["max_iters"]


# ------------------------------------------------------------------ validation
def _check_dtype(dtype, name):
    dt = np.dtype(dtype)
    if dt not in INVCDF_DEFAULTS:
        raise FlowInputError(f"{name}: mixture-of-logistics code supports float32 and float64, got {dt}")
    return dt


def _check_mix(x, logits, means, logscales, xname="x"):
    """Shapes/dtypes: x [...], params [..., K] with the same leading shape and dtype."""
    check_array(x, xname)
    for name, p in (("logits", logits), ("means", means), ("logscales", logscales)):
        check_array(p, name)
        if p.ndim != x.ndim + 1 or tuple(p.shape[:-1]) != tuple(x.shape):
            raise FlowInputError(
                f"{name}: expected shape {tuple(x.shape)} + (K,) to match {xname} {tuple(x.shape)}, "
                f"got {tuple(p.shape)}")
        if p.dtype != x.dtype:
            raise FlowInputError(f"{name}: dtype {p.dtype} differs from {xname}'s dtype {x.dtype}")
    if not (logits.shape[-1] == means.shape[-1] == logscales.shape[-1]):
        raise FlowInputError(
            f"logits, means, logscales disagree on the number of components K: "
            f"{logits.shape[-1]}, {means.shape[-1]}, {logscales.shape[-1]}")
    if logits.shape[-1] < 1:
        raise FlowInputError("the mixture needs at least one component (K >= 1), got K = 0")
    _check_dtype(x.dtype, xname)


def _use_numba(*arrays) -> bool:
    return array_module(*arrays) is np and use_kernels()


def _use_cuda(*arrays) -> bool:
    return is_cupy(array_module(*arrays)) and use_kernels()


def _flat_xp(xp, x, logits, means, logscales):
    """_flat for any backend (CuPy arrays: cupy.ascontiguousarray)."""
    K = logits.shape[-1]
    return tuple(xp.ascontiguousarray(a).reshape(shape)
                 for a, shape in ((x, (-1,)), (logits, (-1, K)), (means, (-1, K)), (logscales, (-1, K))))


def _flat(x, logits, means, logscales):
    """C-contiguous [N] and [N, K] views (copies only when the input is not contiguous)."""
    K = logits.shape[-1]
    return (np.ascontiguousarray(x).reshape(-1),
            np.ascontiguousarray(logits).reshape(-1, K),
            np.ascontiguousarray(means).reshape(-1, K),
            np.ascontiguousarray(logscales).reshape(-1, K))


# ------------------------------------------------------------------ reference helpers
def _logsumexp(v, xp):
    """log sum_k exp(v_k) over the last axis (max-shifted)."""
    m = xp.max(v, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    return (m + xp.log(xp.sum(xp.exp(v - m), axis=-1, keepdims=True)))[..., 0]


def _log_softmax(logits, xp):
    return logits - _logsumexp(logits, xp)[..., None]


def _log_sigmoid_pair(z, xp):
    """(log sigmoid(z), log sigmoid(-z)) without cancellation: L = log1p(exp(-|z|))."""
    L = xp.log1p(xp.exp(-xp.abs(z)))
    return xp.minimum(z, 0) - L, -xp.maximum(z, 0) - L


def _ref_terms(x, logits, means, logscales):
    """log w [..., K], z [..., K], log sigmoid(z), log sigmoid(-z)."""
    xp = array_module(x, logits)
    logw = _log_softmax(logits, xp)
    z = (x[..., None] - means) * xp.exp(-logscales)
    lsp, lsn = _log_sigmoid_pair(z, xp)
    return logw, z, lsp, lsn


# ------------------------------------------------------------------ reference math
def _ref_cdf_pdf(x, logits, means, logscales):
    """Reference fused forward: (log F, log(1-F), log p), each shaped like x."""
    xp = array_module(x, logits)
    logw, z, lsp, lsn = _ref_terms(x, logits, means, logscales)
    logF = _logsumexp(logw + lsp, xp)
    log1mF = _logsumexp(logw + lsn, xp)
    logpdf = _logsumexp(logw + lsp + lsn - logscales, xp)     # log p_k = log sig(z) + log sig(-z) - s
    return logF, log1mF, logpdf


def _ref_cdf_pdf_backward(x, logits, means, logscales, gF, gG, gP, outputs=None):
    """Reference backward of (log F, log(1-F), log p): returns (dx, dlogits, dmeans, dlogscales)."""
    xp = array_module(x, logits)
    logw, z, lsp, lsn = _ref_terms(x, logits, means, logscales)
    if outputs is None:
        outputs = _ref_cdf_pdf(x, logits, means, logscales)
    logF, log1mF, logpdf = outputs
    gF, gG, gP = gF[..., None], gG[..., None], gP[..., None]
    rF = xp.exp(logw + lsp - logF[..., None])                 # w sig(z) / F
    rG = xp.exp(logw + lsn - log1mF[..., None])               # w sig(-z) / (1-F)
    rP = xp.exp(logw + lsp + lsn - logscales - logpdf[..., None])   # w p_k / p
    sp, sn = xp.exp(lsp), xp.exp(lsn)                         # sig(z), sig(-z)
    c = gF * rF + gG * rG + gP * rP                           # dL/dlog w_k
    dlogits = c - xp.exp(logw) * (gF + gG + gP)               # dL/dl_k = c_k - w_k sum_j c_j
    dz = gF * rF * sn - gG * rG * sp + gP * rP * (sn - sp)    # dL/dz_k
    inv = xp.exp(-logscales)
    dx = xp.sum(dz * inv, axis=-1)                            # dL/dx = sum_k dz_k exp(-s_k)
    dmeans = -dz * inv                                        # dL/dmu_k = -dz_k exp(-s_k)
    dlogscales = -dz * z - gP * rP                            # dL/ds_k = -dz_k z_k - gP rP_k
    return dx, dlogits, dmeans, dlogscales


def _bisection_bounds(y, means, logscales, xp):
    """The release's bounds, widened to the component quantiles when those lie outside."""
    scales = xp.exp(logscales)
    ssum = xp.sum(scales, axis=-1, keepdims=True)              # sum of scales over components
    lb = xp.min(means - 20 * ssum, axis=-1)
    ub = xp.max(means + 20 * ssum, axis=-1)
    q = _quantiles(y, means, scales, xp)
    return xp.minimum(lb, xp.min(q, axis=-1)), xp.maximum(ub, xp.max(q, axis=-1))


def _quantiles(y, means, scales, xp):
    """q_k = mu_k + exp(s_k) logit(y): the root of F(x) = y lies in [min_k q_k, max_k q_k]."""
    t = xp.log(y) - xp.log1p(-y)
    return means + scales * t[..., None]


def _ref_logcdf_pre(x, logw, means, inv):
    xp = array_module(x, logw)
    z = (x[..., None] - means) * inv
    lsp, _ = _log_sigmoid_pair(z, xp)
    return _logsumexp(logw + lsp, xp)


def _ref_invcdf_bisection(y, logits, means, logscales, tol, max_iters):
    """The release's bisection (global stopping rule). Returns (x, iterations, converged)."""
    xp = array_module(y, logits)
    logw = _log_softmax(logits, xp)
    inv = xp.exp(-logscales)
    lb, ub = _bisection_bounds(y, means, logscales, xp)
    x = xp.zeros_like(y)
    diff, it = (np.inf if x.size else 0.0), 0
    while diff > tol and it < max_iters:
        gt = xp.exp(_ref_logcdf_pre(x, logw, means, inv)) > y      # F(x) > y: root left of x
        new_x = xp.where(gt, (x + lb) / 2, (x + ub) / 2)
        lb, ub = xp.where(gt, lb, x), xp.where(gt, x, ub)
        diff = float(xp.max(xp.abs(new_x - x)))
        x = new_x
        it += 1
    return x, it, bool(diff <= tol)


BISECTION_MARGIN = 4   # iterations beyond the exact-arithmetic bound (rounding of the midpoints)


def _bisection_iterations(width: float, tol: float, max_iters: int) -> int:
    """An upper bound on the iterations of the release's bisection, from the bracket width.

    From x0 = 0 the first step lands on the middle of [lb, 0] or [0, ub], a bracket of width
    W_1 <= width = max(|lb|, |ub|) over the elements; every later step moves x by a quarter of the
    bracket before it and halves it, so |x_k - x_{k-1}| = W_1 / 2^k and the global rule
    (max_i |x_k - x_{k-1}| <= tol) stops at k <= ceil(log2(width / tol)) in exact arithmetic. In floating
    point the midpoints round: a few more iterations (the margin) cover it, and a bracket narrower
    than the resolution stops moving (diff 0) within those.
    """
    if not (tol > 0) or not np.isfinite(width):
        return max_iters
    k = 1 if width <= tol else int(np.ceil(np.log2(width / tol)))
    return min(max_iters, max(k, 1) + BISECTION_MARGIN)


def _ref_invcdf_bisection_device(y, logits, means, logscales, tol, n_iters, bounds):
    """The release's bisection with its global stopping rule kept on the device (no host read).

    Runs ``n_iters`` (>= the iterations the rule allows, :func:`_bisection_iterations`) steps; a step
    after the rule has stopped changes nothing (``run`` = "diff > tol so far", on the device), so x,
    the iteration count and ``converged`` are those of :func:`_ref_invcdf_bisection`. Returns
    (x, iterations, converged) with the last two as 0-d device arrays.
    """
    xp = array_module(y, logits)
    logw = _log_softmax(logits, xp)
    inv = xp.exp(-logscales)
    lb, ub = bounds
    x = xp.zeros_like(y)
    run = xp.ones((), dtype=bool)                                  # diff > tol (and it < max_iters)
    diff = xp.full((), np.inf, dtype=np.float64)
    it = xp.zeros((), dtype=np.int64)
    for _ in range(n_iters):
        gt = xp.exp(_ref_logcdf_pre(x, logw, means, inv)) > y      # F(x) > y: root left of x
        new_x = xp.where(gt, (x + lb) / 2, (x + ub) / 2)
        lb, ub = xp.where(gt | ~run, lb, x), xp.where(gt & run, x, ub)
        step = xp.max(xp.abs(new_x - x)).astype(np.float64)
        x = xp.where(run, new_x, x)
        diff = xp.where(run, step, diff)
        it = it + run
        run = run & (step > tol)
    return x, it, diff <= tol


def _ref_invcdf_hybrid(y, logits, means, logscales, tol, max_iters):
    """Safeguarded Newton on logit F (rtsafe). Returns (x, evaluations per element)."""
    xp = array_module(y, logits)
    shape = y.shape
    K = logits.shape[-1]
    y = y.reshape(-1)
    logits, means, logscales = (p.reshape(-1, K) for p in (logits, means, logscales))
    t = xp.log(y) - xp.log1p(-y)                                   # logit(y)
    q = _quantiles(y, means, xp.exp(logscales), xp)
    lb, ub = xp.min(q, axis=-1), xp.max(q, axis=-1)
    w = xp.exp(_log_softmax(logits, xp))
    x = xp.minimum(xp.maximum(xp.sum(w * q, axis=-1), lb), ub)     # start: sum_k w_k q_k
    active = (ub - lb) > tol
    x = xp.where(active, x, (lb + ub) / 2)                         # K = 1: lb = ub = the root
    dx = ub - lb
    dx_old = dx.copy()
    evals = xp.zeros(y.shape, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(max_iters):
            idx = xp.nonzero(active)[0]
            if idx.size == 0:
                break
            xa, lba, uba = x[idx], lb[idx], ub[idx]
            lF, lG, lP = _ref_cdf_pdf(xa, logits[idx], means[idx], logscales[idx])
            evals[idx] += 1
            g = lF - lG - t[idx]                                   # logit F(x) - logit y
            lba = xp.where(g < 0, xa, lba)                         # F(x) < y: root right of x
            uba = xp.where(g > 0, xa, uba)
            d = xp.exp(lP - lF - lG)                               # d logit F / dx = p / (F (1-F))
            nstep = -g / d                                         # Newton step
            newton = xa + nstep
            ok = (xp.isfinite(newton) & (newton > lba) & (newton < uba)
                  & (xp.abs(2 * g) <= xp.abs(dx_old[idx] * d)))    # inside and at least halving
            ok = ok | (xp.abs(nstep) <= tol)                       # converged (may round to x itself)
            x_new = xp.where(ok, newton, (lba + uba) / 2)
            x_new = xp.where(g == 0, xa, x_new)
            step = x_new - xa
            dx_old[idx] = dx[idx]
            dx[idx] = step
            x[idx], lb[idx], ub[idx] = x_new, lba, uba
            done = (xp.abs(step) <= tol) | (uba - lba <= tol)
            active[idx[done]] = False
    return x.reshape(shape), evals.reshape(shape), bool(not xp.any(active))


# ------------------------------------------------------------------ public API
def mixlogistic_logcdf(x, logits, means, logscales):
    """log F(x) = LSE_k[log softmax(logits)_k + log sigmoid(z_k)] (reference code)."""
    _check_mix(x, logits, means, logscales)
    xp = array_module(x, logits)
    logw, _, lsp, _ = _ref_terms(x, logits, means, logscales)
    return _logsumexp(logw + lsp, xp)


def mixlogistic_log1mcdf(x, logits, means, logscales):
    """log(1 - F(x)) = LSE_k[log softmax(logits)_k + log sigmoid(-z_k)] (reference code)."""
    _check_mix(x, logits, means, logscales)
    xp = array_module(x, logits)
    logw, _, _, lsn = _ref_terms(x, logits, means, logscales)
    return _logsumexp(logw + lsn, xp)


def mixlogistic_logpdf(x, logits, means, logscales):
    """log p(x) = LSE_k[log softmax(logits)_k + z_k - s_k - 2 softplus(z_k)] (reference code)."""
    _check_mix(x, logits, means, logscales)
    xp = array_module(x, logits)
    logw, _, lsp, lsn = _ref_terms(x, logits, means, logscales)
    return _logsumexp(logw + lsp + lsn - logscales, xp)


def mixlogistic_cdf_pdf(x, logits, means, logscales):
    """Fused forward: ``(logF, log1mF, logpdf)``, each shaped like ``x``.

    Math: see the module docstring. Shapes: x ``[...]``, params ``[..., K]``.
    Dispatch: numba kernel for NumPy arrays when kernels are enabled, else
    :func:`_ref_cdf_pdf`.
    """
    _check_mix(x, logits, means, logscales)
    if _use_numba(x, logits, means, logscales):
        xf, lf, mf, sf = _flat(x, logits, means, logscales)
        outs = tuple(np.empty(xf.shape, dtype=x.dtype) for _ in range(3))
        nk.cdf_pdf_forward(xf, lf, mf, sf, *outs)
        return tuple(o.reshape(x.shape) for o in outs)
    if _use_cuda(x, logits, means, logscales):
        outs = ck.cdf_pdf_forward(*_flat_xp(array_module(x), x, logits, means, logscales))
        return tuple(o.reshape(x.shape) for o in outs)
    return _ref_cdf_pdf(x, logits, means, logscales)


def mixlogistic_cdf_pdf_backward(x, logits, means, logscales, g_logF=None, g_log1mF=None,
                                 g_logpdf=None, outputs=None):
    """Backward of :func:`mixlogistic_cdf_pdf`.

    Takes the upstream gradients of (logF, log1mF, logpdf) (each shaped like x;
    ``None`` means zero) and returns ``(dx, dlogits, dmeans, dlogscales)``.
    ``outputs`` = the forward's triple, used by the reference to normalise the
    responsibilities (recomputed when None); the numba kernel recomputes its own
    normalisers and ignores it. Formulas: module docstring.
    """
    _check_mix(x, logits, means, logscales)
    xp = array_module(x, logits)
    gs = []
    for name, g in (("g_logF", g_logF), ("g_log1mF", g_log1mF), ("g_logpdf", g_logpdf)):
        if g is None:
            g = xp.zeros_like(x)
        elif tuple(g.shape) != tuple(x.shape):
            raise FlowInputError(f"{name}: expected shape {tuple(x.shape)}, got {tuple(g.shape)}")
        gs.append(g.astype(x.dtype, copy=False))
    if _use_numba(x, logits, means, logscales, *gs):
        K = logits.shape[-1]
        xf, lf, mf, sf = _flat(x, logits, means, logscales)
        gf = [np.ascontiguousarray(g).reshape(-1) for g in gs]
        dx = np.empty(xf.shape, dtype=x.dtype)
        dl, dm, ds = (np.empty(lf.shape, dtype=x.dtype) for _ in range(3))
        nk.cdf_pdf_backward(xf, lf, mf, sf, gf[0], gf[1], gf[2], dx, dl, dm, ds)
        pshape = tuple(x.shape) + (K,)
        return dx.reshape(x.shape), dl.reshape(pshape), dm.reshape(pshape), ds.reshape(pshape)
    if _use_cuda(x, logits, means, logscales, *gs):
        K = logits.shape[-1]
        dx, dl, dm, ds = ck.cdf_pdf_backward(*_flat_xp(xp, x, logits, means, logscales),
                                             *(xp.ascontiguousarray(g).reshape(-1) for g in gs))
        pshape = tuple(x.shape) + (K,)
        return dx.reshape(x.shape), dl.reshape(pshape), dm.reshape(pshape), ds.reshape(pshape)
    return _ref_cdf_pdf_backward(x, logits, means, logscales, *gs, outputs=outputs)


def mixlogistic_invcdf(y, logits, means, logscales, method: str = "bisection",
                       tol: float | None = None, max_iters: int | None = None, *, checks=None):
    """Inverse CDF: x with F(x) = y, elementwise. Returns ``(x, info)``.

    ``method``: ``"bisection"`` (the release's algorithm) or ``"hybrid"``
    (safeguarded Newton on logit F); see the module docstring. ``tol`` /
    ``max_iters`` default to :func:`invcdf_defaults` of y's dtype.

    ``info``: ``method``, ``tol``, ``max_iters``, ``evaluations`` (total number
    of per-element mixture evaluations: one evaluation = one pass over the K
    components; bisection computes F, hybrid F, 1-F and p), ``evals_per_element``
    (mean), ``max_evals`` (max over elements), ``iterations`` (loop count of
    bisection = evaluations per element; for hybrid the max over elements) and
    ``converged`` (the stopping rule was met before ``max_iters``). On CuPy the
    counts stay on the device until one of them is read (:class:`InverseInfo`).

    Raises FlowInputError for y outside (0, 1), non-finite y or parameters, bad
    shapes, or an unknown method. On CuPy these value checks, together with those
    the caller registered in ``checks`` (a :class:`~flowpp_ref.core.validation.DeferredChecks`),
    cost one host read in all (the bisection's iteration bound travels with it).
    """
    _check_mix(y, logits, means, logscales, xname="y")
    if method not in INVCDF_METHODS:
        raise FlowInputError(f"method: expected one of {INVCDF_METHODS}, got {method!r}")
    xp = array_module(y, logits)
    checks = DeferredChecks(xp) if checks is None else checks
    checks.finite(y, "y")
    for name, p in (("logits", logits), ("means", means), ("logscales", logscales)):
        checks.finite(p, name)
    if y.size:
        checks.require(lambda: (xp.min(y) > 0) & (xp.max(y) < 1), lambda: _check_targets(y),
                       "y: inverse-CDF targets in (0, 1)")
    bounds = width = None
    if method == "bisection" and y.size and is_cupy(xp):
        bounds = _bisection_bounds(y, means, logscales, xp)
        width = xp.maximum(xp.max(xp.abs(bounds[0])), xp.max(xp.abs(bounds[1])))
    extra = checks.run(extra=() if width is None else (width,))       # the one host read on CuPy
    tol, max_iters = _tolerances(y.dtype, tol, max_iters)
    n = int(y.size)
    info = dict(method=method, tol=tol, max_iters=max_iters)
    if _use_numba(y, logits, means, logscales):
        x, evals, iters, converged = _invcdf_numba(y, logits, means, logscales, method, tol, max_iters)
    elif n and is_cupy(xp):
        return _invcdf_device(y, logits, means, logscales, method, tol, max_iters, bounds, extra, info)
    elif method == "bisection":
        x, iters, converged = _ref_invcdf_bisection(y, logits, means, logscales, tol, max_iters)
        evals = xp.full(y.shape, iters, dtype=np.int64)
    else:
        x, evals, converged = _ref_invcdf_hybrid(y, logits, means, logscales, tol, max_iters)
        iters = int(xp.max(evals)) if n else 0
    total = int(evals.sum()) if n else 0
    info.update(evaluations=total, evals_per_element=total / n if n else 0.0,
                max_evals=int(evals.max()) if n else 0, iterations=int(iters), converged=bool(converged))
    return x, info


def _check_targets(y):
    """y in the open interval (0, 1) (nan fails), else FlowInputError with the range found."""
    xp = array_module(y)
    mn, mx = float(xp.min(y)), float(xp.max(y))
    if not (mn > 0 and mx < 1):
        raise FlowInputError(f"y: inverse-CDF targets must lie in the open interval (0, 1), "
                             f"got min {mn:g}, max {mx:g}")


def _tolerances(dtype, tol, max_iters):
    """(tol, max_iters): the defaults of ``dtype`` where None, checked."""
    d_tol, d_iters = invcdf_defaults(dtype)
    tol = d_tol if tol is None else float(tol)
    max_iters = d_iters if max_iters is None else int(max_iters)
    if not (tol >= 0) or max_iters < 0:
        raise FlowInputError(f"tol must be >= 0 and max_iters >= 0, got tol={tol}, max_iters={max_iters}")
    return tol, max_iters


def _invcdf_numba(y, logits, means, logscales, method, tol, max_iters):
    """(x, evaluations per element, iterations, converged) of the numba kernels (NumPy arrays)."""
    yf, lf, mf, sf = _flat(y, logits, means, logscales)
    x = np.empty(yf.shape, dtype=y.dtype)
    evals = np.zeros(yf.shape, dtype=np.int64)
    if yf.size == 0:
        iters, converged = 0, True
    elif method == "bisection":
        iters, converged = nk.invcdf_bisection(yf, lf, mf, sf, tol, max_iters, x, evals)
    else:
        converged = nk.invcdf_hybrid(yf, lf, mf, sf, tol, max_iters, x, evals)
        iters = int(evals.max())
    return x.reshape(y.shape), evals.reshape(y.shape), iters, converged


def _invcdf_device(y, logits, means, logscales, method, tol, max_iters, bounds, extra, info):
    """(x, info) on CuPy (y not empty) without any host read: the counts of ``info`` stay on the device.

    Hybrid: the CUDA kernel where kernels are enabled, else the reference (which reads the number of
    active elements every iteration). Bisection: :func:`_ref_invcdf_bisection_device` with the number
    of iterations bounded from the bracket width ``extra[0]`` read with the checks.
    """
    xp = array_module(y, logits)
    n = int(y.size)
    if method == "bisection":
        n_iters = _bisection_iterations(extra[0], tol, max_iters)
        x, iters, converged = _ref_invcdf_bisection_device(y, logits, means, logscales, tol, n_iters, bounds)
        return x, InverseInfo(info, (iters, iters, converged.astype(np.int64)), n, summed=False)
    if _use_cuda(y, logits, means, logscales):
        x, evals, conv = ck.invcdf_hybrid(*_flat_xp(xp, y, logits, means, logscales), tol, max_iters)
        x, evals = x.reshape(y.shape), evals.reshape(y.shape)
        converged = conv.min().astype(np.int64)
    else:
        x, evals, conv = _ref_invcdf_hybrid(y, logits, means, logscales, tol, max_iters)
        converged = xp.asarray(int(conv))
    return x, InverseInfo(info, (evals.sum(), evals.max(), converged), n, summed=True)


class InverseInfo(dict):
    """The info dict of :func:`mixlogistic_invcdf` whose counts are still on the device (CuPy).

    ``method``, ``tol`` and ``max_iters`` are there at once; ``evaluations``, ``evals_per_element``,
    ``max_evals``, ``iterations`` and ``converged`` are fetched, all together in one host read, the
    first time one of them (or the whole dict) is read. Sampling never reads them, so it waits for
    none of them. ``device``: 0-d arrays (evaluations, max evaluations, converged as 0/1); ``summed``:
    whether the first is the total over the ``n`` elements (hybrid) or the count every element made
    (bisection).
    """

    LAZY = ("evaluations", "evals_per_element", "max_evals", "iterations", "converged")

    def __init__(self, known: dict, device, n: int, *, summed: bool):
        super().__init__(known)
        for k in self.LAZY:
            dict.__setitem__(self, k, None)
        self._device, self._n, self._total = device, int(n), bool(summed)

    def _resolve(self):
        if self._device is not None:
            xp = array_module(*self._device)
            first, mx, conv = (int(v) for v in to_numpy(xp.stack([xp.asarray(v).astype(np.int64)
                                                                   for v in self._device])))
            self._device = None
            total = first if self._total else first * self._n
            dict.update(self, evaluations=total, evals_per_element=total / self._n, max_evals=mx,
                        iterations=mx, converged=bool(conv))
        return self

    def __getitem__(self, key):
        if key in self.LAZY:
            self._resolve()
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):                 # overridden so that dict(info) and {**info} go through __getitem__
        return dict.__iter__(self)

    def items(self):
        return dict.items(self._resolve())

    def values(self):
        return dict.values(self._resolve())

    def copy(self):
        return dict(self._resolve())

    def pop(self, *args):
        return dict.pop(self._resolve(), *args)

    def popitem(self):
        return dict.popitem(self._resolve())

    def setdefault(self, key, default=None):
        return dict.setdefault(self._resolve(), key, default)

    def __or__(self, other):
        return dict(self._resolve()) | other

    def __ror__(self, other):
        return other | dict(self._resolve())

    def __eq__(self, other):
        if isinstance(other, InverseInfo):
            other._resolve()
        return dict.__eq__(self._resolve(), other)

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def __repr__(self):
        return dict.__repr__(self._resolve())

    def __reduce__(self):
        return dict, (dict(self._resolve()),)
