"""The conditioning network and the full coupling layers (mixture-of-logistics and affine):
gradchecks (float64), round trips, log-det vs a numerical Jacobian, DDI statistics,
dropout modes, and a PyTorch autograd twin of one complete coupling layer (float64)."""
import math

import numpy as np
import pytest
from conftest import TOL
from hypothesis import given
from hypothesis import strategies as st

from flowpp_ref.bijections.coupling import LOGSCALE_MIN, AffineAttnCoupling, MixLogisticAttnCoupling
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss, rel_error
from flowpp_ref.nn.network import ConditioningNetwork
from flowpp_ref.core.validation import FlowInputError

GRAD_TOL = 1e-6
SHAPE = (4, 4, 2)        # H, W, C of each half
F, K, CTX = 8, 3, 3      # filters, mixture components, context channels


def _perturb(module, rng, scale=0.1):
    """Move every parameter off its (data-dependent) init: g = 1, b = 0 hide mistakes."""
    for v in module.parameters().values():
        v[...] = v + scale * rng.standard_normal(v.shape)


def _inputs(rng, B=2, shape=SHAPE, ctx=True, dtype=np.float64):
    c = rng.standard_normal((B, *shape)).astype(dtype)
    e = rng.standard_normal((B, *shape)).astype(dtype)
    a = rng.standard_normal((B, *shape[:2], CTX)).astype(dtype) if ctx else None
    return c, e, a


def _coupling(kind, rng, dtype=np.float64, ctx=True, blocks=1, dropout_p=0.0, use_attention=True, **kw):
    common = dict(context_channels=CTX if ctx else None, use_attention=use_attention, dropout_p=dropout_p,
                  rng=rng, dtype=dtype)
    if kind == "affine":
        return AffineAttnCoupling(SHAPE, F, blocks, **common)
    return MixLogisticAttnCoupling(SHAPE, F, blocks, K, with_affine=(kind != "mixlogistic_noaffine"), **common, **kw)


# ===================================================================== network
NET_CASES = {
    "attn_noctx": dict(context=False, use_attention=True, dropout_p=0.0, blocks=2),
    "attn_ctx_dropout": dict(context=True, use_attention=True, dropout_p=0.3, blocks=1),
    "noattn_ctx": dict(context=True, use_attention=False, dropout_p=0.0, blocks=2),
}


@pytest.mark.parametrize("case", list(NET_CASES))
def test_network_gradcheck_float64(case):
    cfg = NET_CASES[case]
    rng = np.random.default_rng(len(case))
    net = ConditioningNetwork(SHAPE, 2 * (2 + 3 * K), F, cfg["blocks"], CTX if cfg["context"] else None,
                              use_attention=cfg["use_attention"], dropout_p=cfg["dropout_p"], rng=rng,
                              dtype=np.float64)
    x, _, ctx = _inputs(rng, ctx=cfg["context"])
    net.data_init(x, ctx)
    _perturb(net, rng)
    assert ("pos_emb" in net.params) == cfg["use_attention"]

    def run():   # the same dropout masks on every call
        return net.forward(x, ctx, train=True, rng=np.random.default_rng(7))

    out, cache = run()
    w = rng.standard_normal(out.shape)
    dx, dctx, grads = net.backward(w, cache)
    assert set(grads) == set(net.parameters())
    inputs, analytic = {"x": x, **net.parameters()}, {"x": dx, **grads}
    if cfg["context"]:
        inputs["context"], analytic["context"] = ctx, dctx
    else:
        assert dctx is None
    gradcheck(lambda: float((run()[0] * w).sum()), inputs, analytic, max_entries=32, n_directions=4,
              tol=GRAD_TOL)


