"""Run by tests/test_distributed.py under ``mpiexec -n N python tests/mpi_worker.py MODE OUT ...``.

Modes (made-up 4x4 images, the tiny preset, dropout on so that the per-image masks matter):

* ``suite OUT PREPARED``: in one launch, (1) one step's loss and gradients in float64,
  (2) a 20-step float32 run, (3) an 8-step float64 run, (4) a 4-step float64 run (to be
  resumed by one process), (5) the resumption to 8 steps of PREPARED (4 steps written by one
  process), (6) sharded evaluation (k = 1 and k = 3) of (3)'s model. Rank 0 writes OUT/*.
* ``cli OUT FAULT STEP ARGS...``: ``flowpp train ARGS`` (cli.main) with rank 1 made to
  ``raise`` / ``kill`` (SIGKILL) / ``hang`` in the step STEP (1-based); FAULT ``none``: no fault.
* ``lineage OUT``: 4 float64 training steps of a tiny RealNVP (batch norm with synchronised
  statistics) and a tiny Glow; rank 0 writes OUT/lineage.json (losses) and OUT/{family}.npz (parameters).
* ``nccl OUT``: (GPU, never run so far) the NCCL communicator on CuPy buffers (all-reduce and
  broadcast against their expected values), then 4 float64 training steps with ``--backend cupy``;
  rank 0 writes OUT/nccl.json.
"""
import json
import os
import signal
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

OV = dict(dropout_p=0.2, batch_size=8, lr=3e-3, checkpoint_every=4)


def images(n=48, seed=0):
    r = np.random.default_rng(seed)
    base = r.integers(40, 200, size=(n, 1, 1, 3))
    return np.clip(base + r.integers(-25, 26, size=(n, 4, 4, 3)), 0, 255).astype(np.uint8)


def one_step(comm, dtype=np.float64, step=3):
    """Global loss and gradients of ``step`` after the init (train.py's own functions)."""
    from flowpp_ref.runtime import distributed as dist
    from flowpp_ref.training import loop as T
    p = T.get_preset("tiny", **OV)
    model = T.build_model(p, "numpy", dtype)
    x = images()
    idx0 = np.random.default_rng([p.train.seed, 99]).permutation(len(x))[:p.train.init_batch_size]
    model.data_init(x[idx0], rng=T.step_rng(p.train.seed, -1, model.xp))
    dist.broadcast_arrays(comm, model.parameters())
    idx = T.batch_indices(len(x), p.train.batch_size, p.train.seed, step)
    if comm.size == 1:
        loss, grads = T.shard_loss_and_grads(model, x, idx, seed=p.train.seed, step=step, comm=comm)
    else:
        fb = dist.FlatBuffer({k: v.shape for k, v in model.parameters().items()}, 5, model.xp, dtype)
        loss, grads, _, _ = T._reduced_step(model, x, idx, p.train.seed, step, comm, fb, False, None)
        grads = {k: v.copy() for k, v in grads.items()}
    return float(loss), grads


def suite(out, prepared):
    from flowpp_ref.runtime import distributed as dist
    from flowpp_ref.training.evaluation import evaluate, use_ema
    from flowpp_ref.training.loop import train
    comm = dist.get_comm()
    assert comm.size > 1, "run me under mpiexec -n 2 or more"
    loss, grads = one_step(comm)
    if comm.rank == 0:
        np.savez(os.path.join(out, "step.npz"), loss=loss, **grads)
    x, t = images(), images(12, 1)
    r = {}
    s = train("tiny", x, out_dir=os.path.join(out, "f32"), steps=20, progress=False, overrides=dict(OV, log_every=1))
    r["f32"] = [h["train_bpd"] for h in s["history"]]
    s = train("tiny", x, out_dir=os.path.join(out, "f64"), steps=8, progress=False, overrides=OV, dtype=np.float64)
    r["f64"] = [h["train_bpd"] for h in s["history"]]
    with use_ema(s["model"], s["ema"]):
        r["eval1"] = evaluate(s["model"], t, batch_size=5, k=1, seed=2, comm=comm)
        r["eval3"] = evaluate(s["model"], t, batch_size=5, k=3, seed=2, comm=comm)
    train("tiny", x, out_dir=os.path.join(out, "half"), steps=4, progress=False, overrides=OV, dtype=np.float64)
    s = train("tiny", x, out_dir=prepared, steps=8, progress=False, overrides=OV, dtype=np.float64)
    r["resumed"] = [h["train_bpd"] for h in s["history"]]
    if comm.rank == 0:
        with open(os.path.join(out, "suite.json"), "w") as f:
            json.dump(r, f)


