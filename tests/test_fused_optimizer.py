"""The fused optimiser step (flowpp_ref/training/fused.py) against the readable recipe it replaces.

Reference chain: ``global_grad_norm_array`` + ``Adam.step(grad_scale=clip_scale(...), apply=ok)`` +
``EMA.update(apply=ok)`` (training/optim.py) == ``fused_step_reference`` (float64) == its numba twin ==
the CPU build of its CUDA twin; then :class:`FusedUpdate` in a model and in ``train``.
"""
import numpy as np
import pytest

from flowpp_ref.kernels import kernels_enabled
from flowpp_ref.kernels.cuda import optimizer as cuda_opt
from flowpp_ref.kernels.numba import optimizer as numba_opt
from flowpp_ref.training.fused import FusedUpdate, fused_step_reference
from flowpp_ref.training.optim import EMA, Adam, Adamax, clip_scale, global_grad_norm_array

from cuda_host import CXX, NO_CXX, build_host_library, call, suffix

SHAPES = {"a.W": (3, 4), "a.b": (4,), "b.g": (2, 2, 3), "c": ()}
KW = dict(b1=0.9, b2=0.99, eps=1e-8, decay=0.9)


def _arrays(seed, dtype, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: np.asarray(scale * rng.normal(size=s), dtype=dtype) for k, s in SHAPES.items()}


def _grad_seq(dtype, n=6):
    """Gradients of n steps: the 2nd is clipped hard (norm ~300), the 4th holds a nan (a skipped step)."""
    out = []
    for i in range(n):
        g = _arrays(100 + i, dtype, scale=100.0 if i == 1 else 0.3)
        if i == 3:
            g["a.b"][1] = np.nan
        out.append(g)
    return out


def _unfused(rule, dtype, grads_seq, lrs, max_norm):
    params = _arrays(0, dtype)
    opt = (Adamax if rule == "adamax" else Adam)(params, beta1=KW["b1"], beta2=KW["b2"], eps=KW["eps"])
    ema = EMA(params, decay=KW["decay"])
    for g, lr in zip(grads_seq, lrs):
        gn = global_grad_norm_array(g)
        ok = np.isfinite(gn) & np.isfinite(np.float64(1.0))
        opt.step(params, g, lr, grad_scale=clip_scale(gn, max_norm), apply=np.asarray(ok))
        ema.update(params, apply=np.asarray(ok))
    return params, opt, ema


def _flat(d):
    return np.concatenate([d[k].reshape(-1) for k in sorted(d)])


def _run_flat(step_fn, rule, dtype, grads_seq, lrs, max_norm):
    """The same steps through one flat-buffer step function; returns flat p, m, v, s, counts, scalars."""
    p = _flat(_arrays(0, dtype))
    m, v, s = np.zeros_like(p), np.zeros_like(p), p.copy()
    cnt = [np.zeros(2, np.int64), np.zeros(2, np.int64)]
    scals = []
    for i, (g, lr) in enumerate(zip(grads_seq, lrs)):
        scal = np.empty(5)
        step_fn(_flat(g), p, m, v, s, np.ones(1, dtype), cnt[i % 2], cnt[1 - i % 2], scal, lr=lr,
                max_norm=max_norm, adamax=rule == "adamax", **KW)
        scals.append(scal)
    return p, m, v, s, cnt[len(grads_seq) % 2], np.array(scals)


LRS = [1e-3, 2e-3, 3e-3, 3e-3, 1e-2, 1e-2]


@pytest.mark.parametrize("rule", ["adam", "adamax"])
def test_reference_equals_clip_adam_and_ema_float64(rule):
    gs = _grad_seq(np.float64)
    params, opt, ema = _unfused(rule, np.float64, gs, LRS, max_norm=1.0)
    p, m, v, s, cnt, scals = _run_flat(fused_step_reference, rule, np.float64, gs, LRS, 1.0)
    for got, want in ((p, params), (m, opt.m), (v, opt.v), (s, ema.shadow)):
        np.testing.assert_allclose(got, _flat(want), rtol=1e-13, atol=1e-15)
    assert list(cnt) == [int(opt.t), int(ema.num_updates)] == [5, 5]          # the nan step was skipped
    assert list(scals[:, 1]) == [1, 1, 1, 0, 1, 1]
    applied = scals[:, 1] == 1
    np.testing.assert_allclose(scals[applied, 2], np.minimum(1.0, 1.0 / scals[applied, 0]), rtol=1e-15)
    assert scals[1, 2] < 0.01 and scals[3, 2] == 0                             # clipped hard; skipped
    np.testing.assert_allclose(scals[[0, 1, 2, 4, 5], 0], [float(global_grad_norm_array(g)) for i, g in
                                                             enumerate(gs) if i != 3], rtol=1e-13)


def _numba_step(g, p, m, v, s, loss, cnt_in, cnt_out, scal, *, lr, max_norm, b1, b2, eps, decay, adamax):
    numba_opt.fused_step(g, p, m, v, s, loss, cnt_in, cnt_out, scal, lr, max_norm, b1, b2, eps, decay, adamax)


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    if CXX is None:
        pytest.skip(NO_CXX)
    return build_host_library(cuda_opt.host_source(), tmp_path_factory.mktemp("cuda_optimizer"), "optimizer")


