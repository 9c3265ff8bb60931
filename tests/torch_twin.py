"""A PyTorch autograd twin of a whole flowpp_ref ``FlowPP`` model (tests and benchmarks only).

flowpp_ref never imports torch; this module does, and serves as the outside oracle for the
hand-written gradient of the whole model (``tests/test_torch_twin.py``) and as the "same model
in PyTorch" of ``benchmarks/bench_training.py``.

What it is: :class:`TorchFlowPP` walks a built ``FlowPP`` object (its ``Compose`` lists,
``Inverse`` wrappers, ``Rescale``, ``ImgProc``, splits, ``SpaceToDepth``, ``TupleFlip``,
``Normalize``, ``Pointwise``, ``Sigmoid``, the two coupling layers with their
``ConditioningNetwork``, the dequantizer with its ``ContextNet``) and copies every
parameter into a ``torch.nn.Parameter`` under the same dotted name. Its forward pass is
the same math written as ordinary torch code (weight norm by hand + ``F.conv2d``,
concat_elu, gated resnet with context, layer norm, 4-head attention with ``pos_emb``, the
``proj_out`` head with ``tanh`` and the ``-7`` log-scale clamp, the mixture-of-logistics
CDF coupling in log space, the affine coupling, ``slogdet`` of the 1x1 convolutions), and
autograd differentiates it. Nothing of flowpp_ref's forward or backward code runs; only
the structure (which layer, which hyper-parameters) and the parameter values are read.

Loss (the model's, see ``flowpp_ref.model``)::

    u, log q = dequantizer(x)        variational: eps ~ N(0, I), u = sigmoid(g(eps; ctx(x / 2^n)))
                                     uniform:     u ~ U[0, 1), log q = 0
    z, logdet = flow(x + u)
    L = mean_b[ -(log N(z) + logdet - log q) / (D ln 2) ]

Randomness: the twin takes the same kind of host ``np.random.Generator`` as
``FlowPP.loss(x, rng=...)`` and draws from it at the same points, in the same order, with
the same calls: for the variational dequantizer the context network's dropout masks
(``rng.random(shape) >= p``, train mode and p > 0 only), then
``eps = rng.standard_normal(x.shape, dtype=model.dtype)``, then the flow's dropout masks
block by block; for the uniform one ``u = rng.random(x.shape, dtype=model.dtype)`` and
then the flow's masks. Two generators seeded alike therefore give both sides the same
noise (on the host; a CuPy model draws from a CuPy generator, whose stream differs).
:class:`RecordingRNG` wraps a generator and records every draw, so a test can assert
that the two sides drew identical arrays in identical order.

Usage::

    twin = TorchFlowPP(model, dtype=torch.float64)
    loss = twin.loss(images_uint8, rng=np.random.default_rng(seed), train=True)
    loss.backward()
    grads = twin.grads_numpy()          # {dotted name: ndarray}, the keys of model.parameters()
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as tF

from flowpp_ref.core.backend import to_numpy
from flowpp_ref.bijections import (ChannelSplit, CheckerboardSplit, Compose, ImgProc, Inverse, Normalize, Pointwise,
                                   Sigmoid, SpaceToDepth, TupleFlip)
from flowpp_ref.bijections.coupling import LOGSCALE_MIN, AffineAttnCoupling, MixLogisticAttnCoupling
from flowpp_ref.bijections.elementwise import IMG_LO, IMG_MAX
from flowpp_ref.bijections.rescale import Rescale
from flowpp_ref.model.dequantization import UniformDequantizer, VariationalDequantizer
from flowpp_ref.nn.gated_nin import GatedNIN
from flowpp_ref.nn.weightnorm import Conv2d

LOG_2PI = math.log(2 * math.pi)


# ===================================================================== layers (functional)
def t_weight_norm(V, g):
    """W = g V / ||V||, the norm over every axis but the last (one per output unit)."""
    return g * V / V.pow(2).sum(dim=tuple(range(V.dim() - 1))).sqrt()


def t_conv(x, P, name, layer):
    """Weight-normed conv, TF 'SAME' padding, stride 1, NHWC in and out."""
    kh, kw = layer.kernel_size
    W = t_weight_norm(P[name + ".V"], P[name + ".g"]).permute(3, 2, 0, 1)        # [Cout, Cin, kh, kw]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2                                           # TF: smaller half first
    xc = tF.pad(x.permute(0, 3, 1, 2), (pw, kw - 1 - pw, ph, kh - 1 - ph))
    return tF.conv2d(xc, W, P[name + ".b"]).permute(0, 2, 3, 1)


def t_nin(x, P, name):
    return x @ t_weight_norm(P[name + ".V"], P[name + ".g"]) + P[name + ".b"]


def t_concat_elu(x):
    return tF.elu(torch.cat([x, -x], dim=-1))


def t_gate(h):
    a, b = h.chunk(2, dim=-1)
    return a * torch.sigmoid(b)


def t_layernorm(x, P, name, eps):
    """The paper's _norm over the channels (written out, not F.layer_norm)."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return (x - u) / (s + eps).sqrt() * P[name + ".g"] + P[name + ".b"]


