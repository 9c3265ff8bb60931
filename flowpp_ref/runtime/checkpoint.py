"""Checkpoints: one pickle-free ``.npz`` file, written atomically.

Format (version 1)
------------------
An uncompressed ``.npz`` (a zip of ``.npy`` files, each with a CRC-32 that is checked
on reading) holding

* one entry per array, named by its path in the checkpoint tree, e.g.
  ``params/block0.attn.V``, ``optimizer_state/m/block0.attn.V``, ``ema/shadow/...``;
* ``__meta__``: uint8 bytes of a UTF-8 JSON document ``{"format", "version", "tree"}``
  where ``tree`` mirrors the sections (``params``, ``ema``, ``optimizer_state``,
  ``step``, ``rng_state``, ``config``, ``extra``) with every array replaced by
  ``{"__ndarray__": "<entry name>"}``.

Nothing is pickled: the file is read with ``np.load(allow_pickle=False)``. The tree
may hold dicts with string keys, lists, strings, numbers (Python ints of any size,
as in a PCG64 state), booleans, None and arrays (NumPy or CuPy; CuPy arrays are
copied to the host). Tuples come back as lists; dataclasses are stored as dicts.

Atomic write
------------
The file is written to a temporary file in the same directory, flushed and
fsync'ed, then moved over ``path`` with ``os.replace`` (atomic on POSIX and
Windows), and the directory is fsync'ed. A crash at any point leaves either the
previous checkpoint or the new one, never a mixture; the temporary file is removed
when the failure is an exception.

Random state
------------
``rng_state`` is any JSON-like dict (e.g. ``{"seed": 0, "step": 1200}`` for
counter-based seeding), or a host ``np.random.Generator`` / ``BitGenerator``, whose
``bit_generator.state`` dict is stored; :func:`restore_rng` rebuilds the generator.
CuPy generators have no portable state and are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile

import numpy as np

from flowpp_ref.core.backend import asarray, to_numpy

FORMAT = "flowpp-ref checkpoint"
VERSION = 1
META_KEY = "__meta__"
_ARRAY_TAG = "__ndarray__"
SECTIONS = ("params", "ema", "optimizer_state", "step", "rng_state", "config", "extra")
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


class CheckpointError(ValueError):
    """A checkpoint cannot be written (unsupported content) or read (missing, truncated, corrupt)."""


# -------------------------------------------------------------------- encoding
def _is_array(obj) -> bool:
    return (hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__array__")
            and not isinstance(obj, np.generic))


def _encode(obj, path: str, arrays: dict):
    """JSON-able tree with arrays replaced by placeholders (arrays collected into ``arrays``)."""
    if _is_array(obj):
        a = to_numpy(obj)
        if a.dtype == object or a.dtype.hasobject:
            raise CheckpointError(f"{path}: object arrays need pickle and are not supported")
        if path in arrays or path == META_KEY:
            raise CheckpointError(f"{path}: two entries map to the same name; avoid '/' in keys")
        arrays[path] = a  # (np.ascontiguousarray would turn 0-d into 1-d)
        return {_ARRAY_TAG: path}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{path}: dict keys must be strings (JSON), got {k!r}")
            if k == _ARRAY_TAG:
                raise CheckpointError(f"{path}: the key {_ARRAY_TAG!r} is reserved")
            out[k] = _encode(v, f"{path}/{k}", arrays)
        return out
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(obj)]
    raise CheckpointError(f"{path}: cannot store a {type(obj).__name__} in a checkpoint "
                          "(use arrays, dicts with string keys, lists, numbers, strings, None)")


def _decode(node, arrays: dict, path: str):
    if isinstance(node, dict):
        if set(node) == {_ARRAY_TAG}:
            name = node[_ARRAY_TAG]
            if name not in arrays:
                raise CheckpointError(f"{path}: array entry {name!r} is missing from the file")
            return arrays[name]
        return {k: _decode(v, arrays, f"{path}/{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_decode(v, arrays, f"{path}/{i}") for i, v in enumerate(node)]
    return node


def _rng_to_state(rng_state):
    if isinstance(rng_state, np.random.Generator):
        return rng_state.bit_generator.state
    if isinstance(rng_state, np.random.BitGenerator):
        return rng_state.state
    if rng_state is None or isinstance(rng_state, dict):
        return rng_state
    raise CheckpointError(f"rng_state: expected a dict, np.random.Generator or BitGenerator, got "
                          f"{type(rng_state).__module__}.{type(rng_state).__name__} (CuPy generators have no "
                          "portable state: store a seed and a step counter instead)")


def restore_rng(state: dict) -> np.random.Generator:
    """A ``np.random.Generator`` in the state stored from ``Generator.bit_generator.state``."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise CheckpointError(f"rng state names bit generator {name!r}; expected one of {_BIT_GENERATORS}")
    bg = getattr(np.random, name)()
    try:
        bg.state = state
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"invalid {name} state: {e}") from e
    return np.random.Generator(bg)


