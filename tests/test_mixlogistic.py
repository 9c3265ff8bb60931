"""Mixture of logistics (flowpp_ref.bijections.mixlogistic and its numba kernels).

* log F, log(1-F), log p against a direct float64 computation and, in the tails
  (|x - mu| of 50 scales, log-scale -7, z up to ~1e5), against mpmath at 50 digits;
* p = dF/dx by central differences; F + (1-F) = 1;
* the hand-written backward of the fused (log F, log(1-F), log p) against gradcheck;
* the numba kernels against the references (kernels_enabled(False)), float32 and float64,
  including the deep-tail fallback path and the vectorised exp;
* the inverse CDF: the release's bisection reproduced, the hybrid against the truth,
  extreme targets, tiny scales, far-apart components, K = 1, float32, evaluation counts;
* bad input -> FlowInputError.
"""
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, special

from flowpp_ref.bijections import mixlogistic as ml
from flowpp_ref.core.gradcheck import gradcheck, rel_error
from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.kernels.numba import mixlogistic as nk
from flowpp_ref.core.validation import FlowInputError

PATHS = ["numba", "reference"]       # kernels on / off


def _params(rng, shape, K, dtype=np.float64, mean_scale=2.0, ls=(-2.0, 1.0)):
    logits = rng.normal(size=shape + (K,)) * 1.5
    means = rng.normal(size=shape + (K,)) * mean_scale
    logscales = rng.uniform(ls[0], ls[1], size=shape + (K,))
    return [np.ascontiguousarray(a, dtype=dtype) for a in (logits, means, logscales)]


def _direct(x, logits, means, logscales):
    """Linear-space float64 oracle (valid while sigmoid(+-z) does not underflow)."""
    w = special.softmax(logits, axis=-1)
    z = (x[..., None] - means) * np.exp(-logscales)
    F = (w * special.expit(z)).sum(-1)
    G = (w * special.expit(-z)).sum(-1)
    p = (w * special.expit(z) * special.expit(-z) * np.exp(-logscales)).sum(-1)
    return np.log(F), np.log(G), np.log(p)


def _mp(x, logits, means, logscales):
    """50-digit mpmath oracle for one element: (log F, log(1-F), log p)."""
    mpmath.mp.dps = 50
    lw = [mpmath.mpf(float(v)) for v in logits]
    lse = mpmath.log(sum(mpmath.exp(v) for v in lw))
    F = G = P = mpmath.mpf(0)
    for l, m, s in zip(lw, means, logscales):
        w = mpmath.exp(l - lse)
        z = (mpmath.mpf(float(x)) - mpmath.mpf(float(m))) * mpmath.exp(-mpmath.mpf(float(s)))
        sp = 1 / (1 + mpmath.exp(-z))
        sn = 1 / (1 + mpmath.exp(z))
        F += w * sp
        G += w * sn
        P += w * sp * sn * mpmath.exp(-mpmath.mpf(float(s)))
    return float(mpmath.log(F)), float(mpmath.log(G)), float(mpmath.log(P))


def _fused(path, *args):
    with kernels_enabled(path == "numba"):
        return ml.mixlogistic_cdf_pdf(*args)


def _fused_bwd(path, *args, **kw):
    with kernels_enabled(path == "numba"):
        return ml.mixlogistic_cdf_pdf_backward(*args, **kw)


def _invcdf(path, *args, **kw):
    with kernels_enabled(path == "numba"):
        return ml.mixlogistic_invcdf(*args, **kw)


# ===================================================================== forward
@pytest.mark.parametrize("path", PATHS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), K=st.integers(1, 5))
def test_forward_matches_direct_float64(path, seed, n, K):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-12, 12, size=(n,))
    params = _params(rng, (n,), K, ls=(-3.0, 1.5))       # |z| < ~400: no underflow in the oracle
    got = _fused(path, x, *params)
    want = _direct(x, *params)
    for g, w, name in zip(got, want, ("logF", "log1mF", "logpdf")):
        assert g.shape == x.shape and g.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("path", PATHS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), K=st.integers(1, 5))
