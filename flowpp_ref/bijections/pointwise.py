"""Pointwise: the invertible 1x1 convolution (one C x C matrix at every pixel).

Math (convention: pixels are row vectors, as in the released ``_nin``,
``tf.matmul(x.reshape(-1, C), W)``)::

    y[b, h, w, :] = x[b, h, w, :] @ W
    logdet = H * W_img * log|det W|            the same for every sample
    inverse: x[b, h, w, :] = y[b, h, w, :] @ W^{-1},  logdet_inv = -logdet

``log|det W|`` (``slogdet``) and ``W^{-1}`` are computed in float64 and cast back
to the parameter dtype (the paper's code also takes the determinant in double). NumPy: on the host, with the checks below. CuPy: on the
device (``cupy.linalg``), unchecked, so that a training step needs no host round
trip; a singular or non-finite W then gives a non-finite log-det, which the
training loop's non-finite check catches (the GPU tests of the lineage ran this path on an H200).

A tuple input ``(x0, x1)`` gets one matrix per element (``W0``, ``W1``, as in the
paper's ``W{i}``); a single array uses ``W``.

Singular or non-finite W: :class:`FlowInputError`. "Singular" means
numerically singular in float64: the smallest singular value is at most
``C * eps64 * largest`` (NumPy's ``matrix_rank`` tolerance), i.e. the condition
number exceeds ``1 / (C * eps64)`` ~ 4.5e15 / C.

Inits (a host ``np.random.Generator`` is passed to the constructor):

* ``noisy_identity_init=0.001`` (CIFAR setting): ``W = I + 0.001 * N(0, 1)``;
* ``noisy_identity_init=None`` (or 0): a random orthogonal matrix, the Q factor
  of the QR decomposition of a standard normal matrix.

References: Flow++ appendix 8.1 (``Pointwise``); Glow (Kingma & Dhariwal 2018).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection, as_channel_list
from flowpp_ref.core.backend import array_module, asarray, is_cupy, to_numpy
from flowpp_ref.core.validation import FlowInputError

EPS64 = float(np.finfo(np.float64).eps)


def factor_matrix(W, name: str = "W", *, on_device: bool | None = None):
    """``(log|det W|, W^{-1})`` computed in float64.

    Host path (NumPy arrays; ``on_device=False``): raises on a singular/non-finite W and
    returns the log-det as a Python float. Device path (CuPy arrays; ``on_device=True``):
    no check, no transfer; the log-det is a 0-d float64 array on W's backend. The
    inverse is returned on W's backend in W's dtype.
    """
    if on_device is None:
        on_device = is_cupy(array_module(W))
    if on_device:
        xp = array_module(W)
        W64 = W.astype(xp.float64)
        _, logabsdet = xp.linalg.slogdet(W64)
        return logabsdet, xp.linalg.inv(W64).astype(W.dtype)
    W64 = to_numpy(W).astype(np.float64)
    C = W64.shape[0]
    if not np.isfinite(W64).all():
        bad = int((~np.isfinite(W64)).sum())
        raise FlowInputError(f"{name}: {bad} non-finite entries in the {C}x{C} matrix")
    sv = np.linalg.svd(W64, compute_uv=False)
    if not sv[-1] > sv[0] * C * EPS64:
        raise FlowInputError(f"{name}: the {C}x{C} matrix is singular (singular values from {sv[0]:.3g} "
                             f"down to {sv[-1]:.3g}; need smallest > C * eps64 * largest)")
    _, logabsdet = np.linalg.slogdet(W64)
    Winv = np.linalg.inv(W64)
    return float(logabsdet), asarray(Winv, array_module(W), W.dtype)


def _per_sample(xp, a, total):
    """The log-det ``total`` (a float or a 0-d backend array) for each of a's samples, in a's dtype."""
    out = xp.empty((a.shape[0],), dtype=a.dtype)
    out[...] = total
    return out


class Pointwise(Bijection):
    """Invertible 1x1 convolution; see the module docstring for the math.

    Args:
        channels: C (int) for an array input, or a tuple of ints for a tuple input.
        rng: host ``np.random.Generator`` for the init (required).
        noisy_identity_init: noise scale of ``I + s * N(0, 1)``; ``None`` or 0 for
            a random orthogonal init.
        xp, dtype: where and how the matrices are stored.

    Shapes: x [B, H, W, C] (or a tuple of such) -> same; logdet (B,).
    Cache: forward keeps the inputs ``x`` and ``Winv`` (W^{-1}, from the float64
    inverse) per element; inverse keeps its inputs ``y`` and ``Winv``.
    """

    def __init__(self, channels, *, rng, noisy_identity_init=0.001, xp=np, dtype=np.float32):
        super().__init__()
        if isinstance(channels, (int, np.integer)):
            self.is_tuple, chans = False, [int(channels)]
        elif isinstance(channels, (tuple, list)) and len(channels) > 0 and all(
                isinstance(c, (int, np.integer)) for c in channels):
            self.is_tuple, chans = True, [int(c) for c in channels]
        else:
            raise ValueError(f"channels must be an int or a tuple of ints, got {channels!r}")
        if any(c < 1 for c in chans):
            raise ValueError(f"channel counts must be positive, got {channels!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a host np.random.Generator, got {type(rng).__name__}")
        self.channels = chans
        self.noisy_identity_init = noisy_identity_init
        for i, C in enumerate(chans):
            if noisy_identity_init:
                W0 = np.eye(C) + noisy_identity_init * rng.standard_normal((C, C))
            else:
                W0 = np.linalg.qr(rng.standard_normal((C, C)))[0]
            self.params[self._name(i)] = asarray(W0, xp, dtype)

    def _name(self, i):
        return f"W{i}" if self.is_tuple else "W"

    def _as_list(self, x, name):
        """The input as a list of 4-d arrays, checked against the declared channel counts."""
        return as_channel_list(x, self.channels, self.is_tuple, name)

    def _pack(self, outs):
        return tuple(outs) if self.is_tuple else outs[0]

    def _factors(self):
        out = []
        for i in range(len(self.channels)):
            out.append(factor_matrix(self.params[self._name(i)], f"Pointwise.{self._name(i)}"))
        return out

    # ----------------------------------------------------------- forward
    def forward(self, x, context=None, *, train=False, rng=None):
        xs = self._as_list(x, "Pointwise.forward")
        xp = array_module(xs[0])
        factors = self._factors()
        out, total = [], 0.0
        for i, (a, (lad, _)) in enumerate(zip(xs, factors)):
            out.append(a @ self.params[self._name(i)])
            total += a.shape[1] * a.shape[2] * lad            # H * W * log|det W_i|
        return self._pack(out), _per_sample(xp, xs[0], total), {"x": xs, "Winv": [f[1] for f in factors]}

    def backward(self, dy, dlogdet, cache):
        dys = dy if isinstance(dy, tuple) else (dy,)
        gl = dlogdet.sum()
        dxs, grads = [], {}
        for i, (g, a, Winv) in enumerate(zip(dys, cache["x"], cache["Winv"])):
            W = self.params[self._name(i)]
            xp = array_module(g)
            dxs.append(g @ W.T)                                 # dL/dx = dy W^T
            # dL/dW = sum_{b,h,w} x^T dy + sum_b dlogdet * H*W * W^{-T}
            gW = xp.tensordot(a, g, axes=([0, 1, 2], [0, 1, 2]))
            grads[self._name(i)] = gW + (gl * (a.shape[1] * a.shape[2])) * Winv.T
        return self._pack(dxs), None, grads

    # ----------------------------------------------------------- inverse
    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        ys = self._as_list(y, "Pointwise.inverse")
        xp = array_module(ys[0])
        factors = self._factors()
        out, total = [], 0.0
        for a, (lad, Winv) in zip(ys, factors):
            out.append(a @ Winv)
            total -= a.shape[1] * a.shape[2] * lad
        return self._pack(out), _per_sample(xp, ys[0], total), {"y": ys, "Winv": [f[1] for f in factors]}

    def inverse_backward(self, dx, dlogdet, cache):
        dxs = dx if isinstance(dx, tuple) else (dx,)
        gl = dlogdet.sum()
        dys, grads = [], {}
        for i, (g, a, Winv) in enumerate(zip(dxs, cache["y"], cache["Winv"])):
            xp = array_module(g)
            dys.append(g @ Winv.T)                              # x = y V, V = W^{-1}: dL/dy = dx V^T
            gV = xp.tensordot(a, g, axes=([0, 1, 2], [0, 1, 2]))  # dL/dV = sum y^T dx
            # dV = -V dW V  =>  dL/dW = -V^T (dL/dV) V^T ; logdet_inv = -H*W*log|det W| => -H*W * V^T
            grads[self._name(i)] = -(Winv.T @ gV @ Winv.T) - (gl * (a.shape[1] * a.shape[2])) * Winv.T
        return self._pack(dys), None, grads

    def __repr__(self):
        ch = tuple(self.channels) if self.is_tuple else self.channels[0]
        return f"Pointwise(channels={ch}, noisy_identity_init={self.noisy_identity_init})"
