"""Whole-model training step of flowpp_ref: ours vs today's code (a baseline checkout) vs the
PyTorch twin (explicit attention and ``F.scaled_dot_product_attention``), in the same run.

What is measured, per model configuration (``--configs``, default ``cpu-bench,small``):

* **step**: one training step = ``model.loss_and_grads(x, rng, train=True)`` (forward and
  backward of the mean bits/dim, the noise draw included, no optimiser update) at the
  preset's batch size, float32. Sides (``--sides``):

  - ``ours``       flowpp_ref from this checkout;
  - ``baseline``   flowpp_ref from ``--baseline-src PATH`` (e.g. a checkout of commit 1037e47),
                   put first on PYTHONPATH of its worker (the worker reports which file it imported);
  - ``twin``       ``tests/torch_twin.py``'s ``TorchFlowPP`` (float32, autograd), explicit
                   ``softmax(q k^T / sqrt(d)) v``;
  - ``twin-sdpa``  the same twin with ``torch.nn.functional.scaled_dot_product_attention``.

  Every side starts from the same parameters and batch (an init worker of *this* checkout
  runs the data-dependent init on the bundled images of ``load_default_dataset`` and saves
  both), and reports its float32 loss on one fixed noise draw (they must agree).
  Each side runs in ``--rounds`` worker processes, interleaved (ours, baseline, twin,
  twin-sdpa, ours, ...), each one warm-up step then ``--repeats`` timed steps. Reported:
  min and median over all timed steps, images/s from the min, and ratios of mins.
* **memory of a step**: ``ru_maxrss`` of the worker after its steps minus its RSS before
  the first step (all sides), and for the NumPy sides the tracemalloc peak of one extra step
  (NumPy reports its buffers to tracemalloc; measured after the timing).
* **sampling** (ours and baseline): ``model.sample(n)`` for n in ``--sample-sizes``
  (default 8, 64), min over ``--sample-repeats`` calls after one warm-up call of 2 images.
* **attention micro-benchmark** (ours and baseline): one ``SelfAttention`` layer's own
  forward + backward at B = 16, T = 32 x 16 = 512 positions, 32 filters = 4 heads of d = 8
  (``--attn-*`` to change), min over repeats, and the tracemalloc peak of one forward+backward.
  It measures whatever ``flowpp_ref/nn/attention.py`` of each source does. Beside it, alternating
  with it, the **attention core** alone (q, k, v -> A forward and dA -> dq, dk, dv backward, without
  the projections, gate and residual; see ``_attention_core``).

Configurations are built from explicit ``ModelConfig`` / ``TrainConfig`` fields that exist in
both versions (1037e47 has no ``cpu-bench`` preset): ``cpu-bench`` is ``small`` overridden with
every field of the cpu-bench preset (the worker of this checkout checks that they agree).

Threads: every worker gets ``OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS = --threads`` and
``torch.set_num_threads(--threads)``. The BLAS kernel that runs is reported per worker:
with threadpoolctl when it is installed, else by asking the loaded OpenBLAS library itself
(``openblas_get_corename`` / ``openblas_get_config``, with or without numpy's ``scipy_``
prefix and ``64_`` suffix, through ctypes). ``--unset-openblas-env`` removes
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE from the workers' environment only (the values the
workers ran with are printed and saved).

Timings on a shared machine are noisy: compare the ratios of one run, and the mins.

Usage::

    python benchmarks/bench_step.py --baseline-src /path/to/checkout-of-1037e47 --out benchmarks/results/bench_step.json
    python benchmarks/bench_step.py --baseline-src ../base --unset-openblas-env --out benchmarks/results/bench_step_unset.json
    python benchmarks/bench_step.py --quick                 # a short try (small only, 1 round, 1 repeat)
    python benchmarks/bench_step.py --show benchmarks/results/bench_step.json
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

from _common import median, thread_env, time_numpy_steps, time_twin_steps  # benchmarks/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPENBLAS_TUNING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ENV_REPORTED = OPENBLAS_TUNING + ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                  "FLOWPP_KERNELS", "NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

# Fields of ModelConfig / TrainConfig present at 1037e47 and now: the cpu-bench preset, written out.
CPU_BENCH_FIELDS = dict(
    image_shape=(32, 32, 3), stages=(4, 2, 3), filters=32, blocks=2, components=8, dropout_p=0.0,
    dequantization="variational", dequant_couplings=4, dequant_blocks=1, dequant_filters=32, dequant_components=32,
    context_channels=32, context_resnets=3, batch_size=16, init_batch_size=32)
CONFIGS = {"cpu-bench": CPU_BENCH_FIELDS, "small": {}}
SIDES = ("ours", "baseline", "twin", "twin-sdpa")


def _fp(name: str, new: str, old: str):
    """``name`` from flowpp_ref module ``new`` (today's layout) or ``old`` (the flat layout of an
    older checkout, the baseline), by the layout of the flowpp_ref package this process imports."""
    import importlib

    import flowpp_ref
    flat = not os.path.isdir(os.path.join(os.path.dirname(flowpp_ref.__file__), "training"))
    return getattr(importlib.import_module("flowpp_ref." + (old if flat else new)), name)


# ----------------------------------------------------------------- worker helpers
def blas_info():
    """Which BLAS runs: threadpoolctl's report if installed, else OpenBLAS asked through ctypes."""
    import numpy as np
    np.ones((2, 2)) @ np.ones((2, 2))
    try:
        from threadpoolctl import threadpool_info
        return dict(method="threadpoolctl", info=[{k: d.get(k) for k in ("internal_api", "architecture", "version",
                                                                          "num_threads", "filepath")}
                                                  for d in threadpool_info()])
    except ImportError:
        pass
    import ctypes
    out = dict(method="ctypes: the loaded OpenBLAS library's openblas_get_corename/get_config", libraries=[])
    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    for path in libs:
        lib, rec = ctypes.CDLL(path), dict(filepath=path)
        for key, base in (("corename", "openblas_get_corename"), ("config", "openblas_get_config")):
            for name in (base, base + "64_", "scipy_" + base, "scipy_" + base + "64_"):
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn.restype = ctypes.c_char_p
                    rec[key] = fn().decode()
                    break
        out["libraries"].append(rec)
    return out


