"""Inverted dropout with an explicit mask (paper: ``tf.nn.dropout(x, keep_prob=1-p)``).

The mask is drawn from the generator the caller passes (never from a global
state) and returned in the cache, so a gradient check can replay the same mask.
"""
from __future__ import annotations

from flowpp_ref.core.module import Module


def dropout_apply(x, mask, p: float):
    """``x * mask / (1 - p)``; the one expression used by forward and by recomputations."""
    return x * mask / (1.0 - p)


class Dropout(Module):
    """Inverted dropout.

    Math:   train and p > 0: mask = (u >= p), u ~ U[0,1) from ``rng.random(x.shape)``;
            out = x * mask / (1 - p).  Eval (or p = 0): out = x.

    Shapes: any.
    Cache:  the boolean mask (1 byte per element), or None in eval mode.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x, *, train=False, rng=None):
        if not train or self.p == 0.0:
            return x, None
        if rng is None:
            raise ValueError(f"Dropout(p={self.p}) in training mode needs a random generator: "
                             "pass rng=make_rng(seed, xp) (or train=False for evaluation)")
        mask = rng.random(x.shape) >= self.p
        return dropout_apply(x, mask, self.p), mask

    def backward(self, dout, cache):
        # dL/dx = dout * mask / (1 - p)   (identity in eval mode)
        mask = cache
        if mask is None:
            return dout, {}
        return dropout_apply(dout, mask, self.p), {}
