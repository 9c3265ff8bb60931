"""The authors' released configurations (repository ``aravindsrinivas/flowpp``), as data.

Every launcher of the release is described here by its settings: the architecture
(stage layout, widths, depths, mixture components, the dequantizer and its context
network), the training settings (learning-rate schedule, batch, EMA decay, dropout,
gradient clip, number of MPI processes) and the figures its docstring states
(parameter count). The descriptions were read from the release's files and are
translated, not copied; each entry names its file.

:func:`release_param_count` counts the parameters of the *release's* graph from
shapes alone (no arrays are built). It reproduces the figure that every launcher's
docstring states (a test checks each), which is how we know that the reading of the
architecture below is right. :func:`flowpp_ref.model.paramcount.count_parameters` counts
*our* model for a :class:`~flowpp_ref.model.presets.ModelConfig` the same way, and the
presets' docstrings say where and why the two differ.

What the release's variable creation implies for a parameter count (all files):

* ``conv2d``/``dense``: ``W`` and ``b``; with weight normalisation (only
  ``imagenet32_official.py``) ``V``, ``g`` and ``b`` -- one more per output unit.
* ``Norm`` (actnorm): ``g``, ``b`` of the shape of each half, ``[H, W, C]``.
* ``Pointwise`` (only ``flows/``, CIFAR-10): a ``C x C`` matrix per half.
* layer norm: ``g``, ``b`` per channel.
* coupling (``flows_imagenet``/``flows_celeba``): ``pos_emb`` [H, W, F] is created
  even by ``MixLogisticCoupling``, which has no attention and never reads it; the
  output conv reads ``concat_elu(h)``, so it has ``2F`` input channels. In
  ``flows/`` (CIFAR-10) the output conv reads ``h`` (``F`` inputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# ------------------------------------------------------------------ lr schedules
# Each returns the learning rate at a step (0-based), as the launcher's
# ``lr_schedule``. Several launchers keep a running ``curr_lr`` that is multiplied
# by ``decay`` once per call; called once per step from step 0, that is the closed
# form ``lr0 * decay ** (step - start)`` used here. The launchers' strict
# inequalities leave single steps (e.g. exactly 10000) where their function
# returns None; we take the value of the following segment there.


def lr_warmup_constant(step, *, max_lr, warmup):
    """Linear warm-up from 0 to ``max_lr`` over ``warmup`` steps, then constant
    (``run_cifar.py`` with ``lr_decay = 1``; ``celeba128_5bit_official.py``)."""
    return max_lr * step / warmup if step < warmup else max_lr


def lr_imagenet32(step, *, max_lr=1e-3, warmup=5000, decay=0.99995, min_lr=3e-4):
    """``imagenet32_official.py``: warm up to 1e-3 in 5K steps, then hold the last warm-up
    value (1e-3 x 4999/5000: the release keeps ``curr_lr`` from its last warm-up call) until
    50K (10 x warm-up), then geometric decay by 0.99995 per step down to 3e-4 (the release
    stops multiplying once the rate is <= 3e-4), then constant."""
    if step < warmup:
        return max_lr * step / warmup
    start, held = 10 * warmup, max_lr * (warmup - 1) / warmup
    if step <= start:
        return held
    return max(held * decay ** (step - start), _last_above(held, decay, min_lr))


def _last_above(lr0, decay, floor):
    """The release multiplies while ``curr_lr > floor``: the final value is the
    first product <= floor."""
    lr = lr0
    while lr > floor:
        lr *= decay
    return lr


def lr_imagenet64(step):
    """``imagenet64_official.py`` ("to prevent NaNs"): warm up to 4e-4 in 10K steps,
    4e-4 until 50K, geometric decay (0.99995 per step) from 50K to 55K, 3e-4 from 55K
    to 230K, a linear ramp from 0 to 1e-5 over 230K-240K, 1e-5 until 280K, then 1e-6.

    The release's segment for 280K-290K is ``1e-6 * (step - 290000) / 10000``, which
    is negative (a sign slip in the release); we keep it as written, clamped at 0,
    i.e. a zero learning rate for those 10K steps, and say so here."""
    if step < 10_000:
        return 4e-4 * step / 10_000
    if step <= 50_000:
        return 4e-4
    if step <= 55_000:
        return 4e-4 * 0.99995 ** (step - 50_000)
    if step <= 230_000:
        return 3e-4
    if step <= 240_000:
        return 1e-5 * (step - 230_000) / 10_000
    if step <= 280_000:
        return 1e-5
    if step <= 290_000:
        return max(0.0, 1e-6 * (step - 290_000) / 10_000)
    return 1e-6


def lr_imagenet64_5bit(step):
    """``imagenet64_5bit_official.py``: warm up to 4e-4 in 10K steps, 4e-4 until 50K,
    geometric decay by 0.9995 per step while above 3e-4 (about 575 steps), 3e-4 until
    110K, a linear ramp from 0 to 1e-5 over 110K-130K, then 1e-5."""
    if step < 10_000:
        return 4e-4 * step / 10_000
    if step <= 50_000:
        return 4e-4
    if step <= 110_000:
        return max(4e-4 * 0.9995 ** (step - 50_000), 3e-4)
    if step <= 130_000:
        return 1e-5 * (step - 110_000) / 20_000
    return 1e-5


def lr_celeba64(step):
    """``celeba64_3bit_official.py``, ``celeba64_5bit_official.py``: warm up to 4e-5
    in 20K steps, 4e-5 until 50K (2.5 x warm-up), geometric decay by 0.9995 per step
    while above 1e-5 (about 2,800 steps), then that last value (just under 1e-5)."""
    if step < 20_000:
        return 4e-5 * step / 20_000
    if step <= 50_000:
        return 4e-5
    return max(4e-5 * 0.9995 ** (step - 50_000), _last_above(4e-5, 0.9995, 1e-5))


SCHEDULES = {
    "imagenet32": lr_imagenet32,
    "imagenet64": lr_imagenet64,
    "imagenet64-5bit": lr_imagenet64_5bit,
    "celeba64": lr_celeba64,
}


# ----------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class ReleaseConfig:
    """One launcher of the release (see the module docstring)."""
    name: str
    source: str                     # file in aravindsrinivas/flowpp
    image_shape: tuple
    n_bits: int
    layout: tuple                   # main flow: ("s2d",), ("checker", n), ("channel", n)
    filters: int
    blocks: int
    components: int
    dequant: str                    # "variational" or "uniform"
    dequant_layout: tuple = (("checker", 4),)
    dequant_filters: int = 96
    dequant_blocks: int = 2
    dequant_attention: bool = True
    context_resnets: int = 3
    context_layernorm: bool = False  # layer norm after each context resnet
    context_attention: bool = False  # attention (+ layer norm) after each (imagenet32)
    pointwise: bool = True           # Pointwise (1x1 invertible) in each coupling step
    final_concat_elu: bool = False   # output conv reads concat_elu(h): 2F inputs
    weight_norm: bool = False        # V, g, b instead of W, b
    affine: bool = False             # affine coupling (abl_nomixlog.py): 2 outputs per dim
    attention: bool = True           # main flow attention
    pointwise_block: bool = False    # abl_noattn.py: gated pointwise block instead of attention
    context_channels: int = 32
    dequant_components: int | None = None   # None: as components
    pos_emb_without_attention: bool = True  # the release creates pos_emb in every coupling
    # training
    max_lr: float = 3e-4
    warmup: int = 2000
    schedule: str | None = None      # key of SCHEDULES; None: warm-up then constant
    batch: int = 64
    init_batch: int = 128
    ema_decay: float = 0.999
    dropout: float = 0.0
    grad_clip: float = 1.0
    processes: int | None = None     # MPI processes the launcher's docstring reports
    stated_params: int | None = None  # the launcher's docstring
    paper_bpd: float | None = None   # the paper's bits/dim: Table 1 (density) or Table 2 (ablations)
    notes: tuple = field(default_factory=tuple)


_IN64 = (("s2d",), ("checker", 4), ("s2d",), ("channel", 2), ("checker", 2), ("s2d",), ("channel", 2),
         ("checker", 2))
_IMAGENET_STYLE = dict(pointwise=False, final_concat_elu=True, dequant_attention=False, dequant_blocks=5,
                       dequant_filters=96, context_resnets=5, context_layernorm=True, filters=96, blocks=16,
                       components=4, dropout=0.0, ema_decay=0.999, init_batch=None)

RELEASE = {
    "cifar10": ReleaseConfig(
        "cifar10", "flows/run_cifar.py", (32, 32, 3), 8,
        (("checker", 4), ("s2d",), ("channel", 2), ("checker", 3)), filters=96, blocks=10, components=32,
        dequant="variational", max_lr=3e-4, warmup=2000, batch=64, init_batch=128, ema_decay=0.999,
        dropout=0.2, stated_params=31_443_440, paper_bpd=3.09),
    "cifar10-uniform-dequant": ReleaseConfig(
        "cifar10-uniform-dequant", "flows/ablations/abl_nodequant.py", (32, 32, 3), 8,
        (("checker", 4), ("s2d",), ("channel", 2), ("checker", 3)), filters=104, blocks=10, components=32,
        dequant="uniform", dropout=0.2, stated_params=32_324_408, paper_bpd=3.292),
    "cifar10-affine": ReleaseConfig(
        "cifar10-affine", "flows/ablations/abl_nomixlog.py", (32, 32, 3), 8,
        (("checker", 4), ("s2d",), ("channel", 2), ("checker", 3)), filters=108, blocks=10, components=32,
        dequant="variational", dequant_filters=108, affine=True, dropout=0.2, stated_params=32_045_708,
        paper_bpd=3.200),
    "cifar10-no-attention": ReleaseConfig(
        "cifar10-no-attention", "flows/ablations/abl_noattn.py", (32, 32, 3), 8,
        (("checker", 4), ("s2d",), ("channel", 2), ("checker", 3)), filters=96, blocks=10, components=32,
        dequant="variational", attention=False, pointwise_block=True, dropout=0.2, stated_params=31_443_440,
        paper_bpd=3.193),
    "imagenet32": ReleaseConfig(
        "imagenet32", "flows_imagenet/launchers/imagenet32_official.py", (32, 32, 3), 8,
        (("checker", 4), ("checker", 3), ("s2d",), ("channel", 3), ("checker", 3)), filters=128, blocks=20,
        components=32, dequant="variational", dequant_layout=(("checker", 4), ("checker", 4)),
        dequant_filters=128, dequant_blocks=8, context_resnets=8, context_layernorm=True,
        context_attention=True, pointwise=False, final_concat_elu=True, weight_norm=True,
        max_lr=1e-3, warmup=5000, schedule="imagenet32", batch=32, init_batch=32, ema_decay=0.999222,
        dropout=0.0, processes=8, stated_params=168_955_724, paper_bpd=3.86),
    "imagenet64": ReleaseConfig(
        "imagenet64", "flows_imagenet/launchers/imagenet64_official.py", (64, 64, 3), 8, _IN64,
        dequant="variational", max_lr=4e-4, warmup=10_000, schedule="imagenet64", batch=72,
        processes=6, stated_params=73_489_960, paper_bpd=3.69, **{**_IMAGENET_STYLE, "init_batch": 72}),
    "imagenet64-5bit": ReleaseConfig(
        "imagenet64-5bit", "flows_imagenet/launchers/imagenet64_5bit_official.py", (64, 64, 3), 5, _IN64,
        dequant="variational", max_lr=4e-4, warmup=10_000, schedule="imagenet64-5bit", batch=60,
        processes=5, stated_params=73_489_960, **{**_IMAGENET_STYLE, "init_batch": 60}),
    "celeba64-3bit": ReleaseConfig(
        "celeba64-3bit", "flows_celeba/launchers/celeba64_3bit_official.py", (64, 64, 3), 3, _IN64,
        dequant="variational", max_lr=4e-5, warmup=20_000, schedule="celeba64", batch=56,
        processes=8, stated_params=73_489_960, **{**_IMAGENET_STYLE, "init_batch": 56}),
    "celeba64-5bit": ReleaseConfig(
        "celeba64-5bit", "flows_celeba/launchers/celeba64_5bit_official.py", (64, 64, 3), 5, _IN64,
        dequant="variational", max_lr=4e-5, warmup=20_000, schedule="celeba64", batch=56,
        processes=8, stated_params=73_489_960, **{**_IMAGENET_STYLE, "init_batch": 56}),
    "celeba128-5bit": ReleaseConfig(
        "celeba128-5bit", "flows_celeba/launchers/celeba128_5bit_official.py", (128, 128, 3), 5,
        (("s2d",), ("s2d",), ("checker", 4), ("s2d",), ("channel", 2), ("checker", 2), ("s2d",),
         ("channel", 2), ("checker", 2)),
        dequant="variational", max_lr=1e-5, warmup=50_000, schedule=None, batch=48, processes=8,
        stated_params=122_790_952, **{**_IMAGENET_STYLE, "blocks": 12, "init_batch": 64}),
}


# ------------------------------------------------------------- parameter count
def _conv(cin, cout, k, wn):
    return k * k * cin * cout + cout * (2 if wn else 1)


def _attn(f, wn):
    return _conv(f, 3 * f, 1, wn) + _conv(f, 2 * f, 1, wn)


def _gated_resnet(f, cc, use_nin, wn):
    n = _conv(2 * f, f, 3, wn)
    if cc:
        n += _conv(2 * cc, f, 1, wn)
    return n + _conv(2 * f, 2 * f, 1 if use_nin else 3, wn)


def release_coupling_params(rc: ReleaseConfig, half, filters, blocks, context_channels, attention,
                            pointwise_block=False, components=None):
    """Parameters of one coupling's conditioning network on a half of shape (H, W, C)."""
    h, w, c = half
    wn = rc.weight_norm
    components = rc.components if components is None else components
    out = c * (2 if rc.affine else 2 + 3 * components)
    n = 0
    if attention or pointwise_block or rc.pos_emb_without_attention:
        n += h * w * filters                              # pos_emb (the release: created even when unused)
    n += _conv(c, filters, 3, wn)
    for _ in range(blocks):
        n += _gated_resnet(filters, context_channels, True, wn) + 2 * filters       # + ln1
        if attention and not pointwise_block:
            n += _attn(filters, wn) + 2 * filters                                    # + ln2
        elif pointwise_block:
            n += pointwise_block_params(filters, wn) + 2 * filters
    n += _conv(2 * filters if rc.final_concat_elu else filters, out, 3, wn)
    return n


