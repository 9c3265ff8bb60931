"""A run folder belongs to one process at a time (flowpp_ref.runtime.runfolder.RunFolderLock).

Another process holds the lock through a tiny Python snippet; the lock must refuse a second
holder naming the folder and the pid, be released by the OS when the holder is killed,
be a no-op when nested in one process, and make ``flowpp train/eval/sample`` writing into
a folder in use exit 2 at once with one line and nothing written.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from flowpp_ref.cli import commands as cli
from flowpp_ref.runtime import runfolder
from flowpp_ref.runtime.options import ConfigError
from flowpp_ref.runtime.runfolder import RunFolderBusy, RunFolderLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = """
import sys
from flowpp_ref.runtime.runfolder import RunFolderLock
with RunFolderLock(sys.argv[1], "train"):
    print("held", flush=True)
    sys.stdin.read()                 # until the test closes stdin (or kills this process)
"""

TRY = """
import sys
from flowpp_ref.runtime.runfolder import RunFolderBusy, RunFolderLock
try:
    with RunFolderLock(sys.argv[1], "eval"):
        print("taken")
except RunFolderBusy as e:
    print("busy:", e)
"""


def _env():
    env = dict(os.environ)
    for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        env.pop(v, None)             # a rank other than 0 would take no lock
    return env


@pytest.fixture
def holder():
    """``holder(folder)`` starts a process holding the lock of ``folder``; returns its Popen."""
    procs = []

    def start(folder):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO, env=_env())
        procs.append(p)
        line = p.stdout.readline()
        assert line == "held\n", f"the holder did not start: {line!r}, rc {p.poll()}"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdin.close()
        p.stdout.close()


def try_in_another_process(folder) -> str:
    r = subprocess.run([sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True, cwd=REPO,
                       env=_env(), timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_folder_in_use_is_refused_naming_it_and_its_holder_and_freed_when_the_holder_is_killed(tmp_path, holder):
    run = tmp_path / "run"
    child = holder(run)
    info = json.loads((run / ".lock").read_text())
    assert info["pid"] == child.pid and info["purpose"] == "train"
    t0 = time.monotonic()
    with pytest.raises(RunFolderBusy) as ei, RunFolderLock(run, "train"):
        pytest.fail("took a lock another process holds")
    assert time.monotonic() - t0 < 2.0                        # refused at once, not after waiting
    msg = str(ei.value)
    assert isinstance(ei.value, ConfigError)
    assert str(run) in msg and f"pid {child.pid}" in msg and "train since" in msg and "--out" in msg
    assert ei.value.holder["pid"] == child.pid
    assert os.path.realpath(run) not in runfolder._HELD       # a refusal holds nothing

    child.kill()                                               # SIGKILL: no cleanup code runs
    child.wait(10)
    assert (run / ".lock").exists()                            # the dead run left its lock file ...
    with RunFolderLock(run, "train") as lk:                    # ... and the OS released its lock
        assert lk.held
        info = json.loads((run / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["purpose"] == "train"
        assert try_in_another_process(run).startswith(f"busy: {run} is in use")
    assert (run / ".lock").exists()                            # released, never deleted
    assert try_in_another_process(run) == "taken"


def test_nested_use_in_one_process_is_a_no_op_and_the_lock_is_released_after(tmp_path):
    run = tmp_path / "run"
    with RunFolderLock(run, "train") as outer:
        assert outer.held and run.is_dir()
        with RunFolderLock(str(tmp_path / "x" / ".." / "run"), "eval") as inner:   # same folder, other spelling
            assert not inner.held
        assert json.loads((run / ".lock").read_text())["purpose"] == "train"  # the inner one changed nothing
        out = try_in_another_process(run)                        # still held after the inner one left
        assert out.startswith("busy:") and f"pid {os.getpid()}" in out
    assert not outer.held and os.path.realpath(run) not in runfolder._HELD
    assert try_in_another_process(run) == "taken"


def test_is_run_folder(tmp_path):
    assert not runfolder.is_run_folder(tmp_path / "missing")
    assert not runfolder.is_run_folder(tmp_path)
    for name in ("log.jsonl", "checkpoint.npz", ".lock"):
        d = tmp_path / name.strip(".")
        d.mkdir()
        (d / name).write_text("")
        assert runfolder.is_run_folder(d), name


# ---------------------------------------------------------------------- the command line
@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of the tiny preset at its initialisation (no training step to compile)."""
    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.training.loop import _save, build_model
    from flowpp_ref.training.optim import EMA, Adam
    p = get_preset("tiny")
    model = build_model(p)
    params = model.parameters()
    d = tmp_path / "trained"
    d.mkdir()
    path = d / "checkpoint.npz"
    _save(str(path), model, Adam(params), EMA(params), 1, p)
    return path


