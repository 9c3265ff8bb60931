"""Finite-difference checks of hand-written derivatives (float64).

One helper serves the tests, the tutorials and the benchmarks:

* :func:`numerical_gradient` -- central differences of a scalar function with
  respect to one array, entry by entry (or along ``n_directions`` random
  directions for big tensors, as chainer's ``check_backward`` does);
* :func:`rel_error` -- ``max |a - b| / max(|a| + |b|, floor)``;
* :func:`gradcheck` -- compares a dict of analytic gradients with numerical ones
  and returns a :class:`GradcheckReport` naming the worst tensor.

Central differences have truncation error O(h^2 f''') and round-off O(eps/h);
with float64 and h = 1e-6 the relative error of a correct gradient is
typically below 1e-7. Run checks in float64: in float32 the round-off term alone
is ~1e-2 (cs231n's notes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowpp_ref.core.backend import array_module, to_numpy


def rel_error(a, b, floor: float = 1e-8) -> float:
    """``max|a - b| / max(max(|a| + |b|), floor)``: a relative error for whole tensors."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a) + np.abs(b))), floor))


def numerical_gradient(f, x, h: float = 1e-6, n_directions: int | None = None, seed: int = 0):
    """Central-difference gradient of the scalar ``f()`` with respect to array ``x``.

    ``x`` is perturbed in place (and restored), so ``f`` must read it afresh on
    every call. With ``n_directions`` set, returns ``(directions, derivatives)``:
    the derivative of f along each random unit direction ``v``
    (``(f(x + h v) - f(x - h v)) / 2h``), to be compared with ``<grad, v>``.
    """
    xp = array_module(x)
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous so that it can be perturbed in place")
    if n_directions is None:
        grad = xp.zeros_like(x)
        flat = x.reshape(-1)
        gflat = grad.reshape(-1)
        for i in range(flat.size):
            old = flat[i].copy()
            flat[i] = old + h
            fp = float(f())
            flat[i] = old - h
            fm = float(f())
            flat[i] = old
            gflat[i] = (fp - fm) / (2 * h)
        return grad
    rng = np.random.default_rng(seed)
    dirs, ders = [], []
    x0 = x.copy()
    for _ in range(n_directions):
        v = rng.standard_normal(x.shape)
        v /= np.linalg.norm(v)
        v = xp.asarray(v, dtype=x.dtype)
        x[...] = x0 + h * v
        fp = float(f())
        x[...] = x0 - h * v
        fm = float(f())
        x[...] = x0
        dirs.append(v)
        ders.append((fp - fm) / (2 * h))
    return dirs, np.array(ders)


@dataclass
class GradcheckReport:
    errors: dict = field(default_factory=dict)   # name -> relative error
    worst: tuple = ("", 0.0)

    def ok(self, tol: float) -> bool:
        return self.worst[1] <= tol

    def __str__(self):
        rows = [f"  {k:<40s} rel.err {v:.2e}" for k, v in sorted(self.errors.items(), key=lambda kv: -kv[1])]
        return "gradcheck (worst first):\n" + "\n".join(rows)


def gradcheck(f, inputs: dict, analytic: dict, h: float = 1e-6, max_entries: int = 200,
              n_directions: int = 8, tol: float | None = None, seed: int = 0) -> GradcheckReport:
    """Compare analytic gradients with central differences of the scalar ``f()``.

    ``inputs`` maps names to the arrays that ``f`` reads (perturbed in place);
    ``analytic`` maps the same names to the hand-derived gradients. Tensors with
    at most ``max_entries`` entries are checked entry by entry; bigger ones along
    ``n_directions`` random directions. If ``tol`` is given, raises
    ``AssertionError`` naming the worst tensor when its error exceeds ``tol``.
    """
    missing = set(inputs) - set(analytic)
    if missing:
        raise KeyError(f"no analytic gradient for {sorted(missing)}")
    rep = GradcheckReport()
    for name, x in inputs.items():
        g = analytic[name]
        if g is None:
            raise ValueError(f"analytic gradient for {name!r} is None")
        if tuple(g.shape) != tuple(x.shape):
            raise ValueError(f"{name}: gradient shape {tuple(g.shape)} differs from input shape {tuple(x.shape)}")
        if x.size <= max_entries:
            num = numerical_gradient(f, x, h)
            err = rel_error(g, num)
        else:
            dirs, ders = numerical_gradient(f, x, h, n_directions=n_directions, seed=seed)
            ana = np.array([float(to_numpy((g * v).sum())) for v in dirs])
            err = rel_error(ana, ders)
        rep.errors[name] = err
        if err >= rep.worst[1]:
            rep.worst = (name, err)
    if tol is not None and not rep.ok(tol):
        raise AssertionError(f"gradient of {rep.worst[0]!r} off by rel. error {rep.worst[1]:.2e} > {tol:.0e}\n{rep}")
    return rep


def random_scalar_loss(y, logdet, seed: int = 0):
    """Weights for L = sum(w_y * y) + sum(w_l * logdet), a random linear test loss.

    Returns ``(loss_fn, dy, dlogdet)`` where ``loss_fn(y, logdet)`` evaluates L and
    ``dy``/``dlogdet`` are its gradients (the weights). Works for tuple ``y``.
    """
    rng = np.random.default_rng(seed)
    xp = array_module(y[0] if isinstance(y, tuple) else y)

    def w_like(a):
        return xp.asarray(rng.standard_normal(a.shape), dtype=a.dtype)

    wy = tuple(w_like(a) for a in y) if isinstance(y, tuple) else w_like(y)
    wl = w_like(logdet)

    def loss_fn(yy, ll):
        if isinstance(yy, tuple):
            s = sum(float((a * w).sum()) for a, w in zip(yy, wy))
        else:
            s = float((yy * wy).sum())
        return s + float((ll * wl).sum())

    return loss_fn, wy, wl
