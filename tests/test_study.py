"""The study (flowpp_ref.training.study, ``flowpp study``): variants matched in parameters the way the
release matches its ablations, a study folder that refuses other settings, the summary's statistics,
and (slow) a small study that is killed and continues where it stopped."""
import json
import os

import numpy as np
import pytest

from flowpp_ref.cli.study_report import table_markdown
from flowpp_ref.training import study as S


def test_variants_are_matched_in_parameters_and_keep_their_switches():
    scale = S.StudyScale(seeds=1)
    runs = {r["variant"]: r["preset"] for r in S.plan(scale)}
    base = runs["flowpp"]
    n0 = S._count(base)
    assert [r["variant"] for r in S.plan(scale)] == list(S.VARIANTS)
    m = {v: p.model for v, p in runs.items()}
    assert m["uniform-dequant"].dequantization == "uniform" and m["affine"].coupling == "affine"
    assert m["no-attention"].mixer == "gated-nin" and S._count(runs["no-attention"]) == n0
    assert m["realnvp"].family == "realnvp" and m["glow"].family == "glow"
    for v, p in runs.items():
        assert p.model.image_shape == (16, 16, 3) and p.train.batch_size == 16 and p.train.eval_every == 100
        assert abs(S._count(p) - n0) / n0 < 0.10, (v, S._count(p), n0)
    # widening is what matched them: the ablation at the base width has fewer parameters
    assert S._count(S.get_preset("small", dequantization="uniform", image_shape=(16, 16, 3))) < n0
    assert m["uniform-dequant"].filters > base.model.filters and m["affine"].filters > base.model.filters


def test_study_folder_refuses_other_settings(tmp_path):
    S.check_study_folder(str(tmp_path), S.StudyScale(), S.VARIANTS)
    S.check_study_folder(str(tmp_path), S.StudyScale(), S.VARIANTS)          # the same: fine
    with pytest.raises(ValueError, match=r"minutes 6\.0 there, 3\.0 asked"):
        S.check_study_folder(str(tmp_path), S.StudyScale(minutes=3.0), S.VARIANTS)
    with pytest.raises(ValueError, match="variants"):
        S.check_study_folder(str(tmp_path), S.StudyScale(), S.VARIANTS[:2])


def _fake(variant, seed, bpd, last_step):
    name = f"{variant}-seed{seed}"
    res = {"variant": variant, "seed": seed, "name": name, "steps": last_step, "train_seconds": 60.0,
           "test_bpd": bpd, "iw_bpd": bpd - 0.01, "num_parameters": 1000}
    curve = [(s, s / 10, bpd + 1.0 / s) for s in range(100, last_step + 1, 100)]
    return res, curve


def test_summary_statistics_and_the_equal_step():
    rows = [_fake("flowpp", 0, 5.0, 500), _fake("flowpp", 1, 5.2, 400), _fake("glow", 0, 6.0, 300),
            _fake("glow", 1, 6.4, 300)]
    results, curves = [r for r, _ in rows], {r["name"]: c for r, c in rows}
    summ = S.summarize(results, curves, ["flowpp", "glow"])
    assert summ["equal_step"] == 300                       # the largest step every run evaluated
    f = summ["variants"]["flowpp"]
    assert f["test_bpd"]["mean"] == pytest.approx(5.1) and f["test_bpd"]["sd"] == pytest.approx(np.std([5.0, 5.2], ddof=1))
    assert f["bpd_at_equal_step"]["mean"] == pytest.approx(5.1 + 1 / 300)
    assert summ["variants"]["glow"]["paper"]["bpd"] == 3.35 and f["paper"]["bpd"] == 3.09
    study = {"scale": S.dataclasses.asdict(S.StudyScale(seeds=2)), "image_shape": [16, 16, 3], "summary": summ}
    md = table_markdown(study)
    assert "| Flow++ | 1,000 | 450 ± 71 | 5.100 ± 0.141 |" in md and "3.350 (Table 1)" in md, md


