"""Masked affine coupling: the coupling layer of RealNVP (Dinh et al. 2017, sec. 3.3-3.4) with the
scale functions of RealNVP, Glow (Kingma & Dhariwal 2018, sec. 3.3) and NICE (additive).

Math (x ``[B, H, W, C]``; a fixed binary mask m ``[H, W, C]``, 1 = kept (conditioning),
0 = transformed; u = 1 - m)::

    h = NN(m * x, context)                      [B, H, W, 2C]   (additive: [B, H, W, C])
    raw, t = h[..., :C], h[..., C:]             (additive: t = h, no raw)
    log s = scale_c * tanh(raw)                 "realnvp": learned per-channel ``scale`` [C]
    log s = log sigmoid(raw + 2)                "glow":    = -softplus(-(raw + 2)), s = sigmoid(raw + 2)
    log s = 0                                   "additive" (NICE): shift only
    y = m * x + u * (x * s + t)
    logdet = sum_{h,w,c} u * log s              per sample, (B,)
    inverse: x = m * y + u * (y - t) * exp(-log s),  with h = NN(m * y) (m * y = m * x);
             logdet_inv = -sum u * log s

Masks (RealNVP sec. 3.4), with ``parity`` in {0, 1} so that consecutive layers alternate::

    "checkerboard":  m[i, j, c] = [(i + j) % 2 == parity]
    "channel":       m[i, j, c] = [c < C/2]  (parity 0),  [c >= C/2]  (parity 1);  C must be even

Backward, with dy = dL/dy and g = dL/dlogdet broadcast over each sample's entries::

    dL/dx|direct = m * dy + u * dy * s          (identity on kept entries; y_t = x s + t)
    dL/dlog s    = u * (dy * x * s + g)         (d(x e^{log s})/dlog s = x s; logdet = sum u log s)
    dL/dt        = u * dy
    realnvp:  dL/draw = dL/dlog s * scale * (1 - tanh(raw)^2);  dL/dscale_c = sum_{b,h,w} dL/dlog s * tanh(raw)
    glow:     dL/draw = dL/dlog s * sigmoid(-(raw + 2))         (d log sigmoid(v)/dv = sigmoid(-v))
    dL/dh = concat(dL/draw, dL/dt);  (dL/d(m x), dL/dcontext, net grads) = NN backward
    dL/dx = dL/dx|direct + m * dL/d(m x)        (the net reads m * x)

Relation to Flow++'s coupling (:mod:`flowpp_ref.bijections.coupling`): Flow++ splits x into two
arrays ``(c, e)`` (``CheckerboardSplit`` / ``ChannelSplit``), runs the network on ``c`` alone (at half
width for the checkerboard) and transforms ``e``; its affine ablation is ``y_e = exp(tanh(raw)) e + b``.
RealNVP keeps full-size tensors and selects with a mask: the network sees ``m * x`` (zeros at the
transformed sites) and produces parameters for every site, of which only the ``u`` entries are used.
The elementwise map is the same, so this module reuses ``affine_coupling_forward/backward/inverse``
of :mod:`flowpp_ref.bijections.coupling_transforms` with ``a = u * log s`` and ``b = u * t``
(``exp(0) x + 0 = x`` on the kept entries; dL/da, dL/db there are multiplied by u).

Compact channel coupling (``compact=True``, channel mask only): the network reads the C/2 kept channels
alone and outputs parameters for the C/2 transformed ones (``[B, H, W, C]`` = raw and shift, or
``[B, H, W, C/2]`` additive), which is how RealNVP's and Glow's releases implement the channel coupling
(split, not mask). The map is the masked one with the network's weights on the always-zero inputs and its
unused outputs removed: ``a = embed(log s)``, ``b = embed(t)`` (zeros on the kept channels), and in the
backward ``dL/dlog s``, ``dL/dt`` are the transformed channels of ``dL/da``, ``dL/db``, and the network's
input gradient is added to the kept channels of ``dL/dx``. The RealNVP ``scale`` then has C/2 entries.

Conditioning network ``net``: any object with ``forward(x_in, context=None, *, train, rng) -> (h, cache)``,
``backward(dh, cache) -> (dx_in, dcontext, grads)`` and ``parameters()``, e.g.
:class:`~flowpp_ref.nn.network.ConditioningNetwork` with ``out_channels = 2C`` (``C`` for additive).
A single layer with the layer protocol ``forward(x, *, train, rng)`` / ``backward(dout, cache) -> (dx,
grads)`` (:class:`~flowpp_ref.nn.weightnorm.Conv2d`, :class:`~flowpp_ref.nn.weightnorm.NIN`) is wrapped
in :class:`LayerNet` automatically (its parameters then read ``net.layer.V`` etc.).

Parameters: ``net.*`` and, for "realnvp", ``scale`` [C] (init 1: log s = tanh(raw) at the start,
as in RealNVP's release, a learned rescaling of tanh).

Cache: ``dict(x=<forward input, reference>, net=<network cache>, transform=<affine_coupling cache>,
dlogs_draw=<d log s / d raw, [B, H, W, C]>, tanh=<tanh(raw), realnvp only>)``.

``inverse_with_cache`` is not implemented (the layer is not differentiated through its inverse).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.bijections.coupling_transforms import (
    affine_coupling_backward,
    affine_coupling_forward,
    affine_coupling_inverse,
)
from flowpp_ref.bijections.elementwise import sigmoid, softplus
from flowpp_ref.core.backend import array_module, asarray
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import DeferredChecks, FlowInputError, check_array
from flowpp_ref.nn.network import ConditioningNetwork
from flowpp_ref.nn.weightnorm import NIN, Conv2d

MASKS = ("checkerboard", "channel")
SCALES = ("realnvp", "glow", "additive")
GLOW_SHIFT = 2.0    # Glow's release: scale = sigmoid(h + 2.)


# ------------------------------------------------------------------ masks
def checkerboard_mask(H: int, W: int, C: int, parity: int = 0):
    """RealNVP's checkerboard mask (host bool array [H, W, C]): ``m[i, j, c] = (i + j) % 2 == parity``."""
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    m = ((i + j) % 2) == int(parity)
    return np.broadcast_to(m[:, :, None], (H, W, C)).copy()


