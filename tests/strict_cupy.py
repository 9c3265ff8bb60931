"""A strict CuPy look-alike on NumPy for the test suite: the ``strict_xp`` fixture.

The look-alike is a module that poses as ``cupy`` on a machine without a GPU. Its arrays wrap NumPy
arrays and refuse what CuPy refuses, so that the device path of flowpp_ref runs (and is checked) here:

* ``__array__`` raises CuPy's TypeError (an implicit device-to-host conversion); host ``numpy.ndarray``
  operands of ufuncs and functions are refused (``Unsupported type``); ``np.<func>(device array)``
  dispatches only to the functions the look-alike provides (each one a name the real ``cupy`` has);
* every **host round trip** is recorded in the :class:`Ledger` with the first ``flowpp_ref`` file:line
  on the stack: ``float()``, ``int()``, ``bool()``, ``.item()``, ``.tolist()``, ``.get()``,
  ``cupy.asnumpy``, ``repr``/``format``, boolean-mask indexing, ``nonzero``/``unique``, a stream or
  device synchronize. Inside ``with ledger.strict():`` (alias ``no_sync()``) each of them raises
  :class:`HostSyncError` naming the site (and the region raises at its end if the package swallowed one);
* **host-to-device copies** (count, bytes, site): ``asarray``/``array`` of host data, host index arrays,
  host values assigned into device arrays, ``ndarray.set``;
* **launches**: each ufunc, reduction, gather (advanced index, ``take*``), setitem, copy, random draw,
  RawModule/RawKernel launch (``ledger.launches`` counts them by kind);
* ``cupy.RawModule(code=..., options=...)``: the source must be the ``cuda_source()`` of a
  ``flowpp_ref.kernels`` module; that module's ``host_source()`` (the same text for the CPU) is built
  once with g++ (cached in the temp dir under a hash of the source) and every launch is checked against
  the C signature parsed from the CUDA source: block <= 1024 threads, shared memory <= 48 KiB,
  grid x block covers n (the first argument), the argument count, scalars of exactly the C type
  (np.int32 for int, np.int64 for long long, np.float32 / np.float64 for float / double), pointers that
  are device arrays of the C dtype, C-contiguous, and writable where not const;
* ``cupy.random.default_rng(seed)``: a Generator with CuPy's surface (``random``, ``standard_normal``,
  ``integers``; no ``normal``, no ``permutation``). Its numbers are NumPy's, not cuRAND's.

What it cannot see: NVRTC errors, device rounding (FMA, flush-to-zero, TF32), races, memory limits,
NCCL, real times; launch counts stand for the cost of a launch-bound step (5-10 us each on a GPU).

The fixture installs it for one test (``sys.modules["cupy"]``, the ``_cupy``/``HAVE_CUPY`` globals of
flowpp_ref's backend modules, the kernels switched on, the RawModule caches emptied) and restores the
real state afterwards; the ledger is ``strict_xp.ledger``.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types

import numpy as np
import pytest

import flowpp_ref

IMPLICIT_MSG = ("Implicit conversion to a NumPy array is not allowed. "
                "Please use `.get()` to construct a NumPy array explicitly.")
MAX_THREADS_PER_BLOCK = 1024
MAX_SHARED_MEM = 48 * 1024
_PKG_DIR = os.path.dirname(os.path.abspath(flowpp_ref.__file__)) + os.sep


class HostSyncError(RuntimeError):
    """A host round trip (device synchronisation) inside a strict region."""


class LaunchError(RuntimeError):
    """A RawModule/RawKernel launch that CuPy would reject or that would misbehave on a device."""


# ================================================================== ledger
def _sites(depth: int = 1) -> tuple:
    """The innermost ``depth`` flowpp_ref frames on the stack as ``flowpp_ref/path.py:line``, innermost first."""
    out, f = [], sys._getframe(1)
    while f is not None and len(out) < depth:
        fn = f.f_code.co_filename
        if fn.startswith(_PKG_DIR):
            out.append(f"flowpp_ref/{fn[len(_PKG_DIR):]}:{f.f_lineno}")
        f = f.f_back
    return tuple(out) or ("<outside flowpp_ref>",)


def _site() -> str:
    """The innermost flowpp_ref frame on the stack (the first one met walking out from the call)."""
    return _sites(1)[0]


class Ledger:
    """What the device would have done: host round trips, host-to-device copies, launches."""

    def __init__(self):
        self._strict = 0
        self.violations = []
        self.reset()

    def reset(self):
        self.syncs = collections.Counter()          # (what, site) -> count
        self.sync_chains = collections.Counter()    # (what, innermost 4 flowpp_ref frames) -> count
        self.h2d = collections.Counter()            # (what, site) -> count
        self.h2d_bytes = 0
        self.launches = collections.Counter()       # kind -> count
        self.np_dispatch = collections.Counter()    # (np.func, site) -> count

    # ------------------------------------------------------------ totals
    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def n_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def n_h2d(self) -> int:
        return sum(self.h2d.values())

    def totals(self) -> dict:
        return dict(launches=self.n_launches, syncs=self.n_syncs, h2d=self.n_h2d, h2d_bytes=self.h2d_bytes)

    def sync_sites(self) -> collections.Counter:
        """site -> number of host round trips there (all kinds together)."""
        out = collections.Counter()
        for (what, site), n in self.syncs.items():
            out[f"{site} {what}"] += n
        return out

    def report(self, top: int = 12) -> str:
        """Totals, then the host round trips by site (innermost flowpp_ref frame <- its caller)."""
        lines = [f"launches {self.n_launches}, syncs {self.n_syncs}, H2D {self.n_h2d} ({self.h2d_bytes} B)"]
        by = collections.Counter()
        for (what, chain), n in self.sync_chains.items():
            by[f"{' <- '.join(chain[:2])} {what}"] += n
        lines += [f"  {n:5d}  {s}" for s, n in by.most_common(top)]
        return "\n".join(lines)

    # ------------------------------------------------------------ events
    def sync(self, what: str):
        chain = _sites(4)
        site = chain[0]
        self.syncs[(what, site)] += 1
        self.sync_chains[(what, chain)] += 1
        if self._strict:
            msg = f"host round trip inside a strict (no-sync) region: {what} at {' <- '.join(chain)}"
            self.violations.append(msg)
            raise HostSyncError(msg)

    def copy_h2d(self, what: str, nbytes: int):
        self.h2d[(what, _site())] += 1
        self.h2d_bytes += int(nbytes)

    def launch(self, kind: str, n: int = 1):
        self.launches[kind] += n

    @contextlib.contextmanager
    def strict(self):
        """Every host round trip inside raises :class:`HostSyncError`; one the code caught raises at the end."""
        seen = len(self.violations)
        self._strict += 1
        try:
            yield self
        finally:
            self._strict -= 1
        if len(self.violations) > seen:
            raise HostSyncError("host round trip(s) inside a strict region were caught and ignored by the code: "
                                + "; ".join(self.violations[seen:]))

    no_sync = strict


LEDGER = Ledger()


# ================================================================== operand conversion
def _refuse(x):
    raise TypeError(f"Unsupported type {type(x)}")


def _operand(x):
    """A ufunc/kernel operand: device arrays and scalars; host arrays, lists and other objects refused."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, (bool, int, float, complex, np.generic)) or x is None:
        return x
    _refuse(x)


