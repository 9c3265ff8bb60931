"""Downsampled ImageNet (Chrabaszcz et al., 2017), 32x32 and 64x64.

:func:`load_imagenet32` reads the downsampled-ImageNet ``.npz`` files of
Chrabaszcz et al. (2017), keys ``data`` uint8 ``[N, 3072]`` (32x32) or
``[N, 12288]`` (64x64), channel-major like CIFAR, and ``labels``.


* :func:`load_imagenet64` -- downsampled ImageNet 64x64 (Chrabaszcz et al. 2017), its
  ``train_data_batch_1..10.npz`` / ``val_data.npz`` files (``data`` uint8 ``[N, 12288]``,
  channel-major rows). The training set is about 15 GB as uint8, so the batch files are
  converted once, batch by batch, into one NHWC ``.npy`` file in ``cache_dir`` (written
  to a temporary name and renamed when complete), which is then **memory-mapped**
  (``np.load(mmap_mode="r")``): a training step reads only its batch from disk.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from flowpp_ref.datasets.common import _CHUNK, DataError, check_images, chw_rows_to_nhwc


# -------------------------------------------------------- downsampled ImageNet
def load_imagenet32(path):
    """Load downsampled ImageNet (Chrabaszcz et al. 2017) from one ``.npz`` or a list of them.

    Each file holds ``data`` uint8 ``[N, 3*S*S]`` channel-major rows (S = 32 for 3072
    values, 64 for 12288) and ``labels`` ``[N]``; other keys (``mean``) are ignored.
    Several paths (e.g. ``train_data_batch_1..10.npz``) are concatenated in the order given.

    Returns ``images`` uint8 ``[N, S, S, 3]`` and ``labels`` int64 ``[N]`` as stored
    (the official files number the classes 1..1000).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise DataError("load_imagenet32: no file given")
    images, labels, size = [], [], None
    for p in paths:
        x, y = _read_imagenet_npz(os.fspath(p))
        if size is not None and x.shape[1] != size:
            raise DataError(f"{p}: images are {x.shape[1]}x{x.shape[1]} but earlier files were {size}x{size}")
        size = x.shape[1]
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


_IMAGENET_SIZES = {3 * 32 * 32: 32, 3 * 64 * 64: 64}


def _read_imagenet_npz(p):
    if not os.path.isfile(p):
        raise DataError(f"downsampled ImageNet file {p} not found (get it from https://image-net.org/download-images, "
                        "'Downsampled ImageNet 32x32/64x64', npz format)")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "data" not in z.files or "labels" not in z.files:
                raise DataError(f"{p}: expected keys 'data' and 'labels', found {z.files}")
            data, labels = z["data"], z["labels"]
    except DataError:
        raise
    except Exception as e:  # BadZipFile, ValueError (pickled object arrays), OSError, ...
        raise DataError(f"{p}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if data.dtype != np.uint8:
        raise DataError(f"{p}: 'data' must be uint8, got {data.dtype}")
    if data.ndim != 2 or data.shape[1] not in _IMAGENET_SIZES:
        raise DataError(f"{p}: 'data' must have shape [N, 3072] (32x32) or [N, 12288] (64x64), got {data.shape}")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{p}: 'labels' must be {data.shape[0]} integers, "
                        f"got shape {labels.shape}, dtype {labels.dtype}")
    return chw_rows_to_nhwc(data, _IMAGENET_SIZES[data.shape[1]]), labels.astype(np.int64)


# ------------------------------------------------------ ImageNet 64x64
IMAGENET64_TRAIN = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
IMAGENET64_VAL = ("val_data.npz",)


def _find(root, name):
    hits = sorted(glob.glob(os.path.join(root, "**", name), recursive=True))
    return hits[0] if hits else None


def _npz_rows(path, size):
    try:
        with np.load(path, allow_pickle=False) as z:
            if "data" not in z.files:
                raise DataError(f"{path}: expected a key 'data', found {z.files}")
            d = z["data"]
    except DataError:
        raise
    except Exception as e:  # BadZipFile, OSError, ValueError (object arrays)
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if d.dtype != np.uint8 or d.ndim != 2 or d.shape[1] != 3 * size * size:
        raise DataError(f"{path}: 'data' must be uint8 [N, {3 * size * size}] ({size}x{size} images), "
                        f"got {d.dtype} {tuple(d.shape)}")
    return d


def load_imagenet64(root, split="train", *, cache_dir=None, size=64):
    """Downsampled ImageNet ``size`` x ``size`` from the official npz batch files under ``root``.

    ``split``: "train" (``train_data_batch_1..10.npz``; the files present are used, in
    order, and a missing one in between is an error) or "test" (``val_data.npz``).
    Returns a read-only memory-mapped uint8 ``[N, size, size, 3]`` array (the NHWC
    cache ``imagenet{size}_{split}.npy`` in ``cache_dir``, default ``root``), built on
    the first call.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"ImageNet {size}x{size}: {root} is not a folder")
    cache_dir = root if cache_dir is None else os.fspath(cache_dir)
    cache = os.path.join(cache_dir, f"imagenet{size}_{split}.npy")
    if os.path.isfile(cache):                         # converted before: memory-map it
        return check_images(np.load(cache, mmap_mode="r"), cache)
    names = IMAGENET64_TRAIN if split == "train" else IMAGENET64_VAL
    paths = [_find(root, n) for n in names]
    if paths[0] is None:
        raise DataError(f"ImageNet {size}x{size}: no {names[0]} under {root} (the official 'Downsampled "
                        f"ImageNet {size}x{size}' npz files: {names[0]}" + (" .. train_data_batch_10.npz)"
                                                                              if split == "train" else ")"))
    n_found = next((i for i, p in enumerate(paths) if p is None), len(paths))
    if any(p is not None for p in paths[n_found:]):
        raise DataError(f"ImageNet {size}x{size}: {names[n_found]} is missing but later batch files exist")
    paths = paths[:n_found]
    os.makedirs(cache_dir, exist_ok=True)
    _convert_npz_batches(paths, cache, size)
    x = np.load(cache, mmap_mode="r")
    return check_images(x, cache)


def _convert_npz_batches(paths, cache, size):
    """Write the NHWC uint8 array of all batch files to ``cache`` (via a temporary file)."""
    counts = []
    for p in paths:                                   # first pass: sizes (np.load of an npz is lazy per key)
        counts.append(_npz_rows(p, size).shape[0])
    tmp = cache + ".part"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(sum(counts), size, size, 3))
    i = 0
    for p, n in zip(paths, counts):
        rows = _npz_rows(p, size)
        for j in range(0, n, _CHUNK):
            out[i + j:i + min(j + _CHUNK, n)] = chw_rows_to_nhwc(rows[j:j + _CHUNK], size)
        i += n
    out.flush()
    del out
    os.replace(tmp, cache)
