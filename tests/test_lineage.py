"""Tests of the lineage models (flowpp_ref.model.lineage): RealNVP and Glow.

* the whole tiny RealNVP / Glow: invertibility (forward then the exact inverse, the factored halves
  given back), log-det against the full Jacobian of the map x -> (every factored half, top latent)
  by central differences (float64, evaluation mode), the loss gradient against finite differences;
* the presets: layouts, parameter counts printed by the docstrings, validation of bad configs;
* on real images (the embedded CIFAR-10 subset): train, resume (bit-identical to an uninterrupted run),
  exact round trip, sampling at a temperature (T = 0 is deterministic);
* Adamax (Glow's optimiser) on its first step.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL

from flowpp_ref.bijections import BatchNormFlow, FactorOut, LearnedTopPrior, MaskedAffineCoupling, exact_inverse
from flowpp_ref.core.gradcheck import gradcheck
from flowpp_ref.datasets import load_default_dataset
from flowpp_ref.model.lineage import Glow, RealNVP, model_class
from flowpp_ref.model.presets import ModelConfig, get_preset
from flowpp_ref.training.evaluation import inverse_error
from flowpp_ref.training.loop import build_model, train
from flowpp_ref.training.optim import Adamax

FAMILIES = ["realnvp", "glow"]


def tiny_cfg(family, **kw):
    base = dict(image_shape=(4, 4, 3), family=family, levels=2, depth=2, filters=4, blocks=1, coupling="affine",
                dequantization="uniform", dropout_p=0.0)
    base.update(kw)
    return ModelConfig(**base)


def images(n, seed=0, shape=(4, 4, 3)):
    r = np.random.default_rng(seed)
    base = r.integers(40, 200, size=(n, 1, 1, shape[2]))
    return np.clip(base + r.integers(-40, 41, size=(n, *shape)), 0, 255).astype(np.uint8)


def tiny_model(family, seed=0, **kw):
    """A float64 tiny model after the data-dependent init, its zero-initialised parts set off zero."""
    cfg = tiny_cfg(family, **kw)
    m = model_class(cfg)(cfg, seed=seed, dtype=np.float64)
    m.data_init(images(16, seed + 1), rng=np.random.default_rng(seed + 2))
    r = np.random.default_rng(seed + 3)
    for k, v in m.parameters().items():
        if "zero_conv" in k or "prior" in k or k.endswith(("scale",)):
            m._set(k, (v + 0.2 * r.standard_normal(v.shape)).astype(v.dtype))
        elif k.endswith(("running_var",)):
            m._set(k, v * (0.7 + 0.6 * r.random(v.shape)))
    for f in m.flow.flows:                                 # the top prior (b, logs) off zero too
        if isinstance(f, LearnedTopPrior):
            for k in f.params:
                f.params[k] = 0.2 * r.standard_normal(f.params[k].shape)
    return m


def dequantized(m, n, seed):
    x = m.prepare(images(n, seed))
    return x + np.random.default_rng(seed).random(x.shape)


# ---------------------------------------------------------------- the whole flow
@pytest.mark.parametrize("family", FAMILIES)
def test_invertibility_of_the_whole_tiny_model(family):
    m = tiny_model(family, seed=4)
    y = dequantized(m, 5, 5)
    z, ld, caches = m.flow.forward(y, None, train=False)
    assert z.shape == (5, *m.latent_shape)
    np.testing.assert_allclose(exact_inverse(m.flow, z, caches), y, atol=1e-9)
    # without the factored halves, the inverse draws them: not a reconstruction
    assert np.abs(m.flow.inverse(z, None)[0] - y).max() > 1e-3


def _full_latent(m, y):
    """The map y -> concat(every factored-out half, top latent) per sample (a bijection), and
    sum_k log p(z2_k | z1_k) of the factored halves."""
    z, ld, caches = m.flow.forward(y, None, train=False)
    parts, logp = [], 0.0
    for f, c in zip(m.flow.flows, caches):
        if isinstance(f, FactorOut):
            parts.append(c["z2"].reshape(len(y), -1))
            logp = logp + f.log_prob(c["z1"], c["z2"])
    parts.append(z.reshape(len(y), -1))
    return np.concatenate(parts, axis=1), ld, logp


@pytest.mark.parametrize("family", FAMILIES)
def test_logdet_of_the_whole_tiny_model_matches_the_full_jacobian(family):
    """logdet(model) = log|det d(latents)/dy| + sum_k log p(z2_k | z1_k): the factor-outs fold their
    priors into the log-det; the rest is the Jacobian of the whole bijection."""
    m = tiny_model(family, seed=6)
    y = dequantized(m, 1, 7)
    v, ld, logp = _full_latent(m, y)
    D = y.size
    assert v.shape == (1, D)
    h = 1e-5
    J = np.empty((D, D))
    for i in range(D):
        e = np.zeros(D)
        e[i] = h
        vp = _full_latent(m, y + e.reshape(y.shape))[0]
        vm = _full_latent(m, y - e.reshape(y.shape))[0]
        J[:, i] = (vp - vm)[0] / (2 * h)
    sign, logabs = np.linalg.slogdet(J)
    assert sign != 0
    np.testing.assert_allclose(ld[0] - logp[0], logabs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_gradient_of_the_whole_tiny_model_matches_finite_differences(family):
    """The training-mode loss (RealNVP: batch statistics) against central differences, for a spread
    of parameter tensors (every kind of layer)."""
    m = tiny_model(family, seed=8)
    x = images(6, 9)

    def loss():
        return float(m.loss(x, rng=np.random.default_rng(10), train=True)[0])
    _, grads = m.loss_and_grads(x, rng=np.random.default_rng(10), train=True)
    params = m.parameters()
    assert set(grads) == set(params)
    # batch norm (train mode) is blind to the bias of a conv feeding it (and nearly to its gain):
    # those are checked in tests/test_realnvp_net.py in evaluation mode
    blind = (".b", "conv1.g") if family == "realnvp" else ()
    live = [k for k in sorted(params) if "running" not in k and not (blind and k.endswith(blind))]
    picked = live[::max(1, len(live) // 24)]
    kinds = {k.rsplit(".", 1)[-1] for k in picked}
    assert len(picked) >= 12 and len(kinds) >= 3, picked
    gradcheck(loss, {k: params[k] for k in picked}, grads, tol=TOL[np.float64]["grad"], max_entries=40,
              n_directions=3)


def test_layouts_of_the_tiny_models():
    r = RealNVP(tiny_cfg("realnvp"), dtype=np.float64)
    kinds = [type(f).__name__ for f in r.flow.flows]
    # ImgProc; 2 checkerboard couplings + BN; squeeze; 2 channel couplings + BN; factor-out; 3 checkerboard + BN
    assert kinds[0] == "ImgProc" and kinds.count("MaskedAffineCoupling") == 2 + 2 + 3
    assert kinds.count("BatchNormFlow") == 7 and kinds.count("FactorOut") == 1 and kinds.count("SpaceToDepth") == 1
    masks = [(f.mask_kind, f.parity, f.compact) for f in r.flow.flows if isinstance(f, MaskedAffineCoupling)]
    assert masks == [("checkerboard", 0, False), ("checkerboard", 1, False), ("channel", 0, True),
                     ("channel", 1, True), ("checkerboard", 0, False), ("checkerboard", 1, False),
                     ("checkerboard", 0, False)]
    assert all(not f.affine for f in r.flow.flows if isinstance(f, BatchNormFlow))
    assert r.latent_shape == (2, 2, 6)
    g = Glow(tiny_cfg("glow", invconv="lu"), dtype=np.float64)
    kinds = [type(f).__name__ for f in g.flow.flows]
    assert kinds[0] == "Rescale" and kinds[-1] == "LearnedTopPrior"
    step = ["ChannelActNorm", "InvConv1x1LU", "MaskedAffineCoupling"]
    assert kinds[1:] == ["SpaceToDepth", *step * 2, "FactorOut", "SpaceToDepth", *step * 2, "LearnedTopPrior"]
    assert g.latent_shape == (1, 1, 24)
    assert [type(f).__name__ for f in Glow(tiny_cfg("glow"), dtype=np.float64).flow.flows][3] == "InvConv1x1"


def test_preset_parameter_counts_are_the_documented_ones():
    """The counts the note and the presets' docstrings quote, built from the presets."""
    assert build_model(get_preset("realnvp-cifar10")).num_parameters() == 6_052_041
    assert build_model(get_preset("glow-small")).num_parameters() == 175_824
    assert build_model(get_preset("realnvp-small")).num_parameters() == 119_385


