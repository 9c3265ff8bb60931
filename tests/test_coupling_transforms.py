"""Elementwise coupling transforms (flowpp_ref.bijections.coupling_transforms).

* backward of the mixture-of-logistics coupling (with and without affine) and of the affine
  coupling vs gradcheck, for e and every parameter array (float64, numba and reference paths);
* round trips (forward then inverse, inverse then forward; bisection and hybrid; float64 and
  float32) and the log-det cancelling between the two directions;
* the log-det against log|det| of a finite-difference Jacobian, which must be diagonal;
* the release's clip of the inverse-CDF target; tiny scales and far-apart components;
* numba vs reference at the coupling level; bad input -> FlowInputError.

Tolerances (round trips; conftest's TOL holds the per-dtype defaults):
* float64, e -> y -> e: 1e-9 absolute (the inverse CDF stops at tol = 1e-10).
* float64, y -> e -> y: 1e-9 + 2 tol |dy/de| (the inverse's error in e, carried through dy/de).
* float32: TOL[float32]["roundtrip"] = 2e-4 in e; in y, 2e-4 (1 + |dy/de|) (float32 tol = 1e-6
  plus float32 round-off of F near 0 and 1 divided by the density).
* y -> e -> y also carries the rounding of u = sigmoid((y - b) exp(-a)) near 0 and 1:
  + 2 eps exp(a) / (u (1 - u)) (1.9e-3 exp(a) at |(y - b) exp(-a)| = 9 in float32).
"""
import numpy as np
import pytest
from conftest import TOL
from hypothesis import given
from hypothesis import strategies as st

from flowpp_ref.bijections.coupling_transforms import (CLIP_EPS, affine_coupling_backward, affine_coupling_forward,
                                                       affine_coupling_inverse, mixlogistic_coupling_backward,
                                                       mixlogistic_coupling_forward, mixlogistic_coupling_inverse)
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss, rel_error
from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.bijections.mixlogistic import mixlogistic_cdf_pdf
from flowpp_ref.core.validation import FlowInputError

PATHS = ["numba", "reference"]
METHODS = ["bisection", "hybrid"]
DTYPES = [np.float64, np.float32]


def _inputs(seed, shape=(2, 2, 2, 1), K=3, dtype=np.float64, ls=(-0.5, 1.0)):
    """e, a, b, logits, means, logscales with F(e) well inside the clip (|z| < 5)."""
    rng = np.random.default_rng(seed)
    e = rng.uniform(-2, 2, size=shape)
    a = np.tanh(rng.normal(size=shape))
    b = rng.normal(size=shape)
    logits = rng.normal(size=shape + (K,))
    means = rng.uniform(-1, 1, size=shape + (K,))
    logscales = rng.uniform(*ls, size=shape + (K,))
    return [np.ascontiguousarray(v, dtype=dtype) for v in (e, a, b, logits, means, logscales)]


def _dy_de(e, a, logits, means, logscales, with_affine=True):
    """|dy/de| elementwise = exp(a) p / (F (1-F))."""
    lF, lG, lP = mixlogistic_cdf_pdf(e, logits, means, logscales)
    d = np.exp(lP - lF - lG)
    return d * np.exp(a) if with_affine else d


shapes = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 2))


# ===================================================================== gradients
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_affine", [True, False], ids=["affine", "no_affine"])
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, K=st.integers(1, 3))
def test_mixlogistic_coupling_gradcheck_float64(path, with_affine, seed, shape, K):
    e, a, b, logits, means, logscales = _inputs(seed, shape, K, ls=(-2.0, 1.0))
    with kernels_enabled(path == "numba"):
        y, logdet, cache = mixlogistic_coupling_forward(e, a, b, logits, means, logscales, with_affine)
        loss_fn, dy, dlogdet = random_scalar_loss(y, logdet, seed=seed % 1000)
        grads = mixlogistic_coupling_backward(dy, dlogdet, cache)

        def f():
            return loss_fn(*mixlogistic_coupling_forward(e, a, b, logits, means, logscales, with_affine)[:2])

        inputs = dict(e=e, logits=logits, means=means, logscales=logscales)
        if with_affine:
            inputs.update(a=a, b=b)
        assert set(grads) == set(inputs)
        for k, v in grads.items():
            assert v.shape == inputs[k].shape and v.dtype == np.float64, k
        gradcheck(f, inputs, grads, tol=TOL[np.float64]["grad"])


