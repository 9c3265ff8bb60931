"""Tests of the simple bijections: ImgProc, Sigmoid, Normalize, Pointwise and the splits.

Every bijection (and its ``Inverse``) is a case of the registry ``CASES``; each
generic test is parametrised over it, so ``-k Pointwise`` or ``-k Inverse-Sigmoid``
selects one bijection. Generic tests:

* ``test_invertibility_*``: round trips both ways (float64 and float32) and
  ``logdet + logdet_inv == 0``;
* ``test_logdet_matches_numerical_jacobian``: the full per-sample Jacobian by
  central differences (float64), its log|det| against the returned log-det;
* ``test_gradcheck_input`` / ``test_gradcheck_params``: ``backward`` (for the
  ``Inverse-*`` cases: ``inverse_backward``) against finite differences of a
  random linear loss in y and logdet.

Then specific tests (layouts, inits, float64 factorisation) and bad inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOL
from flowpp_ref.bijections import (ChannelSplit, CheckerboardSplit, Compose, ImgProc, Inverse, Normalize, Pointwise,
                                   Sigmoid, SpaceToDepth, TupleFlip, checkerboard_merge, checkerboard_split,
                                   depth_to_space, factor_matrix, space_to_depth)
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss
from flowpp_ref.core.validation import FlowInputError

DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]

# value ranges of the inputs drawn for each domain
REAL = (-3.0, 3.0)
PIXELS = (1.0, 255.0)        # ImgProc input; 0 and 256 themselves: test_imgproc_boundary_values
LOGIT_OF_PIXELS = (-2.9, 2.9)  # inside logit(0.05) .. logit(0.95) = -+2.944
UNIT = (0.01, 0.99)
SIG_REAL = (-6.0, 6.0)


# ---------------------------------------------------------------- registry
def _randomize_normalize(b: Normalize, rng):
    """Non-trivial parameters (both signs of invstd) instead of the identity init."""
    for k, v in b.params.items():
        if k.startswith("mu"):
            b.params[k] = rng.standard_normal(v.shape).astype(v.dtype)
        else:
            sign = np.where(rng.random(v.shape) < 0.25, -1.0, 1.0)
            b.params[k] = (sign * rng.uniform(0.5, 2.0, v.shape)).astype(v.dtype)
    return b


def _normalize(shape, dtype, rng):
    return _randomize_normalize(Normalize(shape[1:], dtype=dtype), rng)


def _normalize_pair(shape, dtype, rng):
    B, H, W, C = shape
    return _randomize_normalize(Normalize(((H, W, C), (H, W, C + 1)), dtype=dtype), rng)


def _pair_shapes(shape):
    B, H, W, C = shape
    return [(B, H, W, C), (B, H, W, C + 1)]


def _half_w(shape):
    B, H, W, C = shape
    return [(B, H, W // 2, C)] * 2


def _half_c(shape):
    B, H, W, C = shape
    return [(B, H, W, C // 2)] * 2


def _squeezed(shape):
    B, H, W, C = shape
    return (B, H // 2, W // 2, 4 * C)


def _same(shape):
    return tuple(shape)


@dataclass
class Case:
    id: str
    make: Callable            # (shape [B,H,W,C], dtype, rng) -> Bijection
    x_shapes: Callable        # shape -> input shape, or list of shapes for a tuple input
    x_range: tuple
    y_shapes: Callable        # shape -> output shape(s)
    y_range: tuple
    even_c: bool = False
    has_params: bool = False


def _inverse_case(c: Case) -> Case:
    return Case(id=f"Inverse-{c.id}", make=lambda s, d, r: Inverse(c.make(s, d, r)),
                x_shapes=c.y_shapes, x_range=c.y_range, y_shapes=c.x_shapes, y_range=c.x_range,
                even_c=c.even_c, has_params=c.has_params)


_BASE_CASES = [
    Case("ImgProc", lambda s, d, r: ImgProc(), _same, PIXELS, _same, LOGIT_OF_PIXELS),
    Case("Sigmoid", lambda s, d, r: Sigmoid(), _same, SIG_REAL, _same, UNIT),
    Case("Normalize", _normalize, _same, REAL, _same, REAL, has_params=True),
    Case("Normalize-pair", _normalize_pair, _pair_shapes, REAL, _pair_shapes, REAL, has_params=True),
    Case("Pointwise-noisy", lambda s, d, r: Pointwise(s[3], rng=r, noisy_identity_init=0.3, dtype=d),
         _same, REAL, _same, REAL, has_params=True),
    Case("Pointwise-orthogonal", lambda s, d, r: Pointwise(s[3], rng=r, noisy_identity_init=None, dtype=d),
         _same, REAL, _same, REAL, has_params=True),
    Case("Pointwise-pair", lambda s, d, r: Pointwise((s[3], s[3] + 1), rng=r, noisy_identity_init=0.3, dtype=d),
         _pair_shapes, REAL, _pair_shapes, REAL, has_params=True),
    Case("CheckerboardSplit-bin0", lambda s, d, r: CheckerboardSplit(0), _same, REAL, _half_w, REAL),
    Case("CheckerboardSplit-bin1", lambda s, d, r: CheckerboardSplit(1), _same, REAL, _half_w, REAL),
    Case("ChannelSplit", lambda s, d, r: ChannelSplit(), _same, REAL, _half_c, REAL, even_c=True),
    Case("TupleFlip", lambda s, d, r: TupleFlip(), _pair_shapes, REAL, lambda s: _pair_shapes(s)[::-1], REAL),
    Case("SpaceToDepth", lambda s, d, r: SpaceToDepth(), _same, REAL, _squeezed, REAL),
]
CASES = _BASE_CASES + [_inverse_case(c) for c in _BASE_CASES]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]
PARAM_CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES if c.has_params]


# ---------------------------------------------------------------- drawing
@st.composite
def base_shapes(draw, even_c=False, tiny=False):
    """[B, H, W, C] with B <= 3, H, W in {2, 4}, C <= 4 (tiny: B <= 2, H = W = 2, C <= 2)."""
    B = draw(st.integers(1, 2 if tiny else 3))
    H = draw(st.sampled_from([2] if tiny else [2, 4]))
    W = draw(st.sampled_from([2] if tiny else [2, 4]))
    cs = ([2] if tiny else [2, 4]) if even_c else ([1, 2] if tiny else [1, 2, 3, 4])
    C = draw(st.sampled_from(cs))
    return (B, H, W, C)


def draw_values(data, shapes, rng_range, dtype, label):
    """Hypothesis-drawn arrays (a tuple when ``shapes`` is a list), cast to ``dtype``."""
    lo, hi = rng_range

    def one(s, k):
        a = data.draw(hnp.arrays(np.float64, s, elements=st.floats(lo, hi, allow_nan=False)), label=f"{label}{k}")
        return np.ascontiguousarray(a.astype(dtype))

    if isinstance(shapes, list):
        return tuple(one(s, k) for k, s in enumerate(shapes))
    return one(shapes, "")


def setup_case(case, data, dtype, tiny=False):
    shape = data.draw(base_shapes(even_c=case.even_c, tiny=tiny), label="shape")
    seed = data.draw(st.integers(0, 2**31 - 1), label="param_seed")
    b = case.make(shape, dtype, np.random.default_rng(seed))
    return b, shape


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_struct_close(a, b, tol, what):
    a, b = as_tuple(a), as_tuple(b)
    assert len(a) == len(b), what
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype, f"{what}: {u.shape}/{u.dtype} vs {v.shape}/{v.dtype}"
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol, err_msg=what)


def assert_logdet_zero_sum(ld, ld_inv, tol, what):
    scale = 1.0 + np.abs(ld.astype(np.float64))
    err = np.abs(ld.astype(np.float64) + ld_inv.astype(np.float64))
    assert np.all(err <= tol * scale), f"{what}: logdet + logdet_inv = {ld + ld_inv}"


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@given(data=st.data())
def test_invertibility_forward_then_inverse(case, dtype, data):
    b, shape = setup_case(case, data, dtype)
    x = draw_values(data, case.x_shapes(shape), case.x_range, dtype, "x")
    tol = TOL[dtype]
    y, ld, _ = b.forward(x)
    assert ld.shape == (shape[0],) and ld.dtype == dtype
    expect = case.y_shapes(shape)
    assert isinstance(y, tuple) == isinstance(expect, list)
    assert [u.shape for u in as_tuple(y)] == [tuple(s) for s in (expect if isinstance(expect, list) else [expect])]
    assert all(u.dtype == dtype for u in as_tuple(y))
    x2, ld_inv = b.inverse(y)
    x3, ld_inv3, _ = b.inverse_with_cache(y)
    assert_struct_close(x2, x, tol["roundtrip"], f"{case.id}: inverse(forward(x)) != x")
    assert_struct_close(x3, x2, 0, f"{case.id}: inverse_with_cache differs from inverse")
    np.testing.assert_array_equal(ld_inv3, ld_inv)
    assert_logdet_zero_sum(ld, ld_inv, tol["logdet"], case.id)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@given(data=st.data())
def test_invertibility_inverse_then_forward(case, dtype, data):
    b, shape = setup_case(case, data, dtype)
    y = draw_values(data, case.y_shapes(shape), case.y_range, dtype, "y")
    tol = TOL[dtype]
    x, ld_inv = b.inverse(y)
    assert ld_inv.shape == (shape[0],) and ld_inv.dtype == dtype
    y2, ld, _ = b.forward(x)
    assert_struct_close(y2, y, tol["roundtrip"], f"{case.id}: forward(inverse(y)) != y")
    assert_logdet_zero_sum(ld, ld_inv, tol["logdet"], case.id)


# ---------------------------------------------------------------- Jacobian
def _flat_sample(struct, i):
    return np.concatenate([a[i].ravel() for a in as_tuple(struct)])


def numerical_log_abs_det(fn, x, i, h=1e-6):
    """log|det| of the Jacobian of sample i of ``fn`` (central differences, float64)."""
    cols = []
    for a in as_tuple(x):
        for idx in np.ndindex(a.shape[1:]):
            full = (i,) + idx
            old = a[full]
            a[full] = old + h
            yp = _flat_sample(fn(x), i)
            a[full] = old - h
            ym = _flat_sample(fn(x), i)
            a[full] = old
            cols.append((yp - ym) / (2 * h))
    J = np.stack(cols, axis=1)
    assert J.shape[0] == J.shape[1], f"Jacobian is not square: {J.shape}"
    sign, lad = np.linalg.slogdet(J)
    assert sign != 0, "numerical Jacobian is singular"
    return lad


@pytest.mark.parametrize("case", CASE_PARAMS)
@settings(max_examples=4)
@given(data=st.data())
def test_logdet_matches_numerical_jacobian(case, data):
    b, shape = setup_case(case, data, np.float64, tiny=True)
    x = draw_values(data, case.x_shapes(shape), case.x_range, np.float64, "x")
    y, ld, _ = b.forward(x)
    tol = TOL[np.float64]["logdet"]
    for i in range(shape[0]):
        lad = numerical_log_abs_det(lambda z: b.forward(z)[0], x, i)
        assert abs(lad - ld[i]) <= tol * (1 + abs(lad)), f"{case.id} sample {i}: numerical {lad} vs {ld[i]}"


# ---------------------------------------------------------------- gradients
def _input_dict(x):
    return {"x": x} if not isinstance(x, tuple) else {f"x{k}": a for k, a in enumerate(x)}


@pytest.mark.parametrize("case", CASE_PARAMS)
@settings(max_examples=5)
@given(data=st.data())
def test_gradcheck_input(case, data):
    b, shape = setup_case(case, data, np.float64)
    x = draw_values(data, case.x_shapes(shape), case.x_range, np.float64, "x")
    y, ld, cache = b.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=data.draw(st.integers(0, 1000), label="loss_seed"))
    dx, dctx, grads = b.backward(dy, dld, cache)
    assert dctx is None
    assert isinstance(dx, tuple) == isinstance(x, tuple)
    assert set(grads) == set(b.parameters())
    gradcheck(lambda: loss_fn(*b.forward(x)[:2]), _input_dict(x), _input_dict(dx), tol=TOL[np.float64]["grad"])


@pytest.mark.parametrize("case", PARAM_CASE_PARAMS)
@settings(max_examples=5)
@given(data=st.data())
def test_gradcheck_params(case, data):
    b, shape = setup_case(case, data, np.float64)
    x = draw_values(data, case.x_shapes(shape), case.x_range, np.float64, "x")
    y, ld, cache = b.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=data.draw(st.integers(0, 1000), label="loss_seed"))
    _, _, grads = b.backward(dy, dld, cache)
    params = b.parameters()
    assert set(grads) == set(params) and params
    gradcheck(lambda: loss_fn(*b.forward(x)[:2]), params, grads, tol=TOL[np.float64]["grad"])


# ---------------------------------------------------------------- ImgProc / Sigmoid specifics
def test_imgproc_boundary_values():
    x = np.array([0.0, 256.0, 255.999, 128.0]).reshape(1, 1, 2, 2)
    z, ld, _ = ImgProc().forward(x)
    s = 0.05 + 0.9 * x / 256
    np.testing.assert_allclose(z, np.log(s / (1 - s)), rtol=1e-13)
    assert z[0, 0, 0, 0] == pytest.approx(np.log(0.05 / 0.95)) and z[0, 0, 0, 1] == pytest.approx(np.log(19.0))
    # the paper's per-element expression log(0.9/256) + softplus(z) + softplus(-z)
    ref = (np.log(0.9 / 256) + np.logaddexp(0, z) + np.logaddexp(0, -z)).sum()
    assert ld[0] == pytest.approx(ref, rel=1e-13)
    x2, _ = ImgProc().inverse(z)
    np.testing.assert_allclose(x2, x, atol=1e-10)


def test_sigmoid_saturated_inputs_stay_finite():
    x = np.array([[-1000.0, -40.0, 0.0, 40.0, 1000.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, ld, cache = Sigmoid().forward(x)
        dx, _, _ = Sigmoid().backward(np.ones_like(y), np.ones(1), cache)
    assert np.all((y >= 0) & (y <= 1)) and np.isfinite(ld).all() and np.isfinite(dx).all()
    # -softplus(x) - softplus(-x) = -|x| - 2 log(1 + e^-|x|)
    ref = -(np.abs(x) + 2 * np.log1p(np.exp(-np.abs(x)))).sum()
    assert ld[0] == pytest.approx(ref, rel=1e-14)


def test_sigmoid_inverse_has_no_safe_log_clamp():
    """The paper's safe_log would cap -log y at -log(1e-22) = 50.66; we keep the exact value."""
    y = np.array([[1e-30]])
    x, ld = Sigmoid().inverse(y)
    assert x[0, 0] == pytest.approx(np.log(1e-30), rel=1e-12)
    assert ld[0] == pytest.approx(-np.log(1e-30), rel=1e-12)
    assert ld[0] > 60.0


