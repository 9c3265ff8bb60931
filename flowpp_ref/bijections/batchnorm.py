"""BatchNormFlow: RealNVP's batch normalization as a bijection (Dinh et al. 2017, sec. 3.7).

Math (input ``x`` of shape [B, H, W, C]; every statistic and parameter is per channel c,
shape [C], broadcast over b, h, w; ``N = B * H * W``)::

    training (train=True):   mu_c  = mean_{b,h,w} x,   var_c = mean_{b,h,w} (x - mu_c)^2   (population)
    evaluation / sampling:   mu_c  = running_mean_c,   var_c = running_var_c
    r      = (var + eps)^(-1/2)
    xhat   = (x - mu) * r
    y      = xhat * exp(log_gamma) + beta
    logdet = H * W * sum_c (log_gamma_c - 0.5 * log(var_c + eps))     the same for every sample
    inverse (running statistics): x = (y - beta) * exp(-log_gamma) / r + mu,  logdet_inv = -logdet

Training mode is not a per-sample map: ``y_b`` depends on the whole batch through ``mu`` and
``var``. The log-det returned is RealNVP's (sec. 3.7: "the Jacobian ... prod_i (var_i + eps)^-1/2"),
i.e. the Jacobian of the per-channel affine map with the batch statistics held constant; it is
not log|det| of the B*H*W*C-dimensional batch map. The BACKWARD, however, differentiates the
loss through ``mu`` and ``var`` (they depend on x), both in ``y`` and in the log-det term
``-0.5 * H * W * log(var + eps)`` -- as TensorFlow's autodiff does in the release, whose
``log_diff`` uses the batch ``var`` without ``stop_gradient``. In evaluation mode
(``train=False``) the map uses the running statistics: a true per-sample bijection, and its
log-det is the exact log|det|. :meth:`inverse` always uses the running statistics (sampling).

Affine part: ``affine=True`` (default) adds a per-channel scale and shift, parametrised as
``exp(log_gamma)`` and ``beta`` (RealNVP's ``batch_norm`` has ``gamma``/``beta``; we store the
log of the scale so the scale stays positive and the log-det ``H*W*sum log_gamma`` is exact).
``affine=False`` is the release's ``batch_norm_log_diff`` on the coupling output (``bn_out``),
which has no scale or shift.

Running statistics (the release's ``AssignMovingAvg``, ``decay = 0.1``)::

    running <- momentum * running + (1 - momentum) * batch          momentum = 0.9 (release)

updated only by a training-mode forward (never by evaluation, inverse or backward), with the
population variance of the batch (``tf.nn.moments``, ddof 0), in place, per channel and only
where the batch statistic is finite (a non-finite batch, whose step the training loop skips,
leaves them as they were -- the release's ``check_numerics`` raises instead). The release's
``bn_lag`` (off by default, ``DEFAULT_BN_LAG = 0``) is not implemented. Defaults ``eps = 1e-4``
and ``momentum = 0.9`` are those of the release's ``bn_out``; the paper gives neither.
Initial values: ``running_mean = 0``, ``running_var = 1``, ``log_gamma = 0``, ``beta = 0``.

Where the running statistics live: ``running_mean``/``running_var`` are kept in ``self.params``
so that ``parameters()``/``load_parameters()`` -- and therefore checkpoints, the EMA copy and
the data-parallel parameter check -- carry them without a separate buffer mechanism. They are
NOT trained: :meth:`backward` returns exact zeros for them, and Adam with a gradient that is
always zero keeps ``m = v = 0`` and updates by ``lr * 0 / (0 + eps) = 0``; the gradient-norm
clipping adds 0. They are updated in place (``a[...] = ...``) so that every holder of the
arrays (the training loop's ``params`` dict, Adam) sees the new values. Consequence for the
caller: the EMA of the parameters also averages the running statistics (a second, slower
average).

Data parallelism (synchronised batch statistics): with ``self.comm`` set to a communicator of
:mod:`flowpp_ref.runtime.distributed` whose ``size > 1`` (the training loop sets it on every
BatchNormFlow of a data-parallel run), the statistics of a training-mode forward are those of the
*global* batch: per channel, the sums ``sum x`` and the count are all-reduced, then
``sum (x - mu)^2``; the backward all-reduces ``sum g``, ``sum g xhat`` and ``sum_b dL/dlogdet``, the
only batch-wide terms of ``dL/dx`` below (with N, B the global counts). Each process then computes
exactly the batch-wide map of the one-process step on its shard of the images, and the running
statistics stay equal on every process (the parameter check at each checkpoint compares them).
Three small all-reduces per layer and step, each of 2C + 2 numbers at most.

Data-dependent init (:meth:`BatchNormFlow.data_init`): sets ``running_mean``/``running_var``
to the statistics of the init batch (not a momentum step), leaves ``log_gamma``/``beta``
unchanged, returns the output (the same in training and evaluation mode right after it).

Reference: Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017,
sec. 3.7 (batch normalization) and the released ``real_nvp_utils.batch_norm`` /
``batch_norm_log_diff``.
"""
from __future__ import annotations