def _preset(a):
    get_preset = _fp("get_preset", "model.presets", "presets")
    p = get_preset("small", **CONFIGS[a.config])
    if a.config == "cpu-bench":                 # this checkout: the explicit fields are the preset
        try:
            q = get_preset("cpu-bench")
        except KeyError:
            q = None                            # an older source (the baseline) has no cpu-bench preset
        if q is not None and (q.model != p.model or q.train.batch_size != p.train.batch_size):
            raise RuntimeError(f"bench_step: CPU_BENCH_FIELDS disagree with the cpu-bench preset: {q.model} vs {p.model}")
    return p


def _load(a):
    import numpy as np

    build_model = _fp("build_model", "training.loop", "train")
    z = np.load(a.path)
    model = build_model(_preset(a))
    model.load_parameters({k[2:]: z[k] for k in z.files if k.startswith("p:")})
    return model, z["x"]


def worker_init(a):
    import numpy as np

    make_rng = _fp("make_rng", "core.backend", "backend")
    load_default_dataset = _fp("load_default_dataset", "datasets", "data")
    build_model = _fp("build_model", "training.loop", "train")
    p = _preset(a)
    imgs = load_default_dataset("train")[0]
    if tuple(imgs.shape[1:]) != tuple(p.model.image_shape):
        raise RuntimeError(f"the bundled images are {imgs.shape[1:]}, config {a.config} wants {p.model.image_shape}")
    perm = np.random.default_rng([a.seed, 99]).permutation(len(imgs))
    model = build_model(p)
    model.data_init(imgs[perm[:p.train.init_batch_size]], rng=make_rng(0))
    x = imgs[perm[-p.train.batch_size:]]
    params = model.parameters()
    np.savez(a.path, x=x, **{"p:" + k: v for k, v in params.items()})
    return dict(num_parameters=int(sum(v.size for v in params.values())), batch_size=int(p.train.batch_size),
                model_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(p.model).items()})


def _common_info():
    import flowpp_ref
    try:
        import numba
        layer = numba.threading_layer()             # the layer numba's parallel kernels ran on
    except (ImportError, ValueError):               # ValueError: no parallel kernel has run
        layer = None
    return dict(flowpp_ref_file=flowpp_ref.__file__, blas=blas_info(), numba_threading_layer=layer,
                env={k: os.environ.get(k) for k in ENV_REPORTED})


