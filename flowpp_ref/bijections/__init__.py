"""Bijections: the protocol (base); Flow++'s elementwise maps, per-activation actnorm (Normalize), 1x1
convolution (Pointwise), splits and couplings; the lineage before it: RealNVP's masked affine coupling and
batch normalisation, Glow's per-channel actnorm, 1x1 convolution (full and LU-decomposed) and
multi-scale factor-out with learned priors."""
from flowpp_ref.bijections.actnorm import ChannelActNorm
from flowpp_ref.bijections.base import Bijection, Compose, Inverse, batch_size, first, tuple_add, zeros_logdet
from flowpp_ref.bijections.batchnorm import BatchNormFlow
from flowpp_ref.bijections.elementwise import ImgProc, Sigmoid, sigmoid, softplus
from flowpp_ref.bijections.factor_out import FactorOut, LearnedTopPrior, exact_inverse
from flowpp_ref.bijections.invconv import InvConv1x1, InvConv1x1LU, lu_decompose
from flowpp_ref.bijections.masked_coupling import MaskedAffineCoupling, channel_mask, checkerboard_mask
from flowpp_ref.bijections.normalize import Normalize
from flowpp_ref.bijections.pointwise import Pointwise, factor_matrix
from flowpp_ref.bijections.rescale import Rescale
from flowpp_ref.bijections.splits import (ChannelSplit, CheckerboardSplit, SpaceToDepth, TupleFlip, checkerboard_merge,
                                          checkerboard_split, depth_to_space, space_to_depth)
