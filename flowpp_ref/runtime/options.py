"""Options: one definition each, read by the command line and by the library checks.

A field of :class:`~flowpp_ref.model.presets.ModelConfig` or
:class:`~flowpp_ref.model.presets.TrainConfig` declared with :func:`option` carries, in its
``dataclasses.field`` metadata, its help text, its allowed :class:`Range` or choices and its
command-line spelling (``batch_size`` -> ``--batch-size``; a boolean switched off on the
command line names its flag, ``use_attention`` -> ``--no-attention``). From that one
definition

* :func:`flowpp_ref.cli.args.add_config_options` builds the argparse options (the range
  refused while parsing and stated in ``--help``) and
  :func:`flowpp_ref.cli.args.overrides_from_args` collects the given ones;
* :func:`check_train_config` / :func:`check_model_config` (called by
  :func:`flowpp_ref.training.loop.train` and :meth:`ModelConfig.validate`) refuse the same
  values with the same range text.

Options that are no config field (``--steps``, ``--minutes``, ``--samples``, the data and
evaluation options) keep their :class:`Range` in :data:`OPTION_RANGES`, read by argparse
(:func:`flowpp_ref.cli.args.apply_ranges`) and by :func:`check_option`. Nothing is clipped
or reinterpreted: ``0`` never means "all" or "none" unless the range says so.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

META_KEY = "flowpp_option"          # the key of an option's metadata in dataclasses.field(metadata=...)


class ConfigError(ValueError):
    """An option is outside its range, or cannot be changed when a run is resumed."""


def _num(v, kind) -> str:
    return str(int(v)) if kind is int else f"{v:g}"


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
        what, k = ("an integer" if self.kind is int else "a number"), self.kind
        if self.lo is not None and self.hi is not None:
            s = (f"{what} in {'(' if self.lo_open else '['}{_num(self.lo, k)}, {_num(self.hi, k)}"
                 f"{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            s = f"{what} {'>' if self.lo_open else '>='} {_num(self.lo, k)}"
        elif self.hi is not None:
            s = f"{what} {'<' if self.hi_open else '<='} {_num(self.hi, k)}"
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


@dataclass(frozen=True)
class Option:
    """What :func:`option` stores in a config field's metadata."""
    help: str
    range: Range | None = None
    choices: tuple | None = None
    flag: str | None = None         # a boolean's command-line switch, e.g. "--no-attention"
    cli: bool = True                # False: checked by the library, not offered on the command line
    none_means: str | None = None   # None is allowed and means this (e.g. "float32")

    def spelling(self, name: str) -> str:
        """The command-line spelling of field ``name``."""
        return self.flag or "--" + name.replace("_", "-")

    def problem(self, name: str, value, label: str | None = None) -> str | None:
        """Why ``value`` is not allowed for field ``name`` (None if it is)."""
        label = label or name
        if value is None and self.none_means is not None:
            return None
        if self.range is not None:                        # the library's rule where both are given
            return None if self.range.ok(value) else f"{label} must be {self.range.describe()}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            allowed = [repr(c) for c in self.choices]
            allowed = (["None"] if self.none_means is not None else []) + allowed
            said = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            return f"{label} must be {said}, got {value!r}"
        return None


def option(default, *, help: str, range: Range | None = None, choices=None, flag: str | None = None,
           cli: bool = True, none_means: str | None = None):
    """A dataclass field (``dataclasses.field(default=...)``) carrying its option's definition.

    ``help``: what the option does (``--help`` adds the default and the range). ``range``:
    the allowed numbers. ``choices``: the values the command line offers; the library
    accepts exactly these unless a ``range`` is given too, which is then the library's rule
    (``n_bits``: the command line offers 3, 5, 8; the library takes any depth in 1..8).
    ``flag``: for a boolean, the command-line switch that sets the opposite of the
    default (``use_attention=True`` -> ``--no-attention``). ``cli=False``: checked by the
    library only. ``none_means``: None is allowed and means this.
    """
    if flag is not None and not isinstance(default, bool):
        raise TypeError(f"option(flag={flag!r}) needs a boolean default, got {default!r}")
    if flag is not None and not flag.startswith("--"):
        raise ValueError(f"option flag must start with '--', got {flag!r}")
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"option default must be immutable, got {type(default).__name__}")
    meta = Option(help, range, tuple(choices) if choices is not None else None, flag, cli, none_means)
    bad = meta.problem("the default", default)
    if bad:
        raise ValueError(f"option(): {bad}")
    return dataclasses.field(default=default, metadata={META_KEY: meta})


