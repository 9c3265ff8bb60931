"""The whole Flow++ model: main flow, dequantization, loss and its gradient, sampling.

Loss (bits/dim, averaged over the batch), for x in {0..2^n-1}^D::

    u, log q = dequantizer(x)                   (variational or uniform)
    z, logdet = flow(x + u)
    ELBO = log N(z) + logdet - log q
    L = mean_b[ -ELBO_b / (D ln 2) ]

Backward, with c = dL/dELBO_b = -1 / (B D ln 2)::

    dL/dz = -c z        (d log N(z)/dz = -z)
    dL/dlogdet = c      -> flow.backward -> dL/dy
    dL/du = dL/dy,  dL/dlog q = -c  -> dequantizer.backward
"""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np

from flowpp_ref.bijections.factor_out import FactorOut
from flowpp_ref.core.backend import array_module, asarray, rng_for, to_numpy
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import FlowInputError, check_finite
from flowpp_ref.model.architecture import build_main_flow
from flowpp_ref.model.dequantization import UniformDequantizer, VariationalDequantizer
from flowpp_ref.model.objective import standard_normal_logprob
from flowpp_ref.model.presets import ModelConfig
from flowpp_ref.training.evaluation import importance_weighted_bpd


@contextlib.contextmanager
def _factor_outs_drawing(flow, rng, temperature):
    """Every FactorOut in ``flow`` draws from ``rng`` at ``temperature`` inside the block (restored after)."""
    found = [(m, m.sample_rng, m.temperature) for m in flow.modules() if isinstance(m, FactorOut)]
    try:
        for m, _, _ in found:
            m.sample_rng, m.temperature = rng, float(temperature)
        yield
    finally:
        for m, r, t in found:
            m.sample_rng, m.temperature = r, t


