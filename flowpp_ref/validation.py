"""Input checks that raise clear errors (shape, dtype, range, non-finite values).

Nothing in flowpp_ref clips bad input silently; these helpers say what was wrong.
A check that needs a value from the device (``isfinite(x).all()``) costs one
host synchronisation on CuPy, so the training loop calls them on its inputs once
per step, not inside every layer.
"""
from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy


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