def _out(out):
    """``out=`` of a ufunc or function: device arrays only."""
    if out is None:
        return None
    if isinstance(out, tuple):
        return tuple(_out(o) for o in out)
    if type(out) is not ndarray:
        raise TypeError(f"out must be a cupy.ndarray, got {type(out)}")
    return out._a


def _arg(x):
    """A function argument: device arrays unwrapped (also inside lists/tuples); host arrays refused."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, np.ndarray):
        _refuse(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_arg(v) for v in x)
    return x


def _wrap(r):
    if isinstance(r, np.ndarray):
        return ndarray._from(r)
    if isinstance(r, np.generic):                  # CuPy returns 0-d device arrays, never NumPy scalars
        return ndarray._from(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _index(idx):
    """An index for ``_a[...]``: (key, advanced?). Boolean masks read their count on the host; host index
    arrays are copied to the device (as CuPy does)."""
    parts = idx if isinstance(idx, tuple) else (idx,)
    out, adv = [], False
    for p in parts:
        if type(p) is ndarray:
            if p.dtype.kind == "b" and p.size:
                LEDGER.sync("boolean-mask index (result size read on the host)")
            adv = True
            out.append(p._a)
        elif isinstance(p, (np.ndarray, list)):
            h = np.asarray(p)
            LEDGER.copy_h2d("host index array", h.nbytes)
            if h.dtype.kind == "b" and h.size:
                LEDGER.sync("boolean-mask index (result size read on the host)")
            adv = True
            out.append(h)
        else:
            out.append(p)
    return (tuple(out) if isinstance(idx, tuple) else out[0]), adv


# ================================================================== the device array
class _Flags:
    def __init__(self, a):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[key]


class _Pointer:
    def __init__(self, a):
        self.ptr = int(a.ctypes.data)


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """``cupy.ndarray`` of the look-alike: a NumPy array that only the device may read."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("cupy.ndarray(memptr=/strides=) is not emulated")
        self._a = np.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _from(cls, a):
        obj = object.__new__(cls)
        obj._a = a
        return obj

    # ------------------------------------------------------------ attributes
    shape = property(lambda s: s._a.shape)
    dtype = property(lambda s: s._a.dtype)
    ndim = property(lambda s: s._a.ndim)
    size = property(lambda s: s._a.size)
    nbytes = property(lambda s: s._a.nbytes)
    itemsize = property(lambda s: s._a.itemsize)
    strides = property(lambda s: s._a.strides)
    flags = property(lambda s: _Flags(s._a))
    data = property(lambda s: _Pointer(s._a))
    T = property(lambda s: ndarray._from(s._a.T))
    mT = property(lambda s: ndarray._from(np.swapaxes(s._a, -1, -2)))
    real = property(lambda s: ndarray._from(s._a.real))
    base = property(lambda s: None if s._a.base is None else ndarray._from(s._a.base))

    @property
    def imag(self):
        LEDGER.launch("imag")
        return ndarray._from(np.ascontiguousarray(self._a.imag))

    # ------------------------------------------------------------ NumPy protocols
    def __array__(self, *args, **kwargs):
        raise TypeError(IMPLICIT_MSG)

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        if method not in ("__call__", "reduce", "accumulate", "outer"):
            return NotImplemented
        args = [_operand(v) for v in inputs]
        out = kw.pop("out", None)
        if "where" in kw:
            kw["where"] = _operand(kw["where"])
        LEDGER.launch(ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}")
        with np.errstate(all="ignore"):            # CuPy never warns about nan/inf/overflow
            if out is not None:
                getattr(ufunc, method)(*args, out=_out(out), **kw)
                return out[0] if len(out) == 1 else out
            return _wrap(getattr(ufunc, method)(*args, **kw))

    def __array_function__(self, func, types_, args, kwargs):
        ns = {"numpy": MODULE, "numpy.linalg": MODULE.linalg}.get(func.__module__)
        impl = getattr(ns, func.__name__, None) if ns is not None else None
        LEDGER.np_dispatch[(f"np.{func.__name__}", _site())] += 1
        if impl is None or not callable(impl):
            return NotImplemented                  # NumPy raises TypeError: no implementation found
        return impl(*args, **kwargs)

    # ------------------------------------------------------------ host round trips
    def _scalar(self, what):
        LEDGER.sync(what)
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return self._a.reshape(()).item()

    def __bool__(self):
        return bool(self._scalar("bool()"))

    def __float__(self):
        return float(self._scalar("float()"))

    def __int__(self):
        return int(self._scalar("int()"))

    def __complex__(self):
        return complex(self._scalar("complex()"))

    def __index__(self):
        if self.ndim != 0 or self.dtype.kind not in "iu":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return int(self._scalar("index"))

    def __format__(self, spec):
        LEDGER.sync("format()")
        return format(self._a.item() if self.ndim == 0 else self._a, spec)

    def __repr__(self):
        LEDGER.sync("repr()")
        return repr(self._a)

    def __str__(self):
        LEDGER.sync("str()")
        return str(self._a)

    def __contains__(self, v):
        LEDGER.sync("in")
        return _operand(v) in self._a

    def __reduce__(self):
        LEDGER.sync("pickle")
        return (_unpickle, (self._a.copy(),))

    def item(self, *args):
        LEDGER.sync("item()")
        return self._a.item(*args)

    def tolist(self):
        LEDGER.sync("tolist()")
        return self._a.tolist()

    def get(self, stream=None, order="C", out=None, blocking=True):
        LEDGER.sync(".get()")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        h = np.asarray(arr)
        LEDGER.copy_h2d("ndarray.set", h.nbytes)
        self._a[...] = h

    def nonzero(self):
        LEDGER.sync("nonzero (result size read on the host)")
        LEDGER.launch("nonzero")
        return _wrap(self._a.nonzero())

    # ------------------------------------------------------------ sequence protocol
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (ndarray._from(self._a[i:i + 1].reshape(self._a.shape[1:])) for i in range(self._a.shape[0]))

    def __getitem__(self, idx):
        key, adv = _index(idx)
        r = self._a[key]
        if adv:
            LEDGER.launch("gather")
        if isinstance(r, np.generic):              # an element: a 0-d view on CuPy (no launch)
            r = self._a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
        return ndarray._from(r)

    def __setitem__(self, idx, value):
        key, _ = _index(idx)
        if type(value) is ndarray:
            v = value._a
        elif isinstance(value, (np.ndarray, list, tuple)):
            v = np.asarray(value)
            LEDGER.copy_h2d("host value assigned into a device array", v.nbytes)
        else:
            v = _operand(value)
        LEDGER.launch("setitem")
        self._a[key] = v

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # ------------------------------------------------------------ methods
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        LEDGER.launch("astype")
        with np.errstate(all="ignore"):
            return ndarray._from(self._a.astype(dtype, order=order, casting=casting or "unsafe"))

    def copy(self, order="C"):
        LEDGER.launch("copy")
        return ndarray._from(self._a.copy(order=order))

    def fill(self, value):
        LEDGER.launch("fill")
        self._a.fill(_operand(value))

    def _maybe_view(self, r):
        if not np.may_share_memory(r, self._a):
            LEDGER.launch("copy (reshape of a strided array)")
        return ndarray._from(r)

    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self._maybe_view(self._a.reshape(shape, order=order))

    def ravel(self, order="C"):
        return self._maybe_view(self._a.ravel(order=order))

    def flatten(self, order="C"):
        LEDGER.launch("copy")
        return ndarray._from(self._a.flatten(order=order))

    def transpose(self, *axes):
        return ndarray._from(self._a.transpose(*axes))

    def swapaxes(self, a, b):
        return ndarray._from(self._a.swapaxes(a, b))

    def squeeze(self, axis=None):
        return ndarray._from(self._a.squeeze(axis=axis))

    def view(self, dtype=None):
        return ndarray._from(self._a.view() if dtype is None else self._a.view(dtype))

    def diagonal(self, offset=0, axis1=0, axis2=1):
        return ndarray._from(self._a.diagonal(offset, axis1, axis2))

    def take(self, indices, axis=None, out=None):
        return MODULE.take(self, indices, axis=axis, out=out)

    def clip(self, min=None, max=None, out=None):
        return MODULE.clip(self, min, max, out=out)

    def dot(self, b, out=None):
        return MODULE.dot(self, b, out=out)


