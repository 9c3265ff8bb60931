"""Training, evaluation and sampling of Flow++ from Python (the CLI calls these).

    from flowpp_ref.training.loop import train, evaluate, sample_grid
    summary = train("small", train_images, test_images, out_dir="runs/demo", minutes=3)

Recipe (appendix 8.5): Adam, linear learning-rate warm-up, global gradient-norm
clipping, dropout, an EMA of the parameters used for evaluation and sampling, the
data-dependent init pass on an init batch.

Reproducibility: every random draw of step s (dequantization noise, dropout) comes
from a generator seeded with (seed, s), and the batch order of epoch e from one
seeded with (seed, e). A run resumed from a checkpoint at step s therefore sees
exactly the numbers an uninterrupted run sees (tested).

Host syncs: a step keeps its loss, gradient norm and "finite" flag on the backend;
clipping and the skip of a non-finite step are applied there (``Adam.step(...,
grad_scale=, apply=)``), and the scalars of the pending steps are read back together
every ``log_every`` steps (and before a checkpoint): on CuPy that is the loop's only
host round trip.

Non-finite loss or gradients: the step is skipped (parameters, Adam and EMA
untouched) and reported when its scalars are read back; ``max_bad_steps``
consecutive failures stop the run with :class:`TrainingDiverged`.

Run folder (:mod:`flowpp_ref.runtime.runfolder`): checkpoints are written atomically, only
from parameters (training and EMA) that give a finite loss on a fixed check batch and
when the last step was not skipped; the one before is kept as
``checkpoint-prev.npz``. A resumed run truncates ``log.jsonl`` to its checkpoint's
step, states (or refuses) options that differ from the checkpoint's, and returns at
once when the checkpoint is already at ``steps``. SIGINT/SIGTERM stop the loop after
the current step, write a checkpoint and raise :class:`TrainingInterrupted`. Option
ranges: :mod:`flowpp_ref.runtime.options`.

Data parallel (:mod:`flowpp_ref.runtime.distributed`, issue 11): under ``mpiexec -n N`` (or
with ``comm=``) each of the N processes computes the loss and gradients of its
``batch_size / N`` images of the global batch; one all-reduce per step sums the
gradients, the loss and two flags (a rank whose step raised; a rank that wants to stop:
time budget or signal) in one flat buffer, and every rank applies the same clipping,
Adam and EMA update. The dequantization noise and dropout masks of an image come from
:class:`~flowpp_ref.training.keyed_rng.KeyedRNG` keyed by (seed, step, position in the global
batch), so an N-process step equals the one-process step up to the rounding of the sum.
The data-dependent init runs on the global init batch on every rank, then rank 0's
parameters are broadcast; a resumed run loads the checkpoint on every rank. A hash of
the parameters is compared across ranks at every checkpoint. Rank 0 alone writes the
checkpoints, the log, summary.json and the progress bar. With N > 1 the time budget and
signals stop the run after the step in which some rank noticed them (every rank stops at
the same step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from flowpp_ref.core.backend import get_xp, make_rng, to_numpy
from flowpp_ref.runtime.checkpoint import load_checkpoint, save_checkpoint
from flowpp_ref.model import FlowPP
from flowpp_ref.training.optim import EMA, Adam, clip_scale, global_grad_norm_array, warmup_lr  # noqa: F401
from flowpp_ref.training.schedules import learning_rate
from flowpp_ref.model.presets import ModelConfig, Preset, TrainConfig, get_preset
from flowpp_ref.runtime import runfolder
from flowpp_ref.runtime import distributed as dist
from flowpp_ref.training.keyed_rng import KeyedRNG, key_of
from flowpp_ref.runtime.options import ConfigError, check_model_config, check_option, check_run_limits, check_train_config
from flowpp_ref.runtime.runfolder import TrainingInterrupted  # noqa: F401  (re-exported)
from flowpp_ref.core.validation import check_pixels

CKPT_NAME = "checkpoint.npz"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient, or parameters that
    give a non-finite loss on the check batch."""


