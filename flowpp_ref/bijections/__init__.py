"""Bijections of Flow++: the protocol (base), elementwise maps, actnorm, 1x1 conv, splits."""
from flowpp_ref.bijections.base import Bijection, Compose, Inverse, batch_size, first, tuple_add, zeros_logdet
from flowpp_ref.bijections.elementwise import ImgProc, Sigmoid, sigmoid, softplus
from flowpp_ref.bijections.normalize import Normalize
from flowpp_ref.bijections.pointwise import Pointwise, factor_matrix
from flowpp_ref.bijections.rescale import Rescale
from flowpp_ref.bijections.splits import (ChannelSplit, CheckerboardSplit, SpaceToDepth, TupleFlip, checkerboard_merge,
                                          checkerboard_split, depth_to_space, space_to_depth)