def _unpickle(a):
    return ndarray._from(a)


def _reduction_method(name):
    def method(self, *args, **kw):
        out = kw.pop("out", None)
        LEDGER.launch(name)
        with np.errstate(all="ignore"):
            r = getattr(self._a, name)(*[_arg(a) for a in args], **{k: _arg(v) for k, v in kw.items()},
                                       **({} if out is None else {"out": _out(out)}))
        return out if out is not None else _wrap(r)
    method.__name__ = name
    return method


for _name in ("sum", "mean", "var", "std", "max", "min", "prod", "all", "any", "argmax", "argmin", "cumsum",
              "cumprod", "ptp", "trace", "round", "conj", "conjugate", "repeat", "sort", "argsort"):
    setattr(ndarray, _name, _reduction_method(_name))


# ================================================================== module-level functions
def _ufunc(name):
    uf = getattr(np, name)

    def f(*args, out=None, **kw):
        a = [_operand(v) for v in args]
        LEDGER.launch(name)
        with np.errstate(all="ignore"):
            r = uf(*a, **kw, **({} if out is None else {"out": _out(out)}))
        return out if out is not None else _wrap(r)
    f.__name__ = name
    return f


def _function(name, kind="launch", fn=None):
    """A cupy function over device arrays. kind: launch (one launch), view (none), sync (a host read)."""
    npf = fn or getattr(np, name)

    def f(*args, **kw):
        out = kw.pop("out", None)
        a = [_arg(v) for v in args]
        k = {key: _arg(v) for key, v in kw.items()}
        if kind == "sync":
            LEDGER.sync(f"cupy.{name} (result size read on the host)")
        if kind != "view":
            LEDGER.launch(name)
        with np.errstate(all="ignore"):
            r = npf(*a, **k, **({} if out is None else {"out": _out(out)}))
        return out if out is not None else _wrap(r)
    f.__name__ = name
    return f


