"""Tests of GlowCouplingNet (Glow sec. 3.3, the release's ``f()``): conv3x3 -> actnorm -> relu ->
conv1x1 -> actnorm -> relu -> ZeroConv2d.

* ``test_gradcheck_*``: backward vs central differences (core/gradcheck.py, float64) for x and every
  parameter, with the zero conv and the actnorms set to random values (at zero init the gradient of
  every earlier layer is 0), with the numba conv kernels on and off;
* zero init: the output is exactly 0; data_init: zero mean / unit std per channel after each actnorm;
* as the ``net`` of a MaskedAffineCoupling: the identity ("realnvp", "additive") or the fixed scale
  sigmoid(2) ("glow") at init, gradcheck of the coupling, round trip;
* a PyTorch autograd cross-check of the whole network (``torch`` marker); backends; bad inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL

from flowpp_ref.bijections.masked_coupling import GLOW_SHIFT, MaskedAffineCoupling
from flowpp_ref.core.backend import array_module, asarray, to_numpy
from flowpp_ref.core.gradcheck import gradcheck
from flowpp_ref.core.validation import FlowInputError
from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.nn.glow_net import GlowCouplingNet
from flowpp_ref.nn.plain_conv import PlainConv2d, ZeroConv2d, conv2d_same

SHAPE = (2, 4, 4, 3)      # [B, H, W, C]
FILTERS = 4
PARAM_NAMES = {"conv1.W", "norm1.b", "norm1.logs", "conv2.W", "norm2.b", "norm2.logs",
               "zero_conv.W", "zero_conv.b", "zero_conv.logs"}


def make_net(cin=3, cout=6, filters=FILTERS, dtype=np.float64, seed=0, randomize=True, xp=np):
    """A net whose actnorms and zero conv hold random values (else: the init)."""
    net = GlowCouplingNet(cin, cout, filters, rng=np.random.default_rng(seed), xp=xp, dtype=dtype)
    if randomize:
        r = np.random.default_rng(seed + 100)
        for k, v in net.parameters().items():
            if k in ("conv1.W", "conv2.W"):
                continue
            scale = 0.3 if k.endswith("logs") else (0.5 if k.endswith("b") else 0.2)
            net._set(k, asarray(scale * r.standard_normal(v.shape), xp, dtype))
    return net


def _loss(net, x, w):
    return float(to_numpy((net.forward(x)[0] * w).sum()))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_gradcheck_input_and_every_parameter(kernels):
    with kernels_enabled(kernels):
        net = make_net(seed=1)
        rng = np.random.default_rng(2)
        x = rng.standard_normal(SHAPE)
        out, cache = net.forward(x)
        assert out.shape == (*SHAPE[:3], 6)
        w = rng.standard_normal(out.shape)
        dx, dctx, grads = net.backward(w, cache)
        assert dctx is None
        params = net.parameters()
        assert set(params) == PARAM_NAMES == set(grads)
        for k in params:
            assert grads[k].shape == params[k].shape, k
            assert np.abs(grads[k]).max() > 0, k                 # every path is live
        gradcheck(lambda: _loss(net, x, w), {"x": x, **params}, {"x": dx, **grads},
                  tol=TOL[np.float64]["grad"], max_entries=300)


def test_zero_init_blocks_gradient_of_earlier_layers():
    """At init only the zero conv's W, b get a gradient (dout * exp(3 logs) hits a zero W)."""
    net = make_net(seed=3, randomize=False)
    x = np.random.default_rng(4).standard_normal(SHAPE)
    net.data_init(x)
    out, cache = net.forward(x)
    dx, _, grads = net.backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(dx, 0)
    for k, g in grads.items():
        if k in ("zero_conv.W", "zero_conv.b"):
            assert np.abs(g).max() > 0, k
        else:
            np.testing.assert_array_equal(g, 0, err_msg=k)     # incl. zero_conv.logs: 3 sum dout * out, out = 0


