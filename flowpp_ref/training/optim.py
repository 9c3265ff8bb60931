"""Optimisation: Adam (and Glow's Adamax), linear learning-rate warm-up, global gradient-norm clipping, EMA.

The recipe of the paper (appendix 8.5): Adam, learning rate
warmed up linearly to 1e-3 over 200 steps, gradients clipped to a global norm of 1,
evaluation with an exponential moving average of the parameters (decay 0.999).

Everything works on flat dicts ``name -> array`` (the dotted names of
:meth:`flowpp_ref.core.module.Module.parameters`), NumPy or CuPy, and updates the
parameter arrays IN PLACE, so the model that owns them sees the new values without
a reload. State (``m``, ``v``, the EMA shadow) lives on the same backend as the
parameters; ``state_dict()`` returns it as is (the checkpoint moves it to the host)
and ``load_state_dict()`` accepts host or device arrays.
"""
from __future__ import annotations

import math

import numpy as np

from flowpp_ref.core.backend import array_module, asarray, to_numpy


def _check_same_keys(params: dict, grads: dict, what: str = "gradients"):
    if params.keys() != grads.keys():
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise KeyError(f"{what} and parameters have different names: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}")


def _to(a, xp, dtype):
    """``a`` on backend ``xp`` with ``dtype`` (a no-op when both already match)."""
    if array_module(a) is xp and a.dtype == dtype:
        return a
    return asarray(a, xp, dtype=dtype)


def _like(a, ref):
    """``a`` on the backend and with the dtype of ``ref``."""
    return _to(a, array_module(ref), ref.dtype)


def _scalar(s, dtype):
    """A Python float stays as it is (NumPy treats it as weakly typed); a 0-d backend array is
    cast to ``dtype`` so that it does not promote float32 arrays to float64."""
    return s.astype(dtype) if hasattr(s, "astype") else s


