"""Network layers with hand-derived backward passes (NHWC). See flowpp_ref.core.module for the Layer protocol."""
from flowpp_ref.nn.activations import (concat_elu, concat_elu_backward, concat_elu_forward, elu, elu_grad, gate,
                                       gate_backward, gate_forward, sigmoid)
from flowpp_ref.nn.dropout import Dropout
from flowpp_ref.nn.glow_net import GlowCouplingNet
from flowpp_ref.nn.plain_conv import PlainConv2d, ZeroConv2d
from flowpp_ref.nn.resnet import GatedResNet
from flowpp_ref.nn.weightnorm import NIN, Conv2d, weight_norm, weight_norm_backward