def worker_numpy(a):
    """Steps, memory and sampling of one flowpp_ref source (ours or the baseline)."""
    import tracemalloc

    import numpy as np

    make_rng = _fp("make_rng", "core.backend", "backend")
    model, x = _load(a)
    gen = np.random.default_rng(1)
    timed = time_numpy_steps(model, x, gen, a.repeats)
    tracemalloc.start()
    model.loss_and_grads(x, rng=gen, train=True)
    tm_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    loss = float(model.loss(x, rng=np.random.default_rng(7), train=True)[0])
    out = dict(**timed, tracemalloc_peak_mb=tm_peak, loss=loss, **_common_info())
    if a.samples:
        model.sample(2, rng=make_rng(1))                            # warm-up
        out["sample_s"] = {str(n): [model.sample(n, rng=make_rng(2 + i), return_time=True)[1]
                                    for i in range(a.sample_repeats)] for n in a.samples}
    return out


def worker_twin(a):
    import numpy as np
    import torch
    from torch_twin import TorchFlowPP

    torch.set_num_threads(a.threads)
    model, x = _load(a)
    twin = TorchFlowPP(model, dtype=torch.float32, attention="sdpa" if a.side == "twin-sdpa" else "explicit")
    gen = np.random.default_rng(1)
    timed = time_twin_steps(twin, x, gen, a.repeats)
    with torch.no_grad():
        loss = float(twin.loss(x, rng=np.random.default_rng(7), train=True))
    return dict(**timed, loss=loss, torch_version=torch.__version__,
                torch_threads=torch.get_num_threads(), **_common_info())


def worker_attn(a):
    """SelfAttention forward + backward of one layer (whatever nn/attention.py of this source does)."""
    import tracemalloc

    import numpy as np

    from flowpp_ref.nn.attention import SelfAttention
    rng = np.random.default_rng(0)
    B, H, W, F = a.attn_batch, a.attn_hw[0], a.attn_hw[1], a.attn_filters
    layer = SelfAttention(F, heads=a.attn_heads, rng=rng, dtype=np.float32)
    x = rng.standard_normal((B, H, W, F)).astype(np.float32)
    pos = (0.01 * rng.standard_normal((H, W, F))).astype(np.float32)
    dout = rng.standard_normal((B, H, W, F)).astype(np.float32)
    layer.data_init(x, pos)

    def fb():
        t0 = time.perf_counter()
        out, cache = layer.forward(x, pos, train=True)
        t1 = time.perf_counter()
        layer.backward(dout, cache)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    core, core_kind = _attention_core(layer, x, pos, rng)
    fb()                                                            # warm-up
    core()
    ts, cs = [], []
    for _ in range(a.repeats_attn):                                 # layer and core alternate
        ts.append(fb())
        cs.append(core())
    tracemalloc.start()
    fb()
    tm = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return dict(forward_s=[t[0] for t in ts], backward_s=[t[1] for t in ts], total_s=[t[0] + t[1] for t in ts],
                core_forward_s=[t[0] for t in cs], core_backward_s=[t[1] for t in cs],
                core_total_s=[t[0] + t[1] for t in cs], core_kind=core_kind,
                tracemalloc_peak_mb=tm, shape=[B, H, W, F], heads=a.attn_heads, **_common_info())


def _attention_core(layer, x, pos, rng):
    """The attention proper, without the layer's projections, gate and residual: forward
    q, k, v (views of proj1's output qkv) -> the merged A [B, H, W, F], and backward dA -> dqkv
    [B, T, 3, h, d], as each source's SelfAttention runs them. This checkout: ``_attend_fused``
    and ``fused_attention_backward``; a source without them (1037e47): ``_attend`` and the lines of
    its ``SelfAttention.backward`` from dA to dqkv (dW = dA v^T, dv = W^T dA, its
    ``softmax_backward_inplace``, dq = dS k / sqrt(d), dk = dS^T q / sqrt(d), written into dqkv)."""
    import numpy as np

    import flowpp_ref.nn.attention as att
    qkv = layer.proj1.forward(x + pos[None])[0]
    B, H, W, _ = qkv.shape
    T, h, d = H * W, layer.heads, layer.dim
    dA = rng.standard_normal((B, T, h, d)).astype(np.float32).transpose(0, 2, 1, 3)   # the layer's dA view
    fused = hasattr(att, "fused_attention_backward") and layer._use_fused(qkv)

    def run():
        t0 = time.perf_counter()
        if fused:
            a, lse = layer._attend_fused(qkv)
        else:
            w, a = layer._attend(qkv)
        t1 = time.perf_counter()
        q, k, v = layer._split(qkv)
        dqkv = np.empty((B, T, 3, h, d), dtype=qkv.dtype)
        dview = dqkv.transpose(2, 0, 3, 1, 4)
        if fused:
            A = a.reshape(B, T, h, d).transpose(0, 2, 1, 3)
            att.fused_attention_backward(q, k, v, A, lse, dA, dq=dview[0], dk=dview[1], dv=dview[2])
        else:
            scale = qkv.dtype.type(1.0 / np.sqrt(d))
            dw = np.matmul(dA, v.swapaxes(-1, -2))
            dview[2] = np.matmul(w.swapaxes(-1, -2), dA)
            ds = att.softmax_backward_inplace(w, dw)
            dview[0] = np.matmul(ds, k) * scale
            dview[1] = np.matmul(ds.swapaxes(-1, -2), q) * scale
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1
    return run, "fused" if fused else "explicit"


