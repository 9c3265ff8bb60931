"""The release's launchers (issue 12): parameter counts, presets, schedules, the gated pointwise block.

No training here: parameter counts come from shapes (flowpp_ref.model.paramcount), checked
against models that are built (the small ones and cifar10-paper) and against the figures
the release's launchers state in their docstrings.
"""
import dataclasses

import numpy as np
import pytest

from flowpp_ref.core.gradcheck import gradcheck
from flowpp_ref.model import FlowPP
from flowpp_ref.nn.gated_nin import GatedNIN, maxout3, maxout3_backward
from flowpp_ref.model.paramcount import count_parameters, explain_difference
from flowpp_ref.model.presets import PRESETS, RELEASE_OF, TrainConfig, get_preset
from flowpp_ref.model.release import RELEASE, SCHEDULES, release_param_count
from flowpp_ref.training.schedules import learning_rate


@pytest.mark.parametrize("key", sorted(RELEASE))
def test_release_count_reproduces_the_launchers_stated_figure(key):
    rc = RELEASE[key]
    assert rc.stated_params is not None, "every launcher states its parameter count"
    assert release_param_count(rc)["total"] == rc.stated_params


def test_release_count_reacts_to_each_architecture_field():
    base = RELEASE["imagenet64"]
    n0 = release_param_count(base)["total"]
    for field, value in [("weight_norm", True), ("final_concat_elu", False), ("context_layernorm", False),
                         ("blocks", 15), ("pointwise", True), ("dequant_attention", True)]:
        assert release_param_count(dataclasses.replace(base, **{field: value}))["total"] != n0, field


SMALL = {
    "tiny": {},
    "gated-nin": dict(mixer="gated-nin"),
    "affine-uniform": dict(coupling="affine", dequantization="uniform"),
    "no-attention": dict(use_attention=False),
    "64-style": dict(image_shape=(8, 8, 3), layout=(("s2d",), ("checker", 2), ("s2d",), ("channel", 1),
                                                    ("checker", 1)),
                     use_pointwise=False, final_concat_elu=True, context_layernorm=True, dequant_attention=False),
    "32-style": dict(layout=(("checker", 1), ("checker", 1), ("s2d",), ("channel", 1)), use_pointwise=False,
                     final_concat_elu=True, dequant_couplings=3, dequant_components=2),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shape_count_equals_the_built_model(name):
    cfg = get_preset("tiny", **SMALL[name]).model
    assert count_parameters(cfg) == FlowPP(cfg).num_parameters()


def test_cifar10_paper_is_the_release_plus_the_weight_norm_gains():
    p = get_preset("cifar10-paper")
    model = FlowPP(p.model)                                 # 31.5M float32 parameters, ~1 s
    params = model.parameters()
    n = model.num_parameters()
    assert n == count_parameters(p.model) == 31_528_096
    # the weight-norm gains: 'g' of every Conv2d / NIN (layer norms also have a 'g': not those)
    gains = sum(v.size for k, v in params.items() if k.endswith(".g") and ".ln" not in k
                and ".dqln" not in k)
    assert gains == 84_656
    assert n - gains == RELEASE["cifar10"].stated_params == 31_443_440
    # the settings of run_cifar.py
    t = p.train
    assert (t.lr, t.warmup_steps, t.batch_size, t.init_batch_size, t.ema_decay, t.grad_clip) == \
        (3e-4, 2000, 64, 128, 0.999, 1.0)
    assert (p.model.dropout_p, p.model.components, p.model.blocks, p.model.filters) == (0.2, 32, 10, 96)
    assert (p.model.dequant_filters, p.model.dequant_blocks) == (96, 2)


# what may differ between a preset and its launcher (see presets.py): weight norm, the
# release's unused pos_emb, imagenet32's attention in the context network
ALLOWED = {"weight_norm", "pos_emb_without_attention", "context_attention"}


@pytest.mark.parametrize("preset", sorted(RELEASE_OF))
def test_every_paper_preset_matches_its_launcher_or_the_difference_is_itemised(preset):
    p = get_preset(preset)
    rc = RELEASE[RELEASE_OF[preset]]
    steps = explain_difference(rc, p.model)
    assert {s[0] for s in steps} <= ALLOWED, steps
    assert release_param_count(rc)["total"] + sum(s[3] for s in steps) == count_parameters(p.model)
    # the settings that are not architecture
    assert p.model.image_shape == rc.image_shape and p.model.n_bits == rc.n_bits
    assert p.model.dropout_p == rc.dropout
    assert (p.train.batch_size, p.train.ema_decay, p.train.lr_schedule) == (rc.batch, rc.ema_decay, rc.schedule)
    assert p.train.processes == rc.processes
    assert rc.source in PRESETS[preset].note


def test_the_no_attention_ablation_has_attentions_parameter_count():
    full, noattn = get_preset("cifar10-paper").model, get_preset("cifar10-no-attention").model
    assert count_parameters(full) == count_parameters(noattn)
    assert count_parameters(dataclasses.replace(full, use_attention=False)) < count_parameters(full)


def test_schedules_follow_the_launchers():
    f = SCHEDULES
    assert f["imagenet64"](5000) == pytest.approx(2e-4)
    assert f["imagenet64"](30_000) == 4e-4
    assert f["imagenet64"](55_000) == pytest.approx(4e-4 * 0.99995 ** 5000)
    assert f["imagenet64"](100_000) == 3e-4
    assert f["imagenet64"](235_000) == pytest.approx(5e-6)
    assert f["imagenet64"](260_000) == 1e-5
    assert f["imagenet64"](285_000) == 0.0          # the release's negative ramp, clamped (docstring)
    assert f["imagenet64"](300_000) == 1e-6
    assert f["imagenet64-5bit"](60_000) == 3e-4 and f["imagenet64-5bit"](120_000) == pytest.approx(5e-6)
    assert f["imagenet64-5bit"](200_000) == 1e-5
    assert f["imagenet32"](2500) == pytest.approx(5e-4) and f["imagenet32"](40_000) == pytest.approx(1e-3, rel=1e-3)
    lo = f["imagenet32"](10 ** 6)
    assert 3e-4 * 0.99995 < lo <= 3e-4
    assert f["celeba64"](10_000) == pytest.approx(2e-5) and f["celeba64"](50_000) == 4e-5
    assert 1e-5 * 0.9995 < f["celeba64"](10 ** 6) <= 1e-5
    for name, s in f.items():                       # no gaps: every step has a finite, non-negative rate
        steps = np.r_[0:400_000:997]
        v = np.array([s(int(k)) for k in steps])
        assert np.all(np.isfinite(v)) and np.all(v >= 0), name


def test_learning_rate_dispatch():
    assert learning_rate(100, TrainConfig(lr=1e-3, warmup_steps=200)) == pytest.approx(5e-4)
    assert learning_rate(5000, TrainConfig(lr_schedule="imagenet64")) == pytest.approx(2e-4)
    assert learning_rate(10 ** 5, get_preset("celeba128-5bit-paper").train) == 1e-5
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        learning_rate(1, TrainConfig(lr_schedule="nope"))


def test_layout_errors_are_clear():
    with pytest.raises(ValueError, match="layout step"):
        get_preset("tiny", layout=(("squeeze",),))
    with pytest.raises(ValueError, match="squeeze"):
        get_preset("tiny", layout=(("s2d",), ("s2d",), ("s2d",)))
    with pytest.raises(ValueError, match="mixer"):
        get_preset("tiny", mixer="mlp")


# ------------------------------------------------------------ the gated pointwise block
def test_maxout3_routes_the_gradient_to_the_max():
    p = np.array([[1.0, 3.0, 2.0, -1.0, -2.0, -0.5]])
    m, idx = maxout3(p)
    np.testing.assert_array_equal(m, [[3.0, -0.5]])
    np.testing.assert_array_equal(maxout3_backward(np.array([[10.0, 20.0]]), idx), [[0, 10, 0, 0, 0, 20]])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "dropout"])
