"""FactorOut: the multi-scale factor-out of RealNVP and Glow, as one bijection.

RealNVP (Dinh et al. 2017, sec. 3.6) and Glow (Kingma & Dhariwal 2018, sec. 3.4; the
released ``split2d``) send half of the channels straight to the latent space at the end
of every scale; only the other half continues through the flow. With ``x`` of shape
``[B, H, W, C]`` (C even)::

    z1 = x[..., :C/2]          continues through the flow (the bijection's output y)
    z2 = x[..., C/2:]          leaves the flow here

Design: the map ``x <-> (z1, z2)`` is a bijection (a channel split); its ``z2`` part is
scored at once by its prior, and that score is added to the log-det::

    y      = z1
    logdet = log p(z2 | z1)                                   per sample, shape (B,)

so that ``log p(x) = log p_rest(z1) + log p(z2 | z1) + (log-dets of the layers before)``
and a ``Compose`` that ends with a standard normal log-density on its output gives the
full log-likelihood without seeing ``z2``. The factored half is kept in the cache
(``cache["z2"]``). The inverse needs ``z2`` back:

* ``inverse(y, z2=z2)`` is exact: ``x = concat(y, z2)`` (the reconstruction of a point
  whose ``z2`` was kept); ``logdet_inv = -log p(z2 | y)``;
* ``inverse(y)`` / ``sample_inverse(y)`` draw ``z2`` from the prior at a temperature T:
  ``z2 = mu + T * exp(logs) * eps``, ``eps ~ N(0, I)`` (Glow's ``split2d_reverse`` with
  ``eps_std = T``), from the generator ``rng`` passed in, else ``self.sample_rng``.
  ``sample_inverse(y, eps=eps)`` uses the given ``eps`` instead of drawing.

The prior ``p(z2 | z1) = N(mu, exp(logs)^2)`` per element::

    log p(z2 | z1) = sum_{h,w,c} [ -0.5 log(2 pi) - logs - 0.5 ((z2 - mu) exp(-logs))^2 ]

* ``learned_prior=True`` (Glow): ``h = conv3x3(z1)`` with a zero-initialised plain
  convolution (:class:`ZeroConv2d`, no weight norm), ``C`` output channels, and as in the
  release ``mu = h[..., 0::2]``, ``logs = h[..., 1::2]`` (interleaved). At init ``h = 0``,
  so the prior starts as N(0, I) exactly. The conv is the release's ``conv2d_zeros``:
  :class:`flowpp_ref.nn.plain_conv.ZeroConv2d`, whose output is also scaled by a learned
  per-channel ``exp(3 * logs_c)`` (parameter ``prior.logs``).
* ``learned_prior=False`` (RealNVP): ``mu = 0``, ``logs = 0``, the standard normal; no
  parameters.

Backward (``g = dL/dlogdet`` per sample, ``dy = dL/dz1``)::

    dL/dz2   = -(z2 - mu) exp(-2 logs) * g
    dL/dmu   = +(z2 - mu) exp(-2 logs) * g
    dL/dlogs = (-1 + (z2 - mu)^2 exp(-2 logs)) * g
    dL/dh    = interleave(dL/dmu, dL/dlogs);  conv backward -> dL/dz1 (conv), dL/dW, dL/db, dL/dlogs of the conv
    dL/dx    = concat(dy + dL/dz1 (conv), dL/dz2)

Shapes: x [B, H, W, C] -> y [B, H, W, C/2]; logdet (B,). Layout NHWC.
"""
from __future__ import annotations

import math

import numpy as np

from flowpp_ref.bijections.actnorm import ChannelActNorm
from flowpp_ref.bijections.base import Bijection
from flowpp_ref.core.backend import array_module, asarray, make_rng
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.nn.plain_conv import ZeroConv2d

LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------- the prior's convolution
def _draw_normal(rng, shape, xp, dtype):
    """eps ~ N(0, I) of ``shape`` from ``rng`` (a NumPy or CuPy Generator), on ``xp`` in ``dtype``."""
    draw = getattr(rng, "standard_normal", None)
    if draw is None:
        raise TypeError(f"rng must be a random Generator with standard_normal(), got {type(rng).__name__}")
    dt = np.dtype(dtype)
    if dt in (np.float32, np.float64):
        return asarray(draw(shape, dtype=dt), xp, dt)
    return asarray(draw(shape), xp, dt)


def _sample_rng_from(rng, xp):
    """The default sampling generator: seeded from the constructor's ``rng`` (one draw)."""
    if isinstance(rng, (int, np.integer)):
        seed = int(rng)
    elif isinstance(rng, np.random.Generator):
        seed = int(rng.integers(0, 2 ** 63 - 1))
    elif rng is None:
        raise TypeError("rng is required: pass a seeded np.random.Generator (np.random.default_rng(seed))")
    else:
        raise TypeError(f"rng must be a host np.random.Generator or an int seed, got {type(rng).__name__}")
    return make_rng(seed, xp)


# ---------------------------------------------------------------- the bijection
class FactorOut(Bijection):
    """Multi-scale factor-out ``x -> z1`` with ``log p(z2 | z1)`` in the log-det; see the module
    docstring for the design and the math.

    Args:
        channels: C, the channel count of the input (even).
        learned_prior: True (Glow): ``mu, logs`` of ``z2`` from a zero-initialised 3x3
            convolution of ``z1`` (child ``prior``, parameters ``prior.W`` [3,3,C/2,C] and
            ``prior.b`` [C]); False (RealNVP): N(0, I), no parameters.
        rng: host ``np.random.Generator`` or int seed (required). The convolution starts at
            zero, so it only seeds ``self.sample_rng``, the generator used by ``inverse`` /
            ``sample_inverse`` when none is passed (reassign it, and ``self.temperature``,
            to control sampling inside a ``Compose``).
        temperature: default sampling temperature T (1.0).
        xp, dtype: where and how the parameters are stored.

    Shapes: x [B, H, W, C] -> y = z1 [B, H, W, C/2]; logdet (B,) = log p(z2 | z1).
    Cache: dict(z1, z2, mu, logs, conv) -- ``z2`` the factored half (what an exact
    ``inverse(y, z2=cache["z2"])`` needs), ``mu``/``logs`` the prior's parameters
    ([B, H, W, C/2]; None for the standard normal), ``conv`` the convolution's cache.
    """

    def __init__(self, channels, *, learned_prior=True, rng, temperature=1.0, xp=np, dtype=np.float32):
        super().__init__()
        if not isinstance(channels, (int, np.integer)) or int(channels) < 2:
            raise ValueError(f"channels must be an even integer >= 2, got {channels!r}")
        if int(channels) % 2:
            raise FlowInputError(f"FactorOut: the channel count must be even to factor out half, got {channels}")
        self.channels = int(channels)
        self.half = self.channels // 2
        self.learned_prior = bool(learned_prior)
        self.dtype = np.dtype(dtype)
        self.temperature = float(temperature)
        self.sample_rng = _sample_rng_from(rng, xp)
        if self.learned_prior:
            self.prior = self.add("prior", ZeroConv2d(self.half, 2 * self.half, 3, xp=xp, dtype=dtype))

    # ----------------------------------------------------------- checks
    def _check(self, a, name, C):
        if isinstance(a, tuple):
            raise FlowInputError(f"{name}: expected one array [B, H, W, {C}], got a tuple of shapes "
                                 f"{[tuple(getattr(t, 'shape', ())) for t in a]}")
        check_array(a, name, ndim=4)
        if a.shape[3] != C:
            extra = " (the channel count must be even)" if a.shape[3] % 2 and C == self.channels else ""
            raise FlowInputError(f"{name}: expected {C} channels, got shape {tuple(a.shape)}{extra}")
        return a

    # ----------------------------------------------------------- prior
    def _prior(self, z1):
        """``(mu, logs, conv_cache)`` of p(z2 | z1); ``(None, None, None)`` for N(0, I)."""
        if not self.learned_prior:
            return None, None, None
        h, cc = self.prior.forward(z1)
        return h[..., 0::2], h[..., 1::2], cc          # mu = h[..., 0::2], logs = h[..., 1::2]

    @staticmethod
    def _logp(z2, mu, logs):
        """log p(z2 | z1) per sample: sum [-0.5 log 2pi - logs - 0.5 ((z2 - mu) exp(-logs))^2]."""
        B = z2.shape[0]
        if mu is None:
            e = -0.5 * (z2 * z2 + LOG_2PI)
        else:
            r = (z2 - mu) * array_module(z2).exp(-logs)
            e = -0.5 * (r * r + LOG_2PI) - logs
        return e.reshape(B, -1).sum(axis=1)

    def log_prob(self, z1, z2):
        """log p(z2 | z1) per sample, shape (B,)."""
        self._check(z1, "FactorOut.log_prob z1", self.half)
        self._check(z2, "FactorOut.log_prob z2", self.half)
        mu, logs, _ = self._prior(z1)
        return self._logp(z2, mu, logs)

    # ----------------------------------------------------------- forward
    def forward(self, x, context=None, *, train=False, rng=None):
        self._check(x, "FactorOut.forward", self.channels)
        xp = array_module(x)
        z1 = xp.ascontiguousarray(x[..., : self.half])
        z2 = xp.ascontiguousarray(x[..., self.half:])
        mu, logs, cc = self._prior(z1)
        return z1, self._logp(z2, mu, logs), {"z1": z1, "z2": z2, "mu": mu, "logs": logs, "conv": cc}

    def backward(self, dy, dlogdet, cache):
        z2, mu, logs = cache["z2"], cache["mu"], cache["logs"]
        xp = array_module(z2)
        g = dlogdet.reshape(-1, 1, 1, 1)
        if mu is None:
            # dL/dz2 = -z2 * g  (standard normal)
            dz2 = -z2 * g
            return xp.concatenate([dy, dz2], axis=3), None, {}
        ivar = xp.exp(-2.0 * logs)                     # exp(-2 logs)
        d = z2 - mu
        dmu = d * ivar * g                             # dL/dmu   = +(z2 - mu) exp(-2 logs) g
        dz2 = -dmu                                     # dL/dz2   = -(z2 - mu) exp(-2 logs) g
        dlogs = (d * d * ivar - 1.0) * g               # dL/dlogs = (-1 + (z2 - mu)^2 exp(-2 logs)) g
        B, H, W, Ch = z2.shape
        dh = xp.stack([dmu, dlogs], axis=4).reshape(B, H, W, 2 * Ch)   # interleave: h[..., 0::2], h[..., 1::2]
        dz1_conv, gconv = self.prior.backward(dh, cache["conv"])
        dx = xp.concatenate([dy + dz1_conv, dz2], axis=3)
        return dx, None, {f"prior.{k}": v for k, v in gconv.items()}

    # ----------------------------------------------------------- inverse
    def _z2_for(self, y, z2, eps, rng, temperature, mu, logs, name):
        xp = array_module(y)
        if z2 is not None:
            self._check(z2, f"{name} z2", self.half)
            if tuple(z2.shape) != tuple(y.shape):
                raise FlowInputError(f"{name}: z2 has shape {tuple(z2.shape)}, expected {tuple(y.shape)} "
                                     f"(the shape of y)")
            return z2
        if eps is None:
            eps = _draw_normal(rng if rng is not None else self.sample_rng, tuple(y.shape), xp, y.dtype)
        else:
            self._check(eps, f"{name} eps", self.half)
            if tuple(eps.shape) != tuple(y.shape):
                raise FlowInputError(f"{name}: eps has shape {tuple(eps.shape)}, expected {tuple(y.shape)}")
        T = self.temperature if temperature is None else float(temperature)
        if T < 0 or not math.isfinite(T):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        teps = eps * T
        if mu is None:
            return teps.astype(y.dtype, copy=False)                    # z2 = T * eps
        return (mu + xp.exp(logs) * teps).astype(y.dtype, copy=False)  # z2 = mu + T exp(logs) eps

    def inverse(self, y, context=None, *, z2=None, rng=None, temperature=None, eps=None):
        """``x = concat(y, z2)``, ``logdet_inv = -log p(z2 | y)``.

        Exact with ``z2`` given; otherwise ``z2 = mu + T exp(logs) eps`` (``eps`` given, or drawn
        from ``rng`` / ``self.sample_rng``; ``T`` = ``temperature`` or ``self.temperature``).
        """
        self._check(y, "FactorOut.inverse", self.half)
        mu, logs, _ = self._prior(y)
        z2 = self._z2_for(y, z2, eps, rng, temperature, mu, logs, "FactorOut.inverse")
        return array_module(y).concatenate([y, z2], axis=3), -self._logp(z2, mu, logs)

    def sample_inverse(self, y, context=None, *, rng=None, temperature=None, eps=None, z2=None):
        """The inverse map without the log-det: ``concat(y, z2)`` with ``z2`` drawn at temperature T
        (or the given ``eps``/``z2``)."""
        self._check(y, "FactorOut.sample_inverse", self.half)
        mu, logs, _ = self._prior(y)
        z2 = self._z2_for(y, z2, eps, rng, temperature, mu, logs, "FactorOut.sample_inverse")
        return array_module(y).concatenate([y, z2], axis=3)

    def __repr__(self):
        return f"FactorOut(channels={self.channels}, learned_prior={self.learned_prior})"


