"""flowpp_ref's device path on the strict CuPy look-alike (``strict_xp``, tests/strict_cupy.py): no GPU needed.

1. every bijection class of ``flowpp_ref.bijections``: forward, inverse, log-det and backward on the
   look-alike equal NumPy's (float64, rtol 1e-10); the forward and backward make no host read (ImgProc's
   checked forward one), the inverse at most one;
2. a training step of ``tiny`` and ``small`` (loss and gradients of a shard, gradient norm, Adam, EMA) makes no host
   round trip at all (run inside ``ledger.strict()``); the launches per part are printed and recorded;
3. ``train(backend="cupy")`` end to end, and a resumed run's losses equal an uninterrupted run's;
4. sampling makes at most one host read per coupling layer, plus two: the finiteness check of
   ImgProc's inverse (the last layer of the inverse flow) and the host copy of the images; evaluation
   (bits/dim, k = 1) at most the couplings plus one (the host copy of the ELBO of its one pass);
and the look-alike itself: only names the real CuPy has, and its launch checks reject bad launches.

The CUDA kernels run as the host build of their source (kernels switched on by the fixture), so every
RawModule launch of these tests is checked against its C signature.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import sys
from typing import Callable

import numpy as np
import pytest

import flowpp_ref.bijections as bij
import flowpp_ref.bijections.mixlogistic as ml
import flowpp_ref.core.backend as backend
import flowpp_ref.kernels as kernels
from flowpp_ref.bijections.base import Bijection
from flowpp_ref.bijections.coupling import AffineAttnCoupling, MixLogisticAttnCoupling
from flowpp_ref.bijections.coupling_transforms import affine_coupling_inverse, mixlogistic_coupling_inverse
from flowpp_ref.bijections.masked_coupling import MaskedAffineCoupling
from flowpp_ref.core.backend import make_rng
from flowpp_ref.core.validation import FlowInputError
from flowpp_ref.kernels.cuda import build
from flowpp_ref.model import FlowPP
from flowpp_ref.model.presets import get_preset
from flowpp_ref.nn.weightnorm import Conv2d
from flowpp_ref.runtime.distributed import SingleComm
from flowpp_ref.training.loop import batch_indices, build_model, shard_loss_and_grads, train
from flowpp_ref.training.optim import EMA, Adam, clip_scale, global_grad_norm_array

import strict_cupy

RTOL = 1e-10
COUPLINGS = (MixLogisticAttnCoupling, AffineAttnCoupling, MaskedAffineCoupling)


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.uint8)


def _map(f, s):
    """f applied to every array of a nested tuple/list/dict (None stays None)."""
    if s is None:
        return None
    if isinstance(s, tuple):
        return tuple(_map(f, v) for v in s)
    if isinstance(s, list):
        return [_map(f, v) for v in s]
    if isinstance(s, dict):
        return {k: _map(f, v) for k, v in s.items()}
    return f(s)


def _assert_same(dev, host, cp, what):
    """The device structure ``dev`` holds device arrays equal to the host structure ``host`` (rtol 1e-10)."""
    if host is None:
        assert dev is None, f"{what}: None on NumPy, {type(dev).__name__} on the device"
        return
    if isinstance(host, (tuple, list)):
        assert isinstance(dev, type(host)) and len(dev) == len(host), f"{what}: structure differs"
        for i, (d, h) in enumerate(zip(dev, host)):
            _assert_same(d, h, cp, f"{what}[{i}]")
        return
    if isinstance(host, dict):
        assert sorted(dev) == sorted(host), f"{what}: keys differ: {sorted(dev)} vs {sorted(host)}"
        for k in host:
            _assert_same(dev[k], host[k], cp, f"{what}[{k!r}]")
        return
    assert isinstance(dev, cp.ndarray), f"{what}: a {type(dev).__name__} on the device path, not a device array"
    d = cp.asnumpy(dev)
    assert d.shape == host.shape and d.dtype == host.dtype, f"{what}: {d.shape} {d.dtype} vs {host.shape} {host.dtype}"
    scale = max(1.0, float(np.max(np.abs(host)))) if host.size else 1.0
    np.testing.assert_allclose(d, host, rtol=RTOL, atol=RTOL * scale, err_msg=what)


# ====================================================================== 1. every bijection
@dataclasses.dataclass
class Case:
    make: Callable                       # (xp, host rng) -> bijection (float64)
    x: Callable                          # host rng -> the forward's input (array or tuple)
    context: Callable = lambda rng: None
    train_modes: tuple = (False,)
    inverse_kw: Callable = lambda cache: {}   # keyword arguments of inverse from the forward's cache
    forward_syncs: int = 0               # host reads allowed in forward + backward
    inverse_syncs: int = 1               # ... and in inverse (its value checks, read together)


def _real(*shape):
    return lambda rng: rng.standard_normal((2, *shape))


def _pair(a, b):
    return lambda rng: (rng.standard_normal((2, *a)), rng.standard_normal((2, *b)))


_F64 = dict(dtype=np.float64)
CASES = {
    "ImgProc": Case(lambda xp, r: bij.ImgProc(), lambda rng: rng.uniform(1, 255, (2, 4, 4, 3)), forward_syncs=1),
    "Sigmoid": Case(lambda xp, r: bij.Sigmoid(), _real(4, 4, 3)),
    "Normalize": Case(lambda xp, r: bij.Normalize((4, 4, 3), xp=xp, **_F64), _real(4, 4, 3)),
    "Pointwise": Case(lambda xp, r: bij.Pointwise(3, rng=r, noisy_identity_init=0.3, xp=xp, **_F64), _real(4, 4, 3)),
    "InvConv1x1": Case(lambda xp, r: bij.InvConv1x1(3, rng=r, xp=xp, **_F64), _real(4, 4, 3)),
    "InvConv1x1LU": Case(lambda xp, r: bij.InvConv1x1LU(3, rng=r, xp=xp, **_F64), _real(4, 4, 3)),
    "ChannelActNorm": Case(lambda xp, r: bij.ChannelActNorm(3, xp=xp, **_F64), _real(4, 4, 3)),
    "LearnedTopPrior": Case(lambda xp, r: bij.LearnedTopPrior(3, xp=xp, **_F64), _real(4, 4, 3)),
    "BatchNormFlow": Case(lambda xp, r: bij.BatchNormFlow(3, xp=xp, **_F64), _real(4, 4, 3), train_modes=(False, True)),
    "FactorOut": Case(lambda xp, r: bij.FactorOut(4, rng=r, xp=xp, **_F64), _real(4, 4, 4),
                      inverse_kw=lambda cache: dict(z2=cache["z2"])),
    "Rescale": Case(lambda xp, r: bij.Rescale(2.0, offset=-0.5), _real(4, 4, 3)),
    "CheckerboardSplit": Case(lambda xp, r: bij.CheckerboardSplit(1), _real(4, 4, 3)),
    "ChannelSplit": Case(lambda xp, r: bij.ChannelSplit(), _real(4, 4, 4)),
    "TupleFlip": Case(lambda xp, r: bij.TupleFlip(), _pair((4, 4, 3), (4, 4, 4))),
    "SpaceToDepth": Case(lambda xp, r: bij.SpaceToDepth(), _real(4, 4, 3)),
    "Compose": Case(lambda xp, r: bij.Compose([bij.Normalize((4, 4, 3), xp=xp, **_F64),
                                               bij.Pointwise(3, rng=r, noisy_identity_init=0.3, xp=xp, **_F64),
                                               bij.CheckerboardSplit(0)]), _real(4, 4, 3)),
    "Inverse": Case(lambda xp, r: bij.Inverse(bij.ChannelActNorm(3, xp=xp, **_F64)), _real(4, 4, 3)),
    "MaskedAffineCoupling": Case(
        lambda xp, r: MaskedAffineCoupling((4, 4, 2), Conv2d(2, 4, 3, rng=r, xp=xp, **_F64), "checkerboard", 1,
                                           "realnvp", xp=xp, **_F64), _real(4, 4, 2),
        inverse_syncs=2),               # masked_coupling.py checks its input apart from affine_coupling_inverse
    "MixLogisticAttnCoupling": Case(
        lambda xp, r: MixLogisticAttnCoupling((4, 4, 2), 8, 1, 3, context_channels=3, rng=r, xp=xp, **_F64),
        _pair((4, 4, 2), (4, 4, 2)), context=_real(4, 4, 3)),
    "AffineAttnCoupling": Case(
        lambda xp, r: AffineAttnCoupling((4, 4, 2), 8, 1, context_channels=3, rng=r, xp=xp, **_F64),
        _pair((4, 4, 2), (4, 4, 2)), context=_real(4, 4, 3)),
}


def _bijection_classes():
    """Public Bijection subclasses of flowpp_ref.bijections and of every module of the package."""
    found = {n: c for n, c in vars(bij).items() if inspect.isclass(c) and issubclass(c, Bijection)}
    for info in pkgutil.walk_packages(bij.__path__, "flowpp_ref.bijections."):
        mod = importlib.import_module(info.name)
        found.update({n: c for n, c in vars(mod).items()
                      if inspect.isclass(c) and issubclass(c, Bijection) and c.__module__ == info.name})
    return sorted(n for n, c in found.items() if c is not Bijection and not n.startswith("_"))


def _perturb(b, rng):
    """Every parameter moved off its init (variances stay positive)."""
    for k, v in b.parameters().items():
        n = rng.standard_normal(v.shape)
        b._set(k, v * np.exp(0.2 * n) if "var" in k else v + 0.15 * n)


@pytest.mark.parametrize("name", _bijection_classes())
def test_bijection_on_device_matches_numpy_float64(name, strict_xp):
    cp, ledger = strict_xp, strict_xp.ledger
    if name not in CASES:
        pytest.fail(f"{name} is a bijection of flowpp_ref.bijections without a constructor here: add it to CASES")
    case = CASES[name]
    host, dev = case.make(np, np.random.default_rng(0)), case.make(cp, np.random.default_rng(0))
    assert type(host).__name__ == name
    rng = np.random.default_rng(1)
    _perturb(host, rng)
    dev.load_parameters({k: cp.asarray(v) for k, v in host.parameters().items()})
    to_dev = lambda s: _map(cp.asarray, s)        # noqa: E731
    x, ctx = case.x(rng), case.context(rng)
    for train_mode in case.train_modes:
        y, ld, cache = host.forward(x, ctx, train=train_mode)
        dy, dld = _map(lambda a: rng.standard_normal(a.shape), y), rng.standard_normal(ld.shape)
        want = host.backward(dy, dld, cache)
        xd, ctxd, dyd, dldd = to_dev(x), to_dev(ctx), to_dev(dy), to_dev(dld)
        ledger.reset()
        yd, ldd, cached = dev.forward(xd, ctxd, train=train_mode)
        got = dev.backward(dyd, dldd, cached)
        assert ledger.n_syncs <= case.forward_syncs, f"{name}: forward + backward read the host:\n{ledger.report()}"
        _assert_same((yd, ldd), (y, ld), cp, f"{name}.forward(train={train_mode})")
        _assert_same(got, want, cp, f"{name}.backward(train={train_mode})")
    xi, ldi = host.inverse(y, ctx, **case.inverse_kw(cache))
    yd, ctxd = to_dev(y), to_dev(ctx)
    ledger.reset()
    xid, ldid = dev.inverse(yd, ctxd, **case.inverse_kw(cached))
    assert ledger.n_syncs <= case.inverse_syncs, f"{name}: inverse reads the host:\n{ledger.report()}"
    _assert_same((xid, ldid), (xi, ldi), cp, f"{name}.inverse")


# ====================================================================== 2. a training step
@pytest.mark.parametrize("preset,batch,attention", [
    ("tiny", 4, "fused"), ("tiny", 4, "default"),
    pytest.param("small", 2, "fused", marks=pytest.mark.slow), pytest.param("small", 2, "default", marks=pytest.mark.slow)])
def test_training_step_makes_no_host_round_trip(preset, batch, attention, strict_xp, record_property):
    """``attention``: the device default (plain matmuls) or the fused CUDA kernels (their launches checked)."""
    from flowpp_ref.nn.attention import SelfAttention
    cp, ledger = strict_xp, strict_xp.ledger
    p = get_preset(preset)
    x = _images(16, p.model.image_shape)
    model = FlowPP(p.model, seed=0, xp=cp, dtype=np.float32)
    attn = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert attn and not any(m.fused for m in attn)          # the device default
    for m in attn:
        m.fused = attention == "fused"
    model.data_init(x[:8], rng=make_rng(1, cp))
    params = model.parameters()
    adam, ema = Adam(params), EMA(params, decay=0.9)
    before = {k: cp.asnumpy(v) for k, v in params.items()}
    for step in range(2):
        ledger.reset()
        marks = []
        with ledger.strict():
            loss, grads = shard_loss_and_grads(model, x, batch_indices(len(x), batch, 0, step), seed=0, step=step,
                                               comm=SingleComm())
            marks.append(ledger.n_launches)
            gn = global_grad_norm_array(grads)
            ok = cp.isfinite(loss) & cp.isfinite(gn)
            marks.append(ledger.n_launches)
            adam.step(params, grads, 1e-3, grad_scale=clip_scale(gn, 1.0), apply=ok)
            marks.append(ledger.n_launches)
            ema.update(params, apply=ok)
            marks.append(ledger.n_launches)
        assert ledger.n_syncs == 0, ledger.report()
    parts = dict(zip(("loss+grads", "grad norm", "Adam", "EMA"), np.diff([0] + marks).tolist()))
    kernels = {k: n for k, n in ledger.launches.items() if k.startswith("kernel:")}
    assert any(k.startswith("kernel:mixlog_forward") for k in kernels), "the CUDA mixture kernels did not run"
    assert any(k.startswith("kernel:attention_fwd") for k in kernels) == (attention == "fused"), kernels
    assert np.isfinite(float(loss)) and bool(ok)
    assert any(not np.array_equal(cp.asnumpy(params[k]), before[k]) for k in params)
    print(f"{preset} training step ({len(params)} parameter arrays), launches per part: {parts}; syncs 0; "
          f"RawModule launches {sum(kernels.values())}")
    for k, n in parts.items():
        record_property(f"launches {k}", n)


# ====================================================================== 3. training end to end, resumed
def test_train_on_device_resumes_exactly(strict_xp, tmp_path):
    x = _images(48, (4, 4, 3))
    quiet = dict(progress=False, backend="cupy", report=lambda msg: None)
    full = train("tiny", x, out_dir=str(tmp_path / "full"), steps=6, **quiet)
    first = train("tiny", x, out_dir=str(tmp_path / "resumed"), steps=4, **quiet)
    resumed = train("tiny", x, out_dir=str(tmp_path / "resumed"), steps=6, **quiet)
    assert full["backend"] == "cupy" and full["steps_run"] == 6
    assert [h["train_bpd"] for h in first["history"]] == [h["train_bpd"] for h in full["history"]][:4]
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    assert [h["train_bpd"] for h in resumed["history"]] == [h["train_bpd"] for h in full["history"]][4:]
    assert all(np.isfinite(h["train_bpd"]) for h in full["history"])


# ====================================================================== 4. sampling and evaluation
def _couplings(model):
    return sum(isinstance(m, COUPLINGS) for m in model.flow.modules())


SAMPLE_EXTRA = 2    # ImgProc.inverse's finiteness check (after the last coupling), the images' host copy
EVAL_EXTRA = 1      # the host copy of the ELBO of the (one) pass


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}), ("tiny", {"inverse_method": "bisection"}), ("tiny", {"coupling": "affine"}), ("small", {}),
    ("realnvp-small", {})],
    ids=["tiny", "tiny-bisection", "tiny-affine", "small", "realnvp-small"])
def test_sampling_and_evaluation_read_the_host_once_per_coupling(preset, overrides, strict_xp, record_property):
    cp, ledger = strict_xp, strict_xp.ledger
    p = get_preset(preset, **overrides)
    model = build_model(p, backend="cupy")                   # FlowPP, or the lineage's RealNVP / Glow
    model.data_init(_images(4, p.model.image_shape, 1), rng=make_rng(1, cp))
    couplings = _couplings(model)
    assert couplings > 0
    ledger.reset()
    imgs = model.sample(3, rng=make_rng(2, cp))
    sample_syncs = ledger.n_syncs
    assert isinstance(imgs, np.ndarray) and imgs.dtype == np.uint8 and imgs.shape == (3, *p.model.image_shape)
    assert sample_syncs <= couplings + SAMPLE_EXTRA, f"{couplings} couplings\n{ledger.report()}"
    ledger.reset()
    bpd = model.bits_per_dim(_images(3, p.model.image_shape, 2), rng=make_rng(3, cp))
    eval_syncs = ledger.n_syncs
    assert bpd.shape == (3,) and np.all(np.isfinite(bpd))
    assert eval_syncs <= couplings + EVAL_EXTRA, f"{couplings} couplings\n{ledger.report()}"
    print(f"{preset} {overrides}: {couplings} couplings; sampling {sample_syncs} syncs, "
          f"evaluation {eval_syncs} syncs")
    record_property("couplings", couplings)
    record_property("sampling syncs", sample_syncs)
    record_property("evaluation syncs", eval_syncs)


def test_sampling_on_device_matches_numpy_float64(strict_xp):
    """The inverse flow of the device (CUDA hybrid inverse) equals NumPy's (numba) on the same latents."""
    cp = strict_xp
    p = get_preset("tiny")
    host = FlowPP(p.model, seed=0, xp=np, dtype=np.float64)
    dev = FlowPP(p.model, seed=0, xp=cp, dtype=np.float64)
    host.data_init(_images(4, p.model.image_shape, 1), rng=np.random.default_rng(1))
    dev.load_parameters({k: cp.asarray(v) for k, v in host.parameters().items()})
    z = np.random.default_rng(2).standard_normal((3, *host.latent_shape))
    y = host.flow.sample_inverse(z, None)
    yd = dev.flow.sample_inverse(cp.asarray(z), None)
    np.testing.assert_allclose(cp.asnumpy(yd), y, rtol=0, atol=1e-8)


