"""Network layers with hand-derived backward passes (NHWC). See flowpp_ref.module for the Layer protocol."""
from .activations import (concat_elu, concat_elu_backward, concat_elu_forward, elu, elu_grad, gate,
                          gate_backward, gate_forward, sigmoid)
from .dropout import Dropout
from .resnet import GatedResNet
from .weightnorm import NIN, Conv2d, weight_norm, weight_norm_backward
