"""Elementwise bijections: ImgProc (pixels -> logit space) and Sigmoid.

Both act on one array whose first axis is the batch (``[B, H, W, C]`` in the
flow, any rank >= 1 works); the per-sample log-det sums over all other axes.

Stable forms used throughout (no clamping):

* ``softplus(x) = log(1 + e^x) = logaddexp(0, x)``;
* ``sigmoid(x)`` from ``e^{-|x|}`` so that no exponential overflows;
* ``log sigmoid'(x) = log s + log(1 - s) = -softplus(x) - softplus(-x)``.

References: Flow++ appendix 8.1 (``ImgProc``, ``Sigmoid``).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.core.backend import array_module, to_numpy
from flowpp_ref.core.validation import DeferredChecks, FlowInputError, check_array, check_finite

# ImgProc constants: [0, 256] -> [0.05, 0.95] -> logit space.
IMG_MAX = 256.0
IMG_LO = 0.05
IMG_SCALE = 0.9 / IMG_MAX          # ds/dy of s = 0.05 + 0.9 * y / 256
LOG_IMG_SCALE = float(np.log(IMG_SCALE))


# ------------------------------------------------------------------ helpers
def softplus(x):
    """log(1 + e^x), stable for any x."""
    xp = array_module(x)
    return xp.logaddexp(0.0, x).astype(x.dtype, copy=False)


def sigmoid(x):
    """1 / (1 + e^-x) without overflow: uses ``e^{-|x|} <= 1`` on both branches."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def _sum_per_sample(a):
    """Sum over every axis but the first: shape (B,)."""
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _check_batched(x, name):
    check_array(x, name)
    if x.ndim < 1:
        raise FlowInputError(f"{name}: expected an array with a batch axis, got shape {tuple(x.shape)}")
    return x


def _reject_tuple(x, name):
    if isinstance(x, tuple):
        shapes = [tuple(getattr(a, "shape", ())) for a in x]
        raise FlowInputError(f"{name}: expected one array, got a tuple of shapes {shapes}")


def _check_open_unit(y):
    xp = array_module(y)
    mn, mx = float(to_numpy(xp.min(y))), float(to_numpy(xp.max(y)))
    if not (mn > 0.0 and mx < 1.0):   # also false for nan
        raise FlowInputError(
            f"Sigmoid.inverse: values must lie in the open interval (0, 1), got min {mn:g}, max {mx:g}")


# ------------------------------------------------------------------ ImgProc
class ImgProc(Bijection):
    """Pixels in [0, 256] to logit space: ``z = logit(0.05 + 0.9 * y / 256)``.

    Math (per element, ``a = 0.9/256``, ``s = 0.05 + a*y = sigmoid(z)``)::

        z      = log s - log(1 - s)
        logdet = log a + softplus(z) + softplus(-z)   (= log a - log s - log(1-s))
        inverse: y = (sigmoid(z) - 0.05) / a,  logdet_inv = -(that), summed per sample

    The data are ``x + u`` with integer ``x`` in {0..255} and ``u`` in [0, 1),
    so the values lie in [0, 256); the check accepts the closed interval
    [0, 256] like the paper's commented-out assertion. ``forward`` raises
    :class:`FlowInputError` on non-finite values or values outside [0, 256]
    (two host syncs on CuPy). ``check_input=False`` skips that check: the whole model
    uses it, because :meth:`flowpp_ref.model.FlowPP.prepare` has validated the integer
    pixels (on the host, before the upload) and ``x + u`` lies in [0, 256] by
    construction; a non-finite ``u`` from a diverging dequantizer then reaches the
    loss, and the training loop skips that step instead of failing inside it.
    ``inverse`` accepts any finite z (no clipping of samples back into [0, 256]).

    Shapes: ``y`` [B, ...] -> ``z`` same shape; logdet (B,).
    Cache: forward keeps ``s`` (= sigmoid(z)); inverse keeps ``s = sigmoid(z)``.
    """

    def __init__(self, check_input: bool = True):
        super().__init__()
        self.check_input = bool(check_input)

    def forward(self, x, context=None, *, train=False, rng=None):
        _reject_tuple(x, "ImgProc.forward")
        _check_batched(x, "ImgProc.forward")
        xp = array_module(x)
        if self.check_input:                       # one host read on CuPy
            checks = DeferredChecks(xp)
            checks.finite(x, "ImgProc.forward (pixel values)")
            checks.range(x, "ImgProc.forward (pixel values)", 0.0, IMG_MAX, hi_inclusive=True)
            checks.run()
        s = IMG_LO + IMG_SCALE * x
        z = xp.log(s) - xp.log1p(-s)
        ld = LOG_IMG_SCALE + softplus(z) + softplus(-z)
        return z, _sum_per_sample(ld), {"s": s}

    def backward(self, dy, dlogdet, cache):
        s = cache["s"]
        dz_dy = IMG_SCALE / (s * (1.0 - s))              # dz/dy = a / (s (1 - s))
        bshape = (-1,) + (1,) * (s.ndim - 1)
        # d logdet_elem / dz = sigmoid(z) - sigmoid(-z) = 2s - 1
        # dL/dy = (dL/dz + dL/dlogdet * (2s - 1)) * a / (s (1 - s))
        dx = (dy + dlogdet.reshape(bshape) * (2.0 * s - 1.0)) * dz_dy
        return dx, None, {}

    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        _reject_tuple(y, "ImgProc.inverse")
        _check_batched(y, "ImgProc.inverse")
        check_finite(y, "ImgProc.inverse")
        s = sigmoid(y)
        x = (s - IMG_LO) / IMG_SCALE
        ld = -softplus(y) - softplus(-y) - LOG_IMG_SCALE   # log s + log(1-s) - log a
        return x, _sum_per_sample(ld), {"s": s}

    def inverse_backward(self, dx, dlogdet, cache):
        s = cache["s"]
        bshape = (-1,) + (1,) * (s.ndim - 1)
        # x = (s - 0.05)/a, dx/dz = s(1-s)/a ; d logdet_inv_elem / dz = 1 - 2s
        # dL/dz = dL/dx * s(1-s)/a + dL/dlogdet * (1 - 2s)
        dz = dx * (s * (1.0 - s) / IMG_SCALE) + dlogdet.reshape(bshape) * (1.0 - 2.0 * s)
        return dz, None, {}


