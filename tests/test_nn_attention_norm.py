"""LayerNorm and multi-head SelfAttention: gradchecks (float64), kernels vs references,
layout checks against a naive per-head loop, and PyTorch autograd twins (float64)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowpp_ref.core.gradcheck import gradcheck, rel_error
from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.nn.attention import (SelfAttention, softmax_backward_inplace, softmax_backward_ref, softmax_inplace,
                                     softmax_ref)
from flowpp_ref.nn.layernorm import (LayerNorm, layernorm_backward, layernorm_backward_ref, layernorm_forward,
                                     layernorm_forward_ref)
from flowpp_ref.core.validation import FlowInputError

GRAD_TOL = 1e-6


def _perturb_params(module, rng, scale=0.3):
    """Move parameters off their init values (g = 1, b = 0 hide mistakes)."""
    for v in module.parameters().values():
        v[...] = v + scale * rng.standard_normal(v.shape)


# ===================================================================== LayerNorm
@given(lead=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
       channels=st.integers(3, 6), seed=st.integers(0, 2**31 - 1))
def test_layernorm_gradcheck_float64(lead, channels, seed):
    # C >= 3: with C = 1 or 2, xhat = 0 or +-1 (up to eps) whatever x, so dx ~ 0 is all round-off
    shape = (*lead, channels)
    rng = np.random.default_rng(seed)
    ln = LayerNorm(shape[-1], dtype=np.float64)
    _perturb_params(ln, rng)
    x = rng.standard_normal(shape) * 2 + 0.5
    w = rng.standard_normal(shape)
    out, cache = ln.forward(x)
    dx, grads = ln.backward(w, cache)

    def f():
        return float((ln.forward(x)[0] * w).sum())
    gradcheck(f, {"x": x, **ln.parameters()}, {"x": dx, **grads}, tol=GRAD_TOL)


def test_layernorm_output_statistics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 16)) * 7 - 3
    out, _ = LayerNorm(16, dtype=np.float64).forward(x)
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(-1), 1 / (1 + 1e-5 / x.var(-1)), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
       seed=st.integers(0, 2**31 - 1))
def test_layernorm_kernel_matches_reference(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    if x.shape[-1] > 1:
        x[..., :1] = x[..., 1:2]          # a few equal entries
    g = rng.standard_normal(shape[-1]).astype(dtype)
    b = rng.standard_normal(shape[-1]).astype(dtype)
    d = rng.standard_normal(shape).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    with kernels_enabled(True):
        fk = layernorm_forward(x, g, b)
        bk = layernorm_backward(d, fk[1], fk[2], g)
    fr = layernorm_forward_ref(x, g, b)
    br = layernorm_backward_ref(d, fr[1], fr[2], g)
    for name, a, r in zip(["out", "xhat", "rstd", "dx", "dg", "db"], fk + bk, fr + br):
        assert a.dtype == dtype and a.shape == r.shape, name
        scale = max(1.0, float(np.abs(r).max()))
        assert float(np.abs(a.astype(np.float64) - r).max()) <= tol * scale, name


def test_layernorm_constant_rows_are_finite():
    x = np.full((2, 3, 8), 4.0)
    out, cache = LayerNorm(8, dtype=np.float64).forward(x)
    dx, _ = LayerNorm(8, dtype=np.float64).backward(np.ones_like(x), cache)
    assert np.all(out == 0) and np.all(np.isfinite(dx))


def test_layernorm_rejects_wrong_channels():
    with pytest.raises(FlowInputError, match="last axis of size 8"):
        LayerNorm(8).forward(np.zeros((2, 4, 4, 6), np.float32))


# ===================================================================== softmax
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_kernels_match_reference(dtype):
    rng = np.random.default_rng(3)
    s = (rng.standard_normal((2, 3, 7, 9)) * 30).astype(dtype)   # large logits: needs the max shift
    s[0, 0, 0] = 1e4
    dw = rng.standard_normal(s.shape).astype(dtype)
    with kernels_enabled(True):
        wk = softmax_inplace(s.copy())
        dk = softmax_backward_inplace(wk, dw.copy())
    wr = softmax_ref(s.copy())
    dr = softmax_backward_ref(wr, dw.copy())
    tol = 1e-13 if dtype == np.float64 else 1e-6
    assert np.all(np.isfinite(wk))
    np.testing.assert_allclose(wk.sum(-1), 1, atol=10 * tol)
    assert rel_error(wk, wr) < tol and rel_error(dk, dr) < 10 * tol


# ===================================================================== attention
def _attention(F=8, heads=4, p=0.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    att = SelfAttention(F, heads, dropout_p=p, rng=rng, dtype=dtype)
    _perturb_params(att, rng)
    return att, rng


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("hw", [(2, 3), (3, 3)])
def test_attention_gradcheck_float64(p, hw):
    att, rng = _attention(p=p, seed=hw[0])
    B, (H, W), F = 2, hw, 8
    x = rng.standard_normal((B, H, W, F))
    pos = 0.5 * rng.standard_normal((H, W, F))
    w = rng.standard_normal(x.shape)

    def run():   # the same dropout mask on every call: a fresh generator with a fixed seed
        return att.forward(x, pos, train=True, rng=np.random.default_rng(11))

    out, cache = run()
    if p > 0:
        assert cache["dropout"] is not None and not cache["dropout"].all()
    dx, dpos, grads = att.backward(w, cache)
    assert set(grads) == set(att.parameters())
    gradcheck(lambda: float((run()[0] * w).sum()), {"x": x, "pos_emb": pos, **att.parameters()},
              {"x": dx, "pos_emb": dpos, **grads}, tol=GRAD_TOL)


def _naive_attention(att, x, pos):
    """Per-(batch, head) loop with explicit channel slices: q of head i = channels [i*d, (i+1)*d)
    of the first F outputs of proj1, k of the next F, v of the last F (the paper's reshape
    [B, T, 3, h, d])."""
    from flowpp_ref.nn.activations import gate_reference
    B, H, W, F = x.shape
    h, d, T = att.heads, att.dim, H * W
    qkv = att.proj1.forward(x + pos[None])[0].reshape(B, T, 3 * F)
    a = np.zeros((B, T, F))
    for b in range(B):
        for i in range(h):
            q = qkv[b, :, i * d:(i + 1) * d]
            k = qkv[b, :, F + i * d:F + (i + 1) * d]
            v = qkv[b, :, 2 * F + i * d:2 * F + (i + 1) * d]
            s = q @ k.T / math.sqrt(d)
            e = np.exp(s - s.max(1, keepdims=True))
            a[b, :, i * d:(i + 1) * d] = (e / e.sum(1, keepdims=True)) @ v
    c2 = att.proj2.forward(a.reshape(B, H, W, F))[0]
    return x + gate_reference(c2)


def test_attention_matches_naive_per_head_loop():
    att, rng = _attention(F=12, heads=4, seed=2)
    x = rng.standard_normal((2, 3, 4, 12))
    pos = rng.standard_normal((3, 4, 12))
    out, cache = att.forward(x, pos)
    np.testing.assert_allclose(out, _naive_attention(att, x, pos), rtol=1e-12, atol=1e-12)
    w = att.attention_maps(x, pos)
    assert w.shape == (2, 4, 12, 12)
    np.testing.assert_allclose(w.sum(-1), 1, atol=1e-12)


def test_attention_permutation_equivariant_without_pos_emb():
    att, rng = _attention(F=8, heads=2, seed=4)
    x = rng.standard_normal((2, 3, 3, 8))
    zero = np.zeros((3, 3, 8))
    perm = rng.permutation(9)
    xp_ = x.reshape(2, 9, 8)[:, perm].reshape(x.shape)
    out = att.forward(x, zero)[0].reshape(2, 9, 8)[:, perm]
    np.testing.assert_allclose(att.forward(xp_, zero)[0].reshape(2, 9, 8), out, rtol=1e-10, atol=1e-12)


def test_attention_kernels_match_reference():
    att, rng = _attention(F=8, seed=5, dtype=np.float32)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    pos = rng.standard_normal((4, 4, 8)).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    res = {}
    for flag in (True, False):
        with kernels_enabled(flag):
            out, cache = att.forward(x, pos)
            res[flag] = (out, *att.backward(w, cache)[:2], att.backward(w, cache)[2])
    for a, b in zip(res[True][:3], res[False][:3]):
        assert rel_error(a, b) < 1e-5
    for k in res[True][3]:
        assert rel_error(res[True][3][k], res[False][3][k]) < 1e-5, k


def test_attention_eval_mode_ignores_dropout():
    att, rng = _attention(p=0.5, seed=6)
    x = rng.standard_normal((2, 2, 2, 8))
    pos = rng.standard_normal((2, 2, 8))
    o1, c1 = att.forward(x, pos, train=False, rng=np.random.default_rng(1))
    o2, _ = att.forward(x, pos, train=False, rng=np.random.default_rng(2))
    assert c1["dropout"] is None and np.array_equal(o1, o2)


def test_attention_data_init_sets_output_scale():
    rng = np.random.default_rng(7)
    att = SelfAttention(8, 4, rng=rng, dtype=np.float64)     # fresh: b = 0 before the DDI
    x = rng.standard_normal((8, 4, 4, 8))
    pos = 0.01 * rng.standard_normal((4, 4, 8))
    out = att.data_init(x, pos)
    np.testing.assert_allclose(out, att.forward(x, pos)[0], rtol=1e-12)
    # proj2 output (pre-gate) has per-unit std init_scale = 0.1 on the init batch
    c2 = att.forward(x, pos)[1]["gate"]
    np.testing.assert_allclose(c2.reshape(-1, 16).std(0), 0.1, rtol=1e-6)
    np.testing.assert_allclose(c2.reshape(-1, 16).mean(0), 0, atol=1e-9)


def test_attention_rejects_bad_shapes():
    att, _ = _attention()
    with pytest.raises(FlowInputError, match="pos_emb"):
        att.forward(np.zeros((1, 2, 2, 8)), np.zeros((2, 3, 8)))
    with pytest.raises(FlowInputError, match="channels"):
        att.forward(np.zeros((1, 2, 2, 4)), np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="multiple of heads"):
        SelfAttention(10, 4, rng=np.random.default_rng(0))


# ===================================================================== PyTorch twins
def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the autograd oracle of the cross-checks")


def torch_layernorm(x, g, b, eps=1e-5):
    """The paper's _norm, written out (not torch.nn.functional.layer_norm)."""
    u = x.mean(-1, keepdim=True)
    s = ((x - u) ** 2).mean(-1, keepdim=True)
    return (x - u) / (s + eps).sqrt() * g + b


