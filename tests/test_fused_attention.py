"""Fused self-attention (online softmax, no T x T weights) against the explicit reference.

* numba kernels (:mod:`flowpp_ref.kernels.numba.attention`) vs :func:`attention_ref` /
  :func:`attention_backward_ref`: float64 to 1e-12, float32 (against the float64 reference of
  the same inputs) to 1e-5, T not a multiple of the key / query blocks, d = 8, 24, 32, 64,
  several batch sizes; small key blocks so the online recurrence runs over many blocks;
* the fused backward against central differences (float64);
* the layer: fused and reference paths agree, the fused cache holds no [B, h, T, T] array,
  ``attention_maps`` still returns the weights;
* the CUDA kernels' source (:mod:`flowpp_ref.kernels.cuda.attention`) compiled for the CPU
  against the reference, and compiled by nvcc where it is installed.
"""
import numpy as np
import pytest

from flowpp_ref.core.gradcheck import numerical_gradient, rel_error
from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.kernels.cuda import attention as ca
from flowpp_ref.kernels.numba import attention as na
from flowpp_ref.nn.attention import SelfAttention, attention_backward_ref, attention_ref

from cuda_host import CXX, NO_CXX, build_host_library, call, nvcc_compile, suffix


def _qkv(rng, B, h, T, d, dtype=np.float64, spread=1.5):
    """q, k, v as the layer has them: strided views [B, h, T, d] of one [B, T, 3, h, d] array."""
    qkv = (spread * rng.standard_normal((B, T, 3, h, d))).astype(dtype)
    c = qkv.transpose(2, 0, 3, 1, 4)
    return c[0], c[1], c[2]


def _ref_all(q, k, v, dA):
    w, a = attention_ref(q, k, v)
    s = np.matmul(q, k.swapaxes(-1, -2)) / np.sqrt(q.shape[-1])
    m = s.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]
    return a, lse, attention_backward_ref(q, k, v, w, dA)


# d = 1..4 run with 4 channels, other d padded to a multiple of 8; the kernels take two query rows
# per pass, so T % 8 odd leaves a padding row in the last pair.
SHAPES = [(1, 2, 37, 8), (3, 4, 70, 8), (2, 1, 45, 24), (2, 2, 33, 32), (1, 2, 29, 64), (5, 1, 9, 8),
          (2, 2, 21, 4), (1, 3, 13, 1), (2, 1, 19, 12), (1, 1, 23, 40), (1, 2, 15, 16)]


@pytest.mark.parametrize("B,h,T,d", SHAPES)
@pytest.mark.parametrize("key_block", [16, na.KEY_BLOCK])
def test_numba_fused_matches_reference_float64(B, h, T, d, key_block):
    rng = np.random.default_rng(T * d + B)
    q, k, v = _qkv(rng, B, h, T, d)
    dA = rng.standard_normal((B, h, T, d))
    a_ref, lse_ref, g_ref = _ref_all(q, k, v, dA)
    a, lse = na.attention_forward(q, k, v, key_block=key_block)
    np.testing.assert_allclose(a, a_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12, atol=1e-12)
    grads = na.attention_backward(q, k, v, a, lse, dA, key_block=key_block)
    for g, r, name in zip(grads, g_ref, "qkv"):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12, err_msg="d" + name)


_F32_SHAPES = [(2, 4, 70, 8), (3, 2, 45, 24), (1, 2, 33, 32), (2, 1, 29, 64), (2, 2, 27, 4), (1, 1, 517, 8),
               (3, 1, 9, 8), (1, 2, 512, 8), (1, 1, 16, 8), (2, 1, 17, 8), (1, 1, 1, 8)]


# float32 with d = 8 runs the query-lanes forward and the tiled backward, unless query_lanes=False
# (the key-block kernels, which every other d runs)
@pytest.mark.parametrize("B,h,T,d,query_lanes", [s + (True,) for s in _F32_SHAPES] +
                         [s + (False,) for s in _F32_SHAPES if s[3] == 8])
