"""The Flow++ coupling layer: mixture-of-logistics CDF coupling conditioned by a
convolution + self-attention network (paper appendix 8.4, ``MixLogisticAttnCoupling``),
and its affine ablation.

Math (x = (c, e), both ``[B, H, W, C]``; K mixture components)::

    raw = NN(c, context)                    [B, H, W, C * (2 + 3K)]  -> reshape [B, H, W, C, 2 + 3K]
    a   = tanh(raw[..., 0]),  b = raw[..., 1]
    logits, means, logscales = split(raw[..., 2:], 3 parts of K on the last axis)
    logscales = max(logscales, -7)          (the paper's clamp; zero gradient below -7)
    y_e = exp(a) * logit(MixLogCDF(e; logits, means, logscales)) + b        (with_affine)
    logdet = sum_{h,w,c} [ log mixpdf(e) - log F - log(1 - F) + a ]
    y = (c, y_e)

Affine ablation (:class:`AffineAttnCoupling`): raw has ``2C`` channels, ``y_e = exp(a) e + b``,
``logdet = sum a``.

The elementwise transforms and their derivatives live in
:mod:`flowpp_ref.bijections.coupling_transforms`; this module adds the network, the
parameter heads (tanh, split, clamp) and the chain rule back into the network::

    dL/draw[..., 0]      = dL/da * (1 - a^2)
    dL/draw[..., 1]      = dL/db
    dL/draw[..., logits] = dL/dlogits,   dL/draw[..., means] = dL/dmeans
    dL/draw[..., lsc]    = dL/dlogscales * [raw_lsc >= -7]     (TF's maximum passes ties to x)
    dL/dc = dL/dy_c (identity path) + NN'(c)^T dL/draw

Cache: ``dict(net=<network cache>, a=tanh(raw_a), lsc_on=[raw_lsc >= -7] (bool),
transform=<coupling_transforms cache>)``. The transform cache holds the views ``logits`` and
``means`` of the raw network output (so that array, ``[B, H, W, C * (2 + 3K)]``, stays alive)
and the clamped ``logscales``; nothing of the heads is recomputed in backward.

``inverse`` runs the network on c in eval mode and inverts the elementwise transform
(``inverse_method``: "hybrid" (safeguarded Newton) or "bisection", the release's method).
``inverse_with_cache`` is not implemented: the coupling is never differentiated through
its inverse in Flow++ (the base class raises).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.bijections.coupling_transforms import (affine_coupling_backward, affine_coupling_forward,
                                                       affine_coupling_inverse, mixlogistic_coupling_backward,
                                                       mixlogistic_coupling_forward, mixlogistic_coupling_inverse)
from flowpp_ref.core.backend import array_module
from flowpp_ref.core.module import prefixed
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.nn.network import ConditioningNetwork

LOGSCALE_MIN = -7.0   # the paper's clamp: ml_logscales = tf.maximum(ml_logscales, -7.)


class _AttnCoupling(Bijection):
    """Shared part: the conditioning network on c, the checks, and dc = dy_c + NN'(c)^T draw."""

    params_per_channel = 2

    def __init__(self, shape, filters, blocks, context_channels=None, use_attention=True, use_nin=True,
                 dropout_p=0.0, init_scale_out=0.1, *, rng, xp=np, dtype=np.float32, mixer="attention",
                 final_concat_elu=False):
        super().__init__()
        H, W, C = (int(s) for s in shape)
        self.shape = (H, W, C)
        self.context_channels = None if context_channels is None else int(context_channels)
        self.net = self.add("net", ConditioningNetwork(
            (H, W, C), C * self.params_per_channel, filters, blocks, context_channels=context_channels,
            use_attention=use_attention, use_nin=use_nin, dropout_p=dropout_p, init_scale_out=init_scale_out,
            rng=rng, xp=xp, dtype=dtype, mixer=mixer, final_concat_elu=final_concat_elu))

    def _split_input(self, x, what):
        if not isinstance(x, tuple) or len(x) != 2:
            raise FlowInputError(f"{type(self).__name__}.{what}: expected a tuple (c, e) of two arrays, "
                                 f"got {type(x).__name__}")
        c, e = x
        check_array(c, f"{type(self).__name__} condition half c", ndim=4)
        check_array(e, f"{type(self).__name__} transformed half", ndim=4)
        if tuple(c.shape) != tuple(e.shape) or tuple(c.shape[1:]) != self.shape:
            raise FlowInputError(f"{type(self).__name__}: halves have shapes {tuple(c.shape)} and {tuple(e.shape)}, "
                                 f"expected both [B, {', '.join(map(str, self.shape))}]")
        return c, e

    def _raw(self, c, raw):
        B = c.shape[0]
        return raw.reshape(B, *self.shape, self.params_per_channel)

    def forward(self, x, context=None, *, train=False, rng=None):
        c, e = self._split_input(x, "forward")
        raw, ncache = self.net.forward(c, context, train=train, rng=rng)
        y_e, logdet, cache = self._transform(e, self._raw(c, raw))
        cache["net"] = ncache
        return (c, y_e), logdet, cache

    def backward(self, dy, dlogdet, cache):
        dy_c, dy_e = dy
        draw, de = self._head_backward(dy_e, dlogdet, cache)
        B = dy_c.shape[0]
        dc_net, dctx, g = self.net.backward(draw.reshape(B, *self.shape[:2], -1), cache["net"])
        dc = dy_c + dc_net                      # identity path + network input gradient
        return (dc, de), dctx, prefixed("net", g)

    def data_init(self, x, context=None):
        """DDI of the network on the init batch (c, context); returns y (eval mode)."""
        c, e = self._split_input(x, "data_init")
        raw = self.net.data_init(c, context)
        y_e, _, _ = self._transform(e, self._raw(c, raw))
        return (c, y_e)


