"""numba kernels for the mixture of logistics: fused forward, backward, inverse CDF.

References (plain ``xp`` code, the math to read) in :mod:`flowpp_ref.bijections.mixlogistic`:

* :func:`cdf_pdf_forward`   <-> ``_ref_cdf_pdf``
* :func:`cdf_pdf_backward`  <-> ``_ref_cdf_pdf_backward``
* :func:`invcdf_bisection`  <-> ``_ref_invcdf_bisection``
* :func:`invcdf_hybrid`     <-> ``_ref_invcdf_hybrid``

Inputs: C-contiguous ``x`` (or ``y``) ``[N]`` and ``logits, means, logscales``
``[N, K]``, all float32 or all float64; outputs are preallocated by the caller.
The loops over the K components run in the inputs' dtype (as the reference
does); per-element control logic (bisection and Newton steps, brackets), the
log-space fallback and the float32 -> float64 bookkeeping run in float64.
Each public function is a small Python driver: the work on a chunk of ``_CHUNK``
elements is one jitted ``_*_chunk`` function; a jitted ``_*_range`` function runs
chunks ``c0 .. c1-1`` with its own scratch rows and releases the GIL
(``nogil=True``), and :func:`_run_chunks` splits the chunks into
``numba.get_num_threads()`` contiguous ranges run by Python threads (only from
``PARALLEL_MIN_WORK`` (element, component) pairs on; smaller work runs in the
calling thread). Threads rather than ``parallel=True``/``prange``: the same
compiled code serves both cases (results do not depend on the thread count) and
nothing extra is compiled (a ``prange`` version of these kernels is one more,
slow-to-compile variant of each).

Where the speed comes from (same math as the reference):

1. *Linear-space sums.* Per element the three mixtures are summed directly,
   ``F = sum_k w_k sig(z_k)``, ``1-F = sum_k w_k sig(-z_k)``,
   ``p = sum_k w_k exp(-s_k) sig(z_k) sig(-z_k)``, with ``sig(+-z)`` from one
   ``e = exp(-|z|)``: ``sig(|z|) = 1/(1+e)``, ``sig(-|z|) = e/(1+e)``. That is
   three exponentials per (element, component) -- softmax weight, ``exp(-s)``,
   ``exp(-|z|)`` -- against the reference's seven transcendental calls. Sums of
   positive terms lose no precision, they can only underflow: when one of the
   three sums falls below ``_tiny`` (1e-280 in float64, 1e-28 in float32: deep
   tails, ``|z|`` > ~640 or ~64), the element is recomputed in float64 by the
   max-shifted log-space path :func:`_log_eval` (the reference's formulas, libm
   ``exp``/``log1p``). Above ``_tiny`` the terms dropped by underflow are
   negligible to round-off (each is below the smallest normal number).
2. *A vectorisable exp.* ``math.exp`` is a libm call that LLVM cannot vectorise
   (numba's SVML path needs an SVML-patched llvmlite); ``_exp`` (:func:`flowpp_ref.kernels.numba.fastexp.fast_exp`)
   is exp written in plain arithmetic, so the component loops become SIMD loops
   (8 float32 or 4 float64 lanes with AVX2). Relative error within 4.5e-16 (float64) /
   1.5 float32 eps over the normal range (the bounds the tests check); subnormal results
   are rounded once.
3. *NumPy's error model* (``_OPTS = NUMBA_OPTS + error_model="numpy"``): with
   Python's model every division carries a zero-divisor check (to raise
   ZeroDivisionError) that keeps LLVM from vectorising. Every divisor here is >= 1 or
   guarded (``1 + e``, the sums ``>= _tiny``, ``d > 0``), so no check is lost.

Bisection reproduces the release's *global* stopping rule (stop when
``max_i |x_new_i - x_i| <= tol``) without a barrier per step: the elements of a
chunk step in lockstep (the inner loop runs over the chunk's elements, with the
parameters transposed to ``[K, CHUNK]``: SIMD across elements, and the
elements' serial dependency chains -- each step needs the previous F -- overlap)
until every element's step has been ``<= tol`` (count T_c), then all chunks
continue to T = max_c T_c. After the first step every step halves (the bracket
halves), so this equals the release's loop up to round-off. In float32 the
bracket logic runs in float64 and F is evaluated at the float32-rounded point.
"""
from __future__ import annotations

