"""CelebA as the release reads it, and a user's own images (a folder, an array file).

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

import os

import numpy as np

from flowpp_ref.datasets.common import DataError, _split, check_images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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