def test_numba_fused_float32_within_1e5_of_float64_reference(B, h, T, d, query_lanes):
    rng = np.random.default_rng(T + d)
    q, k, v = _qkv(rng, B, h, T, d, np.float32)
    dA = rng.standard_normal((B, h, T, d)).astype(np.float32)
    a_ref, lse_ref, g_ref = _ref_all(*(x.astype(np.float64) for x in (q, k, v, dA)))
    a, lse = na.attention_forward(q, k, v, key_block=32, query_lanes=query_lanes)
    assert a.dtype == np.float32 and lse.dtype == np.float32
    np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)
    grads = na.attention_backward(q, k, v, a, lse, dA, key_block=32, query_lanes=query_lanes)
    for g, r, name in zip(grads, g_ref, "qkv"):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg="d" + name)


def test_row_width_offsets_2kb_rows_and_padded_buffers_give_the_reference():
    # scratch rows a multiple of 2 KB long are widened by 16 elements (L1 set conflicts); other widths
    # are only rounded up to 16; T = 512 runs the backward with widened tiles and work rows
    for n, itemsize, want in [(1, 4, 16), (16, 4, 16), (17, 4, 32), (500, 4, 528), (512, 4, 528), (1030, 4, 1040),
                              (600, 4, 608), (256, 8, 272), (512, 8, 528), (300, 8, 304)]:
        assert na._row_width(n, itemsize) == want
    rng = np.random.default_rng(512)
    q, k, v = _qkv(rng, 1, 1, 512, 8)
    dA = rng.standard_normal((1, 1, 512, 8))
    a_ref, lse_ref, g_ref = _ref_all(q, k, v, dA)
    a, lse = na.attention_forward(q, k, v)
    np.testing.assert_allclose(a, a_ref, rtol=1e-12, atol=1e-12)
    for g, r, name in zip(na.attention_backward(q, k, v, a, lse, dA), g_ref, "qkv"):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12, err_msg="d" + name)


def test_simd_lane_operations_match_numpy_and_exp2_16_is_within_one_ulp():
    import numba
    from flowpp_ref.kernels.numba import simd

    @numba.njit
    def ops(a, b, c, out):
        x, y, z = simd.load16(a, 0), simd.load16(b, 0), simd.load16(c, 0)
        simd.store16(out[0], 0, simd.add16(x, y))
        simd.store16(out[1], 0, simd.sub16(x, y))
        simd.store16(out[2], 0, simd.mul16(x, y))
        simd.store16(out[3], 0, simd.fma16(x, y, z))
        simd.store16(out[4], 0, simd.max16(x, y))
        simd.store16(out[5], 0, simd.exp2_16(x))
        simd.store16(out[6], 0, simd.splat16(a[3]))
        simd.store16(out[7, 16:], 0, x)                       # a row offset: out[7, 16:32]
        return simd.lane(x, 5)

    @numba.njit
    def transpose(src, s0, dst, d0):
        simd.transpose16x16(src, s0, dst, d0)

    rng = np.random.default_rng(16)
    x = (30 * rng.standard_normal(16 * 40)).astype(np.float32)
    x[:10] = [0.0, -124.7, -124.9, np.nan, -np.inf, np.inf, 128.0, 129.5, -1e-30, 127.9]
    with np.errstate(over="ignore"):
        ref = np.exp2(x.astype(np.float64))
    ref[x < simd.EXP2_LO] = 0.0                               # flushed below -124.8 (exp(-86.5))
    for blk in range(40):
        a = x[16 * blk:16 * blk + 16].copy()
        b = rng.standard_normal(16).astype(np.float32)
        c = rng.standard_normal(16).astype(np.float32)
        out = np.zeros((8, 32), np.float32)
        assert ops(a, b, c, out) == a[5] or np.isnan(a[5])
        np.testing.assert_array_equal(out[0, :16], a + b)
        np.testing.assert_array_equal(out[1, :16], a - b)
        np.testing.assert_array_equal(out[2, :16], a * b)
        np.testing.assert_allclose(out[3, :16], a.astype(np.float64) * b + c, rtol=1e-6, atol=1e-30)
        np.testing.assert_array_equal(out[4, :16], np.where(a > b, a, b))
        e, r = out[5, :16].astype(np.float64), ref[16 * blk:16 * blk + 16]
        big = r > 3.4028234663852886e38                       # 2^y from y = 128 on: inf
        assert np.array_equal(np.isnan(e), np.isnan(r)) and np.all(np.isinf(e[big])) and np.all(e[r == 0] == 0)
        fin = np.isfinite(r) & ~big & (r > 0)
        np.testing.assert_array_less(np.abs(e[fin] - r[fin]), 1.2e-7 * r[fin])   # < 1 ulp
        np.testing.assert_array_equal(out[6, :16], np.full(16, a[3]))
        np.testing.assert_array_equal(out[7, 16:], a)
    src = rng.standard_normal(300).astype(np.float32)
    dst = np.zeros(280, np.float32)
    transpose(src, 7, dst, 20)                                # offsets: src[7:263] -> dst[20:276]
    np.testing.assert_array_equal(dst[20:276].reshape(16, 16), src[7:263].reshape(16, 16).T)
    assert not dst[:20].any() and not dst[276:].any()


