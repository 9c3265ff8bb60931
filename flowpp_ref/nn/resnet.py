"""Gated residual block of the Flow++ conditioning network (paper appendix 8.3, ``gated_resnet``).

Math (F = filters)::

    c1  = conv3x3(concat_elu(x))                 [B,H,W,F]
    c1 += nin(concat_elu(a))                     (only with a context a)
    r   = dropout(concat_elu(c1))                [B,H,W,2F]
    c2  = nin(r)  (conv3x3 if not use_nin)       [B,H,W,2F], init_scale 0.1
    out = x + gate(c2)                           [B,H,W,F]

Backward (the residual branch sums visibly)::

    dx = dout + concat_elu'(x)^T [conv1^T (dc1)],   dc1 = concat_elu'(c1)^T dropout^T nin2^T gate'^T dout
    da = concat_elu'(a)^T [a_proj^T (dc1)]
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.nn.activations import concat_elu, concat_elu_backward, concat_elu_forward, gate_backward, gate_forward
from flowpp_ref.nn.dropout import Dropout, dropout_apply
from flowpp_ref.nn.weightnorm import NIN, Conv2d


class GatedResNet(Module):
    """``gated_resnet(x, a)`` with weight-normalised convolutions.

    Children: ``c1`` Conv2d(2F -> F, 3x3); ``a_proj`` NIN(2*context_channels -> F)
    when ``context_channels`` is given; ``c2`` NIN (or Conv2d 3x3 if not use_nin)
    (2F -> 2F, init_scale 0.1); ``dropout`` Dropout(dropout_p).

    Shapes: x [B,H,W,F], a [B,H,W,Ca] -> out [B,H,W,F].

    Cache (per call, besides references to x and a, which the caller holds anyway):
    ``c1`` pre-activation [B,H,W,F], ``c2`` [B,H,W,2F] (the gate's input), the
    dropout mask [B,H,W,2F] bool (training only), and the sub-layers' tiny
    weight caches. The inputs of c1, a_proj and c2 (concat_elu(x), concat_elu(a),
    dropout(concat_elu(c1)), each 2x the width of what they come from) are NOT
    stored: the backward recomputes them (elementwise passes).
    """

    def __init__(self, filters, context_channels=None, use_nin=True, dropout_p=0.0, *, rng, xp=np,
                 dtype=np.float32):
        super().__init__()
        F = int(filters)
        if F < 1:
            raise ValueError(f"filters must be positive, got {filters}")
        self.filters = F
        self.context_channels = None if context_channels is None else int(context_channels)
        self.use_nin = bool(use_nin)
        kw = dict(rng=rng, xp=xp, dtype=dtype)
        self.c1 = self.add("c1", Conv2d(2 * F, F, 3, **kw))
        self.a_proj = None
        if self.context_channels is not None:
            self.a_proj = self.add("a_proj", NIN(2 * self.context_channels, F, **kw))
        if self.use_nin:
            self.c2 = self.add("c2", NIN(2 * F, 2 * F, init_scale=0.1, **kw))
        else:
            self.c2 = self.add("c2", Conv2d(2 * F, 2 * F, 3, init_scale=0.1, **kw))
        self.dropout = self.add("dropout", Dropout(dropout_p))

    # ----------------------------------------------------------------- checks
    def _check(self, x, a):
        check_array(x, "GatedResNet input x", ndim=4)
        if x.shape[-1] != self.filters:
            raise FlowInputError(f"GatedResNet: x has {x.shape[-1]} channels, expected filters={self.filters} "
                                 f"(shape {tuple(x.shape)})")
        if self.context_channels is None:
            if a is not None:
                raise FlowInputError("GatedResNet was built without a context (context_channels=None) "
                                     "but a context a was given")
            return
        if a is None:
            raise FlowInputError(f"GatedResNet was built with context_channels={self.context_channels}: "
                                 "the context a is required")
        check_array(a, "GatedResNet context a", ndim=4)
        if tuple(a.shape[:3]) != tuple(x.shape[:3]):
            raise FlowInputError(f"GatedResNet: context a has shape {tuple(a.shape)}, x has {tuple(x.shape)}; "
                                 "batch, height and width must agree")
        if a.shape[-1] != self.context_channels:
            raise FlowInputError(f"GatedResNet: context a has {a.shape[-1]} channels, "
                                 f"expected context_channels={self.context_channels}")

    # ---------------------------------------------------------------- forward
    def forward(self, x, a=None, *, train=False, rng=None):
        self._check(x, a)
        c1, c1_cache = self.c1.forward(concat_elu(x))
        ap_cache = None
        if a is not None:
            p, ap_cache = self.a_proj.forward(concat_elu(a))
            c1 = c1 + p
        r, _ = concat_elu_forward(c1)
        r, mask = self.dropout.forward(r, train=train, rng=rng)
        c2, c2_cache = self.c2.forward(r)
        del r
        g, _ = gate_forward(c2)
        out = x + g
        # the sub-layers' inputs are dropped from their caches (recomputed in backward)
        cache = dict(x=x, a=a, c1=c1, c2=c2, mask=mask,
                     c1_cache={**c1_cache, "x": None}, c2_cache={**c2_cache, "x": None},
                     ap_cache=None if ap_cache is None else {**ap_cache, "x": None})
        return out, cache

    # --------------------------------------------------------------- backward
    def backward(self, dout, cache):
        x, a, c1, c2, mask = cache["x"], cache["a"], cache["c1"], cache["c2"], cache["mask"]
        if tuple(dout.shape) != tuple(x.shape):
            raise FlowInputError(f"GatedResNet.backward: dout has shape {tuple(dout.shape)}, "
                                 f"expected {tuple(x.shape)}")
        grads = {}
        # out = x + gate(c2)
        dc2 = gate_backward(dout, c2)
        # c2 = nin(r), r = dropout(concat_elu(c1)) recomputed
        r = concat_elu(c1)
        if mask is not None:
            r = dropout_apply(r, mask, self.dropout.p)
        dr, g2 = self.c2.backward(dc2, {**cache["c2_cache"], "x": r})
        del r, dc2
        grads.update(prefixed("c2", g2))
        dr, _ = self.dropout.backward(dr, mask)
        # c1 (post-sum) -> concat_elu
        dc1 = concat_elu_backward(dr, c1)
        del dr
        da = None
        if a is not None:
            dha, gap = self.a_proj.backward(dc1, {**cache["ap_cache"], "x": concat_elu(a)})
            grads.update(prefixed("a_proj", gap))
            da = concat_elu_backward(dha, a)
        dh, g1 = self.c1.backward(dc1, {**cache["c1_cache"], "x": concat_elu(x)})
        grads.update(prefixed("c1", g1))
        # dL/dx = dout (residual) + concat_elu'(x)^T dh
        dx = dout + concat_elu_backward(dh, x)
        return dx, da, grads

    # -------------------------------------------------------------- data init
    def data_init(self, x, a=None):
        """DDI of c1, a_proj, c2 in order on the init batch (eval mode: no dropout); returns the output."""
        self._check(x, a)
        c1 = self.c1.data_init(concat_elu(x))
        if a is not None:
            c1 = c1 + self.a_proj.data_init(concat_elu(a))
        c2 = self.c2.data_init(concat_elu(c1))
        return x + gate_forward(c2)[0]
