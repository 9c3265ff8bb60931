"""The objective: the dequantization ELBO in bits/dim and its importance-sampled bound.

Data x are integers in {0 .. 2^n_bits - 1}^D; the model is a density p(y) on
[0, 2^n_bits)^D with unit-width bins (sec. 3.1):

    log P(x) >= E_{u ~ q(u|x)} [ log p(x + u) - log q(u|x) ]        (ELBO)
    bits/dim  = -ELBO / (D ln 2)

and with K samples u_k ~ q(.|x) (importance sampling, Burda et al.):

    log P(x) ~ logsumexp_k [ log p(x + u_k) - log q(u_k|x) ] - log K

which is also a lower bound on log P(x), tighter as K grows. The evaluation computes it
as a streaming log-sum-exp over passes (:mod:`flowpp_ref.training.evaluation`); the
function below is the textbook formula on a whole [K, B] array of log weights.
"""
from __future__ import annotations

import math

import numpy as np

LOG_2PI = math.log(2 * math.pi)


def standard_normal_logprob(z):
    """log N(z; 0, I) summed per sample. d/dz = -z."""
    return (-0.5 * (z * z + LOG_2PI)).reshape(z.shape[0], -1).sum(axis=1)


def bits_per_dim(log_prob, num_dims: int):
    """-log P / (D ln 2), elementwise over the batch."""
    return -log_prob / (num_dims * math.log(2.0))


def importance_sampled_log_prob(log_weights):
    """logsumexp_k w_k - log K over axis 0 of ``log_weights`` [K, B] (float64 on the host):
    m + log sum_k exp(w_k - m) - log K with m = max_k w_k."""
    lw = np.asarray(log_weights, dtype=np.float64)
    m = lw.max(axis=0)
    return m + np.log(np.exp(lw - m).sum(axis=0)) - math.log(lw.shape[0])
