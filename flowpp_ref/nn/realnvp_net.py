"""RealNVP's coupling network: a residual network with batch normalisation and weight normalisation
(Dinh et al. 2017, sec. 4.1: "deep convolutional residual networks in the coupling layers with
rectifier nonlinearity and skip connections"; the release's ``real_nvp_utils.resnet``).

Math (x ``[B, H, W, Cin]``, F = filters, every convolution 3x3 "SAME", weight-normalised)::

    h_0 = conv_in(x)                                                   Cin -> F
    block k = 1..K:
        a = conv_k1(relu(bn_k1(h_{k-1})))                              F -> F
        h_k = h_{k-1} + conv_k2(relu(bn_k2(a)))                        F -> F  (skip connection)
    out = conv_out(relu(bn_out(h_K)))                                  F -> out_channels

``bn`` is batch normalisation with a per-channel scale and shift: batch statistics in training,
running averages in evaluation; it is :class:`~flowpp_ref.bijections.batchnorm.BatchNormFlow` used as a
layer (its log-det is not part of the network, so its backward gets ``dL/dlogdet = 0``); the backward
through the batch statistics is BatchNormFlow's. ``conv`` is :class:`~flowpp_ref.nn.weightnorm.Conv2d`
(``W = g V / ||V||``, data-dependent init).

Backward (dout = dL/dout)::

    relu:  da = dr * [a > 0]
    skip:  dh_{k-1} = dh_k + (block branch's backward of dh_k)
    conv, bn: their own backward (Conv2d.backward, BatchNormFlow.backward with dlogdet = 0)

Init: the convolutions' data-dependent init (:meth:`RealNVPResNet.data_init`, layer by layer on the init
batch, each output to zero mean and unit std) except ``conv_out``, initialised to output std
``out_scale`` (default 0.1: the coupling starts near the identity; RealNVP's release initialises its
output layer with small weights for the same reason); the batch norms' running statistics to those of the
init batch.

Differences from the release, stated: its resnet also feeds the mask (a constant channel) and
concatenates features across scales in some configurations; this network reads ``m * x`` alone (what
:class:`~flowpp_ref.bijections.masked_coupling.MaskedAffineCoupling` passes). The release puts weight norm
and batch norm in every block as here.

Interface (what MaskedAffineCoupling calls): ``h, cache = net.forward(x, context=None, *, train, rng)``;
``dx, dcontext, grads = net.backward(dh, cache)`` (dcontext None); ``net.data_init(x)``;
``in_channels`` / ``out_channels``.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.batchnorm import BatchNormFlow
from flowpp_ref.core.backend import array_module
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.nn.weightnorm import Conv2d, _host_rng

OUT_SCALE = 0.1


def _zero_logdet(x):
    return array_module(x).zeros((x.shape[0],), dtype=x.dtype)


class RealNVPResNet(Module):
    """RealNVP's residual conditioning network; see the module docstring for the math.

    Args:
        in_channels, out_channels: Cin and the output width (for a MaskedAffineCoupling: C and 2C).
        filters: F, the hidden width (RealNVP on CIFAR-10: 64).
        blocks: K residual blocks (RealNVP on CIFAR-10: 8).
        rng: host ``np.random.Generator`` (or int seed) for the convolutions' V.
        out_scale: output std after the data-dependent init (0.1).
        xp, dtype: where and how the parameters are stored.

    Children: ``conv_in``, ``block{k}_bn1``, ``block{k}_conv1``, ``block{k}_bn2``, ``block{k}_conv2``,
    ``bn_out``, ``conv_out``. Shapes: x [B, H, W, in_channels] -> [B, H, W, out_channels].
    Cache: a dict of the layers' caches and the ReLU outputs.
    """

    def __init__(self, in_channels, out_channels, filters=64, blocks=8, *, rng, out_scale=OUT_SCALE, xp=np,
                 dtype=np.float32):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("filters", filters)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(blocks, (int, np.integer)) or isinstance(blocks, bool) or blocks < 0:
            raise ValueError(f"blocks must be an int >= 0, got {blocks!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.filters, self.blocks = int(filters), int(blocks)
        rng = _host_rng(rng)
        F = self.filters
        kw = dict(rng=rng, xp=xp, dtype=dtype)
        self.conv_in = self.add("conv_in", Conv2d(self.in_channels, F, 3, **kw))
        self.block_layers = []
        for k in range(self.blocks):
            self.block_layers.append((
                self.add(f"block{k}_bn1", BatchNormFlow(F, xp=xp, dtype=dtype)),
                self.add(f"block{k}_conv1", Conv2d(F, F, 3, **kw)),
                self.add(f"block{k}_bn2", BatchNormFlow(F, xp=xp, dtype=dtype)),
                self.add(f"block{k}_conv2", Conv2d(F, F, 3, **kw)),
            ))
        self.bn_out = self.add("bn_out", BatchNormFlow(F, xp=xp, dtype=dtype))
        self.conv_out = self.add("conv_out", Conv2d(F, self.out_channels, 3, init_scale=out_scale, **kw))

    def _check(self, x, context, name):
        if context is not None:
            raise FlowInputError(f"RealNVPResNet.{name}: this network takes no context, but one was given")
        check_array(x, f"RealNVPResNet.{name} input", ndim=4)
        if x.shape[3] != self.in_channels:
            raise FlowInputError(f"RealNVPResNet.{name}: expected {self.in_channels} input channels, got shape "
                                 f"{tuple(x.shape)}")

    @staticmethod
    def _bn_relu(bn, h, train):
        a, _, c = bn.forward(h, train=train)
        return array_module(a).maximum(a, 0), c           # r = relu(bn(h))

    def forward(self, x, context=None, *, train=False, rng=None):    # rng unused (no dropout)
        self._check(x, context, "forward")
        h, c_in = self.conv_in.forward(x)
        blocks = []
        for bn1, conv1, bn2, conv2 in self.block_layers:
            r1, cb1 = self._bn_relu(bn1, h, train)
            a, cc1 = conv1.forward(r1)
            r2, cb2 = self._bn_relu(bn2, a, train)
            d, cc2 = conv2.forward(r2)
            blocks.append((cb1, r1, cc1, cb2, r2, cc2))
            h = h + d                                      # h_k = h_{k-1} + branch
        r, cb = self._bn_relu(self.bn_out, h, train)
        out, c_out = self.conv_out.forward(r)
        return out, {"in": c_in, "blocks": blocks, "bn_out": cb, "r": r, "out": c_out}

    def _relu_bn_backward(self, name, bn, dr, r, cb):
        da = dr * (r > 0)                                  # relu: da = dr [a > 0] (r > 0 <=> a > 0)
        dh, _, g = bn.backward(da, _zero_logdet(da), cb)   # the network ignores the log-det: dL/dlogdet = 0
        return dh, prefixed(name, g)

    def backward(self, dout, cache):
        grads = {}
        dr, g = self.conv_out.backward(dout, cache["out"])
        grads.update(prefixed("conv_out", g))
        dh, g = self._relu_bn_backward("bn_out", self.bn_out, dr, cache["r"], cache["bn_out"])
        grads.update(g)
        for k in reversed(range(self.blocks)):
            bn1, conv1, bn2, conv2 = self.block_layers[k]
            cb1, r1, cc1, cb2, r2, cc2 = cache["blocks"][k]
            dr2, g = conv2.backward(dh, cc2)               # branch: d = conv2(relu(bn2(conv1(relu(bn1(h))))))
            grads.update(prefixed(f"block{k}_conv2", g))
            da, g = self._relu_bn_backward(f"block{k}_bn2", bn2, dr2, r2, cb2)
            grads.update(g)
            dr1, g = conv1.backward(da, cc1)
            grads.update(prefixed(f"block{k}_conv1", g))
            dbranch, g = self._relu_bn_backward(f"block{k}_bn1", bn1, dr1, r1, cb1)
            grads.update(g)
            dh = dh + dbranch                              # skip: dh_{k-1} = dh_k + branch backward
        dx, g = self.conv_in.backward(dh, cache["in"])
        grads.update(prefixed("conv_in", g))
        return dx, None, grads

    def data_init(self, x, context=None):
        """Layer by layer on the batch ``x``: each convolution's DDI, each batch norm's running statistics;
        returns the output (evaluation mode)."""
        self._check(x, context, "data_init")
        xp = array_module(x)
        h = self.conv_in.data_init(x)
        for bn1, conv1, bn2, conv2 in self.block_layers:
            a = conv1.data_init(xp.maximum(bn1.data_init(h), 0))
            h = h + conv2.data_init(xp.maximum(bn2.data_init(a), 0))
        return self.conv_out.data_init(xp.maximum(self.bn_out.data_init(h), 0))

    def __repr__(self):
        return (f"RealNVPResNet(in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"filters={self.filters}, blocks={self.blocks})")
