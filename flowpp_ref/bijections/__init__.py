"""Bijections of Flow++: the protocol (base), elementwise maps, actnorm, 1x1 conv, splits."""
from .base import Bijection, Compose, Inverse, batch_size, first, tuple_add, zeros_logdet
from .elementwise import ImgProc, Sigmoid, sigmoid, softplus
from .normalize import Normalize
from .pointwise import Pointwise, factor_matrix
from .splits import (ChannelSplit, CheckerboardSplit, SpaceToDepth, TupleFlip, checkerboard_merge,
                     checkerboard_split, depth_to_space, space_to_depth)
from .rescale import Rescale
