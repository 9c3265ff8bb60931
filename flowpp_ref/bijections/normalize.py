"""Normalize: an actnorm with one scale and shift per activation (h, w, c).

Math (per element of an input ``x`` of shape [B, H, W, C])::

    y = (x - mu) * invstd                      mu, invstd: [H, W, C]
    logdet = sum_{h,w,c} log|invstd|           the same for every sample
    inverse: x = y / invstd + mu,  logdet_inv = -logdet

Unlike Glow's actnorm (one scale per channel), every activation has its own
``mu`` and ``invstd`` (Flow++ appendix 8.1, ``Normalize``). A tuple input
``(x0, x1)`` gets separate parameters per element, named ``mu0``/``invstd0``,
``mu1``/``invstd1``; a single array uses ``mu``/``invstd``.

Parametrisation: the paper's variables ``mu`` and ``invstd`` themselves (no log
scale). The paper takes ``log(invstd)``; we take ``log|invstd|`` so that the
log-det stays the true log|det| if an optimiser step flips a sign (the map is a
bijection for any non-zero invstd). No clamp (the appendix has none; the later
public release clamps the scale at 1e-10): an invstd of exactly 0 gives a
log-det of -inf, which is not checked per call (that would need a device sync).

Data-dependent init (:meth:`Normalize.data_init`): the appendix calls
``nn.init_normalization``, whose code is not printed there. We follow the
released ``init_normalization``: moments over the batch axis only,
``mu = mean_b x``, ``invstd = init_scale / sqrt(var_b x + 1e-8)`` with the
population variance (``tf.nn.moments``, ddof 0). After it, every activation of
the init batch has mean 0 and standard deviation ~init_scale. (The release
stores ``g = invstd`` and ``b = -mu * invstd`` and computes ``x * g + b``; that is
the same map.)

Before ``data_init`` the parameters are ``mu = 0``, ``invstd = 1`` (identity).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.core.backend import array_module, asarray
from flowpp_ref.core.validation import FlowInputError, check_array, check_finite

NORMALIZE_EPS = 1e-8   # added to the batch variance in data_init (as in the release)


def _is_shape(s) -> bool:
    return isinstance(s, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in s)


class Normalize(Bijection):
    """Per-activation actnorm; see the module docstring for the math.

    Args:
        shape: ``(H, W, C)`` for an array input, or a tuple of such shapes for a
            tuple input (one ``mu{i}``/``invstd{i}`` pair per element).
        init_scale: target standard deviation after :meth:`data_init` (default 1).
        xp, dtype: where and how the parameters are stored.

    Shapes: ``x [B, *shape]`` (or a tuple of such) -> same; logdet (B,).
    Cache: forward keeps the inputs ``x`` (list, one array per element);
    inverse keeps its inputs ``y``. The parameters are read from ``self.params``
    again in backward (they must not change between forward and backward).
    """

    def __init__(self, shape, *, init_scale: float = 1.0, xp=np, dtype=np.float32):
        super().__init__()
        if _is_shape(shape):
            self.is_tuple, shapes = False, [tuple(int(d) for d in shape)]
        elif isinstance(shape, (tuple, list)) and len(shape) > 0 and all(_is_shape(s) for s in shape):
            self.is_tuple, shapes = True, [tuple(int(d) for d in s) for s in shape]
        else:
            raise ValueError(f"shape must be (H, W, C) or a tuple of such shapes, got {shape!r}")
        self.shapes = shapes
        self.init_scale = float(init_scale)
        self.dtype = np.dtype(dtype)
        for i, s in enumerate(shapes):
            mu_name, s_name = self._names(i)
            self.params[mu_name] = asarray(np.zeros(s), xp, self.dtype)
            self.params[s_name] = asarray(np.ones(s), xp, self.dtype)

    # ----------------------------------------------------------- helpers
    def _names(self, i):
        return ("mu", "invstd") if not self.is_tuple else (f"mu{i}", f"invstd{i}")

    def _mu_s(self, i):
        mu_name, s_name = self._names(i)
        return self.params[mu_name], self.params[s_name]

    def _as_list(self, x, name):
        """The input as a list of arrays, checked against the declared shapes."""
        if self.is_tuple:
            if not isinstance(x, tuple):
                raise FlowInputError(f"{name}: expected a tuple of {len(self.shapes)} arrays with shapes "
                                     f"[B, *{self.shapes}], got one array of shape {tuple(getattr(x, 'shape', ()))}")
            if len(x) != len(self.shapes):
                raise FlowInputError(f"{name}: expected a tuple of {len(self.shapes)} arrays, got {len(x)}")
            xs = list(x)
        else:
            if isinstance(x, tuple):
                raise FlowInputError(f"{name}: expected one array of shape [B, *{self.shapes[0]}], got a tuple of "
                                     f"shapes {[tuple(getattr(a, 'shape', ())) for a in x]}")
            xs = [x]
        for i, (a, s) in enumerate(zip(xs, self.shapes)):
            check_array(a, name)
            if tuple(a.shape[1:]) != s or a.ndim != len(s) + 1:
                raise FlowInputError(f"{name}: element {i} must have shape [B, *{s}], got {tuple(a.shape)}")
            if a.shape[0] != xs[0].shape[0]:
                raise FlowInputError(f"{name}: batch sizes differ, shapes {[tuple(b.shape) for b in xs]}")
        return xs

    def _pack(self, outs):
        return tuple(outs) if self.is_tuple else outs[0]

    def _logdet(self, B, dtype, xp, sign):
        # logdet = sum_i sum_{h,w,c} log|invstd_i|, the same for every sample
        total = sum(xp.sum(xp.log(xp.abs(self._mu_s(i)[1]))) for i in range(len(self.shapes)))
        return (sign * total) * xp.ones((B,), dtype=dtype)

    # ----------------------------------------------------------- forward
    def forward(self, x, context=None, *, train=False, rng=None):
        xs = self._as_list(x, "Normalize.forward")
        xp = array_module(xs[0])
        out = []
        for i, a in enumerate(xs):
            mu, s = self._mu_s(i)
            out.append((a - mu) * s)
        return self._pack(out), self._logdet(xs[0].shape[0], xs[0].dtype, xp, 1.0), {"x": xs}

    def backward(self, dy, dlogdet, cache):
        dys = dy if isinstance(dy, tuple) else (dy,)
        gl = dlogdet.sum()
        dxs, grads = [], {}
        for i, (g, a) in enumerate(zip(dys, cache["x"])):
            mu, s = self._mu_s(i)
            mu_name, s_name = self._names(i)
            dxs.append(g * s)                                   # dL/dx = dy * invstd
            grads[mu_name] = -(g.sum(axis=0) * s)               # dL/dmu = -sum_b dy * invstd
            # dL/dinvstd = sum_b dy * (x - mu) + sum_b dlogdet / invstd
            grads[s_name] = (g * (a - mu)).sum(axis=0) + gl / s
        return self._pack(dxs), None, grads

    # ----------------------------------------------------------- inverse
    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        ys = self._as_list(y, "Normalize.inverse")
        xp = array_module(ys[0])
        out = []
        for i, a in enumerate(ys):
            mu, s = self._mu_s(i)
            out.append(a / s + mu)
        return self._pack(out), self._logdet(ys[0].shape[0], ys[0].dtype, xp, -1.0), {"y": ys}

    def inverse_backward(self, dx, dlogdet, cache):
        dxs = dx if isinstance(dx, tuple) else (dx,)
        gl = dlogdet.sum()
        dys, grads = [], {}
        for i, (g, a) in enumerate(zip(dxs, cache["y"])):
            mu, s = self._mu_s(i)
            mu_name, s_name = self._names(i)
            dys.append(g / s)                                   # dL/dy = dx / invstd
            grads[mu_name] = g.sum(axis=0)                      # dL/dmu = sum_b dx
            # dL/dinvstd = -sum_b dx * y / invstd^2 - sum_b dlogdet / invstd
            grads[s_name] = -(g * a).sum(axis=0) / (s * s) - gl / s
        return self._pack(dys), None, grads

    # ----------------------------------------------------------- init
    def data_init(self, x, context=None):
        """Set mu, invstd from the batch moments of ``x`` (see module docstring); return the output."""
        xs = self._as_list(x, "Normalize.data_init")
        if xs[0].shape[0] < 2:
            raise FlowInputError(f"Normalize.data_init: needs at least 2 samples to estimate a variance, "
                                 f"got shape {tuple(xs[0].shape)}")
        for i, a in enumerate(xs):
            check_finite(a, f"Normalize.data_init (element {i})")
            xp = array_module(a)
            a64 = a.astype(np.float64)
            m = a64.mean(axis=0)
            v = ((a64 - m) ** 2).mean(axis=0)                   # population variance (ddof 0)
            mu_name, s_name = self._names(i)
            self.params[mu_name] = m.astype(self.dtype)
            self.params[s_name] = (self.init_scale / xp.sqrt(v + NORMALIZE_EPS)).astype(self.dtype)
        return self.forward(x, context)[0]

    def __repr__(self):
        shp = tuple(self.shapes) if self.is_tuple else self.shapes[0]
        return f"Normalize(shape={shp}, init_scale={self.init_scale})"
