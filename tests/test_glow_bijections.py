"""Tests of Glow's bijections: ChannelActNorm (per-channel actnorm) and InvConv1x1LU.

Generic tests over the registry ``CASES`` (each bijection and its ``Inverse``):

* ``test_invertibility_*``: round trips both ways (float64 ~1e-10, float32 looser) and
  ``logdet + logdet_inv == 0``;
* ``test_logdet_matches_numerical_jacobian``: central-difference Jacobian on [1, 2, 2, 3];
* ``test_gradcheck_input`` / ``test_gradcheck_params``: ``backward`` (``inverse_backward``
  for the ``Inverse-*`` cases) against finite differences in float64;
* ``test_*_matches_torch``: PyTorch autograd of forward + log-det (marked ``torch``).

Then data_init, the LU init, checkpoints (parameters only) and bad inputs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from conftest import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from flowpp_ref.bijections.actnorm import ChannelActNorm
from flowpp_ref.bijections.base import Inverse
from flowpp_ref.bijections.invconv import InvConv1x1LU, lu_decompose
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss
from flowpp_ref.core.validation import FlowInputError

DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]
ROUNDTRIP = {np.float64: 1e-10, np.float32: TOL[np.float32]["roundtrip"]}
REAL = (-3.0, 3.0)


# ---------------------------------------------------------------- registry
def _actnorm(channels, dtype, rng):
    """ChannelActNorm with non-trivial b, logs (instead of the identity init)."""
    a = ChannelActNorm(channels, dtype=dtype)
    for k, v in a.params.items():
        a.params[k] = (0.5 * rng.standard_normal(v.shape)).astype(dtype)
    return a


def _invconv(C, dtype, rng):
    """InvConv1x1LU with its factors moved away from the rotation init."""
    m = InvConv1x1LU(C, rng=rng, dtype=dtype)
    for k, v in m.params.items():
        m.params[k] = (v + 0.3 * rng.standard_normal(v.shape)).astype(dtype)
    return m


def _pair(shape):
    B, H, W, C = shape
    return [(B, H, W, C), (B, H, W, C + 1)]


@dataclass
class Case:
    id: str
    make: Callable            # (shape [B,H,W,C], dtype, rng) -> Bijection
    shapes: Callable = tuple  # shape -> input shape, or list of shapes for a tuple input


_BASE = [
    Case("ChannelActNorm", lambda s, d, r: _actnorm(s[3], d, r)),
    Case("ChannelActNorm-pair", lambda s, d, r: _actnorm((s[3], s[3] + 1), d, r), _pair),
    Case("InvConv1x1LU", lambda s, d, r: _invconv(s[3], d, r)),
]


def _inverse_case(c: Case) -> Case:
    return Case(f"Inverse-{c.id}", lambda s, d, r: Inverse(c.make(s, d, r)), c.shapes)


CASES = _BASE + [_inverse_case(c) for c in _BASE]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


@st.composite
def base_shapes(draw):
    """[B, H, W, C] with B <= 3, H, W in {1, 2, 3}, C <= 4."""
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)))


def draw_values(data, shapes, dtype, label):
    def one(s, k):
        a = data.draw(hnp.arrays(np.float64, s, elements=st.floats(*REAL, allow_nan=False)), label=f"{label}{k}")
        return np.ascontiguousarray(a.astype(dtype))

    if isinstance(shapes, list):
        return tuple(one(s, k) for k, s in enumerate(shapes))
    return one(shapes, "")


def setup_case(case, data, dtype):
    shape = data.draw(base_shapes(), label="shape")
    seed = data.draw(st.integers(0, 2**31 - 1), label="param_seed")
    return case.make(shape, dtype, np.random.default_rng(seed)), shape


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_struct_close(a, b, tol, what):
    a, b = as_tuple(a), as_tuple(b)
    assert len(a) == len(b), what
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype, f"{what}: {u.shape}/{u.dtype} vs {v.shape}/{v.dtype}"
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol, err_msg=what)


def assert_logdet_zero_sum(ld, ld_inv, tol, what):
    err = np.abs(ld.astype(np.float64) + ld_inv.astype(np.float64))
    assert np.all(err <= tol * (1.0 + np.abs(ld.astype(np.float64)))), f"{what}: {ld + ld_inv}"


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@given(data=st.data())
def test_invertibility_forward_then_inverse(case, dtype, data):
    b, shape = setup_case(case, data, dtype)
    x = draw_values(data, case.shapes(shape), dtype, "x")
    y, ld, _ = b.forward(x)
    assert ld.shape == (shape[0],) and ld.dtype == dtype
    assert [u.shape for u in as_tuple(y)] == [u.shape for u in as_tuple(x)]
    assert all(u.dtype == dtype for u in as_tuple(y))
    x2, ld_inv = b.inverse(y)
    x3, ld_inv3, _ = b.inverse_with_cache(y)
    assert_struct_close(x2, x, ROUNDTRIP[dtype], f"{case.id}: inverse(forward(x)) != x")
    assert_struct_close(x3, x2, 0, f"{case.id}: inverse_with_cache differs from inverse")
    np.testing.assert_array_equal(ld_inv3, ld_inv)
    assert_logdet_zero_sum(ld, ld_inv, TOL[dtype]["logdet"] if dtype == np.float32 else 1e-12, case.id)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@given(data=st.data())
def test_invertibility_inverse_then_forward(case, dtype, data):
    b, shape = setup_case(case, data, dtype)
    y = draw_values(data, case.shapes(shape), dtype, "y")
    x, ld_inv = b.inverse(y)
    assert ld_inv.shape == (shape[0],) and ld_inv.dtype == dtype
    y2, ld, _ = b.forward(x)
    assert_struct_close(y2, y, ROUNDTRIP[dtype], f"{case.id}: forward(inverse(y)) != y")
    assert_logdet_zero_sum(ld, ld_inv, TOL[dtype]["logdet"] if dtype == np.float32 else 1e-12, case.id)


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
    sign, lad = np.linalg.slogdet(J)
    assert sign != 0, "numerical Jacobian is singular"
    return lad


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_logdet_matches_numerical_jacobian(case, seed):
    rng = np.random.default_rng(seed)
    shape = (1, 2, 2, 3)
    b = case.make(shape, np.float64, rng)
    sh = case.shapes(shape)
    x = tuple(rng.standard_normal(s) for s in sh) if isinstance(sh, list) else rng.standard_normal(sh)
    _, ld, _ = b.forward(x)
    lad = numerical_log_abs_det(lambda z: b.forward(z)[0], x, 0)
    assert abs(lad - ld[0]) <= 1e-7 * (1 + abs(lad)), f"{case.id}: numerical {lad} vs {ld[0]}"


# ---------------------------------------------------------------- gradients
def _input_dict(x):
    return {"x": x} if not isinstance(x, tuple) else {f"x{k}": a for k, a in enumerate(x)}


@pytest.mark.parametrize("case", CASE_PARAMS)
@settings(max_examples=4)
@given(data=st.data())
def test_gradcheck_input(case, data):
    b, shape = setup_case(case, data, np.float64)
    x = draw_values(data, case.shapes(shape), np.float64, "x")
    y, ld, cache = b.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=data.draw(st.integers(0, 1000), label="loss_seed"))
    dx, dctx, grads = b.backward(dy, dld, cache)
    assert dctx is None and isinstance(dx, tuple) == isinstance(x, tuple)
    assert set(grads) == set(b.parameters())
    gradcheck(lambda: loss_fn(*b.forward(x)[:2]), _input_dict(x), _input_dict(dx), tol=TOL[np.float64]["grad"])


@pytest.mark.parametrize("case", CASE_PARAMS)
@settings(max_examples=4)
@given(data=st.data())
def test_gradcheck_params(case, data):
    b, shape = setup_case(case, data, np.float64)
    x = draw_values(data, case.shapes(shape), np.float64, "x")
    y, ld, cache = b.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=data.draw(st.integers(0, 1000), label="loss_seed"))
    _, _, grads = b.backward(dy, dld, cache)
    params = b.parameters()
    assert set(grads) == set(params) and params
    for k in params:
        assert grads[k].shape == params[k].shape and grads[k].dtype == params[k].dtype, k
    gradcheck(lambda: loss_fn(*b.forward(x)[:2]), params, grads, tol=TOL[np.float64]["grad"])


def test_invconv_fixed_entries_get_zero_gradient():
    m = _invconv(4, np.float64, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 3, 2, 4))
    y, _, cache = m.forward(x)
    _, _, g = m.backward(np.ones_like(y), np.ones(2), cache)
    assert np.all(np.triu(g["L"]) == 0.0) and np.all(np.tril(g["U"]) == 0.0)
    assert np.abs(np.tril(g["L"], -1)).max() > 0 and np.abs(np.triu(g["U"], 1)).max() > 0
    # the stored (unused) entries do not change the map
    m.params["L"] = m.params["L"] + np.triu(np.full((4, 4), 7.0))
    m.params["U"] = m.params["U"] + np.tril(np.full((4, 4), -5.0))
    np.testing.assert_array_equal(m.forward(x)[0], y)


# ---------------------------------------------------------------- PyTorch cross-checks
def _torch():
    return pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")


def _torch_grads(torch, fn, x, params, seed=0):
    """Autograd of L = sum(wy * y) + sum(wl * logdet) with y, logdet = fn(tx, tparams)."""
    rng = np.random.default_rng(seed)
    tx = torch.tensor(x, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ty, tld = fn(tx, tp)
    wy, wl = rng.standard_normal(tuple(ty.shape)), rng.standard_normal(tuple(tld.shape))
    ((ty * torch.tensor(wy)).sum() + (tld * torch.tensor(wl)).sum()).backward()
    return ty.detach().numpy(), tld.detach().numpy(), wy, wl, tx.grad.numpy(), {k: v.grad.numpy() for k, v in tp.items()}


def _compare_with_torch(b, fn, x, inverse=False):
    torch = _torch()
    params = {k: v.copy() for k, v in b.parameters().items()}
    ty, tld, wy, wl, tdx, tgrads = _torch_grads(torch, fn, x, params)
    y, ld, cache = (b.inverse_with_cache(x) if inverse else b.forward(x))
    np.testing.assert_allclose(y, ty, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld, tld, rtol=1e-12, atol=1e-12)
    dx, _, grads = (b.inverse_backward if inverse else b.backward)(wy, wl, cache)
    np.testing.assert_allclose(dx, tdx, rtol=1e-10, atol=1e-10)
    for k in params:
        np.testing.assert_allclose(grads[k], tgrads[k], rtol=1e-10, atol=1e-10, err_msg=k)


def _t_actnorm(tx, tp):
    y = (tx + tp["b"]) * tp["logs"].exp()
    return y, (tx.shape[1] * tx.shape[2]) * tp["logs"].sum() * tx.new_ones(tx.shape[0])


def _t_actnorm_inverse(ty, tp):
    x = ty * (-tp["logs"]).exp() - tp["b"]
    return x, -(ty.shape[1] * ty.shape[2]) * tp["logs"].sum() * ty.new_ones(ty.shape[0])


def _t_weight(torch, m, tp):
    C = m.channels
    L = torch.tril(tp["L"], -1) + torch.eye(C, dtype=torch.float64)
    Up = torch.triu(tp["U"], 1) + torch.diag(torch.tensor(m.sign_s) * tp["log_s"].exp())
    return torch.tensor(m.P) @ L @ Up


@pytest.mark.torch
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_actnorm_matches_torch(inverse):
    b = _actnorm(3, np.float64, np.random.default_rng(5))
    x = np.random.default_rng(6).standard_normal((2, 3, 2, 3))
    _compare_with_torch(b, _t_actnorm_inverse if inverse else _t_actnorm, x, inverse)


@pytest.mark.torch
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_invconv_lu_matches_torch(inverse):
    torch = _torch()
    m = _invconv(4, np.float64, np.random.default_rng(7))
    x = np.random.default_rng(8).standard_normal((2, 3, 2, 4))

    def fwd(tx, tp):
        W = _t_weight(torch, m, tp)
        ld = (tx.shape[1] * tx.shape[2]) * tp["log_s"].sum() * tx.new_ones(tx.shape[0])
        return (tx @ torch.linalg.inv(W), -ld) if inverse else (tx @ W, ld)

    _compare_with_torch(m, fwd, x, inverse)


# ---------------------------------------------------------------- ChannelActNorm specifics
def test_actnorm_starts_as_identity_and_names_params():
    a = ChannelActNorm(3, dtype=np.float64)
    assert sorted(a.parameters()) == ["b", "logs"] and a.params["b"].shape == (3,)
    x = np.random.default_rng(0).standard_normal((2, 2, 2, 3))
    y, ld, _ = a.forward(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ld, 0.0)
    a2 = ChannelActNorm((3, 1))
    assert sorted(a2.parameters()) == ["b0", "b1", "logs0", "logs1"] and a2.params["b1"].dtype == np.float32


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_actnorm_data_init_standardises_every_channel(scale):
    rng = np.random.default_rng(3)
    x = 5.0 + rng.uniform(0.5, 3.0, 3) * rng.standard_normal((16, 3, 4, 3))
    x2 = rng.standard_normal((16, 3, 4, 2)) - 2.0
    a = ChannelActNorm((3, 2), scale=scale, dtype=np.float64)
    y = a.data_init((x, x2))
    for u, src in zip(y, (x, x2)):
        np.testing.assert_allclose(u.mean(axis=(0, 1, 2)), 0.0, atol=1e-10)
        sd = src.std(axis=(0, 1, 2))
        np.testing.assert_allclose(u.std(axis=(0, 1, 2)), scale * sd / (sd + 1e-6), rtol=1e-12)
        np.testing.assert_allclose(u.std(axis=(0, 1, 2)), scale, rtol=1e-5)
    np.testing.assert_allclose(a.params["b0"], -x.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(a.params["logs0"], np.log(scale / (x.std(axis=(0, 1, 2)) + 1e-6)))
    # per-activation statistics are NOT standardised (the difference from Normalize)
    assert np.abs(y[0].mean(axis=0)).max() > 0.1
    # log-det: H * W * sum_c logs_c per element, the same for every sample
    _, ld, _ = a.forward((x, x2))
    np.testing.assert_allclose(ld, np.full(16, 12 * (a.params["logs0"].sum() + a.params["logs1"].sum())))


def test_actnorm_data_init_float32_keeps_dtype():
    a = ChannelActNorm(2)
    y = a.data_init(np.random.default_rng(0).standard_normal((4, 2, 2, 2)).astype(np.float32) * 3 + 1)
    assert a.params["b"].dtype == np.float32 and a.params["logs"].dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)


def test_actnorm_restored_parameters_need_no_data_init():
    """A checkpoint holds b, logs; loading them into a fresh instance gives the initialised map."""
    x = np.random.default_rng(0).standard_normal((8, 2, 2, 3)) * 4 + 1
    a = ChannelActNorm(3, dtype=np.float64)
    a.data_init(x)
    fresh = ChannelActNorm(3, dtype=np.float64)
    fresh.load_parameters({k: v.copy() for k, v in a.parameters().items()})
    for u, v in zip(fresh.forward(x)[:2], a.forward(x)[:2]):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------- InvConv1x1LU specifics
@pytest.mark.parametrize("C", [1, 2, 3, 5, 8])
def test_invconv_lu_init_reproduces_rotation(C):
    m = InvConv1x1LU(C, rng=np.random.default_rng(11), dtype=np.float64)
    W0 = np.linalg.qr(np.random.default_rng(11).standard_normal((C, C)))[0]   # the same draw
    assert abs(abs(np.linalg.det(W0)) - 1.0) < 1e-12
    assert np.abs(m.weight() - W0).max() < 1e-12
    assert abs(m.params["log_s"].sum()) < 1e-12                     # log|det W0| = 0
    P = m.P
    assert set(np.unique(P)) <= {0.0, 1.0} and np.all(P.sum(0) == 1) and np.all(P.sum(1) == 1)
    assert set(np.unique(m.sign_s)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(np.triu(m.params["L"]), 0.0)
    np.testing.assert_array_equal(np.tril(m.params["U"]), 0.0)


def test_lu_decompose_general_matrices():
    rng = np.random.default_rng(0)
    for A in [rng.standard_normal((6, 6)), np.array([[0.0, 1.0], [1.0, 0.0]]),      # needs a row swap
              np.array([[1e-3, 2.0, 0.0], [1.0, 1.0, 1.0], [3.0, 0.0, 1.0]])]:
        P, L, U = lu_decompose(A)
        np.testing.assert_allclose(P @ L @ U, A, atol=1e-14)
        np.testing.assert_array_equal(np.diag(L), 1.0)
        assert np.all(np.triu(L, 1) == 0) and np.all(np.tril(U, -1) == 0) and np.abs(L).max() <= 1.0
        np.testing.assert_array_equal(P @ P.T, np.eye(len(A)))
    with pytest.raises(ValueError, match="singular"):
        lu_decompose(np.array([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="square"):
        lu_decompose(np.zeros((2, 3)))


def test_invconv_matches_unfactored_weight():
    """y = x W (row vectors), logdet = H W log|det W| = H W sum(log_s), x = y W^{-1}."""
    m = _invconv(3, np.float64, np.random.default_rng(2))
    W = m.weight()
    x = np.random.default_rng(3).standard_normal((2, 2, 4, 3))
    y, ld, _ = m.forward(x)
    np.testing.assert_allclose(y[1, 0, 3], x[1, 0, 3] @ W, rtol=1e-14)
    np.testing.assert_allclose(ld, 8 * np.linalg.slogdet(W)[1], rtol=1e-12)
    np.testing.assert_allclose(m.inverse(y)[0], y @ np.linalg.inv(W), atol=1e-12)


def test_invconv_checkpoint_round_trip_same_seed():
    """P and sign_s come from the constructor's generator; L, U, log_s from load_parameters."""
    m = _invconv(4, np.float64, np.random.default_rng(9))
    rebuilt = InvConv1x1LU(4, rng=np.random.default_rng(9), dtype=np.float64)
    rebuilt.load_parameters({k: v.copy() for k, v in m.parameters().items()})
    np.testing.assert_array_equal(rebuilt.P, m.P)
    np.testing.assert_array_equal(rebuilt.sign_s, m.sign_s)
    np.testing.assert_array_equal(rebuilt.weight(), m.weight())
    assert sorted(m.parameters()) == ["L", "U", "log_s"]