class NonFiniteResult(ValueError):
    """An evaluation produced a bits/dim that is not finite (never reported as a number)."""


def step_rng(seed: int, step: int, xp=np):
    """The generator of step ``step``: a pure function of (seed, step)."""
    return make_rng(int(seed) * 1_000_003 + int(step) + 1, xp)


def shard_loss_and_grads(model, images, idx, *, seed, step, comm, train=True):
    """Loss and gradients of this rank's shard of the global batch ``images[idx]``.

    Rank r takes positions ``r*b .. (r+1)*b - 1`` (b = len(idx) / size) and draws its
    random numbers per position (:class:`~flowpp_ref.training.keyed_rng.KeyedRNG`, key (seed,
    step)); summed over the ranks and divided by ``size``, loss and gradients are those
    of the whole batch on one process.
    """
    n = len(idx)
    if n % comm.size:
        raise ConfigError(f"the batch of {n} images does not divide among {comm.size} processes")
    b = n // comm.size
    lo = comm.rank * b
    rng = KeyedRNG(key_of(seed, step, 1), np.arange(lo, lo + b), model.xp)
    return model.loss_and_grads(images[idx[lo:lo + b]], rng=rng, train=train)


def batch_indices(n: int, batch_size: int, seed: int, step: int):
    """Indices of the batch of ``step``: epoch-wise shuffles seeded by (seed, epoch)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training images")
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch, 7]).permutation(n)
    return perm[i * batch_size:(i + 1) * batch_size]


def _resolve(preset, overrides):
    if isinstance(preset, Preset):
        return preset
    return get_preset(preset, **(overrides or {}))


def _config_dict(p: Preset):
    return {"preset": p.name, "model": dataclasses.asdict(p.model), "train": dataclasses.asdict(p.train)}


def preset_from_config(d: dict) -> Preset:
    m = dict(d["model"])
    m["image_shape"] = tuple(m["image_shape"])
    m["stages"] = tuple(m["stages"])
    if m.get("layout") is not None:
        m["layout"] = tuple(tuple(s) for s in m["layout"])
    return Preset(d.get("preset", "custom"), ModelConfig(**m), TrainConfig(**d["train"]))


def build_model(p: Preset, backend="numpy", dtype=np.float32) -> FlowPP:
    return FlowPP(p.model, seed=p.train.seed, xp=get_xp(backend), dtype=dtype)


class _Logger:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "a") if path else None

    def write(self, rec):
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


def train(preset, train_images, test_images=None, *, out_dir=None, steps=None, minutes=None, backend="numpy",
          resume=True, progress=True, overrides=None, dtype=np.float32, on_step=None, report=None, comm=None):
    """Train a Flow++ model; returns a summary dict (also written to ``out_dir/summary.json``).

    ``train_images``, ``test_images``: 8-bit pixels, an integer array (uint8) [N,H,W,C]
    with values 0..255 (reduced to ``n_bits`` here); anything else is refused before
    training. Stops after ``steps`` optimiser steps (total, counting resumed ones) or
    ``minutes`` of wall-clock time, whichever comes first. With ``out_dir`` and
    ``resume``, continues from ``out_dir/checkpoint.npz``; if that is already at
    ``steps``, nothing is done or written (``summary["already_done"]``). On resume only
    the ``overrides`` given are compared with the checkpoint's options (all fields when
    ``preset`` is a :class:`Preset` or another preset's name): see
    :func:`flowpp_ref.runtime.runfolder.reconcile`. ``on_step(step, record)`` is called for every
    step that was not skipped, when its scalars are read back (every ``log_every``
    steps). ``report(message)`` receives the sentences about resuming, skipped
    checkpoints and signals (default: print to stderr). ``comm``: a communicator of
    :mod:`flowpp_ref.runtime.distributed` (default: :func:`~flowpp_ref.runtime.distributed.get_comm`,
    a single process unless started by mpiexec/srun); ``batch_size`` is the global batch.
    """
    import sys
    comm = dist.get_comm(backend=backend) if comm is None else comm
    say = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if comm.rank != 0:
        say = lambda msg: None  # noqa: E731  (rank 0 reports)
        progress = False
    p = _resolve(preset, overrides)
    check_run_limits(steps, minutes)
    check_train_config(p.train)
    check_model_config(p.model)
    train_images = check_pixels(train_images, "train_images", image_shape=p.model.image_shape)
    if test_images is not None:
        test_images = check_pixels(test_images, "test_images", image_shape=p.model.image_shape)

    start, ck = 0, None
    ckpt_path = os.path.join(out_dir, CKPT_NAME) if out_dir else None
    if ckpt_path and resume and os.path.exists(ckpt_path):
        ck = runfolder.load_for_resume(ckpt_path)
        start = int(ck["step"])
        explicit = set(overrides or {}) if isinstance(preset, str) and preset == ck["config"].get("preset") else None
        p, notes = runfolder.reconcile(preset_from_config(ck["config"]), p, explicit, step=start, where=ckpt_path)
        check_train_config(p.train)
        if steps is not None and start >= steps:
            say(f"{ckpt_path} is already at step {start} (asked: {steps} steps): nothing to do, nothing written. "
                "Give a larger --steps (steps=) to continue, or --no-resume (resume=False) to start afresh.")
            return {"preset": p.name, "steps": start, "steps_run": 0, "already_done": True, "skipped_steps": 0,
                    "final_train_bpd": None, "history": [], "backend": backend, "checkpoint": ckpt_path}
        for n in notes:
            say(n)
    tc = p.train
    for name, n_img in (("batch_size", len(train_images)), ("init_batch_size", len(train_images))):
        if getattr(tc, name) > n_img and (name == "batch_size" or ck is None):
            raise ConfigError(f"{name} {getattr(tc, name)} exceeds the {n_img} training images")
    if tc.batch_size % comm.size:
        raise ConfigError(f"--batch-size {tc.batch_size} (batch_size, the global batch) does not divide among the "
                          f"{comm.size} processes: each takes batch_size / {comm.size} images; choose a multiple "
                          f"of {comm.size}")
    if p.model.n_bits < 8:
        from flowpp_ref.datasets import reduce_bits
        train_images = reduce_bits(train_images, p.model.n_bits)
        test_images = None if test_images is None else reduce_bits(test_images, p.model.n_bits)

    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if out_dir and comm.rank == 0:
        stale = runfolder.remove_stale_temporaries(out_dir)
        if stale:
            say(f"removed {len(stale)} temporary file(s) left by an interrupted write in {out_dir}: {', '.join(stale)}")
    model = build_model(p, backend, dtype)
    xp = model.xp
    params = model.parameters()
    adam = Adam(params)
    ema = EMA(params, decay=tc.ema_decay)
    if ck is not None:
        _restore(model, adam, ema, ck, xp)
        ema.decay = float(tc.ema_decay)             # a changed --ema-decay applies from here on
        params = model.parameters()
    else:
        idx = np.random.default_rng([tc.seed, 99]).permutation(len(train_images))[:tc.init_batch_size]
        model.data_init(train_images[idx], rng=step_rng(tc.seed, -1, xp))
        params = model.parameters()
        dist.broadcast_arrays(comm, params)            # every rank starts from rank 0's init
        ema.load_state_dict({"decay": tc.ema_decay, "shadow": {k: v.copy() for k, v in params.items()}})
    check_x = train_images[np.random.default_rng([tc.seed, 98]).permutation(len(train_images))[:min(tc.batch_size, 16)]]

    dist.check_same_parameters(comm, params, where="after the init" if ck is None else f"after loading {ckpt_path}")
    if out_dir and comm.rank == 0:
        runfolder.truncate_log(os.path.join(out_dir, "log.jsonl"), start)
    log = _Logger(os.path.join(out_dir, "log.jsonl") if out_dir and comm.rank == 0 else None)
    reducer = None
    if comm.size > 1:       # gradients + [loss, failed, time up, SIGINT, SIGTERM]: one all-reduce per step
        reducer = dist.FlatBuffer({k: v.shape for k, v in params.items()}, 5, xp, dtype)
    history = []
    state = {"bad": 0, "skipped": 0, "good_ckpt": (ckpt_path, start) if ck is not None else None, "deferred": False}
    pending = []                    # (step, loss, grad norm, ok, lr) of steps not yet read back
    total = steps if steps is not None else 10 ** 12
    deadline = time.perf_counter() + 60 * minutes if minutes is not None else math.inf
    bar = _progress(progress, start, total if steps is not None else None, p.name)
    t_last, step = time.perf_counter(), start

    def last_good():
        g = state["good_ckpt"]
        if g is None:
            return ("no checkpoint of this run was written (the first was due at step "
                    f"{(start // tc.checkpoint_every + 1) * tc.checkpoint_every}), so there is nothing to resume")
        prev = os.path.join(os.path.dirname(g[0]), runfolder.PREV_NAME)
        return (f"the last good checkpoint is {g[0]} (step {g[1]}, finite)"
                + (f"; {prev} holds the one before" if os.path.exists(prev) else ""))

    def flush():
        """Read the pending steps' scalars back (one host transfer), log them, count skipped steps."""
        nonlocal t_last
        if not pending:
            return
        vals = to_numpy(xp.stack([xp.stack([lo.astype(xp.float64), gn, ok.astype(xp.float64)])
                                  for _, lo, gn, ok, _ in pending]))
        now = time.perf_counter()
        n_ok = int(vals[:, 2].sum())
        for (s, _, _, _, lr), (loss_f, gnorm, ok) in zip(pending, vals.tolist()):
            if not ok:
                state["bad"] += 1
                state["skipped"] += 1
                log.write({"step": s, "skipped": True, "loss": repr(loss_f), "grad_norm": repr(gnorm)})
                if bar is not None:
                    bar.write(f"step {s}: non-finite loss/gradient ({loss_f}, {gnorm}); step skipped")
                if state["bad"] >= tc.max_bad_steps:
                    e = TrainingDiverged(
                        f"{state['bad']} consecutive steps with a non-finite loss or gradient (last at step {s}); "
                        f"{last_good()}. Lower the learning rate (--lr) or check the data.")
                    e.coordinated = True                # the same values on every rank
                    raise e
                continue
            state["bad"] = 0
            rec = {"step": s, "train_bpd": loss_f, "grad_norm": gnorm, "lr": lr}
            history.append(rec)
            if on_step is not None:
                on_step(s, rec)
        if history and history[-1]["step"] == pending[-1][0]:
            history[-1]["img_per_s"] = n_ok * tc.batch_size / max(now - t_last, 1e-9)
            log.write(history[-1])
            if bar is not None:
                bar.set_postfix(bpd=f"{history[-1]['train_bpd']:.3f}", ips=f"{history[-1]['img_per_s']:.1f}")
        t_last = now
        pending.clear()

    def checkpoint(final=False):
        """Write a checkpoint if the parameters are sound; else keep the last good one."""
        if state["bad"]:
            if final:
                say(f"the last step ({step}) was skipped, so no checkpoint of it was written; {last_good()}")
            elif not state["deferred"]:
                say(f"step {step}: checkpoint postponed (the last step was skipped); {last_good()}")
            state["deferred"] = True
            return False
        nonlocal params
        dist.check_same_parameters(comm, {**params, **{"ema/" + k: v for k, v in ema.shadow.items()}},
                                   where=f"step {step}, before writing {ckpt_path}")
        bad = _check_batch_failure(model, ema, check_x, tc.seed, xp)
        params = model.parameters()              # use_ema put back copies: the loop must update those
        if bad:
            e = TrainingDiverged(f"at step {step} the {bad} give a non-finite loss on the check batch, so no "
                                 f"checkpoint was written; {last_good()}. Lower the learning rate (--lr).")
            e.coordinated = True
            raise e
        if comm.rank == 0:
            runfolder.keep_previous(ckpt_path)
            _save(ckpt_path, model, adam, ema, step, p)
        state["good_ckpt"], state["deferred"] = (ckpt_path, step), False
        return True

    guard = runfolder.InterruptGuard(say)
    try:
        with guard:
            stop = False
            while step < total and not stop and (reducer is not None or
                                                 (time.perf_counter() < deadline and not guard.requested)):
                idx = batch_indices(len(train_images), tc.batch_size, tc.seed, step)
                if reducer is None:
                    loss, grads = shard_loss_and_grads(model, train_images, idx, seed=tc.seed, step=step, comm=comm)
                else:
                    loss, grads, stop, sig = _reduced_step(model, train_images, idx, tc.seed, step, comm, reducer,
                                                           time.perf_counter() >= deadline, guard.requested)
                    if sig:
                        guard.requested = guard.requested or sig     # some rank got it: all stop as interrupted
                gnorm = global_grad_norm_array(grads)
                ok = xp.isfinite(loss) & xp.isfinite(gnorm)      # a skipped step changes nothing (no host sync)
                step += 1
                lr = learning_rate(step, tc)                  # warm-up, or a release schedule
                adam.step(params, grads, lr, grad_scale=clip_scale(gnorm, tc.grad_clip), apply=ok)
                ema.update(params, apply=ok)
                pending.append((step, loss, gnorm, ok, lr))
                if bar is not None:
                    bar.update(1)
                due_ckpt = ckpt_path and (step % tc.checkpoint_every == 0 or state["deferred"])
                if step % tc.log_every == 0 or step == total or due_ckpt:
                    flush()                                      # the only host sync of the loop
                if due_ckpt:
                    checkpoint()
            flush()
    except BaseException as e:
        dist.abort_on_error(comm, e)          # an error only this rank saw: end every rank
        raise
    finally:
        if bar is not None:
            bar.close()
    skipped = state["skipped"]
    steps_run = step - start
    wrote = False
    if ckpt_path and steps_run and state["good_ckpt"] != (ckpt_path, step):
        wrote = checkpoint(final=True)
    if guard.requested:
        import signal as _signal
        name = _signal.Signals(guard.requested).name
        log.close()
        where = (f"checkpoint written to {ckpt_path} (step {step})" if wrote or state["good_ckpt"] == (ckpt_path, step)
                 else (last_good() if ckpt_path else "no out_dir, so no checkpoint"))
        how = ("To continue, run the same command again (it resumes from the checkpoint); add --no-resume to "
               "start afresh." if ckpt_path else "Give out_dir= to make a run resumable.")
        raise TrainingInterrupted(f"{name} at step {step}: {where}. {how}", step=step, signum=guard.requested,
                                  checkpoint=state["good_ckpt"][0] if state["good_ckpt"] else None)
    summary = {"preset": p.name, "steps": step, "steps_run": steps_run, "skipped_steps": skipped,
               "final_train_bpd": history[-1]["train_bpd"] if history else None,
               "num_parameters": model.num_parameters(), "backend": backend}
    if steps_run == 0:
        say(f"no optimiser step fitted in the time budget (minutes={minutes}); nothing written")
        log.close()
        summary.update(history=history, model=model, ema=ema)
        return summary
    if test_images is not None and len(test_images):
        with use_ema(model, ema):
            summary["test_bpd"] = evaluate(model, test_images, batch_size=tc.batch_size,
                                           max_batches=tc.eval_batches, seed=tc.seed,
                                           label=f"the test images at step {step}", comm=comm)["bpd"]
            from flowpp_ref.training.evaluation import inverse_error      # issue 12: the release's val_inverr monitor
            summary["val_inverr"] = inverse_error(model, test_images, batch_size=tc.batch_size,
                                                  max_batches=tc.eval_batches, seed=tc.seed)
        log.write({"step": step, "test_bpd": summary["test_bpd"], "val_inverr": summary["val_inverr"]})
    log.close()
    summary["history"] = history
    if out_dir and comm.rank == 0:
        runfolder.atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(
            {k: v for k, v in summary.items() if k != "history"}, indent=2, allow_nan=False))
    summary["model"] = model
    summary["ema"] = ema
    return summary