@pytest.mark.parametrize("path", PATHS)
def test_mixlogistic_coupling_gradcheck_clamped_scales(path):
    """Log-scales at the -7 clamp (z ~ 1e3 per unit of e): a smaller finite-difference step."""
    e, a, b, logits, means, logscales = _inputs(3, (1, 2, 1, 2), K=2)
    logscales[...] = -7.0
    e[...] = means[..., 0] + 1e-3 * np.array([[[[1.0, -2.0]], [[0.5, 3.0]]]])
    with kernels_enabled(path == "numba"):
        y, logdet, cache = mixlogistic_coupling_forward(e, a, b, logits, means, logscales)
        loss_fn, dy, dlogdet = random_scalar_loss(y, logdet, seed=4)
        grads = mixlogistic_coupling_backward(dy, dlogdet, cache)
        gradcheck(lambda: loss_fn(*mixlogistic_coupling_forward(e, a, b, logits, means, logscales)[:2]),
                  dict(e=e, a=a, b=b, logits=logits, means=means, logscales=logscales), grads,
                  h=1e-9, tol=1e-5)


@given(seed=st.integers(0, 2**31 - 1), shape=shapes)
def test_affine_coupling_gradcheck_float64(seed, shape):
    e, a, b = _inputs(seed, shape)[:3]
    y, logdet, cache = affine_coupling_forward(e, a, b)
    loss_fn, dy, dlogdet = random_scalar_loss(y, logdet, seed=1)
    grads = affine_coupling_backward(dy, dlogdet, cache)
    assert set(grads) == {"e", "a", "b"}
    gradcheck(lambda: loss_fn(*affine_coupling_forward(e, a, b)[:2]), dict(e=e, a=a, b=b), grads,
              tol=TOL[np.float64]["grad"])


def test_backward_accepts_none_and_omits_a_b_without_affine():
    e, a, b, logits, means, logscales = _inputs(0)
    _, _, cache = mixlogistic_coupling_forward(e, None, None, logits, means, logscales, with_affine=False)
    g = mixlogistic_coupling_backward(None, np.ones(e.shape[0]), cache)
    assert set(g) == {"e", "logits", "means", "logscales"}
    g0 = mixlogistic_coupling_backward(None, None, cache)
    assert all(float(np.abs(v).max()) == 0.0 for v in g0.values())


