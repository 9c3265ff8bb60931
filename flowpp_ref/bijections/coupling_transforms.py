"""Elementwise coupling transforms with their parameters given as arrays.

The coupling network (another module) produces, per element of the transformed
half ``e`` ``[B, H, W, C]``, the arrays ``a`` (already ``tanh``-ed), ``b`` and the
mixture parameters ``logits, means, logscales`` ``[B, H, W, C, K]`` (log-scales
already clamped below at -7, the paper's ``tf.maximum(ml_logscales, -7.)``). The
functions here apply the elementwise map and differentiate it with respect to
``e`` and to every parameter array; the network's backward consumes those.

Mixture-of-logistics coupling (paper sec. 3.2.1, eq. 14; appendix 8.4)::

    y      = exp(a) * logit(F(e)) + b          (with_affine=False: y = logit(F(e)))
    logit F = log F - log(1-F)                 (both in log space, never log(1 - F))
    logdet = sum_{h,w,c} [ log p(e) - log F(e) - log(1-F(e)) + a ]     per sample, (B,)

(``log p - log F - log(1-F)`` is log|d logit(F)/de|: the release's
``Inverse(Sigmoid())`` log-det ``-log F - log(1-F)`` plus the mixture log-pdf.)

Backward, with dy = dL/dy and g = dL/dlogdet broadcast to every element of its
sample (the release's ``with_affine`` affine term applies when present)::

    dL/dlogF   = dy exp(a) - g,   dL/dlog1mF = -dy exp(a) - g,   dL/dlogpdf = g
    dL/da      = dy exp(a) logit F + g          (= dy (y - b) + g)
    dL/db      = dy
    dL/de, dL/dlogits, dL/dmeans, dL/dlogscales = mixlogistic_cdf_pdf_backward(...)

(without affine: ``exp(a)`` -> 1 and no ``a``/``b`` terms.)

Inverse (the release's ``inverse``)::

    u = clip(sigmoid((y - b) exp(-a)), 1e-5, 1 - 1e-5);   e = F^{-1}(u)
    logdet_inv = -logdet(e)

The clip is the paper's (``tf.clip_by_value(out, 1e-5, 1. - 1e-5)``): it keeps the
inverse-CDF target away from 0 and 1, where F^{-1} runs to -inf/+inf. Outputs
with ``|(y - b) exp(-a)| > logit(1 - 1e-5) = 11.51`` are therefore not inverted
exactly (they map to the quantile 1e-5 or 1 - 1e-5). ``logdet_inv`` is minus the
forward log-det evaluated at the returned ``e``, as the release computes it (its
sigmoid log-det uses the unclipped value; the two agree whenever the clip is
inactive).

Affine coupling (the paper's ablation)::

    y = exp(a) e + b,  logdet = sum a;   e = (y - b) exp(-a),  logdet_inv = -sum a
    dL/de = dy exp(a),  dL/da = dy exp(a) e + g,  dL/db = dy

Shapes: ``e, a, b, y``: ``[B, ...]`` (``[B, H, W, C]`` in the flow); mixture
parameters ``e.shape + (K,)``; log-dets ``(B,)``.

Cache (mixture coupling): the dict ``{"e", "a", "logits", "means", "logscales",
"logF", "log1mF", "logpdf", "with_affine"}`` -- references to the caller's arrays
(no copies) plus the three log-quantities of the forward, each shaped like e.
The backward recomputes ``z``, the sigmoids and the responsibilities from the
parameters (memory for compute: nothing of size ``[..., K]`` is stored).
Cache (affine coupling): ``{"e", "a"}``; ``exp(a)`` is recomputed.

Checks: shapes and dtypes on every call (cheap, no device sync); values
(non-finite ``y``, ``a``, ``b``) only in the inverses, which are not on the
training path; on CuPy those of one inverse, with the inverse CDF's own, cost one
host read (:class:`~flowpp_ref.core.validation.DeferredChecks`). The forward does not
scan its inputs for nan/inf (the training loop checks its inputs once per step; see
:mod:`flowpp_ref.core.validation`).
"""
from __future__ import annotations

from flowpp_ref.bijections.mixlogistic import (_check_mix, mixlogistic_cdf_pdf, mixlogistic_cdf_pdf_backward,
                                               mixlogistic_invcdf)
from flowpp_ref.core.backend import array_module
from flowpp_ref.core.validation import DeferredChecks, FlowInputError, check_array