def _like(name, launches=True):
    """zeros_like & co.: the prototype's shape and dtype only (a host prototype is accepted)."""
    npf = getattr(np, name)

    def f(a, *args, **kw):
        proto = a._a if type(a) is ndarray else a
        if launches:
            LEDGER.launch(name)
        return ndarray._from(npf(proto, *[_operand(v) if type(v) is ndarray else v for v in args], **kw))
    f.__name__ = name
    return f


def _creation(name, launches=True):
    npf = getattr(np, name)

    def f(*args, **kw):
        if launches:
            LEDGER.launch(name)
        return ndarray._from(np.asarray(npf(*[_operand(v) if type(v) is ndarray else v for v in args], **kw)))
    f.__name__ = name
    return f


UFUNCS = ("exp exp2 expm1 log log2 log10 log1p sqrt square abs absolute fabs tanh sinh cosh sin cos tan arctan "
          "arctan2 floor ceil trunc rint sign negative reciprocal isfinite isnan isinf logaddexp logaddexp2 power "
          "add subtract multiply divide true_divide floor_divide mod remainder maximum minimum fmax fmin equal "
          "not_equal less less_equal greater greater_equal logical_and logical_or logical_not logical_xor "
          "bitwise_and bitwise_or bitwise_xor right_shift left_shift invert signbit copysign hypot").split()
FUNCTIONS = ("sum max min amax amin mean var std prod all any argmax argmin cumsum cumprod count_nonzero "
             "matmul tensordot dot vdot inner outer einsum concatenate stack hstack vstack where clip "
             "take_along_axis diag tril triu round around isclose sort argsort searchsorted copy").split()
