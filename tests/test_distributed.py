"""Data-parallel training (issue 11): communicators, per-image random numbers, and 2-process
runs under ``mpiexec -n 2`` (tests/mpi_worker.py) compared with one process.

The mpiexec tests skip, saying why, where mpi4py or mpiexec is missing
(``pip install -e ".[distributed]"`` brings both). Tiny preset, made-up 4x4 images."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from flowpp_ref.runtime import distributed as dist
from flowpp_ref.training.keyed_rng import KeyedRNG, key_of
from flowpp_ref.runtime.options import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import mpi_worker as W  # noqa: E402


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None, "mpi4py is not installed (pip install -e '.[distributed]')"
    for cand in (os.path.join(os.path.dirname(sys.executable), "mpiexec"), shutil.which("mpiexec")):
        if cand and os.path.exists(cand):
            return cand, None
    return None, "no mpiexec on PATH or next to the Python executable (pip install mpich)"


MPIEXEC, WHY = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason=f"2-process tests need MPI: {WHY}")


def mpirun(*args, n=2, timeout=300, env=None):
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), NUMBA_NUM_THREADS="1",
             OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", FLOWPP_DISTRIBUTED="auto",
             # Open MPI's mpiexec refuses root (as on the GPU machine) unless told twice; MPICH ignores these
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    e.update(env or {})
    t0 = time.monotonic()
    r = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, os.path.join(HERE, "mpi_worker.py"), *args],
                       capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)
    return r, time.monotonic() - t0


class FakeComm(dist.SingleComm):
    """A rank of a pretend N-rank run: enough for the shard arithmetic without MPI."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


# ------------------------------------------------------------------ no MPI needed
def test_keyed_rng_rows_do_not_depend_on_the_split():
    k = key_of(5, 17, 1)
    whole = KeyedRNG(k, np.arange(8))
    a, b = KeyedRNG(k, np.arange(0, 3)), KeyedRNG(k, np.arange(3, 8))
    for draw in (lambda r, n: r.random((n, 4, 4, 3)), lambda r, n: r.standard_normal((n, 5), dtype=np.float32),
                 lambda r, n: r.random((n, 2), dtype=np.float32)):
        w = draw(whole, 8)
        np.testing.assert_array_equal(np.concatenate([draw(a, 3), draw(b, 5)]), w)
    assert not np.array_equal(KeyedRNG(key_of(5, 18, 1), np.arange(8)).random((8, 3)),
                              KeyedRNG(k, np.arange(8)).random((8, 3)))
    with pytest.raises(ValueError, match="batch-first"):
        whole.random((4, 8))


def test_keyed_rng_moments_and_independence():
    r = KeyedRNG(key_of(0, 1), np.arange(64))
    u = r.random((64, 2000))
    z = r.standard_normal((64, 2000))
    u32 = r.random((64, 2000), dtype=np.float32)
    assert u.dtype == np.float64 and u32.dtype == np.float32
    assert 0 <= u.min() and u.max() < 1 and 0 <= u32.min() and u32.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.02 and abs((z ** 4).mean() - 3) < 0.1
    c = np.corrcoef(np.concatenate([u[:8], z[:8]]))
    assert np.abs(c - np.eye(16)).max() < 0.1                # rows (images, draws) uncorrelated