def test_lanes_forward_loose_bound_falls_back_to_the_running_maximum():
    """Queries anti-aligned with every key: the Cauchy-Schwarz bound is above the true row maximum by
    2 c a^2 (70 for a = 10: the fast path's sums fall below T e^-60; 102 for a = 12: every term of
    the fast path underflows to 0), so those rows take the running-maximum path: same as the reference."""
    rng = np.random.default_rng(5)
    T = 64
    for a in (10.0, 12.0):
        u = rng.standard_normal(8)
        u /= np.linalg.norm(u)
        qkv = np.zeros((1, T, 3, 1, 8), np.float32)
        qkv[0, :, 0, 0] = a * u + 0.1 * rng.standard_normal((T, 8))
        qkv[0, :, 1, 0] = -a * u + 0.1 * rng.standard_normal((T, 8))
        qkv[0, :, 2, 0] = rng.standard_normal((T, 8))
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
        s = q64[0, 0] @ k64[0, 0].T / np.sqrt(8)
        bound = np.linalg.norm(q64[0, 0], axis=1) / np.sqrt(8) * np.linalg.norm(k64[0, 0], axis=1).max()
        gap = bound - s.max(axis=1)
        assert gap.min() > 60 and (a < 11 or gap.min() > 87)    # the fast path is not exact here
        a_ref, lse_ref, _ = _ref_all(q64, k64, v64, np.zeros(q.shape))
        A, lse = na.attention_forward(q, k, v)
        np.testing.assert_allclose(A, a_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_lanes_forward_non_finite_rows_stay_non_finite():
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, 1, 1, 40, 8, np.float32)
    q = q.copy()
    q[0, 0, 3, 2] = np.nan
    A, lse = na.attention_forward(q, k, v)
    assert np.isnan(A[0, 0, 3]).all() and np.isnan(lse[0, 0, 3])
    others = np.delete(np.arange(40), 3)
    assert np.isfinite(A[0, 0, others]).all()
    A0, _ = na.attention_forward(q, k, v, query_lanes=False)
    np.testing.assert_allclose(A[0, 0, others], A0[0, 0, others], rtol=1e-5, atol=1e-5)


def test_softmax_exp_is_fastexp_in_range_zero_below_inf_above():
    """The attention's float32 exp (one power of two) equals fastexp's exp wherever both are normal."""
    import numba
    from flowpp_ref.kernels.numba.fastexp import fast_exp

    @numba.njit
    def both(x, a, b):
        for i in range(x.size):
            a[i] = na.softmax_exp(x[i])
            b[i] = fast_exp(x[i])

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-86.5, 88.7, 200_000), np.linspace(-86.5, 0.0, 1001)]).astype(np.float32)
    a, b = np.empty_like(x), np.empty_like(x)
    both(x, a, b)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, np.exp(x.astype(np.float64)), rtol=4e-7)
    edge = np.array([-86.6, -100.0, -np.inf, 88.8, 89.5, np.inf, np.nan], np.float32)
    a, b = np.empty_like(edge), np.empty_like(edge)
    both(edge, a, b)
    assert np.all(a[:3] == 0) and np.all(np.isposinf(a[3:6])) and np.isnan(a[6])
    x64 = rng.uniform(-700, 700, 1000)
    a64, b64 = np.empty_like(x64), np.empty_like(x64)
    both(x64, a64, b64)
    np.testing.assert_array_equal(a64, b64)                # float64: fastexp's own


def test_borrowed_views_share_the_memory():
    import numba
    from flowpp_ref.kernels.numba.views import borrow

    @numba.njit
    def f(a):
        b = borrow(a)
        row = b[1]
        row[2] = 7.0
        return b[1, 2] + a.shape[0]

    a = np.zeros((3, 4))
    assert f(a) == 10.0 and a[1, 2] == 7.0