VIEWS = "broadcast_to reshape ravel transpose swapaxes moveaxis expand_dims squeeze diagonal atleast_1d".split()
SYNCING = "nonzero unique argwhere flatnonzero".split()
LIKE = "zeros_like ones_like full_like".split()
CREATION = "zeros ones full arange eye identity linspace".split()
DTYPES = ("float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool_ intp complex64 "
          "complex128 dtype finfo iinfo promote_types issubdtype isscalar inf nan pi e newaxis").split()


def _where(condition, x=None, y=None):
    if x is None and y is None:
        return MODULE.nonzero(condition)
    LEDGER.launch("where")
    return _wrap(np.where(_operand(condition), _operand(x), _operand(y)))


def take(a, indices, axis=None, out=None):
    if isinstance(indices, (np.ndarray, list)):
        indices = np.asarray(indices)
        LEDGER.copy_h2d("host index array", indices.nbytes)
    elif type(indices) is ndarray:
        indices = indices._a
    LEDGER.launch("take")
    if out is not None:
        np.take(_operand(a), indices, axis=axis, out=_out(out))
        return out
    return _wrap(np.take(_operand(a), indices, axis=axis))


def _dtype_of(a):
    return a.dtype if type(a) is ndarray else a


def result_type(*arrays_and_dtypes):
    return np.result_type(*[_dtype_of(a) for a in arrays_and_dtypes])


def can_cast(from_, to, casting="safe"):
    return np.can_cast(_dtype_of(from_), to, casting)


def _from_host(a, dtype, what):
    if isinstance(a, (list, tuple)) and any(type(v) is ndarray for v in _flatten(a)):
        if not all(type(v) is ndarray for v in _flatten(a)):
            raise TypeError(IMPLICIT_MSG)         # a list mixing device arrays and host values
        LEDGER.launch("stack (list of device arrays)")
        return ndarray._from(np.array(_arg(a), dtype=dtype))
    h = np.array(a, dtype=dtype)
    LEDGER.copy_h2d(what, h.nbytes)
    return ndarray._from(h)


def _flatten(seq):
    for v in seq:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    if type(a) is ndarray:
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return a.astype(dtype)
    return _from_host(a, dtype, "cupy.asarray")


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if type(obj) is ndarray:
        return obj.astype(obj.dtype if dtype is None else dtype, copy=True)
    return _from_host(obj, dtype, "cupy.array")


def ascontiguousarray(a, dtype=None):
    if type(a) is not ndarray:
        return _from_host(np.ascontiguousarray(a), dtype, "cupy.ascontiguousarray")
    if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    LEDGER.launch("ascontiguousarray")
    return ndarray._from(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return MODULE if any(type(a) is ndarray for a in args) else np


def _empty(shape, dtype=float, order="C"):
    return ndarray._from(np.empty(shape, dtype=dtype, order=order))


def _empty_like(a, dtype=None, order="K", subok=None, shape=None):
    proto = a._a if type(a) is ndarray else a
    return ndarray._from(np.empty_like(proto, dtype=dtype, order=order, shape=shape))


# ------------------------------------------------------------------ linalg
def _linalg(name):
    npf = getattr(np.linalg, name)

    def f(*args, **kw):
        LEDGER.launch(f"linalg.{name}")
        with np.errstate(all="ignore"):
            r = npf(*[_operand(v) for v in args], **kw)
        return _wrap(tuple(r) if name == "slogdet" else r)
    f.__name__ = name
    return f


# ------------------------------------------------------------------ random
class Generator:
    """``cupy.random.Generator``'s surface: random, standard_normal, integers (NumPy's numbers)."""

    def __init__(self, bit_generator=None):
        self._g = np.random.default_rng(bit_generator)

    @staticmethod
    def _float_dtype(dtype, what):
        d = np.dtype(dtype)
        if d not in (np.float32, np.float64):
            raise TypeError(f"cupy.random.Generator.{what}: dtype must be float32 or float64, got {d}")
        return d

    def _put(self, r, out, what):
        LEDGER.launch(f"random.{what}")
        if out is not None:
            out._a[...] = r
            return out
        return ndarray._from(np.asarray(r))

    def random(self, size=None, dtype=np.float64, out=None):
        d = self._float_dtype(dtype, "random")
        return self._put(self._g.random(size if out is None else out.shape, dtype=d), out, "random")

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        d = self._float_dtype(dtype, "standard_normal")
        return self._put(self._g.standard_normal(size if out is None else out.shape, dtype=d), out,
                         "standard_normal")

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return self._put(self._g.integers(low, high, size, dtype=dtype, endpoint=endpoint), None, "integers")


def default_rng(seed=None):
    return Generator(seed)


# ------------------------------------------------------------------ cuda
class Stream:
    ptr = 0

    def synchronize(self):
        LEDGER.sync("stream.synchronize()")

    @property
    def done(self):
        return True

    def use(self):
        return self


class Device:
    def __init__(self, device=0):
        self.id = int(device)

    def use(self):
        return None

    def synchronize(self):
        LEDGER.sync("device.synchronize()")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        return None

    def n_free_blocks(self):
        return 0

    def get_limit(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        return None


_STREAM = Stream()
_POOL = MemoryPool()
_PINNED_POOL = MemoryPool()


# ================================================================== RawModule / RawKernel
def _kernels():
    """flowpp_ref.kernels, imported on first use (it loads numba)."""
    return importlib.import_module("flowpp_ref.kernels")


_C_DTYPES = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
             "long long int": np.int64, "long": np.int64, "signed char": np.int8, "char": np.int8,
             "unsigned char": np.uint8, "short": np.int16, "unsigned int": np.uint32,
             "unsigned long long": np.uint64, "bool": np.bool_}
_CTYPES = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32,
           np.int64: ctypes.c_int64, np.int8: ctypes.c_int8, np.uint8: ctypes.c_uint8, np.int16: ctypes.c_int16,
           np.uint32: ctypes.c_uint32, np.uint64: ctypes.c_uint64, np.bool_: ctypes.c_bool}
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_CXX_FLAGS = ("-O2", "-std=c++11", "-shared", "-fPIC")
_BUILD_DIR = os.path.join(tempfile.gettempdir(), "flowpp-strict-cupy")
_lock = threading.Lock()
_sources = {}                 # cuda_source() text -> the flowpp_ref.kernels module that produced it
_libraries = {}               # hash of host_source() -> ctypes library