def cli_run(out, fault, fault_step, argv):
    from flowpp_ref.cli import commands as cli
    from flowpp_ref import model as model_mod
    from flowpp_ref.runtime.distributed import launched_rank
    cli._load_data = lambda args, split: images(48, 0) if split == "train" else images(8, 1)
    rank = launched_rank()
    with open(os.path.join(out, f"pid.{rank}"), "w") as f:     # for the signal test
        f.write(str(os.getpid()))
    orig = model_mod.FlowPP.loss_and_grads
    calls = {"n": 0}

    def faulty(self, xb, *, rng, train=True):
        calls["n"] += 1
        if rank == 1 and calls["n"] == fault_step:
            if fault == "raise":
                raise RuntimeError(f"boom: made-up failure of rank 1 in step {fault_step}")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(3600)
        return orig(self, xb, rng=rng, train=train)

    if fault != "none":
        model_mod.FlowPP.loss_and_grads = faulty
    return cli.main(argv)


def nccl_run(out):
    import cupy
    from flowpp_ref.runtime import distributed as dist
    from flowpp_ref.training.loop import train
    comm = dist.get_comm("nccl", backend="cupy")
    a = cupy.arange(10, dtype=cupy.float32) * (comm.rank + 1)
    comm.allreduce(a)
    want = np.arange(10) * sum(range(1, comm.size + 1))
    b = cupy.full(5, float(comm.rank), dtype=cupy.float64)
    comm.broadcast(b, root=0)
    h = np.zeros(4)
    h[comm.rank % 4] = 1.0
    comm.allreduce(h)                                        # a host buffer goes over MPI
    ok = bool(np.array_equal(cupy.asnumpy(a), want) and not cupy.asnumpy(b).any() and h.sum() == comm.size)
    s = train("tiny", images(), steps=4, progress=False, overrides=OV, dtype=np.float64, backend="cupy", comm=comm)
    if comm.rank == 0:
        with open(os.path.join(out, "nccl.json"), "w") as f:
            json.dump({"ok": ok, "size": comm.size, "device": comm.device,
                       "losses": [r["train_bpd"] for r in s["history"]]}, f)


def lineage_preset(family):
    """A tiny RealNVP / Glow on the 4x4 images (batch 8: 4 images a rank)."""
    from flowpp_ref.model.presets import ModelConfig, Preset, TrainConfig
    m = ModelConfig(image_shape=(4, 4, 3), family=family, levels=2, depth=2, filters=4, blocks=1, coupling="affine",
                    dequantization="uniform", dropout_p=0.0)
    return Preset(f"tiny-{family}", m, TrainConfig(batch_size=8, init_batch_size=16, warmup_steps=2, lr=3e-3,
                                                    checkpoint_every=4, log_every=1, eval_batches=1,
                                                    optimizer="adamax" if family == "glow" else "adam"))


def lineage(out):
    from flowpp_ref.runtime import distributed as dist
    from flowpp_ref.training.loop import train
    comm = dist.get_comm()
    r = {}
    for fam in ("realnvp", "glow"):
        s = train(lineage_preset(fam), images(), steps=4, progress=False, dtype=np.float64)
        r[fam] = [h["train_bpd"] for h in s["history"]]
        if comm.rank == 0:
            np.savez(os.path.join(out, f"{fam}.npz"), **{k: np.asarray(v) for k, v in s["model"].parameters().items()})
    if comm.rank == 0:
        with open(os.path.join(out, "lineage.json"), "w") as f:
            json.dump(r, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "suite":
        suite(out, sys.argv[3])
    elif mode == "lineage":
        lineage(out)
    elif mode == "nccl":
        nccl_run(out)
    elif mode == "cli":
        sys.exit(cli_run(out, sys.argv[3], int(sys.argv[4]), sys.argv[5:]))
    else:
        raise SystemExit(f"unknown mode {mode}")
