"""CuPy kernels for concat_elu, gate and layer norm (forward and backward), one source text
built for the GPU and, in the tests, for the CPU (:mod:`flowpp_ref.kernels.cuda.build`).

concat_elu, gate and layer norm **ran on an H200** (the GPU tests compare them with the references
there); im2col and col2im have not run on a GPU (NVRTC compiles them). The tests compare the CPU build of this source with the
references of :mod:`flowpp_ref.nn.activations` and :mod:`flowpp_ref.nn.layernorm`.

Math (the same as the numba kernels, :mod:`flowpp_ref.kernels.numba.activations`)::

    concat_elu: out[:, c] = max(v, e), out[:, C + c] = max(-v, e),  e = expm1(-|v|)
                dx = d1 - d2 exp(-v)  (v > 0),   d1 exp(v) - d2  (v <= 0)
    gate:       out = h1 s,  s = sigmoid(h2) = t (h2 >= 0) or e t,  e = exp(-|h2|), t = 1/(1+e)
                dh1 = dout s,  dh2 = dout h1 s (1-s) = dout h1 e t^2
    layer norm (one thread per row of C channels; row sums in double):
                xhat = (x - mean) rstd,  rstd = 1/sqrt(var + eps),  out = xhat g + b
                dx = rstd (dxh - mean(dxh) - xhat mean(dxh xhat)),  dxh = dout g
                (dg = sum_rows dout xhat and db = sum_rows dout are reductions done by CuPy)

    im2col ("SAME", stride 1; T = kh kw taps, tap t = (i, j) shifts by (di, dj) = (i - ph, j - pw)):
                cols[b,h,w,t,c] = x[b, h+di, w+dj, c]   (0 outside the image)
    col2im (its adjoint, the convolution's dx from dcols = dout W^T):
                dx[b,h,w,c] = sum_t dcols[b, h-di, w-dj, t, c]   (taps whose source pixel is inside)

Work items: concat_elu over the N*C input elements, gate over the N*C output elements,
layer norm over the N rows, im2col over the B*H*W*T*C columns (no zero fill first), col2im over
the B*H*W*C input elements (a gather: no atomics, no scatter with duplicate indices).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.kernels.cuda import build

ELEMENT_SOURCE = r"""
template <typename T>
FLOWPP_DEVICE void concat_elu_fwd_elem(long long i, int C, const T* x, T* out) {
    long long r = i / C; int c = (int)(i % C);
    T v = x[i];
    T e = expm1(-fabs(v));                     // elu(v) = max(v, e), elu(-v) = max(-v, e)
    out[r * 2 * C + c] = fmax(v, e);
    out[r * 2 * C + C + c] = fmax(-v, e);
}

template <typename T>
FLOWPP_DEVICE void concat_elu_bwd_elem(long long i, int C, const T* dout, const T* x, T* dx) {
    long long r = i / C; int c = (int)(i % C);
    T v = x[i], d1 = dout[r * 2 * C + c], d2 = dout[r * 2 * C + C + c];
    dx[i] = v > 0 ? d1 - d2 * exp(-v) : d1 * exp(v) - d2;
}

template <typename T>
FLOWPP_DEVICE void gate_fwd_elem(long long i, int C, const T* x, T* out) {
    long long r = i / C; int c = (int)(i % C);
    T z = x[r * 2 * C + C + c];
    T e = exp(-fabs(z)), t = (T)1 / ((T)1 + e);
    out[i] = x[r * 2 * C + c] * (z >= 0 ? t : e * t);
}

template <typename T>
FLOWPP_DEVICE void gate_bwd_elem(long long i, int C, const T* dout, const T* x, T* dx) {
    long long r = i / C; int c = (int)(i % C);
    T h1 = x[r * 2 * C + c], z = x[r * 2 * C + C + c];
    T e = exp(-fabs(z)), t = (T)1 / ((T)1 + e);
    T s = z >= 0 ? t : e * t, d = dout[i];
    dx[r * 2 * C + c] = d * s;
    dx[r * 2 * C + C + c] = d * h1 * (e * t * t);   // s (1 - s) = e t^2, no cancellation
}