def pointwise_block_params(f, wn=False):
    """``abl_noattn.py``'s replacement of attention, with the parameter count of
    attention: one NIN F -> 3F (a 3-way maxout), then NIN F -> 2F and a gate."""
    return _conv(f, 3 * f, 1, wn) + _conv(f, 2 * f, 1, wn)


def _flow_params(rc, shape, layout, filters, blocks, context_channels, attention, pointwise_block=False,
                 components=None):
    h, w, c = shape
    n = 0
    for step in layout:
        if step[0] == "s2d":
            h, w, c = h // 2, w // 2, 4 * c
            continue
        kind, count = step
        half = (h, w // 2, c) if kind == "checker" else (h, w, c // 2)
        per = 2 * 2 * half[0] * half[1] * half[2]                        # Norm on both halves
        if rc.pointwise:
            per += 2 * half[2] * half[2]
        per += release_coupling_params(rc, half, filters, blocks, context_channels, attention, pointwise_block,
                                       components)
        n += count * per
    return n


def release_param_count(rc: ReleaseConfig) -> dict:
    """Parameter count of the release's graph for ``rc`` (from shapes): a dict with
    ``main``, ``dequant``, ``context`` and ``total``."""
    wn = rc.weight_norm
    main = _flow_params(rc, rc.image_shape, rc.layout, rc.filters, rc.blocks, None, rc.attention,
                        rc.pointwise_block)
    ctx = deq = 0
    if rc.dequant == "variational":
        h, w, c = rc.image_shape
        cc = rc.context_channels
        ctx = _conv(2 * c, cc, 3, wn)
        if rc.context_attention:
            ctx += h * (w // 2) * cc                                      # pos_emb_dq
        for _ in range(rc.context_resnets):
            ctx += _gated_resnet(cc, None, False, wn)
            if rc.context_layernorm:
                ctx += 2 * cc
            if rc.context_attention:
                ctx += _attn(cc, wn) + 2 * cc
        deq = _flow_params(rc, rc.image_shape, rc.dequant_layout, rc.dequant_filters, rc.dequant_blocks, cc,
                           rc.dequant_attention, rc.pointwise_block and rc.dequant_attention,
                           rc.dequant_components)
    return {"main": main, "dequant": deq, "context": ctx, "total": main + deq + ctx}


# ------------------------------------------------------------- cost estimate
def _coupling_macs(rc, half, filters, blocks, context_channels, attention, pointwise_block, components,
                   use_nin=True):
    h, w, c = half
    hw, f = h * w, filters
    out = c * (2 if rc.affine else 2 + 3 * components)
    n = hw * 9 * c * f                                                        # proj_in
    for _ in range(blocks):
        n += hw * 9 * 2 * f * f + hw * (2 * f * 2 * f if use_nin else 9 * 2 * f * 2 * f)   # gated resnet
        if context_channels:
            n += hw * 2 * context_channels * f                                # a_proj
        if attention and not pointwise_block:
            n += hw * 5 * f * f + 2 * hw * hw * f                             # proj1, proj2, QK^T, WV
        elif pointwise_block:
            n += hw * 5 * f * f
    n += hw * 9 * (2 * f if rc.final_concat_elu else f) * out               # proj_out
    return n


def _flow_macs(rc, shape, layout, filters, blocks, context_channels, attention, pointwise_block, components):
    h, w, c = shape
    n = 0
    for step in layout:
        if step[0] == "s2d":
            h, w, c = h // 2, w // 2, 4 * c
            continue
        kind, count = step
        half = (h, w // 2, c) if kind == "checker" else (h, w, c // 2)
        n += count * _coupling_macs(rc, half, filters, blocks, context_channels, attention, pointwise_block,
                                    components)
    return n


def forward_flops(rc: ReleaseConfig) -> int:
    """Estimated FLOPs (2 x multiply-adds of every conv, dense and attention product) of one
    image's forward pass; elementwise work (activations, the mixture CDF) is left out."""
    macs = _flow_macs(rc, rc.image_shape, rc.layout, rc.filters, rc.blocks, None, rc.attention,
                      rc.pointwise_block, rc.components)
    if rc.dequant == "variational":
        h, w, c = rc.image_shape
        hw, cc = h * (w // 2), rc.context_channels
        macs += hw * 9 * 2 * c * cc + rc.context_resnets * hw * (9 * 2 * cc * cc + 9 * 2 * cc * 2 * cc)
        if rc.context_attention:
            macs += rc.context_resnets * (hw * 5 * cc * cc + 2 * hw * hw * cc)
        macs += _flow_macs(rc, rc.image_shape, rc.dequant_layout, rc.dequant_filters, rc.dequant_blocks, cc,
                           rc.dequant_attention, rc.pointwise_block and rc.dequant_attention,
                           rc.dequant_components or rc.components)
    return 2 * macs


# the training length of each launcher's run, as its training loop counts it (estimates):
# flows_imagenet/, flows_celeba/: every process walks the whole training set with its local
# batch (batch / processes) for n_epochs; flows/ (CIFAR-10): 400 epochs of 64 (the horizon of the
# paper's ablations, Table 2).
TRAIN_IMAGES = {"cifar10": 50_000, "imagenet32": 1_281_167, "imagenet64": 1_281_167, "celeba": 30_000}
RUN_EPOCHS = {"cifar10": 400, "cifar10-uniform-dequant": 400, "cifar10-affine": 400, "cifar10-no-attention": 400,
              "imagenet32": 2, "imagenet64": 2, "imagenet64-5bit": 2, "celeba64-3bit": 20, "celeba64-5bit": 20,
              "celeba128-5bit": 1000}


def run_steps(rc: ReleaseConfig) -> int:
    """Optimiser steps of the launcher's run (see RUN_EPOCHS; an estimate of its length)."""
    data = "cifar10" if rc.name.startswith("cifar10") else (
        "celeba" if rc.name.startswith("celeba") else ("imagenet32" if rc.name == "imagenet32" else "imagenet64"))
    local = rc.batch // (rc.processes or 1)
    return RUN_EPOCHS[rc.name] * TRAIN_IMAGES[data] // local
