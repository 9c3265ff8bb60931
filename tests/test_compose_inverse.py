"""Compose and Inverse with the simple bijections.

* nflows' check for every case of the registry: ``Compose([b, Inverse(b)])`` maps
  x to x with a summed log-det of 0 (a sign error on the inverse path fails it),
  and ``Compose([Inverse(b), b])`` does the same on the output side;
* a miniature of the main flow (ImgProc, checkerboard stage, squeeze, channel
  stage, ...): round trip, log-det against the numerical Jacobian, input and
  parameter gradients of ``backward`` and of ``inverse_backward`` against
  finite differences, gradient keys equal to ``parameters()``, data_init.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOL
from flowpp_ref.bijections import (ChannelSplit, CheckerboardSplit, Compose, ImgProc, Inverse, Normalize, Pointwise,
                                   Sigmoid, SpaceToDepth, TupleFlip)
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss
from test_bijections_simple import (CASE_PARAMS, as_tuple, assert_struct_close, draw_values, numerical_log_abs_det,
                                    setup_case)

F64 = TOL[np.float64]


# ---------------------------------------------------------------- nflows' check
@pytest.mark.parametrize("case", CASE_PARAMS)
@settings(max_examples=8)
@given(data=st.data())
def test_invertibility_compose_logdet_cancels(case, data):
    b, shape = setup_case(case, data, np.float64)
    x = draw_values(data, case.x_shapes(shape), case.x_range, np.float64, "x")
    out, ld, caches = Compose([b, Inverse(b)]).forward(x)
    assert_struct_close(out, x, F64["roundtrip"], f"{case.id}: Compose([b, Inverse(b)]) is not the identity")
    np.testing.assert_allclose(ld, 0.0, atol=F64["logdet"])
    y = draw_values(data, case.y_shapes(shape), case.y_range, np.float64, "y")
    out2, ld2, _ = Compose([Inverse(b), b]).forward(y)
    assert_struct_close(out2, y, F64["roundtrip"], f"{case.id}: Compose([Inverse(b), b]) is not the identity")
    np.testing.assert_allclose(ld2, 0.0, atol=F64["logdet"])


# ---------------------------------------------------------------- a miniature flow
def mini_flow(H, W, C, dtype=np.float64, seed=0):
    """The main flow's structure at toy size; every layer type of this module appears."""
    rng = np.random.default_rng(seed)
    half = (H, W // 2, C)
    sq = (H // 2, W // 2, 2 * C)
    return Compose([
        ImgProc(),
        CheckerboardSplit(),
        Normalize((half, half), dtype=dtype), Pointwise((C, C), rng=rng, noisy_identity_init=0.3, dtype=dtype),
        TupleFlip(),
        Normalize((half, half), dtype=dtype), Pointwise((C, C), rng=rng, noisy_identity_init=None, dtype=dtype),
        TupleFlip(),
        Inverse(CheckerboardSplit()),
        SpaceToDepth(),
        ChannelSplit(),
        Normalize((sq, sq), dtype=dtype), Pointwise((2 * C, 2 * C), rng=rng, noisy_identity_init=0.3, dtype=dtype),
        TupleFlip(),
        Inverse(ChannelSplit()),
        CheckerboardSplit(1),
        Inverse(CheckerboardSplit(1)),
        Inverse(SpaceToDepth()),
        Normalize((H, W, C), dtype=dtype),
        Pointwise(C, rng=rng, noisy_identity_init=0.3, dtype=dtype),
        Sigmoid(),
        Inverse(Sigmoid()),
    ])


def _pixels(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).uniform(1.0, 255.0, shape).astype(dtype)


def _initialised(shape, dtype=np.float64, seed=0):
    f = mini_flow(*shape[1:], dtype=dtype, seed=seed)
    f.data_init(_pixels((16,) + tuple(shape[1:]), seed + 100, dtype))
    return f


def test_compose_data_init_then_round_trip_float32():
    shape = (4, 4, 4, 2)
    f = _initialised(shape, np.float32)
    x = _pixels(shape, 1, np.float32)
    y, ld, _ = f.forward(x)
    assert y.shape == shape and y.dtype == np.float32 and ld.shape == (4,) and np.isfinite(ld).all()
    x2, ld_inv = f.inverse(y)
    tol = TOL[np.float32]
    np.testing.assert_allclose(x2, x, rtol=tol["roundtrip"], atol=tol["roundtrip"])
    np.testing.assert_allclose(ld + ld_inv, 0.0, atol=tol["logdet"] * (1 + np.abs(ld).max()))


def test_compose_data_init_normalizes_the_init_batch():
    f = mini_flow(2, 4, 2)
    x = _pixels((32, 2, 4, 2), 5)
    f.data_init(x)
    # output of the first Normalize on the init batch: mean 0, std 1 per activation
    h = x
    for g in f.flows[:3]:
        h = g.forward(h)[0]
    for a in h:
        np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=1e-8)
        np.testing.assert_allclose(a.std(axis=0), 1.0, rtol=1e-6)


def test_compose_logdet_matches_numerical_jacobian():
    shape = (2, 2, 4, 1)
    f = _initialised(shape)
    x = _pixels(shape, 2)
    _, ld, _ = f.forward(x)
    for i in range(shape[0]):
        lad = numerical_log_abs_det(lambda z: f.forward(z)[0], x, i)
        assert abs(lad - ld[i]) <= F64["logdet"] * (1 + abs(lad)), f"sample {i}: {lad} vs {ld[i]}"


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_compose_gradcheck(direction):
    shape = (2, 2, 4, 2)
    f = _initialised(shape)
    if direction == "inverse":
        f = Inverse(f)          # forward = Compose.inverse_with_cache, backward = Compose.inverse_backward
        x = f.inverse(_pixels(shape, 3))[0]
    else:
        x = _pixels(shape, 3)
    y, ld, cache = f.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=4)
    dx, dctx, grads = f.backward(dy, dld, cache)
    assert dctx is None
    params = f.parameters()
    assert set(grads) == set(params)
    assert sum(k.split(".")[-1] in ("W", "W0", "W1") for k in grads) == 7   # 3 pairs + 1 single
    fn = lambda: loss_fn(*f.forward(x)[:2])  # noqa: E731
    rep = gradcheck(fn, {"x": x}, {"x": dx}, tol=F64["grad"])
    rep2 = gradcheck(fn, params, grads, tol=F64["grad"], max_entries=64)
    assert rep.worst[1] <= F64["grad"] and rep2.worst[1] <= F64["grad"]