def t_log_normal(z):
    """log N(z; 0, I) per sample."""
    return (-0.5 * (z * z + LOG_2PI)).reshape(z.shape[0], -1).sum(1)


def t_mixlogistic_logs(e, logits, means, logscales):
    """(log F, log(1 - F), log pdf) of the logistic mixture, in log space."""
    logpi = torch.log_softmax(logits, dim=-1)
    z = (e[..., None] - means) * torch.exp(-logscales)
    lsz, lsmz = tF.logsigmoid(z), tF.logsigmoid(-z)
    logF = torch.logsumexp(logpi + lsz, dim=-1)
    log1mF = torch.logsumexp(logpi + lsmz, dim=-1)                 # 1 - F = sum pi sigmoid(-z)
    logpdf = torch.logsumexp(logpi + lsz + lsmz - logscales, dim=-1)
    return logF, log1mF, logpdf


def _per_sample(v):
    return v.reshape(v.shape[0], -1).sum(1)


# ===================================================================== the twin
class TorchFlowPP(torch.nn.Module):
    """The twin of ``model`` (a ``flowpp_ref.model.FlowPP``); see the module docstring.

    ``dtype``: torch.float64 for gradient checks, torch.float32 for timings.
    ``attention``: "explicit" (default: softmax(q k^T / sqrt(d)) v written out) or "sdpa"
    (``torch.nn.functional.scaled_dot_product_attention``, the same math; for benchmarks). The noise is
    drawn in the model's dtype (as the model does) and then cast to ``dtype``.
    ``P``: dict dotted name -> Parameter (the names of ``model.parameters()``).
    """

    def __init__(self, model, dtype=torch.float64, device="cpu", attention="explicit"):
        super().__init__()
        if attention not in ("explicit", "sdpa"):
            raise ValueError(f"attention must be 'explicit' or 'sdpa', got {attention!r}")
        self.attention = attention
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.np_dtype = np.dtype(model.dtype)
        self.levels = int(model.levels)
        self.num_dims = int(model.num_dims)
        names = sorted(model.parameters())
        self._plist = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.tensor(np.array(to_numpy(model.parameters()[k])), dtype=dtype,
                                             device=self.device))
             for k in names])
        self.P = dict(zip(names, self._plist))

    # -------------------------------------------------------------- helpers
    def _tensor(self, a):
        """A host array (or a tensor, e.g. from an RNG that draws with torch on the device) as a tensor of ours."""
        if not isinstance(a, torch.Tensor):
            a = torch.as_tensor(np.asarray(a))
        return a.to(device=self.device, dtype=self.dtype)

    def _dropout(self, x, p, train, rng):
        """The model's inverted dropout: mask = rng.random(x.shape) >= p (drawn on the host)."""
        if not train or p == 0.0:
            return x
        mask = self._tensor(rng.random(tuple(x.shape)) >= p)
        return x * mask / (1.0 - p)

    # -------------------------------------------------------------- network
    def _gated_resnet(self, x, a, name, layer, train, rng):
        c1 = t_conv(t_concat_elu(x), self.P, name + ".c1", layer.c1)
        if a is not None:
            c1 = c1 + t_nin(t_concat_elu(a), self.P, name + ".a_proj")
        r = self._dropout(t_concat_elu(c1), layer.dropout.p, train, rng)
        if isinstance(layer.c2, Conv2d):
            c2 = t_conv(r, self.P, name + ".c2", layer.c2)
        else:
            c2 = t_nin(r, self.P, name + ".c2")
        return x + t_gate(c2)

    def _attention(self, x, pos, name, layer, train, rng):
        B, H, W, F = x.shape
        T, h, d = H * W, layer.heads, layer.dim
        qkv = t_nin(x + pos[None], self.P, name + ".proj1")
        q, k, v = qkv.reshape(B, T, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)      # [B, h, T, d] each
        if self.attention == "sdpa":                                         # PyTorch's fused kernel
            a = tF.scaled_dot_product_attention(q, k, v)                      # (default scale 1/sqrt(d))
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        a = a.permute(0, 2, 1, 3).reshape(B, H, W, F)
        a = self._dropout(a, layer.dropout_p, train, rng)
        return x + t_gate(t_nin(a, self.P, name + ".proj2"))

    def _network(self, c, ctx, name, net, train, rng):
        """ConditioningNetwork: proj_in, blocks of [gated resnet, ln1, attention, ln2], proj_out."""
        h = t_conv(c, self.P, name + ".proj_in", net.proj_in)
        pos = self.P.get(name + ".pos_emb")
        for i, blk in enumerate(net.block_list):
            n = f"{name}.block{i}"
            h = self._gated_resnet(h, ctx, n + ".conv", blk.conv, train, rng)
            h = t_layernorm(h, self.P, n + ".ln1", blk.ln1.eps)
            if blk.use_attention:
                if isinstance(blk.attn, GatedNIN):                             # abl_noattn.py's block
                    h = self._gated_nin(h, pos, n + ".attn", blk.attn, train, rng)
                else:
                    h = self._attention(h, pos, n + ".attn", blk.attn, train, rng)
                h = t_layernorm(h, self.P, n + ".ln2", blk.ln2.eps)
        if getattr(net, "final_concat_elu", False):                            # flows_imagenet/ output conv
            h = t_concat_elu(h)
        return t_conv(h, self.P, name + ".proj_out", net.proj_out)

    def _gated_nin(self, x, pos, name, layer, train, rng):
        """abl_noattn.py: x + gate(proj2(dropout(max over triples of proj1(x + pos))))."""
        B, H, W, F = x.shape
        p = t_nin(x + pos[None], self.P, name + ".proj1").reshape(B, H, W, F, 3)
        m = self._dropout(p.max(dim=-1).values, layer.dropout_p, train, rng)
        return x + t_gate(t_nin(m, self.P, name + ".proj2"))

    def _context(self, xn, name, cnet, train, rng):
        """ContextNet: checkerboard halves of x/2^n concatenated, conv, gated resnets without context."""
        a, b = self._checkerboard_split(xn, cnet.split.bin)
        h = t_conv(torch.cat([a, b], dim=-1), self.P, name + ".proj", cnet.proj)
        for i, r in enumerate(cnet.resnets):
            h = self._gated_resnet(h, None, f"{name}.c{i}", r, train, rng)
            if getattr(cnet, "norms", None) is not None:                       # deep_processor's dqln{i}
                h = t_layernorm(h, self.P, f"{name}.dqln{i}", cnet.norms[i].eps)
        return h

    # -------------------------------------------------------------- couplings
    def _coupling(self, x, ctx, name, layer, train, rng):
        c, e = x
        B, H, W, C = e.shape
        raw = self._network(c, ctx, name + ".net", layer.net, train, rng)
        raw = raw.reshape(B, H, W, C, layer.params_per_channel)
        a, b = torch.tanh(raw[..., 0]), raw[..., 1]
        if isinstance(layer, AffineAttnCoupling):
            return (c, torch.exp(a) * e + b), _per_sample(a)                  # y = exp(a) e + b
        K = layer.components
        logits, means, logscales = torch.split(raw[..., 2:], K, dim=-1)
        logscales = torch.clamp(logscales, min=LOGSCALE_MIN)                  # the paper's max(., -7)
        logF, log1mF, logpdf = t_mixlogistic_logs(e, logits, means, logscales)
        ld = logpdf - logF - log1mF
        y_e = logF - log1mF                                                    # logit F(e)
        if layer.with_affine:
            y_e = torch.exp(a) * y_e + b
            ld = ld + a
        return (c, y_e), _per_sample(ld)

    # -------------------------------------------------------------- permutations
    @staticmethod
    def _checkerboard_split(x, bin_):
        B, H, W, C = x.shape
        xr = x.reshape(B, H, W // 2, 2, C)
        even, odd = xr[:, :, :, 0], xr[:, :, :, 1]
        return (even, odd) if bin_ == 0 else (odd, even)

    @staticmethod
    def _checkerboard_merge(y, bin_):
        a, b = y
        even, odd = (a, b) if bin_ == 0 else (b, a)
        B, H, Wh, C = even.shape
        return torch.stack([even, odd], dim=3).reshape(B, H, 2 * Wh, C)

    @staticmethod
    def _space_to_depth(x, k):
        B, H, W, C = x.shape
        return x.reshape(B, H // k, k, W // k, k, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H // k, W // k, k * k * C)

    @staticmethod
    def _depth_to_space(y, k):
        B, h, w, CC = y.shape
        C = CC // (k * k)
        return y.reshape(B, h, w, k, k, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h * k, w * k, C)

    # -------------------------------------------------------------- bijections
    def flow_forward(self, bij, x, ctx, name, train, rng):
        """(y, logdet) of bijection ``bij`` whose parameters sit under the prefix ``name``."""
        pre = name + "." if name else ""
        if isinstance(bij, Compose):
            logdet = 0.0
            for n, f in zip(bij.names, bij.flows):
                x, ld = self.flow_forward(f, x, ctx, pre + n, train, rng)
                logdet = logdet + ld
            return x, logdet
        if isinstance(bij, Inverse):
            return self.flow_inverse(bij.base, x, ctx, pre + "base")
        if isinstance(bij, Rescale):
            d = int(np.prod(x.shape[1:]))
            return x * bij.factor, d * math.log(bij.factor)
        if isinstance(bij, ImgProc):
            a = 0.9 / IMG_MAX
            s = IMG_LO + a * x
            z = torch.log(s) - torch.log1p(-s)
            return z, _per_sample(math.log(a) - torch.log(s) - torch.log1p(-s))   # log|dz/dx| = log a - log s(1-s)
        if isinstance(bij, Sigmoid):
            return torch.sigmoid(x), _per_sample(tF.logsigmoid(x) + tF.logsigmoid(-x))
        if isinstance(bij, CheckerboardSplit):
            return self._checkerboard_split(x, bij.bin), 0.0
        if isinstance(bij, ChannelSplit):
            return tuple(x.chunk(2, dim=-1)), 0.0
        if isinstance(bij, TupleFlip):
            return (x[1], x[0]), 0.0
        if isinstance(bij, SpaceToDepth):
            return self._space_to_depth(x, bij.block_size), 0.0
        if isinstance(bij, Normalize):
            xs = list(x) if bij.is_tuple else [x]
            out, logdet = [], 0.0
            for i, a in enumerate(xs):
                mn, sn = bij._names(i)
                mu, invstd = self.P[pre + mn], self.P[pre + sn]
                out.append((a - mu) * invstd)
                logdet = logdet + torch.log(invstd.abs()).sum()
            return (tuple(out) if bij.is_tuple else out[0]), logdet
        if isinstance(bij, Pointwise):
            xs = list(x) if bij.is_tuple else [x]
            out, logdet = [], 0.0
            for i, a in enumerate(xs):
                W = self.P[pre + bij._name(i)]
                out.append(a @ W)
                logdet = logdet + a.shape[1] * a.shape[2] * torch.linalg.slogdet(W).logabsdet
            return (tuple(out) if bij.is_tuple else out[0]), logdet
        if isinstance(bij, (MixLogisticAttnCoupling, AffineAttnCoupling)):
            return self._coupling(x, ctx, name, bij, train, rng)
        raise TypeError(f"TorchFlowPP: no twin for bijection {type(bij).__name__} at {name!r}")

    def flow_inverse(self, bij, y, ctx, name):
        """(x, logdet_inv) of the inverse of ``bij`` (the parameter-free maps the flows invert)."""
        if isinstance(bij, CheckerboardSplit):
            return self._checkerboard_merge(y, bij.bin), 0.0
        if isinstance(bij, ChannelSplit):
            return torch.cat(list(y), dim=-1), 0.0
        if isinstance(bij, TupleFlip):
            return (y[1], y[0]), 0.0
        if isinstance(bij, SpaceToDepth):
            return self._depth_to_space(y, bij.block_size), 0.0
        if isinstance(bij, Sigmoid):
            return torch.log(y) - torch.log1p(-y), _per_sample(-torch.log(y) - torch.log1p(-y))
        raise TypeError(f"TorchFlowPP: no twin for the inverse of {type(bij).__name__} at {name!r}")

    # -------------------------------------------------------------- dequantization
    def dequantize(self, x, rng, train):
        """u [B,H,W,C] and log q(u|x) [B] (None for uniform dequantization)."""
        dq = self.model.dequant
        if isinstance(dq, UniformDequantizer):
            return self._tensor(rng.random(tuple(x.shape), dtype=self.np_dtype)), None
        if not isinstance(dq, VariationalDequantizer):
            raise TypeError(f"TorchFlowPP: no twin for dequantizer {type(dq).__name__}")
        ctx = self._context(x / self.levels, "dequant.context", dq.context, train, rng)
        eps = self._tensor(rng.standard_normal(tuple(x.shape), dtype=self.np_dtype))
        u, logdet = self.flow_forward(dq.flow, eps, ctx, "dequant.flow", train, rng)
        return u, t_log_normal(eps) - logdet                 # log q = log N(eps) - log|det du/deps|

    # -------------------------------------------------------------- objective
    def elbo(self, images, *, rng, train=False):
        """Per-sample ELBO (nats), shape [B]."""
        x = self._tensor(np.asarray(images).astype(self.np_dtype))
        u, logq = self.dequantize(x, rng, train)
        z, logdet = self.flow_forward(self.model.flow, x + u, None, "flow", train, rng)
        elbo = t_log_normal(z) + logdet
        return elbo if logq is None else elbo - logq

    def loss(self, images, *, rng, train=False):
        """Mean bits/dim of the batch (a 0-d tensor): -mean(ELBO) / (D ln 2)."""
        return -self.elbo(images, rng=rng, train=train).mean() / (self.num_dims * math.log(2.0))

    forward = loss

    def zero_grad(self, set_to_none=True):
        for p in self._plist:
            p.grad = None

    def grads_numpy(self):
        """{dotted name: gradient as float64 ndarray}; a parameter the loss never reached maps to None."""
        return {k: (None if p.grad is None else p.grad.detach().to(torch.float64).cpu().numpy())
                for k, p in self.P.items()}


class RecordingRNG:
    """Wraps a ``np.random.Generator`` and records every draw ``(method, shape, dtype, array copy)``.

    Passed as ``rng`` to ``FlowPP.loss`` and to ``TorchFlowPP.loss``, it shows which random
    numbers each side drew and in which order (the two lists must be identical).
    """

    def __init__(self, gen):
        self._gen = gen
        self.draws = []

    def __getattr__(self, name):
        fn = getattr(self._gen, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            arr = np.asarray(out)
            self.draws.append((name, tuple(arr.shape), str(arr.dtype), arr.copy()))
            return out
        return call
