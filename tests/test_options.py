"""One definition per option: the dataclass field's metadata builds the command line and the library checks."""
import argparse
import dataclasses

import pytest

from flowpp_ref.cli.args import add_config_options, overrides_from_args
from flowpp_ref.cli.commands import _overrides, build_parser, main
from flowpp_ref.model.presets import ModelConfig, TrainConfig, get_preset
from flowpp_ref.runtime.options import (ConfigError, Range, check_model_config, check_train_config, cli_spelling,
                                        config_options, option)

CLI = [(cls, name, o) for cls in (TrainConfig, ModelConfig) for name, o in config_options(cls).items() if o.cli]
RANGED = [(cls, name, o) for cls, name, o in CLI if o.range is not None and o.choices is None]


def _ids(params):
    return [name for _, name, _ in params]


def outside(r: Range):
    """Values just outside ``r`` (each one refused)."""
    bad = []
    if r.lo is not None:
        bad.append(r.lo if r.lo_open else r.lo - 1)
    if r.hi is not None:
        bad.append(r.hi if r.hi_open else r.hi + 1)
    if r.multiple_of:
        bad.append((r.lo or 0) + r.multiple_of + 1)
    if r.kind is float:
        bad.append(float("nan"))
    bad = [r.kind(v) if r.kind is int else float(v) for v in bad]
    assert bad and not any(r.ok(v) for v in bad)
    return bad


def train_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def help_entry(out, spelled):
    """The entry of option ``spelled`` in the options part of ``--help`` (its lines joined)."""
    lines = out.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("  -") and ln.split()[0] == spelled]
    assert len(starts) == 1, (spelled, starts)
    i = starts[0]
    entry = [lines[i]]
    for ln in lines[i + 1:]:
        if not ln.startswith("    ") or not ln.strip():
            break
        entry.append(ln)
    return " ".join(" ".join(entry).split())


def test_the_config_classes_declare_the_options_of_the_command_line():
    names = {name for _, name, _ in CLI}
    assert {"batch_size", "init_batch_size", "lr", "warmup_steps", "ema_decay", "seed", "checkpoint_every",
            "eval_batches", "n_bits", "filters", "blocks", "components", "dropout_p", "dequantization", "coupling",
            "use_attention", "mixer", "mixture_dtype"} <= names
    assert cli_spelling("use_attention") == "--no-attention" and cli_spelling("batch_size") == "--batch-size"
    assert cli_spelling("grad_clip") is None and cli_spelling("layout") is None     # library-only / no option


@pytest.mark.parametrize("cls,name,o", CLI, ids=_ids(CLI))
def test_every_cli_field_is_in_train_help_with_its_range_or_choices(cls, name, o, capsys):
    spelled = o.spelling(name)
    text = help_entry(train_help(capsys), spelled)
    if o.flag is None:
        metavar = "{" + ",".join(map(str, o.choices)) + "}" if o.choices else name.upper()
        assert text.startswith(f"{spelled} {metavar} {o.help.split()[0]}"), text
    else:
        assert text.startswith(f"{spelled} {o.help.split()[0]}"), text
    assert f"{' '.join(o.help.split())} [preset, else" in text, text
    if o.choices is None and o.range is not None:
        assert f"range: {o.range.describe()}" in text, text


@pytest.mark.parametrize("cls,name,o", RANGED, ids=_ids(RANGED))
def test_a_value_outside_the_range_is_refused_by_argparse_and_by_the_library(cls, name, o, capsys):
    check = check_train_config if cls is TrainConfig else check_model_config
    base = get_preset("tiny")
    cfg = base.train if cls is TrainConfig else base.model
    check(cfg)                                                 # the preset itself passes
    for bad in outside(o.range):
        text = str(bad) if not isinstance(bad, float) else repr(bad)
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["train", o.spelling(name), text])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {o.spelling(name)}:" in err and o.range.describe() in err, err
        with pytest.raises(ConfigError) as e:
            check(dataclasses.replace(cfg, **{name: bad}))
        assert str(e.value).startswith(f"{name} must be {o.range.describe()}, got "), str(e.value)


