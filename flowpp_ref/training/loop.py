"""Training and checkpoint loading of Flow++ from Python (the CLI calls these).

    from flowpp_ref.training.loop import train
    summary = train("small", train_images, test_images, out_dir="runs/demo", minutes=3)

Recipe (appendix 8.5): Adam, linear learning-rate warm-up, global gradient-norm
clipping, dropout, an EMA of the parameters used for evaluation and sampling, the
data-dependent init pass on an init batch. :func:`train` is made of named parts:
:func:`_resolve_run` (options, checks, resume), :func:`_build_state` (model, Adam, EMA,
init or restore), :func:`train_step` (one optimiser step), :class:`_ScalarLog` (the
read-back of the steps' scalars and ``log.jsonl``), :class:`_Checkpoints` (when and
whether a checkpoint is written) and :func:`_finish` (final checkpoint, evaluation,
``summary.json``).

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

Run folder (:mod:`flowpp_ref.runtime.runfolder`): held with
:class:`~flowpp_ref.runtime.runfolder.RunFolderLock` (one run at a time) from before the
first file in it is touched until :func:`train` returns. Checkpoints are written
atomically, only from parameters (training and EMA) that give a finite loss on a fixed
check batch and when the last step was not skipped; the one before is kept as
``checkpoint-prev.npz``. A resumed run truncates ``log.jsonl`` to its checkpoint's
step, states (or refuses) options that differ from the checkpoint's, and returns at
once when the checkpoint is already at ``steps``. SIGINT/SIGTERM stop the loop after
the current step, write a checkpoint and raise :class:`TrainingInterrupted`. Option
ranges: :mod:`flowpp_ref.runtime.options`.

Data parallel (:mod:`flowpp_ref.runtime.distributed`): under ``mpiexec -n N`` (or
with ``comm=``) each of the N processes computes the loss and gradients of its
``batch_size / N`` images of the global batch; one all-reduce per step sums the
gradients, the loss and two flags (a rank whose step raised; a rank that wants to stop:
time budget or signal) in one flat buffer, and every rank applies the same clipping,
Adam and EMA update. The dequantization noise and dropout masks of an image come from
:class:`~flowpp_ref.training.keyed_rng.KeyedRNG` keyed by (seed, step, position in the global
batch), so an N-process step equals the one-process step up to the rounding of the sum.
The data-dependent init runs on the global init batch on every rank, then rank 0's
parameters are broadcast; a resumed run loads the checkpoint on every rank. A hash of
the parameters is compared across ranks at every checkpoint. Rank 0 alone holds the run
folder's lock and writes the checkpoints, the log, summary.json and the progress bar.
With N > 1 the time budget and signals stop the run after the step in which some rank
noticed them (every rank stops at the same step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal as _signal
import sys
import time

import numpy as np

from flowpp_ref.core.backend import array_module, asarray, get_xp, is_cupy, make_rng, rng_for, to_numpy
from flowpp_ref.core.validation import check_pixels
from flowpp_ref.datasets import reduce_bits
from flowpp_ref.kernels import choose_threading_layer
from flowpp_ref.bijections.batchnorm import BatchNormFlow
from flowpp_ref.model import FlowPP
from flowpp_ref.model.lineage import model_class
from flowpp_ref.model.presets import ModelConfig, Preset, TrainConfig, get_preset
from flowpp_ref.runtime import distributed as dist
from flowpp_ref.runtime import runfolder
from flowpp_ref.runtime.checkpoint import load_checkpoint, save_checkpoint
from flowpp_ref.runtime.options import ConfigError, check_model_config, check_run_limits, check_train_config
from flowpp_ref.runtime.runfolder import TrainingInterrupted  # noqa: F401  (re-exported)
from flowpp_ref.runtime.threads import tune_threads
from flowpp_ref.training.evaluation import evaluate, inverse_error, use_ema
from flowpp_ref.training.keyed_rng import KeyedRNG, key_of
from flowpp_ref.training.fused import FusedUpdate
from flowpp_ref.training.warmup import start_background_compile
from flowpp_ref.training.optim import OPTIMIZERS, EMA, Adam, clip_scale, global_grad_norm_array, warmup_lr  # noqa: F401
from flowpp_ref.training.schedules import learning_rate

CKPT_NAME = "checkpoint.npz"
DEVICE_DATA_MAX_BYTES = 4 * 2 ** 30      # a training set up to this size is kept on the GPU (CIFAR-10: 150 MiB)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient, or parameters that
    give a non-finite loss on the check batch."""


