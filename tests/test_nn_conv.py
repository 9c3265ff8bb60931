"""Weight-normalised Conv2d and NIN (flowpp_ref.nn.weightnorm): forward against a naive
convolution, every backward against finite differences (float64), the paper's
data-dependent init, bad-input errors, and a PyTorch autograd cross-check."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowpp_ref.core.backend import to_numpy
from flowpp_ref.core.gradcheck import gradcheck, rel_error
from flowpp_ref.nn import NIN, Conv2d, weight_norm, weight_norm_backward
from flowpp_ref.nn.weightnorm import im2col
from flowpp_ref.core.validation import FlowInputError

GRAD_TOL = 1e-6


# ----------------------------------------------------------------- helpers
def naive_conv_same(x, W, b):
    """Direct NHWC "SAME" stride-1 convolution (TF padding: the smaller half before)."""
    kh, kw = W.shape[:2]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xpad = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    B, H, Wd, _ = x.shape
    out = np.zeros((B, H, Wd, W.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("bhwc,co->bhwo", xpad[:, i:i + H, j:j + Wd, :], W[i, j])
    return out + b


def randomize(layer, rng):
    """Non-trivial g and b (construction gives g=1, b=0), so their gradients are exercised."""
    for k in ("g", "b"):
        p = layer.params[k]
        layer.params[k] = rng.uniform(0.5, 1.5, size=p.shape).astype(p.dtype) if k == "g" else \
            rng.normal(0, 0.3, size=p.shape).astype(p.dtype)


def check_layer_grads(layer, x, seed=0):
    """Random linear loss L = sum(w * layer(x)); gradcheck x and every parameter."""
    rng = np.random.default_rng(seed)
    out, cache = layer.forward(x)
    w = rng.standard_normal(out.shape)
    dx, grads = layer.backward(w, cache)
    assert set(grads) == set(layer.params), f"gradient keys {sorted(grads)} != params {sorted(layer.params)}"

    def f():
        return float((layer.forward(x)[0] * w).sum())

    return gradcheck(f, {"x": x, **layer.params}, {"x": dx, **grads}, tol=GRAD_TOL)


# ------------------------------------------------------------ weight norm
def test_weight_norm_unit_norm_and_gradient():
    rng = np.random.default_rng(0)
    V = rng.standard_normal((3, 2, 4, 5))
    g = rng.uniform(0.5, 2, 5)
    W, n = weight_norm(V, g)
    np.testing.assert_allclose(np.sqrt((W ** 2).sum(axis=(0, 1, 2))), np.abs(g), rtol=1e-12)
    dW = rng.standard_normal(W.shape)
    dV, dg = weight_norm_backward(dW, V, g, n)
    gradcheck(lambda: float((weight_norm(V, g)[0] * dW).sum()), {"V": V, "g": g}, {"V": dV, "g": dg},
              tol=GRAD_TOL)


# ----------------------------------------------------------------- Conv2d
def test_im2col_matches_padded_slices():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 3))
    cols = im2col(x, 3, 3)
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(cols[:, :, :, i, j, :], xpad[:, i:i + 4, j:j + 5, :])


@given(B=st.integers(1, 2), H=st.integers(1, 5), W=st.integers(1, 5), cin=st.integers(1, 3),
       cout=st.integers(1, 3), k=st.sampled_from([1, 2, 3, (3, 1), (2, 3)]), seed=st.integers(0, 2 ** 16))
def test_conv2d_forward_matches_naive_convolution(B, H, W, cin, cout, k, seed):
    rng = np.random.default_rng(seed)
    conv = Conv2d(cin, cout, k, rng=rng, dtype=np.float64)
    randomize(conv, rng)
    x = rng.standard_normal((B, H, W, cin))
    out, _ = conv.forward(x)
    Wn, _ = weight_norm(conv.params["V"], conv.params["g"])
    np.testing.assert_allclose(out, naive_conv_same(x, Wn, conv.params["b"]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, (1, 3)])
def test_conv2d_gradcheck(k):
    rng = np.random.default_rng(2)
    conv = Conv2d(3, 4, k, rng=rng, dtype=np.float64)
    randomize(conv, rng)
    check_layer_grads(conv, rng.standard_normal((2, 4, 5, 3)))


@given(H=st.integers(1, 4), W=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_conv2d_gradcheck_shapes(H, W, seed):
    rng = np.random.default_rng(seed)
    conv = Conv2d(2, 3, 3, rng=rng, dtype=np.float64)
    randomize(conv, rng)
    check_layer_grads(conv, rng.standard_normal((2, H, W, 2)), seed=seed)


@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_conv2d_data_init_normalises_each_unit(init_scale):
    rng = np.random.default_rng(3)
    conv = Conv2d(3, 5, 3, init_scale=init_scale, rng=rng, dtype=np.float64)
    x = rng.standard_normal((8, 6, 5, 3)) * 2 + 0.5
    out = conv.data_init(x)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), init_scale, rtol=1e-6)
    np.testing.assert_allclose(conv.forward(x)[0], out, rtol=1e-12, atol=1e-12)


def test_data_init_keeps_dtype_and_is_the_paper_update():
    rng = np.random.default_rng(4)
    conv = Conv2d(3, 4, 3, init_scale=0.5, rng=rng)             # float32
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
    g0, b0 = conv.params["g"].copy(), conv.params["b"].copy()
    pre = conv.forward(x)[0].astype(np.float64)
    conv.data_init(x)
    m, v = pre.mean(axis=(0, 1, 2)), pre.var(axis=(0, 1, 2))
    scale = 0.5 / np.sqrt(v + 1e-8)
    assert conv.params["g"].dtype == np.float32 and conv.params["b"].dtype == np.float32
    np.testing.assert_allclose(conv.params["g"], g0 * scale, rtol=1e-4)
    np.testing.assert_allclose(conv.params["b"], b0 - m * scale, rtol=1e-4, atol=1e-5)


def test_conv2d_bad_input():
    conv = Conv2d(3, 4, rng=np.random.default_rng(0))
    with pytest.raises(FlowInputError, match="4-d"):
        conv.forward(np.zeros((2, 4, 3), np.float32))
    with pytest.raises(FlowInputError, match="input channels"):
        conv.forward(np.zeros((2, 4, 4, 5), np.float32))
    with pytest.raises(FlowInputError, match="floating"):
        conv.forward(np.zeros((2, 4, 4, 3), np.int64))
    out, cache = conv.forward(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(FlowInputError, match="dout"):
        conv.backward(np.zeros((2, 4, 4, 3), np.float32), cache)
    with pytest.raises(TypeError, match="rng"):
        Conv2d(3, 4, rng=None)


def test_conv2d_init_distribution_and_names():
    conv = Conv2d(16, 32, 3, rng=np.random.default_rng(0))
    p = conv.parameters()
    assert sorted(p) == ["V", "b", "g"]
    assert p["V"].shape == (3, 3, 16, 32) and p["V"].dtype == np.float32
    assert abs(float(p["V"].std()) - 0.05) < 0.005 and abs(float(p["V"].mean())) < 0.005
    np.testing.assert_array_equal(p["g"], 1)
    np.testing.assert_array_equal(p["b"], 0)


# -------------------------------------------------------------------- NIN
@pytest.mark.parametrize("shape", [(7, 3), (2, 3, 3), (2, 3, 2, 3)])
def test_nin_gradcheck_any_rank(shape):
    rng = np.random.default_rng(5)
    nin = NIN(3, 4, rng=rng, dtype=np.float64)
    randomize(nin, rng)
    x = rng.standard_normal(shape)
    out, _ = nin.forward(x)
    Wn, _ = weight_norm(nin.params["V"], nin.params["g"])
    np.testing.assert_allclose(out, x @ Wn + nin.params["b"], rtol=1e-12)
    assert out.shape == shape[:-1] + (4,)
    check_layer_grads(nin, x)


@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_nin_data_init_normalises_each_unit(init_scale):
    rng = np.random.default_rng(6)
    nin = NIN(4, 6, init_scale=init_scale, rng=rng, dtype=np.float64)
    x = rng.standard_normal((5, 4, 3, 4)) * 3 - 1
    out = nin.data_init(x)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), init_scale, rtol=1e-6)


def test_nin_bad_input():
    nin = NIN(3, 4, rng=np.random.default_rng(0))
    with pytest.raises(FlowInputError, match="channels"):
        nin.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(FlowInputError):
        nin.forward(np.float32(1.0))
    out, cache = nin.forward(np.zeros((2, 3), np.float32))
    with pytest.raises(FlowInputError, match="dout"):
        nin.backward(np.zeros((2, 3), np.float32), cache)


def test_backward_without_cached_input_is_an_error():
    nin = NIN(3, 4, rng=np.random.default_rng(0))
    _, cache = nin.forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="cache"):
        nin.backward(np.ones((2, 4), np.float32), {**cache, "x": None})


# ------------------------------------------------------- backends (GPU)
def test_conv2d_backend_matches_numpy(xp):
    """Same layer on the ``xp`` backend and on NumPy (the cupy case runs only with a GPU)."""
    from flowpp_ref.core.backend import asarray
    rng = np.random.default_rng(7)
    ref = Conv2d(3, 4, rng=np.random.default_rng(1), dtype=np.float64)
    dev = Conv2d(3, 4, rng=np.random.default_rng(1), xp=xp, dtype=np.float64)
    x = rng.standard_normal((2, 5, 4, 3))
    d = rng.standard_normal((2, 5, 4, 4))
    o1, c1 = ref.forward(x)
    o2, c2 = dev.forward(asarray(x, xp, np.float64))
    dx1, g1 = ref.backward(d, c1)
    dx2, g2 = dev.backward(asarray(d, xp, np.float64), c2)
    assert rel_error(o1, to_numpy(o2)) < 1e-12 and rel_error(dx1, to_numpy(dx2)) < 1e-12
    for k in g1:
        assert rel_error(g1[k], to_numpy(g2[k])) < 1e-12, k


# ------------------------------------------------------ PyTorch cross-check
def _torch():
    return pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")


def t_weight_norm(torch, V, g):
    n = torch.sqrt((V * V).sum(dim=tuple(range(V.ndim - 1))))
    return V * (g / n)


def t_conv2d(torch, x, V, g, b):
    """Functional twin: weight norm by hand, then torch's conv2d ('same', NCHW)."""
    W = t_weight_norm(torch, V, g)                               # [kh,kw,Cin,Cout]
    y = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), W.permute(3, 2, 0, 1), padding="same")
    return y.permute(0, 2, 3, 1) + b


