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
  ``.summary.json*.tmp``) are removed when a run starts in the folder.
* ``.lock``: one run at a time. :class:`RunFolderLock` takes an advisory lock on it
  (``flock``) for as long as a run, or an ``eval``/``sample`` writing into the folder,
  lasts; a second process asking for it is refused at once with :class:`RunFolderBusy`,
  which names the folder and the process holding it (pid, command, start time, host,
  read from the file). Two runs sharing a folder would interleave ``log.jsonl`` and
  replace each other's checkpoints. The lock is *advisory*: it stops only processes
  that ask for it (every flowpp writer does); reading a checkpoint of a folder in use
  is not stopped and is safe (checkpoints are replaced atomically). The OS releases the
  lock when the holder exits or dies (even by SIGKILL), so a crashed run never blocks
  its resume. The file stays when the run ends: a lock file is never deleted (deleting
  it would let two processes hold locks on two different files of the same name).

:func:`reconcile` decides what a resumed run does with options that differ from the
checkpoint's: architecture options are refused naming the option, training options are
applied and stated, the seed is refused (it fixed the initialisation and the data order).
:class:`InterruptGuard` turns the first SIGINT/SIGTERM into a request to stop after the
current step (a second one stops at once).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

from flowpp_ref.runtime.checkpoint import CheckpointError, atomic_write, load_checkpoint
from flowpp_ref.runtime.distributed import launched_rank
from flowpp_ref.runtime.options import ConfigError, cli_spelling

CKPT_NAME = "checkpoint.npz"
PREV_NAME = "checkpoint-prev.npz"
LOG_NAME = "log.jsonl"
LOCK_NAME = ".lock"
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


def read_jsonl(path) -> list:
    """The JSON-object records of a JSONL log (``[]`` if it is missing); unreadable lines are left out."""
    records = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
    return records


def last_log_value(path, key: str, default=None):
    """The value of ``key`` in the last record of the JSONL log ``path`` that has it (``default`` if none)."""
    values = [rec[key] for rec in read_jsonl(path) if key in rec]
    return values[-1] if values else default


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
    """The command-line spelling of a config field (``use_attention`` -> ``--no-attention``), from the
    field's option metadata (:func:`flowpp_ref.runtime.options.cli_spelling`)."""
    return cli_spelling(field) or f"{field} (preset field)"


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


# ------------------------------------------------------------------ one run at a time
try:
    import fcntl
except ImportError:                       # Windows: msvcrt byte-range locks instead
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

_HELD: set = set()                # real paths of the run folders this process holds
_HELD_GUARD = threading.Lock()
_WIN_BYTE = 1 << 20               # msvcrt locks this byte, past the holder's text, which stays readable
_WARNED: list = []


class RunFolderBusy(ConfigError):
    """Another process holds the run folder (:class:`RunFolderLock`); ``holder``: what it wrote
    into ``.lock`` (pid, purpose, host, since), or None if not yet written."""

    def __init__(self, message, *, folder, holder=None):
        super().__init__(message)
        self.folder, self.holder = folder, holder


def is_run_folder(folder) -> bool:
    """Whether ``folder`` is a run folder: it holds ``checkpoint.npz``, ``log.jsonl`` or ``.lock``."""
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, n))
                                         for n in (CKPT_NAME, LOG_NAME, LOCK_NAME))


