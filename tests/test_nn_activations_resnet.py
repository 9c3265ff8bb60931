"""concat_elu, gate (references and numba kernels), Dropout and GatedResNet:
finite-difference checks of every backward (float64), kernels against references,
dropout masks, the data-dependent init of the resnet's sub-layers, bad-input
errors, and a PyTorch autograd cross-check."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowpp_ref.core.backend import to_numpy
from flowpp_ref.core.gradcheck import gradcheck, rel_error
from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.nn import (Dropout, GatedResNet, concat_elu, concat_elu_backward, concat_elu_forward, elu, elu_grad,
                           gate, gate_backward, gate_forward, sigmoid)
from flowpp_ref.nn.activations import (concat_elu_backward_reference, concat_elu_reference, gate_backward_reference,
                                       gate_reference)
from flowpp_ref.kernels.numba import activations as nk
from flowpp_ref.core.validation import FlowInputError

GRAD_TOL = 1e-6


def away_from_zero(rng, shape, lo=0.1, scale=1.5):
    """Gaussian-ish values with |x| >= lo (concat_elu's second derivative jumps at 0)."""
    x = rng.standard_normal(shape) * scale
    return np.where(np.abs(x) < lo, np.sign(x + 1e-300) * (lo + np.abs(x)), x)


# ------------------------------------------------------------------ helpers
def test_elu_sigmoid_helpers():
    x = np.array([-800.0, -30.0, -1.0, -1e-9, 0.0, 1e-9, 2.0, 800.0])
    with np.errstate(over="raise", invalid="raise"):   # no overflow/invalid warnings from the stable forms
        e, de, s = elu(x), elu_grad(x), sigmoid(x)
    np.testing.assert_allclose(e, np.where(x > 0, x, np.exp(np.minimum(x, 0)) - 1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(de, np.where(x > 0, 1.0, np.exp(np.minimum(x, 0))), rtol=1e-12)
    np.testing.assert_allclose(s[1:-1], 1 / (1 + np.exp(-x[1:-1])), rtol=1e-12)
    assert s[0] == 0.0 and s[-1] == 1.0
    np.testing.assert_allclose(sigmoid(-x), 1 - s, atol=1e-15)


# ------------------------------------------------------------- gradchecks
@pytest.mark.parametrize("kernels", [True, False], ids=["numba", "reference"])
def test_concat_elu_gradcheck(kernels):
    rng = np.random.default_rng(0)
    x = away_from_zero(rng, (2, 3, 4, 5))
    w = rng.standard_normal((2, 3, 4, 10))
    with kernels_enabled(kernels):
        out, cache = concat_elu_forward(x)
        assert out.shape == (2, 3, 4, 10)
        dx = concat_elu_backward(w, cache)
        gradcheck(lambda: float((concat_elu(x) * w).sum()), {"x": x}, {"x": dx}, tol=GRAD_TOL)


@pytest.mark.parametrize("kernels", [True, False], ids=["numba", "reference"])
def test_gate_gradcheck(kernels):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 6)) * 2
    w = rng.standard_normal((2, 3, 4, 3))
    with kernels_enabled(kernels):
        out, cache = gate_forward(x)
        assert out.shape == (2, 3, 4, 3)
        dx = gate_backward(w, cache)
        gradcheck(lambda: float((gate(x) * w).sum()), {"x": x}, {"x": dx}, tol=GRAD_TOL)


def test_concat_elu_values():
    x = np.array([[-2.0, 0.5]])
    np.testing.assert_allclose(concat_elu(x), [[np.expm1(-2.0), 0.5, 2.0, np.expm1(-0.5)]], rtol=1e-14)


# ------------------------------------------------------ kernels vs references
float_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    elements=st.floats(-60, 60, width=32))


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-7)


@given(x=float_arrays, seed=st.integers(0, 2 ** 16))
def test_numba_concat_elu_matches_reference(x, seed):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((*x.shape[:-1], 2 * x.shape[-1])).astype(x.dtype)
    np.testing.assert_allclose(nk.concat_elu_numba(x), concat_elu_reference(x), **_tol(x.dtype))
    np.testing.assert_allclose(nk.concat_elu_backward_numba(d, x), concat_elu_backward_reference(d, x),
                               **_tol(x.dtype))


