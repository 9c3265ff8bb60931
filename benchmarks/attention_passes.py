"""Benchmark: what bounds the fused attention's inner passes on this CPU (one thread, float32).

Times each inner loop of :mod:`flowpp_ref.kernels.numba.attention` on its own (key rows of 512
floats in L1, the pass called ``--calls`` times from a compiled loop, minimum of ``--repeats``),
and two references measured the same way: the clock (a chain of dependent float adds, 3 cycles
each on AMD Zen 4 and Intel since Skylake: pass ``--add-latency`` for another CPU) and the rate of
64-byte loads (a loop that only sums 8 rows, with rows 2 KB apart and 64 bytes further apart).
Prints and writes (``--out``) cycles per 16 keys x 2 query rows (the ``axpy`` pass: 16 keys x 8
rows x 4 channels) next to the number of 512-bit multiply-adds each pass does, which is the
bound if one such instruction issues per cycle (Zen 4).

    python benchmarks/attention_passes.py --out benchmarks/results/attention_passes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flowpp_ref  # noqa: E402

flowpp_ref.tune_threads()  # first, as the CLI does: before NumPy loads OpenBLAS
import numba  # noqa: E402
import numpy as np  # noqa: E402

from flowpp_ref.kernels import NUMBA_OPTS  # noqa: E402
from flowpp_ref.kernels.numba import attention as na  # noqa: E402

F32 = np.float32
OPTS = dict(NUMBA_OPTS, cache=False)
KN = 512


@numba.njit(cache=False)
def _add_chain(n):
    x = 0.0
    for _ in range(n):
        x = x + 1.0                      # one dependent float add per iteration
    return x


@numba.njit(**OPTS)
def _sum8(k0, k1, k2, k3, k4, k5, k6, k7):
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = F32(0)
    for jj in range(k0.size):
        a0 += k0[jj]
        a1 += k1[jj]
        a2 += k2[jj]
        a3 += k3[jj]
        a4 += k4[jj]
        a5 += k5[jj]
        a6 += k6[jj]
        a7 += k7[jj]
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7


@numba.njit(**OPTS)
def _loads(R, n, kn):
    s = F32(0)
    for _ in range(n):
        s += _sum8(R[0, :kn], R[1, :kn], R[2, :kn], R[3, :kn], R[4, :kn], R[5, :kn], R[6, :kn], R[7, :kn])
    return s


@numba.njit(**OPTS)
def _set_max(O, R, X, n, kn):
    s = 0
    for _ in range(n):
        a, _b = na._set8_2_max(O[0, :kn], O[1, :kn], kn, X, 0, 0, np.int32(0), np.int32(0), R[0, :kn], R[1, :kn],
                               R[2, :kn], R[3, :kn], R[4, :kn], R[5, :kn], R[6, :kn], R[7, :kn])
        s += a
    return s


@numba.njit(**OPTS)
def _exp_dot(O, R, X, n, kn):
    s = F32(0)
    for _ in range(n):
        a, _b = na._exp_dot8_2(O[0, :kn], O[1, :kn], kn, F32(0), F32(0), F32(0), R[8, :kn], R[9, :kn], R[10, :kn],
                               R[11, :kn], R[12, :kn], R[13, :kn], R[14, :kn], R[15, :kn])
        s += a[0]
    return s


@numba.njit(**OPTS)
def _p_ds(O, R, X, n, kn):
    for _ in range(n):
        na._p_ds8_2(O[0, :kn], O[1, :kn], O[2, :kn], O[3, :kn], kn, F32(1), F32(1), F32(1), F32(1), X, X, 0,
                    R[0, :kn], R[1, :kn], R[2, :kn], R[3, :kn], R[4, :kn], R[5, :kn], R[6, :kn], R[7, :kn],
                    R[8, :kn], R[9, :kn], R[10, :kn], R[11, :kn], R[12, :kn], R[13, :kn], R[14, :kn], R[15, :kn])
    return F32(0)


@numba.njit(**OPTS)
def _dot(O, R, X, n, kn):
    s = F32(0)
    for _ in range(n):
        a, _b = na._dot8_2(O[0, :kn], O[1, :kn], kn, F32(0), R[0, :kn], R[1, :kn], R[2, :kn], R[3, :kn],
                           R[4, :kn], R[5, :kn], R[6, :kn], R[7, :kn])
        s += a[0]
    return s


@numba.njit(**OPTS)
def _axpy(O, R, X, n, kn):
    for _ in range(n):
        na._axpy8x4(O[0, :kn], O[1, :kn], O[2, :kn], O[3, :kn], kn, X, 0, R[0, :kn], R[1, :kn], R[2, :kn],
                    R[3, :kn], R[4, :kn], R[5, :kn], R[6, :kn], R[7, :kn])
    return F32(0)


# pass, kernel, 512-bit multiply-adds per 16 keys (x 2 rows; axpy: x 8 rows x 4 channels), what it computes
PASSES = [
    ("_set8_2_max", _set_max, 16, "S = c q . k for 2 rows, row maxima (forward)"),
    ("_exp_dot8_2", _exp_dot, 36, "exp(S - m), sums and P v for 2 rows (forward; the exp ~10 multiply-adds)"),
    ("_p_ds8_2", _p_ds, 56, "P = exp(S - L), dP = dA . v, dS for 2 rows (backward)"),
    ("_dot8_2", _dot, 16, "dq += dS k for 2 rows (backward)"),
    ("_axpy8x4", _axpy, 32, "dk^T / dv^T += 8 rows x 4 channels (backward)"),
]


def _best(f, args, repeats):
    f(*args[:-2], 2, args[-1])                                     # compile, warm
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--add-latency", type=float, default=3.0, help="cycles of one dependent float add")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    n_chain = 100_000_000
    _add_chain(10)
    t = min(_timed(_add_chain, n_chain) for _ in range(3))
    ghz = n_chain * a.add_latency / t / 1e9
    print(f"clock: {ghz:.2f} GHz (dependent float adds, {a.add_latency:g} cycles each)")
    rng = np.random.default_rng(0)
    res = dict(clock_ghz=ghz, add_latency=a.add_latency, keys=KN, calls=a.calls, repeats=a.repeats,
               machine=platform.processor() or platform.machine(), numba=numba.__version__, loads={}, passes={})
    for pad in (0, 16):
        R = rng.random((8, KN + pad)).astype(F32)
        s = _best(_loads, (R, a.calls, KN), a.repeats)
        cyc = s / a.calls * ghz * 1e9 / (8 * KN * 4 / 64)
        res["loads"][f"rows {(KN + pad) * 4} bytes apart"] = dict(cycles_per_64B_load=cyc, bytes_per_cycle=64 / cyc)
        print(f"loads, rows {(KN + pad) * 4} bytes apart: {cyc:.2f} cycles per 64-byte load ({64 / cyc:.1f} B/cycle)")
    R = rng.standard_normal((16, KN + 16)).astype(F32)
    O = np.zeros((8, KN + 16), F32)
    X = (0.3 * rng.standard_normal((8, 8))).astype(F32)
    for name, f, fmas, what in PASSES:
        O[:] = -1.0
        s = _best(f, (O, R, X, a.calls, KN), a.repeats)
        cyc = s / a.calls * ghz * 1e9 / (KN / 16)
        res["passes"][name] = dict(cycles_per_16_keys=cyc, multiply_adds_512bit=fmas, computes=what)
        print(f"{name:12s} {cyc:6.1f} cycles per 16 keys ({fmas} multiply-adds): {what}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
        print("wrote", a.out)


def _timed(f, n):
    t = time.perf_counter()
    f(n)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