def torch_nin(x, V, g, b):
    return x @ (g * V / V.norm(dim=0)) + b


def torch_gate(h):
    import torch
    C = h.shape[-1] // 2
    return h[..., :C] * torch.sigmoid(h[..., C:])


def torch_attention(x, pos, p, heads, mask=None, drop_p=0.0):
    """Functional twin of SelfAttention; p: dict of parameter tensors (our dotted names)."""
    import torch
    B, H, W, F = x.shape
    T, d = H * W, F // heads
    c = torch_nin(x + pos[None], p["proj1.V"], p["proj1.g"], p["proj1.b"])
    c = c.reshape(B, T, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = c[0], c[1], c[2]
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    a = (w @ v).permute(0, 2, 1, 3).reshape(B, H, W, F)
    if mask is not None:
        a = a * mask / (1 - drop_p)
    return x + torch_gate(torch_nin(a, p["proj2.V"], p["proj2.g"], p["proj2.b"]))


@pytest.mark.torch
def test_layernorm_matches_torch():
    torch = _torch()
    rng = np.random.default_rng(8)
    ln = LayerNorm(12, dtype=np.float64)
    _perturb_params(ln, rng)
    x = rng.standard_normal((3, 4, 5, 12)) * 2 + 1
    w = rng.standard_normal(x.shape)
    out, cache = ln.forward(x)
    dx, grads = ln.backward(w, cache)
    tx = torch.tensor(x, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in ln.parameters().items()}
    tout = torch_layernorm(tx, tp["g"], tp["b"])
    (tout * torch.tensor(w)).sum().backward()
    assert rel_error(out, tout.detach().numpy()) < 1e-12
    assert rel_error(dx, tx.grad.numpy()) < 1e-5
    for k in tp:
        assert rel_error(grads[k], tp[k].grad.numpy()) < 1e-5, k


@pytest.mark.torch
@pytest.mark.parametrize("drop_p", [0.0, 0.3])
def test_attention_matches_torch(drop_p):
    torch = _torch()
    att, rng = _attention(F=16, heads=4, p=drop_p, seed=9)
    x = rng.standard_normal((2, 4, 4, 16))
    pos = rng.standard_normal((4, 4, 16))
    w = rng.standard_normal(x.shape)
    out, cache = att.forward(x, pos, train=True, rng=np.random.default_rng(3))
    dx, dpos, grads = att.backward(w, cache)
    tx = torch.tensor(x, requires_grad=True)
    tpos = torch.tensor(pos, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in att.parameters().items()}
    mask = None if cache["dropout"] is None else torch.tensor(cache["dropout"].astype(np.float64))
    tout = torch_attention(tx, tpos, tp, 4, mask, drop_p)
    (tout * torch.tensor(w)).sum().backward()
    assert rel_error(out, tout.detach().numpy()) < 1e-12
    errs = {"x": rel_error(dx, tx.grad.numpy()), "pos_emb": rel_error(dpos, tpos.grad.numpy())}
    errs.update({k: rel_error(grads[k], tp[k].grad.numpy()) for k in tp})
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-5, f"{worst}: rel. error {errs[worst]:.2e} vs torch; all: {errs}"


# ------------------------------------------------------- vectorised float32 exp
def test_fast_exp_and_expm1_float32_accuracy_and_edges():
    """fast_exp / fast_expm1 as the softmax and activation kernels call them: float32 exp within
    2.5e-7 relative on [-87, 88], expm1 within 3e-7 (the Taylor branch near 0 included),
    subnormal results, 0, inf and nan as libm gives them; float64 to 1e-15 of libm."""
    import numba

    from flowpp_ref.kernels.numba.fastexp import fast_exp, fast_expm1

    @numba.njit
    def run(x):
        e = np.empty_like(x)
        m = np.empty_like(x)
        for i in range(x.size):
            e[i] = fast_exp(x[i])
            m[i] = fast_expm1(x[i])
        return e, m

    x = np.concatenate([np.linspace(-87, 88, 400_001), np.linspace(-0.6, 0.6, 100_001),
                        [-1e-30, -1e-7, 0.0, 1e-7, 0.5, -0.5]]).astype(np.float32)
    e, m = run(x)
    assert e.dtype == np.float32 and m.dtype == np.float32
    x64 = x.astype(np.float64)
    assert np.max(np.abs(e - np.exp(x64)) / np.exp(x64)) < 2.5e-7
    ref = np.expm1(x64)
    nz = ref != 0
    assert np.max(np.abs(m[nz] - ref[nz]) / np.abs(ref[nz])) < 3e-7
    assert (~nz).any() and not np.any(m[~nz])
    # the edges as libm: subnormal results, underflow to 0, overflow to inf, nan
    sub = np.linspace(-103.9, -87.5, 20001).astype(np.float32)
    with np.errstate(under="ignore"):
        ref_sub = np.exp(sub.astype(np.float64)).astype(np.float32)
    tiny = np.float32(2.0 ** -149)                                      # the smallest subnormal
    assert np.max(np.abs(run(sub)[0] - ref_sub)) <= 2 * tiny
    special = np.array([-np.inf, -200.0, -104.5, 88.5, 88.72, 89.0, 200.0, np.inf, np.nan], np.float32)
    with np.errstate(over="ignore", under="ignore"):
        ref_sp = np.exp(special.astype(np.float64)).astype(np.float32)
        ref_m1 = np.expm1(special.astype(np.float64)).astype(np.float32)
    e_sp, m_sp = run(special)
    np.testing.assert_allclose(e_sp, ref_sp, rtol=3e-7, atol=0)
    np.testing.assert_allclose(m_sp, ref_m1, rtol=3e-7, atol=0)
    # float64: the degree-13 polynomial (exp) and libm (expm1)
    x = np.linspace(-700, 700, 1001)
    e64, m64 = run(x)
    np.testing.assert_allclose(e64, np.exp(x), rtol=1e-15)
    np.testing.assert_allclose(m64, np.expm1(x), rtol=1e-15)
