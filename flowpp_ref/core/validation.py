"""Input checks that raise clear errors (shape, dtype, range, non-finite values).

Nothing in flowpp_ref clips bad input silently; these helpers say what was wrong.
A check that needs a value from the device (``isfinite(x).all()``) costs one
host synchronisation on CuPy, so the training loop calls them on its inputs once
per step, not inside every layer.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module, to_numpy


class FlowInputError(ValueError):
    """An array given to a flow or layer has the wrong shape, dtype or values."""


def check_array(x, name: str, *, ndim: int | None = None, floating: bool = True):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise FlowInputError(f"{name}: expected an array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise FlowInputError(f"{name}: expected a {ndim}-d array, got shape {tuple(x.shape)}")
    if floating and not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise FlowInputError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    return x


def check_finite(x, name: str):
    xp = array_module(x)
    if not bool(xp.isfinite(x).all()):
        bad = int(to_numpy((~xp.isfinite(x)).sum()))
        raise FlowInputError(f"{name}: {bad} non-finite value(s) (nan or inf) in an array of shape {tuple(x.shape)}")
    return x


def check_range(x, name: str, lo: float, hi: float, *, hi_inclusive: bool = False):
    xp = array_module(x)
    mn, mx = float(to_numpy(xp.min(x))), float(to_numpy(xp.max(x)))
    ok = mn >= lo and (mx <= hi if hi_inclusive else mx < hi)
    if not ok:
        bracket = "]" if hi_inclusive else ")"
        raise FlowInputError(f"{name}: values must lie in [{lo}, {hi}{bracket}, got min {mn:g}, max {mx:g}")
    return x


def check_same_shape(a, b, name_a: str, name_b: str):
    if tuple(a.shape) != tuple(b.shape):
        raise FlowInputError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def check_pixels(x, name: str, *, image_shape=None, n_bits: int = 8):
    """Images as integer pixels: a host array [N, H, W, C] of an integer dtype with values in
    [0, 2^n_bits - 1]; returns it as uint8 (a view when it is uint8 already).

    Floating-point arrays are refused even when their values are whole numbers (pass
    ``x.astype(np.uint8)`` then): images scaled to [0, 1] or already dequantized would
    otherwise train and report bits/dim that are not a measurement of the data.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    x = to_numpy(x)
    if x.ndim != 4:
        raise FlowInputError(f"{name}: expected images [N, H, W, C], got shape {tuple(x.shape)}")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise FlowInputError(f"{name}: the model takes images of shape {tuple(image_shape)} (H, W, C), "
                             f"got {tuple(x.shape[1:])}")
    if len(x) == 0:
        raise FlowInputError(f"{name}: no images (shape {tuple(x.shape)})")
    top = 2 ** int(n_bits) - 1
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.integer):
        hint = ""
        if np.issubdtype(x.dtype, np.floating) and np.isfinite(x).all() and x.max() <= 1.0:
            hint = " (the values look scaled to [0, 1]: the model needs the original integer pixels)"
        raise FlowInputError(f"{name}: pixels must be integers 0..{top} in an integer array (pass uint8), got "
                             f"dtype {x.dtype}{hint}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > top:
        raise FlowInputError(f"{name}: pixel values must lie in [0, {top}] ({n_bits}-bit), got min {lo}, max {hi}")
    return x if x.dtype == np.uint8 else x.astype(np.uint8)