def test_choices_are_offered_by_argparse_and_checked_by_the_library(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--coupling", "spline"])
    assert e.value.code == 2 and "argument --coupling: invalid choice: 'spline'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"coupling must be 'mixlogistic', 'affine' or 'additive', got 'spline'"):
        get_preset("tiny", coupling="spline")
    with pytest.raises(ConfigError, match=r"mixture_dtype must be None, 'float32' or 'float64', got 'float16'"):
        get_preset("tiny", mixture_dtype="float16")
    with pytest.raises(ConfigError, match=r"inverse_method must be 'bisection' or 'hybrid'"):
        ModelConfig(inverse_method="newton").validate()
    # n_bits: the command line offers the paper's depths, the library any depth in 1..8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--n-bits", "4"])
    assert "argument --n-bits: invalid choice: 4" in capsys.readouterr().err
    assert get_preset("tiny", n_bits=4).model.n_bits == 4
    with pytest.raises(ConfigError, match=r"n_bits must be an integer in \[1, 8\], got 9"):
        get_preset("tiny", n_bits=9)


def test_overrides_given_on_the_command_line_reach_the_preset():
    argv = ["train", "--preset", "tiny", "--batch-size", "6", "--lr", "3e-4", "--seed", "7", "--n-bits", "5",
            "--filters", "12", "--dropout-p", "0.1", "--coupling", "affine", "--no-attention", "--mixer", "gated-nin",
            "--eval-batches", "2", "--mixture-dtype", "float64"]
    args = build_parser().parse_args(argv)
    ov = overrides_from_args(args, (TrainConfig, ModelConfig))
    assert ov == _overrides(args) == dict(batch_size=6, lr=3e-4, seed=7, n_bits=5, filters=12, dropout_p=0.1,
                                          coupling="affine", use_attention=False, mixer="gated-nin", eval_batches=2,
                                          mixture_dtype="float64")
    p = get_preset(args.preset, **ov)
    assert (p.train.batch_size, p.train.lr, p.train.seed, p.train.eval_batches) == (6, 3e-4, 7, 2)
    assert (p.model.n_bits, p.model.filters, p.model.dropout_p, p.model.coupling, p.model.use_attention,
            p.model.mixer, p.model.mixture_dtype) == (5, 12, 0.1, "affine", False, "gated-nin", "float64")
    # nothing given: nothing overridden, the preset's own values
    args = build_parser().parse_args(["train", "--preset", "tiny"])
    assert overrides_from_args(args, (TrainConfig, ModelConfig)) == {}
    assert get_preset("tiny", **_overrides(args)) == get_preset("tiny")


def test_a_field_added_with_metadata_appears_in_a_parser_built_from_it(capsys):
    @dataclasses.dataclass
    class Extra:
        widgets: int = option(3, help="number of widgets", range=Range(int, 1, 9, note="1: one"))
        fast: bool = option(True, help="go slowly", flag="--slow")
        colour: str = option("red", help="paint colour", choices=("red", "blue"))
        ratio: float | None = option(None, help="mixing ratio", range=Range(float, 0, 1), none_means="automatic")
        hidden: int = option(0, help="library only", range=Range(int, 0), cli=False)
        plain: int = 5

    ap = add_config_options(argparse.ArgumentParser(prog="x"), Extra)
    out = " ".join(ap.format_help().split())
    assert "--widgets WIDGETS number of widgets [preset, else 3]; range: an integer in [1, 9] (1: one)" in out
    assert "--slow go slowly [preset, else fast=True]" in out
    assert "--colour {red,blue} paint colour [preset, else red]" in out
    assert "--ratio RATIO mixing ratio [preset, else automatic]; range: a number in [0, 1]" in out
    assert "--hidden" not in out and "--plain" not in out
    a = ap.parse_args(["--widgets", "5", "--slow", "--ratio", "0.5"])
    assert overrides_from_args(a, [Extra]) == {"widgets": 5, "fast": False, "ratio": 0.5}
    assert overrides_from_args(ap.parse_args([]), [Extra]) == {}
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--widgets", "10"])
    assert e.value.code == 2
    assert "argument --widgets: must be an integer in [1, 9] (1: one), got 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ap.parse_args(["--colour", "green"])
    assert "argument --colour: invalid choice: 'green'" in capsys.readouterr().err


def test_option_refuses_an_inconsistent_definition():
    with pytest.raises(ValueError, match=r"the default must be an integer >= 1, got 0"):
        option(0, help="x", range=Range(int, 1))
    with pytest.raises(ValueError, match=r"the default must be 'a' or 'b', got 'c'"):
        option("c", help="x", choices=("a", "b"))
    with pytest.raises(TypeError, match="boolean default"):
        option(3, help="x", flag="--no-x")
    with pytest.raises(TypeError, match="immutable"):
        option([1], help="x")
