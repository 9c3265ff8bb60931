"""How close a CPU training step comes to the machine: FLOPs per second against this machine's sgemm,
cold start, memory, and the effect of importing PyTorch first.

For each configuration (``--configs``; default ``small``, ``cpu-bench``, ``peer32``: the ``small``
layout with 32 filters, 2 blocks, 8 components, a 4-coupling dequantizer with 32 components, batch 16),
one worker process per environment (as set up, and with ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE``
unset in that worker alone, ``--envs``) measures, with ``--threads`` threads:

* **sgemm**: the best of ``--gemm-repeats`` float32 products of two 2048 x 2048 matrices (NumPy's
  BLAS), in GFLOP/s, in the same process just before the steps;
* **step**: ``model.loss_and_grads`` (forward and backward, no optimiser) at the preset's batch,
  one warm-up then ``--repeats`` timed steps, min and median;
* **efficiency**: the step's FLOPs (:func:`flowpp_ref.model.flops.step_flops`: the matrix products,
  forward and backward) divided by the min step time, as a fraction of the sgemm rate;
* **memory**: the tracemalloc peak of one more step (NumPy's buffers) and the growth of ru_maxrss;
* with ``--torch-first``, the same step time in a worker that ran ``import torch;
  torch.set_num_threads(threads)`` before importing flowpp_ref (torch computes nothing).

**Cold start** (``--cold-start``): the time from starting ``python -c`` to the end of the first
training step of ``flowpp_ref.training.loop.train`` (``steps=1``, data-dependent init included) on the
embedded images: with an empty numba cache (``NUMBA_CACHE_DIR`` a new folder) and ``FLOWPP_WARMUP=off``
(every kernel compiled by the training process), with an empty cache as a user's first run has it (the
backward kernels compiled alongside by :mod:`flowpp_ref.training.warmup`), then with the cache that run
filled. The worker with ``--torch-first`` calls ``flowpp_ref.tune_threads()`` after importing torch, as
the worker without it does; its JSON row has ``threads_report`` (what was re-tuned).

Usage::

    python benchmarks/bench_efficiency.py --out benchmarks/results/bench_efficiency.json --cold-start --torch-first
    python benchmarks/bench_efficiency.py --quick          # small only, 2 repeats, as set up
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, maxrss_bytes, median, thread_env

CONFIGS = {
    "small": ("small", {}),
    "cpu-bench": ("cpu-bench", {}),
    "peer32": ("small", dict(filters=32, blocks=2, components=8, dequant_couplings=4, dequant_components=32,
                             batch_size=16)),
}


def worker(a):
    if a.torch_first:
        import torch
        torch.set_num_threads(a.threads)
    import flowpp_ref
    flowpp_ref.tune_threads()
    import tracemalloc

    from flowpp_ref.runtime.threads import thread_report

    import numpy as np

    from flowpp_ref.core.backend import make_rng
    from flowpp_ref.datasets import load_default_dataset
    from flowpp_ref.model.flops import step_flops
    from flowpp_ref.model.flowpp import FlowPP
    from flowpp_ref.model.presets import get_preset

    n = 2048
    A, B = (np.random.default_rng(i).standard_normal((n, n)).astype(np.float32) for i in (0, 1))
    gemm = []
    for _ in range(a.gemm_repeats):
        t0 = time.perf_counter()
        A @ B
        gemm.append(time.perf_counter() - t0)
    gflops_gemm = 2 * n ** 3 / min(gemm) / 1e9
    name, ov = CONFIGS[a.worker]
    p = get_preset(name, **ov)
    model = FlowPP(p.model, seed=0)
    x = load_default_dataset("train")[0][:max(p.train.batch_size, p.train.init_batch_size)]
    model.data_init(x[:p.train.init_batch_size], rng=make_rng(1, np))
    xb, gen = x[:p.train.batch_size], make_rng(2, np)
    times = []
    for _ in range(a.repeats + 1):
        t0 = time.perf_counter()
        model.loss_and_grads(xb, rng=gen, train=True)
        times.append(time.perf_counter() - t0)
    rss0 = maxrss_bytes()
    tracemalloc.start()
    model.loss_and_grads(xb, rng=gen, train=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    fl = step_flops(model, p.train.batch_size)
    step = min(times[1:])
    print(json.dumps(dict(config=a.worker, gemm_gflops=gflops_gemm, step_min_s=step, step_median_s=median(times[1:]),
                          warmup_s=times[0], flops=fl["total"], flops_by_kind=fl["by_kind"],
                          step_gflops=fl["total"] / step / 1e9, efficiency=fl["total"] / step / 1e9 / gflops_gemm,
                          tracemalloc_peak_mb=peak / 2 ** 20, maxrss_growth_mb=(maxrss_bytes() - rss0) / 2 ** 20,
                          torch_first=a.torch_first, batch=p.train.batch_size,
                          openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"), threads_report=thread_report())))


COLD = """
import time, sys
t_start = float(sys.argv[1])
import flowpp_ref
from flowpp_ref.datasets import load_default_dataset
from flowpp_ref.training.loop import train
x = load_default_dataset("train")[0]
first = []
train("{preset}", x, steps=1, progress=False, on_step=lambda s, r: first.append(time.time()),
      overrides=dict(log_every=1, **{overrides}))
