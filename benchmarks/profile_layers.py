"""Where a training step's time goes, per layer kind: wall time of every layer's forward and backward,
its children's time taken out, summed over the model.

For each configuration of ``bench_efficiency.py`` (``--configs``; default ``small``, ``cpu-bench``,
``peer32``) one worker process wraps ``forward`` / ``backward`` (and the bijections' ``inverse``) of
every layer class of flowpp_ref with a timer that subtracts the time of the layers called inside it
(*exclusive* time), runs one warm-up step and ``--steps`` timed ``loss_and_grads`` steps, and prints
per class: the milliseconds per step in forward and backward, and the share of the step. The
step time with the timers is printed beside the step time without them (their overhead). A
class's own time is what its code does outside its child layers: ``Conv2d`` and ``NIN`` the
weight-normed convolutions (im2col / matrix products), ``GatedResNet`` its concat_elu, gate and
residual adds, ``SelfAttention`` the projections' reshapes and the fused attention,
``MixLogisticAttnCoupling`` the mixture-of-logistics CDF, ``FlowPP`` the loss outside the flows.

Usage::

    python benchmarks/profile_layers.py --out benchmarks/results/profile_layers.json
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys
import time

from _common import ROOT, thread_env

METHODS = ("forward", "backward", "inverse", "inverse_with_cache", "inverse_backward")


def _instrument(totals, stack):
    """Wrap METHODS of every flowpp_ref Module subclass: exclusive wall time into totals[(class, kind)]."""
    import flowpp_ref.bijections as bij
    import flowpp_ref.model as model_pkg
    import flowpp_ref.nn as nn
    from flowpp_ref.core.module import Module

    seen = set()
    for pkg in (nn, bij, model_pkg):
        for modname in list(sys.modules):
            if not modname.startswith(pkg.__name__):
                continue
            for _, cls in inspect.getmembers(sys.modules[modname], inspect.isclass):
                if issubclass(cls, Module) and cls not in seen:
                    seen.add(cls)
                    for m in METHODS:
                        if m in cls.__dict__:
                            setattr(cls, m, _timed(cls.__dict__[m], cls.__name__,
                                                   "backward" if "backward" in m else "forward", totals, stack))


def _timed(fn, cname, kind, totals, stack):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stack.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            child = stack.pop()
            if stack:
                stack[-1] += dt
            key = (cname, kind)
            totals[key] = totals.get(key, 0.0) + dt - child
    return wrapper


def worker(config, steps):
    import flowpp_ref
    flowpp_ref.tune_threads()
    import numpy as np
    from bench_efficiency import CONFIGS

    from flowpp_ref.core.backend import make_rng
    from flowpp_ref.datasets import load_default_dataset
    from flowpp_ref.model.flowpp import FlowPP
    from flowpp_ref.model.presets import get_preset

    name, ov = CONFIGS[config]
    p = get_preset(name, **ov)
    model = FlowPP(p.model, seed=0)
    x = load_default_dataset("train")[0][:max(p.train.batch_size, p.train.init_batch_size)]
    model.data_init(x[:p.train.init_batch_size], rng=make_rng(1, np))
    xb, gen = x[:p.train.batch_size], make_rng(2, np)

    def timed_steps():
        model.loss_and_grads(xb, rng=gen)                     # warm-up
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model.loss_and_grads(xb, rng=gen)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    plain = timed_steps()
    totals, stack = {}, []
    _instrument(totals, stack)
    timed_steps()                                              # warm-up of the wrappers' totals discarded
    totals.clear()
    with_timers = timed_steps()
    rows = sorted(((c, k, v / (steps + 1)) for (c, k), v in totals.items()), key=lambda r: -r[2])
    print(json.dumps(dict(config=config, step_s=plain, step_with_timers_s=with_timers,
                          layers=[dict(layer=c, pass_=k, ms=1e3 * v) for c, k, v in rows])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,cpu-bench,peer32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.steps)
    results = []
    for config in a.configs.split(","):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", config, "--steps", str(a.steps)],
                           env=thread_env(a.threads), cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        step_ms = 1e3 * res["step_with_timers_s"]
        print(f"\n{config}: step {1e3 * res['step_s']:.0f} ms ({step_ms:.0f} ms with the timers), {a.threads} threads")
        by_layer = {}
        for row in res["layers"]:
            by_layer.setdefault(row["layer"], {})[row["pass_"]] = row["ms"]
        print(f"  {'layer':28s} {'forward ms':>10s} {'backward ms':>11s} {'share':>6s}")
        for layer, d in sorted(by_layer.items(), key=lambda kv: -sum(kv[1].values())):
            tot = sum(d.values())
            print(f"  {layer:28s} {d.get('forward', 0):10.1f} {d.get('backward', 0):11.1f} {tot / step_ms:6.1%}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(threads=a.threads, steps=a.steps, results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