import numpy as np

from flowpp_ref.bijections.base import Bijection
from flowpp_ref.core.backend import array_module, asarray
from flowpp_ref.core.validation import FlowInputError, check_array, check_finite

BATCHNORM_EPS = 1e-4        # the release's bn_out epsilon
BATCHNORM_MOMENTUM = 0.9    # the release's decay = 0.1: running -= 0.1 * (running - batch)

_AXES = (0, 1, 2)


class BatchNormFlow(Bijection):
    """RealNVP's batch normalization as a bijection; see the module docstring for the math.

    Args:
        channels: C, the number of channels of the input [B, H, W, C].
        momentum: weight of the old running statistics in each update (default 0.9, the release's).
        eps: added to the variance (default 1e-4, the release's ``bn_out``).
        affine: include the scale ``exp(log_gamma)`` and shift ``beta`` (default True).
        xp, dtype: where and how the parameters are stored.

    Parameters: ``log_gamma``, ``beta`` (only when affine), ``running_mean``, ``running_var``
    (all [C]; the running ones receive zero gradients, see the module docstring).
    Shapes: x [B, H, W, C] -> y [B, H, W, C]; logdet (B,).
    Cache: ``{"train", "xhat", "r"}`` (normalised input, (var + eps)^-1/2 of the statistics used);
    inverse_with_cache keeps ``{"u": (y - beta) * exp(-log_gamma), "s": exp(-log_gamma) / r}``.
    The parameters are read from ``self.params`` again in backward (log_gamma must not change
    between forward and backward).
    """

    def __init__(self, channels, *, momentum: float = BATCHNORM_MOMENTUM, eps: float = BATCHNORM_EPS,
                 affine: bool = True, xp=np, dtype=np.float32):
        super().__init__()
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.channels = int(channels)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.affine = bool(affine)
        self.dtype = np.dtype(dtype)
        self.comm = None            # a data-parallel communicator: global batch statistics (module docstring)
        C = self.channels
        if self.affine:
            self.params["log_gamma"] = asarray(np.zeros(C), xp, self.dtype)
            self.params["beta"] = asarray(np.zeros(C), xp, self.dtype)
        self.params["running_mean"] = asarray(np.zeros(C), xp, self.dtype)
        self.params["running_var"] = asarray(np.ones(C), xp, self.dtype)

    # ----------------------------------------------------------- helpers
    def _check(self, x, name):
        if isinstance(x, tuple):
            raise FlowInputError(f"{name}: expected one array [B, H, W, {self.channels}], got a tuple of shapes "
                                 f"{[tuple(getattr(a, 'shape', ())) for a in x]}")
        check_array(x, name, ndim=4)
        if x.shape[3] != self.channels:
            raise FlowInputError(f"{name}: expected {self.channels} channels, got shape {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise FlowInputError(f"{name}: empty batch, shape {tuple(x.shape)}")

    def _affine(self, dtype):
        """(log_gamma, gamma, beta) in ``dtype``; (None, None, None) when not affine."""
        if not self.affine:
            return None, None, None
        lg = self.params["log_gamma"].astype(dtype, copy=False)
        xp = array_module(lg)
        return lg, xp.exp(lg), self.params["beta"].astype(dtype, copy=False)

    def _logdet(self, var, B, HW, dtype, xp, sign):
        # logdet = H * W * sum_c (log_gamma_c - 0.5 * log(var_c + eps)), the same for every sample
        per_c = -0.5 * xp.log(var + self.eps)
        if self.affine:
            per_c = per_c + self.params["log_gamma"].astype(dtype, copy=False)
        return (sign * HW * per_c.sum()) * xp.ones((B,), dtype=dtype)

    def _update_running(self, mu, var):
        # running <- m * running + (1 - m) * batch, per channel, only where the batch value is finite
        m = self.momentum
        for name, batch in (("running_mean", mu), ("running_var", var)):
            run = self.params[name]
            xp = array_module(run)
            b = batch.astype(run.dtype)
            run[...] = xp.where(xp.isfinite(b), m * run + (1.0 - m) * b, run)

    def _synced(self) -> bool:
        return self.comm is not None and self.comm.size > 1

    def _global_sum(self, parts):
        """The arrays ``parts`` (1-d) summed over the processes of ``self.comm``, in one all-reduce (float64)."""
        xp = array_module(parts[0])
        buf = xp.concatenate([xp.asarray(p, dtype=np.float64).reshape(-1) for p in parts])
        self.comm.allreduce(buf)
        out, i = [], 0
        for p in parts:
            n = int(np.prod(p.shape))
            out.append(buf[i:i + n].reshape(p.shape))
            i += n
        return out

    def _batch_stats(self, x):
        """(mu, var, N, B) of the batch: this process's, or the global batch's when synced."""
        B, H, W, _ = x.shape
        if not self._synced():
            mu = x.mean(axis=_AXES)                                  # mu_c = mean_{b,h,w} x
            d = x - mu
            return mu, (d * d).mean(axis=_AXES), B * H * W, B       # var_c = mean_{b,h,w} (x - mu)^2
        xp = array_module(x)
        s1, nb = self._global_sum([x.sum(axis=_AXES), xp.asarray([B * H * W, B], dtype=np.float64)])
        n, b = nb[0], nb[1]                                          # global N = sum B H W, global B
        mu = (s1 / n).astype(x.dtype)
        d = x - mu
        (s2,) = self._global_sum([(d * d).sum(axis=_AXES)])
        return mu, (s2 / n).astype(x.dtype), n, b

    # ----------------------------------------------------------- forward
    def forward(self, x, context=None, *, train=False, rng=None):
        self._check(x, "BatchNormFlow.forward")
        xp = array_module(x)
        B, H, W, _ = x.shape
        if train:
            if B * H * W < 2:
                raise FlowInputError(f"BatchNormFlow.forward (train=True): needs at least 2 values per channel "
                                     f"(B*H*W >= 2) for batch statistics, got shape {tuple(x.shape)}")
            mu, var, n, b = self._batch_stats(x)
            d = x - mu
            self._update_running(mu, var)
        else:
            mu = self.params["running_mean"].astype(x.dtype, copy=False)
            var = self.params["running_var"].astype(x.dtype, copy=False)
            d = x - mu
        r = 1.0 / xp.sqrt(var + self.eps)                           # r = (var + eps)^-1/2
        xhat = d * r                                                 # xhat = (x - mu) r
        _, gamma, beta = self._affine(x.dtype)
        y = xhat if gamma is None else xhat * gamma + beta           # y = xhat exp(log_gamma) + beta
        logdet = self._logdet(var, B, H * W, x.dtype, xp, 1.0)
        cache = {"train": bool(train), "xhat": xhat, "r": r}
        if train and self._synced():
            cache.update(n=n, b=b)                                   # the global counts N, B
        return y, logdet, cache

    def backward(self, dy, dlogdet, cache):
        xhat, r = cache["xhat"], cache["r"]
        xp = array_module(dy)
        B, H, W, _ = dy.shape
        D = dlogdet.sum()                                            # D = sum_b dL/dlogdet_b
        _, gamma, _ = self._affine(dy.dtype)
        g = dy if gamma is None else dy * gamma                      # g = dL/dxhat = dy * gamma
        if cache["train"]:
            # through mu and var:  dx = r (g - mean(g) - xhat mean(g xhat))        (means over b, h, w)
            # log-det term:        dlogdet_b/dvar_c = -0.5 H W / (var_c + eps),  dvar_c/dx = 2 (x - mu) / N
            #                      => dx += -0.5 H W D r^2 * 2 (x - mu) / N = -D xhat r / B      (N = B H W)
            if "n" in cache:                                         # synced: global sums, global N and B
                sg, sgx, Dg = self._global_sum([g.sum(axis=_AXES), (g * xhat).sum(axis=_AXES), D.reshape(1)])
                n, dt = cache["n"], dy.dtype
                dx = (r * (g - (sg / n).astype(dt) - xhat * (sgx / n).astype(dt))
                      - (Dg / cache["b"]).astype(dt) * (xhat * r))
            else:
                dx = r * (g - g.mean(axis=_AXES) - xhat * (g * xhat).mean(axis=_AXES)) - (D / B) * (xhat * r)
        else:
            dx = g * r                                               # dx = dy gamma r
        grads = {}
        if self.affine:
            # dL/dlog_gamma = sum_{b,h,w} dy gamma xhat + H W D ;  dL/dbeta = sum_{b,h,w} dy
            grads["log_gamma"] = ((g * xhat).sum(axis=_AXES) + (H * W) * D).astype(self.params["log_gamma"].dtype)
            grads["beta"] = dy.sum(axis=_AXES).astype(self.params["beta"].dtype)
        # the running statistics are not trained: exact zero gradients
        grads["running_mean"] = xp.zeros_like(self.params["running_mean"])
        grads["running_var"] = xp.zeros_like(self.params["running_var"])
        return dx, None, grads

    # ----------------------------------------------------------- inverse (running statistics)
    def inverse(self, y, context=None):
        x, ld, _ = self.inverse_with_cache(y, context)
        return x, ld

    def inverse_with_cache(self, y, context=None):
        self._check(y, "BatchNormFlow.inverse")
        xp = array_module(y)
        B, H, W, _ = y.shape
        mu = self.params["running_mean"].astype(y.dtype, copy=False)
        var = self.params["running_var"].astype(y.dtype, copy=False)
        sd = xp.sqrt(var + self.eps)                                 # 1 / r
        _, gamma, beta = self._affine(y.dtype)
        u = y if gamma is None else (y - beta) / gamma               # u = (y - beta) exp(-log_gamma) = xhat
        x = u * sd + mu                                              # x = xhat / r + mu
        s = sd if gamma is None else sd / gamma                      # dx/dy = exp(-log_gamma) / r
        return x, self._logdet(var, B, H * W, y.dtype, xp, -1.0), {"u": u, "s": s}

    def inverse_backward(self, dx, dlogdet, cache):
        u, s = cache["u"], cache["s"]
        xp = array_module(dx)
        H, W = dx.shape[1], dx.shape[2]
        D = dlogdet.sum()
        dy = dx * s                                                  # dL/dy = dx exp(-log_gamma) / r
        grads = {}
        if self.affine:
            # x = (y - beta) exp(-log_gamma) / r + mu:  dx/dlog_gamma = -u / r,  dx/dbeta = -s
            # logdet_inv = -H W sum_c (log_gamma_c - ...):  dlogdet_inv/dlog_gamma = -H W
            sd = s * xp.exp(self.params["log_gamma"].astype(dx.dtype, copy=False))
            grads["log_gamma"] = (-(dx * u * sd).sum(axis=_AXES) - (H * W) * D).astype(
                self.params["log_gamma"].dtype)
            grads["beta"] = (-(dx * s).sum(axis=_AXES)).astype(self.params["beta"].dtype)
        grads["running_mean"] = xp.zeros_like(self.params["running_mean"])
        grads["running_var"] = xp.zeros_like(self.params["running_var"])
        return dy, None, grads

    # ----------------------------------------------------------- init
    def data_init(self, x, context=None):
        """Set the running statistics to those of ``x`` (see module docstring); return the output."""
        self._check(x, "BatchNormFlow.data_init")
        B, H, W, _ = x.shape
        if B * H * W < 2:
            raise FlowInputError(f"BatchNormFlow.data_init: needs at least 2 values per channel (B*H*W >= 2) "
                                 f"to estimate a variance, got shape {tuple(x.shape)}")
        check_finite(x, "BatchNormFlow.data_init")
        a64 = x.astype(np.float64)
        m = a64.mean(axis=_AXES)
        v = ((a64 - m) ** 2).mean(axis=_AXES)                        # population variance (ddof 0)
        self.params["running_mean"][...] = m.astype(self.dtype)
        self.params["running_var"][...] = v.astype(self.dtype)
        return self.forward(x, context)[0]

    def __repr__(self):
        return (f"BatchNormFlow(channels={self.channels}, momentum={self.momentum}, eps={self.eps}, "
                f"affine={self.affine})")
