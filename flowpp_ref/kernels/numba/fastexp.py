"""exp (and float32 expm1) in plain arithmetic, so that numba kernels' loops vectorise.

``math.exp`` / ``np.exp`` in a numba loop is a libm call that LLVM cannot vectorise
(numba's SVML path needs an SVML-patched llvmlite, which PyPI's is not). :func:`fast_exp`
is exp written in plain arithmetic, float32 or float64 by the argument's type; the loops
that call it become SIMD loops (8 float32 or 4 float64 lanes with AVX2). Used by the
mixture-of-logistics kernels (:mod:`flowpp_ref.kernels.numba.mixlogistic`), the softmax
(:mod:`~flowpp_ref.kernels.numba.softmax`), concat_elu / gate
(:mod:`~flowpp_ref.kernels.numba.activations`) and the float64 attention kernels
(:mod:`~flowpp_ref.kernels.numba.attention`).

Math::

    x = n ln2 + r,  |r| <= ln2 / 2     (Cody-Waite: ln2 in two parts; n rounded with the
                                        (v + 1.5 * 2^52) - 1.5 * 2^52 trick: floor would not vectorise)
    exp(r) = sum_{j <= 13} r^j / j!     (float64; degree 7 in float32), Horner
    exp(x) = exp(r) * 2^h * 2^(n - h),  h = floor(n / 2)   (2^k from its exponent bits; two
                                        factors so that n may reach 1025 / -1077 (float32: 129 / -150))

computed for x clamped to [-746, 710] (float32: [-104, 89]): below, exp underflows to 0;
above, the product overflows to inf; nan stays nan.

::

    expm1(x) = x + x^2/2! + ... + x^8/8!   for |x| <= 1/2 (float32; Horner, no cancellation)
             = exp(x) - 1                   otherwise;   float64: np.expm1 (libm)

Accuracy (tests: ``test_mixlogistic.py``, ``test_nn_attention_norm.py``): relative error of
exp <= 4.5e-16 (float64) / 1.5 float32 eps over the normal range, subnormal results rounded
once; float32 expm1 within 3e-7 relative.

Compiled without ``reassoc`` (``EXACT_OPTS``): reassociation would fold the rounding trick
``(v + c) - c`` into ``v`` and the two-constant reduction into one product (7 digits lost at
``|x| ~ 700``).

The kernels that inline these functions live in other modules of this folder; their on-disk
cache is keyed on every source file of the folder (:mod:`flowpp_ref.kernels.numba`), so a change
here recompiles them.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from flowpp_ref.kernels import NUMBA_OPTS

# NUMBA_OPTS with NumPy's error model, without reassoc (see above) and without cache (overloads)
EXACT_OPTS = {k: v for k, v in dict(NUMBA_OPTS, error_model="numpy").items() if k != "cache"}
EXACT_OPTS["fastmath"] = set(NUMBA_OPTS["fastmath"]) - {"reassoc"}


@intrinsic
def _i64_bits_as_f64(typingctx, v):
    """Reinterpret the bits of an int64 as a float64 (an LLVM bitcast, vectorisable)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _i32_bits_as_f32(typingctx, v):
    """Reinterpret the bits of an int32 as a float32."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01    # ln 2 split so that n * _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.90821492927058770002e-10
_ROUND = 6755399441055744.0             # 1.5 * 2^52: (v + _ROUND) - _ROUND rounds |v| < 2^51 to an integer

_F = np.float32
_LOG2E_32 = _F(1.4426950408889634)
_LN2_HI_32 = _F(0.693359375)            # 8 significant bits: n * _LN2_HI_32 exact for |n| < 2^15
_LN2_LO_32 = _F(-2.12194440e-4)
_ROUND_32 = _F(12582912.0)              # 1.5 * 2^23
_LO_32, _HI_32, _I127, _I23 = _F(-104.0), _F(89.0), np.int32(127), np.int32(23)
_C32 = [_F(1.0 / math.factorial(j)) for j in range(8)]
_C32_0, _C32_1, _C32_2, _C32_3, _C32_4, _C32_5, _C32_6, _C32_7 = _C32
_HALF_32 = _F(0.5)
_E32 = tuple(_F(1.0 / math.factorial(j)) for j in range(2, 9))  # 1/2!, ..., 1/8! (expm1)


def _exp64_impl(x):
    xc = min(max(x, -746.0), 710.0)
    n = (xc * _LOG2E + _ROUND) - _ROUND           # nearest integer to x / ln2 (floor would not vectorise)
    r = (xc - n * _LN2_HI) - n * _LN2_LO          # |r| <= ln2 / 2
    p = 1.0 / 6227020800.0                        # sum_{j<=13} r^j / j!  (Horner)
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    ni = np.int64(np.int32(n))                    # n in [-1077, 1025]
    h = ni >> 1                                   # 2^n = 2^h 2^(n-h): both factors are normal
    return p * _i64_bits_as_f64((h + 1023) << 52) * _i64_bits_as_f64((ni - h + 1023) << 52)


def _exp32_impl(x):
    xc = min(max(x, _LO_32), _HI_32)
    n = (xc * _LOG2E_32 + _ROUND_32) - _ROUND_32
    r = (xc - n * _LN2_HI_32) - n * _LN2_LO_32
    p = _C32_7                                    # sum_{j<=7} r^j / j!
    p = p * r + _C32_6
    p = p * r + _C32_5
    p = p * r + _C32_4
    p = p * r + _C32_3
    p = p * r + _C32_2
    p = p * r + _C32_1
    p = p * r + _C32_0
    ni = np.int32(n)                              # n in [-150, 129]
    h = ni >> np.int32(1)
    return p * _i32_bits_as_f32((h + _I127) << _I23) * _i32_bits_as_f32((ni - h + _I127) << _I23)


def _expm1_32_impl(x):
    t = _E32[6]                                   # x + x^2 (1/2! + x/3! + ... + x^6/8!)
    t = t * x + _E32[5]
    t = t * x + _E32[4]
    t = t * x + _E32[3]
    t = t * x + _E32[2]
    t = t * x + _E32[1]
    t = t * x + _E32[0]
    small = x + x * x * t
    return small if abs(x) <= _HALF_32 else fast_exp(x) - _C32_0


def fast_exp(x):
    """exp(x) in plain arithmetic inside numba kernels (float32 or float64 by type)."""
    return math.exp(x)


def fast_expm1(x):
    """expm1(x): the float32 polynomial inside numba kernels, libm for float64."""
    return math.expm1(x)


@overload(fast_exp, jit_options=EXACT_OPTS)
def _fast_exp_overload(x):
    if x == types.float32:
        return _exp32_impl
    return _exp64_impl


@overload(fast_expm1, jit_options=EXACT_OPTS)
def _fast_expm1_overload(x):
    if x == types.float32:
        return _expm1_32_impl
    return lambda x: np.expm1(x)
