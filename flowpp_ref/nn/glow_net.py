"""Glow's coupling network ``NN()`` (Kingma & Dhariwal 2018, sec. 3.3; the release's ``model.py`` ``f()``).

Math (x ``[B, H, W, Cin]``, F = filters)::

    a1 = actnorm1(conv3x3(x; W1))          W1 [3, 3, Cin, F], no bias (actnorm supplies it)
    r1 = relu(a1)
    a2 = actnorm2(conv1x1(r1; W2))         W2 [1, 1, F, F], no bias
    r2 = relu(a2)
    out = (conv3x3(r2; Wz) + bz) * exp(3 * logs)     ZeroConv2d, F -> out_channels

with ``actnorm(v) = (v + b) * exp(logs)`` per channel (:class:`~flowpp_ref.bijections.actnorm.ChannelActNorm`,
Glow sec. 3.1; its log-det is not used inside a network) and "SAME" padding, stride 1.

Init (the release's ``conv2d`` / ``conv2d_zeros``): W1, W2 ~ N(0, 0.05^2) drawn from a host
``np.random.Generator``; actnorm ``b = 0, logs = 0`` until :meth:`GlowCouplingNet.data_init`
(per-channel zero mean / unit std on the init batch, layer by layer); ``Wz = 0, bz = 0, logs = 0``,
so the network's output is exactly 0 and a coupling built on it starts as the identity (Glow sec. 3.3,
"zero initialization"). ``logs`` of the ZeroConv2d is scaled by ``logscale_factor = 3`` as in the release.

Backward (dout = dL/dout; ``conv^T`` = the convolution's backward, :func:`conv2d_same_backward`)::

    ZeroConv2d:  dz = dout * exp(3 logs);  dbz = sum_{b,h,w} dz;  dlogs = 3 * sum_{b,h,w} dout * out;
                 (dr2, dWz) = conv^T(dz)
    ReLU:        da = dr * [r > 0]
    actnorm:     dv = da * exp(logs);  db = sum dv;  dlogs = sum da * a        (ChannelActNorm.backward, dlogdet = 0)
    plain conv:  dx = sum_taps dv(shifted) W^T;  dW = cols(x)^T dv

Differences from the release: its ``conv2d`` with "SAME" padding adds an edge-indicator input
channel (``add_edge_padding``, ``edge_bias=True``); this module pads with zeros only. The release
stores actnorm/zero-conv log-scales divided by ``logscale_factor``; the ZeroConv2d keeps that
(``exp(3 logs)``), the actnorms store ``logs`` itself (see ChannelActNorm).

Interface (what :class:`~flowpp_ref.bijections.masked_coupling.MaskedAffineCoupling` calls):
``h, cache = net.forward(x, context=None, *, train=False, rng=None)``;
``dx, dcontext, grads = net.backward(dh, cache)`` (dcontext is None: no context);
``h = net.data_init(x)``; ``in_channels`` / ``out_channels`` attributes; parameters
``conv1.W``, ``norm1.b``, ``norm1.logs``, ``conv2.W``, ``norm2.b``, ``norm2.logs``,
``zero_conv.W``, ``zero_conv.b``, ``zero_conv.logs``.

Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018,
sec. 3.3 (affine coupling, zero initialisation) and sec. 3.1 (actnorm).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.actnorm import ChannelActNorm
from flowpp_ref.core.backend import array_module
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import FlowInputError
from flowpp_ref.nn.plain_conv import PlainConv2d, ZeroConv2d, _check_channels, _check_input
from flowpp_ref.nn.weightnorm import _host_rng


class GlowCouplingNet(Module):
    """Glow's ``NN()`` of the affine coupling; see the module docstring for the math.

    Args:
        in_channels: Cin of the input (for a MaskedAffineCoupling: C of the image).
        out_channels: channels of the output (MaskedAffineCoupling: 2C, or C when additive).
        filters: the hidden width F (Glow: 512).
        rng: host ``np.random.Generator`` (or int seed) for W1, W2.
        xp, dtype: where and how the parameters are stored.

    Children: ``conv1`` (PlainConv2d 3x3), ``norm1`` (ChannelActNorm), ``conv2`` (PlainConv2d 1x1),
    ``norm2`` (ChannelActNorm), ``zero_conv`` (ZeroConv2d 3x3).
    Shapes: x [B, H, W, in_channels] -> [B, H, W, out_channels].
    Cache: (conv1, norm1, r1, conv2, norm2, r2, zero_conv) caches; r1, r2 are the ReLU outputs.
    """

    def __init__(self, in_channels, out_channels, filters=512, *, rng, xp=np, dtype=np.float32):
        super().__init__()
        _check_channels(in_channels, out_channels, filters)
        self.in_channels, self.out_channels, self.filters = int(in_channels), int(out_channels), int(filters)
        rng = _host_rng(rng)             # one generator for both convolutions (an int seed would repeat draws)
        F = self.filters
        self.conv1 = self.add("conv1", PlainConv2d(self.in_channels, F, 3, rng=rng, xp=xp, dtype=dtype))
        self.norm1 = self.add("norm1", ChannelActNorm(F, xp=xp, dtype=dtype))
        self.conv2 = self.add("conv2", PlainConv2d(F, F, 1, rng=rng, xp=xp, dtype=dtype))
        self.norm2 = self.add("norm2", ChannelActNorm(F, xp=xp, dtype=dtype))
        self.zero_conv = self.add("zero_conv", ZeroConv2d(F, self.out_channels, 3, xp=xp, dtype=dtype))

    def _check(self, x, context, name):
        if context is not None:
            raise FlowInputError(f"GlowCouplingNet.{name}: this network takes no context, but one was given")
        _check_input(x, f"GlowCouplingNet.{name}", self.in_channels)

    def forward(self, x, context=None, *, train=False, rng=None):    # train/rng unused (no dropout)
        self._check(x, context, "forward")
        xp = array_module(x)
        v1, c1 = self.conv1.forward(x)
        a1, _, n1 = self.norm1.forward(v1)              # a = (v + b) exp(logs); log-det unused
        r1 = xp.maximum(a1, 0)                          # r = relu(a)
        v2, c2 = self.conv2.forward(r1)
        a2, _, n2 = self.norm2.forward(v2)
        r2 = xp.maximum(a2, 0)
        out, cz = self.zero_conv.forward(r2)
        return out, (c1, n1, r1, c2, n2, r2, cz)

    def backward(self, dout, cache):
        c1, n1, r1, c2, n2, r2, cz = cache
        xp = array_module(dout)
        zero_ld = xp.zeros((dout.shape[0],), dtype=dout.dtype)   # dL/dlogdet = 0: actnorm's log-det is unused
        grads = {}
        dr2, g = self.zero_conv.backward(dout, cz)
        grads.update(prefixed("zero_conv", g))
        da2 = dr2 * (r2 > 0)                                     # relu: da = dr * [a > 0]
        dv2, _, g = self.norm2.backward(da2, zero_ld, n2)        # dv = da exp(logs); db = sum dv; dlogs = sum da a
        grads.update(prefixed("norm2", g))
        dr1, g = self.conv2.backward(dv2, c2)
        grads.update(prefixed("conv2", g))
        da1 = dr1 * (r1 > 0)
        dv1, _, g = self.norm1.backward(da1, zero_ld, n1)
        grads.update(prefixed("norm1", g))
        dx, g = self.conv1.backward(dv1, c1)
        grads.update(prefixed("conv1", g))
        return dx, None, grads

    def data_init(self, x, context=None):
        """Glow's data-dependent init, layer by layer on the batch ``x``: each actnorm makes its input
        zero-mean / unit-std per channel (ChannelActNorm.data_init); returns the output (0 at init)."""
        self._check(x, context, "data_init")
        xp = array_module(x)
        h = xp.maximum(self.norm1.data_init(self.conv1.forward(x)[0]), 0)
        h = xp.maximum(self.norm2.data_init(self.conv2.forward(h)[0]), 0)
        return self.zero_conv.forward(h)[0]

    def __repr__(self):
        return (f"GlowCouplingNet(in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"filters={self.filters})")
