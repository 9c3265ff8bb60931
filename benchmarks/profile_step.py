"""cProfile of the whole-model training step, with the self-attention layers' share split off.

Runs ``--steps`` training steps (``loss_and_grads``, batch 16, float32) of a configuration of
``bench_step.py`` (default ``cpu-bench``) under cProfile with the *process CPU time* as the
clock (user + system; steadier than wall time on a shared machine, best with ``--threads 1``),
after one warm-up step, and prints the total per step, the part inside
``SelfAttention.forward`` / ``SelfAttention.backward``, the rest ("non-attention"), and the
functions with the most own time. It profiles whichever flowpp_ref is first on the path, so

    PYTHONPATH=. python benchmarks/profile_step.py --threads 1
    PYTHONPATH=/path/to/checkout-of-1037e47 python benchmarks/profile_step.py --threads 1

compare today's code with a baseline. ``--out`` writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-bench")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU time (all threads; the default), wall: elapsed time (where a "
                         "step waits on one thread, with --threads 2)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[k] = str(a.threads)                       # before numpy / numba load
    import cProfile
    import pstats
    import time

    import flowpp_ref  # noqa: E402

    flowpp_ref.tune_threads()  # first, as the CLI does: before NumPy loads OpenBLAS
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_step import CONFIGS
    from flowpp_ref.core.backend import make_rng
    from flowpp_ref.datasets import load_default_dataset
    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.training.loop import build_model

    p = get_preset("small", **CONFIGS[a.config])
    imgs = load_default_dataset("train")[0]
    model = build_model(p)
    model.data_init(imgs[:p.train.init_batch_size], rng=make_rng(0))
    x = imgs[-p.train.batch_size:]
    gen = np.random.default_rng(1)
    model.loss_and_grads(x, rng=gen, train=True)             # warm-up (numba compile / cache load)
    pr = cProfile.Profile(time.process_time if a.clock == "cpu" else time.perf_counter)
    pr.enable()
    for _ in range(a.steps):
        model.loss_and_grads(x, rng=gen, train=True)
    pr.disable()
    st = pstats.Stats(pr)
    total = st.total_tt / a.steps
    attn = 0.0
    for (fn, _, name), (_, _, _, ct, _) in st.stats.items():
        if fn.endswith(os.path.join("nn", "attention.py")) and name in ("forward", "backward"):
            attn += ct
    attn /= a.steps
    rows = sorted(((tt / a.steps, ct / a.steps, nc // a.steps, f"{os.path.basename(fn)}:{ln}({name})")
                   for (fn, ln, name), (_, nc, tt, ct, _) in st.stats.items()), reverse=True)
    print(f"flowpp_ref from {os.path.dirname(flowpp_ref.__file__)}; {a.config}, batch {p.train.batch_size}, "
          f"{a.threads} thread(s), {a.steps} steps; "
          f"{'CPU time (user + system)' if a.clock == 'cpu' else 'wall time'} per step:")
    print(f"  total {total:.3f} s   self-attention (forward + backward) {attn:.3f} s   non-attention "
          f"{total - attn:.3f} s")
    print(f"  {'own s':>7s} {'cum s':>7s} {'calls':>6s}  function (per step)")
    for tt, ct, nc, name in rows[:a.top]:
        print(f"  {tt:7.3f} {ct:7.3f} {nc:6d}  {name}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(source=os.path.dirname(flowpp_ref.__file__), config=a.config, threads=a.threads, clock=a.clock,
                           steps=a.steps, total_s=total, attention_s=attn, non_attention_s=total - attn,
                           top=[dict(own_s=r[0], cum_s=r[1], calls=r[2], function=r[3]) for r in rows[:a.top]]),
                      f, indent=2)


if __name__ == "__main__":
    main()