def channel_mask(H: int, W: int, C: int, parity: int = 0):
    """RealNVP's channel mask (host bool array [H, W, C]): first half kept (parity 0) or second (parity 1)."""
    if C % 2 != 0:
        raise FlowInputError(f"channel mask: the channel count must be even to split it in halves, got C = {C}")
    keep = np.arange(C) < C // 2
    if int(parity) == 1:
        keep = ~keep
    return np.broadcast_to(keep, (H, W, C)).copy()


def make_mask(kind: str, shape, parity: int = 0):
    """The mask ``kind`` ("checkerboard" or "channel") of shape (H, W, C) as a host bool array."""
    H, W, C = (int(s) for s in shape)
    if kind == "checkerboard":
        return checkerboard_mask(H, W, C, parity)
    if kind == "channel":
        return channel_mask(H, W, C, parity)
    raise ValueError(f"mask must be one of {MASKS}, got {kind!r}")


# ------------------------------------------------------------------ network adapter
class LayerNet(Module):
    """A single layer (``forward(x, *, train, rng) -> (out, cache)``, ``backward(dout, cache) -> (dx,
    grads)``: Conv2d, NIN) as a conditioning network (context-free): ``forward(x, context=None, *,
    train, rng)``, ``backward(dh, cache) -> (dx, None, grads)``. Child ``layer``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = self.add("layer", layer)
        self.in_channels = getattr(layer, "in_channels", None)
        self.out_channels = getattr(layer, "out_channels", None)

    def forward(self, x, context=None, *, train=False, rng=None):
        if context is not None:
            raise FlowInputError(f"LayerNet({type(self.layer).__name__}) takes no context, but one was given")
        return self.layer.forward(x, train=train, rng=rng)

    def backward(self, dh, cache):
        dx, g = self.layer.backward(dh, cache)
        return dx, None, prefixed("layer", g)

    def data_init(self, x, context=None):
        if context is not None:
            raise FlowInputError(f"LayerNet({type(self.layer).__name__}) takes no context, but one was given")
        return self.layer.data_init(x)

    def __repr__(self):
        return f"LayerNet({type(self.layer).__name__}({self.in_channels} -> {self.out_channels}))"


def as_conditioning_net(net):
    """``net`` itself, or a :class:`LayerNet` around a Conv2d/NIN layer."""
    if isinstance(net, (Conv2d, NIN)):
        return LayerNet(net)
    for attr in ("forward", "backward", "parameters"):
        if not callable(getattr(net, attr, None)):
            raise TypeError(f"net must offer forward(x, context, *, train, rng), backward(dh, cache) and "
                            f"parameters(); {type(net).__name__} has no {attr}()")
    return net


# ------------------------------------------------------------------ the coupling
class MaskedAffineCoupling(Bijection):
    """RealNVP's masked affine coupling; see the module docstring for the math.

    Args:
        shape: (H, W, C) of the input (without the batch axis).
        net: the conditioning network (see the module docstring); its output must have
            ``2C`` channels (``C`` for ``scale="additive"``): ``net_out_channels``.
        mask: "checkerboard" or "channel" (C even).
        parity: 0 or 1; layers with opposite parity transform complementary entries.
        scale: "realnvp" (log s = scale * tanh(raw)), "glow" (s = sigmoid(raw + 2)) or
            "additive" (log s = 0, NICE).
        xp, dtype: where and how the mask and the ``scale`` parameter are stored.

    Shapes: x [B, H, W, C] -> y [B, H, W, C]; logdet (B,).
    """

    def __init__(self, shape, net, mask="checkerboard", parity=0, scale="realnvp", *, compact=False, xp=np,
                 dtype=np.float32):
        super().__init__()
        if not (isinstance(shape, (tuple, list)) and len(shape) == 3):
            raise ValueError(f"shape must be (H, W, C), got {shape!r}")
        H, W, C = (int(s) for s in shape)
        if min(H, W, C) < 1:
            raise ValueError(f"shape must be positive, got {shape!r}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.shape = (H, W, C)
        self.mask_kind, self.parity, self.scale_kind = mask, int(parity), scale
        mb = make_mask(mask, self.shape, parity)                # raises FlowInputError for an odd C
        self.mask = asarray(mb.astype(np.float64), xp, dtype)   # m: 1 = kept, 0 = transformed (not a parameter)
        if compact and mask != "channel":
            raise ValueError("compact=True needs the channel mask (the network reads the kept channels)")
        self.compact = bool(compact)
        half = slice(0, C // 2), slice(C // 2, C)
        self._keep, self._tr = (half if self.parity == 0 else half[::-1]) if self.compact else (None, None)
        self.width = C // 2 if self.compact else C              # the channels the network's heads cover
        self.net_out_channels = self.width if scale == "additive" else 2 * self.width
        self.net = self.add("net", as_conditioning_net(net))
        n_in, n_out = getattr(self.net, "in_channels", None), getattr(self.net, "out_channels", None)
        if n_in is not None and int(n_in) != self.width:
            raise FlowInputError(f"MaskedAffineCoupling: the conditioning network reads {n_in} channels, "
                                 f"but it is given {self.width} (C = {C}, compact={self.compact})")
        if n_out is not None and int(n_out) != self.net_out_channels:
            raise FlowInputError(self._out_msg(f"{n_out} channels"))
        if scale == "realnvp":
            self.params["scale"] = asarray(np.ones(self.width), xp, dtype)

    @classmethod
    def with_network(cls, shape, filters, blocks, mask="checkerboard", parity=0, scale="realnvp", *, rng,
                     compact=False, xp=np, dtype=np.float32, **net_kwargs):
        """A coupling whose net is a :class:`~flowpp_ref.nn.network.ConditioningNetwork` with the right
        output width (``net_kwargs`` go to it, e.g. ``use_attention=False``)."""
        H, W, C = (int(v) for v in shape)
        width = C // 2 if compact else C
        out = width if scale == "additive" else 2 * width
        net = ConditioningNetwork((H, W, width), out, filters, blocks, rng=rng, xp=xp, dtype=dtype, **net_kwargs)
        return cls(shape, net, mask, parity, scale, compact=compact, xp=xp, dtype=dtype)

    # ------------------------------------------------------------- helpers
    def _out_msg(self, got):
        what = "shift" if self.scale_kind == "additive" else "log-scale raw and shift"
        return (f"MaskedAffineCoupling(scale={self.scale_kind!r}): the conditioning network must output "
                f"{self.net_out_channels} channels ({what} for {self.width} transformed channels), got {got}")

    def _check(self, x, name):
        check_array(x, f"MaskedAffineCoupling.{name} input", ndim=4)
        if tuple(x.shape[1:]) != self.shape:
            raise FlowInputError(f"MaskedAffineCoupling.{name}: input has shape {tuple(x.shape)}, expected "
                                 f"[B, {', '.join(map(str, self.shape))}]")

    def _m(self, x):
        return self.mask.astype(x.dtype, copy=False)

    def _net_input(self, x):
        """What the network reads: m * x, or the kept channels (compact)."""
        if self.compact:
            return array_module(x).ascontiguousarray(x[..., self._keep])
        return self._m(x) * x

    def _embed(self, v):
        """[B, H, W, C/2] on the transformed channels -> [B, H, W, C], zeros on the kept ones (compact)."""
        out = array_module(v).zeros((*v.shape[:3], self.shape[2]), dtype=v.dtype)
        out[..., self._tr] = v
        return out

    def _heads(self, x_in, h):
        """h -> (a = u log s, b = u t, d log s / d raw, tanh(raw) or None)."""
        B = x_in.shape[0]
        C = self.width
        if tuple(h.shape) != (B, *self.shape[:2], self.net_out_channels):
            raise FlowInputError(self._out_msg(f"an output of shape {tuple(h.shape)}"))
        xp = array_module(h)
        th = None
        if self.scale_kind == "additive":
            t = h
            logs = xp.zeros_like(t)                              # log s = 0
            dlr = None
        else:
            raw, t = h[..., :C], h[..., C:]
            if self.scale_kind == "realnvp":
                sc = self.params["scale"].astype(h.dtype, copy=False)
                th = xp.tanh(raw)
                logs = sc * th                                   # log s = scale * tanh(raw)
                dlr = sc * (1 - th * th)                         # d log s / d raw = scale (1 - tanh^2)
            else:
                v = raw + GLOW_SHIFT
                logs = -softplus(-v)                             # log sigmoid(v) = -softplus(-v)
                dlr = sigmoid(-v)                                # d log sigmoid(v) / dv = sigmoid(-v)
        if self.compact:
            return self._embed(logs), self._embed(t), dlr, th    # a = embed(log s), b = embed(t)
        u = 1 - self._m(x_in)
        return u * logs, u * t, dlr, th

    def transform_parameters(self, x, context=None):
        """What the network predicts from the kept part of ``x`` (eval mode), masked as the transform uses
        it: ``{"a": u log s, "b": u t}`` [B, H, W, C] (u = 1 - mask: zero on the kept dimensions)."""
        self._check(x, "transform_parameters")
        h, _ = self.net.forward(self._net_input(x), context)
        a, b, _, _ = self._heads(x, h)
        return dict(a=a, b=b)

    # ------------------------------------------------------------- protocol
    def forward(self, x, context=None, *, train=False, rng=None):
        self._check(x, "forward")
        h, ncache = self.net.forward(self._net_input(x), context, train=train, rng=rng)   # NN(m * x)
        a, b, dlr, th = self._heads(x, h)
        y, logdet, tcache = affine_coupling_forward(x, a, b)     # y = exp(u log s) x + u t; logdet = sum u log s
        return y, logdet, {"x": x, "net": ncache, "transform": tcache, "dlogs_draw": dlr, "tanh": th}

    def backward(self, dy, dlogdet, cache):
        x = cache["x"]
        xp = array_module(x)
        gt = affine_coupling_backward(dy, dlogdet, cache["transform"])
        # gt["e"] = dy exp(a): m dy + u dy s;  gt["a"] = dy exp(a) x + g;  gt["b"] = dy
        if self.compact:                                         # the transformed channels of dL/da, dL/db
            def tr(v):
                return v[..., self._tr]
        else:
            m = self._m(x)
            u = 1 - m

            def tr(v):
                return u * v
        dt = tr(gt["b"])                                         # dL/dt = u dy
        grads = {}
        if self.scale_kind == "additive":
            dh = dt
        else:
            dlogs = tr(gt["a"])                                  # dL/dlog s = u (dy x s + g)
            draw = dlogs * cache["dlogs_draw"]                   # chain through the scale function
            dh = xp.concatenate([draw, dt], axis=-1)
            if self.scale_kind == "realnvp":
                # dL/dscale_c = sum_{b,h,w} dL/dlog s * tanh(raw)
                dsc = (dlogs * cache["tanh"]).reshape(-1, self.width).sum(axis=0)
                grads["scale"] = dsc.astype(self.params["scale"].dtype, copy=False)
        dxm, dctx, gnet = self.net.backward(dh, cache["net"])
        if self.compact:                                         # the net read the kept channels
            dx = gt["e"].copy()
            dx[..., self._keep] += dxm
        else:
            dx = gt["e"] + m * dxm                               # identity/scale path + m * NN'(m x)^T dh
        grads.update(prefixed("net", gnet))
        return dx, dctx, grads

    def inverse(self, y, context=None):
        self._check(y, "inverse")
        checks = DeferredChecks(array_module(y))                 # read with the inverse's own checks: one host read
        checks.finite(y, "MaskedAffineCoupling.inverse input")
        h, _ = self.net.forward(self._net_input(y), context)     # m * y = m * x
        a, b, _, _ = self._heads(y, h)
        return affine_coupling_inverse(y, a, b, checks=checks)   # x = (y - u t) exp(-u log s); -sum u log s

    def data_init(self, x, context=None):
        """Data-dependent init of the network on m * x (when it has one); returns y (eval mode)."""
        self._check(x, "data_init")
        if callable(getattr(self.net, "data_init", None)):
            self.net.data_init(self._net_input(x), context)
        return self.forward(x, context)[0]

    def __repr__(self):
        return (f"MaskedAffineCoupling(shape={self.shape}, mask={self.mask_kind!r}, parity={self.parity}, "
                f"scale={self.scale_kind!r}, compact={self.compact}, net={self.net!r})")

