"""Parity of the training-step kernels of issue 10 (the convolution's data movement, the fused
elementwise kernels) with their plain-array references, and the twin's SDPA option."""
from __future__ import annotations

import numpy as np
import pytest

from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.kernels.numba.conv import gather_cols, shift_sum
from flowpp_ref.nn.weightnorm import Conv2d, gather_cols_reference, shift_sum_reference, tap_shifts

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}
SHIFTS = [tap_shifts(3, 3), tap_shifts(2, 2), tap_shifts(1, 3), [(0, 0), (5, -1), (-2, 7), (-9, 0)]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shifts", SHIFTS)
def test_gather_cols_and_shift_sum_match_references(dtype, shifts):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 3)).astype(dtype)
    got = gather_cols(x, shifts)
    np.testing.assert_array_equal(got, gather_cols_reference(x, shifts))
    assert got.shape == (2, 5, 7, len(shifts), 3) and got.dtype == dtype
    y = rng.standard_normal((2, 5, 7, len(shifts), 4)).astype(dtype)
    bias = rng.standard_normal(4).astype(dtype)
    np.testing.assert_allclose(shift_sum(y, shifts, bias), shift_sum_reference(y, shifts, bias), **TOL[dtype])
    np.testing.assert_allclose(shift_sum(y, shifts), shift_sum_reference(y, shifts), **TOL[dtype])


def test_shift_sum_is_the_adjoint_of_gather_cols():
    # <gather_cols(x, s), y> = <x, shift_sum(y, -s)>: the identity the convolution backward relies on
    rng = np.random.default_rng(1)
    s = tap_shifts(3, 3)
    x = rng.standard_normal((2, 4, 6, 3))
    y = rng.standard_normal((2, 4, 6, 9, 3))
    lhs = np.sum(gather_cols(x, s) * y)
    rhs = np.sum(x * shift_sum(y, [(-a, -b) for a, b in s]))
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cin,cout,k", [(8, 4, 3), (3, 8, 3), (6, 6, 3), (8, 4, 2), (4, 6, (1, 3))])
def test_conv2d_kernel_path_matches_reference(dtype, cin, cout, k):
    """Both orders (Cout < Cin: matmul then shift_sum; else columns then matmul), forward and backward."""
    rng = np.random.default_rng(2)
    layer = Conv2d(cin, cout, k, rng=rng, dtype=dtype)
    layer.params["g"] = rng.uniform(0.5, 2.0, cout).astype(dtype)
    layer.params["b"] = rng.standard_normal(cout).astype(dtype)
    x = rng.standard_normal((3, 6, 5, cin)).astype(dtype)
    dout = rng.standard_normal((3, 6, 5, cout)).astype(dtype)
    res = {}
    for flag in (True, False):
        with kernels_enabled(flag):
            out, cache = layer.forward(x)
            dx, g = layer.backward(dout, cache)
        res[flag] = (out, dx, g)
    (o1, dx1, g1), (o0, dx0, g0) = res[True], res[False]
    tol = TOL[dtype]
    assert o1.dtype == o0.dtype and dx1.dtype == dx0.dtype
    np.testing.assert_allclose(o1, o0, **tol)
    np.testing.assert_allclose(dx1, dx0, **tol)
    for name in ("V", "g", "b"):
        np.testing.assert_allclose(g1[name], g0[name], **tol)


def test_conv2d_kernel_path_finite_differences():
    """The kernel path's dx and dV against central differences (float64)."""
    rng = np.random.default_rng(3)
    layer = Conv2d(6, 3, 3, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 4, 4, 6))
    r = rng.standard_normal((2, 4, 4, 3))
    with kernels_enabled(True):
        out, cache = layer.forward(x)
        dx, g = layer.backward(r, cache)
        h = 1e-6
        for idx in [(0, 0, 0, 0), (1, 3, 2, 5), (0, 2, 3, 1)]:
            xp, xm = x.copy(), x.copy()
            xp[idx] += h
            xm[idx] -= h
            fd = (np.sum(layer.forward(xp)[0] * r) - np.sum(layer.forward(xm)[0] * r)) / (2 * h)
            assert abs(fd - dx[idx]) < 1e-7
        V = layer.params["V"]
        for idx in [(0, 0, 0, 0), (2, 1, 4, 2)]:
            v0 = V[idx]
            V[idx] = v0 + h
            lp = np.sum(layer.forward(x)[0] * r)
            V[idx] = v0 - h
            lm = np.sum(layer.forward(x)[0] * r)
            V[idx] = v0
            assert abs((lp - lm) / (2 * h) - g["V"][idx]) < 1e-7


def test_twin_sdpa_matches_explicit_attention():
    torch = pytest.importorskip("torch")
    from torch_twin import TorchFlowPP

    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.training.loop import build_model
    model = build_model(get_preset("tiny"))
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    out = {}
    for att in ("explicit", "sdpa"):
        twin = TorchFlowPP(model, dtype=torch.float64, attention=att)
        loss = twin.loss(x, rng=np.random.default_rng(1), train=True)
        loss.backward()
        out[att] = (float(loss.detach()), twin.grads_numpy())
    assert abs(out["explicit"][0] - out["sdpa"][0]) < 1e-12
    for k, v in out["explicit"][1].items():
        if v is not None:
            np.testing.assert_allclose(out["sdpa"][1][k], v, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="attention"):
        TorchFlowPP(model, attention="flash")


def test_conv2d_outputs_do_not_alias_the_reused_workspace():
    """The kernel path reuses one scratch buffer per thread: results of earlier calls must survive later calls."""
    rng = np.random.default_rng(4)
    for cin, cout in ((8, 4), (4, 8)):
        layer = Conv2d(cin, cout, 3, rng=rng, dtype=np.float64)
        xs = [rng.standard_normal((2, 5, 4, cin)) for _ in range(2)]
        ds = [rng.standard_normal((2, 5, 4, cout)) for _ in range(2)]
        with kernels_enabled(True):
            first = [layer.forward(xs[0])[0]]
            first += list(layer.backward(ds[0], layer.forward(xs[0])[1]))
            saved = [first[0].copy(), first[1].copy(), {k: v.copy() for k, v in first[2].items()}]
            layer.backward(ds[1], layer.forward(xs[1])[1])        # overwrites the workspace
        np.testing.assert_array_equal(first[0], saved[0])
        np.testing.assert_array_equal(first[1], saved[1])
        for k in saved[2]:
            np.testing.assert_array_equal(first[2][k], saved[2][k])