def _mixture(rng, shape=(2, 3, 4), K=3):
    e = rng.standard_normal(shape)
    a, b = 0.5 * rng.standard_normal(shape), rng.standard_normal(shape)
    logits, means = 1.5 * rng.standard_normal(shape + (K,)), 2 * rng.standard_normal(shape + (K,))
    return e, a, b, logits, means, rng.uniform(-2, 1, shape + (K,))


@pytest.mark.parametrize("max_iters", [None, 2])
@pytest.mark.parametrize("method", ["hybrid", "bisection"])
def test_mixture_inverse_reads_the_host_once_and_its_info_when_asked(method, max_iters, strict_xp):
    cp, ledger = strict_xp, strict_xp.ledger
    _, _, _, logits, means, logscales = _mixture(np.random.default_rng(3))
    y = np.random.default_rng(4).uniform(1e-5, 1 - 1e-5, logits.shape[:-1])
    with kernels.kernels_enabled(False):                      # the plain-array reference on NumPy
        want, want_info = ml.mixlogistic_invcdf(y, logits, means, logscales, method=method, max_iters=max_iters)
    ledger.reset()
    x, info = ml.mixlogistic_invcdf(*(cp.asarray(v) for v in (y, logits, means, logscales)), method=method,
                                    max_iters=max_iters)
    assert ledger.n_syncs == 1, ledger.report()               # the value checks (+ bisection's iteration bound)
    assert info["method"] == method and info["tol"] == want_info["tol"] and ledger.n_syncs == 1
    assert info["converged"] is (max_iters is None) and ledger.n_syncs == 2   # the counts: one read, when asked
    assert json.loads(json.dumps(info)) == dict(info) and ledger.n_syncs == 2
    assert set(info) == set(want_info)
    assert all(type(info[k]) is type(want_info[k]) for k in want_info)
    if method == "bisection":                                 # the release's global rule, kept on the device
        assert info == want_info
        np.testing.assert_array_equal(cp.asnumpy(x), want)
    elif max_iters is None:
        np.testing.assert_allclose(cp.asnumpy(x), want, rtol=0, atol=1e-9)
    else:
        assert info["max_evals"] <= max_iters