# ---------------------------------------------------------------- Normalize specifics
def test_normalize_starts_as_identity_and_names_params():
    n = Normalize((2, 2, 3), dtype=np.float64)
    assert sorted(n.parameters()) == ["invstd", "mu"]
    x = np.random.default_rng(0).standard_normal((2, 2, 2, 3))
    y, ld, _ = n.forward(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ld, 0.0)
    n2 = Normalize(((2, 2, 3), (2, 2, 1)))
    assert sorted(n2.parameters()) == ["invstd0", "invstd1", "mu0", "mu1"]
    assert n2.params["mu1"].shape == (2, 2, 1) and n2.params["mu1"].dtype == np.float32


@pytest.mark.parametrize("init_scale", [1.0, 0.5])
def test_normalize_data_init_standardises_every_activation(init_scale):
    rng = np.random.default_rng(3)
    x = 5.0 + 3.0 * rng.standard_normal((64, 2, 4, 3)) * rng.uniform(0.5, 2, (2, 4, 3))
    x2 = rng.standard_normal((64, 2, 4, 2)) - 2.0
    n = Normalize(((2, 4, 3), (2, 4, 2)), init_scale=init_scale, dtype=np.float64)
    y = n.data_init((x, x2))
    for a, src in zip(y, (x, x2)):
        np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=1e-10)
        np.testing.assert_allclose(a.std(axis=0), init_scale, rtol=1e-6)   # population std (ddof 0)
    np.testing.assert_allclose(n.params["mu0"], x.mean(axis=0))
    np.testing.assert_allclose(n.params["invstd0"], init_scale / np.sqrt(x.var(axis=0) + 1e-8))
    # log-det: sum of log|invstd| over both elements, same for every sample
    _, ld, _ = n.forward((x, x2))
    expect = np.log(n.params["invstd0"]).sum() + np.log(n.params["invstd1"]).sum()
    np.testing.assert_allclose(ld, np.full(64, expect))


