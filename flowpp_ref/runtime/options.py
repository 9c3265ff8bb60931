"""The allowed range of every numeric training, evaluation and sampling option, in one table.

The command line (:mod:`flowpp_ref.cli.args`) uses :data:`RANGES` to refuse a bad value
while parsing, before any data is loaded, and to state each range in ``--help``;
:func:`flowpp_ref.training.loop.train` and :func:`flowpp_ref.training.loop.evaluate` check the same
table (:func:`check_train_config`, :func:`check_option`) so that the Python API refuses
the same values with the same message. Nothing is clipped or reinterpreted: ``0``
never means "all" or "none" unless the range says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class ConfigError(ValueError):
    """An option is outside its range, or cannot be changed when a run is resumed."""


@dataclass(frozen=True)
class Range:
    kind: type                      # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False           # lo itself excluded
    hi_open: bool = False
    multiple_of: int | None = None
    note: str = ""                  # extra meaning, e.g. "0: no sample grid"

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            s = f"{what} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            s = f"{what} {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            s = f"{what} {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            s = f"a finite {what[2:].strip()}" if self.kind is float else what
        if self.multiple_of:
            s += f", a multiple of {self.multiple_of}"
        return s + (f" ({self.note})" if self.note else "")

    def ok(self, v) -> bool:
        if self.kind is int:
            if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "dtype") and v.dtype.kind in "iu"):
                return False
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "dtype"):
                return False
            if not math.isfinite(float(v)):
                return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return not (self.multiple_of and int(v) % self.multiple_of)


# Keyed by the option's field name (the CLI's argparse ``dest``, the TrainConfig/ModelConfig field).
RANGES: dict[str, Range] = {
    "steps": Range(int, 1),
    "minutes": Range(float, 0, lo_open=True),
    "batch_size": Range(int, 1, note="at most the number of images"),
    "init_batch_size": Range(int, 1, note="at most the number of training images"),
    "lr": Range(float, 0, lo_open=True),
    "warmup_steps": Range(int, 0, note="0: no warm-up"),
    "grad_clip": Range(float, 0, lo_open=True),
    "ema_decay": Range(float, 0, 1, hi_open=True),
    "seed": Range(int, 0, 2 ** 31 - 1),
    "max_bad_steps": Range(int, 1),
    "log_every": Range(int, 1),
    "checkpoint_every": Range(int, 1),
    "eval_every": Range(int, 0, note="0: only at the end"),
    "eval_batches": Range(int, 1),
    "filters": Range(int, 4, multiple_of=4),
    "blocks": Range(int, 1),
    "components": Range(int, 1),
    "dropout_p": Range(float, 0, 1, hi_open=True),
    "samples": Range(int, 0, 4096, note="0: no sample grid"),
    # data (issue 12)
    "test_fraction": Range(float, 0, 1, hi_open=True, note="0: no test set"),
    "data_bits": Range(int, 1, 8),
    # eval / sample
    "k": Range(int, 1, note="1: the ELBO"),
    "max_batches": Range(int, 1),
    "n": Range(int, 1, 4096),
    "temperature": Range(float, 0),
}

TRAIN_FIELDS = ("batch_size", "init_batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay", "seed",
                "max_bad_steps", "log_every", "checkpoint_every", "eval_every", "eval_batches")


def check_option(name: str, value, *, label: str | None = None, none_ok: bool = False):
    """``value`` if it lies in ``RANGES[name]``, else :class:`ConfigError` naming it."""
    if value is None and none_ok:
        return value
    r = RANGES[name]
    if not r.ok(value):
        raise ConfigError(f"{label or name} must be {r.describe()}, got {value!r}")
    return value


def check_train_config(tc, *, label=lambda f: f) -> None:
    """Every numeric field of a :class:`~flowpp_ref.model.presets.TrainConfig` in its range."""
    for f in TRAIN_FIELDS:
        check_option(f, getattr(tc, f), label=label(f), none_ok=(f == "eval_batches"))


def check_run_limits(steps, minutes) -> None:
    if steps is None and minutes is None:
        raise ConfigError("give steps=, minutes= or both (the command line: --steps or --minutes)")
    check_option("steps", steps, none_ok=True)
    check_option("minutes", minutes, none_ok=True)


MODEL_FIELDS = ("filters", "blocks", "components", "dropout_p")


def check_model_config(mc, *, label=lambda f: f) -> None:
    """The numeric model fields that have a command-line option, in their range."""
    for f in MODEL_FIELDS:
        check_option(f, getattr(mc, f), label=label(f))
