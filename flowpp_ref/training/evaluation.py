"""Evaluation: the importance-weighted bound with k samples per image, and the inverse's error.

For an image x and k dequantization samples u_j ~ q(u|x) (the bound of sec. 3.1 tightened as in
Burda et al., 2016; the release evaluates it with k = 4096)::

    w_j      = log p(x + u_j) - log q(u_j|x)                 (one ELBO term per sample)
    log P(x) >= log (1/k) sum_j exp(w_j)                      (tighter as k grows; k = 1: the ELBO)
    bits/dim = -log P(x) / (D ln 2)

The (image, sample) pairs of the whole evaluation set are laid out image-major and cut
into passes of ``rows`` pairs, so a pass can hold the copies of one image or of several
(never k sequential passes of one small batch). Each pass gives ``rows`` log weights,
moved to the host and folded into a running log-sum-exp per image in float64::

    m_i <- max(m_i, max_j w_ij);   s_i <- s_i exp(m_i,old - m_i) + sum_j exp(w_ij - m_i)
    log P(x_i) = m_i + log s_i - log k

so memory is O(images), not O(images x k); for k = 1 this is w_i itself (m_i = w_i,
s_i = 1). The standard error reported is that of the per-image bits/dim over the images.
Under data parallelism the passes are dealt round-robin over the ranks and the noise of
each (image, sample) pair is keyed (:func:`iw_key`), so the bound is the same whatever
the number of ranks or ``rows``.
"""
from __future__ import annotations

import math

import numpy as np

from flowpp_ref.bijections.factor_out import exact_inverse
from flowpp_ref.core.backend import is_cupy, rng_for, to_numpy
from flowpp_ref.runtime import distributed as dist
from flowpp_ref.runtime.options import ConfigError, check_option
from flowpp_ref.training.keyed_rng import KeyedRNG, key_of


class NonFiniteResult(ValueError):
    """An evaluation produced a bits/dim that is not finite (never reported as a number)."""


