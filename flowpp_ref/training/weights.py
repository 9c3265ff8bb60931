"""Model weights as safetensors, and the small pretrained model shipped with the package.

A checkpoint (``checkpoint.npz``) holds everything a run needs to resume; a *weights file* holds only
what a reader of the model needs: the parameters (the EMA parameters by default, the ones to evaluate
and sample with) and the model's configuration. It is a ``.safetensors`` file (the format of
``safetensors.numpy``: a JSON header, then raw little-endian arrays), which PyTorch, JAX and others
open without flowpp_ref; its metadata (strings) carry ``format``, ``config`` (JSON of the preset),
``step``, ``parameters`` (``ema`` or ``raw``), ``dtype`` and any ``info`` given (for the shipped
model: the data, the length of training and the test bits/dim).

* :func:`export_weights` checkpoint -> weights file (float32, or float16 to halve it);
* :func:`read_weights` -> (host arrays, metadata); :func:`load_weights` -> a model ready to sample;
* :func:`load_pretrained` -> the model shipped in ``flowpp_ref/pretrained/`` (:data:`PRETRAINED`).

float16 keeps 11 significant bits: a model loaded from it computes in float32 (or float64) from the
rounded parameters. ``safetensors`` is an optional dependency (the ``weights`` extra; the test extra
installs it).
"""
from __future__ import annotations

import json
import os

import numpy as np

from flowpp_ref.core.backend import asarray
from flowpp_ref.runtime.checkpoint import CheckpointError, atomic_write, load_checkpoint
from flowpp_ref.training.loop import build_model, preset_from_config

FORMAT = "flowpp-ref-weights"
VERSION = "1"
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")
PRETRAINED = {"small-cifar10": "small_cifar10.safetensors"}
DTYPES = ("float32", "float16")


class WeightsError(CheckpointError):
    """A weights file cannot be written or read (missing, not flowpp-ref's, names or shapes that differ)."""


def _safetensors():
    """The safetensors package (``safe_open`` and its numpy API), or a clear error when it is missing."""
    try:
        import safetensors                    # optional dependency: imported only where used
        import safetensors.numpy  # noqa: F401
    except ImportError as e:
        raise WeightsError("safetensors is not installed: pip install 'flowpp-ref[weights]' "
                           "(or pip install safetensors)") from e
    return safetensors


def export_weights(checkpoint_path, out_path, *, use_ema: bool = True, dtype: str = "float32",
                   info: dict | None = None) -> str:
    """Write the parameters of ``checkpoint_path`` (EMA by default) and its config to ``out_path``.

    ``dtype``: ``float32`` or ``float16``; ``info``: extra metadata (str -> str). Atomic: an existing
    ``out_path`` is either kept or replaced whole. Non-finite parameters are refused.
    """
    if dtype not in DTYPES:
        raise WeightsError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    ck = load_checkpoint(checkpoint_path)
    src = ck["ema"]["shadow"] if use_ema else ck["params"]
    tensors = {}
    for k, v in src.items():
        a = np.ascontiguousarray(np.asarray(v, dtype=np.float64))
        if not np.isfinite(a).all():
            raise WeightsError(f"{checkpoint_path}: parameter {k} holds non-finite values; not exported")
        b = a.astype(dtype)
        if not np.isfinite(b).all():
            raise WeightsError(f"parameter {k} overflows {dtype} (|max| {np.abs(a).max():.3g}); use float32")
        tensors[k] = b
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(ck["config"]), "step": str(int(ck["step"])),
            "parameters": "ema" if use_ema else "raw", "dtype": dtype}
    for k, v in (info or {}).items():
        meta[str(k)] = str(v)
    data = _safetensors().numpy.save(tensors, metadata=meta)
    atomic_write(os.fspath(out_path), lambda f: f.write(data))
    return os.fspath(out_path)


def read_weights(path) -> tuple[dict, dict]:
    """(name -> host array, metadata with ``config`` decoded) of a weights file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weights file")
    st = _safetensors()
    try:
        with st.safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a flowpp-ref weights file (metadata format {meta.get('format')!r}); "
                           "write one with flowpp export")
    try:
        meta["config"] = json.loads(meta["config"])
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: the metadata's config is missing or not JSON") from e
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{path}: non-finite values in {bad[:3]}")
    return tensors, meta


def load_weights(path, backend="numpy", dtype=np.float32):
    """``(model, preset, metadata)``: the model of a weights file on ``backend``, computing in ``dtype``."""
    tensors, meta = read_weights(path)
    p = preset_from_config(meta["config"])
    model = build_model(p, backend, dtype)
    try:
        model.load_parameters({k: asarray(v, model.xp, dtype=model.dtype) for k, v in tensors.items()})
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: its arrays do not fit the model of its config: {e}") from e
    return model, p, meta


def load_pretrained(name: str = "small-cifar10", backend="numpy", dtype=np.float32):
    """The model shipped with the package (:data:`PRETRAINED`): ``(model, preset, metadata)``."""
    if name not in PRETRAINED:
        raise WeightsError(f"no pretrained model {name!r}; shipped: {sorted(PRETRAINED)}")
    return load_weights(os.path.join(PRETRAINED_DIR, PRETRAINED[name]), backend, dtype)
