"""Tests of FactorOut (the multi-scale factor-out of RealNVP sec. 3.6 / Glow sec. 3.4).

* ``log p(z2 | z1)`` against scipy's normal log-pdf with mu/logs from a direct convolution;
* ``backward`` against finite differences (float64) for x and every parameter, with the
  prior's convolution set to random weights (at zero init its gradient path is trivial);
* ``test_invertibility_*``: exact reconstruction given the kept z2 (float64 1e-12) and
  forward(inverse(y)) for a sampled z2, with ``logdet + logdet_inv == 0``;
* the zero-initialised prior is N(0, I) exactly; samples at temperature T have mean mu and
  standard deviation T exp(logs) (within several standard errors, fixed seed);
* a one-layer Compose: log N(z1) + logdet equals the hand-computed total;
* PyTorch autograd cross-check (marked ``torch``); bad inputs raise FlowInputError.
"""
from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from conftest import TOL
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import norm

from flowpp_ref.bijections.base import Compose
from flowpp_ref.bijections.factor_out import FactorOut, ZeroConv2d
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss
from flowpp_ref.core.validation import FlowInputError
from flowpp_ref.model.objective import standard_normal_logprob

PRIORS = [pytest.param(True, id="learned"), pytest.param(False, id="standard")]


def _factor_out(C, learned, dtype=np.float64, seed=0, scale=0.3):
    """A FactorOut whose prior convolution has random weights and bias (not the zero init)."""
    f = FactorOut(C, learned_prior=learned, rng=np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for k, v in f.parameters().items():
        f._set(k, (scale * rng.standard_normal(v.shape)).astype(dtype))
    return f


def _direct_conv(x, W, b):
    """out[b,h,w,o] = sum_{i,j,c} xpad[b, h+i, w+j, c] W[i,j,c,o] + b[o] (3x3, zero padding 1)."""
    B, H, Wd, _ = x.shape
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((B, H, Wd, W.shape[3])) + b
    for i in range(3):
        for j in range(3):
            out += np.einsum("bhwc,co->bhwo", xpad[:, i:i + H, j:j + Wd, :], W[i, j])
    return out


def _mu_logs(f, z1):
    if not f.learned_prior:
        return np.zeros_like(z1), np.zeros_like(z1)
    p = f.parameters()
    h = _direct_conv(z1, p["prior.W"], p["prior.b"]) * np.exp(3.0 * p["prior.logs"])   # Glow's conv2d_zeros
    return h[..., 0::2], h[..., 1::2]


# ---------------------------------------------------------------- log-density
@pytest.mark.parametrize("learned", PRIORS)
def test_logprob_matches_scipy(learned):
    f = _factor_out(4, learned, seed=1)
    x = np.random.default_rng(2).standard_normal((3, 4, 5, 4))
    y, ld, cache = f.forward(x)
    np.testing.assert_array_equal(y, x[..., :2])
    np.testing.assert_array_equal(cache["z2"], x[..., 2:])
    mu, logs = _mu_logs(f, x[..., :2])
    want = norm.logpdf(x[..., 2:], loc=mu, scale=np.exp(logs)).reshape(3, -1).sum(axis=1)
    np.testing.assert_allclose(ld, want, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(f.log_prob(x[..., :2], x[..., 2:]), want, rtol=1e-12, atol=1e-10)


def test_zero_init_prior_is_standard_normal():
    f = FactorOut(6, rng=np.random.default_rng(0), dtype=np.float64)
    assert set(f.parameters()) == {"prior.W", "prior.b", "prior.logs"}
    assert all(not np.any(v) for v in f.parameters().values())
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 6))
    _, ld, cache = f.forward(x)
    assert np.all(cache["mu"] == 0) and np.all(cache["logs"] == 0)
    np.testing.assert_allclose(ld, standard_normal_logprob(x[..., 3:]), rtol=1e-14, atol=0)
    # RealNVP's prior: the same density, no parameters
    g = FactorOut(6, learned_prior=False, rng=0, dtype=np.float64)
    assert g.parameters() == {}
    np.testing.assert_allclose(g.forward(x)[1], ld, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- derivatives
@pytest.mark.parametrize("learned", PRIORS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_input_and_params(learned, seed):
    f = _factor_out(4, learned, seed=seed)
    x = np.random.default_rng(seed + 10).standard_normal((2, 3, 3, 4))
    y, ld, cache = f.forward(x)
    loss_fn, dy, dld = random_scalar_loss(y, ld, seed=seed)
    dx, dctx, grads = f.backward(dy, dld, cache)
    assert dctx is None and dx.shape == x.shape
    assert set(grads) == set(f.parameters())
    inputs = {"x": x, **f.parameters()}
    analytic = {"x": dx, **grads}
    gradcheck(lambda: loss_fn(*f.forward(x)[:2]), inputs, analytic, tol=TOL[np.float64]["grad"])


def test_zero_conv_gradcheck_rectangular_kernel():
    """The plain convolution alone (random weights, a 3x2 kernel: asymmetric SAME padding)."""
    rng = np.random.default_rng(4)
    c = ZeroConv2d(3, 2, (3, 2), dtype=np.float64)
    for k, v in c.params.items():
        c.params[k] = rng.standard_normal(v.shape)
    x = rng.standard_normal((2, 4, 3, 3))
    w = rng.standard_normal((2, 4, 3, 2))
    _, cache = c.forward(x)
    dx, grads = c.backward(w, cache)
    gradcheck(lambda: float((c.forward(x)[0] * w).sum()), {"x": x, **c.params}, {"x": dx, **grads},
              tol=TOL[np.float64]["grad"])


# ---------------------------------------------------------------- invertibility
@pytest.mark.parametrize("learned", PRIORS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@given(data=st.data())
def test_invertibility_given_z2(learned, dtype, data):
    B = data.draw(st.integers(1, 3), label="B")
    H = data.draw(st.integers(1, 4), label="H")
    W = data.draw(st.integers(1, 4), label="W")
    C = 2 * data.draw(st.integers(1, 3), label="C/2")
    x = data.draw(hnp.arrays(dtype, (B, H, W, C), elements=st.floats(-3, 3, width=32)), label="x")
    f = _factor_out(C, learned, dtype=dtype, seed=data.draw(st.integers(0, 50), label="seed"))
    y, ld, cache = f.forward(x)
    xr, ld_inv = f.inverse(y, z2=cache["z2"])
    assert xr.dtype == dtype and ld.dtype == dtype and y.shape == (B, H, W, C // 2)
    np.testing.assert_array_equal(xr, x)          # a concatenation: exact
    tol = 1e-12 if dtype == np.float64 else TOL[np.float32]["logdet"]
    np.testing.assert_allclose(ld + ld_inv, 0, atol=tol * max(1.0, float(np.abs(ld).max())))
    np.testing.assert_allclose(f.sample_inverse(y, z2=cache["z2"]), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("learned", PRIORS)
@given(seed=st.integers(0, 10 ** 6), T=st.sampled_from([0.0, 0.5, 1.0]))
def test_invertibility_sampled_inverse_then_forward(learned, seed, T):
    f = _factor_out(4, learned, seed=seed % 97)
    y = np.random.default_rng(seed).standard_normal((2, 3, 2, 2))
    x, ld_inv = f.inverse(y, rng=np.random.default_rng(seed + 1), temperature=T)
    y2, ld, _ = f.forward(x)
    np.testing.assert_allclose(y2, y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ld + ld_inv, 0, atol=1e-12 * max(1.0, float(np.abs(ld).max())))
    # the same draw through sample_inverse
    xs = f.sample_inverse(y, rng=np.random.default_rng(seed + 1), temperature=T)
    np.testing.assert_allclose(xs, x, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("T", [0.3, 1.0, 1.7])
def test_samples_at_temperature_have_expected_mean_and_std(T):
    """Bias-only prior: every z2 entry ~ N(mu_c, (T exp(logs_c))^2) with per-channel mu_c, logs_c."""
    f = FactorOut(4, rng=0, dtype=np.float64)
    f.prior.params["b"] = np.array([0.5, -0.4, -1.0, 0.7])      # mu = (0.5, -1.0), logs = (-0.4, 0.7)
    mu, sd = np.array([0.5, -1.0]), T * np.exp([-0.4, 0.7])
    y = np.random.default_rng(1).standard_normal((500, 4, 4, 2))
    z2 = f.sample_inverse(y, rng=np.random.default_rng(2), temperature=T)[..., 2:]
    n = z2.size // 2
    m = z2.reshape(-1, 2).mean(axis=0)
    s = z2.reshape(-1, 2).std(axis=0)
    assert np.all(np.abs(m - mu) < 5 * sd / math.sqrt(n)), (m, mu)
    assert np.all(np.abs(s - sd) < 5 * sd / math.sqrt(2 * n)), (s, sd)


def test_samples_with_conv_prior_are_standardised_by_mu_and_scale():
    f = _factor_out(4, True, seed=3, scale=0.5)
    T = 0.8
    y = np.random.default_rng(5).standard_normal((400, 3, 3, 2))
    x = f.inverse(y, rng=np.random.default_rng(6), temperature=T)[0]
    mu, logs = _mu_logs(f, y)
    e = ((x[..., 2:] - mu) / (T * np.exp(logs))).ravel()
    assert abs(e.mean()) < 5 / math.sqrt(e.size)
    assert abs(e.std() - 1) < 5 / math.sqrt(2 * e.size)
    # T = 0: the mean exactly; the given eps is used as is
    np.testing.assert_allclose(f.sample_inverse(y, temperature=0.0)[..., 2:], mu, rtol=0, atol=1e-12)
    eps = np.random.default_rng(7).standard_normal(y.shape)
    np.testing.assert_allclose(f.sample_inverse(y, eps=eps, temperature=T)[..., 2:],
                               mu + T * np.exp(logs) * eps, rtol=0, atol=1e-12)


def test_default_sampling_generator_and_temperature():
    """Inside a Compose no rng is passed: self.sample_rng (seeded by the constructor) and self.temperature."""
    y = np.random.default_rng(0).standard_normal((2, 2, 2, 3))
    a = Compose([FactorOut(6, rng=np.random.default_rng(9), dtype=np.float64)])
    b = Compose([FactorOut(6, rng=np.random.default_rng(9), dtype=np.float64)])
    np.testing.assert_array_equal(a.sample_inverse(y), b.sample_inverse(y))
    assert not np.array_equal(a.sample_inverse(y), b.flows[0].sample_inverse(y, rng=np.random.default_rng(1)))
    a.flows[0].temperature = 0.0
    np.testing.assert_array_equal(a.sample_inverse(y)[..., 3:], 0.0)
    _, ld_inv = a.inverse(y)
    np.testing.assert_allclose(ld_inv, -standard_normal_logprob(np.zeros_like(y)), rtol=1e-14)


def test_float32_parameters_and_outputs():
    f = FactorOut(4, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
    y, ld, cache = f.forward(x)
    assert f.parameters()["prior.W"].dtype == np.float32
    assert y.dtype == ld.dtype == np.float32
    dx, _, grads = f.backward(np.ones_like(y), np.ones_like(ld), cache)
    assert dx.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    assert f.sample_inverse(y).dtype == np.float32


def test_backend_matches_numpy(xp):
    """forward, backward, exact inverse and sampling on the backend ``xp`` against NumPy."""
    from flowpp_ref.core.backend import asarray, make_rng, to_numpy
    ref = _factor_out(4, True, seed=14)
    f = FactorOut(4, rng=0, xp=xp, dtype=np.float64)
    f.load_parameters({k: asarray(v, xp) for k, v in ref.parameters().items()})
    x = np.random.default_rng(15).standard_normal((2, 3, 4, 4))
    y, ld, cache = f.forward(asarray(x, xp))
    ry, rld, rcache = ref.forward(x)
    np.testing.assert_allclose(to_numpy(ld), rld, rtol=1e-12)
    dy = np.random.default_rng(16).standard_normal(ry.shape)
    dx, _, grads = f.backward(asarray(dy, xp), asarray(np.ones(2), xp), cache)
    rdx, _, rgrads = ref.backward(dy, np.ones(2), rcache)
    np.testing.assert_allclose(to_numpy(dx), rdx, rtol=1e-10, atol=1e-12)
    for k, g in rgrads.items():
        np.testing.assert_allclose(to_numpy(grads[k]), g, rtol=1e-10, atol=1e-12, err_msg=k)
    np.testing.assert_array_equal(to_numpy(f.inverse(y, z2=cache["z2"])[0]), x)
    s = f.sample_inverse(y, rng=make_rng(3, xp), temperature=0.5)
    assert type(s) is type(y) and s.shape == x.shape and s.dtype == y.dtype
    assert type(f.sample_inverse(y)) is type(y)                      # the default generator is on xp


# ---------------------------------------------------------------- Compose
@pytest.mark.parametrize("learned", PRIORS)
def test_compose_total_log_likelihood(learned):
    f = _factor_out(4, learned, seed=8)
    flow = Compose([f])
    x = np.random.default_rng(9).standard_normal((3, 2, 4, 4))
    z1, logdet, caches = flow.forward(x)
    total = standard_normal_logprob(z1) + logdet
    mu, logs = _mu_logs(f, x[..., :2])
    z2 = x[..., 2:]
    by_hand = (-0.5 * (x[..., :2] ** 2 + math.log(2 * math.pi))).reshape(3, -1).sum(1) + \
        (-0.5 * math.log(2 * math.pi) - logs - 0.5 * ((z2 - mu) * np.exp(-logs)) ** 2).reshape(3, -1).sum(1)
    np.testing.assert_allclose(total, by_hand, rtol=1e-12, atol=1e-10)
    # the gradient of the total log-likelihood through Compose.backward
    dx, _, grads = flow.backward(-z1, np.ones(3), caches)
    assert set(grads) == set(flow.parameters())
    gradcheck(lambda: float((standard_normal_logprob(flow.forward(x)[0]) + flow.forward(x)[1]).sum()),
              {"x": x, **flow.parameters()}, {"x": dx, **grads}, tol=TOL[np.float64]["grad"])


# ---------------------------------------------------------------- PyTorch
@pytest.mark.torch
@pytest.mark.parametrize("learned", PRIORS)
def test_matches_torch_autograd(learned):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
    f = _factor_out(4, learned, seed=11)
    x = np.random.default_rng(12).standard_normal((2, 4, 3, 4))
    rng = np.random.default_rng(13)
    params = {k: v.copy() for k, v in f.parameters().items()}
    tx = torch.tensor(x, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    z1, z2 = tx[..., :2], tx[..., 2:]
    if learned:
        h = torch.nn.functional.conv2d(z1.permute(0, 3, 1, 2), tp["prior.W"].permute(3, 2, 0, 1),
                                       tp["prior.b"], padding=1).permute(0, 2, 3, 1) * torch.exp(3.0 * tp["prior.logs"])
        mu, logs = h[..., 0::2], h[..., 1::2]
    else:
        mu, logs = torch.zeros_like(z2), torch.zeros_like(z2)
    tld = (-0.5 * math.log(2 * math.pi) - logs - 0.5 * ((z2 - mu) * torch.exp(-logs)) ** 2).sum(dim=(1, 2, 3))
    wy, wl = rng.standard_normal(tuple(z1.shape)), rng.standard_normal(2)
    ((z1 * torch.tensor(wy)).sum() + (tld * torch.tensor(wl)).sum()).backward()
    y, ld, cache = f.forward(x)
    np.testing.assert_allclose(y, z1.detach().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(ld, tld.detach().numpy(), rtol=1e-12, atol=1e-12)
    dx, _, grads = f.backward(wy, wl, cache)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    assert set(grads) == set(tp)
    for k, t in tp.items():
        np.testing.assert_allclose(grads[k], t.grad.numpy(), rtol=1e-10, atol=1e-10, err_msg=k)


# ---------------------------------------------------------------- bad input
def _f():
    return FactorOut(4, rng=0, dtype=np.float64)


BAD_INPUTS = [
    ("odd-C", lambda: _f().forward(np.zeros((1, 2, 2, 5))), r"expected 4 channels.*\(1, 2, 2, 5\).*even"),
    ("wrong-C", lambda: _f().forward(np.zeros((1, 2, 2, 6))), r"expected 4 channels"),
    ("rank-3", lambda: _f().forward(np.zeros((2, 2, 4))), r"4-d array"),
    ("integer", lambda: _f().forward(np.zeros((1, 2, 2, 4), dtype=np.int32)), r"floating-point"),
    ("tuple", lambda: _f().forward((np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 2)))), r"tuple"),
    ("inverse-C", lambda: _f().inverse(np.zeros((1, 2, 2, 4))), r"expected 2 channels"),
    ("z2-shape", lambda: _f().inverse(np.zeros((1, 2, 2, 2)), z2=np.zeros((2, 2, 2, 2))), r"z2 has shape"),
    ("eps-shape", lambda: _f().sample_inverse(np.zeros((1, 2, 2, 2)), eps=np.zeros((1, 3, 2, 2))), r"eps has"),
    ("odd-channels", lambda: FactorOut(3, rng=0), r"must be even"),
]


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m in BAD_INPUTS])
def test_bad_input_raises(call, match):
    with pytest.raises(FlowInputError, match=match):
        call()


@pytest.mark.parametrize("call, exc", [
    pytest.param(lambda: FactorOut(4, rng=None), TypeError, id="no-rng"),
    pytest.param(lambda: FactorOut(0, rng=0), ValueError, id="zero-channels"),
    pytest.param(lambda: _f().sample_inverse(np.zeros((1, 2, 2, 2)), temperature=-1.0), ValueError,
                 id="negative-temperature"),
])
def test_bad_arguments_raise(call, exc):
    with pytest.raises(exc):
        call()
