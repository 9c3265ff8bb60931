"""ChannelActNorm: Glow's actnorm, one scale and shift per CHANNEL (Glow sec. 3.1).

Math (input ``x`` of shape [B, H, W, C]; ``b``, ``logs``: [C], broadcast over b, h, w)::

    y = (x + b) * exp(logs)
    logdet = H * W * sum_c logs_c              the same for every sample
    inverse: x = y * exp(-logs) - b,  logdet_inv = -logdet

Difference from :class:`~flowpp_ref.bijections.normalize.Normalize` (Flow++'s actnorm,
appendix 8.1): Normalize has one ``mu``/``invstd`` per ACTIVATION (shape [H, W, C],
moments over the batch axis only); ChannelActNorm has one ``b``/``logs`` per CHANNEL
(shape [C], moments over batch, height and width), as in Glow. Hence the name.

Parametrisation: the log-scale ``logs`` (as Glow's release, ``x += b; x *= exp(logs)``),
so the scale ``exp(logs)`` is positive by construction and the log-det is linear in the
parameters. The release additionally stores ``logs / logscale_factor`` (factor 3) to
slow down its Adam steps; we store ``logs`` itself (the map and its log-det are the same).

Data-dependent init (:meth:`ChannelActNorm.data_init`, Glow sec. 3.1 / the release's
``actnorm_center`` and ``actnorm_scale``): with the population moments over (B, H, W)
per channel, ``b = -mean``, ``logs = log(scale / (std + 1e-6))``. After it every channel
of the init batch has mean 0 and standard deviation ``scale * std / (std + 1e-6)`` ~ scale.
Before it: ``b = 0``, ``logs = 0`` (identity).

Checkpoints: there is no ``initialized`` flag, and none is needed. ``data_init`` always
re-initialises from the batch it is given (as Normalize does), and the training loop calls
it only for a fresh run: a resumed run restores ``b``/``logs`` through ``load_parameters``
from the checkpoint and never calls ``data_init`` (``training/loop.py`` ``_build_state``).
A flag stored as a parameter would be updated by Adam and averaged by the EMA, so it is
deliberately not one.

A tuple input ``(x0, x1)`` gets separate parameters per element, named ``b0``/``logs0``,
``b1``/``logs1``; a single array uses ``b``/``logs``.

Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
NeurIPS 2018, sec. 3.1 and table 1.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection, as_channel_list
from flowpp_ref.core.backend import array_module, asarray
from flowpp_ref.core.validation import FlowInputError, check_finite

ACTNORM_EPS = 1e-6   # added to the per-channel std in data_init (Glow's release)


class ChannelActNorm(Bijection):
    """Glow's per-channel actnorm; see the module docstring for the math.

    Args:
        channels: C (int) for an array input, or a tuple of ints for a tuple input
            (one ``b{i}``/``logs{i}`` pair per element).
        scale: target standard deviation after :meth:`data_init` (Glow: 1).
        xp, dtype: where and how the parameters are stored.

    Shapes: x [B, H, W, C] (or a tuple of such) -> same; logdet (B,).
    Cache: forward keeps its outputs ``y`` (list, one array per element; dy/dlogs = y);
    inverse keeps its inputs ``y``. The parameters are read from ``self.params`` again
    in backward (they must not change between forward and backward).
    """

    def __init__(self, channels, *, scale: float = 1.0, xp=np, dtype=np.float32):
        super().__init__()
        if isinstance(channels, (int, np.integer)) and not isinstance(channels, bool):
            self.is_tuple, chans = False, [int(channels)]
        elif isinstance(channels, (tuple, list)) and len(channels) > 0 and all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in channels):
            self.is_tuple, chans = True, [int(c) for c in channels]
        else:
            raise ValueError(f"channels must be an int or a tuple of ints, got {channels!r}")
        if any(c < 1 for c in chans):
            raise ValueError(f"channel counts must be positive, got {channels!r}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.channels = chans
        self.scale = float(scale)
        self.dtype = np.dtype(dtype)
        for i, C in enumerate(chans):
            b_name, s_name = self._names(i)
            self.params[b_name] = asarray(np.zeros(C), xp, self.dtype)
            self.params[s_name] = asarray(np.zeros(C), xp, self.dtype)

    # ----------------------------------------------------------- helpers
    def _names(self, i):
        return ("b", "logs") if not self.is_tuple else (f"b{i}", f"logs{i}")

    def _b_logs(self, i):
        b_name, s_name = self._names(i)
        return self.params[b_name], self.params[s_name]

    def _as_list(self, x, name):
        """The input as a list of 4-d arrays, checked against the declared channel counts."""
        return as_channel_list(x, self.channels, self.is_tuple, name)

    def _pack(self, outs):
        return tuple(outs) if self.is_tuple else outs[0]

    def _logdet(self, xs, xp, sign):
        # logdet = sum_i H_i * W_i * sum_c logs_{i,c}, the same for every sample
        total = sum((a.shape[1] * a.shape[2]) * xp.sum(self._b_logs(i)[1]) for i, a in enumerate(xs))
        return (sign * total) * xp.ones((xs[0].shape[0],), dtype=xs[0].dtype)

    # ----------------------------------------------------------- forward
    def forward(self, x, context=None, *, train=False, rng=None):
        xs = self._as_list(x, "ChannelActNorm.forward")
        xp = array_module(xs[0])
        out = []
        for i, a in enumerate(xs):
            b, logs = self._b_logs(i)
            out.append((a + b) * xp.exp(logs))                 # y = (x + b) * exp(logs)
        return self._pack(out), self._logdet(xs, xp, 1.0), {"y": out}

    def backward(self, dy, dlogdet, cache):
        dys = dy if isinstance(dy, tuple) else (dy,)
        gl = dlogdet.sum()
        dxs, grads = [], {}
        for i, (g, y) in enumerate(zip(dys, cache["y"])):
            logs = self._b_logs(i)[1]
            b_name, s_name = self._names(i)
            xp = array_module(g)
            s = xp.exp(logs)
            dxs.append(g * s)                                   # dL/dx = dy * exp(logs)
            grads[b_name] = (g * s).sum(axis=(0, 1, 2))         # dL/db = sum_{b,h,w} dy * exp(logs)
            # dL/dlogs = sum_{b,h,w} dy * y + H * W * sum_b dlogdet      (dy/dlogs = y)
            grads[s_name] = (g * y).sum(axis=(0, 1, 2)) + (g.shape[1] * g.shape[2]) * gl
        return self._pack(dxs), None, grads

    # ----------------------------------------------------------- inverse
    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        ys = self._as_list(y, "ChannelActNorm.inverse")
        xp = array_module(ys[0])
        out = []
        for i, a in enumerate(ys):
            b, logs = self._b_logs(i)
            out.append(a * xp.exp(-logs) - b)                  # x = y * exp(-logs) - b
        return self._pack(out), self._logdet(ys, xp, -1.0), {"y": ys}

    def inverse_backward(self, dx, dlogdet, cache):
        dxs = dx if isinstance(dx, tuple) else (dx,)
        gl = dlogdet.sum()
        dys, grads = [], {}
        for i, (g, a) in enumerate(zip(dxs, cache["y"])):
            logs = self._b_logs(i)[1]
            b_name, s_name = self._names(i)
            xp = array_module(g)
            r = xp.exp(-logs)
            dys.append(g * r)                                   # dL/dy = dx * exp(-logs)
            grads[b_name] = -g.sum(axis=(0, 1, 2))              # dL/db = -sum_{b,h,w} dx
            # dL/dlogs = -sum_{b,h,w} dx * y * exp(-logs) - H * W * sum_b dlogdet
            grads[s_name] = -(g * a).sum(axis=(0, 1, 2)) * r - (g.shape[1] * g.shape[2]) * gl
        return self._pack(dys), None, grads

    # ----------------------------------------------------------- init
    def data_init(self, x, context=None):
        """Set b, logs from the per-channel moments of ``x`` (see module docstring); return the output."""
        xs = self._as_list(x, "ChannelActNorm.data_init")
        for i, a in enumerate(xs):
            n = a.shape[0] * a.shape[1] * a.shape[2]
            if n < 2:
                raise FlowInputError(f"ChannelActNorm.data_init: needs at least 2 values per channel (B*H*W >= 2) "
                                     f"to estimate a variance, got shape {tuple(a.shape)}")
            check_finite(a, f"ChannelActNorm.data_init (element {i})")
            xp = array_module(a)
            a64 = a.astype(np.float64)
            m = a64.mean(axis=(0, 1, 2))                        # mean over (B, H, W)
            sd = xp.sqrt(((a64 - m) ** 2).mean(axis=(0, 1, 2)))  # population std (ddof 0)
            b_name, s_name = self._names(i)
            # in place, so that a dict of the parameters taken before the init (an optimiser's) sees them
            self.params[b_name][...] = (-m).astype(self.dtype)                                  # b = -mean
            self.params[s_name][...] = xp.log(self.scale / (sd + ACTNORM_EPS)).astype(self.dtype)  # log(scale/(std+eps))
        return self.forward(x, context)[0]

    def __repr__(self):
        ch = tuple(self.channels) if self.is_tuple else self.channels[0]
        return f"ChannelActNorm(channels={ch}, scale={self.scale})"
