"""Weights files (.safetensors, flowpp_ref/training/weights.py) and the shipped pretrained model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

st = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (pip install 'flowpp-ref[weights]')")

from flowpp_ref.cli import main as cli_main  # noqa: E402
from flowpp_ref.datasets import load_default_dataset  # noqa: E402
from flowpp_ref.runtime.checkpoint import load_checkpoint  # noqa: E402
from flowpp_ref.training.loop import load_model, train  # noqa: E402
from flowpp_ref.training.weights import (PRETRAINED, PRETRAINED_DIR, WeightsError, export_weights,  # noqa: E402
                                         load_pretrained, load_weights, read_weights)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    x = np.random.default_rng(0).integers(0, 256, size=(32, 4, 4, 3)).astype(np.uint8)
    train("tiny", x, out_dir=str(d), steps=3, progress=False, overrides={"batch_size": 8, "init_batch_size": 8})
    return str(d / "checkpoint.npz")


def _images(n=4):
    return np.random.default_rng(5).integers(0, 256, size=(n, 4, 4, 3)).astype(np.uint8)


@pytest.mark.slow                 # trains a checkpoint first (end-to-end)
def test_export_then_load_gives_the_checkpoints_ema_model(checkpoint, tmp_path):
    out = export_weights(checkpoint, tmp_path / "w.safetensors", info={"note": "test"})
    tensors, meta = read_weights(out)
    ck = load_checkpoint(checkpoint)
    assert set(tensors) == set(ck["ema"]["shadow"])
    for k, v in ck["ema"]["shadow"].items():
        np.testing.assert_array_equal(tensors[k], np.asarray(v, np.float32))
    assert meta["parameters"] == "ema" and meta["note"] == "test" and meta["step"] == "3"
    assert meta["config"] == json.loads(json.dumps(ck["config"]))
    model, p, _ = load_weights(out)
    ref, _, _ = load_model(checkpoint)
    a = model.bits_per_dim(_images(), rng=np.random.default_rng(1))
    b = ref.bits_per_dim(_images(), rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    # the file is plain safetensors: another reader sees the same arrays and metadata
    other = st.load_file(out)
    assert set(other) == set(tensors)


@pytest.mark.slow                 # trains a checkpoint first (end-to-end)
def test_float16_halves_the_file_and_keeps_the_model_close(checkpoint, tmp_path):
    f32 = export_weights(checkpoint, tmp_path / "a.safetensors")
    f16 = export_weights(checkpoint, tmp_path / "b.safetensors", dtype="float16", use_ema=False)
    assert os.path.getsize(f16) < 0.6 * os.path.getsize(f32)
    tensors, meta = read_weights(f16)
    assert meta["dtype"] == "float16" and meta["parameters"] == "raw"
    assert all(v.dtype == np.float16 for v in tensors.values())
    model, _, _ = load_weights(f16)
    ref, _, _ = load_model(checkpoint, use_ema_params=False)
    a = model.bits_per_dim(_images(), rng=np.random.default_rng(1))
    b = ref.bits_per_dim(_images(), rng=np.random.default_rng(1))
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert not np.array_equal(a, b)                     # float16 rounding is visible, and small


@pytest.mark.slow                 # trains a checkpoint first (end-to-end)
def test_bad_weights_are_refused_with_a_reason(checkpoint, tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        read_weights(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_weights(junk)
    foreign = tmp_path / "foreign.safetensors"
    st.save_file({"w": np.ones(3, np.float32)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="not a flowpp-ref weights file"):
        read_weights(foreign)
    good = export_weights(checkpoint, tmp_path / "good.safetensors")
    tensors, meta = read_weights(good)
    meta["config"] = json.dumps(meta["config"])
    k = sorted(tensors)[0]
    renamed = dict(tensors)
    renamed["renamed." + k] = renamed.pop(k)
    st.save_file(renamed, str(tmp_path / "renamed.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match="do not fit the model"):
        load_weights(tmp_path / "renamed.safetensors")
    bad = dict(tensors)
    bad[k] = bad[k].copy()
    bad[k].flat[0] = np.nan
    st.save_file(bad, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match="non-finite"):
        read_weights(tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match="dtype"):
        export_weights(checkpoint, tmp_path / "x.safetensors", dtype="int8")
    before = open(good, "rb").read()
    with pytest.raises(WeightsError):
        export_weights(checkpoint, good, dtype="bfloat16")
    assert open(good, "rb").read() == before            # a failed export leaves the old file


def test_the_shipped_model_loads_and_scores_test_images_as_stated():
    """The stated test bits/dim (all 10,000 CIFAR-10 test images) against the embedded test images."""
    assert set(PRETRAINED) == {"small-cifar10"}
    assert os.path.isfile(os.path.join(PRETRAINED_DIR, PRETRAINED["small-cifar10"]))
    model, p, meta = load_pretrained()
    assert p.name == "small" and meta["dtype"] == "float16"
    for key in ("data", "trained", "test_bpd"):
        assert meta.get(key), key
    x, _ = load_default_dataset("test")
    bpd = model.bits_per_dim(x[:64], rng=np.random.default_rng(0))
    assert abs(bpd.mean() - float(meta["test_bpd"])) < 0.15, (bpd.mean(), meta["test_bpd"])
    imgs = model.sample(4, rng=np.random.default_rng(0))
    assert imgs.shape == (4, 32, 32, 3) and imgs.dtype == np.uint8
    with pytest.raises(WeightsError, match="no pretrained model"):
        load_pretrained("glow-imagenet")


@pytest.mark.slow                 # trains a checkpoint first (end-to-end)
def test_cli_export_and_sample_from_weights_and_from_the_shipped_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert cli_main(["export", checkpoint, "--out", str(out), "--float16", "--info", "data=random"]) == 0
    assert read_weights(out)[1]["data"] == "random"
    assert cli_main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "a.png")]) == 0
    assert cli_main(["sample", "--n", "4", "--out", str(tmp_path / "b.png")]) == 0
    printed = capsys.readouterr().out
    assert "shipped model small-cifar10" in printed
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0
    assert cli_main(["export", checkpoint, "--out", str(tmp_path / "c.safetensors"), "--info", "novalue"]) == 2
