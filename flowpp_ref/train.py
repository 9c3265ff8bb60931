"""Training, evaluation and sampling of Flow++ from Python (the CLI calls these).

    from flowpp_ref.train import train, evaluate, sample_grid
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
consecutive failures stop the run with :class:`TrainingDiverged`. Checkpoints are only written from finite parameters,
atomically (:mod:`flowpp_ref.checkpoint`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from .backend import get_xp, make_rng, to_numpy
from .checkpoint import load_checkpoint, save_checkpoint
from .model import FlowPP
from .optim import EMA, Adam, clip_scale, global_grad_norm_array, warmup_lr  # noqa: F401
from .schedules import learning_rate
from .presets import ModelConfig, Preset, TrainConfig, get_preset

CKPT_NAME = "checkpoint.npz"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def step_rng(seed: int, step: int, xp=np):
    """The generator of step ``step``: a pure function of (seed, step)."""
    return make_rng(int(seed) * 1_000_003 + int(step) + 1, xp)


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
          resume=True, progress=True, overrides=None, dtype=np.float32, on_step=None):
    """Train a Flow++ model; returns a summary dict (also written to ``out_dir/summary.json``).

    ``train_images``: uint8 [N,H,W,C]. Stops after ``steps`` optimiser steps (total,
    counting resumed ones) or ``minutes`` of wall-clock time, whichever comes first.
    With ``out_dir`` and ``resume``, continues from ``out_dir/checkpoint.npz``.
    ``on_step(step, record)`` is called for every step that was not skipped, when its
    scalars are read back (every ``log_every`` steps).
    """
    p = _resolve(preset, overrides)
    tc = p.train
    if steps is None and minutes is None:
        raise ValueError("give steps=, minutes= or both")
    train_images = np.asarray(train_images)
    if train_images.ndim != 4 or tuple(train_images.shape[1:]) != tuple(p.model.image_shape):
        raise ValueError(f"train_images must be [N, {p.model.image_shape}], got {train_images.shape}")
    if p.model.n_bits < 8:
        from .data import reduce_bits
        train_images = reduce_bits(train_images, p.model.n_bits)
        test_images = None if test_images is None else reduce_bits(np.asarray(test_images), p.model.n_bits)

    model = build_model(p, backend, dtype)
    xp = model.xp
    params = model.parameters()
    adam = Adam(params)
    ema = EMA(params, decay=tc.ema_decay)
    start = 0
    ckpt_path = os.path.join(out_dir, CKPT_NAME) if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if ckpt_path and resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        _restore(model, adam, ema, ck, xp)
        start = int(ck["step"])
        params = model.parameters()
    else:
        idx = np.random.default_rng([tc.seed, 99]).permutation(len(train_images))[:tc.init_batch_size]
        model.data_init(train_images[idx], rng=step_rng(tc.seed, -1, xp))
        params = model.parameters()
        ema.load_state_dict({"decay": tc.ema_decay, "shadow": {k: v.copy() for k, v in params.items()}})

    log = _Logger(os.path.join(out_dir, "log.jsonl") if out_dir else None)
    history, state = [], {"bad": 0, "skipped": 0}
    pending = []                    # (step, loss, grad norm, ok, lr) of steps not yet read back
    total = steps if steps is not None else 10 ** 12
    deadline = time.perf_counter() + 60 * minutes if minutes is not None else math.inf
    bar = _progress(progress, start, total if steps is not None else None, p.name)
    t_last, step = time.perf_counter(), start

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
                    raise TrainingDiverged(
                        f"{state['bad']} consecutive steps with a non-finite loss or gradient (last at step {s}); "
                        f"the last checkpoint ({ckpt_path}) holds the last finite parameters. "
                        "Lower the learning rate or check the data.")
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

    try:
        while step < total and time.perf_counter() < deadline:
            idx = batch_indices(len(train_images), tc.batch_size, tc.seed, step)
            loss, grads = model.loss_and_grads(train_images[idx], rng=step_rng(tc.seed, step, xp), train=True)
            gnorm = global_grad_norm_array(grads)
            ok = xp.isfinite(loss) & xp.isfinite(gnorm)      # a skipped step changes nothing (no host sync)
            step += 1
            lr = learning_rate(step, tc)                      # warm-up, or a release schedule
            adam.step(params, grads, lr, grad_scale=clip_scale(gnorm, tc.grad_clip), apply=ok)
            ema.update(params, apply=ok)
            pending.append((step, loss, gnorm, ok, lr))
            if bar is not None:
                bar.update(1)
            due_ckpt = ckpt_path and step % tc.checkpoint_every == 0
            if step % tc.log_every == 0 or step == total or due_ckpt:
                flush()                                      # the only host sync of the loop
            if due_ckpt:
                _save(ckpt_path, model, adam, ema, step, p)
        flush()
    finally:
        if bar is not None:
            bar.close()
    skipped = state["skipped"]
    if ckpt_path:
        _save(ckpt_path, model, adam, ema, step, p)
    summary = {"preset": p.name, "steps": step, "skipped_steps": skipped,
               "final_train_bpd": history[-1]["train_bpd"] if history else None,
               "num_parameters": model.num_parameters(), "backend": backend}
    if test_images is not None and len(test_images):
        with use_ema(model, ema):
            summary["test_bpd"] = evaluate(model, test_images, batch_size=tc.batch_size,
                                           max_batches=tc.eval_batches, seed=tc.seed)["bpd"]
            from .evaluation import inverse_error      # issue 12: the release's val_inverr monitor
            summary["val_inverr"] = inverse_error(model, test_images, batch_size=tc.batch_size,
                                                  max_batches=tc.eval_batches, seed=tc.seed)
        log.write({"step": step, "test_bpd": summary["test_bpd"], "val_inverr": summary["val_inverr"]})
    log.close()
    summary["history"] = history
    if out_dir:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    summary["model"] = model
    summary["ema"] = ema
    return summary


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


def evaluate(model, images, *, batch_size=64, max_batches=None, k=1, seed=0, progress=False):
    """Mean test bits/dim over (up to max_batches) batches; k > 1: importance-sampled bound."""
    images = np.asarray(images)
    n = len(images)
    nb = math.ceil(n / batch_size)
    if max_batches:
        nb = min(nb, max_batches)
    rng = make_rng(int(seed) + 12345, model.xp)
    if k > 1:   # issue 12: the release's k-sample bound, in passes of batch_size (image, sample) pairs
        from .evaluation import evaluate_iw
        return evaluate_iw(model, images[:min(n, nb * batch_size)], k, rng=rng, rows=batch_size,
                           progress=progress)
    vals = []
    for i in range(nb):
        vals.append(model.bits_per_dim(images[i * batch_size:(i + 1) * batch_size], rng=rng, k=k))
    v = np.concatenate(vals)
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
    from .backend import asarray
    model.load_parameters({k: asarray(v, xp) for k, v in ck["params"].items()})
    adam.load_state_dict(ck["optimizer_state"])
    ema.load_state_dict(ck["ema"])


def load_model(checkpoint_path, backend="numpy", use_ema_params=True):
    """Rebuild the model of a checkpoint (EMA parameters by default)."""
    from .backend import asarray
    ck = load_checkpoint(checkpoint_path)
    p = preset_from_config(ck["config"])
    model = build_model(p, backend)
    src = ck["ema"]["shadow"] if use_ema_params else ck["params"]
    model.load_parameters({k: asarray(v, model.xp, dtype=model.dtype) for k, v in src.items()})
    return model, p, ck
