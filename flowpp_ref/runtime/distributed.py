"""Data-parallel runs over processes: one communicator with ``allreduce``, ``broadcast``, ``rank``, ``size``.

    mpiexec -n 4 flowpp train --preset small --batch-size 64 --steps 1000 --out runs/dp4
    srun -n 8 flowpp train --backend cupy ...           (one GPU per process, NCCL)

Communicators (all with ``rank``, ``size``, ``local_rank``, ``allreduce(buf)``,
``broadcast(buf, root=0)``, ``barrier()``, ``abort(code)``):

* :class:`SingleComm`: one process; every operation is the identity. The default:
  without a launcher nothing changes and mpi4py is never imported.
* :class:`MPIComm`: mpi4py on ``COMM_WORLD``; ``allreduce`` sums a NumPy buffer in
  place (``Iallreduce`` polled with a bounded wait, see *Faults*). CuPy buffers are
  staged through the host.
* :class:`NCCLComm`: CuPy buffers summed by NCCL (``cupy.cuda.nccl``) on the current
  stream; the NCCL unique id is broadcast over MPI; each process uses the GPU of its
  local rank (``local_rank % device_count``), selected before any CuPy allocation.
  Host (NumPy) buffers still go over MPI. Run on one H200 with one rank (the machine had one GPU);
  several GPUs are not verified. Its check is
  ``tests/test_distributed.py::
  test_nccl_communicator_and_cupy_training_match_one_process`` (marked ``gpu``, so a GPU
  check running ``pytest -m gpu`` includes it).

:func:`get_comm` picks one: ``kind="auto"`` (the default) detects a launch by
``mpiexec``/``mpirun``/``srun`` from the environment (``PMI_SIZE``/``PMI_RANK`` of MPICH's
Hydra and Intel MPI, ``OMPI_COMM_WORLD_SIZE`` of Open MPI, ``MV2_COMM_WORLD_SIZE``,
``SLURM_STEP_NUM_TASKS`` with ``SLURM_PROCID`` under ``srun``): more than one process ->
MPI (NCCL for ``backend="cupy"``), else :class:`SingleComm`. ``FLOWPP_DISTRIBUTED=
single|mpi|nccl`` (or the CLI's ``--distributed``) forces the choice. A launch with
several processes but no mpi4py is an error (the processes would otherwise each run
the whole training into the same folder).

Faults
------
MPI has no notion of "the other process died while I wait": the training loop folds
an error flag and a stop flag into the one buffer it all-reduces per step (a rank whose
step raises contributes zeros and the flag, so every rank stops together), and any other
exception on one rank calls :func:`abort_on_error` -> ``MPI_Abort``, which ends every
process of the job. A rank killed outright (SIGKILL, out of memory) is noticed by the
launcher (MPICH's Hydra ends the job at once). Last resort: every wait of
:class:`MPIComm` is bounded by ``timeout`` seconds (``FLOWPP_COMM_TIMEOUT``, default
1800; the CLI's ``--comm-timeout``) after which the waiting rank reports and aborts.
NCCL operations have no such bound (they run on the GPU stream).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback

import numpy as np

from flowpp_ref.core.backend import array_module, to_numpy

DEFAULT_TIMEOUT = 1800.0
KINDS = ("auto", "single", "mpi", "nccl")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_LOCAL_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
               "PMI_LOCAL_RANK")


class DistributedError(RuntimeError):
    """A multi-process run cannot start or continue (MPI missing, ranks out of step, a peer failed)."""


class PeerFailed(DistributedError):
    """Another rank's step raised; this rank stops with it (the other rank reports the error)."""


class ParameterMismatch(DistributedError):
    """The ranks' parameters differ (they must stay identical in data-parallel training)."""


def launched_size(environ=None) -> int:
    """Number of processes a launcher started, read from the environment (1 if none)."""
    env = os.environ if environ is None else environ
    for v in _SIZE_VARS:
        try:
            n = int(env.get(v, ""))
        except ValueError:
            continue
        if n > 0:
            return n
    return 1


def launched_rank(environ=None) -> int:
    """This process's rank according to the launcher's environment (0 if none); no MPI import."""
    env = os.environ if environ is None else environ
    for v in _RANK_VARS:
        try:
            return int(env[v])
        except (KeyError, ValueError):
            continue
    return 0


