"""numba kernel of the fused optimiser step: the twin of :func:`flowpp_ref.training.fused.fused_step_reference`
and of the CUDA kernels of :mod:`flowpp_ref.kernels.cuda.optimizer` (same math, written out there).

One serial loop for the sum of squares (double), the scalars, then one loop over the elements. Serial: the
update reads and writes each element once, a few milliseconds for 30 M parameters, where waking numba's thread
pool would cost about as much.
"""
from __future__ import annotations

import math

import numba

from flowpp_ref.kernels import NUMBA_OPTS


@numba.njit(**NUMBA_OPTS)
def fused_step(g, p, m, v, s, loss, cnt_in, cnt_out, scal, lr, max_norm, b1, b2, eps, decay, adamax):
    sq = 0.0
    for j in range(g.size):
        gj = float(g[j])
        sq += gj * gj
    gn = math.sqrt(sq)
    lo = float(loss[0])
    ok = 1 if (abs(gn) < math.inf and abs(lo) < math.inf) else 0       # false for inf and nan
    t = cnt_in[0] + ok
    tb = t if t > 1 else 1
    cnt_out[0] = t
    cnt_out[1] = cnt_in[1] + ok
    scal[0] = gn
    scal[1] = ok
    scal[2] = max_norm / max(gn, max_norm) if ok else 0.0             # clipping factor
    scal[3] = lr / (1.0 - b1 ** tb)                                   # lr / (1 - b1^t)
    scal[4] = 1.0 / math.sqrt(1.0 - b2 ** tb)                         # 1 / sqrt(1 - b2^t)
    if not ok:
        return
    c, lr_t, isb = scal[2], scal[3], scal[4]
    for j in range(p.size):
        gj = float(g[j]) * c
        mj = b1 * float(m[j]) + (1.0 - b1) * gj                       # m = b1 m + (1 - b1) g
        if adamax:
            vj = max(b2 * float(v[j]), abs(gj))                       # v = max(b2 v, |g|)
            upd = lr_t / isb * mj / (vj + eps)
        else:
            vj = b2 * float(v[j]) + (1.0 - b2) * gj * gj              # v = b2 v + (1 - b2) g^2
            upd = lr_t * mj / (math.sqrt(vj) * isb + eps)
        pj = float(p[j]) - upd
        m[j] = mj
        v[j] = vj
        p[j] = pj
        s[j] = decay * float(s[j]) + (1.0 - decay) * float(p[j])      # s = d s + (1 - d) p (p as stored)
