"""Benchmark: mixture-of-logistics kernels (numba) vs the plain NumPy reference, and inverse CDFs.

(a) Throughput at the paper's coupling shape -- batch 64, one checkerboard half of CIFAR-10
    (32 x 16 x 3 elements), K = 32 components -- of the fused forward (log F, log(1-F), log p),
    its backward, and the inverse CDF (bisection and hybrid, default per-dtype tolerances), numba
    vs the plain NumPy reference (``kernels_enabled(False)``), both measured in the same run.
    Numba is warmed up first (compilation and thread-pool start are excluded).
(b) Inverse CDF, float64: mixture evaluations per element and time to reach |x - x_true| < 1e-6
    for the release's bisection vs the safeguarded Newton hybrid (x_true: hybrid at tol 1e-13,
    checked against bisection at tol 1e-13).

Parameters are drawn as spread-out mixtures (logits ~ N(0,1), means ~ N(0,1), log-scales ~
U(-2, 0.5), x ~ N(0, 1.5^2), targets y ~ U(1e-5, 1 - 1e-5)); at the coupling's initialisation
(outputs of scale 0.1) the components nearly coincide, which makes every method look faster.

Times: minimum (and median) over ``--repeats`` runs, wall clock; the kernels run on at most 2
threads (``NUMBA_NUM_THREADS`` is capped at 2; the kernels split their work over
``numba.get_num_threads()`` Python threads), the NumPy reference on one. Also the process CPU
time (all threads), steadier than the wall clock on a shared machine.

    python benchmarks/bench_mixlogistic.py --out results.json --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ["NUMBA_NUM_THREADS"] = str(min(2, int(os.environ.get("NUMBA_NUM_THREADS", "2"))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from flowpp_ref.bijections import mixlogistic as ml  # noqa: E402
from flowpp_ref.kernels import kernels_enabled  # noqa: E402


def timeit(fn, repeats):
    """Wall-clock min/median over repeats, and the process CPU time of the fastest run
    (all threads; on a shared machine it is steadier than the wall clock)."""
    ts, cpu = [], []
    out = None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(min_s=min(ts), median_s=float(np.median(ts)), cpu_s=cpu[int(np.argmin(ts))],
                min_cpu_s=min(cpu), runs=len(ts)), out


def make_inputs(args, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (args.batch, args.height, args.width, args.channels)
    K = args.components
    x = rng.normal(size=shape) * 1.5
    logits = rng.normal(size=shape + (K,))
    means = rng.normal(size=shape + (K,))
    logscales = rng.uniform(-2.0, 0.5, size=shape + (K,))
    y = rng.uniform(1e-5, 1 - 1e-5, size=shape)
    gs = [rng.normal(size=shape) for _ in range(3)]
    cast = [np.ascontiguousarray(a, dtype=dtype) for a in (x, logits, means, logscales, y)]
    return cast, [g.astype(dtype) for g in gs]


def part_a(args):
    rows = []
    for dtype in (np.float32, np.float64):
        (x, logits, means, logscales, y), gs = make_inputs(args, dtype, args.seed)
        params = (logits, means, logscales)
        cases = {
            "forward": lambda: ml.mixlogistic_cdf_pdf(x, *params),
            "backward": lambda: ml.mixlogistic_cdf_pdf_backward(x, *params, *gs),
            "inverse_bisection": lambda: ml.mixlogistic_invcdf(y, *params, method="bisection"),
            "inverse_hybrid": lambda: ml.mixlogistic_invcdf(y, *params, method="hybrid"),
        }
        for name, fn in cases.items():
            res = {}
            for path in ("numba", "numpy_reference"):
                with kernels_enabled(path == "numba"):
                    if path == "numba":
                        fn()                                   # warm-up: compile, start threads
                    t, out = timeit(fn, args.repeats)
                res[path] = t
                if name.startswith("inverse"):
                    res[path]["evals_per_element"] = out[1]["evals_per_element"]
            row = dict(dtype=np.dtype(dtype).name, op=name, numba=res["numba"], reference=res["numpy_reference"],
                       speedup_min=res["numpy_reference"]["min_s"] / res["numba"]["min_s"],
                       speedup_median=res["numpy_reference"]["median_s"] / res["numba"]["median_s"],
                       cpu_ratio=res["numpy_reference"]["min_cpu_s"] / res["numba"]["min_cpu_s"])
            rows.append(row)
            print(f"(a) {row['dtype']:7s} {name:18s} numba {res['numba']['min_s'] * 1e3:9.1f} ms   "
                  f"numpy {res['numpy_reference']['min_s'] * 1e3:9.1f} ms   "
                  f"speed-up {row['speedup_min']:5.1f}x (median {row['speedup_median']:5.1f}x, "
                  f"CPU time {row['cpu_ratio']:5.1f}x)", flush=True)
    return rows


def part_b(args):
    (x, logits, means, logscales, y), _ = make_inputs(args, np.float64, args.seed + 1)
    params = (logits, means, logscales)
    n = y.size
    with kernels_enabled(True):
        x_true, _ = ml.mixlogistic_invcdf(y, *params, method="hybrid", tol=1e-13)
        x_bis, _ = ml.mixlogistic_invcdf(y, *params, method="bisection", tol=1e-13)
    truth_check = float(np.max(np.abs(x_true - x_bis)))
    rows = []
    for label, tol in (("reach_1e-6 (tol 5e-7)", 5e-7), ("release_tol (1e-10)", 1e-10)):
        for method in ("bisection", "hybrid"):
            for path in ("numba", "numpy_reference"):
                with kernels_enabled(path == "numba"):
                    if path == "numba":
                        ml.mixlogistic_invcdf(y, *params, method=method, tol=tol)
                    t, (xs, info) = timeit(lambda: ml.mixlogistic_invcdf(y, *params, method=method, tol=tol),
                                           args.repeats)
                err = float(np.max(np.abs(xs - x_true)))
                row = dict(target=label, tol=tol, method=method, path=path, time=t,
                           evals_per_element=info["evals_per_element"], max_evals=info["max_evals"],
                           max_abs_error=err, reached_1e_6=err < 1e-6)
                rows.append(row)
                print(f"(b) {label:22s} {method:9s} {path:15s} evals/elem {info['evals_per_element']:6.2f} "
                      f"(max {info['max_evals']:3d})  time {t['min_s'] * 1e3:9.1f} ms  max|x-x*| {err:.1e}",
                      flush=True)
    summary = {}
    for label in {r["target"] for r in rows}:
        for path in ("numba", "numpy_reference"):
            b = next(r for r in rows if r["target"] == label and r["method"] == "bisection" and r["path"] == path)
            h = next(r for r in rows if r["target"] == label and r["method"] == "hybrid" and r["path"] == path)
            summary[f"{label} / {path}"] = dict(
                eval_ratio=b["evals_per_element"] / h["evals_per_element"],
                time_ratio=b["time"]["min_s"] / h["time"]["min_s"])
    for k, v in sorted(summary.items()):
        print(f"(b) {k:40s} bisection/hybrid: evaluations {v['eval_ratio']:5.1f}x, time {v['time_ratio']:5.1f}x")
    return dict(elements=n, truth_max_disagreement=truth_check, rows=rows, summary=summary)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--components", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", choices=["a", "b"], default=None, help="skip part a or b")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    config = dict(vars(args), elements=args.batch * args.height * args.width * args.channels,
                  numba_threads=numba.get_num_threads(), numba_version=numba.__version__,
                  numpy_version=np.__version__, machine=platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count(), load_average_before=list(os.getloadavg()))
    print(f"shape {args.batch}x{args.height}x{args.width}x{args.channels}, K={args.components}, "
          f"numba threads {config['numba_threads']}, load average {config['load_average_before']}", flush=True)
    results = dict(config=config)
    if args.skip != "a":
        results["throughput"] = part_a(args)
    if args.skip != "b":
        results["inverse_accuracy"] = part_b(args)
    results["config"]["load_average_after"] = list(os.getloadavg())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