def _local_rank_from_env(default: int) -> int:
    for v in _LOCAL_VARS:
        try:
            return int(os.environ[v])
        except (KeyError, ValueError):
            continue
    return default


def _timeout_from_env() -> float:
    raw = os.environ.get("FLOWPP_COMM_TIMEOUT", "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise DistributedError(f"FLOWPP_COMM_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not t > 0:
        raise DistributedError(f"FLOWPP_COMM_TIMEOUT must be > 0 seconds, got {raw!r}")
    return t


# ---------------------------------------------------------------- communicators
class SingleComm:
    """One process: ``allreduce`` and ``broadcast`` return their buffer unchanged."""

    rank, size, local_rank = 0, 1, 0
    kind = "single"

    def allreduce(self, buf):
        return buf

    def broadcast(self, buf, root=0):
        return buf

    def barrier(self):
        pass

    def abort(self, code=1):
        raise SystemExit(code)

    def __repr__(self):
        return "SingleComm()"


class MPIComm:
    """mpi4py on ``COMM_WORLD`` (or ``comm``); sums and broadcasts NumPy buffers in place.

    ``timeout``: seconds any single wait may take before this rank reports and calls
    ``MPI_Abort`` (None: ``$FLOWPP_COMM_TIMEOUT`` or 1800).
    """

    kind = "mpi"

    def __init__(self, comm=None, timeout=None):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise DistributedError(f"data-parallel runs need mpi4py and an MPI library ({e}): "
                                   "pip install 'flowpp-ref[distributed]'") from e
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = float(timeout) if timeout is not None else _timeout_from_env()
        try:
            local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            self.local_rank = local.Get_rank()
            local.Free()
        except Exception:  # noqa: BLE001 - an MPI without MPI-3 shared splits
            self.local_rank = _local_rank_from_env(self.rank)

    def _wait(self, req, what):
        """Poll ``req`` until done; past ``timeout`` seconds report and abort the job."""
        t0 = time.monotonic()
        pause = 2e-5
        while not req.Test():
            waited = time.monotonic() - t0
            if waited > self.timeout:
                _report(f"flowpp: error: rank {self.rank} of {self.size} waited {waited:.0f} s in {what} "
                        f"(timeout {self.timeout:g} s, FLOWPP_COMM_TIMEOUT / --comm-timeout): another rank is "
                        "stuck or gone; stopping every rank (MPI_Abort)", before_abort=True)
                self.comm.Abort(3)
            time.sleep(pause)
            pause = min(pause * 1.5, 2e-3)

    def allreduce(self, buf):
        """Sum ``buf`` over the ranks, in place; returns it (CuPy arrays via a host copy)."""
        host, dev = _host_view(buf)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM), "an all-reduce")
        return _back(host, dev, buf)

    def broadcast(self, buf, root=0):
        """Copy rank ``root``'s ``buf`` into every rank's ``buf``, in place; returns it."""
        host, dev = _host_view(buf)
        self._wait(self.comm.Ibcast(host, root=root), "a broadcast")
        return _back(host, dev, buf)

    def barrier(self):
        self._wait(self.comm.Ibarrier(), "a barrier")

    def abort(self, code=1):
        self.comm.Abort(int(code))

    def __repr__(self):
        return f"MPIComm(rank={self.rank}, size={self.size})"