class RunFolderLock:
    """``with RunFolderLock(folder, "train"):`` this process alone writes into ``folder``.

    Creates ``folder`` if needed, opens ``folder/.lock`` and takes an exclusive advisory
    lock on it without waiting (``flock(LOCK_EX | LOCK_NB)``); if another process holds
    it, raises :class:`RunFolderBusy` naming the folder and that process. Once taken, the
    file is rewritten with this process's pid, ``purpose``, host and start time (what a
    refused process reports). On exit the lock is released and the file emptied, never
    deleted; a process that dies holding it loses it at once (the OS closes its files).

    * Nested use in one process on the same folder (compared by real path) is a no-op:
      the outer ``with`` holds the lock (``held`` is False on the inner one). The lock
      belongs to the process, so other threads of a holder are not refused either.
    * ``comm`` (a communicator of :mod:`flowpp_ref.runtime.distributed`): rank 0 alone
      takes the lock (it alone writes the folder) and broadcasts the answer, so every
      rank goes on or every rank raises :class:`RunFolderBusy` together. Without
      ``comm``, a process started by mpiexec/srun as a rank other than 0 takes nothing.
    * Where ``fcntl`` is missing (Windows), ``msvcrt.locking`` locks one byte of the
      file instead (also released by the OS when the process ends); where neither
      works (a file system without locks), the folder is used unlocked after a
      one-time :class:`RuntimeWarning`.
    """

    def __init__(self, folder, purpose: str, *, comm=None):
        self.folder, self.purpose, self.comm = os.fspath(folder), str(purpose), comm
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.held = False                 # True: this instance took the lock and releases it
        self._fd = self._key = None

    def __enter__(self):
        if self.comm is not None:
            rank, size = self.comm.rank, self.comm.size
        else:
            rank, size = launched_rank(), 1
        busy = None
        if rank == 0:
            try:
                self._acquire()
            except RunFolderBusy as e:
                busy = e
        if size > 1:
            flag = np.array([0.0 if busy is None else 1.0])
            self.comm.broadcast(flag)     # rank 0's answer on every rank: all go on or all refuse
            if flag[0] and busy is None:
                busy = RunFolderBusy(f"{self.folder} is in use by another flowpp process (rank 0 holds "
                                     "the details)", folder=self.folder)
        if busy is not None:
            busy.coordinated = True       # every rank raises it (flowpp_ref.cli.args.run)
            raise busy
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def _acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        key = os.path.realpath(self.folder)
        with _HELD_GUARD:
            if key in _HELD:
                return                    # nested: the outer RunFolderLock of this process holds it
            fd, writable = _open_lock_file(self.path)
            try:
                ok = _try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not ok:
                os.close(fd)
                holder = _read_holder(self.path)
                raise RunFolderBusy(_busy_message(self.folder, holder), folder=self.folder, holder=holder)
            _HELD.add(key)
            self._fd, self._key, self.held = fd, key, True
        if writable:
            now = time.time()
            try:
                _rewrite(fd, json.dumps({"pid": os.getpid(), "purpose": self.purpose, "host": socket.gethostname(),
                                         "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                                         "time": now}) + "\n")
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        """Empty the file, unlock and close it (nothing if this instance holds nothing)."""
        if not self.held:
            return
        fd, self._fd, self.held = self._fd, None, False
        try:
            try:
                os.ftruncate(fd, 0)       # no stale holder text for the next refused process
            except OSError:
                pass
            _unlock(fd)
        finally:
            os.close(fd)                  # closing also releases the lock
            with _HELD_GUARD:
                _HELD.discard(self._key)


def _open_lock_file(path):
    """(fd, writable): the lock file opened for writing, or read-only where that is refused."""
    flags = getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644), True
    except PermissionError:
        if not os.path.exists(path):
            raise
        return os.open(path, os.O_RDONLY | flags), False    # flock needs no write access


def _try_lock(fd) -> bool:
    """Take the exclusive lock without waiting: True taken (or no locking here), False held elsewhere."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
            _warn_unlocked(f"the file system refuses locks ({e.strerror})")
            return True
    if msvcrt is not None:
        os.lseek(fd, _WIN_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    _warn_unlocked("neither fcntl nor msvcrt is available")
    return True


def _unlock(fd) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif msvcrt is not None:
            os.lseek(fd, _WIN_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass                              # not locked (see _warn_unlocked); closing releases it anyway


def _warn_unlocked(why: str) -> None:
    if not _WARNED:
        _WARNED.append(why)
        warnings.warn(f"run folders are not locked on this system ({why}): make sure two flowpp runs never "
                      "write into the same --out folder at the same time", RuntimeWarning, stacklevel=4)


def _rewrite(fd, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode("utf-8"))


def _read_holder(path, wait: float = 0.2):
    """What the holder wrote into the lock file (a dict), or None; waits up to ``wait`` s for a
    holder that has taken the lock but not yet written it."""
    end = time.monotonic() + wait
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text.strip():
                d = json.loads(text)
                return d if isinstance(d, dict) else None
        except OSError:
            return None
        except ValueError:                # caught in the middle of the holder's write
            pass
        if time.monotonic() >= end:
            return None
        time.sleep(0.01)


def _busy_message(folder, holder) -> str:
    if holder:
        who = (f"pid {holder.get('pid', '?')}, {holder.get('purpose', '?')} since {holder.get('since', '?')} "
               f"on host {holder.get('host', '?')}")
    else:
        who = "a process that has just started"
    return (f"{folder} is in use by another flowpp process ({who}): two processes writing one run folder would "
            "interleave its log.jsonl and overwrite each other's checkpoints; wait for it to finish or choose "
            "another --out folder")
