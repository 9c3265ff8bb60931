"""Multi-head self-attention over all H*W positions, with a gated residual (paper sec. 3.2.2: ``attn``).

Math (appendix 8.3, ``attn``; F filters, h heads, d = F / h, T = H * W)::

    c    = x + pos_emb[None]                               [B, H, W, F]
    qkv  = proj1(c)                                        [B, H, W, 3F]  (weight-norm NIN)
    q, k, v: reshape qkv to [B, T, 3, h, d], transpose to [3, B, h, T, d]
    S    = q k^T / sqrt(d)                                 [B, h, T, T]
    W    = softmax(S)   (over the last axis: the keys)
    A    = W v                                             [B, h, T, d]
    a    = merge heads: transpose A to [B, T, h, d], reshape to [B, H, W, F]
    a    = dropout(a)
    c2   = proj2(a)                                        [B, H, W, 2F]  (NIN, init_scale 0.1)
    out  = x + gate(c2),  gate(c2) = c2[..., :F] * sigmoid(c2[..., F:])

Backward (dA etc. are dL/dA)::

    dc2 = gate'(dout);  da = proj2'(dc2);  da = dropout'(da);  dA = split heads of da
    dW  = dA v^T;       dv = W^T dA
    dS  = W * (dW - sum_keys(dW * W))                      (softmax backward)
    dq  = dS k / sqrt(d);  dk = dS^T q / sqrt(d)
    dqkv = stack(dq, dk, dv) put back to [B, H, W, 3F];  dc = proj1'(dqkv)
    dx  = dout + dc;   dpos_emb = sum_batch dc

``pos_emb`` belongs to the conditioning network (one table shared by all blocks), so it is
an input here and its gradient is returned beside dx.

Shapes: x ``[B, H, W, F]``, pos_emb ``[H, W, F]``, out ``[B, H, W, F]``.

Two ways to compute ``A`` and its backward, same math:

* **fused** (default when kernels are enabled, :func:`flowpp_ref.kernels.use_kernels`): an
  online softmax over blocks of keys that never forms the ``[B, h, T, T]`` weights
  (:mod:`flowpp_ref.kernels.numba.attention` for NumPy, :mod:`flowpp_ref.kernels.cuda.attention`
  for CuPy; both derive the recurrence). Cache: ``qkv`` ``[B, H, W, 3F]`` (q, k, v are views of
  it), the attention output ``attn_out`` (A merged, ``[B, H, W, F]``, before dropout) and the row
  log-sum-exp ``lse`` ``[B, h, T]`` of the scores; the backward recomputes the weights block by
  block (``W = exp(S - lse)``) and uses ``D = rowsum(dA * A)`` in place of ``sum_keys(dW * W)``.
* **reference** (kernels off, or ``SelfAttention(..., fused=False)``): the explicit path above,
  :func:`attention_ref` / :func:`attention_backward_ref`. Cache: ``qkv`` and the weights ``W``
  ``[B, h, T, T]`` (4 * B * h * T^2 bytes in float32; S is not kept, W suffices for the softmax
  backward).

Both caches also hold those of proj1 (its input c), dropout (its mask), proj2 (its input) and
the gate. :meth:`SelfAttention.attention_maps` computes the weights on demand (reference path).

The reference's row softmax and its backward run in place, as numba kernels
(:mod:`flowpp_ref.kernels.numba.softmax`) for NumPy arrays when kernels are enabled,
else as the plain-``xp`` references :func:`softmax_ref` / :func:`softmax_backward_ref`.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module, is_cupy
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.kernels import use_kernels
from flowpp_ref.kernels.cuda import attention as cuda_attention
from flowpp_ref.kernels.numba import attention as numba_attention
from flowpp_ref.kernels.numba.softmax import softmax_backward_rows_inplace, softmax_rows_inplace
from flowpp_ref.nn.activations import gate_backward, gate_forward
from flowpp_ref.nn.dropout import Dropout
from flowpp_ref.nn.weightnorm import NIN

# SelfAttention's path when its ``fused`` argument is None, per backend: set from the device check's
# measurement of both paths on the paper's coupling layer (the plain batched matmuls were the faster on CuPy)
FUSED_DEFAULT = {"numpy": True, "cupy": False}


# ------------------------------------------------------------------ softmax
def softmax_ref(s):
    """Softmax over the last axis, in place on ``s`` (also returned)."""
    xp = array_module(s)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def softmax_backward_ref(w, dw):
    """dL/dS = W * (dW - sum_keys(dW * W)), written into ``dw`` (also returned)."""
    dw -= (dw * w).sum(axis=-1, keepdims=True)
    dw *= w
    return dw


def _use_numba(xp, a):
    return xp is np and use_kernels() and a.flags.c_contiguous and a.dtype in (np.float32, np.float64)


def softmax_inplace(s):
    xp = array_module(s)
    if _use_numba(xp, s):
        softmax_rows_inplace(s.reshape(-1, s.shape[-1]))
        return s
    return softmax_ref(s)


def softmax_backward_inplace(w, dw):
    xp = array_module(dw)
    if _use_numba(xp, dw) and w.flags.c_contiguous:
        softmax_backward_rows_inplace(w.reshape(-1, w.shape[-1]), dw.reshape(-1, dw.shape[-1]))
        return dw
    return softmax_backward_ref(w, dw)


# ------------------------------------------------------------------ attention of q, k, v [B, h, T, d]
def attention_ref(q, k, v):
    """Plain attention: (W, A) with W = softmax(q k^T / sqrt(d)) ``[B, h, T, T]``, A = W v ``[B, h, T, d]``."""
    xp = array_module(q)
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    w = xp.matmul(q * scale, k.swapaxes(-1, -2))                      # S = q k^T / sqrt(d)
    softmax_inplace(w)                                                # W = softmax(S)
    return w, xp.matmul(w, v)                                         # A = W v


def attention_backward_ref(q, k, v, w, dA):
    """(dq, dk, dv) of the plain attention from its weights ``w`` (overwritten) and upstream ``dA``."""
    xp = array_module(q)
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    dw = xp.matmul(dA, v.swapaxes(-1, -2))                            # dW = dA v^T
    dv = xp.matmul(w.swapaxes(-1, -2), dA)                            # dv = W^T dA
    ds = softmax_backward_inplace(w, dw)                              # dS = W (dW - sum(dW W))
    dq = xp.matmul(ds, k) * scale                                     # dq = dS k / sqrt(d)
    dk = xp.matmul(ds.swapaxes(-1, -2), q) * scale                    # dk = dS^T q / sqrt(d)
    return dq, dk, dv


def fused_attention_forward(q, k, v, out=None):
    """(A, lse) of softmax(q k^T / sqrt(d)) v without the weights: numba (NumPy) or CUDA (CuPy) kernel.

    ``out`` (optional, may be a strided view ``[B, h, T, d]``) receives A. Raises for other
    array types or dtypes (the caller decides between fused and reference).
    """
    xp = array_module(q)
    if xp is np:
        return numba_attention.attention_forward(q, k, v, out=out)
    return cuda_attention.attention_forward(q, k, v, out=out)


def fused_attention_backward(q, k, v, a, lse, dA, dq=None, dk=None, dv=None):
    """(dq, dk, dv) of the fused attention (weights recomputed from q, k, lse), into dq/dk/dv if given."""
    xp = array_module(q)
    if xp is np:
        return numba_attention.attention_backward(q, k, v, a, lse, dA, dq=dq, dk=dk, dv=dv)
    return cuda_attention.attention_backward(q, k, v, a, lse, dA, dq=dq, dk=dk, dv=dv)


# ------------------------------------------------------------------ layer
class SelfAttention(Module):
    """Gated residual multi-head self-attention block (paper ``attn``, 4 heads).

    ``out, cache = attn.forward(x, pos_emb, train=False, rng=None)``;
    ``dx, dpos_emb, grads = attn.backward(dout, cache)``;
    ``out = attn.data_init(x, pos_emb)`` (weight-norm DDI of proj1 then proj2; no dropout);
    ``w = attn.attention_maps(x, pos_emb)`` -> ``[B, heads, H*W, H*W]`` (rows sum to 1).
    ``fused``: ``True`` uses the fused kernels when kernels are enabled, ``False`` keeps the
    explicit reference path (weights in the cache); ``None`` (default) takes the backend's default,
    :data:`FUSED_DEFAULT`: fused on NumPy (numba), the reference path on CuPy, whose batched matmuls
    (cuBLAS) outran the untiled CUDA kernels in the GPU check (``benchmarks/bench_gpu.py`` times both).
    Children: ``proj1`` (NIN F -> 3F), ``proj2`` (NIN F -> 2F, init_scale 0.1).
    See the module docstring for Math, Shapes and Cache.
    """

    def __init__(self, filters, heads=4, dropout_p=0.0, *, rng, xp=np, dtype=np.float32, fused=None):
        super().__init__()
        self.fused = FUSED_DEFAULT["cupy" if is_cupy(xp) else "numpy"] if fused is None else bool(fused)
        if filters % heads != 0:
            raise ValueError(f"filters ({filters}) must be a multiple of heads ({heads})")
        self.filters, self.heads, self.dim = int(filters), int(heads), int(filters) // int(heads)
        self.proj1 = self.add("proj1", NIN(filters, 3 * filters, rng=rng, xp=xp, dtype=dtype))
        self.proj2 = self.add("proj2", NIN(filters, 2 * filters, init_scale=0.1, rng=rng, xp=xp, dtype=dtype))
        self.dropout_p = float(dropout_p)
        self.dropout = Dropout(dropout_p)

    # -------------------------------------------------------------- helpers
    def _check(self, x, pos_emb):
        check_array(x, "SelfAttention input", ndim=4)
        if x.shape[-1] != self.filters:
            raise FlowInputError(f"SelfAttention input: expected {self.filters} channels, got shape {tuple(x.shape)}")
        if tuple(pos_emb.shape) != tuple(x.shape[1:]):
            raise FlowInputError(f"SelfAttention: pos_emb has shape {tuple(pos_emb.shape)}, "
                                 f"expected {tuple(x.shape[1:])} (H, W, F of the input)")

    def _split(self, qkv):
        """[B, H, W, 3F] -> q, k, v views [B, h, T, d] (reshape [B, T, 3, h, d], transpose)."""
        B, H, W, _ = qkv.shape
        c = qkv.reshape(B, H * W, 3, self.heads, self.dim).transpose(2, 0, 3, 1, 4)
        return c[0], c[1], c[2]

    def _use_fused(self, qkv):
        return self.fused and use_kernels() and qkv.dtype in (np.float32, np.float64)

    def _merged(self, a, B, H, W):
        """A [B, h, T, d] -> [B, H, W, F] (transpose to [B, T, h, d], reshape)."""
        xp = array_module(a)
        return xp.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(B, H, W, self.filters)

    def _attend(self, qkv):
        """Reference path: attention weights W [B, h, T, T] and merged output a [B, H, W, F]."""
        B, H, W, _ = qkv.shape
        q, k, v = self._split(qkv)
        w, a = attention_ref(q, k, v)
        return w, self._merged(a, B, H, W)

    def _attend_fused(self, qkv):
        """Fused path: merged output a [B, H, W, F] and the row log-sum-exp lse [B, h, T]."""
        xp = array_module(qkv)
        B, H, W, _ = qkv.shape
        q, k, v = self._split(qkv)
        merged = xp.empty((B, H * W, self.heads, self.dim), dtype=qkv.dtype)
        _, lse = fused_attention_forward(q, k, v, out=merged.transpose(0, 2, 1, 3))  # A, merged layout
        return merged.reshape(B, H, W, self.filters), lse

    # -------------------------------------------------------------- protocol
    def forward(self, x, pos_emb, *, train=False, rng=None):
        self._check(x, pos_emb)
        c = x + pos_emb[None]
        qkv, p1_cache = self.proj1.forward(c)
        if self._use_fused(qkv):
            a, lse = self._attend_fused(qkv)
            att = dict(attn_out=a, lse=lse)                              # A and L only, no [B, h, T, T]
        else:
            w, a = self._attend(qkv)
            att = dict(weights=w)
        ad, d_cache = self.dropout.forward(a, train=train, rng=rng)
        c2, p2_cache = self.proj2.forward(ad)
        gt, g_cache = gate_forward(c2)
        out = x + gt
        cache = dict(qkv=qkv, proj1=p1_cache, dropout=d_cache, proj2=p2_cache, gate=g_cache, **att)
        return out, cache

    def backward(self, dout, cache):
        xp = array_module(dout)
        qkv = cache["qkv"]
        B, H, W, F = dout.shape
        T, h, d = H * W, self.heads, self.dim
        dc2 = gate_backward(dout, cache["gate"])                         # dL/dc2
        da, g2 = self.proj2.backward(dc2, cache["proj2"])                # dL/da (after dropout)
        da, _ = self.dropout.backward(da, cache["dropout"])              # dL/da (before dropout)
        dA = da.reshape(B, T, h, d).transpose(0, 2, 1, 3)                # [B, h, T, d]
        q, k, v = self._split(qkv)
        dqkv = xp.empty((B, T, 3, h, d), dtype=dout.dtype)
        dview = dqkv.transpose(2, 0, 3, 1, 4)                            # [3, B, h, T, d]
        if "lse" in cache:                                               # fused: weights recomputed
            A = cache["attn_out"].reshape(B, T, h, d).transpose(0, 2, 1, 3)
            fused_attention_backward(q, k, v, A, cache["lse"], dA, dq=dview[0], dk=dview[1], dv=dview[2])
        else:
            dview[0], dview[1], dview[2] = attention_backward_ref(q, k, v, cache["weights"], dA)
        dc, g1 = self.proj1.backward(dqkv.reshape(B, H, W, 3 * F), cache["proj1"])
        dx = dout + dc                                                   # residual + attention path
        dpos = dc.sum(axis=0)                                            # pos_emb broadcast over batch
        grads = prefixed("proj1", g1)
        grads.update(prefixed("proj2", g2))
        return dx, dpos, grads

    def data_init(self, x, pos_emb):
        """Data-dependent init of proj1 and proj2 on this batch (dropout off); returns out."""
        self._check(x, pos_emb)
        qkv = self.proj1.data_init(x + pos_emb[None])
        a = self._attend_fused(qkv)[0] if self._use_fused(qkv) else self._attend(qkv)[1]
        c2 = self.proj2.data_init(a)
        return x + gate_forward(c2)[0]

    def attention_maps(self, x, pos_emb):
        """The softmax weights ``[B, heads, H*W, H*W]`` for input x (eval mode), computed on demand."""
        self._check(x, pos_emb)
        qkv, _ = self.proj1.forward(x + pos_emb[None])
        return self._attend(qkv)[0]

    def __repr__(self):
        return f"SelfAttention(filters={self.filters}, heads={self.heads}, dropout_p={self.dropout_p})"