def test_gated_nin_backward_matches_finite_differences(train):
    rng = np.random.default_rng(0)
    F = 8
    blk = GatedNIN(F, dropout_p=0.3 if train else 0.0, rng=rng, xp=np, dtype=np.float64)
    x = rng.standard_normal((2, 3, 3, F))
    pos = 0.1 * rng.standard_normal((3, 3, F))
    blk.data_init(x, pos)
    for k, v in blk.parameters().items():              # off the init values
        blk.load_parameters({k: v + 0.05 * rng.standard_normal(v.shape)}, strict=False)
    w = rng.standard_normal((2, 3, 3, F))

    def run():
        out, cache = blk.forward(x, pos, train=train, rng=np.random.default_rng(5))
        return out, cache

    def f():
        return float((run()[0] * w).sum())

    out, cache = run()
    dx, dpos, grads = blk.backward(w, cache)
    assert out.shape == x.shape and dpos.shape == pos.shape
    rep = gradcheck(f, {"x": x, "pos": pos, **blk.parameters()}, {"x": dx, "pos": dpos, **grads}, h=1e-6)
    assert rep.ok(1e-6), str(rep)


def test_gated_nin_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    F = 4
    blk = GatedNIN(F, rng=rng, xp=np, dtype=np.float64)
    x = rng.standard_normal((2, 2, 3, F))
    pos = rng.standard_normal((2, 3, F))
    out, cache = blk.forward(x, pos)
    w = rng.standard_normal(out.shape)
    dx, dpos, grads = blk.backward(w, cache)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in blk.parameters().items()}
    tx, tp = torch.tensor(x, requires_grad=True), torch.tensor(pos, requires_grad=True)

    def nin(h, name):
        V, g, b = P[name + ".V"], P[name + ".g"], P[name + ".b"]
        return h @ (V * (g / V.norm(dim=0))) + b

    c = nin(tx + tp[None], "proj1").reshape(*x.shape, 3).max(dim=-1).values
    c2 = nin(c, "proj2")
    tout = tx + c2[..., :F] * torch.sigmoid(c2[..., F:])
    (tout * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dpos, tp.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], P[k].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