def test_network_data_init_gives_unit_statistics():
    rng = np.random.default_rng(1)
    net = ConditioningNetwork(SHAPE, 22, F, 2, CTX, rng=rng, dtype=np.float64)
    x, _, ctx = _inputs(rng, B=16)
    x = 3 * x + 1
    out = net.data_init(x, ctx)
    np.testing.assert_allclose(out, net.forward(x, ctx)[0], rtol=1e-10, atol=1e-12)
    # proj_out: per-channel mean 0, std init_scale_out = 0.1 on the init batch
    np.testing.assert_allclose(out.reshape(-1, 22).mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(out.reshape(-1, 22).std(0), 0.1, rtol=1e-6)
    # proj_in: per-channel mean 0, std 1
    h = net.proj_in.forward(x)[0].reshape(-1, F)
    np.testing.assert_allclose(h.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(h.std(0), 1, rtol=1e-6)


def test_network_rejects_bad_input():
    rng = np.random.default_rng(2)
    net = ConditioningNetwork(SHAPE, 4, F, 1, CTX, rng=rng, dtype=np.float64)
    x, _, ctx = _inputs(rng)
    with pytest.raises(FlowInputError, match="context is required"):
        net.forward(x)
    with pytest.raises(FlowInputError, match="expected"):
        net.forward(x[:, :2], ctx)
    with pytest.raises(FlowInputError, match="context has shape"):
        net.forward(x, ctx[..., :2])
    net2 = ConditioningNetwork(SHAPE, 4, F, 1, rng=rng, dtype=np.float64)
    with pytest.raises(FlowInputError, match="without a context"):
        net2.forward(x, ctx)


# ===================================================================== coupling: gradients
COUPLING_CASES = ["mixlogistic", "mixlogistic_noaffine", "affine"]


def _force_clamp(layer):
    """Push the log-scale of component 0, channel 0 below -7 (the clamp) through proj_out's bias."""
    j = 2 + 2 * K                   # raw channel of that log-scale: c * (2 + 3K) + j with c = 0
    layer.net.proj_out.params["b"][j] = -9.0


@pytest.mark.parametrize("kind", COUPLING_CASES)
def test_coupling_gradcheck_float64(kind):
    rng = np.random.default_rng(10 + len(kind))
    layer = _coupling(kind, rng, blocks=2, dropout_p=0.2)
    c, e, ctx = _inputs(rng)
    layer.data_init((c, e), ctx)
    _perturb(layer, rng)
    if kind != "affine":
        _force_clamp(layer)

    def run():
        return layer.forward((c, e), ctx, train=True, rng=np.random.default_rng(3))

    y, logdet, cache = run()
    if kind != "affine":
        on = cache["lsc_on"]
        assert 0 < on.sum() < on.size, "the test should reach both sides of the log-scale clamp"
    loss, dy, dlogdet = random_scalar_loss(y, logdet, seed=4)
    (dc, de), dctx, grads = layer.backward(dy, dlogdet, cache)
    assert set(grads) == set(layer.parameters())
    gradcheck(lambda: loss(*run()[:2]), {"c": c, "e": e, "context": ctx, **layer.parameters()},
              {"c": dc, "e": de, "context": dctx, **grads}, max_entries=32, n_directions=4, tol=GRAD_TOL)


@pytest.mark.parametrize("kind", COUPLING_CASES)
def test_coupling_heads_gradcheck_float64(kind):
    """The parameter heads (tanh, split, clamp at -7) + transform, from the raw network output.

    Component 0's raw log-scale straddles the clamp (-7.5 / -6.5) and its mean sits within a
    few scales of e, so its gradient is far from 0: a missing clamp mask would show."""
    rng = np.random.default_rng(60)
    layer = _coupling(kind, rng)
    P = layer.params_per_channel
    e = rng.standard_normal((2, 1, 2, 2))
    raw = rng.standard_normal((*e.shape, P))
    if kind != "affine":
        j = 2 + 2 * K
        raw[..., j] = np.where(rng.random(e.shape) < 0.5, -7.5, -6.5)
        raw[..., 2 + K] = e + 1e-3 * rng.standard_normal(e.shape)   # mean of component 0 near e
        raw[..., 2] = 2.0                                             # and a large weight
    y, logdet, cache = layer._transform(e, raw)
    loss, dy, dlogdet = random_scalar_loss(y, logdet, seed=6)
    draw, de = layer._head_backward(dy, dlogdet, cache)
    if kind != "affine":
        assert np.all(draw[..., j][raw[..., j] < LOGSCALE_MIN] == 0)
        assert np.all(draw[..., j][raw[..., j] > LOGSCALE_MIN] != 0)
    gradcheck(lambda: loss(*layer._transform(e, raw)[:2]),
              {"e": e, "raw": raw}, {"e": de, "raw": draw}, max_entries=500, tol=GRAD_TOL)


@pytest.mark.parametrize("kind", ["mixlogistic", "affine"])
def test_coupling_logdet_matches_numerical_jacobian(kind):
    rng = np.random.default_rng(20)
    shape = (2, 2, 1)
    kw = dict(context_channels=None, rng=rng, dtype=np.float64)
    layer = (AffineAttnCoupling(shape, 4, 1, **kw) if kind == "affine"
             else MixLogisticAttnCoupling(shape, 4, 1, K, **kw))
    c = rng.standard_normal((1, *shape))
    e = rng.standard_normal((1, *shape))
    layer.data_init((c, e))
    _perturb(layer, rng, 0.3)
    n = c.size

    def flat_map(v):
        y, _, _ = layer.forward((v[:n].reshape(c.shape), v[n:].reshape(e.shape)))
        return np.concatenate([y[0].ravel(), y[1].ravel()])

    v0 = np.concatenate([c.ravel(), e.ravel()])
    h = 1e-6
    J = np.stack([(flat_map(v0 + h * u) - flat_map(v0 - h * u)) / (2 * h) for u in np.eye(2 * n)], axis=1)
    _, logdet, _ = layer.forward((c, e))
    sign, ld = np.linalg.slogdet(J)
    assert sign > 0
    assert abs(ld - logdet[0]) < 1e-6, (ld, logdet[0])


# ===================================================================== coupling: round trips
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["hybrid", "bisection"])
@pytest.mark.parametrize("with_affine", [True, False])
def test_invertibility_coupling_layer_mixlogistic(dtype, method, with_affine):
    rng = np.random.default_rng(30)
    layer = MixLogisticAttnCoupling(SHAPE, F, 2, K, with_affine=with_affine, context_channels=CTX,
                                    inverse_method=method, rng=rng, dtype=dtype)
    c, e, ctx = _inputs(rng, B=3, dtype=dtype)
    layer.data_init((c, e), ctx)
    _perturb(layer, rng, 0.05)
    y, logdet, _ = layer.forward((c, e), ctx)
    (c2, e2), logdet_inv = layer.inverse(y, ctx)
    tol = TOL[dtype]
    assert c2 is y[0] or np.array_equal(c2, c)
    np.testing.assert_allclose(e2, e, atol=tol["roundtrip"])
    np.testing.assert_allclose(logdet_inv, -logdet, rtol=tol["logdet"], atol=tol["logdet"])
    c3, e3 = layer.sample_inverse(y, ctx)              # sampling's inverse: the same e, no log-det
    assert c3 is c2 or np.array_equal(c3, c2)
    np.testing.assert_array_equal(e3, e2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_invertibility_coupling_layer_affine(dtype):
    rng = np.random.default_rng(31)
    layer = AffineAttnCoupling(SHAPE, F, 2, context_channels=CTX, rng=rng, dtype=dtype)
    c, e, ctx = _inputs(rng, B=3, dtype=dtype)
    layer.data_init((c, e), ctx)
    _perturb(layer, rng, 0.3)
    y, logdet, _ = layer.forward((c, e), ctx)
    (c2, e2), logdet_inv = layer.inverse(y, ctx)
    tol = TOL[dtype]
    np.testing.assert_allclose(e2, e, atol=tol["roundtrip"])
    np.testing.assert_allclose(logdet_inv, -logdet, rtol=tol["logdet"], atol=tol["logdet"])


@given(B=st.integers(1, 3), H=st.integers(1, 4), W=st.integers(1, 4), C=st.integers(1, 3),
       K_=st.integers(1, 4), kind=st.sampled_from(COUPLING_CASES), ctx=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_invertibility_coupling_layer_random_shapes(B, H, W, C, K_, kind, ctx, seed):
    rng = np.random.default_rng(seed)
    kw = dict(context_channels=2 if ctx else None, rng=rng, dtype=np.float64)
    layer = (AffineAttnCoupling((H, W, C), 4, 1, **kw) if kind == "affine" else
             MixLogisticAttnCoupling((H, W, C), 4, 1, K_, with_affine=(kind == "mixlogistic"), **kw))
    c, e = rng.standard_normal((2, B, H, W, C))
    context = rng.standard_normal((B, H, W, 2)) if ctx else None
    # no DDI here: with B*H*W = 1 every unit has zero variance on the init batch
    _perturb(layer, rng, 0.05)
    y, logdet, _ = layer.forward((c, e), context)
    assert y[1].shape == e.shape and logdet.shape == (B,)
    (_, e2), logdet_inv = layer.inverse(y, context)
    tol = TOL[np.float64]
    np.testing.assert_allclose(e2, e, atol=tol["roundtrip"])
    np.testing.assert_allclose(logdet_inv, -logdet, rtol=tol["logdet"], atol=tol["logdet"])


# ===================================================================== coupling: modes and checks
def test_coupling_data_init_returns_forward_output():
    rng = np.random.default_rng(40)
    layer = _coupling("mixlogistic", rng)
    c, e, ctx = _inputs(rng, B=8)
    y = layer.data_init((c, e), ctx)
    y2, _, _ = layer.forward((c, e), ctx)
    assert y[0] is c
    np.testing.assert_allclose(y[1], y2[1], rtol=1e-10, atol=1e-12)
    raw = layer.net.forward(c, ctx)[0].reshape(-1, SHAPE[2] * (2 + 3 * K))
    np.testing.assert_allclose(raw.std(0), 0.1, rtol=1e-6)


def test_coupling_dropout_only_in_train_mode():
    rng = np.random.default_rng(41)
    layer = _coupling("mixlogistic", rng, dropout_p=0.5)
    c, e, ctx = _inputs(rng)
    layer.data_init((c, e), ctx)
    ev1 = layer.forward((c, e), ctx, train=False, rng=np.random.default_rng(1))
    ev2 = layer.forward((c, e), ctx, train=False, rng=np.random.default_rng(2))
    assert np.array_equal(ev1[0][1], ev2[0][1]) and np.array_equal(ev1[1], ev2[1])
    tr1 = layer.forward((c, e), ctx, train=True, rng=np.random.default_rng(1))
    tr1b = layer.forward((c, e), ctx, train=True, rng=np.random.default_rng(1))
    tr2 = layer.forward((c, e), ctx, train=True, rng=np.random.default_rng(2))
    assert np.array_equal(tr1[0][1], tr1b[0][1])
    assert not np.allclose(tr1[0][1], tr2[0][1]) and not np.allclose(tr1[0][1], ev1[0][1])


def test_coupling_rejects_bad_input():
    rng = np.random.default_rng(42)
    layer = _coupling("mixlogistic", rng)
    c, e, ctx = _inputs(rng)
    with pytest.raises(FlowInputError, match="tuple"):
        layer.forward(c, ctx)
    with pytest.raises(FlowInputError, match="halves have shapes"):
        layer.forward((c, e[:, :2]), ctx)
    with pytest.raises(FlowInputError, match="context"):
        layer.forward((c, e))
    with pytest.raises(ValueError, match="inverse_method"):
        MixLogisticAttnCoupling(SHAPE, F, 1, K, inverse_method="newton", rng=rng)


def test_coupling_parameter_names_follow_the_paper_layout():
    rng = np.random.default_rng(43)
    names = set(_coupling("mixlogistic", rng, blocks=2).parameters())
    for n in ["net.pos_emb", "net.proj_in.V", "net.block1.conv.c1.V", "net.block0.conv.a_proj.g",
              "net.block0.ln1.g", "net.block1.attn.proj1.V", "net.block1.attn.proj2.b", "net.block0.ln2.b",
              "net.proj_out.V"]:
        assert n in names, n
    assert _coupling("mixlogistic", rng).net.proj_out.params["V"].shape == (3, 3, F, SHAPE[2] * (2 + 3 * K))
    assert _coupling("affine", rng).net.proj_out.params["V"].shape == (3, 3, F, SHAPE[2] * 2)
    noattn = set(_coupling("mixlogistic", rng, use_attention=False).parameters())
    assert not any("attn" in n or "ln2" in n or "pos_emb" in n for n in noattn)


# ===================================================================== PyTorch twin
def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the autograd oracle of the cross-checks")


def t_wn(V, g):
    return g * V / V.pow(2).sum(dim=tuple(range(V.dim() - 1))).sqrt()


def t_conv(x, p, name):
    import torch.nn.functional as tF
    W = t_wn(p[name + ".V"], p[name + ".g"]).permute(3, 2, 0, 1)        # [Cout, Cin, 3, 3]
    return tF.conv2d(x.permute(0, 3, 1, 2), W, p[name + ".b"], padding=1).permute(0, 2, 3, 1)


def t_nin(x, p, name):
    return x @ t_wn(p[name + ".V"], p[name + ".g"]) + p[name + ".b"]


def t_concat_elu(x):
    import torch
    return torch.nn.functional.elu(torch.cat([x, -x], dim=-1))


def t_gate(h):
    import torch
    C = h.shape[-1] // 2
    return h[..., :C] * torch.sigmoid(h[..., C:])


def t_ln(x, p, name, eps=1e-5):
    u = x.mean(-1, keepdim=True)
    s = ((x - u) ** 2).mean(-1, keepdim=True)
    return (x - u) / (s + eps).sqrt() * p[name + ".g"] + p[name + ".b"]


def t_attn(x, pos, p, name, heads=4):
    import torch
    B, H, W, C = x.shape
    T, d = H * W, C // heads
    qkv = t_nin(x + pos[None], p, name + ".proj1").reshape(B, T, 3, heads, d).permute(2, 0, 3, 1, 4)
    w = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(d), dim=-1)
    a = (w @ qkv[2]).permute(0, 2, 1, 3).reshape(B, H, W, C)
    return x + t_gate(t_nin(a, p, name + ".proj2"))


def t_network(c, ctx, p, blocks):
    h = t_conv(c, p, "net.proj_in")
    for i in range(blocks):
        n = f"net.block{i}"
        r = t_conv(t_concat_elu(h), p, n + ".conv.c1")
        if ctx is not None:
            r = r + t_nin(t_concat_elu(ctx), p, n + ".conv.a_proj")
        h = t_ln(h + t_gate(t_nin(t_concat_elu(r), p, n + ".conv.c2")), p, n + ".ln1")
        h = t_ln(t_attn(h, p["net.pos_emb"], p, n + ".attn"), p, n + ".ln2")
    return t_conv(h, p, "net.proj_out")


def t_mixlogistic_coupling(c, e, ctx, p, blocks, K):
    """y_e = exp(a) logit(F(e)) + b; logdet = sum(log pdf - log F - log(1 - F) + a), written in torch."""
    import torch
    import torch.nn.functional as tF
    B, H, W, C = e.shape
    raw = t_network(c, ctx, p, blocks).reshape(B, H, W, C, 2 + 3 * K)
    a, b = torch.tanh(raw[..., 0]), raw[..., 1]
    logits, means, logscales = torch.split(raw[..., 2:], K, dim=-1)
    logscales = torch.clamp(logscales, min=LOGSCALE_MIN)
    logpi = torch.log_softmax(logits, dim=-1)
    z = (e[..., None] - means) * torch.exp(-logscales)
    logF = torch.logsumexp(logpi + tF.logsigmoid(z), dim=-1)
    log1mF = torch.logsumexp(logpi + tF.logsigmoid(-z), dim=-1)       # 1 - F = sum pi sigmoid(-z)
    logpdf = torch.logsumexp(logpi + tF.logsigmoid(z) + tF.logsigmoid(-z) - logscales, dim=-1)
    y_e = torch.exp(a) * (logF - log1mF) + b
    logdet = (logpdf - logF - log1mF + a).reshape(B, -1).sum(1)
    return y_e, logdet


@pytest.mark.torch
def test_coupling_layer_matches_torch():
    torch = _torch()
    rng = np.random.default_rng(50)
    layer = _coupling("mixlogistic", rng, blocks=2)
    c, e, ctx = _inputs(rng)
    layer.data_init((c, e), ctx)
    _perturb(layer, rng)
    _force_clamp(layer)
    y, logdet, cache = layer.forward((c, e), ctx)
    loss, dy, dlogdet = random_scalar_loss(y, logdet, seed=5)
    (dc, de), dctx, grads = layer.backward(dy, dlogdet, cache)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in
         {"c": c, "e": e, "ctx": ctx, **layer.parameters()}.items()}
    ty_e, tlogdet = t_mixlogistic_coupling(t["c"], t["e"], t["ctx"], t, 2, K)
    tloss = (t["c"] * torch.tensor(dy[0])).sum() + (ty_e * torch.tensor(dy[1])).sum() \
        + (tlogdet * torch.tensor(dlogdet)).sum()
    tloss.backward()
    assert rel_error(y[1], ty_e.detach().numpy()) < 1e-10
    assert rel_error(logdet, tlogdet.detach().numpy()) < 1e-10
    ours = {"c": dc, "e": de, "ctx": dctx, **grads}
    errs = {k: rel_error(ours[k], t[k].grad.numpy()) for k in t}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-5, f"{worst}: rel. error {errs[worst]:.2e} vs torch; all: {errs}"


def test_transform_parameters_are_what_the_transform_uses():
    """The public handle on a coupling's predicted parameters: y_e recomputed from them equals forward's."""
    from flowpp_ref.bijections.coupling import MixLogisticAttnCoupling
    from flowpp_ref.bijections.coupling_transforms import mixlogistic_coupling_forward
    r = np.random.default_rng(0)
    f = MixLogisticAttnCoupling((4, 4, 2), 8, 1, 3, rng=np.random.default_rng(1), dtype=np.float64)
    c, e = r.normal(size=(2, 4, 4, 2)), r.normal(size=(2, 4, 4, 2))
    t = f.transform_parameters(c)
    assert set(t) == {"a", "b", "logits", "means", "logscales"} and t["logits"].shape == (2, 4, 4, 2, 3)
    y_e = mixlogistic_coupling_forward(e, t["a"], t["b"], t["logits"], t["means"], t["logscales"])[0]
    np.testing.assert_allclose(y_e, f.forward((c, e))[0][1], rtol=1e-12)
    from test_masked_coupling import make_conv_coupling
    m = make_conv_coupling((4, 4, 4), "checkerboard", 0, "realnvp")
    m.params["scale"] = r.normal(size=m.params["scale"].shape)          # log s != 0
    x = r.normal(size=(2, 4, 4, 4))
    p = m.transform_parameters(x)
    np.testing.assert_allclose(x * np.exp(p["a"]) + p["b"], m.forward(x)[0], rtol=1e-12)