class MixLogisticAttnCoupling(_AttnCoupling):
    """Mixture-of-logistics CDF coupling (Flow++); see the module docstring.

    ``shape`` is (H, W, C) of each half. ``y, logdet, cache = forward((c, e), context, train, rng)``;
    ``(c, e), logdet_inv = inverse((c, y_e), context)``;
    ``(dc, de), dcontext, grads = backward((dy_c, dy_e), dlogdet, cache)``.
    Parameters: those of the child ``net`` (a :class:`ConditioningNetwork`).
    """

    def __init__(self, shape, filters, blocks, components, with_affine=True, context_channels=None,
                 use_attention=True, use_nin=True, dropout_p=0.0, inverse_method="hybrid", init_scale_out=0.1,
                 *, rng, xp=np, dtype=np.float32, mixer="attention", final_concat_elu=False, mixture_dtype=None):
        # mixture_dtype (the CLI's --mixture-dtype float64): the mixture CDF/PDF, its inverse and
        # backward run in that dtype inside an otherwise float32 model: inputs are cast up, results
        # cast back (the release's launchers run the mixture in float32; at_least_float32 only lifts
        # float16). Array-generic (astype), so the CuPy path is the same code (not run on a GPU).
        self.mixture_dtype = None if mixture_dtype is None else np.dtype(mixture_dtype)
        if inverse_method not in ("hybrid", "bisection"):
            raise ValueError(f"inverse_method must be 'hybrid' or 'bisection', got {inverse_method!r}")
        self.components = int(components)
        if self.components < 1:
            raise ValueError(f"components must be positive, got {components}")
        self.params_per_channel = 2 + 3 * self.components
        self.with_affine = bool(with_affine)
        self.inverse_method = inverse_method
        super().__init__(shape, filters, blocks, context_channels, use_attention, use_nin, dropout_p,
                         init_scale_out, rng=rng, xp=xp, dtype=dtype, mixer=mixer,
                         final_concat_elu=final_concat_elu)

    # ------------------------------------------------------------- heads
    def _heads(self, raw5):
        """raw [B,H,W,C,2+3K] -> a, b, logits, means, logscales, lsc_on (clamp mask)."""
        xp = array_module(raw5)
        K = self.components
        a = xp.tanh(raw5[..., 0])
        b = raw5[..., 1]
        logits = raw5[..., 2:2 + K]
        means = raw5[..., 2 + K:2 + 2 * K]
        lsc_raw = raw5[..., 2 + 2 * K:]
        lsc_on = lsc_raw >= LOGSCALE_MIN
        logscales = xp.maximum(lsc_raw, raw5.dtype.type(LOGSCALE_MIN))
        return a, b, logits, means, logscales, lsc_on

    def _mix(self, dtype):
        """The dtype of the mixture computation, or None when it is the model's."""
        md = self.mixture_dtype
        return None if md is None or md == dtype else md

    def _transform(self, e, raw5):
        a, b, logits, means, logscales, lsc_on = self._heads(raw5)
        md = self._mix(e.dtype)
        args = (e, a, b, logits, means, logscales)
        if md is not None:                                   # cast up (the cache then holds these copies)
            args = tuple(v.astype(md) for v in args)
        y_e, logdet, tcache = mixlogistic_coupling_forward(*args, with_affine=self.with_affine)
        if md is not None:
            y_e, logdet = y_e.astype(e.dtype), logdet.astype(e.dtype)
        return y_e, logdet, dict(a=a, lsc_on=lsc_on, transform=tcache)

    def _head_backward(self, dy_e, dlogdet, cache):
        xp = array_module(dy_e)
        K = self.components
        md = self._mix(dy_e.dtype)
        if md is not None:                                   # backward in the mixture dtype, then cast back
            g = mixlogistic_coupling_backward(dy_e.astype(md), dlogdet.astype(md), cache["transform"])
            g = {k: v.astype(dy_e.dtype) for k, v in g.items()}
        else:
            g = mixlogistic_coupling_backward(dy_e, dlogdet, cache["transform"])
        a = cache["a"]
        draw = xp.empty((*a.shape, self.params_per_channel), dtype=dy_e.dtype)
        if self.with_affine:
            draw[..., 0] = g["a"] * (1 - a * a)              # d tanh = 1 - tanh^2
            draw[..., 1] = g["b"]
        else:                                                 # a, b computed but unused (as in the paper)
            draw[..., 0] = 0
            draw[..., 1] = 0
        draw[..., 2:2 + K] = g["logits"]
        draw[..., 2 + K:2 + 2 * K] = g["means"]
        draw[..., 2 + 2 * K:] = g["logscales"] * cache["lsc_on"]   # max(raw, -7): gradient 0 below
        return draw, g["e"]

    def transform_parameters(self, c, context=None):
        """What the network predicts from the condition half ``c`` (eval mode), as the transform uses it:
        ``{"a", "b"}`` (the affine part; a = tanh of the raw output) [B, H, W, C] and ``{"logits",
        "means", "logscales"}`` (logscales clamped at LOGSCALE_MIN) [B, H, W, C, K]."""
        raw, _ = self.net.forward(c, context)
        a, b, logits, means, logscales, _ = self._heads(self._raw(c, raw))
        return dict(a=a, b=b, logits=logits, means=means, logscales=logscales)

    # ------------------------------------------------------------- protocol

    def inverse(self, y, context=None):
        return self._inverse(y, context, logdet=True)

    def sample_inverse(self, y, context=None):
        return self._inverse(y, context, logdet=False)[0]      # no mixture evaluation for the log-det

    def _inverse(self, y, context, logdet):
        c, y_e = self._split_input(y, "inverse")
        raw, _ = self.net.forward(c, context)
        a, b, logits, means, logscales, _ = self._heads(self._raw(c, raw))
        args = (y_e, a, b, logits, means, logscales)
        md = self._mix(y_e.dtype)
        if md is not None:
            args = tuple(v.astype(md) for v in args)
        e, logdet_inv = mixlogistic_coupling_inverse(*args, with_affine=self.with_affine, method=self.inverse_method,
                                                     logdet=logdet)
        if md is not None:
            e = e.astype(y_e.dtype)
            logdet_inv = None if logdet_inv is None else logdet_inv.astype(y_e.dtype)
        return (c, e), logdet_inv

    def __repr__(self):
        n = self.net
        return (f"MixLogisticAttnCoupling(shape={self.shape}, filters={n.filters}, blocks={n.blocks}, "
                f"components={self.components}, with_affine={self.with_affine}, "
                f"use_attention={n.use_attention}, context_channels={self.context_channels})")


