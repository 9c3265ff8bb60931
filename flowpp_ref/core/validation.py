"""Input checks that raise clear errors (shape, dtype, range, non-finite values).

Nothing in flowpp_ref clips bad input silently; these helpers say what was wrong.
A check that needs a value from the device (``isfinite(x).all()``) costs one
host synchronisation on CuPy, so the training loop calls them on its inputs once
per step, not inside every layer. :class:`DeferredChecks` gathers the value checks
of one layer (its inputs finite, in range, ...) into one device flag vector read
with one host transfer; only when a flag says invalid does the detailed check run
(and read more) to say what was wrong.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module, is_cupy, to_numpy


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


class DeferredChecks:
    """Value checks of one layer read from the device together: one host read on CuPy.

    ``require(flag, check, what)`` registers a check: ``flag()`` builds a 0-d boolean array (True when
    the values are valid) and ``check()`` is the eager check, which raises the detailed
    :class:`FlowInputError` (``what`` names it should the two ever disagree). ``finite`` and ``range``
    wrap :func:`check_finite` and :func:`check_range` this way.

    * NumPy arrays (``xp`` numpy): each check runs at once, as if called directly (nothing deferred);
    * CuPy arrays: the flags stay on the device until :meth:`run`, which stacks them, with any 0-d
      values the caller needs on the host (``extra``), and reads them in ONE transfer; the first check
      (in registration order) whose flag is False then runs eagerly and raises its message.
    """

    def __init__(self, xp):
        self.xp = xp
        self.deferred = is_cupy(xp)
        self._pending = []

    def require(self, flag, check, what: str):
        if self.deferred:
            self._pending.append((flag(), check, what))
        else:
            check()

    def finite(self, x, name: str):
        xp = self.xp
        self.require(lambda: xp.isfinite(x).all(), lambda: check_finite(x, name), f"{name}: finite values")

    def range(self, x, name: str, lo: float, hi: float, *, hi_inclusive: bool = False):
        xp = self.xp

        def flag():                                                   # compared in float64, as check_range
            mn, mx = xp.min(x).astype(xp.float64), xp.max(x).astype(xp.float64)
            return (mn >= lo) & ((mx <= hi) if hi_inclusive else (mx < hi))
        self.require(flag, lambda: check_range(x, name, lo, hi, hi_inclusive=hi_inclusive), f"{name}: range")

    def run(self, extra=()):
        """Read the pending flags and the 0-d arrays ``extra`` (one host transfer on CuPy); raise the
        first failed check's error. Returns the ``extra`` values as host floats."""
        pending, self._pending = self._pending, []
        if not self.deferred:
            return tuple(float(to_numpy(e)) for e in extra)
        if not pending and not extra:
            return ()
        xp = self.xp
        flat = [f.astype(xp.float64).reshape(1) for f, _, _ in pending]
        flat += [xp.asarray(e).astype(xp.float64).reshape(1) for e in extra]
        vals = to_numpy(xp.concatenate(flat))                         # the one host read
        for ok, (_, check, what) in zip(vals, pending):
            if not ok:
                check()
                raise FlowInputError(f"{what}: the check failed on the device")
        return tuple(float(v) for v in vals[len(pending):])