def test_forward_matches_scipy_log_space_clamped_scales(path, seed, n, K):
    """Log-scales down to the coupling's clamp (-7): z up to ~1e4, log-space oracle (scipy)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-12, 12, size=(n,))
    logits, means, logscales = _params(rng, (n,), K, ls=(-7.0, 1.5))
    z = (x[:, None] - means) * np.exp(-logscales)
    logw = special.log_softmax(logits, axis=-1)
    want = (special.logsumexp(logw + special.log_expit(z), axis=-1),
            special.logsumexp(logw + special.log_expit(-z), axis=-1),
            special.logsumexp(logw + special.log_expit(z) + special.log_expit(-z) - logscales, axis=-1))
    got = _fused(path, x, logits, means, logscales)
    for g, w, name in zip(got, want, ("logF", "log1mF", "logpdf")):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=name)


TAIL_CASES = {
    # x, logits, means, logscales
    "left_50_scales": (-50.0, [0.3, -0.2], [0.0, 0.5], [0.0, 0.0]),
    "right_50_scales": (50.5, [0.3, -0.2], [0.0, 0.5], [0.0, 0.0]),
    "clamp_scale_left": (-100.0, [0.0, 1.0, -1.0], [0.0, 1.0, 2.0], [-7.0, -7.0, -7.0]),   # z ~ -1e5
    "clamp_scale_right": (100.0, [0.0, 1.0, -1.0], [0.0, 1.0, 2.0], [-7.0, -7.0, -7.0]),
    "clamp_scale_centre": (1e-3, [0.0, 1.0], [0.0, 5.0], [-7.0, -7.0]),
    "mixed_scales_tail": (-30.0, [5.0, -5.0], [0.0, 0.0], [-7.0, 1.0]),    # the wide, light component dominates
    "tiny_weight_dominates": (-900.0, [0.0, -700.0], [0.0, 0.0], [-7.0, 2.0]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(TAIL_CASES))
def test_forward_tails_match_mpmath(path, case):
    x, l, m, s = TAIL_CASES[case]
    args = [np.array([x])] + [np.array([v], dtype=np.float64) for v in (l, m, s)]
    got = [float(v[0]) for v in _fused(path, *args)]
    want = _mp(x, l, m, s)
    for g, w, name in zip(got, want, ("logF", "log1mF", "logpdf")):
        assert math.isfinite(g), f"{name} not finite in case {case}"
        assert abs(g - w) <= 1e-12 * max(1.0, abs(w)), f"{case} {name}: got {g!r}, mpmath {w!r}"


@pytest.mark.parametrize("path", PATHS)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 4))
def test_pdf_is_derivative_of_cdf(path, seed, K):
    rng = np.random.default_rng(seed)
    n = 6
    params = _params(rng, (n,), K, ls=(-1.0, 1.0))
    x = rng.normal(size=(n,)) * 2
    h = 1e-5
    Fp = np.exp(_fused(path, x + h, *params)[0])
    Fm = np.exp(_fused(path, x - h, *params)[0])
    p = np.exp(_fused(path, x, *params)[2])
    np.testing.assert_allclose((Fp - Fm) / (2 * h), p, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 4))
def test_log1mcdf_consistent(path, seed, K):
    rng = np.random.default_rng(seed)
    n = 10
    params = _params(rng, (n,), K)
    x = rng.normal(size=(n,)) * 5
    lF, lG, _ = _fused(path, x, *params)
    np.testing.assert_allclose(np.exp(lF) + np.exp(lG), 1.0, rtol=0, atol=4e-15)
    # each one from the other where that is well conditioned
    ok = lF < -0.7
    np.testing.assert_allclose(lG[ok], np.log1p(-np.exp(lF[ok])), rtol=0, atol=1e-14)
    ok = lG < -0.7
    np.testing.assert_allclose(lF[ok], np.log1p(-np.exp(lG[ok])), rtol=0, atol=1e-14)


def test_single_functions_equal_fused():
    rng = np.random.default_rng(3)
    params = _params(rng, (2, 3), 4)
    x = rng.normal(size=(2, 3))
    with kernels_enabled(False):
        fused = ml.mixlogistic_cdf_pdf(x, *params)
    for f, v in zip((ml.mixlogistic_logcdf, ml.mixlogistic_log1mcdf, ml.mixlogistic_logpdf), fused):
        np.testing.assert_array_equal(f(x, *params), v)


# ===================================================================== backward
def _gradcheck_fused(path, x, params, seed, h=1e-6, tol=1e-6):
    rng = np.random.default_rng(seed)
    wF, wG, wP = (rng.normal(size=x.shape) for _ in range(3))
    logits, means, logscales = params

    def loss():
        lF, lG, lP = _fused(path, x, logits, means, logscales)
        return float((wF * lF + wG * lG + wP * lP).sum())

    outs = _fused(path, x, logits, means, logscales)
    dx, dl, dm, ds = _fused_bwd(path, x, logits, means, logscales, wF, wG, wP, outputs=outs)
    gradcheck(loss, dict(x=x, logits=logits, means=means, logscales=logscales),
              dict(x=dx, logits=dl, means=dm, logscales=ds), h=h, tol=tol)


@pytest.mark.parametrize("path", PATHS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), K=st.integers(1, 4))
def test_fused_backward_gradcheck_float64(path, seed, n, K):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,)) * 3
    _gradcheck_fused(path, x, _params(rng, (n,), K, ls=(-1.5, 1.0)), seed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["clamp_scale", "deep_left_tail", "deep_right_tail", "far_tail_50_scales"])
def test_fused_backward_gradcheck_extremes(path, case):
    """Log-scale -7 (z changes by 1e3 per unit x: smaller step) and the kernel's log-space fallback."""
    logits = np.array([[0.3, -0.4, 0.1]])
    means = np.array([[0.0, 0.3, -0.2]])
    if case == "clamp_scale":
        x, logscales, h, tol = np.array([0.0015]), np.array([[-7.0, -6.5, -7.0]]), 1e-9, 1e-5
    elif case == "deep_left_tail":      # z ~ -2000: sums underflow, the kernel takes its log path
        x, logscales, h, tol = np.array([-3.0]), np.array([[-6.5, -7.0, -6.8]]), 1e-6, 1e-6
    elif case == "deep_right_tail":
        x, logscales, h, tol = np.array([3.0]), np.array([[-6.5, -7.0, -6.8]]), 1e-6, 1e-6
    else:
        x, logscales, h, tol = np.array([-50.0]), np.array([[0.0, 0.2, -0.1]]), 1e-6, 1e-6
    _gradcheck_fused(path, x, [logits, means, logscales], 5, h=h, tol=tol)


