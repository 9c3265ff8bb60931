"""Parameter containers shared by network layers (``flowpp_ref.nn``) and bijections.

A :class:`Module` owns its parameter arrays in ``self.params`` (name -> array) and
its sub-modules in ``self.children`` (name -> Module). Nothing else is state:
activations needed by a backward pass travel in an explicit *cache* returned by
``forward`` and handed back to ``backward``, and gradients are returned as fresh
dicts, never accumulated on the object.

Naming: :meth:`Module.parameters` flattens the tree into dotted names
(``"block0.attn.proj1.V"``); every ``backward`` returns its parameter gradients as
a flat dict with exactly the same keys (relative to the module it was called on),
so an optimiser can zip ``parameters()`` with the gradients.

Layer protocol (``flowpp_ref.nn``)::

    out, cache = layer.forward(x, ..., train=False, rng=None)
    dx, ..., grads = layer.backward(dout, cache)   # one gradient per array input, then grads
    out = layer.data_init(x, ...)                  # data-dependent init, returns the output

Bijection protocol: see :mod:`flowpp_ref.bijections.base`.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module


class Module:
    def __init__(self):
        self.params: dict = {}
        self.children: dict = {}

    # ----------------------------------------------------------------- tree
    def add(self, name: str, module: "Module") -> "Module":
        if "." in name:
            raise ValueError(f"child name {name!r} must not contain '.'")
        self.children[name] = module
        return module

    def parameters(self) -> dict:
        """Flat dict of every parameter array in this tree, keyed by dotted name."""
        out = dict(self.params)
        for cname, child in self.children.items():
            for k, v in child.parameters().items():
                out[f"{cname}.{k}"] = v
        return out

    def load_parameters(self, flat: dict, strict: bool = True) -> None:
        """Replace parameter arrays by those in ``flat`` (same dotted names, same shapes)."""
        own = self.parameters()
        if strict:
            missing = sorted(set(own) - set(flat))
            extra = sorted(set(flat) - set(own))
            if missing or extra:
                raise KeyError(f"parameter names differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in flat.items():
            if k not in own:
                continue
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"parameter {k}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
            self._set(k, v)

    def _set(self, dotted: str, value) -> None:
        head, _, rest = dotted.partition(".")
        if rest:
            self.children[head]._set(rest, value)
        else:
            if head not in self.params:
                raise KeyError(f"{type(self).__name__} has no parameter {head!r}")
            self.params[head] = value

    def modules(self):
        """This module and every module below it, depth first (parents before children)."""
        yield self
        for child in self.children.values():
            yield from child.modules()

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(v.shape)) for v in self.parameters().values()))

    @property
    def xp(self):
        for v in self.parameters().values():
            return array_module(v)
        return np

    # ----------------------------------------------------------- defaults
    def data_init(self, *args, **kwargs):
        """Data-dependent initialisation; layers without any just run forward."""
        return self.forward(*args, **kwargs)[0]


def prefixed(name: str, grads: dict) -> dict:
    """Prefix the keys of a child's gradient dict with ``name.``."""
    return {f"{name}.{k}": v for k, v in grads.items()}


def add_grads(total: dict, new: dict) -> dict:
    """Sum gradient dicts key by key (for parameters used more than once)."""
    for k, v in new.items():
        total[k] = total[k] + v if k in total else v
    return total
