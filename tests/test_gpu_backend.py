"""The whole model on the GPU (CuPy) against the same model on the CPU (NumPy).

Every case here needs CuPy and a CUDA device and skips with that reason otherwise; none
of them has run yet (no GPU machine has been lent to this project). Tolerances, float64:
loss 1e-10 relative, each gradient 1e-8 relative to its largest entry (cuBLAS and the CUDA
kernels sum in other orders than NumPy/numba).
"""
import numpy as np
import pytest

from flowpp_ref.core.backend import HostDraws, gpu_available
from flowpp_ref.model import FlowPP
from flowpp_ref.model.presets import get_preset

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="cupy backend: CuPy or a CUDA device is not available on this machine")


def HostDrawsOnDevice(seed, xp):
    """A NumPy generator whose draws are moved to ``xp``: both backends see the same noise."""
    return HostDraws(np.random.default_rng(seed), xp)


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.uint8)


@pytest.mark.parametrize("overrides", [{}, {"dequantization": "uniform"}, {"coupling": "affine", "use_attention": False}],
                         ids=["flowpp", "uniform", "affine-noattn"])
def test_cpu_and_gpu_models_give_the_same_loss_and_gradients_float64(overrides):
    import cupy
    p = get_preset("tiny", **overrides)
    cpu = FlowPP(p.model, seed=0, xp=np, dtype=np.float64)
    gpu = FlowPP(p.model, seed=0, xp=cupy, dtype=np.float64)
    x = _images(4, p.model.image_shape)
    cpu.data_init(_images(8, p.model.image_shape, 1), rng=np.random.default_rng(2))
    gpu.load_parameters({k: cupy.asarray(v) for k, v in cpu.parameters().items()})
    lc, gc = cpu.loss_and_grads(x, rng=HostDrawsOnDevice(3, np), train=True)
    lg, gg = gpu.loss_and_grads(x, rng=HostDrawsOnDevice(3, cupy), train=True)
    assert float(cupy.asnumpy(lg)) == pytest.approx(float(lc), rel=1e-10)
    assert gc.keys() == gg.keys()
    for k in gc:
        a, b = cupy.asnumpy(gg[k]), gc[k]
        assert np.max(np.abs(a - b)) <= 1e-8 * max(np.max(np.abs(b)), 1e-30), k


def test_gpu_sampling_inverts_the_gpu_flow():
    import cupy
    p = get_preset("tiny")
    gpu = FlowPP(p.model, seed=0, xp=cupy, dtype=np.float64)
    gpu.data_init(_images(8, p.model.image_shape, 1), rng=HostDrawsOnDevice(2, cupy))
    y = cupy.asarray(_images(4, p.model.image_shape).astype(np.float64) + 0.5)
    z, ld, _ = gpu.flow.forward(y)
    y2, ld2 = gpu.flow.inverse(z)
    assert float(cupy.max(cupy.abs(y2 - y))) < 1e-8
    assert float(cupy.max(cupy.abs(ld + ld2))) < 1e-7
    imgs = gpu.sample(4, rng=cupy.random.default_rng(0))
    assert isinstance(imgs, np.ndarray) and imgs.dtype == np.uint8 and imgs.shape == (4, *p.model.image_shape)


def test_gpu_training_runs_and_resumes_exactly(tmp_path):
    from flowpp_ref.training.loop import train
    x = _images(48, (4, 4, 3))
    full = train("tiny", x, out_dir=str(tmp_path / "a"), steps=6, progress=False, backend="cupy")
    train("tiny", x, out_dir=str(tmp_path / "b"), steps=3, progress=False, backend="cupy")
    resumed = train("tiny", x, out_dir=str(tmp_path / "b"), steps=6, progress=False, backend="cupy")
    a = [h["train_bpd"] for h in full["history"]][3:]
    b = [h["train_bpd"] for h in resumed["history"]]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_same_seed_gives_the_same_model_init_and_noise_on_both_backends():
    """Initial parameters, the training loop's data-dependent init and host-generator noise: NumPy == CuPy."""
    import cupy

    from flowpp_ref.core.backend import to_numpy
    from flowpp_ref.training.loop import step_rng
    p = get_preset("tiny")
    x = _images(8, p.model.image_shape, 1)
    models = {}
    for xp in (np, cupy):
        m = FlowPP(p.model, seed=0, xp=xp, dtype=np.float64)
        before = {k: to_numpy(v) for k, v in m.parameters().items()}
        m.data_init(x, rng=step_rng(0, -1, xp))
        models[xp.__name__] = (before, {k: to_numpy(v) for k, v in m.parameters().items()},
                               m.bits_per_dim(x[:4], rng=np.random.default_rng(5)))
    (b0, a0, e0), (b1, a1, e1) = models["numpy"], models["cupy"]
    for k in b0:
        np.testing.assert_array_equal(b0[k], b1[k], err_msg=k)
        np.testing.assert_allclose(a0[k], a1[k], rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(e0, e1, rtol=1e-10)


def test_fused_optimiser_on_the_gpu_equals_the_host():
    """FusedUpdate's CUDA kernels against its numba twin, float64, with a clipped and a skipped step."""
    import cupy

    from flowpp_ref.training.fused import FusedUpdate
    from flowpp_ref.training.optim import EMA, Adam
    p = get_preset("tiny")
    out = {}
    for xp in (np, cupy):
        m = FlowPP(p.model, seed=0, xp=xp, dtype=np.float64)
        fu = FusedUpdate(m, Adam(m.parameters()), EMA(m.parameters(), decay=0.9))
        r = np.random.default_rng(7)
        for i in range(4):
            g = {k: xp.asarray(r.normal(size=v.shape) * (50.0 if i == 1 else 0.1)) for k, v in m.parameters().items()}
            fu.step(g, xp.asarray(np.nan if i == 2 else 1.0), 1e-2, 1.0)
        out[xp.__name__] = [cupy.asnumpy(a) if xp is cupy else a for a in (fu.p, fu.m, fu.v, fu.s)] + [
            int(fu.adam.t)]
    for a, b in zip(out["numpy"][:4], out["cupy"][:4]):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)
    assert out["numpy"][4] == out["cupy"][4] == 3


def test_training_on_numpy_and_cupy_follows_the_same_path(tmp_path):
    """Same seed, same data: the first steps' losses agree (float32 rounding apart)."""
    from flowpp_ref.training.loop import train
    x = _images(48, (4, 4, 3))
    a = train("tiny", x, out_dir=str(tmp_path / "np"), steps=4, progress=False, backend="numpy")
    b = train("tiny", x, out_dir=str(tmp_path / "cp"), steps=4, progress=False, backend="cupy")
    np.testing.assert_allclose([h["train_bpd"] for h in b["history"]], [h["train_bpd"] for h in a["history"]],
                               rtol=2e-5)