def step_rng(seed: int, step: int, xp=np):
    """The generator of step ``step``: a pure function of (seed, step), drawn on the host (NumPy's PCG64)
    and copied to the backend, so the data-dependent init is the same on NumPy and CuPy."""
    return rng_for(np.random.default_rng(int(seed) * 1_000_003 + int(step) + 1), xp)


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
    return model.loss_and_grads(take(images, idx[lo:lo + b]), rng=rng, train=train)


def take(images, idx):
    """``images[idx]`` for host indices ``idx``, on the images' backend (a training set kept on the device
    is gathered there: the indices go up, not the images)."""
    if isinstance(images, np.ndarray):
        return images[idx]
    return images[array_module(images).asarray(idx)]


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
    """The model of ``p.model.family`` (:class:`FlowPP`, or RealNVP / Glow of :mod:`flowpp_ref.model.lineage`)."""
    return model_class(p.model)(p.model, seed=p.train.seed, xp=get_xp(backend), dtype=dtype)


def _share_batch_statistics(model, comm):
    """Data parallel: every BatchNormFlow normalises with the global batch's statistics (its ``comm``)."""
    for m in model.modules():
        if isinstance(m, BatchNormFlow):
            m.comm = comm


@dataclasses.dataclass
class _Run:
    """What one call of :func:`train` works on, resolved before the first step."""
    preset: Preset
    train_images: np.ndarray
    test_images: np.ndarray | None
    comm: object
    say: object                         # say(message): the sentences about resuming, checkpoints, signals
    out_dir: str | None
    steps: int | None                   # the step to stop at (None: the time budget alone)
    minutes: float | None
    backend: str
    start: int = 0                      # the step the run starts from (a resumed checkpoint's)
    checkpoint: dict | None = None      # the checkpoint resumed from

    @property
    def ckpt_path(self):
        return os.path.join(self.out_dir, CKPT_NAME) if self.out_dir else None

    @property
    def total(self):
        return self.steps if self.steps is not None else 10 ** 12