@pytest.mark.slow
def test_a_killed_study_continues_where_it_stopped(tmp_path, monkeypatch):
    """Two variants x two seeds on 8x8 tiny models: the study is stopped after its first run, and a
    second run of it is trained for half its budget by hand; the study then reads the first back,
    gives the second only the time it has left, and trains the rest."""
    from flowpp_ref.cli.study_report import write_report
    from flowpp_ref.datasets import block_average, load_default_dataset
    from flowpp_ref.training.loop import train

    tr = block_average(load_default_dataset("train")[0][:256], (8, 8))
    te = block_average(load_default_dataset("test")[0][:64], (8, 8))
    scale = S.StudyScale(image_size=8, base_preset="tiny", minutes=0.08, seeds=2, batch_size=8, eval_every=10,
                         eval_batches=2, eval_images=16, iw_k=4, iw_images=16)
    variants = ("flowpp", "realnvp")
    study_dir = str(tmp_path / "study")
    real_run_one, calls = S.run_one, []

    def stop_after_first(run, *a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(run["name"])
        return real_run_one(run, *a, **k)
    monkeypatch.setattr(S, "run_one", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        S.run_study(study_dir, tr, te, scale, variants)
    monkeypatch.setattr(S, "run_one", real_run_one)
    first = os.path.join(study_dir, "runs", "flowpp-seed0")
    first_log = open(os.path.join(first, "log.jsonl")).read()
    half = [r for r in S.plan(scale, variants) if r["name"] == "realnvp-seed0"][0]
    half_dir = os.path.join(study_dir, "runs", half["name"])
    train(half["preset"], tr, te, out_dir=half_dir, minutes=scale.minutes / 2, progress=False)
    t_half, step_half = S._trained_seconds(half_dir)
    assert 0 < t_half < scale.minutes * 60

    seconds, given = [], {}

    def recording_train(preset, *a, out_dir, minutes, **k):       # the budget each run is handed
        given[os.path.basename(out_dir)] = minutes * 60
        return train(preset, *a, out_dir=out_dir, minutes=minutes, **k)
    monkeypatch.setattr(S, "train", recording_train)
    st = S.run_study(study_dir, tr, te, scale, variants, progress=seconds.append)
    assert open(os.path.join(first, "log.jsonl")).read() == first_log          # read back, not retrained
    by = {r["name"]: r for r in st["runs"]}
    assert set(by) == {"flowpp-seed0", "realnvp-seed0", "flowpp-seed1", "realnvp-seed1"}
    assert by["realnvp-seed0"]["steps"] > step_half
    budget = scale.minutes * 60
    # the budget once: the half-trained run is handed what it has left (not a fresh budget), the finished
    # one nothing, the new ones the whole budget
    assert "flowpp-seed0" not in given, given
    assert given["realnvp-seed0"] == pytest.approx(budget - t_half), (given, t_half)
    assert given["flowpp-seed1"] == given["realnvp-seed1"] == pytest.approx(budget), given
    for r in st["runs"]:
        assert r["train_seconds"] > 0, r
        assert np.isfinite(r["test_bpd"]) and r["iw_bpd"] <= r["test_bpd"] + 0.05
    assert sum(seconds) > 0                                                # the progress callback was fed
    files = write_report(st, study_dir)
    for f in files:
        assert os.path.getsize(os.path.join(study_dir, f)) > 0
    saved = json.load(open(os.path.join(study_dir, "study.json")))
    assert saved["summary"]["equal_step"] >= 10 and set(saved["curves"]) == set(by)


def test_the_study_command_refuses_bad_input_clearly(tmp_path, capsys):
    """Out-of-range settings, CIFAR-10 without a folder, and a study folder of other settings: exit 2,
    one line that says what was wrong, nothing trained."""
    from flowpp_ref.cli import main
    out = str(tmp_path / "st")
    for argv, said in ((["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
                       (["--minutes", "0"], "--minutes: must be a number > 0, got 0"),
                       (["--data", "cifar10"], "--data cifar10 needs --data-dir")):
        try:
            code = main(["study", "--out", out, "--no-progress", *argv])
        except SystemExit as e:                 # argparse's range check exits
            code = e.code
        assert code == 2 and said in capsys.readouterr().err
    S.check_study_folder(out, S.StudyScale(minutes=1.0, seeds=1), S.VARIANTS)
    assert main(["study", "--out", out, "--no-progress", "--minutes", "2", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds a study with other settings (minutes 1.0 there, 2.0 asked)" in err
    assert not os.path.exists(os.path.join(out, "runs"))