class LearnedTopPrior(ChannelActNorm):
    """Glow's learned prior of the top latent (the release's ``learntop``), as a bijection.

    Glow's top latent ``h`` [B, H, W, C] has the prior ``N(mu_c, exp(logs_c)^2)`` with per-channel
    ``mu``, ``logs`` (its release: a zero-initialised convolution of a zero tensor, i.e. its bias
    ``[2C]`` times ``exp(3 logs')``: a constant per channel). Scoring ``h`` under that prior equals
    mapping it to ``z = (h - mu) exp(-logs)`` and scoring ``z`` under N(0, I)::

        log N(h; mu, exp(logs)^2) = log N(z; 0, I) - H W sum_c logs_c

    which is :class:`~flowpp_ref.bijections.actnorm.ChannelActNorm` ``z = (h + b) exp(s)`` with
    ``b = -mu``, ``s = -logs`` (log-det ``H W sum_c s_c``). This class is that actnorm, zero-initialised
    (the prior starts at N(0, I), as the release's zero convolution) and *without* the data-dependent
    init (a prior is learned, not fitted to the init batch): :meth:`data_init` only runs forward.
    Sampling at temperature T: ``z ~ N(0, T^2 I)`` through the inverse gives
    ``h = mu + T exp(logs) eps`` (Glow's ``eps_std``).

    Parameters ``b`` [C] (= -mu) and ``logs`` [C] (= -log sigma of the prior); math and backward
    as ChannelActNorm. Difference from the release: its zero convolution also reads the edge-padding
    channel of its 3x3 convolutions, so there the border pixels' prior may differ from the interior's;
    here it is one Gaussian per channel at every pixel.
    """

    def __init__(self, channels, *, xp=np, dtype=np.float32):
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool):
            raise ValueError(f"channels must be an int, got {channels!r}")  # noqa: TRY004
        super().__init__(int(channels), xp=xp, dtype=dtype)

    def data_init(self, x, context=None):
        """No data-dependent init: the prior is learned from zero; returns the forward output."""
        return self.forward(x, context)[0]

    def __repr__(self):
        return f"LearnedTopPrior(channels={self.channels[0]})"


def exact_inverse(flow, z, caches, context=None):
    """``flow.inverse(z)`` of a ``Compose`` whose FactorOut layers get back the ``z2`` their forward
    factored out (``caches``: the Compose's forward cache): the exact reconstruction of the forward's
    input. Without FactorOut layers this is ``flow.inverse(z)[0]``."""
    for f, c in zip(reversed(flow.flows), reversed(caches)):
        z = f.inverse(z, context, z2=c["z2"])[0] if isinstance(f, FactorOut) else f.inverse(z, context)[0]
    return z