def flowpp(capsys, *argv):
    """``flowpp ARGV`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_refused(rc, err, run, child, files_before):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowpp: error:"), err
    assert f"{run} is in use by another flowpp process" in err and f"pid {child.pid}" in err
    assert sorted(os.listdir(run)) == files_before            # nothing written


def test_cli_train_into_a_folder_in_use_exits_2_at_once(tmp_path, holder, capsys):
    # train() takes RunFolderLock(out_dir, "train") after its checks, before writing anything
    run = tmp_path / "run"
    child = holder(run)
    rc, err = flowpp(capsys, "train", "--preset", "tiny", "--data", "default", "--steps", 1,
                              "--no-progress", "--out", run)
    assert_refused(rc, err, run, child, [".lock"])
    assert not (run / "log.jsonl").exists() and not (run / "checkpoint.npz").exists()


def test_cli_eval_and_sample_into_a_folder_in_use_exit_2(tmp_path, holder, checkpoint, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.npz").write_bytes(checkpoint.read_bytes())
    child = holder(run)
    before = sorted(os.listdir(run))
    evals = ("eval", "--data", "default", "--batch-size", 2, "--max-batches", 1)

    rc, err = flowpp(capsys, "sample", checkpoint, "--out", run / "s.png", "--n", 1)
    assert_refused(rc, err, run, child, before)
    rc, err = flowpp(capsys, *evals[:1], checkpoint, *evals[1:], "--out", run / "r.json")
    assert_refused(rc, err, run, child, before)

    # reading the checkpoint of a folder in use is allowed, and so is writing outside run folders
    rc, err = flowpp(capsys, *evals[:1], run / "checkpoint.npz", *evals[1:], "--out", tmp_path / "r.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 2
    rc, err = flowpp(capsys, "sample", run / "checkpoint.npz", "--out", tmp_path / "s.png", "--n", 1)
    assert rc == 0, err
    assert (tmp_path / "s.png").stat().st_size > 0
    assert sorted(os.listdir(run)) == before

    # once the holder is gone, the same commands write into the folder
    child.kill()
    child.wait(10)
    rc, err = flowpp(capsys, "sample", checkpoint, "--out", run / "s.png", "--n", 1)
    assert rc == 0, err
    rc, err = flowpp(capsys, *evals[:1], checkpoint, *evals[1:], "--out", run / "r.json")
    assert rc == 0, err
    assert {"s.png", "r.json"} <= set(os.listdir(run))
    assert (run / ".lock").read_text() == ""                  # released: the holder text is gone


# ---------------------------------------------------------------------- the real case
@pytest.mark.slow
def test_two_trainings_started_together_into_one_folder(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flowpp_ref", "train", "--preset", "tiny", "--data", "default", "--steps", "30",
           "--no-progress", "--out", str(out)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
             for _ in range(2)]
    ended = {}
    while len(ended) < 2:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic() - t0
        assert time.monotonic() - t0 < 600, "the runs did not finish"
        time.sleep(0.05)
    res = [(p.returncode, *p.communicate()) for p in procs]
    assert sorted(r[0] for r in res) == [0, 2], res
    win, lose = (0, 1) if res[0][0] == 0 else (1, 0)
    err = res[lose][2]
    assert err.strip().startswith("flowpp: error:") and len(err.strip().splitlines()) == 1, err
    assert f"{out} is in use by another flowpp process (pid {procs[win].pid}, train since" in err
    assert ended[lose] < ended[win]                             # refused while the other one ran
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "train_bpd" in r] == list(range(1, 31))   # one run's records, in order
    assert np.isfinite(json.loads((out / "summary.json").read_text())["test_bpd"])


def test_a_run_that_finished_while_we_waited_for_the_folder_is_resumed_from_its_new_checkpoint(tmp_path, monkeypatch):
    """train() reads the checkpoint, then takes the lock: if another run wrote a newer checkpoint in
    between, the run resolves again under the lock and resumes from the new one (never backwards)."""
    import shutil

    from flowpp_ref.datasets import load_default_dataset
    from flowpp_ref.training.loop import train
    x = load_default_dataset("test")[0][:64, ::8, ::8]          # 4x4 images for `tiny`
    a, b = tmp_path / "a", tmp_path / "b"
    train("tiny", x, out_dir=str(a), steps=2, progress=False)
    train("tiny", x, out_dir=str(b), steps=4, progress=False)
    enter = RunFolderLock.__enter__

    def other_run_finished_first(self):
        shutil.copy(b / "checkpoint.npz", a / "checkpoint.npz")   # the other run's last checkpoint lands
        return enter(self)

    monkeypatch.setattr(RunFolderLock, "__enter__", other_run_finished_first)
    s = train("tiny", x, out_dir=str(a), steps=6, progress=False, report=lambda m: None)
    assert s["steps"] == 6 and s["steps_run"] == 2, s      # from step 4, not from the step 2 read first
