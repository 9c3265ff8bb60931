"""Rescale: y = f * x with a constant factor (maps n-bit data [0, 2^n) onto ImgProc's [0, 256)).

Math: log|det| = D log f per sample (D = elements per sample).
Backward: dL/dx = f dL/dy. No parameters, no cache.
"""
from __future__ import annotations

import math

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.core.backend import array_module


class Rescale(Bijection):
    def __init__(self, factor: float):
        super().__init__()
        if not factor > 0:
            raise ValueError(f"Rescale factor must be positive, got {factor}")
        self.factor = float(factor)

    def _logdet(self, x, sign):
        d = int(x[0].size)
        return array_module(x).full((x.shape[0],), sign * d * math.log(self.factor), dtype=x.dtype)

    def forward(self, x, context=None, *, train=False, rng=None):
        return x * self.factor, self._logdet(x, 1), None

    def inverse(self, y, context=None):
        return y / self.factor, self._logdet(y, -1)

    def backward(self, dy, dlogdet, cache):
        return dy * self.factor, None, {}

    def inverse_with_cache(self, y, context=None):
        x, ld = self.inverse(y, context)
        return x, ld, None

    def inverse_backward(self, dx, dlogdet, cache):
        return dx / self.factor, None, {}

    def __repr__(self):
        return f"Rescale({self.factor:g})"