def test_normalize_data_init_keeps_param_dtype():
    n = Normalize((2, 2, 1))
    n.data_init(np.random.default_rng(0).standard_normal((8, 2, 2, 1)).astype(np.float32))
    assert n.params["mu"].dtype == np.float32 and n.params["invstd"].dtype == np.float32


# ---------------------------------------------------------------- Pointwise specifics
def test_pointwise_inits():
    Wn = Pointwise(4, rng=np.random.default_rng(0), noisy_identity_init=0.001).params["W"]
    assert Wn.dtype == np.float32 and Wn.shape == (4, 4)
    dev = np.abs(Wn - np.eye(4)).max()
    assert 0 < dev < 0.01
    Wo = Pointwise(4, rng=np.random.default_rng(0), noisy_identity_init=None, dtype=np.float64).params["W"]
    np.testing.assert_allclose(Wo @ Wo.T, np.eye(4), atol=1e-12)
    assert np.abs(Wo - np.eye(4)).max() > 0.1
    # the generator passed in decides the init
    W1 = Pointwise(3, rng=np.random.default_rng(7)).params["W"]
    W2 = Pointwise(3, rng=np.random.default_rng(7)).params["W"]
    W3 = Pointwise(3, rng=np.random.default_rng(8)).params["W"]
    np.testing.assert_array_equal(W1, W2)
    assert not np.array_equal(W1, W3)
    p = Pointwise((2, 3), rng=np.random.default_rng(0))
    assert sorted(p.parameters()) == ["W0", "W1"] and p.params["W1"].shape == (3, 3)