def test_backward_none_means_zero_gradient():
    rng = np.random.default_rng(0)
    params = _params(rng, (4,), 3)
    x = rng.normal(size=(4,))
    g = rng.normal(size=(4,))
    with kernels_enabled(False):
        a = ml.mixlogistic_cdf_pdf_backward(x, *params, g_logF=g)
        b = ml.mixlogistic_cdf_pdf_backward(x, *params, g, np.zeros(4), np.zeros(4))
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-14, atol=0)


# ===================================================================== kernels vs reference
def _kernel_inputs(dtype, seed=0, n=300, K=5):
    """Mostly moderate elements plus deep tails (the kernel's fallback) and clamped scales."""
    rng = np.random.default_rng(seed)
    logits, means, logscales = _params(rng, (n,), K, dtype=np.float64, ls=(-7.0, 1.5))
    x = rng.normal(size=(n,)) * 4
    x[:20] = -200.0                       # deep left tail
    x[20:40] = 200.0                      # deep right tail
    logscales[40:60] = -7.0
    return [np.ascontiguousarray(a, dtype=dtype) for a in (x, logits, means, logscales)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_forward_matches_reference(dtype):
    args = _kernel_inputs(dtype)
    got = _fused("numba", *args)
    want = _fused("reference", *args)
    rtol = 1e-13 if dtype == np.float64 else 2e-6
    for g, w, name in zip(got, want, ("logF", "log1mF", "logpdf")):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * 10, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_backward_matches_reference(dtype):
    args = _kernel_inputs(dtype, seed=1)
    rng = np.random.default_rng(2)
    gs = [rng.normal(size=args[0].shape).astype(dtype) for _ in range(3)]
    outs = _fused("reference", *args)
    got = _fused_bwd("numba", *args, *gs)
    want = _fused_bwd("reference", *args, *gs, outputs=outs)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    for g, w, name in zip(got, want, ("x", "logits", "means", "logscales")):
        assert g.dtype == dtype and g.shape == w.shape
        assert rel_error(g, w) <= tol, f"d{name}: rel. error {rel_error(g, w):.2e}"


def test_kernel_noncontiguous_and_nd_inputs():
    rng = np.random.default_rng(4)
    raw = rng.normal(size=(2, 3, 2, 1, 2 + 3 * 4))
    x = rng.normal(size=(2, 3, 2, 1))
    logits, means, logscales = raw[..., 2:6], raw[..., 6:10], raw[..., 10:]    # strided views
    got = _fused("numba", x, logits, means, logscales)
    want = _fused("reference", x, logits, means, logscales)
    for g, w in zip(got, want):
        assert g.shape == x.shape
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_threaded_kernels_equal_single_thread(dtype, monkeypatch):
    """Chunk ranges run by 3 Python threads (from PARALLEL_MIN_WORK pairs on) give the
    single-thread results bit for bit: the same compiled code runs on every chunk."""
    args = _kernel_inputs(dtype, seed=6, n=700, K=3)
    rng = np.random.default_rng(0)
    gs = [rng.normal(size=args[0].shape).astype(dtype) for _ in range(3)]
    y = rng.uniform(1e-5, 1 - 1e-5, size=args[0].shape).astype(dtype)
    res = {}
    monkeypatch.setattr(nk, "_num_threads", lambda: 3)
    for name, min_work in (("one", 10**12), ("threads", 0)):
        monkeypatch.setattr(nk, "PARALLEL_MIN_WORK", min_work)
        res[name] = (_fused("numba", *args), _fused_bwd("numba", *args, *gs),
                     _invcdf("numba", y, *args[1:], method="bisection"),
                     _invcdf("numba", y, *args[1:], method="hybrid"))
    s, p = res["one"], res["threads"]
    for a, b in zip(s[0] + s[1], p[0] + p[1]):
        np.testing.assert_array_equal(a, b)
    for k in (2, 3):
        np.testing.assert_array_equal(s[k][0], p[k][0])
        assert s[k][1] == p[k][1]


def test_vectorised_exp_matches_numpy():
    a = np.concatenate([np.linspace(-750, 712, 20001), np.random.default_rng(0).uniform(-40, 40, 5000),
                        [0.0, -0.0, 1e-300, -1e-300, 709.78, 709.79, -745.1, -745.2, np.inf, -np.inf]])
    out = np.empty_like(a)
    nk.exp_array(a, out)
    with np.errstate(over="ignore"):
        ref = np.exp(a)
    normal = (ref > 2.3e-308) & np.isfinite(ref)
    assert np.all(np.isinf(out) == np.isinf(ref))
    assert np.max(np.abs(out[normal] - ref[normal]) / ref[normal]) <= 4.5e-16
    tiny = ref <= 2.3e-308                                  # subnormal or zero: one rounding
    assert np.all(np.abs(out[tiny] - ref[tiny]) <= 1e-323)
    nan = np.empty(1)
    nk.exp_array(np.array([np.nan]), nan)
    assert np.isnan(nan[0])


def test_vectorised_exp_float32_matches_numpy():
    a = np.concatenate([np.linspace(-105, 89, 40001), [0.0, -0.0, 88.72, 88.73, -103.9, np.inf, -np.inf]])
    a = a.astype(np.float32)
    out = np.empty_like(a)
    nk.exp_array(a, out)
    assert out.dtype == np.float32
    ref = np.exp(a.astype(np.float64))
    normal = (ref >= np.finfo(np.float32).tiny) & (ref <= np.finfo(np.float32).max)
    assert np.max(np.abs(out[normal] - ref[normal]) / ref[normal]) <= 1.5 * np.finfo(np.float32).eps
    assert np.all(np.isinf(out[ref > np.finfo(np.float32).max]))
    tiny = ref < np.finfo(np.float32).tiny                 # subnormal or zero: one rounding
    assert np.all(np.abs(out[tiny] - ref[tiny]) <= 1.5e-45)


# ===================================================================== inverse CDF
def _truth(y, logits, means, logscales):
    """Roots of the direct (scipy) CDF with brentq, element by element (float64)."""
    out = np.empty(y.shape)
    for i in np.ndindex(y.shape):
        l, m, s = logits[i], means[i], logscales[i]
        w = special.softmax(l)
        t = special.logit(y[i])
        q = m + np.exp(s) * t

        def f(v):
            return float(np.log((w * special.expit((v - m) * np.exp(-s))).sum()) -
                         np.log((w * special.expit(-(v - m) * np.exp(-s))).sum()) - t)

        lo, hi = q.min() - 1e-9 * (1 + abs(q.min())), q.max() + 1e-9 * (1 + abs(q.max()))
        out[i] = q[0] if lo == hi else optimize.brentq(f, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps)
    return out


def _release_bisection(y, logits, means, logscales, tol=1e-10, max_iters=100):
    """The release's mixlogistic_invcdf, line by line (appendix 8.2), in float64 NumPy."""
    def logcdf(x):
        z = (x[..., None] - means) * np.exp(-logscales)
        return special.logsumexp(special.log_softmax(logits, axis=-1) - np.logaddexp(0, -z), axis=-1)
    x = np.zeros_like(y)
    maxscales = np.sum(np.exp(logscales), axis=-1, keepdims=True)
    lb = np.min(means - 20 * maxscales, axis=-1)
    ub = np.max(means + 20 * maxscales, axis=-1)
    diff, it = np.inf, 0
    while diff > tol and it < max_iters:
        cur_y = np.exp(logcdf(x))
        gt = (cur_y > y).astype(y.dtype)
        lt = 1 - gt
        new_x = gt * (x + lb) / 2. + lt * (x + ub) / 2.
        lb, ub = gt * lb + lt * x, gt * x + lt * ub
        diff = np.max(np.abs(new_x - x))
        x = new_x
        it += 1
    return x, it


@pytest.mark.parametrize("path", PATHS)
def test_bisection_reproduces_release(path):
    rng = np.random.default_rng(5)
    n, K = 40, 4
    params = _params(rng, (n,), K)
    y = rng.uniform(1e-5, 1 - 1e-5, size=n)
    want, iters = _release_bisection(y, *params)
    got, info = _invcdf(path, y, *params, method="bisection")
    assert info["iterations"] == iters and info["evaluations"] == n * iters and info["converged"]
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["bisection", "hybrid"])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8), K=st.integers(1, 4))
def test_invcdf_matches_truth_float64(path, method, seed, n, K):
    rng = np.random.default_rng(seed)
    params = _params(rng, (n,), K, ls=(-3.0, 1.5))
    y = rng.uniform(1e-5, 1 - 1e-5, size=n)
    x, info = _invcdf(path, y, *params, method=method)
    truth = _truth(y, *params)
    pdf = np.exp(ml.mixlogistic_logpdf(truth, *params))
    np.testing.assert_allclose(x, truth, rtol=0, atol=2e-10 + 1e-15 / pdf.min())
    assert info["converged"]


