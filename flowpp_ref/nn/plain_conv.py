"""Plain convolutions (no weight norm), as Glow uses them: ``conv2d_same`` and its backward,
:class:`PlainConv2d` (weights ~ N(0, 0.05^2), no bias) and :class:`ZeroConv2d` (the release's
``conv2d_zeros``: weights, bias and a per-channel log-scale all zero at init, output
``(conv(x) + b) * exp(3 logs)``), used by Glow's coupling network (:mod:`flowpp_ref.nn.glow_net`) and
by the learned prior of the multi-scale factor-out (:mod:`flowpp_ref.bijections.factor_out`).

"SAME" padding with zeros, stride 1; x ``[B, H, W, Cin]``, W ``[kh, kw, Cin, Cout]``::

    out[b, p, :] = sum_taps x[b, p + tap, :] @ W[tap] (+ b)
    dW[tap] = sum_{b,p} x[b, p + tap, :]^T dout[b, p, :];   dx[b, q, :] = sum_taps dout[b, q - tap, :] W[tap]^T
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module, asarray
from flowpp_ref.core.module import Module
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.nn.weightnorm import (
    _conv_backward_thin,
    _conv_forward_thin,
    _host_rng,
    _offsets,
    _use_conv_kernels,
    im2col,
)

GLOW_INIT_STD = 0.05        # the release's default_initializer: N(0, 0.05)
LOGSCALE_FACTOR = 3.0       # the release's conv2d_zeros: out *= exp(logs * 3)


# ---------------------------------------------------------------- plain convolution
def conv2d_same(x, W, b=None):
    """``out[b,h,w,o] = sum_{i,j,c} xpad[b, h+i, w+j, c] W[i,j,c,o] (+ b[o])``: "SAME", stride 1, no weight norm.

    Shapes: x [B, H, W, Cin], W [kh, kw, Cin, Cout], b [Cout] or None -> [B, H, W, Cout].
    The same im2col / kernel paths as :class:`~flowpp_ref.nn.weightnorm.Conv2d` (without ``W = g V / ||V||``).
    """
    kh, kw, C, Co = W.shape
    B, H, Wd, _ = x.shape
    if _use_conv_kernels(x, W) and (b is None or isinstance(b, np.ndarray)):
        bias = np.zeros(Co, dtype=np.result_type(x.dtype, W.dtype)) if b is None else b
        return _conv_forward_thin(x, W, bias)
    cols = im2col(x, kh, kw).reshape(B * H * Wd, kh * kw * C)
    out = (cols @ W.reshape(kh * kw * C, Co)).reshape(B, H, Wd, Co)
    return out if b is None else out + b


def conv2d_same_backward(dout, x, W):
    """``(dL/dx, dL/dW)`` of :func:`conv2d_same` given ``dout = dL/dout`` (the bias gradient is ``sum dout``).

    dW = cols(x)^T dout;  dx[b, h+di, w+dj, :] += dout[b, h, w, :] W[i, j]^T  for every tap (i, j).
    """
    xp = array_module(dout)
    kh, kw, C, Co = W.shape
    B, H, Wd, _ = x.shape
    if _use_conv_kernels(dout, x, W):
        return _conv_backward_thin(dout, x, W)
    d2 = dout.reshape(B * H * Wd, Co)
    cols = im2col(x, kh, kw).reshape(B * H * Wd, kh * kw * C)
    dW = (cols.T @ d2).reshape(kh, kw, C, Co)                    # dL/dW = cols^T dout
    del cols
    dx = xp.zeros(x.shape, dtype=dout.dtype)
    for i, j, di, dj, h0, h1, w0, w1 in _offsets(kh, kw, H, Wd):
        t = (d2 @ W[i, j].T).reshape(B, H, Wd, C)                # dout W[i,j]^T, added at the shifted input site
        dx[:, h0 + di:h1 + di, w0 + dj:w1 + dj, :] += t[:, h0:h1, w0:w1, :]
    return dx, dW


def _check_input(x, name, channels):
    check_array(x, f"{name} input", ndim=4)
    if x.shape[-1] != channels:
        raise FlowInputError(f"{name}: expected {channels} input channels, got {x.shape[-1]} "
                             f"(input shape {tuple(x.shape)})")


def _kernel_hw(kernel_size):
    kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
    if int(kh) < 1 or int(kw) < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
    return int(kh), int(kw)


def _check_channels(*counts):
    if any(int(c) < 1 for c in counts):
        raise ValueError(f"channel counts must be positive, got {', '.join(map(str, counts))}")


# ---------------------------------------------------------------- layers
class PlainConv2d(Module):
    """Convolution with plain weights and no bias (the release's ``conv2d`` followed by actnorm).

    Math:   out = conv(x; W), "SAME", stride 1.   Parameter: ``W`` [kh, kw, Cin, Cout] ~ N(0, 0.05^2).
    Cache:  dict(x=input (a reference)).
    Backward: (dx, dW) = conv^T(dout) (:func:`conv2d_same_backward`).
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, *, rng, xp=np, dtype=np.float32):
        super().__init__()
        _check_channels(in_channels, out_channels)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _kernel_hw(kernel_size)
        W = _host_rng(rng).normal(0.0, GLOW_INIT_STD, size=(*self.kernel_size, self.in_channels, self.out_channels))
        self.params["W"] = asarray(W, xp, dtype)

    def forward(self, x, *, train=False, rng=None):     # train/rng unused (layer protocol)
        _check_input(x, "PlainConv2d", self.in_channels)
        return conv2d_same(x, self.params["W"]), {"x": x}

    def backward(self, dout, cache):
        dx, dW = conv2d_same_backward(dout, cache["x"], self.params["W"])
        return dx, {"W": dW}

    def __repr__(self):
        return f"PlainConv2d({self.in_channels} -> {self.out_channels}, kernel={self.kernel_size})"


