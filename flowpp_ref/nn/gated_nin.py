"""Gated pointwise block: the release's replacement of attention in the "no self-attention"
ablation (``flows/ablations/abl_noattn.py``, ``gated_nin``), with attention's parameter count.

Math (F filters; the same slots as :class:`~flowpp_ref.nn.attention.SelfAttention`)::

    c    = x + pos_emb[None]                               [B, H, W, F]
    p    = proj1(c)                                        [B, H, W, 3F]  (weight-norm NIN)
    m_j  = max(p[..., 3j], p[..., 3j+1], p[..., 3j+2])     [B, H, W, F]   3-way maxout:
                                                           p reshaped to [B, H, W, F, 3], max on the last axis
    m    = dropout(m)
    c2   = proj2(m)                                        [B, H, W, 2F]  (NIN, init_scale 0.1)
    out  = x + gate(c2),  gate(c2) = c2[..., :F] * sigmoid(c2[..., F:])

No mixing across positions: every pixel is processed alone (hence "pointwise").

Backward::

    dc2 = gate'(dout);  dm = proj2'(dc2);  dm = dropout'(dm)
    dp[..., 3j + i] = dm_j * [i = argmax_i p[..., 3j + i]]       (the max passes its
                       gradient to one input; ties go to the first, as numpy's argmax)
    dc  = proj1'(dp)
    dx  = dout + dc;   dpos_emb = sum_batch dc

(TensorFlow's ``reduce_max`` gradient splits a tie evenly among the tied inputs; ties
have probability 0 for continuous inputs, so the two agree almost everywhere.)

Shapes: x ``[B, H, W, F]``, pos_emb ``[H, W, F]`` -> out ``[B, H, W, F]``.
Cache: the argmax index ``[B, H, W, F]`` (int8), the caches of proj1 (its input c),
dropout (its mask), proj2 (its input) and the gate.
The interface is SelfAttention's, so :class:`~flowpp_ref.nn.network.NetworkBlock` can
hold either.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.nn.activations import gate_backward, gate_forward
from flowpp_ref.nn.dropout import Dropout
from flowpp_ref.nn.weightnorm import NIN


def maxout3(p):
    """``[..., 3F] -> ([..., F], argmax int8 [..., F])``: max over consecutive triples."""
    xp = array_module(p)
    q = p.reshape(*p.shape[:-1], p.shape[-1] // 3, 3)
    idx = q.argmax(axis=-1).astype(np.int8)
    m = xp.take_along_axis(q, idx[..., None].astype(np.intp), axis=-1)[..., 0]
    return m, idx


def maxout3_backward(dm, idx):
    """dL/dp ``[..., 3F]``: dm routed to the arg-max of each triple, zero elsewhere."""
    xp = array_module(dm)
    onehot = idx[..., None] == xp.arange(3, dtype=np.int8)          # [..., F, 3]
    dp = onehot * dm[..., None]
    return dp.reshape(*dm.shape[:-1], 3 * dm.shape[-1]).astype(dm.dtype, copy=False)


class GatedNIN(Module):
    """Gated pointwise (maxout NIN) residual block; see the module docstring.

    ``out, cache = blk.forward(x, pos_emb, train=False, rng=None)``;
    ``dx, dpos_emb, grads = blk.backward(dout, cache)``;
    ``out = blk.data_init(x, pos_emb)`` (DDI of proj1 then proj2, no dropout).
    Children: ``proj1`` (NIN F -> 3F), ``proj2`` (NIN F -> 2F, init_scale 0.1) -- the
    names and shapes of SelfAttention's, so the parameter count is attention's.
    """

    def __init__(self, filters, dropout_p=0.0, *, rng, xp=np, dtype=np.float32):
        super().__init__()
        self.filters = int(filters)
        self.proj1 = self.add("proj1", NIN(filters, 3 * filters, rng=rng, xp=xp, dtype=dtype))
        self.proj2 = self.add("proj2", NIN(filters, 2 * filters, init_scale=0.1, rng=rng, xp=xp, dtype=dtype))
        self.dropout_p = float(dropout_p)
        self.dropout = Dropout(dropout_p)

    def _check(self, x, pos_emb):
        check_array(x, "GatedNIN input", ndim=4)
        if x.shape[-1] != self.filters:
            raise FlowInputError(f"GatedNIN input: expected {self.filters} channels, got shape {tuple(x.shape)}")
        if pos_emb is None or tuple(pos_emb.shape) != tuple(x.shape[1:]):
            got = None if pos_emb is None else tuple(pos_emb.shape)
            raise FlowInputError(f"GatedNIN: pos_emb has shape {got}, expected {tuple(x.shape[1:])}")

    def forward(self, x, pos_emb, *, train=False, rng=None):
        self._check(x, pos_emb)
        p, p1_cache = self.proj1.forward(x + pos_emb[None])
        m, idx = maxout3(p)
        m, d_cache = self.dropout.forward(m, train=train, rng=rng)
        c2, p2_cache = self.proj2.forward(m)
        gt, g_cache = gate_forward(c2)
        return x + gt, dict(idx=idx, proj1=p1_cache, dropout=d_cache, proj2=p2_cache, gate=g_cache)

    def backward(self, dout, cache):
        dc2 = gate_backward(dout, cache["gate"])                       # dL/dc2
        dm, g2 = self.proj2.backward(dc2, cache["proj2"])              # dL/dm (after dropout)
        dm, _ = self.dropout.backward(dm, cache["dropout"])            # dL/dm (before dropout)
        dp = maxout3_backward(dm, cache["idx"])                        # to the arg-max of each triple
        dc, g1 = self.proj1.backward(dp, cache["proj1"])
        grads = prefixed("proj1", g1)
        grads.update(prefixed("proj2", g2))
        return dout + dc, dc.sum(axis=0), grads                       # dx, dpos_emb, grads

    def data_init(self, x, pos_emb):
        self._check(x, pos_emb)
        p = self.proj1.data_init(x + pos_emb[None])
        c2 = self.proj2.data_init(maxout3(p)[0])
        return x + gate_forward(c2)[0]

    def __repr__(self):
        return f"GatedNIN(filters={self.filters}, dropout_p={self.dropout_p})"
