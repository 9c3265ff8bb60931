"""Cold start: the backward kernels compiled in a second process while the first step compiles the rest.

With an empty numba cache (a fresh install, or kernel sources changed) a process compiles every
kernel at its first call, in the order of the step: forward kernels first, the backward ones last.
For ``small`` on 2 cores that is about 33 s of compiling before the first step ends, 13 s of it the
two fused-attention backward kernels. numba looks in its disk cache whenever a kernel meets a new
signature, so a second process that compiles the backward kernels first (by calling them on tiny
arrays with the step's dtypes and layouts) and writes them to the cache lets the training process
load them when its step gets there instead of compiling them.

:func:`start_background_compile` starts that process (``python -m flowpp_ref.training.warmup``,
one thread, lowered priority) when the cache of the attention backward is empty; it returns at
once, and the training process never waits for it. It is a no-op when the kernels are off,
``FLOWPP_WARMUP=off``, the disk cache is unavailable, or another warm-up started less than
10 minutes ago (a lock file in the cache folder). The training loop calls it once per process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from flowpp_ref.bijections.mixlogistic import mixlogistic_cdf_pdf_backward
from flowpp_ref.kernels import NUMBA_OPTS, use_kernels
from flowpp_ref.kernels.numba import attention as numba_attention
from flowpp_ref.nn.activations import concat_elu_backward, gate_backward
from flowpp_ref.nn.layernorm import layernorm_backward

__all__ = ["start_background_compile", "cache_is_cold", "compile_backward_kernels"]

_LOCK = "flowpp-warmup.lock"
_LOCK_AGE_S = 600
_started = {"done": False}


def _cache_folder_and_entries():
    """(cache folder, number of cached overloads) of the attention backward kernel (numba internals)."""
    cache = numba_attention._backward._cache
    return cache._cache_path, len(cache._cache_file._load_index())


def cache_is_cold() -> bool:
    """Whether the disk cache holds no compiled attention backward for the current kernel sources."""
    if not NUMBA_OPTS.get("cache"):
        return False
    try:
        return _cache_folder_and_entries()[1] == 0
    except (AttributeError, OSError):      # another numba's cache internals: say nothing, do nothing
        return False


def _take_lock(folder: str) -> bool:
    path = os.path.join(folder, _LOCK)
    try:
        if time.time() - os.path.getmtime(path) < _LOCK_AGE_S:
            return False
        os.remove(path)                    # left by a warm-up that died
    except OSError:
        pass
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:
        return False
    return True


def start_background_compile() -> subprocess.Popen | None:
    """Start the warm-up process if it can help (module docstring); returns it, or None."""
    if _started["done"] or not use_kernels() or os.environ.get("FLOWPP_WARMUP", "on").lower() in ("0", "off"):
        return None
    _started["done"] = True
    if not cache_is_cold():
        return None
    folder = _cache_folder_and_entries()[0]
    if not _take_lock(folder):
        return None
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "flowpp_ref.training.warmup", folder], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def compile_backward_kernels(dtype=np.float32) -> None:
    """Call each backward kernel once on tiny arrays (which compiles and caches it), the slowest to
    compile first: attention (the query-lanes kernel at d = 8, the key-block kernel otherwise), the
    mixture of logistics, layer norm, concat_elu and the gate (serial and parallel sizes)."""
    rng = np.random.default_rng(0)
    for d in (8, 16):
        qkv = rng.standard_normal((1, 20, 3, 2, d)).astype(dtype)
        q, k, v = (qkv[:, :, t].transpose(0, 2, 1, 3) for t in range(3))
        a, lse = np.zeros_like(q), np.zeros(q.shape[:3], dtype)         # any values: only the types count
        numba_attention.attention_backward(q, k, v, a, lse, np.ones_like(q))
    x = rng.standard_normal((2, 4, 4, 3)).astype(dtype)
    logits, means, logscales = (rng.standard_normal(x.shape + (5,)).astype(dtype) for _ in range(3))
    mixlogistic_cdf_pdf_backward(x, logits, means, logscales, np.ones_like(x), np.ones_like(x), np.ones_like(x))
    for rows in (4, 4096):                 # below and above the kernels' parallel threshold
        x = rng.standard_normal((rows, 32)).astype(dtype)
        layernorm_backward(x, x, np.ones((rows, 1), dtype), np.ones(32, dtype))
        concat_elu_backward(np.ones((rows, 64), dtype), x)
        gate_backward(np.ones((rows, 16), dtype), x)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        os.nice(10)                        # the training process first
    except (AttributeError, OSError):
        pass
    try:
        compile_backward_kernels()
    finally:
        if argv:
            try:
                os.remove(os.path.join(argv[0], _LOCK))
            except OSError:
                pass


if __name__ == "__main__":
    main()