@given(x=float_arrays, seed=st.integers(0, 2 ** 16))
def test_numba_gate_matches_reference(x, seed):
    x = np.concatenate([x, x[..., ::-1] * 0.7], axis=-1)        # even channel count
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((*x.shape[:-1], x.shape[-1] // 2)).astype(x.dtype)
    np.testing.assert_allclose(nk.gate_numba(x), gate_reference(x), **_tol(x.dtype))
    np.testing.assert_allclose(nk.gate_backward_numba(d, x), gate_backward_reference(d, x), **_tol(x.dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_special_values_and_strided_input(dtype):
    v = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 100.0, -100.0], dtype=dtype)
    base = np.tile(v, (4, 2)).reshape(4, 2, 9).transpose(0, 2, 1)   # non-contiguous, last axis 2
    for x in (v.reshape(1, 9), base, base[:, ::2]):
        d = np.ones((*x.shape[:-1], 2 * x.shape[-1]), dtype)
        np.testing.assert_allclose(nk.concat_elu_numba(x), concat_elu_reference(x), equal_nan=True, **_tol(dtype))
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(nk.concat_elu_backward_numba(d, x), concat_elu_backward_reference(d, x),
                                       equal_nan=True, **_tol(dtype))
        g = np.concatenate([x, x], axis=-1)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(nk.gate_numba(g), gate_reference(g), equal_nan=True, **_tol(dtype))
            np.testing.assert_allclose(nk.gate_backward_numba(d[..., :x.shape[-1]], g),
                                       gate_backward_reference(d[..., :x.shape[-1]], g), equal_nan=True,
                                       **_tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", [2, 3])
def test_parallel_drivers_equal_the_serial_loops(dtype, parts):
    """Big arrays run the rows split over threads: the same numbers, bit for bit, as one serial pass
    (and as the reference), whatever the number of parts (an uneven split included)."""
    rng = np.random.default_rng(parts)
    N, C = 1001, 40
    x = (3 * rng.standard_normal((N, C))).astype(dtype)
    x2 = (3 * rng.standard_normal((N, 2 * C))).astype(dtype)
    d2 = rng.standard_normal((N, 2 * C)).astype(dtype)
    d1 = rng.standard_normal((N, C)).astype(dtype)
    cases = [(nk._concat_elu_fwd, nk._concat_elu_fwd_par, (x,), (N, 2 * C), concat_elu_reference(x)),
             (nk._concat_elu_bwd, nk._concat_elu_bwd_par, (d2, x), (N, C), concat_elu_backward_reference(d2, x)),
             (nk._gate_fwd, nk._gate_fwd_par, (x2,), (N, C), gate_reference(x2)),
             (nk._gate_bwd, nk._gate_bwd_par, (d1, x2), (N, 2 * C), gate_backward_reference(d1, x2))]
    for serial, parallel, args, shape, ref in cases:
        a, b = np.full(shape, np.nan, dtype), np.full(shape, np.nan, dtype)
        serial(*args, a, np.int64(0), np.int64(N))
        parallel(*args, b, np.int64(parts))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(b, ref, **(_tol(dtype) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-6)))
    assert x.size >= nk.PARALLEL_MIN_SIZE                     # what concat_elu_numba(x) runs in parallel
    ser = np.empty((N, 2 * C), dtype)
    nk._concat_elu_fwd(x, ser, np.int64(0), np.int64(N))
    np.testing.assert_array_equal(nk.concat_elu_numba(x), ser)


def test_dispatch_uses_kernel_only_when_enabled(monkeypatch):
    calls = []
    import flowpp_ref.nn.activations as act
    monkeypatch.setattr(act, "concat_elu_numba", lambda x: calls.append(1) or concat_elu_reference(x))
    x = np.ones((2, 3))
    with kernels_enabled(True):
        concat_elu(x)
    with kernels_enabled(False):
        concat_elu(x)
    assert calls == [1]


def test_activation_bad_input():
    with pytest.raises(FlowInputError, match="even"):
        gate_forward(np.zeros((2, 3)))
    with pytest.raises(FlowInputError, match="dout"):
        gate_backward(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(FlowInputError, match="dout"):
        concat_elu_backward(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(FlowInputError, match="floating"):
        concat_elu_forward(np.zeros((2, 3), np.int32))
    with pytest.raises(FlowInputError):
        concat_elu_forward(np.float64(1.0))


# ------------------------------------------------------------------ Dropout
def test_dropout_eval_is_deterministic_identity():
    x = np.random.default_rng(0).standard_normal((3, 4))
    d = Dropout(0.5)
    o1, c1 = d.forward(x)
    o2, _ = d.forward(x, train=False, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(o1, x)
    np.testing.assert_array_equal(o2, x)
    assert c1 is None
    dx, g = d.backward(np.ones_like(x), c1)
    np.testing.assert_array_equal(dx, 1.0)
    assert g == {}
    o3, c3 = Dropout(0.0).forward(x, train=True)              # p = 0: no rng needed
    np.testing.assert_array_equal(o3, x)


def test_dropout_train_mask_statistics():
    p = 0.3
    x = np.random.default_rng(0).uniform(1, 2, (200, 500))
    out, mask = Dropout(p).forward(x, train=True, rng=np.random.default_rng(42))
    n = x.size
    frac = 1 - mask.mean()
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / n), f"dropped fraction {frac:.4f}, expected {p}"
    np.testing.assert_array_equal(out[~mask], 0)
    np.testing.assert_allclose(out[mask], x[mask] / (1 - p), rtol=1e-15)


def test_dropout_same_seed_same_mask():
    x = np.ones((10, 20))
    d = Dropout(0.5)
    _, m1 = d.forward(x, train=True, rng=np.random.default_rng(7))
    _, m2 = d.forward(x, train=True, rng=np.random.default_rng(7))
    _, m3 = d.forward(x, train=True, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(m1, m2)
    assert (m1 != m3).any()


def test_dropout_gradcheck_fixed_mask():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 5))
    w = rng.standard_normal((4, 5))
    d = Dropout(0.4)
    _, mask = d.forward(x, train=True, rng=np.random.default_rng(11))
    dx, _ = d.backward(w, mask)
    f = lambda: float((d.forward(x, train=True, rng=np.random.default_rng(11))[0] * w).sum())  # noqa: E731
    gradcheck(f, {"x": x}, {"x": dx}, tol=GRAD_TOL)


def test_dropout_errors():
    with pytest.raises(ValueError, match="generator"):
        Dropout(0.2).forward(np.ones(3), train=True)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="probability"):
            Dropout(p)


# --------------------------------------------------------------- GatedResNet
def make_resnet(F=3, Ca=None, use_nin=True, p=0.0, seed=0, dtype=np.float64, randomize=True):
    rng = np.random.default_rng(seed)
    net = GatedResNet(F, Ca, use_nin=use_nin, dropout_p=p, rng=rng, dtype=dtype)
    if randomize:   # non-trivial g and b; bigger V so that the gate sees O(1) inputs
        for k, v in net.parameters().items():
            if k.endswith(".g"):
                net._set(k, rng.uniform(0.5, 1.5, v.shape).astype(dtype))
            elif k.endswith(".b"):
                net._set(k, rng.normal(0, 0.3, v.shape).astype(dtype))
    return net


CASES = {
    "plain": dict(Ca=None, use_nin=True, p=0.0),
    "context": dict(Ca=2, use_nin=True, p=0.0),
    "context_dropout": dict(Ca=2, use_nin=True, p=0.3),
    "conv_c2_dropout": dict(Ca=None, use_nin=False, p=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gated_resnet_gradcheck(case):
    cfg = CASES[case]
    net = make_resnet(**cfg)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 3))
    a = rng.standard_normal((2, 3, 4, cfg["Ca"])) if cfg["Ca"] else None
    train = cfg["p"] > 0
    out, cache = net.forward(x, a, train=train, rng=np.random.default_rng(5))
    if train:
        assert cache["mask"] is not None and not cache["mask"].all()
    w = rng.standard_normal(out.shape)
    dx, da, grads = net.backward(w, cache)
    params = net.parameters()
    assert set(grads) == set(params), f"{sorted(grads)} != {sorted(params)}"
    assert (da is None) == (a is None)

    def f():   # the same seed -> the same dropout mask at every evaluation
        return float((net.forward(x, a, train=train, rng=np.random.default_rng(5))[0] * w).sum())

    inputs, analytic = {"x": x, **params}, {"x": dx, **grads}
    if a is not None:
        inputs["a"], analytic["a"] = a, da
    gradcheck(f, inputs, analytic, tol=GRAD_TOL)


def test_gated_resnet_cache_holds_no_wide_inputs():
    net = make_resnet(Ca=2)
    x = np.ones((1, 2, 2, 3))
    _, cache = net.forward(x, np.ones((1, 2, 2, 2)))
    assert cache["c1_cache"]["x"] is None and cache["c2_cache"]["x"] is None and cache["ap_cache"]["x"] is None
    assert cache["x"] is x


@pytest.mark.parametrize("Ca", [None, 2])
def test_gated_resnet_data_init(Ca):
    net = make_resnet(F=4, Ca=Ca, p=0.2, randomize=False)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5, 4, 4)) * 2 + 1
    a = rng.standard_normal((6, 5, 4, Ca)) - 0.5 if Ca else None
    out = net.data_init(x, a)
    np.testing.assert_allclose(net.forward(x, a)[0], out, rtol=1e-12, atol=1e-12)

    def unit_stats(y, scale, name):
        np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-9, err_msg=f"{name} mean")
        np.testing.assert_allclose(y.std(axis=(0, 1, 2)), scale, rtol=1e-6, err_msg=f"{name} std")

    c1 = net.c1.forward(concat_elu(x))[0]
    unit_stats(c1, 1.0, "c1")
    if Ca:
        ap = net.a_proj.forward(concat_elu(a))[0]
        unit_stats(ap, 1.0, "a_proj")
        c1 = c1 + ap
    unit_stats(net.c2.forward(concat_elu(c1))[0], 0.1, "c2")


