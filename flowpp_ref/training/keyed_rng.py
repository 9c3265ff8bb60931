"""Per-image random numbers that do not depend on how a batch is split over processes.

A training step of a data-parallel run (:mod:`flowpp_ref.runtime.distributed`) gives each
process a shard of the global batch. For the N-process step to equal the one-process
step, the dequantization noise and the dropout masks of an image must be the same
whichever shard (and whichever position in the shard) it lands in. :class:`KeyedRNG`
does that: it stands in for the ``rng`` argument of the model (methods ``random`` and
``standard_normal``, the only ones the forward pass uses) and draws the numbers of
image ``i`` from a counter-based generator keyed by ``(key, i, call, element)``::

    k_call   = mix(key ^ mix(call + 1))               host, one per draw call
    k_img    = mix(k_call ^ mix(id_i * G))            one per image (id_i: global index)
    bits[e]  = mix(k_img + (e + 1) * G)               one per element of the image
    mix      = the splitmix64 finaliser (xor-shift-multiply, 64-bit wrap-around)

``call`` counts the draw calls made so far; every process runs the same layers in the
same order, so the c-th call means the same tensor everywhere. Uniforms are the top 53
(float64) or 24 (float32) bits scaled to [0, 1); normals use Box-Muller on two such
uniforms. The arithmetic is plain uint64 array code, so NumPy and CuPy produce the same
bits (the normals agree to the rounding of log/cos).

Each draw requires ``shape[0]`` == the number of images given at construction: a
tensor that is not batch-first is refused rather than silently keyed wrongly.
"""
from __future__ import annotations

import numpy as np

_G = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (mod 2^64)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _mix(z, xp):
    """splitmix64 finaliser on a uint64 array, in place (returns it)."""
    z ^= z >> xp.uint64(30)
    z *= xp.uint64(_C1)
    z ^= z >> xp.uint64(27)
    z *= xp.uint64(_C2)
    z ^= z >> xp.uint64(31)
    return z


def key_of(*parts) -> int:
    """A 64-bit key from integers (e.g. ``(seed, step, purpose)``); negative parts allowed."""
    k = 0x243F6A8885A308D3
    for p in parts:
        k = _mix_int(k ^ _mix_int(int(p) & _M64))
    return k


class KeyedRNG:
    """Generator of per-image numbers: ``rng=KeyedRNG(key, image_ids, xp)`` for the model.

    ``key``: int from :func:`key_of`; ``image_ids``: the global indices of the batch's
    images (host integers, one per row of every tensor drawn). Same key and id: same
    numbers, whatever the other images of the batch are.
    """

    def __init__(self, key: int, image_ids, xp=np):
        ids = np.asarray(image_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"image_ids must be a 1-d integer array, got {ids.dtype} of shape {ids.shape}")
        self.xp = xp
        self.key = int(key) & _M64
        self.n = int(ids.shape[0])
        host = (ids.astype(np.uint64) * np.uint64(_G)) if self.n else ids.astype(np.uint64)
        with np.errstate(over="ignore"):
            host = _mix(host.copy(), np)
        self._ids = xp.asarray(host)              # mix(id * G), uploaded once
        self.calls = 0

    def _bits(self, shape):
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != self.n:
            raise ValueError(f"KeyedRNG draws batch-first tensors for its {self.n} images; asked for shape {shape}")
        xp = self.xp
        self.calls += 1
        k_call = _mix_int(self.key ^ _mix_int(self.calls))
        per = int(np.prod(shape[1:], dtype=np.int64))
        k_img = _mix(self._ids ^ xp.uint64(k_call), xp)                      # [n]
        e = xp.arange(1, per + 1, dtype=xp.uint64) * xp.uint64(_G)           # [per]
        bits = _mix(k_img[:, None] + e[None, :], xp)                         # [n, per]
        return bits.reshape(shape)

    @staticmethod
    def _uniform(bits, dtype, xp):
        if np.dtype(dtype) == np.float32:
            return (bits >> xp.uint64(40)).astype(xp.float32) * xp.float32(2.0 ** -24)
        if np.dtype(dtype) == np.float64:
            return (bits >> xp.uint64(11)).astype(xp.float64) * (2.0 ** -53)
        raise TypeError(f"KeyedRNG draws float32 or float64, got dtype {np.dtype(dtype)}")

    def random(self, shape, dtype=np.float64):
        """Uniform numbers in [0, 1), like ``Generator.random(shape, dtype)``."""
        return self._uniform(self._bits(shape), dtype, self.xp)

    def standard_normal(self, shape, dtype=np.float64):
        """Standard normal numbers (Box-Muller in float64, then cast)."""
        xp = self.xp
        b1 = self._bits(shape)
        u1 = 1.0 - self._uniform(b1, np.float64, xp)                         # (0, 1]
        u2 = self._uniform(_mix(b1 ^ xp.uint64(_C2), xp), np.float64, xp)
        z = xp.sqrt(-2.0 * xp.log(u1)) * xp.cos((2.0 * np.pi) * u2)
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"KeyedRNG draws float32 or float64, got dtype {np.dtype(dtype)}")
        return z.astype(dtype, copy=False)


def step_images_rng(seed: int, step: int, positions, xp=np, purpose: int = 0) -> KeyedRNG:
    """The generator of training step ``step`` for the images at ``positions`` of its global batch."""
    return KeyedRNG(key_of(seed, step, purpose), positions, xp)
