"""Data sets of the release's other launchers, and a user's own images (issue 12).

Every loader returns host uint8 images ``[N, H, W, C]`` on the 0..255 scale, like
:mod:`flowpp_ref.data` (so that :func:`flowpp_ref.data.reduce_bits` then gives the
model's ``n_bits`` integers), and raises :class:`flowpp_ref.data.DataError` with the file
and what was wrong.

* :func:`load_imagenet64` -- downsampled ImageNet 64x64 (Chrabaszcz et al. 2017), its
  ``train_data_batch_1..10.npz`` / ``val_data.npz`` files (``data`` uint8 ``[N, 12288]``,
  channel-major rows). The training set is about 15 GB as uint8, so the batch files are
  converted once, batch by batch, into one NHWC ``.npy`` file in ``cache_dir`` (written
  to a temporary name and renamed when complete), which is then **memory-mapped**
  (``np.load(mmap_mode="r")``): a training step reads only its batch from disk.
* :func:`load_celeba_npy` -- CelebA as the release reads it (``flows_celeba/
  flow_training_celeba.py``): one uint8 ``.npy`` array ``[N, 64, 64, 3]`` (or 128) whose
  values are already at ``n_bits`` (``celeba_full_64x64_3bit.npy`` holds 0..7). The file
  is memory-mapped and checked in chunks; the returned array is ``x << (8 - n_bits)``
  (a copy, 0..255 scale), so that ``reduce_bits(., n_bits)`` gives back exactly the
  stored values. The release trains on the whole file (there is no test split); so does
  ``split="train"`` here, and ``split="test"`` gives the last ``test_fraction`` of it.
* :func:`load_image_folder` -- a folder of PNG/JPEG files (decoded with Pillow to RGB),
  all of one size.
* :func:`load_image_array` -- an ``.npy`` (memory-mapped) or ``.npz`` (key ``images``
  or the only array) holding uint8 ``[N, H, W, C]``.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from .data import DataError, chw_rows_to_nhwc

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_CHUNK = 4096                     # rows per pass when checking or converting big arrays


# ------------------------------------------------------------- helpers
def check_images(x, where: str, *, max_value: int = 255):
    """Check uint8 ``[N, H, W, C]`` with C in (1, 3) and values <= max_value (in chunks)."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
        raise DataError(f"{where}: images must have shape [N, H, W, C] with N > 0 and C = 1 or 3, "
                        f"got {tuple(x.shape)}")
    if max_value < 255:
        for i in range(0, len(x), _CHUNK):
            hi = int(x[i:i + _CHUNK].max())
            if hi > max_value:
                raise DataError(f"{where}: values must be at most {max_value}, found {hi} in images "
                                f"{i}..{min(i + _CHUNK, len(x)) - 1}")
    return x


def _split(x, split, test_fraction):
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return x
    n_test = int(round(len(x) * test_fraction))
    if split == "test":
        if n_test == 0:
            raise DataError(f"no test images: {len(x)} images and test_fraction {test_fraction}")
        return x[len(x) - n_test:]
    return x[:len(x) - n_test] if n_test else x


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


# --------------------------------------------------------------- CelebA
def load_celeba_npy(path, n_bits, split="train", *, test_fraction=0.0):
    """CelebA as the release's uint8 ``.npy`` array at ``n_bits`` (see the module docstring).

    Returns uint8 ``[N, H, W, 3]`` on the 0..255 scale (``stored << (8 - n_bits)``).
    """
    path = os.fspath(path)
    if not 1 <= int(n_bits) <= 8:
        raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
    x = _load_npy(path)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{path}: CelebA images must have shape [N, H, W, 3], got {tuple(x.shape)}")
    check_images(x, path, max_value=2 ** int(n_bits) - 1)
    x = _split(x, split, test_fraction)
    return np.left_shift(x, np.uint8(8 - int(n_bits)))


def _load_npy(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e


# --------------------------------------------------------- user's images
def load_image_array(path, split="all", *, key=None, test_fraction=0.0):
    """uint8 ``[N, H, W, C]`` from an ``.npy`` (memory-mapped) or ``.npz`` file."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = z.files
                k = key or ("images" if "images" in files else (files[0] if len(files) == 1 else None))
                if k is None or k not in files:
                    raise DataError(f"{path}: give the array's key (found {files}; 'images' is used when present)")
                x = z[k]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    elif path.endswith(".npy"):
        x = _load_npy(path)
    else:
        raise DataError(f"{path}: expected a .npy or .npz file")
    check_images(x, path)
    return _split(x, split, test_fraction)


def load_image_folder(folder, split="all", *, test_fraction=0.0):
    """All PNG/JPEG files of ``folder`` (sorted by name), as RGB uint8 ``[N, H, W, 3]``."""
    from PIL import Image, UnidentifiedImageError

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    out, size = [], None
    for f in files:
        p = os.path.join(folder, f)
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{p}: unreadable image ({type(e).__name__}: {e})") from e
        if size is None:
            size, first = a.shape, f
        elif a.shape != size:
            raise DataError(f"{folder}: mixed image sizes: {first} is {size[1]}x{size[0]}, {f} is "
                            f"{a.shape[1]}x{a.shape[0]} (resize them to one size first)")
        out.append(a)
    return _split(np.stack(out), split, test_fraction)


def load_user_images(path, split="all", *, test_fraction=0.0):
    """A folder of images, or an .npy/.npz array, whichever ``path`` is."""
    if os.path.isdir(os.fspath(path)):
        return load_image_folder(path, split, test_fraction=test_fraction)
    return load_image_array(path, split, test_fraction=test_fraction)
