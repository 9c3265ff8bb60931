"""Flow++ on one GPU: flowpp_ref (CuPy) vs its PyTorch autograd twin, and sampling time.

Run on an NVIDIA H200 through ``benchmarks/gpu_check.py`` (results in ``benchmarks/RESULTS.md``).
Written for a machine with CuPy and PyTorch with CUDA installed.

Part 1, training step (forward + backward of the mean bits/dim, noise draws included, no
optimiser update), float32, for each preset of ``--presets`` at batch ``--batch``:

* an init worker builds ``FlowPP(preset, xp=cupy)``, runs the data-dependent init on
  ``--init-batch`` images and saves the parameters (host .npz);
* an "ours" worker loads them into ``FlowPP(xp=cupy)`` and times ``loss_and_grads``
  (noise from CuPy's generator, on the device);
* a "torch" worker loads them into a NumPy ``FlowPP`` only to build
  ``tests/torch_twin.py``'s ``TorchFlowPP(model, float32, device="cuda")`` and times
  ``loss(...).backward()`` (noise from torch's CUDA generator: :class:`TorchCudaRNG`).

Each worker does ``--warmup`` untimed steps (NVRTC compilation, cuBLAS/cuDNN set-up), then
``--repeats`` steps, each between two device synchronisations; reported: min and median.
Peak GPU memory: ours, the CuPy memory pool's size after the steps (the pool keeps freed
blocks, so its size is its peak); torch, ``torch.cuda.max_memory_allocated``. Separate
processes, so neither side's pool holds the other's memory.

Part 2, sampling (``model.sample``, z ~ N(0, I), the inverse flow with the hybrid
inverse CDF, quantisation, copy to the host) of batches of ``--sample-sizes`` images with
the first preset's model: min and median of ``--repeats`` calls after one warm-up call.
The paper reports 0.32 s for 8 CIFAR-10 images on a 1080 Ti.

Part 3 (``--coupling``, on in ``--quick``), one coupling layer of ``cifar10-paper``
(``bench_coupling.py``'s ``cifar`` setting: halves [B, 32, 16, 3], filters 96, 10 blocks,
K = 32, dropout 0.2): forward + backward of a random linear loss, flowpp_ref on CuPy vs
``bench_coupling.py``'s PyTorch module on CUDA, same parameters (DDI on the host).

Images: random uint8 by default, or ``data_batch_1`` of ``--data-dir``
(``cifar-10-batches-py/``).

Part 4 (``--trajectory N``, 10 in ``--quick``): N optimiser steps of the last preset from one state,
the same batches and the same (host) noise: ours with :class:`~flowpp_ref.training.fused.FusedUpdate`,
the twin with ``torch.optim.Adam`` + ``clip_grad_norm_`` (TF32 off), lr 1e-3 without warm-up; the
losses side by side, and the time of one optimiser step (ours fused and unfused, the twin's).

Precision: CuPy runs our float32 matmuls and convolutions in full float32; the twin is timed with
TF32 off (the same precision) and on (its cuDNN default for convolutions), one run each (``--tf32``).

``--quick`` (what ``benchmarks/gpu_check.py`` runs): ``small`` at batch 64, the cifar
coupling at batch 64, sampling 8 and 64 images, 1 warm-up and 3 timed steps, the trajectory.
``--dry-run``: the same plumbing on NumPy and PyTorch's CPU with ``tiny`` and the small
coupling setting (proves the script runs; its figures mean nothing).

Usage::

    python benchmarks/bench_gpu.py --out benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --quick --out bench.json
    python benchmarks/bench_gpu.py --dry-run        # CPU only: the plumbing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run_worker(args):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                       env=_env())
    if r.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _images(n, shape, data_dir, seed):
    import numpy as np
    if data_dir and tuple(shape) == (32, 32, 3):
        sys.path.insert(0, HERE)
        from gpu_check import read_cifar_batch   # data_batch_1 alone (raw, .xz or .gz)
        x = read_cifar_batch(data_dir, "data_batch_1")[0]
        return x[np.random.default_rng(seed).permutation(len(x))[:n]]
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.uint8)


def _xp(a):
    from flowpp_ref.core.backend import get_xp
    return get_xp(a.backend)


def _sync(xp):
    from flowpp_ref.core.backend import synchronize
    synchronize(xp)


def _peak_memory_mb(xp):
    """CuPy: the memory pool's size (it keeps freed blocks, so its size is its peak); NumPy: peak RSS."""
    from flowpp_ref.core.backend import is_cupy
    if is_cupy(xp):
        return xp.get_default_memory_pool().total_bytes() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10