@pytest.mark.slow
def test_glow_cifar10_parameter_count():
    assert build_model(get_preset("glow-cifar10")).num_parameters() == 44_052_816


def test_bad_lineage_configs_are_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_cfg("glow", levels=3).validate()
    with pytest.raises(ValueError, match="'affine' or 'additive'"):
        tiny_cfg("realnvp", coupling="mixlogistic").validate()
    with pytest.raises(ValueError, match="uniform"):
        tiny_cfg("glow", dequantization="variational").validate()
    with pytest.raises(ValueError, match="RealNVP/Glow option"):
        ModelConfig(coupling="additive").validate()


# ---------------------------------------------------------------- real images, the training loop
@pytest.fixture(scope="module")
def cifar():
    return load_default_dataset("train")[0][:256], load_default_dataset("test")[0][:64]


SMALL = dict(batch_size=8, init_batch_size=16, warmup_steps=2, checkpoint_every=3, log_every=1, eval_batches=1)


@pytest.mark.parametrize("preset", ["realnvp-small", "glow-small"])
def test_train_resume_round_trip_and_sample_on_real_images(preset, cifar, tmp_path):
    tr, te = cifar
    ov = dict(SMALL, filters=8, depth=2, **({"blocks": 1} if preset.startswith("realnvp") else {}))
    whole = train(preset, tr, te, steps=6, progress=False, overrides=ov)
    train(preset, tr, te, out_dir=str(tmp_path), steps=3, progress=False, overrides=ov)
    resumed = train(preset, tr, te, out_dir=str(tmp_path), steps=6, progress=False, overrides=ov)
    a, b = whole["model"].parameters(), resumed["model"].parameters()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)        # running statistics included
    assert whole["skipped_steps"] == 0 and np.isfinite(whole["test_bpd"])
    m = whole["model"]
    assert inverse_error(m, te[:16], batch_size=16) < 2e-3          # exact inverse of float32 real images
    s1 = m.sample(3, rng=np.random.default_rng(1), temperature=0.0)
    s2 = m.sample(3, rng=np.random.default_rng(2), temperature=0.0)
    np.testing.assert_array_equal(s1, s2)                           # T = 0: every latent at its prior's mean
    t7 = m.sample(3, rng=np.random.default_rng(1), temperature=0.7)
    assert t7.dtype == np.uint8 and t7.shape == (3, 32, 32, 3) and not np.array_equal(t7, s1)


