"""The flows Flow++ improves on: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

Flow++ changes three things of these models (sec. 3): uniform -> variational dequantization,
affine -> logistic-mixture CDF coupling, convolutions -> convolutions + self-attention. Both
models here use uniform dequantization (their papers' ``x + u``, u ~ U[0, 1)^D), the objective
and training loop of :class:`~flowpp_ref.model.flowpp.FlowPP`, and the bijections of
:mod:`flowpp_ref.bijections`. Selected by ``ModelConfig.family``; :func:`model_class` maps it to
the class.

RealNVP (``family="realnvp"``; paper sec. 3.6 and 4.1), ``levels`` scales, ``depth`` = 3::

    Rescale(256 / 2^n_bits)                     only when n_bits < 8
    ImgProc                                     y -> logit(0.05 + 0.9 y / 256)  (RealNVP sec. 4.1, alpha = 0.05)
    scale s = 1 .. levels - 1:
        depth x [MaskedAffineCoupling(checkerboard, parity i % 2), BatchNormFlow]
        SpaceToDepth                            [H, W, C] -> [H/2, W/2, 4C]
        depth x [MaskedAffineCoupling(channel, parity i % 2, compact), BatchNormFlow]
        FactorOut(N(0, I))                      half of the channels leave
    last scale: (depth + 1) x [MaskedAffineCoupling(checkerboard, parity i % 2), BatchNormFlow]
                                                z, prior N(0, I)

Couplings: ``log s = scale * tanh(raw)`` (a learned per-channel scale times tanh, sec. 4.1), the
conditioning network :class:`~flowpp_ref.nn.realnvp_net.RealNVPResNet` (``blocks`` residual blocks of
``filters`` feature maps, batch norm and weight norm). The batch normalisation of each coupling's output
is the release's ``bn_out`` (no scale or shift: ``BatchNormFlow(affine=False)``).

Glow (``family="glow"``; paper sec. 3 and table 1, the release's ``model.py``), ``levels`` L, ``depth`` K::

    Rescale(1 / 2^n_bits, offset=-0.5)          y -> y / 2^n - 1/2  (the release's x / n_bins - .5)
    level l = 1 .. L:
        SpaceToDepth
        K x [ChannelActNorm, InvConv1x1 (or InvConv1x1LU), MaskedAffineCoupling(channel, parity 0, compact)]
        FactorOut(learned prior)                except after the last level
    LearnedTopPrior                             the release's learntop: N(mu_c, sigma_c^2) on the top latent

Couplings: ``s = sigmoid(raw + 2)`` ("affine") or ``log s = 0`` ("additive"), the network
:class:`~flowpp_ref.nn.glow_net.GlowCouplingNet` (conv3x3-actnorm-ReLU-conv1x1-actnorm-ReLU-zero conv,
``filters`` wide); no alternating mask: the 1x1 convolution mixes the channels between couplings.

Differences from Glow's release (its ``model.py``/``tfops.py``), each a parametrisation of the same
function class or a border effect: its coupling computes ``y2 = (z2 + t) * s`` with ``t, s`` interleaved in
``h`` (``h[..., 0::2]``, ``h[..., 1::2]``), ours ``y2 = z2 * s + t`` with ``h = [raw, t]``; its 3x3
convolutions append an edge-indicator input channel (``add_edge_padding``), ours pad with zeros; its
learned top prior is a zero convolution of a zero tensor (per-channel except at the border pixels, through
that edge channel), ours per-channel everywhere. Parameters of ``glow-cifar10``: 44,052,816 here; by our
count of the release's layers, 550,788 more there (the edge channels, 466,884; the top prior's convolution
weights, 83,904), 44,603,604 in all.

Both: each coupling's network reads the kept half of the channels in the channel couplings
(``compact=True``), as the releases do; the checkerboard couplings read the masked input.
Sampling (``sample(n, rng=, temperature=T)``): the top latent and every factored-out half are drawn at
temperature T (Glow's ``eps_std``), through :class:`~flowpp_ref.bijections.factor_out.FactorOut`.

Data parallelism: the training loop gives every BatchNormFlow the run's communicator, so RealNVP's batch
norms use the global batch's statistics (:mod:`flowpp_ref.bijections.batchnorm`).

CuPy: these models use only array code shared with the rest (no kernel of their own). **Not verified on a
GPU**: no device was available when they were written.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections import (BatchNormFlow, ChannelActNorm, Compose, FactorOut, ImgProc, InvConv1x1,
                                   InvConv1x1LU, LearnedTopPrior, MaskedAffineCoupling, SpaceToDepth)
from flowpp_ref.bijections.rescale import Rescale
from flowpp_ref.model.dequantization import UniformDequantizer
from flowpp_ref.model.flowpp import FlowPP
from flowpp_ref.model.presets import ModelConfig
from flowpp_ref.nn.glow_net import GlowCouplingNet
from flowpp_ref.nn.realnvp_net import RealNVPResNet


# ---------------------------------------------------------------- RealNVP
def _realnvp_step(shape, mask, parity, cfg, rng, xp, dtype):
    """A RealNVP coupling (its ResNet reads m * x, or the kept channels) and the batch norm of its output."""
    H, W, C = shape
    compact = mask == "channel"
    width = C // 2 if compact else C
    scale = "realnvp" if cfg.coupling == "affine" else "additive"
    out = width if scale == "additive" else 2 * width
    net = RealNVPResNet(width, out, cfg.filters, cfg.blocks, rng=rng, xp=xp, dtype=dtype)
    return [MaskedAffineCoupling(shape, net, mask, parity, scale, compact=compact, xp=xp, dtype=dtype),
            BatchNormFlow(C, affine=False, xp=xp, dtype=dtype)]


def build_realnvp_flow(cfg: ModelConfig, *, rng, xp=np, dtype=np.float32):
    """RealNVP's multi-scale flow (module docstring); returns ``(Compose, latent shape (H, W, C))``."""
    h, w, c = cfg.image_shape
    flows = [Rescale(256.0 / 2 ** cfg.n_bits)] if cfg.n_bits < 8 else []
    flows.append(ImgProc(check_input=False))                 # FlowPP.prepare checks the pixels
    for level in range(cfg.levels):
        last = level == cfg.levels - 1
        for i in range(cfg.depth + 1 if last else cfg.depth):
            flows += _realnvp_step((h, w, c), "checkerboard", i % 2, cfg, rng, xp, dtype)
        if last:
            break
        flows.append(SpaceToDepth())
        h, w, c = h // 2, w // 2, 4 * c
        for i in range(cfg.depth):
            flows += _realnvp_step((h, w, c), "channel", i % 2, cfg, rng, xp, dtype)
        flows.append(FactorOut(c, learned_prior=False, rng=rng, xp=xp, dtype=dtype))
        c //= 2
    return Compose(flows), (h, w, c)


