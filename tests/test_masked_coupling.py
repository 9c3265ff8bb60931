"""Tests of MaskedAffineCoupling (RealNVP sec. 3.3-3.4; Glow sec. 3.3; NICE's additive coupling).

* ``test_invertibility_*``: round trips both ways for every mask x scale type (float64, float32),
  ``logdet + logdet_inv == 0``, kept entries passed through bit for bit;
* ``test_jacobian_triangular_in_masked_ordering``: the full finite-difference Jacobian (float64), in
  the ordering (kept entries, transformed entries), is block lower-triangular with the identity on the
  kept block and a diagonal transformed block; its log|det| equals the returned log-det;
* ``test_gradcheck_*``: backward vs central differences (core/gradcheck.py) for x and every parameter;
* mask alternation, a PyTorch autograd cross-check (net = a fixed per-pixel linear map), bad inputs.
"""
from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from conftest import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from flowpp_ref.bijections.base import Compose
from flowpp_ref.bijections.masked_coupling import (
    LayerNet,
    MaskedAffineCoupling,
    channel_mask,
    checkerboard_mask,
    make_mask,
)
from flowpp_ref.core.backend import array_module, asarray, to_numpy
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss
from flowpp_ref.core.module import Module
from flowpp_ref.core.validation import FlowInputError
from flowpp_ref.nn.weightnorm import Conv2d

MASK_KINDS = ["checkerboard", "channel"]
SCALE_KINDS = ["realnvp", "glow", "additive"]
DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]


# ---------------------------------------------------------------- builders
def _out_channels(C, scale):
    return C if scale == "additive" else 2 * C


def make_conv_coupling(shape, mask, parity, scale, dtype=np.float64, seed=0):
    """A coupling with a 3x3 weight-normed Conv2d net and non-trivial parameters."""
    C = shape[2]
    rng = np.random.default_rng(seed)
    conv = Conv2d(C, _out_channels(C, scale), 3, rng=rng, dtype=dtype)
    conv.params["g"] = rng.uniform(0.5, 1.5, conv.params["g"].shape).astype(dtype)
    conv.params["b"] = (0.3 * rng.standard_normal(conv.params["b"].shape)).astype(dtype)
    b = MaskedAffineCoupling(shape, conv, mask, parity, scale, dtype=dtype)
    if scale == "realnvp":
        sign = np.where(rng.random(C) < 0.3, -1.0, 1.0)
        b.params["scale"] = (sign * rng.uniform(0.5, 1.5, C)).astype(dtype)
    return b


class LinearNet(Module):
    """A per-pixel linear map ``h = x @ A + c`` (A [C, K], c [K]) with the conditioning-net protocol."""

    def __init__(self, C, K, *, seed=0, xp=np, dtype=np.float64):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.params["A"] = asarray(0.7 * rng.standard_normal((C, K)), xp, dtype)
        self.params["c"] = asarray(0.3 * rng.standard_normal(K), xp, dtype)

    def forward(self, x, context=None, *, train=False, rng=None):
        return x @ self.params["A"] + self.params["c"], x

    def backward(self, dh, x):
        C, K = self.params["A"].shape
        dA = x.reshape(-1, C).T @ dh.reshape(-1, K)       # dL/dA = x^T dh
        return dh @ self.params["A"].T, None, {"A": dA, "c": dh.reshape(-1, K).sum(axis=0)}


def make_linear_coupling(shape, mask, parity, scale, dtype=np.float64, seed=0, xp=np):
    C = shape[2]
    b = MaskedAffineCoupling(shape, LinearNet(C, _out_channels(C, scale), seed=seed, xp=xp, dtype=dtype),
                             mask, parity, scale, xp=xp, dtype=dtype)
    if scale == "realnvp":
        b.params["scale"] = asarray(np.linspace(-1.2, 1.4, C), xp, dtype)
    return b


