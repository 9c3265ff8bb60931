"""The architecture: coupling stages and the main flow of Flow++ (appendix 8.5).

Main flow (appendix 8.5, for CIFAR-10 stages = (4, 2, 3))::

    Rescale(256 / 2^n_bits)                     only when n_bits < 8
    ImgProc                                     y -> logit(0.05 + 0.9 y / 256)
    CheckerboardSplit
      stages[0] x [Normalize, Pointwise, MixLogisticAttnCoupling, TupleFlip]
    Inverse(CheckerboardSplit)
    SpaceToDepth                                [B,H,W,C] -> [B,H/2,W/2,4C]
    ChannelSplit
      stages[1] x [...]
    Inverse(ChannelSplit)
    CheckerboardSplit
      stages[2] x [...]
    Inverse(CheckerboardSplit)                  z, prior N(0, I)

The dequantizer's flow (:mod:`flowpp_ref.model.dequantization`) is built from the same
:func:`coupling_stage`.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections import (ChannelSplit, CheckerboardSplit, Compose, ImgProc, Inverse, Normalize, Pointwise,
                                   SpaceToDepth, TupleFlip)
from flowpp_ref.bijections.coupling import AffineAttnCoupling, MixLogisticAttnCoupling
from flowpp_ref.bijections.rescale import Rescale
from flowpp_ref.model.presets import ModelConfig


def _coupling(cfg, half_shape, filters, blocks, components, context_channels, rng, xp, dtype):
    common = dict(context_channels=context_channels, use_attention=cfg.use_attention, use_nin=cfg.use_nin,
                  dropout_p=cfg.dropout_p, rng=rng, xp=xp, dtype=dtype, mixer=cfg.mixer,
                  final_concat_elu=cfg.final_concat_elu)
    if cfg.coupling == "affine":                     # ablation: y_e = exp(a) e + b
        return AffineAttnCoupling(half_shape, filters, blocks, **common)
    return MixLogisticAttnCoupling(half_shape, filters, blocks, components, with_affine=cfg.with_affine,
                                   inverse_method=cfg.inverse_method, mixture_dtype=cfg.mixture_dtype, **common)


def coupling_stage(cfg: ModelConfig, half_shape, n, *, filters, blocks, components, context_channels=None,
                   rng, xp, dtype):
    """n x [Normalize, Pointwise, coupling, TupleFlip] acting on a tuple of two halves."""
    flows = []
    for _ in range(n):
        flows.append(Normalize((half_shape, half_shape), xp=xp, dtype=dtype))
        if cfg.use_pointwise:
            flows.append(Pointwise((half_shape[2], half_shape[2]), noisy_identity_init=cfg.pointwise_init, rng=rng,
                                   xp=xp, dtype=dtype))
        flows += [_coupling(cfg, half_shape, filters, blocks, components, context_channels, rng, xp, dtype),
                  TupleFlip()]
    return flows


def build_main_flow(cfg: ModelConfig, *, rng, xp=np, dtype=np.float32) -> Compose:
    """ImgProc, then the steps of ``cfg.main_layout()``: ("s2d",) a squeeze, ("checker", n) /
    ("channel", n) a split, n coupling steps on its halves, and the inverse split."""
    h, w, c = cfg.image_shape
    kw = dict(filters=cfg.filters, blocks=cfg.blocks, components=cfg.components, rng=rng, xp=xp, dtype=dtype)
    flows = []
    if cfg.n_bits < 8:
        flows.append(Rescale(256.0 / 2 ** cfg.n_bits))
    flows.append(ImgProc(check_input=False))                     # FlowPP.prepare checks the pixels
    for step in cfg.main_layout():
        if step[0] == "s2d":
            flows.append(SpaceToDepth())
            h, w, c = h // 2, w // 2, 4 * c
            continue
        split, half = ((CheckerboardSplit, (h, w // 2, c)) if step[0] == "checker" else
                       (ChannelSplit, (h, w, c // 2)))
        flows.append(split())
        flows += coupling_stage(cfg, half, step[1], **kw)
        flows.append(Inverse(split()))
    return Compose(flows)