class NCCLComm(MPIComm):
    """NCCL for CuPy buffers, MPI for host buffers; one GPU per process (its local rank).

    Run on one GPU with one rank; several GPUs not verified. The order of calls follows ChainerMN's
    ``PureNcclCommunicator``: pick the device, rank 0 makes ``nccl.get_unique_id()``,
    MPI broadcasts it, every rank builds ``nccl.NcclCommunicator(size, uid, rank)``.
    """

    kind = "nccl"

    def __init__(self, comm=None, timeout=None):
        super().__init__(comm, timeout)
        import cupy
        from cupy.cuda import nccl
        self.cupy, self.nccl_mod = cupy, nccl
        n_dev = cupy.cuda.runtime.getDeviceCount()
        if n_dev == 0:
            raise DistributedError("NCCL communicator: no CUDA device is visible")
        self.device = self.local_rank % n_dev
        cupy.cuda.Device(self.device).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _nccl_dtype(self, a):
        table = {np.dtype(np.float32): self.nccl_mod.NCCL_FLOAT32, np.dtype(np.float64): self.nccl_mod.NCCL_FLOAT64}
        if a.dtype not in table:
            raise DistributedError(f"NCCL all-reduce of dtype {a.dtype} is not supported (float32/float64)")
        if not a.flags.c_contiguous:
            raise DistributedError("NCCL needs a contiguous buffer")
        return table[a.dtype]

    def allreduce(self, buf):
        if not isinstance(buf, self.cupy.ndarray):
            return super().allreduce(buf)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._nccl_dtype(buf), self.nccl_mod.NCCL_SUM,
                            stream)
        return buf

    def broadcast(self, buf, root=0):
        if not isinstance(buf, self.cupy.ndarray):
            return super().broadcast(buf, root)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.nccl.bcast(buf.data.ptr, buf.size, self._nccl_dtype(buf), root, stream)
        return buf

    def __repr__(self):
        return f"NCCLComm(rank={self.rank}, size={self.size}, device={self.device})"


def _host_view(buf):
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise DistributedError("MPI buffers must be contiguous")
        return buf, False
    return np.ascontiguousarray(to_numpy(buf)), True


def _back(host, dev, buf):
    if dev:
        buf[...] = array_module(buf).asarray(host)
    return buf


# ------------------------------------------------------------------- selection
_WORLD = {}


def get_comm(kind: str | None = None, backend: str = "numpy", timeout=None):
    """The communicator of this process (created once per kind, then reused).

    ``kind``: one of :data:`KINDS`, or None for ``$FLOWPP_DISTRIBUTED`` (default auto).
    ``auto``: MPI (NCCL with ``backend="cupy"``) when a launcher started several
    processes, else :class:`SingleComm` (mpi4py not imported).
    """
    kind = (kind or os.environ.get("FLOWPP_DISTRIBUTED", "") or "auto").lower()
    if kind not in KINDS:
        raise DistributedError(f"unknown communicator {kind!r}; choose one of {KINDS}")
    if kind == "auto":
        if launched_size() <= 1:
            return SingleComm()
        kind = "nccl" if backend == "cupy" else "mpi"
        try:
            import mpi4py  # noqa: F401
        except ImportError as e:
            raise DistributedError(
                f"started as one of {launched_size()} processes (by mpiexec/srun) but mpi4py is not installed: "
                "pip install 'flowpp-ref[distributed]' (or run a single process without the launcher)") from e
    if kind == "single":
        return SingleComm()
    if kind not in _WORLD:
        _WORLD[kind] = (NCCLComm if kind == "nccl" else MPIComm)(timeout=timeout)
    elif timeout is not None:
        _WORLD[kind].timeout = float(timeout)
    return _WORLD[kind]


