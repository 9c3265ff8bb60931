"""Permutations of the activations: splits, merges, flips and the 2x2 squeeze.

Every map here only moves entries, so its Jacobian is a permutation matrix:
log|det| = 0 (``logdet`` is ``zeros((B,))``) and the backward pass applies the
inverse permutation to the upstream gradient (``dL/dx = P^T dL/dy``). No cache
is needed (``cache`` is ``None``); ``dlogdet`` is ignored since the log-det is
constant. Layout NHWC: ``x`` is ``[B, H, W, C]``; a split returns a 2-tuple
``(condition, effect)``.

Bad input (wrong rank, odd sizes, a tuple where an array is expected or the
reverse) raises :class:`FlowInputError` naming the shape; these checks read only
shapes (no device sync).

References: Flow++ appendix 8.1 (``CheckerboardSplit``, ``TupleFlip``,
``SpaceToDepth``); ``ChannelSplit`` from the released code (``tf.split`` on the
channel axis).
"""
from __future__ import annotations

from flowpp_ref.bijections.base import Bijection, zeros_logdet
from flowpp_ref.core.backend import array_module
from flowpp_ref.core.validation import FlowInputError, check_array


# ------------------------------------------------------------------ checks
def _shape_of(x):
    if isinstance(x, tuple):
        return [tuple(getattr(a, "shape", ())) for a in x]
    return tuple(getattr(x, "shape", ()))


def _check_image(x, name):
    """One 4-d array [B, H, W, C]."""
    if isinstance(x, tuple):
        raise FlowInputError(f"{name}: expected one array [B, H, W, C], got a tuple of shapes {_shape_of(x)}")
    check_array(x, name, ndim=4)
    return x


