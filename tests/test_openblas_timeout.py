"""flowpp_ref sets OPENBLAS_THREAD_TIMEOUT only when it can still matter and the user has not."""
import os
import subprocess
import sys


def _env_after(code, extra):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(extra)
    r = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"],
                       env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip().splitlines()[-1]


def test_set_before_numpy_loads():
    assert _env_after("import flowpp_ref", {}) == "4"


def test_a_users_value_is_kept():
    assert _env_after("import flowpp_ref", {"OPENBLAS_THREAD_TIMEOUT": "20"}) == "20"


def test_left_alone_when_numpy_is_already_loaded():
    assert _env_after("import numpy, flowpp_ref", {}) == "None"
