"""What every loader shares: the error type, the image checks, pixel depth, batches.

Every loader returns host arrays ``(images, labels)`` (or images alone):

* ``images``: uint8 ``[N, H, W, C]`` (NHWC), pixel values 0..255;
* ``labels``: int64 ``[N]``.

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

import numpy as np

from flowpp_ref.core.backend import DEFAULT_DTYPE, asarray


class DataError(ValueError):
    """A data file is missing, corrupt, or does not hold what the loader expects."""


def chw_rows_to_nhwc(rows, size: int):
    """uint8 rows [N, 3*size*size] in channel-major order (R plane, G plane, B plane) -> [N, size, size, 3]."""
    return np.ascontiguousarray(rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1))


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
