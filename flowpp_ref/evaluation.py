"""The release's evaluation: the importance-weighted bound with k samples per image (issue 12).

For an image x and k dequantization samples u_j ~ q(u|x) (Burda et al.)::

    w_j      = log p(x + u_j) - log q(u_j|x)                 (one ELBO term per sample)
    log P(x) >= log (1/k) sum_j exp(w_j)                      (tighter as k grows; k = 1: the ELBO)
    bits/dim = -log P(x) / (D ln 2)

The release tiles each test image across a batch and runs k/batch passes; here the
(image, sample) pairs of the whole evaluation set are laid out image-major and cut into
passes of ``rows`` pairs, so a pass can hold the copies of one image or of several
(never k sequential passes of one small batch). Each pass gives ``rows`` log weights,
moved to the host and folded into a running log-sum-exp per image in float64::

    m_i <- max(m_i, max_j w_ij);   s_i <- s_i exp(m_i,old - m_i) + sum_j exp(w_ij - m_i)
    log P(x_i) = m_i + log s_i - log k

so memory is O(images), not O(images x k). The standard error reported is that of
the per-image bits/dim over the images.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import to_numpy


def log_weight_passes(model, images, k: int, *, rng, rows: int = 64):
    """Yield ``(image_index [r], log_weight float64 [r])`` pass by pass, image-major."""
    n = len(images)
    if k < 1 or rows < 1:
        raise ValueError(f"k and rows must be positive, got k={k}, rows={rows}")
    total = n * k
    for start in range(0, total, rows):
        pairs = np.arange(start, min(start + rows, total))
        img = pairs // k
        lo, hi = int(img[0]), int(img[-1]) + 1
        xf = model.prepare(np.asarray(images[lo:hi]))                 # checked once per pass, on the host
        xp = model.xp
        x = xf[xp.asarray(img - lo)]                                  # the copies of each image
        elbo, _ = model.elbo(x, rng=rng, train=False)
        yield img, to_numpy(elbo).astype(np.float64)


def importance_weighted_bpd(model, images, k: int, *, rng, rows: int = 64, progress: bool = False):
    """Per-image bits/dim (float64 host array) of the k-sample importance-weighted bound."""
    n = len(images)
    m = np.full(n, -np.inf)
    s = np.zeros(n)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * k, desc=f"eval k={k}", unit="sample", dynamic_ncols=True)
    for img, w in log_weight_passes(model, images, k, rng=rng, rows=rows):
        m_new = m.copy()
        np.maximum.at(m_new, img, w)
        touched = np.unique(img)
        finite = np.isfinite(m[touched])
        s[touched] = np.where(finite, s[touched] * np.exp(m[touched] - m_new[touched]), 0.0)
        np.add.at(s, img, np.exp(w - m_new[img]))
        m = m_new
        if bar is not None:
            bar.update(len(img))
    if bar is not None:
        bar.close()
    logp = m + np.log(s) - math.log(k)
    return -logp / (model.num_dims * math.log(2.0))


def evaluate_iw(model, images, k: int, *, rng, rows: int = 64, progress: bool = False):
    """``{"bpd", "bpd_sem", "num_images", "k"}`` of the k-sample bound over ``images``."""
    v = importance_weighted_bpd(model, images, k, rng=rng, rows=rows, progress=progress)
    return {"bpd": float(v.mean()), "bpd_sem": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0,
            "num_images": int(len(v)), "k": int(k)}


def inverse_error(model, images, *, batch_size=64, max_batches=None, seed=0):
    """The release's training monitor ``val_inverr``: ``max |y - f^-1(f(y))|`` over the batches,
    with ``y = x + u`` the dequantized images (u from the dequantizer, eval mode) and f the
    main flow (its inverse as configured, ``ModelConfig.inverse_method``). A float."""
    from .backend import make_rng
    rng = make_rng(int(seed) + 54321, model.xp)
    n = len(images)
    nb = math.ceil(n / batch_size)
    if max_batches:
        nb = min(nb, max_batches)
    worst = 0.0
    for i in range(nb):
        xf = model.prepare(np.asarray(images[i * batch_size:(i + 1) * batch_size]))
        u, _, _ = model.dequant.forward(xf, rng=rng, train=False)
        y = xf + u
        z, _, _ = model.flow.forward(y, None, train=False)
        y2, _ = model.flow.inverse(z, None)
        worst = max(worst, float(to_numpy(model.xp.abs(y - y2).max())))
    return worst