# --------------------------------------------------------------------- helpers
class FlatBuffer:
    """One contiguous buffer for a dict of arrays plus a few scalars, reduced in one call.

    ``pack(arrays, extras)`` copies the arrays (in the sorted order of their names) and
    the scalars into the buffer; after ``comm.allreduce(buf.data)``, ``unpack()``
    returns (views of the buffer as a dict, the extras as a backend array). The views are
    valid until the next ``pack``.
    """

    def __init__(self, shapes: dict, n_extra: int, xp, dtype):
        self.names = sorted(shapes)
        self.shapes = {k: tuple(shapes[k]) for k in self.names}
        self.offsets, o = {}, 0
        for k in self.names:
            n = int(np.prod(self.shapes[k], dtype=np.int64))
            self.offsets[k] = (o, o + n)
            o += n
        self.n_params = o
        self.n_extra = int(n_extra)
        self.xp = xp
        self.data = xp.zeros(o + self.n_extra, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def pack(self, arrays: dict | None, extras):
        if arrays is None:
            self.data[:self.n_params] = 0
        else:
            if set(arrays) != set(self.names):
                missing, extra = set(self.names) - set(arrays), set(arrays) - set(self.names)
                raise DistributedError(f"gradient names differ from the parameters': missing {sorted(missing)[:3]}, "
                                       f"unexpected {sorted(extra)[:3]}")
            for k in self.names:
                a, b = self.offsets[k]
                self.data[a:b] = arrays[k].reshape(-1)
        self.data[self.n_params:] = self.xp.asarray(extras, dtype=self.data.dtype).reshape(-1)
        return self.data

    def unpack(self):
        out = {k: self.data[a:b].reshape(self.shapes[k]) for k, (a, b) in self.offsets.items()}
        return out, self.data[self.n_params:]


def broadcast_arrays(comm, arrays: dict, root=0) -> dict:
    """Rank ``root``'s values of a dict of arrays on every rank (one flat broadcast); in place."""
    if comm.size == 1 or not arrays:
        return arrays
    xp_arr = next(iter(arrays.values()))
    fb = FlatBuffer({k: v.shape for k, v in arrays.items()}, 0, array_module(xp_arr), np.float64
                    if any(v.dtype == np.float64 for v in arrays.values()) else xp_arr.dtype)
    fb.pack(arrays, [])
    comm.broadcast(fb.data, root)
    views, _ = fb.unpack()
    for k, v in views.items():
        arrays[k][...] = v.astype(arrays[k].dtype, copy=False)
    return arrays


def parameter_digest(arrays: dict) -> str:
    """A hex digest of a dict of arrays (names, shapes, dtypes and bytes, in sorted order)."""
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(arrays):
        a = np.ascontiguousarray(to_numpy(arrays[k]))
        h.update(f"{k}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_same_parameters(comm, arrays: dict, *, where: str) -> None:
    """Raise :class:`ParameterMismatch` (on every rank) unless all ranks hold the same arrays."""
    if comm.size == 1:
        return
    d = parameter_digest(arrays)
    buf = np.zeros(2 * comm.size, dtype=np.float64)
    v = int(d, 16)
    buf[2 * comm.rank], buf[2 * comm.rank + 1] = float(v >> 32), float(v & 0xFFFFFFFF)   # exact in float64
    comm.allreduce(buf)
    got = [f"{(int(buf[2 * r]) << 32) | int(buf[2 * r + 1]):016x}" for r in range(comm.size)]
    if len(set(got)) != 1:
        groups = {}
        for r, g in enumerate(got):
            groups.setdefault(g, []).append(r)
        desc = "; ".join(f"ranks {rs} hash {g}" for g, rs in groups.items())
        e = ParameterMismatch(f"{where}: the parameters differ between the processes ({desc}). Data-parallel "
                              "training keeps them identical, so the run is broken (different code or library "
                              "versions on the nodes, or non-deterministic kernels); the checkpoint was not written")
        e.coordinated = True
        raise e


def _report(msg: str, *, before_abort: bool = False) -> None:
    print(msg, file=sys.stderr, flush=True)
    if before_abort:
        # MPI_Abort makes the launcher kill every rank; MPICH's Hydra can do so before it has
        # forwarded what this rank just wrote to its stderr pipe (the job then ends with an empty
        # stderr). Give the forwarding a moment first.
        time.sleep(0.5)


def abort_on_error(comm, exc: BaseException, with_traceback: bool = True) -> None:
    """For an exception that only this rank saw: report it, then end every rank (MPI_Abort).

    Rank 0 reports at once; other ranks wait 2 s first, so that a failure common to all
    ranks (which rank 0 also hits and aborts on) is reported once.
    """
    if comm.size == 1 or getattr(exc, "coordinated", False):
        return
    exc.coordinated = True                  # reported here; outer handlers must not report it again
    if comm.rank != 0:
        time.sleep(2.0)
    head = f"flowpp: error on rank {comm.rank} of {comm.size}: {type(exc).__name__}: {' '.join(str(exc).split())}"
    tb = "" if not with_traceback or isinstance(exc, (KeyboardInterrupt, SystemExit)) else \
        "".join(traceback.format_exception(exc))
    _report(f"{head}\n{tb}flowpp: stopping every rank (MPI_Abort)", before_abort=True)
    comm.abort(1)