CLIP_EPS = 1e-5   # the release clips the inverse-CDF target to [1e-5, 1 - 1e-5]


# ------------------------------------------------------------------ helpers
def _check_e_ab(e, a, b, name_e="e", with_affine=True):
    check_array(e, name_e)
    if e.ndim < 1:
        raise FlowInputError(f"{name_e}: expected an array with a leading batch axis [B, ...], got a 0-d array")
    if with_affine:
        for name, p in (("a", a), ("b", b)):
            if p is None:
                raise FlowInputError(f"{name}: required when with_affine=True (got None)")
            check_array(p, name)
            if tuple(p.shape) != tuple(e.shape):
                raise FlowInputError(f"{name} has shape {tuple(p.shape)} but {name_e} has shape {tuple(e.shape)}")
            if p.dtype != e.dtype:
                raise FlowInputError(f"{name}: dtype {p.dtype} differs from {name_e}'s dtype {e.dtype}")


def _per_sample_sum(v):
    """Sum over every axis but the first: [B, ...] -> (B,)."""
    return v.reshape(v.shape[0], -1).sum(axis=1)


def _broadcast_logdet_grad(dlogdet, like, xp):
    """g of shape (B,) -> an array shaped like ``like`` (each sample's value repeated)."""
    B = like.shape[0]
    if dlogdet is None:
        return xp.zeros_like(like)
    if tuple(dlogdet.shape) != (B,):
        raise FlowInputError(f"dlogdet: expected shape ({B},), got {tuple(dlogdet.shape)}")
    g = dlogdet.astype(like.dtype, copy=False).reshape((B,) + (1,) * (like.ndim - 1))
    return xp.broadcast_to(g, like.shape)


def _check_dy(dy, like, xp):
    if dy is None:
        return xp.zeros_like(like)
    if tuple(dy.shape) != tuple(like.shape):
        raise FlowInputError(f"dy: expected shape {tuple(like.shape)}, got {tuple(dy.shape)}")
    return dy.astype(like.dtype, copy=False)


def _sigmoid(v, xp):
    """sigmoid(v) without overflow: exp(-|v|) is in (0, 1]."""
    t = xp.exp(-xp.abs(v))
    return xp.where(v >= 0, 1 / (1 + t), t / (1 + t))


# ------------------------------------------------------------------ mixture-of-logistics coupling
def mixlogistic_coupling_forward(e, a, b, logits, means, logscales, with_affine=True):
    """y = exp(a) logit(F(e)) + b and its per-sample log-det; returns ``(y, logdet, cache)``.

    Math, shapes and cache: see the module docstring. With ``with_affine=False``
    ``a`` and ``b`` are ignored (pass None).
    """
    _check_e_ab(e, a, b, "e", with_affine)
    _check_mix(e, logits, means, logscales, xname="e")
    xp = array_module(e, logits)
    logF, log1mF, logpdf = mixlogistic_cdf_pdf(e, logits, means, logscales)
    logit_F = logF - log1mF
    ld = logpdf - logF - log1mF                    # log |d logit(F)/de|
    if with_affine:
        y = xp.exp(a) * logit_F + b
        ld = ld + a                                # log |d (exp(a) u + b)/du| = a
    else:
        y = logit_F
    logdet = _per_sample_sum(ld)
    cache = dict(e=e, a=a if with_affine else None, logits=logits, means=means, logscales=logscales,
                 logF=logF, log1mF=log1mF, logpdf=logpdf, with_affine=bool(with_affine))
    return y, logdet, cache


def mixlogistic_coupling_backward(dy, dlogdet, cache):
    """Gradients of L with respect to e and every parameter array.

    ``dy``: dL/dy (shape of e; None = 0); ``dlogdet``: dL/dlogdet ``(B,)`` (None = 0).
    Returns ``{"e", "a", "b", "logits", "means", "logscales"}`` (``"a"``/``"b"``
    only with affine), each shaped like its input. Formulas: module docstring.
    """
    e = cache["e"]
    xp = array_module(e)
    dy = _check_dy(dy, e, xp)
    g = _broadcast_logdet_grad(dlogdet, e, xp)     # dL/dlogdet per element
    logF, log1mF = cache["logF"], cache["log1mF"]
    if cache["with_affine"]:
        a = cache["a"]
        dyea = dy * xp.exp(a)                      # dL/d logit F = dy exp(a)
    else:
        dyea = dy
    gF = dyea - g                                  # dL/dlogF   = dy exp(a) - g
    gG = -dyea - g                                 # dL/dlog1mF = -dy exp(a) - g
    gP = g                                         # dL/dlogpdf = g
    de, dlogits, dmeans, dlogscales = mixlogistic_cdf_pdf_backward(
        e, cache["logits"], cache["means"], cache["logscales"], gF, gG, gP,
        outputs=(logF, log1mF, cache["logpdf"]))
    grads = dict(e=de, logits=dlogits, means=dmeans, logscales=dlogscales)
    if cache["with_affine"]:
        grads["a"] = dyea * (logF - log1mF) + g    # dL/da = dy exp(a) logit F + g
        grads["b"] = dy.copy()                     # dL/db = dy
    return grads


