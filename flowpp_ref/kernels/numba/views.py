"""Array views without reference counting, for the innermost loops of numba kernels.

Every view numba makes of an array (``m[c, j0:j0 + kn]``, ``P[i]``) holds a reference to the
array's memory: an atomic increment when it is made and an atomic decrement when it dies. The
attention kernels pass 8 to 16 such row views to each inner loop, so every call of an inner loop
pays 8 to 16 pairs of atomic operations (more costly still when two threads update the same
counter).

:func:`borrow` returns the same array (data, shape, strides) with no memory-info pointer:
views of it are not counted (numba skips the count of a null pointer). The borrowed array
must not outlive the array it came from: the kernels borrow their *arguments* only (the caller
holds those for the whole call), never a local array (numba may free a local as soon as it is
last used by name).
"""
from __future__ import annotations

from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def borrow(typingctx, arr):
    """``arr`` without its memory-info pointer (see the module docstring; inside numba kernels)."""
    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, value=args[0])
        dst = context.make_array(signature.return_type)(context, builder)
        for field in ("nitems", "itemsize", "data", "shape", "strides", "parent"):
            setattr(dst, field, getattr(src, field))
        dst.meminfo = cgutils.get_null_value(dst.meminfo.type)
        return dst._getvalue()

    return arr(arr), codegen
