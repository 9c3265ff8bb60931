"""Adam, warm-up, gradient clipping, EMA, and atomic pickle-free checkpoints."""
import dataclasses
import math
import os

import numpy as np
import pytest

from flowpp_ref.runtime import checkpoint as ckpt_mod
from flowpp_ref.runtime.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from flowpp_ref.training.optim import (EMA, Adam, clip_grad_norm, clip_scale, global_grad_norm, global_grad_norm_array,
                                       warmup_lr)


def _params(rng, dtype=np.float64):
    return {"w": rng.standard_normal((3, 4)).astype(dtype), "b": rng.standard_normal(4).astype(dtype),
            "blk.g": np.asarray(rng.standard_normal(), dtype=dtype).reshape(())}


def _quad_grads(params, target, scale):
    """Gradient of L = 0.5 sum_k sum(scale_k (p_k - t_k)^2)."""
    return {k: scale[k] * (p - target[k]) for k, p in params.items()}


# ----------------------------------------------------------------------- Adam
def test_adam_matches_formula():
    rng = np.random.default_rng(0)
    params = _params(rng)
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v_ = {k: np.zeros_like(v) for k, v in ref.items()}
    opt = Adam(params)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, 8):
        grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        lr = 0.01 * t
        w_before = params["w"]
        opt.step(params, grads, lr)
        assert params["w"] is w_before                      # updated in place
        for k in ref:
            g = grads[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v_[k] = b2 * v_[k] + (1 - b2) * g ** 2
            mhat, vhat = m[k] / (1 - b1 ** t), v_[k] / (1 - b2 ** t)
            ref[k] = ref[k] - lr * mhat / (np.sqrt(vhat) + eps)
            np.testing.assert_allclose(params[k], ref[k], rtol=1e-12, atol=1e-14, err_msg=k)
    assert opt.t == 7


def test_adam_converges_on_quadratic():
    rng = np.random.default_rng(1)
    params = _params(rng, np.float32)
    target = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
    scale = {k: rng.uniform(0.1, 10, p.shape).astype(np.float32) for k, p in params.items()}
    opt = Adam(params)
    err0 = max(np.abs(params[k] - target[k]).max() for k in params)
    for t in range(1, 1501):
        opt.step(params, _quad_grads(params, target, scale), lr=0.05 * min(1.0, 300.0 / t))
    err = max(np.abs(params[k] - target[k]).max() for k in params)
    assert err0 > 0.5 and err < 1e-2
    assert all(p.dtype == np.float32 for p in params.values())


def test_adam_matches_torch():
    torch = pytest.importorskip("torch", reason="torch is the cross-check oracle for Adam")
    rng = np.random.default_rng(2)
    params = _params(rng)
    target = {k: rng.standard_normal(p.shape) for k, p in params.items()}
    scale = {k: rng.uniform(0.1, 10, p.shape) for k, p in params.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    topt = torch.optim.Adam(list(tparams.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    opt = Adam(params)
    for step in range(1, 31):
        lr = warmup_lr(step, 0.05, 10)
        grads = _quad_grads(params, target, scale)
        for k, tp in tparams.items():
            tp.grad = torch.tensor(_quad_grads({k: tp.detach().numpy()}, target, scale)[k])
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        opt.step(params, grads, lr)
        for k in params:
            np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-10, atol=1e-12,
                                       err_msg=f"{k} at step {step}")


def test_adam_errors_and_state_roundtrip():
    rng = np.random.default_rng(3)
    params = _params(rng)
    opt = Adam(params)
    with pytest.raises(KeyError, match="missing"):
        opt.step(params, {"w": params["w"]}, 0.1)
    with pytest.raises(ValueError, match="shape"):
        opt.step(params, {**{k: np.zeros_like(p) for k, p in params.items()}, "b": np.zeros(5)}, 0.1)
    with pytest.raises(ValueError, match="learning rate"):
        opt.step(params, {k: np.zeros_like(p) for k, p in params.items()}, float("nan"))
    for _ in range(3):
        opt.step(params, {k: rng.standard_normal(p.shape) for k, p in params.items()}, 0.1)
    p2 = {k: v.copy() for k, v in params.items()}
    opt2 = Adam(p2)
    opt2.load_state_dict({k: (dict(v) if isinstance(v, dict) else v) for k, v in opt.state_dict().items()})
    assert opt2.t == 3
    for _ in range(3):
        g = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        opt.step(params, g, 0.1)
        opt2.step(p2, g, 0.1)
    for k in params:
        np.testing.assert_array_equal(params[k], p2[k])
    with pytest.raises(ValueError, match="shape"):
        Adam(params).load_state_dict({"t": 1, "m": {**opt.m, "w": np.zeros((2, 2))}, "v": opt.v})


# ------------------------------------------------------------ schedule, clip
def test_warmup_lr():
    assert warmup_lr(1, 1e-3, 200) == pytest.approx(1e-3 / 200)
    assert warmup_lr(100, 1e-3, 200) == pytest.approx(5e-4)
    assert warmup_lr(200, 1e-3, 200) == pytest.approx(1e-3)
    assert warmup_lr(10_000, 1e-3, 200) == pytest.approx(1e-3)
    assert warmup_lr(0, 1e-3, 200) == 0.0
    assert warmup_lr(5, 2e-3, 0) == 2e-3
    lrs = [warmup_lr(s, 1.0, 50) for s in range(1, 60)]
    assert all(b >= a for a, b in zip(lrs, lrs[1:]))


def test_clip_grad_norm():
    rng = np.random.default_rng(4)
    g = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    flat = np.concatenate([v.ravel().astype(np.float64) for v in g.values()])
    n_ref = np.linalg.norm(flat)
    assert global_grad_norm(g) == pytest.approx(n_ref, rel=1e-12)
    clipped, n = clip_grad_norm(g, 1.0)
    assert isinstance(n, float) and n == pytest.approx(n_ref, rel=1e-12) and n > 1
    assert global_grad_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    for k in g:  # same direction
        np.testing.assert_allclose(clipped[k], g[k] / n_ref, rtol=1e-6)
        assert clipped[k].dtype == np.float32
    same, n2 = clip_grad_norm(g, 100.0)
    assert n2 == pytest.approx(n_ref) and all(same[k] is g[k] for k in g)
    bad, n3 = clip_grad_norm({**g, "c": np.array([np.inf], np.float32)}, 1.0)
    assert not math.isfinite(n3)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(g, 0.0)
    assert clip_grad_norm({}, 1.0)[1] == 0.0


def test_device_side_clipping_and_conditional_updates_match_the_host_path():
    """Adam.step(grad_scale=, apply=) and EMA.update(apply=) (the training loop's sync-free
    step) against clip_grad_norm + an unconditional step, and a skipped step changes nothing."""
    rng = np.random.default_rng(6)
    p0 = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    grads = [{k: (4 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p0.items()} for _ in range(3)]
    grads[1]["b"][2] = np.nan                                    # step 2 must be skipped
    host = {k: v.copy() for k, v in p0.items()}
    dev = {k: v.copy() for k, v in p0.items()}
    a_host, a_dev = Adam(host), Adam(dev)
    e_host, e_dev = EMA(host, 0.9), EMA(dev, 0.9)
    for g in grads:
        n = global_grad_norm_array(g)
        assert n.shape == () and n.dtype == np.float64
        ok = np.isfinite(n)
        a_dev.step(dev, g, 1e-2, grad_scale=clip_scale(n, 1.0), apply=ok)
        e_dev.update(dev, apply=ok)
        clipped, nf = clip_grad_norm(g, 1.0)
        if math.isfinite(nf):
            a_host.step(host, clipped, 1e-2)
            e_host.update(host)
        for k in p0:
            np.testing.assert_allclose(dev[k], host[k], rtol=2e-6, atol=1e-7, err_msg=k)
            np.testing.assert_allclose(e_dev.shadow[k], e_host.shadow[k], rtol=2e-6, atol=1e-7, err_msg=k)
            np.testing.assert_allclose(a_dev.m[k], a_host.m[k], rtol=2e-6, atol=1e-7, err_msg=k)
            assert dev[k].dtype == np.float32 and a_dev.m[k].dtype == np.float32
    assert int(a_dev.t) == a_host.t == 2 and int(e_dev.num_updates) == e_host.num_updates == 2
    assert a_dev.state_dict()["t"] == 2
    assert float(clip_scale(np.float64(0.5), 1.0)) == 1.0 and float(clip_scale(np.float64(4.0), 1.0)) == 0.25
    assert math.isnan(float(clip_scale(np.float64(np.nan), 1.0)))


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch", reason="torch is the cross-check oracle for clipping")
    rng = np.random.default_rng(5)
    g = {"a": 3 * rng.standard_normal((4, 4)), "b": rng.standard_normal(9)}
    ts = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in g.values()]
    for t, v in zip(ts, g.values()):
        t.grad = torch.tensor(v.copy())
    tn = torch.nn.utils.clip_grad_norm_(ts, 2.0)
    clipped, n = clip_grad_norm(g, 2.0)
    assert n == pytest.approx(float(tn), rel=1e-12)
    for t, k in zip(ts, g):
        np.testing.assert_allclose(clipped[k], t.grad.numpy(), rtol=1e-5)  # torch adds 1e-6 to the norm


# ------------------------------------------------------------------------ EMA
def test_ema():
    rng = np.random.default_rng(6)
    params = _params(rng)
    s0 = {k: v.copy() for k, v in params.items()}
    ema = EMA(params, decay=0.9)
    assert ema.shadow["w"] is not params["w"]
    ref = {k: v.copy() for k, v in s0.items()}
    for _ in range(5):
        for k in params:
            params[k][...] = rng.standard_normal(params[k].shape)
        ema.update(params)
        for k in params:
            ref[k] = 0.9 * ref[k] + 0.1 * params[k]
            np.testing.assert_allclose(ema.shadow[k], ref[k], rtol=1e-13, atol=1e-15)
    # constant parameters: shadow = d^n s0 + (1 - d^n) p
    const = {k: np.full_like(v, 2.0) for k, v in params.items()}
    ema2 = EMA(s0, decay=0.99)
    for _ in range(50):
        ema2.update(const)
    for k in s0:
        np.testing.assert_allclose(ema2.shadow[k], 0.99 ** 50 * s0[k] + (1 - 0.99 ** 50) * 2.0, rtol=1e-12)
    st = ema.state_dict()
    ema3 = EMA(s0, decay=0.5)
    ema3.load_state_dict(st)
    assert ema3.decay == 0.9 and ema3.num_updates == 5
    for k in s0:
        np.testing.assert_array_equal(ema3.shadow[k], ema.shadow[k])
    target = {k: np.zeros_like(v) for k, v in s0.items()}
    ema3.copy_to(target)
    np.testing.assert_array_equal(target["w"], ema.shadow["w"])
    with pytest.raises(KeyError):
        ema.update({"w": params["w"]})
    with pytest.raises(ValueError, match="decay"):
        EMA(params, decay=1.5)


# ---------------------------------------------------------------- checkpoints
@dataclasses.dataclass
class _Cfg:
    filters: int = 8
    stages: tuple = (1, 2)
    lr: float = 1e-3
    note: str = "x"
    opt: object = None


def _state(seed=7, bitgen="PCG64"):
    """Parameters of several dtypes/ranks, an Adam over the float ones after 3 steps, an EMA, a generator."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b.c": np.full(2, 1.5, np.float32),
              "scalar": np.asarray(3.0, np.float64), "idx": np.arange(4, dtype=np.int64),
              "u8": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    float_params = adam_params(params)
    adam = Adam(float_params)
    ema = EMA(float_params, 0.999)
    for _ in range(3):
        adam.step(float_params, {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in float_params.items()},
                  1e-2)
        ema.update(float_params)
    gen = np.random.Generator(getattr(np.random, bitgen)(seed))
    gen.standard_normal(17)  # move the generator off its seed state
    return params, adam, ema, gen


def adam_params(params):
    return {k: v for k, v in params.items() if v.dtype.kind == "f"}


@pytest.mark.parametrize("bitgen", ["PCG64", "MT19937"])
def test_checkpoint_roundtrip(tmp_path, bitgen):
    params, adam, ema, gen = _state(bitgen=bitgen)
    path = tmp_path / "run" / "ck.npz"
    cfg = _Cfg()
    extra = {"history": [1.5, float("nan")], "nested": {"a": [np.arange(3), None, True]}}
    save_checkpoint(path, params=params, ema=ema.state_dict(), optimizer_state=adam.state_dict(), step=123,
                    rng_state=gen, config=cfg, extra=extra)
    assert os.listdir(tmp_path / "run") == ["ck.npz"]
    ck = load_checkpoint(path)
    assert ck["step"] == 123 and ck["version"] == 1
    assert set(ck["params"]) == set(params)
    for k, v in params.items():
        assert ck["params"][k].dtype == v.dtype and ck["params"][k].shape == v.shape
        np.testing.assert_array_equal(ck["params"][k], v)
    for k in adam.m:
        np.testing.assert_array_equal(ck["optimizer_state"]["m"][k], adam.m[k])
        np.testing.assert_array_equal(ck["optimizer_state"]["v"][k], adam.v[k])
    assert ck["optimizer_state"]["t"] == 3 and ck["ema"]["decay"] == 0.999
    assert set(ck["ema"]["shadow"]) == set(ema.shadow)
    for k in ema.shadow:
        np.testing.assert_array_equal(ck["ema"]["shadow"][k], ema.shadow[k])
    assert ck["config"] == {"filters": 8, "stages": [1, 2], "lr": 1e-3, "note": "x", "opt": None}
    assert ck["extra"]["history"][0] == 1.5 and math.isnan(ck["extra"]["history"][1])
    np.testing.assert_array_equal(ck["extra"]["nested"]["a"][0], np.arange(3))
    assert ck["extra"]["nested"]["a"][1:] == [None, True]
    # the restored generator continues with the same numbers
    gen2 = restore_rng(ck["rng_state"])
    np.testing.assert_array_equal(gen2.standard_normal(50), gen.standard_normal(50))
    np.testing.assert_array_equal(gen2.integers(0, 1000, 20), gen.integers(0, 1000, 20))
    # optimiser state restored from the file continues exactly like the original
    p_a = {k: v.copy() for k, v in adam_params(params).items()}
    p_b = {k: ck["params"][k].copy() for k in p_a}
    adam_b = Adam(p_b)
    adam_b.load_state_dict(ck["optimizer_state"])
    g = {k: np.full_like(v, 0.3) for k, v in p_a.items()}
    adam.step(p_a, g, 1e-2)
    adam_b.step(p_b, g, 1e-2)
    for k in p_a:
        np.testing.assert_array_equal(p_a[k], p_b[k])


def test_checkpoint_plain_rng_dict_and_overwrite(tmp_path):
    params, adam, ema, _ = _state()
    path = tmp_path / "ck.npz"
    for step in (1, 2):
        save_checkpoint(path, params=params, ema=ema.state_dict(), optimizer_state=adam.state_dict(), step=step,
                        rng_state={"seed": 0, "step": step}, config={"preset": "tiny"})
    ck = load_checkpoint(path)
    assert ck["step"] == 2 and ck["rng_state"] == {"seed": 0, "step": 2} and ck["extra"] is None
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]


def _save_simple(path, step, value):
    save_checkpoint(path, params={"w": np.full(1000, value, np.float32)}, ema=None, optimizer_state=None,
                    step=step, rng_state=None, config={"c": 1})


@pytest.mark.parametrize("where", ["savez", "fsync", "replace"])
def test_checkpoint_crash_while_writing_keeps_previous(tmp_path, monkeypatch, where):
    path = tmp_path / "ck.npz"
    _save_simple(path, 1, 1.0)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        if where == "savez":  # write part of a file first, as a real crash would
            args[0].write(b"PK\x03\x04 partial data")
        raise RuntimeError("simulated crash")

    target = {"savez": (ckpt_mod.np, "savez"), "fsync": (ckpt_mod.os, "fsync"),
              "replace": (ckpt_mod.os, "replace")}[where]
    monkeypatch.setattr(*target, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save_simple(path, 2, 2.0)
    monkeypatch.undo()
    assert path.read_bytes() == before
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and ck["params"]["w"][0] == 1.0
    assert os.listdir(tmp_path) == ["ck.npz"]  # the temporary file was removed
    _save_simple(path, 3, 3.0)
    assert load_checkpoint(path)["step"] == 3


def test_checkpoint_corrupt_files(tmp_path):
    path = tmp_path / "ck.npz"
    _save_simple(path, 1, 1.0)
    raw = path.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "garbage": b"not a checkpoint at all" * 10,
        "bitflip": raw[:600] + bytes([raw[600] ^ 0xFF]) + raw[601:],  # inside the array data: CRC
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(bad)
        assert str(bad) in str(e.value), name
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="__meta__"):
        load_checkpoint(tmp_path / "other.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="single"):
        load_checkpoint(tmp_path / "single.npy")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz")


def test_checkpoint_refuses_unstorable_content(tmp_path):
    base = dict(params={"w": np.zeros(2)}, ema=None, optimizer_state=None, step=0, config={})
    with pytest.raises(CheckpointError, match="object"):
        save_checkpoint(tmp_path / "a.npz", rng_state=None, **{**base, "params": {"w": np.array([None, 1])}})
    with pytest.raises(CheckpointError, match="keys must be strings"):
        save_checkpoint(tmp_path / "a.npz", rng_state=None, **{**base, "config": {1: 2}})
    with pytest.raises(CheckpointError, match="cannot store"):
        save_checkpoint(tmp_path / "a.npz", rng_state=None, **{**base, "extra": object()})

    class FakeCupyGenerator:
        pass

    with pytest.raises(CheckpointError, match="rng_state"):
        save_checkpoint(tmp_path / "a.npz", rng_state=FakeCupyGenerator(), **base)
    with pytest.raises(CheckpointError, match="same name"):
        save_checkpoint(tmp_path / "a.npz", rng_state=None,
                        **{**base, "extra": {"a/b": np.zeros(1), "a": {"b": np.zeros(1)}}})
    assert not os.path.exists(tmp_path / "a.npz")
    with pytest.raises(CheckpointError, match="bit generator"):
        restore_rng({"bit_generator": "Nope"})
