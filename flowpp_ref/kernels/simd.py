"""Sixteen float32 lanes as one value inside numba kernels (LLVM ``<16 x float>``).

numba vectorises innermost loops only: a sum over keys kept per query (16 queries side by side)
would live in memory, loaded and stored for every key. A value of type :data:`f32x16` is an LLVM
vector held in a register across any loop, and the functions below are single LLVM operations
on it (``fma16`` is ``llvm.fma.v16f32``), so a kernel written with them says exactly which
vector instructions run. Used by the query-lanes forward and the tiled backward of
:mod:`flowpp_ref.kernels.numba_attention`; each function's plain meaning is in its docstring and
``tests/test_fused_attention.py`` checks every one against NumPy.

* ``splat16(x)``: the float32 ``x`` in all 16 lanes;
* ``load16(a, i)`` / ``store16(a, i, v)``: lanes ``a[i:i+16]`` of a 1-d float32 array (no bounds check:
  the caller keeps ``i + 16 <= a.size``);
* ``add16``, ``sub16``, ``mul16``, ``fma16(a, b, c) = a * b + c`` (one rounding), ``max16`` (``a`` where
  ``a > b`` else ``b``: a nan in ``b`` is kept);
* ``exp16(x)``: the softmax's exp, lane by lane the same reduction and polynomial as
  :func:`flowpp_ref.kernels.numba_attention.softmax_exp` for float32 (arguments <= 0; 0 below -86.5,
  clamped at 89 above, nan stays nan);
* ``lane(v, t)``: lane ``t`` as a float32;
* ``transpose16x16(src, s0, dst, d0)``: ``dst[d0 + 16 c + r] = src[s0 + 16 r + c]`` (r, c < 16), by
  4 stages of 16 two-input shuffles (stage t swaps bit t of the row and of the column index).

These kernels have run on one CPU (AMD Zen 4, AVX-512); on AVX2, LLVM splits each 16-lane value
into two 8-lane halves (correct, not measured).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

from . import fastexp


class F32x16(types.Type):
    """numba type of an LLVM ``<16 x float>`` value."""

    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()
_VT = ir.VectorType(ir.FloatType(), 16)
_IT = ir.VectorType(ir.IntType(32), 16)


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VT)


def _vconst(x):
    return ir.Constant(_VT, [float(np.float32(x))] * 16)


def _call(builder, name, args, ret=_VT):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_VT, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, ir.Constant(_IT, [0] * 16))


def _ptr(context, builder, aryty, ary, idx):
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(cgutils.get_item_pointer(context, builder, aryty, a, [idx], wraparound=False),
                           _VT.as_pointer())


def _is_f32_vector_array(a):
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32


@intrinsic
def splat16(typingctx, x):
    if x != types.float32:
        return None
    return f32x16(x), lambda context, builder, sig, args: _splat(builder, args[0])


@intrinsic
def load16(typingctx, a, i):
    if not (_is_f32_vector_array(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
    return f32x16(a, i), codegen


@intrinsic
def store16(typingctx, a, i, v):
    if not (_is_f32_vector_array(a) and isinstance(i, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


def _binary(op):
    @intrinsic
    def f(typingctx, a, b):
        if a != f32x16 or b != f32x16:
            return None
        return f32x16(a, b), lambda context, builder, sig, args: getattr(builder, op)(*args)
    return f


add16, sub16, mul16 = _binary("fadd"), _binary("fsub"), _binary("fmul")


@intrinsic
def fma16(typingctx, a, b, c):
    if a != f32x16 or b != f32x16 or c != f32x16:
        return None
    return f32x16(a, b, c), lambda context, builder, sig, args: _call(builder, "llvm.fma.v16f32", list(args))


@intrinsic
def max16(typingctx, a, b):
    if a != f32x16 or b != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])
    return f32x16(a, b), codegen


@intrinsic
def lane(typingctx, v, t):
    if v != f32x16 or not isinstance(t, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], builder.trunc(args[1], ir.IntType(32))
                                       if args[1].type.width > 32 else args[1])
    return types.float32(v, t), codegen


_SM_LO, _SM_HI = -86.5, 89.0              # as numba_attention's float32 softmax_exp


@intrinsic
def exp16(typingctx, x):
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        # exp(x) = (2 exp(r)) 2^(n-1), n = round(x log2 e), r = x - n ln 2 (two parts), exp(r) by the
        # degree-7 Taylor polynomial of fastexp; 0 where x < -86.5, x clamped at 89 (nan: kept)
        x = args[0]
        xc = builder.select(builder.fcmp_ordered(">", x, _vconst(_SM_HI)), _vconst(_SM_HI), x)
        t = _call(builder, "llvm.fma.v16f32", [xc, _vconst(fastexp._LOG2E_32), _vconst(fastexp._ROUND_32)])
        n = builder.fsub(t, _vconst(fastexp._ROUND_32))       # n = round(x log2 e) (1.5 2^23: round to integer)
        neg = builder.fneg(n)
        r = _call(builder, "llvm.fma.v16f32", [neg, _vconst(fastexp._LN2_HI_32), xc])
        r = _call(builder, "llvm.fma.v16f32", [neg, _vconst(fastexp._LN2_LO_32), r])
        p = _vconst(fastexp._C32_7)
        for c in (fastexp._C32_6, fastexp._C32_5, fastexp._C32_4, fastexp._C32_3, fastexp._C32_2,
                  fastexp._C32_1, fastexp._C32_0):
            p = _call(builder, "llvm.fma.v16f32", [p, r, _vconst(c)])
        # the integer n from t's bits (t = 1.5 2^23 + n exactly: n sits in the low mantissa bits); no
        # float-to-int conversion, which LLVM leaves undefined for nan
        ni = builder.sub(builder.bitcast(t, _IT), ir.Constant(_IT, [int(np.float32(fastexp._ROUND_32).view(np.int32))] * 16))
        scale = builder.bitcast(builder.shl(builder.add(ni, ir.Constant(_IT, [126] * 16)),
                                            ir.Constant(_IT, [23] * 16)), _VT)
        e = builder.fmul(builder.fadd(p, p), scale)
        return builder.select(builder.fcmp_ordered("<", xc, _vconst(_SM_LO)), _vconst(0.0), e)
    return f32x16(x), codegen


def _transpose_masks():
    # stage t swaps bit t of the row index with bit t of the column index: for the row pair
    # (r0, r1 = r0 + 2^t), out_r0[c] = in_r0[c] if bit t of c is 0 else in_r1[c - 2^t] and
    # out_r1[c] = in_r0[c + 2^t] if bit t of c is 0 else in_r1[c] (indices >= 16 pick from in_r1)
    stages = []
    for t in range(4):
        h = 1 << t
        m0 = [c if not c & h else 16 + c - h for c in range(16)]
        m1 = [c + h if not c & h else 16 + c for c in range(16)]
        stages.append((h, ir.Constant(_IT, m0), ir.Constant(_IT, m1)))
    return stages


@intrinsic
def transpose16x16(typingctx, src, s0, dst, d0):
    """dst[d0 + 16 c + r] = src[s0 + 16 r + c] for r, c < 16 (a 16 x 16 block, rows of 16 floats):
    16 loads, 4 stages of 16 two-input shuffles, 16 stores."""
    if not (_is_f32_vector_array(src) and _is_f32_vector_array(dst) and isinstance(s0, types.Integer)
            and isinstance(d0, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        sty, _, dty, _ = sig.args
        base_s, base_d = args[1], args[3]
        rows = [builder.load(_ptr(context, builder, sty, args[0],
                                  builder.add(base_s, ir.Constant(base_s.type, 16 * r))), align=4) for r in range(16)]
        for h, m0, m1 in _transpose_masks():
            out = list(rows)
            for r0 in range(16):
                if r0 & h:
                    continue
                r1 = r0 + h
                out[r0] = builder.shuffle_vector(rows[r0], rows[r1], m0)
                out[r1] = builder.shuffle_vector(rows[r0], rows[r1], m1)
            rows = out
        for r in range(16):
            builder.store(rows[r], _ptr(context, builder, dty, args[2],
                                        builder.add(base_d, ir.Constant(base_d.type, 16 * r))), align=4)
        return context.get_dummy_value()
    return types.none(src, s0, dst, d0), codegen
