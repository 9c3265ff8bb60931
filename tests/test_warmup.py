"""Cold start: the warm-up process compiles the backward kernels with the signatures the training step uses,
and starts only when it can help (empty cache, kernels on, not switched off, no other warm-up running)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow       # compiles kernels into empty caches (tens of seconds)

_STEP = """
import sys
from numba.core import event
import numpy as np
from flowpp_ref.core.backend import make_rng
from flowpp_ref.datasets import load_default_dataset
from flowpp_ref.model.flowpp import FlowPP
from flowpp_ref.model.presets import get_preset
p = get_preset("small")
model = FlowPP(p.model, seed=0)
x = load_default_dataset("train")[0][:4]
with event.install_recorder("numba:compile") as rec:
    model.data_init(x, rng=make_rng(1, np))
    model.loss_and_grads(x[:2], rng=make_rng(2, np))
names = sorted({ev.data["dispatcher"].py_func.__qualname__ for _, ev in rec.buffer if ev.is_start})
print(" ".join(names))
"""


def _run(code, cache, **extra):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), **extra)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()


def test_the_warmed_backward_kernels_are_loaded_not_compiled_by_the_step(tmp_path):
    cold = set(_run(_STEP, tmp_path / "a")[-1].split())
    for name in ("_backward", "_backward_tiles", "_backward_chunk"):
        assert name in cold, (name, cold)                     # a cold step compiles them itself
    _run("from flowpp_ref.training.warmup import compile_backward_kernels; compile_backward_kernels()",
         tmp_path / "b")
    warm = set(_run(_STEP, tmp_path / "b")[-1].split())
    assert warm, "the step compiled nothing: the forward kernels should still have been compiled"
    assert not {"_backward", "_backward_tiles", "_backward_chunk", "layernorm_backward_parallel",
                "layernorm_backward_serial", "_concat_elu_bwd", "_gate_bwd"} & warm, warm


_START = """
import time
from flowpp_ref.training import warmup
first = warmup.start_background_compile()
again = warmup.start_background_compile()
folder = warmup._cache_folder_and_entries()[0]
lock_while_running = os.path.exists(os.path.join(folder, warmup._LOCK))
print(first is not None, again is None, lock_while_running)
if first is not None:
    first.wait(600)
    print(first.returncode, os.path.exists(os.path.join(folder, warmup._LOCK)), warmup.cache_is_cold())
"""


def test_started_once_on_a_cold_cache_and_never_when_switched_off(tmp_path):
    out = _run("import os\n" + _START, tmp_path / "c")
    assert out == ["True True True", "0 False False"], out    # started, once; lock removed; cache now warm
    out = _run("import os\n" + _START, tmp_path / "c")
    assert out == ["False True False"], out                    # warm cache: nothing to do
    out = _run("import os\n" + _START, tmp_path / "d", FLOWPP_WARMUP="off")
    assert out == ["False True False"], out
    out = _run("import os\n" + _START, tmp_path / "e", FLOWPP_KERNELS="off")
    assert out == ["False True False"], out


def test_a_running_warmup_is_not_doubled(tmp_path):
    code = ("import os\nfrom flowpp_ref.training import warmup\n"
            "folder = warmup._cache_folder_and_entries()[0]\nos.makedirs(folder, exist_ok=True)\n"
            "open(os.path.join(folder, warmup._LOCK), 'w').close()\n"
            "print(warmup.start_background_compile() is None)")
    assert _run(code, tmp_path / "f") == ["True"]