class use_ema:
    """Context manager: evaluate or sample with the EMA parameters (appendix 8.5), then restore."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        # the model's own arrays are set aside untouched and put back as they are (the fused optimiser's
        # parameters are views of its flat buffer, and stay so)
        self.saved = self.model.parameters()
        self.model.load_parameters({k: v.copy() for k, v in self.ema.state_dict()["shadow"].items()})
        return self.model

    def __exit__(self, *exc):
        self.model.load_parameters(self.saved)
        return False


def iw_key(seed: int) -> int:
    """The key of the bound's noise: pair (image i, sample j) draws from
    ``KeyedRNG(iw_key(seed), [i * k + j])``, whatever pass or rank computes it."""
    return key_of(int(seed), 12345, 0)


def log_weight_passes(model, images, k: int, *, rng=None, key=None, rows: int = 64, comm=None):
    """Yield ``(image_index [r], log_weight float64 [r])`` pass by pass, image-major.

    Noise: ``rng``, one generator read pass after pass (single process only), or ``key``:
    pair p = i * k + j draws from :class:`~flowpp_ref.training.keyed_rng.KeyedRNG` ``(key, p)``, so
    the numbers do not depend on ``rows`` or on the ranks. With ``comm`` of N ranks, pass
    number t is computed by rank t mod N (the k samples of an image are spread over them).
    """
    images = images if hasattr(images, "shape") else np.asarray(images)
    n = len(images)
    if k < 1 or rows < 1:
        raise ValueError(f"k and rows must be positive, got k={k}, rows={rows}")
    if (rng is None) == (key is None):
        raise ValueError("give exactly one of rng= (a generator) and key= (per-pair keyed noise)")
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    if size > 1 and key is None:
        raise ValueError("a sharded bound needs key=: one generator cannot be split over ranks reproducibly")
    total = n * k
    for t, start in enumerate(range(0, total, rows)):
        if t % size != rank:
            continue
        pairs = np.arange(start, min(start + rows, total))
        img = pairs // k
        lo, hi = int(img[0]), int(img[-1]) + 1
        xf = model.prepare(images[lo:hi])                             # checked once per pass
        xp = model.xp
        x = xf[xp.asarray(img - lo)]                                  # the copies of each image
        if key is not None:
            r = KeyedRNG(key, pairs, xp)
        else:
            r = rng
        elbo, _ = model.elbo(x, rng=r, train=False)
        yield img, to_numpy(elbo).astype(np.float64)


def importance_weighted_bpd(model, images, k: int, *, rng=None, key=None, rows: int = 64, progress: bool = False,
                            comm=None):
    """Per-image bits/dim (float64 host array) of the k-sample importance-weighted bound.

    ``images``: integer pixels [N,H,W,C] (a host or backend array). With ``comm`` of N
    ranks each rank folds its own passes into (m_i, s_i); the ranks' partial
    log-sum-exps l_r,i = m_r,i + log s_r,i (-inf where a rank saw no sample of image i)
    travel in one all-reduce of an [N, images] array (rank r fills row r) and
    log P(x_i) = logsumexp_r l_r,i - log k.
    """
    n = len(images)
    m = np.full(n, -np.inf)
    s = np.zeros(n)
    bar = None
    if progress:
        size = comm.size if comm is not None else 1
        from tqdm.auto import tqdm          # loaded only when a bar is shown (it warns in Jupyter without widgets)
        bar = tqdm(total=-(-n * k // size), desc=f"eval k={k}", unit="sample", dynamic_ncols=True)
    for img, w in log_weight_passes(model, images, k, rng=rng, key=key, rows=rows, comm=comm):
        with np.errstate(invalid="ignore"):                           # a NaN weight stays NaN (reported by evaluate)
            m_new = m.copy()
            np.maximum.at(m_new, img, w)                              # m_i <- max(m_i, max_j w_ij)
            touched = np.unique(img)
            finite = np.isfinite(m[touched])
            s[touched] = np.where(finite, s[touched] * np.exp(m[touched] - m_new[touched]), 0.0)
            np.add.at(s, img, np.exp(w - m_new[img]))                # s_i += sum_j exp(w_ij - m_i)
        m = m_new
        if bar is not None:
            bar.update(len(img))
    if bar is not None:
        bar.close()
    with np.errstate(divide="ignore"):
        lse = m + np.log(s)                                           # -inf where this rank saw no sample
    if comm is not None and comm.size > 1:
        part = np.zeros((comm.size, n))
        part[comm.rank] = lse
        comm.allreduce(part)                                          # row r: rank r's partial log-sum-exp
        top = part.max(axis=0)
        with np.errstate(invalid="ignore"):
            lse = top + np.log(np.exp(part - top).sum(axis=0))
    logp = lse - math.log(k)
    return -logp / (model.num_dims * math.log(2.0))


def evaluate(model, images, *, batch_size=64, max_batches=None, k=1, seed=0, label=None, progress=False,
             comm=None):
    """``{"bpd", "bpd_sem", "num_images", "k"}``: the mean bits/dim of the k-sample bound
    (k = 1: the ELBO) over the first ``max_batches`` batches of ``batch_size`` images
    (None: all), with the standard error of the per-image values.

    The (image, sample) pairs run in passes of ``batch_size`` pairs
    (:func:`importance_weighted_bpd`, a progress bar on rank 0 if ``progress``); the
    noise of sample j of image i is keyed by (seed, i * k + j) (:func:`iw_key`), so the
    result does not depend on how the work is split: with ``comm`` (default:
    :func:`flowpp_ref.runtime.distributed.get_comm`) of N ranks the passes are dealt
    round-robin over the ranks (so the k samples of an image are spread over them too).

    Raises :class:`NonFiniteResult` naming the batch (and ``label``, e.g. the checkpoint)
    if any image's bits/dim is not finite: a result is a number or an error.
    """
    check_option("batch_size", batch_size)
    check_option("max_batches", max_batches, none_ok=True)
    check_option("k", k)
    if comm is None:
        comm = dist.get_comm(backend="cupy" if is_cupy(model.xp) else "numpy")
    images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ConfigError("evaluate: no images")
    nb = math.ceil(n / batch_size)
    if max_batches is not None:
        nb = min(nb, max_batches)
    m = min(n, nb * batch_size)
    v = importance_weighted_bpd(model, images[:m], k, key=iw_key(seed), rows=batch_size,
                                progress=progress and comm.rank == 0, comm=comm)
    for i in range(nb):
        vb = v[i * batch_size:(i + 1) * batch_size]
        if not np.isfinite(vb).all():
            raise NonFiniteResult(
                f"bits/dim is not finite for {int((~np.isfinite(vb)).sum())} of the {len(vb)} images of batch {i} "
                f"(images {i * batch_size}..{i * batch_size + len(vb) - 1}) of {label or 'the evaluation'}"
                f"{f' ({k} samples per image)' if k > 1 else ''}: the parameters are broken; use an earlier "
                "checkpoint (checkpoint-prev.npz of the run folder)")
    return {"bpd": float(v.mean()), "bpd_sem": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0,
            "num_images": int(len(v)), "k": int(k)}


def inverse_error(model, images, *, batch_size=64, max_batches=None, seed=0):
    """The release's training monitor ``val_inverr``: ``max |y - f^-1(f(y))|`` over the batches,
    with ``y = x + u`` the dequantized images (u from the dequantizer, eval mode) and f the
    main flow (its inverse as configured, ``ModelConfig.inverse_method``; the factored-out halves of
    RealNVP / Glow passed back, :func:`~flowpp_ref.bijections.factor_out.exact_inverse`). A float."""
    rng = rng_for(np.random.default_rng(int(seed) + 54321), model.xp)     # the same noise on every backend
    n = len(images)
    nb = math.ceil(n / batch_size)
    if max_batches:
        nb = min(nb, max_batches)
    worst = 0.0
    for i in range(nb):
        xf = model.prepare(np.asarray(images[i * batch_size:(i + 1) * batch_size]))
        u, _, _ = model.dequant.forward(xf, rng=rng, train=False)
        y = xf + u
        z, _, caches = model.flow.forward(y, None, train=False)
        y2 = exact_inverse(model.flow, z, caches)          # a multi-scale flow's factored halves given back
        worst = max(worst, float(to_numpy(model.xp.abs(y - y2).max())))
    return worst