# ---------------------------------------------------------------- init
def test_zero_init_output_is_exactly_zero():
    net = make_net(dtype=np.float32, randomize=False)
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    out, _ = net.forward(x)
    assert out.dtype == np.float32 and out.shape == (*SHAPE[:3], 6)
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(net.data_init(x), 0)
    zc = net.zero_conv.params
    for k in ("W", "b", "logs"):
        np.testing.assert_array_equal(zc[k], 0)
    for k in ("conv1.W", "conv2.W"):                             # N(0, 0.05^2), as the release
        assert 0.02 < float(net.parameters()[k].std()) < 0.09


def test_data_init_normalizes_each_actnorm():
    net = make_net(cin=3, cout=6, filters=8, randomize=False, seed=6)
    x = 2.0 + 3.0 * np.random.default_rng(7).standard_normal((4, 6, 6, 3))
    out = net.data_init(x)
    np.testing.assert_array_equal(out, 0)
    _, cache = net.forward(x)
    for idx in (1, 4):                                           # the norm1, norm2 caches: their outputs
        a = cache[idx]["y"][0]
        np.testing.assert_allclose(a.mean(axis=(0, 1, 2)), 0, atol=1e-10)
        np.testing.assert_allclose(a.std(axis=(0, 1, 2)), 1, rtol=1e-4)
    assert not np.allclose(net.norm1.params["logs"], 0)


# ---------------------------------------------------------------- inside a coupling
@pytest.mark.parametrize("scale", ["realnvp", "glow", "additive"])
def test_coupling_at_init(scale):
    """Zero output -> log s = log s(0), t = 0: identity for realnvp/additive, y_t = sigmoid(2) x for glow."""
    C = 2
    out_ch = C if scale == "additive" else 2 * C
    net = make_net(cin=C, cout=out_ch, randomize=False, seed=8)
    b = MaskedAffineCoupling((4, 4, C), net, "checkerboard", 0, scale, dtype=np.float64)
    x = np.random.default_rng(9).standard_normal((2, 4, 4, C))
    y = b.data_init(x)
    y2, ld, _ = b.forward(x)
    np.testing.assert_array_equal(y, y2)
    u = 1 - b.mask
    if scale == "glow":
        s = 1 / (1 + np.exp(-GLOW_SHIFT))                        # sigmoid(0 + 2)
        np.testing.assert_allclose(y, b.mask * x + u * x * s, rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(ld, u.sum() * np.log(s), rtol=1e-13)
    else:
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(ld, 0)


@pytest.mark.parametrize("randomize", [False, True], ids=["init", "random"])
def test_coupling_gradcheck_glow_scale(randomize):
    C = 2
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 4, 4, C))
    net = make_net(cin=C, cout=2 * C, randomize=False, seed=11)
    b = MaskedAffineCoupling((4, 4, C), net, "channel", 1, "glow", dtype=np.float64)
    b.data_init(x)
    if randomize:
        for k in ("zero_conv.W", "zero_conv.b", "zero_conv.logs"):
            v = net.parameters()[k]
            net._set(k, 0.2 * rng.standard_normal(v.shape))
    y, ld, cache = b.forward(x)
    dy, dld = rng.standard_normal(y.shape), rng.standard_normal(ld.shape)
    dx, dctx, grads = b.backward(dy, dld, cache)
    assert dctx is None
    params = b.parameters()
    assert set(grads) == set(params) == {f"net.{k}" for k in PARAM_NAMES}

    def f():
        yy, ll, _ = b.forward(x)
        return float((yy * dy).sum() + (ll * dld).sum())

    gradcheck(f, {"x": x, **params}, {"x": dx, **grads}, tol=TOL[np.float64]["grad"], max_entries=300)
    if randomize:                                                # a live net: an invertible, non-trivial layer
        xi, ldi = b.inverse(y)
        np.testing.assert_allclose(xi, x, atol=1e-12)
        np.testing.assert_allclose(ld + ldi, 0, atol=1e-12)


# ---------------------------------------------------------------- PyTorch cross-check
def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the autograd oracle of the cross-checks")


