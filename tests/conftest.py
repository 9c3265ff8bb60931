"""Shared test settings: tolerances per dtype, hypothesis profiles, backends.

Tolerances:
* float64: derivative checks (finite differences, rel. error) and round trips;
* float32: round trips only, looser.
"""
import inspect
import os
import re

import flowpp_ref

flowpp_ref.tune_threads()     # the thread-pool settings of the `flowpp` command, before NumPy loads (if not yet)


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
        from flowpp_ref.core.backend import gpu_available
        return gpu_available()
    except Exception:
        return False


BACKENDS = ["numpy", "cupy"]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """Array module; the cupy case skips with a reason on machines without a GPU."""
    if request.param == "cupy" and not _have_gpu():
        pytest.skip("cupy backend: CuPy or a CUDA device is not available on this machine")
    from flowpp_ref.core.backend import get_xp
    return get_xp(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------ the GPU selection (pytest -m gpu)
# benchmarks/gpu_check.py runs `pytest -m gpu` on the GPU machine. Rather than relying on every
# author remembering the marker, every test that touches CuPy/CUDA is marked here: an explicit
# @pytest.mark.gpu, a "cupy" parameter (the xp fixture's cupy case, or any parametrisation with
# the value "cupy"), or a test function whose source mentions cupy, gpu_available, nvcc, nvrtc or NCCL.
_GPU_SOURCE = re.compile(r"\bcupy\b|gpu_available|nvcc|nvrtc|(?i:nccl)")
_source_hits = {}


def touches_gpu(item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(isinstance(v, str) and v == "cupy" for v in callspec.params.values()):
        return True
    fn = getattr(item, "function", None)
    if fn is None:
        return False
    if fn not in _source_hits:
        try:
            _source_hits[fn] = bool(_GPU_SOURCE.search(inspect.getsource(fn)))
        except (OSError, TypeError):
            _source_hits[fn] = False
    return _source_hits[fn]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if touches_gpu(item) and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)


# ------------------------------------------------------------ the strict CuPy look-alike (tests/strict_cupy.py)
from strict_cupy import strict_xp  # noqa: E402,F401  (fixture: CuPy posed by NumPy, with a ledger of host reads)
