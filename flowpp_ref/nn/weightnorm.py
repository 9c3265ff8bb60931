"""Weight-normalised 3x3 convolution and dense ("nin") layers (paper appendix 8.3).

Both layers use weight normalisation (Salimans & Kingma, 2016)::

    W = g * V / ||V||        (norm per output unit: over every axis of V but the last)

and the paper's data-dependent initialisation (DDI): on the init batch, with
``m, v`` the mean and (population) variance of each output unit,

    scale = init_scale / sqrt(v + 1e-8);   g <- g * scale;   b <- b - m * scale

after which the layer's output on that batch has per-unit mean 0 and standard
deviation ``init_scale`` (exactly, when ``b`` was 0 before, as it is at
construction).

Layout NHWC. Parameters are drawn from the host ``np.random.Generator`` passed as
``rng`` (``V ~ N(0, 0.05)``, ``g = 1``, ``b = 0``) and moved to ``xp`` with
:func:`flowpp_ref.core.backend.asarray`.

Backward through the weight norm, per output unit o (n = ||V_o||)::

    dL/dg_o = sum(dW_o * V_o) / n
    dL/dV_o = (g_o / n) * (dW_o - (dL/dg_o / n) * V_o)

(from dW_k/dV_j = g/n * delta_kj - g V_k V_j / n^3).
"""
from __future__ import annotations

import threading

import numpy as np

from flowpp_ref.core.backend import array_module, asarray, is_cupy
from flowpp_ref.core.module import Module
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.kernels import use_kernels
from flowpp_ref.kernels.cuda import layers as cuda_layers
from flowpp_ref.kernels.numba.conv import gather_cols, shift_sum

DDI_EPS = 1e-8   # the paper's epsilon in init_scale / sqrt(v + 1e-8)


# --------------------------------------------------------------- weight norm
def weight_norm(V, g):
    """``W = g * V / ||V||`` with the norm over every axis but the last.

    Returns ``(W, n)`` with ``n`` of shape ``[Cout]`` (kept for the backward).
    """
    xp = array_module(V)
    axes = tuple(range(V.ndim - 1))
    n = xp.sqrt((V * V).sum(axis=axes))          # [Cout]
    W = V * (g / n)                               # broadcast on the last axis
    return W, n


def weight_norm_backward(dW, V, g, n):
    """Gradients of L with respect to ``V`` and ``g`` given ``dW = dL/dW``."""
    axes = tuple(range(V.ndim - 1))
    # dL/dg = sum(dW * V) / n
    dg = (dW * V).sum(axis=axes) / n
    # dL/dV = (g / n) * (dW - (dg / n) * V)
    dV = (g / n) * (dW - V * (dg / n))
    return dV, dg


def _host_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise TypeError("rng is required: pass a seeded np.random.Generator (np.random.default_rng(seed))")
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    if not callable(getattr(rng, "normal", None)):
        # e.g. a CuPy Generator: cupy.random.Generator has no normal() (CuPy 13/14), and the
        # parameters are drawn on the host anyway, then moved by asarray
        raise TypeError(f"rng must be a host np.random.Generator or an int seed (parameters are drawn on the "
                        f"host), got {type(rng).__module__}.{type(rng).__name__}, which has no normal()")
    return rng   # another Generator-like object with normal(); its draws are moved by asarray


def _ddi_update(layer, out):
    """The paper's DDI of ``g`` and ``b`` from the output ``out`` (moments over all leading axes)."""
    xp = array_module(out)
    axes = tuple(range(out.ndim - 1))
    m = out.mean(axis=axes)
    v = out.var(axis=axes)                         # population variance, as tf.nn.moments
    scale = layer.init_scale / xp.sqrt(v + DDI_EPS)
    g, b = layer.params["g"], layer.params["b"]
    layer.params["g"] = (g * scale).astype(g.dtype, copy=False)
    layer.params["b"] = (b - m * scale).astype(b.dtype, copy=False)


# ---------------------------------------------------------------- im2col
def _same_pads(k: int):
    """TF "SAME" padding for stride 1: total k-1, the smaller half before."""
    lo = (k - 1) // 2
    return lo, k - 1 - lo