def _reduced_step(model, images, idx, seed, step, comm, reducer, time_up, signum):
    """This rank's shard step, then one all-reduce of [gradients, loss, failed, time up, SIGINT, SIGTERM].

    Returns the global (loss, gradients, stop, signal number or None): stop when some
    rank's time budget ran out or some rank received SIGINT/SIGTERM. A rank whose step raised contributes
    zeros and failed = 1: every rank then raises together (that rank its own error,
    marked rank-local so it is reported; the others :class:`~flowpp_ref.runtime.distributed.PeerFailed`).
    """
    import signal as _signal
    xp = model.xp
    err = None
    ctl = [0.0, float(bool(time_up)), float(signum == _signal.SIGINT), float(signum == _signal.SIGTERM)]
    try:
        loss, grads = shard_loss_and_grads(model, images, idx, seed=seed, step=step, comm=comm)
        reducer.pack(grads, xp.concatenate([xp.asarray(loss, dtype=reducer.data.dtype).reshape(1),
                                            xp.asarray(ctl, dtype=reducer.data.dtype)]))
    except Exception as e:  # noqa: BLE001 - reported below, after the others know
        err = e
        ctl[0] = 1.0
        reducer.pack(None, [0.0] + ctl)
    comm.allreduce(reducer.data)
    reducer.data *= reducer.data.dtype.type(1.0 / comm.size)     # the mean over equal shards
    g, extra = reducer.unpack()
    flags = to_numpy(extra[1:]).astype(np.float64) * comm.size   # one host read of 4 scalars per step
    if flags[0] > 0:
        n_failed = int(round(flags[0]))
        if err is not None:
            err.coordinated, err.rank_local = True, True
            err.flowpp_where = f"rank {comm.rank} of {comm.size}, step {step + 1}"
            raise err
        e = dist.PeerFailed(f"{n_failed} of the {comm.size} processes failed in step {step + 1} (the failing "
                            "process reports its error); every process stopped")
        e.coordinated = True
        raise e
    sig = _signal.SIGTERM if flags[3] > 0.5 else _signal.SIGINT if flags[2] > 0.5 else None
    return extra[0].copy(), g, bool(flags[1] > 0.5 or sig), sig   # (the buffer is reused next step)