WORKERS = {"init": worker_init, "ours": worker_numpy, "baseline": worker_numpy, "twin": worker_twin,
           "twin-sdpa": worker_twin, "attn": worker_attn}


# ----------------------------------------------------------------- driver
def _worker_env(a, side):
    env = thread_env(a.threads)                       # this checkout (and tests/) first on PYTHONPATH
    if side == "baseline":
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(a.baseline_src), env["PYTHONPATH"]])
    if a.unset_openblas_env:
        for k in OPENBLAS_TUNING:
            env.pop(k, None)
    return env


def _run(a, worker, side, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--side", side, "--config", a.config or "small",
           "--threads", str(a.threads), "--seed", str(a.seed), "--repeats", str(a.repeats),
           "--sample-repeats", str(a.sample_repeats), "--repeats-attn", str(a.repeats_attn),
           "--attn-batch", str(a.attn_batch), "--attn-hw", f"{a.attn_hw[0]}x{a.attn_hw[1]}",
           "--attn-filters", str(a.attn_filters), "--attn-heads", str(a.attn_heads), *extra]
    res = subprocess.run(cmd, env=_worker_env(a, side), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {worker}/{side} ({a.config}) failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stats(ts):
    return dict(min_s=min(ts), median_s=median(ts), times=ts)


def run_config(a, config, sides):
    a.config = config
    out = dict(config=config)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step.npz")
        out["init"] = _run(a, "init", "ours", ["--path", path])
        bs = out["init"]["batch_size"]
        print(f"[{config}] {out['init']['num_parameters']:,} parameters, batch {bs}; sides {', '.join(sides)}; "
              f"{a.rounds} rounds x {a.repeats} steps", flush=True)
        raw = {s: [] for s in sides}
        for r in range(a.rounds):                     # interleaved: outside load hits every side alike
            for s in sides:
                extra = ["--path", path]
                if s in ("ours", "baseline") and r == 0 and a.samples:
                    extra += ["--samples", ",".join(map(str, a.samples))]
                w = "ours" if s in ("ours", "baseline") else s
                raw[s].append(_run(a, w, s, extra))
                print(f"  round {r + 1} {s:<9s} min {min(raw[s][-1]['times']):.3f} s", flush=True)
    for s, rs in raw.items():
        ts = [t for r in rs for t in r["times"]]
        d = _stats(ts)
        d.update(img_per_s=bs / d["min_s"], warmup_s=[r["warmup"] for r in rs], loss=rs[0]["loss"],
                 peak_rss_delta_mb=max(r["peak_rss_delta_mb"] for r in rs),
                 flowpp_ref_file=rs[0]["flowpp_ref_file"], blas=rs[0]["blas"], env=rs[0]["env"])
        if "tracemalloc_peak_mb" in rs[0]:
            d["tracemalloc_peak_mb"] = max(r["tracemalloc_peak_mb"] for r in rs)
        if "sample_s" in rs[0]:
            d["sample"] = {n: dict(min_s=min(v), median_s=median(v), img_per_s=int(n) / min(v))
                           for n, v in rs[0]["sample_s"].items()}
        if "torch_version" in rs[0]:
            d["torch_version"], d["torch_threads"] = rs[0]["torch_version"], rs[0]["torch_threads"]
        out[s] = d
    if "ours" in out:
        out["ratios_of_min"] = {f"ours/{s}": out["ours"]["min_s"] / out[s]["min_s"] for s in sides if s != "ours"}
        out["ratios_of_median"] = {f"ours/{s}": out["ours"]["median_s"] / out[s]["median_s"]
                                   for s in sides if s != "ours"}
    return out


def run_attention(a, sides):
    res = {}
    for r in range(a.rounds):
        for s in sides:
            res.setdefault(s, []).append(_run(a, "attn", s))
    out = {}
    for s, rs in res.items():
        keys = ("forward_s", "backward_s", "total_s", "core_forward_s", "core_backward_s", "core_total_s")
        out[s] = {k: min(t for r in rs for t in r[k]) for k in keys}
        out[s].update(total_median_s=median([t for r in rs for t in r["total_s"]]),
                      core_total_median_s=median([t for r in rs for t in r["core_total_s"]]),
                      core_kind=rs[0]["core_kind"],
                      tracemalloc_peak_mb=max(r["tracemalloc_peak_mb"] for r in rs),
                      flowpp_ref_file=rs[0]["flowpp_ref_file"], shape=rs[0]["shape"], heads=rs[0]["heads"])
    if "ours" in out and "baseline" in out:
        out["speedup_baseline_over_ours"] = out["baseline"]["total_s"] / out["ours"]["total_s"]
        out["core_speedup_baseline_over_ours"] = out["baseline"]["core_total_s"] / out["ours"]["core_total_s"]
        out["speedup_of_medians"] = out["baseline"]["total_median_s"] / out["ours"]["total_median_s"]
        out["core_speedup_of_medians"] = out["baseline"]["core_total_median_s"] / out["ours"]["core_total_median_s"]
    return out


def print_tables(res):
    print(f"\nbench_step: {res['threads']} threads, float32, {res['started']}; workers' env: "
          + ", ".join(f"{k}={v}" for k, v in res["worker_env"].items() if v is not None))
    blas = res.get("blas")
    if blas:
        print(f"BLAS ({blas['method']}): " + "; ".join(
            f"{d.get('corename') or d.get('architecture')} ({d.get('config') or d.get('version')})"
            for d in blas.get("libraries", blas.get("info", []))))
    for c in res["configs"]:
        print(f"\n[{c['config']}] {c['init']['num_parameters']:,} parameters, batch {c['init']['batch_size']}")
        print(f"  {'side':<10s} {'min s':>8s} {'median s':>9s} {'img/s':>7s} {'RSS+ MB':>8s} {'tracemalloc MB':>14s}"
              f" {'loss':>10s}  sampling (min s: 8 / 64 images)")
        for s in SIDES:
            if s not in c:
                continue
            d = c[s]
            tm = f"{d['tracemalloc_peak_mb']:.0f}" if "tracemalloc_peak_mb" in d else "-"
            smp = " / ".join(f"{v['min_s']:.2f}" for v in d["sample"].values()) if "sample" in d else ""
            print(f"  {s:<10s} {d['min_s']:8.3f} {d['median_s']:9.3f} {d['img_per_s']:7.2f} "
                  f"{d['peak_rss_delta_mb']:8.0f} {tm:>14s} {d['loss']:10.6f}  {smp}")
        if "ratios_of_min" in c:
            print("  ratios (min; median): " + ", ".join(
                f"{k} {v:.2f}x; {c['ratios_of_median'][k]:.2f}x" for k, v in c["ratios_of_min"].items()))
    at = res.get("attention")
    if at:
        s0 = next(v for k, v in at.items() if isinstance(v, dict))
        print(f"\nattention layer forward+backward, x {s0['shape']}, {s0['heads']} heads (min s):")
        for s in ("ours", "baseline"):
            if s in at:
                d = at[s]
                print(f"  {s:<10s} forward {d['forward_s']:.4f}  backward {d['backward_s']:.4f}  total "
                      f"{d['total_s']:.4f} (median {d['total_median_s']:.4f})  tracemalloc peak "
                      f"{d['tracemalloc_peak_mb']:.0f} MB")
                if "core_total_s" in d:
                    print(f"  {'':<10s} core ({d['core_kind']}): forward {d['core_forward_s']:.4f}  backward "
                          f"{d['core_backward_s']:.4f}  total {d['core_total_s']:.4f} (median "
                          f"{d['core_total_median_s']:.4f})")
        if "speedup_baseline_over_ours" in at:
            print(f"  speed-up over the baseline: layer {at['speedup_baseline_over_ours']:.2f}x (medians "
                  f"{at.get('speedup_of_medians', float('nan')):.2f}x)", end="")
            if "core_speedup_baseline_over_ours" in at:
                print(f", attention core {at['core_speedup_baseline_over_ours']:.2f}x (medians "
                      f"{at['core_speedup_of_medians']:.2f}x)", end="")
            print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="cpu-bench,small", help=f"comma-separated, of {sorted(CONFIGS)}")
    ap.add_argument("--sides", default=None, help=f"comma-separated of {SIDES} (default: all; baseline only "
                                                  "with --baseline-src)")
    ap.add_argument("--baseline-src", default=None, metavar="PATH",
                    help="a flowpp_ref source tree (e.g. a checkout of 1037e47) timed as 'baseline'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per worker (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="workers per side, interleaved")
    ap.add_argument("--sample-sizes", default="8,64", help="sampling batch sizes ('' for none)")
    ap.add_argument("--sample-repeats", type=int, default=2)
    ap.add_argument("--no-attention", action="store_true", help="skip the attention micro-benchmark")
    ap.add_argument("--repeats-attn", type=int, default=5)
    ap.add_argument("--attn-batch", type=int, default=16)
    ap.add_argument("--attn-hw", default="32x16", help="H x W of the attention input (T = H W)")
    ap.add_argument("--attn-filters", type=int, default=32)
    ap.add_argument("--attn-heads", type=int, default=4)
    ap.add_argument("--unset-openblas-env", action="store_true",
                    help="run the workers without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE")
    ap.add_argument("--quick", action="store_true",
                    help="a short check: configs small, 1 round, 1 repeat, sampling 8 only, 2 attention repeats")
    ap.add_argument("--out", default=None, help="write the results as JSON here (e.g. benchmarks/results/...)")
    ap.add_argument("--show", default=None, metavar="JSON", help="print the tables of a results file and exit")
    # worker-only
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--samples", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.attn_hw = tuple(int(v) for v in a.attn_hw.lower().split("x"))
    if a.show:
        with open(a.show) as f:
            print_tables(json.load(f))
        return
    if a.worker:
        a.samples = [int(v) for v in a.samples.split(",") if v]
        if a.worker != "twin" and a.worker != "twin-sdpa":
            # the CLI's thread settings before NumPy loads OpenBLAS (older checkouts set them at import)
            import flowpp_ref
            getattr(flowpp_ref, "tune_threads", lambda: None)()
        print(json.dumps(WORKERS[a.worker](a)))
        return

    if a.quick:
        a.configs, a.rounds, a.repeats, a.sample_repeats, a.repeats_attn = "small", 1, 1, 1, 2
        a.sample_sizes = "8"
    a.samples = [int(v) for v in a.sample_sizes.split(",") if v]
    configs = [c for c in a.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {bad}; choose from {sorted(CONFIGS)}")
    sides = [s for s in (a.sides.split(",") if a.sides else SIDES) if a.sides or s != "baseline" or a.baseline_src]
    if any(s not in SIDES for s in sides):
        ap.error(f"unknown side(s) in {sides}; choose from {SIDES}")
    if "baseline" in sides and not a.baseline_src:
        ap.error("side 'baseline' needs --baseline-src PATH")
    if a.baseline_src and not os.path.isdir(os.path.join(a.baseline_src, "flowpp_ref")):
        ap.error(f"--baseline-src {a.baseline_src}: no flowpp_ref/ package there")

    env = _worker_env(a, "ours")
    res = dict(threads=a.threads, seed=a.seed, dtype="float32", python=platform.python_version(),
               machine=platform.machine(), cpu_count=os.cpu_count(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
               unset_openblas_env=a.unset_openblas_env, baseline_src=a.baseline_src, sides=sides,
               rounds=a.rounds, repeats=a.repeats, worker_env={k: env.get(k) for k in ENV_REPORTED},
               statistic="min and median over all timed steps of all rounds", configs=[])
    print("workers' env: " + ", ".join(f"{k}={v}" for k, v in res["worker_env"].items()), flush=True)
    t0 = time.perf_counter()
    for c in configs:
        res["configs"].append(run_config(a, c, sides))
    first = res["configs"][0] if res["configs"] else None
    if first:
        res["blas"] = first[sides[0]]["blas"]
    if not a.no_attention:
        at_sides = [s for s in ("ours", "baseline") if s in sides]
        if at_sides:
            print("[attention] micro-benchmark ...", flush=True)
            res["attention"] = run_attention(a, at_sides)
    res["total_seconds"] = time.perf_counter() - t0
    print_tables(res)
    print(f"total {res['total_seconds'] / 60:.1f} min")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
