"""Training Flow++ on CIFAR-10 on the CPU: uniform vs variational dequantization, and the
whole-model training step of flowpp_ref vs its PyTorch autograd twin.

Part 1, one run per dequantization (``--dequant uniform,variational``), each in its own
worker process (so that its peak memory is its own), from the same seed and data:

* train the preset (default ``small``) with ``flowpp_ref.training.loop.train`` (the preset's recipe:
  Adam, warm-up, clipping, EMA, data-dependent init) for ``--minutes`` of wall-clock time;
* test bits/dim with the EMA parameters on the first ``--eval-batches`` batches of
  ``--eval-batch-size`` test images (fixed images, fixed noise seed: the same for every run);
* training images/s: ``(steps - 1) * batch / (t_last - t_first)`` from the end times of
  the optimiser steps (the first step, which may compile numba kernels, is left out);
* sampling images/s: ``--sample-batch`` images from the EMA model (after one warm-up call
  of 2 images), the best of ``--sample-repeats`` calls;
* peak memory: ``ru_maxrss`` of the worker (the whole run: data, model, Adam, EMA, the
  steps), and the tracemalloc peak of one extra training step (NumPy reports its buffers
  to tracemalloc: this is the memory of the activations and gradients of one step).
  ``train_seconds`` in the JSON is the whole ``train`` call (data-dependent init included).

Part 2, one training step (forward + backward of the mean bits/dim, the noise draw
included, no optimiser update) of the same model (``--step-dequant``, default
variational = Flow++) in float32, flowpp_ref vs ``tests/torch_twin.py``'s ``TorchFlowPP``:
an init worker builds the model, runs the data-dependent init on an init batch of
training images and saves the parameters and one training batch; then "ours" and "torch"
workers (``--rounds`` each, interleaved) load them, do one warm-up step and ``--repeats``
timed steps. Every worker runs with the same thread count (``--threads``, default 2):
``OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS`` and ``torch.set_num_threads``. Reported: the fastest
step of each side (median too) and the ratio ours / torch; the torch worker also checks
that the twin's float32 loss equals ours on the same noise (absolute difference).

Data: ``--data-dir DIR`` holding ``cifar-10-batches-py/`` (the official python layout).
The training batches present there are used (all five when complete; e.g. only
``data_batch_1`` is fine for a benchmark) and ``test_batch``.

Usage (the figures take about 2 x minutes + 15 min at the small preset on 2 cores; first unpack
the official ``cifar-10-python.tar.gz`` into /tmp/cifar)::

    python benchmarks/bench_training.py --data-dir /tmp/cifar --minutes 20 --out bench_training.json
    python benchmarks/bench_training.py --data-dir /tmp/cifar --minutes 0.5 --eval-batches 2 \\
        --eval-batch-size 16 --sample-repeats 1 --repeats 1 --rounds 1 --out /tmp/smoke.json    # smoke run
    python benchmarks/bench_training.py --show bench_training.json                           # the tables again
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from _common import maxrss_bytes, median, thread_env, time_numpy_steps, time_twin_steps  # benchmarks/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ----------------------------------------------------------------- helpers








def load_cifar(data_dir):
    """(train uint8 [N,32,32,3], test uint8 [10000,32,32,3], names of the train batches used)."""
    from flowpp_ref.datasets import DataError
    from flowpp_ref.datasets.cifar import CIFAR10_DIR, CIFAR10_TRAIN_BATCHES, _read_cifar_batch, load_cifar10
    try:
        train, _ = load_cifar10(data_dir, "train")
        used = list(CIFAR10_TRAIN_BATCHES)
    except DataError:                       # an incomplete set of training batches: use those present
        import numpy as np
        d = os.path.join(data_dir, CIFAR10_DIR)
        used = [n for n in CIFAR10_TRAIN_BATCHES if os.path.isfile(os.path.join(d, n))]
        if not used:
            raise
        train = np.concatenate([_read_cifar_batch(os.path.join(d, n))[0] for n in used])
    test, _ = load_cifar10(data_dir, "test")
    return train, test, used


# ----------------------------------------------------------------- part 1: training runs
def worker_train(a):
    import tracemalloc

    import numpy as np

    from flowpp_ref.core.backend import make_rng
    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.training.evaluation import evaluate, use_ema
    from flowpp_ref.training.loop import train

    tr, te, used = load_cifar(a.data_dir)
    overrides = {"dequantization": a.dequant, "seed": a.seed}
    p = get_preset(a.preset, **overrides)
    bs = p.train.batch_size
    ends = []
    t0 = time.perf_counter()
    s = train(a.preset, tr, None, minutes=a.minutes, progress=False, overrides=overrides,
              on_step=lambda step, rec: ends.append(time.perf_counter()))
    t_train = time.perf_counter() - t0
    model, ema = s["model"], s["ema"]
    hist = [h["train_bpd"] for h in s["history"]]
    ips = (len(ends) - 1) * bs / (ends[-1] - ends[0]) if len(ends) >= 2 else None

    with use_ema(model, ema):
        t1 = time.perf_counter()
        ev = evaluate(model, te, batch_size=a.eval_batch_size, max_batches=a.eval_batches, seed=a.seed)
        t_eval = time.perf_counter() - t1
        model.sample(2, rng=make_rng(1))                                   # warm-up
        dts = [model.sample(a.sample_batch, rng=make_rng(2 + i), return_time=True)[1]
               for i in range(a.sample_repeats)]
    maxrss = maxrss_bytes()

    batch = tr[np.random.default_rng(a.seed).permutation(len(tr))[:bs]]
    tracemalloc.start()
    model.loss_and_grads(batch, rng=make_rng(0), train=True)
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dict(dequantization=a.dequant, preset=a.preset, batch_size=bs, train_batches=used,
                num_train_images=int(len(tr)), num_parameters=int(s["num_parameters"]),
                steps=int(s["steps"]), skipped_steps=int(s["skipped_steps"]), train_seconds=t_train,
                train_img_per_s=ips, train_bpd_first=hist[0] if hist else None,
                train_bpd_last10=float(np.mean(hist[-10:])) if hist else None,
                test_bpd_ema=ev["bpd"], test_bpd_sem=ev["bpd_sem"], test_images=ev["num_images"],
                eval_seconds=t_eval, sample_batch=a.sample_batch, sample_seconds=dts,
                sample_img_per_s=a.sample_batch / min(dts), peak_rss_mb=maxrss / 2**20,
                step_tracemalloc_peak_mb=tm_peak / 2**20)


# ----------------------------------------------------------------- part 2: step time, ours vs torch
def _step_preset(a):
    from flowpp_ref.model.presets import get_preset
    return get_preset(a.preset, dequantization=a.step_dequant, seed=a.seed)


def worker_step_init(a):
    import numpy as np

    from flowpp_ref.core.backend import make_rng
    from flowpp_ref.training.loop import build_model
    tr, _, _ = load_cifar(a.data_dir)
    p = _step_preset(a)
    perm = np.random.default_rng([a.seed, 99]).permutation(len(tr))
    model = build_model(p)
    model.data_init(tr[perm[:p.train.init_batch_size]], rng=make_rng(0))
    x = tr[perm[-p.train.batch_size:]]
    np.savez(a.path, x=x, **{"p:" + k: v for k, v in model.parameters().items()})
    return dict(ok=True)


def _load_step(a):
    import numpy as np

    from flowpp_ref.training.loop import build_model
    z = np.load(a.path)
    model = build_model(_step_preset(a))
    model.load_parameters({k[2:]: z[k] for k in z.files if k.startswith("p:")})
    return model, z["x"]


def worker_step_ours(a):
    import numpy as np
    model, x = _load_step(a)
    return time_numpy_steps(model, x, np.random.default_rng(1), a.repeats)


def worker_step_torch(a):
    import numpy as np
    import torch
    from torch_twin import TorchFlowPP

    torch.set_num_threads(a.threads)
    model, x = _load_step(a)
    twin = TorchFlowPP(model, dtype=torch.float32)
    gen = np.random.default_rng(1)
    timed = time_twin_steps(twin, x, gen, a.repeats)
    with torch.no_grad():                                           # same loss on the same noise?
        lt = float(twin.loss(x, rng=np.random.default_rng(7), train=True))
    lo = float(model.loss(x, rng=np.random.default_rng(7), train=True)[0])
    return dict(**timed, torch_threads=torch.get_num_threads(),
                loss_ours=lo, loss_torch=lt, loss_abs_diff=abs(lo - lt), torch_version=torch.__version__)


# ----------------------------------------------------------------- driver
WORKERS = {"train": worker_train, "step_init": worker_step_init, "step_ours": worker_step_ours,
           "step_torch": worker_step_torch}


def _run_worker(a, worker, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--data-dir", a.data_dir,
           "--preset", a.preset, "--minutes", str(a.minutes), "--threads", str(a.threads), "--seed", str(a.seed),
           "--eval-batches", str(a.eval_batches), "--eval-batch-size", str(a.eval_batch_size),
           "--sample-batch", str(a.sample_batch), "--sample-repeats", str(a.sample_repeats),
           "--repeats", str(a.repeats), "--step-dequant", a.step_dequant, *extra]
    res = subprocess.run(cmd, env=thread_env(a.threads), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {worker} {list(extra)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(v, f, width):
    return format("-" if v is None else format(v, f), f">{width}s")


def print_tables(results):
    """The human-readable summary of a results dict (also: python bench_training.py --show FILE)."""
    if results["runs"]:
        r0 = results["runs"][0]
        print(f"\nCIFAR-10 ({r0['num_train_images']} training images from {','.join(r0['train_batches'])}), "
              f"preset {results['preset']}, batch {r0['batch_size']}, {results['minutes_per_run']:g} min per run, "
              f"{results['threads']} threads, float32")
        print(f"{'dequantization':<14s} {'params':>8s} {'steps':>6s} {'train img/s':>11s} {'test bpd (EMA)':>16s} "
              f"{'sample img/s':>12s} {'peak RSS MB':>11s} {'step tracemalloc MB':>19s}")
        for r in results["runs"]:
            bpd = f"{r['test_bpd_ema']:.4f}+-{r['test_bpd_sem']:.4f}"
            print(f"{r['dequantization']:<14s} {r['num_parameters']:>8d} {r['steps']:>6d} "
                  f"{_fmt(r['train_img_per_s'], '.2f', 11)} {bpd:>16s} {r['sample_img_per_s']:>12.2f} "
                  f"{r['peak_rss_mb']:>11.0f} {r['step_tracemalloc_peak_mb']:>19.0f}")
        print(f"(test bpd on {r0['test_images']} test images; sampling batch {r0['sample_batch']})")
    if "step_compare" in results:
        s = results["step_compare"]
        print(f"\nwhole-model training step (forward + backward), {results['preset']}, {s['dequantization']} "
              f"dequantization, float32, {results['threads']} threads:")
        for side, label in (("ours", "flowpp_ref"), ("torch", f"torch {s['torch_version']}")):
            print(f"  {label:<18s} {s[side]['step_s']:8.3f} s (median {s[side]['step_median_s']:.3f} s), "
                  f"peak RSS +{s[side]['peak_rss_delta_mb']:.0f} MB")
        print(f"  ratio flowpp_ref / torch: {s['ratio_ours_over_torch']:.2f}x (min), {s['ratio_median']:.2f}x "
              f"(median); float32 loss ours {s['loss_ours_float32']:.6f} vs torch {s['loss_torch_float32']:.6f} "
              f"(|diff| {s['loss_abs_diff_float32']:.1e})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="directory holding cifar-10-batches-py/ (required unless --show)")
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dequant", default="uniform,variational", help="training runs, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=16, help="test batches for the EMA bits/dim")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=16, help="images per sampling call (16 or 64)")
    ap.add_argument("--sample-repeats", type=int, default=2)
    ap.add_argument("--step-dequant", default="variational", help="model of the ours-vs-torch step timing")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per step worker (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="step workers per side, interleaved")
    ap.add_argument("--skip-train", action="store_true", help="only the ours-vs-torch step timing")
    ap.add_argument("--skip-step", action="store_true", help="only the training runs")
    ap.add_argument("--show", default=None, metavar="JSON", help="print the tables of a results file and exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.show:
        with open(a.show) as f:
            print_tables(json.load(f))
        return
    if not a.data_dir:
        ap.error("--data-dir is required")

    if a.worker:                                       # subprocess entry points
        if a.worker == "train":
            a.dequant = a.dequant.split(",")[0]
        print(json.dumps(WORKERS[a.worker](a)))
        return

    results = dict(preset=a.preset, minutes_per_run=a.minutes, threads=a.threads, seed=a.seed, dtype="float32",
                   device="CPU", python=platform.python_version(), machine=platform.machine(),
                   cpu_count=os.cpu_count(), started=time.strftime("%Y-%m-%d %H:%M:%S"), runs=[])
    t_all = time.perf_counter()
    if not a.skip_train:
        for dq in a.dequant.split(","):
            print(f"[train] {a.preset}, {dq} dequantization, {a.minutes:g} min, {a.threads} threads ...", flush=True)
            r = _run_worker(a, "train", ["--dequant", dq])
            results["runs"].append(r)
            print(f"  {r['steps']} steps, test bpd (EMA) {r['test_bpd_ema']:.4f}", flush=True)
    if not a.skip_step:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "step.npz")
            print(f"[step] {a.preset}, {a.step_dequant} dequantization: ours vs torch, {a.rounds} x "
                  f"{a.repeats} steps per side ...", flush=True)
            _run_worker(a, "step_init", ["--path", path])
            raw = {"ours": [], "torch": []}
            for _ in range(a.rounds):                   # interleaved, so that outside load hits both sides
                for side in raw:
                    raw[side].append(_run_worker(a, f"step_{side}", ["--path", path]))
        step = dict(dequantization=a.step_dequant, statistic="min over all timed steps (median also given)")
        for side, rs in raw.items():
            ts = [t for r in rs for t in r["times"]]
            step[side] = dict(step_s=min(ts), step_median_s=median(ts), times=ts,
                              warmup_s=[r["warmup"] for r in rs],
                              peak_rss_delta_mb=max(r["peak_rss_delta_mb"] for r in rs))
        tr = raw["torch"][0]
        step.update(ratio_ours_over_torch=step["ours"]["step_s"] / step["torch"]["step_s"],
                    ratio_median=step["ours"]["step_median_s"] / step["torch"]["step_median_s"],
                    torch_threads=tr["torch_threads"], torch_version=tr["torch_version"],
                    loss_ours_float32=tr["loss_ours"], loss_torch_float32=tr["loss_torch"],
                    loss_abs_diff_float32=tr["loss_abs_diff"])
        results["step_compare"] = step
    results["total_seconds"] = time.perf_counter() - t_all

    print_tables(results)
    print(f"total {results['total_seconds'] / 60:.1f} min")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
