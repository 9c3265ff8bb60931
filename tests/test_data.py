"""Data loaders (CIFAR-10 official layout and archive, downsampled ImageNet, the embedded
data set), bit reduction, batching, and the PNG plots."""
import hashlib
import io
import json
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import flowpp_ref
from flowpp_ref.datasets import cifar as data
from flowpp_ref.datasets import default as default_data
from flowpp_ref.datasets import (DataError, iterate_batches, load_cifar10, load_default_dataset, load_imagenet32,
                                 reduce_bits, to_float)
from flowpp_ref.cli.plotting import make_grid, plot_training_curve, save_sample_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ synthetic CIFAR
def _rows(images):
    """NHWC uint8 -> official channel-major rows [N, 3072] (written independently of the loader)."""
    n = len(images)
    rows = np.empty((n, 3072), np.uint8)
    for i in range(n):
        for c in range(3):
            rows[i, c * 1024:(c + 1) * 1024] = images[i, :, :, c].reshape(-1)
    return rows


def _write_batch(path, images, labels, protocol=2):
    d = {b"batch_label": b"synthetic", b"labels": [int(v) for v in labels],
         b"data": _rows(images), b"filenames": [b"x.png"] * len(labels)}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)


def _synthetic_cifar(root, n=6, seed=0):
    """root/cifar-10-batches-py/ with data_batch_1..5 (n images each) and test_batch; returns the truth."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    truth = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=n)
        _write_batch(os.path.join(d, name), x, y)
        truth[name] = (x, y)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES]}, f, protocol=2)
    train = (np.concatenate([truth[f"data_batch_{i}"][0] for i in range(1, 6)]),
             np.concatenate([truth[f"data_batch_{i}"][1] for i in range(1, 6)]))
    return train, truth["test_batch"]


def _make_archive(src_root, archive_path):
    with tarfile.open(archive_path, "w:gz") as tar:
        tar.add(os.path.join(src_root, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    with open(archive_path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _check(loaded, truth):
    x, y = loaded
    assert x.dtype == np.uint8 and x.shape == truth[0].shape and x.shape[1:] == (32, 32, 3)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x, truth[0])
    np.testing.assert_array_equal(y, truth[1])


def test_cifar10_official_directory_layout(tmp_path):
    train, test = _synthetic_cifar(tmp_path)
    _check(load_cifar10(tmp_path, "train"), train)
    _check(load_cifar10(tmp_path, "test"), test)
    # the batches directory itself
    _check(load_cifar10(tmp_path / "cifar-10-batches-py", "test"), test)


def test_cifar10_pixel_layout_is_channel_major(tmp_path):
    # one image whose red plane is the row index, green the column index, blue 7
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, :, :, 0] = np.arange(32)[:, None]
    img[0, :, :, 1] = np.arange(32)[None, :]
    img[0, :, :, 2] = 7
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rows = np.concatenate([np.repeat(np.arange(32), 32), np.tile(np.arange(32), 32),
                           np.full(1024, 7)]).astype(np.uint8)[None]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [3]}, f)
    x, y = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(x, img)
    assert y.tolist() == [3]


def test_cifar10_targz_with_md5_check(tmp_path, monkeypatch):
    src = tmp_path / "src"
    train, test = _synthetic_cifar(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    md5 = _make_archive(src, dst / "cifar-10-python.tar.gz")
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    _check(load_cifar10(dst, "test"), test)
    assert (dst / "cifar-10-batches-py" / "data_batch_5").is_file()  # unpacked next to the archive
    _check(load_cifar10(dst, "train"), train)


def test_cifar10_archive_path_given_directly(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _, test = _synthetic_cifar(src)
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    monkeypatch.setattr(data, "CIFAR10_MD5", _make_archive(src, archive))
    _check(load_cifar10(archive, "test"), test)


def test_cifar10_md5_mismatch_names_both_digests(tmp_path):
    src = tmp_path / "src"
    _synthetic_cifar(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    md5 = _make_archive(src, dst / "cifar-10-python.tar.gz")
    with pytest.raises(DataError) as e:
        load_cifar10(dst, "test")
    assert data.CIFAR10_MD5 in str(e.value) and md5 in str(e.value) and "MD5" in str(e.value)
    assert not (dst / "cifar-10-batches-py").exists()  # nothing unpacked


def test_cifar10_corrupt_archive(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(500))
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="cannot unpack"):
        load_cifar10(tmp_path, "train")


def test_cifar10_missing_says_where_to_put_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg and data.CIFAR10_URL in msg


def test_cifar10_download_without_network_is_clear(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path, "train", download=True, timeout=0.1)
    msg = str(e.value)
    assert data.CIFAR10_URL in msg and "internet" in msg
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert os.listdir(tmp_path) == []  # no partial download left


def test_cifar10_download_with_stand_in_server(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _, test = _synthetic_cifar(src)
    md5 = _make_archive(src, tmp_path / "served.tar.gz")
    payload = (tmp_path / "served.tar.gz").read_bytes()
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    _check(load_cifar10(tmp_path / "root", "test", download=True, timeout=3.0), test)
    assert seen == [(data.CIFAR10_URL, 3.0)]
    assert (tmp_path / "root" / "cifar-10-python.tar.gz").is_file()


def test_cifar10_incomplete_directory(tmp_path, monkeypatch):
    train, _ = _synthetic_cifar(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")
    load_cifar10(tmp_path, "test")  # the test split is still complete
    # with the archive beside it, the missing batches are unpacked again
    src = tmp_path / "src"
    _synthetic_cifar(src)
    os.replace(src / "cifar-10-batches-py" / "data_batch_3", tmp_path / "b3")
    _write_batch(src / "cifar-10-batches-py" / "data_batch_3", train[0][12:18], train[1][12:18])
    monkeypatch.setattr(data, "CIFAR10_MD5", _make_archive(src, tmp_path / "cifar-10-python.tar.gz"))
    x, y = load_cifar10(tmp_path, "train")
    np.testing.assert_array_equal(x[12:18], train[0][12:18])


def test_cifar10_legacy_numpy_module_name(tmp_path):
    # the official (Python 2) pickles name numpy.core.multiarray, numpy >= 2 writes numpy._core
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": rows, b"labels": [4, 5]}, protocol=2)
    (d / "test_batch").write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(x[1, 0, 0], rows[1, [0, 1024, 2048]])
    assert y.tolist() == [4, 5]


@pytest.mark.parametrize("case", ["garbage", "truncated", "float_data", "wrong_width", "label_range",
                                  "missing_key", "not_a_dict", "code_execution"])
def test_cifar10_bad_batch_files(tmp_path, case):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    p = d / "test_batch"
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    if case == "garbage":
        p.write_bytes(b"this is not a pickle")
    elif case == "truncated":
        p.write_bytes(pickle.dumps(good, protocol=2)[:100])
    elif case == "float_data":
        p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}))
    elif case == "wrong_width":
        p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
    elif case == "label_range":
        p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    elif case == "missing_key":
        p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    elif case == "not_a_dict":
        p.write_bytes(pickle.dumps([1, 2, 3]))
    elif case == "code_execution":
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo should-not-run",))
        p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path, "test")
    assert "test_batch" in str(e.value)
    if case == "code_execution":
        assert "refusing" in str(e.value)


def test_cifar10_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "validation")


# ------------------------------------------------------------------- ImageNet
@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_npz(tmp_path, size):
    rng = np.random.default_rng(size)
    x = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    rows = x.transpose(0, 3, 1, 2).reshape(5, -1)
    np.savez(tmp_path / "a.npz", data=rows[:3], labels=np.array([1, 2, 1000]), mean=np.zeros(3))
    np.savez(tmp_path / "b.npz", data=rows[3:], labels=np.array([5, 6]))
    xi, yi = load_imagenet32(tmp_path / "a.npz")
    np.testing.assert_array_equal(xi, x[:3])
    assert yi.dtype == np.int64 and yi.tolist() == [1, 2, 1000]
    xi, yi = load_imagenet32([tmp_path / "a.npz", tmp_path / "b.npz"])
    np.testing.assert_array_equal(xi, x)
    assert xi.shape == (5, size, size, 3) and yi.shape == (5,)


def test_imagenet_bad_files(tmp_path):
    np.savez(tmp_path / "w.npz", data=np.zeros((2, 1000), np.uint8), labels=np.zeros(2, int))
    with pytest.raises(DataError, match="3072"):
        load_imagenet32(tmp_path / "w.npz")
    np.savez(tmp_path / "k.npz", x=np.zeros((2, 3072), np.uint8))
    with pytest.raises(DataError, match="'data' and 'labels'"):
        load_imagenet32(tmp_path / "k.npz")
    np.savez(tmp_path / "f.npz", data=np.zeros((2, 3072), np.float32), labels=np.zeros(2, int))
    with pytest.raises(DataError, match="uint8"):
        load_imagenet32(tmp_path / "f.npz")
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="not a readable"):
        load_imagenet32(tmp_path / "c.npz")
    with pytest.raises(DataError, match="not found"):
        load_imagenet32(tmp_path / "none.npz")
    np.savez(tmp_path / "s64.npz", data=np.zeros((1, 12288), np.uint8), labels=np.zeros(1, int))
    np.savez(tmp_path / "s32.npz", data=np.zeros((1, 3072), np.uint8), labels=np.zeros(1, int))
    with pytest.raises(DataError, match="earlier files"):
        load_imagenet32([tmp_path / "s32.npz", tmp_path / "s64.npz"])


# ------------------------------------------------------- embedded data set
def _neighbour_correlation(x):
    a = x[:, :, :-1].astype(np.float64).ravel()
    b = x[:, :, 1:].astype(np.float64).ravel()
    return np.corrcoef(a, b)[0, 1]


@pytest.mark.parametrize("split,n", [("train", 4000), ("test", 1000)])
def test_default_dataset_shapes_and_images(split, n):
    x, y = load_default_dataset(split)
    assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    assert np.bincount(y, minlength=10).tolist() == [n // 10] * 10  # class-balanced
    std = x.reshape(n, -1).std(axis=1)
    assert std.min() > 2 and np.median(std) > 30          # no constant or blank images
    assert 60 < x.mean() < 200                             # not all black / white
    assert _neighbour_correlation(x) > 0.5                 # natural images, not noise
    noise = np.random.default_rng(0).integers(0, 256, x[:50].shape, dtype=np.uint8)
    assert abs(_neighbour_correlation(noise)) < 0.1        # the statistic can fail
    # returned arrays are copies: editing them does not change the next call
    x[:] = 0
    assert load_default_dataset(split)[0].std() > 30


def test_default_dataset_splits_differ_and_file_small():
    xtr, _ = load_default_dataset("train")
    xte, _ = load_default_dataset("test")
    # no test image is among the training images
    tr = {a.tobytes() for a in xtr}
    assert not any(a.tobytes() in tr for a in xte)
    assert os.path.getsize(default_data.DEFAULT_DATASET_PATH) < 8e6
    with pytest.raises(ValueError, match="split"):
        load_default_dataset("valid")


def test_package_never_reads_shared_dir():
    root = os.path.dirname(flowpp_ref.__file__)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f)) as fh:
                    assert "/work/shared" not in fh.read(), f"{f} refers to /work/shared"


def test_decode_jpeg_batch_bad_input():
    with pytest.raises(DataError, match="offsets"):
        default_data.decode_jpeg_batch(np.zeros(10, np.uint8), np.array([0, 5, 4, 10]))
    with pytest.raises(DataError, match="image 0"):
        default_data.decode_jpeg_batch(np.zeros(10, np.uint8), np.array([0, 10]))


# ---------------------------------------------------------- bits and batches
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5)),
       st.sampled_from([1, 3, 5, 8]))
def test_reduce_bits(x, n_bits):
    r = reduce_bits(x, n_bits)
    assert r.dtype == np.uint8 and r.shape == x.shape
    np.testing.assert_array_equal(r, (x.astype(np.int64) // 2 ** (8 - n_bits)).astype(np.uint8))
    assert r.size == 0 or int(r.max()) < 2 ** n_bits


def test_reduce_bits_values_and_errors():
    x = np.array([0, 7, 8, 31, 32, 127, 128, 255], np.uint8)
    assert reduce_bits(x, 5).tolist() == [0, 0, 1, 3, 4, 15, 16, 31]
    assert reduce_bits(x, 3).tolist() == [0, 0, 0, 0, 1, 3, 4, 7]
    assert reduce_bits(x, 8).tolist() == x.tolist()
    with pytest.raises(ValueError, match="n_bits"):
        reduce_bits(x, 0)
    with pytest.raises(ValueError, match="n_bits"):
        reduce_bits(x, 9)
    with pytest.raises(DataError, match="uint8"):
        reduce_bits(x.astype(np.float32), 5)


def test_iterate_batches_epoch():
    images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
    batches = list(iterate_batches(images, 5, np.random.default_rng(0)))
    assert len(batches) == 4 and all(b.shape == (5, 1, 1, 1) and b.dtype == np.uint8 for b in batches)
    seen = np.concatenate(batches).ravel()
    assert len(set(seen.tolist())) == 20                    # no repeats inside an epoch
    assert seen.tolist() != sorted(seen.tolist())           # shuffled
    again = list(iterate_batches(images, 5, np.random.default_rng(0)))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # same seed, same order
    full = list(iterate_batches(images, 5, np.random.default_rng(1), drop_last=False))
    assert [len(b) for b in full] == [5, 5, 5, 5, 3]
    assert sorted(np.concatenate(full).ravel().tolist()) == list(range(23))
    ordered = list(iterate_batches(images, 10, shuffle=False, drop_last=False))
    assert np.concatenate(ordered).ravel().tolist() == list(range(23))
    with pytest.raises(ValueError, match="rng"):
        next(iterate_batches(images, 5))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(images, 0, np.random.default_rng(0)))


def test_to_float():
    b = np.array([[0, 255], [3, 128]], np.uint8)
    f = to_float(b, np, np.float32)
    assert f.dtype == np.float32 and f.tolist() == [[0.0, 255.0], [3.0, 128.0]]
    assert to_float(b, np, np.float64).dtype == np.float64


def test_to_float_on_backend(xp):
    f = to_float(np.array([1, 2], np.uint8), xp, np.float32)
    assert type(f).__module__.split(".")[0] == xp.__name__ and f.dtype == np.float32


# ---------------------------------------------------------------------- plots
def test_sample_grid_png(tmp_path):
    from PIL import Image
    import matplotlib

    backend_before = matplotlib.get_backend()
    x = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    p = tmp_path / "sub" / "grid.png"
    grid = save_sample_grid(x, p, nrow=4)
    assert p.read_bytes()[:8] == PNG_MAGIC
    with Image.open(p) as im:
        assert im.size == (4 * 34 + 2, 3 * 34 + 2)
        back = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(back, grid)
    np.testing.assert_array_equal(back[2:34, 2:34], x[0])       # first image, top left
    np.testing.assert_array_equal(back[36:68, 2:34], x[4])      # fifth image starts row 2
    assert matplotlib.get_backend() == backend_before            # global backend untouched
    # n_bits stretch and single channel
    g = make_grid(np.array([[[[0], [7]]]], np.uint8), nrow=1, padding=0, n_bits=3)
    assert g[..., 0].tolist() == [[0, 255]]
    with pytest.raises(ValueError, match="uint8"):
        save_sample_grid(x.astype(np.float32), tmp_path / "bad.png")


def test_training_curve_png(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [{"step": s, "train_bpd": 8.0 / (1 + 0.01 * s), "lr": 1e-3} for s in range(1, 200)]
    recs.insert(50, {"step": 51, "skipped": True, "loss": "nan"})
    recs += [{"step": 100, "test_bpd": 5.0}, {"step": 199, "test_bpd": 4.2}]
    log.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = plot_training_curve(log, tmp_path / "curve.png", smooth=10, title="t")
    data_png = open(out, "rb").read()
    assert data_png[:8] == PNG_MAGIC and len(data_png) > 5000
    out2 = plot_training_curve(recs[:10], tmp_path / "curve2.png")
    assert open(out2, "rb").read()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no records"):
        plot_training_curve([{"step": 1}], tmp_path / "x.png")
    log.write_text('{"step": 1, "train_bpd": 3}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        plot_training_curve(log, tmp_path / "y.png")
