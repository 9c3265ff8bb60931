"""The k-sample importance-weighted bound, on a tiny float64 model."""
import math

import numpy as np
import pytest

from flowpp_ref.core.backend import make_rng
from flowpp_ref.training.evaluation import evaluate, importance_weighted_bpd, iw_key, log_weight_passes
from flowpp_ref.model import FlowPP
from flowpp_ref.model.objective import bits_per_dim, importance_sampled_log_prob
from flowpp_ref.model.presets import get_preset
from flowpp_ref.training.keyed_rng import KeyedRNG, key_of


def _model_and_images(n=5):
    p = get_preset("tiny")
    model = FlowPP(p.model, seed=2, dtype=np.float64)
    r = np.random.default_rng(0)
    x = np.clip(r.integers(0, 256, size=(n, 1, 1, 3)) + r.integers(-20, 21, size=(n, 4, 4, 3)), 0, 255)
    x = x.astype(np.uint8)
    model.data_init(x, rng=make_rng(0))
    return model, x


@pytest.mark.parametrize("rows", [1, 4, 7, 64])        # passes inside one image, straddling images, all at once
def test_bound_equals_a_direct_float64_computation(rows):
    model, x = _model_and_images(3)
    k = 5
    got = importance_weighted_bpd(model, x, k, rng=make_rng(9), rows=rows)
    # direct: the same noise stream, one (image, sample) pair at a time, image-major
    rng = make_rng(9)
    w = np.array([[float(model.elbo(model.prepare(x[i:i + 1]), rng=rng)[0][0]) for _ in range(k)]
                  for i in range(len(x))])
    logp = np.array([math.log(sum(math.exp(v - row.max()) for v in row)) + row.max() - math.log(k) for row in w])
    np.testing.assert_allclose(got, -logp / (model.num_dims * math.log(2)), rtol=1e-10, atol=0)


def test_bound_is_at_most_the_elbo():
    model, x = _model_and_images(6)
    k = 16
    iw = importance_weighted_bpd(model, x, k, rng=make_rng(3), rows=10)
    # the same samples: log-mean-exp >= mean, for every image
    passes = list(log_weight_passes(model, x, k, rng=make_rng(3), rows=10))
    img = np.concatenate([p[0] for p in passes])
    np.testing.assert_array_equal(img, np.repeat(np.arange(len(x)), k))        # image-major pairs
    w = np.concatenate([p[1] for p in passes]).reshape(len(x), k)
    elbo_same = -w.mean(axis=1) / (model.num_dims * math.log(2))
    assert np.all(iw <= elbo_same + 1e-12)
    # the streaming fold equals the textbook log-sum-exp of the same [k, images] weights
    np.testing.assert_allclose(iw, bits_per_dim(importance_sampled_log_prob(w.T), model.num_dims), rtol=1e-12)
    assert iw.mean() < elbo_same.mean()
    # and against independently drawn ELBO samples, on average over the images
    elbo = np.mean([model.bits_per_dim(x, rng=make_rng(100 + s)) for s in range(16)], axis=0)
    assert iw.mean() <= elbo.mean()


def test_evaluate_k1_is_the_elbo_of_each_batch_with_keyed_noise():
    """k = 1: the ELBO of the batches of ``batch_size`` images, image i's noise keyed by
    (seed, i); ``FlowPP.bits_per_dim`` is the same bound drawn from a generator."""
    model, x = _model_and_images(5)
    r = evaluate(model, x, batch_size=2, k=1, seed=3)
    direct = []
    for lo in range(0, len(x), 2):
        ids = np.arange(lo, min(lo + 2, len(x)))
        elbo, _ = model.elbo(model.prepare(x[ids]), rng=KeyedRNG(key_of(3, 12345, 0), ids))
        direct.append(-elbo / (model.num_dims * math.log(2)))
    direct = np.concatenate(direct)
    assert r["k"] == 1 and r["num_images"] == 5
    assert r["bpd"] == pytest.approx(direct.mean(), rel=1e-14)
    assert r["bpd_sem"] == pytest.approx(direct.std(ddof=1) / math.sqrt(5), rel=1e-12)
    np.testing.assert_array_equal(model.bits_per_dim(x, rng=make_rng(4), k=3),
                                  importance_weighted_bpd(model, x, 3, rng=make_rng(4), rows=len(x)))