def _stats(times):
    return dict(min_s=min(times), median_s=statistics.median(times), times=times)


class TorchDeviceRNG:
    """The two draws TorchFlowPP makes, from torch's generator of ``device`` (tensors on the device)."""

    def __init__(self, seed, device="cuda"):
        import torch
        self.torch, self.device = torch, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def random(self, shape, dtype=None):
        return self.torch.rand(tuple(shape), generator=self.gen, device=self.device)

    def standard_normal(self, shape, dtype=None):
        return self.torch.randn(tuple(shape), generator=self.gen, device=self.device)


TorchCudaRNG = TorchDeviceRNG


# ------------------------------------------------------------------ workers
def worker_init(a):
    import numpy as np

    from flowpp_ref.core.backend import make_rng, to_numpy
    from flowpp_ref.model import FlowPP
    from flowpp_ref.model.presets import get_preset
    xp = _xp(a)
    p = get_preset(a.preset)
    model = FlowPP(p.model, seed=0, xp=xp, dtype=np.float32)
    t0 = time.perf_counter()
    model.data_init(_images(a.init_batch, p.model.image_shape, a.data_dir, 1), rng=make_rng(1, xp))
    _sync(xp)
    t_init = time.perf_counter() - t0
    extra = {f"batch{i}": _images(a.batch, p.model.image_shape, a.data_dir, 10 + i) for i in range(a.batches or 0)}
    np.savez(a.path, batch=_images(a.batch, p.model.image_shape, a.data_dir, 2), **extra,
             **{"p/" + k: to_numpy(v) for k, v in model.parameters().items()})
    return dict(init_s=t_init, num_parameters=model.num_parameters())


def _load(path):
    import numpy as np
    d = np.load(path)
    return d["batch"], {k[2:]: d[k] for k in d.files if k.startswith("p/")}


def _our_model(a):
    """(xp, the saved batch, our float32 model on --backend with the saved parameters)."""
    import numpy as np

    from flowpp_ref.core.backend import asarray
    from flowpp_ref.model import FlowPP
    from flowpp_ref.model.presets import get_preset
    xp = _xp(a)
    batch, params = _load(a.path)
    model = FlowPP(get_preset(a.preset).model, seed=0, xp=xp, dtype=np.float32)
    model.load_parameters({k: asarray(v, xp) for k, v in params.items()})
    return xp, batch, model


def worker_ours(a):
    from flowpp_ref.core.backend import make_rng, to_numpy
    xp, batch, model = _our_model(a)
    rng = make_rng(3, xp)

    def sync():
        _sync(xp)
    times = []
    for i in range(a.warmup + a.repeats):
        sync()
        t0 = time.perf_counter()
        loss, grads = model.loss_and_grads(batch, rng=rng, train=True)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        del grads
    out = dict(step=_stats(times), loss=float(to_numpy(loss)), peak_pool_mb=_peak_memory_mb(xp),
               backend=a.backend)
    if a.sample_sizes:
        samp = {}
        for n in (int(s) for s in a.sample_sizes.split(",")):
            model.sample(n, rng=make_rng(4, xp))          # warm-up (kernels compiled for this size)
            ts = [model.sample(n, rng=make_rng(5 + r, xp), return_time=True)[1] for r in range(a.repeats)]
            samp[str(n)] = _stats(ts)
        out["sampling"] = samp
    return out


def _torch_twin(a):
    """(torch, the twin of the saved parameters in train mode on --torch-device, device, cuda?, sync) at --tf32."""
    import numpy as np
    import torch
    from torch_twin import TorchFlowPP

    from flowpp_ref.model import FlowPP
    from flowpp_ref.model.presets import get_preset
    _, params = _load(a.path)
    host_model = FlowPP(get_preset(a.preset).model, seed=0, dtype=np.float32)
    host_model.load_parameters(params)
    dev = a.torch_device
    cuda = dev.startswith("cuda")
    _set_tf32(torch, a.tf32)
    twin = TorchFlowPP(host_model, dtype=torch.float32, device=dev).train()
    return torch, twin, dev, cuda, (torch.cuda.synchronize if cuda else (lambda: None))