@dataclasses.dataclass
class _State:
    """The model and its optimiser state on the backend."""
    model: FlowPP
    adam: Adam
    ema: EMA
    params: dict                        # the arrays Adam and the EMA update in place
    reducer: object                     # the all-reduce buffer of a data-parallel run, else None
    check_x: np.ndarray                 # the check batch a checkpoint's parameters must pass
    fused: FusedUpdate                  # clipping + Adam + EMA in one pass over flat buffers


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
    ``out_dir`` is locked (:class:`~flowpp_ref.runtime.runfolder.RunFolderLock`) while the
    run writes into it: a second run on it raises :class:`~flowpp_ref.runtime.runfolder.RunFolderBusy`.
    Calls :func:`~flowpp_ref.runtime.threads.tune_threads` first (idle thread pools sleep at once) and,
    on NumPy with an empty numba cache, :func:`~flowpp_ref.training.warmup.start_background_compile`.
    """
    tune_threads()
    choose_threading_layer()                # again: the spin may be bounded now
    if backend == "numpy":
        start_background_compile()          # empty numba cache: backward kernels compiled alongside
    comm = dist.get_comm(backend=backend) if comm is None else comm
    args = dict(out_dir=out_dir, steps=steps, minutes=minutes, resume=resume, backend=backend, comm=comm,
                say=_reporter(report, comm))
    seen = _checkpoint_stamp(out_dir)
    run = _resolve_run(preset, overrides, train_images, test_images, **args)
    if isinstance(run, dict):
        return run                                          # the checkpoint is already at `steps`
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with runfolder.RunFolderLock(out_dir, "train", comm=comm) if out_dir else contextlib.nullcontext():
        if resume and _checkpoint_moved(out_dir, seen, comm):   # another run wrote it before we held the folder
            run = _resolve_run(preset, overrides, train_images, test_images, **args)
            if isinstance(run, dict):
                return run
        _remove_stale_temporaries(run)                      # rank 0 holds the folder from here to the return
        st = _build_state(run, dtype)
        ckpts = _Checkpoints(run, st)
        log = _ScalarLog(run, st.model.xp, on_step, ckpts.last_good, progress=progress and comm.rank == 0)
        guard = runfolder.InterruptGuard(run.say)
        step = _run_steps(run, st, log, ckpts, guard)
        return _finish(run, st, log, ckpts, guard, step)


def _checkpoint_stamp(out_dir):
    """(modification time in ns, size) of ``out_dir/checkpoint.npz``, or None where there is none."""
    try:
        st = os.stat(os.path.join(out_dir, CKPT_NAME)) if out_dir else None
    except FileNotFoundError:
        return None
    return None if st is None else (st.st_mtime_ns, st.st_size)


def _checkpoint_moved(out_dir, seen, comm):
    """Whether the checkpoint changed between the resume read and taking the lock (another run
    finished in between); rank 0 decides for every rank."""
    flag = np.array([float(_checkpoint_stamp(out_dir) != seen)])
    if comm.size > 1:
        comm.broadcast(flag)
    return bool(flag[0])


def _reporter(report, comm):
    """``say(message)``: ``report`` (default: print to stderr) on rank 0, nothing elsewhere."""
    if comm.rank != 0:
        return lambda msg: None
    return report or (lambda msg: print(msg, file=sys.stderr, flush=True))


def _resolve_run(preset, overrides, train_images, test_images, *, out_dir, steps, minutes, resume, backend, comm,
                 say):
    """The preset with ``overrides``, the checked options and images, the resume point: a
    :class:`_Run`, or the summary of a run whose checkpoint is already at ``steps``."""
    p = _resolve(preset, overrides)
    check_run_limits(steps, minutes)
    check_train_config(p.train)
    check_model_config(p.model)
    train_images = check_pixels(train_images, "train_images", image_shape=p.model.image_shape)
    if test_images is not None:
        test_images = check_pixels(test_images, "test_images", image_shape=p.model.image_shape)
    run = _Run(p, train_images, test_images, comm, say, out_dir, steps, minutes, backend)
    if run.ckpt_path and resume and os.path.exists(run.ckpt_path):
        done = _resume(run, preset, overrides)
        if done is not None:
            return done
    tc = run.preset.train
    for name, n_img in (("batch_size", len(train_images)), ("init_batch_size", len(train_images))):
        if getattr(tc, name) > n_img and (name == "batch_size" or run.checkpoint is None):
            raise ConfigError(f"{name} {getattr(tc, name)} exceeds the {n_img} training images")
    if tc.batch_size % comm.size:
        raise ConfigError(f"--batch-size {tc.batch_size} (batch_size, the global batch) does not divide among the "
                          f"{comm.size} processes: each takes batch_size / {comm.size} images; choose a multiple "
                          f"of {comm.size}")
    if run.preset.model.n_bits < 8:
        run.train_images = reduce_bits(train_images, run.preset.model.n_bits)
        run.test_images = None if test_images is None else reduce_bits(test_images, run.preset.model.n_bits)
    return run


def _resume(run, preset, overrides):
    """Load ``run.ckpt_path`` (read only) and reconcile its options with the ones asked
    (:func:`~flowpp_ref.runtime.runfolder.reconcile`). Returns the summary of a run that
    has nothing left to do (the checkpoint is at ``steps`` or beyond), else None."""
    ck = runfolder.load_for_resume(run.ckpt_path)
    run.checkpoint, run.start = ck, int(ck["step"])
    explicit = set(overrides or {}) if isinstance(preset, str) and preset == ck["config"].get("preset") else None
    run.preset, notes = runfolder.reconcile(preset_from_config(ck["config"]), run.preset, explicit, step=run.start,
                                            where=run.ckpt_path)
    check_train_config(run.preset.train)
    if run.steps is not None and run.start >= run.steps:
        run.say(f"{run.ckpt_path} is already at step {run.start} (asked: {run.steps} steps): nothing to do, nothing "
                "written. Give a larger --steps (steps=) to continue, or --no-resume (resume=False) to start afresh.")
        return {"preset": run.preset.name, "steps": run.start, "steps_run": 0, "already_done": True,
                "skipped_steps": 0, "final_train_bpd": None, "history": [], "backend": run.backend,
                "checkpoint": run.ckpt_path}
    for n in notes:
        run.say(n)
    return None


def _remove_stale_temporaries(run):
    """Rank 0: remove the temporary files an interrupted write left in the run folder."""
    if run.out_dir and run.comm.rank == 0:
        stale = runfolder.remove_stale_temporaries(run.out_dir)
        if stale:
            run.say(f"removed {len(stale)} temporary file(s) left by an interrupted write in {run.out_dir}: "
                    f"{', '.join(stale)}")


def _build_state(run, dtype):
    """Model, Adam and EMA (appendix 8.5): restored from the resumed checkpoint, or the
    data-dependent init on the init batch, rank 0's result broadcast to every rank."""
    p, tc, comm = run.preset, run.preset.train, run.comm
    model = build_model(p, run.backend, dtype)
    if comm.size > 1:
        _share_batch_statistics(model, comm)
    xp = model.xp
    if is_cupy(xp) and run.train_images.dtype == np.uint8 and model.levels == 256 and \
            run.train_images.nbytes <= DEVICE_DATA_MAX_BYTES:   # (uint8 8-bit pixels need no per-batch check)
        run.train_images = asarray(run.train_images, xp)      # uploaded once; each step gathers its batch there
    params = model.parameters()
    adam = OPTIMIZERS[tc.optimizer](params, beta2=tc.beta2)
    ema = EMA(params, decay=tc.ema_decay)
    if run.checkpoint is not None:
        _restore(model, adam, ema, run.checkpoint, xp)
        ema.decay = float(tc.ema_decay)                 # a changed --ema-decay applies from here on
        params = model.parameters()
    else:
        idx = np.random.default_rng([tc.seed, 99]).permutation(len(run.train_images))[:tc.init_batch_size]
        model.data_init(take(run.train_images, idx), rng=step_rng(tc.seed, -1, xp))
        params = model.parameters()
        dist.broadcast_arrays(comm, params)            # every rank starts from rank 0's init
        ema.load_state_dict({"decay": tc.ema_decay, "shadow": {k: v.copy() for k, v in params.items()}})
    n = len(run.train_images)
    check_x = take(run.train_images, np.random.default_rng([tc.seed, 98]).permutation(n)[:min(tc.batch_size, 16)])
    dist.check_same_parameters(comm, params, where="after the init" if run.checkpoint is None
                               else f"after loading {run.ckpt_path}")
    reducer = None
    if comm.size > 1:       # gradients + [loss, failed, time up, SIGINT, SIGTERM]: one all-reduce per step
        reducer = dist.FlatBuffer({k: v.shape for k, v in params.items()}, 5, xp, dtype)
    fused = FusedUpdate(model, adam, ema)             # parameters, moments and shadow now live in flat buffers
    return _State(model, adam, ema, model.parameters(), reducer, check_x, fused)


