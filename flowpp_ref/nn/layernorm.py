"""Layer normalisation over the last (channel) axis, as the paper's ``norm``/``_norm``.

Math (per position, over the C channels; appendix 8.3, ``_norm``)::

    u    = mean_c x
    s    = mean_c (x - u)^2
    rstd = 1 / sqrt(s + eps)                      eps = 1e-5
    xhat = (x - u) * rstd
    out  = xhat * g + b                           g, b: [C], init 1 and 0

Backward (dxh = dout * g; means over the C channels of one position)::

    dL/db = sum_{positions} dout
    dL/dg = sum_{positions} dout * xhat
    dL/dx = rstd * (dxh - mean_c(dxh) - xhat * mean_c(dxh * xhat))

Shapes: x ``[..., C]`` (NHWC in the network), out the same.
Cache: ``(xhat, rstd)``: xhat ``[..., C]`` and rstd ``[..., 1]``; x itself is not kept.

The plain-``xp`` functions :func:`layernorm_forward_ref` / :func:`layernorm_backward_ref`
are the math; with NumPy arrays and kernels enabled the fused numba kernels of
:mod:`flowpp_ref.kernels.numba.layernorm` run instead (same results to round-off); with
CuPy arrays the CUDA kernels of :mod:`flowpp_ref.kernels.cuda.layers` (run on an H200 by the GPU tests).
"""
from __future__ import annotations

import numba
import numpy as np

from flowpp_ref.core.backend import array_module, asarray, is_cupy
from flowpp_ref.core.module import Module
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.kernels import use_kernels
from flowpp_ref.kernels.cuda import layers as cuda_layers
from flowpp_ref.kernels.numba import layernorm as numba_layernorm


# ------------------------------------------------------------------ reference
def layernorm_forward_ref(x, g, b, eps=1e-5):
    """Reference forward: returns ``(out, xhat, rstd)``; rstd has shape ``[..., 1]``."""
    xp = array_module(x)
    u = x.mean(axis=-1, keepdims=True)                       # [..., 1]
    d = x - u
    s = (d * d).mean(axis=-1, keepdims=True)                 # [..., 1]
    rstd = (1.0 / xp.sqrt(s + eps)).astype(x.dtype, copy=False)
    xhat = d * rstd
    return xhat * g + b, xhat, rstd


def layernorm_backward_ref(dout, xhat, rstd, g):
    """Reference backward: returns ``(dx, dg, db)``."""
    red = tuple(range(dout.ndim - 1))
    db = dout.sum(axis=red)                                  # dL/db = sum dout
    dg = (dout * xhat).sum(axis=red)                         # dL/dg = sum dout * xhat
    dxh = dout * g                                           # dL/dxhat
    # dL/dx = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat))
    dx = rstd * (dxh - dxh.mean(axis=-1, keepdims=True)
                 - xhat * (dxh * xhat).mean(axis=-1, keepdims=True))
    return dx, dg, db


# ------------------------------------------------------------------ dispatch
def _numba_ok(xp, x):
    return xp is np and use_kernels() and x.dtype in (np.float32, np.float64)


def _cuda_ok(xp, x):
    return is_cupy(xp) and use_kernels() and x.dtype in (np.float32, np.float64)


def layernorm_forward(x, g, b, eps=1e-5):
    """``(out, xhat, rstd)``: numba kernel for NumPy arrays, CUDA kernel for CuPy arrays, else the reference."""
    xp = array_module(x)
    if _cuda_ok(xp, x):
        return cuda_layers.layernorm_forward(x, g, b, eps)
    if not _numba_ok(xp, x):
        return layernorm_forward_ref(x, g, b, eps)
    c = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, c)
    out = np.empty_like(x2)
    xhat = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    parallel = x2.size >= numba_layernorm.PARALLEL_MIN_SIZE
    kern = numba_layernorm.layernorm_forward_parallel if parallel else numba_layernorm.layernorm_forward_serial
    kern(x2, g.astype(x.dtype, copy=False), b.astype(x.dtype, copy=False), float(eps), out, xhat, rstd)
    lead = x.shape[:-1]
    return out.reshape(x.shape), xhat.reshape(x.shape), rstd.reshape(lead + (1,))


def layernorm_backward(dout, xhat, rstd, g):
    """``(dx, dg, db)``: numba kernel for NumPy arrays, CUDA kernel for CuPy arrays, else the reference."""
    xp = array_module(dout)
    if _cuda_ok(xp, dout):
        return cuda_layers.layernorm_backward(dout, xhat, rstd, g)
    if not _numba_ok(xp, dout):
        return layernorm_backward_ref(dout, xhat, rstd, g)

    c = dout.shape[-1]
    d2 = np.ascontiguousarray(dout).reshape(-1, c)
    h2 = np.ascontiguousarray(xhat).reshape(-1, c)
    r1 = np.ascontiguousarray(rstd).reshape(-1)
    dx = np.empty_like(d2)
    par = d2.size >= numba_layernorm.PARALLEL_MIN_SIZE
    parts = max(1, min(numba.get_num_threads(), d2.shape[0])) if par else 1
    dg_part = np.zeros((parts, c), dtype=np.float64)
    db_part = np.zeros((parts, c), dtype=np.float64)
    kern = numba_layernorm.layernorm_backward_parallel if par else numba_layernorm.layernorm_backward_serial
    kern(d2, h2, r1, g.astype(dout.dtype, copy=False), dx, dg_part, db_part)
    dt = dout.dtype
    return dx.reshape(dout.shape), dg_part.sum(0).astype(dt), db_part.sum(0).astype(dt)


# ------------------------------------------------------------------ layer
class LayerNorm(Module):
    """Layer norm over the last axis with gain ``g`` and bias ``b`` (paper: ``norm``).

    ``out, cache = ln.forward(x)``; ``dx, grads = ln.backward(dout, cache)`` with
    ``grads = {"g": [C], "b": [C]}``. See the module docstring for Math and Cache.
    """

    def __init__(self, channels, *, xp=np, dtype=np.float32, eps=1e-5):
        super().__init__()
        self.channels = int(channels)
        self.eps = float(eps)
        self.params["g"] = asarray(np.ones(self.channels), xp, dtype)
        self.params["b"] = asarray(np.zeros(self.channels), xp, dtype)

    def forward(self, x, *, train=False, rng=None):
        check_array(x, "LayerNorm input")
        if x.ndim < 1 or x.shape[-1] != self.channels:
            raise FlowInputError(f"LayerNorm input: expected last axis of size {self.channels}, "
                                 f"got shape {tuple(x.shape)}")
        out, xhat, rstd = layernorm_forward(x, self.params["g"], self.params["b"], self.eps)
        return out, (xhat, rstd)

    def backward(self, dout, cache):
        xhat, rstd = cache
        dx, dg, db = layernorm_backward(dout, xhat, rstd, self.params["g"])
        return dx, {"g": dg, "b": db}

    def __repr__(self):
        return f"LayerNorm({self.channels}, eps={self.eps:g})"