def test_gated_resnet_children_and_names():
    net = GatedResNet(4, 3, use_nin=False, rng=np.random.default_rng(0))
    p = net.parameters()
    assert p["c1.V"].shape == (3, 3, 8, 4)
    assert p["a_proj.V"].shape == (6, 4)
    assert p["c2.V"].shape == (3, 3, 8, 8)
    assert net.c2.init_scale == 0.1
    assert all(v.dtype == np.float32 for v in p.values())
    net2 = GatedResNet(4, rng=np.random.default_rng(0))
    assert net2.parameters()["c2.V"].shape == (8, 8) and "a_proj.V" not in net2.parameters()


def test_gated_resnet_bad_input():
    net = GatedResNet(3, 2, rng=np.random.default_rng(0))
    x, a = np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 4, 4, 2), np.float32)
    with pytest.raises(FlowInputError, match="4-d"):
        net.forward(x[0], a)
    with pytest.raises(FlowInputError, match="channels"):
        net.forward(np.zeros((2, 4, 4, 5), np.float32), a)
    with pytest.raises(FlowInputError, match="required"):
        net.forward(x)
    with pytest.raises(FlowInputError, match="must agree"):
        net.forward(x, a[:, :3])
    with pytest.raises(FlowInputError, match="context_channels"):
        net.forward(x, np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(FlowInputError, match="without a context"):
        GatedResNet(3, rng=np.random.default_rng(0)).forward(x, a)
    _, cache = net.forward(x, a)
    with pytest.raises(FlowInputError, match="dout"):
        net.backward(np.zeros((2, 4, 4, 2), np.float32), cache)
    with pytest.raises(ValueError, match="generator"):
        GatedResNet(3, dropout_p=0.5, rng=np.random.default_rng(0)).forward(x, train=True)


def test_gated_resnet_backend_matches_numpy(xp):
    """Same block on the ``xp`` backend and on NumPy, fixed host mask (the cupy case runs only with a GPU)."""
    from flowpp_ref.core.backend import asarray
    ref = make_resnet(Ca=2, p=0.3, seed=3)
    dev = make_resnet(Ca=2, p=0.3, seed=3)
    dev.load_parameters({k: asarray(v, xp, np.float64) for k, v in ref.parameters().items()})
    rng = np.random.default_rng(4)
    x, a, w = rng.standard_normal((2, 3, 4, 3)), rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 3, 4, 3))
    o1, c1 = ref.forward(x, a, train=True, rng=np.random.default_rng(9))

    class HostDraws:   # replays the host generator's uniforms on the device (cuRAND streams differ)
        def random(self, shape):
            return asarray(np.random.default_rng(9).random(shape), xp)

    o2, c2 = dev.forward(asarray(x, xp, np.float64), asarray(a, xp, np.float64), train=True, rng=HostDraws())
    assert rel_error(o1, to_numpy(o2)) < 1e-12
    dx1, da1, g1 = ref.backward(w, c1)
    dx2, da2, g2 = dev.backward(asarray(w, xp, np.float64), c2)
    assert rel_error(dx1, to_numpy(dx2)) < 1e-12 and rel_error(da1, to_numpy(da2)) < 1e-12
    for k in g1:
        assert rel_error(g1[k], to_numpy(g2[k])) < 1e-12, k


