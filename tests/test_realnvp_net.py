"""Tests of RealNVPResNet (RealNVP sec. 4.1; the release's ``resnet``): weight-normed 3x3 convolutions,
residual blocks of batch norm -> relu -> conv, a batch-normed output convolution.

* backward vs central differences (float64) for x and every parameter, in training mode (through the
  batch statistics) and in evaluation mode (running statistics), kernels on and off;
* the running statistics get exact zero gradients and move only in training mode;
* data_init: output std = out_scale, each batch norm's running statistics = the init batch's;
* as the ``net`` of a MaskedAffineCoupling: gradcheck of the coupling and a round trip;
* a PyTorch autograd cross-check of the training-mode network (``torch`` marker); bad inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL

from flowpp_ref.bijections.masked_coupling import MaskedAffineCoupling
from flowpp_ref.core.backend import asarray, to_numpy
from flowpp_ref.core.gradcheck import gradcheck
from flowpp_ref.core.validation import FlowInputError
from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.nn.realnvp_net import RealNVPResNet

SHAPE = (3, 4, 4, 2)


def make_net(cin=2, cout=4, filters=3, blocks=2, dtype=np.float64, seed=0, randomize=True):
    net = RealNVPResNet(cin, cout, filters, blocks, rng=np.random.default_rng(seed), dtype=dtype)
    if randomize:                               # batch-norm affine parts and running stats off their init
        r = np.random.default_rng(seed + 50)
        for k, v in net.parameters().items():
            if k.endswith(("log_gamma", "beta", "running_mean")):
                net._set(k, asarray(0.3 * r.standard_normal(v.shape), np, dtype))
            elif k.endswith("running_var"):
                net._set(k, asarray(0.5 + r.random(v.shape), np, dtype))
    return net


def _loss(net, x, w, train):
    return float(to_numpy((net.forward(x, train=train)[0] * w).sum()))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_gradcheck_input_and_every_parameter(train, kernels):
    with kernels_enabled(kernels):
        net = make_net(seed=1)
        rng = np.random.default_rng(2)
        x = rng.standard_normal(SHAPE)
        out, cache = net.forward(x, train=train)
        assert out.shape == (*SHAPE[:3], 4)
        w = rng.standard_normal(out.shape)
        dx, dctx, grads = net.backward(w, cache)
        assert dctx is None
        params = net.parameters()
        assert set(grads) == set(params)
        # in training mode a batch norm is blind to a per-channel shift of its input, and to its
        # scale up to eps: the biases of the convolutions that feed only batch norms, and the gains of
        # conv1 (read by bn2 alone), have a zero gradient there (to rounding, and O(eps) for the gains)
        blind = ({k for k in params if k.endswith(".b") and k != "conv_out.b"} |
                 {k for k in params if k.endswith("conv1.g")}) if train else set()
        for k in params:
            assert grads[k].shape == params[k].shape, k
            if "running" in k:
                np.testing.assert_array_equal(grads[k], 0, err_msg=k)
            elif k in blind:
                assert np.abs(grads[k]).max() < 1e-3 * np.abs(grads["conv_out.b"]).max(), k
            else:
                assert np.abs(grads[k]).max() > 1e-3 * np.abs(grads["conv_out.b"]).max(), k
        trained = {k: v for k, v in params.items() if "running" not in k and k not in blind}
        gradcheck(lambda: _loss(net, x, w, train), {"x": x, **trained}, {"x": dx, **grads},
                  tol=TOL[np.float64]["grad"], max_entries=200)


def test_running_statistics_move_in_training_mode_only():
    net = make_net(seed=3, randomize=False)
    x = np.random.default_rng(4).standard_normal(SHAPE) * 2 + 1
    before = {k: v.copy() for k, v in net.parameters().items() if "running" in k}
    net.forward(x, train=False)
    for k, v in before.items():
        np.testing.assert_array_equal(net.parameters()[k], v, err_msg=k)
    net.forward(x, train=True)
    moved = [k for k, v in before.items() if not np.array_equal(net.parameters()[k], v)]
    assert len(moved) == len(before)


def test_data_init_sets_output_scale_and_running_statistics():
    net = make_net(cin=2, cout=4, filters=6, blocks=1, seed=5, randomize=False)
    x = np.random.default_rng(6).standard_normal((8, 6, 6, 2)) * 3 - 2
    out = net.data_init(x)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), net.conv_out.init_scale, rtol=1e-3)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    h = net.conv_in.forward(x)[0]
    p = net.parameters()
    np.testing.assert_allclose(p["block0_bn1.running_mean"], h.mean(axis=(0, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(p["block0_bn1.running_var"], h.var(axis=(0, 1, 2)), rtol=1e-10)
    # right after the init, training and evaluation modes agree (batch stats = running stats)
    np.testing.assert_allclose(net.forward(x, train=True)[0], net.forward(x, train=False)[0], atol=1e-9)


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_as_the_network_of_a_masked_coupling(mask):
    rng = np.random.default_rng(7)
    C = 2
    net = make_net(cin=C, cout=2 * C, seed=8)
    f = MaskedAffineCoupling(SHAPE[1:], net, mask=mask, parity=1, scale="realnvp", dtype=np.float64)
    x = rng.standard_normal(SHAPE)
    y, ld, cache = f.forward(x, train=False)
    xr, ldi = f.inverse(y)
    np.testing.assert_allclose(xr, x, atol=1e-12)
    np.testing.assert_allclose(ldi, -ld, atol=1e-12)
    wy, wl = rng.standard_normal(y.shape), rng.standard_normal(ld.shape)
    dx, _, grads = f.backward(wy, wl, cache)

    def loss():
        yy, lld, _ = f.forward(x, train=True)
        return float((yy * wy).sum() + (lld * wl).sum())
    y, ld, cache = f.forward(x, train=True)
    dx, _, grads = f.backward(wy, wl, cache)
    params = {k: v for k, v in f.parameters().items()
              if "running" not in k and not (k.endswith(".b") and k != "net.conv_out.b") and "conv1.g" not in k}
    gradcheck(loss, {"x": x, **params}, {"x": dx, **grads}, tol=TOL[np.float64]["grad"], max_entries=150)


def test_bad_inputs_are_refused():
    net = make_net()
    with pytest.raises(FlowInputError, match="input channels"):
        net.forward(np.zeros((2, 4, 4, 3)))
    with pytest.raises(FlowInputError, match="no context"):
        net.forward(np.zeros(SHAPE), np.zeros(SHAPE))
    with pytest.raises(ValueError, match="blocks"):
        RealNVPResNet(2, 4, 3, -1, rng=np.random.default_rng(0))


@pytest.mark.torch
def test_training_mode_matches_pytorch_autograd():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as tF
    net = make_net(seed=9)
    rng = np.random.default_rng(10)
    x = rng.standard_normal(SHAPE)
    out, cache = net.forward(x, train=True)
    w = rng.standard_normal(out.shape)
    dx, _, grads = net.backward(w, cache)
    P = {k: torch.tensor(v, requires_grad="running" not in k) for k, v in net.parameters().items()}
    tx = torch.tensor(x, requires_grad=True)

    def conv(name, h):
        V, g, b = P[f"{name}.V"], P[f"{name}.g"], P[f"{name}.b"]
        W = g * V / V.pow(2).sum(dim=(0, 1, 2)).sqrt()
        out = tF.conv2d(h.permute(0, 3, 1, 2), W.permute(3, 2, 0, 1), b, padding=1)
        return out.permute(0, 2, 3, 1)

    def bn_relu(name, h):
        mu = h.mean(dim=(0, 1, 2))
        var = ((h - mu) ** 2).mean(dim=(0, 1, 2))
        a = (h - mu) / (var + net.bn_out.eps).sqrt() * P[f"{name}.log_gamma"].exp() + P[f"{name}.beta"]
        return torch.relu(a)

    h = conv("conv_in", tx)
    for k in range(net.blocks):
        a = conv(f"block{k}_conv1", bn_relu(f"block{k}_bn1", h))
        h = h + conv(f"block{k}_conv2", bn_relu(f"block{k}_bn2", a))
    tout = conv("conv_out", bn_relu("bn_out", h))
    np.testing.assert_allclose(tout.detach().numpy(), out, atol=1e-10)
    (tout * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=1e-9)
    for k, t in P.items():
        if t.requires_grad:
            np.testing.assert_allclose(grads[k], t.grad.numpy(), atol=1e-9, err_msg=k)