def test_numba_fused_large_scores_do_not_overflow():
    """Scores of order 1000: the running maximum keeps every exp argument <= 0."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 2, 40, 8, spread=20.0)
    a_ref, lse_ref, _ = _ref_all(q, k, v, np.zeros(q.shape))
    assert np.abs(lse_ref).max() > 300
    a, lse = na.attention_forward(q, k, v, key_block=8)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, a_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12)


def test_numba_fused_backward_matches_finite_differences():
    rng = np.random.default_rng(11)
    B, h, T, d = 2, 2, 13, 8
    q, k, v = (np.ascontiguousarray(x) for x in _qkv(rng, B, h, T, d))
    R = rng.standard_normal((B, h, T, d))                 # loss = sum(A * R)

    def loss():
        return float((na.attention_forward(q, k, v, key_block=4)[0] * R).sum())

    a, lse = na.attention_forward(q, k, v, key_block=4)
    grads = na.attention_backward(q, k, v, a, lse, R, key_block=4)
    for x, g, name in zip((q, k, v), grads, "qkv"):
        num = numerical_gradient(loss, x)
        assert rel_error(g, num) < 1e-7, name


def test_numba_fused_wrong_formula_is_caught_by_finite_differences():
    """The check above can fail: dS = P * dP (D left out) gives a wrong dq."""
    rng = np.random.default_rng(12)
    q, k, v = (np.ascontiguousarray(x) for x in _qkv(rng, 1, 1, 9, 8))
    R = rng.standard_normal(q.shape)
    w, a = attention_ref(q, k, v)
    ds_wrong = w * np.matmul(R, v.swapaxes(-1, -2))      # missing "- rowsum(dA * A)"
    dq_wrong = np.matmul(ds_wrong, k) / np.sqrt(8)
    num = numerical_gradient(lambda: float((attention_ref(q, k, v)[1] * R).sum()), q)
    assert rel_error(dq_wrong, num) > 1e-3


def test_numba_fused_writes_strided_outputs_and_checks_inputs():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 2, 2, 11, 8)
    buf = np.full((2, 11, 2, 8), np.nan)
    a, lse = na.attention_forward(q, k, v, out=buf.transpose(0, 2, 1, 3))
    assert np.all(np.isfinite(buf))
    np.testing.assert_allclose(buf.transpose(0, 2, 1, 3), attention_ref(q, k, v)[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        na.attention_forward(q, k[:, :, :5], v)
    with pytest.raises(TypeError, match="float32 or float64"):
        na.attention_forward(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(ValueError, match="key_block"):
        na.attention_forward(q, k, v, key_block=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_fused_layer_layouts_are_used_in_place_and_other_layouts_copied(dtype):
    """The kernels take the layer's layouts (qkv [B, T, 3, h, d], A and dA [B, T, h, d]) without a
    copy; contiguous [B, h, T, d] arrays (and other strides) go through a copy: same numbers."""
    rng = np.random.default_rng(8)
    B, h, T, d = 2, 3, 19, 8
    q, k, v = _qkv(rng, B, h, T, d, dtype=dtype)
    base = na._packed_base(q, k, v)
    assert base is not None and base.shape == (B, T, 3, h, d) and np.shares_memory(base, q)
    np.testing.assert_array_equal(base[:, :, 1].transpose(0, 2, 1, 3), k)
    qc, kc, vc = (np.ascontiguousarray(x) for x in (q, k, v))
    assert na._packed_base(qc, kc, vc) is None and na._packed_base(q, v, k) is None
    merged = np.full((B, T, h, d), np.nan, dtype=dtype)
    a, lse = na.attention_forward(q, k, v, out=merged.transpose(0, 2, 1, 3))
    assert not np.isnan(merged).any()                         # written in place
    a2, lse2 = na.attention_forward(qc, kc, vc)
    np.testing.assert_array_equal(a2, merged.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(lse2, lse)
    da_merged = rng.standard_normal((B, T, h, d)).astype(dtype)
    dA = da_merged.transpose(0, 2, 1, 3)
    dqkv = np.full((B, T, 3, h, d), np.nan, dtype=dtype)
    views = dqkv.transpose(2, 0, 3, 1, 4)
    na.attention_backward(q, k, v, a, lse, dA, dq=views[0], dk=views[1], dv=views[2])
    assert not np.isnan(dqkv).any()
    g2 = na.attention_backward(qc, kc, vc, np.ascontiguousarray(a2), lse2, np.ascontiguousarray(dA))
    for t in range(3):
        np.testing.assert_array_equal(g2[t], views[t])
    dq = np.full((B, h, T, d), np.nan, dtype=dtype)           # one output given, of another layout
    g3 = na.attention_backward(q, k, v, a, lse, dA, dq=dq)
    assert g3[0] is dq
    np.testing.assert_array_equal(dq, views[0])
    _, _, g_ref = _ref_all(*(x.astype(np.float64) for x in (q, k, v, dA)))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for t in range(3):
        np.testing.assert_allclose(views[t], g_ref[t], rtol=tol, atol=tol)


# ---------------------------------------------------------------- the layer
def _layer(F, heads, seed, dtype=np.float64, fused=True):
    rng = np.random.default_rng(seed)
    att = SelfAttention(F, heads=heads, rng=rng, dtype=dtype, fused=fused)
    x = rng.standard_normal((3, 5, 7, F)).astype(dtype)       # T = 35
    pos = rng.standard_normal((5, 7, F)).astype(dtype)
    att.data_init(x, pos)
    return att, x, pos, rng


def _arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v)


@pytest.mark.parametrize("F,heads", [(32, 4), (48, 2)])
def test_layer_fused_matches_reference_path_and_cache_has_no_weights(F, heads):
    att, x, pos, rng = _layer(F, heads, seed=F)
    dout = rng.standard_normal(x.shape)
    out_f, cache_f = att.forward(x, pos)
    res_f = att.backward(dout, cache_f)
    with kernels_enabled(False):
        out_r, cache_r = att.forward(x, pos)
        res_r = att.backward(dout, cache_r)
    np.testing.assert_allclose(out_f, out_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(res_f[:2], res_r[:2]):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    for name in res_r[2]:
        np.testing.assert_allclose(res_f[2][name], res_r[2][name], rtol=1e-11, atol=1e-12, err_msg=name)
    T = x.shape[1] * x.shape[2]
    assert "weights" in cache_r and cache_r["weights"].shape == (3, heads, T, T)
    assert "lse" in cache_f and "weights" not in cache_f
    assert not any(a.ndim >= 2 and a.shape[-2:] == (T, T) for a in _arrays(cache_f))
    size_f = sum(a.size for a in _arrays(cache_f))       # everything else is as in the reference cache
    size_r = sum(a.size for a in _arrays(cache_r))
    assert size_f <= size_r - cache_r["weights"].size + cache_f["lse"].size + cache_f["attn_out"].size


def test_layer_explicit_switch_and_attention_maps():
    att, x, pos, _ = _layer(16, 4, seed=1, fused=False)
    assert "weights" in att.forward(x, pos)[1]
    att.fused = True
    w = att.attention_maps(x, pos)                      # computed on demand, also on the fused layer
    assert w.shape == (3, 4, 35, 35)
    np.testing.assert_allclose(w.sum(-1), 1, atol=1e-12)
    out, cache = att.forward(x, pos)
    assert "weights" not in cache


def test_layer_fused_float32_matches_float64_reference():
    att64, x, pos, rng = _layer(32, 4, seed=7)
    att32 = SelfAttention(32, heads=4, rng=np.random.default_rng(0), dtype=np.float32)
    att32.load_parameters({k: v.astype(np.float32) for k, v in att64.parameters().items()})
    dout = rng.standard_normal(x.shape)
    out32, c32 = att32.forward(x.astype(np.float32), pos.astype(np.float32))
    dx32, dpos32, _ = att32.backward(dout.astype(np.float32), c32)
    with kernels_enabled(False):
        out, c = att64.forward(x, pos)
        dx, dpos, _ = att64.backward(dout, c)
    assert rel_error(out32, out) < 1e-5 and rel_error(dx32, dx) < 1e-5 and rel_error(dpos32, dpos) < 1e-5


# ---------------------------------------------------------------- CUDA source on the CPU
needs_cxx = pytest.mark.skipif(CXX is None, reason=NO_CXX)


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return build_host_library(ca.host_source(), tmp_path_factory.mktemp("cuda_attention_host"), "attention")


def _host_forward(lib, q, k, v):
    B, h, T, d = q.shape
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    out = np.empty(q.shape, q.dtype)
    lse = np.empty((B, h, T), q.dtype)
    call(lib, "attention_fwd_" + suffix(q.dtype), B * h * T, np.int32(T), np.int32(d), q, k, v, out, lse)
    return out, lse


def _host_backward(lib, q, k, v, a, lse, dA):
    B, h, T, d = q.shape
    q, k, v, a, dA = (np.ascontiguousarray(x) for x in (q, k, v, a, dA))
    D = np.empty((B, h, T), q.dtype)
    dq, dk, dv = (np.empty(q.shape, q.dtype) for _ in range(3))
    args = (np.int32(T), np.int32(d))
    call(lib, "attention_rowdot_" + suffix(q.dtype), B * h * T, *args, a, dA, D)
    call(lib, "attention_bwd_q_" + suffix(q.dtype), B * h * T, *args, q, k, v, lse, dA, D, dq)
    call(lib, "attention_bwd_kv_" + suffix(q.dtype), B * h * T, *args, q, k, v, lse, dA, D, dk, dv)
    return dq, dk, dv


@needs_cxx
@pytest.mark.parametrize("B,h,T,d", [(2, 2, 37, 8), (1, 3, 45, 24), (2, 1, 33, 32), (1, 1, 20, 64)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_source_on_host_matches_reference(host_lib, B, h, T, d, dtype):
    rng = np.random.default_rng(T * d)
    q, k, v = _qkv(rng, B, h, T, d, dtype)
    dA = rng.standard_normal((B, h, T, d)).astype(dtype)
    a_ref, lse_ref, g_ref = _ref_all(*(x.astype(np.float64) for x in (q, k, v, dA)))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    a, lse = _host_forward(host_lib, q, k, v)
    np.testing.assert_allclose(a, a_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, lse_ref, rtol=tol, atol=tol)
    for g, r, name in zip(_host_backward(host_lib, q, k, v, a, lse, dA), g_ref, "qkv"):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol, err_msg="d" + name)


@pytest.mark.skipif(not __import__("shutil").which("nvcc"), reason="nvcc not installed: GPU build not compiled")
def test_cuda_attention_source_compiles_with_nvcc(tmp_path):
    ok, err = nvcc_compile(ca.cuda_source(), tmp_path, "attention")
    assert ok, err


def test_cuda_fused_attention_matches_reference_on_gpu():
    """CuPy dispatch of the layer (fused CUDA kernels) against its reference path, on the GPU."""
    from flowpp_ref.core.backend import gpu_available
    if not gpu_available():
        pytest.skip("cupy backend: CuPy or a CUDA device is not available on this machine")
    import cupy
    rng = np.random.default_rng(9)
    q, k, v = (cupy.asarray(x) for x in _qkv(rng, 2, 4, 37, 8))
    dA = cupy.asarray(rng.standard_normal((2, 4, 37, 8)))
    a, lse = ca.attention_forward(q, k, v)
    grads = ca.attention_backward(q, k, v, a, lse, dA)
    a_ref, lse_ref, g_ref = _ref_all(*(cupy.asnumpy(x) for x in (q, k, v, dA)))
    np.testing.assert_allclose(cupy.asnumpy(a), a_ref, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(cupy.asnumpy(lse), lse_ref, rtol=1e-11, atol=1e-11)
    for g, r in zip(grads, g_ref):
        np.testing.assert_allclose(cupy.asnumpy(g), r, rtol=1e-11, atol=1e-11)
    # fused=True: the CuPy default is the plain path (FUSED_DEFAULT), so ask for the kernels
    att = SelfAttention(32, heads=4, rng=np.random.default_rng(1), xp=cupy, dtype=np.float64, fused=True)
    x = cupy.asarray(rng.standard_normal((2, 4, 5, 32)))
    pos = cupy.asarray(rng.standard_normal((4, 5, 32)))
    out_f, cache_f = att.forward(x, pos)
    assert "lse" in cache_f
    dx_f = att.backward(cupy.ones_like(x), cache_f)[0]
    with kernels_enabled(False):
        out_r, cache_r = att.forward(x, pos)
        dx_r = att.backward(cupy.ones_like(x), cache_r)[0]
    np.testing.assert_allclose(cupy.asnumpy(out_f), cupy.asnumpy(out_r), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(cupy.asnumpy(dx_f), cupy.asnumpy(dx_r), rtol=1e-11, atol=1e-11)
