"""Tests of BatchNormFlow (RealNVP sec. 3.7 batch normalization as a bijection).

* ``test_invertibility_*``: evaluation-mode round trips (running statistics), float64 to 1e-10,
  ``logdet + logdet_inv == 0``, ``inverse_with_cache`` == ``inverse``;
* training-mode forward normalises each channel of the batch, with RealNVP's log-det;
* training-mode backward (through the batch statistics and the log-det's var) vs finite
  differences in float64, with and without the affine part; evaluation-mode backward and
  inverse_backward likewise;
* evaluation-mode log-det vs the log|det| of the finite-difference Jacobian;
* running statistics: momentum update in training forward only, in place, finite-guarded,
  zero gradients that Adam turns into a zero update, carried by a checkpoint;
* PyTorch autograd cross-check of the training-mode loss gradient (``torch`` marker);
* bad input raises FlowInputError (and bad constructor arguments ValueError).
"""
from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from conftest import TOL
from hypothesis import given
from hypothesis import strategies as st

from flowpp_ref.bijections.batchnorm import BatchNormFlow
from flowpp_ref.core.gradcheck import gradcheck, random_scalar_loss
from flowpp_ref.core.validation import FlowInputError

GRAD_TOL = TOL[np.float64]["grad"]


def make_bn(C, rng, *, dtype=np.float64, affine=True, eps=1e-4, momentum=0.9):
    """A BatchNormFlow with non-trivial parameters and running statistics."""
    b = BatchNormFlow(C, dtype=dtype, affine=affine, eps=eps, momentum=momentum)
    if affine:
        b.params["log_gamma"] = rng.uniform(-0.7, 0.7, C).astype(dtype)
        b.params["beta"] = rng.standard_normal(C).astype(dtype)
    b.params["running_mean"] = rng.standard_normal(C).astype(dtype)
    b.params["running_var"] = rng.uniform(0.3, 3.0, C).astype(dtype)
    return b


def rand_x(rng, shape, dtype=np.float64):
    """Inputs with per-channel offsets and scales (so the statistics are not trivial)."""
    C = shape[-1]
    return np.ascontiguousarray((rng.standard_normal(shape) * rng.uniform(0.5, 2.0, C)
                                 + rng.uniform(-2, 2, C)).astype(dtype))


shapes = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]), st.integers(1, 3))


# ---------------------------------------------------------------- round trips (evaluation mode)
@pytest.mark.parametrize("affine", [True, False])
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_invertibility_eval_forward_then_inverse(affine, shape, seed, data):
    b = make_bn(shape[-1], np.random.default_rng(seed), affine=affine)
    x = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-5, 5, allow_nan=False)), label="x")
    y, ld, _ = b.forward(x, train=False)
    assert y.shape == x.shape and y.dtype == np.float64 and ld.shape == (shape[0],)
    x2, ld_inv = b.inverse(y)
    x3, ld_inv3, _ = b.inverse_with_cache(y)
    np.testing.assert_allclose(x2, x, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(x3, x2)
    np.testing.assert_array_equal(ld_inv3, ld_inv)
    np.testing.assert_allclose(ld + ld_inv, 0.0, atol=1e-10)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_invertibility_eval_inverse_then_forward(shape, seed, data):
    b = make_bn(shape[-1], np.random.default_rng(seed))
    y = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-5, 5, allow_nan=False)), label="y")
    x, ld_inv = b.inverse(y)
    y2, ld, _ = b.forward(x)
    np.testing.assert_allclose(y2, y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ld + ld_inv, 0.0, atol=1e-10)


def test_invertibility_float32():
    rng = np.random.default_rng(3)
    b = make_bn(3, rng, dtype=np.float32)
    x = rand_x(rng, (4, 3, 3, 3), np.float32)
    y, ld, _ = b.forward(x)
    x2, ld_inv = b.inverse(y)
    assert y.dtype == np.float32 and ld.dtype == np.float32 and x2.dtype == np.float32
    np.testing.assert_allclose(x2, x, atol=TOL[np.float32]["roundtrip"])
    np.testing.assert_allclose(ld + ld_inv, 0.0, atol=TOL[np.float32]["logdet"])