def test_compose_inverse_backward_matches_backward_of_inverse_flow():
    """Inverse(Inverse(b)) runs b through inverse_with_cache/inverse_backward twice: same as b."""
    shape = (2, 2, 4, 2)
    f = _initialised(shape)
    x = _pixels(shape, 6)
    y, ld, cache = f.forward(x)
    y2, ld2, cache2 = Inverse(Inverse(f)).forward(x)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(ld, ld2)
    _, dy, dld = random_scalar_loss(y, ld, seed=1)
    dx, _, g = f.backward(dy, dld, cache)
    dx2, _, g2 = Inverse(Inverse(f)).backward(dy, dld, cache2)
    np.testing.assert_allclose(dx2, dx, rtol=1e-12)
    assert set(g2) == {f"base.base.{k}" for k in g}
    for k in g:
        np.testing.assert_allclose(g2[f"base.base.{k}"], g[k], rtol=1e-12, atol=1e-12)


def test_compose_shared_bijection_grads_sum_over_uses():
    """Compose([b, Inverse(b)]) holds b twice; the two gradient entries add up to zero for the identity map."""
    rng = np.random.default_rng(0)
    b = Pointwise(2, rng=rng, noisy_identity_init=0.3, dtype=np.float64)
    f = Compose([b, Inverse(b)])
    x = rng.standard_normal((2, 2, 2, 2))
    y, ld, cache = f.forward(x)
    _, dy, dld = random_scalar_loss(y, ld, seed=2)
    dx, _, g = f.backward(dy, dld, cache)
    np.testing.assert_allclose(dx, dy, rtol=1e-12, atol=1e-12)   # identity map: dL/dx = dL/dy
    np.testing.assert_allclose(g["0_Pointwise.W"] + g["1_Inverse.base.W"], 0.0, atol=1e-10)
    assert as_tuple(y)[0].shape == x.shape
