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


_TIMEOUT_READ = ("import ctypes, os; from flowpp_ref.runtime.threads import mapped_libraries, thread_report\n"
                 "libs = [ctypes.CDLL(p) for p in mapped_libraries('openblas')]\n"
                 "libs = [lib for lib in libs if hasattr(lib, 'openblas_thread_timeout')]\n"
                 "print([lib.openblas_thread_timeout() for lib in libs], thread_report()['openblas_retuned'])")


def _numpy_openblas_exports_timeout():
    import ctypes

    from flowpp_ref.runtime.threads import mapped_libraries
    return any(hasattr(ctypes.CDLL(p), "openblas_read_env") for p in mapped_libraries("openblas"))


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
@pytest.mark.skipif(not _numpy_openblas_exports_timeout(), reason="NumPy's BLAS is not an OpenBLAS 0.3.x")
def test_numpy_loaded_first_its_openblas_is_retuned():
    # NumPy's OpenBLAS read its environment at import; tune_threads has it read it again (and restart its pool)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    code = "import numpy as np; np.ones((300, 300)) @ np.ones((300, 300)); import flowpp_ref\n"
    out = subprocess.run([sys.executable, "-c", code + _TIMEOUT_READ], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.startswith("[0") and out.endswith("[]"), out           # not yet: OpenBLAS's default timeout
    out = subprocess.run([sys.executable, "-c", code + "flowpp_ref.tune_threads()\n" + _TIMEOUT_READ
                          + "\nprint(float((np.ones((300, 300)) @ np.ones((300, 300)))[0, 0]))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    assert out[0].startswith("[4") and "openblas" in out[0], out      # retuned, and named in the report
    assert out[1] == "300.0"                                            # its restarted pool computes


# ---------------------------------------------------------------- numba's threading layer, libgomp's spin
_LAYER = ("import flowpp_ref, sys, os; changed = flowpp_ref.tune_threads() if 'tune' in sys.argv else []\n"
          "import numba, numpy as np, os\n"
          "import flowpp_ref.kernels.numba.layernorm  # a kernel module: it picks the layer\n"
          "import flowpp_ref.kernels.numba.softmax    # and a second one: the same choice\n"
          "@numba.njit(parallel=True)\n"
          "def f(x):\n"
          "    for i in numba.prange(x.shape[0]):\n"
          "        x[i] += 1.0\n"
          "x = np.zeros(64); f(x); assert x.sum() == 64\n"
          "print(numba.threading_layer(), os.environ.get('GOMP_SPINCOUNT'), changed, '|',\n"
          "      flowpp_ref.runtime.threads.thread_report()['foreign_libgomp'])")


def _layer_after(extra, tune=True, prelude="", last=True):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    env.update(extra)
    r = subprocess.run([sys.executable, "-c", prelude + _LAYER] + (["tune"] if tune else []), env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1 if last else 0]


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
    assert _layer_after({}, tune=False) == "workqueue None [] | []"
    assert _layer_after({"OMP_WAIT_POLICY": "passive"}, tune=False).split()[0] == (
        "omp" if _has_gnu_openmp() else "workqueue")


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_openmp_layer_with_a_short_spin_after_tune_threads():
    out = _layer_after({})
    want = "omp" if _has_gnu_openmp() else "workqueue"
    assert out.startswith(f"{want} 3000 "), out
    assert "'GOMP_SPINCOUNT'" in out


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_train_revises_the_layer_chosen_before_tune_threads():
    # a kernel module imported before tune_threads picked workqueue (unbounded spin); train() tunes, then
    # chooses again, before numba starts its threads
    code = ("import numba, flowpp_ref.kernels.numba.layernorm\n"
            "from flowpp_ref.kernels import choose_threading_layer\n"
            "first = numba.config.THREADING_LAYER\n"
            "import flowpp_ref; flowpp_ref.tune_threads(); choose_threading_layer()\n"
            "print(first, numba.config.THREADING_LAYER)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["workqueue", "omp" if _has_gnu_openmp() else "workqueue"], out


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_a_libgomp_loaded_by_torch_first_is_kept_from_numba():
    # torch loads its own libgomp (global scope) with the default spin; numba's pool is then deep-bound to its own
    pytest.importorskip("torch")
    prelude = ("import torch; torch.set_num_threads(2)\n"
               "from flowpp_ref.runtime.threads import mapped_libraries; print(mapped_libraries('libgomp'))\n")
    before = _layer_after({}, prelude=prelude + "raise SystemExit\n", last=False)
    if before == "[]":
        pytest.skip("this torch build loads no libgomp")
    out = _layer_after({}, prelude=prelude)
    assert out.split()[0] == ("omp" if _has_gnu_openmp() else "workqueue"), out
    assert out.split("|")[1].strip() == before, (out, before)     # torch's libgomp, recorded as loaded first


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_users_spin_policy_and_layer_are_kept():
    assert _layer_after({"OMP_WAIT_POLICY": "passive"}).split()[1] == "None"
    assert _layer_after({"GOMP_SPINCOUNT": "77"}).split()[1] == "77"
    assert _layer_after({"NUMBA_THREADING_LAYER": "workqueue"}).split()[0] == "workqueue"
