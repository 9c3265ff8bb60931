"""The bijection protocol, Compose and Inverse.

A bijection maps ``x -> y`` where ``x`` is one array ``[B, H, W, C]`` or, after a
split, a 2-tuple of arrays (``(condition, effect)``). Every bijection offers::

    y, logdet, cache = b.forward(x, context=None, train=False, rng=None)
    x, logdet_inv   = b.inverse(y, context=None)
    dx, dcontext, grads = b.backward(dy, dlogdet, cache)
    y = b.data_init(x, context=None)          # data-dependent init, then forward
    x = b.sample_inverse(y, context=None)     # the inverse map alone, no log-det (sampling)

* ``logdet`` is log|det dy/dx| per sample, shape ``(B,)``; ``logdet_inv`` is that
  of the inverse map (``-logdet`` at the corresponding point).
* ``backward`` takes the upstream gradients ``dy = dL/dy`` (same structure as y)
  and ``dlogdet = dL/dlogdet`` (shape ``(B,)``) and returns ``dL/dx`` (same
  structure as x), ``dL/dcontext`` (``None`` when the bijection ignores the
  context) and the parameter gradients (flat dict, keys of ``parameters()``).
* ``sample_inverse`` is ``inverse(y)[0]`` (the default); a bijection whose inverse log-det costs
  extra work (the mixture-of-logistics coupling: one more mixture evaluation) skips it there.
* ``cache`` holds what backward needs; each class documents it.
* ``train``/``rng`` only matter for bijections with dropout inside; randomness is
  drawn from the ``rng`` passed in and its draws are kept in the cache.

Bijections whose inverse is itself differentiated (``Inverse(CheckerboardSplit())``
in the main flow, ``Inverse(Sigmoid())`` in the coupling) also implement::

    x, logdet_inv, cache = b.inverse_with_cache(y, context=None)
    dy, dcontext, grads = b.inverse_backward(dx, dlogdet_inv, cache)
"""
from __future__ import annotations

from flowpp_ref.core.backend import array_module
from flowpp_ref.core.module import Module, add_grads, prefixed
from flowpp_ref.core.validation import FlowInputError, check_array


def first(x):
    """The first array of x (x itself when it is not a tuple)."""
    return x[0] if isinstance(x, tuple) else x


def batch_size(x) -> int:
    return int(first(x).shape[0])


def zeros_logdet(x):
    a = first(x)
    return array_module(a).zeros((a.shape[0],), dtype=a.dtype)


def as_channel_list(x, channels, is_tuple: bool, name: str):
    """``x`` (one array, or a tuple of ``len(channels)`` arrays when ``is_tuple``) as a list of
    4-d arrays ``[B, H, W, channels[i]]`` with one batch size; :class:`FlowInputError` otherwise."""
    if is_tuple:
        if not isinstance(x, tuple):
            raise FlowInputError(f"{name}: expected a tuple of {len(channels)} arrays [B, H, W, C_i] "
                                 f"with C_i = {channels}, got one array of shape {tuple(getattr(x, 'shape', ()))}")
        if len(x) != len(channels):
            raise FlowInputError(f"{name}: expected a tuple of {len(channels)} arrays, got {len(x)}")
        xs = list(x)
    else:
        if isinstance(x, tuple):
            raise FlowInputError(f"{name}: expected one array [B, H, W, {channels[0]}], got a tuple of "
                                 f"shapes {[tuple(getattr(a, 'shape', ())) for a in x]}")
        xs = [x]
    for i, (a, C) in enumerate(zip(xs, channels)):
        check_array(a, name, ndim=4)
        if a.shape[3] != C:
            raise FlowInputError(f"{name}: element {i} must have {C} channels, got shape {tuple(a.shape)}")
        if a.shape[0] != xs[0].shape[0]:
            raise FlowInputError(f"{name}: batch sizes differ, shapes {[tuple(b.shape) for b in xs]}")
    return xs