def test_invconv_float32_params_and_output():
    m = InvConv1x1LU(3, rng=np.random.default_rng(0))
    assert all(v.dtype == np.float32 for v in m.parameters().values())
    x = np.random.default_rng(1).standard_normal((2, 2, 2, 3)).astype(np.float32)
    y, ld, cache = m.forward(x)
    assert y.dtype == np.float32 and ld.dtype == np.float32
    dx, _, g = m.backward(y, ld, cache)
    assert dx.dtype == np.float32 and all(v.dtype == np.float32 for v in g.values())


# ---------------------------------------------------------------- bad inputs
_x4 = np.zeros((2, 2, 4, 2))
_rng0 = np.random.default_rng(0)


def _nonfinite_invconv(key, method):
    m = InvConv1x1LU(2, rng=np.random.default_rng(0), dtype=np.float64)
    m.params[key] = m.params[key].copy()
    m.params[key].flat[-1] = np.nan if key != "log_s" else np.inf
    return getattr(m, method)(_x4)


BAD_INPUTS = [
    ("ActNorm-channels", lambda: ChannelActNorm(3).forward(_x4), r"3 channels.*\(2, 2, 4, 2\)"),
    ("ActNorm-inverse-channels", lambda: ChannelActNorm(3).inverse(_x4), r"3 channels.*\(2, 2, 4, 2\)"),
    ("ActNorm-rank", lambda: ChannelActNorm(2).forward(np.zeros((2, 4, 2))), r"4-d.*\(2, 4, 2\)"),
    ("ActNorm-integer", lambda: ChannelActNorm(2).forward(np.zeros((1, 2, 2, 2), dtype=np.int64)), "floating"),
    ("ActNorm-wants-tuple", lambda: ChannelActNorm((2, 2)).forward(_x4), r"expected a tuple.*\(2, 2, 4, 2\)"),
    ("ActNorm-wants-array", lambda: ChannelActNorm(2).forward((_x4, _x4)), "got a tuple of shapes"),
    ("ActNorm-tuple-length", lambda: ChannelActNorm((2, 2)).forward((_x4,)), "tuple of 2 arrays, got 1"),
    ("ActNorm-batch-differs", lambda: ChannelActNorm((2, 2)).forward((_x4, _x4[:1])), "batch sizes"),
    ("ActNorm-init-nan", lambda: ChannelActNorm(2).data_init(np.full((2, 2, 4, 2), np.nan)), "non-finite"),
    ("ActNorm-init-inf", lambda: ChannelActNorm(2).data_init(np.where(_x4 == 0, np.inf, 0)), "non-finite"),
    ("ActNorm-init-one-value", lambda: ChannelActNorm(2).data_init(np.zeros((1, 1, 1, 2))), "at least 2 values"),
    ("InvConv-channels", lambda: InvConv1x1LU(3, rng=_rng0).forward(_x4), r"3 channels.*\(2, 2, 4, 2\)"),
    ("InvConv-inverse-channels", lambda: InvConv1x1LU(3, rng=_rng0).inverse(_x4), r"3 channels"),
    ("InvConv-rank", lambda: InvConv1x1LU(2, rng=_rng0).forward(np.zeros((2, 4, 2))), r"4-d.*\(2, 4, 2\)"),
    ("InvConv-tuple", lambda: InvConv1x1LU(2, rng=_rng0).forward((_x4, _x4)), "single arrays"),
    ("InvConv-nan-L", lambda: _nonfinite_invconv("L", "forward"), "parameter L has 1 non-finite"),
    ("InvConv-nan-U", lambda: _nonfinite_invconv("U", "inverse"), "parameter U has 1 non-finite"),
    ("InvConv-inf-log_s", lambda: _nonfinite_invconv("log_s", "forward"), "parameter log_s has 1 non-finite"),
]


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m in BAD_INPUTS])
def test_bad_input_raises(call, match):
    with pytest.raises(FlowInputError, match=match):
        call()


