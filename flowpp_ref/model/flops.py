"""FLOPs of one training step of a Flow++ model, counted from the shapes of its layers.

Counted: the matrix products, which are where the arithmetic is (a multiply-add is 2 FLOPs; P = B H W
pixels at the layer's resolution):

==========================  =========================  ===================================
layer                       forward                    backward
==========================  =========================  ===================================
``Conv2d`` kh x kw, Ci->Co  2 P kh kw Ci Co            2x forward (dx and dW); the context
                                                       network's first conv: dW only
``NIN`` Ci -> Co            2 P Ci Co                  2x forward (dx and dW)
``SelfAttention``, F, T=HW  4 B T^2 F (q k^T, W v)     8 B T^2 F (dW, dv, dq, dk)
``Pointwise`` C x C         2 P C^2                    2x forward (dx and dW)
==========================  =========================  ===================================

Not counted: elementwise work (concat_elu, gates, layer norm, the logistic-mixture CDF and its
derivatives, actnorm, the optimiser), the weight normalisation of the kernels, the fused attention's
recomputation of the weights in its backward (another 2 B T^2 F: model FLOPs, not hardware FLOPs), and
the determinants of the 1x1 convolutions. These are the FLOPs an efficiency figure divides by.

Resolutions: every layer of a coupling's conditioning network runs at the coupling's half shape; the
dequantizer's context network at the image's checkerboard half (H, W/2); a ``Pointwise`` at the shape
of the ``Normalize`` before it.
"""
from __future__ import annotations

from flowpp_ref.bijections.normalize import Normalize
from flowpp_ref.bijections.pointwise import Pointwise
from flowpp_ref.core.module import Module
from flowpp_ref.model.dequantization import ContextNet
from flowpp_ref.model.presets import ModelConfig
from flowpp_ref.nn.attention import SelfAttention
from flowpp_ref.nn.weightnorm import NIN, Conv2d


def _layer_flops(m: Module, hw, batch: int, first_of_context: bool):
    """(kind, forward FLOPs, backward FLOPs) of one layer at resolution ``hw``, else None."""
    P = batch * hw[0] * hw[1]
    if isinstance(m, Conv2d):
        f = 2 * P * m.kernel_size[0] * m.kernel_size[1] * m.in_channels * m.out_channels
        return "conv", f, f if first_of_context else 2 * f
    if isinstance(m, NIN):
        f = 2 * P * m.in_channels * m.out_channels
        return "nin", f, 2 * f
    if isinstance(m, SelfAttention):
        T = hw[0] * hw[1]
        return "attention", 4 * batch * T * T * m.filters, 8 * batch * T * T * m.filters
    if isinstance(m, Pointwise):
        f = sum(2 * P * c * c for c in m.channels)
        return "pointwise", f, 2 * f
    return None


def _walk(m: Module, hw, batch, ctx_hw, out: list, path: str):
    """Depth first, parents before children; ``hw`` is the resolution the children run at."""
    if hasattr(m, "net") and hasattr(m, "shape"):          # a coupling: its network runs at its half shape
        hw = m.shape[:2]
    elif isinstance(m, ContextNet):
        hw = ctx_hw
    elif isinstance(m, Normalize):
        hw = m.shapes[0][:2]
    rec = _layer_flops(m, hw, batch, first_of_context=path.endswith("context.proj"))
    if rec is not None:
        out.append((path, *rec))
    for name, child in m.children.items():
        hw = _walk(child, hw, batch, ctx_hw, out, f"{path}.{name}" if path else name)
    return hw


def layer_flops(model, batch_size: int) -> list:
    """``[(dotted name, kind, forward FLOPs, backward FLOPs), ...]`` for every counted layer of a built
    Flow++ model (``FlowPP``) at ``batch_size`` images."""
    cfg: ModelConfig = model.cfg
    if cfg.family != "flowpp":
        raise ValueError(f"the FLOP counter covers Flow++ models, got family={cfg.family!r}")
    h, w, _ = cfg.image_shape
    out = []
    _walk(model, (h, w), int(batch_size), (h, w // 2), out, "")
    return out


def step_flops(model, batch_size: int) -> dict:
    """FLOPs of one training step (forward and backward) by layer kind and in total:
    ``{"forward", "backward", "total", "by_kind": {kind: total}}``."""
    rows = layer_flops(model, batch_size)
    by_kind: dict = {}
    for _, kind, f, b in rows:
        by_kind[kind] = by_kind.get(kind, 0) + f + b
    fwd = sum(r[2] for r in rows)
    bwd = sum(r[3] for r in rows)
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "by_kind": by_kind, "layers": len(rows)}
