"""Reliability of runs and of the command line (issue 9): every test name contains
"reliability" (``pytest -k reliability``). Tiny preset, made-up 4x4 images, a few steps."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from flowpp_ref.cli import commands as cli
from flowpp_ref.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flowpp_ref.runtime.options import ConfigError
from flowpp_ref.training.evaluation import evaluate
from flowpp_ref.training.loop import TrainingDiverged, load_model, train
from flowpp_ref.core.validation import FlowInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(n=48, seed=0):
    r = np.random.default_rng(seed)
    base = r.integers(40, 200, size=(n, 1, 1, 3))
    return np.clip(base + r.integers(-25, 26, size=(n, 4, 4, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def flowpp(monkeypatch, capsys):
    """Run the CLI in-process on made-up 4x4 data: returns (exit status, stdout, stderr)."""
    loaded = []

    def fake_load(args, split):
        loaded.append(split)
        return images(48, 0) if split == "train" else images(8, 1)
    monkeypatch.setattr(cli, "_load_data", fake_load)

    def run(*argv):
        capsys.readouterr()
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:                     # argparse
            rc = e.code
        out, err = capsys.readouterr()
        return rc, out, err
    run.loaded = loaded
    return run


TRAIN = ("train", "--preset", "tiny", "--no-progress", "--samples", "4")


def log_steps(d):
    return [json.loads(line)["step"] for line in open(os.path.join(d, "log.jsonl"))
            if "train_bpd" in json.loads(line) or json.loads(line).get("skipped")]


def snapshot(d):
    """Every file of the run folder with its modification time and bytes; ``.lock`` (who holds the
    folder: rewritten by every process that takes it, never data) only by its presence."""
    return {f: (os.stat(os.path.join(d, f)).st_mtime_ns, open(os.path.join(d, f), "rb").read()) if f != ".lock"
            else "present" for f in sorted(os.listdir(d))}


# ----------------------------------------------------------------- found 1, deliver 4
def test_reliability_rerun_of_a_finished_run_touches_nothing(tmp_path, flowpp):
    out = tmp_path / "run"
    rc, o, e = flowpp(*TRAIN, "--out", out, "--steps", 4)
    assert rc == 0, e
    before = snapshot(out)
    assert {"checkpoint.npz", "log.jsonl", "curve.png", "samples.png", "summary.json"} <= set(before)
    for steps in (4, 3):
        n_loaded = len(flowpp.loaded)
        rc, o, e = flowpp(*TRAIN, "--out", out, "--steps", steps)
        assert rc == 0, e
        assert "already at step 4" in o and "--no-resume" in o
        assert len(flowpp.loaded) == n_loaded            # not even the data was loaded
        assert snapshot(out) == before
    # the library says the same and writes nothing
    msgs = []
    s = train("tiny", images(), images(8, 1), out_dir=str(out), steps=4, progress=False, report=msgs.append)
    assert s["already_done"] and s["steps"] == 4 and "already at step 4" in msgs[0]
    assert snapshot(out) == before


# ----------------------------------------------------------------- found 2, deliver 1
@pytest.mark.parametrize("argv, option", [
    (("train", "--steps", "0"), "--steps"), (("train", "--steps", "-5"), "--steps"),
    (("train", "--minutes", "0"), "--minutes"), (("train", "--steps", "2", "--batch-size", "-3"), "--batch-size"),
    (("train", "--steps", "2", "--batch-size", "0"), "--batch-size"),
    (("train", "--steps", "2", "--checkpoint-every", "0"), "--checkpoint-every"),
    (("train", "--steps", "2", "--init-batch-size", "0"), "--init-batch-size"),
    (("train", "--steps", "2", "--samples", "-1"), "--samples"), (("train", "--steps", "2", "--lr", "-1"), "--lr"),
    (("train", "--steps", "2", "--lr", "nan"), "--lr"), (("train", "--steps", "2", "--ema-decay", "1"), "--ema-decay"),
    (("train", "--steps", "2", "--eval-batches", "0"), "--eval-batches"),
    (("train", "--steps", "2", "--dropout-p", "1.5"), "--dropout-p"),
    (("train", "--steps", "2", "--filters", "6"), "--filters"), (("train", "--steps", "x"), "--steps"),
    (("sample", "c.npz", "--n", "0"), "--n"), (("sample", "c.npz", "--n", "-2"), "--n"),
    (("eval", "c.npz", "--k", "0"), "--k"), (("eval", "c.npz", "--batch-size", "0"), "--batch-size"),
    (("eval", "c.npz", "--max-batches", "-1"), "--max-batches"),
    (("eval", "c.npz", "--max-batches", "0"), "--max-batches"),
])
def test_reliability_out_of_range_options_are_refused_before_any_work(argv, option, flowpp, tmp_path):
    rc, o, e = flowpp(*argv, "--out", tmp_path / "r") if argv[0] == "train" else flowpp(*argv)
    assert rc == 2
    last = e.strip().splitlines()[-1]
    assert f"argument {option}:" in last and argv[-1] in last, last
    assert flowpp.loaded == [] and not (tmp_path / "r").exists()


def test_reliability_help_states_every_range(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for opt in ("--steps STEPS", "--batch-size BATCH_SIZE", "--lr LR", "--ema-decay EMA_DECAY", "--samples SAMPLES",
                "--checkpoint-every CHECKPOINT_EVERY", "--dropout-p DROPOUT_P", "--eval-batches EVAL_BATCHES"):
        assert "range:" in out.rsplit(opt, 1)[1].split(" --", 1)[0], opt


def test_reliability_library_refuses_the_same_values(tmp_path):
    x = images()
    for kw, name in ((dict(overrides=dict(batch_size=-3)), "batch_size"), (dict(steps=0), "steps"),
                     (dict(steps=-5), "steps"), (dict(minutes=0), "minutes"),
                     (dict(overrides=dict(checkpoint_every=0)), "checkpoint_every"),
                     (dict(overrides=dict(lr=-1.0)), "lr"), (dict(overrides=dict(batch_size=49)), "batch_size")):
        kw.setdefault("steps", 2)
        with pytest.raises(ConfigError, match=name):
            train("tiny", x, out_dir=str(tmp_path / "r"), progress=False, **kw)
    assert not (tmp_path / "r").exists()
    model = train("tiny", x, steps=1, progress=False)["model"]
    for kw in (dict(max_batches=0), dict(batch_size=0), dict(k=0)):
        with pytest.raises(ConfigError, match=list(kw)[0]):
            evaluate(model, x, **kw)


# ----------------------------------------------------------------- found 3, deliver 3
def test_reliability_divergence_keeps_the_last_good_checkpoint(tmp_path, flowpp):
    out = tmp_path / "run"
    assert flowpp(*TRAIN, "--out", out, "--steps", 10)[0] == 0
    good = load_checkpoint(str(out / "checkpoint.npz"))
    assert good["step"] == 10 and load_checkpoint(str(out / "checkpoint-prev.npz"))["step"] == 5
    # lr 1000 wrecks the parameters at step 11 (finite loss), the steps after are non-finite
    rc, o, e = flowpp(*TRAIN, "--out", out, "--steps", 40, "--lr", 1000, "--warmup-steps", 0)
    assert rc == 1
    last = e.strip().splitlines()[-1]
    assert last.startswith("flowpp: error:") and "non-finite" in last
    assert f"{out / 'checkpoint.npz'} (step 10, finite)" in last and "Traceback" not in e
    kept = load_checkpoint(str(out / "checkpoint.npz"))
    assert kept["step"] == 10
    for k, v in good["params"].items():
        np.testing.assert_array_equal(v, kept["params"][k])
    model, _, _ = load_model(str(out / "checkpoint.npz"))
    assert np.isfinite(evaluate(model, images(8, 1), batch_size=4)["bpd"])
    assert np.all(model.sample(2, rng=np.random.default_rng(0)) >= 0)


def test_reliability_divergence_before_the_first_checkpoint_says_none_exists(tmp_path, monkeypatch):
    from flowpp_ref import model as model_mod
    orig = model_mod.FlowPP.loss_and_grads
    monkeypatch.setattr(model_mod.FlowPP, "loss_and_grads",
                        lambda self, xb, *, rng, train=True: (lambda lg: (lg[0] * np.nan, lg[1]))(
                            orig(self, xb, rng=rng, train=train)))
    with pytest.raises(TrainingDiverged, match="no checkpoint of this run was written") as e:
        train("tiny", images(), out_dir=str(tmp_path), steps=50, progress=False,
              overrides=dict(max_bad_steps=3, checkpoint_every=20))
    assert "first was due at step 20" in str(e.value)
    assert not (tmp_path / "checkpoint.npz").exists()


def test_reliability_no_checkpoint_from_parameters_failing_the_check_batch(tmp_path, monkeypatch):
    from flowpp_ref import model as model_mod
    train("tiny", images(), out_dir=str(tmp_path), steps=5, progress=False)
    before = open(tmp_path / "checkpoint.npz", "rb").read()
    orig = model_mod.FlowPP.loss

    def broken_in_eval_mode(self, x, *, rng, train=False):       # training steps finite, the check is not
        loss, cache = orig(self, x, rng=rng, train=train)
        return (loss if train else loss * np.inf), cache
    monkeypatch.setattr(model_mod.FlowPP, "loss", broken_in_eval_mode)
    with pytest.raises(TrainingDiverged, match="check batch") as e:
        train("tiny", images(), out_dir=str(tmp_path), steps=10, progress=False)
    assert f"{tmp_path / 'checkpoint.npz'} (step 5, finite)" in str(e.value)
    assert open(tmp_path / "checkpoint.npz", "rb").read() == before


def test_reliability_skipped_last_step_postpones_the_checkpoint(tmp_path, monkeypatch):
    from flowpp_ref import model as model_mod
    orig = model_mod.FlowPP.loss_and_grads
    calls = {"n": 0}

    def nan_at_step_5(self, xb, *, rng, train=True):
        calls["n"] += 1
        loss, grads = orig(self, xb, rng=rng, train=train)
        return (loss * np.nan if calls["n"] == 5 else loss), grads
    monkeypatch.setattr(model_mod.FlowPP, "loss_and_grads", nan_at_step_5)
    msgs = []
    s = train("tiny", images(), out_dir=str(tmp_path), steps=7, progress=False, report=msgs.append)
    assert s["skipped_steps"] == 1 and any("postponed" in m for m in msgs)
    assert load_checkpoint(str(tmp_path / "checkpoint-prev.npz"))["step"] == 6   # written at 6, not at 5
    assert load_checkpoint(str(tmp_path / "checkpoint.npz"))["step"] == 7


# ----------------------------------------------------------------- found 4, deliver 6
def test_reliability_eval_of_a_broken_checkpoint_is_an_error_not_infinity(tmp_path, flowpp):
    out = tmp_path / "run"
    assert flowpp(*TRAIN, "--out", out, "--steps", 2)[0] == 0
    ck = load_checkpoint(str(out / "checkpoint.npz"))
    k = next(iter(ck["ema"]["shadow"]))
    ck["ema"]["shadow"][k] = ck["ema"]["shadow"][k] * np.inf
    bad = str(tmp_path / "bad.npz")
    save_checkpoint(bad, **{s: ck[s] for s in ("params", "ema", "optimizer_state", "step", "rng_state", "config")})
    res = tmp_path / "eval.json"
    rc, o, e = flowpp("eval", bad, "--batch-size", 4, "--out", res)
    assert rc == 2 and not res.exists() and "Infinity" not in o
    last = e.strip().splitlines()[-1]
    assert last.startswith("flowpp: error:") and bad in last and "batch 0" in last
    rc, o, e = flowpp("eval", str(out / "checkpoint.npz"), "--batch-size", 4, "--out", res)
    assert rc == 0
    r = json.loads(res.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert np.isfinite(r["bpd"]) and r["num_images"] == 8


# ----------------------------------------------------------------- found 5
@pytest.mark.parametrize("bad, what", [
    (images().astype(np.float32) / 255, "dtype float32"), (images().astype(np.float64), "dtype float64"),
    (images().astype(np.int16) + 300, "max"), (images().astype(np.int32) - 50, "min"),
    (images() > 100, "dtype bool")])
def test_reliability_non_integer_pixels_are_refused_before_training(bad, what, tmp_path, monkeypatch):
    from flowpp_ref import model as model_mod
    monkeypatch.setattr(model_mod.FlowPP, "data_init", lambda *a, **k: pytest.fail("reached the init"))
    with pytest.raises(FlowInputError, match=what):
        train("tiny", bad, out_dir=str(tmp_path / "a"), steps=2, progress=False)
    with pytest.raises(FlowInputError, match="test_images"):
        train("tiny", images(), bad[:8], out_dir=str(tmp_path / "b"), steps=2, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reliability_model_refuses_fractional_float_pixels():
    model = train("tiny", images(), steps=1, progress=False)["model"]
    x = images(4).astype(np.float32)
    assert np.isfinite(model.bits_per_dim(x, rng=np.random.default_rng(0))).all()   # whole numbers: accepted
    with pytest.raises(FlowInputError, match="fractional"):
        model.bits_per_dim(x + 0.5, rng=np.random.default_rng(0))


# ----------------------------------------------------------------- found 6, deliver 5
DRIVER = textwrap.dedent("""
    import sys
    import numpy as np
    from flowpp_ref.cli import commands as cli

    def made_up(args, split):
        r = np.random.default_rng(0 if split == "train" else 1)
        n = 48 if split == "train" else 8
        base = r.integers(40, 200, size=(n, 1, 1, 3))
        return np.clip(base + r.integers(-25, 26, size=(n, 4, 4, 3)), 0, 255).astype(np.uint8)

    cli._load_data = made_up
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_reliability_signal_in_a_subprocess_writes_a_checkpoint_and_says_how_to_resume(sig, status, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, str(driver), *TRAIN, "--out", str(out), "--steps", "100000",
            "--checkpoint-every", "100000"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 240:
            if (out / "log.jsonl").exists() and len(open(out / "log.jsonl").read().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended early: {proc.communicate()}")
            time.sleep(0.05)
        else:
            pytest.fail("no training steps were logged within 240 s")
        proc.send_signal(sig)
        o, e = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, (o, e)
    assert "Traceback" not in e
    last = e.strip().splitlines()[-1]
    assert signal.Signals(sig).name in last and "run the same command again" in last and "--no-resume" in last
    step = load_checkpoint(str(out / "checkpoint.npz"))["step"]
    assert step >= 3 and f"(step {step})" in last
    assert log_steps(out) == list(range(1, step + 1))          # every step up to the checkpoint, once
    # resuming continues from there
    r = subprocess.run([sys.executable, str(driver), *TRAIN, "--out", str(out), "--steps", str(step + 2)],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(str(out / "checkpoint.npz"))["step"] == step + 2
    assert log_steps(out) == list(range(1, step + 3))


def test_reliability_signal_in_process_stops_after_the_step(tmp_path):
    from flowpp_ref.runtime.runfolder import TrainingInterrupted
    before = signal.getsignal(signal.SIGINT)

    def interrupt_at_3(step, rec):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 3: checkpoint written") as e:
        train("tiny", images(), out_dir=str(tmp_path), steps=50, progress=False, on_step=interrupt_at_3,
              report=lambda m: None)
    assert e.value.step == 3 and e.value.checkpoint == str(tmp_path / "checkpoint.npz")
    assert load_checkpoint(e.value.checkpoint)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before                # the handler is put back
    assert not (tmp_path / "summary.json").exists()


# ----------------------------------------------------------------- found 7
def test_reliability_resume_truncates_the_log_to_the_checkpoint(tmp_path, flowpp):
    out = tmp_path / "run"
    assert flowpp(*TRAIN, "--out", out, "--steps", 10)[0] == 0
    # fall back to the previous checkpoint (step 5): the log holds steps 6..10 and a test line at 10
    os.replace(out / "checkpoint-prev.npz", out / "checkpoint.npz")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 11, "train_b')                     # a line cut by a kill
    assert flowpp(*TRAIN, "--out", out, "--steps", 12)[0] == 0
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log_steps(out) == list(range(1, 13))
    assert [r["step"] for r in recs if "test_bpd" in r] == [12]
    steps = [r["step"] for r in recs]
    assert steps == sorted(steps)                             # the curve never draws backwards


# ----------------------------------------------------------------- found 8, deliver 3
def test_reliability_stale_temporary_files_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".checkpoint.npz.k2j3h4.tmp", ".checkpoint-prev.npz.abc.tmp", ".log.jsonl.x1.tmp"]
    for n in stale + [".unrelated.tmp", "notes.txt"]:
        (out / n).write_bytes(b"x" * 100)
    msgs = []
    train("tiny", images(), out_dir=str(out), steps=2, progress=False, report=msgs.append)
    left = set(os.listdir(out))
    assert not left & set(stale) and {".unrelated.tmp", "notes.txt"} <= left
    assert any("removed 3 temporary file(s)" in m for m in msgs)


def test_reliability_checkpoint_prev_survives_and_corrupt_checkpoint_advice(tmp_path, flowpp):
    out = tmp_path / "run"
    assert flowpp(*TRAIN, "--out", out, "--steps", 10)[0] == 0
    with open(out / "checkpoint.npz", "r+b") as f:            # damage the newest checkpoint
        f.seek(200)
        f.write(b"\0" * 64)
    rc, o, e = flowpp(*TRAIN, "--out", out, "--steps", 20)
    assert rc == 2
    last = e.strip().splitlines()[-1]
    assert last.startswith("flowpp: error:") and "checkpoint-prev.npz" in last and "--no-resume" in last
    assert "earlier checkpoint" not in last and load_checkpoint(str(out / "checkpoint-prev.npz"))["step"] == 5


# ----------------------------------------------------------------- found 9, deliver 4
def test_reliability_resume_states_applied_options_and_refuses_others(tmp_path, flowpp):
    out = tmp_path / "run"
    assert flowpp(*TRAIN, "--out", out, "--steps", 5, "--lr", "1e-3")[0] == 0
    rc, o, e = flowpp(*TRAIN, "--out", out, "--steps", 7, "--lr", "3e-4", "--batch-size", 8)
    assert rc == 0, e
    assert "resuming at step 5 with batch_size 8 instead of 4, lr 0.0003 instead of 0.001" in e
    cfg = load_checkpoint(str(out / "checkpoint.npz"))["config"]["train"]
    assert cfg["lr"] == 3e-4 and cfg["batch_size"] == 8
    before = snapshot(out)
    for argv, opt in ((("--filters", 4), "--filters 8 (asked: 4)"), (("--no-attention",), "--no-attention True"),
                      (("--seed", 3), "--seed 0, asked 3"), (("--dequantization", "uniform"), "--dequantization")):
        rc, o, e = flowpp(*TRAIN, "--out", out, "--steps", 9, *argv)
        assert rc == 2
        last = e.strip().splitlines()[-1]
        assert last.startswith("flowpp: error:") and opt in last and "--no-resume" in last, last
        assert "flow." not in last and "dequant." not in last              # options, not tensors
        assert snapshot(out) == before
    # the run's own options are kept when none are given
    assert flowpp(*TRAIN, "--out", out, "--steps", 9)[0] == 0
    assert load_checkpoint(str(out / "checkpoint.npz"))["config"]["train"]["lr"] == 3e-4


# ----------------------------------------------------------------- found 10, deliver 2
def test_reliability_library_errors_are_one_line_with_exit_2(tmp_path, flowpp):
    rc, o, e = flowpp("eval", tmp_path / "missing.npz")
    assert rc == 2 and e.strip() == f"flowpp: error: no checkpoint file at {tmp_path / 'missing.npz'}"
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    rc, o, e = flowpp("sample", tmp_path / "junk.npz", "--out", tmp_path / "s.png")
    assert rc == 2 and len(e.strip().splitlines()) == 1 and "junk.npz" in e
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, o, e = flowpp(*TRAIN, "--out", blocker / "run", "--steps", 2)
    assert rc == 2 and e.startswith("flowpp: error: --out") and "Traceback" not in e
    with pytest.raises(CheckpointError):                      # --debug: the traceback
        cli.main(["eval", str(tmp_path / "missing.npz"), "--debug"])


def test_reliability_tiny_preset_on_default_data_is_averaged_down_and_said(tmp_path, capsys):
    rc = cli.main(["train", "--preset", "tiny", "--data", "default", "--steps", "2", "--samples", "0",
                   "--no-progress", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0 and "--data default at 4x4: the embedded 32x32 images averaged over 8x8 blocks" in out
    assert os.path.isfile(tmp_path / "r" / "checkpoint.npz")


def test_reliability_images_of_the_wrong_size_are_a_clear_error(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((6, 8, 8, 3), np.uint8))
    rc = cli.main(["train", "--preset", "small", "--data", "images", "--data-dir", str(tmp_path / "x.npy"),
                   "--steps", "2", "--out", str(tmp_path / "r")])
    e = capsys.readouterr().err
    assert rc == 2 and e.startswith("flowpp: error: --preset small takes 32x32x3 images but --data images holds "
                                    "8x8x3 images")


def test_reliability_block_average_rounds_block_means_and_refuses_bad_sizes():
    from flowpp_ref.datasets import DataError, block_average
    x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    y = block_average(x, (2, 2))
    want = np.floor(x.reshape(2, 2, 2, 2, 2, 1).mean(axis=(2, 4)) + 0.5)
    assert y.dtype == np.uint8 and y.shape == (2, 2, 2, 1) and np.array_equal(y, want)
    assert block_average(np.full((1, 4, 4, 3), 255, np.uint8), (1, 1)).max() == 255
    with pytest.raises(DataError, match="whole blocks"):
        block_average(x, (3, 3))
    with pytest.raises(DataError, match="uint8"):
        block_average(x.astype(np.float32), (2, 2))


def test_reliability_missing_cifar_advice_fits_the_command_line(tmp_path, capsys):
    rc = cli.main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--steps", "2",
                   "--out", str(tmp_path / "r")])
    e = capsys.readouterr().err
    assert rc == 2 and e.startswith("flowpp: error: CIFAR-10 not found") and len(e.strip().splitlines()) == 1
    assert "the flowpp command does not download" in e and "or pass download=True" not in e


def test_reliability_samples_zero_writes_no_grid(tmp_path, flowpp):
    out = tmp_path / "run"
    rc, o, e = flowpp("train", "--preset", "tiny", "--no-progress", "--samples", 0, "--out", out, "--steps", 2)
    assert rc == 0 and not (out / "samples.png").exists() and "samples.png" not in o
