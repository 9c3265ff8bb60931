"""Data-parallel training on the CPU: 1 process x T threads against N processes x T/N threads.

For every preset (``--presets``, default ``small`` and ``cpu-bench`` where that preset
exists) and every layout (``--layouts``, default ``1x2,2x1``: ranks x threads per rank),
one run of ``--steps`` timed training steps (after ``--warmup`` untimed ones) on the
embedded CIFAR-10 subset (``flowpp_ref/datasets/default_images.npz``; no data directory
needed), with the training loop's own functions
(:func:`flowpp_ref.training.loop.shard_loss_and_grads`, :class:`flowpp_ref.runtime.distributed.FlatBuffer`,
Adam, EMA). A layout with one rank runs as a plain process (no MPI, as a user runs it);
more ranks run under ``mpiexec -n N``. Every worker sets ``OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS``
to its thread count. Per step, on every rank:

* ``compute``: loss and gradients of the rank's shard (``batch / N`` images);
* ``allreduce``: the one all-reduce of the flat buffer (gradients + 5 scalars), waiting
  included: it also holds the time the rank waits for the slowest rank;
* ``update``: clipping, Adam and EMA;
* ``step``: the three together; images/s = global batch / median step time (rank 0);
* ``allreduce_alone``: after the timed steps, a barrier then ``--reduce-repeats``
  all-reduces of the same buffer (median): the cost of the transfer without imbalance.

Bytes per step: the buffer's size (each rank sends about 2 (N-1)/N times that in a ring
all-reduce). Output: a table on stdout and a JSON file (``--out``).

Usage (the figures take a few minutes per preset on 2 otherwise idle cores)::

    python benchmarks/bench_distributed.py --out benchmarks/results/bench_distributed.json
    python benchmarks/bench_distributed.py --quick --out /tmp/bd.json        # smoke run (about a minute)
    python benchmarks/bench_distributed.py --show benchmarks/results/bench_distributed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import median, thread_env  # noqa: E402


# ------------------------------------------------------------------ worker
def worker(a):
    sys.path.insert(0, ROOT)
    import numpy as np
    from flowpp_ref.runtime import distributed as dist
    from flowpp_ref.training import loop as T
    from flowpp_ref.datasets import load_default_dataset
    from flowpp_ref.training.optim import EMA, Adam, clip_scale, global_grad_norm_array, warmup_lr

    comm = dist.get_comm()
    ov = {"batch_size": a.batch_size} if a.batch_size else {}
    p = T.get_preset(a.preset, **ov)
    tc = p.train
    if tc.batch_size % comm.size:
        raise SystemExit(f"batch {tc.batch_size} does not divide among {comm.size} ranks")
    x = load_default_dataset("train")[0]
    model = T.build_model(p, "numpy", np.float32)
    init = np.random.default_rng([tc.seed, 99]).permutation(len(x))[:min(tc.init_batch_size, a.init_batch)]
    model.data_init(x[init], rng=T.step_rng(tc.seed, -1, model.xp))
    params = model.parameters()
    dist.broadcast_arrays(comm, params)
    adam, ema = Adam(params), EMA(params, decay=tc.ema_decay)
    fb = dist.FlatBuffer({k: v.shape for k, v in params.items()}, 5, np, np.float32)
    rec = {"compute": [], "allreduce": [], "update": [], "step": []}
    for s in range(a.warmup + a.steps):
        idx = T.batch_indices(len(x), tc.batch_size, tc.seed, s)
        t0 = time.perf_counter()
        loss, grads = T.shard_loss_and_grads(model, x, idx, seed=tc.seed, step=s, comm=comm)
        t1 = time.perf_counter()
        if comm.size > 1:
            fb.pack(grads, [float(loss), 0, 0, 0, 0])
            comm.allreduce(fb.data)
            fb.data *= np.float32(1.0 / comm.size)
            grads, _ = fb.unpack()
        t2 = time.perf_counter()
        gn = global_grad_norm_array(grads)
        adam.step(params, grads, warmup_lr(s + 1, tc.lr, tc.warmup_steps), grad_scale=clip_scale(gn, tc.grad_clip))
        ema.update(params)
        t3 = time.perf_counter()
        if s >= a.warmup:
            for k, v in zip(("compute", "allreduce", "update", "step"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                rec[k].append(v)
    alone = []
    if comm.size > 1:
        comm.barrier()
        for _ in range(a.reduce_repeats):
            t0 = time.perf_counter()
            comm.allreduce(fb.data)
            alone.append(time.perf_counter() - t0)
    dist.check_same_parameters(comm, params, where="after the benchmark steps")
    # gather every rank's medians on rank 0 (an all-reduce of a zero-padded table)
    keys = ("compute", "allreduce", "update", "step")
    tab = np.zeros((comm.size, len(keys)), dtype=np.float64)
    tab[comm.rank] = [median(rec[k]) for k in keys]
    comm.allreduce(tab)
    if comm.rank == 0:
        out = {"preset": a.preset, "ranks": comm.size, "threads": a.threads, "batch": tc.batch_size,
               "steps": a.steps, "num_parameters": model.num_parameters(),
               "bytes_per_step": int(fb.nbytes) if comm.size > 1 else 0,
               "buffer_bytes": int(fb.nbytes),
               "img_per_s": tc.batch_size / median(rec["step"]),
               "rank0": {k: median(v) for k, v in rec.items()},
               "rank0_all_steps": rec,
               "per_rank_medians": {k: tab[:, i].tolist() for i, k in enumerate(keys)},
               "allreduce_alone": median(alone) if alone else 0.0}
        with open(a.result, "w") as f:
            json.dump(out, f)


# -------------------------------------------------------------------- driver
def _mpiexec():
    for cand in (os.path.join(os.path.dirname(sys.executable), "mpiexec"), shutil.which("mpiexec")):
        if cand and os.path.exists(cand):
            return cand
    return None


def run_layout(preset, ranks, threads, a):
    fd, res = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", preset, "--threads", str(threads),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--init-batch", str(a.init_batch),
           "--reduce-repeats", str(a.reduce_repeats), "--result", res]
    if a.batch_size:
        cmd += ["--batch-size", str(a.batch_size)]
    if ranks > 1:
        mpi = _mpiexec()
        if mpi is None:
            raise SystemExit("no mpiexec found: pip install -e '.[distributed]'")
        cmd = [mpi, "-n", str(ranks)] + cmd
    env = thread_env(threads)
    env.pop("FLOWPP_DISTRIBUTED", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{preset} {ranks}x{threads} failed:\n{r.stdout}\n{r.stderr}")
    with open(res) as f:
        out = json.load(f)
    os.remove(res)
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def show(results):
    print(f"{'preset':10s} {'ranks x thr':>11s} {'batch':>5s} {'img/s':>7s} {'step s':>8s} {'compute':>8s} "
          f"{'allred':>8s} {'alone':>8s} {'update':>7s} {'MB/step':>8s}")
    for r in results["runs"]:
        q = r["rank0"]
        print(f"{r['preset']:10s} {r['ranks']:>5d} x {r['threads']:<3d} {r['batch']:>5d} {r['img_per_s']:7.2f} "
              f"{q['step']:8.3f} {q['compute']:8.3f} {q['allreduce']:8.4f} {r['allreduce_alone']:8.4f} "
              f"{q['update']:7.3f} {r['bytes_per_step'] / 1e6:8.3f}")
    for preset in sorted({r["preset"] for r in results["runs"]}):
        rs = {(r["ranks"], r["threads"]): r for r in results["runs"] if r["preset"] == preset}
        if (1, 2) in rs and (2, 1) in rs:
            print(f"{preset}: 2 ranks x 1 thread / 1 rank x 2 threads = "
                  f"{rs[(2, 1)]['img_per_s'] / rs[(1, 2)]['img_per_s']:.2f}x images/s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=None, help="comma-separated presets [small and cpu-bench if it exists]")
    ap.add_argument("--layouts", default="1x2,2x1", help="ranks x threads per rank, comma-separated [1x2,2x1]")
    ap.add_argument("--steps", type=int, default=8, help="timed steps [8]")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (numba compilation) [2]")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch [preset]")
    ap.add_argument("--init-batch", type=int, default=64, help="at most this many images in the init batch [64]")
    ap.add_argument("--reduce-repeats", type=int, default=10, help="all-reduces timed alone [10]")
    ap.add_argument("--quick", action="store_true", help="smoke run: small, batch 8, 2 steps, 1 warm-up")
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("--show", default=None, help="print the tables of a JSON file and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.show:
        with open(a.show) as f:
            return show(json.load(f))
    sys.path.insert(0, ROOT)
    from flowpp_ref.model.presets import PRESETS
    if a.quick:
        a.steps, a.warmup, a.batch_size, a.init_batch, a.reduce_repeats = 2, 1, a.batch_size or 8, 16, 3
        presets = (a.presets or "small").split(",")
    else:
        presets = a.presets.split(",") if a.presets else [p for p in ("small", "cpu-bench") if p in PRESETS]
    layouts = [tuple(int(v) for v in s.split("x")) for s in a.layouts.split(",")]
    runs = []
    for preset in presets:
        for ranks, threads in layouts:
            r = run_layout(preset, ranks, threads, a)
            runs.append(r)
            print(f"{preset} {ranks}x{threads}: {r['img_per_s']:.2f} img/s ({r['wall_seconds']:.0f} s)", flush=True)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
               "quick": a.quick, "steps": a.steps, "warmup": a.warmup, "runs": runs}
    show(results)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