def worker_torch(a):
    batch, _ = _load(a.path)
    torch, twin, dev, cuda, sync = _torch_twin(a)
    rng = TorchDeviceRNG(3, dev)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.repeats):
        twin.zero_grad()
        sync()
        t0 = time.perf_counter()
        loss = twin.loss(batch, rng=rng, train=True)
        loss.backward()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return dict(step=_stats(times), loss=float(loss.detach().cpu()),
                peak_allocated_mb=(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None,
                torch=torch.__version__, device=torch.cuda.get_device_name() if cuda else "cpu", **_tf32_flags(torch))


# ------------------------------------------------------------------ trajectory (part 4)
TRAJ_LR = 1e-3


def _traj_batches(a):
    import numpy as np
    d = np.load(a.path)
    return [d[f"batch{i}"] for i in range(a.repeats)] if "batch1" in d.files else [d["batch"]] * a.repeats


def worker_traj_ours(a):
    import numpy as np

    from flowpp_ref.core.backend import to_numpy
    from flowpp_ref.training.fused import FusedUpdate
    from flowpp_ref.training.optim import EMA, Adam, clip_scale, global_grad_norm_array
    xp, _, model = _our_model(a)
    fused = FusedUpdate(model, Adam(model.parameters()), EMA(model.parameters(), decay=0.999))
    losses, t_opt = [], []
    for i, batch in enumerate(_traj_batches(a)):
        loss, grads = model.loss_and_grads(batch, rng=np.random.default_rng(1000 + i), train=True)  # host noise
        _sync(xp)
        t0 = time.perf_counter()
        fused.step(grads, loss, TRAJ_LR, 1.0)
        _sync(xp)
        t_opt.append(time.perf_counter() - t0)
        losses.append(loss)
    losses = [float(v) for v in to_numpy(xp.stack(losses))]
    params = model.parameters()                   # the unfused recipe on the same arrays, for its time alone
    adam, ema, t_unf = Adam(params), EMA(params), []
    for _ in range(3):
        _sync(xp)
        t0 = time.perf_counter()
        gn = global_grad_norm_array(grads)
        ok = xp.isfinite(gn)
        adam.step(params, grads, TRAJ_LR, grad_scale=clip_scale(gn, 1.0), apply=ok)
        ema.update(params, apply=ok)
        _sync(xp)
        t_unf.append(time.perf_counter() - t0)
    return dict(losses=losses, opt_step=_stats(t_opt), opt_step_unfused=_stats(t_unf), backend=a.backend)


def worker_traj_torch(a):
    import numpy as np
    torch, twin, dev, cuda, sync = _torch_twin(a)
    opt = torch.optim.Adam(twin.parameters(), lr=TRAJ_LR, betas=(0.9, 0.999), eps=1e-8)
    losses, t_opt = [], []
    for i, batch in enumerate(_traj_batches(a)):
        twin.zero_grad()
        loss = twin.loss(batch, rng=np.random.default_rng(1000 + i), train=True)
        loss.backward()
        sync()
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 1.0)
        opt.step()
        sync()
        t_opt.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().cpu()))
    return dict(losses=losses, opt_step=_stats(t_opt), **_tf32_flags(torch))


# ------------------------------------------------------------------ one coupling layer (part 3)
def _coupling_cfg(name):
    sys.path.insert(0, HERE)
    import bench_coupling
    return bench_coupling, bench_coupling.SETTINGS[name]


def worker_coupling_init(a):
    bc, _ = _coupling_cfg(a.setting)
    bc.init_params(a.setting, a.batch, a.path)          # host: DDI on <= 32 inputs, parameters + inputs saved
    return dict(setting=a.setting)


