"""Shared test settings: tolerances per dtype, hypothesis profiles, backends.

Tolerances (see STYLE.md's pitfalls):
* float64: derivative checks (finite differences, rel. error) and round trips;
* float32: round trips only, looser.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# round-trip tolerances (absolute, on values of order 1) and gradcheck tolerances
TOL = {
    np.float64: dict(roundtrip=1e-9, logdet=1e-6, grad=1e-6),
    np.float32: dict(roundtrip=2e-4, logdet=1e-3, grad=None),   # no derivative checks in float32
}

settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _have_gpu():
    try:
        from flowpp_ref.backend import gpu_available
        return gpu_available()
    except Exception:
        return False


BACKENDS = ["numpy", "cupy"]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """Array module; the cupy case skips with a reason on machines without a GPU."""
    if request.param == "cupy" and not _have_gpu():
        pytest.skip("cupy backend: CuPy or a CUDA device is not available on this machine")
    from flowpp_ref.backend import get_xp
    return get_xp(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
