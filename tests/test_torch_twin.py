"""The whole model against its PyTorch autograd twin (tests/torch_twin.py), float64, tiny preset.

For each variant: same parameters, same integer images, same noise (two generators seeded
alike, every draw recorded and compared), then the mean bits/dim must agree and EVERY
parameter gradient of ``FlowPP.loss_and_grads`` must agree with torch autograd
(relative error ``max|ours - torch| / max(|ours| + |torch|)`` below 1e-5 per tensor).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle of the whole-model cross-check")

from torch_twin import RecordingRNG, TorchFlowPP  # noqa: E402  (tests/ is on sys.path under pytest)

from flowpp_ref.bijections.coupling import MixLogisticAttnCoupling  # noqa: E402
from flowpp_ref.core.gradcheck import rel_error  # noqa: E402
from flowpp_ref.model import FlowPP  # noqa: E402
from flowpp_ref.model.presets import get_preset  # noqa: E402

GRAD_TOL = 1e-5
VARIANTS = {
    "flowpp": dict(),                                             # variational + mixture coupling + attention
    "uniform-dequant": dict(dequantization="uniform"),
    "affine-noattn": dict(coupling="affine", use_attention=False),
    "dropout": dict(dropout_p=0.3),                               # masks drawn from the shared generator
    "5bit": dict(n_bits=5),                                       # Rescale in the flow, x / 32 for the context
    # the release's other launchers (issue 12)
    "gated-nin": dict(mixer="gated-nin", dropout_p=0.3),          # abl_noattn.py's block in attention's slot
    "imagenet64-style": dict(layout=(("s2d",), ("checker", 1), ("channel", 1)), use_pointwise=False,
                             final_concat_elu=True, context_layernorm=True, dequant_attention=False),
}


def _images(n, seed, levels):
    r = np.random.default_rng(seed)
    base = r.integers(0, levels, size=(n, 1, 1, 3))
    noise = r.integers(-levels // 12, levels // 12 + 1, size=(n, 4, 4, 3))
    return np.clip(base + noise, 0, levels - 1).astype(np.uint8)


def _perturb(model, rng, rel=0.05, abs_=0.01):
    """Move every parameter off its init values (layer-norm g = 1, b = 0, ...) by a little."""
    for k, v in model.parameters().items():
        model.load_parameters({k: v * (1 + rel * rng.standard_normal(v.shape)) + abs_ * rng.standard_normal(v.shape)},
                              strict=False)


def _force_logscale_clamp(model):
    """Push component 0's raw log-scales of the first main-flow coupling far below -7 (clamped)."""
    idx, layer = next((i, f) for i, f in enumerate(model.flow.flows) if isinstance(f, MixLogisticAttnCoupling))
    name = f"flow.{model.flow.names[idx]}.net.proj_out.b"
    b = model.parameters()[name].copy()
    per = layer.params_per_channel
    b[2 + 2 * layer.components::per] = -30.0
    model.load_parameters({name: b}, strict=False)
    return idx


@pytest.mark.torch
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_whole_model_loss_and_every_gradient_match_torch(variant):
    p = get_preset("tiny", **VARIANTS[variant])
    levels = 2 ** p.model.n_bits
    model = FlowPP(p.model, seed=3, dtype=np.float64)
    model.data_init(_images(8, 1, levels), rng=np.random.default_rng(0))
    _perturb(model, np.random.default_rng(2))
    clamp_idx = _force_logscale_clamp(model) if p.model.coupling == "mixlogistic" else None
    x = _images(4, 0, levels)
    seed = 17

    ours_rng = RecordingRNG(np.random.default_rng(seed))
    loss, cache = model.loss(x, rng=ours_rng, train=True)
    grads = model.backward(cache)

    twin = TorchFlowPP(model, dtype=torch.float64)
    twin_rng = RecordingRNG(np.random.default_rng(seed))
    tloss = twin.loss(x, rng=twin_rng, train=True)
    tloss.backward()
    tgrads = twin.grads_numpy()

    # the same noise, drawn by the same calls in the same order
    assert [d[:3] for d in ours_rng.draws] == [d[:3] for d in twin_rng.draws]
    assert all(np.array_equal(a[3], b[3]) for a, b in zip(ours_rng.draws, twin_rng.draws))
    expect_draws = 1 + (p.model.dropout_p > 0) * 2            # eps or u, plus dropout masks when p > 0
    assert len(ours_rng.draws) >= expect_draws
    if clamp_idx is not None:                                  # the clamp is active somewhere
        assert not cache[1][2][clamp_idx]["lsc_on"].all()

    lt = float(tloss.detach())
    assert abs(float(loss) - lt) <= 1e-10 * abs(lt), f"loss: ours {float(loss)!r}, torch {lt!r}"
    # the loss depends on the noise (so agreeing on it is not trivial)
    other = float(twin.loss(x, rng=np.random.default_rng(seed + 1), train=True).detach())
    assert abs(other - lt) > 1e-6

    assert set(grads) == set(tgrads), sorted(set(grads) ^ set(tgrads))[:5]
    unreached = sorted(k for k, g in tgrads.items() if g is None)
    assert not unreached, f"parameters the twin's loss never reached: {unreached[:5]}"
    bad = []
    for k in sorted(grads):
        ours, theirs = np.asarray(grads[k], dtype=np.float64), tgrads[k]
        err = rel_error(ours, theirs)
        if not err < GRAD_TOL:
            bad.append(f"{k}: rel. error {err:.2e}, max |diff| {np.max(np.abs(ours - theirs)):.3e}, "
                       f"max |grad| {np.max(np.abs(theirs)):.3e}")
    assert not bad, f"{len(bad)} of {len(grads)} gradient tensors disagree with torch:\n" + "\n".join(bad)


@pytest.mark.torch
def test_twin_rejects_an_unknown_bijection():
    from flowpp_ref.bijections.base import Bijection

    class Mystery(Bijection):
        pass

    p = get_preset("tiny", dequantization="uniform")
    model = FlowPP(p.model, seed=0, dtype=np.float64)
    twin = TorchFlowPP(model)
    with pytest.raises(TypeError, match="Mystery"):
        twin.flow_forward(Mystery(), torch.zeros(1, 4, 4, 3, dtype=torch.float64), None, "x", False, None)
