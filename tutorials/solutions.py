"""Worked answers to the tutorials' exercises (graded by ``exercises.py``; try each one first).

Each answer states the formula it implements, derived on paper, the way the package's code does.
``tests/test_exercises.py`` checks that every answer here passes its grader.
"""
import numpy as np


def _softplus(t):
    return np.logaddexp(0.0, t)


def _logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.exp(a - m).sum(axis=axis))


# ------------------------------------------------------------------ tutorial 01
def sigmoid_backward(x, dy, dlogdet):
    """y = s = sigmoid(x), logdet = sum log s(1-s). dy/dx = s(1-s); d log(s(1-s))/dx = 1 - 2s.
    dL/dx = dy * s(1-s) + dlogdet_b * (1 - 2s)."""
    s = 1.0 / (1.0 + np.exp(-x))
    return dy * s * (1 - s) + dlogdet.reshape((-1,) + (1,) * (x.ndim - 1)) * (1 - 2 * s)


def mixture_logpdf(x, logits, means, logscales):
    """z_k = (x - m_k) e^{-s_k}; f = sum_k pi_k sigmoid(z_k) sigmoid(-z_k) e^{-s_k}.
    log f = LSE_k[log pi_k + z_k - s_k - 2 softplus(z_k)], using log sigmoid(z) = -softplus(-z)."""
    z = (x[..., None] - means) * np.exp(-logscales)
    log_pi = logits - _logsumexp(logits, -1)[..., None]
    return _logsumexp(log_pi - _softplus(-z) - _softplus(z) - logscales, -1)


# ------------------------------------------------------------------ tutorial 02
def pointwise_logdet(W, H, Wd):
    """logdet = H W log|det W| (the same C x C matrix at every pixel); d log|det W| / dW = W^{-T}."""
    return H * Wd * np.linalg.slogdet(W)[1], H * Wd * np.linalg.inv(W).T


def jacobian_pattern():
    """ImgProc and Normalize act elementwise (diagonal Jacobians); the 1x1 convolution mixes the C = 3
    channels of one pixel and nothing else. In [H, W, C] order: one dense 3x3 block per pixel."""
    return np.kron(np.eye(4), np.ones((3, 3))).astype(bool)


# ------------------------------------------------------------------ tutorial 03
def rmsnorm_backward(dout, x, eps):
    """y = x r, r = (mean(x^2) + eps)^{-1/2}; dr/dx_j = -r^3 x_j / n.
    dL/dx = r (dout - y mean(dout y))."""
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    y = x * r
    return r * (dout - y * (dout * y).mean(-1, keepdims=True))


def gated_tanh_backward(dout, x, M):
    """h = concat_elu(x) = elu([x, -x]); [a, b] = h M; out = tanh(a) sigmoid(b).
    da = dout sigmoid(b) (1 - tanh^2 a); db = dout tanh(a) sigmoid(b)(1 - sigmoid(b)); dh = [da, db] M^T;
    dx = dh[:C] elu'(x) - dh[C:] elu'(-x), elu'(t) = 1 if t > 0 else e^t."""
    C = x.shape[-1]
    pre = np.concatenate([x, -x], -1)
    h = np.where(pre > 0, pre, np.expm1(np.minimum(pre, 0)))
    ab = h @ M
    a, b = ab[..., :C], ab[..., C:]
    t, s = np.tanh(a), 1.0 / (1.0 + np.exp(-b))
    dh = np.concatenate([dout * s * (1 - t * t), dout * t * s * (1 - s)], -1) @ M.T
    elu_grad = lambda v: np.where(v > 0, 1.0, np.exp(np.minimum(v, 0)))  # noqa: E731
    return dh[..., :C] * elu_grad(x) - dh[..., C:] * elu_grad(-x)


# ------------------------------------------------------------------ tutorial 04
def affine_backward(x, r, b, dy, dlogdet):
    """y = x e^{a} + b, a = tanh(r), logdet = sum a.
    dx = dy e^a; db = dy; dr = (dy x e^a + dlogdet_b) (1 - a^2)."""
    a = np.tanh(r)
    ea = np.exp(a)
    return dy * ea, (dy * x * ea + dlogdet[:, None]) * (1 - a * a), dy.copy()


