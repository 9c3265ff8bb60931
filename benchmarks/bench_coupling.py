"""One training step of one Flow++ coupling layer: flowpp_ref (NumPy + numba) vs PyTorch autograd.

A step is forward (y and the log-det) + backward (gradients of a random linear loss with
respect to both halves and every parameter), in float32, train mode (dropout on).
Both sides run in separate subprocesses with the same thread count
(OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS and ``torch.set_num_threads``), from the same
parameters (after flowpp_ref's data-dependent init, saved to a temporary .npz).

The PyTorch side is the same math written as an ordinary autograd module: weight-normed
convolutions with ``F.conv2d`` (NHWC tensors viewed as channels-last), explicit
``softmax(q k^T / sqrt(d)) v`` attention (``--torch-sdpa`` uses
``F.scaled_dot_product_attention`` instead), layer norm, and the mixture-of-logistics
coupling in log space.

Timing: each side runs in ``--rounds`` worker processes, interleaved (ours, torch, ours,
torch, ...), each doing one warm-up step and ``--repeats`` timed steps; the figure is the
fastest timed step (the median is reported too), which is the robust choice on a machine
shared with other work. The process CPU time of each step is recorded too: with
``--threads 1`` it is the figure least disturbed by other processes (with more threads it
also counts the spinning of idle worker threads).

Memory: peak resident set size above the level after setup (``ru_maxrss`` minus the RSS
before the first step) on both sides; for flowpp_ref also the tracemalloc peak of one step
(NumPy reports its buffers to tracemalloc).

Settings (``--settings``):
  cifar  input halves [B, 32, 16, 3], filters 96, blocks 10, K 32 (the paper's CIFAR-10 coupling)
  small  input halves [B, 16, 8, 3], filters 32, blocks 2, K 4

Usage:
  python benchmarks/bench_coupling.py --settings small,cifar --batch 64 --threads 2 --out bench.json
  python benchmarks/bench_coupling.py --settings small --torch-sdpa --profile
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import maxrss_bytes, median, rss_bytes, thread_env  # benchmarks/ is on sys.path

SETTINGS = {
    "cifar": dict(shape=(32, 16, 3), filters=96, blocks=10, components=32),
    "small": dict(shape=(16, 8, 3), filters=32, blocks=2, components=4),
}
DROPOUT = 0.2








# ----------------------------------------------------------------- flowpp_ref
def _build_ours(cfg, batch, seed=0):
    import numpy as np

    from flowpp_ref.bijections.coupling import MixLogisticAttnCoupling
    rng = np.random.default_rng(seed)
    layer = MixLogisticAttnCoupling(cfg["shape"], cfg["filters"], cfg["blocks"], cfg["components"],
                                    dropout_p=DROPOUT, rng=rng, dtype=np.float32)
    c = rng.standard_normal((batch, *cfg["shape"])).astype(np.float32)
    e = rng.standard_normal((batch, *cfg["shape"])).astype(np.float32)
    return layer, c, e, rng


def init_params(setting, batch, path):
    """DDI on an init batch (at most 32 images, to bound memory), save parameters + inputs."""
    import numpy as np
    layer, c, e, rng = _build_ours(SETTINGS[setting], batch)
    n = min(batch, 32)
    layer.data_init((c[:n], e[:n]))
    dy = rng.standard_normal(c.shape).astype(np.float32)
    dl = rng.standard_normal(batch).astype(np.float32)
    np.savez(path, c=c, e=e, dy_c=dy, dy_e=rng.standard_normal(c.shape).astype(np.float32), dlogdet=dl,
             **{"p:" + k: v for k, v in layer.parameters().items()})


def _load(path):
    import numpy as np
    z = np.load(path)
    params = {k[2:]: z[k] for k in z.files if k.startswith("p:")}
    return params, z["c"], z["e"], z["dy_c"], z["dy_e"], z["dlogdet"]


def worker_ours(setting, path, repeats, profile=False):
    import numpy as np

    from flowpp_ref.kernels import use_kernels
    cfg = SETTINGS[setting]
    params, c, e, dy_c, dy_e, dl = _load(path)
    layer, _, _, _ = _build_ours(cfg, 1)
    layer.load_parameters(params)
    gen = np.random.default_rng(1)

    def step():
        c0, t0 = time.process_time(), time.perf_counter()
        y, logdet, cache = layer.forward((c, e), train=True, rng=gen)
        t1 = time.perf_counter()
        dx, _, grads = layer.backward((dy_c, dy_e), dl, cache)
        t2 = time.perf_counter()
        c2 = time.process_time()
        del cache, grads, dx, y
        return t1 - t0, t2 - t1, c2 - c0

    base = rss_bytes()
    times = [step() for _ in range(repeats + 1)]            # first = warm-up (numba compile if uncached)
    peak_rss = maxrss_bytes() - base
    import tracemalloc
    tracemalloc.start()
    step()
    _, peak_tm = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = dict(times=times[1:], warmup=times[0], peak_rss_delta=peak_rss, peak_tracemalloc=peak_tm,
               kernels=use_kernels())
    if profile:
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        step()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        out["profile"] = s.getvalue()
    return out


# ----------------------------------------------------------------- PyTorch
def _torch_module(params, cfg, sdpa=False):
    import math

    import torch
    import torch.nn.functional as tF

    K, heads = cfg["components"], 4

    class TorchMixLogisticAttnCoupling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(torch.from_numpy(v.copy()))
                                             for k, v in params.items()})

        def P(self, name):
            return self.p[name.replace(".", "__")]

        def wn(self, name):
            V, g = self.P(name + ".V"), self.P(name + ".g")
            return g * V / V.pow(2).sum(dim=tuple(range(V.dim() - 1))).sqrt()

        def conv(self, x, name):
            W = self.wn(name).permute(3, 2, 0, 1)
            return tF.conv2d(x.permute(0, 3, 1, 2), W, self.P(name + ".b"), padding=1).permute(0, 2, 3, 1)

        def nin(self, x, name):
            return x @ self.wn(name) + self.P(name + ".b")

        @staticmethod
        def celu(x):
            return tF.elu(torch.cat([x, -x], dim=-1))

        @staticmethod
        def gate(h):
            a, b = h.chunk(2, dim=-1)
            return a * torch.sigmoid(b)

        def ln(self, x, name):
            return tF.layer_norm(x, x.shape[-1:], self.P(name + ".g"), self.P(name + ".b"), 1e-5)

        def attn(self, x, name):
            B, H, W, C = x.shape
            T, d = H * W, C // heads
            qkv = self.nin(x + self.P("net.pos_emb")[None], name + ".proj1")
            q, k, v = qkv.reshape(B, T, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            if sdpa:
                a = tF.scaled_dot_product_attention(q, k, v)
            else:
                a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
            a = a.permute(0, 2, 1, 3).reshape(B, H, W, C)
            a = tF.dropout(a, DROPOUT, self.training)
            return x + self.gate(self.nin(a, name + ".proj2"))

        def forward(self, c, e):
            h = self.conv(c, "net.proj_in")
            for i in range(cfg["blocks"]):
                n = f"net.block{i}"
                r = self.celu(self.conv(self.celu(h), n + ".conv.c1"))
                r = tF.dropout(r, DROPOUT, self.training)
                h = self.ln(h + self.gate(self.nin(r, n + ".conv.c2")), n + ".ln1")
                h = self.ln(self.attn(h, n + ".attn"), n + ".ln2")
            B, Hh, Ww, C = e.shape
            raw = self.conv(h, "net.proj_out").reshape(B, Hh, Ww, C, 2 + 3 * K)
            a, b = torch.tanh(raw[..., 0]), raw[..., 1]
            logits, means, logscales = torch.split(raw[..., 2:], K, dim=-1)
            logscales = torch.clamp(logscales, min=-7.0)
            logpi = torch.log_softmax(logits, dim=-1)
            z = (e[..., None] - means) * torch.exp(-logscales)
            lsz, lsmz = tF.logsigmoid(z), tF.logsigmoid(-z)
            logF = torch.logsumexp(logpi + lsz, dim=-1)
            log1mF = torch.logsumexp(logpi + lsmz, dim=-1)
            logpdf = torch.logsumexp(logpi + lsz + lsmz - logscales, dim=-1)
            y_e = torch.exp(a) * (logF - log1mF) + b
            logdet = (logpdf - logF - log1mF + a).reshape(B, -1).sum(1)
            return y_e, logdet

    return TorchMixLogisticAttnCoupling()


def worker_torch(setting, path, repeats, threads, sdpa=False):
    import torch
    torch.set_num_threads(threads)
    params, c, e, dy_c, dy_e, dl = _load(path)
    mod = _torch_module(params, SETTINGS[setting], sdpa).train()
    tc = torch.from_numpy(c).requires_grad_(True)
    te = torch.from_numpy(e).requires_grad_(True)
    tdy_c, tdy_e, tdl = (torch.from_numpy(a) for a in (dy_c, dy_e, dl))

    def step():
        for p in mod.parameters():
            p.grad = None
        tc.grad = te.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        y_e, logdet = mod(tc, te)
        loss = (tc * tdy_c).sum() + (y_e * tdy_e).sum() + (logdet * tdl).sum()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, time.process_time() - c0

    base = rss_bytes()
    times = [step() for _ in range(repeats + 1)]
    return dict(times=times[1:], warmup=times[0], peak_rss_delta=maxrss_bytes() - base,
                torch_threads=torch.get_num_threads(), sdpa=sdpa)


# ----------------------------------------------------------------- driver
def _run_worker(args_list, threads):
    cmd = [sys.executable, os.path.abspath(__file__), *args_list]
    res = subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args_list} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="small,cifar")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the cifar setting")
    ap.add_argument("--small-batch", type=int, default=64, help="batch size of the small setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per worker process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="worker processes per side, interleaved")
    ap.add_argument("--torch-sdpa", action="store_true", help="also time torch with scaled_dot_product_attention")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one flowpp_ref step")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:   # subprocess entry points
        if args.worker == "init":
            init_params(args.setting, args.batch, args.path)
            print(json.dumps({"ok": True}))
        elif args.worker == "ours":
            print(json.dumps(worker_ours(args.setting, args.path, args.repeats, args.profile)))
        else:
            print(json.dumps(worker_torch(args.setting, args.path, args.repeats, args.threads,
                                          sdpa=args.worker == "torch_sdpa")))
        return

    results = dict(threads=args.threads, repeats=args.repeats, rounds=args.rounds, dropout=DROPOUT,
                   dtype="float32", statistic="min over all timed steps (median also given)", runs=[])
    sides = ["ours", "torch"] + (["torch_sdpa"] if args.torch_sdpa else [])
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            batch = args.batch if setting == "cifar" else args.small_batch
            path = os.path.join(tmp, f"{setting}.npz")
            common = ["--setting", setting, "--path", path, "--batch", str(batch), "--threads", str(args.threads),
                      "--repeats", str(args.repeats)]
            _run_worker(["--worker", "init", *common], args.threads)
            raw = {k: [] for k in sides}
            for _ in range(args.rounds):          # interleaved, so that load from elsewhere hits both sides
                for side in sides:
                    raw[side].append(_run_worker(["--worker", side, *common], args.threads))
            run = dict(setting=setting, batch=batch, **SETTINGS[setting])
            print(f"[{setting}] B={batch} {SETTINGS[setting]}  threads={args.threads}")
            for side in sides:
                steps = [t for r in raw[side] for t in r["times"]]
                tot = [a + b for a, b, _ in steps]
                cpu = [t[2] for t in steps]
                best = min(range(len(tot)), key=tot.__getitem__)
                run[side] = dict(step_s=tot[best], step_median_s=median(tot), cpu_min_s=min(cpu),
                                 forward_s=steps[best][0],
                                 backward_s=steps[best][1], times=steps,
                                 peak_rss_delta_mb=max(r["peak_rss_delta"] for r in raw[side]) / 2**20)
                if side == "ours":
                    run[side]["peak_tracemalloc_mb"] = max(r["peak_tracemalloc"] for r in raw[side]) / 2**20
                label = "flowpp_ref" if side == "ours" else side
                extra = (f", tracemalloc peak {run[side]['peak_tracemalloc_mb']:.0f} MB" if side == "ours" else "")
                print(f"  {label:<11s}: step {tot[best]:7.3f} s (fwd {steps[best][0]:.3f}, bwd {steps[best][1]:.3f}; "
                      f"median step {median(tot):.3f} s; min CPU time {min(cpu):.3f} s); peak RSS +{run[side]['peak_rss_delta_mb']:.0f} MB{extra}")
            for side in sides[1:]:
                run[f"ratio_vs_{side}"] = run["ours"]["step_s"] / run[side]["step_s"]
                run[f"ratio_vs_{side}_median"] = run["ours"]["step_median_s"] / run[side]["step_median_s"]
                run[f"cpu_ratio_vs_{side}"] = run["ours"]["cpu_min_s"] / run[side]["cpu_min_s"]
                print(f"  ratio flowpp_ref / {side}: {run[f'ratio_vs_{side}']:.2f}x (min wall), "
                      f"{run[f'ratio_vs_{side}_median']:.2f}x (median wall), "
                      f"{run[f'cpu_ratio_vs_{side}']:.2f}x (min CPU time)")
            if args.profile:
                prof = _run_worker(["--worker", "ours", *common[:-2], "--repeats", "1", "--profile"], args.threads)
                print(prof["profile"])
            results["runs"].append(run)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
