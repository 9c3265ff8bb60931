"""Model and training presets.

``cifar10-paper`` and ``imagenet32-paper`` are the paper's settings (appendix 8.5,
8.6; see DESIGN.md). The small presets keep the architecture (every bijection and
layer type) but shrink widths, depths and the mixture so that they train on a CPU.

Ablations (paper, Table 2) are switches on any preset:
``dequantization="uniform"``, ``coupling="affine"``, ``use_attention=False``;
``n_bits`` (8, 5, 3) reduces the pixel depth.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    image_shape: tuple = (32, 32, 3)
    n_bits: int = 8
    # main flow: couplings per stage (checkerboard, channel after squeeze, checkerboard)
    stages: tuple = (4, 2, 3)
    filters: int = 96
    blocks: int = 10
    components: int = 32
    dropout_p: float = 0.2
    coupling: str = "mixlogistic"          # "mixlogistic" (Flow++) or "affine" (ablation)
    with_affine: bool = True               # exp(a) * logit(F(e)) + b; False drops exp(a), b
    use_attention: bool = True             # False: convolutions only (ablation)
    use_nin: bool = True
    pointwise_init: float | None = 0.001   # identity + 0.001 N(0,1); None: random orthogonal
    inverse_method: str = "hybrid"         # "bisection" (the release) or "hybrid"
    # variational dequantization (appendix 8.4.1)
    dequantization: str = "variational"    # "variational" or "uniform" (ablation)
    dequant_couplings: int = 4
    dequant_blocks: int = 2
    dequant_filters: int = 96
    dequant_components: int = 32
    context_channels: int = 32
    context_resnets: int = 3

    def validate(self):
        h, w, c = self.image_shape
        if h % 2 or w % 4:
            raise ValueError(f"image_shape {self.image_shape}: need H even and W divisible by 4 "
                             "(checkerboard split, squeeze, then checkerboard split again)")
        if self.n_bits not in (1, 2, 3, 4, 5, 6, 7, 8):
            raise ValueError(f"n_bits must be in 1..8, got {self.n_bits}")
        if self.coupling not in ("mixlogistic", "affine"):
            raise ValueError(f"coupling must be 'mixlogistic' or 'affine', got {self.coupling!r}")
        if self.dequantization not in ("variational", "uniform"):
            raise ValueError(f"dequantization must be 'variational' or 'uniform', got {self.dequantization!r}")
        if self.inverse_method not in ("bisection", "hybrid"):
            raise ValueError(f"inverse_method must be 'bisection' or 'hybrid', got {self.inverse_method!r}")
        if self.filters % 4 or self.dequant_filters % 4:
            raise ValueError("filters must be divisible by the 4 attention heads")
        return self


@dataclass
class TrainConfig:
    batch_size: int = 64
    init_batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    max_bad_steps: int = 10       # consecutive non-finite steps before the run stops
    log_every: int = 10           # steps between host syncs of the loss
    checkpoint_every: int = 500
    eval_every: int = 0           # 0: only at the end
    eval_batches: int = 8


@dataclass
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    note: str = ""


def _p(name, note="", train=None, **model):
    return Preset(name, ModelConfig(**model), train or TrainConfig(), note)


PRESETS = {
    "cifar10-paper": _p("cifar10-paper", "the paper's CIFAR-10 model (~31M parameters)"),
    "imagenet32-paper": _p(
        "imagenet32-paper", "the paper's ImageNet 32x32 model", filters=128, blocks=20, dropout_p=0.0,
        dequant_blocks=4, dequant_filters=128,
        train=TrainConfig(batch_size=32, warmup_steps=10_000, ema_decay=0.999222)),
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

# ---- issue 10: cpu-bench (a contained block) ---------------------------------------------
# The peer-sized CIFAR-10 configuration of the training-speed benchmark
# (benchmarks/bench_step.py): the cifar10-paper architecture, narrowed (about 1.85M parameters).
PRESETS["cpu-bench"] = _p(
    "cpu-bench", "benchmark: cifar10-paper architecture, 32 filters, 2 blocks, K=8 (~1.85M parameters)",
    image_shape=(32, 32, 3), stages=(4, 2, 3), filters=32, blocks=2, components=8, dropout_p=0.0,
    dequant_couplings=4, dequant_blocks=1, dequant_filters=32, dequant_components=32,
    context_channels=32, context_resnets=3,
    train=TrainConfig(batch_size=16, init_batch_size=32))
# ---- end issue 10 block -------------------------------------------------------------------


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