template <typename T>
FLOWPP_DEVICE void layernorm_fwd_row(long long i, int C, const T* x, const T* g, const T* b, double eps,
                                     T* out, T* xhat, T* rstd) {
    const T* xr = x + i * C;
    double m = 0, v = 0;
    for (int c = 0; c < C; ++c) m += (double)xr[c];
    m /= C;
    for (int c = 0; c < C; ++c) { double d = (double)xr[c] - m; v += d * d; }
    v /= C;
    double rs = 1.0 / sqrt(v + eps);
    for (int c = 0; c < C; ++c) {
        T h = (T)(((double)xr[c] - m) * rs);
        xhat[i * C + c] = h;
        out[i * C + c] = h * g[c] + b[c];
    }
    rstd[i] = (T)rs;
}

template <typename T>
FLOWPP_DEVICE void layernorm_bwd_row(long long i, int C, const T* dout, const T* xhat, const T* rstd,
                                     const T* g, T* dx) {
    const T* dr = dout + i * C; const T* hr = xhat + i * C;
    double m1 = 0, m2 = 0;
    for (int c = 0; c < C; ++c) { double dxh = (double)dr[c] * g[c]; m1 += dxh; m2 += dxh * hr[c]; }
    m1 /= C; m2 /= C;
    double rs = rstd[i];
    for (int c = 0; c < C; ++c)
        dx[i * C + c] = (T)(rs * ((double)dr[c] * g[c] - m1 - (double)hr[c] * m2));
}

template <typename T>
FLOWPP_DEVICE void im2col_elem(long long i, int H, int W, int C, int kh, int kw, const T* x, T* cols) {
    int c = (int)(i % C); long long r = i / C;
    int t = (int)(r % (kh * kw)); long long p = r / (kh * kw);
    int w = (int)(p % W), h = (int)((p / W) % H); long long b = p / ((long long)W * H);
    int hh = h + t / kw - (kh - 1) / 2, ww = w + t % kw - (kw - 1) / 2;
    cols[i] = (hh >= 0 && hh < H && ww >= 0 && ww < W) ? x[((b * H + hh) * W + ww) * C + c] : (T)0;
}