def tuple_add(a, b):
    """a + b for arrays or tuples of arrays (None counts as zero)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(tuple_add(u, v) for u, v in zip(a, b))
    return a + b


class Bijection(Module):
    """Base class; see the module docstring for the protocol."""

    def forward(self, x, context=None, *, train=False, rng=None):
        raise NotImplementedError

    def inverse(self, y, context=None):
        raise NotImplementedError

    def backward(self, dy, dlogdet, cache):
        raise NotImplementedError

    def inverse_with_cache(self, y, context=None):
        raise NotImplementedError(
            f"{type(self).__name__} does not differentiate through its inverse; "
            "it cannot be wrapped in Inverse() inside a trained flow")

    def inverse_backward(self, dx, dlogdet, cache):
        raise NotImplementedError(
            f"{type(self).__name__} does not differentiate through its inverse")

    def data_init(self, x, context=None):
        return self.forward(x, context)[0]

    def sample_inverse(self, y, context=None):
        """x = inverse(y) without log|det| (what sampling needs)."""
        return self.inverse(y, context)[0]

    def __repr__(self):
        return f"{type(self).__name__}()"


class Compose(Bijection):
    """Apply bijections in order; log-dets add up, backward runs in reverse order.

    Cache: the list of the sub-bijections' caches.
    """

    def __init__(self, flows, names=None):
        super().__init__()
        self.flows = list(flows)
        names = names or [f"{i}_{type(f).__name__}" for i, f in enumerate(self.flows)]
        for n, f in zip(names, self.flows):
            self.add(n, f)
        self.names = list(names)

    def forward(self, x, context=None, *, train=False, rng=None):
        logdet = zeros_logdet(x)
        caches = []
        for f in self.flows:
            x, ld, c = f.forward(x, context, train=train, rng=rng)
            logdet = logdet + ld
            caches.append(c)
        return x, logdet, caches

    def inverse(self, y, context=None):
        logdet = zeros_logdet(y)
        for f in reversed(self.flows):
            y, ld = f.inverse(y, context)
            logdet = logdet + ld
        return y, logdet

    def sample_inverse(self, y, context=None):
        for f in reversed(self.flows):
            y = f.sample_inverse(y, context)
        return y

    def backward(self, dy, dlogdet, caches):
        # logdet = sum_i logdet_i, so every layer receives the same dL/dlogdet.
        grads, dcontext = {}, None
        for name, f, c in reversed(list(zip(self.names, self.flows, caches))):
            dy, dctx, g = f.backward(dy, dlogdet, c)
            dcontext = tuple_add(dcontext, dctx)
            grads.update(prefixed(name, g))
        return dy, dcontext, grads

    def inverse_with_cache(self, y, context=None):
        logdet = zeros_logdet(y)
        caches = []
        for f in reversed(self.flows):
            y, ld, c = f.inverse_with_cache(y, context)
            logdet = logdet + ld
            caches.append(c)
        return y, logdet, caches

    def inverse_backward(self, dx, dlogdet, caches):
        grads, dcontext = {}, None
        for name, f, c in zip(self.names, self.flows, reversed(caches)):
            dx, dctx, g = f.inverse_backward(dx, dlogdet, c)
            dcontext = tuple_add(dcontext, dctx)
            grads = add_grads(grads, prefixed(name, g))
        return dx, dcontext, grads

    def data_init(self, x, context=None):
        for f in self.flows:
            x = f.data_init(x, context)
        return x

    def __repr__(self):
        inner = ",\n  ".join(repr(f) for f in self.flows)
        return f"Compose([\n  {inner}\n])"


class Inverse(Bijection):
    """The inverse of a bijection as a bijection: forward <-> inverse swapped.

    Its backward is the wrapped bijection's ``inverse_backward``.
    """

    def __init__(self, base: Bijection):
        super().__init__()
        self.base = self.add("base", base)

    def forward(self, x, context=None, *, train=False, rng=None):
        return self.base.inverse_with_cache(x, context)

    def inverse(self, y, context=None):
        y, ld, _ = self.base.forward(y, context)
        return y, ld

    def backward(self, dy, dlogdet, cache):
        dx, dctx, g = self.base.inverse_backward(dy, dlogdet, cache)
        return dx, dctx, prefixed("base", g)

    def inverse_with_cache(self, y, context=None):
        return self.base.forward(y, context)

    def inverse_backward(self, dx, dlogdet, cache):
        dy, dctx, g = self.base.backward(dx, dlogdet, cache)
        return dy, dctx, prefixed("base", g)

    def data_init(self, x, context=None):
        return self.forward(x, context)[0]

    def __repr__(self):
        return f"Inverse({self.base!r})"