def train_step(st, run, step, *, time_up=False, signum=None):
    """Optimiser step ``step + 1`` (appendix 8.5), all on the backend (no host sync).

    Loss and gradients of the batch of ``step`` (on N ranks: this rank's shard, then the
    mean over the ranks, :func:`_reduced_step`); the global gradient norm ||g||; Adam on
    g * min(1, clip / ||g||) at the warm-up learning rate; the EMA of the parameters (all three
    fused, :class:`~flowpp_ref.training.fused.FusedUpdate`). A step whose loss or ||g|| is not
    finite changes nothing (decided on the device; ``ok`` is 1.0 for an applied step, 0.0 else).
    Returns the pending scalars ``(step + 1, loss, ||g||, ok, lr)`` and, on N ranks,
    (stop, signal) of the all-reduce (else ``(False, None)``).
    """
    tc = run.preset.train
    idx = batch_indices(len(run.train_images), tc.batch_size, tc.seed, step)
    if st.reducer is None:
        loss, grads = shard_loss_and_grads(st.model, run.train_images, idx, seed=tc.seed, step=step, comm=run.comm)
        stop, sig = False, None
    else:
        loss, grads, stop, sig = _reduced_step(st.model, run.train_images, idx, tc.seed, step, run.comm,
                                               st.reducer, time_up, signum)
    lr = learning_rate(step + 1, tc)                             # warm-up, or a release schedule
    # ||g||; Adam on g min(1, c / ||g||); ema <- d ema + (1 - d) theta; nothing changes where the loss or ||g||
    # is not finite (decided on the device, no host sync). The same as global_grad_norm_array, Adam.step and
    # EMA.update with apply=ok, in one pass over flat buffers (training/fused.py)
    flat = None if st.reducer is None else st.reducer.data[:st.reducer.n_params]
    gnorm, ok = st.fused.step(None if flat is not None else grads, loss, lr, tc.grad_clip, flat_grads=flat)
    return (step + 1, loss, gnorm, ok, lr), stop, sig