class _Param:
    def __init__(self, text):
        toks = text.replace("*", " * ").split()
        if len(toks) < 2:
            raise LaunchError(f"cannot parse the kernel parameter {text!r}")
        self.name = toks[-1]
        toks = [t for t in toks[:-1] if t not in ("__restrict__", "__restrict")]
        self.const = "const" in toks
        self.pointer = "*" in toks
        self.ctype = " ".join(t for t in toks if t not in ("const", "*"))
        if self.ctype not in _C_DTYPES:
            raise LaunchError(f"the look-alike does not know the C type {self.ctype!r} (parameter {text!r})")
        self.dtype = np.dtype(_C_DTYPES[self.ctype])

    def __repr__(self):
        return f"{'const ' if self.const else ''}{self.ctype}{'*' if self.pointer else ''} {self.name}"


def parse_kernels(code: str) -> dict:
    """``name -> [_Param]`` of every ``extern "C" __global__`` function of a CUDA source."""
    return {name: [_Param(p) for p in params.split(",") if p.strip()]
            for name, params in _KERNEL_RE.findall(code)}


def _kernel_module_for(code):
    """The flowpp_ref.kernels module whose cuda_source() is ``code``."""
    with _lock:
        if code not in _sources:
            for info in pkgutil.walk_packages(_kernels().__path__, "flowpp_ref.kernels."):
                mod = importlib.import_module(info.name)
                src, host = getattr(mod, "cuda_source", None), getattr(mod, "host_source", None)
                if callable(src) and callable(host):
                    try:
                        _sources.setdefault(src(), mod)
                    except TypeError:      # a cuda_source(...) with arguments (a helper, not a kernel module)
                        continue
    if code not in _sources:
        raise LaunchError("cupy.RawModule: this CUDA source is not the cuda_source() of any flowpp_ref.kernels "
                          "module, so the look-alike has no host build of it")
    return _sources[code]


def _host_library(mod):
    """ctypes library of ``mod.host_source()``, built once (cached under a hash of the source and flags)."""
    src = mod.host_source()
    key = hashlib.sha256((src + " ".join(_CXX_FLAGS)).encode()).hexdigest()[:20]
    with _lock:
        if key in _libraries:
            return _libraries[key]
        cxx = shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            pytest.skip("no C++ compiler (g++/c++) on PATH to build the CUDA kernels' source for the CPU")
        os.makedirs(_BUILD_DIR, exist_ok=True)
        so = os.path.join(_BUILD_DIR, f"{mod.__name__.rsplit('.', 1)[-1]}-{key}.so")
        if not os.path.exists(so):
            fd, cpp = tempfile.mkstemp(suffix=".cpp", dir=_BUILD_DIR)
            with os.fdopen(fd, "w") as f:
                f.write(src)
            tmp_so = cpp[:-4] + ".so"
            r = subprocess.run([cxx, *_CXX_FLAGS, cpp, "-o", tmp_so], capture_output=True, text=True)
            os.unlink(cpp)
            if r.returncode:
                raise LaunchError(f"the host build of {mod.__name__} does not compile:\n{r.stderr}")
            os.replace(tmp_so, so)                 # atomic: concurrent sessions never load a half-written file
        _libraries[key] = ctypes.CDLL(so)
        return _libraries[key]