def test_pointwise_row_vector_convention():
    p = Pointwise(3, rng=np.random.default_rng(0), noisy_identity_init=0.5, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 3))
    y, ld, _ = p.forward(x)
    W = p.params["W"]
    np.testing.assert_allclose(y[1, 0, 3], x[1, 0, 3] @ W, rtol=1e-14)
    np.testing.assert_allclose(ld, 2 * 4 * np.log(abs(np.linalg.det(W))), rtol=1e-12)


def _ill_conditioned(C, cond, seed=0):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((C, C)))[0]
    V = np.linalg.qr(rng.standard_normal((C, C)))[0]
    return (U @ np.diag(np.geomspace(1.0, 1.0 / cond, C)) @ V.T).astype(np.float32)


def test_pointwise_inverse_and_slogdet_in_float64():
    W32 = _ill_conditioned(4, 1e5)
    W64 = W32.astype(np.float64)
    lad, Winv = factor_matrix(W32)
    assert Winv.dtype == np.float32
    assert lad == pytest.approx(np.linalg.slogdet(W64)[1], rel=1e-14)
    ref = np.linalg.inv(W64)
    # a float64 inverse rounded to float32 is accurate to ~eps32 entrywise (relative to the largest entry);
    # an inverse taken in float32 would be off by ~cond * eps32 ~ 1e-2 here
    assert np.abs(Winv - ref).max() / np.abs(ref).max() < 1e-6
    p = Pointwise(4, rng=np.random.default_rng(0))
    p.params["W"] = W32
    y = np.random.default_rng(2).standard_normal((1, 2, 2, 4)).astype(np.float32)
    x, ld_inv = p.inverse(y)
    np.testing.assert_allclose(x, (y.astype(np.float64) @ ref), rtol=1e-4, atol=1e-4 * np.abs(x).max())
    assert ld_inv[0] == pytest.approx(-4 * np.linalg.slogdet(W64)[1], rel=1e-6)


