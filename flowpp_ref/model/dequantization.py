"""Dequantization: uniform (sec. 3.1.1, the ablation) and variational (Flow++: sec. 3.1.2, appendix 8.4.1).

Both produce noise u in [0, 1)^D for integer data x and the log-density
log q(u|x) per sample; the model then scores y = x + u.

Variational dequantization::

    context = ContextNet(x / 2^n_bits)             checkerboard halves of x concatenated,
                                                   conv -> 32 channels, 3 gated resnets
    eps ~ N(0, I)
    h, logdet_g = g(eps; context)                  CheckerboardSplit, n x [Normalize,
                                                   Pointwise, MixLogisticAttnCoupling(context),
                                                   TupleFlip], inverse CheckerboardSplit
    u, logdet_s = sigmoid(h)
    log q(u|x) = log N(eps) - logdet_g - logdet_s

Backward: given dL/du and dL/dlog q, the sigmoid and the flow g run backward
(eps is a constant), the flow returns dL/dcontext, and the context network
runs backward to its parameters (x itself needs no gradient).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from flowpp_ref.bijections import CheckerboardSplit, Compose, Inverse, Sigmoid
from flowpp_ref.core.backend import array_module
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.model.architecture import coupling_stage  # the same block structure as the main flow
from flowpp_ref.model.objective import standard_normal_logprob
from flowpp_ref.nn import Conv2d, GatedResNet
from flowpp_ref.nn.layernorm import LayerNorm


class UniformDequantizer(Module):
    """q(u|x) = 1 on [0,1)^D: u ~ U[0,1), log q = 0. No parameters."""

    def forward(self, x, *, rng, train=False):
        u = rng.random(x.shape, dtype=x.dtype)
        return u, None, None

    def backward(self, du, dlogq, cache):
        return {}

    def data_init(self, x, *, rng):
        return self.forward(x, rng=rng)[0]


class ContextNet(Module):
    """The shallow network that encodes x for the dequantization flow (appendix 8.4.1).

    Input x / 2^n_bits [B,H,W,C]; its two checkerboard halves are concatenated on the
    channel axis ([B,H,W/2,2C]), projected by a 3x3 conv to ``channels``, then passed
    through ``resnets`` gated resnets (3x3 convs, no context), as in the release.
    Cache: the sub-layers' caches. Backward returns parameter gradients only.
    """

    def __init__(self, image_shape, channels=32, resnets=3, dropout_p=0.0, *, rng, xp=np, dtype=np.float32,
                 layernorm=False):
        super().__init__()
        c = image_shape[2]
        self.split = CheckerboardSplit()
        self.proj = self.add("proj", Conv2d(2 * c, channels, rng=rng, xp=xp, dtype=dtype))
        self.resnets = [self.add(f"c{i}", GatedResNet(channels, None, use_nin=False, dropout_p=dropout_p,
                                                      rng=rng, xp=xp, dtype=dtype))
                        for i in range(resnets)]
        # layernorm (flows_imagenet/, flows_celeba/ ``deep_processor``): h = dqln_i(resnet_i(h))
        self.norms = ([self.add(f"dqln{i}", LayerNorm(channels, xp=xp, dtype=dtype)) for i in range(resnets)]
                      if layernorm else None)

    def _halves(self, xn):
        xp = array_module(xn)
        (a, b), _, _ = self.split.forward(xn)
        return xp.concatenate([a, b], axis=-1)

    def forward(self, xn, *, train=False, rng=None):
        h, c0 = self.proj.forward(self._halves(xn))
        caches = [c0]
        for i, r in enumerate(self.resnets):
            h, c = r.forward(h, None, train=train, rng=rng)
            if self.norms is not None:
                h, c_ln = self.norms[i].forward(h)
                c = (c, c_ln)
            caches.append(c)
        return h, caches

    def backward(self, dh, caches):
        grads = {}
        for i in reversed(range(len(self.resnets))):
            c = caches[i + 1]
            if self.norms is not None:
                c, c_ln = c
                dh, g_ln = self.norms[i].backward(dh, c_ln)
                grads.update(prefixed(f"dqln{i}", g_ln))
            dh, _, g = self.resnets[i].backward(dh, c)
            grads.update(prefixed(f"c{i}", g))
        _, g = self.proj.backward(dh, caches[0])
        grads.update(prefixed("proj", g))
        return grads

    def data_init(self, xn):
        h = self.proj.data_init(self._halves(xn))
        for i, r in enumerate(self.resnets):
            h = r.data_init(h, None)
            if self.norms is not None:
                h = self.norms[i].forward(h)[0]
        return h


class VariationalDequantizer(Module):
    """Flow-based dequantization q(u|x) with a context network (appendix 8.4.1)."""

    def __init__(self, cfg, *, rng, xp=np, dtype=np.float32):
        super().__init__()
        if cfg.dequant_attention is not None:   # the ImageNet-64 launchers: no attention in the dequantizer
            cfg = dataclasses.replace(cfg, use_attention=cfg.dequant_attention)
        h, w, c = cfg.image_shape
        self.levels = 2 ** cfg.n_bits
        self.context = self.add("context", ContextNet(cfg.image_shape, cfg.context_channels, cfg.context_resnets,
                                                      cfg.dropout_p, rng=rng, xp=xp, dtype=dtype,
                                                      layernorm=cfg.context_layernorm))
        half = (h, w // 2, c)
        flows = [CheckerboardSplit()]
        flows += coupling_stage(cfg, half, cfg.dequant_couplings, filters=cfg.dequant_filters,
                                blocks=cfg.dequant_blocks, components=cfg.dequant_components,
                                context_channels=cfg.context_channels, rng=rng, xp=xp, dtype=dtype)
        flows += [Inverse(CheckerboardSplit()), Sigmoid()]
        self.flow = self.add("flow", Compose(flows))

    def forward(self, x, *, rng, train=False):
        """u [B,H,W,C] in (0,1), log q(u|x) [B], cache."""
        ctx, ctx_cache = self.context.forward(x / self.levels, train=train, rng=rng)
        eps = rng.standard_normal(x.shape, dtype=x.dtype)
        u, logdet, flow_cache = self.flow.forward(eps, ctx, train=train, rng=rng)
        logq = standard_normal_logprob(eps) - logdet
        return u, logq, (ctx_cache, flow_cache)

    def backward(self, du, dlogq, cache):
        # log q = log N(eps) - logdet  =>  dL/dlogdet = -dL/dlogq ; eps is a constant.
        ctx_cache, flow_cache = cache
        _, dctx, g_flow = self.flow.backward(du, -dlogq, flow_cache)
        grads = prefixed("flow", g_flow)
        grads.update(prefixed("context", self.context.backward(dctx, ctx_cache)))
        return grads

    def data_init(self, x, *, rng):
        ctx = self.context.data_init(x / self.levels)
        eps = rng.standard_normal(x.shape, dtype=x.dtype)
        return self.flow.data_init(eps, ctx)