def coupling_dc(c, x, Wt, dyc, dyx):
    """y_c = c, y_x = x + tanh(c Wt): dL/dc = dL/dy_c (identity path) + ((1 - t^2) dL/dy_x) Wt^T (network)."""
    t = np.tanh(c @ Wt)
    return dyc + ((1 - t * t) * dyx) @ Wt.T


# ------------------------------------------------------------------ tutorial 05
def iw_bound(log_p, log_q):
    """L_k = LSE_i(log p_i - log q_i) - log k, the max subtracted before exp."""
    lw = log_p - log_q
    return _logsumexp(lw, 0) - np.log(lw.shape[0])


def iw_gap_sign():
    """ELBO = mean_i log w_i <= log mean_i w_i = L_k (Jensen; log is concave). Bits/dim is
    -log p / (D ln 2): the smaller bound in nats is the larger in bits/dim, so bpd(ELBO) - bpd(L_k) >= 0."""
    return ">= 0"


# ------------------------------------------------------------------ tutorial 06
def _mixture_cdf(x, logits, means, logscales):
    z = (x[..., None] - means) * np.exp(-logscales)
    pi = np.exp(logits - _logsumexp(logits, -1)[..., None])
    return (pi / (1.0 + np.exp(-z))).sum(-1)


def invert_cdf(u, logits, means, logscales):
    """F is increasing: bisection on [lo, hi] with F(lo) <= u <= F(hi). Every component's CDF is
    below u at m_k + e^{s_k} logit(u) - a margin, above it at m_k + e^{s_k} logit(u) + margin."""
    q = np.log(u) - np.log1p(-u)
    lo = (means + np.exp(logscales) * q[:, None]).min(-1) - 1.0
    hi = (means + np.exp(logscales) * q[:, None]).max(-1) + 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        below = _mixture_cdf(mid, logits, means, logscales) < u
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def newton_step(x, u, logits, means, logscales):
    """g(x) = logit F(x) - logit u; g'(x) = f(x) / (F (1 - F)). Step: x - g / g'."""
    F = _mixture_cdf(x, logits, means, logscales)
    f = np.exp(mixture_logpdf(x, logits, means, logscales))
    g = np.log(F) - np.log1p(-F) - (np.log(u) - np.log1p(-u))
    return x - g * F * (1 - F) / f


# ------------------------------------------------------------------ appendix A1
def actnorm_init(x):
    """bias = -mean_c, logscale = -log std_c over (B, H, W): (x - m) / s has mean 0 and std 1."""
    m, s = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    return -m, -np.log(s)


def lu_logdet(P, L, U, s):
    """|det P| = 1, det L = 1 (unit diagonal), det(U + diag s) = prod s: log|det W| = sum log|s|,
    d/ds = 1/s."""
    return np.log(np.abs(s)).sum(), 1.0 / s


# ------------------------------------------------------------------ appendix A2
def online_attention(q, k, v, block):
    """Per row: running max m, running sum l and accumulator o over blocks of keys. For a block with
    scores S_b: m' = max(m, max S_b); o <- o e^{m - m'} + e^{S_b - m'} v_b; l <- l e^{m - m'} + sum e^{S_b - m'}.
    A = o / l."""
    d = q.shape[-1]
    m = np.full(q.shape[:-1] + (1,), -np.inf)
    l = np.zeros_like(m)
    o = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for j in range(0, k.shape[-2], block):
        s = q @ k[..., j:j + block, :].swapaxes(-1, -2) / np.sqrt(d)
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        p = np.exp(s - m_new)
        corr = np.exp(m - m_new)
        o = o * corr + p @ v[..., j:j + block, :]
        l = l * corr + p.sum(-1, keepdims=True)
        m = m_new
    return o / l


def softmax_row_term(dA, A):
    """sum_j W_ij dW_ij = sum_j W_ij (dA_i . v_j) = dA_i . sum_j W_ij v_j = dA_i . A_i."""
    return (dA * A).sum(-1)