def worker_coupling_ours(a):
    import numpy as np

    from flowpp_ref.core.backend import asarray
    from flowpp_ref.bijections.coupling import MixLogisticAttnCoupling
    bc, cfg = _coupling_cfg(a.setting)
    xp = _xp(a)
    params, c, e, dy_c, dy_e, dl = bc._load(a.path)
    layer = MixLogisticAttnCoupling(cfg["shape"], cfg["filters"], cfg["blocks"], cfg["components"],
                                    dropout_p=bc.DROPOUT, rng=np.random.default_rng(0), xp=xp, dtype=np.float32)
    layer.load_parameters({k: asarray(v, xp) for k, v in params.items()})
    from flowpp_ref.nn.attention import SelfAttention
    for m in layer.modules():                 # --attention: the fused kernels or the plain (cuBLAS) path
        if isinstance(m, SelfAttention):
            m.fused = a.attention == "fused"
    c, e, dy_c, dy_e, dl = (asarray(v, xp) for v in (c, e, dy_c, dy_e, dl))
    from flowpp_ref.core.backend import make_rng
    rng = make_rng(1, xp)
    times = []
    for i in range(a.warmup + a.repeats):
        _sync(xp)
        t0 = time.perf_counter()
        y, logdet, cache = layer.forward((c, e), train=True, rng=rng)
        dx, _, grads = layer.backward((dy_c, dy_e), dl, cache)
        _sync(xp)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        del cache, grads, dx, y
    return dict(step=_stats(times), peak_pool_mb=_peak_memory_mb(xp), backend=a.backend, attention=a.attention)