def test_cli_trains_evaluates_and_samples_a_lineage_preset(tmp_path, capsys):
    from flowpp_ref.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--preset", "glow-small", "--steps", "2", "--out", str(out), "--no-progress",
               "--samples", "4", "--depth", "1", "--batch-size", "8", "--init-batch-size", "16"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "glow-small (glow):" in text and "parameters" in text
    assert main(["eval", str(out / "checkpoint.npz"), "--max-batches", "1", "--batch-size", "8"]) == 0
    assert main(["sample", str(out / "checkpoint.npz"), "--n", "4", "--temperature", "0.5",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


# ---------------------------------------------------------------- Glow's optimiser
def test_adamax_first_step_is_lr_sqrt_one_minus_beta2_times_sign_and_v_is_the_running_max():
    """t = 1: m = (1 - b1) g, v = |g|, step = lr sqrt(1 - b2) / (1 - b1) m / (v + eps) = lr sqrt(1 - b2) sign(g)."""
    lr, b2 = 0.01, 0.98
    p = {"w": np.array([1.0, -2.0, 3.0])}
    g1 = np.array([0.5, -4.0, 1e-3])
    opt = Adamax(p, beta2=b2)
    opt.step(p, {"w": g1.copy()}, lr)
    np.testing.assert_allclose(p["w"], [1.0, -2.0, 3.0] - lr * np.sqrt(1 - b2) * np.sign(g1) * np.abs(g1)
                               / (np.abs(g1) + 1e-8), rtol=1e-12)
    g2 = np.array([0.1, 5.0, -2e-3])
    opt.step(p, {"w": g2}, lr)
    np.testing.assert_allclose(opt.v["w"], np.maximum(b2 * np.abs(g1), np.abs(g2)), rtol=1e-12)


# ---------------------------------------------------------------- backends (the cupy case runs in the GPU check)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_gradients_and_sampling_on_the_backend_equal_the_host(xp, family):
    """float64 on the backend (CuPy on a GPU) vs NumPy: loss, every gradient, the exact round trip, and
    samples at T = 0 (which draw no random numbers). The cupy case skips without a GPU."""
    from flowpp_ref.core.backend import asarray, to_numpy
    host = tiny_model(family, seed=11)
    cfg = tiny_cfg(family)
    dev = model_class(cfg)(cfg, seed=11, xp=xp, dtype=np.float64)
    dev.load_parameters({k: asarray(v, xp) for k, v in host.parameters().items()})
    x = images(6, 12)
    noise = np.random.default_rng(13).random((6, 4, 4, 3))

    class Fixed:                              # the same uniform noise on both backends
        def __init__(self, xpm):
            self.xpm = xpm

        def random(self, shape, dtype=np.float64):
            return asarray(noise.reshape(shape), self.xpm, dtype)
    lh, gh = host.loss_and_grads(x, rng=Fixed(np), train=True)
    ld, gd = dev.loss_and_grads(x, rng=Fixed(xp), train=True)
    np.testing.assert_allclose(float(to_numpy(ld)), float(lh), rtol=1e-12)
    for k in gh:
        np.testing.assert_allclose(to_numpy(gd[k]), gh[k], rtol=1e-9, atol=1e-12, err_msg=k)
    y = asarray(host.prepare(x) + noise, xp)
    z, _, caches = dev.flow.forward(y, None, train=False)
    np.testing.assert_allclose(to_numpy(exact_inverse(dev.flow, z, caches)), to_numpy(y), atol=1e-9)
    from flowpp_ref.core.backend import make_rng
    np.testing.assert_array_equal(dev.sample(2, rng=make_rng(0, xp), temperature=0.0),
                                  host.sample(2, rng=np.random.default_rng(0), temperature=0.0))
