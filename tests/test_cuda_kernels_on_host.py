"""The CuPy mixture kernels' source, compiled for the CPU, against the plain-array references.

``flowpp_ref.kernels.cuda.mixlogistic`` keeps its per-element math in one C++ text that
NVRTC compiles for the GPU. Here the same text is compiled with the machine's C++
compiler (entry points that loop over the elements) and called through ctypes, so the
kernels' math is checked on machines without a GPU; where ``nvcc`` is installed, the GPU
build is compiled to device code too. NVRTC and the launch itself are checked only by
``test_cuda_kernels_match_reference_on_gpu`` (skips without a GPU).

Tolerances: float64 rel/abs 1e-10 (the kernel sums in another order: online LSE vs
max-shifted LSE); float32 against the float64 reference of the same inputs, abs 2e-4 +
rel 2e-4 on values of order 1 (log-space sums of K terms in single precision).
"""
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowpp_ref.bijections import mixlogistic as ml
from flowpp_ref.kernels.cuda import mixlogistic as ck

from cuda_host import CXX, NO_CXX, build_host_library, call, nvcc_compile, suffix

pytestmark = pytest.mark.skipif(CXX is None, reason=NO_CXX)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_host_library(ck.host_source(), tmp_path_factory.mktemp("cuda_on_host"), "mixlog")


def host_forward(lib, x, l, m, s):
    n, K = l.shape
    outs = [np.empty(n, x.dtype) for _ in range(3)]
    call(lib, "mixlog_forward_" + suffix(x.dtype), n, np.int32(K), x, l, m, s, *outs)
    return outs


def host_backward(lib, x, l, m, s, gF, gG, gP):
    n, K = l.shape
    dx = np.empty(n, x.dtype)
    dl, dm, ds = (np.empty((n, K), x.dtype) for _ in range(3))
    call(lib, "mixlog_backward_" + suffix(x.dtype), n, np.int32(K), x, l, m, s, gF, gG, gP, dx, dl, dm, ds)
    return dx, dl, dm, ds


def host_invcdf(lib, y, l, m, s, tol, max_iters):
    n, K = l.shape
    x = np.empty(n, y.dtype)
    ev = np.empty(n, np.int64)
    cv = np.empty(n, np.int8)
    call(lib, "mixlog_invcdf_hybrid_" + suffix(y.dtype), n, np.int32(K), y, l, m, s, np.float64(tol),
         np.int32(max_iters), x, ev, cv)
    return x, ev, cv


