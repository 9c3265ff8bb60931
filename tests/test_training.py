"""Training end to end on the tiny preset: the loss falls, resume is exact, failures are handled."""
import json
import os

import numpy as np
import pytest

from flowpp_ref.runtime.checkpoint import load_checkpoint
from flowpp_ref.training.evaluation import evaluate
from flowpp_ref.training.loop import TrainingDiverged, load_model, train


def images(n=48, seed=0):
    r = np.random.default_rng(seed)
    base = r.integers(40, 200, size=(n, 1, 1, 3))
    noise = r.integers(-25, 26, size=(n, 4, 4, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    x = images()
    s = train("tiny", x, images(8, seed=1), out_dir=str(tmp_path), steps=40, progress=False,
              overrides=dict(lr=3e-3))
    bpd = [h["train_bpd"] for h in s["history"]]
    assert len(bpd) == 40
    assert np.mean(bpd[-8:]) < np.mean(bpd[:8]) - 0.2, (bpd[:8], bpd[-8:])
    assert np.isfinite(s["test_bpd"])
    for f in ("checkpoint.npz", "log.jsonl", "summary.json"):
        assert os.path.getsize(tmp_path / f) > 0
    recs = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert any("img_per_s" in r for r in recs)


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path):
    x = images()
    full = train("tiny", x, out_dir=str(tmp_path / "a"), steps=8, progress=False)
    train("tiny", x, out_dir=str(tmp_path / "b"), steps=4, progress=False)
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint.npz"))["step"] == 4
    resumed = train("tiny", x, out_dir=str(tmp_path / "b"), steps=8, progress=False)
    a = [h["train_bpd"] for h in full["history"]]
    b = [h["train_bpd"] for h in resumed["history"]]
    assert len(b) == 4
    np.testing.assert_array_equal(a[4:], b)
    pa, pb = full["model"].parameters(), resumed["model"].parameters()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    from flowpp_ref import model as model_mod
    x = images()
    good = train("tiny", x, out_dir=str(tmp_path), steps=2, progress=False)
    before = load_checkpoint(str(tmp_path / "checkpoint.npz"))

    def nan_loss(self, xb, *, rng, train=True):
        loss, grads = orig(self, xb, rng=rng, train=train)
        return loss * np.nan, grads

    orig = model_mod.FlowPP.loss_and_grads
    monkeypatch.setattr(model_mod.FlowPP, "loss_and_grads", nan_loss)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train("tiny", x, out_dir=str(tmp_path), steps=50, progress=False, overrides=dict(max_bad_steps=3))
    after = load_checkpoint(str(tmp_path / "checkpoint.npz"))
    assert after["step"] == before["step"] == 2
    for k, v in before["params"].items():
        np.testing.assert_array_equal(v, after["params"][k])
    assert good["steps"] == 2


def test_the_run_folder_is_locked_while_training_and_released_after(tmp_path, monkeypatch):
    """train() holds RunFolderLock(out_dir) around its steps (a nested lock of this
    process takes nothing) and lets it go when it returns or raises."""
    from flowpp_ref import model as model_mod
    from flowpp_ref.runtime.runfolder import RunFolderLock
    held = []

    def probe(step, rec):
        with RunFolderLock(str(tmp_path), "probe") as lock:
            held.append(lock.held)
    train("tiny", images(), out_dir=str(tmp_path), steps=2, progress=False, overrides=dict(log_every=1),
          on_step=probe)
    assert held == [False, False]
    with RunFolderLock(str(tmp_path), "probe") as lock:
        assert lock.held
    orig = model_mod.FlowPP.loss_and_grads
    monkeypatch.setattr(model_mod.FlowPP, "loss_and_grads", lambda self, xb, *, rng, train=True: (
        lambda lg: (lg[0] * np.nan, lg[1]))(orig(self, xb, rng=rng, train=train)))
    with pytest.raises(TrainingDiverged):
        train("tiny", images(), out_dir=str(tmp_path), steps=9, progress=False, overrides=dict(max_bad_steps=2))
    with RunFolderLock(str(tmp_path), "probe") as lock:
        assert lock.held


def test_training_loop_reads_scalars_back_once_per_log_interval(tmp_path, monkeypatch):
    """The loop's only host transfers are the batched read-backs every log_every steps; a
    non-finite step inside an interval is still skipped (nothing updated) and reported."""
    from flowpp_ref import model as model_mod
    from flowpp_ref.training import loop as train_mod
    calls = []
    real = train_mod.to_numpy
    monkeypatch.setattr(train_mod, "to_numpy", lambda a: calls.append(getattr(a, "shape", None)) or real(a))
    orig = model_mod.FlowPP.loss_and_grads

    def nan_at_step_3(self, xb, *, rng, train=True):
        loss, grads = orig(self, xb, rng=rng, train=train)
        nan_at_step_3.n += 1
        return (loss * np.nan, grads) if nan_at_step_3.n == 3 else (loss, grads)
    nan_at_step_3.n = 0
    monkeypatch.setattr(model_mod.FlowPP, "loss_and_grads", nan_at_step_3)
    s = train("tiny", images(), out_dir=str(tmp_path), steps=8, progress=False,
              overrides=dict(log_every=4, checkpoint_every=100))
    # two read-backs of 4 steps x (loss, norm, ok), then the final checkpoint's check batch
    # (training and EMA loss, read back together)
    assert calls == [(4, 3), (4, 3), (2,)]
    assert s["skipped_steps"] == 1 and [h["step"] for h in s["history"]] == [1, 2, 4, 5, 6, 7, 8]
    recs = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in recs if r.get("skipped")] == [3]
    assert all(np.isfinite(v).all() for v in s["model"].parameters().values())


@pytest.mark.slow
def test_checkpoint_reloads_for_evaluation_and_importance_sampling(tmp_path):
    x = images()
    train("tiny", x, out_dir=str(tmp_path), steps=6, progress=False)
    model, preset, _ = load_model(str(tmp_path / "checkpoint.npz"))
    r1 = evaluate(model, x[:8], batch_size=8, k=1)
    r8 = evaluate(model, x[:8], batch_size=8, k=8)
    assert np.isfinite(r1["bpd"]) and np.isfinite(r8["bpd"])
    # the K-sample bound is tighter than the ELBO on average (Burda et al.), up to noise
    assert r8["bpd"] <= r1["bpd"] + 0.05


def test_periodic_evaluation_and_training_time_in_the_log(tmp_path):
    """eval_every logs test bits/dim (EMA) at those steps; time_s counts training seconds, grows
    step after step, continues across a resume, and leaves the evaluations out."""
    x, te = images(), images(8, seed=1)
    ov = dict(eval_every=2, log_every=1, eval_batches=1, checkpoint_every=3)
    train("tiny", x, te, out_dir=str(tmp_path), steps=3, progress=False, overrides=ov)
    train("tiny", x, te, out_dir=str(tmp_path), steps=6, progress=False, overrides=ov)
    recs = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    evals = [r for r in recs if "test_bpd" in r and "val_inverr" not in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(np.isfinite(r["test_bpd"]) for r in evals)
    steps = [r for r in recs if "train_bpd" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    t = [r["time_s"] for r in steps]
    assert all(b > a for a, b in zip(t, t[1:])), t          # no restart at the resume (step 4)
    ev = {r["step"]: r["time_s"] for r in evals}
    assert ev[2] <= t[2] and ev[4] <= t[4], (ev, t)         # an evaluation does not move the clock on