# ----------------------------------------------------------------------- write
def save_checkpoint(path, *, params, ema, optimizer_state, step, rng_state, config, extra=None) -> str:
    """Write a checkpoint atomically to ``path`` (exactly this name; ``.npz`` is not appended).

    ``params``: flat dict name -> array; ``ema``, ``optimizer_state``: the
    ``state_dict()`` of :class:`flowpp_ref.training.optim.EMA` / :class:`~flowpp_ref.training.optim.Adam`
    (or any tree, see the module docstring); ``step``: int; ``rng_state``: dict or
    numpy Generator; ``config``: dict or dataclass; ``extra``: anything tree-like.
    Returns ``path``.
    """
    path = os.fspath(path)
    sections = {"params": params, "ema": ema, "optimizer_state": optimizer_state, "step": step,
                "rng_state": _rng_to_state(rng_state), "config": config, "extra": extra}
    arrays: dict = {}
    tree = {name: _encode(sections[name], name, arrays) for name in SECTIONS}
    meta = json.dumps({"format": FORMAT, "version": VERSION, "tree": tree})
    arrays[META_KEY] = np.frombuffer(meta.encode("utf-8"), dtype=np.uint8)

    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def atomic_write(path, write, *, binary: bool = True) -> None:
    """Write ``path`` so that it is either the old file or the whole new one: ``write(f)`` into a
    temporary ``.<name>.*.tmp`` in the same folder, flush, fsync, rename over ``path``, fsync the
    folder; the temporary file is removed if anything fails (the run folder's stale-file sweep
    removes one a kill left behind)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory):
    """Make the rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ read
def load_checkpoint(path, xp=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``{"params", "ema", "optimizer_state", "step", "rng_state", "config",
    "extra", "version"}``; arrays are host NumPy arrays, or moved to the backend
    ``xp`` when given. Raises :class:`CheckpointError` for a missing, truncated or
    corrupt file (including a CRC mismatch of any array).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):  # a plain .npy file
            raise CheckpointError(f"{path} is a single .npy array, not an .npz checkpoint")
        with z:
            files = list(z.files)
            if META_KEY not in files:
                raise CheckpointError(f"{path} has no {META_KEY!r} entry: not a flowpp-ref checkpoint")
            meta = json.loads(z[META_KEY].tobytes().decode("utf-8"))
            arrays = {k: z[k] for k in files if k != META_KEY}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError,
            AttributeError, TypeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a flowpp-ref checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{path}: bad metadata")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')!r}, "
                              f"this flowpp-ref reads version {VERSION}")
    tree = meta.get("tree")
    if not isinstance(tree, dict) or any(s not in tree for s in SECTIONS):
        raise CheckpointError(f"{path}: metadata lacks sections {[s for s in SECTIONS if s not in (tree or {})]}")
    if xp is not None:
        arrays = {k: asarray(a, xp) for k, a in arrays.items()}
    out = {name: _decode(tree[name], arrays, name) for name in SECTIONS}
    out["version"] = VERSION
    return out
