"""Rescale: y = f * x + o with a constant factor f > 0 and offset o.

Uses: f = 256 / 2^n maps n-bit data [0, 2^n) onto ImgProc's [0, 256) (Flow++); f = 1/256,
o = -0.5 maps [0, 256) onto [-0.5, 0.5), Glow's input scaling (its release: ``x / n_bins - 0.5``).

Math: log|det| = D log f per sample (D = elements per sample); inverse x = (y - o) / f.
Backward: dL/dx = f dL/dy. No parameters, no cache.
"""
from __future__ import annotations

import math

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.core.backend import array_module


class Rescale(Bijection):
    def __init__(self, factor: float, offset: float = 0.0):
        super().__init__()
        if not factor > 0 or not math.isfinite(factor):
            raise ValueError(f"Rescale factor must be a finite positive number, got {factor}")
        if not math.isfinite(offset):
            raise ValueError(f"Rescale offset must be finite, got {offset}")
        self.factor = float(factor)
        self.offset = float(offset)

    def _logdet(self, x, sign):
        d = int(x[0].size)
        return array_module(x).full((x.shape[0],), sign * d * math.log(self.factor), dtype=x.dtype)

    def forward(self, x, context=None, *, train=False, rng=None):
        return x * self.factor + self.offset, self._logdet(x, 1), None

    def inverse(self, y, context=None):
        return (y - self.offset) / self.factor, self._logdet(y, -1)

    def backward(self, dy, dlogdet, cache):
        return dy * self.factor, None, {}

    def inverse_with_cache(self, y, context=None):
        x, ld = self.inverse(y, context)
        return x, ld, None

    def inverse_backward(self, dx, dlogdet, cache):
        return dx / self.factor, None, {}

    def __repr__(self):
        return f"Rescale({self.factor:g})" if not self.offset else f"Rescale({self.factor:g}, offset={self.offset:g})"