import concurrent.futures
import math

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from flowpp_ref.kernels import NUMBA_OPTS
from flowpp_ref.kernels.numba.fastexp import fast_exp as _exp

_CHUNK = 64
# Below this many (element, component) pairs everything runs in the calling thread: handing
# work to other threads costs tens to hundreds of microseconds, more than the work itself.
PARALLEL_MIN_WORK = 1 << 15

# NUMBA_OPTS plus NumPy's error model (see the module docstring, point 3).
_OPTS = dict(NUMBA_OPTS, error_model="numpy")

_TINY64 = 1e-280
_TINY32 = 1e-28


def _n_chunks(N):
    return (N + _CHUNK - 1) // _CHUNK


_POOL = {}


def _num_threads():
    """Threads for the kernels: numba's setting (NUMBA_NUM_THREADS / numba.set_num_threads)."""
    return numba.get_num_threads()


def _run_chunks(range_fn, logits, *args):
    """Run ``range_fn(c0, c1, *args)`` over all chunks: in this thread for small work, else
    split into ``numba.get_num_threads()`` contiguous chunk ranges run by Python threads
    (the jitted range functions release the GIL, ``nogil=True``)."""
    nch = _n_chunks(logits.shape[0])
    nthr = min(_num_threads(), nch) if logits.size >= PARALLEL_MIN_WORK else 1
    if nthr <= 1:
        range_fn(0, nch, *args)
        return
    pool = _POOL.get(nthr)
    if pool is None:
        pool = _POOL[nthr] = concurrent.futures.ThreadPoolExecutor(nthr - 1, thread_name_prefix="flowpp-mixlog")
    cuts = [nch * t // nthr for t in range(nthr + 1)]
    # ranges 1.. on the pool, range 0 in this thread (one thread fewer to wake: a wake-up costs
    # about as much as a whole call at the sizes of a small model)
    futures = [pool.submit(range_fn, cuts[t], cuts[t + 1], *args) for t in range(1, nthr)]
    try:
        range_fn(cuts[0], cuts[1], *args)
    finally:
        for f in futures:
            f.result()


# ------------------------------------------------------------------ dtype helpers
def _as(v, like):
    """v as a scalar of like's float type (like: an array or a scalar)."""
    return np.asarray(like).dtype.type(v)


@overload(_as, jit_options={k: v for k, v in _OPTS.items() if k != "cache"})
def _as_overload(v, like):
    dt = like.dtype if isinstance(like, types.Array) else like
    if dt == types.float32:
        return lambda v, like: np.float32(v)
    return lambda v, like: np.float64(v)


def _tiny(like):
    return _TINY32 if np.asarray(like).dtype == np.float32 else _TINY64


@overload(_tiny)
def _tiny_overload(like):
    dt = like.dtype if isinstance(like, types.Array) else like
    if dt == types.float32:
        return lambda like: _TINY32
    return lambda like: _TINY64


# ------------------------------------------------------------------ vectorisable exp
# _exp: exp in plain arithmetic (flowpp_ref/kernels/numba/fastexp.py, point 2 above)
@numba.njit(**_OPTS)
def exp_array(a, out):
    """out[i] = _exp(a[i]) in a's dtype; exposed for the test of the vectorisable exp."""
    for i in range(a.size):
        out[i] = _exp(a[i])


# ------------------------------------------------------------------ per-element pieces
@numba.njit(**_OPTS)
def _row_max(l, K):
    m = l[0]
    for k in range(1, K):
        v = l[k]
        if v > m:
            m = v
    return m


@numba.njit(**_OPTS)
def _prep(l, s, K, w, logw, inv):
    """w_k = softmax(l)_k, inv_k = exp(-s_k) (compute dtype), logw_k = log w_k (float64)."""
    ml = _row_max(l, K)
    sl = _as(0.0, l)
    for k in range(K):
        e = _exp(l[k] - ml)
        w[k] = e
        sl += e
        inv[k] = _exp(-s[k])
    lsl = math.log(float(sl))
    isl = _as(1.0, l) / sl
    for k in range(K):
        w[k] = w[k] * isl
        logw[k] = float(l[k]) - float(ml) - lsl


@numba.njit(**_OPTS)
def _log_eval(x, logw, mu, inv, s, K):
    """(log F, log(1-F), log p) in float64 log space, max-shifted (the reference's formulas)."""
    mF = -np.inf
    mG = -np.inf
    mP = -np.inf
    for k in range(K):
        z = (x - float(mu[k])) * float(inv[k])
        # each term is its shift minus L in [0, 2 log 2], so the sums below are >= 1/4
        tF = logw[k] + min(z, 0.0)
        tG = logw[k] - max(z, 0.0)
        tP = logw[k] - abs(z) - float(s[k])
        if tF > mF:
            mF = tF
        if tG > mG:
            mG = tG
        if tP > mP:
            mP = tP
    SF = 0.0
    SG = 0.0
    SP = 0.0
    for k in range(K):
        z = (x - float(mu[k])) * float(inv[k])
        L = math.log1p(math.exp(-abs(z)))
        SF += math.exp(logw[k] + min(z, 0.0) - L - mF)                 # log sig(z) = min(z,0) - L
        SG += math.exp(logw[k] - max(z, 0.0) - L - mG)                 # log sig(-z) = -max(z,0) - L
        SP += math.exp(logw[k] - abs(z) - 2.0 * L - float(s[k]) - mP)  # log p_k
    return mF + math.log(SF), mG + math.log(SG), mP + math.log(SP)


@numba.njit(**_OPTS)
def _lin_sums(x, w, mu, inv, K):
    """(F, 1-F, p) summed in linear space (compute dtype) with weights w, inv = exp(-s)."""
    xc = _as(x, mu)
    zero = _as(0.0, mu)
    one = _as(1.0, mu)
    SF = zero
    SG = zero
    SP = zero
    for k in range(K):
        z = (xc - mu[k]) * inv[k]
        e = _exp(-abs(z))
        r = one / (one + e)                      # sig(|z|)
        er = e * r                               # sig(-|z|)
        pos = z >= zero
        SF += w[k] * (r if pos else er)          # w sig(z)
        SG += w[k] * (er if pos else r)          # w sig(-z)
        SP += w[k] * inv[k] * er * r             # w exp(-s) sig(z) sig(-z)
    return SF, SG, SP


@numba.njit(**_OPTS)
def _eval(x, w, logw, mu, inv, s, K):
    """(log F, log(1-F), log p) as float64: linear sums, log-space fallback in the deep tails."""
    SF, SG, SP = _lin_sums(x, w, mu, inv, K)
    tiny = _tiny(mu)
    if SF >= tiny and SG >= tiny and SP >= tiny:
        return math.log(float(SF)), math.log(float(SG)), math.log(float(SP))
    return _log_eval(x, logw, mu, inv, s, K)


# ------------------------------------------------------------------ fused forward
@numba.njit(**_OPTS)
def _forward_chunk(c, x, logits, means, logscales, logF, log1mF, logpdf, w, logw, inv):
    """Elements [c * _CHUNK, (c + 1) * _CHUNK) of cdf_pdf_forward (w, logw, inv: scratch rows)."""
    N, K = logits.shape
    zero = _as(0.0, logits)
    one = _as(1.0, logits)
    tiny = _tiny(logits)
    for i in range(c * _CHUNK, min(N, (c + 1) * _CHUNK)):
        l = logits[i]
        mu = means[i]
        s = logscales[i]
        xi = _as(x[i], logits)
        ml = _row_max(l, K)
        SL = zero
        SF = zero
        SG = zero
        SP = zero
        for k in range(K):                   # one fused SIMD loop: 3 exps per component
            E = _exp(l[k] - ml)              # softmax numerator
            ik = _exp(-s[k])
            z = (xi - mu[k]) * ik
            e = _exp(-abs(z))
            r = one / (one + e)
            er = e * r
            pos = z >= zero
            SL += E
            SF += E * (r if pos else er)
            SG += E * (er if pos else r)
            SP += E * ik * er * r
        if SF >= tiny and SG >= tiny and SP >= tiny:
            lsl = math.log(SL)
            logF[i] = math.log(SF) - lsl
            log1mF[i] = math.log(SG) - lsl
            logpdf[i] = math.log(SP) - lsl
        else:                                # deep tail: float64 log-space path
            _prep(l, s, K, w, logw, inv)
            a, b, d = _log_eval(float(xi), logw, mu, inv, s, K)
            logF[i] = a
            log1mF[i] = b
            logpdf[i] = d


@numba.njit(**_OPTS)
def _cdf_pdf_forward_range(c0, c1, x, logits, means, logscales, logF, log1mF, logpdf):
    """Chunks c0 .. c1-1 (one thread's share; the GIL is released)."""
    K = logits.shape[1]
    w, logw, inv = np.empty(K, logits.dtype), np.empty(K), np.empty(K, logits.dtype)
    for c in range(c0, c1):
        _forward_chunk(c, x, logits, means, logscales, logF, log1mF, logpdf, w, logw, inv)


def cdf_pdf_forward(x, logits, means, logscales, logF, log1mF, logpdf):
    """logF[i], log1mF[i], logpdf[i] of element i (outputs written in place)."""
    _run_chunks(_cdf_pdf_forward_range, logits, x, logits, means, logscales, logF, log1mF, logpdf)


# ------------------------------------------------------------------ fused backward
@numba.njit(**_OPTS)
def _backward_chunk(c, x, logits, means, logscales, gF, gG, gP, dx, dlogits, dmeans, dlogscales,
                    Eb, invb, zb, spb, snb, logw):
    """Elements of chunk c of cdf_pdf_backward (the arguments after dlogscales: scratch rows)."""
    N, K = logits.shape
    zero = _as(0.0, logits)
    one = _as(1.0, logits)
    tiny = _tiny(logits)
    for i in range(c * _CHUNK, min(N, (c + 1) * _CHUNK)):
        l = logits[i]
        mu = means[i]
        s = logscales[i]
        xi = _as(x[i], logits)
        ml = _row_max(l, K)
        SL = zero
        SF = zero
        SG = zero
        SP = zero
        for k in range(K):
            E = _exp(l[k] - ml)
            ik = _exp(-s[k])
            z = (xi - mu[k]) * ik
            e = _exp(-abs(z))
            r = one / (one + e)
            er = e * r
            pos = z >= zero
            sp = r if pos else er            # sig(z)
            sn = er if pos else r            # sig(-z)
            Eb[k] = E
            invb[k] = ik
            zb[k] = z
            spb[k] = sp
            snb[k] = sn
            SL += E
            SF += E * sp
            SG += E * sn
            SP += E * ik * sp * sn
        gf = _as(gF[i], logits)
        gg = _as(gG[i], logits)
        gp = _as(gP[i], logits)
        gsum = gf + gg + gp
        iSL = one / SL
        if SF >= tiny and SG >= tiny and SP >= tiny:
            iSF = one / SF
            iSG = one / SG
            iSP = one / SP
            dxi = zero
            for k in range(K):
                E = Eb[k]
                sp = spb[k]
                sn = snb[k]
                rF = E * sp * iSF                    # w sig(z) / F
                rG = E * sn * iSG                    # w sig(-z) / (1-F)
                rP = E * invb[k] * sp * sn * iSP     # w p_k / p
                dlogits[i, k] = gf * rF + gg * rG + gp * rP - E * iSL * gsum
                dz = gf * rF * sn - gg * rG * sp + gp * rP * (sn - sp)
                dxi += dz * invb[k]
                dmeans[i, k] = -dz * invb[k]
                dlogscales[i, k] = -dz * zb[k] - gp * rP
            dx[i] = dxi
        else:                                        # deep tail: float64 log-space responsibilities
            lsl = float(ml) + math.log(float(SL))
            for k in range(K):
                logw[k] = float(l[k]) - lsl
            lF, lG, lP = _log_eval(float(xi), logw, mu, invb, s, K)
            g64f, g64g, g64p = float(gf), float(gg), float(gp)
            dx64 = 0.0
            for k in range(K):
                z = float(zb[k])
                e = math.exp(-abs(z))
                L = math.log1p(e)
                lsp = min(z, 0.0) - L
                lsn = -max(z, 0.0) - L
                sp = 1.0 / (1.0 + e) if z >= 0.0 else e / (1.0 + e)
                sn = e / (1.0 + e) if z >= 0.0 else 1.0 / (1.0 + e)
                ik = float(invb[k])
                rF = math.exp(logw[k] + lsp - lF)
                rG = math.exp(logw[k] + lsn - lG)
                rP = math.exp(logw[k] + lsp + lsn - float(s[k]) - lP)
                dlogits[i, k] = g64f * rF + g64g * rG + g64p * rP - math.exp(logw[k]) * float(gsum)
                dz = g64f * rF * sn - g64g * rG * sp + g64p * rP * (sn - sp)
                dx64 += dz * ik
                dmeans[i, k] = -dz * ik
                dlogscales[i, k] = -dz * z - g64p * rP
            dx[i] = dx64


@numba.njit(**_OPTS)
def _cdf_pdf_backward_range(c0, c1, x, logits, means, logscales, gF, gG, gP, dx, dlogits, dmeans, dlogscales):
    """Chunks c0 .. c1-1 (one thread's share; the GIL is released)."""
    K = logits.shape[1]
    dt = logits.dtype
    Eb, invb, zb = np.empty(K, dt), np.empty(K, dt), np.empty(K, dt)
    spb, snb, logw = np.empty(K, dt), np.empty(K, dt), np.empty(K)
    for c in range(c0, c1):
        _backward_chunk(c, x, logits, means, logscales, gF, gG, gP, dx, dlogits, dmeans, dlogscales,
                        Eb, invb, zb, spb, snb, logw)


def cdf_pdf_backward(x, logits, means, logscales, gF, gG, gP, dx, dlogits, dmeans, dlogscales):
    """Gradients of (logF, log1mF, logpdf) given their upstream gradients gF, gG, gP.

    Per component (formulas of mixlogistic.py's docstring):
      c_k = gF rF_k + gG rG_k + gP rP_k;  dl_k = c_k - w_k (gF + gG + gP)
      dz_k = gF rF_k sig(-z_k) - gG rG_k sig(z_k) + gP rP_k (sig(-z_k) - sig(z_k))
      dx = sum_k dz_k exp(-s_k);  dmu_k = -dz_k exp(-s_k);  ds_k = -dz_k z_k - gP rP_k
    """
    _run_chunks(_cdf_pdf_backward_range, logits, x, logits, means, logscales, gF, gG, gP,
                dx, dlogits, dmeans, dlogscales)


# ------------------------------------------------------------------ inverse CDF
@numba.njit(**_OPTS)
def _bounds(y, mu, s, K):
    """The release's bisection bounds, widened to the component quantiles (see mixlogistic)."""
    ssum = 0.0
    for k in range(K):
        ssum += math.exp(float(s[k]))
    t = math.log(y) - math.log1p(-y)
    lb = np.inf
    ub = -np.inf
    for k in range(K):
        m = float(mu[k])
        q = m + math.exp(float(s[k])) * t
        lb = min(lb, min(m - 20.0 * ssum, q))
        ub = max(ub, max(m + 20.0 * ssum, q))
    return lb, ub


@numba.njit(**_OPTS)
def _bisect_setup(c, y, logits, means, logscales, Wt, INVt, MUt, Y, LY):
    """Chunk c's weights, exp(-s) and means transposed to [K, CHUNK] (SIMD over elements), y, log y."""
    N, K = logits.shape
    i0 = c * _CHUNK
    n = min(N, i0 + _CHUNK) - i0
    for j in range(n):
        i = i0 + j
        l = logits[i]
        s = logscales[i]
        ml = _row_max(l, K)
        sl = _as(0.0, l)
        for k in range(K):
            e = _exp(l[k] - ml)
            Wt[k, j] = e
            sl += e
            INVt[k, j] = _exp(-s[k])
            MUt[k, j] = means[i, k]
        isl = _as(1.0, l) / sl
        for k in range(K):
            Wt[k, j] = Wt[k, j] * isl                # softmax weights, as _prep
        Y[j] = float(y[i])
        LY[j] = math.log(Y[j])
    return n


@numba.njit(**_OPTS)
def _bisect_step(c, n, logits, means, logscales, Wt, INVt, MUt, Y, LY, X, LB, UB, D, XC, F, w, logw, inv):
    """One step of the release's bisection for the n elements of chunk c, in lockstep.

    F(x_j) is summed for all elements at once (the inner loop runs over elements: SIMD, and
    the elements' dependency chains overlap); then, per element, ``F > y`` picks the half:
    ``x <- (x + lb)/2, ub <- x`` or ``x <- (x + ub)/2, lb <- x``. D[j] = |x_new - x|.
    """
    K = logits.shape[1]
    zero = _as(0.0, MUt)
    one = _as(1.0, MUt)
    for j in range(n):
        XC[j] = _as(X[j], MUt)                       # evaluated at x rounded to the compute dtype
        F[j] = zero
    for k in range(K):
        for j in range(n):
            z = (XC[j] - MUt[k, j]) * INVt[k, j]
            e = _exp(-abs(z))
            r = one / (one + e)
            F[j] += Wt[k, j] * (r if z >= zero else e * r)      # w sig(z)
    tiny = _tiny(MUt)
    i0 = c * _CHUNK
    for j in range(n):
        if F[j] >= tiny:
            gt = float(F[j]) > Y[j]
        elif Y[j] >= 2.0 * tiny:                     # deep left tail: F < tiny + K * (smallest normal)
            gt = False
        else:                                        # ... and y there too: compare in log space
            i = i0 + j
            _prep(logits[i], logscales[i], K, w, logw, inv)
            lF, _, _ = _log_eval(float(XC[j]), logw, means[i], inv, logscales[i], K)
            gt = lF > LY[j]
        x = X[j]
        nx = (x + LB[j]) / 2.0 if gt else (x + UB[j]) / 2.0    # F(x) > y: root left of x
        UB[j] = x if gt else UB[j]
        LB[j] = LB[j] if gt else x
        D[j] = abs(nx - x)
        X[j] = nx


@numba.njit(**_OPTS)
def _bisection_phase1_chunk(c, y, logits, means, logscales, tol, max_iters, xs, lbs, ubs, oks,
                            Wt, INVt, MUt, Y, LY, X, LB, UB, D, XC, F, w, inv, logw):
    """Chunk c in lockstep until each element's step has been <= tol (or max_iters).

    Returns the chunk's step count T_c; the state (x, lb, ub) is saved for phase 2.
    """
    N, K = logits.shape
    n = _bisect_setup(c, y, logits, means, logscales, Wt, INVt, MUt, Y, LY)
    i0 = c * _CHUNK
    for j in range(n):
        LB[j], UB[j] = _bounds(Y[j], means[i0 + j], logscales[i0 + j], K)
        X[j] = 0.0                                   # the release starts at 0
        oks[i0 + j] = False
    it = 0
    remaining = n
    while remaining > 0 and it < max_iters:
        _bisect_step(c, n, logits, means, logscales, Wt, INVt, MUt, Y, LY, X, LB, UB, D, XC, F, w, logw, inv)
        it += 1
        remaining = 0
        for j in range(n):
            if not oks[i0 + j]:
                if D[j] <= tol:
                    oks[i0 + j] = True
                else:
                    remaining += 1
    for j in range(n):
        xs[i0 + j] = X[j]
        lbs[i0 + j] = LB[j]
        ubs[i0 + j] = UB[j]
    return it


@numba.njit(**_OPTS)
def _bisection_phase2_chunk(c, Tc, T, y, logits, means, logscales, xs, lbs, ubs, x_out, evals_out,
                            Wt, INVt, MUt, Y, LY, X, LB, UB, D, XC, F, w, inv, logw):
    """Continue chunk c from its count Tc to the global count T; write x_out, evals_out."""
    N, K = logits.shape
    i0 = c * _CHUNK
    n = min(N, i0 + _CHUNK) - i0
    if Tc < T:
        _bisect_setup(c, y, logits, means, logscales, Wt, INVt, MUt, Y, LY)
        for j in range(n):
            X[j] = xs[i0 + j]
            LB[j] = lbs[i0 + j]
            UB[j] = ubs[i0 + j]
        for _ in range(T - Tc):
            _bisect_step(c, n, logits, means, logscales, Wt, INVt, MUt, Y, LY, X, LB, UB, D, XC, F, w, logw, inv)
        for j in range(n):
            xs[i0 + j] = X[j]
    for j in range(n):
        x_out[i0 + j] = xs[i0 + j]
        evals_out[i0 + j] = T


@numba.njit(**_OPTS)
def _bisect_scratch(K, dt):
    """Scratch of the lockstep bisection for one thread."""
    C = _CHUNK
    return (np.empty((K, C), dt), np.empty((K, C), dt), np.empty((K, C), dt),
            np.empty((6, C)), np.empty((2, C), dt), np.empty(K, dt), np.empty(K, dt), np.empty(K))


@numba.njit(**_OPTS)
def _bisection_phase1_range(c0, c1, y, logits, means, logscales, tol, max_iters, xs, lbs, ubs, oks, Tc):
    """Phase 1 for chunks c0 .. c1-1: Tc[c] = the chunk's step count."""
    K = logits.shape[1]
    Wt, INVt, MUt, V, V2, w, inv, logw = _bisect_scratch(K, logits.dtype)
    for c in range(c0, c1):
        Tc[c] = _bisection_phase1_chunk(c, y, logits, means, logscales, tol, max_iters, xs, lbs, ubs, oks,
                                        Wt, INVt, MUt, V[0], V[1], V[2], V[3], V[4], V[5], V2[0], V2[1],
                                        w, inv, logw)


@numba.njit(**_OPTS)
def _bisection_phase2_range(c0, c1, T, Tc, y, logits, means, logscales, xs, lbs, ubs, x_out, evals_out):
    """Phase 2 for chunks c0 .. c1-1: continue to the global count T."""
    K = logits.shape[1]
    Wt, INVt, MUt, V, V2, w, inv, logw = _bisect_scratch(K, logits.dtype)
    for c in range(c0, c1):
        _bisection_phase2_chunk(c, Tc[c], T, y, logits, means, logscales, xs, lbs, ubs, x_out, evals_out,
                                Wt, INVt, MUt, V[0], V[1], V[2], V[3], V[4], V[5], V2[0], V2[1], w, inv, logw)


def invcdf_bisection(y, logits, means, logscales, tol, max_iters, x_out, evals_out):
    """The release's bisection; returns (iterations T, converged). Writes x_out, evals_out (= T)."""
    N = y.shape[0]
    xs, lbs, ubs = np.empty(N), np.empty(N), np.empty(N)
    oks = np.zeros(N, dtype=np.bool_)
    Tc = np.zeros(_n_chunks(N), dtype=np.int64)
    _run_chunks(_bisection_phase1_range, logits, y, logits, means, logscales, float(tol), int(max_iters),
                xs, lbs, ubs, oks, Tc)
    T = int(Tc.max()) if Tc.size else 0
    _run_chunks(_bisection_phase2_range, logits, T, Tc, y, logits, means, logscales, xs, lbs, ubs,
                x_out, evals_out)
    return T, bool(oks.all())


@numba.njit(**_OPTS)
def _hybrid_chunk(c, y, logits, means, logscales, tol, max_iters, x_out, evals_out, oks, w, logw, inv):
    """Safeguarded Newton on logit F (rtsafe) for the elements of chunk c."""
    N, K = logits.shape
    for i in range(c * _CHUNK, min(N, (c + 1) * _CHUNK)):
        _prep(logits[i], logscales[i], K, w, logw, inv)
        mu = means[i]
        s = logscales[i]
        yi = float(y[i])
        t = math.log(yi) - math.log1p(-yi)            # logit(y)
        lb = np.inf
        ub = -np.inf
        x = 0.0
        for k in range(K):                            # bracket: component quantiles
            q = float(mu[k]) + math.exp(float(s[k])) * t
            lb = min(lb, q)
            ub = max(ub, q)
            x += float(w[k]) * q
        x = min(max(x, lb), ub)                       # start: sum_k w_k q_k
        n = 0
        done = not (ub - lb > tol)
        if done:
            x = (lb + ub) / 2.0                       # K = 1: lb = ub = the root
        dx = ub - lb
        dx_old = dx
        while not done and n < max_iters:
            lF, lG, lP = _eval(x, w, logw, mu, inv, s, K)
            n += 1
            g = lF - lG - t                           # logit F(x) - logit y
            if g < 0.0:
                lb = x
            elif g > 0.0:
                ub = x
            d = math.exp(lP - lF - lG)                # d logit F / dx = p / (F (1-F))
            nstep = -g / d if d > 0.0 else np.nan     # Newton step
            newton = x + nstep
            if g == 0.0:
                x_new = x
            elif abs(nstep) <= tol:
                x_new = newton                        # converged: accept (may round to x itself)
            elif (math.isfinite(newton) and newton > lb and newton < ub
                    and abs(2.0 * g) <= abs(dx_old * d)):
                x_new = newton                        # inside the bracket and at least halving
            else:
                x_new = (lb + ub) / 2.0               # bisection
            step = x_new - x
            dx_old = dx
            dx = step
            x = x_new
            done = abs(step) <= tol or ub - lb <= tol
        x_out[i] = x
        evals_out[i] = n
        oks[i] = done


@numba.njit(**_OPTS)
def _invcdf_hybrid_range(c0, c1, y, logits, means, logscales, tol, max_iters, x_out, evals_out, oks):
    """Chunks c0 .. c1-1 (one thread's share; the GIL is released)."""
    K = logits.shape[1]
    dt = logits.dtype
    w, logw, inv = np.empty(K, dt), np.empty(K), np.empty(K, dt)
    for c in range(c0, c1):
        _hybrid_chunk(c, y, logits, means, logscales, tol, max_iters, x_out, evals_out, oks, w, logw, inv)


def invcdf_hybrid(y, logits, means, logscales, tol, max_iters, x_out, evals_out):
    """Safeguarded Newton on logit F per element; writes x_out, evals_out; returns converged (all)."""
    oks = np.zeros(y.shape[0], dtype=np.bool_)
    _run_chunks(_invcdf_hybrid_range, logits, y, logits, means, logscales, float(tol), int(max_iters),
                x_out, evals_out, oks)
    return bool(oks.all())
