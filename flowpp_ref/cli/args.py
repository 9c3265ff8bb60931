"""Command-line checks: options built from their one definition, checks before any work, one-line errors.

* :func:`add_config_options` adds an argparse option for every config field declared with
  :func:`flowpp_ref.runtime.options.option` (spelling, help, choices and range from the field's
  metadata); :func:`overrides_from_args` collects the ones given, for
  :func:`flowpp_ref.model.presets.get_preset`.
* :func:`apply_ranges` gives every other numeric option of the parser the range of
  :data:`flowpp_ref.runtime.options.OPTION_RANGES` (keyed by the option's ``dest``; a ``dest``
  that is a config field, e.g. eval's ``--batch-size``, takes that field's range).
  In both cases argparse refuses a value outside the range while parsing, naming the option
  and the value, and ``--help`` states each range.
* :func:`check_train_args` runs before data is loaded: --steps/--minutes given, the
  preset and its overrides consistent, the output folder creatable and writable, and a
  run already at its target step reported (exit 0, nothing touched).
* :func:`run` turns the library's own errors into one line ``flowpp: error: ...`` with
  exit status 2 (1 for a diverged run, 130/143 for a run stopped by SIGINT/SIGTERM
  after writing its checkpoint); ``--debug`` (or ``FLOWPP_DEBUG=1``) shows the traceback.
  Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from flowpp_ref.core.validation import FlowInputError
from flowpp_ref.datasets import DataError
from flowpp_ref.model.presets import get_preset
from flowpp_ref.runtime import distributed, options
from flowpp_ref.runtime.checkpoint import CheckpointError
from flowpp_ref.runtime.distributed import DistributedError, abort_on_error
from flowpp_ref.runtime.options import ConfigError
from flowpp_ref.runtime.runfolder import CKPT_NAME, TrainingInterrupted, read_checkpoint_step
from flowpp_ref.training.evaluation import NonFiniteResult
from flowpp_ref.training.loop import TrainingDiverged


class UsageError(Exception):
    """A command-line mistake found after parsing (exit status 2)."""


class AlreadyDone(Exception):
    """The run in --out is already at the asked step (exit status 0, nothing written)."""


def _parse_type(name, r):
    def parse(text):
        try:
            v = r.kind(text) if r.kind is float else int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {r.describe()}, got {text!r}") from None
        if not r.ok(v):
            raise argparse.ArgumentTypeError(f"must be {r.describe()}, got {text}")
        return v
    parse.__name__ = name
    return parse


def _show_default(o, default) -> str:
    if default is None:
        return o.none_means
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_config_options(parser, config_cls, *, names=None):
    """Add an option for every field of ``config_cls`` declared with ``option(...)`` and ``cli=True``
    (only those in ``names`` if given) to ``parser`` (a parser or an argument group).

    The option's ``dest`` is the field name and its default None, so that an option not given
    leaves the preset's value; a boolean with a ``flag`` stores the opposite of the field's
    default. The help ends in ``[preset, else D]`` (D: the field's default, the value of a
    preset that does not set it) and states the range. Returns ``parser``.
    """
    for f in dataclasses.fields(config_cls):
        o = f.metadata.get(options.META_KEY)
        if o is None or not o.cli or (names is not None and f.name not in names):
            continue
        if o.flag is not None:
            act = parser.add_argument(o.flag, dest=f.name, action="store_const", const=not f.default,
                                      default=None, help=f"{o.help} [preset, else {f.name}={f.default}]")
            act.flowpp_option = True
            continue
        kw = {"dest": f.name, "default": None}
        text = f"{o.help} [preset, else {_show_default(o, f.default)}]"
        if o.choices is not None:
            kw.update(choices=list(o.choices), type=type(o.choices[0]))
        elif o.range is not None:
            kw["type"] = _parse_type(f.name, o.range)
            text += f"; range: {o.range.describe()}"
        elif f.default is not None:
            kw["type"] = type(f.default)
        parser.add_argument(o.spelling(f.name), help=text, **kw).flowpp_option = True
    return parser


def overrides_from_args(args, config_classes) -> dict:
    """``{field: value}`` of the config options given on the command line (see :func:`add_config_options`)."""
    out = {}
    for cls in config_classes:
        for name, o in options.config_options(cls).items():
            v = getattr(args, name, None) if o.cli else None
            if v is not None:
                out[name] = v
    return out


def apply_ranges(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Attach the range of every known numeric option, in every subcommand, to its type and help
    (options built by :func:`add_config_options` already carry theirs)."""
    ranges = options.RANGES
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sub in act.choices.values():
                apply_ranges(sub)
        elif (act.dest in ranges and act.option_strings and act.type in (int, float)
              and not getattr(act, "flowpp_option", False)):
            r = ranges[act.dest]
            act.type = _parse_type(act.dest, r)
            act.help = f"{act.help or ''}; range: {r.describe()}".lstrip("; ")
    return parser