def test_pointwise_device_path_matches_host_path(monkeypatch):
    """The CuPy path (float64 slogdet/inv on the device, no host transfer, no check), run
    here on NumPy arrays: same factors, same forward/inverse and log-dets as the host path."""
    from flowpp_ref.bijections import pointwise as pw
    W32 = _ill_conditioned(4, 1e3, seed=3)
    lad_h, inv_h = factor_matrix(W32)
    lad_d, inv_d = factor_matrix(W32, on_device=True)
    assert isinstance(lad_h, float) and getattr(lad_d, "shape", None) == () and lad_d.dtype == np.float64
    assert float(lad_d) == pytest.approx(lad_h, rel=1e-14) and inv_d.dtype == np.float32
    np.testing.assert_array_equal(inv_d, inv_h)
    p = Pointwise((4, 4), rng=np.random.default_rng(0))
    x = tuple(np.random.default_rng(i).standard_normal((2, 3, 2, 4)).astype(np.float32) for i in (4, 5))
    y_h, ld_h, _ = p.forward(x)
    yi_h, ldi_h = p.inverse(y_h)
    real = pw.factor_matrix
    monkeypatch.setattr(pw, "factor_matrix", lambda W, name="W": real(W, name, on_device=True))
    y_d, ld_d, _ = p.forward(x)
    yi_d, ldi_d = p.inverse(y_d)
    for a, b in zip(y_d + yi_d, y_h + yi_h):
        np.testing.assert_array_equal(a, b)
    assert ld_d.dtype == ld_h.dtype == np.float32 and ld_d.shape == (2,)
    np.testing.assert_allclose(ld_d, ld_h, rtol=1e-6)
    np.testing.assert_allclose(ldi_d, ldi_h, rtol=1e-6)