@st.composite
def setups(draw, mask, scale, dtype):
    B = draw(st.integers(1, 2), label="B")
    H = draw(st.sampled_from([2, 4]), label="H")
    W = draw(st.sampled_from([2, 4]), label="W")
    C = draw(st.sampled_from([2, 4]), label="C")
    parity = draw(st.integers(0, 1), label="parity")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    b = make_conv_coupling((H, W, C), mask, parity, scale, dtype, seed)
    x = draw(hnp.arrays(np.float64, (B, H, W, C), elements=st.floats(-3, 3, allow_nan=False)), label="x")
    return b, np.ascontiguousarray(x.astype(dtype))


def _assert_logdet_zero_sum(ld, ld_inv, tol):
    err = np.abs(ld.astype(np.float64) + ld_inv.astype(np.float64))
    assert np.all(err <= tol * (1 + np.abs(ld.astype(np.float64)))), f"logdet + logdet_inv = {ld + ld_inv}"


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALE_KINDS)
@pytest.mark.parametrize("mask", MASK_KINDS)
@settings(max_examples=6)
@given(data=st.data())
def test_invertibility_forward_then_inverse(mask, scale, dtype, data):
    b, x = data.draw(setups(mask, scale, dtype))
    tol = TOL[dtype]
    y, ld, _ = b.forward(x)
    assert y.shape == x.shape and y.dtype == dtype and ld.shape == (x.shape[0],) and ld.dtype == dtype
    kept = b.mask.astype(bool)
    np.testing.assert_array_equal(y[:, kept], x[:, kept])          # kept entries pass through exactly
    if scale == "additive":
        np.testing.assert_array_equal(ld, 0)
    x2, ld_inv = b.inverse(y)
    np.testing.assert_allclose(x2, x, rtol=tol["roundtrip"], atol=tol["roundtrip"])
    np.testing.assert_array_equal(x2[:, kept], x[:, kept])
    _assert_logdet_zero_sum(ld, ld_inv, tol["logdet"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALE_KINDS)
@pytest.mark.parametrize("mask", MASK_KINDS)
@settings(max_examples=6)
@given(data=st.data())
def test_invertibility_inverse_then_forward(mask, scale, dtype, data):
    b, y = data.draw(setups(mask, scale, dtype))
    tol = TOL[dtype]
    x, ld_inv = b.inverse(y)
    y2, ld, _ = b.forward(x)
    np.testing.assert_allclose(y2, y, rtol=tol["roundtrip"], atol=tol["roundtrip"])
    _assert_logdet_zero_sum(ld, ld_inv, tol["logdet"])


# ---------------------------------------------------------------- Jacobian
def _jacobian(fn, x, i, h=1e-6):
    """Full Jacobian of sample i of fn (central differences, float64), [n_out, n_in] over flat entries."""
    cols = []
    for idx in np.ndindex(x.shape[1:]):
        full = (i,) + idx
        old = x[full]
        x[full] = old + h
        yp = fn(x)[i].ravel()
        x[full] = old - h
        ym = fn(x)[i].ravel()
        x[full] = old
        cols.append((yp - ym) / (2 * h))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("scale", SCALE_KINDS)
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_jacobian_triangular_in_masked_ordering(mask, scale):
    b = make_conv_coupling((4, 4, 2), mask, 1, scale, np.float64, seed=3)
    x = np.random.default_rng(4).uniform(-2, 2, (2, 4, 4, 2))
    _, ld, _ = b.forward(x)
    keep = b.mask.astype(bool).ravel()
    order = np.concatenate([np.flatnonzero(keep), np.flatnonzero(~keep)])   # kept first, then transformed
    nk = int(keep.sum())
    for i in range(x.shape[0]):
        J = _jacobian(lambda z: b.forward(z)[0], x, i)[np.ix_(order, order)]
        np.testing.assert_allclose(J[:nk, :nk], np.eye(nk), atol=1e-9)        # dy_kept/dx_kept = I
        np.testing.assert_allclose(J[:nk, nk:], 0, atol=1e-9)                 # dy_kept/dx_trans = 0
        Jt = J[nk:, nk:]
        np.testing.assert_allclose(Jt - np.diag(np.diag(Jt)), 0, atol=1e-8)   # dy_trans/dx_trans = diag(s)
        assert np.abs(J[nk:, :nk]).max() > 1e-3                               # the conditioning path is live
        sign, lad = np.linalg.slogdet(J)
        assert sign != 0
        assert abs(lad - ld[i]) <= TOL[np.float64]["logdet"] * (1 + abs(lad)), f"sample {i}: {lad} vs {ld[i]}"


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("scale", SCALE_KINDS)
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_gradcheck_input_and_params(mask, scale):
    b = make_conv_coupling((4, 4, 2), mask, 0, scale, np.float64, seed=11)
    x = np.random.default_rng(12).uniform(-2, 2, (2, 4, 4, 2))
    y, ld, cache = b.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=5)
    dx, dctx, grads = b.backward(dy, dld, cache)
    assert dctx is None
    params = b.parameters()
    assert set(grads) == set(params)
    assert ("scale" in params) == (scale == "realnvp")
    inputs = {"x": x, **params}
    gradcheck(lambda: loss_fn(*b.forward(x)[:2]), inputs, {"x": dx, **grads}, tol=TOL[np.float64]["grad"])