print("FIRST_STEP_S", first[0] - t_start)
"""


def cold_start(preset: str, overrides: dict, threads: int) -> dict:
    """Seconds from process start to the end of the first step: empty numba cache without the background
    compile (``FLOWPP_WARMUP=off``), empty cache with it (the default), then the warm cache."""
    out = {}
    for label in ("cold_no_warmup", "cold", "warm"):
        if label != "warm":
            cache = tempfile.mkdtemp(prefix="numba-cold-")
        env = thread_env(threads)
        env["NUMBA_CACHE_DIR"] = cache
        if label == "cold_no_warmup":
            env["FLOWPP_WARMUP"] = "off"
        t0 = time.time()
        code = COLD.format(preset=preset, overrides=repr(overrides))
        r = subprocess.run([sys.executable, "-c", code, repr(t0)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_STEP_S")]
        if r.returncode or not line:
            raise RuntimeError(f"cold-start worker failed:\n{r.stderr[-3000:]}")
        out[label] = float(line[0].split()[1])
        _wait_for_warmup(cache)             # the background compile of a cold run finishes before the next run
    return out


def _wait_for_warmup(cache, limit_s=300):
    t0 = time.time()
    while glob.glob(os.path.join(cache, "**", "flowpp-warmup.lock"), recursive=True) and time.time() - t0 < limit_s:
        time.sleep(0.5)


def run_worker(config, args, unset, torch_first):
    env = thread_env(args.threads)
    if unset:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    cmd = [sys.executable, __file__, "--worker", config, "--threads", str(args.threads), "--repeats",
           str(args.repeats), "--gemm-repeats", str(args.gemm_repeats)] + (["--torch-first"] if torch_first else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"worker {config} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["env"] = "openblas-unset" if unset else "as set up"
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--envs", nargs="+", default=["as-set", "unset"], choices=["as-set", "unset"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gemm-repeats", type=int, default=5)
    ap.add_argument("--torch-first", action="store_true", help="also time each step with torch imported first")
    ap.add_argument("--cold-start", action="store_true", help="also time the first step, cold and warm numba cache")
    ap.add_argument("--quick", action="store_true", help="small only, as set up, 2 repeats")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.quick:
        a.configs, a.envs, a.repeats = ["small"], ["as-set"], 2
    rows = []
    for config in a.configs:
        for env in a.envs:
            for tf in ([False, True] if a.torch_first else [False]):
                r = run_worker(config, a, env == "unset", tf)
                rows.append(r)
                print(f"{config:10s} {r['env']:15s} torch first: {str(tf):5s} step {r['step_min_s']:.3f} s "
                      f"(median {r['step_median_s']:.3f})  {r['flops'] / 1e9:.2f} GFLOP -> {r['step_gflops']:.1f} "
                      f"GFLOP/s; sgemm {r['gemm_gflops']:.1f} GFLOP/s; efficiency {100 * r['efficiency']:.1f}%; "
                      f"peak {r['tracemalloc_peak_mb']:.0f} MB", flush=True)
    result = {"rows": rows, "threads": a.threads, "repeats": a.repeats}
    if a.cold_start:
        result["cold_start"] = {c: cold_start(*CONFIGS[c], a.threads) for c in a.configs}
        for c, v in result["cold_start"].items():
            print(f"cold start {c}: {v['cold']:.1f} s with an empty numba cache ({v['cold_no_warmup']:.1f} s without "
                  f"the background compile, FLOWPP_WARMUP=off), {v['warm']:.1f} s warm")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