@pytest.mark.parametrize("method", ["forward", "inverse"])
@pytest.mark.parametrize("W, match", [
    pytest.param(np.array([[1.0, 2.0], [2.0, 4.0]]), "singular", id="rank-one"),
    pytest.param(np.zeros((2, 2)), "singular", id="zero"),
    pytest.param(np.array([[1.0, 0.0], [0.0, np.nan]]), "non-finite", id="nan"),
    pytest.param(np.array([[np.inf, 0.0], [0.0, 1.0]]), "non-finite", id="inf"),
])
def test_pointwise_singular_or_nonfinite_matrix_raises(W, match, method):
    p = Pointwise(2, rng=np.random.default_rng(0), dtype=np.float64)
    p.params["W"] = W
    with pytest.raises(FlowInputError, match=match):
        getattr(p, method)(np.ones((1, 2, 2, 2)))


# ---------------------------------------------------------------- layouts of the splits
def test_checkerboard_split_is_the_released_split():
    """Halves by parity of w == the release's parity of the flattened index h*W + w (even W)."""
    rng = np.random.default_rng(0)
    B, H, W, C = 2, 4, 6, 3
    x = rng.standard_normal((B, H, W, C))
    for bit in (0, 1):
        # the paper's split_gen(bit): transpose [0,3,1,2], reshape [B, C, H*W/2, 2], transpose [0,2,1,3], [..., bit]
        rel = x.transpose(0, 3, 1, 2).reshape(B, C, H * W // 2, 2).transpose(0, 2, 1, 3)[..., bit]
        rel = rel.reshape(B, H, W // 2, C)
        np.testing.assert_array_equal(checkerboard_split(x, bin=0)[bit], rel)
        np.testing.assert_array_equal(rel, x[:, :, bit::2, :])
    (c0, e0), _, _ = CheckerboardSplit(0).forward(x)
    (c1, e1), _, _ = CheckerboardSplit(1).forward(x)
    np.testing.assert_array_equal(c0, x[:, :, 0::2]), np.testing.assert_array_equal(e0, x[:, :, 1::2])
    np.testing.assert_array_equal(c1, x[:, :, 1::2]), np.testing.assert_array_equal(e1, x[:, :, 0::2])
    np.testing.assert_array_equal(checkerboard_merge(c1, e1, bin=1), x)


def test_space_to_depth_matches_tf_channel_order():
    rng = np.random.default_rng(0)
    B, H, W, C = 2, 4, 6, 3
    x = rng.standard_normal((B, H, W, C))
    y = space_to_depth(x)
    assert y.shape == (B, 2, 3, 12)
    for b, i, j, dh, dw, c in np.ndindex(B, 2, 3, 2, 2, C):
        assert y[b, i, j, (dh * 2 + dw) * C + c] == x[b, 2 * i + dh, 2 * j + dw, c]
    np.testing.assert_array_equal(depth_to_space(y), x)
    y3 = space_to_depth(np.arange(36.0).reshape(1, 6, 6, 1), 3)
    np.testing.assert_array_equal(y3[0, 1, 0], [18, 19, 20, 24, 25, 26, 30, 31, 32])


def test_channel_split_and_tuple_flip_layout():
    x = np.arange(2 * 2 * 2 * 4, dtype=np.float64).reshape(2, 2, 2, 4)
    (a, b), ld, _ = ChannelSplit().forward(x)
    np.testing.assert_array_equal(a, x[..., :2]), np.testing.assert_array_equal(b, x[..., 2:])
    np.testing.assert_array_equal(ld, np.zeros(2))
    (p, q), _, _ = TupleFlip().forward((a, b))
    assert p is b and q is a


# ---------------------------------------------------------------- bad inputs
_x4 = np.zeros((2, 2, 4, 2))
_rng0 = np.random.default_rng(0)

BAD_INPUTS = [
    ("ImgProc-above-256", lambda: ImgProc().forward(np.full((1, 2, 2, 1), 256.5)), r"\[0\.0, 256\.0\].*max 256\.5"),
    ("ImgProc-negative", lambda: ImgProc().forward(np.full((1, 2, 2, 1), -1.0)), r"\[0\.0, 256\.0\].*min -1"),
    ("ImgProc-nan", lambda: ImgProc().forward(np.full((1, 2, 2, 1), np.nan)), "non-finite"),
    ("ImgProc-integer", lambda: ImgProc().forward(np.zeros((1, 2, 2, 1), dtype=np.uint8)), "floating"),
    ("ImgProc-tuple", lambda: ImgProc().forward((_x4, _x4)), "got a tuple"),
    ("ImgProc-inverse-inf", lambda: ImgProc().inverse(np.full((1, 2), np.inf)), "non-finite"),
    ("Sigmoid-inverse-zero", lambda: Sigmoid().inverse(np.array([[0.0, 0.5]])), r"open interval \(0, 1\).*min 0"),
    ("Sigmoid-inverse-one", lambda: Sigmoid().inverse(np.array([[0.5, 1.0]])), r"open interval.*max 1"),
    ("Sigmoid-inverse-nan", lambda: Sigmoid().inverse(np.array([[np.nan, 0.5]])), "open interval"),
    ("Sigmoid-tuple", lambda: Sigmoid().forward((_x4, _x4)), "got a tuple"),
    ("Sigmoid-scalar", lambda: Sigmoid().forward(np.float64(1.0).reshape(())), "batch axis"),
    ("Normalize-shape", lambda: Normalize((2, 4, 3)).forward(_x4), r"shape \[B, \*\(2, 4, 3\)\].*\(2, 2, 4, 2\)"),
    ("Normalize-wants-tuple", lambda: Normalize(((2, 4, 2), (2, 4, 2))).forward(_x4), "expected a tuple.*(2, 2, 4, 2)"),
    ("Normalize-wants-array", lambda: Normalize((2, 4, 2)).forward((_x4, _x4)), "got a tuple of shapes"),
    ("Normalize-inverse-shape", lambda: Normalize((2, 4, 2)).inverse(np.zeros((2, 4, 2))), "shape"),
    ("Normalize-init-one-sample", lambda: Normalize((2, 4, 2)).data_init(_x4[:1]), "at least 2 samples"),
    ("Normalize-init-nan", lambda: Normalize((2, 4, 2)).data_init(np.full((2, 2, 4, 2), np.nan)), "non-finite"),
    ("Pointwise-channels", lambda: Pointwise(3, rng=_rng0).forward(_x4), r"3 channels.*\(2, 2, 4, 2\)"),
    ("Pointwise-rank", lambda: Pointwise(2, rng=_rng0).forward(np.zeros((2, 4, 2))), r"4-d.*\(2, 4, 2\)"),
    ("Pointwise-wants-tuple", lambda: Pointwise((2, 2), rng=_rng0).forward(_x4), "expected a tuple.*(2, 2, 4, 2)"),
    ("Pointwise-wants-array", lambda: Pointwise(2, rng=_rng0).inverse((_x4, _x4)), "got a tuple of shapes"),
    ("Checkerboard-rank", lambda: CheckerboardSplit().forward(np.zeros((2, 4, 2))), r"4-d.*\(2, 4, 2\)"),
    ("Checkerboard-odd-width", lambda: CheckerboardSplit().forward(np.zeros((1, 2, 3, 1))),
     r"width must be even.*\(1, 2, 3, 1\)"),
    ("Checkerboard-gets-tuple", lambda: CheckerboardSplit().forward((_x4, _x4)), "got a tuple of shapes"),
    ("Checkerboard-inverse-gets-array", lambda: CheckerboardSplit().inverse(_x4),
     r"expected a tuple.*\(2, 2, 4, 2\)"),
    ("Checkerboard-inverse-halves-differ", lambda: CheckerboardSplit().inverse((_x4, _x4[:, :1])),
     r"same shape.*\(2, 1, 4, 2\)"),
    ("Checkerboard-inverse-three", lambda: CheckerboardSplit().inverse((_x4, _x4, _x4)), "two arrays"),
    ("ChannelSplit-odd-channels", lambda: ChannelSplit().forward(np.zeros((1, 2, 2, 3))),
     r"channel count must be even.*\(1, 2, 2, 3\)"),
    ("ChannelSplit-inverse-gets-array", lambda: ChannelSplit().inverse(_x4), "expected a tuple"),
    ("ChannelSplit-rank", lambda: ChannelSplit().forward(np.zeros((2, 2, 2, 2, 2))), "4-d"),
    ("TupleFlip-gets-array", lambda: TupleFlip().forward(_x4), r"expected a tuple.*\(2, 2, 4, 2\)"),
    ("TupleFlip-batch-differs", lambda: TupleFlip().forward((_x4, _x4[:1])), "batch sizes"),
    ("SpaceToDepth-odd-height", lambda: SpaceToDepth().forward(np.zeros((1, 3, 2, 1))),
     r"multiples of 2.*\(1, 3, 2, 1\)"),
    ("SpaceToDepth-rank", lambda: SpaceToDepth().forward(np.zeros((1, 2, 2))), "4-d"),
    ("SpaceToDepth-gets-tuple", lambda: SpaceToDepth().forward((_x4, _x4)), "got a tuple"),
    ("SpaceToDepth-inverse-channels", lambda: SpaceToDepth().inverse(np.zeros((1, 1, 1, 6))),
     r"multiple of 4.*\(1, 1, 1, 6\)"),
    ("Inverse-CheckerboardSplit-gets-array", lambda: Inverse(CheckerboardSplit()).forward(_x4), "expected a tuple"),
]


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m in BAD_INPUTS])
def test_bad_input_raises(call, match):
    with pytest.raises(FlowInputError, match=match):
        call()


