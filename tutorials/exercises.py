"""Autograders for the tutorials' exercises.

Each exercise has an id ("1.1" is tutorial 01's first, "A2.1" appendix A2's first), a title, and a
grader that takes the learner's answer (a function, or for a prediction a value), builds a float64
test case with a fixed seed, and checks the answer against ``flowpp_ref``: backward passes with
``flowpp_ref.core.gradcheck.gradcheck`` on a loss built from the package's (or the stated) forward,
values against the package's functions, predictions against what the package computes.

In a notebook::

    import exercises as ex

    def sigmoid_backward(x, dy, dlogdet):
        raise NotImplementedError            # your answer here

    ex.grade("1.1", sigmoid_backward)

prints one line: ``correct``, ``not attempted`` (the answer raised ``NotImplementedError``, as the
stubs do), or ``wrong`` with what was wrong (the worst tensor and its relative error, a shape, a
non-finite value). ``grade`` returns a :class:`Result` and never raises, so a notebook with
unanswered exercises still runs top to bottom. The worked answers are in ``solutions.py`` beside this
file; ``tests/test_exercises.py`` checks that every one of them passes its grader and that planted
wrong answers fail.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowpp_ref.bijections.elementwise import ImgProc, Sigmoid
from flowpp_ref.bijections.mixlogistic import mixlogistic_invcdf, mixlogistic_logcdf, mixlogistic_logpdf
from flowpp_ref.bijections.normalize import Normalize
from flowpp_ref.bijections.pointwise import Pointwise
from flowpp_ref.core.gradcheck import gradcheck, rel_error
from flowpp_ref.model.objective import bits_per_dim, importance_sampled_log_prob
from flowpp_ref.nn.activations import concat_elu_reference
from flowpp_ref.nn.attention import attention_ref

TOL = 1e-6          # rel. error a correct float64 backward stays far below (typically 1e-9)


@dataclass
class Result:
    exercise: str
    title: str
    status: str          # "correct", "wrong" or "not attempted"
    detail: str = ""

    def __bool__(self):
        return self.status == "correct"

    def __str__(self):
        line = f"Exercise {self.exercise} ({self.title}): {self.status}"
        return line + (f": {self.detail}" if self.detail else "")


EXERCISES: dict[str, tuple[str, object, str]] = {}     # id -> (title, grader, name in solutions.py)


def exercise(ex_id: str, title: str, solution: str):
    def register(grader):
        EXERCISES[ex_id] = (title, grader, solution)
        return grader
    return register


def check(report_or_ok, message: str):
    """Raise AssertionError(message) unless the check passed."""
    ok = report_or_ok.ok(TOL) if hasattr(report_or_ok, "ok") else bool(report_or_ok)
    if not ok:
        raise AssertionError(message + (f"\n{report_or_ok}" if hasattr(report_or_ok, "ok") else ""))


def grade(ex_id: str, answer, quiet: bool = False) -> Result:
    """Grade ``answer`` for exercise ``ex_id``; print and return the :class:`Result`."""
    if ex_id not in EXERCISES:
        raise KeyError(f"no exercise {ex_id!r}; there are {', '.join(EXERCISES)}")
    title, grader, solution = EXERCISES[ex_id]
    try:
        grader(answer)
        res = Result(ex_id, title, "correct")
    except NotImplementedError:
        res = Result(ex_id, title, "not attempted",
                     f"replace the `raise NotImplementedError`; a worked answer is solutions.{solution}")
    except AssertionError as err:
        res = Result(ex_id, title, "wrong", str(err))
    except Exception as err:                  # the answer crashed: say how, do not stop the notebook
        res = Result(ex_id, title, "wrong", f"your answer raised {type(err).__name__}: {err}")
    if not quiet:
        print(res)
    return res


def _rng(seed=0):
    return np.random.default_rng(seed)


def _shaped(name, got, shape):
    got = np.asarray(got)
    check(got.shape == tuple(shape), f"{name} has shape {got.shape}, expected {tuple(shape)}")
    check(np.all(np.isfinite(got)), f"{name} has non-finite entries")
    return got


# ------------------------------------------------------------------ tutorial 01
@exercise("1.1", "the backward of Sigmoid", "sigmoid_backward")
def _grade_sigmoid_backward(answer):
    # y = sigmoid(x), logdet_b = sum_i log sigmoid(x_i) + log(1 - sigmoid(x_i)); L = sum(R*y) + sum(r*logdet)
    rng = _rng(1)
    x = rng.normal(0, 2, (3, 5))
    R, r = rng.normal(size=(3, 5)), rng.normal(size=3)

    def loss():
        y, ld, _ = Sigmoid().forward(x)
        return float((R * y).sum() + (r * ld).sum())
    dx = _shaped("dx", answer(x.copy(), R.copy(), r.copy()), x.shape)
    check(gradcheck(loss, {"x": x}, {"x": dx}), "dx disagrees with finite differences of Sigmoid's loss")


@exercise("1.2", "the mixture-of-logistics log-density, stably", "mixture_logpdf")
def _grade_mixture_logpdf(answer):
    # f(x) = dF/dx: compared with central differences of the package's CDF, then in the far tails
    rng = _rng(2)
    K = 4
    logits, means, logscales = rng.normal(size=(6, K)), rng.normal(0, 2, (6, K)), rng.normal(0, 0.5, (6, K))
    x = rng.normal(0, 2, 6)
    got = _shaped("log f(x)", answer(x, logits, means, logscales), x.shape)
    h = 1e-5
    F = lambda t: np.exp(mixlogistic_logcdf(t, logits, means, logscales))  # noqa: E731
    num = np.log((F(x + h) - F(x - h)) / (2 * h))
    check(np.max(np.abs(got - num)) < 1e-6,
          f"log f(x) differs from log of dF/dx by up to {np.max(np.abs(got - num)):.2e}")
    far = np.array([-1e5, -1e3, -60.0, 60.0, 1e3, 1e5])
    got_far = np.asarray(answer(far, logits, means, logscales))
    check(np.all(np.isfinite(got_far)), "log f(x) is not finite far in the tails (x = +-60 ... +-1e5): "
          "work in log space with log-sigmoid / softplus and a log-sum-exp over the components")
    ref_far = mixlogistic_logpdf(far, logits, means, logscales)
    check(np.max(np.abs(got_far - ref_far)) < 1e-8, "log f(x) is finite but wrong far in the tails")


# ------------------------------------------------------------------ tutorial 02
@exercise("2.1", "the 1x1 convolution's log-det and its gradient", "pointwise_logdet")
def _grade_pointwise_logdet(answer):
    # logdet = H W log|det W| per sample; d logdet / dW = H W W^{-T}
    rng = _rng(3)
    C, H, Wd = 4, 3, 5
    W = np.eye(C) + 0.3 * rng.normal(size=(C, C))
    out = answer(W.copy(), H, Wd)
    check(isinstance(out, tuple) and len(out) == 2, "return (logdet, dW)")
    ld, dW = out
    x = rng.normal(size=(1, H, Wd, C))
    pw = Pointwise(C, rng=_rng(0), dtype=np.float64)
    pw.params["W"][...] = W
    _, pkg_ld, _ = pw.forward(x)
    check(abs(float(ld) - float(pkg_ld[0])) < 1e-8 * max(1.0, abs(float(pkg_ld[0]))),
          f"logdet {float(ld):.6g} differs from the package's Pointwise ({float(pkg_ld[0]):.6g})")
    dW = _shaped("dW", dW, W.shape)
    Wv = W.copy()
    check(gradcheck(lambda: H * Wd * np.linalg.slogdet(Wv)[1], {"W": Wv}, {"W": dW}),
          "dW disagrees with finite differences of H W log|det W|")


@exercise("2.2", "predict a Jacobian's zeros", "jacobian_pattern")
def _grade_jacobian_pattern(answer):
    # ImgProc -> Normalize -> Pointwise on one 2x2x3 image: which d z_j / d x_i are nonzero?
    pred = np.asarray(answer, dtype=bool) if not callable(answer) else np.asarray(answer(), dtype=bool)
    check(pred.shape == (12, 12), f"the pattern must be a 12x12 boolean array, got shape {pred.shape}")
    rng = _rng(4)
    flows = [ImgProc(), Normalize((2, 2, 3), dtype=np.float64), Pointwise(3, rng=rng, dtype=np.float64)]
    flows[1].params["mu"][...] = rng.normal(size=(2, 2, 3))
    x0 = rng.uniform(10, 240, (1, 2, 2, 3))

    def run(x):
        for f in flows:
            x = f.forward(x)[0]
        return x.reshape(-1)
    J = np.zeros((12, 12))
    for i in range(12):
        e = np.zeros(12)
        e[i] = 1e-4
        J[:, i] = (run(x0 + e.reshape(x0.shape)) - run(x0 - e.reshape(x0.shape))) / 2e-4
    truth = np.abs(J) > 1e-9
    miss, extra = int((truth & ~pred).sum()), int((pred & ~truth).sum())
    check(miss == 0 and extra == 0, f"{miss} entries you predicted zero depend on the input, and {extra} "
          f"you predicted nonzero are exactly zero (of {int(truth.sum())} nonzero in all)")


# ------------------------------------------------------------------ tutorial 03
@exercise("3.1", "the backward of RMS normalisation", "rmsnorm_backward")
def _grade_rmsnorm_backward(answer):
    # y = x / sqrt(mean(x^2) + eps) over the last axis; L = sum(R * y)
    rng = _rng(5)
    eps = 1e-5
    x = rng.normal(size=(2, 3, 6))
    R = rng.normal(size=x.shape)
    loss = lambda: float((R * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)).sum())  # noqa: E731
    dx = _shaped("dx", answer(R.copy(), x.copy(), eps), x.shape)
    check(gradcheck(loss, {"x": x}, {"x": dx}), "dx disagrees with finite differences")


@exercise("3.2", "the backward of concat_elu, then of a tanh-sigmoid gate", "gated_tanh_backward")
def _grade_gated_tanh_backward(answer):
    # out = tanh(a) * sigmoid(b), [a, b] = split(concat_elu(x) @ M) on the last axis; L = sum(R * out)
    rng = _rng(6)
    x = rng.normal(size=(2, 3, 4))
    M = rng.normal(0, 0.5, (8, 8))
    R = rng.normal(size=(2, 3, 4))

    def loss():
        ab = concat_elu_reference(x) @ M
        a, b = ab[..., :4], ab[..., 4:]
        return float((R * np.tanh(a) / (1 + np.exp(-b))).sum())
    dx = _shaped("dx", answer(R.copy(), x.copy(), M.copy()), x.shape)
    check(gradcheck(loss, {"x": x}, {"x": dx}), "dx disagrees with finite differences")


# ------------------------------------------------------------------ tutorial 04
@exercise("4.1", "an affine coupling's backward through tanh", "affine_backward")
def _grade_affine_backward(answer):
    # y = x * exp(tanh(r)) + b, logdet_b = sum tanh(r); L = sum(R * y) + sum(rl * logdet)
    rng = _rng(7)
    x, r, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    R, rl = rng.normal(size=(3, 4)), rng.normal(size=3)
    loss = lambda: float((R * (x * np.exp(np.tanh(r)) + b)).sum() + (rl * np.tanh(r).sum(1)).sum())  # noqa: E731
    out = answer(x.copy(), r.copy(), b.copy(), R.copy(), rl.copy())
    check(isinstance(out, tuple) and len(out) == 3, "return (dx, dr, db)")
    grads = {k: _shaped(k, g, x.shape) for k, g in zip(("x", "r", "b"), out)}
    check(gradcheck(loss, {"x": x, "r": r, "b": b}, grads), "a gradient disagrees with finite differences")


@exercise("4.2", "two paths into the conditioning half", "coupling_dc")
def _grade_coupling_dc(answer):
    # y_c = c, y_x = x + tanh(c @ Wt); L = sum(Rc * y_c) + sum(Rx * y_x); dL/dc = ?
    rng = _rng(8)
    c, x, Wt = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(0, 0.5, (5, 5))
    Rc, Rx = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    loss = lambda: float((Rc * c).sum() + (Rx * (x + np.tanh(c @ Wt))).sum())  # noqa: E731
    dc = _shaped("dc", answer(c.copy(), x.copy(), Wt.copy(), Rc.copy(), Rx.copy()), c.shape)
    net_only = ((1 - np.tanh(c @ Wt) ** 2) * Rx) @ Wt.T
    check(rel_error(dc, net_only) > 1e-6, "dc is the network's path only: the identity path y_c = c adds dL/dy_c")
    check(gradcheck(loss, {"c": c}, {"c": dc}), "dc disagrees with finite differences")


# ------------------------------------------------------------------ tutorial 05
@exercise("5.1", "the importance-weighted bound, stably", "iw_bound")
def _grade_iw_bound(answer):
    # L_k = log (1/k) sum_i exp(log p_i - log q_i), per image, over axis 0 of [k, B]
    rng = _rng(9)
    log_p = rng.normal(-3000.0, 3.0, (16, 4))        # nats of a 3x32x32 image: exp() underflows
    log_q = rng.normal(0.0, 1.0, (16, 4))
    got = _shaped("L_k", answer(log_p.copy(), log_q.copy()), (4,))
    ref = importance_sampled_log_prob(log_p - log_q)
    check(np.max(np.abs(got - ref)) < 1e-8, f"L_k is off by up to {np.max(np.abs(got - ref)):.3g} nats")


@exercise("5.2", "predict the sign of bpd(ELBO) - bpd(L_k)", "iw_gap_sign")
def _grade_iw_gap_sign(answer):
    # bits/dim = -log p / (D ln 2): a larger bound in nats is a smaller number of bits/dim
    pred = answer() if callable(answer) else answer
    check(pred in (">= 0", "<= 0"), f"answer '>= 0' or '<= 0' (a string), got {pred!r}")
    rng = _rng(10)
    lw = rng.normal(-2000.0, 2.0, (64, 200))
    D = 3 * 8 * 8
    diffs = []
    for k in (1, 4, 16, 64):
        elbo = lw[:k].mean(axis=0)
        diffs.append(bits_per_dim(elbo, D) - bits_per_dim(importance_sampled_log_prob(lw[:k]), D))
    d = np.concatenate(diffs)
    holds = bool(np.all(d >= -1e-12)) if pred == ">= 0" else bool(np.all(d <= 1e-12))
    check(holds, f"on 200 images and k = 1, 4, 16, 64 the difference ranged over [{d.min():.3g}, {d.max():.3g}]"
          " bits/dim: Jensen's inequality says which way the log of a mean and the mean of the logs go")


# ------------------------------------------------------------------ tutorial 06
def _mixture(seed, n=8, K=3):
    rng = _rng(seed)
    return rng.normal(size=(n, K)), rng.normal(0, 2, (n, K)), rng.normal(0, 0.5, (n, K))


@exercise("6.1", "inverting the mixture CDF by bisection", "invert_cdf")
def _grade_invert_cdf(answer):
    logits, means, logscales = _mixture(11)
    u = np.array([1e-4, 0.01, 0.2, 0.5, 0.5, 0.8, 0.99, 1 - 1e-4])
    x = _shaped("x", answer(u.copy(), logits, means, logscales), u.shape)
    ref, _ = mixlogistic_invcdf(u, logits, means, logscales, method="bisection", tol=1e-12, max_iters=200)
    err = float(np.max(np.abs(x - ref)))
    check(err < 1e-6, f"x differs from the package's inverse by up to {err:.3g} "
          f"(F(x) - u up to {np.max(np.abs(np.exp(mixlogistic_logcdf(x, logits, means, logscales)) - u)):.3g})")


@exercise("6.2", "the Newton step on logit F", "newton_step")
def _grade_newton_step(answer):
    # g(x) = logit F(x) - logit u; step: x - g(x) / g'(x), with g'(x) checked by central differences
    logits, means, logscales = _mixture(12)
    rng = _rng(12)
    x, u = rng.normal(0, 2, 8), rng.uniform(0.05, 0.95, 8)

    def g(t):
        return (mixlogistic_logcdf(t, logits, means, logscales) - np.log1p(-np.exp(
            mixlogistic_logcdf(t, logits, means, logscales)))) - (np.log(u) - np.log1p(-u))
    h = 1e-6
    ref = x - g(x) / ((g(x + h) - g(x - h)) / (2 * h))
    got = _shaped("x_new", answer(x.copy(), u.copy(), logits, means, logscales), x.shape)
    err = float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))
    check(err < 1e-6, f"the step lands up to {err:.3g} away from x - g/g' (g' by finite differences)")


# ------------------------------------------------------------------ appendix A1
@exercise("A1.1", "actnorm's data-dependent init", "actnorm_init")
def _grade_actnorm_init(answer):
    # y = (x + bias) * exp(logscale), per channel: zero mean and unit std over (B, H, W)
    rng = _rng(13)
    x = rng.normal(0, 1, (16, 4, 4, 3)) * np.array([0.1, 3.0, 20.0]) + np.array([5.0, -2.0, 40.0])
    out = answer(x.copy())
    check(isinstance(out, tuple) and len(out) == 2, "return (bias, logscale), each of shape (C,)")
    bias, logscale = (_shaped(n, a, (3,)) for n, a in zip(("bias", "logscale"), out))
    y = (x + bias) * np.exp(logscale)
    m, s = y.mean(axis=(0, 1, 2)), y.std(axis=(0, 1, 2))
    check(np.max(np.abs(m)) < 1e-6 and np.max(np.abs(s - 1)) < 1e-4,
          f"after the init the channel means are {np.round(m, 4)} and the stds {np.round(s, 4)}")


@exercise("A1.2", "the LU 1x1 convolution's log-det and its gradient", "lu_logdet")
def _grade_lu_logdet(answer):
    # W = P L (U + diag(s)): log|det W| = sum log|s|; d/ds = 1/s
    rng = _rng(14)
    C = 5
    P = np.eye(C)[rng.permutation(C)]
    L = np.tril(rng.normal(size=(C, C)), -1) + np.eye(C)
    U = np.triu(rng.normal(size=(C, C)), 1)
    s = rng.normal(size=C) + np.sign(rng.normal(size=C)) * 0.5
    out = answer(P, L, U, s.copy())
    check(isinstance(out, tuple) and len(out) == 2, "return (logdet, ds)")
    ld, ds = float(out[0]), _shaped("ds", out[1], (C,))
    ref = np.linalg.slogdet(P @ L @ (U + np.diag(s)))[1]
    check(abs(ld - ref) < 1e-9 * max(1.0, abs(ref)), f"log|det W| = {ref:.6g}, yours {ld:.6g}")
    sv = s.copy()
    check(gradcheck(lambda: np.linalg.slogdet(P @ L @ (U + np.diag(sv)))[1], {"s": sv}, {"s": ds}),
          "ds disagrees with finite differences")


# ------------------------------------------------------------------ appendix A2
@exercise("A2.1", "attention by the online softmax", "online_attention")
def _grade_online_attention(answer):
    rng = _rng(15)
    q, k, v = (rng.normal(size=(2, 1, 20, 4)) for _ in range(3))
    q *= 30.0                                        # scores of several hundred: exp() overflows unshifted
    _, ref = attention_ref(q, k, v)
    got = _shaped("A", answer(q.copy(), k.copy(), v.copy(), 6), ref.shape)
    err = rel_error(got, ref)
    check(err < 1e-10, f"A differs from the plain attention by rel. error {err:.2e}")


@exercise("A2.2", "the row term of the softmax backward", "softmax_row_term")
def _grade_softmax_row_term(answer):
    # D_i = sum_j W_ij dW_ij with dW = dA v^T, computed from dA and A only
    rng = _rng(16)
    q, k, v = (rng.normal(size=(2, 1, 12, 4)) for _ in range(3))
    w, a = attention_ref(q, k, v)
    dA = rng.normal(size=a.shape)
    ref = (w * (dA @ v.swapaxes(-1, -2))).sum(-1)
    got = _shaped("D", answer(dA.copy(), a.copy()), ref.shape)
    err = rel_error(got, ref)
    check(err < 1e-10, f"D differs from sum_j W_ij dW_ij by rel. error {err:.2e}")


def exercises_of(prefix: str) -> list[str]:
    """The ids of one tutorial's exercises, e.g. ``exercises_of("1")`` or ``exercises_of("A2")``."""
    return [k for k in EXERCISES if k.split(".")[0] == prefix]