def _dims(d, what, name):
    t = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    if not 1 <= len(t) <= 3 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in t):
        raise LaunchError(f"{name}: {what} must be 1 to 3 positive integers, got {d!r}")
    return tuple(int(v) for v in t) + (1,) * (3 - len(t))


class RawFunction:
    """One kernel of a RawModule: launches are checked against its C signature, then run on the host."""

    def __init__(self, lib, name, params):
        self.name, self.params = name, params
        self._fn = getattr(lib, name)
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p if p.pointer else _CTYPES[p.dtype.type] for p in params]

    def _check(self, grid, block, args, shared_mem):
        g, b = _dims(grid, "grid", self.name), _dims(block, "block", self.name)
        if b[0] * b[1] * b[2] > MAX_THREADS_PER_BLOCK:
            raise LaunchError(f"{self.name}: block {b} has {b[0] * b[1] * b[2]} threads > {MAX_THREADS_PER_BLOCK}")
        if not 0 <= int(shared_mem) <= MAX_SHARED_MEM:
            raise LaunchError(f"{self.name}: shared memory {shared_mem} B > {MAX_SHARED_MEM} B")
        if not isinstance(args, (tuple, list)):
            raise LaunchError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise LaunchError(f"{self.name}: {len(args)} arguments for the {len(self.params)} parameters "
                              f"{self.params}")
        for i, (a, p) in enumerate(zip(args, self.params)):
            self._check_arg(i, a, p)
        if not self.params[0].pointer:
            n = int(args[0].item() if isinstance(args[0], np.generic) else args[0])
            if g[0] * b[0] < n:
                raise LaunchError(f"{self.name}: grid {g[0]} x block {b[0]} threads do not cover n = {n}")

    def _check_arg(self, i, a, p):
        where = f"{self.name} argument {i} ({p!r})"
        if p.pointer:
            if type(a) is not ndarray:
                raise LaunchError(f"{where}: expected a device array, got {type(a).__name__}")
            if a.dtype != p.dtype:
                raise LaunchError(f"{where}: a {a.dtype} array for a {p.ctype}* ({p.dtype}) pointer")
            if not a._a.flags.c_contiguous:
                raise LaunchError(f"{where}: the array is not C-contiguous (strides {a.strides})")
            if not p.const and not a._a.flags.writeable:
                raise LaunchError(f"{where}: output array is read-only (a broadcast view?)")
        elif type(a) is not p.dtype.type:
            raise LaunchError(f"{where}: a {type(a).__name__} for the C type {p.ctype!r}; pass "
                              f"np.{p.dtype.name}(...) (CuPy passes each scalar with its own width)")

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        self._check(grid, block, args, shared_mem)
        LEDGER.launch(f"kernel:{self.name}")
        conv = [a._a.ctypes.data if p.pointer else a.item() for a, p in zip(args, self.params)]
        self._fn(*conv)


class RawModule:
    """``cupy.RawModule(code=..., options=...)``: the host build of the flowpp_ref kernel module that wrote ``code``."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None or path is not None:
            raise NotImplementedError("the look-alike's RawModule takes code= (a flowpp_ref kernels' cuda_source())")
        if not isinstance(options, tuple) or not all(isinstance(o, str) for o in options):
            raise TypeError(f"RawModule options must be a tuple of str, got {options!r}")
        self.code, self.options = code, options
        self.kernels = parse_kernels(code)
        self.module = _kernel_module_for(code)
        self._lib = _host_library(self.module)
        self._functions = {}

    def get_function(self, name):
        if name not in self.kernels:
            raise LaunchError(f"RawModule of {self.module.__name__}: no __global__ function {name!r} "
                              f"(has {sorted(self.kernels)[:8]}...)")
        if name not in self._functions:
            self._functions[name] = RawFunction(self._lib, name, self.kernels[name])
        return self._functions[name]


class RawKernel(RawFunction):
    """``cupy.RawKernel(code, name, options=...)`` over the same host build as :class:`RawModule`."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, jitify=False):
        m = RawModule(code=code, options=tuple(options))
        if name not in m.kernels:
            raise LaunchError(f"RawKernel: no __global__ function {name!r} in the source")
        super().__init__(m._lib, name, m.kernels[name])


class ElementwiseKernel:
    """flowpp_ref writes no ElementwiseKernel and provides no Python twin of one, so none can run here."""

    def __init__(self, in_params, out_params, operation, name="kernel", *args, **kwargs):
        raise NotImplementedError(
            f"cupy.ElementwiseKernel {name!r}: flowpp_ref provides no Python twin of this kernel, so the strict "
            "look-alike cannot run it; write it as an entry of a flowpp_ref/kernels/cuda module (a RawModule, "
            "whose host_source() the look-alike builds) or as array code")