def test_gradcheck_with_context_through_conditioning_network():
    """A ConditioningNetwork net with a context: dL/dcontext comes back and is checked too."""
    rng = np.random.default_rng(0)
    b = MaskedAffineCoupling.with_network((2, 2, 2), 4, 1, "checkerboard", 0, "glow", rng=rng, dtype=np.float64,
                                          context_channels=1, use_attention=False)
    for k, v in b.net.proj_out.params.items():                # an init_scale 0.1 output -> enlarge the signal
        if k == "g":
            b.net.proj_out.params[k] = np.full_like(v, 5.0)
    x = rng.uniform(-2, 2, (1, 2, 2, 2))
    ctx = rng.uniform(-1, 1, (1, 2, 2, 1))
    y, ld, cache = b.forward(x, ctx)
    x2, _ = b.inverse(y, ctx)
    np.testing.assert_allclose(x2, x, atol=1e-12)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=1)
    dx, dctx, _ = b.backward(dy, dld, cache)
    assert dctx is not None and dctx.shape == ctx.shape
    gradcheck(lambda: loss_fn(*b.forward(x, ctx)[:2]), {"x": x, "context": ctx}, {"x": dx, "context": dctx},
              tol=TOL[np.float64]["grad"])


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_masks_alternate_with_parity(mask):
    H, W, C = 4, 6, 4
    m0, m1 = make_mask(mask, (H, W, C), 0), make_mask(mask, (H, W, C), 1)
    assert m0.dtype == bool and m0.shape == (H, W, C)
    np.testing.assert_array_equal(m0 ^ m1, True)                    # complementary
    assert m0.sum() == m0.size // 2
    if mask == "checkerboard":
        for i, j, c in np.ndindex(H, W, C):
            assert m0[i, j, c] == ((i + j) % 2 == 0) and m1[i, j, c] == ((i + j) % 2 == 1)
        np.testing.assert_array_equal(checkerboard_mask(H, W, C, 1), m1)
    else:
        np.testing.assert_array_equal(m0[..., :2], True)
        np.testing.assert_array_equal(m0[..., 2:], False)
        np.testing.assert_array_equal(channel_mask(H, W, C, 1), m1)
    # two layers of opposite parity: every entry is transformed by one of them
    b0 = make_linear_coupling((2, 2, 2), mask, 0, "additive", seed=1)
    b1 = make_linear_coupling((2, 2, 2), mask, 1, "additive", seed=2)
    x = np.random.default_rng(0).standard_normal((2, 2, 2, 2))
    y0 = b0.forward(x)[0]
    assert np.all((y0 != x) == ~b0.mask.astype(bool))
    y01 = Compose([b0, b1]).forward(x)[0]
    assert np.all(y01 != x)