# ---------------------------------------------------------------- training-mode forward
def test_train_forward_normalises_each_channel():
    rng = np.random.default_rng(0)
    x = rand_x(rng, (5, 3, 4, 3))
    eps = 1e-4
    b = BatchNormFlow(3, dtype=np.float64, eps=eps)          # log_gamma = 0, beta = 0
    y, ld, _ = b.forward(x, train=True)
    var = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), var / (var + eps), rtol=1e-12)   # = 1 up to eps
    # RealNVP's log-det: H W sum_c -0.5 log(var_c + eps), the same for every sample
    np.testing.assert_allclose(ld, np.full(5, -0.5 * 12 * np.log(var + eps).sum()), rtol=1e-12)
    # with eps -> 0 the channels have unit variance
    y0, _, _ = BatchNormFlow(3, dtype=np.float64, eps=1e-300).forward(x, train=True)
    np.testing.assert_allclose(y0.var(axis=(0, 1, 2)), 1.0, rtol=1e-12)
    # with the affine part: y = xhat exp(log_gamma) + beta
    b2 = make_bn(3, rng)
    y2, ld2, _ = b2.forward(x, train=True)
    np.testing.assert_allclose(y2, y * np.exp(b2.params["log_gamma"]) + b2.params["beta"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld2, ld + 12 * b2.params["log_gamma"].sum(), rtol=1e-12)


# ---------------------------------------------------------------- backward vs finite differences
def _gradcheck_forward(b, x, train, seed=0):
    y, ld, cache = b.forward(x, train=train)
    loss_fn, wy, wl = random_scalar_loss(y, ld, seed=seed)
    dx, dctx, grads = b.backward(wy, wl, cache)
    assert dctx is None and set(grads) == set(b.params)
    for k in ("running_mean", "running_var"):
        assert not np.any(grads[k]), k

    def f():
        yy, ll, _ = b.forward(x, train=train)
        return loss_fn(yy, ll)

    inputs = {"x": x}
    analytic = {"x": dx}
    if b.affine:
        inputs.update(log_gamma=b.params["log_gamma"], beta=b.params["beta"])
        analytic.update(log_gamma=grads["log_gamma"], beta=grads["beta"])
    return gradcheck(f, inputs, analytic, tol=GRAD_TOL)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (2, 1, 3, 3), (4, 1, 1, 2)])
def test_train_backward_gradcheck(affine, shape):
    rng = np.random.default_rng(sum(shape))
    b = make_bn(shape[-1], rng, affine=affine)
    _gradcheck_forward(b, rand_x(rng, shape), train=True)


def test_train_backward_logdet_term_alone():
    """Only dL/dlogdet non-zero: the gradient comes from the log-det's dependence on var alone."""
    rng = np.random.default_rng(7)
    b = make_bn(2, rng)
    x = rand_x(rng, (3, 2, 2, 2))
    _, _, cache = b.forward(x, train=True)
    v = rng.standard_normal(3)
    dx, _, grads = b.backward(np.zeros_like(x), v, cache)
    assert np.abs(dx).max() > 1e-3          # not zero: the batch variance depends on x
    np.testing.assert_allclose(grads["log_gamma"], 4 * v.sum())

    def f():
        return float((b.forward(x, train=True)[1] * v).sum())

    gradcheck(f, {"x": x}, {"x": dx}, tol=GRAD_TOL)


@pytest.mark.parametrize("affine", [True, False])
def test_eval_backward_gradcheck(affine):
    rng = np.random.default_rng(11)
    b = make_bn(3, rng, affine=affine)
    _gradcheck_forward(b, rand_x(rng, (2, 2, 2, 3)), train=False)


def test_inverse_backward_gradcheck():
    rng = np.random.default_rng(12)
    b = make_bn(3, rng)
    y = rand_x(rng, (2, 2, 2, 3))
    x, ld, cache = b.inverse_with_cache(y)
    loss_fn, wx, wl = random_scalar_loss(x, ld, seed=1)
    dy, dctx, grads = b.inverse_backward(wx, wl, cache)
    assert dctx is None and not np.any(grads["running_mean"]) and not np.any(grads["running_var"])

    def f():
        xx, ll, _ = b.inverse_with_cache(y)
        return loss_fn(xx, ll)

    gradcheck(f, {"y": y, "log_gamma": b.params["log_gamma"], "beta": b.params["beta"]},
              {"y": dy, "log_gamma": grads["log_gamma"], "beta": grads["beta"]}, tol=GRAD_TOL)


