"""Model and training presets.

The ``*-paper`` presets and the three CIFAR-10 ablations are the launchers of the
authors' release, each citing its file (see the block "The release's launchers" below,
:mod:`flowpp_ref.model.release` and :mod:`flowpp_ref.model.paramcount`). The small presets keep the
architecture (every bijection and layer type) but shrink widths, depths and the mixture
so that they train on a CPU.

The flows Flow++ improves on (``family="realnvp"`` / ``"glow"``, :mod:`flowpp_ref.model.lineage`):
``realnvp-cifar10`` and ``glow-cifar10`` (their papers' CIFAR-10 models; RealNVP 6,052,041 parameters
here, Glow 44,052,816), ``realnvp-small`` and ``glow-small`` for the CPU.

Ablations (paper, Table 2) are switches on any preset:
``dequantization="uniform"``, ``coupling="affine"``, ``use_attention=False``;
``n_bits`` (8, 5, 3) reduces the pixel depth.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from flowpp_ref.model.release import RELEASE

FAMILIES = ("flowpp", "realnvp", "glow")
from flowpp_ref.runtime.options import Range, check_model_config, config_class, option


@config_class("model")
@dataclass
class ModelConfig:
    """The architecture (appendix 8.5). A field declared with :func:`option` carries its help text,
    range or choices and command-line spelling (:mod:`flowpp_ref.runtime.options`)."""
    image_shape: tuple = (32, 32, 3)
    n_bits: int = option(8, help="bits per pixel", range=Range(int, 1, 8), choices=(3, 5, 8))
    # main flow: couplings per stage (checkerboard, channel after squeeze, checkerboard)
    stages: tuple = (4, 2, 3)
    filters: int = option(96, help="coupling network width", range=Range(int, 4, multiple_of=4))
    blocks: int = option(10, help="blocks per coupling network", range=Range(int, 1))
    components: int = option(32, help="logistic mixture components", range=Range(int, 1))
    dropout_p: float = option(0.2, help="dropout probability", range=Range(float, 0, 1, hi_open=True))
    coupling: str = option("mixlogistic", choices=("mixlogistic", "affine", "additive"),
                           help="ablation: 'affine' replaces the logistic-mixture CDF coupling; realnvp/glow: "
                                "'affine' or 'additive' (NICE)")
    with_affine: bool = True               # exp(a) * logit(F(e)) + b; False drops exp(a), b
    use_attention: bool = option(True, flag="--no-attention",
                                 help="ablation: convolutions only in the couplings (use_attention=False)")
    use_nin: bool = True
    pointwise_init: float | None = 0.001   # identity + 0.001 N(0,1); None: random orthogonal
    inverse_method: str = option("hybrid", choices=("bisection", "hybrid"), cli=False,
                                 help="inverse of the mixture CDF: 'bisection' (the release) or 'hybrid'")
    # variational dequantization (appendix 8.4.1)
    dequantization: str = option("variational", choices=("variational", "uniform"),
                                 help="ablation: 'uniform' replaces the variational dequantizer")
    dequant_couplings: int = 4
    dequant_blocks: int = 2
    dequant_filters: int = 96
    dequant_components: int = 32
    context_channels: int = 32
    context_resnets: int = 3
    # ---- the release's other launchers (flowpp_ref.model.release) ----
    # layout: None = the CIFAR-10 layout from ``stages``; else a tuple of steps
    # ("s2d",), ("checker", n) or ("channel", n), applied in order after ImgProc.
    layout: tuple | None = None
    use_pointwise: bool = True             # False: no Pointwise step (the ImageNet/CelebA launchers)
    mixer: str = option("attention", choices=("attention", "gated-nin"),
                        help="what fills the attention slot: 'gated-nin' is the release's no-attention ablation "
                             "(abl_noattn.py, same parameter count; --no-attention instead drops the slot)")
    dequant_attention: bool | None = None  # None: as use_attention (False in the ImageNet-64 launchers)
    final_concat_elu: bool = False         # the coupling's output conv reads concat_elu(h) (2F inputs)
    context_layernorm: bool = False        # a layer norm after each context resnet (dqln{i})
    mixture_dtype: str | None = option(None, choices=("float32", "float64"), none_means="float32",
                                       help="dtype of the mixture CDF/PDF, its inverse and backward inside "
                                            "the float32 model")
    # ---- the flows Flow++ improves on (flowpp_ref.model.lineage); filters, blocks, coupling, n_bits and
    # dequantization ("uniform") apply to them too, the other fields above do not ----
    family: str = option("flowpp", choices=FAMILIES,
                         help="model family: 'flowpp', or the flows it improves on, 'realnvp' and 'glow'")
    levels: int = option(3, help="realnvp/glow: scales of the multi-scale architecture", range=Range(int, 1))
    depth: int = option(32, help="glow: steps per level; realnvp: couplings per mask type in a scale",
                        range=Range(int, 1))
    invconv: str = option("full", choices=("full", "lu"),
                          help="glow: the invertible 1x1 convolution as a full matrix or LU-decomposed")

    def main_layout(self) -> tuple:
        if self.layout is None:
            s = self.stages
            return (("checker", s[0]), ("s2d",), ("channel", s[1]), ("checker", s[2]))
        return tuple(tuple(step) for step in self.layout)

    def _check_layout(self):
        h, w, c = self.image_shape
        for step in self.main_layout():
            if step[0] == "s2d" and len(step) == 1:
                if h % 2 or w % 2:
                    raise ValueError(f"layout {self.main_layout()}: squeeze of a {h}x{w} image (need even H, W)")
                h, w, c = h // 2, w // 2, 4 * c
            elif step[0] in ("checker", "channel") and len(step) == 2 and int(step[1]) >= 0:
                if (step[0] == "checker" and w % 2) or (step[0] == "channel" and c % 2):
                    raise ValueError(f"layout {self.main_layout()}: {step[0]} split of shape {(h, w, c)}")
            else:
                raise ValueError(f"layout step {step!r}: expected ('s2d',), ('checker', n) or ('channel', n)")
        return (h, w, c)

    def validate(self):
        """``self`` if every option field lies in its range or choices and the layout fits the
        image shape; else ValueError (:class:`~flowpp_ref.runtime.options.ConfigError` for an option)."""
        check_model_config(self)
        if self.family != "flowpp":
            return self._validate_lineage()
        if self.coupling == "additive":
            raise ValueError("coupling='additive' is a RealNVP/Glow option (family='realnvp' or 'glow'); Flow++'s "
                             "couplings are 'mixlogistic' or 'affine'")
        h, w, c = self.image_shape
        if self.layout is not None:
            self._check_layout()
            if w % 2:
                raise ValueError(f"image_shape {self.image_shape}: the dequantizer needs W even")
        elif h % 2 or w % 4:
            raise ValueError(f"image_shape {self.image_shape}: need H even and W divisible by 4 "
                             "(checkerboard split, squeeze, then checkerboard split again)")
        if self.dequant_filters % 4:
            raise ValueError(f"dequant_filters must be divisible by the 4 attention heads, got {self.dequant_filters}")
        return self

    def _validate_lineage(self):
        h, w, _ = self.image_shape
        squeezes = self.levels if self.family == "glow" else self.levels - 1
        if h % 2 ** squeezes or w % 2 ** squeezes or (self.family == "realnvp" and (h * w) // 4 ** squeezes < 2):
            raise ValueError(f"image_shape {self.image_shape}: {self.family} with levels={self.levels} squeezes "
                             f"{squeezes} times, so H and W must be divisible by {2 ** squeezes}")
        if self.coupling not in ("affine", "additive"):
            raise ValueError(f"family={self.family!r}: coupling must be 'affine' or 'additive', got {self.coupling!r}")
        if self.dequantization != "uniform":
            raise ValueError(f"family={self.family!r}: dequantization must be 'uniform' (as in the RealNVP and "
                             f"Glow papers), got {self.dequantization!r}")
        return self


@config_class("train")
@dataclass
class TrainConfig:
    """The optimisation (appendix 8.5). Fields declared with :func:`option` as in :class:`ModelConfig`."""
    batch_size: int = option(64, help="training batch size (the total over all processes)",
                             range=Range(int, 1, note="at most the number of images"))
    init_batch_size: int = option(128, help="images in the data-dependent init batch",
                                  range=Range(int, 1, note="at most the number of training images"))
    lr: float = option(1e-3, help="peak learning rate after warm-up", range=Range(float, 0, lo_open=True))
    warmup_steps: int = option(200, help="linear warm-up steps", range=Range(int, 0, note="0: no warm-up"))
    grad_clip: float = option(1.0, help="clip of the global gradient norm", range=Range(float, 0, lo_open=True),
                              cli=False)
    ema_decay: float = option(0.999, help="EMA decay of the evaluation parameters",
                              range=Range(float, 0, 1, hi_open=True))
    seed: int = option(0, help="random seed (parameters, batches, noise)", range=Range(int, 0, 2 ** 31 - 1))
    optimizer: str = option("adam", choices=("adam", "adamax"),
                            help="'adam' (Flow++, RealNVP) or 'adamax' (Glow's release)")
    beta2: float = option(0.999, help="second-moment decay of Adam / Adamax", range=Range(float, 0, 1, hi_open=True),
                          cli=False)
    max_bad_steps: int = option(10, help="consecutive non-finite steps before the run stops", range=Range(int, 1),
                                cli=False)
    log_every: int = option(10, help="steps between host syncs of the loss", range=Range(int, 1), cli=False)
    checkpoint_every: int = option(500, help="steps between checkpoints", range=Range(int, 1))
    eval_every: int = option(0, help="steps between evaluations on the test images",
                             range=Range(int, 0, note="0: only at the end"), cli=False)
    eval_batches: int | None = option(8, help="test batches evaluated at the end (and every eval_every steps)",
                                      range=Range(int, 1), none_means="all of them")
    # ---- the release's launchers ----
    lr_schedule: str | None = None  # None: linear warm-up to lr; else a key of flowpp_ref.model.release.SCHEDULES
    processes: int | None = None  # MPI processes of the release's run (information only; batch is the total)


@dataclass
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    note: str = ""


def _p(name, note="", train=None, **model):
    return Preset(name, ModelConfig(**model), train or TrainConfig(), note)


PRESETS = {
    "small": _p(
        "small", "CPU-friendly: every part of Flow++, narrow and shallow", filters=32, blocks=1,
        components=4, dropout_p=0.0, stages=(2, 2, 2), dequant_couplings=2, dequant_blocks=1,
        dequant_filters=16, dequant_components=4, context_channels=8, context_resnets=1,
        train=TrainConfig(batch_size=16, init_batch_size=32, warmup_steps=50, lr=1e-3, ema_decay=0.99,
                          checkpoint_every=100, log_every=5)),
    "tiny": _p(
        "tiny", "for tests and derivative checks: 4x4 images, one block", image_shape=(4, 4, 3), filters=8,
        blocks=1, components=3, dropout_p=0.0, stages=(1, 1, 1), dequant_couplings=2, dequant_blocks=1,
        dequant_filters=8, dequant_components=3, context_channels=4, context_resnets=1,
        train=TrainConfig(batch_size=4, init_batch_size=8, warmup_steps=5, ema_decay=0.9,
                          checkpoint_every=5, log_every=1)),
}

# cpu-bench: the cifar10-paper architecture narrowed to about 1.85M parameters (the
# configuration of the training-speed benchmark).
PRESETS["cpu-bench"] = _p(
    "cpu-bench", "benchmark: cifar10-paper architecture, 32 filters, 2 blocks, K=8 (~1.85M parameters)",
    image_shape=(32, 32, 3), stages=(4, 2, 3), filters=32, blocks=2, components=8, dropout_p=0.0,
    dequant_couplings=4, dequant_blocks=1, dequant_filters=32, dequant_components=32,
    context_channels=32, context_resnets=3,
    train=TrainConfig(batch_size=16, init_batch_size=32))


# ----------------------------------------------------------------------------------
# The release's launchers (repository aravindsrinivas/flowpp). Every preset
# below names the file it comes from; flowpp_ref.model.release holds each launcher's
# settings as read from that file, and flowpp_ref.model.paramcount.explain_difference lists
# every parameter-count difference between the preset and the launcher. The
# differences common to all of them (our implementation, not a setting):
#   * weight norm: our conv/dense layers always carry a gain g per output unit (the
#     appendix's weight norm); the release's flows/ and 64x64 launchers use plain W, b
#     (imagenet32_official.py uses weight norm, as we do);
#   * flows_imagenet/, flows_celeba/: every coupling creates a pos_emb even where
#     nothing reads it (the 64x64 dequantizers' couplings have no attention; we
#     create none), and imagenet32's context network has attention after each
#     resnet (ours does not). Their output conv on concat_elu(h) and the context
#     layer norms are matched (final_concat_elu, context_layernorm);
#   * the context network's input: the release feeds x / 2^bits - 0.5, we feed
#     x / 2^bits (a constant shift, absorbed by the first conv's bias except at the
#     zero-padded border);
#   * the inverse: the release's bisection (1e-12 / 200 iterations in flows/,
#     1e-10 / 500 in flows_imagenet/); ours: ModelConfig.inverse_method.
# ``processes`` records the release's MPI processes (the batch is the total over them).

_LAYOUT_CIFAR = (("checker", 4), ("s2d",), ("channel", 2), ("checker", 3))
_LAYOUT_64 = (("s2d",), ("checker", 4), ("s2d",), ("channel", 2), ("checker", 2), ("s2d",), ("channel", 2),
              ("checker", 2))
_LAYOUT_128 = (("s2d",),) + _LAYOUT_64


def _release_train(key, **extra):
    r = RELEASE[key]
    return TrainConfig(batch_size=r.batch, init_batch_size=r.init_batch, lr=r.max_lr, warmup_steps=r.warmup,
                       grad_clip=r.grad_clip, ema_decay=r.ema_decay, lr_schedule=r.schedule,
                       processes=r.processes, **extra)


_IN64 = dict(layout=_LAYOUT_64, use_pointwise=False, filters=96, blocks=16, components=4, dropout_p=0.0,
             dequant_couplings=4, dequant_blocks=5, dequant_filters=96, dequant_components=4,
             dequant_attention=False, context_resnets=5, final_concat_elu=True, context_layernorm=True)

PRESETS.update({
    "cifar10-paper": _p(
        "cifar10-paper", "flows/run_cifar.py as released: Adam, lr 3e-4 after a 2,000-step linear warm-up "
        "(the appendix's listing: 1e-3, 200), dropout 0.2, batch 64, init batch 128, EMA 0.999, clip 1. "
        "31,528,096 parameters = the release's 31,443,440 + 84,656 weight-norm gains (one per output unit "
        "of every conv/dense layer; the release's flows/ layers have no g)",
        train=_release_train("cifar10")),
    "cifar10-uniform-dequant": _p(
        "cifar10-uniform-dequant", "flows/ablations/abl_nodequant.py: uniform dequantization, 104 filters "
        "(release: 32,324,408 parameters; ours adds the weight-norm gains)", filters=104,
        dequantization="uniform", train=_release_train("cifar10-uniform-dequant")),
    "cifar10-affine": _p(
        "cifar10-affine", "flows/ablations/abl_nomixlog.py: affine couplings (main flow and dequantizer), "
        "108 filters in both (release: 32,045,708 parameters; ours adds the weight-norm gains)",
        filters=108, dequant_filters=108, coupling="affine", train=_release_train("cifar10-affine")),
    "cifar10-no-attention": _p(
        "cifar10-no-attention", "flows/ablations/abl_noattn.py: attention replaced (main flow and "
        "dequantizer) by the gated pointwise maxout block of the same parameter count (release: "
        "31,443,440; ours adds the weight-norm gains)", mixer="gated-nin",
        train=_release_train("cifar10-no-attention")),
    "imagenet32-paper": _p(
        "imagenet32-paper", "flows_imagenet/launchers/imagenet32_official.py: no Pointwise, 128 filters, "
        "20 blocks, 32 components, 8 dequantizer couplings of 8 blocks, 8 context resnets; piecewise lr "
        "(1e-3 after 5K warm-up, decay to 3e-4 from 50K), batch 32 over 8 processes, EMA 0.999222",
        image_shape=(32, 32, 3), layout=(("checker", 4), ("checker", 3), ("s2d",), ("channel", 3),
                                         ("checker", 3)),
        use_pointwise=False, filters=128, blocks=20, components=32, dropout_p=0.0, dequant_couplings=8,
        dequant_blocks=8, dequant_filters=128, dequant_components=32, context_resnets=8,
        final_concat_elu=True, context_layernorm=True, train=_release_train("imagenet32")),
    "imagenet64-paper": _p(
        "imagenet64-paper", "flows_imagenet/launchers/imagenet64_official.py: squeeze first, then "
        "checker x4 / squeeze / channel x2 / checker x2 / squeeze / channel x2 / checker x2; no Pointwise; "
        "96 filters, 16 blocks, 4 components; dequantizer without attention (4 couplings of 5 blocks), "
        "5 context resnets; the piecewise lr 'to prevent NaNs', batch 72 over 6 processes",
        image_shape=(64, 64, 3), **_IN64, train=_release_train("imagenet64")),
    "imagenet64-5bit-paper": _p(
        "imagenet64-5bit-paper", "flows_imagenet/launchers/imagenet64_5bit_official.py: imagenet64-paper at "
        "5 bits, its own piecewise lr, batch 60 over 5 processes", image_shape=(64, 64, 3), n_bits=5, **_IN64,
        train=_release_train("imagenet64-5bit")),
    "celeba64-3bit-paper": _p(
        "celeba64-3bit-paper", "flows_celeba/launchers/celeba64_3bit_official.py: the 64x64 architecture at "
        "3 bits; lr 4e-5 after 20K warm-up, decay to 1e-5 from 50K; batch 56 over 8 processes",
        image_shape=(64, 64, 3), n_bits=3, **_IN64, train=_release_train("celeba64-3bit")),
    "celeba64-5bit-paper": _p(
        "celeba64-5bit-paper", "flows_celeba/launchers/celeba64_5bit_official.py: as celeba64-3bit-paper at "
        "5 bits", image_shape=(64, 64, 3), n_bits=5, **_IN64, train=_release_train("celeba64-5bit")),
    "celeba128-5bit-paper": _p(
        "celeba128-5bit-paper", "flows_celeba/launchers/celeba128_5bit_official.py: two squeezes first, then "
        "the 64x64 layout, 12 blocks; lr 1e-5 after a 50K warm-up, then constant; batch 48 (init 64) over "
        "8 processes", image_shape=(128, 128, 3), n_bits=5, **{**_IN64, "layout": _LAYOUT_128, "blocks": 12},
        train=_release_train("celeba128-5bit")),
})

# ----------------------------------------------------------------------------------
# The flows Flow++ improves on (flowpp_ref.model.lineage). Each setting names its source: RealNVP's
# paper (Dinh et al. 2017, sec. 4.1; its public release has no CIFAR-10 configuration) and Glow's
# release command for CIFAR-10 (README of openai/glow: ``--n_level 3 --depth 32 --flow_permutation 2
# --flow_coupling 1 --learntop --lr 0.001``, defaults of its train.py for the rest).
_CIFAR_TRAIN_IMAGES = 50_000

PRESETS.update({
    "realnvp-cifar10": _p(
        "realnvp-cifar10", "RealNVP's CIFAR-10 model (paper sec. 4.1: '8 residual blocks, 64 feature maps, and "
        "downscale only once'; 3 checkerboard couplings, squeeze, 3 channel couplings, factor-out, then 4 "
        "checkerboard couplings; log s = scale * tanh; batch norm on each coupling's output); Adam, lr 1e-3, "
        "batch 64 (sec. 4.1). Not in the paper, flowpp-ref's defaults: no warm-up, EMA 0.999 for evaluation, "
        "gradient clip 1; RealNVP's L2 penalty (5e-5 on the weight-norm scales) is not implemented",
        family="realnvp", levels=2, depth=3, filters=64, blocks=8, coupling="affine", dequantization="uniform",
        dropout_p=0.0, train=TrainConfig(batch_size=64, init_batch_size=256, lr=1e-3, warmup_steps=0)),
    "glow-cifar10": _p(
        "glow-cifar10", "Glow's CIFAR-10 run (its README: 3 levels, depth 32, invertible 1x1 convolution, affine "
        "coupling, learned top prior, lr 1e-3; train.py defaults: width 512, Adamax with beta2 = 1 - 1/(steps "
        "per epoch) and a Polyak average of the same decay, warm-up 10 epochs, batch 64 on each of 8 GPUs = "
        "512, init batch 256). Not in the release: the gradient clip 1 (flowpp-ref's default)",
        family="glow", levels=3, depth=32, filters=512, coupling="affine", dequantization="uniform",
        dropout_p=0.0, invconv="full",
        train=TrainConfig(batch_size=512, init_batch_size=256, lr=1e-3, optimizer="adamax",
                          beta2=1 - 1 / math.ceil(_CIFAR_TRAIN_IMAGES / 512),
                          ema_decay=1 - 1 / math.ceil(_CIFAR_TRAIN_IMAGES / 512),
                          warmup_steps=10 * math.ceil(_CIFAR_TRAIN_IMAGES / 512), processes=8)),
    "realnvp-small": _p(
        "realnvp-small", "CPU-friendly RealNVP: realnvp-cifar10's layout (2 scales, 3 + 3 couplings, then 4) "
        "with 2 residual blocks of 16 feature maps", family="realnvp", levels=2, depth=3, filters=16, blocks=2,
        coupling="affine", dequantization="uniform", dropout_p=0.0,
        train=TrainConfig(batch_size=16, init_batch_size=32, warmup_steps=50, lr=1e-3, ema_decay=0.99,
                          checkpoint_every=100, log_every=5)),
    "glow-small": _p(
        "glow-small", "CPU-friendly Glow: glow-cifar10's layout and optimiser at 3 levels of depth 4, width 32",
        family="glow", levels=3, depth=4, filters=32, coupling="affine", dequantization="uniform", dropout_p=0.0,
        train=TrainConfig(batch_size=16, init_batch_size=32, warmup_steps=50, lr=1e-3, optimizer="adamax",
                          beta2=0.999, ema_decay=0.99, checkpoint_every=100, log_every=5)),
})

# preset -> key of flowpp_ref.model.release.RELEASE
RELEASE_OF = {"cifar10-paper": "cifar10", "cifar10-uniform-dequant": "cifar10-uniform-dequant",
              "cifar10-affine": "cifar10-affine", "cifar10-no-attention": "cifar10-no-attention",
              "imagenet32-paper": "imagenet32", "imagenet64-paper": "imagenet64",
              "imagenet64-5bit-paper": "imagenet64-5bit", "celeba64-3bit-paper": "celeba64-3bit",
              "celeba64-5bit-paper": "celeba64-5bit", "celeba128-5bit-paper": "celeba128-5bit"}


def get_preset(name: str, **overrides) -> Preset:
    """A copy of a preset with model/train fields overridden by keyword."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = set(overrides) - model_keys - train_keys
    if bad:
        raise KeyError(f"unknown option(s) {sorted(bad)}")
    m = dataclasses.replace(p.model, **{k: v for k, v in overrides.items() if k in model_keys})
    t = dataclasses.replace(p.train, **{k: v for k, v in overrides.items() if k in train_keys})
    return Preset(p.name, m.validate(), t, p.note)