@pytest.mark.parametrize("call, exc", [
    pytest.param(lambda: InvConv1x1LU(2, rng=None), TypeError, id="InvConv-no-rng"),
    pytest.param(lambda: InvConv1x1LU((2, 2), rng=_rng0), ValueError, id="InvConv-tuple-channels"),
    pytest.param(lambda: InvConv1x1LU(0, rng=_rng0), ValueError, id="InvConv-zero-channels"),
    pytest.param(lambda: ChannelActNorm("3"), ValueError, id="ActNorm-channels-type"),
    pytest.param(lambda: ChannelActNorm(0), ValueError, id="ActNorm-zero-channels"),
    pytest.param(lambda: ChannelActNorm(2, scale=0.0), ValueError, id="ActNorm-scale"),
])
def test_bad_constructor_arguments(call, exc):
    with pytest.raises(exc):
        call()


# ---------------------------------------------------------------- InvConv1x1 (full), LearnedTopPrior, Rescale offset
def test_invertibility_of_the_full_invconv_and_its_random_rotation_init():
    from flowpp_ref.bijections import InvConv1x1
    f = InvConv1x1(6, rng=np.random.default_rng(0), dtype=np.float64)
    W = f.params["W"]
    np.testing.assert_allclose(W @ W.T, np.eye(6), atol=1e-12)          # a rotation: log|det W| = 0
    x = np.random.default_rng(1).standard_normal((2, 3, 3, 6))
    y, ld, _ = f.forward(x)
    np.testing.assert_allclose(ld, 0, atol=1e-12)
    f.params["W"] = W + 0.3 * np.random.default_rng(2).standard_normal((6, 6))
    y, ld, _ = f.forward(x)
    np.testing.assert_allclose(ld, 9 * np.linalg.slogdet(f.params["W"])[1], rtol=1e-10)   # H W log|det W|
    xr, ldi = f.inverse(y)
    np.testing.assert_allclose(xr, x, atol=1e-10)
    np.testing.assert_allclose(ldi, -ld, rtol=1e-10)
    with pytest.raises(ValueError, match="single array"):
        InvConv1x1((3, 3), rng=np.random.default_rng(0))