# ------------------------------------------------------ PyTorch cross-check
def _torch():
    return pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")


def t_weight_norm(torch, V, g):
    return V * (g / torch.sqrt((V * V).sum(dim=tuple(range(V.ndim - 1)))))


def t_conv2d(torch, x, V, g, b):
    W = t_weight_norm(torch, V, g)
    y = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), W.permute(3, 2, 0, 1), padding="same")
    return y.permute(0, 2, 3, 1) + b


def t_nin(torch, x, V, g, b):
    return x @ t_weight_norm(torch, V, g) + b


def t_concat_elu(torch, x):
    return torch.nn.functional.elu(torch.cat([x, -x], dim=-1))


def t_gate(torch, x):
    h1, h2 = x.chunk(2, dim=-1)
    return h1 * torch.sigmoid(h2)


def t_gated_resnet(torch, x, a, P, mask, p, use_nin):
    c1 = t_conv2d(torch, t_concat_elu(torch, x), P["c1.V"], P["c1.g"], P["c1.b"])
    if a is not None:
        c1 = c1 + t_nin(torch, t_concat_elu(torch, a), P["a_proj.V"], P["a_proj.g"], P["a_proj.b"])
    r = t_concat_elu(torch, c1)
    if mask is not None:
        r = r * mask / (1 - p)
    c2 = (t_nin if use_nin else t_conv2d)(torch, r, P["c2.V"], P["c2.g"], P["c2.b"])
    return x + t_gate(torch, c2)