# ---------------------------------------------------------------- Glow
def build_glow_flow(cfg: ModelConfig, *, rng, xp=np, dtype=np.float32):
    """Glow's multi-scale flow (module docstring); returns ``(Compose, latent shape (H, W, C))``."""
    h, w, c = cfg.image_shape
    flows = [Rescale(1.0 / 2 ** cfg.n_bits, offset=-0.5)]
    invconv = InvConv1x1 if cfg.invconv == "full" else InvConv1x1LU
    scale = "glow" if cfg.coupling == "affine" else "additive"
    for level in range(cfg.levels):
        flows.append(SpaceToDepth())
        h, w, c = h // 2, w // 2, 4 * c
        half = c // 2
        for _ in range(cfg.depth):
            net = GlowCouplingNet(half, half if scale == "additive" else 2 * half, cfg.filters, rng=rng, xp=xp,
                                  dtype=dtype)
            flows += [ChannelActNorm(c, xp=xp, dtype=dtype), invconv(c, rng=rng, xp=xp, dtype=dtype),
                      MaskedAffineCoupling((h, w, c), net, "channel", 0, scale, compact=True, xp=xp, dtype=dtype)]
        if level < cfg.levels - 1:
            flows.append(FactorOut(c, learned_prior=True, rng=rng, xp=xp, dtype=dtype))
            c //= 2
    flows.append(LearnedTopPrior(c, xp=xp, dtype=dtype))
    return Compose(flows), (h, w, c)


# ---------------------------------------------------------------- the models
class RealNVP(FlowPP):
    """RealNVP with uniform dequantization; the loss, gradient, evaluation and sampling of :class:`FlowPP`."""

    def _build(self, cfg, rng, xp, dtype):
        flow, latent = build_realnvp_flow(cfg, rng=rng, xp=xp, dtype=dtype)
        return UniformDequantizer(), flow, latent


class Glow(FlowPP):
    """Glow with uniform dequantization; the loss, gradient, evaluation and sampling of :class:`FlowPP`."""

    def _build(self, cfg, rng, xp, dtype):
        flow, latent = build_glow_flow(cfg, rng=rng, xp=xp, dtype=dtype)
        return UniformDequantizer(), flow, latent


MODEL_CLASSES = {"flowpp": FlowPP, "realnvp": RealNVP, "glow": Glow}


def model_class(cfg: ModelConfig):
    """The model class of ``cfg.family``."""
    return MODEL_CLASSES[cfg.family]