# ================================================================== the module
def _make_module():
    m = types.ModuleType("cupy", "A strict CuPy look-alike on NumPy (tests/strict_cupy.py).")
    m.__version__ = "14.0.0"
    m.ledger = LEDGER
    m.ndarray = ndarray
    for n in DTYPES:
        setattr(m, n, getattr(np, n))
    for n in UFUNCS:
        setattr(m, n, _ufunc(n))
    for n in FUNCTIONS:
        setattr(m, n, _function(n))
    for n in VIEWS:
        setattr(m, n, _function(n, "view"))
    for n in SYNCING:
        setattr(m, n, _function(n, "sync"))
    for n in LIKE:
        setattr(m, n, _like(n))
    for n in CREATION:
        setattr(m, n, _creation(n))
    m.where, m.take, m.result_type, m.can_cast = _where, take, result_type, can_cast
    m.shape, m.size, m.ndim = (lambda a: tuple(a.shape)), (lambda a, axis=None: a.size if axis is None
                                                           else a.shape[axis]), (lambda a: a.ndim)
    m.empty, m.empty_like = _empty, _empty_like
    m.asarray, m.array, m.ascontiguousarray, m.asnumpy = asarray, array, ascontiguousarray, asnumpy
    m.get_array_module = get_array_module
    m.RawModule, m.RawKernel, m.ElementwiseKernel = RawModule, RawKernel, ElementwiseKernel
    m.linalg = types.ModuleType("cupy.linalg")
    for n in ("slogdet", "inv", "solve", "det", "norm", "qr", "cholesky"):
        setattr(m.linalg, n, _linalg(n))
    m.random = types.ModuleType("cupy.random")
    m.random.Generator, m.random.default_rng = Generator, default_rng
    m.cuda = types.ModuleType("cupy.cuda")
    m.cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    m.cuda.get_current_stream = lambda device=None: _STREAM
    m.cuda.Stream, m.cuda.Device = Stream, Device
    m.cuda.is_available = lambda: True
    m.get_default_memory_pool = lambda: _POOL
    m.get_default_pinned_memory_pool = lambda: _PINNED_POOL
    return m


MODULE = _make_module()


def public_names(module=MODULE, prefix=""):
    """Every public name the look-alike provides (``linalg.inv``, ``random.default_rng``, ...)."""
    out = []
    for k, v in vars(module).items():
        if k.startswith("_") or k == "ledger":
            continue
        if isinstance(v, types.ModuleType):
            out += public_names(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


# ================================================================== installation
_backend_modules = None


def backend_modules():
    """The flowpp_ref modules that hold the backend switch (globals ``_cupy`` and ``HAVE_CUPY``)."""
    global _backend_modules
    if _backend_modules is None:
        found = []
        for info in pkgutil.walk_packages(flowpp_ref.__path__, "flowpp_ref."):
            if info.name.endswith("__main__"):
                continue
            mod = importlib.import_module(info.name)
            if "_cupy" in vars(mod) and "HAVE_CUPY" in vars(mod):
                found.append(mod)
        if not found:
            raise RuntimeError("no flowpp_ref module with the globals _cupy and HAVE_CUPY: the backend switch moved")
        _backend_modules = found
    return _backend_modules


def raw_module_caches():
    """Every ``RawModuleCache`` instance of the flowpp_ref.kernels.cuda modules."""
    build = importlib.import_module("flowpp_ref.kernels.cuda.build")
    out = []
    for info in pkgutil.walk_packages(_kernels().__path__, "flowpp_ref.kernels."):
        mod = importlib.import_module(info.name)
        out += [v for v in vars(mod).values() if isinstance(v, build.RawModuleCache)]
    return out


def install(monkeypatch):
    """Pose as CuPy until ``monkeypatch`` is undone; returns the look-alike module (ledger reset)."""
    LEDGER.reset()
    LEDGER.violations.clear()
    for name in [n for n in sys.modules if n == "cupy" or n.startswith("cupy.")]:
        monkeypatch.delitem(sys.modules, name)        # the real CuPy's submodules stay out of reach
    monkeypatch.setitem(sys.modules, "cupy", MODULE)
    for sub in ("cuda", "random", "linalg"):
        monkeypatch.setitem(sys.modules, f"cupy.{sub}", getattr(MODULE, sub))
    for mod in backend_modules():
        monkeypatch.setattr(mod, "_cupy", MODULE)
        monkeypatch.setattr(mod, "HAVE_CUPY", True)
    for cache in raw_module_caches():                 # compiled modules of the real CuPy (or a former test)
        monkeypatch.setattr(cache, "_module", None)
    monkeypatch.setitem(_kernels()._state, "enabled", True)   # the CUDA kernels, as on a GPU
    return MODULE


@pytest.fixture
def strict_xp(monkeypatch):
    """The strict CuPy look-alike installed for one test; its ledger is ``strict_xp.ledger``."""
    yield install(monkeypatch)
