"""CIFAR-10 in its official python layout.

:func:`load_cifar10` reads the official python layout (``cifar-10-batches-py/``,
pickled dicts with ``b'data'`` uint8 ``[N, 3072]`` channel-major rows and
``b'labels'``) or the official ``cifar-10-python.tar.gz`` (MD5-checked before it is
unpacked). The pickles are read with a restricted unpickler that only builds NumPy
arrays, lists, dicts, strings and numbers, so a crafted file cannot run code.
With ``download=True`` it tries the official URL once; this has to be allowed
by the network of the machine, and when it is not the error says where to put the
files by hand.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np

from flowpp_ref.datasets.common import DataError, chw_rows_to_nhwc

# --------------------------------------------------------------------- constants
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


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