template <typename T>
FLOWPP_DEVICE void col2im_elem(long long i, int H, int W, int C, int kh, int kw, const T* dcols, T* dx) {
    int c = (int)(i % C); long long p = i / C;
    int w = (int)(p % W), h = (int)((p / W) % H); long long b = p / ((long long)W * H);
    int taps = kh * kw;
    double acc = 0;
    for (int t = 0; t < taps; ++t) {
        int ho = h - (t / kw - (kh - 1) / 2), wo = w - (t % kw - (kw - 1) / 2);   // the output pixel reading (h, w)
        if (ho >= 0 && ho < H && wo >= 0 && wo < W)
            acc += (double)dcols[(((b * H + ho) * W + wo) * taps + t) * C + c];
    }
    dx[i] = (T)acc;
}
"""

ENTRIES = {
    "concat_elu_fwd": ("int C, const {T}* x, {T}* out", "concat_elu_fwd_elem<{T}>(i, C, x, out);"),
    "concat_elu_bwd": ("int C, const {T}* dout, const {T}* x, {T}* dx",
                       "concat_elu_bwd_elem<{T}>(i, C, dout, x, dx);"),
    "gate_fwd": ("int C, const {T}* x, {T}* out", "gate_fwd_elem<{T}>(i, C, x, out);"),
    "gate_bwd": ("int C, const {T}* dout, const {T}* x, {T}* dx", "gate_bwd_elem<{T}>(i, C, dout, x, dx);"),
    "layernorm_fwd": ("int C, const {T}* x, const {T}* g, const {T}* b, double eps, {T}* out, {T}* xhat, {T}* rstd",
                      "layernorm_fwd_row<{T}>(i, C, x, g, b, eps, out, xhat, rstd);"),
    "im2col": ("int H, int W, int C, int kh, int kw, const {T}* x, {T}* cols",
               "im2col_elem<{T}>(i, H, W, C, kh, kw, x, cols);"),
    "col2im": ("int H, int W, int C, int kh, int kw, const {T}* dcols, {T}* dx",
               "col2im_elem<{T}>(i, H, W, C, kh, kw, dcols, dx);"),
    "layernorm_bwd": ("int C, const {T}* dout, const {T}* xhat, const {T}* rstd, const {T}* g, {T}* dx",
                      "layernorm_bwd_row<{T}>(i, C, dout, xhat, rstd, g, dx);"),
}


def cuda_source() -> str:
    return build.cuda_source(ELEMENT_SOURCE, ENTRIES)


def host_source() -> str:
    return build.host_source(ELEMENT_SOURCE, ENTRIES)


_kernels = build.RawModuleCache(cuda_source)


def _c(a):
    import cupy
    return cupy.ascontiguousarray(a)


def concat_elu(x):
    import cupy
    x = _c(x)
    C = x.shape[-1]
    out = cupy.empty((*x.shape[:-1], 2 * C), dtype=x.dtype)
    _kernels.launch(f"concat_elu_fwd_{build.suffix(x.dtype)}", x.size, np.int32(C), x, out)
    return out


def concat_elu_backward(dout, x):
    import cupy
    x, dout = _c(x), _c(dout)
    dx = cupy.empty_like(x)
    _kernels.launch(f"concat_elu_bwd_{build.suffix(x.dtype)}", x.size, np.int32(x.shape[-1]), dout, x, dx)
    return dx


def gate(x):
    import cupy
    x = _c(x)
    C = x.shape[-1] // 2
    out = cupy.empty((*x.shape[:-1], C), dtype=x.dtype)
    _kernels.launch(f"gate_fwd_{build.suffix(x.dtype)}", out.size, np.int32(C), x, out)
    return out


def gate_backward(dout, x):
    import cupy
    x, dout = _c(x), _c(dout)
    dx = cupy.empty_like(x)
    _kernels.launch(f"gate_bwd_{build.suffix(x.dtype)}", dout.size, np.int32(x.shape[-1] // 2), dout, x, dx)
    return dx


def layernorm_forward(x, g, b, eps):
    """(out, xhat, rstd [..., 1]) as the reference returns them."""
    import cupy
    x = _c(x)
    C = x.shape[-1]
    rows = x.size // C if C else 0
    out, xhat = cupy.empty_like(x), cupy.empty_like(x)
    rstd = cupy.empty((*x.shape[:-1], 1), dtype=x.dtype)
    _kernels.launch(f"layernorm_fwd_{build.suffix(x.dtype)}", rows, np.int32(C), x, _c(g.astype(x.dtype)),
                    _c(b.astype(x.dtype)), np.float64(eps), out, xhat, rstd)
    return out, xhat, rstd


def layernorm_backward(dout, xhat, rstd, g):
    """(dx, dg, db); dg and db are CuPy reductions over the rows."""
    import cupy
    dout, xhat, rstd = _c(dout), _c(xhat), _c(rstd)
    C = dout.shape[-1]
    dx = cupy.empty_like(dout)
    _kernels.launch(f"layernorm_bwd_{build.suffix(dout.dtype)}", dout.size // C if C else 0, np.int32(C),
                    dout, xhat, rstd, _c(g.astype(dout.dtype)), dx)
    red = tuple(range(dout.ndim - 1))
    return dx, (dout * xhat).sum(axis=red), dout.sum(axis=red)


def im2col(x, kh: int, kw: int):
    """``[B,H,W,C] -> [B,H,W,kh,kw,C]`` patches of a "SAME", stride-1 convolution: one launch."""
    import cupy
    x = _c(x)
    B, H, W, C = x.shape
    cols = cupy.empty((B, H, W, kh, kw, C), dtype=x.dtype)
    _kernels.launch(f"im2col_{build.suffix(x.dtype)}", cols.size, np.int32(H), np.int32(W), np.int32(C),
                    np.int32(kh), np.int32(kw), x, cols)
    return cols


def col2im(dcols, kh: int, kw: int):
    """The adjoint of :func:`im2col`: ``[B,H,W,kh,kw,C] -> [B,H,W,C]``, each input element the sum of the
    column entries that copied it (one launch)."""
    import cupy
    dcols = _c(dcols)
    B, H, W, _, _, C = dcols.shape
    dx = cupy.empty((B, H, W, C), dtype=dcols.dtype)
    _kernels.launch(f"col2im_{build.suffix(dx.dtype)}", dx.size, np.int32(H), np.int32(W), np.int32(C),
                    np.int32(kh), np.int32(kw), dcols, dx)
    return dx