def _check_pair(y, name, *, same_shape=True, ndim=4):
    """A 2-tuple of arrays (of equal shapes when ``same_shape``)."""
    if not isinstance(y, tuple):
        raise FlowInputError(f"{name}: expected a tuple (condition, effect) of two arrays, "
                             f"got {type(y).__name__} of shape {_shape_of(y)}")
    if len(y) != 2:
        raise FlowInputError(f"{name}: expected a tuple of two arrays, got {len(y)} elements of shapes {_shape_of(y)}")
    a, b = y
    check_array(a, f"{name}[0]", ndim=ndim)
    check_array(b, f"{name}[1]", ndim=ndim)
    if a.ndim < 1 or b.ndim < 1:
        raise FlowInputError(f"{name}: arrays need a batch axis, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if same_shape and tuple(a.shape) != tuple(b.shape):
        raise FlowInputError(f"{name}: the two halves must have the same shape, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[:1] != b.shape[:1]:
        raise FlowInputError(f"{name}: the two arrays have different batch sizes, "
                             f"shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


# ------------------------------------------------------------------ checkerboard
def checkerboard_split(x, bin: int = 0, name: str = "checkerboard_split"):
    """Split ``[B, H, W, C]`` into two ``[B, H, W/2, C]`` halves by the parity of w.

    ``half_p[b, h, j, c] = x[b, h, 2j + p, c]``; returns ``(half_bin, half_{1-bin})``
    = ``(condition, effect)``. This is the released code's split (pixels paired by
    the parity of the flattened index h*W + w, equal to the parity of w for even W).
    """
    _check_image(x, name)
    B, H, W, C = x.shape
    if W % 2:
        raise FlowInputError(f"{name}: the width must be even to split by the parity of w, got shape {tuple(x.shape)}")
    xp = array_module(x)
    xr = x.reshape(B, H, W // 2, 2, C)
    even = xp.ascontiguousarray(xr[:, :, :, 0])
    odd = xp.ascontiguousarray(xr[:, :, :, 1])
    return (even, odd) if bin == 0 else (odd, even)


def checkerboard_merge(condition, effect, bin: int = 0, name: str = "checkerboard_merge"):
    """Inverse of :func:`checkerboard_split`: interleave two halves along w."""
    a, b = _check_pair((condition, effect), name)
    even, odd = (a, b) if bin == 0 else (b, a)
    B, H, Wh, C = even.shape
    xp = array_module(even)
    return xp.stack([even, odd], axis=3).reshape(B, H, 2 * Wh, C)


class CheckerboardSplit(Bijection):
    """``x [B, H, W, C] -> (condition, effect)``, each ``[B, H, W/2, C]``.

    Math: ``condition[b, h, j, c] = x[b, h, 2j + bin, c]``,
    ``effect[b, h, j, c] = x[b, h, 2j + 1 - bin, c]`` (``bin`` in {0, 1}, default 0:
    even columns condition the odd ones).

    Which checkerboard: the released Flow++ code pairs pixels by the parity of the
    flattened index ``h*W + w`` (reshape to ``[..., H*W/2, 2]``); for even W that
    is the parity of w, i.e. vertical stripes, and halves keep the [H, W/2] grid
    (``h_collapse=True``, the only setting used in the paper's models). We use
    exactly that, so weights and layouts match the release; RealNVP's
    ``(h + w) % 2`` checkerboard is NOT used. Odd W is rejected (the release would
    pair pixels across rows).

    Shapes: [B, H, W, C] -> ([B, H, W/2, C], [B, H, W/2, C]); logdet zeros (B,).
    Cache: None.
    """

    def __init__(self, bin: int = 0):
        super().__init__()
        if bin not in (0, 1):
            raise ValueError(f"bin must be 0 or 1, got {bin!r}")
        self.bin = bin

    def forward(self, x, context=None, *, train=False, rng=None):
        y = checkerboard_split(x, self.bin, "CheckerboardSplit.forward")
        return y, zeros_logdet(x), None

    def backward(self, dy, dlogdet, cache):
        # dL/dx = merge(dL/dcondition, dL/deffect)
        return checkerboard_merge(dy[0], dy[1], self.bin, "CheckerboardSplit.backward"), None, {}

    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        a, b = _check_pair(y, "CheckerboardSplit.inverse")
        return checkerboard_merge(a, b, self.bin, "CheckerboardSplit.inverse"), zeros_logdet(y), None

    def inverse_backward(self, dx, dlogdet, cache):
        # dL/d(condition, effect) = split(dL/dx)
        return checkerboard_split(dx, self.bin, "CheckerboardSplit.inverse_backward"), None, {}

    def __repr__(self):
        return f"CheckerboardSplit(bin={self.bin})"


# ------------------------------------------------------------------ channels
class ChannelSplit(Bijection):
    """``x [B, H, W, C] -> (x[..., :C/2], x[..., C/2:])``; the inverse concatenates.

    Shapes: [B, H, W, C] (C even) -> two [B, H, W, C/2]; logdet zeros (B,).
    Cache: None.
    """

    @staticmethod
    def _split(x, name):
        _check_image(x, name)
        C = x.shape[3]
        if C % 2:
            raise FlowInputError(f"{name}: the channel count must be even, got shape {tuple(x.shape)}")
        xp = array_module(x)
        return xp.ascontiguousarray(x[..., : C // 2]), xp.ascontiguousarray(x[..., C // 2:])

    @staticmethod
    def _merge(y, name):
        a, b = _check_pair(y, name)
        return array_module(a).concatenate([a, b], axis=3)

    def forward(self, x, context=None, *, train=False, rng=None):
        return self._split(x, "ChannelSplit.forward"), zeros_logdet(x), None

    def backward(self, dy, dlogdet, cache):
        # dL/dx = concat(dL/dy0, dL/dy1) on channels
        return self._merge(dy, "ChannelSplit.backward"), None, {}

    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        return self._merge(y, "ChannelSplit.inverse"), zeros_logdet(y), None

    def inverse_backward(self, dx, dlogdet, cache):
        return self._split(dx, "ChannelSplit.inverse_backward"), None, {}


# ------------------------------------------------------------------ flip
class TupleFlip(Bijection):
    """``(a, b) -> (b, a)``: the conditioning and transformed halves swap roles.

    Shapes: any two arrays with the same batch size; logdet zeros (B,).
    Cache: None.
    """

    @staticmethod
    def _flip(x, name):
        a, b = _check_pair(x, name, same_shape=False, ndim=None)
        return (b, a)

    def forward(self, x, context=None, *, train=False, rng=None):
        return self._flip(x, "TupleFlip.forward"), zeros_logdet(x), None

    def backward(self, dy, dlogdet, cache):
        # dL/d(a, b) = (dL/dy1, dL/dy0)
        return self._flip(dy, "TupleFlip.backward"), None, {}

    def inverse(self, y, context=None):
        return self._flip(y, "TupleFlip.inverse"), zeros_logdet(y)

    def inverse_with_cache(self, y, context=None):
        return self._flip(y, "TupleFlip.inverse"), zeros_logdet(y), None

    def inverse_backward(self, dx, dlogdet, cache):
        return self._flip(dx, "TupleFlip.inverse_backward"), None, {}


# ------------------------------------------------------------------ squeeze
def space_to_depth(x, block: int = 2, name: str = "space_to_depth"):
    """``tf.space_to_depth`` (NHWC): ``out[b, i, j, (dh*block + dw)*C + c] = x[b, i*block+dh, j*block+dw, c]``."""
    _check_image(x, name)
    B, H, W, C = x.shape
    if H % block or W % block:
        raise FlowInputError(f"{name}: height and width must be multiples of {block}, got shape {tuple(x.shape)}")
    xp = array_module(x)
    y = x.reshape(B, H // block, block, W // block, block, C).transpose(0, 1, 3, 2, 4, 5)
    return xp.ascontiguousarray(y).reshape(B, H // block, W // block, block * block * C)


def depth_to_space(y, block: int = 2, name: str = "depth_to_space"):
    """``tf.depth_to_space`` (NHWC), the inverse of :func:`space_to_depth`."""
    _check_image(y, name)
    B, h, w, CC = y.shape
    if CC % (block * block):
        raise FlowInputError(f"{name}: the channel count must be a multiple of {block * block}, "
                             f"got shape {tuple(y.shape)}")
    C = CC // (block * block)
    xp = array_module(y)
    x = y.reshape(B, h, w, block, block, C).transpose(0, 1, 3, 2, 4, 5)
    return xp.ascontiguousarray(x).reshape(B, h * block, w * block, C)


class SpaceToDepth(Bijection):
    """The squeeze: ``[B, H, W, C] -> [B, H/2, W/2, 4C]`` in ``tf.space_to_depth``'s order.

    Math: ``y[b, i, j, (dh*2 + dw)*C + c] = x[b, 2i + dh, 2j + dw, c]``
    (``block_size`` 2 by default; any block size works the same way).

    Shapes: [B, H, W, C] (H, W multiples of the block) -> [B, H/k, W/k, k*k*C];
    logdet zeros (B,). Cache: None.
    """

    def __init__(self, block_size: int = 2):
        super().__init__()
        if int(block_size) < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = int(block_size)

    def forward(self, x, context=None, *, train=False, rng=None):
        return space_to_depth(x, self.block_size, "SpaceToDepth.forward"), zeros_logdet(x), None

    def backward(self, dy, dlogdet, cache):
        # dL/dx = depth_to_space(dL/dy)
        return depth_to_space(dy, self.block_size, "SpaceToDepth.backward"), None, {}

    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        return depth_to_space(y, self.block_size, "SpaceToDepth.inverse"), zeros_logdet(y), None

    def inverse_backward(self, dx, dlogdet, cache):
        return space_to_depth(dx, self.block_size, "SpaceToDepth.inverse_backward"), None, {}

    def __repr__(self):
        return f"SpaceToDepth(block_size={self.block_size})"
