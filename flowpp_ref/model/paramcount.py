"""Parameter counts from shapes alone (no arrays are built), for our model and the release's.

:func:`describe` writes a :class:`~flowpp_ref.model.presets.ModelConfig` in the vocabulary of
:class:`~flowpp_ref.model.release.ReleaseConfig`, with what our implementation always does:
weight normalisation in every conv/dense layer (``V, g, b``: the appendix's choice), no
attention in the dequantizer's context network, and ``pos_emb`` only where attention (or
the gated pointwise block) reads it. :func:`count_parameters` then counts it with
:func:`~flowpp_ref.model.release.release_param_count`; a test checks that the count equals
``FlowPP(cfg).num_parameters()`` on built models.

:func:`explain_difference` walks from the release's description to ours one field at a
time and reports the parameter change of each step: the itemised difference between a
preset and the launcher it comes from.
"""
from __future__ import annotations

import dataclasses

from flowpp_ref.model.presets import ModelConfig
from flowpp_ref.model.release import ReleaseConfig, release_param_count

# fields of ReleaseConfig that say how the graph is built (not the training settings)
ARCH_FIELDS = ("image_shape", "layout", "filters", "blocks", "components", "dequant", "dequant_layout",
               "dequant_filters", "dequant_blocks", "dequant_attention", "dequant_components", "context_channels",
               "context_resnets", "context_layernorm", "context_attention", "pointwise", "final_concat_elu",
               "weight_norm", "affine", "attention", "pointwise_block", "pos_emb_without_attention")


def describe(cfg: ModelConfig) -> ReleaseConfig:
    """Our model for ``cfg`` as a ReleaseConfig (architecture fields only)."""
    cfg.validate()
    attn = cfg.use_attention and cfg.mixer == "attention"
    gnin = cfg.use_attention and cfg.mixer == "gated-nin"
    dq_attn = cfg.use_attention if cfg.dequant_attention is None else cfg.dequant_attention
    return ReleaseConfig(
        name="ours", source="flowpp_ref", image_shape=tuple(cfg.image_shape), n_bits=cfg.n_bits,
        layout=cfg.main_layout(), filters=cfg.filters, blocks=cfg.blocks, components=cfg.components,
        dequant=cfg.dequantization, dequant_layout=(("checker", cfg.dequant_couplings),),
        dequant_filters=cfg.dequant_filters, dequant_blocks=cfg.dequant_blocks,
        dequant_attention=dq_attn, dequant_components=cfg.dequant_components,
        context_channels=cfg.context_channels, context_resnets=cfg.context_resnets,
        context_layernorm=cfg.context_layernorm, context_attention=False, pointwise=cfg.use_pointwise,
        final_concat_elu=cfg.final_concat_elu,
        weight_norm=True, affine=cfg.coupling == "affine", attention=attn if not gnin else False,
        pointwise_block=gnin, pos_emb_without_attention=False)


def count_parameters(cfg: ModelConfig) -> int:
    """``FlowPP(cfg).num_parameters()`` computed from shapes (no arrays)."""
    return release_param_count(describe(cfg))["total"]


def _norm_layout(layout):
    """Merge consecutive steps of one split kind (Inverse(split) then split is the identity)."""
    out = []
    for step in layout:
        if out and step[0] != "s2d" and out[-1][0] == step[0]:
            out[-1] = (step[0], out[-1][1] + step[1])
        else:
            out.append(tuple(step))
    return tuple(out)


def explain_difference(release: ReleaseConfig, cfg: ModelConfig) -> list:
    """``[(field, release value, our value, change in parameters), ...]`` from the release's
    count to ours, one architecture field at a time (in ARCH_FIELDS order)."""
    ours = describe(cfg)
    cur = dataclasses.replace(release, dequant_components=release.dequant_components or release.components)
    steps = []
    before = release_param_count(cur)["total"]
    for f in ARCH_FIELDS:
        a, b = getattr(cur, f), getattr(ours, f)
        if f in ("layout", "dequant_layout"):
            a, b = _norm_layout(a), _norm_layout(b)
        if a == b:
            continue
        cur = dataclasses.replace(cur, **{f: getattr(ours, f)})
        after = release_param_count(cur)["total"]
        steps.append((f, a, b, after - before))
        before = after
    return steps