def test_invertibility_of_the_learned_top_prior_which_scores_its_gaussian_and_is_not_data_initialised():
    from flowpp_ref.bijections import LearnedTopPrior
    from flowpp_ref.model.objective import standard_normal_logprob
    C = 4
    p = LearnedTopPrior(C, dtype=np.float64)
    h = np.random.default_rng(3).standard_normal((3, 2, 2, C)) * 2 + 5
    np.testing.assert_array_equal(p.data_init(h), h)                     # no fit to the batch: still N(0, I)
    mu, logs = np.array([0.5, -1.0, 2.0, 0.0]), np.array([0.1, -0.3, 0.7, 0.0])
    p.params["b"], p.params["logs"] = -mu, -logs                          # b = -mu, s = -log sigma
    z, ld, _ = p.forward(h)
    direct = (-0.5 * ((h - mu) / np.exp(logs)) ** 2 - logs - 0.5 * np.log(2 * np.pi)).reshape(3, -1).sum(1)
    np.testing.assert_allclose(standard_normal_logprob(z) + ld, direct, rtol=1e-12)
    hr, ldi = p.inverse(z)
    np.testing.assert_allclose(hr, h, rtol=1e-12)
    np.testing.assert_allclose(ldi, -ld, rtol=1e-12)


def test_invertibility_of_rescale_with_an_offset():
    from flowpp_ref.bijections import Rescale
    f = Rescale(1 / 256, offset=-0.5)
    x = np.random.default_rng(4).uniform(0, 256, (2, 2, 2, 3))
    y, ld, _ = f.forward(x)
    np.testing.assert_allclose(y, x / 256 - 0.5, rtol=1e-12)
    np.testing.assert_allclose(ld, 12 * np.log(1 / 256), rtol=1e-12)
    np.testing.assert_allclose(f.inverse(y)[0], x, rtol=1e-12)
    with pytest.raises(ValueError, match="offset must be finite"):
        Rescale(2.0, offset=float("nan"))


def test_actnorm_data_init_updates_the_parameter_arrays_in_place():
    """A parameter dict taken before the init (an optimiser's) holds the initialised values."""
    f = ChannelActNorm(3, dtype=np.float64)
    before = f.parameters()
    x = np.random.default_rng(5).standard_normal((4, 2, 2, 3)) * 3 + 1
    f.data_init(x)
    assert before["b"] is f.params["b"] and before["logs"] is f.params["logs"]
    np.testing.assert_allclose(before["b"], -x.mean(axis=(0, 1, 2)), rtol=1e-12)