def _offsets(kh, kw, H, W):
    """For each kernel tap (i, j): its input shift (di, dj) and the output rows/cols it reaches.

    Output pixel (h, w) reads input (h + di, w + dj) at tap (i, j); the tap is
    valid for h in [h0, h1), w in [w0, w1) (outside: zero padding).
    """
    ph, pw = _same_pads(kh)[0], _same_pads(kw)[0]
    for i in range(kh):
        di = i - ph
        h0, h1 = max(0, -di), min(H, H - di)
        for j in range(kw):
            dj = j - pw
            w0, w1 = max(0, -dj), min(W, W - dj)
            if h0 < h1 and w0 < w1:
                yield i, j, di, dj, h0, h1, w0, w1


def im2col(x, kh: int, kw: int):
    """Patches of a "SAME", stride-1 convolution: ``[B,H,W,C] -> [B,H,W,kh,kw,C]``.

    ``cols[b,h,w,i,j,:] = x[b, h+i-ph, w+j-pw, :]`` (zero outside the image).
    Filled by kh*kw slice copies (no fancy indexing).
    """
    xp = array_module(x)
    B, H, W, C = x.shape
    cols = xp.zeros((B, H, W, kh, kw, C), dtype=x.dtype)
    for i, j, di, dj, h0, h1, w0, w1 in _offsets(kh, kw, H, W):
        cols[:, h0:h1, w0:w1, i, j, :] = x[:, h0 + di:h1 + di, w0 + dj:w1 + dj, :]
    return cols


def tap_shifts(kh: int, kw: int):
    """The input shift (di, dj) of every kernel tap (i, j), row-major: ``[(i - ph, j - pw), ...]``."""
    ph, pw = _same_pads(kh)[0], _same_pads(kw)[0]
    return [(i - ph, j - pw) for i in range(kh) for j in range(kw)]


def gather_cols_reference(x, shifts):
    """``cols[b,h,w,t,:] = x[b, h+di_t, w+dj_t, :]`` (zero outside): im2col with any list of shifts.

    Plain-xp reference of :func:`flowpp_ref.kernels.numba.conv.gather_cols`; ``[B,H,W,C] -> [B,H,W,T,C]``.
    """
    xp = array_module(x)
    B, H, W, C = x.shape
    cols = xp.zeros((B, H, W, len(shifts), C), dtype=x.dtype)
    for t, (di, dj) in enumerate(shifts):
        h0, h1, w0, w1 = max(0, -di), min(H, H - di), max(0, -dj), min(W, W - dj)
        if h0 < h1 and w0 < w1:
            cols[:, h0:h1, w0:w1, t, :] = x[:, h0 + di:h1 + di, w0 + dj:w1 + dj, :]
    return cols


def shift_sum_reference(y, shifts, bias=None):
    """``out[b,h,w,:] = bias + sum_t y[b, h+di_t, w+dj_t, t, :]`` (terms outside the image skipped).

    Plain-xp reference of :func:`flowpp_ref.kernels.numba.conv.shift_sum`; ``[B,H,W,T,C] -> [B,H,W,C]``.
    """
    xp = array_module(y)
    B, H, W, T, C = y.shape
    out = xp.zeros((B, H, W, C), dtype=y.dtype)
    if bias is not None:
        out += bias
    for t, (di, dj) in enumerate(shifts):
        h0, h1, w0, w1 = max(0, -di), min(H, H - di), max(0, -dj), min(W, W - dj)
        if h0 < h1 and w0 < w1:
            out[:, h0:h1, w0:w1, :] += y[:, h0 + di:h1 + di, w0 + dj:w1 + dj, t, :]
    return out


_WORKSPACE = threading.local()


def _workspace(shape, dtype):
    """A scratch array of ``shape`` reused across calls of this thread (the convolution's wide
    temporary: Y, D, cols or Z below, each consumed before the call returns). Reusing it saves
    the operating system's zeroing of fresh pages on every call; the buffer (the largest seen)
    stays allocated while the thread lives."""
    n = int(np.prod(shape))
    dtype = np.dtype(dtype)
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < n:
        buf = _WORKSPACE.buf = np.empty(n, dtype=dtype)
    return buf[:n].reshape(shape)