EXTREME_CASES = {
    # logits, means, logscales (one element; targets 1e-5, 0.5, 1 - 1e-5 are tried)
    "tiny_scales": ([0.0, 0.5, -0.5], [0.0, 0.01, -0.02], [-7.0, -7.0, -7.0]),
    "far_apart": ([0.0, 0.0], [-100.0, 100.0], [0.0, 0.0]),
    "far_apart_tiny_scales": ([0.0, 1.0], [-100.0, 100.0], [-7.0, -7.0]),
    "single_component": ([0.3], [1.5], [0.7]),
    "single_component_tiny": ([0.0], [-3.0], [-7.0]),
    "wide_and_narrow": ([0.0, 0.0], [0.0, 0.0], [-7.0, 3.0]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(EXTREME_CASES))
def test_invcdf_extreme_targets(path, case):
    l, m, s = (np.array(v, dtype=np.float64) for v in EXTREME_CASES[case])
    y = np.array([1e-5, 0.3, 0.5, 0.9, 1 - 1e-5])
    params = [np.broadcast_to(v, (y.size, v.size)).copy() for v in (l, m, s)]
    truth = _truth(y, *params)
    if len(l) == 1:    # closed form: mu + exp(s) logit(y)
        np.testing.assert_allclose(truth, m[0] + np.exp(s[0]) * special.logit(y), rtol=0, atol=1e-12)
    pdf = np.exp(ml.mixlogistic_logpdf(truth, *params))
    atol = 2e-10 + 1e-15 / pdf + 1e-15 * np.abs(truth)
    xs = {}
    for method in ("bisection", "hybrid"):
        x, info = _invcdf(path, y, *params, method=method)
        assert np.all(np.abs(x - truth) <= atol), f"{method}: {x} vs {truth}"
        assert info["converged"]
        xs[method] = (x, info)
    np.testing.assert_allclose(xs["hybrid"][0], xs["bisection"][0], rtol=0, atol=2 * atol.max())
    if len(l) == 1:
        assert xs["hybrid"][1]["evaluations"] == 0        # the bracket is the exact root


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["bisection", "hybrid"])
def test_invcdf_float32(path, method):
    rng = np.random.default_rng(8)
    n, K = 60, 4
    params64 = _params(rng, (n,), K, ls=(-7.0, 1.0))
    y64 = rng.uniform(1e-5, 1 - 1e-5, size=n)
    y = y64.astype(np.float32)
    params = [p.astype(np.float32) for p in params64]
    x, info = _invcdf(path, y, *params, method=method)
    assert x.dtype == np.float32 and info["tol"] == 1e-6 and info["max_iters"] == 64
    p64 = [p.astype(np.float64) for p in params]
    truth = _truth(y.astype(np.float64), *p64)
    pdf = np.exp(ml.mixlogistic_logpdf(truth, *p64))
    # error budget: 2 tol + F's float32 round-off (~1e-6 absolute) / p + representing x
    atol = 2e-6 + 1e-6 / pdf + 2 * np.finfo(np.float32).eps * np.abs(truth)
    bad = np.abs(x - truth) > atol
    assert not bad.any(), f"{bad.sum()} elements off: {x[bad]} vs {truth[bad]}"