def _run_steps(run, st, log, ckpts, guard):
    """Steps until ``steps``, the time budget or a signal (on N ranks: after the step in
    which some rank noticed either); scalars read back every ``log_every`` steps and before
    a checkpoint. Returns the step reached."""
    tc, step, stop = run.preset.train, run.start, False
    deadline = time.perf_counter() + 60 * run.minutes if run.minutes is not None else math.inf
    try:
        with guard:
            while step < run.total and not stop and (st.reducer is not None or
                                                     (time.perf_counter() < deadline and not guard.requested)):
                scalars, stop, sig = train_step(st, run, step, time_up=time.perf_counter() >= deadline,
                                                signum=guard.requested)
                if sig:
                    guard.requested = guard.requested or sig    # some rank got it: all stop as interrupted
                step = scalars[0]
                log.add(scalars)
                due_ckpt = ckpts.due(step)
                due_eval = bool(tc.eval_every) and step % tc.eval_every == 0 and run.test_images is not None
                if step % tc.log_every == 0 or step == run.total or due_ckpt or due_eval:
                    log.flush()                                  # the only host sync of the loop
                if due_ckpt:
                    ckpts.write(step, skipped=log.bad > 0)
                if due_eval:                                     # the clock stops while it evaluates
                    deadline += _periodic_eval(run, st, log, step)
            log.flush()
    except BaseException as e:
        dist.abort_on_error(run.comm, e)          # an error only this rank saw: end every rank
        raise
    finally:
        log.close_progress()
    return step


