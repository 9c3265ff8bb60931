"""Elementwise nonlinearities of the Flow++ network: elu, concat_elu, sigmoid, gate.

Paper appendix 8.3::

    concat_elu(x) = elu(concat[x, -x], last axis)        [..., C] -> [..., 2C]
    gate(h)       = h1 * sigmoid(h2),  (h1, h2) = channel halves of h     [..., 2C] -> [..., C]

``*_reference`` functions are the plain-xp math (the reference every kernel is
tested against). The public ``*_forward`` / ``*_backward`` pairs dispatch to the
fused numba kernels of :mod:`flowpp_ref.kernels.numba.activations` when the arrays
are NumPy arrays and :func:`flowpp_ref.kernels.use_kernels` is on, to the CUDA
kernels of :mod:`flowpp_ref.kernels.cuda.layers` for CuPy arrays (run on an H200 by the GPU tests),
else to the reference.

Caches: both ``concat_elu_forward`` and ``gate_forward`` return their *input* as
the cache (a reference, no copy): for concat_elu that is half the size of the
output and the backward recomputes ``exp(-|x|)``; for gate the input is all the
backward needs.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module, is_cupy
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.kernels import use_kernels
from flowpp_ref.kernels.cuda.layers import concat_elu as concat_elu_cuda
from flowpp_ref.kernels.cuda.layers import concat_elu_backward as concat_elu_backward_cuda
from flowpp_ref.kernels.cuda.layers import gate as gate_cuda
from flowpp_ref.kernels.cuda.layers import gate_backward as gate_backward_cuda
from flowpp_ref.kernels.numba.activations import (concat_elu_backward_numba, concat_elu_numba, gate_backward_numba,
                                                  gate_numba)


# ------------------------------------------------------------------ helpers
def elu(x):
    """elu(x) = x for x > 0, exp(x) - 1 otherwise (expm1 on min(x, 0): no overflow)."""
    xp = array_module(x)
    return xp.where(x > 0, x, xp.expm1(xp.minimum(x, 0)))


def elu_grad(x):
    """d elu(x)/dx = 1 for x > 0, exp(x) otherwise (continuous at 0: both sides give 1)."""
    xp = array_module(x)
    return xp.where(x > 0, xp.ones_like(x), xp.exp(xp.minimum(x, 0)))


def sigmoid(x):
    """Numerically stable logistic function: 1/(1+e^-x) for x >= 0, e^x/(1+e^x) otherwise."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _use_numba(x) -> bool:
    return use_kernels() and array_module(x) is np


def _use_cuda(*arrays) -> bool:
    return (use_kernels() and is_cupy(array_module(*arrays))
            and all(a.dtype in (np.float32, np.float64) for a in arrays))


def _check_last_axis(x, name):
    check_array(x, name)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise FlowInputError(f"{name}: expected at least 1 axis with at least one channel, got shape {tuple(x.shape)}")


# --------------------------------------------------------------- concat_elu
def concat_elu_reference(x):
    """elu(concat[x, -x], last axis)."""
    xp = array_module(x)
    return elu(xp.concatenate([x, -x], axis=-1))


def concat_elu_backward_reference(dout, x):
    """dL/dx = dout[..., :C] * elu'(x) - dout[..., C:] * elu'(-x)."""
    C = x.shape[-1]
    return dout[..., :C] * elu_grad(x) - dout[..., C:] * elu_grad(-x)


def concat_elu_forward(x):
    """Math: elu(concat[x, -x]). Shapes: [..., C] -> [..., 2C]. Cache: x (reference)."""
    _check_last_axis(x, "concat_elu input")
    if _use_numba(x):
        return concat_elu_numba(x), x
    if _use_cuda(x):
        return concat_elu_cuda(x), x
    return concat_elu_reference(x), x


def concat_elu_backward(dout, cache):
    """dL/dx from dL/dout (``[..., 2C]``) and the cached input x (``[..., C]``)."""
    x = cache
    if tuple(dout.shape) != (*x.shape[:-1], 2 * x.shape[-1]):
        raise FlowInputError(f"concat_elu backward: dout has shape {tuple(dout.shape)}, expected "
                             f"{(*x.shape[:-1], 2 * x.shape[-1])}")
    if _use_numba(x) and array_module(dout) is np:
        return concat_elu_backward_numba(dout, x)
    if _use_cuda(x, dout):
        return concat_elu_backward_cuda(dout, x)
    return concat_elu_backward_reference(dout, x)


def concat_elu(x):
    """Forward only (no cache)."""
    return concat_elu_forward(x)[0]


# --------------------------------------------------------------------- gate
def gate_reference(x):
    """h1 * sigmoid(h2) with (h1, h2) the halves of the last axis."""
    C = x.shape[-1] // 2
    return x[..., :C] * sigmoid(x[..., C:])


def gate_backward_reference(dout, x):
    """dL/dh1 = dout * s,  dL/dh2 = dout * h1 * s * (1 - s),  s = sigmoid(h2).

    ``1 - s`` is evaluated as ``sigmoid(-h2)`` (no cancellation for large h2).
    """
    xp = array_module(x)
    C = x.shape[-1] // 2
    h1, h2 = x[..., :C], x[..., C:]
    s = sigmoid(h2)
    return xp.concatenate([dout * s, dout * h1 * (s * sigmoid(-h2))], axis=-1)


def _check_gate_input(x):
    _check_last_axis(x, "gate input")
    if x.shape[-1] % 2:
        raise FlowInputError(f"gate input: the last axis must have an even size, got shape {tuple(x.shape)}")


def gate_forward(x):
    """Math: h1 * sigmoid(h2). Shapes: [..., 2C] -> [..., C]. Cache: x (reference)."""
    _check_gate_input(x)
    if _use_numba(x):
        return gate_numba(x), x
    if _use_cuda(x):
        return gate_cuda(x), x
    return gate_reference(x), x


def gate_backward(dout, cache):
    """dL/dx (``[..., 2C]``) from dL/dout (``[..., C]``) and the cached input x."""
    x = cache
    if tuple(dout.shape) != (*x.shape[:-1], x.shape[-1] // 2):
        raise FlowInputError(f"gate backward: dout has shape {tuple(dout.shape)}, expected "
                             f"{(*x.shape[:-1], x.shape[-1] // 2)}")
    if _use_numba(x) and array_module(dout) is np:
        return gate_backward_numba(dout, x)
    if _use_cuda(x, dout):
        return gate_backward_cuda(dout, x)
    return gate_backward_reference(dout, x)


def gate(x):
    """Forward only (no cache)."""
    return gate_forward(x)[0]