def test_kernel_invcdf_matches_reference_float64():
    rng = np.random.default_rng(9)
    n, K = 200, 5
    params = _params(rng, (n,), K, ls=(-7.0, 1.5))
    y = rng.uniform(1e-5, 1 - 1e-5, size=n)
    truth = _truth(y, *params)
    pdf = np.exp(ml.mixlogistic_logpdf(truth, *params))
    for method in ("bisection", "hybrid"):
        xk, ik = _invcdf("numba", y, *params, method=method)
        xr, ir = _invcdf("reference", y, *params, method=method)
        np.testing.assert_allclose(xk, xr, rtol=0, atol=4e-10 + 2e-15 / pdf.min())
        if method == "bisection":
            assert ik["iterations"] == ir["iterations"]
        else:
            assert abs(ik["evaluations"] - ir["evaluations"]) <= 0.05 * ir["evaluations"]


@pytest.mark.parametrize("path", PATHS)
def test_hybrid_needs_fewer_evaluations(path):
    """A count, not a timing: Newton on logit F converges in a handful of steps."""
    rng = np.random.default_rng(10)
    n, K = 200, 8
    params = _params(rng, (n,), K)
    y = rng.uniform(1e-5, 1 - 1e-5, size=n)
    _, ib = _invcdf(path, y, *params, method="bisection")
    _, ih = _invcdf(path, y, *params, method="hybrid")
    assert ih["evaluations"] * 4 <= ib["evaluations"], (ih, ib)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["bisection", "hybrid"])
