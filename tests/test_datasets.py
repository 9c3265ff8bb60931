"""Loaders of issue 12: downsampled ImageNet 64x64 npz batches, CelebA .npy at n bits, a user's images.

Every test makes its own small files in tmp_path.
"""
import os

import numpy as np
import pytest

from flowpp_ref import datasets
from flowpp_ref.datasets import DataError, reduce_bits


def _imagenet_batch(path, n, size, seed):
    r = np.random.default_rng(seed)
    nhwc = r.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    rows = nhwc.transpose(0, 3, 1, 2).reshape(n, -1)            # channel-major rows, as the official files
    np.savez(path, data=rows, labels=r.integers(1, 1001, size=n), mean=np.zeros(3 * size * size))
    return nhwc


def test_imagenet64_batches_become_one_memory_mapped_array(tmp_path):
    d = tmp_path / "Imagenet64_train_npz"
    d.mkdir()
    parts = [_imagenet_batch(d / f"train_data_batch_{i}.npz", n, 8, i) for i, n in ((1, 5), (2, 3))]
    x = datasets.load_imagenet64(tmp_path, "train", cache_dir=tmp_path / "cache", size=8)
    assert isinstance(x, np.memmap) and x.dtype == np.uint8 and x.shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(x, np.concatenate(parts))
    assert not os.path.exists(tmp_path / "cache" / "imagenet8_train.npy.part")
    # a second call reads the cache (the batch files are no longer needed)
    for f in d.iterdir():
        f.unlink()
    np.testing.assert_array_equal(datasets.load_imagenet64(tmp_path, "train", cache_dir=tmp_path / "cache",
                                                           size=8), np.concatenate(parts))


def test_imagenet64_val_and_errors(tmp_path):
    v = _imagenet_batch(tmp_path / "val_data.npz", 4, 8, 0)
    np.testing.assert_array_equal(datasets.load_imagenet64(tmp_path, "test", size=8), v)
    with pytest.raises(DataError, match="train_data_batch_1.npz"):
        datasets.load_imagenet64(tmp_path, "train", size=8)
    _imagenet_batch(tmp_path / "train_data_batch_1.npz", 2, 8, 1)
    _imagenet_batch(tmp_path / "train_data_batch_3.npz", 2, 8, 3)
    with pytest.raises(DataError, match="train_data_batch_2.npz is missing"):
        datasets.load_imagenet64(tmp_path, "train", size=8)
    (tmp_path / "x").mkdir()
    _imagenet_batch(tmp_path / "x" / "val_data.npz", 2, 4, 0)           # 4x4 rows where 8x8 are expected
    with pytest.raises(DataError, match=r"uint8 \[N, 192\]"):
        datasets.load_imagenet64(tmp_path / "x", "test", size=8)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "val_data.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        datasets.load_imagenet64(tmp_path / "y", "test", size=8)
    with pytest.raises(DataError, match="not a folder"):
        datasets.load_imagenet64(tmp_path / "nope", "test")