class ZeroConv2d(Module):
    """The release's ``conv2d_zeros``: ``out = (conv(x; W) + b) * exp(3 * logs)``, all parameters 0 at init.

    Parameters: ``W`` [kh, kw, Cin, Cout], ``b`` [Cout], ``logs`` [Cout] (zeros: the output is exactly 0).
    Cache: dict(x=input, out=output, s=exp(3 logs)).
    Backward::

        dz = dout * s;  db = sum_{b,h,w} dz;  dlogs = 3 * sum_{b,h,w} dout * out;  (dx, dW) = conv^T(dz)
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, *, logscale_factor=LOGSCALE_FACTOR, xp=np,
                 dtype=np.float32):
        super().__init__()
        _check_channels(in_channels, out_channels)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _kernel_hw(kernel_size)
        self.logscale_factor = float(logscale_factor)
        self.params["W"] = asarray(np.zeros((*self.kernel_size, self.in_channels, self.out_channels)), xp, dtype)
        self.params["b"] = asarray(np.zeros(self.out_channels), xp, dtype)
        self.params["logs"] = asarray(np.zeros(self.out_channels), xp, dtype)

    def forward(self, x, *, train=False, rng=None):     # train/rng unused (layer protocol)
        _check_input(x, "ZeroConv2d", self.in_channels)
        xp = array_module(x)
        s = xp.exp(self.logscale_factor * self.params["logs"])       # s = exp(3 logs)
        out = conv2d_same(x, self.params["W"], self.params["b"]) * s  # out = (conv(x) + b) * s
        return out, {"x": x, "out": out, "s": s}

    def backward(self, dout, cache):
        x, out, s = cache["x"], cache["out"], cache["s"]
        if tuple(dout.shape) != tuple(out.shape):
            raise FlowInputError(f"ZeroConv2d.backward: dout has shape {tuple(dout.shape)}, "
                                 f"expected {tuple(out.shape)}")
        dz = dout * s                                                 # dL/dz = dout * s  (z = conv(x) + b)
        db = dz.sum(axis=(0, 1, 2))                                   # dL/db = sum dz
        dlogs = self.logscale_factor * (dout * out).sum(axis=(0, 1, 2))   # dL/dlogs = 3 sum dout * out
        dx, dW = conv2d_same_backward(dz, x, self.params["W"])
        return dx, {"W": dW, "b": db, "logs": dlogs}

    def __repr__(self):
        return f"ZeroConv2d({self.in_channels} -> {self.out_channels}, kernel={self.kernel_size})"


# ---------------------------------------------------------------- the network