def worker_coupling_torch(a):
    import torch
    bc, cfg = _coupling_cfg(a.setting)
    dev = a.torch_device
    cuda = dev.startswith("cuda")
    _set_tf32(torch, a.tf32)
    params, c, e, dy_c, dy_e, dl = bc._load(a.path)
    mod = bc._torch_module(params, cfg).to(dev).train()
    tc = torch.from_numpy(c).to(dev).requires_grad_(True)
    te = torch.from_numpy(e).to(dev).requires_grad_(True)
    tdy_c, tdy_e, tdl = (torch.from_numpy(v).to(dev) for v in (dy_c, dy_e, dl))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.warmup + a.repeats):
        for p in mod.parameters():
            p.grad = None
        tc.grad = te.grad = None
        sync()
        t0 = time.perf_counter()
        y_e, logdet = mod(tc, te)
        ((tc * tdy_c).sum() + (y_e * tdy_e).sum() + (logdet * tdl).sum()).backward()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return dict(step=_stats(times), peak_allocated_mb=(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None,
                device=torch.cuda.get_device_name() if cuda else "cpu", **_tf32_flags(torch))


def _set_tf32(torch, mode):
    """``off``: convolutions and matmuls in full float32 (as CuPy runs ours); ``on``: TF32 tensor cores for both."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (mode == "on")


def _tf32_flags(torch):
    return dict(tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32), tf32_cudnn=bool(torch.backends.cudnn.allow_tf32))


# ------------------------------------------------------------------ driver
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="cifar10-paper,small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--init-batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample-sizes", default="8,64", help="sampling batch sizes (first preset); '' to skip")
    ap.add_argument("--data-dir", default=None, help="folder with cifar-10-batches-py/ (else random images)")
    ap.add_argument("--coupling", default="", help="coupling settings of bench_coupling.py to time too (e.g. cifar)")
    ap.add_argument("--coupling-batch", type=int, default=64)
    ap.add_argument("--backend", default="cupy", choices=["cupy", "numpy"], help="flowpp_ref's backend [cupy]")
    ap.add_argument("--torch-device", default="cuda", help="the PyTorch twin's device [cuda]")
    ap.add_argument("--quick", action="store_true",
                    help="small at B=64 + one cifar10-paper coupling layer, sampling 8 and 64, 1 warm-up + 3 steps")
    ap.add_argument("--dry-run", action="store_true",
                    help="the plumbing on the CPU: NumPy + torch CPU, tiny preset, small coupling, B=4")
    ap.add_argument("--trajectory", type=int, default=0,
                    help="optimiser steps of the last preset, ours vs the twin from the same state (part 4; 10 in --quick)")
    ap.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--attention-modes", default="fused,reference",
                    help="part 3: our attention paths to time (fused kernels, reference = plain matmuls)")
    ap.add_argument("--attention", default="fused", help=argparse.SUPPRESS)
    ap.add_argument("--tf32", default="off,on",
                    help="the twin's precision, one run per value: off (full float32, as CuPy runs ours), on (TF32)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        workers = {"init": worker_init, "ours": worker_ours, "torch": worker_torch,
                   "coupling_init": worker_coupling_init, "coupling_ours": worker_coupling_ours,
                   "coupling_torch": worker_coupling_torch, "traj_ours": worker_traj_ours,
                   "traj_torch": worker_traj_torch}
        print(json.dumps(workers[a.worker](a)))
        return
    if a.quick:
        a.presets, a.batch, a.warmup, a.repeats, a.sample_sizes, a.coupling = "small", 64, 1, 3, "8,64", "cifar"
        a.trajectory = a.trajectory or 10
    if a.dry_run:
        a.presets, a.batch, a.init_batch, a.warmup, a.repeats, a.sample_sizes = "tiny", 4, 8, 1, 1, "2"
        a.coupling, a.coupling_batch, a.backend, a.torch_device = "small", 4, "numpy", "cpu"
        a.trajectory = a.trajectory or 3

    results = dict(batch=a.batch, repeats=a.repeats, warmup=a.warmup, dtype="float32", backend=a.backend,
                   torch_device=a.torch_device, quick=a.quick, dry_run=a.dry_run, runs=[], coupling=[])
    dev = ["--backend", a.backend, "--torch-device", a.torch_device]
    with tempfile.TemporaryDirectory() as tmp:
        for i, preset in enumerate(a.presets.split(",")):
            path = os.path.join(tmp, f"{preset}.npz")
            common = ["--preset", preset, "--path", path, "--batch", str(a.batch), "--init-batch", str(a.init_batch),
                      "--warmup", str(a.warmup), "--repeats", str(a.repeats), *dev] + (
                ["--data-dir", a.data_dir] if a.data_dir else [])
            init = _run_worker(["--worker", "init", *common])
            ours = _run_worker(["--worker", "ours", *common, "--sample-sizes", a.sample_sizes if i == 0 else ""])
            twins = {m: _run_worker(["--worker", "torch", *common, "--tf32", m]) for m in a.tf32.split(",")}
            twin = twins[a.tf32.split(",")[0]]
            run = dict(preset=preset, init=init, ours=ours, torch=twin, torch_by_tf32=twins,
                       ratio_min=ours["step"]["min_s"] / twin["step"]["min_s"],
                       ratio_median=ours["step"]["median_s"] / twin["step"]["median_s"])
            results["runs"].append(run)
            results.setdefault("device", twin["device"])
            _dump(results, a.out)
            print(f"[{preset}] B={a.batch} ({init['num_parameters']:,} parameters) on {twin['device']}")
            print(f"  flowpp_ref ({a.backend:5s}): step {ours['step']['min_s'] * 1e3:8.1f} ms (median "
                  f"{ours['step']['median_s'] * 1e3:.1f}), peak pool {ours['peak_pool_mb']:.0f} MB, loss {ours['loss']:.4f}")
            print(f"  PyTorch twin      : step {twin['step']['min_s'] * 1e3:8.1f} ms (median "
                  f"{twin['step']['median_s'] * 1e3:.1f}), peak allocated {twin['peak_allocated_mb'] or 0:.0f} MB, "
                  f"loss {twin['loss']:.4f}")
            print(f"  ratio ours / torch (TF32 {a.tf32.split(',')[0]}): {run['ratio_min']:.2f}x (min), "
                  f"{run['ratio_median']:.2f}x (median); target <= 1.2x")
            for m, t in twins.items():
                print(f"  PyTorch twin, TF32 {m:3s}: step {t['step']['min_s'] * 1e3:8.1f} ms, loss {t['loss']:.4f}")
            for n, s in ours.get("sampling", {}).items():
                print(f"  sampling {n:>3s} images: {s['min_s']:.3f} s (median {s['median_s']:.3f})"
                      + ("; target < 0.1 s (paper: 0.32 s on a 1080 Ti)" if n == "8" else ""))
        for setting in [c for c in a.coupling.split(",") if c]:
            path = os.path.join(tmp, f"coupling-{setting}.npz")
            common = ["--setting", setting, "--path", path, "--batch", str(a.coupling_batch),
                      "--warmup", str(a.warmup), "--repeats", str(a.repeats), *dev]
            _run_worker(["--worker", "coupling_init", *common])
            by_att = {m: _run_worker(["--worker", "coupling_ours", *common, "--attention", m])
                      for m in a.attention_modes.split(",")}
            ours = by_att[a.attention_modes.split(",")[0]]
            twins = {m: _run_worker(["--worker", "coupling_torch", *common, "--tf32", m]) for m in a.tf32.split(",")}
            twin = twins[a.tf32.split(",")[0]]
            run = dict(setting=setting, batch=a.coupling_batch, ours=ours, ours_by_attention=by_att, torch=twin,
                       torch_by_tf32=twins,
                       ratio_min=ours["step"]["min_s"] / twin["step"]["min_s"],
                       ratio_median=ours["step"]["median_s"] / twin["step"]["median_s"])
            results["coupling"].append(run)
            results.setdefault("device", twin["device"])
            _dump(results, a.out)
            print(f"[coupling {setting}] B={a.coupling_batch} on {twin['device']}: flowpp_ref "
                  f"{ours['step']['min_s'] * 1e3:.1f} ms (peak pool {ours['peak_pool_mb']:.0f} MB), PyTorch "
                  f"{twin['step']['min_s'] * 1e3:.1f} ms (peak {twin['peak_allocated_mb'] or 0:.0f} MB); "
                  f"ratio {run['ratio_min']:.2f}x (min), {run['ratio_median']:.2f}x (median)")
            for m, o in by_att.items():
                print(f"  flowpp_ref, attention {m:9s}: {o['step']['min_s'] * 1e3:.1f} ms")
            for m, t in twins.items():
                print(f"  PyTorch, TF32 {m:3s}: {t['step']['min_s'] * 1e3:.1f} ms")
        if a.trajectory:
            results["trajectory"] = _trajectory(a, tmp, dev)
    _dump(results, a.out)
    if a.out:
        print(f"wrote {a.out}")


def _dump(results, path):
    """Write the results so far (atomically): a run killed later keeps what it finished."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def _trajectory(a, tmp, dev):
    """Part 4: ``--trajectory`` optimiser steps of ``small`` from the same parameters, batches and noise:
    ours (FusedUpdate) against the twin (torch.optim.Adam + clip_grad_norm_), losses side by side."""
    preset = a.presets.split(",")[-1]
    path = os.path.join(tmp, f"traj-{preset}.npz")
    common = ["--preset", preset, "--path", path, "--batch", str(a.batch), "--init-batch", str(a.init_batch),
              "--warmup", str(a.warmup), "--repeats", str(a.trajectory), *dev] + (
        ["--data-dir", a.data_dir] if a.data_dir else [])
    _run_worker(["--worker", "init", *common, "--batches", str(a.trajectory)])
    ours = _run_worker(["--worker", "traj_ours", *common])
    twin = _run_worker(["--worker", "traj_torch", *common, "--tf32", "off"])
    rel = [abs(x - y) / abs(y) for x, y in zip(ours["losses"], twin["losses"])]
    out = dict(preset=preset, batch=a.batch, steps=a.trajectory, lr=TRAJ_LR, ours=ours, torch=twin,
               max_rel_loss_diff=max(rel), rel_loss_diff=rel)
    print(f"[trajectory {preset}] {a.trajectory} steps, B={a.batch}, Adam lr {TRAJ_LR} (no warm-up), clip 1: "
          f"losses ours {ours['losses'][0]:.5f} -> {ours['losses'][-1]:.5f}, twin {twin['losses'][0]:.5f} -> "
          f"{twin['losses'][-1]:.5f}; max relative difference {max(rel):.2e}")
    print(f"  optimiser step: ours fused {ours['opt_step']['median_s'] * 1e3:.2f} ms "
          f"(unfused Adam + EMA {ours['opt_step_unfused']['median_s'] * 1e3:.2f} ms), torch Adam + clip "
          f"{twin['opt_step']['median_s'] * 1e3:.2f} ms")
    return out


if __name__ == "__main__":
    main()