# ------------------------------------------------------------------ Sigmoid
class Sigmoid(Bijection):
    """``y = sigmoid(x)``; ``Inverse(Sigmoid())`` is the logit as a bijection.

    Math (per element, summed per sample)::

        forward: y = sigmoid(x),      logdet     = -softplus(x) - softplus(-x)
        inverse: x = log y - log(1-y), logdet_inv = -log y - log(1 - y)

    The clamp: the paper's inverse uses ``safe_log(v) = log(max(v, 1e-22))``
    (x = -safe_log(1/y - 1), logdet = -safe_log(y) - safe_log(1-y)). It is NOT
    kept here. ``inverse`` requires y in the open interval (0, 1) and raises
    :class:`FlowInputError` otherwise (one host sync on CuPy). Inside that
    interval the clamp could only act on ``log y`` for y < 1e-22 (``1 - y`` and
    ``1/y - 1`` are never below 1e-22 for a float y < 1), where it would make
    the log-det inconsistent with x and its derivative zero; without it both
    are exact. Saturated values (y == 0 or 1, e.g. a float32 CDF that rounded)
    are an error, not silently clamped: compute logit(F) in log space instead.

    Shapes: any [B, ...] -> same shape; logdet (B,).
    Cache: forward keeps ``y`` (= sigmoid(x)); inverse keeps ``y`` (its input).
    """

    def forward(self, x, context=None, *, train=False, rng=None):
        _reject_tuple(x, "Sigmoid.forward")
        _check_batched(x, "Sigmoid.forward")
        y = sigmoid(x)
        ld = -softplus(x) - softplus(-x)
        return y, _sum_per_sample(ld), {"y": y}

    def backward(self, dy, dlogdet, cache):
        y = cache["y"]
        bshape = (-1,) + (1,) * (y.ndim - 1)
        # dy/dx = y(1-y);  d logdet_elem/dx = -sigmoid(x) + sigmoid(-x) = 1 - 2y
        # dL/dx = dL/dy * y(1-y) + dL/dlogdet * (1 - 2y)
        dx = dy * (y * (1.0 - y)) + dlogdet.reshape(bshape) * (1.0 - 2.0 * y)
        return dx, None, {}

    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        _reject_tuple(y, "Sigmoid.inverse")
        _check_batched(y, "Sigmoid.inverse")
        xp = array_module(y)
        if y.size:                                 # one host read on CuPy
            checks = DeferredChecks(xp)
            checks.require(lambda: (xp.min(y) > 0.0) & (xp.max(y) < 1.0), lambda: _check_open_unit(y),
                           "Sigmoid.inverse: values in (0, 1)")
            checks.run()
        log_y, log_1my = xp.log(y), xp.log1p(-y)
        x = log_y - log_1my
        ld = -log_y - log_1my
        return x, _sum_per_sample(ld), {"y": y}

    def inverse_backward(self, dx, dlogdet, cache):
        y = cache["y"]
        bshape = (-1,) + (1,) * (y.ndim - 1)
        # dx/dy = 1/y + 1/(1-y) = 1/(y(1-y));  d logdet_inv_elem/dy = -1/y + 1/(1-y) = (2y-1)/(y(1-y))
        # dL/dy = (dL/dx + dL/dlogdet * (2y - 1)) / (y (1 - y))
        dy = (dx + dlogdet.reshape(bshape) * (2.0 * y - 1.0)) / (y * (1.0 - y))
        return dy, None, {}