def _cuda_host_step(lib):
    def step(g, p, m, v, s, loss, cnt_in, cnt_out, scal, *, lr, max_norm, b1, b2, eps, decay, adamax):
        sx, P = suffix(p.dtype), 7                                  # 7 partial sums: strides cross every array
        partial = np.empty(P)
        call(lib, f"sumsq_partial_{sx}", P, np.int64(p.size), g, partial)
        call(lib, f"step_finish_{sx}", 1, np.int64(P), partial, loss, cnt_in, cnt_out, scal, np.float64(lr),
             np.float64(max_norm), np.float64(b1), np.float64(b2))
        call(lib, f"step_update_{sx}", p.size, g, scal, p, m, v, s, np.float64(b1), np.float64(b2),
             np.float64(eps), np.float64(decay), np.int32(adamax))
    return step


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rule", ["adam", "adamax"])
@pytest.mark.parametrize("twin", ["numba", "cuda-host"])
def test_kernel_twins_equal_the_reference(twin, rule, dtype, request):
    fn = _numba_step if twin == "numba" else _cuda_host_step(request.getfixturevalue("host_lib"))
    gs = _grad_seq(dtype)
    want = _run_flat(fused_step_reference, rule, dtype, gs, LRS, 1.0)
    got = _run_flat(fn, rule, dtype, gs, LRS, 1.0)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-7)
    for a, b in zip(got[:4], want[:4]):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **tol)
    np.testing.assert_array_equal(got[4], want[4])
    np.testing.assert_allclose(got[5], want[5], rtol=1e-12 if dtype == np.float64 else 1e-6)


def test_a_wrong_kernel_is_caught():
    """The comparison above fails on a planted error (eps inside the square root)."""
    gs = _grad_seq(np.float64)

    def wrong(g, p, m, v, s, loss, cnt_in, cnt_out, scal, *, eps, **kw):
        fused_step_reference(g, p, m, v, s, loss, cnt_in, cnt_out, scal, eps=eps * 1e4, **kw)
    want = _run_flat(fused_step_reference, "adam", np.float64, gs, LRS, 1.0)
    got = _run_flat(wrong, "adam", np.float64, gs, LRS, 1.0)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)


class _Model:
    """Just the parameter protocol FusedUpdate uses."""

    def __init__(self, params):
        self.params = params
        self.xp = np

    def parameters(self):
        return dict(self.params)

    def load_parameters(self, flat):
        self.params.update(flat)


@pytest.mark.parametrize("kernels", [True, False], ids=["numba", "reference"])
def test_fused_update_drives_the_model_and_keeps_the_state_dicts(kernels):
    gs = _grad_seq(np.float32)
    params, opt, ema = _unfused("adam", np.float32, gs, LRS, max_norm=1.0)
    model = _Model(_arrays(0, np.float32))
    a, e = Adam(model.parameters(), beta1=KW["b1"], beta2=KW["b2"], eps=KW["eps"]), EMA(model.parameters(), KW["decay"])
    fu = FusedUpdate(model, a, e)
    with kernels_enabled(kernels):
        for g, lr in zip(gs, LRS):
            gn, ok = fu.step(g, np.float32(1.0), lr, 1.0)
    assert float(ok) == 1.0
    for k in SHAPES:
        assert np.shares_memory(model.params[k], fu.p)                         # the model reads the flat buffer
        np.testing.assert_allclose(model.params[k], params[k], rtol=3e-6, atol=1e-7)
        np.testing.assert_allclose(a.state_dict()["m"][k], opt.m[k], rtol=3e-6, atol=1e-7)
        np.testing.assert_allclose(e.state_dict()["shadow"][k], ema.shadow[k], rtol=3e-6, atol=1e-7)
    assert a.state_dict()["t"] == e.state_dict()["num_updates"] == 5
    with pytest.raises(KeyError, match="different names"):
        fu.step({"a.W": gs[0]["a.W"]}, np.float32(1.0), 1e-3, 1.0)
    with pytest.raises(ValueError, match="learning rate"):
        fu.step(gs[0], np.float32(1.0), float("nan"), 1.0)


def test_a_nonfinite_loss_skips_the_step():
    model = _Model(_arrays(0, np.float64))
    before = {k: v.copy() for k, v in model.params.items()}
    fu = FusedUpdate(model, Adam(model.parameters()), EMA(model.parameters()))
    gn, ok = fu.step(_arrays(5, np.float64), np.float64(np.inf), 1e-3, 1.0)
    assert float(ok) == 0.0 and np.isfinite(float(gn))
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert int(fu.adam.t) == 0


def test_training_with_the_fused_step_matches_the_unfused_recipe(tmp_path):
    """Three steps of ``train`` (fused) and the same steps by hand with Adam + EMA (unfused)."""
    from flowpp_ref.training import loop
    from flowpp_ref.training.evaluation import use_ema
    x = np.random.default_rng(0).integers(0, 256, size=(32, 4, 4, 3)).astype(np.uint8)
    s = loop.train("tiny", x, out_dir=str(tmp_path / "run"), steps=3, progress=False,
                   overrides={"batch_size": 8, "init_batch_size": 8})
    p = loop._resolve("tiny", {"batch_size": 8, "init_batch_size": 8})
    model = loop.build_model(p)
    tc = p.train
    idx = np.random.default_rng([tc.seed, 99]).permutation(len(x))[:tc.init_batch_size]
    model.data_init(x[idx], rng=loop.step_rng(tc.seed, -1, np))
    params = model.parameters()
    adam, ema = Adam(params, beta2=tc.beta2), EMA(params, decay=tc.ema_decay)
    for step in range(3):
        loss, grads = loop.shard_loss_and_grads(model, x, loop.batch_indices(len(x), 8, tc.seed, step),
                                                seed=tc.seed, step=step, comm=loop.dist.SingleComm())
        gn = global_grad_norm_array(grads)
        adam.step(params, grads, loop.learning_rate(step + 1, tc), grad_scale=clip_scale(gn, tc.grad_clip))
        ema.update(params)
    got = s["model"].parameters()
    for k, v in params.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    with use_ema(s["model"], s["ema"]):
        pass
    assert all(np.shares_memory(a, b) for a, b in zip(s["model"].parameters().values(), got.values()))