@pytest.mark.torch
def test_matches_torch_autograd():
    torch = _torch()
    F = torch.nn.functional
    net = make_net(seed=12)
    rng = np.random.default_rng(13)
    x = rng.standard_normal(SHAPE)
    out, cache = net.forward(x)
    w = rng.standard_normal(out.shape)
    dx, _, grads = net.backward(w, cache)

    tx = torch.tensor(x, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in net.parameters().items()}

    def conv(h, W):                                              # NHWC, W [kh, kw, Cin, Cout], "SAME"
        k = W.shape[0]
        o = F.conv2d(h.permute(0, 3, 1, 2), W.permute(3, 2, 0, 1), padding=k // 2)
        return o.permute(0, 2, 3, 1)

    h = torch.relu((conv(tx, tp["conv1.W"]) + tp["norm1.b"]) * torch.exp(tp["norm1.logs"]))
    h = torch.relu((conv(h, tp["conv2.W"]) + tp["norm2.b"]) * torch.exp(tp["norm2.logs"]))
    tout = (conv(h, tp["zero_conv.W"]) + tp["zero_conv.b"]) * torch.exp(3 * tp["zero_conv.logs"])
    (tout * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k, v in tp.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# ---------------------------------------------------------------- backends, layers
def test_forward_backward_on_backend(xp):
    """Same results on the backend as on the host (float64); the cupy case skips without a GPU."""
    host, dev = make_net(seed=14), make_net(seed=14, xp=xp)
    x = np.random.default_rng(15).standard_normal(SHAPE)
    out, c = host.forward(x)
    outd, cd = dev.forward(asarray(x, xp))
    assert array_module(outd) is xp
    np.testing.assert_allclose(to_numpy(outd), out, rtol=1e-11, atol=1e-12)
    w = np.random.default_rng(16).standard_normal(out.shape)
    dx, _, g = host.backward(w, c)
    dxd, _, gd = dev.backward(asarray(w, xp), cd)
    np.testing.assert_allclose(to_numpy(dxd), dx, rtol=1e-10, atol=1e-12)
    for k in g:
        np.testing.assert_allclose(to_numpy(gd[k]), g[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_conv2d_same_kernels_match_reference():
    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 5, 3, 4))
    for cout in (2, 6):                                          # both kernel branches (Cout < Cin, Cout >= Cin)
        W, b = rng.standard_normal((3, 3, 4, cout)), rng.standard_normal(cout)
        with kernels_enabled(False):
            ref = conv2d_same(x, W, b)
        with kernels_enabled(True):
            np.testing.assert_allclose(conv2d_same(x, W, b), ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(conv2d_same(x, W), ref - b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises():
    net = make_net()
    x = np.zeros(SHAPE)
    with pytest.raises(FlowInputError, match="4-d"):
        net.forward(x[0])
    with pytest.raises(FlowInputError, match="expected 3 input channels, got 2"):
        net.forward(np.zeros((2, 4, 4, 2)))
    with pytest.raises(FlowInputError, match="floating-point"):
        net.forward(np.zeros(SHAPE, dtype=np.int32))
    with pytest.raises(FlowInputError, match="expected an array"):
        net.forward([[1.0]])
    with pytest.raises(FlowInputError, match="no context"):
        net.forward(x, np.zeros(SHAPE))
    with pytest.raises(FlowInputError, match="no context"):
        net.data_init(x, np.zeros(SHAPE))
    _, cache = net.forward(x)
    with pytest.raises(FlowInputError, match="dout has shape"):
        net.backward(np.zeros((2, 4, 4, 5)), cache)
    with pytest.raises(FlowInputError, match="channels"):
        PlainConv2d(3, 4, rng=0).forward(np.zeros((1, 2, 2, 4)))
    with pytest.raises(FlowInputError, match="channels"):
        ZeroConv2d(3, 4).forward(np.zeros((1, 2, 2, 2)))
    # a coupling checks the net's declared widths
    with pytest.raises(FlowInputError, match="must output 4 channels"):
        MaskedAffineCoupling((4, 4, 2), make_net(cin=2, cout=3), "checkerboard", 0, "glow")
    with pytest.raises(FlowInputError, match="reads 3 channels"):
        MaskedAffineCoupling((4, 4, 2), make_net(cin=3, cout=4), "checkerboard", 0, "glow")
    with pytest.raises(ValueError, match="positive"):
        GlowCouplingNet(3, 6, 0, rng=0)
    with pytest.raises(TypeError, match="rng is required"):
        GlowCouplingNet(3, 6, 4, rng=None)