def add_debug(p) -> None:
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also FLOWPP_DEBUG=1)")


# ------------------------------------------------------------- before any work
def check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder ({e.strerror or e})") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder is not writable")


def check_train_args(args, preset_name: str, overrides: dict, comm=None) -> None:
    """Everything about a train command that can be checked before loading data."""
    if args.steps is None and args.minutes is None:
        raise UsageError("give --steps or --minutes (or both)")
    try:
        p = get_preset(preset_name, **overrides)
    except ValueError as e:
        raise UsageError(f"--preset {preset_name} with these options: {e}") from e
    ckpt = os.path.join(args.out, CKPT_NAME)
    n = comm.size if comm is not None else 1
    if n > 1 and p.train.batch_size % n and ("batch_size" in overrides or not os.path.isfile(ckpt)):
        raise UsageError(f"--batch-size {p.train.batch_size} (the global batch) does not divide among the {n} "
                         f"processes: each takes batch_size / {n} images; choose a multiple of {n}")
    if not getattr(args, "no_resume", False) and os.path.isfile(ckpt) and args.steps is not None:
        step = read_checkpoint_step(ckpt)
        if step >= args.steps:
            raise AlreadyDone(f"{ckpt} is already at step {step} (asked: --steps {args.steps}): nothing to do, "
                              "nothing written. Give a larger --steps to continue this run, or --no-resume "
                              "(or another --out) to start afresh.")
    check_out_dir(args.out)


def check_images_fit(shape, image_shape, what: str, data: str) -> None:
    if tuple(shape[1:]) != tuple(image_shape):
        h, w, c = image_shape
        raise UsageError(f"{what} takes {h}x{w}x{c} images but --data {data} holds "
                         f"{'x'.join(map(str, shape[1:]))} images: use a preset made for that image size "
                         "(--preset small or a paper preset for 32x32 images; only --data default is "
                         "averaged down to a smaller preset such as tiny).")


# ------------------------------------------------------------------ errors
def _library_errors():
    return CheckpointError, DataError, TrainingInterrupted, NonFiniteResult, TrainingDiverged, FlowInputError


def _world():
    """(rank, communicator or None) of a data-parallel run; (0, None) for one process."""
    comm = next((c for c in distributed._WORLD.values() if c.size > 1), None)
    return (comm.rank if comm is not None else distributed.launched_rank()), comm


def run(fn, args) -> int:
    """Run a subcommand; return its exit status, with library errors as one line on stderr.

    Under mpiexec (several processes): rank 0 prints the messages every rank shares; an
    error of one rank's own step is printed by that rank; an error only one rank saw
    outside the training step ends every rank (:func:`flowpp_ref.runtime.distributed.abort_on_error`).
    """
    try:
        return _run(fn, args)
    except BaseException as e:
        rank, comm = _world()
        if comm is not None:
            abort_on_error(comm, e)
        raise


def _say(rank, e, text, file=None):
    if rank == 0 or getattr(e, "rank_local", False):
        where = getattr(e, "flowpp_where", None)
        if where:
            text = text.replace("flowpp: error: ", f"flowpp: error ({where}): ", 1)
        print(text, file=file or sys.stderr)


def _run(fn, args) -> int:
    debug = getattr(args, "debug", False) or os.environ.get("FLOWPP_DEBUG", "") not in ("", "0")
    CheckpointError, DataError, TrainingInterrupted, NonFiniteResult, TrainingDiverged, FlowInputError = \
        _library_errors()
    try:
        fn(args)
        return 0
    except AlreadyDone as e:
        e.coordinated = True                    # every rank reads the same checkpoint
        _say(_world()[0], e, f"flowpp: {e}", file=sys.stdout)
        return 0
    except TrainingInterrupted as e:
        e.coordinated = True
        _say(_world()[0], e, f"flowpp: stopped: {e}")
        return 130 if e.signum == signal.SIGINT else 143
    except KeyboardInterrupt:
        if debug:
            raise
        print("flowpp: interrupted", file=sys.stderr)
        return 130
    except (TrainingDiverged, UsageError, ConfigError, FlowInputError, DataError, CheckpointError,
            NonFiniteResult, OSError, DistributedError) as e:
        rank, comm = _world()
        if debug and (rank == 0 or getattr(e, "rank_local", False)):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else \
            f"{e.filename}: {e.strerror or e}"
        if isinstance(e, (UsageError, ConfigError, FlowInputError)):
            e.coordinated = True                # functions of the options and data: every rank has it
        if comm is not None and not getattr(e, "coordinated", False):
            abort_on_error(comm, e, with_traceback=False)   # only this rank saw it: stop them all
        _say(rank, e, f"flowpp: error: {' '.join(msg.split())}")
        return 1 if isinstance(e, TrainingDiverged) else 2