# ---------------------------------------------------------------- PyTorch cross-check
def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the autograd oracle of the cross-checks")


@pytest.mark.torch
@pytest.mark.parametrize("scale", SCALE_KINDS)
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_matches_torch_autograd(mask, scale):
    torch = _torch()
    shape = (2, 4, 4)
    b = make_linear_coupling(shape, mask, 1, scale, seed=7)
    x = np.random.default_rng(8).uniform(-2, 2, (3, *shape))
    y, ld, cache = b.forward(x)
    _, dy, dld = random_scalar_loss(y, ld, seed=9)
    dx, _, grads = b.backward(dy, dld, cache)

    C = shape[2]
    tx = torch.tensor(x, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in b.parameters().items()}
    m = torch.tensor(b.mask)
    h = (m * tx) @ tp["net.A"] + tp["net.c"]
    if scale == "additive":
        logs, t = torch.zeros_like(tx), h
    elif scale == "realnvp":
        logs, t = tp["scale"] * torch.tanh(h[..., :C]), h[..., C:]
    else:
        logs, t = torch.nn.functional.logsigmoid(h[..., :C] + 2.0), h[..., C:]
    ty = m * tx + (1 - m) * (tx * torch.exp(logs) + t)
    tld = ((1 - m) * logs).sum(dim=(1, 2, 3))
    loss = (ty * torch.tensor(dy)).sum() + (tld * torch.tensor(dld)).sum()
    loss.backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld, tld.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k, v in tp.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# ---------------------------------------------------------------- backends, dtype, data_init
@pytest.mark.parametrize("scale", SCALE_KINDS)
def test_forward_backward_on_backend(xp, scale):
    """Same results on the backend as on the host (float64); cupy case skips without a GPU."""
    shape = (4, 4, 2)
    host = make_linear_coupling(shape, "checkerboard", 0, scale, seed=3)
    dev = make_linear_coupling(shape, "checkerboard", 0, scale, seed=3, xp=xp)
    x = np.random.default_rng(1).standard_normal((2, *shape))
    y, ld, c = host.forward(x)
    yd, ldd, cd = dev.forward(asarray(x, xp))
    assert array_module(yd) is xp
    np.testing.assert_allclose(to_numpy(yd), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(ldd), ld, rtol=1e-12, atol=1e-12)
    _, dy, dld = random_scalar_loss(y, ld, seed=2)
    dx, _, g = host.backward(dy, dld, c)
    dxd, _, gd = dev.backward(asarray(dy, xp), asarray(dld, xp), cd)
    np.testing.assert_allclose(to_numpy(dxd), dx, rtol=1e-11, atol=1e-12)
    for k in g:
        np.testing.assert_allclose(to_numpy(gd[k]), g[k], rtol=1e-11, atol=1e-12, err_msg=k)
    xi, _ = dev.inverse(yd)
    np.testing.assert_allclose(to_numpy(xi), x, atol=1e-12)


def test_float32_keeps_dtype_and_parameters():
    b = make_conv_coupling((4, 4, 2), "checkerboard", 0, "realnvp", np.float32, seed=0)
    assert sorted(b.parameters()) == ["net.layer.V", "net.layer.b", "net.layer.g", "scale"]
    assert isinstance(b.net, LayerNet)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 2)).astype(np.float32)
    y, ld, cache = b.forward(x, train=True, rng=np.random.default_rng(0))
    dx, _, g = b.backward(np.ones_like(y), np.ones(2, np.float32), cache)
    assert y.dtype == ld.dtype == dx.dtype == np.float32
    assert all(v.dtype == np.float32 for v in g.values())