@pytest.mark.parametrize("call, exc", [
    pytest.param(lambda: Pointwise(2, rng=None), TypeError, id="Pointwise-no-rng"),
    pytest.param(lambda: Pointwise("3", rng=_rng0), ValueError, id="Pointwise-channels-type"),
    pytest.param(lambda: Pointwise(0, rng=_rng0), ValueError, id="Pointwise-zero-channels"),
    pytest.param(lambda: Normalize(3), ValueError, id="Normalize-shape-type"),
    pytest.param(lambda: CheckerboardSplit(bin=2), ValueError, id="Checkerboard-bin"),
    pytest.param(lambda: SpaceToDepth(0), ValueError, id="SpaceToDepth-block"),
])
def test_bad_constructor_arguments(call, exc):
    with pytest.raises(exc):
        call()


def test_compose_of_simple_bijections_smoke():
    """A miniature of the main flow's first stage runs and returns per-sample log-dets."""
    rng = np.random.default_rng(0)
    f = Compose([ImgProc(), CheckerboardSplit(), Normalize(((2, 2, 3), (2, 2, 3))),
                 Pointwise((3, 3), rng=rng), TupleFlip(), Inverse(CheckerboardSplit()), SpaceToDepth()])
    x = rng.uniform(0, 256, (5, 2, 4, 3)).astype(np.float32)
    f.data_init(x)
    y, ld, _ = f.forward(x)
    assert y.shape == (5, 1, 2, 12) and ld.shape == (5,) and y.dtype == np.float32
    assert np.isfinite(ld).all()
