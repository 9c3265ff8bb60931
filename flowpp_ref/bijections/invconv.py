"""InvConv1x1LU: Glow's invertible 1x1 convolution in LU-decomposed form (Glow sec. 3.2).

Math (pixels are row vectors, the convention of :class:`~flowpp_ref.bijections.pointwise.Pointwise`)::

    W  = P L (U + diag(sign_s * exp(log_s)))    P: fixed permutation, L: unit lower triangular,
                                                U: strictly upper, sign_s: fixed signs (+-1)
    y[b, h, w, :] = x[b, h, w, :] @ W
    logdet = H * W_img * sum_c log_s_c           the same for every sample (|det P| = det L = 1)
    inverse: x[b, h, w, :] = y[b, h, w, :] @ W^{-1},  logdet_inv = -logdet

Learned: ``L`` (only its strictly lower part is used), ``U`` (only its strictly upper
part is used) and ``log_s``; both matrices are stored full C x C, the masks ``tril(., -1)``
and ``triu(., 1)`` are applied in every call and to the gradients, so the fixed entries
get a zero gradient and never move (as in Glow's release, ``l_mask``/``u_mask``).
Fixed buffers (not parameters): ``P`` and ``sign_s``.

The log-det costs O(C) instead of the O(C^3) ``slogdet`` of the unfactored form. The
unfactored form of Glow, a full learned W with log-det ``H * W_img * log|det W|``, is
:class:`~flowpp_ref.bijections.pointwise.Pointwise` with ``noisy_identity_init=None``
(same random-rotation init); this class is its LU parametrisation, not a copy.

Arithmetic: ``W`` is assembled from the factors in float64 once per call and cast to the
input dtype for the matmul; the inverse uses ``W^{-1} = (U + diag s)^{-1} L^{-1} P^T``
computed once per call in float64 with two ``xp.linalg.solve`` calls on the triangular
factors (a general solver: NumPy has no triangular solve without SciPy, which is not a
dependency). Everything stays on the parameters' backend (no host round trip on CuPy).
NumPy arrays: non-finite parameters raise :class:`FlowInputError`; CuPy: unchecked (a
non-finite ``log_s`` gives a non-finite log-det, which the training loop catches).

Init (a host ``np.random.Generator`` is passed to the constructor): ``W0`` = the Q factor
of the QR decomposition of a standard normal C x C matrix (a random rotation, as
Pointwise and Glow), then ``W0 = P L0 U0`` by :func:`lu_decompose` (partial pivoting,
float64, NumPy only), ``L = tril(L0, -1)``, ``U = triu(U0, 1)``,
``sign_s = sign(diag U0)``, ``log_s = log|diag U0|``. The factors reproduce ``W0`` to
rounding (~1e-15) and ``sum(log_s) = log|det W0| = 0``.

Checkpoints: ``P`` and ``sign_s`` are not parameters (the optimiser must not touch them),
so a checkpoint holds only ``L``, ``U``, ``log_s``. They are rebuilt by the constructor
from the generator: the model builder draws every init from ``np.random.default_rng(seed)``
with the run's seed, so the model a resumed run (or ``load_model``) rebuilds has the same
``P`` and ``sign_s``, and ``load_parameters`` restores the rest. Loading the parameters
into an instance built from a different generator gives a different ``W``.

Backward (G = dL/dW = sum over pixels of x^T dy; U' = U + diag(s), s = sign_s * exp(log_s);
W = P L U' so dW = P dL U' + P L dU')::

    dL/dx     = dy W^T
    dL/dL     = tril(P^T G U'^T, -1)
    dL/dU     = triu(L^T P^T G, 1)
    dL/dlog_s = diag(L^T P^T G) * s + H * W_img * sum_b dlogdet

Single array input only (a tuple raises :class:`FlowInputError`).

Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
NeurIPS 2018, sec. 3.2 (LU decomposition) and table 1.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.bijections.pointwise import Pointwise
from flowpp_ref.core.backend import array_module, asarray, is_cupy, to_numpy
from flowpp_ref.core.validation import FlowInputError, check_array


def lu_decompose(A):
    """``A = P L U`` by Gaussian elimination with partial pivoting (float64, NumPy).

    Returns ``(P, L, U)``: P a permutation matrix, L unit lower triangular (``|entries| <= 1``),
    U upper triangular. Raises ``ValueError`` for a non-square or (exactly) singular A.
    """
    U = np.array(A, dtype=np.float64)
    if U.ndim != 2 or U.shape[0] != U.shape[1]:
        raise ValueError(f"lu_decompose: expected a square matrix, got shape {U.shape}")
    n = U.shape[0]
    L = np.eye(n)
    perm = np.arange(n)
    for k in range(n):
        p = k + int(np.argmax(np.abs(U[k:, k])))         # pivot: largest |entry| in column k
        if U[p, k] == 0.0:
            raise ValueError(f"lu_decompose: the {n}x{n} matrix is singular (zero pivot in column {k})")
        if p != k:                                        # swap rows k, p of U, perm and the built part of L
            U[[k, p]] = U[[p, k]]
            perm[[k, p]] = perm[[p, k]]
            L[[k, p], :k] = L[[p, k], :k]
        f = U[k + 1:, k] / U[k, k]
        L[k + 1:, k] = f
        U[k + 1:] -= np.outer(f, U[k])                    # eliminate below the pivot
        U[k + 1:, k] = 0.0
    # rows of A in the order perm: A[perm] = L U, i.e. Pr A = L U with Pr = I[perm]; P = Pr^T
    P = np.eye(n)[perm].T
    return P, L, U


class InvConv1x1LU(Bijection):
    """LU-decomposed invertible 1x1 convolution; see the module docstring for the math.

    Args:
        channels: C (int).
        rng: host ``np.random.Generator`` for the init (required).
        xp, dtype: where and how the parameters are stored.

    Parameters: ``L`` [C, C], ``U`` [C, C], ``log_s`` [C]. Buffers: ``P`` [C, C], ``sign_s`` [C]
    (float64 on the parameters' backend).
    Shapes: x [B, H, W, C] -> same; logdet (B,).
    Cache: forward keeps its input ``x``; inverse keeps its input ``y`` and ``Winv``.
    The parameters are read again in backward (they must not change in between).
    """

    def __init__(self, channels, *, rng, xp=np, dtype=np.float32):
        super().__init__()
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool):
            raise ValueError(f"channels must be an int (single array input only), got {channels!r}")  # noqa: TRY004
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a host np.random.Generator, got {type(rng).__name__}")
        C = self.channels = int(channels)
        W0 = np.linalg.qr(rng.standard_normal((C, C)))[0]     # random rotation (Glow, Pointwise)
        P, L0, U0 = lu_decompose(W0)
        d = np.diag(U0)
        self.params["L"] = asarray(np.tril(L0, -1), xp, dtype)
        self.params["U"] = asarray(np.triu(U0, 1), xp, dtype)
        self.params["log_s"] = asarray(np.log(np.abs(d)), xp, dtype)
        self.P = asarray(P, xp, np.float64)
        self.sign_s = asarray(np.sign(d), xp, np.float64)
        self._lmask = asarray(np.tril(np.ones((C, C)), -1), xp, np.float64)
        self._umask = asarray(np.triu(np.ones((C, C)), 1), xp, np.float64)

    # ----------------------------------------------------------- helpers
    def _check_input(self, x, name):
        if isinstance(x, tuple):
            raise FlowInputError(f"{name}: expected one array [B, H, W, {self.channels}], got a tuple of shapes "
                                 f"{[tuple(getattr(a, 'shape', ())) for a in x]} (InvConv1x1LU takes single arrays)")
        check_array(x, name, ndim=4)
        if x.shape[3] != self.channels:
            raise FlowInputError(f"{name}: expected {self.channels} channels, got shape {tuple(x.shape)}")
        return x

    def _factors(self, name):
        """(P, L, U', s) in float64 on the parameters' backend; U' = U + diag(s)."""
        p = self.params
        if not is_cupy(array_module(p["log_s"])):             # host only: no device sync on CuPy
            for k in ("L", "U", "log_s"):
                a = to_numpy(p[k])
                if not np.isfinite(a).all():
                    raise FlowInputError(f"{name}: parameter {k} has {int((~np.isfinite(a)).sum())} non-finite "
                                         f"entries (shape {tuple(a.shape)})")
        xp = array_module(p["log_s"])
        f64 = xp.float64
        L = p["L"].astype(f64) * self._lmask + xp.eye(self.channels, dtype=f64)    # unit lower triangular
        s = self.sign_s * xp.exp(p["log_s"].astype(f64))                            # s = sign_s * exp(log_s)
        Up = p["U"].astype(f64) * self._umask + xp.diag(s)                          # U' = U + diag(s)
        return self.P, L, Up, s

    def weight(self):
        """W = P L (U + diag(sign_s exp(log_s))) in float64 on the parameters' backend."""
        P, L, Up, _ = self._factors("InvConv1x1LU.weight")
        return P @ L @ Up

    def _logdet(self, x, sign):
        # logdet = H * W_img * sum_c log_s_c, the same for every sample
        xp = array_module(x)
        total = (sign * x.shape[1] * x.shape[2]) * xp.sum(self.params["log_s"].astype(xp.float64))
        out = xp.empty((x.shape[0],), dtype=x.dtype)
        out[...] = total
        return out

    def _param_grads(self, G, ghw, factors):
        """Parameter gradients from G = dL/dW (float64) and ghw = dL/dlog_s from the log-det term."""
        P, L, Up, s = factors
        xp = array_module(G)
        PtG = P.T @ G
        M = L.T @ PtG                                          # L^T P^T G
        dt = self.params["log_s"].dtype
        return {
            "L": ((PtG @ Up.T) * self._lmask).astype(dt),        # tril(P^T G U'^T, -1)
            "U": (M * self._umask).astype(dt),                   # triu(L^T P^T G, 1)
            "log_s": (xp.diagonal(M) * s + ghw).astype(dt),      # diag(L^T P^T G) * s + H W sum_b dlogdet
        }

    # ----------------------------------------------------------- forward
    def forward(self, x, context=None, *, train=False, rng=None):
        self._check_input(x, "InvConv1x1LU.forward")
        P, L, Up, _ = self._factors("InvConv1x1LU.forward")
        W = (P @ L @ Up).astype(x.dtype)
        return x @ W, self._logdet(x, 1.0), {"x": x}            # y = x W

    def backward(self, dy, dlogdet, cache):
        x = cache["x"]
        xp = array_module(dy)
        factors = self._factors("InvConv1x1LU.backward")
        P, L, Up, _ = factors
        W = P @ L @ Up
        dx = dy @ W.T.astype(dy.dtype)                          # dL/dx = dy W^T
        # G = dL/dW = sum_{b,h,w} x^T dy
        G = xp.tensordot(x, dy, axes=([0, 1, 2], [0, 1, 2])).astype(xp.float64)
        ghw = (x.shape[1] * x.shape[2]) * dlogdet.astype(xp.float64).sum()
        return dx, None, self._param_grads(G, ghw, factors)

    # ----------------------------------------------------------- inverse
    def _inverse_matrix(self, factors):
        # W^{-1} = U'^{-1} L^{-1} P^T, two solves with the triangular factors (float64)
        P, L, Up, _ = factors
        xp = array_module(P)
        return xp.linalg.solve(Up, xp.linalg.solve(L, P.T))

    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        self._check_input(y, "InvConv1x1LU.inverse")
        Winv = self._inverse_matrix(self._factors("InvConv1x1LU.inverse"))
        return y @ Winv.astype(y.dtype), self._logdet(y, -1.0), {"y": y, "Winv": Winv}   # x = y W^{-1}

    def inverse_backward(self, dx, dlogdet, cache):
        y, V = cache["y"], cache["Winv"]
        xp = array_module(dx)
        factors = self._factors("InvConv1x1LU.inverse_backward")
        dy = dx @ V.T.astype(dx.dtype)                          # x = y V, V = W^{-1}: dL/dy = dx V^T
        GV = xp.tensordot(y, dx, axes=([0, 1, 2], [0, 1, 2])).astype(xp.float64)   # dL/dV = sum y^T dx
        G = -(V.T @ GV @ V.T)                                   # dV = -V dW V  =>  dL/dW = -V^T (dL/dV) V^T
        ghw = -(y.shape[1] * y.shape[2]) * dlogdet.astype(xp.float64).sum()   # logdet_inv = -H W sum log_s
        return dy, None, self._param_grads(G, ghw, factors)

    def __repr__(self):
        return f"InvConv1x1LU(channels={self.channels})"


class InvConv1x1(Pointwise):
    """Glow's invertible 1x1 convolution in its full-matrix form (Glow sec. 3.2; the release's
    ``invertible_1x1_conv``, the form its CIFAR-10 run used): ``y = x @ W`` per pixel with a learned
    C x C matrix ``W``, ``logdet = H * W_img * log|det W|`` (``slogdet`` in float64, O(C^3) per call),
    initialised as a random rotation (``log|det W| = 0``).

    The math, backward and checks are those of :class:`~flowpp_ref.bijections.pointwise.Pointwise`
    (Flow++'s 1x1 convolution, which differs only in its noisy-identity init); this class fixes the
    init to Glow's and takes one array. :class:`InvConv1x1LU` is the same map parametrised as
    ``P L (U + diag s)``, whose log-det costs O(C).

    Args: channels C (int); rng: host ``np.random.Generator`` (required); xp, dtype.
    Parameter: ``W`` [C, C].
    """

    def __init__(self, channels, *, rng, xp=np, dtype=np.float32):
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool):
            raise ValueError(f"channels must be an int (single array input only), got {channels!r}")  # noqa: TRY004
        super().__init__(int(channels), rng=rng, noisy_identity_init=None, xp=xp, dtype=dtype)

    def __repr__(self):
        return f"InvConv1x1(channels={self.channels[0]})"