def assert_close_named(name, mine, theirs, tol=1e-5):
    mine, theirs = to_numpy(mine), theirs.detach().numpy()
    err = rel_error(mine, theirs)
    assert err < tol, (f"{name}: rel. error {err:.2e} vs PyTorch, max |difference| "
                       f"{np.max(np.abs(mine - theirs)):.3e}")


@pytest.mark.torch
@pytest.mark.parametrize("which", ["concat_elu", "gate"])
def test_activations_match_torch(which):
    torch = _torch()
    rng = np.random.default_rng(6)
    x = away_from_zero(rng, (2, 3, 4, 6))
    fwd, bwd, twin = ((concat_elu_forward, concat_elu_backward, t_concat_elu) if which == "concat_elu"
                      else (gate_forward, gate_backward, t_gate))
    out, cache = fwd(x)
    w = rng.standard_normal(out.shape)
    dx = bwd(w, cache)
    tx = torch.tensor(x, requires_grad=True)
    tout = twin(torch, tx)
    (tout * torch.tensor(w)).sum().backward()
    assert_close_named(f"{which} out", out, tout)
    assert_close_named(f"{which} dx", dx, tx.grad)


@pytest.mark.torch
@pytest.mark.parametrize("case", list(CASES))
def test_gated_resnet_matches_torch(case):
    torch = _torch()
    cfg = CASES[case]
    net = make_resnet(F=4, **cfg, seed=7)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 4, 4))
    a = rng.standard_normal((2, 5, 4, cfg["Ca"])) if cfg["Ca"] else None
    out, cache = net.forward(x, a, train=cfg["p"] > 0, rng=np.random.default_rng(9))
    w = rng.standard_normal(out.shape)
    dx, da, grads = net.backward(w, cache)

    tx = torch.tensor(x, requires_grad=True)
    ta = torch.tensor(a, requires_grad=True) if a is not None else None
    tP = {k: torch.tensor(v, requires_grad=True) for k, v in net.parameters().items()}
    tmask = torch.tensor(cache["mask"], dtype=torch.float64) if cache["mask"] is not None else None
    tout = t_gated_resnet(torch, tx, ta, tP, tmask, cfg["p"], cfg["use_nin"])
    (tout * torch.tensor(w)).sum().backward()
    assert_close_named("out", out, tout)
    assert_close_named("dx", dx, tx.grad)
    if a is not None:
        assert_close_named("da", da, ta.grad)
    for k in tP:
        assert_close_named(f"d[{k}]", grads[k], tP[k].grad)
