"""The device path's draws, optimiser, data and convolution on the strict CuPy look-alike (tests/strict_cupy.py).

* the same seed gives the same model on NumPy and on the device: initial parameters, the training
  loop's data-dependent init (host draws, ``step_rng``), and the noise of a NumPy ``Generator``, which a
  device model adapts at its door (``rng_for``); a CuPy generator handed to a NumPy model is refused;
* the fused optimiser step (training/fused.py) is at most 10 launches and no host round trip, and equals
  NumPy's result;
* ``train(backend="cupy")`` keeps the training set on the device: a step copies indices up, not images;
* the convolution on the device: im2col one kernel, dx = col2im(dout W^T); equal to NumPy's in float64.
"""
from __future__ import annotations

import numpy as np
import pytest

from flowpp_ref.core.backend import make_rng, rng_for
from flowpp_ref.model import FlowPP
from flowpp_ref.model.presets import get_preset
from flowpp_ref.training import loop
from flowpp_ref.training.fused import FusedUpdate
from flowpp_ref.training.optim import EMA, Adam

MAX_OPTIMISER_LAUNCHES = 10


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.uint8)


def test_same_seed_same_model_init_and_noise_on_numpy_and_device(strict_xp):
    cp = strict_xp
    p = get_preset("tiny")
    x = _images(8, p.model.image_shape, 1)
    got = {}
    for xp in (np, cp):
        m = FlowPP(p.model, seed=0, xp=xp, dtype=np.float64)
        init = {k: cp.asnumpy(v) if xp is cp else v.copy() for k, v in m.parameters().items()}
        m.data_init(x, rng=loop.step_rng(0, -1, xp))
        ddi = {k: cp.asnumpy(v) if xp is cp else v for k, v in m.parameters().items()}
        loss, _ = m.loss(x[:4], rng=np.random.default_rng(5), train=True)     # dropout and noise from the host
        got[xp] = init, ddi, float(loss), m.bits_per_dim(x[:4], rng=np.random.default_rng(6))
    (i0, d0, l0, b0), (i1, d1, l1, b1) = got[np], got[cp]
    for k in i0:
        np.testing.assert_array_equal(i1[k], i0[k], err_msg=k)
        np.testing.assert_allclose(d1[k], d0[k], rtol=1e-12, atol=1e-14, err_msg=k)
    assert l1 == pytest.approx(l0, rel=1e-12)
    np.testing.assert_allclose(b1, b0, rtol=1e-12)


def test_generators_at_the_door(strict_xp):
    cp = strict_xp
    g = np.random.default_rng(0)
    adapted = rng_for(g, cp)
    assert adapted is not g and isinstance(adapted.standard_normal((2, 3), dtype=np.float32), cp.ndarray)
    assert rng_for(g, np) is g
    dev = make_rng(0, cp)
    assert rng_for(dev, cp) is dev
    with pytest.raises(TypeError, match="CuPy random Generator was given to a model on NumPy"):
        rng_for(dev, np)
    p = get_preset("tiny")
    m = FlowPP(p.model, seed=0, xp=np, dtype=np.float32)
    with pytest.raises(TypeError, match="model on NumPy"):
        m.loss(_images(2, p.model.image_shape), rng=dev)


@pytest.mark.parametrize("rule", ["adam", "adamax"])
def test_fused_optimiser_on_the_device_launches_at_most_10_kernels(rule, strict_xp):
    cp, ledger = strict_xp, strict_xp.ledger
    p = get_preset("small")
    out = {}
    for xp in (np, cp):
        m = FlowPP(p.model, seed=0, xp=xp, dtype=np.float64)
        opt = (Adam if rule == "adam" else __import__("flowpp_ref.training.optim", fromlist=["Adamax"]).Adamax)(
            m.parameters(), beta2=0.99)
        fu = FusedUpdate(m, opt, EMA(m.parameters(), decay=0.9))
        r = np.random.default_rng(3)
        grads = [{k: xp.asarray(r.normal(size=v.shape) * s) for k, v in m.parameters().items()} for s in (0.01, 5.0)]
        loss = xp.asarray(1.0)
        for i, g in enumerate(grads):
            ledger.reset()
            with ledger.strict():
                gn, ok = fu.step(g, loss, 1e-3 * (i + 1), 1.0)
            if xp is cp:
                assert ledger.n_launches <= MAX_OPTIMISER_LAUNCHES, ledger.launches
                assert ledger.n_syncs == 0 and ledger.n_h2d == 0
        out[xp] = [cp.asnumpy(a) if xp is cp else a for a in (fu.p, fu.m, fu.v, fu.s)], float(gn), float(ok)
    for a, b in zip(out[cp][0], out[np][0]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert out[cp][1:] == pytest.approx(out[np][1:], rel=1e-12)
    print(f"fused optimiser step of small ({len(grads[0])} parameter arrays), {rule}: {ledger.n_launches} launches")


def test_training_set_stays_on_the_device(strict_xp, tmp_path, monkeypatch):
    cp, ledger = strict_xp, strict_xp.ledger
    x = _images(64, (4, 4, 3))
    kinds, take = [], loop.take
    monkeypatch.setattr(loop, "take", lambda images, idx: (kinds.append(type(images)), take(images, idx))[1])
    s = loop.train("tiny", x, out_dir=str(tmp_path / "run"), steps=3, progress=False, backend="cupy",
                   overrides={"batch_size": 16}, report=lambda msg: None)
    assert s["steps_run"] == 3
    assert len(kinds) >= 5 and set(kinds) == {cp.ndarray}            # init batch, check batch, 3 steps
    # one more step by hand: the H2D bytes of a step are the batch's indices and image ids, not its pixels
    run_images = cp.asarray(x)
    ledger.reset()
    with ledger.strict():
        loop.shard_loss_and_grads(s["model"], run_images, loop.batch_indices(64, 16, 0, 3), seed=0, step=3,
                                  comm=loop.dist.SingleComm())
    assert 0 < ledger.h2d_bytes <= 16 * 8 * 2, ledger.h2d


@pytest.mark.parametrize("kernel_size", [3, (2, 3), 1])
def test_convolution_on_the_device_launches_few_kernels_and_equals_numpy(kernel_size, strict_xp):
    from flowpp_ref.nn.weightnorm import Conv2d
    cp, ledger = strict_xp, strict_xp.ledger
    r = np.random.default_rng(2)
    x, dout = r.normal(size=(2, 5, 4, 6)), r.normal(size=(2, 5, 4, 8))
    res = {}
    for xp in (np, cp):
        conv = Conv2d(6, 8, kernel_size, rng=np.random.default_rng(0), xp=xp, dtype=np.float64)
        xd, dd = xp.asarray(x), xp.asarray(dout)
        ledger.reset()
        with ledger.strict():
            out, cache = conv.forward(xd)
            n_fwd = ledger.n_launches
            dx, grads = conv.backward(dd, cache)
        res[xp] = [cp.asnumpy(a) if xp is cp else a for a in (out, dx, grads["V"], grads["g"], grads["b"])]
        if xp is cp:
            kinds = {k for k in ledger.launches if k.startswith("kernel:")}
            assert {"kernel:im2col_f64", "kernel:col2im_f64"} <= kinds, ledger.launches
            assert n_fwd <= 12 and ledger.n_launches <= 40, ledger.launches     # the slice path: ~60
    for a, b in zip(res[cp], res[np]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