def test_invcdf_reports_non_convergence(path, method):
    rng = np.random.default_rng(12)
    params = _params(rng, (5,), 3)
    y = rng.uniform(0.1, 0.9, size=5)
    _, info = _invcdf(path, y, *params, method=method, max_iters=2)
    assert not info["converged"] and info["max_evals"] <= 2


@pytest.mark.parametrize("path", PATHS)
def test_invcdf_beyond_release_bounds(path):
    """y = 1e-20 lies left of the release's lower bound (F(-41) ~ 2e-18); the widened bracket finds it."""
    params = [np.array([[0.0, 0.0]]), np.array([[-1.0, 1.0]]), np.array([[0.0, 0.0]])]
    y = np.array([1e-20])
    for method in ("bisection", "hybrid"):
        x, _ = _invcdf(path, y, *params, method=method)
        np.testing.assert_allclose(x, _truth(y, *params), rtol=0, atol=1e-8)


def test_empty_arrays():
    params = [np.zeros((0, 3)) for _ in range(3)]
    for path in PATHS:
        outs = _fused(path, np.zeros(0), *params)
        assert all(o.shape == (0,) for o in outs)
        for method in ("bisection", "hybrid"):
            x, info = _invcdf(path, np.zeros(0), *params, method=method)
            assert x.shape == (0,) and info["evaluations"] == 0


