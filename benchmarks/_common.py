"""Helpers shared by the CPU benchmark scripts: thread settings of worker processes, memory, median."""
from __future__ import annotations

import os
import statistics
import sys

TUNED = ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT") if os.environ.get("FLOWPP_KEEP_THREAD_ENV") is None else ()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def thread_env(threads: int) -> dict:
    """The environment of a worker: BLAS/OpenMP/numba thread counts, the repository (and tests/) on the path."""
    env = dict(os.environ)
    for k in TUNED:
        env.pop(k, None)             # tune_threads()'s settings, if this process made them: the worker's own call decides
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def rss_bytes() -> int:
    """Resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(xs):
    return statistics.median(xs)


def time_numpy_steps(model, x, gen, repeats: int) -> dict:
    """``repeats + 1`` training steps (``loss_and_grads``) of a flowpp_ref model, the first a
    warm-up (numba compile / cache load): ``{"times", "warmup", "peak_rss_delta_mb"}``."""
    import time

    def step():
        t0 = time.perf_counter()
        _, grads = model.loss_and_grads(x, rng=gen, train=True)
        dt = time.perf_counter() - t0
        del grads
        return dt

    base = rss_bytes()
    times = [step() for _ in range(repeats + 1)]
    return dict(times=times[1:], warmup=times[0], peak_rss_delta_mb=(maxrss_bytes() - base) / 2**20)


def time_twin_steps(twin, x, gen, repeats: int) -> dict:
    """``repeats + 1`` training steps (loss and autograd backward) of the PyTorch twin, the first a
    warm-up: ``{"times", "warmup", "peak_rss_delta_mb"}`` (the twin of :func:`time_numpy_steps`)."""
    import time

    def step():
        twin.zero_grad()
        t0 = time.perf_counter()
        loss = twin.loss(x, rng=gen, train=True)
        loss.backward()
        return time.perf_counter() - t0

    base = rss_bytes()
    times = [step() for _ in range(repeats + 1)]
    return dict(times=times[1:], warmup=times[0], peak_rss_delta_mb=(maxrss_bytes() - base) / 2**20)