class _ScalarLog:
    """The scalars (loss, gradient norm, finite flag, lr) of the steps not yet read back.

    :meth:`flush` reads every pending step back in one host transfer, appends the
    records to ``history`` and to ``log.jsonl`` (rank 0; truncated to the resumed step
    when opened), calls ``on_step``, counts skipped steps and raises
    :class:`TrainingDiverged` after ``max_bad_steps`` consecutive ones.
    """

    def __init__(self, run, xp, on_step, last_good, *, progress):
        path = os.path.join(run.out_dir, runfolder.LOG_NAME) if run.out_dir and run.comm.rank == 0 else None
        if path:
            runfolder.truncate_log(path, run.start)
        self.f = open(path, "a") if path else None
        self.xp, self.tc, self.on_step, self.last_good = xp, run.preset.train, on_step, last_good
        self.pending, self.history = [], []          # pending: (step, loss, grad norm, ok, lr) on the backend
        self.bad = self.skipped = 0                  # consecutive / all skipped steps
        self.bar = _progress(progress, run.start, run.steps, run.preset.name)
        self.t_last = time.perf_counter()
        # time_s in the records: seconds of training since the run's first step, continued from the
        # resumed log's last record; periodic evaluations are not counted (pause)
        self.t_origin = self.t_last - (runfolder.last_log_value(path, "time_s", 0.0) if path else 0.0)

    def pause(self, seconds):
        """Leave ``seconds`` (an evaluation) out of ``time_s``."""
        self.t_origin += seconds
        self.t_last += seconds

    def add(self, scalars):
        self.pending.append(scalars)
        if self.bar is not None:
            self.bar.update(1)

    def flush(self):
        """Read the pending steps' scalars back (one host transfer), log them, count skipped steps."""
        if not self.pending:
            return
        xp = self.xp
        vals = to_numpy(xp.stack([xp.stack([lo.astype(xp.float64), gn, ok.astype(xp.float64)])
                                  for _, lo, gn, ok, _ in self.pending]))
        now = time.perf_counter()
        n_ok = int(vals[:, 2].sum())
        for (s, _, _, _, lr), (loss_f, gnorm, ok) in zip(self.pending, vals.tolist()):
            if ok:
                self._record(s, loss_f, gnorm, lr)
            else:
                self._skipped(s, loss_f, gnorm)
        if self.history and self.history[-1]["step"] == self.pending[-1][0]:
            last = self.history[-1]
            last["img_per_s"] = n_ok * self.tc.batch_size / max(now - self.t_last, 1e-9)
            last["time_s"] = round(now - self.t_origin, 3)
            self.write(last)
            if self.bar is not None:
                self.bar.set_postfix(bpd=f"{last['train_bpd']:.3f}", ips=f"{last['img_per_s']:.1f}")
        self.t_last = now
        self.pending.clear()

    def _record(self, s, loss_f, gnorm, lr):
        self.bad = 0
        rec = {"step": s, "train_bpd": loss_f, "grad_norm": gnorm, "lr": lr}
        self.history.append(rec)
        if self.on_step is not None:
            self.on_step(s, rec)

    def _skipped(self, s, loss_f, gnorm):
        self.bad += 1
        self.skipped += 1
        self.write({"step": s, "skipped": True, "loss": repr(loss_f), "grad_norm": repr(gnorm)})
        if self.bar is not None:
            self.bar.write(f"step {s}: non-finite loss/gradient ({loss_f}, {gnorm}); step skipped")
        if self.bad >= self.tc.max_bad_steps:
            e = TrainingDiverged(
                f"{self.bad} consecutive steps with a non-finite loss or gradient (last at step {s}); "
                f"{self.last_good()}. Lower the learning rate (--lr) or check the data.")
            e.coordinated = True                # the same values on every rank
            raise e

    def write(self, rec):
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close_progress(self):
        if self.bar is not None:
            self.bar.close()

    def close(self):
        if self.f:
            self.f.close()