def _params(rng, n, K, dtype, spread=3.0, tails=True):
    l = rng.normal(0, 2, (n, K))
    m = rng.normal(0, spread, (n, K))
    s = rng.uniform(-7.0, 2.0, (n, K))                    # -7: the coupling's clamp of the log-scales
    x = rng.normal(0, 4, n)
    if tails:
        x[: n // 10] = rng.choice([-1, 1], n // 10) * rng.uniform(50, 500, n // 10)   # deep tails
    return [np.ascontiguousarray(a, dtype=dtype) for a in (x, l, m, s)]


def _close(a, b, rtol, atol, what):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("K", [1, 3, 32])
def test_cuda_source_forward_matches_reference_float64(lib, K):
    x, l, m, s = _params(np.random.default_rng(K), 600, K, np.float64)
    got = host_forward(lib, x, l, m, s)
    ref = ml._ref_cdf_pdf(x, l, m, s)
    for g, r, name in zip(got, ref, ("logF", "log1mF", "logpdf")):
        assert np.all(np.isfinite(g)), name
        _close(g, r, 1e-10, 1e-10, name)


@pytest.mark.parametrize("K", [1, 3, 32])
def test_cuda_source_backward_matches_reference_float64(lib, K):
    rng = np.random.default_rng(10 + K)
    x, l, m, s = _params(rng, 400, K, np.float64)
    gF, gG, gP = (rng.normal(size=400) for _ in range(3))
    got = host_backward(lib, x, l, m, s, gF, gG, gP)
    ref = ml._ref_cdf_pdf_backward(x, l, m, s, gF, gG, gP)
    for g, r, name in zip(got, ref, ("dx", "dlogits", "dmeans", "dlogscales")):
        scale = max(1.0, float(np.max(np.abs(r))))
        _close(g, r, 1e-9, 1e-10 * scale, name)


@given(seed=st.integers(0, 2**32 - 1), K=st.integers(1, 6), spread=st.floats(0.0, 20.0))
def test_cuda_source_forward_backward_property_float64(lib, seed, K, spread):
    rng = np.random.default_rng(seed)
    x, l, m, s = _params(rng, 50, K, np.float64, spread=spread)
    gF, gG, gP = (rng.normal(size=50) for _ in range(3))
    for g, r in zip(host_forward(lib, x, l, m, s), ml._ref_cdf_pdf(x, l, m, s)):
        _close(g, r, 1e-10, 1e-10, "forward")
    for g, r in zip(host_backward(lib, x, l, m, s, gF, gG, gP), ml._ref_cdf_pdf_backward(x, l, m, s, gF, gG, gP)):
        _close(g, r, 1e-9, 1e-10 * max(1.0, float(np.max(np.abs(r)))), "backward")


def test_cuda_source_float32_close_to_float64_reference(lib):
    rng = np.random.default_rng(7)
    x, l, m, s = _params(rng, 600, 8, np.float32, tails=False)
    ref = ml._ref_cdf_pdf(*(a.astype(np.float64) for a in (x, l, m, s)))
    for g, r, name in zip(host_forward(lib, x, l, m, s), ref, ("logF", "log1mF", "logpdf")):
        assert g.dtype == np.float32
        _close(g, r, 2e-4, 2e-4, name)
    gF, gG, gP = (rng.normal(size=600).astype(np.float32) for _ in range(3))
    ref = ml._ref_cdf_pdf_backward(*(a.astype(np.float64) for a in (x, l, m, s, gF, gG, gP)))
    for g, r, name in zip(host_backward(lib, x, l, m, s, gF, gG, gP), ref, ("dx", "dl", "dm", "ds")):
        _close(g, r, 2e-3, 2e-3 * max(1.0, float(np.max(np.abs(r)))), name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K", [1, 4, 32])
def test_cuda_source_invcdf_hybrid_matches_reference(lib, dtype, K):
    rng = np.random.default_rng(20 + K)
    _, l, m, s = _params(rng, 500, K, dtype, tails=False)
    y = rng.uniform(1e-5, 1 - 1e-5, 500).astype(dtype)
    y[:4] = [1e-5, 1 - 1e-5, 0.5, 1e-3]
    tol, iters = ml.invcdf_defaults(dtype)
    x, ev, cv = host_invcdf(lib, y, l, m, s, tol, iters)
    xr, evr, cvr = ml._ref_invcdf_hybrid(y, l, m, s, tol, iters)
    assert cv.all() and cvr
    # the same iteration, up to the summation order of the mixture: same roots, same evaluations
    scale = np.maximum(1.0, np.abs(xr))
    assert np.max(np.abs(x - xr) / scale) < (1e-9 if dtype == np.float64 else 1e-4)
    assert abs(ev.mean() - evr.mean()) <= 0.05 * evr.mean() + 0.01
    if K == 1:
        assert ev.max() == 0                                # the bracket is the root
    # and x is the root: F(x) = y, checked with the float64 reference
    lF, lG, _ = ml._ref_cdf_pdf(*(a.astype(np.float64) for a in (x, l, m, s)))
    t = np.log(y.astype(np.float64)) - np.log1p(-y.astype(np.float64))
    assert np.max(np.abs((lF - lG) - t)) < (1e-6 if dtype == np.float64 else 2e-2)


def test_cuda_source_is_one_text_for_both_builds():
    """The GPU build and the CPU build differ only in their prelude and the entry-point wrappers."""
    cu, host = ck.cuda_source(), ck.host_source()
    assert ck.ELEMENT_SOURCE in cu and ck.ELEMENT_SOURCE in host
    for name in ("mixlog_forward", "mixlog_backward", "mixlog_invcdf_hybrid"):
        for suffix in ("f32", "f64"):
            assert f'extern "C" __global__ void {name}_{suffix}(' in cu
            assert f'extern "C" void {name}_{suffix}(' in host


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA compiler) not on PATH")
def test_cuda_source_compiles_for_the_gpu_with_nvcc(tmp_path):
    """The GPU build compiles to device code (nvcc, no GPU needed); NVRTC itself runs only on the GPU machine."""
    ok, err = nvcc_compile(ck.cuda_source(), tmp_path, "mixlog")
    assert ok, err


def test_cuda_kernels_match_reference_on_gpu():
    """CuPy dispatch (kernels on) against the reference (kernels off) on the GPU."""
    from flowpp_ref.core.backend import gpu_available
    if not gpu_available():
        pytest.skip("cupy backend: CuPy or a CUDA device is not available on this machine")
    import cupy

    from flowpp_ref.kernels import kernels_enabled
    x, l, m, s = (cupy.asarray(a) for a in _params(np.random.default_rng(3), 2000, 8, np.float64))
    g = [cupy.asarray(np.random.default_rng(4).normal(size=2000)) for _ in range(3)]
    with kernels_enabled(True):
        fk = ml.mixlogistic_cdf_pdf(x, l, m, s)
        bk = ml.mixlogistic_cdf_pdf_backward(x, l, m, s, *g)
        yk = ml.mixlogistic_invcdf(cupy.clip(cupy.exp(fk[0]), 1e-5, 1 - 1e-5), l, m, s, method="hybrid")[0]
    with kernels_enabled(False):
        fr = ml.mixlogistic_cdf_pdf(x, l, m, s)
        br = ml.mixlogistic_cdf_pdf_backward(x, l, m, s, *g)
        yr = ml.mixlogistic_invcdf(cupy.clip(cupy.exp(fr[0]), 1e-5, 1 - 1e-5), l, m, s, method="hybrid")[0]
    for a, b in zip(fk + bk, fr + br):
        np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(b), rtol=1e-9, atol=1e-9)
    _assert_same_inverse(cupy.asnumpy(yk), cupy.asnumpy(yr), *(cupy.asnumpy(v) for v in (l, m, s)))


