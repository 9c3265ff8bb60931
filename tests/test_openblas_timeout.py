"""``import flowpp_ref`` changes no environment variable; ``tune_threads()`` (which the ``flowpp`` command
calls first) sets OPENBLAS_THREAD_TIMEOUT and GOMP_SPINCOUNT only when they can still matter and the user
has not; the kernels run on numba's OpenMP layer where that loads, unless the user chose a layer."""
import os
import subprocess
import sys

import pytest


def _env_after(code, extra):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(extra)
    r = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"],
                       env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip().splitlines()[-1]


TUNE = "import flowpp_ref; flowpp_ref.tune_threads()"


def test_import_changes_no_environment_variable():
    code = ("import os, sys; before = dict(os.environ); import flowpp_ref; "
            "from flowpp_ref import FlowPP, train, evaluate, get_preset, load_model; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    assert _env_after(code, {}) == "None"


def test_set_before_numpy_loads():
    assert _env_after(TUNE, {}) == "4"


def test_the_cli_entry_point_tunes_before_numpy_loads():
    code = "import sys, flowpp_ref.cli; assert 'numpy' not in sys.modules"
    assert _env_after(code, {}) == "None"        # importing the CLI package alone changes nothing
    code = ("import contextlib, io, flowpp_ref.cli as c\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        c.main(['train', '--help'])\n    except SystemExit:\n        pass\nx = 0")
    assert _env_after(code, {}) == "4"


def test_a_users_value_is_kept():
    assert _env_after(TUNE, {"OPENBLAS_THREAD_TIMEOUT": "20"}) == "20"


def test_left_alone_when_numpy_is_already_loaded():
    assert _env_after("import numpy; " + TUNE, {}) == "None"


# ---------------------------------------------------------------- numba's threading layer, libgomp's spin
_LAYER = ("import flowpp_ref, sys; changed = flowpp_ref.tune_threads() if 'tune' in sys.argv else []\n"
          "import numba, numpy as np, os\n"
          "import flowpp_ref.kernels.numba.layernorm  # a kernel module: it picks the layer\n"
          "@numba.njit(parallel=True)\n"
          "def f(x):\n"
          "    for i in numba.prange(x.shape[0]):\n"
          "        x[i] += 1.0\n"
          "x = np.zeros(64); f(x); assert x.sum() == 64\n"
          "print(numba.threading_layer(), os.environ.get('GOMP_SPINCOUNT'), changed)")


def _layer_after(extra, tune=True):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    env.update(extra)
    r = subprocess.run([sys.executable, "-c", _LAYER] + (["tune"] if tune else []), env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def _has_gnu_openmp():
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return False
    return omppool.openmp_vendor in ("GNU", "Intel")


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_without_a_bounded_spin_the_kernels_use_workqueue_and_nothing_is_set():
    # libgomp's default spin fights OpenBLAS for the cores: without GOMP_SPINCOUNT / OMP_WAIT_POLICY
    # (no tune_threads() call, nothing from the user) the kernels run on numba's workqueue layer
    assert _layer_after({}, tune=False) == "workqueue None []"
    assert _layer_after({"OMP_WAIT_POLICY": "passive"}, tune=False).split()[0] == (
        "omp" if _has_gnu_openmp() else "workqueue")


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_openmp_layer_with_a_short_spin_after_tune_threads():
    out = _layer_after({})
    want = "omp" if _has_gnu_openmp() else "workqueue"
    assert out.startswith(f"{want} 3000 "), out
    assert "'GOMP_SPINCOUNT'" in out


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_users_spin_policy_and_layer_are_kept():
    assert _layer_after({"OMP_WAIT_POLICY": "passive"}).split()[1] == "None"
    assert _layer_after({"GOMP_SPINCOUNT": "77"}).split()[1] == "77"
    assert _layer_after({"NUMBA_THREADING_LAYER": "workqueue"}).split()[0] == "workqueue"