def _conv_forward_thin(x, W, b):
    """The convolution through the kernels of :mod:`flowpp_ref.kernels.numba.conv` (see its docstring):
    matmul then ``shift_sum`` when Cout < Cin, else ``gather_cols`` then matmul."""
    kh, kw, C, Co = W.shape
    B, H, Wd, _ = x.shape
    T, shifts = kh * kw, tap_shifts(kh, kw)
    if Co < C:
        # Y[q, t, o] = sum_c x[q, c] W[t, c, o];  out[p] = b + sum_t Y[p + s_t, t]
        Wp = W.reshape(T, C, Co).transpose(1, 0, 2).reshape(C, T * Co)
        x2 = x.reshape(-1, C)
        y = _workspace((B * H * Wd, T * Co), np.result_type(x2.dtype, Wp.dtype, b.dtype))
        np.matmul(x2, Wp, out=y)
        return shift_sum(y.reshape(B, H, Wd, T, Co), shifts, b)
    cols = gather_cols(x, shifts, out=_workspace((B, H, Wd, T, C), x.dtype)).reshape(B * H * Wd, T * C)
    out = (cols @ W.reshape(T * C, Co)).reshape(B, H, Wd, Co)
    out += b
    return out


def _conv_backward_thin(dout, x, W):
    """(dx, dW) through the kernels of :mod:`flowpp_ref.kernels.numba.conv` (formulas in its docstring)."""
    kh, kw, C, Co = W.shape
    B, H, Wd, _ = x.shape
    T, shifts = kh * kw, tap_shifts(kh, kw)
    neg = [(-di, -dj) for di, dj in shifts]
    Wt = W.reshape(T, C, Co)
    if Co <= C:
        # D[q, t, o] = dout[q - s_t, o];  dW = x^T D (as [C, T, Co]);  dx = D M, M[(t, o), c] = W[t, c, o]
        D = gather_cols(dout, neg, out=_workspace((B, H, Wd, T, Co), dout.dtype)).reshape(B * H * Wd, T * Co)
        dW = (x.reshape(-1, C).T @ D).reshape(C, T, Co).transpose(1, 0, 2).reshape(kh, kw, C, Co)
        dx = (D @ Wt.transpose(0, 2, 1).reshape(T * Co, C)).reshape(B, H, Wd, C)
        return dx, dW
    # dW = cols^T dout;  Z = dout M', M'[o, (t, c)] = W[t, c, o];  dx[q] = sum_t Z[q - s_t, t]
    d2 = dout.reshape(-1, Co)
    cols = gather_cols(x, shifts, out=_workspace((B, H, Wd, T, C), x.dtype)).reshape(B * H * Wd, T * C)
    dW = (cols.T @ d2).reshape(kh, kw, C, Co)
    del cols                                     # z reuses the same workspace
    Mp = Wt.transpose(2, 0, 1).reshape(Co, T * C)
    z = _workspace((B * H * Wd, T * C), np.result_type(d2.dtype, Mp.dtype))
    np.matmul(d2, Mp, out=z)
    return shift_sum(z.reshape(B, H, Wd, T, C), neg), dW


def _column_sums(d2):
    """sum_n d2[n, :] of a [N, C] array (the bias gradient) as the product ones^T d2: one BLAS gemv,
    which runs faster than NumPy's strided ``d2.sum(axis=0)`` reduction over the rows (the same
    float sums in another order)."""
    xp = array_module(d2)
    if d2.ndim != 2 or d2.dtype.kind != "f":
        return d2.sum(axis=0)
    return xp.ones(d2.shape[0], dtype=d2.dtype) @ d2


def _use_conv_kernels(*arrays) -> bool:
    return use_kernels() and all(isinstance(a, np.ndarray) for a in arrays)


def _use_cuda_conv(x) -> bool:
    return use_kernels() and is_cupy(array_module(x)) and x.dtype in (np.float32, np.float64)


def _im2col(x, kh, kw):
    """:func:`im2col`, as one CUDA kernel on CuPy (kernels enabled), else the slice copies."""
    return cuda_layers.im2col(x, kh, kw) if _use_cuda_conv(x) else im2col(x, kh, kw)


