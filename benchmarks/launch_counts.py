"""Kernel launches of one training step on the GPU path, counted on the CPU, beside the PyTorch twin's.

Ours: the step runs on the strict CuPy look-alike of the test suite (``tests/strict_cupy.py``), which
counts every launch CuPy would make (ufuncs, reductions, gathers, copies, random draws, RawModule
kernels) and every host round trip; the step runs inside its strict region, so a host round trip fails
the script. Parts: loss and gradients (``shard_loss_and_grads``: noise, forward, backward), then the
optimiser, fused (:class:`~flowpp_ref.training.fused.FusedUpdate`) and, for comparison, the readable
recipe it replaced (``global_grad_norm_array`` + ``Adam.step`` + ``EMA.update``).

The twin (``tests/torch_twin.py``, PyTorch autograd): its CPU profiler records one step (loss,
``backward()``, ``clip_grad_norm_`` and ``Adam.step``, both with ``foreach=True`` as PyTorch picks on CUDA);
the count is the profiler's leaf operator events (operators that call no other operator: on a GPU, each is
about one kernel launch; composite operators are not counted twice), less those that only make or view
tensors (``empty``, ``view``, ``as_strided``, ...: :data:`NO_KERNEL`).

    python benchmarks/launch_counts.py --presets small,cifar10-paper --batch 2 --out counts.json

Launch counts stand for the cost of a launch-bound step (5-10 us per launch on a GPU); they say
nothing about the time of each kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def count_ours(preset, batch):
    import numpy as np
    import pytest

    import strict_cupy
    from flowpp_ref.model import FlowPP
    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.runtime.distributed import SingleComm
    from flowpp_ref.training.fused import FusedUpdate
    from flowpp_ref.training.loop import batch_indices, shard_loss_and_grads
    from flowpp_ref.training.optim import EMA, Adam, clip_scale, global_grad_norm_array
    p = get_preset(preset)
    x = np.random.default_rng(0).integers(0, 256, size=(4 * batch, *p.model.image_shape)).astype(np.uint8)
    with pytest.MonkeyPatch.context() as mp:
        cp = strict_cupy.install(mp)
        L = cp.ledger
        model = FlowPP(p.model, seed=0, xp=cp, dtype=np.float32)
        model.data_init(x[:batch], rng=np.random.default_rng(1))
        xd = cp.asarray(x)                          # the training set on the device, as train() keeps it
        out = {"parameter_arrays": len(model.parameters())}
        grads = None
        for part in ("loss_and_grads", "fused_optimiser", "unfused_optimiser"):
            if part == "fused_optimiser":             # (setting up the flat buffers is not part of a step)
                fused = FusedUpdate(model, Adam(model.parameters()), EMA(model.parameters()))
            L.reset()
            with L.strict():
                if part == "loss_and_grads":
                    loss, grads = shard_loss_and_grads(model, xd, batch_indices(len(x), batch, 0, 0), seed=0,
                                                       step=0, comm=SingleComm())
                elif part == "fused_optimiser":
                    fused.step(grads, loss, 1e-3, 1.0)
                else:
                    params = model.parameters()
                    adam, ema = Adam(params), EMA(params)
                    L.reset()                       # (the state's allocation is not part of a step)
                    gn = global_grad_norm_array(grads)
                    ok = cp.isfinite(loss) & cp.isfinite(gn)
                    adam.step(params, grads, 1e-3, grad_scale=clip_scale(gn, 1.0), apply=ok)
                    ema.update(params, apply=ok)
            out[part] = dict(L.totals(), by_kind=dict(L.launches.most_common(8)))
    out["step_fused"] = out["loss_and_grads"]["launches"] + out["fused_optimiser"]["launches"]
    out["step_unfused"] = out["loss_and_grads"]["launches"] + out["unfused_optimiser"]["launches"]
    return out


def count_twin(preset, batch):
    import numpy as np
    import torch
    from torch_twin import TorchFlowPP

    from flowpp_ref.model import FlowPP
    from flowpp_ref.model.presets import get_preset
    p = get_preset(preset)
    x = np.random.default_rng(0).integers(0, 256, size=(batch, *p.model.image_shape)).astype(np.uint8)
    model = FlowPP(p.model, seed=0, dtype=np.float32)
    model.data_init(x, rng=np.random.default_rng(1))
    twin = TorchFlowPP(model, dtype=torch.float32).train()
    opt = torch.optim.Adam(twin.parameters(), lr=1e-3, foreach=True)     # what PyTorch picks on CUDA
    parts = {}
    for part in ("loss_and_grads", "optimiser"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            if part == "loss_and_grads":
                twin.zero_grad()
                twin.loss(x, rng=np.random.default_rng(2), train=True).backward()
            else:
                torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 1.0, foreach=True)
                opt.step()
        ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in NO_KERNEL and
               not any(c.name.startswith("aten::") for c in e.cpu_children)]
        parts[part] = len(ops)
    return dict(parts, step=sum(parts.values()), torch=torch.__version__)


# leaf operators that only make or describe tensors (no kernel on a GPU)
NO_KERNEL = {f"aten::{n}" for n in (
    "empty empty_strided empty_like view as_strided t transpose reshape _reshape_alias expand permute slice select "
    "detach unsqueeze squeeze alias lift_fresh result_type unbind split chunk narrow resolve_conj resolve_neg "
    "_unsafe_view view_as is_nonzero set_ size stride numel _has_compatible_shallow_copy_type").split()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,cifar10-paper")
    ap.add_argument("--batch", type=int, default=2, help="images per step (launch counts do not depend on it)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = {"batch": a.batch, "presets": {}}
    for preset in a.presets.split(","):
        t0 = time.perf_counter()
        ours, twin = count_ours(preset, a.batch), count_twin(preset, a.batch)
        ratio = ours["step_fused"] / twin["step"]
        res["presets"][preset] = dict(ours=ours, twin=twin, ratio_fused_to_twin=ratio, seconds=time.perf_counter() - t0)
        o = ours
        print(f"[{preset}] {o['parameter_arrays']} parameter arrays; launches per training step on the look-alike: "
              f"loss + gradients {o['loss_and_grads']['launches']:,}, optimiser fused {o['fused_optimiser']['launches']} "
              f"(unfused {o['unfused_optimiser']['launches']:,}); host round trips "
              f"{o['loss_and_grads']['syncs'] + o['fused_optimiser']['syncs']}")
        print(f"   step {o['step_fused']:,} (unfused {o['step_unfused']:,}); PyTorch twin {twin['step']:,} leaf operators "
              f"(loss + backward {twin['loss_and_grads']:,}, clip + Adam {twin['optimiser']:,}); ours / twin {ratio:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.out)
    return res


if __name__ == "__main__":
    main()