def test_data_init_runs_the_nets_ddi_on_masked_input():
    conv = Conv2d(2, 4, 3, rng=np.random.default_rng(0), dtype=np.float64)    # b = 0: DDI is exact
    b = MaskedAffineCoupling((4, 4, 2), conv, "channel", 0, "glow", dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((16, 4, 4, 2)) * 3 + 1
    y = b.data_init(x)
    np.testing.assert_allclose(y, b.forward(x)[0])
    h = b.net.forward(b.mask * x)[0]                     # DDI: per-channel mean 0, std 1 on m * x
    np.testing.assert_allclose(h.mean(axis=(0, 1, 2)), 0, atol=1e-10)
    np.testing.assert_allclose(h.std(axis=(0, 1, 2)), 1, rtol=1e-6)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_flow_input_error():
    rng = np.random.default_rng(0)
    with pytest.raises(FlowInputError, match="even"):
        MaskedAffineCoupling((4, 4, 3), Conv2d(3, 6, 3, rng=rng), "channel")
    with pytest.raises(FlowInputError, match=r"must output 4 channels.*got 6 channels"):
        MaskedAffineCoupling((4, 4, 2), Conv2d(2, 6, 3, rng=rng), "checkerboard", scale="glow")
    with pytest.raises(FlowInputError, match=r"must output 2 channels \(shift"):
        MaskedAffineCoupling((4, 4, 2), Conv2d(2, 4, 3, rng=rng), "checkerboard", scale="additive")
    with pytest.raises(FlowInputError, match="reads 3 channels"):
        MaskedAffineCoupling((4, 4, 2), Conv2d(3, 4, 3, rng=rng))
    # a net without an out_channels attribute: caught at the first forward
    b = MaskedAffineCoupling((2, 2, 2), LinearNet(2, 3), "checkerboard", scale="realnvp")
    x = np.zeros((1, 2, 2, 2))
    with pytest.raises(FlowInputError, match=r"must output 4 channels.*\(1, 2, 2, 3\)"):
        b.forward(x)
    with pytest.raises(FlowInputError, match=r"must output 4 channels"):
        b.inverse(x)
    good = make_conv_coupling((2, 2, 2), "checkerboard", 0, "glow")
    with pytest.raises(FlowInputError, match=r"input has shape \(1, 2, 2, 4\), expected \[B, 2, 2, 2\]"):
        good.forward(np.zeros((1, 2, 2, 4)))
    with pytest.raises(FlowInputError, match="4-d"):
        good.forward(np.zeros((2, 2, 2)))
    with pytest.raises(FlowInputError, match="floating"):
        good.forward(np.zeros((1, 2, 2, 2), dtype=np.int64))
    with pytest.raises(FlowInputError, match="takes no context"):
        good.forward(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 1)))
    with pytest.raises(FlowInputError, match="non-finite"):
        good.inverse(np.full((1, 2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="mask must be one of"):
        MaskedAffineCoupling((2, 2, 2), LinearNet(2, 4), "stripes")
    with pytest.raises(ValueError, match="scale must be one of"):
        MaskedAffineCoupling((2, 2, 2), LinearNet(2, 4), scale="exp")
    with pytest.raises(ValueError, match="parity must be 0 or 1"):
        MaskedAffineCoupling((2, 2, 2), LinearNet(2, 4), parity=2)
    with pytest.raises(TypeError, match=r"no forward\(\)"):
        MaskedAffineCoupling((2, 2, 2), object())


# ---------------------------------------------------------------- compact channel coupling
def make_compact_coupling(shape, parity, scale, dtype=np.float64, seed=0):
    """compact=True: a 3x3 Conv2d net reading the C/2 kept channels, outputting for the C/2 transformed."""
    C = shape[2]
    rng = np.random.default_rng(seed)
    conv = Conv2d(C // 2, _out_channels(C // 2, scale), 3, rng=rng, dtype=dtype)
    conv.params["b"] = (0.3 * rng.standard_normal(conv.params["b"].shape)).astype(dtype)
    b = MaskedAffineCoupling(shape, conv, "channel", parity, scale, compact=True, dtype=dtype)
    if scale == "realnvp":
        b.params["scale"] = rng.uniform(0.5, 1.5, C // 2).astype(dtype)
    return b


@pytest.mark.parametrize("scale", SCALE_KINDS)
@pytest.mark.parametrize("parity", [0, 1])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_invertibility_compact_channel_coupling(parity, scale, data):
    C = data.draw(st.sampled_from([2, 4, 6]), label="C")
    b = make_compact_coupling((4, 2, C), parity, scale, seed=data.draw(st.integers(0, 2 ** 31 - 1), label="seed"))
    x = data.draw(hnp.arrays(np.float64, (2, 4, 2, C), elements=st.floats(-3, 3, allow_nan=False)), label="x")
    y, ld, _ = b.forward(x)
    kept = slice(0, C // 2) if parity == 0 else slice(C // 2, C)
    np.testing.assert_array_equal(y[..., kept], x[..., kept])       # the kept half passes unchanged
    xr, ld_inv = b.inverse(y)
    np.testing.assert_allclose(xr, x, atol=1e-10)
    _assert_logdet_zero_sum(ld, ld_inv, 1e-10)


@pytest.mark.parametrize("scale", SCALE_KINDS)
@pytest.mark.parametrize("parity", [0, 1])
def test_compact_gradcheck_and_equals_the_masked_coupling_with_the_zero_inputs_removed(parity, scale):
    shape = (4, 4, 4)
    b = make_compact_coupling(shape, parity, scale, seed=21 + parity)
    x = np.random.default_rng(22).uniform(-2, 2, (2, *shape))
    y, ld, cache = b.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=6)
    dx, _, grads = b.backward(dy, dld, cache)
    params = b.parameters()
    assert set(grads) == set(params)
    gradcheck(lambda: loss_fn(*b.forward(x)[:2]), {"x": x, **params}, {"x": dx, **grads},
              tol=TOL[np.float64]["grad"])
    # the masked coupling whose net reads all C channels (zero weights on the transformed ones) and
    # outputs for all C (the kept outputs unused) is the same map
    C, half = 4, 2
    keep = np.arange(C) < half if parity == 0 else np.arange(C) >= half
    conv = b.net.layer
    wide = Conv2d(C, _out_channels(C, scale), 3, rng=np.random.default_rng(0), dtype=np.float64)
    Wc = conv.params["g"] * conv.params["V"] / np.sqrt((conv.params["V"] ** 2).sum(axis=(0, 1, 2)))
    V = np.zeros((3, 3, C, wide.out_channels))
    out_idx = np.flatnonzero(~keep)                      # the transformed channels' slots in the wide output
    cols = (list(out_idx) if scale == "additive" else list(out_idx) + list(out_idx + C))
    V[:, :, np.flatnonzero(keep)[:, None], cols] = Wc
    bias = np.zeros(wide.out_channels)
    bias[cols] = conv.params["b"]
    g = np.sqrt((V ** 2).sum(axis=(0, 1, 2)))
    wide.params.update(V=np.where(g > 0, V, 1.0), g=np.where(g > 0, g, 0.0), b=bias)   # W = g V / |V| = V
    m = MaskedAffineCoupling(shape, wide, "channel", parity, scale, dtype=np.float64)
    if scale == "realnvp":
        sc = np.ones(C)
        sc[out_idx] = b.params["scale"]
        m.params["scale"] = sc
    ym, ldm, _ = m.forward(x)
    np.testing.assert_allclose(ym, y, atol=1e-12)
    np.testing.assert_allclose(ldm, ld, atol=1e-12)


def test_compact_needs_the_channel_mask_and_a_half_width_net():
    with pytest.raises(ValueError, match="channel mask"):
        MaskedAffineCoupling((4, 4, 4), Conv2d(2, 4, 3, rng=np.random.default_rng(0)), "checkerboard",
                             compact=True)
    with pytest.raises(FlowInputError, match="reads 4 channels"):
        MaskedAffineCoupling((4, 4, 4), Conv2d(4, 8, 3, rng=np.random.default_rng(0)), "channel", compact=True)