class _Checkpoints:
    """When and whether the run writes ``checkpoint.npz``: every ``checkpoint_every``
    steps, postponed while the last step was skipped, only from parameters (training and
    EMA) with a finite loss on the check batch, the one before kept as ``checkpoint-prev.npz``."""

    def __init__(self, run, st):
        self.run, self.st = run, st
        self.good = (run.ckpt_path, run.start) if run.checkpoint is not None else None   # (path, step)
        self.deferred = False

    def due(self, step):
        return bool(self.run.ckpt_path) and (step % self.run.preset.train.checkpoint_every == 0 or self.deferred)

    def current(self, step):
        return self.good == (self.run.ckpt_path, step)

    def last_good(self):
        """The sentence naming the last good checkpoint (and the one before), or that none exists."""
        g, every = self.good, self.run.preset.train.checkpoint_every
        if g is None:
            return ("no checkpoint of this run was written (the first was due at step "
                    f"{(self.run.start // every + 1) * every}), so there is nothing to resume")
        prev = os.path.join(os.path.dirname(g[0]), runfolder.PREV_NAME)
        return (f"the last good checkpoint is {g[0]} (step {g[1]}, finite)"
                + (f"; {prev} holds the one before" if os.path.exists(prev) else ""))

    def write(self, step, *, skipped, final=False):
        """Write a checkpoint if the parameters are sound; else keep the last good one. True if written."""
        run, st = self.run, self.st
        if skipped:
            if final:
                run.say(f"the last step ({step}) was skipped, so no checkpoint of it was written; {self.last_good()}")
            elif not self.deferred:
                run.say(f"step {step}: checkpoint postponed (the last step was skipped); {self.last_good()}")
            self.deferred = True
            return False
        dist.check_same_parameters(run.comm, {**st.params, **{"ema/" + k: v for k, v in st.ema.shadow.items()}},
                                   where=f"step {step}, before writing {run.ckpt_path}")
        bad = _check_batch_failure(st.model, st.ema, st.check_x, run.preset.train.seed, st.model.xp)
        st.params = st.model.parameters()        # use_ema put back copies: the loop must update those
        if bad:
            e = TrainingDiverged(f"at step {step} the {bad} give a non-finite loss on the check batch, so no "
                                 f"checkpoint was written; {self.last_good()}. Lower the learning rate (--lr).")
            e.coordinated = True
            raise e
        if run.comm.rank == 0:
            runfolder.keep_previous(run.ckpt_path)
            _save(run.ckpt_path, st.model, st.adam, st.ema, step, run.preset)
        self.good, self.deferred = (run.ckpt_path, step), False
        return True


def _finish(run, st, log, ckpts, guard, step):
    """The final checkpoint; :class:`TrainingInterrupted` after a signal; else the test
    bits/dim and ``val_inverr`` with the EMA parameters, ``summary.json`` and the summary."""
    steps_run = step - run.start
    wrote = False
    if run.ckpt_path and steps_run and not ckpts.current(step):
        wrote = ckpts.write(step, skipped=log.bad > 0, final=True)
    if guard.requested:
        log.close()
        raise _interruption(run, ckpts, step, guard.requested, wrote)
    summary = {"preset": run.preset.name, "steps": step, "steps_run": steps_run, "skipped_steps": log.skipped,
               "final_train_bpd": log.history[-1]["train_bpd"] if log.history else None,
               "num_parameters": st.model.num_parameters(), "backend": run.backend}
    if steps_run == 0:
        run.say(f"no optimiser step fitted in the time budget (minutes={run.minutes}); nothing written")
        log.close()
        summary.update(history=log.history, model=st.model, ema=st.ema)
        return summary
    if run.test_images is not None and len(run.test_images):
        summary.update(_test_scores(run, st, step))
        log.write({"step": step, "test_bpd": summary["test_bpd"], "val_inverr": summary["val_inverr"]})
    log.close()
    if run.out_dir and run.comm.rank == 0:
        runfolder.atomic_write_text(os.path.join(run.out_dir, "summary.json"),
                                    json.dumps(summary, indent=2, allow_nan=False))
    summary.update(history=log.history, model=st.model, ema=st.ema)
    return summary


def _test_bpd(run, st, step) -> float:
    """Test bits/dim (the ELBO) of the model's current parameters on the first ``eval_batches`` batches."""
    tc = run.preset.train
    return evaluate(st.model, run.test_images, batch_size=tc.batch_size, max_batches=tc.eval_batches,
                    seed=tc.seed, label=f"the test images at step {step}", comm=run.comm)["bpd"]


