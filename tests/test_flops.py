"""The FLOP counter (flowpp_ref.model.flops) against a count by hand of the tiny model."""
import pytest

from flowpp_ref.model.flowpp import FlowPP
from flowpp_ref.model.flops import layer_flops, step_flops
from flowpp_ref.model.presets import get_preset


def _net(B, H, W, C, F, K, context=None):
    """Forward FLOPs of one coupling's network by hand: proj_in, one block (gated resnet, attention), proj_out."""
    P, T = B * H * W, H * W
    f = 2 * P * 9 * C * F                       # proj_in conv3x3 C -> F
    f += 2 * P * 9 * 2 * F * F                  # gated resnet c1: conv3x3 2F -> F
    f += 2 * P * 2 * F * 2 * F                  # c2: NIN 2F -> 2F
    if context:
        f += 2 * P * 2 * context * F            # a_proj: NIN 2 Cc -> F
    f += 2 * P * F * 3 * F + 2 * P * F * 2 * F  # attention's proj1 (F -> 3F) and proj2 (F -> 2F)
    f += 4 * B * T * T * F                      # q k^T and W v over the heads
    f += 2 * P * 9 * F * C * (2 + 3 * K)        # proj_out conv3x3 F -> C (2 + 3K)
    return f


def test_tiny_step_flops_match_a_hand_count():
    cfg = get_preset("tiny").model          # 4x4x3, filters 8, 1 block, K = 3, stages (1, 1, 1), dequantizer 2 couplings
    assert (cfg.image_shape, cfg.filters, cfg.blocks, cfg.components, cfg.stages) == ((4, 4, 3), 8, 1, 3, (1, 1, 1))
    B = 5
    # main flow: checkerboard halves (4, 2, 3); squeeze, channel halves (2, 2, 6); checkerboard halves (2, 1, 12)
    main = _net(B, 4, 2, 3, 8, 3) + _net(B, 2, 2, 6, 8, 3) + _net(B, 2, 1, 12, 8, 3)
    pointwise = sum(2 * (2 * B * h * w * c * c) for h, w, c in ((4, 2, 3), (2, 2, 6), (2, 1, 12)))
    # dequantizer: 2 couplings on (4, 2, 3) with the context (4 channels); its context network at (4, 2)
    Cc = cfg.context_channels
    deq = 2 * _net(B, 4, 2, 3, cfg.dequant_filters, cfg.dequant_components, context=Cc)
    pointwise += cfg.dequant_couplings * 2 * (2 * B * 4 * 2 * 3 * 3)
    ctx_proj = 2 * B * 8 * 9 * 6 * Cc                                     # conv3x3 2C -> Cc, dW only
    ctx_res = 2 * B * 8 * 9 * 2 * Cc * Cc + 2 * B * 8 * 9 * 2 * Cc * 2 * Cc   # c1 2Cc -> Cc, c2 2Cc -> 2Cc (3x3)
    fwd = main + pointwise + deq + ctx_proj + ctx_res
    bwd = 2 * (fwd - ctx_proj) + ctx_proj
    got = step_flops(FlowPP(cfg, seed=0), B)
    assert (got["forward"], got["backward"]) == (fwd, bwd)
    assert got["total"] == sum(got["by_kind"].values())


def test_flops_grow_as_the_layers_say():
    """Linear in the batch; attention's share quadruples when the image's side doubles (T^2)."""
    m = FlowPP(get_preset("tiny").model, seed=0)
    one, four = step_flops(m, 1), step_flops(m, 4)
    assert four["total"] == 4 * one["total"]
    big = FlowPP(get_preset("tiny", image_shape=(8, 8, 3)).model, seed=0)
    assert step_flops(big, 1)["by_kind"]["attention"] == 16 * one["by_kind"]["attention"]
    assert step_flops(big, 1)["by_kind"]["conv"] == 4 * one["by_kind"]["conv"]
    names = [r[0] for r in layer_flops(m, 1)]
    assert "dequant.context.proj" in names and any(n.endswith(".attn") for n in names)


def test_other_families_are_refused():
    with pytest.raises(ValueError, match="Flow\\+\\+ models"):
        step_flops(FlowPP(get_preset("realnvp-small", image_shape=(8, 8, 3)).model, seed=0), 1)