def _bad(name, value):
    def make(rng):
        e, a, b, logits, means, logscales = _mixture(rng)
        arrays = dict(y=e, a=a, b=b, logits=logits, means=means, logscales=logscales)
        arrays[name] = arrays[name].copy()
        arrays[name].flat[1] = value
        return arrays
    return make


ERROR_CASES = {
    "nan-y": (lambda a: mixlogistic_coupling_inverse(**a), _bad("y", np.nan)),
    "inf-a": (lambda a: mixlogistic_coupling_inverse(**a), _bad("a", np.inf)),
    "nan-b": (lambda a: mixlogistic_coupling_inverse(**a, method="bisection"), _bad("b", np.nan)),
    "nan-logscales": (lambda a: mixlogistic_coupling_inverse(**a), _bad("logscales", np.nan)),
    "inf-means": (lambda a: mixlogistic_coupling_inverse(**a, method="bisection"), _bad("means", -np.inf)),
    "targets-out-of-range": (lambda a: ml.mixlogistic_invcdf(a["y"] * 0 + 1.5, a["logits"], a["means"],
                                                             a["logscales"]), _bad("y", 0.0)),
    "affine-inf-y": (lambda a: affine_coupling_inverse(a["y"], a["a"], a["b"]), _bad("y", np.inf)),
    "sigmoid-inverse": (lambda a: bij.Sigmoid().inverse(a["y"] * 0 + 0.5 + a["b"]), _bad("b", 0.7)),
    "imgproc-forward": (lambda a: bij.ImgProc().forward(a["y"] * 0 + 100 + a["b"]), _bad("b", 300.0)),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_value_checks_on_device_say_what_numpy_says(case, strict_xp):
    cp = strict_xp
    call, make = ERROR_CASES[case]
    arrays = make(np.random.default_rng(5))
    with pytest.raises(FlowInputError) as on_host:
        call(arrays)
    with pytest.raises(FlowInputError) as on_device:
        call({k: cp.asarray(v) for k, v in arrays.items()})
    assert str(on_device.value) == str(on_host.value)


# ====================================================================== the look-alike itself
def test_lookalike_offers_only_what_cupy_has():
    real = pytest.importorskip("cupy")
    missing = []
    for name in strict_cupy.public_names():
        obj, parts = real, name.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part)
        if not hasattr(obj, parts[-1]):
            missing.append(name)
    methods = [n for n in vars(strict_cupy.ndarray) if not n.startswith("_")]
    missing += [f"ndarray.{n}" for n in methods if not hasattr(real.ndarray, n)]
    missing += [f"random.Generator.{n}" for n in vars(strict_cupy.Generator)
                if not n.startswith("_") and not hasattr(real.random.Generator, n)]
    assert not missing, f"the look-alike offers names the real CuPy lacks: {missing}"
    for absent in ("normal", "permutation"):
        assert not hasattr(strict_cupy.Generator, absent)


