"""Sixteen float32 lanes as one value inside numba kernels (LLVM ``<16 x float>``).

numba vectorises innermost loops only: a sum over keys kept per query (16 queries side by side)
would live in memory, loaded and stored for every key. A value of type :data:`f32x16` is an LLVM
vector held in a register across any loop, and the functions below are single LLVM operations
on it (``fma16`` is ``llvm.fma.v16f32``), so a kernel written with them says exactly which
vector instructions run. Used by the query-lanes forward and the tiled backward of
:mod:`flowpp_ref.kernels.numba.attention`; each function's plain meaning is in its docstring and
``tests/test_fused_attention.py`` checks every one against NumPy.

* ``splat16(x)``: the float32 ``x`` in all 16 lanes;
* ``load16(a, i)`` / ``store16(a, i, v)``: lanes ``a[i:i+16]`` of a 1-d float32 array (no bounds check:
  the caller keeps ``i + 16 <= a.size``);
* ``add16``, ``sub16``, ``mul16``, ``fma16(a, b, c) = a * b + c`` (one rounding), ``max16`` (``a`` where
  ``a > b`` else ``b``: a nan in ``b`` is kept);
* ``exp2_16(y)``: 2^y lane by lane for the query-lanes kernels, whose scores are in log2 units (the
  queries scaled by log2 e): 7 multiply-class operations where the natural-unit exp of
  :func:`flowpp_ref.kernels.numba.attention.softmax_exp` takes 11; within 1 ulp of 2^y (0 below
  -124.8, the softmax exp's -86.5; inf from 128; nan stays nan);
* ``lane(v, t)``: lane ``t`` as a float32;
* ``transpose16x16(src, s0, dst, d0)``: ``dst[d0 + 16 c + r] = src[s0 + 16 r + c]`` (r, c < 16), by
  4 stages of 16 two-input shuffles (stage t swaps bit t of the row and of the column index).

A 16-lane float32 value fills one AVX-512 register; on AVX2, LLVM splits each 16-lane value into
two 8-lane halves (the same operations, lane by lane).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

from flowpp_ref.kernels.numba import fastexp


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


_SM_LO, _SM_HI = -86.5, 89.0              # as the float32 softmax_exp of kernels/numba/attention.py


# 2^y on the softmax's range, for the query-lanes kernels (scores in log2 units): 2 2^r ~ sum_k C2_k r^k
# on |r| <= 1/2, the degree-6 near-minimax fit of 2 2^r (Lawson-weighted least squares, relative error
# 1.9e-9 in float64, 7.9e-8 with float32 coefficients and float32 Horner steps: < 1 ulp)
EXP2_C32 = tuple(np.float32(c) for c in (2.0, 1.3862944, 0.48045292, 0.11100657, 0.019236978, 0.0026799862,
                                         0.00030691622))
EXP2_LO, EXP2_HI = np.float32(-86.5 * 1.4426950408889634), np.float32(129.0)   # -124.79..: -86.5 in natural units


@intrinsic
def exp2_16(typingctx, y):
    if y != f32x16:
        return None

    def codegen(context, builder, sig, args):
        # 2^y = (2 2^r) 2^(n-1), n = round(y), r = y - n (exact: |r| <= 1/2), 2 2^r by EXP2_C32 (Horner);
        # 0 where y < EXP2_LO, y clamped at 129 (2^y = inf above 128; nan: kept). Against the softmax's
        # natural-unit exp (softmax_exp): no multiply by log2 e and no two-part ln 2 reduction (3
        # multiply-adds fewer), and a degree-6 polynomial in place of degree 7.
        y = args[0]
        yc = builder.select(builder.fcmp_ordered(">", y, _vconst(EXP2_HI)), _vconst(EXP2_HI), y)
        t = builder.fadd(yc, _vconst(fastexp._ROUND_32))             # 1.5 2^23 + round(y), exactly
        ni = builder.sub(builder.bitcast(t, _IT), ir.Constant(_IT, [int(np.float32(fastexp._ROUND_32).view(np.int32))] * 16))
        n = builder.sitofp(ni, _VT)                                  # from the bits: no (t - R) that reassoc could fold
        r = builder.fsub(yc, n)
        p = _vconst(EXP2_C32[6])
        for c in EXP2_C32[5::-1]:
            p = _call(builder, "llvm.fma.v16f32", [p, r, _vconst(c)])
        scale = builder.bitcast(builder.shl(builder.add(ni, ir.Constant(_IT, [126] * 16)),
                                            ir.Constant(_IT, [23] * 16)), _VT)
        e = builder.fmul(p, scale)
        return builder.select(builder.fcmp_ordered("<", yc, _vconst(EXP2_LO)), _vconst(0.0), e)
    return f32x16(y), codegen


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
