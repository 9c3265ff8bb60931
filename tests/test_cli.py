"""The command line: every subcommand's help, and train -> eval -> sample on a CIFAR-10 folder."""
import json
import os
import pickle

import numpy as np
import pytest

from flowpp_ref.cli.commands import build_parser, main


@pytest.mark.parametrize("cmd", ["train", "eval", "sample", "demo", "study"])
def test_every_subcommand_explains_its_options(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--backend" in out
    if cmd == "train":
        for opt in ("--preset", "--data-dir", "--minutes", "--steps", "--dequantization", "--coupling",
                    "--no-attention", "--n-bits"):
            assert opt in out


def write_cifar_dir(root, n=24, seed=0):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    r = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        base = r.integers(30, 220, size=(n, 3, 1, 1))
        img = np.clip(base + r.integers(-20, 21, size=(n, 3, 32, 32)), 0, 255).astype(np.uint8)
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": img.reshape(n, 3072), b"labels": list(r.integers(0, 10, n))}, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f)


@pytest.mark.slow
def test_train_eval_sample_from_the_command_line(tmp_path, capsys):
    write_cifar_dir(str(tmp_path))
    out = str(tmp_path / "run")
    tiny = ["--filters", "8", "--blocks", "1", "--components", "2", "--batch-size", "4",
            "--init-batch-size", "8", "--eval-batches", "1"]
    assert main(["train", "--preset", "small", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", out,
                 "--steps", "2", "--no-progress", "--samples", "4", *tiny]) == 0
    for f in ("checkpoint.npz", "log.jsonl", "curve.png", "samples.png", "summary.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["steps"] == 2 and np.isfinite(s["test_bpd"])
    res = str(tmp_path / "eval.json")
    assert main(["eval", os.path.join(out, "checkpoint.npz"), "--data", "cifar10", "--data-dir", str(tmp_path),
                 "--batch-size", "4", "--max-batches", "1", "--k", "2", "--out", res]) == 0
    r = json.load(open(res))
    assert r["num_images"] == 4 and r["k"] == 2 and np.isfinite(r["bpd"])
    png = str(tmp_path / "s.png")
    assert main(["sample", os.path.join(out, "checkpoint.npz"), "--n", "4", "--temperature", "0.5",
                 "--out", png]) == 0
    assert os.path.getsize(png) > 0


def test_cifar10_without_a_data_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", "cifar10", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowpp: error:") and "--data-dir" in err