def t_nin(torch, x, V, g, b):
    return x @ t_weight_norm(torch, V, g) + b


def assert_close_named(name, mine, theirs, tol=1e-5):
    mine, theirs = to_numpy(mine), theirs.detach().numpy()
    err = rel_error(mine, theirs)
    assert err < tol, (f"{name}: rel. error {err:.2e} vs PyTorch, max |difference| "
                       f"{np.max(np.abs(mine - theirs)):.3e}")


def torch_check_layer(torch, layer, twin, x, seed=0):
    rng = np.random.default_rng(seed)
    out, cache = layer.forward(x)
    w = rng.standard_normal(out.shape)
    dx, grads = layer.backward(w, cache)
    tx = torch.tensor(x, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in layer.params.items()}
    tout = twin(torch, tx, tp["V"], tp["g"], tp["b"])
    (tout * torch.tensor(w)).sum().backward()
    assert_close_named("out", out, tout)
    assert_close_named("dx", dx, tx.grad)
    for k in layer.params:
        assert_close_named(f"d{k}", grads[k], tp[k].grad)


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("k", [1, 2, 3])
def test_conv2d_matches_torch(k):
    torch = _torch()
    rng = np.random.default_rng(8)
    conv = Conv2d(4, 5, k, rng=rng, dtype=np.float64)
    randomize(conv, rng)
    torch_check_layer(torch, conv, t_conv2d, rng.standard_normal((3, 6, 5, 4)))


@pytest.mark.torch
def test_nin_matches_torch():
    torch = _torch()
    rng = np.random.default_rng(9)
    nin = NIN(4, 6, rng=rng, dtype=np.float64)
    randomize(nin, rng)
    torch_check_layer(torch, nin, t_nin, rng.standard_normal((3, 4, 5, 4)))


def test_conv2d_refuses_a_generator_without_normal():
    """Parameters are drawn on the host: a CuPy-like Generator (no normal()) is refused by name, not crashed on."""
    from flowpp_ref.nn.weightnorm import Conv2d

    class DeviceLikeGenerator:          # cupy.random.Generator has random/standard_normal but no normal
        def standard_normal(self, size=None, dtype=None):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="normal"):
        Conv2d(3, 4, 3, rng=DeviceLikeGenerator())
