"""Benchmark: one self-attention layer's attention, explicit path vs fused kernels, in one process.

Explicit = today's path before the fused kernels (``attention_ref`` / ``attention_backward_ref``:
BLAS matrix products, the numba row softmax, the ``[B, h, T, T]`` weights kept for the backward);
fused = :mod:`flowpp_ref.kernels.numba.attention` (online softmax, weights recomputed).
Shapes default to the ``cpu-bench`` attention: B = 16, 4 heads, d = 8, T = 512, float32.
Both paths get the same strided q, k, v views of one qkv array, as in the layer.

Reported per path: forward alone (what sampling runs) and forward + backward (training),
minimum and median wall time over ``--repeats`` interleaved runs, and the minimum process CPU
time (all threads; steadier than wall time on a shared machine). Threads: as the environment
sets them (``OPENBLAS_NUM_THREADS``, ``NUMBA_NUM_THREADS``); numba is warmed up first.

    python benchmarks/attention_kernels.py --repeats 15 --out attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flowpp_ref  # noqa: E402

flowpp_ref.tune_threads()  # first, as the CLI does: before NumPy loads OpenBLAS
#                                   OpenBLAS loads; else the explicit path's spinning BLAS threads slow
#                                   the fused kernels run next to them)
import numba  # noqa: E402
import numpy as np  # noqa: E402

from flowpp_ref.kernels.numba import attention as numba_attention  # noqa: E402
from flowpp_ref.nn.attention import attention_backward_ref, attention_ref  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layer", action="store_true",
                    help="also time the whole SelfAttention layer (projections, gate; F = heads * d, "
                         "T = 16 x (T / 16) positions), fused against fused=False")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    B, h, T, d = a.batch, a.heads, a.T, a.d
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3, h, d)).astype(a.dtype)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    dA = rng.standard_normal((B, T, h, d)).astype(a.dtype).transpose(0, 2, 1, 3)   # as the layer has it

    def explicit_fb():
        w, _ = attention_ref(q, k, v)
        attention_backward_ref(q, k, v, w, dA)

    def fused_fb():
        out, lse = numba_attention.attention_forward(q, k, v)
        numba_attention.attention_backward(q, k, v, out, lse, dA)

    cases = {"explicit_forward": lambda: attention_ref(q, k, v),
             "fused_forward": lambda: numba_attention.attention_forward(q, k, v),
             "explicit_forward_backward": explicit_fb, "fused_forward_backward": fused_fb}
    if a.layer:
        from flowpp_ref.nn.attention import SelfAttention
        F = h * d
        x = rng.standard_normal((B, 16, T // 16, F)).astype(a.dtype)
        pos = (0.1 * rng.standard_normal((16, T // 16, F))).astype(a.dtype)
        dout = rng.standard_normal(x.shape).astype(a.dtype)
        layers = {}
        for name, fused in (("explicit", False), ("fused", True)):
            layers[name] = SelfAttention(F, heads=h, rng=np.random.default_rng(1), dtype=np.dtype(a.dtype).type,
                                         fused=fused)
            layers[name].data_init(x, pos)

        def layer_fb(att):
            out, cache = att.forward(x, pos, train=True)
            att.backward(dout, cache)

        for name, att in layers.items():
            cases[f"{name}_layer_forward"] = (lambda att=att: att.forward(x, pos))
            cases[f"{name}_layer_forward_backward"] = (lambda att=att: layer_fb(att))
    for f in cases.values():
        f()
    wall = {n: [] for n in cases}
    cpu = {n: [] for n in cases}
    for _ in range(a.repeats):                      # interleaved: both paths see the same load
        for n, f in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    res = {"shape": dict(B=B, heads=h, T=T, d=d, dtype=a.dtype), "repeats": a.repeats,
           "numba_threads": numba.get_num_threads(),
           "openblas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
           "load_average": os.getloadavg(),
           "times_ms": {n: dict(wall_min=1e3 * min(wall[n]), wall_median=1e3 * statistics.median(wall[n]),
                                cpu_min=1e3 * min(cpu[n])) for n in cases}}
    t = res["times_ms"]
    parts = ("forward", "forward_backward") + (("layer_forward", "layer_forward_backward") if a.layer else ())
    res["speedup"] = {f"{part}_{kind}": t[f"explicit_{part}"][kind] / t[f"fused_{part}"][kind]
                      for part in parts for kind in ("wall_min", "cpu_min")}
    for n, x in t.items():
        print(f"{n:28s} wall min {x['wall_min']:8.1f} ms  median {x['wall_median']:8.1f} ms  cpu min {x['cpu_min']:8.1f} ms")
    print("speed-up (explicit / fused):", {k: round(v, 2) for k, v in res["speedup"].items()},
          "| load average", tuple(round(x, 1) for x in res["load_average"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