def test_inverse_comparison_allows_flat_cdf_and_catches_a_wrong_root():
    """The GPU comparison's rule, on the host: numba's inverse vs the reference, then one planted error."""
    from flowpp_ref.kernels import kernels_enabled
    x, l, m, s = _params(np.random.default_rng(3), 2000, 8, np.float64)
    with kernels_enabled(False):
        y = np.clip(np.exp(ml.mixlogistic_cdf_pdf(x, l, m, s)[0]), 1e-5, 1 - 1e-5)
        yr = ml.mixlogistic_invcdf(y, l, m, s, method="hybrid")[0]
    yk = yr.copy()
    yk[1202] += 0.0024                   # inside the flat stretch the H200 run met: still an exact inverse
    _assert_same_inverse(yk, yr, l, m, s)
    yk[7] += 1e-3                        # a steep point: a wrong inverse
    with pytest.raises(AssertionError):
        _assert_same_inverse(yk, yr, l, m, s)


def _assert_same_inverse(yk, yr, l, m, s):
    """Two inverse CDFs agree: the same F(x) everywhere; the same x where F is not flat there.

    Where the mixture's density is ~0 over an interval (a gap between components), F is constant
    to float64 precision on it and every x in it is an exact inverse: the H200 run found one such
    element 0.0024 apart (F equal to 1e-16).
    """
    from flowpp_ref.kernels import kernels_enabled
    with kernels_enabled(False):
        fk, _, dk = ml.mixlogistic_cdf_pdf(yk, l, m, s)
        fr, _, dr = ml.mixlogistic_cdf_pdf(yr, l, m, s)
    np.testing.assert_allclose(np.exp(fk), np.exp(fr), rtol=1e-9, atol=1e-12)
    steep = np.minimum(dk, dr) > np.log(1e-6)          # log densities: x is well determined there
    assert steep.mean() > 0.9
    np.testing.assert_allclose(yk[steep], yr[steep], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------ concat_elu, gate, layer norm
from flowpp_ref.kernels import kernels_enabled  # noqa: E402
from flowpp_ref.kernels.cuda import layers as cl  # noqa: E402
from flowpp_ref.nn import activations as act  # noqa: E402
from flowpp_ref.nn import layernorm as lnm  # noqa: E402


@pytest.fixture(scope="module")
def layers_lib(tmp_path_factory):
    return build_host_library(cl.host_source(), tmp_path_factory.mktemp("cuda_layers_on_host"), "layers")


def _rows(rng, shape, dtype, scale=3.0):
    x = rng.normal(0, scale, shape)
    x.flat[:4] = [0.0, -0.0, 60.0, -60.0]                   # the branch points and saturated tails
    return np.ascontiguousarray(x, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_cuda_source_concat_elu_and_gate_match_references(layers_lib, dtype, tol):
    rng = np.random.default_rng(5)
    x = _rows(rng, (3, 5, 7, 6), dtype)
    C = x.shape[-1]
    out = np.empty((*x.shape[:-1], 2 * C), dtype)
    call(layers_lib, "concat_elu_fwd_" + suffix(dtype), x.size, np.int32(C), x, out)
    np.testing.assert_allclose(out, act.concat_elu_reference(x), rtol=tol, atol=tol)
    d = _rows(rng, out.shape, dtype, 1.0)
    dx = np.empty_like(x)
    call(layers_lib, "concat_elu_bwd_" + suffix(dtype), x.size, np.int32(C), d, x, dx)
    np.testing.assert_allclose(dx, act.concat_elu_backward_reference(d, x), rtol=tol, atol=tol)

    g_out = np.empty((*x.shape[:-1], C // 2), dtype)
    call(layers_lib, "gate_fwd_" + suffix(dtype), g_out.size, np.int32(C // 2), x, g_out)
    np.testing.assert_allclose(g_out, act.gate_reference(x), rtol=tol, atol=tol)
    d = _rows(rng, g_out.shape, dtype, 1.0)
    call(layers_lib, "gate_bwd_" + suffix(dtype), g_out.size, np.int32(C // 2), d, x, dx)
    np.testing.assert_allclose(dx, act.gate_backward_reference(d, x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("C", [1, 4, 96])
def test_cuda_source_layernorm_matches_reference(layers_lib, dtype, tol, C):
    rng = np.random.default_rng(C)
    x = np.ascontiguousarray(rng.normal(2.0, 3.0, (2, 5, 3, C)), dtype=dtype)
    g = rng.normal(1.0, 0.5, C).astype(dtype)
    b = rng.normal(0.0, 0.5, C).astype(dtype)
    rows = x.size // C
    out, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty((*x.shape[:-1], 1), dtype)
    call(layers_lib, "layernorm_fwd_" + suffix(dtype), rows, np.int32(C), x, g, b, np.float64(1e-5), out, xhat, rstd)
    ro, rh, rr = lnm.layernorm_forward_ref(x, g, b, 1e-5)
    for a, r, name in ((out, ro, "out"), (xhat, rh, "xhat"), (rstd, rr, "rstd")):
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol, err_msg=name)
    d = np.ascontiguousarray(rng.normal(size=x.shape), dtype=dtype)
    dx = np.empty_like(x)
    call(layers_lib, "layernorm_bwd_" + suffix(dtype), rows, np.int32(C), d, rh, rr, g, dx)
    np.testing.assert_allclose(dx, lnm.layernorm_backward_ref(d, rh, rr, g)[0], rtol=10 * tol, atol=10 * tol)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA compiler) not on PATH")
def test_cuda_layers_source_compiles_for_the_gpu_with_nvcc(tmp_path):
    ok, err = nvcc_compile(cl.cuda_source(), tmp_path, "layers")
    assert ok, err


def test_cuda_layer_kernels_match_reference_on_gpu():
    """CuPy dispatch (kernels on) against the reference (kernels off) on the GPU."""
    from flowpp_ref.core.backend import gpu_available
    if not gpu_available():
        pytest.skip("cupy backend: CuPy or a CUDA device is not available on this machine")
    import cupy

    from flowpp_ref.kernels import kernels_enabled
    rng = np.random.default_rng(6)
    x = cupy.asarray(rng.normal(size=(4, 8, 8, 96)))
    g, b = cupy.asarray(rng.normal(size=96)), cupy.asarray(rng.normal(size=96))
    d2, d1, dh = (cupy.asarray(rng.normal(size=s)) for s in ((4, 8, 8, 192), (4, 8, 8, 96), (4, 8, 8, 48)))
    res = {}
    for on in (True, False):
        with kernels_enabled(on):
            ce, cache = act.concat_elu_forward(x)
            ga, gcache = act.gate_forward(x)
            out, xhat, rstd = lnm.layernorm_forward(x, g, b)
            res[on] = [ce, act.concat_elu_backward(d2, cache), ga, act.gate_backward(dh, gcache),
                       out, *lnm.layernorm_backward(d1, xhat, rstd, g)]
    for a, r in zip(res[True], res[False]):
        np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(r), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kh,kw", [(3, 3), (1, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_cuda_source_im2col_and_col2im_match_the_convolution(layers_lib, kh, kw, dtype, tol):
    """im2col equals the reference's slice copies; col2im(dout W^T) equals Conv2d's reference dx."""
    from flowpp_ref.nn.weightnorm import Conv2d, im2col
    rng = np.random.default_rng(11)
    B, H, W, C, Co = 2, 5, 4, 3, 4
    x = rng.normal(size=(B, H, W, C)).astype(dtype)
    cols = np.empty((B, H, W, kh, kw, C), dtype)
    call(layers_lib, "im2col_" + suffix(dtype), cols.size, np.int32(H), np.int32(W), np.int32(C), np.int32(kh),
         np.int32(kw), x, cols)
    np.testing.assert_array_equal(cols, im2col(x, kh, kw))
    conv = Conv2d(C, Co, (kh, kw), rng=np.random.default_rng(0), dtype=dtype)
    dout = rng.normal(size=(B, H, W, Co)).astype(dtype)
    with kernels_enabled(False):
        out, cache = conv.forward(x)
        dx_ref, _ = conv.backward(dout, cache)
    dcols = np.ascontiguousarray((dout.reshape(-1, Co) @ cache["W"].reshape(-1, Co).T).reshape(cols.shape))
    dx = np.empty_like(x)
    call(layers_lib, "col2im_" + suffix(dtype), dx.size, np.int32(H), np.int32(W), np.int32(C), np.int32(kh),
         np.int32(kw), dcols, dx)
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol)