def mixlogistic_coupling_inverse(y, a, b, logits, means, logscales, with_affine=True,
                                 method="bisection", tol=None, max_iters=None, return_info=False,
                                 logdet=True):
    """e = F^{-1}(clip(sigmoid((y - b) exp(-a)), 1e-5, 1 - 1e-5)); returns ``(e, logdet_inv)``.

    ``logdet=False``: ``logdet_inv`` is None (it costs one more mixture evaluation at e; sampling
    does not need it).

    ``method``: ``"bisection"`` (the release's) or ``"hybrid"`` (safeguarded
    Newton); ``tol``/``max_iters`` default per dtype
    (:func:`flowpp_ref.bijections.mixlogistic.invcdf_defaults`). With ``return_info`` the
    inverse CDF's info dict is returned as a third value. Raises
    FlowInputError on bad shapes or non-finite y, a, b or mixture parameters.
    """
    _check_e_ab(y, a, b, "y", with_affine)
    _check_mix(y, logits, means, logscales, xname="y")
    xp = array_module(y, logits)
    checks = DeferredChecks(xp)                # read with the inverse CDF's checks: one host read on CuPy
    checks.finite(y, "y")
    if with_affine:
        checks.finite(a, "a")
        checks.finite(b, "b")
    v = (y - b) * xp.exp(-a) if with_affine else y
    u = xp.clip(_sigmoid(v, xp), CLIP_EPS, 1 - CLIP_EPS)      # the release's clip
    e, info = mixlogistic_invcdf(u, logits, means, logscales, method=method, tol=tol, max_iters=max_iters,
                                 checks=checks)
    if not logdet:
        return (e, None, info) if return_info else (e, None)
    logF, log1mF, logpdf = mixlogistic_cdf_pdf(e, logits, means, logscales)
    ld = logpdf - logF - log1mF
    if with_affine:
        ld = ld + a
    logdet_inv = -_per_sample_sum(ld)
    return (e, logdet_inv, info) if return_info else (e, logdet_inv)


# ------------------------------------------------------------------ affine coupling
def affine_coupling_forward(e, a, b):
    """y = exp(a) e + b, logdet = sum a per sample; returns ``(y, logdet, cache)``."""
    _check_e_ab(e, a, b, "e")
    xp = array_module(e, a, b)
    y = xp.exp(a) * e + b
    return y, _per_sample_sum(a), dict(e=e, a=a)


def affine_coupling_backward(dy, dlogdet, cache):
    """Returns ``{"e", "a", "b"}``: dL/de = dy exp(a), dL/da = dy exp(a) e + g, dL/db = dy."""
    e, a = cache["e"], cache["a"]
    xp = array_module(e, a)
    dy = _check_dy(dy, e, xp)
    g = _broadcast_logdet_grad(dlogdet, e, xp)
    dyea = dy * xp.exp(a)
    return dict(e=dyea, a=dyea * e + g, b=dy.copy())


def affine_coupling_inverse(y, a, b, *, checks=None):
    """e = (y - b) exp(-a), logdet_inv = -sum a per sample; returns ``(e, logdet_inv)``.

    Raises FlowInputError on non-finite y, a or b; on CuPy these checks, with those the caller
    registered in ``checks`` (a :class:`~flowpp_ref.core.validation.DeferredChecks`), cost one host read.
    """
    _check_e_ab(y, a, b, "y")
    xp = array_module(y, a, b)
    checks = DeferredChecks(xp) if checks is None else checks
    for name, v in (("y", y), ("a", a), ("b", b)):
        checks.finite(v, name)
    checks.run()
    return (y - b) * xp.exp(-a), -_per_sample_sum(a)