# ------------------------------------------------------------------------ Adam
class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1), the form used by ``torch.optim.Adam``.

    Math, per parameter p with gradient g, at update t = 1, 2, ...::

        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g^2
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
        p <- p - lr * m_hat / (sqrt(v_hat) + eps)

    (TensorFlow's AdamOptimizer, used by the paper's code, puts eps outside the bias
    correction: p <- p - lr sqrt(1 - beta2^t)/(1 - beta1^t) m / (sqrt(v) + eps); the two
    differ only when sqrt(v_hat) is comparable with eps = 1e-8.)

    State: ``m``, ``v`` (dicts like the parameters, same backend and dtype) and ``t``,
    the number of updates done. ``lr`` is passed to every :meth:`step` (schedules live
    outside, see :func:`warmup_lr`). The training loop runs the same update fused with the
    clipping and the EMA (:mod:`flowpp_ref.training.fused`).
    """

    rule = "adam"           # the update :class:`~flowpp_ref.training.fused.FusedUpdate` applies

    def __init__(self, params: dict | None = None, *, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {beta1}, {beta2}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.t = 0
        self.m: dict = {}
        self.v: dict = {}
        # {name: (xp, dtype, shape)} of the parameters given (no reference to the arrays is kept)
        self._spec = None
        if params is not None:
            self._spec = {k: (array_module(p), p.dtype, tuple(p.shape)) for k, p in params.items()}
            for k, p in params.items():
                xp = array_module(p)
                self.m[k] = xp.zeros_like(p)
                self.v[k] = xp.zeros_like(p)

    def step(self, params: dict, grads: dict, lr: float, *, grad_scale=None, apply=None) -> None:
        """One update of every array in ``params`` (in place) from ``grads`` (same keys and shapes).

        ``grad_scale`` (a 0-d backend array, e.g. :func:`clip_scale`) multiplies the
        gradients. ``apply`` (a 0-d boolean backend array) makes the update conditional
        without a host sync: where it is False, ``p``, ``m``, ``v`` and ``t`` keep their
        values (``t`` then becomes a 0-d backend array: it counts applied updates).
        """
        _check_same_keys(params, grads)
        lr = float(lr)
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
        for k, p in params.items():  # validate everything before changing anything
            if tuple(grads[k].shape) != tuple(p.shape):
                raise ValueError(f"gradient {k}: shape {tuple(grads[k].shape)} differs from the parameter's "
                                 f"{tuple(p.shape)}")
        self.t = self.t + 1 if apply is None else self.t + apply.astype(np.int64)
        # t is 0 here only when every update so far was skipped (apply False): nothing is
        # applied then, and t = 1 in the bias corrections keeps them finite (no 1/0)
        tb = self.t if apply is None else array_module(self.t).maximum(self.t, 1)
        bc1 = 1.0 - self.beta1 ** tb       # 1 - beta1^t
        bc2 = 1.0 - self.beta2 ** tb       # 1 - beta2^t
        step_size = lr / bc1               # lr / (1 - beta1^t)
        inv_sqrt_bc2 = 1.0 / (math.sqrt(bc2) if isinstance(bc2, float) else array_module(bc2).sqrt(bc2))
        for k, p in params.items():
            g = grads[k]
            xp = array_module(p)
            m = self.m.get(k)
            v = self.v.get(k)
            m = xp.zeros_like(p) if m is None else _like(m, p)
            v = xp.zeros_like(p) if v is None else _like(v, p)
            g = _like(g, p)
            if grad_scale is not None:
                g = g * _scalar(grad_scale, p.dtype)
            m_new, v_new, upd = self._update(xp, p, m, v, g, step_size, inv_sqrt_bc2)
            if apply is None:
                p -= upd
                self.m[k], self.v[k] = m_new, v_new
            else:
                p -= xp.where(apply, upd, p.dtype.type(0))
                self.m[k], self.v[k] = xp.where(apply, m_new, m), xp.where(apply, v_new, v)

    def _update(self, xp, p, m, v, g, step_size, inv_sqrt_bc2):
        """(m_new, v_new, the update subtracted from p) of one parameter."""
        # (xp.asarray: NumPy turns 0-d results into scalars; the state stays arrays)
        m_new = xp.asarray(m * self.beta1 + (1.0 - self.beta1) * g)        # m = b1 m + (1 - b1) g
        v_new = xp.asarray(v * self.beta2 + (1.0 - self.beta2) * (g * g))  # v = b2 v + (1 - b2) g^2
        denom = xp.sqrt(v_new) * _scalar(inv_sqrt_bc2, p.dtype) + self.eps  # sqrt(v_hat) + eps
        upd = (_scalar(step_size, p.dtype) * m_new / denom).astype(p.dtype, copy=False)  # lr m_hat / (...)
        return m_new, v_new, upd

    def state_dict(self) -> dict:
        """``{"t", "beta1", "beta2", "eps", "m": {...}, "v": {...}}`` (arrays on their backend, not copied)."""
        return {"t": int(to_numpy(self.t)), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` output (host or device arrays; copied)."""
        try:
            t, m, v = int(state["t"]), state["m"], state["v"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an Adam state dict (needs 't', 'm', 'v'): {e}") from e
        if m.keys() != v.keys():
            raise ValueError("Adam state: 'm' and 'v' have different names")
        spec = self._spec or {}
        if self._spec is not None:
            _check_same_keys(spec, m, "Adam state 'm'")
            for k in m:
                if tuple(m[k].shape) != spec[k][2]:
                    raise ValueError(f"Adam state {k}: shape {tuple(m[k].shape)}, parameter shape {spec[k][2]}")
        self.beta1 = float(state.get("beta1", self.beta1))
        self.beta2 = float(state.get("beta2", self.beta2))
        self.eps = float(state.get("eps", self.eps))
        self.t = t
        self.m = {k: (_to(a, *spec[k][:2]) if k in spec else a).copy() for k, a in m.items()}
        self.v = {k: (_to(a, *spec[k][:2]) if k in spec else a).copy() for k, a in v.items()}


# ------------------------------------------------------------------------ Adamax
class Adamax(Adam):
    """Adamax as Glow's release implements it (its ``optim.adamax``, the optimiser of its CIFAR-10 run).

    Math, per parameter p with gradient g, at update t = 1, 2, ...::

        m <- beta1 m + (1 - beta1) g
        v <- max(beta2 v, |g|)                                  (the infinity norm, Kingma & Ba sec. 7.1)
        p <- p - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (v + eps)

    The factor ``sqrt(1 - beta2^t)`` is the release's (it reuses Adam's bias correction); Kingma &
    Ba's Adamax has ``lr / (1 - beta1^t)`` alone. Glow sets ``beta2 = 1 - 1 / (steps per epoch)``,
    the decay of its Polyak average too. State and ``step`` arguments as :class:`Adam`.
    """

    rule = "adamax"

    def _update(self, xp, p, m, v, g, step_size, inv_sqrt_bc2):
        m_new = xp.asarray(m * self.beta1 + (1.0 - self.beta1) * g)        # m = b1 m + (1 - b1) g
        v_new = xp.asarray(xp.maximum(v * self.beta2, xp.abs(g)))          # v = max(b2 v, |g|)
        # lr sqrt(1 - b2^t) / (1 - b1^t) = step_size / inv_sqrt_bc2
        upd = _scalar(step_size, p.dtype) / _scalar(inv_sqrt_bc2, p.dtype) * m_new / (v_new + self.eps)
        return m_new, v_new, upd.astype(p.dtype, copy=False)


OPTIMIZERS = {"adam": Adam, "adamax": Adamax}


# ------------------------------------------------------------------- schedule
def warmup_lr(step: int, max_lr: float, warmup_steps: int) -> float:
    """Linear warm-up: lr(step) = max_lr * min(1, step / warmup_steps).

    ``step`` is the 1-based index of the update about to be made (the paper's code
    computes the rate from the step counter the same way), so update 1 uses
    max_lr / warmup_steps and every update from ``warmup_steps`` on uses max_lr.
    ``warmup_steps <= 0`` means no warm-up.
    """
    if warmup_steps <= 0:
        return float(max_lr)
    return float(max_lr) * min(1.0, float(step) / float(warmup_steps))


# ------------------------------------------------------------------- clipping
def global_grad_norm_array(grads: dict):
    """sqrt(sum_k sum(g_k^2)) as a 0-d float64 array on the gradients' backend (no host sync)."""
    arrays = list(grads.values())
    if not arrays:
        return np.zeros((), np.float64)
    xp = array_module(*arrays)
    sq = xp.stack([xp.sum(xp.square(g.astype(xp.float64, copy=False))) for g in arrays])
    return xp.sqrt(sq.sum())


def global_grad_norm(grads: dict) -> float:
    """sqrt(sum_k sum(g_k^2)) in float64, as a Python float (one host sync on CuPy)."""
    return float(to_numpy(global_grad_norm_array(grads)))


def clip_scale(norm, max_norm: float):
    """The clipping factor ``max_norm / max(n, max_norm)`` of a 0-d norm array, on its backend.

    1 when n <= max_norm; nan when n is nan (the caller skips such a step).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    xp = array_module(norm)
    return max_norm / xp.maximum(norm, max_norm)


def clip_grad_norm(grads: dict, max_norm: float):
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    Math (as tf.clip_by_global_norm)::

        n = sqrt(sum_k ||g_k||^2)          (float64, on the host, once per call)
        g_k <- g_k * max_norm / max(n, max_norm)

    Returns ``(clipped, n)``: a new dict (arrays scaled when n > max_norm, the same
    arrays otherwise) and the norm BEFORE clipping as a Python float. A non-finite
    ``n`` (nan/inf gradient) returns the gradients unscaled; the caller should skip
    the step (the training loop does).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    n = global_grad_norm(grads)
    if not math.isfinite(n) or n <= max_norm:
        return dict(grads), n
    scale = max_norm / n                      # max_norm / max(n, max_norm), n > max_norm here
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, n


# ------------------------------------------------------------------------ EMA
class EMA:
    """Exponential moving average of the parameters (evaluation and sampling use it).

    Math, after every optimiser update::

        shadow <- decay * shadow + (1 - decay) * param

    The shadow starts as a copy of the parameters given (take them after the
    data-dependent init); no bias correction, as tf.train.ExponentialMovingAverage
    without ``num_updates``. State: ``shadow`` (dict like the parameters), ``decay``,
    ``num_updates``.
    """

    def __init__(self, params: dict, decay: float = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        for k, p in params.items():
            if not np.issubdtype(np.dtype(p.dtype), np.floating):
                raise ValueError(f"EMA: parameter {k} has dtype {p.dtype}; only floating-point arrays are averaged")
        self.decay = float(decay)
        self.shadow = {k: p.copy() for k, p in params.items()}
        self.num_updates = 0

    def update(self, params: dict, *, apply=None) -> None:
        """One averaging step; ``apply`` (0-d boolean backend array): skip it where False, without a host sync."""
        _check_same_keys(self.shadow, params, "parameters")
        d = self.decay
        for k, p in params.items():
            s = self.shadow[k]
            if apply is None:
                s *= d
                s += (1.0 - d) * p              # shadow = d shadow + (1 - d) param
            else:
                xp = array_module(s)
                self.shadow[k] = xp.where(apply, s * d + (1.0 - d) * p, s)
        self.num_updates = self.num_updates + 1 if apply is None else self.num_updates + apply.astype(np.int64)

    def copy_to(self, params: dict) -> None:
        """Write the shadow values into the arrays of ``params`` (in place)."""
        _check_same_keys(self.shadow, params, "parameters")
        for k, p in params.items():
            p[...] = _like(self.shadow[k], p)

    def state_dict(self) -> dict:
        """``{"decay", "num_updates", "shadow": {...}}`` (arrays on their backend, not copied)."""
        return {"decay": self.decay, "num_updates": int(to_numpy(self.num_updates)), "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` output (copied; moved to the backend/dtype of the current shadow)."""
        try:
            shadow = state["shadow"]
        except (KeyError, TypeError) as e:
            raise ValueError("not an EMA state dict (needs 'shadow')") from e
        if self.shadow:
            _check_same_keys(self.shadow, shadow, "EMA state 'shadow'")
            for k in shadow:
                if tuple(shadow[k].shape) != tuple(self.shadow[k].shape):
                    raise ValueError(f"EMA state {k}: shape {tuple(shadow[k].shape)}, "
                                     f"expected {tuple(self.shadow[k].shape)}")
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))
        ref = self.shadow
        self.shadow = {k: (_like(a, ref[k]) if k in ref else a).copy() for k, a in shadow.items()}