# ===================================================================== round trips
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("with_affine", [True, False], ids=["affine", "no_affine"])
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, K=st.integers(1, 4))
def test_invertibility_mixlogistic_coupling_forward_then_inverse(path, method, dtype, with_affine, seed, shape, K):
    e, a, b, logits, means, logscales = _inputs(seed, shape, K, dtype=dtype)
    with kernels_enabled(path == "numba"):
        y, logdet, _ = mixlogistic_coupling_forward(e, a, b, logits, means, logscales, with_affine)
        e2, logdet_inv = mixlogistic_coupling_inverse(y, a, b, logits, means, logscales, with_affine,
                                                      method=method)
    assert e2.dtype == dtype and logdet.dtype == dtype and logdet.shape == (shape[0],)
    tol = 1e-9 if dtype == np.float64 else TOL[np.float32]["roundtrip"]
    np.testing.assert_allclose(e2, e, rtol=0, atol=tol)
    np.testing.assert_allclose(logdet + logdet_inv, 0, atol=TOL[dtype]["logdet"] * e[0].size)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("with_affine", [True, False], ids=["affine", "no_affine"])
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, K=st.integers(1, 4))
def test_invertibility_mixlogistic_coupling_inverse_then_forward(path, method, dtype, with_affine, seed, shape, K):
    _, a, b, logits, means, logscales = _inputs(seed, shape, K, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    v = rng.uniform(-9, 9, size=shape)                    # (y - b) exp(-a) inside logit(1 - 1e-5) = 11.5
    y = (v * np.exp(a) + b if with_affine else v).astype(dtype)
    with kernels_enabled(path == "numba"):
        e, logdet_inv = mixlogistic_coupling_inverse(y, a, b, logits, means, logscales, with_affine,
                                                     method=method)
        y2, logdet, _ = mixlogistic_coupling_forward(e, a, b, logits, means, logscales, with_affine)
    d = _dy_de(*(np.asarray(t, np.float64) for t in (e, a, logits, means, logscales)), with_affine)
    # u = sigmoid(v) is stored with absolute error eps/2, i.e. relative error eps / (2 u (1-u)) in
    # min(u, 1-u); logit(u), hence y, moves by exp(a) eps / (u (1-u)) (1.9e-3 exp(a) at |v| = 9 in float32)
    u = 1 / (1 + np.exp(-v))
    scale = np.exp(a.astype(np.float64)) if with_affine else 1.0
    conditioning = 2 * scale * np.finfo(dtype).eps / (u * (1 - u))
    if dtype == np.float64:
        atol = 1e-9 + 2 * 1e-10 * d + conditioning
    else:
        atol = TOL[np.float32]["roundtrip"] * (1 + d) + conditioning
    assert np.all(np.abs(y2 - y) <= atol), f"max |y2 - y| = {np.abs(y2 - y).max():.3e}"
    np.testing.assert_allclose(logdet + logdet_inv, 0, atol=TOL[dtype]["logdet"] * y[0].size)


INVERTIBILITY_EXTREMES = {
    # logits, means, logscales for K = 2; e is drawn near the components
    "tiny_scales": ([0.0, 0.7], [-0.5, 0.5], [-7.0, -7.0]),
    "far_apart": ([0.2, -0.3], [-100.0, 100.0], [0.0, 0.0]),
    "far_apart_tiny_scales": ([0.0, 0.0], [-100.0, 100.0], [-7.0, -7.0]),
    "single_component": ([0.0], [2.0], [-7.0]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(INVERTIBILITY_EXTREMES))
def test_invertibility_mixlogistic_coupling_extreme_params(path, method, case):
    l, m, s = (np.array(v) for v in INVERTIBILITY_EXTREMES[case])
    K = len(l)
    rng = np.random.default_rng(7)
    shape = (2, 2, 2, 1)
    comp = rng.integers(0, K, size=shape)
    e = m[comp] + np.exp(s[comp]) * rng.uniform(-3, 3, size=shape)     # within 3 scales of a component
    a = np.tanh(rng.normal(size=shape))
    b = rng.normal(size=shape)
    logits, means, logscales = (np.broadcast_to(v, shape + (K,)).copy() for v in (l, m, s))
    with kernels_enabled(path == "numba"):
        y, logdet, _ = mixlogistic_coupling_forward(e, a, b, logits, means, logscales)
        e2, logdet_inv = mixlogistic_coupling_inverse(y, a, b, logits, means, logscales, method=method)
    # e is known to about ulp(100) = 1.4e-14 (far-apart means); the inverse CDF stops at tol 1e-10
    np.testing.assert_allclose(e2, e, rtol=0, atol=2e-10)
    np.testing.assert_allclose(logdet + logdet_inv, 0, atol=1e-6 * e[0].size)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@given(seed=st.integers(0, 2**31 - 1), shape=shapes)
def test_invertibility_affine_coupling(dtype, seed, shape):
    e, a, b = _inputs(seed, shape, dtype=dtype)[:3]
    y, logdet, _ = affine_coupling_forward(e, a, b)
    e2, logdet_inv = affine_coupling_inverse(y, a, b)
    np.testing.assert_allclose(e2, e, rtol=0, atol=TOL[dtype]["roundtrip"])
    np.testing.assert_allclose(logdet + logdet_inv, 0, atol=TOL[dtype]["logdet"])
    y2, _, _ = affine_coupling_forward(*(affine_coupling_inverse(y, a, b)[0], a, b))
    np.testing.assert_allclose(y2, y, rtol=0, atol=TOL[dtype]["roundtrip"] * 10)


def test_inverse_clips_targets_like_the_release():
    """|(y - b) exp(-a)| beyond logit(1 - 1e-5) maps to the 1e-5 / 1 - 1e-5 quantile."""
    e, a, b, logits, means, logscales = _inputs(5, (1, 1, 2, 1), K=2)
    y = b + np.exp(a) * np.array([[[[40.0], [-40.0]]]])
    e2, _ = mixlogistic_coupling_inverse(y, a, b, logits, means, logscales)
    lF, lG, _ = mixlogistic_cdf_pdf(e2, logits, means, logscales)
    np.testing.assert_allclose(np.exp(lF[0, 0, 0, 0]), 1 - CLIP_EPS, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.exp(lF[0, 0, 1, 0]), CLIP_EPS, rtol=0, atol=1e-12)


def test_inverse_return_info():
    e, a, b, logits, means, logscales = _inputs(6)
    y, _, _ = mixlogistic_coupling_forward(e, a, b, logits, means, logscales)
    _, _, ib = mixlogistic_coupling_inverse(y, a, b, logits, means, logscales, return_info=True)
    _, _, ih = mixlogistic_coupling_inverse(y, a, b, logits, means, logscales, method="hybrid",
                                            return_info=True)
    assert ib["method"] == "bisection" and ih["method"] == "hybrid"
    assert ih["evaluations"] < ib["evaluations"]


# ===================================================================== log-det vs Jacobian
def _numerical_jacobian(fn, e, h=1e-6):
    """J[i, j] = d y_i / d e_j by central differences (flattened)."""
    n = e.size
    J = np.zeros((n, n))
    flat = e.reshape(-1)
    for j in range(n):
        old = flat[j]
        flat[j] = old + h
        yp = fn(e).reshape(-1).copy()
        flat[j] = old - h
        ym = fn(e).reshape(-1).copy()
        flat[j] = old
        J[:, j] = (yp - ym) / (2 * h)
    return J


@pytest.mark.parametrize("kind", ["mixlogistic_affine", "mixlogistic_no_affine", "affine"])
@pytest.mark.parametrize("path", PATHS)
def test_logdet_matches_numerical_jacobian(kind, path):
    e, a, b, logits, means, logscales = _inputs(8, (2, 2, 1, 2), K=3, ls=(-2.0, 1.0))

    def fwd(x):
        with kernels_enabled(path == "numba"):
            if kind == "affine":
                return affine_coupling_forward(x, a, b)[:2]
            return mixlogistic_coupling_forward(x, a, b, logits, means, logscales,
                                                with_affine=(kind == "mixlogistic_affine"))[:2]

    _, logdet = fwd(e)
    for i in range(e.shape[0]):
        ei = e[i:i + 1].copy()
        sl = (slice(i, i + 1),)

        def fn(x, sl=sl):
            full = e.copy()
            full[sl] = x
            return fwd(full)[0][sl]

        J = _numerical_jacobian(fn, ei)
        off = J - np.diag(np.diag(J))
        assert np.abs(off).max() == 0.0, "the transform is elementwise: the Jacobian must be diagonal"
        assert np.all(np.diag(J) > 0)
        np.testing.assert_allclose(np.log(np.diag(J)).sum(), logdet[i], rtol=0, atol=1e-7)


# ===================================================================== kernels vs reference
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_coupling_kernel_matches_reference(dtype):
    e, a, b, logits, means, logscales = _inputs(9, (2, 3, 2, 2), K=4, dtype=dtype, ls=(-7.0, 1.0))
    rng = np.random.default_rng(0)
    dy = rng.normal(size=e.shape).astype(dtype)
    dld = rng.normal(size=(e.shape[0],)).astype(dtype)
    res = {}
    for path in PATHS:
        with kernels_enabled(path == "numba"):
            y, logdet, cache = mixlogistic_coupling_forward(e, a, b, logits, means, logscales)
            res[path] = (y, logdet, mixlogistic_coupling_backward(dy, dld, cache))
    tol = 1e-12 if dtype == np.float64 else 2e-5
    (yk, lk, gk), (yr, lr, gr) = res["numba"], res["reference"]
    assert rel_error(yk, yr) <= tol and rel_error(lk, lr) <= tol
    for k in gr:
        assert gk[k].dtype == dtype
        assert rel_error(gk[k], gr[k]) <= (tol if dtype == np.float64 else 1e-4), k


# ===================================================================== bad input
def test_bad_inputs_raise():
    e, a, b, logits, means, logscales = _inputs(0)
    with pytest.raises(FlowInputError, match="a has shape"):
        mixlogistic_coupling_forward(e, a[:1], b, logits, means, logscales)
    with pytest.raises(FlowInputError, match="b: required"):
        mixlogistic_coupling_forward(e, a, None, logits, means, logscales)
    with pytest.raises(FlowInputError, match="logits"):
        mixlogistic_coupling_forward(e, a, b, logits[..., 0], means, logscales)
    with pytest.raises(FlowInputError, match="dtype"):
        mixlogistic_coupling_forward(e, a.astype(np.float32), b, logits, means, logscales)
    with pytest.raises(FlowInputError, match="0-d"):
        affine_coupling_forward(np.float64(1.0), np.float64(0.0), np.float64(0.0))
    _, _, cache = mixlogistic_coupling_forward(e, a, b, logits, means, logscales)
    with pytest.raises(FlowInputError, match="dlogdet"):
        mixlogistic_coupling_backward(np.zeros_like(e), np.zeros(5), cache)
    with pytest.raises(FlowInputError, match="dy"):
        mixlogistic_coupling_backward(np.zeros(3), np.zeros(e.shape[0]), cache)
    y_bad = e.copy()
    y_bad[0, 0, 0, 0] = np.nan
    with pytest.raises(FlowInputError, match="y: 1 non-finite"):
        mixlogistic_coupling_inverse(y_bad, a, b, logits, means, logscales)
    with pytest.raises(FlowInputError, match="y: 1 non-finite"):
        affine_coupling_inverse(y_bad, a, b)
    a_bad = a.copy()
    a_bad[0, 0, 0, 0] = np.inf
    with pytest.raises(FlowInputError, match="a: 1 non-finite"):
        mixlogistic_coupling_inverse(e, a_bad, b, logits, means, logscales)
    with pytest.raises(FlowInputError, match="method"):
        mixlogistic_coupling_inverse(e, a, b, logits, means, logscales, method="newton")