def _test_scores(run, st, step):
    """Test bits/dim (the ELBO, :func:`~flowpp_ref.training.evaluation.evaluate`) and the
    inverse's error ``val_inverr``, with the EMA parameters."""
    tc = run.preset.train
    with use_ema(st.model, st.ema):
        bpd = _test_bpd(run, st, step)
        inverr = inverse_error(st.model, run.test_images, batch_size=tc.batch_size, max_batches=tc.eval_batches,
                               seed=tc.seed)
    return {"test_bpd": bpd, "val_inverr": inverr}


def _periodic_eval(run, st, log, step) -> float:
    """Every ``eval_every`` steps: test bits/dim with the EMA parameters (the end-of-run protocol,
    :func:`_test_scores`, without ``val_inverr``), logged as ``{"step", "test_bpd", "time_s"}``.
    Returns the seconds it took, which the time budget and ``time_s`` leave out."""
    t0 = time.perf_counter()
    with use_ema(st.model, st.ema):
        bpd = _test_bpd(run, st, step)
    log.write({"step": step, "test_bpd": bpd, "time_s": round(t0 - log.t_origin, 3)})
    spent = time.perf_counter() - t0
    log.pause(spent)
    return spent


def _interruption(run, ckpts, step, signum, wrote):
    """The :class:`TrainingInterrupted` of a run stopped by ``signum`` after ``step``."""
    name = _signal.Signals(signum).name
    where = (f"checkpoint written to {run.ckpt_path} (step {step})" if wrote or ckpts.current(step)
             else (ckpts.last_good() if run.ckpt_path else "no out_dir, so no checkpoint"))
    how = ("To continue, run the same command again (it resumes from the checkpoint); add --no-resume to "
           "start afresh." if run.ckpt_path else "Give out_dir= to make a run resumable.")
    return TrainingInterrupted(f"{name} at step {step}: {where}. {how}", step=step, signum=signum,
                               checkpoint=ckpts.good[0] if ckpts.good else None)


def _reduced_step(model, images, idx, seed, step, comm, reducer, time_up, signum):
    """This rank's shard step, then one all-reduce of [gradients, loss, failed, time up, SIGINT, SIGTERM].

    Returns the global (loss, gradients, stop, signal number or None): stop when some
    rank's time budget ran out or some rank received SIGINT/SIGTERM. A rank whose step raised contributes
    zeros and failed = 1: every rank then raises together (that rank its own error,
    marked rank-local so it is reported; the others :class:`~flowpp_ref.runtime.distributed.PeerFailed`).
    """
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


def _progress(enabled, start, total, name):
    if not enabled:
        return None
    from tqdm.auto import tqdm              # loaded only when a bar is shown (it warns in Jupyter without widgets)
    return tqdm(initial=start, total=total, desc=f"train {name}", unit="step", dynamic_ncols=True)


def _save(path, model, adam, ema, step, p):
    save_checkpoint(path, params=model.parameters(), ema=ema.state_dict(), optimizer_state=adam.state_dict(),
                    step=step, rng_state={"seed": p.train.seed, "step": step}, config=_config_dict(p))


def _restore(model, adam, ema, ck, xp):
    model.load_parameters({k: asarray(v, xp) for k, v in ck["params"].items()})
    adam.load_state_dict(ck["optimizer_state"])
    ema.load_state_dict(ck["ema"])


def load_model(checkpoint_path, backend="numpy", use_ema_params=True):
    """Rebuild the model of a checkpoint (EMA parameters by default)."""
    ck = load_checkpoint(checkpoint_path)
    p = preset_from_config(ck["config"])
    model = build_model(p, backend)
    src = ck["ema"]["shadow"] if use_ema_params else ck["params"]
    model.load_parameters({k: asarray(v, model.xp, dtype=model.dtype) for k, v in src.items()})
    return model, p, ck
