"""What a training run does to its output folder when it resumes, diverges or is interrupted.

Files of a run folder ``OUT/``:

* ``checkpoint.npz``: the newest checkpoint; ``checkpoint-prev.npz``: the one before it.
  Before a new checkpoint is written, the current one is hard-linked (copied where links
  are not possible) to ``checkpoint-prev.npz``; then the new one replaces
  ``checkpoint.npz`` atomically. At every instant both names hold complete files.
* A checkpoint is only written from parameters that give a finite loss on a fixed
  check batch (training and EMA parameters) and when the last step was not skipped
  (:func:`flowpp_ref.training.loop.train`); so ``checkpoint.npz`` always holds a usable model.
* ``log.jsonl``: truncated to the checkpoint's step when a run resumes (to nothing when
  it starts afresh), so every step appears once and the curve never draws backwards.
* Temporary files a killed write left behind (``.checkpoint*.tmp``, ``.log.jsonl*.tmp``,
  ``.summary.json*.tmp``) are removed when a run starts in the folder. Two runs must not
  share a folder at the same time.

:func:`reconcile` decides what a resumed run does with options that differ from the
checkpoint's: architecture options are refused naming the option, training options are
applied and stated, the seed is refused (it fixed the initialisation and the data order).
:class:`InterruptGuard` turns the first SIGINT/SIGTERM into a request to stop after the
current step (a second one stops at once).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading

import numpy as np

from flowpp_ref.runtime.checkpoint import CheckpointError, atomic_write, load_checkpoint
from flowpp_ref.runtime.options import ConfigError

CKPT_NAME = "checkpoint.npz"
PREV_NAME = "checkpoint-prev.npz"
LOG_NAME = "log.jsonl"
_STALE = re.compile(r"^\.(checkpoint[\w.-]*|log\.jsonl|summary\.json)\..*\.tmp$")


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after a step; ``checkpoint`` names what was written (or None)."""

    def __init__(self, message, *, step, checkpoint, signum):
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


def remove_stale_temporaries(out_dir) -> list:
    """Delete the temporary files a killed write left in ``out_dir``; returns their names."""
    removed = []
    for name in sorted(os.listdir(out_dir)):
        if _STALE.match(name) and os.path.isfile(os.path.join(out_dir, name)):
            try:
                os.remove(os.path.join(out_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_text(path, text: str) -> None:
    """``path`` replaced by ``text`` atomically (:func:`flowpp_ref.runtime.checkpoint.atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def keep_previous(ckpt_path) -> str | None:
    """Make ``checkpoint-prev.npz`` the current ``checkpoint.npz`` (atomically); returns its path."""
    if not os.path.exists(ckpt_path):
        return None
    d = os.path.dirname(os.path.abspath(ckpt_path))
    prev = os.path.join(d, PREV_NAME)
    fd, tmp = tempfile.mkstemp(prefix=f".{PREV_NAME}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        os.remove(tmp)
        try:
            os.link(ckpt_path, tmp)          # same bytes, no copy; replacing checkpoint.npz later
        except OSError:                      # gives it a new inode, so prev keeps these
            shutil.copyfile(ckpt_path, tmp)
        os.replace(tmp, prev)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return prev


def read_checkpoint_step(path) -> int:
    """The step of a checkpoint, read from its metadata only (no arrays)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["__meta__"].tobytes().decode("utf-8"))
        return int(meta["tree"]["step"])
    except Exception as e:  # noqa: BLE001 - any failure: let the full loader give the precise error
        load_for_resume(path)
        raise CheckpointError(f"{path}: cannot read its step ({type(e).__name__}: {e})") from e


def load_for_resume(ckpt_path) -> dict:
    """load_checkpoint with advice on what to do when the file is unusable."""
    try:
        return load_checkpoint(ckpt_path)
    except CheckpointError as e:
        prev = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), PREV_NAME)
        hint = (f"; {prev} holds the checkpoint before it: move it to {ckpt_path} to resume from there"
                if os.path.exists(prev) else "")
        raise CheckpointError(f"cannot resume: {e}{hint}; or start afresh with --no-resume "
                              "(resume=False), which replaces this run's checkpoints") from e


def truncate_log(path, step: int) -> int:
    """Keep the records of ``path`` with ``step <= step`` (drop later and unreadable lines).

    Returns the number of lines dropped; the file is rewritten atomically only if any were.
    """
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step
            except json.JSONDecodeError:
                ok = False
            if ok:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        atomic_write_text(path, "".join(keep))
    return dropped