# ---------------------------------------------------------------- layers
class Conv2d(Module):
    """Weight-normalised 2-D convolution, "SAME" padding, stride 1 (paper: ``conv2d``).

    Math:   out[b,h,w,o] = sum_{i,j,c} xpad[b, h+i, w+j, c] * W[i,j,c,o] + b[o],
            W = g * V / ||V||  (norm over kh, kw, Cin per output unit o).

    Shapes: x [B,H,W,Cin] -> out [B,H,W,Cout]; V [kh,kw,Cin,Cout], g [Cout], b [Cout].

    Cache:  dict(x=input (a reference, no copy), W=[kh,kw,Cin,Cout], n=[Cout]).
            The im2col matrix (kh*kw times the input) is NOT kept: the backward
            rebuilds it (one copy) for dW. A caller that can recompute ``x`` may
            store the cache with ``x=None`` and put ``x`` back before backward
            (GatedResNet does).
    Implementation: forward is im2col + one matmul ``[BHW, kh*kw*Cin] @ [kh*kw*Cin, Cout]``;
            backward: dW = cols^T dout (one matmul), dx as kh*kw matmuls
            ``dout @ W[i,j]^T`` added into shifted slices of dx (slice adds, no
            scatter with duplicate indices). That is the reference; on CuPy with kernels
            enabled im2col is one CUDA kernel and dx = col2im(dout W^T), one matmul and one
            gather kernel (:mod:`flowpp_ref.kernels.cuda.layers`); for NumPy arrays with
            kernels enabled the same sums run in another order through the one-pass kernels
            of :mod:`flowpp_ref.kernels.numba.conv` (no zero-filled im2col of the input when
            Cout < Cin: matmul first, then a shifted sum; a buffer T * min(Cin, Cout) wide).
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, init_scale=1.0, *, rng, xp=np, dtype=np.float32):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
        if int(kh) < 1 or int(kw) < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"channel counts must be positive, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (int(kh), int(kw))
        self.init_scale = float(init_scale)
        rng = _host_rng(rng)
        V = rng.normal(0.0, 0.05, size=(int(kh), int(kw), self.in_channels, self.out_channels))
        self.params["V"] = asarray(V, xp, dtype)
        self.params["g"] = asarray(np.ones(self.out_channels), xp, dtype)
        self.params["b"] = asarray(np.zeros(self.out_channels), xp, dtype)

    def _check(self, x):
        check_array(x, "Conv2d input", ndim=4)
        if x.shape[-1] != self.in_channels:
            raise FlowInputError(f"Conv2d: expected {self.in_channels} input channels, got {x.shape[-1]} "
                                 f"(input shape {tuple(x.shape)})")

    def forward(self, x, *, train=False, rng=None):   # train/rng unused (Layer protocol)
        self._check(x)
        V, g, b = self.params["V"], self.params["g"], self.params["b"]
        kh, kw = self.kernel_size
        B, H, Wd, C = x.shape
        W, n = weight_norm(V, g)
        if _use_conv_kernels(x, W, b):
            return _conv_forward_thin(x, W, b), dict(x=x, W=W, n=n)
        cols = _im2col(x, kh, kw).reshape(B * H * Wd, kh * kw * C)
        out = (cols @ W.reshape(kh * kw * C, self.out_channels)).reshape(B, H, Wd, self.out_channels) + b
        return out, dict(x=x, W=W, n=n)

    def backward(self, dout, cache):
        x, W, n = cache["x"], cache["W"], cache["n"]
        if x is None:
            raise ValueError("Conv2d.backward: cache['x'] is None; put the layer input back first")
        xp = array_module(dout)
        kh, kw = self.kernel_size
        B, H, Wd, C = x.shape
        Co = self.out_channels
        if tuple(dout.shape) != (B, H, Wd, Co):
            raise FlowInputError(f"Conv2d.backward: dout has shape {tuple(dout.shape)}, expected {(B, H, Wd, Co)}")
        d2 = dout.reshape(B * H * Wd, Co)
        # dL/db = sum over b,h,w of dout
        db = _column_sums(d2)
        if _use_conv_kernels(dout, x, W):
            dx, dW = _conv_backward_thin(dout, x, W)
            dV, dg = weight_norm_backward(dW, self.params["V"], self.params["g"], n)
            return dx, {"V": dV, "g": dg, "b": db}
        # dL/dW = cols^T @ dout
        cols = _im2col(x, kh, kw).reshape(B * H * Wd, kh * kw * C)
        dW = (cols.T @ d2).reshape(kh, kw, C, Co)
        del cols
        if _use_cuda_conv(dout):
            # dL/dx = col2im(dout @ W^T): the same sums as the loop below, one matmul and one gather kernel
            dcols = (d2 @ W.reshape(kh * kw * C, Co).T).reshape(B, H, Wd, kh, kw, C)
            dx = cuda_layers.col2im(dcols, kh, kw)
            dV, dg = weight_norm_backward(dW, self.params["V"], self.params["g"], n)
            return dx, {"V": dV, "g": dg, "b": db}
        # dL/dx[b, h+di, w+dj, :] += dout[b,h,w,:] @ W[i,j]^T   (for every tap (i, j))
        dx = xp.zeros_like(x, dtype=dout.dtype)
        for i, j, di, dj, h0, h1, w0, w1 in _offsets(kh, kw, H, Wd):
            t = (d2 @ W[i, j].T).reshape(B, H, Wd, C)
            dx[:, h0 + di:h1 + di, w0 + dj:w1 + dj, :] += t[:, h0:h1, w0:w1, :]
        dV, dg = weight_norm_backward(dW, self.params["V"], self.params["g"], n)
        return dx, {"V": dV, "g": dg, "b": db}

    def data_init(self, x):
        """DDI on the batch ``x`` (moments over B, H, W per output unit); returns the new output."""
        out, _ = self.forward(x)
        _ddi_update(self, out)
        return self.forward(x)[0]


class NIN(Module):
    """Weight-normalised dense layer on the last axis (paper: ``dense`` / ``nin``).

    Math:   out[..., o] = sum_c x[..., c] W[c, o] + b[o],  W = g * V / ||V|| (norm over Cin).
    Shapes: x [..., Cin] (any rank >= 1) -> out [..., Cout]; V [Cin,Cout], g [Cout], b [Cout].

    Cache:  dict(x=input (a reference, no copy), W=[Cin,Cout], n=[Cout]); like Conv2d,
            ``x`` may be dropped by a caller that can recompute it.
    """

    def __init__(self, in_channels, out_channels, init_scale=1.0, *, rng, xp=np, dtype=np.float32):
        super().__init__()
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"channel counts must be positive, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.init_scale = float(init_scale)
        rng = _host_rng(rng)
        V = rng.normal(0.0, 0.05, size=(self.in_channels, self.out_channels))
        self.params["V"] = asarray(V, xp, dtype)
        self.params["g"] = asarray(np.ones(self.out_channels), xp, dtype)
        self.params["b"] = asarray(np.zeros(self.out_channels), xp, dtype)

    def _check(self, x):
        check_array(x, "NIN input")
        if x.ndim < 1:
            raise FlowInputError(f"NIN input: expected at least 1 axis, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.in_channels:
            raise FlowInputError(f"NIN: expected {self.in_channels} channels on the last axis, got "
                                 f"{x.shape[-1]} (input shape {tuple(x.shape)})")

    def forward(self, x, *, train=False, rng=None):   # train/rng unused (Layer protocol)
        self._check(x)
        W, n = weight_norm(self.params["V"], self.params["g"])
        out = (x.reshape(-1, self.in_channels) @ W).reshape(*x.shape[:-1], self.out_channels) + self.params["b"]
        return out, dict(x=x, W=W, n=n)

    def backward(self, dout, cache):
        x, W, n = cache["x"], cache["W"], cache["n"]
        if x is None:
            raise ValueError("NIN.backward: cache['x'] is None; put the layer input back first")
        expect = (*x.shape[:-1], self.out_channels)
        if tuple(dout.shape) != expect:
            raise FlowInputError(f"NIN.backward: dout has shape {tuple(dout.shape)}, expected {expect}")
        d2 = dout.reshape(-1, self.out_channels)
        x2 = x.reshape(-1, self.in_channels)
        db = _column_sums(d2)                     # dL/db = sum of dout over leading axes
        dW = x2.T @ d2                            # dL/dW = x^T dout
        dx = (d2 @ W.T).reshape(x.shape)          # dL/dx = dout W^T
        dV, dg = weight_norm_backward(dW, self.params["V"], self.params["g"], n)
        return dx, {"V": dV, "g": dg, "b": db}

    def data_init(self, x):
        """DDI on the batch ``x`` (moments over all leading axes per output unit); returns the new output."""
        out, _ = self.forward(x)
        _ddi_update(self, out)
        return self.forward(x)[0]