def config_options(config_cls) -> dict:
    """``{field name: Option}`` of every field of ``config_cls`` declared with :func:`option`, in order."""
    return {f.name: f.metadata[META_KEY] for f in dataclasses.fields(config_cls) if META_KEY in f.metadata}


_CONFIG_CLASSES: dict[str, type] = {}   # "train" / "model" -> the dataclass, registered by config_class


def config_class(kind: str):
    """Class decorator: register the dataclass whose :func:`option` fields are the ``kind``
    options ("train" or "model"; :mod:`flowpp_ref.model.presets` registers TrainConfig and
    ModelConfig), so that this module reads their definitions without importing them."""
    if kind not in ("train", "model"):
        raise ValueError(f"config_class: kind must be 'train' or 'model', got {kind!r}")

    def register(cls):
        _CONFIG_CLASSES[kind] = cls
        return cls
    return register


def _config_classes():
    if len(_CONFIG_CLASSES) < 2:
        raise RuntimeError("the configuration classes are not registered: import flowpp_ref.model.presets first")
    return _CONFIG_CLASSES["train"], _CONFIG_CLASSES["model"]


def cli_spelling(name: str) -> str | None:
    """The command-line spelling of a config field, or None if the command line does not offer it."""
    for cls in _config_classes():
        o = config_options(cls).get(name)
        if o is not None and o.cli:
            return o.spelling(name)
    return None


# The options that are no config field, keyed by their argparse ``dest``.
OPTION_RANGES: dict[str, Range] = {
    "steps": Range(int, 1),
    "minutes": Range(float, 0, lo_open=True),
    "samples": Range(int, 0, 4096, note="0: no sample grid"),
    # data
    "test_fraction": Range(float, 0, 1, hi_open=True, note="0: no test set"),
    "data_bits": Range(int, 1, 8),
    # eval / sample
    "k": Range(int, 1, note="1: the ELBO"),
    "max_batches": Range(int, 1),
    "n": Range(int, 1, 4096),
    "temperature": Range(float, 0),
}


def config_ranges() -> dict[str, Range]:
    """``{field name: Range}`` of the TrainConfig and ModelConfig fields that have one."""
    return {n: o.range for cls in _config_classes() for n, o in config_options(cls).items() if o.range is not None}


def _fields_with_range(cls) -> tuple:
    return tuple(n for n, o in config_options(cls).items() if o.range is not None)


def __getattr__(name):
    # RANGES (every range by option name), TRAIN_FIELDS, MODEL_FIELDS: derived from the field
    # metadata when asked (the config classes import this module, so not at import time).
    if name == "RANGES":
        return {**OPTION_RANGES, **config_ranges()}
    if name in ("TRAIN_FIELDS", "MODEL_FIELDS"):
        return _fields_with_range(_config_classes()[name == "MODEL_FIELDS"])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def range_of(name: str) -> Range:
    """The :class:`Range` of option ``name`` (a config field or a key of :data:`OPTION_RANGES`)."""
    r = OPTION_RANGES.get(name) or config_ranges().get(name)
    if r is None:
        raise KeyError(f"no range is defined for option {name!r}")
    return r


def check_option(name: str, value, *, label: str | None = None, none_ok: bool = False):
    """``value`` if it lies in the range of option ``name``, else :class:`ConfigError` naming it."""
    if value is None and none_ok:
        return value
    r = range_of(name)
    if not r.ok(value):
        raise ConfigError(f"{label or name} must be {r.describe()}, got {value!r}")
    return value


def check_config(cfg, *, label=lambda f: f) -> None:
    """Every field of ``cfg`` declared with :func:`option` within its range or choices."""
    for name, o in config_options(type(cfg)).items():
        bad = o.problem(name, getattr(cfg, name), label(name))
        if bad:
            raise ConfigError(bad)


def check_train_config(tc, *, label=lambda f: f) -> None:
    """Every option field of a :class:`~flowpp_ref.model.presets.TrainConfig` in its range."""
    check_config(tc, label=label)


def check_model_config(mc, *, label=lambda f: f) -> None:
    """Every option field of a :class:`~flowpp_ref.model.presets.ModelConfig` in its range or choices."""
    check_config(mc, label=label)


def check_run_limits(steps, minutes) -> None:
    if steps is None and minutes is None:
        raise ConfigError("give steps=, minutes= or both (the command line: --steps or --minutes)")
    check_option("steps", steps, none_ok=True)
    check_option("minutes", minutes, none_ok=True)