# ---------------------------------------------------------------- evaluation-mode log-det
def test_eval_logdet_matches_numerical_jacobian():
    rng = np.random.default_rng(5)
    shape = (2, 2, 1, 3)
    b = make_bn(3, rng)
    x = rand_x(rng, shape)
    _, ld, _ = b.forward(x)
    h = 1e-6
    D = int(np.prod(shape[1:]))
    for s in range(shape[0]):
        J = np.zeros((D, D))
        for i in range(D):
            e = np.zeros(D)
            e[i] = h
            xp_, xm_ = x.copy(), x.copy()
            xp_[s] += e.reshape(shape[1:])
            xm_[s] -= e.reshape(shape[1:])
            J[:, i] = (b.forward(xp_)[0][s] - b.forward(xm_)[0][s]).reshape(-1) / (2 * h)
        sign, logabs = np.linalg.slogdet(J)
        assert sign > 0
        np.testing.assert_allclose(ld[s], logabs, rtol=0, atol=TOL[np.float64]["logdet"])


# ---------------------------------------------------------------- running statistics
def test_running_averages_momentum_and_eval_untouched():
    rng = np.random.default_rng(9)
    m = 0.8
    b = make_bn(3, rng, momentum=m)
    rm, rv = b.params["running_mean"], b.params["running_var"]
    rm0, rv0 = rm.copy(), rv.copy()
    x = rand_x(rng, (4, 2, 3, 3))
    # evaluation forward, inverse, backward, inverse_backward: untouched
    y, ld, c = b.forward(x, train=False)
    b.backward(y, ld, c)
    xi, ldi, ci = b.inverse_with_cache(x)
    b.inverse_backward(xi, ldi, ci)
    b.inverse(x)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    # training forward: running <- m running + (1 - m) batch (population variance), in place
    _, _, c_t = b.forward(x, train=True)
    assert b.params["running_mean"] is rm and b.params["running_var"] is rv
    np.testing.assert_allclose(rm, m * rm0 + (1 - m) * x.mean(axis=(0, 1, 2)), rtol=1e-14)
    np.testing.assert_allclose(rv, m * rv0 + (1 - m) * x.var(axis=(0, 1, 2)), rtol=1e-14)
    # ... and backward does not move them again
    rm1, rv1 = rm.copy(), rv.copy()
    b.backward(np.ones_like(x), np.ones(4), c_t)
    np.testing.assert_array_equal(rm, rm1)
    np.testing.assert_array_equal(rv, rv1)
    # repeated training steps on the same batch converge to its statistics
    for _ in range(200):
        b.forward(x, train=True)
    np.testing.assert_allclose(rm, x.mean(axis=(0, 1, 2)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rv, x.var(axis=(0, 1, 2)), rtol=1e-9)
    # a non-finite channel leaves that channel's running statistics unchanged
    xbad = x.copy()
    xbad[0, 0, 0, 1] = np.nan
    rm2, rv2 = rm.copy(), rv.copy()
    b.forward(xbad, train=True)
    assert np.all(np.isfinite(rm)) and np.all(np.isfinite(rv))
    np.testing.assert_array_equal(rm[1], rm2[1])
    np.testing.assert_array_equal(rv[1], rv2[1])


def test_running_statistics_survive_adam_and_checkpoint(tmp_path):
    from flowpp_ref.runtime.checkpoint import load_checkpoint, save_checkpoint
    from flowpp_ref.training.optim import Adam
    rng = np.random.default_rng(4)
    b = make_bn(2, rng, dtype=np.float32)
    x = rand_x(rng, (4, 2, 2, 2), np.float32)
    params = b.parameters()
    assert set(params) == {"log_gamma", "beta", "running_mean", "running_var"}
    adam = Adam(params)
    for _ in range(3):
        y, ld, cache = b.forward(x, train=True)
        rm, rv, lg = (params[k].copy() for k in ("running_mean", "running_var", "log_gamma"))
        _, _, grads = b.backward(np.ones_like(y), np.ones_like(ld), cache)
        adam.step(params, grads, 1e-2)
        np.testing.assert_array_equal(params["running_mean"], rm)     # zero gradient -> zero update
        np.testing.assert_array_equal(params["running_var"], rv)
        assert np.any(params["log_gamma"] != lg)
    assert b.params["running_mean"] is params["running_mean"]
    path = save_checkpoint(tmp_path / "ck.npz", params=b.parameters(), ema=None, optimizer_state=adam.state_dict(),
                           step=3, rng_state=None, config={})
    b2 = BatchNormFlow(2)
    b2.load_parameters(load_checkpoint(path)["params"])
    for k, v in b.parameters().items():
        np.testing.assert_array_equal(b2.params[k], v)
    np.testing.assert_array_equal(b2.forward(x)[0], b.forward(x)[0])


def test_data_init_sets_running_statistics():
    rng = np.random.default_rng(8)
    b = make_bn(3, rng)
    x = rand_x(rng, (4, 2, 2, 3))
    y = b.data_init(x)
    np.testing.assert_allclose(b.params["running_mean"], x.mean(axis=(0, 1, 2)), rtol=1e-14)
    np.testing.assert_allclose(b.params["running_var"], x.var(axis=(0, 1, 2)), rtol=1e-14)
    np.testing.assert_allclose(y, b.forward(x, train=True)[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- PyTorch cross-check
@pytest.mark.torch
@pytest.mark.parametrize("affine", [True, False])
def test_torch_train_loss_gradient(affine):
    torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle of the cross-checks")
    rng = np.random.default_rng(21)
    eps = 1e-4
    b = make_bn(3, rng, affine=affine, eps=eps)
    x = rand_x(rng, (3, 2, 3, 3))
    y, ld, cache = b.forward(x, train=True)
    wy = rng.standard_normal(y.shape)
    wl = rng.standard_normal(ld.shape)
    dx, _, grads = b.backward(wy, wl, cache)

    tx = torch.tensor(x, requires_grad=True)
    mu = tx.mean(dim=(0, 1, 2))
    var = tx.var(dim=(0, 1, 2), unbiased=False)
    xhat = (tx - mu) / torch.sqrt(var + eps)
    H, W = x.shape[1:3]
    logdet_c = -0.5 * torch.log(var + eps)
    leaves = [tx]
    if affine:
        tlg = torch.tensor(b.params["log_gamma"], requires_grad=True)
        tbeta = torch.tensor(b.params["beta"], requires_grad=True)
        ty = xhat * torch.exp(tlg) + tbeta
        logdet_c = logdet_c + tlg
        leaves += [tlg, tbeta]
    else:
        ty = xhat
    tld = H * W * logdet_c.sum() * torch.ones(x.shape[0], dtype=torch.float64)
    loss = (ty * torch.tensor(wy)).sum() + (tld * torch.tensor(wl)).sum()
    loss.backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld, tld.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    if affine:
        np.testing.assert_allclose(grads["log_gamma"], tlg.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads["beta"], tbeta.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises():
    b = BatchNormFlow(3, dtype=np.float64)
    good = np.zeros((2, 2, 2, 3))
    cases = [
        (lambda: b.forward(np.zeros((2, 2, 3))), "4-d"),
        (lambda: b.forward(np.zeros((2, 2, 2, 4))), "3 channels"),
        (lambda: b.forward(np.zeros((2, 2, 2, 3), dtype=np.int64)), "floating"),
        (lambda: b.forward((good, good)), "tuple"),
        (lambda: b.forward(np.zeros((1, 1, 1, 3)), train=True), "B\\*H\\*W >= 2"),
        (lambda: b.forward(np.zeros((0, 2, 2, 3))), "empty"),
        (lambda: b.inverse(np.zeros((2, 2, 2, 2))), "3 channels"),
        (lambda: b.data_init(np.full((2, 2, 2, 3), np.nan)), "non-finite"),
        (lambda: b.forward([[1.0]]), "array"),
    ]
    for call, msg in cases:
        with pytest.raises(FlowInputError, match=msg):
            call()
    b.forward(np.zeros((1, 1, 1, 3)))      # evaluation mode takes a single value per channel
    for kwargs in ({"channels": 0}, {"channels": 2.0}, {"channels": 2, "momentum": 1.0},
                   {"channels": 2, "eps": 0.0}):
        with pytest.raises(ValueError):
            BatchNormFlow(**kwargs)


# ---------------------------------------------------------------- backends
def test_backend_matches_numpy(xp):
    """Training forward/backward, the running update and the inverse on the backend ``xp`` (CuPy on a GPU)
    agree with NumPy in float64."""
    from flowpp_ref.core.backend import asarray, to_numpy
    rng = np.random.default_rng(31)
    ref = make_bn(3, rng)
    dev = BatchNormFlow(3, dtype=np.float64, xp=xp)
    dev.load_parameters({k: asarray(v, xp) for k, v in ref.parameters().items()})
    x = rand_x(rng, (3, 2, 2, 3))
    wy, wl = rng.standard_normal(x.shape), rng.standard_normal(3)
    for train in (True, False):
        y, ld, c = ref.forward(x, train=train)
        dx, _, g = ref.backward(wy, wl, c)
        yd, ldd, cd = dev.forward(asarray(x, xp), train=train)
        dxd, _, gd = dev.backward(asarray(wy, xp), asarray(wl, xp), cd)
        for a, b_ in [(y, yd), (ld, ldd), (dx, dxd)] + [(g[k], gd[k]) for k in g]:
            np.testing.assert_allclose(to_numpy(b_), a, rtol=1e-12, atol=1e-12)
        for k, v in ref.parameters().items():
            np.testing.assert_allclose(to_numpy(dev.params[k]), v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(dev.inverse(asarray(x, xp))[0]), ref.inverse(x)[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- data parallelism: synchronised statistics
class _ThreadComm:
    """Two (or more) threads as the processes of a data-parallel run: allreduce sums in place."""

    def __init__(self, rank, shared):
        self.rank, self.size, self._shared = rank, shared["size"], shared

    def allreduce(self, buf):
        sh = self._shared
        sh["slots"][self.rank] = buf.copy()
        sh["barrier"].wait()
        total = sum(sh["slots"])
        sh["barrier"].wait()                    # everyone has read the slots before they are reused
        buf[...] = total


def test_synced_batch_statistics_equal_the_one_process_step():
    """Two shards with comm set: forward outputs, log-dets, dL/dx, parameter gradients (summed over the
    shards) and the running statistics equal those of one process on the whole batch."""
    import threading
    rng = np.random.default_rng(40)
    C = 3
    x = rng.standard_normal((6, 3, 2, C)) * 2 + 1
    dy, dld = rng.standard_normal(x.shape), rng.standard_normal(6)
    ref = BatchNormFlow(C, dtype=np.float64)
    ref.params["log_gamma"][...] = [0.2, -0.1, 0.3]
    y, ld, cache = ref.forward(x, train=True)
    dx, _, g = ref.backward(dy, dld, cache)

    shared = {"size": 2, "slots": [None, None], "barrier": threading.Barrier(2)}
    out = [None, None]
    layers = []
    for r in range(2):
        bn = BatchNormFlow(C, dtype=np.float64)
        bn.params["log_gamma"][...] = [0.2, -0.1, 0.3]
        bn.comm = _ThreadComm(r, shared)
        layers.append(bn)

    def run(r):
        sl = slice(3 * r, 3 * r + 3)
        yr, ldr, cr = layers[r].forward(x[sl], train=True)
        out[r] = (yr, ldr, *layers[r].backward(dy[sl], dld[sl], cr))
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), y, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([o[1] for o in out]), ld, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([o[2] for o in out]), dx, atol=1e-12)
    for k in ("log_gamma", "beta"):
        np.testing.assert_allclose(out[0][4][k] + out[1][4][k], g[k], atol=1e-12)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(layers[0].params[k], ref.params[k], atol=1e-12)
        np.testing.assert_array_equal(layers[0].params[k], layers[1].params[k])
    # without the communicator the shards' statistics differ from the whole batch's
    alone = BatchNormFlow(C, dtype=np.float64)
    alone.params["log_gamma"][...] = [0.2, -0.1, 0.3]
    assert np.abs(alone.forward(x[:3], train=True)[0] - y[:3]).max() > 1e-3
