"""The conditioning network of the Flow++ coupling layer (paper sec. 3.2.2; appendix 8.4, the template ``f``).

Math (F = filters, pos_emb [H, W, F] shared by every block)::

    h = proj_in(x)                                   conv3x3, C -> F (weight norm)
    repeat ``blocks`` times (child ``block{i}``):
        h = ln1(gated_resnet(h, context))
        h = ln2(attn(h, pos_emb))                    (skipped when use_attention=False)
    out = proj_out(h)                                conv3x3, F -> out_channels, init_scale 0.1
                                                     (final_concat_elu: proj_out(concat_elu(h)), 2F -> out,
                                                     as flows_imagenet/ and flows_celeba/; backward
                                                     dh = concat_elu'(dL/d concat_elu(h)))

Backward runs the blocks in reverse; the pos_emb gradient is the sum of every block's
attention contribution, and the context gradient the sum of every gated resnet's::

    dL/dpos_emb  = sum_blocks dL/dpos_emb|_block
    dL/dcontext  = sum_blocks dL/dcontext|_block

Shapes: x ``[B, H, W, C]``, context ``[B, H, W, Cc]`` -> out ``[B, H, W, out_channels]``.
Cache: the list of sub-layer caches (see GatedResNet, LayerNorm, SelfAttention, Conv2d);
nothing else is kept here.

``use_attention=False`` drops the attention slot: the blocks are gated resnet + layer
norm only, and there is no ``pos_emb`` parameter. ``mixer="gated-nin"`` fills the slot
with the release's no-attention ablation instead (``abl_noattn.py``: a gated pointwise
maxout block with attention's parameter count, :class:`~flowpp_ref.nn.gated_nin.GatedNIN`;
it reads ``pos_emb`` too).
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import asarray
from flowpp_ref.core.module import Module, prefixed
from flowpp_ref.core.validation import FlowInputError, check_array
from flowpp_ref.nn.activations import concat_elu_backward, concat_elu_forward
from flowpp_ref.nn.attention import SelfAttention
from flowpp_ref.nn.gated_nin import GatedNIN
from flowpp_ref.nn.layernorm import LayerNorm
from flowpp_ref.nn.resnet import GatedResNet
from flowpp_ref.nn.weightnorm import Conv2d, _host_rng


class NetworkBlock(Module):
    """One block: ``ln1(gated_resnet(h, context))`` then ``ln2(attn(h, pos_emb))``.

    Children: ``conv`` (GatedResNet), ``ln1``, and with attention ``attn``, ``ln2``.
    ``backward`` returns ``(dh, dpos_emb or None, dcontext or None, grads)``.
    """

    def __init__(self, filters, context_channels=None, use_attention=True, use_nin=True, dropout_p=0.0,
                 heads=4, *, rng, xp=np, dtype=np.float32, mixer="attention"):
        super().__init__()
        kw = dict(xp=xp, dtype=dtype)
        self.conv = self.add("conv", GatedResNet(filters, context_channels, use_nin, dropout_p, rng=rng, **kw))
        self.ln1 = self.add("ln1", LayerNorm(filters, **kw))
        self.use_attention = bool(use_attention)
        if self.use_attention:
            if mixer == "gated-nin":      # abl_noattn.py: the gated pointwise block in attention's slot
                self.attn = self.add("attn", GatedNIN(filters, dropout_p, rng=rng, **kw))
            elif mixer == "attention":
                self.attn = self.add("attn", SelfAttention(filters, heads, dropout_p, rng=rng, **kw))
            else:
                raise ValueError(f"mixer must be 'attention' or 'gated-nin', got {mixer!r}")
            self.ln2 = self.add("ln2", LayerNorm(filters, **kw))

    def forward(self, h, pos_emb, context=None, *, train=False, rng=None):
        h, c_res = self.conv.forward(h, context, train=train, rng=rng)
        h, c_ln1 = self.ln1.forward(h)
        c_att = c_ln2 = None
        if self.use_attention:
            h, c_att = self.attn.forward(h, pos_emb, train=train, rng=rng)
            h, c_ln2 = self.ln2.forward(h)
        return h, (c_res, c_ln1, c_att, c_ln2)

    def backward(self, dh, cache):
        c_res, c_ln1, c_att, c_ln2 = cache
        grads, dpos = {}, None
        if self.use_attention:
            dh, g = self.ln2.backward(dh, c_ln2)
            grads.update(prefixed("ln2", g))
            dh, dpos, g = self.attn.backward(dh, c_att)
            grads.update(prefixed("attn", g))
        dh, g = self.ln1.backward(dh, c_ln1)
        grads.update(prefixed("ln1", g))
        dh, dctx, g = self.conv.backward(dh, c_res)
        grads.update(prefixed("conv", g))
        return dh, dpos, dctx, grads

    def data_init(self, h, pos_emb, context=None):
        h = self.ln1.forward(self.conv.data_init(h, context))[0]
        if self.use_attention:
            h = self.ln2.forward(self.attn.data_init(h, pos_emb))[0]
        return h


class ConditioningNetwork(Module):
    """``NN(c, context)`` of the coupling layer; see the module docstring.

    ``out, cache = net.forward(x, context=None, train=False, rng=None)``;
    ``dx, dcontext, grads = net.backward(dout, cache)`` (dcontext is None without a context);
    ``out = net.data_init(x, context=None)``: the paper's DDI, layer by layer in forward
    order on the init batch (eval mode, no dropout).
    Parameters: ``pos_emb`` [H, W, F] ~ N(0, 0.01^2) (only with attention), children
    ``proj_in``, ``block0`` .. ``block{blocks-1}``, ``proj_out``.
    """

    def __init__(self, in_shape, out_channels, filters, blocks, context_channels=None, use_attention=True,
                 use_nin=True, dropout_p=0.0, init_scale_out=0.1, heads=4, *, rng, xp=np, dtype=np.float32,
                 mixer="attention", final_concat_elu=False):
        super().__init__()
        H, W, C = (int(s) for s in in_shape)
        self.in_shape = (H, W, C)
        self.out_channels, self.filters, self.blocks = int(out_channels), int(filters), int(blocks)
        self.context_channels = None if context_channels is None else int(context_channels)
        self.use_attention = bool(use_attention)
        rng = _host_rng(rng)            # one generator for every child (an int seed would repeat draws)
        kw = dict(rng=rng, xp=xp, dtype=dtype)
        if self.use_attention:
            self.params["pos_emb"] = asarray(rng.normal(0.0, 0.01, size=(H, W, self.filters)), xp, dtype)
        self.proj_in = self.add("proj_in", Conv2d(C, self.filters, 3, **kw))
        self.block_list = [
            self.add(f"block{i}", NetworkBlock(self.filters, self.context_channels, self.use_attention, use_nin,
                                               dropout_p, heads, **kw, mixer=mixer))
            for i in range(self.blocks)]
        # final_concat_elu (flows_imagenet/, flows_celeba/): proj_out reads concat_elu(h), 2F channels
        self.final_concat_elu = bool(final_concat_elu)
        self.proj_out = self.add("proj_out", Conv2d(self.filters * (2 if self.final_concat_elu else 1),
                                                    self.out_channels, 3, init_scale=init_scale_out, **kw))

    def _check(self, x, context):
        check_array(x, "ConditioningNetwork input", ndim=4)
        if tuple(x.shape[1:]) != self.in_shape:
            raise FlowInputError(f"ConditioningNetwork: input has shape {tuple(x.shape)}, expected "
                                 f"[B, {', '.join(map(str, self.in_shape))}]")
        if self.context_channels is None:
            if context is not None:
                raise FlowInputError("ConditioningNetwork was built without a context (context_channels=None) "
                                     "but a context was given")
            return
        if context is None:
            raise FlowInputError(f"ConditioningNetwork was built with context_channels={self.context_channels}: "
                                 "the context is required")
        check_array(context, "ConditioningNetwork context", ndim=4)
        expect = (x.shape[0], *self.in_shape[:2], self.context_channels)
        if tuple(context.shape) != expect:
            raise FlowInputError(f"ConditioningNetwork: context has shape {tuple(context.shape)}, expected {expect}")

    def _pos(self):
        return self.params.get("pos_emb")

    def forward(self, x, context=None, *, train=False, rng=None):
        self._check(x, context)
        h, c_in = self.proj_in.forward(x)
        c_blocks = []
        for blk in self.block_list:
            h, c = blk.forward(h, self._pos(), context, train=train, rng=rng)
            c_blocks.append(c)
        c_ce = None
        if self.final_concat_elu:
            h, c_ce = concat_elu_forward(h)
        out, c_out = self.proj_out.forward(h)
        return out, (c_in, c_blocks, (c_ce, c_out))

    def backward(self, dout, cache):
        c_in, c_blocks, (c_ce, c_out) = cache
        dh, g = self.proj_out.backward(dout, c_out)
        if self.final_concat_elu:
            dh = concat_elu_backward(dh, c_ce)       # dL/dh from dL/dconcat_elu(h)
        grads = prefixed("proj_out", g)
        dpos = dctx = None
        for i in reversed(range(self.blocks)):
            dh, dp, dc, g = self.block_list[i].backward(dh, c_blocks[i])
            grads.update(prefixed(f"block{i}", g))
            dpos = dp if dpos is None else dpos + dp          # pos_emb shared by all blocks
            if dc is not None:
                dctx = dc if dctx is None else dctx + dc      # context fed to every block
        dx, g = self.proj_in.backward(dh, c_in)
        grads.update(prefixed("proj_in", g))
        if self.use_attention:
            grads["pos_emb"] = dpos if dpos is not None else self.xp.zeros_like(self.params["pos_emb"])
        return dx, dctx, grads

    def data_init(self, x, context=None):
        self._check(x, context)
        h = self.proj_in.data_init(x)
        for blk in self.block_list:
            h = blk.data_init(h, self._pos(), context)
        if self.final_concat_elu:
            h = concat_elu_forward(h)[0]
        return self.proj_out.data_init(h)

    def __repr__(self):
        return (f"ConditioningNetwork(in_shape={self.in_shape}, out_channels={self.out_channels}, "
                f"filters={self.filters}, blocks={self.blocks}, context_channels={self.context_channels}, "
                f"use_attention={self.use_attention})")
