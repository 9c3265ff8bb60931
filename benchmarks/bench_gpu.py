"""Flow++ on one GPU: flowpp_ref (CuPy) vs its PyTorch autograd twin, and sampling time.

**Never run**: no GPU machine has been lent to this project yet. Written for the device
tool's machine (CuPy and PyTorch with CUDA installed); expect to fix it on first use.

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

Images: random uint8 by default, or the first training batch of ``--data-dir``
(``cifar-10-batches-py/``).

Usage::

    python benchmarks/bench_gpu.py --out benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --presets small --batch 64 --repeats 3    # quick
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
    if data_dir:
        from flowpp_ref.data import load_cifar10
        x = load_cifar10(data_dir, "train")[0]
        return x[np.random.default_rng(seed).permutation(len(x))[:n]]
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.uint8)


def _stats(times):
    return dict(min_s=min(times), median_s=statistics.median(times), times=times)


class TorchCudaRNG:
    """The two draws TorchFlowPP makes, from torch's CUDA generator (tensors on the device)."""

    def __init__(self, seed):
        import torch
        self.torch = torch
        self.gen = torch.Generator(device="cuda").manual_seed(seed)

    def random(self, shape, dtype=None):
        return self.torch.rand(tuple(shape), generator=self.gen, device="cuda")

    def standard_normal(self, shape, dtype=None):
        return self.torch.randn(tuple(shape), generator=self.gen, device="cuda")


# ------------------------------------------------------------------ workers
def worker_init(a):
    import cupy
    import numpy as np

    from flowpp_ref.backend import make_rng, to_numpy
    from flowpp_ref.model import FlowPP
    from flowpp_ref.presets import get_preset
    p = get_preset(a.preset)
    model = FlowPP(p.model, seed=0, xp=cupy, dtype=np.float32)
    t0 = time.perf_counter()
    model.data_init(_images(a.init_batch, p.model.image_shape, a.data_dir, 1), rng=make_rng(1, cupy))
    cupy.cuda.get_current_stream().synchronize()
    t_init = time.perf_counter() - t0
    np.savez(a.path, batch=_images(a.batch, p.model.image_shape, a.data_dir, 2),
             **{"p/" + k: to_numpy(v) for k, v in model.parameters().items()})
    return dict(init_s=t_init, num_parameters=model.num_parameters())


def _load(path):
    import numpy as np
    d = np.load(path)
    return d["batch"], {k[2:]: d[k] for k in d.files if k.startswith("p/")}


def worker_ours(a):
    import cupy
    import numpy as np

    from flowpp_ref.backend import make_rng
    from flowpp_ref.model import FlowPP
    from flowpp_ref.presets import get_preset
    p = get_preset(a.preset)
    batch, params = _load(a.path)
    model = FlowPP(p.model, seed=0, xp=cupy, dtype=np.float32)
    model.load_parameters({k: cupy.asarray(v) for k, v in params.items()})
    rng = make_rng(3, cupy)
    sync = cupy.cuda.get_current_stream().synchronize
    times = []
    for i in range(a.warmup + a.repeats):
        sync()
        t0 = time.perf_counter()
        loss, grads = model.loss_and_grads(batch, rng=rng, train=True)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        del grads
    out = dict(step=_stats(times), loss=float(cupy.asnumpy(loss)),
               peak_pool_mb=cupy.get_default_memory_pool().total_bytes() / 2 ** 20)
    if a.sample_sizes:
        samp = {}
        for n in (int(s) for s in a.sample_sizes.split(",")):
            model.sample(n, rng=make_rng(4, cupy))          # warm-up (kernels compiled for this size)
            ts = [model.sample(n, rng=make_rng(5 + r, cupy), return_time=True)[1] for r in range(a.repeats)]
            samp[str(n)] = _stats(ts)
        out["sampling"] = samp
    return out


def worker_torch(a):
    import numpy as np
    import torch
    from torch_twin import TorchFlowPP

    from flowpp_ref.model import FlowPP
    from flowpp_ref.presets import get_preset
    p = get_preset(a.preset)
    batch, params = _load(a.path)
    host_model = FlowPP(p.model, seed=0, dtype=np.float32)
    host_model.load_parameters(params)
    twin = TorchFlowPP(host_model, dtype=torch.float32, device="cuda").train()
    rng = TorchCudaRNG(3)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.repeats):
        twin.zero_grad()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = twin.loss(batch, rng=rng, train=True)
        loss.backward()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return dict(step=_stats(times), loss=float(loss.detach().cpu()),
                peak_allocated_mb=torch.cuda.max_memory_allocated() / 2 ** 20,
                torch=torch.__version__, device=torch.cuda.get_device_name())


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
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps({"init": worker_init, "ours": worker_ours, "torch": worker_torch}[a.worker](a)))
        return

    results = dict(batch=a.batch, repeats=a.repeats, warmup=a.warmup, dtype="float32", runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        for i, preset in enumerate(a.presets.split(",")):
            path = os.path.join(tmp, f"{preset}.npz")
            common = ["--preset", preset, "--path", path, "--batch", str(a.batch), "--init-batch", str(a.init_batch),
                      "--warmup", str(a.warmup), "--repeats", str(a.repeats)] + (
                ["--data-dir", a.data_dir] if a.data_dir else [])
            init = _run_worker(["--worker", "init", *common])
            ours = _run_worker(["--worker", "ours", *common, "--sample-sizes", a.sample_sizes if i == 0 else ""])
            twin = _run_worker(["--worker", "torch", *common])
            run = dict(preset=preset, init=init, ours=ours, torch=twin,
                       ratio_min=ours["step"]["min_s"] / twin["step"]["min_s"],
                       ratio_median=ours["step"]["median_s"] / twin["step"]["median_s"])
            results["runs"].append(run)
            results.setdefault("device", twin["device"])
            print(f"[{preset}] B={a.batch} ({init['num_parameters']:,} parameters) on {twin['device']}")
            print(f"  flowpp_ref (CuPy): step {ours['step']['min_s'] * 1e3:8.1f} ms (median "
                  f"{ours['step']['median_s'] * 1e3:.1f}), peak pool {ours['peak_pool_mb']:.0f} MB, loss {ours['loss']:.4f}")
            print(f"  PyTorch twin     : step {twin['step']['min_s'] * 1e3:8.1f} ms (median "
                  f"{twin['step']['median_s'] * 1e3:.1f}), peak allocated {twin['peak_allocated_mb']:.0f} MB, "
                  f"loss {twin['loss']:.4f}")
            print(f"  ratio ours / torch: {run['ratio_min']:.2f}x (min), {run['ratio_median']:.2f}x (median); "
                  f"target <= 1.5x")
            for n, s in ours.get("sampling", {}).items():
                print(f"  sampling {n:>3s} images: {s['min_s']:.3f} s (median {s['median_s']:.3f})"
                      + ("; target < 0.1 s (paper: 0.32 s on a 1080 Ti)" if n == "8" else ""))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
