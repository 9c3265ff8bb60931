"""The GPU check: one prepared run on a lent GPU machine (under 8 minutes, nothing downloaded).

Run on an NVIDIA H200 (the device tool's machine): results under ``benchmarks/results/gpu_check_h200_*.json``
and in ``benchmarks/RESULTS.md``. Its plumbing is tested on the CPU with ``--dry-run``
(tests/test_gpu_check.py).

Stages, in this order, each in its own subprocess with its own time budget; a stage that
fails or runs past its budget is recorded (status, seconds, the error's tail) and the
next stage runs anyway:

``env``     device name, memory and compute capability; CUDA runtime/driver, CuPy, NumPy,
            numba, SciPy, PyTorch (and its CUDA) versions; ``nvcc --version``; ``nvidia-smi -L``.
``compile`` NVRTC builds of every RawModule (``kernels/cuda/``), then one warm-up of each path (training
            step, fused optimiser, sampling, evaluation) of ``small`` float32 and ``tiny`` float64/float32,
            so that later timings exclude compilation; seconds per module and per warm-up reported.
``pytest``  ``pytest -m gpu tests/``: every test tests/conftest.py marks ``gpu`` (explicit
            marks, every ``cupy`` parametrisation, every test whose source mentions cupy,
            gpu_available, nvcc, nvrtc or NCCL), so new GPU tests join without editing this file.
            Writes ``pytest.txt`` (the output, ``-rA``) and ``pytest_junit.xml``.
``bench``   ``benchmarks/bench_gpu.py --quick``: training step of ``small`` (B=64) and of one
            ``cifar10-paper`` coupling layer vs the PyTorch twins on CUDA (TF32 off, then on), peak GPU
            memory, sampling 8 and 64 images, 10 optimiser steps ours vs the twin from one state.
            Its JSON is rewritten after every part (a stage killed at its budget keeps what it finished).
``train``   ``small`` on CIFAR-10 ``data_batch_1`` (10,000 images) for ``--train-minutes``
            (4; shortened if the earlier stages left less of ``--total-budget``), then the EMA
            model's test bits/dim on ``test_batch`` (as many images as fit in ``--eval-seconds``),
            and 64 samples. Writes ``train_curve.png`` and ``samples.png``.

Compiled kernels: the stages share ``CUPY_CACHE_DIR`` and ``NUMBA_CACHE_DIR`` under one temporary
folder, packed at the end into ``caches.tgz`` (when under 15 MiB); ``--caches caches.tgz`` unpacks an
earlier one first, so a rerun on a fresh machine of the same image skips compilation.

Everything goes to ``--out`` (default ``$OUT``, else ``./gpu_check_out``), at most 8 files:
``gpu_check.json`` (device, versions, per-stage status, timings and results),
``gpu_check.log`` (every stage's output), ``pytest.txt``, ``pytest_junit.xml``,
``train_curve.png``, ``samples.png``, ``caches.tgz``.

Data (``--data-dir``): a folder holding ``cifar-10-batches-py/`` (or that folder itself)
with ``data_batch_1`` and ``test_batch`` in the official python layout, each optionally
compressed as ``.xz`` or ``.gz`` (the two raw batches are 59 MiB; the device tool carries
64 MiB in all, the repository included; xz brings them to about 45 MiB). In this
workplace::

    python ../shared/data/make_cifar10.py .gpu_data/raw --batches data_batch_1 test_batch
    python benchmarks/gpu_check.py --pack .gpu_data/raw .gpu_data/cifar10    # xz, ~1 min

(``.gpu_data/`` is in .gitignore). Usage::

    bash benchmarks/gpu_check.sh --data-dir .gpu_data/cifar10           # on the GPU machine
    bash benchmarks/gpu_check.sh --stages pytest,bench --data-dir ...   # rerun some stages
    bash benchmarks/gpu_check.sh --caches caches.tgz --data-dir ...      # reuse an earlier run's kernels
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc              # CPU: the plumbing only

``--backend numpy`` rehearses the real train stage on the CPU (slow: minutes per step there).
``--dry-run`` runs every stage on the CPU with tiny budgets: NumPy backend and PyTorch's CPU,
``pytest -m gpu`` on two test files, ``bench_gpu.py --dry-run``, 2 training steps of ``small``
on random images written in the official layout (or ``--data-dir``'s). Its figures mean nothing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("env", "compile", "pytest", "bench", "train")
MAX_FILES = 8
# seconds per stage on the GPU machine. The train stage's minutes are shortened so that it should end
# TRAIN_RESERVE_S after them (loading, init, kernel compilation, evaluation, samples) within
# --total-budget; it is killed only TRAIN_KILL_S after its minutes (its partial results are kept).
BUDGETS = {"env": 40, "compile": 90, "pytest": 150, "bench": 150}
TRAIN_RESERVE_S = 60
TRAIN_KILL_S = 120
DRY_BUDGETS = {"env": 60, "compile": 120, "pytest": 120, "bench": 240, "train": 180}


# ------------------------------------------------------------------ data
def _batch_file(data_dir, name):
    for d in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        for ext in ("", ".xz", ".gz"):
            p = os.path.join(d, name + ext)
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(f"{data_dir}: no {name}, {name}.xz or {name}.gz in it or in its cifar-10-batches-py/ "
                            "(prepare it as benchmarks/gpu_check.py's docstring says)")


def read_cifar_batch(data_dir, name):
    """(uint8 [N, 32, 32, 3], int64 [N]) of one official CIFAR-10 batch file, raw, .xz or .gz."""
    from flowpp_ref.datasets.cifar import _read_cifar_batch
    path = _batch_file(data_dir, name)
    if path.endswith((".xz", ".gz")):
        import gzip
        import lzma     # imported here: a Python built without lzma still runs the other stages
        opener = lzma.open if path.endswith(".xz") else gzip.open
        with tempfile.TemporaryDirectory() as tmp, opener(path, "rb") as src:
            raw = os.path.join(tmp, name)
            with open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return _read_cifar_batch(raw)
    return _read_cifar_batch(path)


def pack(src, dst, names=("data_batch_1", "test_batch")):
    """xz-compress the batches ``names`` of ``src`` into ``dst/cifar-10-batches-py/NAME.xz``."""
    import lzma
    out = os.path.join(dst, "cifar-10-batches-py")
    os.makedirs(out, exist_ok=True)
    for name in names:
        path = _batch_file(src, name)
        with open(path, "rb") as f, lzma.open(os.path.join(out, name + ".xz"), "wb", preset=6) as g:
            shutil.copyfileobj(f, g, 1 << 20)
        print("wrote", os.path.join(out, name + ".xz"), os.path.getsize(os.path.join(out, name + ".xz")), "bytes")


def write_fake_cifar(dst, n_train=64, n_test=32, seed=0):
    """Random images in the official layout (dry runs and tests)."""
    import pickle

    import numpy as np
    rng = np.random.default_rng(seed)
    d = os.path.join(dst, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, n)]}, f, protocol=4)
    return dst


# ------------------------------------------------------------------ stage workers (in a subprocess)
def stage_env(ctx):
    import numpy as np
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
            "dry_run": ctx["dry_run"]}

    def attempt(key, fn):
        try:
            info[key] = fn()
        except Exception as e:  # recorded, not fatal: the env stage is a report
            info[key] = f"unavailable: {type(e).__name__}: {e}"

    def cupy_info():
        import cupy
        rt = cupy.cuda.runtime
        d = {"version": cupy.__version__, "runtime": rt.runtimeGetVersion(), "driver": rt.driverGetVersion(),
             "devices": rt.getDeviceCount()}
        p = rt.getDeviceProperties(0)
        d.update(name=p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"]),
                 total_memory_gib=p["totalGlobalMem"] / 2 ** 30, compute_capability=f"{p['major']}.{p['minor']}",
                 multiprocessors=p["multiProcessorCount"])
        return d

    def torch_info():
        import torch
        return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr).strip().splitlines()[-3:]

    attempt("cupy", cupy_info)
    attempt("torch", torch_info)
    attempt("numba", lambda: __import__("numba").__version__)
    attempt("scipy", lambda: __import__("scipy").__version__)
    attempt("nvcc", lambda: run(["nvcc", "--version"]))
    attempt("nvidia_smi", lambda: run(["nvidia-smi", "-L"]))
    attempt("flowpp_ref_gpu_available", lambda: importlib.import_module("flowpp_ref.core.backend").gpu_available())
    attempt("git_commit", lambda: subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                 cwd=ROOT, timeout=10).stdout.strip() or None)
    dev = info["cupy"].get("name") if isinstance(info["cupy"], dict) else None
    info["device"] = dev or (info["torch"].get("device") if isinstance(info["torch"], dict) else None) or "no GPU"
    print(json.dumps(info, indent=1))
    return info


def stage_pytest(ctx):
    out = ctx["out"]
    files = ["tests/test_gpu_backend.py", "tests/test_nn_conv.py"] if ctx["dry_run"] else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rA", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors",
           f"--junitxml={os.path.join(out, 'pytest_junit.xml')}", *files, *ctx.get("pytest_args", [])]
    with open(os.path.join(out, "pytest.txt"), "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env())
    with open(os.path.join(out, "pytest.txt")) as f:
        lines = f.read().strip().splitlines()
    summary = lines[-1] if lines else ""
    print(summary)
    res = {"returncode": r.returncode, "summary": summary, "junit": _junit_counts(os.path.join(out, "pytest_junit.xml"))}
    if r.returncode != 0:
        raise StageFailed(f"pytest exited {r.returncode}: {summary}", res)
    return res


def _junit_counts(path):
    try:
        import xml.etree.ElementTree as ET
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except Exception as e:
        return f"unreadable: {e}"


def stage_bench(ctx):
    # bench_gpu.py rewrites its JSON after every part, into this stage's partial-result file: a stage killed
    # at its budget still reports the parts it finished
    path = ctx["partial_path"]
    cmd = [sys.executable, os.path.join(HERE, "bench_gpu.py"), "--dry-run" if ctx["dry_run"] else "--quick",
           "--out", path]          # random images: the step time does not depend on the pixels
    r = subprocess.run(cmd, cwd=ROOT, env=_env())
    if r.returncode != 0:
        raise StageFailed(f"bench_gpu.py exited {r.returncode} (its output is in gpu_check.log)")
    with open(path) as f:
        return json.load(f)


def stage_compile(ctx):
    """Compile every CuPy kernel before the other stages (NVRTC for the RawModules, then one warm-up of each
    path: training step, fused optimiser, sampling, evaluation) so that their timings exclude compilation;
    the kernels land in ``CUPY_CACHE_DIR``, which the check packs into ``caches.tgz`` for a rerun."""
    import numpy as np

    from flowpp_ref.core.backend import get_xp, make_rng, synchronize
    from flowpp_ref.kernels.cuda import attention, layers, mixlogistic, optimizer
    from flowpp_ref.model import FlowPP
    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.training.fused import FusedUpdate
    from flowpp_ref.training.optim import EMA, Adam
    res = {"cupy_cache_dir": os.environ.get("CUPY_CACHE_DIR"), "raw_modules_s": {}, "warmup_s": {}}
    xp = get_xp("numpy" if ctx["dry_run"] else "cupy")
    if not ctx["dry_run"]:
        for mod in (mixlogistic, layers, attention, optimizer):
            t0 = time.perf_counter()
            m = mod._kernels.module()
            if hasattr(m, "compile"):
                m.compile()
            res["raw_modules_s"][mod.__name__.rsplit(".", 1)[1]] = round(time.perf_counter() - t0, 2)
    for preset, dtype in (("small", np.float32), ("tiny", np.float64), ("tiny", np.float32)):
        t0 = time.perf_counter()
        p = get_preset(preset)
        x = np.random.default_rng(0).integers(0, 256, (8, *p.model.image_shape)).astype(np.uint8)
        model = FlowPP(p.model, seed=0, xp=xp, dtype=dtype)
        model.data_init(x, rng=np.random.default_rng(1))
        loss, grads = model.loss_and_grads(x[:4], rng=make_rng(2, xp), train=True)
        FusedUpdate(model, Adam(model.parameters()), EMA(model.parameters())).step(grads, loss, 1e-4, 1.0)
        model.sample(2, rng=make_rng(3, xp))
        model.bits_per_dim(x[:4], rng=make_rng(4, xp))
        synchronize(xp)
        res["warmup_s"][f"{preset}-{np.dtype(dtype).name}"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(res, indent=1))
    return res


def stage_train(ctx):
    """Train, plot the curve, evaluate, sample; each finished part is saved as a partial result first."""
    import numpy as np

    from flowpp_ref.core.backend import make_rng
    from flowpp_ref.cli.plotting import plot_training_curve, save_sample_grid
    from flowpp_ref.training.evaluation import use_ema
    from flowpp_ref.training.loop import train
    dry = ctx["dry_run"]
    res = {"preset": "small"}

    def partial(**kw):
        res.update(kw)
        if ctx.get("partial_path"):
            with open(ctx["partial_path"] + ".tmp", "w") as f:
                json.dump(res, f, indent=1, default=str)
            os.replace(ctx["partial_path"] + ".tmp", ctx["partial_path"])

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = ctx.get("data_dir") or write_fake_cifar(os.path.join(tmp, "fake"))
        t0 = time.perf_counter()
        x_train = read_cifar_batch(data_dir, "data_batch_1")[0]
        x_test = read_cifar_batch(data_dir, "test_batch")[0]
        backend = "numpy" if dry else ctx.get("backend", "cupy")
        minutes = ctx["train_minutes"]
        partial(backend=backend, train_images=int(len(x_train)), batch_size=ctx["train_batch"],
                minutes_budget=minutes, load_seconds=time.perf_counter() - t0)
        run_dir = os.path.join(tmp, "run")
        log = os.path.join(run_dir, "log.jsonl")
        t0 = time.perf_counter()
        s = train("small", x_train, None, out_dir=run_dir, minutes=minutes, steps=2 if dry else None,
                  backend=backend, progress=False,
                  overrides={"batch_size": ctx["train_batch"], **({"init_batch_size": 8} if dry else {})})
        hist = s["history"]
        title = f"small on CIFAR-10 data_batch_1, {backend}, {minutes:.2g} min"
        plot_training_curve(log, os.path.join(ctx["out"], "train_curve.png"), smooth=20, title=title)
        partial(train_seconds=time.perf_counter() - t0, steps=s["steps"], skipped_steps=s["skipped_steps"],
                num_parameters=s["num_parameters"], final_train_bpd=s["final_train_bpd"],
                train_bpd_last100_mean=float(np.mean([h["train_bpd"] for h in hist[-100:]])) if hist else None,
                img_per_s_last=hist[-1].get("img_per_s") if hist else None)
        model, ema = s["model"], s["ema"]
        with use_ema(model, ema):
            # test bits/dim of the EMA parameters: as many test images as fit in eval_seconds
            eb, rng = ctx["eval_batch"], make_rng(12345, model.xp)
            vals, t0 = [], time.perf_counter()
            for i in range(0, len(x_test), eb):
                vals.append(model.bits_per_dim(x_test[i:i + eb], rng=rng))
                if time.perf_counter() - t0 > ctx["eval_seconds"]:
                    break
            v = np.concatenate(vals)
            with open(log, "a") as f:
                f.write(json.dumps({"step": s["steps"], "test_bpd": float(v.mean())}) + "\n")
            plot_training_curve(log, os.path.join(ctx["out"], "train_curve.png"), smooth=20, title=title)
            partial(test_bpd_ema=float(v.mean()), test_bpd_sem=float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1
                    else None, test_images=int(len(v)), eval_seconds=time.perf_counter() - t0)
            n_samples = 4 if dry else 64
            t0 = time.perf_counter()
            model.sample(min(8, n_samples), rng=make_rng(1, model.xp))          # warm-up (kernel compilation)
            t_warm = time.perf_counter() - t0
            imgs, t_sample = model.sample(n_samples, rng=make_rng(2, model.xp), return_time=True)
            _, t_sample8 = model.sample(8, rng=make_rng(3, model.xp), return_time=True)
        save_sample_grid(imgs, os.path.join(ctx["out"], "samples.png"), nrow=8, scale=2)
        partial(sample_seconds={str(n_samples): t_sample, "8": t_sample8, "first_call_warmup": t_warm})
        print(json.dumps(res, indent=1))
        return res


class StageFailed(RuntimeError):
    def __init__(self, msg, result=None):
        super().__init__(msg)
        self.result = result


WORKERS = {"env": stage_env, "compile": stage_compile, "pytest": stage_pytest, "bench": stage_bench,
           "train": stage_train}
CACHE_ROOT = os.path.join(tempfile.gettempdir(), "flowpp_gpu_check_cache")    # CUPY_CACHE_DIR, NUMBA_CACHE_DIR
CACHE_ARCHIVE = "caches.tgz"
CACHE_MAX_BYTES = 15 * 2 ** 20          # the device tool returns files up to 16 MiB


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def restore_caches(archive):
    """Unpack a ``caches.tgz`` of an earlier check (CuPy's and numba's compiled kernels) into CACHE_ROOT."""
    import tarfile
    os.makedirs(CACHE_ROOT, exist_ok=True)
    with tarfile.open(archive) as tf:
        tf.extractall(CACHE_ROOT, filter="data")
    return sum(len(files) for _, _, files in os.walk(CACHE_ROOT))


def save_caches(out):
    """Pack CACHE_ROOT into ``out/caches.tgz`` for the next check (skipped above CACHE_MAX_BYTES)."""
    import tarfile
    if not os.path.isdir(CACHE_ROOT):
        return None
    path = os.path.join(out, CACHE_ARCHIVE)
    with tarfile.open(path + ".tmp", "w:gz") as tf:
        for name in ("cupy", "numba"):
            if os.path.isdir(os.path.join(CACHE_ROOT, name)):
                tf.add(os.path.join(CACHE_ROOT, name), arcname=name)
    size = os.path.getsize(path + ".tmp")
    if size > CACHE_MAX_BYTES:
        os.remove(path + ".tmp")
        return f"not saved: {size} bytes"
    os.replace(path + ".tmp", path)
    return size


def _worker_main(name, ctx_path, result_path):
    with open(ctx_path) as f:
        ctx = json.load(f)
    try:
        res = {"status": "ok", "result": WORKERS[name](ctx)}
    except StageFailed as e:
        res = {"status": "failed", "error": str(e), "result": e.result}
    except BaseException as e:
        traceback.print_exc()
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-4000:]}
    with open(result_path, "w") as f:
        json.dump(res, f, indent=1, default=str)


# ------------------------------------------------------------------ driver
def run_stage(name, cmd, budget_s, log, result_path=None, cwd=ROOT):
    """Run one stage's command with a time limit; never raises. Returns the stage's record."""
    t0 = time.perf_counter()
    log.write(f"\n===== stage {name} (budget {budget_s:.0f} s): {' '.join(cmd)}\n")
    log.flush()
    rec = {"budget_s": round(budget_s, 1)}
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rec.update(status="timeout", error=f"ran past its budget of {budget_s:.0f} s and was killed")
            rc = None
            partial = (result_path or "") + ".partial"
            if result_path and os.path.exists(partial):
                with open(partial) as f:
                    rec["result"] = json.load(f)       # what the stage had finished before the kill
        if rc is not None:
            res = None
            if result_path and os.path.exists(result_path):
                with open(result_path) as f:
                    res = json.load(f)
            if res is not None:
                rec.update(res)
            else:
                rec["status"] = "ok" if rc == 0 else "failed"
            if rc != 0 and rec.get("status") == "ok":
                rec["status"] = "failed"
            if rc != 0:
                rec.setdefault("error", f"exit status {rc}")
            rec["returncode"] = rc
    except Exception as e:   # could not even start it
        rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    log.write(f"===== stage {name}: {rec.get('status')} in {rec['seconds']} s"
              + (f" ({rec['error']})" if rec.get("error") else "") + "\n")
    log.flush()
    return rec


def _kill_group(proc):
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)      # the stage and what it started (pytest, bench workers)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=None, help="output folder [$OUT, else ./gpu_check_out]")
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 folder: data_batch_1 and test_batch (raw/.xz/.gz)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny budgets: prove the plumbing")
    ap.add_argument("--total-budget", type=float, default=450.0,
                    help="seconds for all stages [450]; the train stage is shortened to fit")
    ap.add_argument("--train-minutes", type=float, default=4.0)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=500)
    ap.add_argument("--eval-seconds", type=float, default=25.0)
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments (one string)")
    ap.add_argument("--backend", default="cupy", choices=["cupy", "numpy"],
                    help="the train stage's backend [cupy]; numpy: a CPU rehearsal of the real train stage")
    ap.add_argument("--caches", default=None, help=f"a {CACHE_ARCHIVE} of an earlier check: compiled kernels to reuse")
    ap.add_argument("--pack", nargs=2, metavar=("SRC", "DST"), help="xz-compress data_batch_1 and test_batch; exit")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return _worker_main(*a.worker)
    if a.pack:
        return pack(*a.pack)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    out = os.path.abspath(a.out or os.environ.get("OUT") or "gpu_check_out")
    os.makedirs(out, exist_ok=True)
    if a.data_dir:
        a.data_dir = os.path.abspath(a.data_dir)
    report = {"script": "benchmarks/gpu_check.py", "dry_run": a.dry_run, "argv": sys.argv[1:],
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": None,
              "total_budget_s": a.total_budget, "stages": {}}
    t_start = time.perf_counter()
    if not a.dry_run:      # compiled kernels in one folder that the check packs up for a rerun
        os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(CACHE_ROOT, "cupy"))
        os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(CACHE_ROOT, "numba"))
    if a.caches and os.path.isfile(a.caches):
        report["caches_restored_files"] = restore_caches(a.caches)
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(out, "gpu_check.log"), "w") as log:
        for name in stages:
            ctx = {"out": out, "dry_run": a.dry_run, "data_dir": a.data_dir, "train_batch": 8 if a.dry_run else a.train_batch,
                   "eval_batch": 8 if a.dry_run else a.eval_batch, "eval_seconds": 1.0 if a.dry_run else a.eval_seconds,
                   "pytest_args": a.pytest_args.split(), "backend": a.backend}
            left = a.total_budget - (time.perf_counter() - t_start)
            if name == "train":
                minutes = min(a.train_minutes, max(0.25, (left - TRAIN_RESERVE_S) / 60))
                ctx["train_minutes"] = 0.05 if a.dry_run else minutes
                budget = DRY_BUDGETS["train"] if a.dry_run else ctx["train_minutes"] * 60 + TRAIN_KILL_S
            else:
                budget = DRY_BUDGETS[name] if a.dry_run else min(BUDGETS[name], max(left, 10))
            ctx_path, res_path = os.path.join(tmp, f"{name}.ctx.json"), os.path.join(tmp, f"{name}.res.json")
            ctx["partial_path"] = res_path + ".partial"
            with open(ctx_path, "w") as f:
                json.dump(ctx, f)
            print(f"[gpu_check] stage {name} (budget {budget:.0f} s) ...", flush=True)
            rec = run_stage(name, [sys.executable, os.path.abspath(__file__), "--worker", name, ctx_path, res_path],
                            budget, log, res_path)
            report["stages"][name] = rec
            if name == "env" and isinstance(rec.get("result"), dict):
                report["device"] = rec["result"].get("device")
            print(f"[gpu_check] stage {name}: {rec['status']} in {rec['seconds']} s"
                  + (f" -- {rec['error']}" if rec.get("error") else ""), flush=True)
            _write_report(out, report, t_start)
    report["caches_saved_bytes"] = None if a.dry_run else save_caches(out)
    report = _write_report(out, report, t_start)
    print(_summary(report))
    return report


def _write_report(out, report, t_start):
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    report["files"] = sorted(os.listdir(out)) + ([] if "gpu_check.json" in os.listdir(out) else ["gpu_check.json"])
    if len(report["files"]) > MAX_FILES:
        report["warning"] = f"{len(report['files'])} files in {out}: the device tool returns at most {MAX_FILES}"
    path = os.path.join(out, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return report


def _summary(report):
    lines = [f"[gpu_check] device: {report['device']}; {report['seconds']:.0f} s in all"]
    for name, rec in report["stages"].items():
        lines.append(f"  {name:<7s} {rec['status']:<8s} {rec['seconds']:7.1f} s" +
                     (f"  {rec['error']}" if rec.get("error") else ""))
    r = report["stages"].get("train", {}).get("result") or {}
    if r:
        lines.append(f"  train: {r.get('steps')} steps in {r.get('train_seconds', 0):.0f} s, test bpd (EMA) "
                     f"{r.get('test_bpd_ema')} on {r.get('test_images')} images")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
