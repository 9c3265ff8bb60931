"""The optimiser step fused: gradient norm, clipping, Adam (or Adamax), the EMA and the skip of a
non-finite step in one pass over flat buffers.

:class:`~flowpp_ref.training.optim.Adam`, :class:`~flowpp_ref.training.optim.EMA` and
:func:`~flowpp_ref.training.optim.global_grad_norm_array` are the readable form of the recipe
(appendix 8.5): a loop over the parameter arrays, about twenty array operations each. On a GPU each
operation is a kernel launch, so at ``small`` (247 arrays) the update cost ~6,700 launches, more than
the model's forward and backward. :class:`FusedUpdate` keeps the same state in four flat buffers laid
out like :class:`~flowpp_ref.runtime.distributed.FlatBuffer` (arrays in the sorted order of their
names):

* ``p``: the parameters. The model's parameter arrays become views into it
  (:meth:`Module.load_parameters`), so the model sees every update without a copy;
* ``m``, ``v``: Adam's moments; ``adam.m`` / ``adam.v`` become views into them;
* ``s``: the EMA shadow; ``ema.shadow`` becomes views into it;

and a fifth, ``g``, into which each step's gradients are packed (one concatenation; a data-parallel
run hands over its all-reduce buffer instead). Then one step is, per element j::

    ||g|| = sqrt(sum_j g_j^2)                        ok = loss and ||g|| finite
    c = max_norm / max(||g||, max_norm)              t <- t + ok
    m_j <- b1 m_j + (1 - b1) c g_j                   v_j <- b2 v_j + (1 - b2) (c g_j)^2
    p_j <- p_j - lr / (1 - b1^t) m_j / (sqrt(v_j / (1 - b2^t)) + eps)
    s_j <- d s_j + (1 - d) p_j                       (nothing changes where not ok)

(Adamax: ``v_j <- max(b2 v_j, |c g_j|)``, p_j <- p_j - lr sqrt(1 - b2^t) / (1 - b1^t) m_j / (v_j + eps).)
That is :meth:`Adam.step` on ``g * clip_scale(||g||, max_norm)`` followed by :meth:`EMA.update`, both with
``apply=ok``, computed in float64 per element and stored in the parameters' dtype.

Backends: :func:`fused_step_reference` is the plain-array math; NumPy with kernels on runs its numba twin
(:mod:`flowpp_ref.kernels.numba.optimizer`), CuPy its CUDA twin (:mod:`flowpp_ref.kernels.cuda.optimizer`:
a sum of squares, the scalars, the update: three launches, plus the packing of the gradients). No step
reads anything back to the host.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.core.backend import array_module, asarray, is_cupy, to_numpy
from flowpp_ref.kernels import use_kernels
from flowpp_ref.kernels.cuda import optimizer as cuda_opt
from flowpp_ref.kernels.numba import optimizer as numba_opt
from flowpp_ref.runtime.distributed import FlatBuffer


def fused_step_reference(g, p, m, v, s, loss, cnt_in, cnt_out, scal, *, lr, max_norm, b1, b2, eps, decay,
                         adamax):
    """The fused step in plain array code (any backend), in place on ``p``, ``m``, ``v``, ``s``.

    ``cnt_in`` / ``cnt_out``: int64 [2], (Adam's t, the EMA's number of updates) before / after.
    ``scal`` (float64 [5]) receives [||g||, ok, clipping factor, lr / (1 - b1^t), 1 / sqrt(1 - b2^t)].
    """
    xp = array_module(p)
    gn = xp.sqrt(xp.sum(xp.square(g.astype(np.float64))))                        # ||g||
    ok = xp.isfinite(gn) & xp.isfinite(loss.astype(np.float64).reshape(()))
    c = xp.where(ok, max_norm / xp.maximum(gn, max_norm), 0.0)                    # clipping factor
    cnt_out[...] = cnt_in + ok.astype(np.int64)
    tb = xp.maximum(cnt_out[0], 1).astype(np.float64)
    lr_t = lr / (1.0 - b1 ** tb)                                                  # lr / (1 - b1^t)
    isb = 1.0 / xp.sqrt(1.0 - b2 ** tb)                                           # 1 / sqrt(1 - b2^t)
    scal[...] = xp.stack([gn, ok.astype(np.float64), c, lr_t, isb])
    gc = g.astype(np.float64) * c
    m_new = b1 * m.astype(np.float64) + (1.0 - b1) * gc                           # m = b1 m + (1 - b1) g
    if adamax:
        v_new = xp.maximum(b2 * v.astype(np.float64), xp.abs(gc))                 # v = max(b2 v, |g|)
        upd = lr_t / isb * m_new / (v_new + eps)
    else:
        v_new = b2 * v.astype(np.float64) + (1.0 - b2) * gc * gc                  # v = b2 v + (1 - b2) g^2
        upd = lr_t * m_new / (xp.sqrt(v_new) * isb + eps)
    p_new = (p.astype(np.float64) - upd).astype(p.dtype)
    s_new = decay * s.astype(np.float64) + (1.0 - decay) * p_new.astype(np.float64)  # s = d s + (1 - d) p
    for arr, new in ((m, m_new), (v, v_new), (p, p_new), (s, s_new)):
        arr[...] = xp.where(ok, new.astype(arr.dtype), arr)                       # a skipped step changes nothing


class FusedUpdate:
    """Clipping, Adam/Adamax and the EMA of a model's parameters, one fused step at a time.

    ``FusedUpdate(model, adam, ema)`` moves the model's parameters, ``adam``'s moments (and its ``t``) and
    ``ema``'s shadow (and its ``num_updates``) into flat buffers and leaves views of them in their places:
    ``model.parameters()``, ``adam.state_dict()`` and ``ema.state_dict()`` keep working (checkpoints
    included), and :class:`~flowpp_ref.training.evaluation.use_ema` puts the same arrays back. Then
    :meth:`step` replaces ``adam.step(...)`` + ``ema.update(...)`` of the training loop.
    """

    def __init__(self, model, adam, ema):
        params = model.parameters()
        self.xp = model.xp
        self.dtype = np.dtype(next(iter(params.values())).dtype)
        if any(np.dtype(a.dtype) != self.dtype for a in params.values()):
            raise TypeError("FusedUpdate: every parameter must have one dtype, got "
                            f"{sorted({str(a.dtype) for a in params.values()})}")
        self.layout = FlatBuffer({k: a.shape for k, a in params.items()}, 0, self.xp, self.dtype)
        self.adam, self.ema = adam, ema
        self.adamax = getattr(adam, "rule", "adam") == "adamax"
        self.p, p_views = self._flat(params)
        self.m, adam.m = self._flat(adam.m or {k: 0 * a for k, a in params.items()})
        self.v, adam.v = self._flat(adam.v or {k: 0 * a for k, a in params.items()})
        self.s, ema.shadow = self._flat(ema.shadow)
        model.load_parameters(p_views)
        self.g = self.layout.data
        self._partial = self.xp.zeros(min(cuda_opt.PARTIALS, max(self.layout.n_params, 1)), np.float64)
        counts = [int(to_numpy(adam.t)), int(to_numpy(ema.num_updates))]       # one host read, at set-up
        self._counts = asarray(np.array([counts, counts], dtype=np.int64), self.xp)
        self._cur = 0
        self._publish_counts()

    def _flat(self, arrays: dict):
        """A new flat buffer holding ``arrays`` (cast to the parameters' dtype) and its views by name."""
        buf = FlatBuffer(self.layout.shapes, 0, self.xp, self.dtype)
        buf.pack({k: asarray(a, self.xp, self.dtype) for k, a in arrays.items()}, [])
        return buf.data, buf.unpack()[0]

    def _publish_counts(self):
        self.adam.t = self._counts[self._cur, 0]
        self.ema.num_updates = self._counts[self._cur, 1]

    def step(self, grads: dict | None, loss, lr: float, max_norm: float, *, flat_grads=None):
        """One update from ``grads`` (or ``flat_grads``, already in this layout); returns (||g||, ok): 0-d float64
        arrays on the backend, ok = 1.0 for an applied step and 0.0 for a skipped one.

        ``loss``: the step's 0-d loss (a non-finite loss skips the step, as a non-finite ||g|| does).
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        if not (np.isfinite(lr) and lr >= 0):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
        xp = self.xp
        if flat_grads is None:
            if grads.keys() != self.layout.shapes.keys():
                raise KeyError(f"gradients and parameters have different names: missing "
                               f"{sorted(set(self.layout.names) - set(grads))[:5]}, unexpected "
                               f"{sorted(set(grads) - set(self.layout.names))[:5]}")
            g = self.g
            xp.concatenate([grads[k].reshape(-1) for k in self.layout.names], out=g)   # one launch
        else:
            g = flat_grads
            if g.shape != self.p.shape or np.dtype(g.dtype) != self.dtype:
                raise ValueError(f"flat_grads: expected {self.p.shape} {self.dtype}, got {g.shape} {g.dtype}")
        loss = xp.asarray(loss).reshape(1)
        if np.dtype(loss.dtype) != self.dtype:
            loss = loss.astype(self.dtype)
        cnt_in, cnt_out = self._counts[self._cur], self._counts[1 - self._cur]
        scal = xp.empty(5, np.float64)        # fresh each step: the caller keeps (||g||, ok) of pending steps
        kw = dict(lr=float(lr), max_norm=float(max_norm), b1=self.adam.beta1, b2=self.adam.beta2,
                  eps=self.adam.eps, decay=self.ema.decay, adamax=self.adamax)
        if not use_kernels():
            fused_step_reference(g, self.p, self.m, self.v, self.s, loss, cnt_in, cnt_out, scal, **kw)
        elif is_cupy(xp):
            cuda_opt.fused_step(g, self.p, self.m, self.v, self.s, loss, cnt_in, cnt_out, scal, self._partial, **kw)
        else:
            numba_opt.fused_step(g, self.p, self.m, self.v, self.s, loss, cnt_in, cnt_out, scal,
                                 kw["lr"], kw["max_norm"], kw["b1"], kw["b2"], kw["eps"], kw["decay"], kw["adamax"])
        self._cur = 1 - self._cur
        self._publish_counts()
        return scal[0], scal[1]