def test_celeba_npy_at_three_bits_round_trips_through_reduce_bits(tmp_path):
    r = np.random.default_rng(0)
    stored = r.integers(0, 8, size=(10, 4, 4, 3), dtype=np.uint8)
    p = tmp_path / "celeba_full_64x64_3bit.npy"
    np.save(p, stored)
    x = datasets.load_celeba_npy(p, 3)
    assert x.dtype == np.uint8 and x.max() <= 255
    np.testing.assert_array_equal(reduce_bits(x, 3), stored)
    te = datasets.load_celeba_npy(p, 3, "test", test_fraction=0.2)
    tr = datasets.load_celeba_npy(p, 3, "train", test_fraction=0.2)
    assert len(te) == 2 and len(tr) == 8
    np.testing.assert_array_equal(reduce_bits(np.concatenate([tr, te]), 3), stored)
    with pytest.raises(DataError, match="at most 7, found"):
        np.save(tmp_path / "bad.npy", stored * 2)
        datasets.load_celeba_npy(tmp_path / "bad.npy", 3)
    np.save(tmp_path / "f.npy", stored.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        datasets.load_celeba_npy(tmp_path / "f.npy", 3)
    np.save(tmp_path / "s.npy", stored[..., :2])
    with pytest.raises(DataError, match=r"\[N, H, W, 3\]"):
        datasets.load_celeba_npy(tmp_path / "s.npy", 3)


def test_user_image_folder(tmp_path):
    from PIL import Image
    r = np.random.default_rng(1)
    imgs = r.integers(0, 256, size=(3, 6, 5, 3), dtype=np.uint8)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"im{i}.png")
    Image.fromarray(imgs[0][..., 0]).save(tmp_path / "im3.png")        # greyscale: converted to RGB
    (tmp_path / "notes.txt").write_text("ignored")
    x = datasets.load_user_images(tmp_path)
    assert x.shape == (4, 6, 5, 3)
    np.testing.assert_array_equal(x[:3], imgs)
    np.testing.assert_array_equal(x[3], np.repeat(imgs[0][..., :1], 3, axis=-1))
    Image.fromarray(imgs[0][:4]).save(tmp_path / "small.jpg")
    with pytest.raises(DataError, match="mixed image sizes"):
        datasets.load_image_folder(tmp_path)
    os.remove(tmp_path / "small.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        datasets.load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        datasets.load_image_folder(tmp_path / "empty")


def test_user_image_arrays(tmp_path):
    r = np.random.default_rng(2)
    imgs = r.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", imgs)
    x = datasets.load_user_images(tmp_path / "a.npy")
    assert isinstance(x, np.memmap)
    np.testing.assert_array_equal(x, imgs)
    np.savez(tmp_path / "b.npz", images=imgs, labels=np.arange(5))
    np.testing.assert_array_equal(datasets.load_user_images(tmp_path / "b.npz"), imgs)
    np.savez(tmp_path / "c.npz", x=imgs, y=imgs)
    with pytest.raises(DataError, match="give the array's key"):
        datasets.load_user_images(tmp_path / "c.npz")
    np.save(tmp_path / "d.npy", imgs.astype(np.int16))
    with pytest.raises(DataError, match="uint8"):
        datasets.load_user_images(tmp_path / "d.npy")
    np.save(tmp_path / "e.npy", imgs[0])
    with pytest.raises(DataError, match="shape"):
        datasets.load_user_images(tmp_path / "e.npy")
    (tmp_path / "f.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable .npy"):
        datasets.load_user_images(tmp_path / "f.npy")
    with pytest.raises(DataError, match="expected a .npy or .npz"):
        datasets.load_user_images(tmp_path / "g.txt")


def test_cli_data_choices(tmp_path):
    from flowpp_ref.cli.commands import build_parser, _load_data
    from flowpp_ref.cli.args import UsageError
    r = np.random.default_rng(3)
    np.save(tmp_path / "celeba_full_64x64_5bit.npy", r.integers(0, 32, size=(10, 4, 4, 3), dtype=np.uint8))
    ap = build_parser()
    a = ap.parse_args(["train", "--data", "celeba", "--data-dir", str(tmp_path / "celeba_full_64x64_5bit.npy"),
                       "--test-fraction", "0.3"])
    assert _load_data(a, "train").shape == (7, 4, 4, 3) and _load_data(a, "test").shape == (3, 4, 4, 3)
    a = ap.parse_args(["train", "--data", "images", "--data-dir", str(tmp_path / "missing.npy")])
    assert _load_data(a, "test") is None                                # no held-out part: no test set
    with pytest.raises(UsageError, match="missing.npy: file not found"):
        _load_data(a, "train")
    a = ap.parse_args(["train", "--data", "imagenet64"])
    with pytest.raises(UsageError, match="needs --data-dir"):
        _load_data(a, "train")
    # --data imagenet32 reads the folder's train_data_batch_*.npz / val_data.npz (32x32 rows)
    d = tmp_path / "in32"
    d.mkdir()
    rows = r.integers(0, 256, size=(5, 3 * 32 * 32), dtype=np.uint8)
    np.savez(d / "train_data_batch_1.npz", data=rows, labels=np.arange(1, 6))
    np.savez(d / "val_data.npz", data=rows[:2], labels=np.arange(1, 3))
    a = ap.parse_args(["train", "--data", "imagenet32", "--data-dir", str(d), "--cache-dir", str(tmp_path / "c")])
    tr, te = _load_data(a, "train"), _load_data(a, "test")
    assert tr.shape == (5, 32, 32, 3) and te.shape == (2, 32, 32, 3)
    assert np.array_equal(tr[0, :, :, 0].ravel(), rows[0, :1024])        # channel-major rows -> HWC
    a = ap.parse_args(["train", "--data", "imagenet32", "--data-dir", str(tmp_path / "nowhere")])
    with pytest.raises(UsageError, match="--data imagenet32"):
        _load_data(a, "train")


def test_cli_release_switches_reach_the_config():
    from flowpp_ref.cli.commands import _overrides, build_parser
    a = build_parser().parse_args(["train", "--mixer", "gated-nin", "--mixture-dtype", "float64"])
    assert _overrides(a) == {"mixer": "gated-nin", "mixture_dtype": "float64"}
