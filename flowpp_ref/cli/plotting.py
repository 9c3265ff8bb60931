"""Plots written to PNG files: sample grids and training curves.

No display is ever opened and the global matplotlib backend is left alone (so a
notebook keeps its inline backend): figures are drawn on an Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``) and image grids are written
with Pillow.
"""
from __future__ import annotations

import json
import os

import numpy as np

from flowpp_ref.core.backend import to_numpy


def make_grid(images, nrow: int = 8, padding: int = 2, pad_value: int = 0, n_bits: int = 8):
    """Tile uint8 images [N, H, W, C] (C = 1 or 3) into one uint8 image, ``nrow`` images per row.

    Images with ``n_bits < 8`` (values 0..2^n_bits - 1) are stretched to 0..255 for display:
    x * 255 // (2^n_bits - 1). Returns [rows*(H+p)+p, nrow*(W+p)+p, C].
    """
    x = to_numpy(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, C] with C in (1, 3), got shape {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {x.dtype}; convert samples with "
                         "np.clip(np.floor(x), 0, 2**n_bits - 1).astype(np.uint8)")
    if len(x) == 0:
        raise ValueError("no images to plot")
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must lie in 1..8, got {n_bits}")
    if n_bits < 8:
        x = (x.astype(np.uint16) * 255 // (2 ** n_bits - 1)).astype(np.uint8)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, h, w, c = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = x[i]
    return grid


def save_sample_grid(images, path, nrow: int = 8, *, padding: int = 2, n_bits: int = 8, scale: int = 1):
    """Write uint8 images [N, H, W, C] as one PNG grid (``nrow`` images per row); returns the grid array.

    ``scale`` > 1 enlarges every pixel to a scale x scale block (32x32 images are small on screen).
    """
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding, n_bits=n_bits)
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")
    return grid


def read_log(log):
    """Records of a training log: a JSONL path (one JSON object per line) or a list of dicts."""
    if isinstance(log, (str, os.PathLike)):
        records = []
        with open(log) as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{os.fspath(log)} line {i}: not JSON ({e})") from e
                if not isinstance(rec, dict):
                    raise ValueError(f"{os.fspath(log)} line {i}: expected a JSON object, got {type(rec).__name__}")
                records.append(rec)
        return records
    records = list(log)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"record {i}: expected a dict, got {type(rec).__name__}")
    return records


def _points(records, key):
    pts = [(float(r["step"]), float(r[key])) for r in records
           if "step" in r and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
           and np.isfinite(float(r[key]))]
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def plot_training_curve(log, path, *, train_key: str = "train_bpd", test_key: str = "test_bpd",
                        title: str | None = None, smooth: int = 0, inverr_key: str = "val_inverr"):
    """PNG of train bits/dim against step (line) and test bits/dim (markers), if present.

    ``log``: a JSONL path or a list of dicts; records need ``step`` and ``train_key``
    and/or ``test_key`` (others, e.g. skipped steps, are ignored). ``smooth`` > 1 adds
    a running mean over that many train points. Records with ``inverr_key`` (the inverse
    error ``max |y - f^-1(f(y))|`` logged beside the test bits/dim) are drawn on a second,
    logarithmic y axis. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log)
    train = _points(records, train_key)
    test = _points(records, test_key)
    if len(train) == 0 and len(test) == 0:
        raise ValueError(f"no records with 'step' and {train_key!r} or {test_key!r} to plot")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(train):
        ax.plot(train[:, 0], train[:, 1], lw=1, alpha=0.5 if smooth > 1 else 1.0, label="train")
        if smooth > 1 and len(train) >= smooth:
            k = np.ones(smooth) / smooth
            ax.plot(train[smooth - 1:, 0], np.convolve(train[:, 1], k, mode="valid"), lw=2,
                    label=f"train (mean of {smooth})")
    if len(test):
        ax.plot(test[:, 0], test[:, 1], "o-", ms=5, label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    inv = _points(records, inverr_key)
    if len(inv):
        ax2 = ax.twinx()
        (h,) = ax2.plot(inv[:, 0], np.maximum(inv[:, 1], 1e-12), "s--", ms=4, color="tab:red",
                        label="inverse error")
        ax2.set_yscale("log")
        ax2.set_ylabel("max |y - f^-1(f(y))|")
        handles, labels = handles + [h], labels + ["inverse error"]
    ax.legend(handles, labels)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, format="png")
    return path