class FlowPP(Module):
    """Flow++: dequantizer + main flow, with a hand-written gradient of the bits/dim loss.

    RealNVP and Glow (:mod:`flowpp_ref.model.lineage`) subclass it: they override :meth:`_build`
    (uniform dequantizer, their own flow and latent shape) and inherit the rest.

    Parameters are drawn from ``np.random.default_rng(seed)`` on the host and moved
    to the backend ``xp``, so a NumPy and a CuPy model built with one seed are equal.
    """

    def __init__(self, cfg: ModelConfig, *, seed: int = 0, xp=np, dtype=np.float32):
        super().__init__()
        self.cfg = cfg.validate()
        self.dtype = np.dtype(dtype)
        self._xp = xp
        rng = np.random.default_rng(seed)
        dequant, flow, self.latent_shape = self._build(cfg, rng, xp, dtype)
        self.dequant = self.add("dequant", dequant)
        self.flow = self.add("flow", flow)
        self.num_dims = int(np.prod(cfg.image_shape))
        self.levels = 2 ** cfg.n_bits

    def _build(self, cfg, rng, xp, dtype):
        """(dequantizer, main flow, latent shape (H, W, C)) drawn from ``rng``; the lineage's models
        (:mod:`flowpp_ref.model.lineage`) override this and inherit everything else."""
        if cfg.dequantization == "variational":
            dequant = VariationalDequantizer(cfg, rng=rng, xp=xp, dtype=dtype)
        else:
            dequant = UniformDequantizer()
        return dequant, build_main_flow(cfg, rng=rng, xp=xp, dtype=dtype), cfg._check_layout()

    @property
    def xp(self):
        return self._xp

    # ------------------------------------------------------------------ input
    def prepare(self, x):
        """Integer images [B,H,W,C] -> float array on the backend.

        uint8 (or another integer dtype) pixels; floating-point arrays are accepted only
        when every value is a whole number in range (checked), for tests and tutorials.
        """
        if tuple(x.shape[1:]) != tuple(self.cfg.image_shape):
            raise FlowInputError(f"images must have shape [B, {', '.join(map(str, self.cfg.image_shape))}], "
                                 f"got {tuple(x.shape)}")
        if np.dtype(x.dtype) == np.uint8 and self.levels == 256 and not isinstance(x, np.ndarray):
            return x.astype(self.dtype)                   # uint8 on the device: every value is a valid pixel
        # checked where the images are: host arrays before the upload (no device sync)
        xc = x if isinstance(x, np.ndarray) else asarray(x, self.xp)
        check_finite(xc, "images")
        lo, hi = float(to_numpy(xc.min())), float(to_numpy(xc.max()))
        if lo < 0 or hi > self.levels - 1:
            raise FlowInputError(f"pixel values must be integers in [0, {self.levels - 1}] for n_bits="
                                 f"{self.cfg.n_bits}, got min {lo:g}, max {hi:g}")
        if np.dtype(x.dtype).kind == "f":                 # floats only with whole-number values
            xpc = array_module(xc)
            frac = int(to_numpy((xc != xpc.floor(xc)).sum()))
            if frac:
                raise FlowInputError(f"pixel values must be integers in [0, {self.levels - 1}]: {frac} of "
                                     f"{xc.size} values of the {x.dtype} images have a fractional part")
        elif np.dtype(x.dtype).kind not in "iu":
            raise FlowInputError(f"images must be integer pixels (uint8), got dtype {x.dtype}")
        return asarray(x, self.xp).astype(self.dtype)

    # --------------------------------------------------------------- objective
    def elbo(self, xf, *, rng, train=False):
        """Per-sample ELBO terms (nats) and the cache for :meth:`backward`."""
        rng = rng_for(rng, self.xp)
        u, logq, dq_cache = self.dequant.forward(xf, rng=rng, train=train)
        z, logdet, flow_cache = self.flow.forward(xf + u, None, train=train, rng=rng)
        logpz = standard_normal_logprob(z)
        elbo = logpz + logdet if logq is None else logpz + logdet - logq
        return elbo, (z, dq_cache, flow_cache, logq is not None)

    def loss(self, x, *, rng, train=False):
        """Mean bits/dim of the batch (a 0-d backend array) and the backward cache."""
        xf = self.prepare(x)
        elbo, cache = self.elbo(xf, rng=rng, train=train)
        loss = -elbo.mean() / (self.num_dims * math.log(2.0))
        return loss, (elbo.shape[0], cache)

    def backward(self, cache):
        """Gradients of the mean bits/dim with respect to every parameter (flat dict)."""
        b, (z, dq_cache, flow_cache, variational) = cache
        c = -1.0 / (b * self.num_dims * math.log(2.0))          # dL/dELBO_b
        xp = array_module(z)
        dz = (-c) * z                                            # dL/dz = c * d logN/dz = -c z
        dlogdet = xp.full((b,), c, dtype=z.dtype)
        dy, _, g_flow = self.flow.backward(dz, dlogdet, flow_cache)
        grads = prefixed("flow", g_flow)
        if variational:                                          # y = x + u: dL/du = dL/dy; dL/dlogq = -c
            grads.update(prefixed("dequant", self.dequant.backward(dy, -dlogdet, dq_cache)))
        return grads

    def loss_and_grads(self, x, *, rng, train=True):
        loss, cache = self.loss(x, rng=rng, train=train)
        return loss, self.backward(cache)

    def data_init(self, x, *, rng):
        """Data-dependent initialisation on an init batch (weight norm, actnorm), eval mode."""
        rng = rng_for(rng, self.xp)
        xf = self.prepare(x)
        u = self.dequant.data_init(xf, rng=rng)
        self.flow.data_init(xf + u)

    # -------------------------------------------------------------- evaluation
    def bits_per_dim(self, x, *, rng, k: int = 1):
        """Per-image bits/dim (host float64 array) of the batch ``x``: the ELBO for k = 1,
        else the importance-weighted bound with k samples of the dequantizer (Burda et al., 2016),
        drawn from ``rng`` in passes of ``len(x)`` (image, sample) pairs
        (:func:`flowpp_ref.training.evaluation.importance_weighted_bpd`)."""
        return importance_weighted_bpd(self, x, k, rng=rng_for(rng, self.xp), rows=max(len(x), 1))

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, *, rng, temperature: float = 1.0, return_time: bool = False):
        """Draw z ~ N(0, T^2 I), invert the flow, quantise to uint8 images [n,H,W,C].

        In a multi-scale flow (RealNVP, Glow) every factored-out half is drawn from its prior at the
        same temperature T from ``rng`` (:class:`~flowpp_ref.bijections.factor_out.FactorOut`).
        Values of the inverse flow outside [0, 2^n_bits) (ImgProc's inverse spans
        about [-14, 270]) are clipped to the pixel range when quantised; images with
        n_bits < 8 are scaled back to 0..255 for display.
        """
        t0 = time.perf_counter()
        rng = rng_for(rng, self.xp)
        z = rng.standard_normal((n, *self.latent_shape), dtype=self.dtype) * self.dtype.type(temperature)
        with _factor_outs_drawing(self.flow, rng, temperature):
            y = self.flow.sample_inverse(z, None)             # the inverse flow, no log-dets
        xp = array_module(y)
        x = xp.clip(xp.floor(y), 0, self.levels - 1)
        img = (x * (256 // self.levels)).astype(np.uint8)
        img = to_numpy(img)
        dt = time.perf_counter() - t0
        return (img, dt) if return_time else img