def _check_batch_failure(model, ema, check_x, seed, xp):
    """None if the training and the EMA parameters give a finite loss on ``check_x``
    (eval mode, a fixed generator); else which of them do not. One host read-back."""
    loss_p, _ = model.loss(check_x, rng=make_rng(2 ** 40 + int(seed), xp), train=False)
    with use_ema(model, ema):
        loss_e, _ = model.loss(check_x, rng=make_rng(2 ** 40 + int(seed), xp), train=False)
    fin = np.isfinite(to_numpy(xp.stack([loss_p, loss_e]).astype(xp.float64)))
    bad = [what for what, f in zip(("training parameters", "EMA parameters"), fin) if not f]
    return " and ".join(bad) or None


class use_ema:
    """Context manager: evaluate or sample with the EMA parameters, then restore."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        self.saved = {k: v.copy() for k, v in self.model.parameters().items()}
        self.model.load_parameters({k: v.copy() for k, v in self.ema.state_dict()["shadow"].items()})
        return self.model

    def __exit__(self, *exc):
        self.model.load_parameters(self.saved)
        return False


def evaluate(model, images, *, batch_size=64, max_batches=None, k=1, seed=0, label=None, progress=False,
             comm=None):
    """Mean test bits/dim over (up to ``max_batches``; None: all) batches; k > 1: the release's
    importance-sampled bound (:func:`flowpp_ref.training.evaluation.evaluate_iw`: passes of ``batch_size``
    (image, sample) pairs, float64 log-sum-exp, a progress bar on rank 0 if ``progress``).

    The random numbers of sample j of image i come from a :class:`~flowpp_ref.training.keyed_rng.KeyedRNG`
    keyed by (seed, j) and i, so the result does not depend on how the work is split:
    with ``comm`` (default: :func:`flowpp_ref.runtime.distributed.get_comm`) of N ranks the
    (batch, sample) pairs are dealt round-robin over the ranks (so the k samples of the
    bound are spread over them too) and the log-weights summed in one all-reduce.

    Raises :class:`NonFiniteResult` naming the batch (and ``label``, e.g. the checkpoint)
    if any image's bits/dim is not finite: a result is a number or an error.
    """
    from flowpp_ref.core.backend import is_cupy
    from flowpp_ref.model.objective import importance_sampled_log_prob
    check_option("batch_size", batch_size)
    check_option("max_batches", max_batches, none_ok=True)
    check_option("k", k)
    if comm is None:
        comm = dist.get_comm(backend="cupy" if is_cupy(model.xp) else "numpy")
    images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ConfigError("evaluate: no images")
    nb = math.ceil(n / batch_size)
    if max_batches is not None:
        nb = min(nb, max_batches)
    m = min(n, nb * batch_size)
    if k > 1:   # issue 12: the release's k-sample bound; issue 11: its passes spread over the ranks
        from flowpp_ref.training.evaluation import evaluate_iw, iw_key
        r = evaluate_iw(model, images[:m], k, key=iw_key(seed), rows=batch_size,
                        progress=progress and comm.rank == 0, comm=comm)
        if not (np.isfinite(r["bpd"]) and np.isfinite(r["bpd_sem"])):
            raise NonFiniteResult(
                f"the {k}-sample bits/dim of {label or 'the evaluation'} is not finite ({r['bpd']}): the "
                "parameters are broken; use an earlier checkpoint (checkpoint-prev.npz of the run folder)")
        return r
    logw = np.zeros((k, m), dtype=np.float64)          # log-weights (ELBO samples), nats
    for unit in range(comm.rank, nb * k, comm.size):
        i, j = divmod(unit, k)
        lo, hi = i * batch_size, min((i + 1) * batch_size, m)
        rng = KeyedRNG(key_of(seed, 12345, j), np.arange(lo, hi), model.xp)
        elbo, _ = model.elbo(model.prepare(images[lo:hi]), rng=rng, train=False)
        logw[j, lo:hi] = to_numpy(elbo).astype(np.float64)
    comm.allreduce(logw)
    logp = importance_sampled_log_prob(logw) if k > 1 else logw[0]
    v = -logp / (model.num_dims * math.log(2.0))
    for i in range(nb):
        vb = v[i * batch_size:(i + 1) * batch_size]
        if not np.isfinite(vb).all():
            raise NonFiniteResult(
                f"bits/dim is not finite for {int((~np.isfinite(vb)).sum())} of the {len(vb)} images of batch {i} "
                f"(images {i * batch_size}..{i * batch_size + len(vb) - 1}) of {label or 'the evaluation'}: the "
                "parameters are broken; use an earlier checkpoint (checkpoint-prev.npz of the run folder)")
    return {"bpd": float(v.mean()), "bpd_sem": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0,
            "num_images": int(len(v)), "k": int(k)}


def _progress(enabled, start, total, name):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(initial=start, total=total, desc=f"train {name}", unit="step", dynamic_ncols=True)


def _save(path, model, adam, ema, step, p):
    save_checkpoint(path, params=model.parameters(), ema=ema.state_dict(), optimizer_state=adam.state_dict(),
                    step=step, rng_state={"seed": p.train.seed, "step": step}, config=_config_dict(p))


def _restore(model, adam, ema, ck, xp):
    from flowpp_ref.core.backend import asarray
    model.load_parameters({k: asarray(v, xp) for k, v in ck["params"].items()})
    adam.load_state_dict(ck["optimizer_state"])
    ema.load_state_dict(ck["ema"])


def load_model(checkpoint_path, backend="numpy", use_ema_params=True):
    """Rebuild the model of a checkpoint (EMA parameters by default)."""
    from flowpp_ref.core.backend import asarray
    ck = load_checkpoint(checkpoint_path)
    p = preset_from_config(ck["config"])
    model = build_model(p, backend)
    src = ck["ema"]["shadow"] if use_ema_params else ck["params"]
    model.load_parameters({k: asarray(v, model.xp, dtype=model.dtype) for k, v in src.items()})
    return model, p, ck