# ===================================================================== bad input
def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    params = _params(rng, (4,), 3)
    x = rng.normal(size=(4,))
    y = np.full(4, 0.5)
    with pytest.raises(FlowInputError, match="means"):
        ml.mixlogistic_cdf_pdf(x, params[0], params[1][:3], params[2])
    with pytest.raises(FlowInputError, match="K"):
        ml.mixlogistic_cdf_pdf(x, params[0], params[1][:, :2], params[2])
    with pytest.raises(FlowInputError, match="dtype"):
        ml.mixlogistic_cdf_pdf(x.astype(np.float32), *params)
    with pytest.raises(FlowInputError, match="float32 and float64"):
        ml.mixlogistic_cdf_pdf(x.astype(np.float16), *[p.astype(np.float16) for p in params])
    with pytest.raises(FlowInputError, match="floating"):
        ml.mixlogistic_cdf_pdf(np.arange(4), *params)
    with pytest.raises(FlowInputError, match="K >= 1"):
        ml.mixlogistic_cdf_pdf(x, *[np.zeros((4, 0))] * 3)
    with pytest.raises(FlowInputError, match="g_logpdf"):
        ml.mixlogistic_cdf_pdf_backward(x, *params, g_logpdf=np.zeros(3))
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(FlowInputError, match=r"open interval \(0, 1\)"):
            ml.mixlogistic_invcdf(np.array([0.5, bad, 0.5, 0.5]), *params)
    with pytest.raises(FlowInputError, match="non-finite"):
        ml.mixlogistic_invcdf(np.array([0.5, np.nan, 0.5, 0.5]), *params)
    p_nan = params[1].copy()
    p_nan[0, 0] = np.inf
    with pytest.raises(FlowInputError, match="means.*non-finite"):
        ml.mixlogistic_invcdf(y, params[0], p_nan, params[2])
    with pytest.raises(FlowInputError, match="method"):
        ml.mixlogistic_invcdf(y, *params, method="newton")
    with pytest.raises(FlowInputError, match="tol"):
        ml.mixlogistic_invcdf(y, *params, tol=-1.0)