class AffineAttnCoupling(_AttnCoupling):
    """The paper's affine-coupling ablation: ``y_e = exp(a) e + b``, a = tanh(raw_a), same network
    (with ``2C`` output channels). Same protocol as :class:`MixLogisticAttnCoupling`."""

    params_per_channel = 2

    def _transform(self, e, raw5):
        xp = array_module(raw5)
        a = xp.tanh(raw5[..., 0])
        y_e, logdet, tcache = affine_coupling_forward(e, a, raw5[..., 1])
        return y_e, logdet, dict(a=a, transform=tcache)

    def _head_backward(self, dy_e, dlogdet, cache):
        xp = array_module(dy_e)
        g = affine_coupling_backward(dy_e, dlogdet, cache["transform"])
        a = cache["a"]
        draw = xp.empty((*a.shape, 2), dtype=dy_e.dtype)
        draw[..., 0] = g["a"] * (1 - a * a)                  # d tanh = 1 - tanh^2
        draw[..., 1] = g["b"]
        return draw, g["e"]

    def inverse(self, y, context=None):
        c, y_e = self._split_input(y, "inverse")
        raw, _ = self.net.forward(c, context)
        raw5 = self._raw(c, raw)
        xp = array_module(raw5)
        e, logdet_inv = affine_coupling_inverse(y_e, xp.tanh(raw5[..., 0]), raw5[..., 1])
        return (c, e), logdet_inv

    def __repr__(self):
        n = self.net
        return (f"AffineAttnCoupling(shape={self.shape}, filters={n.filters}, blocks={n.blocks}, "
                f"use_attention={n.use_attention}, context_channels={self.context_channels})")