def test_lookalike_refuses_what_cupy_refuses(strict_xp):
    cp = strict_xp
    a = cp.arange(4.0)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(4)
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.exp(np.ones(4))
    with pytest.raises(TypeError):
        np.fft.fft(a)                                   # no cupy counterpart in the look-alike
    assert isinstance(np.concatenate([a, a]), cp.ndarray)      # dispatched to cupy.concatenate
    ledger = cp.ledger
    ledger.reset()
    with pytest.raises(strict_cupy.HostSyncError, match="float"):
        with ledger.strict():
            float(a.sum())
    with pytest.raises(strict_cupy.HostSyncError, match="caught and ignored"):
        with ledger.strict():
            try:
                bool(a[0] > 0)
            except strict_cupy.HostSyncError:
                pass
    _ = a[a > 1]
    assert ledger.n_syncs == 3 and any("boolean-mask" in w for w, _ in ledger.syncs)
    assert all(site.startswith("<outside") for _, site in ledger.syncs)


def test_lookalike_checks_every_kernel_launch(strict_xp):
    cp = strict_xp
    from flowpp_ref.kernels.cuda import build, layers
    f = cp.RawModule(code=layers.cuda_source(), options=build.RAWMODULE_OPTIONS).get_function("gate_fwd_f32")
    x = cp.asarray(np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    out = cp.empty((5, 2), dtype=np.float32)
    n = np.int64(out.size)
    f((1,), (256,), (n, np.int32(2), x, out))                         # a good launch runs on the host build
    cp.RawKernel(layers.cuda_source(), "gate_fwd_f32")(3, 4, (n, np.int32(2), x, out))     # ints as dims
    assert cp.ledger.launches["kernel:gate_fwd_f32"] == 2
    xh = cp.asnumpy(x)
    np.testing.assert_allclose(cp.asnumpy(out), xh[:, :2] / (1 + np.exp(-xh[:, 2:])), rtol=1e-6)
    bad = {"block": ((1,), (2048,), (n, np.int32(2), x, out)),
           "do not cover": ((1,), (4,), (n, np.int32(2), x, out)),
           "int32": ((1,), (256,), (n, 2, x, out)),
           "arguments": ((1,), (256,), (n, np.int32(2), x)),
           "float64": ((1,), (256,), (n, np.int32(2), x.astype(np.float64), out)),
           "C-contiguous": ((1,), (256,), (n, np.int32(2), x.T, out)),
           "read-only": ((1,), (256,), (n, np.int32(2), x, cp.broadcast_to(out, out.shape))),
           "device array": ((1,), (256,), (n, np.int32(2), cp.asnumpy(x), out))}
    for what, (grid, block, args) in bad.items():
        with pytest.raises(strict_cupy.LaunchError, match=what):
            f(grid, block, args)
    with pytest.raises(strict_cupy.LaunchError, match="shared memory"):
        f((1,), (256,), (n, np.int32(2), x, out), shared_mem=64 * 1024)
    with pytest.raises(strict_cupy.LaunchError, match="not the cuda_source"):
        cp.RawModule(code="extern \"C\" __global__ void k(long long n) {}")
    with pytest.raises(NotImplementedError, match="no Python twin"):
        cp.ElementwiseKernel("T x", "T y", "y = x", "copy")


def test_the_fixture_restores_the_real_state():
    """Outside the fixture: no look-alike in sys.modules, the backend switch, the kernel caches or the
    kernels' switch (this test does not use strict_xp; run after those that do, it sees what they left)."""
    assert sys.modules.get("cupy") is not strict_cupy.MODULE
    assert backend._cupy is not strict_cupy.MODULE
    assert not isinstance(backend.make_rng(0, np), strict_cupy.Generator)
    assert all(not isinstance(c._module, strict_cupy.RawModule) for c in strict_cupy.raw_module_caches())
    if backend.HAVE_CUPY:
        assert backend._cupy is sys.modules["cupy"] and backend._cupy.__name__ == "cupy"
    assert build.RAWMODULE_OPTIONS