# ------------------------------------------------------------------ resume options
def option_name(field: str) -> str:
    """The command-line spelling of a config field (``use_attention`` -> ``--no-attention``)."""
    special = {"use_attention": "--no-attention", "n_bits": "--n-bits"}
    cli = {"filters", "blocks", "components", "dropout_p", "dequantization", "coupling", "batch_size",
           "init_batch_size", "lr", "warmup_steps", "ema_decay", "seed", "checkpoint_every", "eval_batches"}
    if field in special:
        return special[field]
    if field in cli:
        return "--" + field.replace("_", "-")
    return f"{field} (preset field)"


ARCH_EXEMPT = {"dropout_p"}           # a model field that changes training only
REFUSED = {"seed": "the seed fixed the initialisation and the order of the data of this run"}
IGNORED = {"init_batch_size": "the data-dependent init ran at the start of the run"}
NOTES = {"batch_size": "the order of the batches from here on differs from an uninterrupted run"}


def reconcile(stored, asked, explicit, *, step: int, where: str):
    """The preset a resumed run continues with, and the sentences saying what changed.

    ``stored``: the checkpoint's :class:`~flowpp_ref.model.presets.Preset`; ``asked``: the one
    the caller resolved; ``explicit``: the field names the caller set on purpose (only
    these are compared, the rest is the checkpoint's), or None to compare every field.
    Raises :class:`ConfigError` for a changed architecture (naming the options) or seed.
    """
    mfields = [f.name for f in dataclasses.fields(stored.model)]
    tfields = [f.name for f in dataclasses.fields(stored.train)]
    wanted = set(mfields + tfields) if explicit is None else set(explicit)

    def val(p, f):
        return getattr(p.model, f) if f in mfields else getattr(p.train, f)

    changed = [f for f in mfields + tfields if f in wanted and _differs(val(stored, f), val(asked, f))]
    arch = [f for f in changed if f in mfields and f not in ARCH_EXEMPT]
    if arch:
        what = ", ".join(f"{option_name(f)} {_show(val(stored, f))} (asked: {_show(val(asked, f))})" for f in arch)
        pre = (f" (checkpoint preset {stored.name!r}, asked {asked.name!r})" if explicit is None
               and stored.name != asked.name else "")
        raise ConfigError(f"{where} holds a model with {what}{pre}: the architecture cannot change when a run "
                          "resumes. Leave these options out to continue the run as it was, or use --no-resume "
                          "(resume=False) or another --out folder for a new model.")
    refused = [f for f in changed if f in REFUSED]
    if refused:
        f = refused[0]
        raise ConfigError(f"{where} was trained with {option_name(f)} {_show(val(stored, f))}, asked "
                          f"{_show(val(asked, f))}: {REFUSED[f]}, so it cannot change when the run resumes. "
                          "Leave it out, or start afresh with --no-resume.")
    model_kw = {f: val(asked, f) for f in changed if f in mfields}
    train_kw = {f: val(asked, f) for f in changed if f in tfields and f not in IGNORED}
    p = dataclasses.replace(stored, model=dataclasses.replace(stored.model, **model_kw),
                            train=dataclasses.replace(stored.train, **train_kw))
    notes = []
    applied = [f for f in changed if f not in IGNORED]
    if applied:
        parts = [f"{f} {_show(val(asked, f))} instead of {_show(val(stored, f))}" for f in applied]
        notes.append(f"resuming at step {step} with " + ", ".join(parts)
                     + "".join(f" ({NOTES[f]})" for f in applied if f in NOTES))
    for f in changed:
        if f in IGNORED:
            notes.append(f"{option_name(f)} {_show(val(asked, f))} ignored: {IGNORED[f]}")
    return p, notes


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) != list(b)
    return a != b


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(tuple(v) if isinstance(v, list) else v)


# ----------------------------------------------------------------------- signals
class InterruptGuard:
    """Within the ``with`` block, the first SIGINT/SIGTERM only sets ``requested`` (the
    signal number); the handlers before the block are back after it, and after the first
    signal, so a second Ctrl-C stops at once. Outside the main thread it does nothing."""

    def __init__(self, report=None):
        self.requested = None
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signum
        self._restore()
        self.report(f"\n{signal.Signals(signum).name} received: finishing the current step, then writing a "
                    "checkpoint (send it again to stop at once)")

    def _restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __exit__(self, *exc):
        self._restore()
        return False