def test_whole_model_gradient_with_per_image_noise_matches_finite_differences():
    from flowpp_ref.core.gradcheck import gradcheck
    from flowpp_ref.model import FlowPP
    from flowpp_ref.model.presets import get_preset
    from flowpp_ref.core.backend import make_rng
    p = get_preset("tiny", dropout_p=0.2)
    model = FlowPP(p.model, seed=3, dtype=np.float64)
    x = W.images(4)
    model.data_init(W.images(8, 1), rng=make_rng(0))
    rng = lambda: KeyedRNG(key_of(1, 2, 1), np.arange(4))   # noqa: E731  (same numbers every call)
    f = lambda: float(model.loss(x, rng=rng(), train=True)[0])   # noqa: E731
    loss, grads = model.loss_and_grads(x, rng=rng(), train=True)
    params = model.parameters()
    pick = sorted(params)[::max(1, len(params) // 12)]
    rep = gradcheck(f, {k: params[k] for k in pick}, {k: grads[k] for k in pick}, max_entries=20,
                    n_directions=2, h=1e-5)
    assert rep.ok(1e-5), str(rep)


def test_shards_of_a_step_sum_to_the_one_process_step():
    """In one process, pretend ranks: the shard gradients average to the whole-batch gradient."""
    from flowpp_ref.training import loop as T
    p = T.get_preset("tiny", **W.OV)
    model = T.build_model(p, "numpy", np.float64)
    x = W.images()
    model.data_init(x[:8], rng=T.step_rng(0, -1, model.xp))
    idx = T.batch_indices(len(x), 8, 0, 2)
    l1, g1 = T.shard_loss_and_grads(model, x, idx, seed=0, step=2, comm=dist.SingleComm())
    for n in (2, 4):
        parts = [T.shard_loss_and_grads(model, x, idx, seed=0, step=2, comm=FakeComm(r, n)) for r in range(n)]
        assert abs(sum(float(l) for l, _ in parts) / n - float(l1)) < 1e-12 * abs(float(l1))
        for k in g1:
            g = sum(gr[k] for _, gr in parts) / n
            np.testing.assert_allclose(g, g1[k], rtol=1e-12, atol=1e-12 * np.abs(g1[k]).max(), err_msg=k)


def test_flat_buffer_round_trip_and_digest():
    arrays = {"b": np.arange(6.0).reshape(2, 3), "a": np.ones(4)}
    fb = dist.FlatBuffer({k: v.shape for k, v in arrays.items()}, 2, np, np.float64)
    fb.pack(arrays, [7.0, 8.0])
    assert fb.data.tolist() == [1, 1, 1, 1, 0, 1, 2, 3, 4, 5, 7, 8]
    out, extra = fb.unpack()
    np.testing.assert_array_equal(out["b"], arrays["b"])
    assert extra.tolist() == [7, 8] and fb.nbytes == 96
    with pytest.raises(dist.DistributedError, match="missing"):
        fb.pack({"a": np.ones(4)}, [0, 0])
    d = dist.parameter_digest(arrays)
    arrays["a"][0] = np.nextafter(1.0, 2.0)
    assert dist.parameter_digest(arrays) != d


def test_parameters_that_differ_between_ranks_stop_the_run():
    class TwoRanks(FakeComm):
        """Rank 0 of 2; 'rank 1' contributes the digest of other arrays."""
        def __init__(self, other):
            super().__init__(0, 2)
            self.other = int(dist.parameter_digest(other), 16)

        def allreduce(self, buf):
            buf[2], buf[3] = float(self.other >> 32), float(self.other & 0xFFFFFFFF)
            return buf

    a = {"w": np.arange(3.0)}
    dist.check_same_parameters(TwoRanks({"w": np.arange(3.0)}), a, where="step 4")        # equal: silent
    with pytest.raises(dist.ParameterMismatch, match=r"step 4: the parameters differ .*ranks \[0\].*ranks \[1\]"):
        dist.check_same_parameters(TwoRanks({"w": np.arange(3.0) + 1e-12}), a, where="step 4")


def test_one_process_needs_no_mpi_and_launches_are_detected():
    code = ("import sys; from flowpp_ref.runtime import distributed as d; from flowpp_ref.training import loop as train; c = d.get_comm(); "
            "assert c.size == 1 and type(c).__name__ == 'SingleComm', c; "
            "assert 'mpi4py' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in dist._SIZE_VARS + dist._RANK_VARS}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(env, PYTHONPATH=REPO))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert dist.launched_size({"PMI_SIZE": "4", "PMI_RANK": "2"}) == 4
    assert dist.launched_rank({"OMPI_COMM_WORLD_RANK": "3"}) == 3
    assert dist.launched_size({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "1"}) == 8
    assert dist.launched_size({}) == 1 and dist.launched_rank({}) == 0
    with pytest.raises(dist.DistributedError, match="unknown communicator"):
        dist.get_comm("horovod")


def test_a_global_batch_that_does_not_divide_is_refused():
    from flowpp_ref.training.loop import train
    with pytest.raises(ConfigError, match="does not divide among the 3 processes"):
        train("tiny", W.images(), steps=1, progress=False, overrides=dict(batch_size=8), comm=FakeComm(0, 3))


# ------------------------------------------------------------- mpiexec -n 2
@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One 2-process launch doing every comparison run (see mpi_worker.suite), plus its inputs."""
    from flowpp_ref.training.loop import train
    out = tmp_path_factory.mktemp("dp")
    prepared = str(out / "prep")
    train("tiny", W.images(), out_dir=prepared, steps=4, progress=False, overrides=W.OV, dtype=np.float64)
    r, dt = mpirun("suite", str(out), prepared)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out / "suite.json") as f:
        res = json.load(f)
    return out, res


@pytest.fixture(scope="module")
def one_process_f64():
    from flowpp_ref.training.loop import train
    return train("tiny", W.images(), steps=8, progress=False, overrides=W.OV, dtype=np.float64)


@needs_mpi
@pytest.mark.slow
def test_two_process_step_equals_the_one_process_step(suite):
    out, _ = suite
    loss, grads = W.one_step(dist.SingleComm())
    z = np.load(out / "step.npz")
    assert abs(float(z["loss"]) - loss) <= 1e-12 * abs(loss)
    assert set(grads) == set(z.files) - {"loss"}
    for k, g in grads.items():
        np.testing.assert_allclose(z[k], g, rtol=1e-12, atol=1e-12 * np.abs(g).max(), err_msg=k)


@needs_mpi
@pytest.mark.slow
def test_two_process_runs_reproduce_the_one_process_losses(suite, one_process_f64):
    from flowpp_ref.training.loop import train
    _, res = suite
    s32 = train("tiny", W.images(), steps=20, progress=False, overrides=dict(W.OV, log_every=1))
    a = np.array([h["train_bpd"] for h in s32["history"]])
    assert len(res["f32"]) == len(a) == 20
    np.testing.assert_allclose(res["f32"], a, rtol=2e-6)            # float32: the rounding of the sum
    b = np.array([h["train_bpd"] for h in one_process_f64["history"]])
    np.testing.assert_allclose(res["f64"], b, rtol=1e-12)


@needs_mpi
@pytest.mark.slow
def test_two_process_realnvp_with_batch_norm_and_glow_equal_one_process(tmp_path):
    """RealNVP's batch norms use the global batch's statistics (BatchNormFlow.comm): 2 ranks of 4 images
    reproduce the one-process losses and parameters, running statistics included."""
    from flowpp_ref.training.loop import train
    r, _ = mpirun("lineage", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "lineage.json") as f:
        res = json.load(f)
    for fam in ("realnvp", "glow"):
        s = train(W.lineage_preset(fam), W.images(), steps=4, progress=False, dtype=np.float64)
        np.testing.assert_allclose(res[fam], [h["train_bpd"] for h in s["history"]], rtol=1e-10, err_msg=fam)
        z = np.load(tmp_path / f"{fam}.npz")
        params = s["model"].parameters()
        assert set(z.files) == set(params)
        # atol: a bias that feeds a batch norm has a zero gradient in exact arithmetic (the norm removes the
        # mean), so its float64 gradient is rounding noise, different for 1 and 2 processes (~1e-17), and
        # Adam's g / (|g| + eps) turns it into updates of about lr |dg| / eps ~ 3e-12 per step
        for k, v in params.items():
            np.testing.assert_allclose(z[k], v, rtol=1e-9, atol=2e-11, err_msg=f"{fam} {k}")


@needs_mpi
@pytest.mark.slow
def test_checkpoints_resume_across_process_counts(suite, one_process_f64):
    """2 ranks -> 1 and 1 -> 2: the resumed run continues the uninterrupted one."""
    from flowpp_ref.training.loop import train
    out, res = suite
    full = [h["train_bpd"] for h in one_process_f64["history"]]
    np.testing.assert_allclose(res["resumed"], full[4:], rtol=1e-12)            # written by 1, resumed by 2
    s = train("tiny", W.images(), out_dir=str(out / "half"), steps=8, progress=False, overrides=W.OV,
              dtype=np.float64)                                                 # written by 2, resumed by 1
    np.testing.assert_allclose([h["train_bpd"] for h in s["history"]], full[4:], rtol=1e-12)
    pa, pb = s["model"].parameters(), one_process_f64["model"].parameters()
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-10, atol=1e-12, err_msg=k)


@needs_mpi
@pytest.mark.slow
def test_sharded_evaluation_and_spread_importance_samples_match_one_process(suite, one_process_f64):
    from flowpp_ref.training.evaluation import evaluate, use_ema
    _, res = suite
    s = one_process_f64
    with use_ema(s["model"], s["ema"]):
        for k in (1, 3):
            e = evaluate(s["model"], W.images(12, 1), batch_size=5, k=k, seed=2)
            assert res[f"eval{k}"]["num_images"] == 12 and res[f"eval{k}"]["k"] == k
            assert abs(res[f"eval{k}"]["bpd"] - e["bpd"]) < 1e-12 * e["bpd"], (k, res[f"eval{k}"], e)


def _ckpt_step(path):
    from flowpp_ref.runtime.checkpoint import load_checkpoint
    return load_checkpoint(str(path))["step"]


TRAIN = ["train", "--preset", "tiny", "--steps", "12", "--batch-size", "8", "--checkpoint-every", "4",
         "--no-progress", "--samples", "0"]


@needs_mpi
@pytest.mark.slow
def test_a_rank_that_raises_stops_every_rank_and_keeps_the_checkpoint(tmp_path):
    r, dt = mpirun("cli", str(tmp_path), "raise", "6", *TRAIN, "--out", str(tmp_path), timeout=120)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert err.count("boom: made-up failure of rank 1 in step 6") == 1, err     # reported once, by rank 1
    assert "1 of the 2 processes failed in step 6" in err
    assert _ckpt_step(tmp_path / "checkpoint.npz") == 4
    logged = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert max(logged) == 5 and not os.path.exists(tmp_path / "summary.json")


@needs_mpi
@pytest.mark.slow
def test_a_rank_killed_with_sigkill_ends_the_run(tmp_path):
    r, dt = mpirun("cli", str(tmp_path), "kill", "6", *TRAIN, "--out", str(tmp_path), timeout=120)
    assert r.returncode != 0 and dt < 60, (r.returncode, dt)
    assert _ckpt_step(tmp_path / "checkpoint.npz") == 4


@needs_mpi
@pytest.mark.slow
def test_a_hung_rank_is_stopped_by_the_timeout(tmp_path):
    r, dt = mpirun("cli", str(tmp_path), "hang", "6", *TRAIN, "--out", str(tmp_path), "--comm-timeout", "3",
                   timeout=120)
    assert r.returncode != 0 and dt < 60, (r.returncode, dt)
    assert "waited" in r.stderr and "stopping every rank" in r.stderr, r.stderr
    assert _ckpt_step(tmp_path / "checkpoint.npz") == 4


@needs_mpi
@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    import signal
    e = dict(os.environ, PYTHONPATH=REPO, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    argv = [MPIEXEC, "-n", "2", sys.executable, os.path.join(HERE, "mpi_worker.py"), "cli", str(tmp_path), "none",
            "0", *TRAIN[:4], "100000", *TRAIN[5:], "--out", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and not (os.path.exists(tmp_path / "checkpoint.npz")
                                                  and os.path.exists(tmp_path / "pid.1")):
            time.sleep(0.2)
        with open(tmp_path / "pid.1") as f:
            os.kill(int(f.read()), signal.SIGTERM)                 # rank 1 only
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out + err
    assert err.count("flowpp: stopped: SIGTERM at step") == 1, err
    step = _ckpt_step(tmp_path / "checkpoint.npz")
    assert step == max(json.loads(line)["step"] for line in open(tmp_path / "log.jsonl"))
    assert f"checkpoint written to {tmp_path / 'checkpoint.npz'} (step {step})" in err


@needs_mpi
@pytest.mark.slow
def test_a_batch_that_does_not_divide_among_the_ranks_is_one_clear_error(tmp_path):
    r, _ = mpirun("cli", str(tmp_path), "none", "0", "train", "--preset", "tiny", "--steps", "2", "--batch-size",
                  "7", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("--batch-size 7 (the global batch) does not divide among the 2 processes") == 1, r.stderr


def _gpus():
    try:
        from flowpp_ref.core.backend import gpu_available
        if not gpu_available():
            return 0
        import cupy
        from cupy.cuda import nccl  # noqa: F401
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, no NCCL in this CuPy build, no driver
        return 0


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason=f"needs MPI: {WHY}")
@pytest.mark.skipif(_gpus() == 0, reason="needs CuPy with NCCL (cupy.cuda.nccl) and a CUDA device")
def test_nccl_communicator_and_cupy_training_match_one_process(tmp_path):
    """min(2, GPUs) ranks, one GPU each (passed on a one-GPU H200: one rank)."""
    from flowpp_ref.training.loop import train
    n = min(2, _gpus())
    r, _ = mpirun("nccl", str(tmp_path), n=n, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "nccl.json") as f:
        res = json.load(f)
    assert res["ok"] and res["size"] == n
    one = train("tiny", W.images(), steps=4, progress=False, overrides=W.OV, dtype=np.float64, backend="cupy")
    np.testing.assert_allclose(res["losses"], [h["train_bpd"] for h in one["history"]], rtol=1e-10)
