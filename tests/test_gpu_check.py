"""The plumbing of benchmarks/gpu_check.py, on the CPU (the GPU run itself needs the device tool).

Fast: the stage runner records failures and time-outs without stopping the next stage;
a stage worker's exception becomes a "failed" record; the CIFAR-10 batches are read raw,
.xz or .gz; the report stays within the device tool's 8 files; the GPU test selection
(tests/conftest.py) picks the cupy cases and the CUDA tests. Slow: the whole ``--dry-run``.
"""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as gc  # noqa: E402


def _log(tmp_path):
    return open(tmp_path / "log.txt", "w")


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_run_stage_records_failures_and_timeouts(tmp_path):
    with _log(tmp_path) as log:
        ok = gc.run_stage("a", [sys.executable, "-c", "print('hello')"], 30, log)
        bad = gc.run_stage("b", [sys.executable, "-c", "import sys; sys.exit(3)"], 30, log)
        pidfile = tmp_path / "pid"
        slow = gc.run_stage("c", [sys.executable, "-c", f"import os, time; open({str(pidfile)!r}, 'w')"
                                  f".write(str(os.getpid())); time.sleep(600)"], 1.0, log)
        missing = gc.run_stage("d", [str(tmp_path / "no-such-program")], 30, log)
    assert ok["status"] == "ok" and ok["returncode"] == 0
    assert bad["status"] == "failed" and bad["returncode"] == 3 and "3" in bad["error"]
    # killed at its 1 s budget: when run_stage returns, the child (asleep for 600 s) is gone
    assert slow["status"] == "timeout" and "budget" in slow["error"]
    if pidfile.exists():                          # (a child killed before it wrote its pid left none)
        pid = int(pidfile.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert missing["status"] == "failed"
    text = (tmp_path / "log.txt").read_text()
    assert "hello" in text and "stage c: timeout" in text


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_a_killed_stage_keeps_its_partial_result(tmp_path):
    res = tmp_path / "res.json"
    code = f"import json, time; json.dump({{'steps': 7}}, open({str(res) + '.partial'!r}, 'w')); time.sleep(60)"
    with _log(tmp_path) as log:
        rec = gc.run_stage("train", [sys.executable, "-c", code], 3.0, log, str(res))
    assert rec["status"] == "timeout" and rec["result"] == {"steps": 7}


def test_a_failing_stage_worker_is_recorded_not_raised(tmp_path, monkeypatch):
    def boom(ctx):
        raise ValueError("planted failure")
    monkeypatch.setitem(gc.WORKERS, "env", boom)
    ctx, res = tmp_path / "ctx.json", tmp_path / "res.json"
    ctx.write_text(json.dumps({"dry_run": True}))
    gc._worker_main("env", str(ctx), str(res))
    rec = json.loads(res.read_text())
    assert rec["status"] == "failed" and "planted failure" in rec["error"] and "ValueError" in rec["traceback"]


def test_cifar_batches_are_read_raw_xz_and_gz(tmp_path):
    raw = gc.write_fake_cifar(str(tmp_path / "raw"), n_train=5, n_test=3)
    gc.pack(raw, str(tmp_path / "xz"))
    gz = tmp_path / "gz" / "cifar-10-batches-py"
    gz.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        with open(Path(raw) / "cifar-10-batches-py" / name, "rb") as f, gzip.open(gz / (name + ".gz"), "wb") as g:
            g.write(f.read())
    assert sorted(os.listdir(tmp_path / "xz" / "cifar-10-batches-py")) == ["data_batch_1.xz", "test_batch.xz"]
    for name, n in (("data_batch_1", 5), ("test_batch", 3)):
        x, y = gc.read_cifar_batch(raw, name)
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (n,)
        for other in (tmp_path / "xz", tmp_path / "gz" / "cifar-10-batches-py"):
            x2, y2 = gc.read_cifar_batch(str(other), name)
            np.testing.assert_array_equal(x2, x)
            np.testing.assert_array_equal(y2, y)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        gc.read_cifar_batch(str(tmp_path), "data_batch_1")


@pytest.mark.slow                 # subprocesses (the fast tier's budget)
def test_env_stage_writes_the_report(tmp_path):
    report = gc.main(["--dry-run", "--stages", "env", "--out", str(tmp_path)])
    assert report["stages"]["env"]["status"] == "ok"
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == report["device"] and saved["device"]          # "no GPU" here
    assert saved["stages"]["env"]["result"]["numpy"] == np.__version__
    assert set(saved["files"]) == {"gpu_check.json", "gpu_check.log"}


def test_gpu_selection_picks_cupy_cases_and_cuda_tests():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/test_nn_conv.py", "tests/test_gpu_backend.py", "tests/test_cuda_kernels_on_host.py"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ids = set(r.stdout.split())
    assert "tests/test_nn_conv.py::test_conv2d_backend_matches_numpy[cupy]" in ids, r.stdout + r.stderr
    assert "tests/test_gpu_backend.py::test_gpu_sampling_inverts_the_gpu_flow" in ids            # mentions cupy
    assert "tests/test_cuda_kernels_on_host.py::test_cuda_source_compiles_for_the_gpu_with_nvcc" in ids   # nvcc
    assert "tests/test_cuda_kernels_on_host.py::test_cuda_kernels_match_reference_on_gpu" in ids  # gpu_available
    assert "tests/test_cuda_kernels_on_host.py::test_cuda_source_forward_matches_reference_float64[1]" not in ids
    assert not any("test_conv2d_forward" in i for i in ids)


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """The whole check with --dry-run: every stage ok, the six files, at most 8."""
    report = gc.main(["--dry-run", "--out", str(tmp_path)])
    assert {k: v["status"] for k, v in report["stages"].items()} == dict.fromkeys(gc.STAGES, "ok"), \
        (tmp_path / "gpu_check.log").read_text()[-4000:]
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(["gpu_check.json", "gpu_check.log", "pytest.txt", "pytest_junit.xml",
                            "samples.png", "train_curve.png"]) and len(files) <= gc.MAX_FILES
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    tr = saved["stages"]["train"]["result"]
    assert tr["steps"] >= 1 and np.isfinite(tr["test_bpd_ema"]) and tr["test_images"] > 0
    bench = saved["stages"]["bench"]["result"]
    assert bench["runs"][0]["ours"]["step"]["min_s"] > 0 and bench["coupling"][0]["torch"]["step"]["min_s"] > 0
    assert saved["stages"]["pytest"]["result"]["junit"]["tests"] > 0
