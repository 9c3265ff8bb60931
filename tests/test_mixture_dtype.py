"""--mixture-dtype float64 (issue 12): the mixture transform in float64 inside a float32 model."""
import numpy as np

from flowpp_ref.core.backend import make_rng
from flowpp_ref.bijections.coupling import MixLogisticAttnCoupling
from flowpp_ref.bijections.coupling_transforms import mixlogistic_coupling_forward
from flowpp_ref.core.gradcheck import rel_error
from flowpp_ref.model import FlowPP
from flowpp_ref.model.presets import get_preset


def _pair(md):
    kw = dict(shape=(4, 2, 3), filters=8, blocks=1, components=3, rng=np.random.default_rng(0))
    return MixLogisticAttnCoupling(**kw, dtype=np.float32, mixture_dtype=md)


def test_coupling_runs_the_mixture_in_float64_and_returns_float32():
    lay = _pair("float64")
    r = np.random.default_rng(1)
    c, e = (r.standard_normal((2, 4, 2, 3)).astype(np.float32) for _ in range(2))
    (c2, y), logdet, cache = lay.forward((c, e))
    assert y.dtype == np.float32 and logdet.dtype == np.float32
    assert cache["transform"]["e"].dtype == np.float64
    # the same heads, transformed in float64 by hand, then cast down
    raw, _ = lay.net.forward(c)
    a, b, lg, mn, ls, _ = lay._heads(lay._raw(c, raw))
    y64, ld64, _ = mixlogistic_coupling_forward(*(v.astype(np.float64) for v in (e, a, b, lg, mn, ls)))
    np.testing.assert_array_equal(y, y64.astype(np.float32))
    np.testing.assert_array_equal(logdet, ld64.astype(np.float32))
    # float32 mixture: differs from the float64 result in the last bits only
    lay32 = _pair(None)
    (_, y32), _, _ = lay32.forward((c, e))
    assert np.abs(y32 - y).max() < 1e-3
    # backward: float32 gradients
    (dc, de), _, grads = lay.backward((np.ones_like(c), np.ones_like(e)), np.ones(2, np.float32), cache)
    assert de.dtype == np.float32 and all(v.dtype == np.float32 for v in grads.values())
    # inverse: float32 out, and it inverts
    (_, e_back), ld_inv = lay.inverse((c, y))
    assert e_back.dtype == np.float32 and np.abs(e_back - e).max() < 1e-3


class _SameNoise:
    """Draws in float64 and casts, so a float32 and a float64 model see the same noise."""

    def __init__(self, seed):
        self.g = np.random.default_rng(seed)

    def standard_normal(self, shape, dtype=np.float64):
        return self.g.standard_normal(shape).astype(dtype)

    def random(self, shape, dtype=np.float64):
        return self.g.random(shape).astype(dtype)


def test_whole_float32_model_with_float64_mixture_matches_the_float64_model():
    p = get_preset("tiny", mixture_dtype="float64")
    m32 = FlowPP(p.model, seed=4, dtype=np.float32)
    m64 = FlowPP(p.model, seed=4, dtype=np.float64)
    r = np.random.default_rng(0)
    x = np.clip(r.integers(0, 256, size=(4, 1, 1, 3)) + r.integers(-20, 21, size=(4, 4, 4, 3)), 0, 255)
    x = x.astype(np.uint8)
    m64.data_init(x, rng=make_rng(0))
    m32.load_parameters({k: v.astype(np.float32) for k, v in m64.parameters().items()})
    l32, g32 = m32.loss_and_grads(x, rng=_SameNoise(5))
    l64, g64 = m64.loss_and_grads(x, rng=_SameNoise(5))
    assert abs(float(l32) - float(l64)) < 1e-4
    assert all(v.dtype == np.float32 for v in g32.values())
    worst = max(rel_error(g32[k], g64[k]) for k in g64)
    assert worst < 1e-3, worst
