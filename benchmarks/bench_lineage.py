"""Flow++ and the flows it improves on, trained for the same minutes on the CPU: ``small``,
``realnvp-small``, ``glow-small`` (any presets with ``--presets``).

One worker process per preset (its own peak memory), one after the other, each with the same
thread count (``--threads``, default 2), seed, data and evaluation:

* train with ``flowpp_ref.training.loop.train`` (each preset's own recipe: Flow++ and RealNVP Adam,
  Glow Adamax; warm-up, clipping, EMA) for ``--minutes`` of wall-clock time (data-dependent init
  included);
* test bits/dim with the EMA parameters (the ELBO, k = 1, uniform noise for RealNVP/Glow and the
  variational dequantizer's for Flow++) on the first ``--eval-images`` test images, fixed noise seed;
* steps, training images/s (the steps between the first and the last read-back of the losses, every
  5 steps, over the time between them: the first steps, which compile numba kernels, left out),
  parameters, peak resident memory.

Data: ``--data-dir DIR`` holding ``cifar-10-batches-py/`` (the official python layout), or
``--data default`` for the embedded 4,000/1,000-image subset.

Usage::

    python benchmarks/bench_lineage.py --data-dir /tmp/cifar --minutes 10 --out benchmarks/results/lineage.json
    python benchmarks/bench_lineage.py --data default --minutes 0.2 --eval-images 32 --out /tmp/smoke.json
    python benchmarks/bench_lineage.py --show benchmarks/results/lineage.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from _common import ROOT, maxrss_bytes, thread_env

PRESETS = ("small", "realnvp-small", "glow-small")


def worker(a):
    import flowpp_ref
    flowpp_ref.tune_threads()
    import numpy as np

    from flowpp_ref.datasets import load_cifar10, load_default_dataset
    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.training.evaluation import evaluate, use_ema
    from flowpp_ref.training.loop import train
    if a.data == "default":
        tr, te = load_default_dataset("train")[0], load_default_dataset("test")[0]
    else:
        tr, te = load_cifar10(a.data_dir, "train")[0], load_cifar10(a.data_dir, "test")[0]
    times = []
    t0 = time.perf_counter()
    s = train(a.worker, tr, te, minutes=a.minutes, progress=False, overrides=dict(eval_batches=1, log_every=5),
              on_step=lambda step, rec: times.append((step, time.perf_counter())))
    train_s = time.perf_counter() - t0
    model, ema = s["model"], s["ema"]
    with use_ema(model, ema):
        r = evaluate(model, te[:a.eval_images], batch_size=32, k=1, seed=1)
    p = model.cfg
    batch = get_preset(a.worker).train.batch_size
    # steps are read back every log_every steps: from the first read-back (compilation behind it) to the last
    ips = ((times[-1][0] - times[0][0]) * batch / (times[-1][1] - times[0][1])
           if len(times) > 1 and times[-1][1] > times[0][1] else None)
    return {"preset": a.worker, "family": p.family, "parameters": s["num_parameters"], "steps": s["steps"],
            "train_seconds": train_s, "train_images_per_s": ips, "final_train_bpd": s["final_train_bpd"],
            "test_bpd_ema": r["bpd"], "eval_images": r["num_images"], "maxrss_bytes": maxrss_bytes(),
            "history": [(h["step"], h["train_bpd"]) for h in s["history"]]}


def show(res):
    print(f"{'preset':<16}{'family':<9}{'parameters':>11}{'steps':>7}{'img/s':>8}{'train bpd':>11}"
          f"{'test bpd (EMA)':>16}{'peak MB':>9}")
    for r in res["runs"]:
        ips = f"{r['train_images_per_s']:.1f}" if r["train_images_per_s"] else "-"
        print(f"{r['preset']:<16}{r['family']:<9}{r['parameters']:>11,}{r['steps']:>7}{ips:>8}"
              f"{r['final_train_bpd']:>11.4f}{r['test_bpd_ema']:>16.4f}{r['maxrss_bytes'] / 2**20:>9.0f}")
    print(f"({res['minutes']:g} min each, {res['threads']} threads, data {res['data']}, "
          f"{res['runs'][0]['eval_images']} test images)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--data", default="cifar10", choices=("cifar10", "default"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--eval-images", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--show", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.show:
        with open(a.show) as f:
            show(json.load(f))
        return 0
    if a.worker:
        print("RESULT " + json.dumps(worker(a)))
        return 0
    if a.data == "cifar10" and not a.data_dir:
        ap.error("--data cifar10 needs --data-dir (a folder holding cifar-10-batches-py/), or use --data default")
    runs = []
    for name in a.presets.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--data", a.data,
               "--minutes", str(a.minutes), "--eval-images", str(a.eval_images)]
        if a.data_dir:
            cmd += ["--data-dir", a.data_dir]
        res = subprocess.run(cmd, env=thread_env(a.threads), capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            raise SystemExit(f"worker {name} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        runs.append(json.loads(line[-1][7:]))
        print(f"{name}: {runs[-1]['steps']} steps, test bpd (EMA) {runs[-1]['test_bpd_ema']:.4f}", flush=True)
    out = {"minutes": a.minutes, "threads": a.threads, "data": a.data if a.data == "default" else "CIFAR-10 (JPEG q75)",
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "runs": runs,
           "command": "python benchmarks/bench_lineage.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    show(out)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