def test_evaluate_k_uses_the_batched_bound_and_reports_the_standard_error():
    model, x = _model_and_images(4)
    r = evaluate(model, x, batch_size=3, k=4, seed=0)
    assert r["k"] == 4 and r["num_images"] == 4 and r["bpd_sem"] > 0
    v = importance_weighted_bpd(model, x, 4, key=iw_key(0), rows=3)
    assert r["bpd"] == pytest.approx(v.mean(), rel=1e-12)
    assert r["bpd_sem"] == pytest.approx(v.std(ddof=1) / 2, rel=1e-12)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_keyed_bound_does_not_depend_on_the_passes_nor_on_the_ranks(rows):
    """Keyed noise: the same bound for any pass size, and for the passes dealt over 3 'ranks'
    (a fake communicator that sums the ranks' buffers as an all-reduce would)."""
    model, x = _model_and_images(4)
    ref = importance_weighted_bpd(model, x, 6, key=iw_key(3), rows=4)
    np.testing.assert_allclose(importance_weighted_bpd(model, x, 6, key=iw_key(3), rows=rows), ref, rtol=1e-12)

    class Rank:
        def __init__(self, r, parts):
            self.rank, self.size, self.parts = r, 3, parts

        def allreduce(self, buf):           # called once per rank, in rank order, after its passes
            self.parts.append(buf.copy())
            if len(self.parts) == self.size:
                buf[...] = sum(self.parts)
            return buf

    parts, out = [], []
    for r in range(3):                      # ranks 0, 1 finish first; rank 2's call completes the sum
        out.append(importance_weighted_bpd(model, x, 6, key=iw_key(3), rows=rows, comm=Rank(r, parts)))
    np.testing.assert_allclose(out[-1], ref, rtol=1e-12)
    with pytest.raises(ValueError, match="key="):
        importance_weighted_bpd(model, x, 6, rng=make_rng(0), rows=rows, comm=Rank(0, []))


def test_inverse_error_is_small_and_reacts_to_a_broken_inverse():
    from flowpp_ref.training.evaluation import inverse_error
    model, x = _model_and_images(4)
    err = inverse_error(model, x, batch_size=3)
    assert 0.0 <= err < 1e-6                      # float64 tiny model, hybrid inverse
    coupling = next(f for f in model.flow.flows if type(f).__name__ == "MixLogisticAttnCoupling")
    inv = coupling.inverse
    coupling.inverse = lambda y, context=None: ((y[0], y[1] + 0.01), inv(y, context)[1])  # a wrong inverse
    assert inverse_error(model, x, batch_size=3) > 1e-3


@pytest.mark.slow                 # end-to-end training (the fast tier's budget: README, "Two commands")
def test_training_logs_val_inverr_with_the_test_bpd_and_plots_it(tmp_path):
    import json

    from PIL import Image

    from flowpp_ref.cli.plotting import plot_training_curve
    from flowpp_ref.training.loop import train
    _, x = _model_and_images(12)
    s = train("tiny", x[:8], x[8:], out_dir=str(tmp_path), steps=2, progress=False)
    assert 0.0 <= s["val_inverr"] < 1e-2              # float32
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    last = [r for r in recs if "test_bpd" in r][-1]
    assert last["val_inverr"] == s["val_inverr"]
    a = plot_training_curve(recs, tmp_path / "with.png")
    b = plot_training_curve([{k: v for k, v in r.items() if k != "val_inverr"} for r in recs],
                            tmp_path / "without.png")
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
