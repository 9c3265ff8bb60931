"""The whole model: finite-difference check of the full gradient, sampling, bad input."""
import numpy as np
import pytest

from flowpp_ref.core.backend import make_rng
from flowpp_ref.core.gradcheck import gradcheck
from flowpp_ref.model import FlowPP
from flowpp_ref.model.presets import get_preset
from flowpp_ref.core.validation import FlowInputError


def tiny_model(dtype=np.float64, **ov):
    p = get_preset("tiny", **ov)
    return FlowPP(p.model, seed=3, dtype=dtype), p


def tiny_images(n=4, seed=0, levels=256):
    r = np.random.default_rng(seed)
    # smooth-ish images so that the init batch statistics are not degenerate
    base = r.integers(0, levels, size=(n, 1, 1, 3))
    noise = r.integers(-20, 21, size=(n, 4, 4, 3))
    return np.clip(base + noise, 0, levels - 1).astype(np.uint8)


@pytest.mark.parametrize("ov", [
    dict(),                                          # Flow++: variational dequantization, mixture coupling
    dict(dequantization="uniform"),
    dict(coupling="affine", use_attention=False),
    dict(n_bits=5),
], ids=["flowpp", "uniform-dequant", "affine-noattn", "5bit"])
def test_whole_model_gradient_matches_finite_differences(ov):
    model, p = tiny_model(**ov)
    levels = 2 ** p.model.n_bits
    x = tiny_images(levels=levels)
    model.data_init(tiny_images(8, seed=1, levels=levels), rng=make_rng(0))
    seed = 11

    def f():
        loss, _ = model.loss(x, rng=make_rng(seed), train=True)   # same noise every call
        return float(loss)

    loss, grads = model.loss_and_grads(x, rng=make_rng(seed), train=True)
    assert abs(float(loss) - f()) < 1e-12
    params = model.parameters()
    assert set(grads) == set(params), sorted(set(params) ^ set(grads))[:5]
    # check a spread of tensors: every kind of parameter of the main flow and of the dequantizer
    names = sorted(params)
    pick = names[:: max(1, len(names) // 25)]
    rep = gradcheck(f, {k: params[k] for k in pick}, {k: grads[k] for k in pick}, max_entries=40,
                    n_directions=3, h=1e-5)
    assert rep.ok(1e-5), str(rep)


def test_sampling_gives_uint8_images_of_the_right_shape():
    model, p = tiny_model(np.float32)
    model.data_init(tiny_images(8), rng=make_rng(0))
    imgs, dt = model.sample(5, rng=make_rng(1), temperature=0.7, return_time=True)
    assert imgs.shape == (5, 4, 4, 3) and imgs.dtype == np.uint8
    assert dt > 0
    assert imgs.std() > 0


def test_sample_inverse_is_the_inverse_without_log_dets():
    """model.sample runs flow.sample_inverse (no mixture evaluation for the log-dets): the same x
    as flow.inverse, bit for bit (the coupling's own: test_coupling_layer.py)."""
    model, p = tiny_model(np.float64)
    model.data_init(tiny_images(8), rng=make_rng(0))
    z = make_rng(3).standard_normal((3, *model.latent_shape))
    y, ld = model.flow.inverse(z, None)
    assert np.all(np.isfinite(ld))
    np.testing.assert_array_equal(model.flow.sample_inverse(z, None), y)
    img_a = model.sample(4, rng=make_rng(5))
    zz = make_rng(5).standard_normal((4, *model.latent_shape))
    y2, _ = model.flow.inverse(zz, None)
    img_b = (np.clip(np.floor(y2), 0, model.levels - 1) * (256 // model.levels)).astype(np.uint8)
    np.testing.assert_array_equal(img_a, img_b)


def test_ablation_switches_change_the_architecture():
    full, _ = tiny_model(np.float32)
    unif, _ = tiny_model(np.float32, dequantization="uniform")
    noattn, _ = tiny_model(np.float32, use_attention=False)
    assert full.num_parameters() > unif.num_parameters()
    assert full.num_parameters() > noattn.num_parameters()
    assert not any("dequant" in k for k in unif.parameters())


def test_bad_images_raise_clear_errors():
    model, _ = tiny_model(np.float32)
    with pytest.raises(FlowInputError, match="shape"):
        model.loss(np.zeros((2, 8, 8, 3), np.uint8), rng=make_rng(0))
    bad = tiny_images().astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(FlowInputError, match="non-finite"):
        model.loss(bad, rng=make_rng(0))
    model5, _ = tiny_model(np.float32, n_bits=5)
    with pytest.raises(FlowInputError, match=r"\[0, 31\]"):
        model5.loss(tiny_images(), rng=make_rng(0))
    neg = tiny_images().astype(np.int16)
    neg[1, 2, 3, 0] = -1
    with pytest.raises(FlowInputError, match=r"\[0, 255\].*min -1"):
        model.loss(neg, rng=make_rng(0))


def test_non_finite_dequantization_reaches_the_loss_instead_of_raising_mid_step():
    """The pixels are checked once, in prepare (on the host); the main flow's ImgProc does not
    check x + u again (no device syncs), so a diverged dequantizer gives a non-finite loss
    that the training loop can skip."""
    model, _ = tiny_model(np.float32)
    assert model.flow.flows[0].check_input is False
    model.data_init(tiny_images(8, seed=1), rng=make_rng(0))
    model.parameters()["dequant.context.proj.b"][...] = np.nan    # the dequantizer's context network
    with np.errstate(invalid="ignore"):                           # nan flows through on purpose
        loss, _ = model.loss(tiny_images(), rng=make_rng(0))
    assert not np.isfinite(float(loss))


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 1e-3)], ids=["float64", "float32"])
def test_invertibility_whole_main_flow(dtype, tol):
    """y -> z -> y through all of the main flow, and the two log-dets cancel."""
    model, _ = tiny_model(dtype)
    model.data_init(tiny_images(8, seed=1), rng=make_rng(0))
    y = tiny_images().astype(dtype) + np.random.default_rng(2).random((4, 4, 4, 3)).astype(dtype)
    z, logdet, _ = model.flow.forward(y)
    y2, logdet_inv = model.flow.inverse(z)
    np.testing.assert_allclose(y2, y, atol=tol)
    np.testing.assert_allclose(logdet + logdet_inv, 0, atol=tol * 10)
