"""Command line: ``flowpp train | eval | sample | export | demo | study`` (also ``python -m flowpp_ref``).

Run ``flowpp COMMAND --help`` for every option (each numeric one with its range).
Errors are one line ``flowpp: error: ...`` (exit 2; 1 for a diverged run; 130/143 when
SIGINT/SIGTERM stopped a run after writing its checkpoint); ``--debug`` shows the
traceback. The checks live in :mod:`flowpp_ref.cli.args`, the ranges in
:mod:`flowpp_ref.runtime.options`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys

import numpy as np

from flowpp_ref import datasets
from flowpp_ref.cli import args as cli_args
from flowpp_ref.cli.args import UsageError
from flowpp_ref.cli.plotting import plot_training_curve, save_sample_grid
from flowpp_ref.cli.study_report import table_markdown, write_report
from flowpp_ref.core.backend import make_rng
from flowpp_ref.datasets import DataError, block_average, reduce_bits
from flowpp_ref.model.presets import PRESETS, ModelConfig, TrainConfig, get_preset
from flowpp_ref.runtime import distributed, runfolder
from flowpp_ref.runtime.distributed import launched_rank
from flowpp_ref.training.evaluation import evaluate, use_ema
from flowpp_ref.training import study as study_mod
from flowpp_ref.training.loop import load_model, train
from flowpp_ref.training.weights import export_weights, load_pretrained, load_weights


def _load_data(args, split):
    if args.data == "default":
        return datasets.load_default_dataset(split)[0]
    if args.data == "cifar10":
        if not args.data_dir:
            raise UsageError("--data cifar10 needs --data-dir (a folder with cifar-10-batches-py/ "
                             "or cifar-10-python.tar.gz)")
        return datasets.load_cifar10(args.data_dir, split)[0]
    if args.data == "imagenet32":
        if not args.data_dir:
            raise UsageError("--data imagenet32 needs --data-dir (a folder with the downsampled ImageNet npz files)")
        try:                                         # train_data_batch_*.npz / val_data.npz, memory-mapped
            return datasets.load_imagenet64(args.data_dir, split, cache_dir=getattr(args, "cache_dir", None), size=32)
        except datasets.DataError as e:
            raise UsageError(f"--data imagenet32: {e}") from None
    if args.data in _RELEASE_DATA:                   # the release's other data sets, the user's own
        return _load_release_data(args, split)
    raise UsageError(f"unknown --data {args.data!r}")


# ---- ImageNet 64x64, CelebA (.npy at n bits), a user's images -----------------------------
_RELEASE_DATA = ("imagenet64", "celeba", "images")


def _load_release_data(args, split):

    path = args.data_dir
    if not path:
        raise UsageError(f"--data {args.data} needs --data-dir: " + {
            "imagenet64": "a folder with the downsampled ImageNet 64x64 npz batch files",
            "celeba": "the release's CelebA .npy file (e.g. celeba_full_64x64_5bit.npy)",
            "images": "a folder of PNG/JPEG files, or an .npy/.npz file of uint8 [N, H, W, C] images"}[args.data])
    frac = getattr(args, "test_fraction", 0.0) or 0.0
    if not 0.0 <= frac < 1.0:
        raise UsageError(f"--test-fraction must lie in [0, 1), got {frac}")
    # with no held-out fraction, training has no test set and 'eval' scores every image
    part = split if frac > 0 else ("all" if split == "train" or args.cmd == "eval" else None)
    try:
        if args.data == "imagenet64":
            return datasets.load_imagenet64(path, split, cache_dir=getattr(args, "cache_dir", None))
        if part is None:
            return None
        if args.data == "celeba":
            bits = getattr(args, "data_bits", None)
            if bits is None:
                m = re.search(r"(\d)bit", os.path.basename(path))
                if not m:
                    raise UsageError(f"--data celeba: give --data-bits (the bits of the stored values); "
                                     f"it cannot be read from the name {os.path.basename(path)!r}")
                bits = int(m.group(1))
            return datasets.load_celeba_npy(path, bits, part, test_fraction=frac)
        return datasets.load_user_images(path, part, test_fraction=frac)
    except DataError as e:
        raise UsageError(f"--data {args.data}: {e}") from None


def _overrides(args):
    """The preset fields given on the command line (:func:`flowpp_ref.cli.args.overrides_from_args`)."""
    return cli_args.overrides_from_args(args, (TrainConfig, ModelConfig))


def _add_common(p, seed=True):
    p.add_argument("--backend", default=os.environ.get("FLOWPP_BACKEND", "numpy"), choices=["numpy", "cupy"],
                   help="array backend: numpy (CPU, numba kernels) or cupy (GPU) [default: $FLOWPP_BACKEND or numpy]")
    if seed:                                   # train passes seed=False: its TrainConfig options hold --seed
        cli_args.add_config_options(p, TrainConfig, names=("seed",))
    cli_args.add_debug(p)


def _add_data(p):
    p.add_argument("--data", default="default", choices=["default", "cifar10", "imagenet32", *_RELEASE_DATA],
                   help="data set: 'default' is the small CIFAR-10 subset shipped with the package "
                        "(no download); 'cifar10' reads the official python layout from --data-dir")
    p.add_argument("--data-dir", default=None, help="folder holding the data set files (--data celeba / images: "
                   "the .npy/.npz file or the image folder)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="--data celeba / images: hold out this last fraction as the test set [0: none]")
    p.add_argument("--data-bits", type=int, default=None,
                   help="--data celeba: bits of the stored values [read from the file name, e.g. '3bit']")
    p.add_argument("--cache-dir", default=None,
                   help="--data imagenet64: where the memory-mapped .npy copy is written [--data-dir]")


def _add_distributed(p):
    # data parallel: flowpp_ref.runtime.distributed
    g = p.add_argument_group("data parallel (run under mpiexec -n N or srun)")
    g.add_argument("--distributed", default=None, choices=["auto", "single", "mpi", "nccl"],
                   help="communicator: 'auto' uses MPI (NCCL with --backend cupy) when started by mpiexec/srun "
                        "with several processes [default: $FLOWPP_DISTRIBUTED or auto]")
    g.add_argument("--comm-timeout", type=float, default=None,
                   help="seconds a process waits for the others in one collective before it stops them all "
                        "[default: $FLOWPP_COMM_TIMEOUT or 1800]")


def _comm(args):
    t = getattr(args, "comm_timeout", None)
    if t is not None and not t > 0:
        raise UsageError(f"--comm-timeout must be > 0 seconds, got {t:g}")
    return distributed.get_comm(getattr(args, "distributed", None), backend=args.backend, timeout=t)


def build_parser():
    ap = argparse.ArgumentParser(prog="flowpp", description="Flow++ with hand-written derivatives: "
                                 "train, evaluate (bits/dim) and sample.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model, writing checkpoints, a JSONL log, a curve and samples")
    t.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model/training preset [small]")
    _add_data(t)
    t.add_argument("--out", default="runs/flowpp", help="output folder (checkpoint.npz, log.jsonl, curve.png, "
                   "samples.png, summary.json) [runs/flowpp]")
    t.add_argument("--steps", type=int, default=None, help="total optimiser steps (resumed ones included)")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget in minutes")
    t.add_argument("--samples", type=int, default=64, help="images in the sample grid written at the end [64]")
    t.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/checkpoint.npz exists "
                   "(its checkpoints and log are then replaced)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(t, seed=False)
    # every TrainConfig / ModelConfig field declared with option(...): flowpp_ref.model.presets
    said = ("An option not given keeps the value of --preset; [preset, else D]: D where the preset does not "
            "set it.")
    cli_args.add_config_options(t.add_argument_group("training options", said), TrainConfig)
    cli_args.add_config_options(t.add_argument_group("model options", said), ModelConfig)
    _add_distributed(t)

    e = sub.add_parser("eval", help="bits/dim of a checkpoint on a test set (EMA parameters)")
    e.add_argument("checkpoint", help="checkpoint.npz or a .safetensors weights file")
    _add_data(e)
    e.add_argument("--k", type=int, default=1, help="importance samples of the dequantizer (1: the ELBO; "
                   "the release's evaluation: 4096, each image's copies batched, float64 log-sum-exp)")
    e.add_argument("--batch-size", type=int, default=32, help="images per pass; with --k > 1: (image, sample) "
                   "pairs per pass [32]")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (--k > 1)")
    e.add_argument("--max-batches", type=int, default=None, help="evaluate only this many batches [all]")
    e.add_argument("--out", default=None, help="write the result JSON here")
    _add_common(e)
    _add_distributed(e)

    s = sub.add_parser("sample", help="draw samples from a checkpoint (or the shipped model) into a PNG grid")
    s.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint.npz or a .safetensors weights file [the shipped model, small-cifar10]")
    s.add_argument("--n", type=int, default=64, help="number of samples [64]")
    s.add_argument("--temperature", type=float, default=1.0, help="prior temperature T: z ~ N(0, T^2 I) [1.0]")
    s.add_argument("--out", default="samples.png", help="PNG file [samples.png]")
    _add_common(s)

    x = sub.add_parser("export", help="write a checkpoint's parameters and config as a .safetensors weights file")
    x.add_argument("checkpoint", help="path to checkpoint.npz")
    x.add_argument("--out", required=True, help="the .safetensors file to write")
    x.add_argument("--float16", action="store_true", help="store float16 (half the size) instead of float32")
    x.add_argument("--raw", action="store_true", help="the training parameters instead of their EMA")
    x.add_argument("--info", action="append", default=[], metavar="KEY=VALUE",
                   help="extra metadata, e.g. --info data=cifar10 (repeatable)")
    _add_common(x)

    d = sub.add_parser("demo", help="train the 'small' preset on the embedded images for a few minutes on the CPU")
    d.add_argument("--minutes", type=float, default=4.0, help="training budget [4]")
    d.add_argument("--out", default="runs/demo", help="output folder [runs/demo]")
    _add_common(d)
    _add_study_parser(sub)
    return cli_args.apply_ranges(ap)


def _add_study_parser(sub):
    sc = study_mod.StudyScale()
    st = sub.add_parser("study", help="Flow++, its three ablations, RealNVP and Glow trained side by side over "
                        "seeds at one matched scale (the paper's Tables 1 and 2); resumable")
    st.add_argument("--data", default="default", choices=["default", "cifar10"],
                    help="'default': the embedded CIFAR-10 subset; 'cifar10': the official python layout in --data-dir")
    st.add_argument("--data-dir", default=None, help="folder with cifar-10-batches-py/ (--data cifar10)")
    st.add_argument("--out", default="runs/study", help="study folder (runs/, study.json, table.md, curves.png, "
                    "samples.png); an unfinished study there is continued [runs/study]")
    st.add_argument("--variants", nargs="+", default=list(study_mod.VARIANTS), choices=study_mod.VARIANTS,
                    help=f"variants to train [all: {' '.join(study_mod.VARIANTS)}]")
    st.add_argument("--seeds", type=int, default=sc.seeds, help=f"seeds per variant [{sc.seeds}]")
    st.add_argument("--minutes", type=float, default=sc.minutes, help=f"training minutes per run [{sc.minutes:g}]")
    st.add_argument("--image-size", type=int, default=sc.image_size, choices=[4, 8, 16, 32],
                    help=f"CIFAR-10 averaged over 2x2 (16), 4x4 (8) ... blocks [{sc.image_size}]")
    st.add_argument("--base-preset", default=sc.base_preset, choices=["small", "cpu-bench", "cifar10-paper"],
                    help=f"the Flow++ preset the variants are built from [{sc.base_preset}]")
    st.add_argument("--batch-size", type=int, default=sc.batch_size, help=f"batch size of every run [{sc.batch_size}]")
    st.add_argument("--eval-every", type=int, default=sc.eval_every,
                    help=f"steps between the logged test evaluations (the curves) [{sc.eval_every}]")
    st.add_argument("--eval-images", type=int, default=sc.eval_images,
                    help=f"test images of the final ELBO [{sc.eval_images}]")
    st.add_argument("--iw-k", type=int, default=sc.iw_k, help=f"importance samples of the final bound [{sc.iw_k}]")
    st.add_argument("--iw-images", type=int, default=sc.iw_images,
                    help=f"test images of the importance-weighted bound [{sc.iw_images}]")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(st, seed=False)


def _fit_default(args, x, shape, say=False):
    """``--data default`` for a preset of smaller images (``tiny``: 4x4x3): the embedded 32x32
    images block-averaged to the preset's size (:func:`flowpp_ref.datasets.block_average`), said
    once. Any other data set, or a size that is no whole divisor of 32, is left as it is
    (and refused by the shape check that follows)."""
    h, w, c = shape
    if (args.data != "default" or x is None or tuple(x.shape[1:]) == tuple(shape) or c != x.shape[3]
            or h >= x.shape[1] or x.shape[1] % h or x.shape[2] % w):
        return x
    if say:
        print(f"--data default at {h}x{w}: the embedded {x.shape[1]}x{x.shape[2]} images averaged over "
              f"{x.shape[1] // h}x{x.shape[2] // w} blocks (the preset's image size)")
    return block_average(x, (h, w))


def cmd_train(args, preset=None, data_kind=None):
    preset = preset or args.preset
    ov = _overrides(args)
    comm = _comm(args)                                     # first: NCCL picks this process's GPU
    cli_args.check_train_args(args, preset, ov, comm=comm)            # before any work
    with runfolder.RunFolderLock(args.out, "train", comm=comm):      # until the curve and samples are written
        return _train(args, preset, ov, comm)


def _train(args, preset, ov, comm):
    shape = get_preset(preset, **ov).model.image_shape
    train_x = _fit_default(args, _load_data(args, "train"), shape, say=comm.rank == 0)
    cli_args.check_images_fit(train_x.shape, shape, f"--preset {preset}", args.data)
    test_x = _fit_default(args, _load_data(args, "test"), shape)
    s = train(preset, train_x, test_x, out_dir=args.out, steps=args.steps, minutes=args.minutes,
              backend=args.backend, resume=not getattr(args, "no_resume", False),
              progress=not getattr(args, "no_progress", False), overrides=ov, comm=comm)
    if s.get("already_done") or not s.get("steps_run") or comm.rank != 0:
        return s                                            # train() said why; nothing written (or not rank 0)
    model, ema = s["model"], s["ema"]
    plot_training_curve(os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "curve.png"))
    n = getattr(args, "samples", 64)
    dt, wrote = None, ["checkpoint.npz", "log.jsonl", "curve.png", "summary.json"]
    if n:
        with use_ema(model, ema):
            imgs, dt = model.sample(n, rng=make_rng(0, model.xp), return_time=True)
        save_sample_grid(imgs, os.path.join(args.out, "samples.png"), nrow=int(np.ceil(np.sqrt(n))))
        wrote.insert(3, "samples.png")
    bpd = s["final_train_bpd"]
    print(f"{preset} ({model.cfg.family}): {s['num_parameters']:,} parameters")
    print(f"steps {s['steps']}  final train bits/dim " + (f"{bpd:.4f}" if bpd is not None else "- (no step logged)")
          + (f"  test bits/dim (EMA) {s['test_bpd']:.4f}" if "test_bpd" in s else "")
          + (f"  sampling {n} images: {dt:.2f} s" if dt is not None else ""))
    print(f"wrote {args.out}/" + ", ".join(wrote))
    return s


def _output_lock(path, purpose, comm=None):
    """The lock of the folder that ``path`` is written into when that folder is a run folder
    (:func:`flowpp_ref.runtime.runfolder.is_run_folder`; rank 0 decides for every rank),
    else (or for no ``path``) a context that does nothing: an eval/sample writing into a
    folder a training run is using is refused (:class:`~flowpp_ref.runtime.runfolder.RunFolderBusy`);
    reading a checkpoint of that folder is not."""
    folder = (os.path.dirname(path) or ".") if path else None
    flag = np.array([1.0 if folder and runfolder.is_run_folder(folder) else 0.0])
    if comm is not None and comm.size > 1:
        comm.broadcast(flag)                                # every rank takes the same branch
    return runfolder.RunFolderLock(folder, purpose, comm=comm) if flag[0] else contextlib.nullcontext()


def cmd_eval(args):
    comm = _comm(args)
    with _output_lock(args.out, "eval", comm):                # refused at once in a run folder in use
        return _eval(args, comm)


def _eval(args, comm):
    model, p, _ = _load_any(args.checkpoint, args.backend)
    x = _load_data(args, "test")
    x = _fit_default(args, x, p.model.image_shape)
    cli_args.check_images_fit(x.shape, p.model.image_shape, f"checkpoint {args.checkpoint}", args.data)
    if p.model.n_bits < 8:
        x = reduce_bits(x, p.model.n_bits)
    r = evaluate(model, x, batch_size=args.batch_size, max_batches=args.max_batches, k=args.k,
                 seed=args.seed or 0, progress=args.k > 1 and not args.no_progress,
                 label=f"checkpoint {args.checkpoint} (EMA parameters) on --data {args.data}", comm=comm)
    r["checkpoint"] = args.checkpoint
    if comm.rank != 0:
        return r
    text = json.dumps(r, indent=2, allow_nan=False)       # strict JSON: evaluate() refuses non-finite results
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return r


def cmd_sample(args):
    if launched_rank() != 0:                                # under mpiexec: rank 0 samples
        return None
    with _output_lock(args.out, "sample"):                   # refused at once in a run folder in use
        model, _, meta = _load_any(args.checkpoint, args.backend)
        if args.checkpoint is None:
            print(f"no checkpoint given: sampling the shipped model small-cifar10 ({meta.get('trained', '')})")
        imgs, dt = model.sample(args.n, rng=make_rng(args.seed or 0, model.xp), temperature=args.temperature,
                                return_time=True)
        save_sample_grid(imgs, args.out, nrow=int(np.ceil(np.sqrt(args.n))))
    print(f"sampled {args.n} images in {dt:.3f} s -> {args.out}")
    return imgs


def _load_any(path, backend):
    """(model, preset, metadata) of a checkpoint.npz, a .safetensors weights file, or (None) the shipped model."""
    if path is None:
        return load_pretrained("small-cifar10", backend=backend)
    if str(path).endswith(".safetensors"):
        return load_weights(path, backend=backend)
    model, p, _ = load_model(path, backend=backend)
    return model, p, {}


def cmd_export(args):
    info = {}
    for item in args.info:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--info {item!r}: expected KEY=VALUE")
        info[key] = value
    path = export_weights(args.checkpoint, args.out, use_ema=not args.raw, dtype="float16" if args.float16 else "float32",
                          info=info)
    print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.2f} MiB, {'raw' if args.raw else 'EMA'} parameters, "
          f"{'float16' if args.float16 else 'float32'})")
    return path


def cmd_demo(args):
    args.data, args.data_dir, args.steps, args.no_resume, args.no_progress = "default", None, None, True, False
    print(f"flowpp demo: training the 'small' preset on the embedded CIFAR-10 subset for {args.minutes:g} min "
          f"({args.backend})")
    return cmd_train(args, preset="small")


def _study_scale(args) -> "study_mod.StudyScale":
    for name, lo in (("seeds", 1), ("batch_size", 1), ("eval_every", 1), ("eval_images", 1), ("iw_k", 1),
                     ("iw_images", 1)):
        if getattr(args, name) < lo:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {getattr(args, name)}")
    if not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes:g}")
    return study_mod.StudyScale(image_size=args.image_size, base_preset=args.base_preset, minutes=args.minutes,
                                seeds=args.seeds, batch_size=args.batch_size, eval_every=args.eval_every,
                                eval_batches=max(1, 64 // args.batch_size), eval_images=args.eval_images,
                                iw_k=args.iw_k, iw_images=args.iw_images)


def _study_meta(args, train_x) -> dict:
    """What a reader of study.json needs besides the settings: the command, the data, the machine."""
    return {"command": "flowpp " + " ".join(sys.argv[1:]) if sys.argv and "flowpp" in sys.argv[0] else None,
            "data": args.data, "train_images": int(len(train_x)), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
            f"numpy {np.__version__}", "backend": args.backend}


def cmd_study(args):
    scale = _study_scale(args)
    size = (scale.image_size, scale.image_size)
    train_x, test_x = (datasets.block_average(_load_data(args, split), size) for split in ("train", "test"))
    n_runs = scale.seeds * len(args.variants)
    print(f"flowpp study: {n_runs} runs ({len(args.variants)} variants x {scale.seeds} seeds) of {scale.minutes:g} "
          f"min on {len(train_x):,} CIFAR-10 training images at {size[0]}x{size[1]}, into {args.out}/")
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=round(n_runs * scale.minutes * 60), unit="s", desc="study",
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s of training [{elapsed}<{remaining}]")
    try:
        st = study_mod.run_study(args.out, train_x, test_x, scale, args.variants, backend=args.backend,
                                 progress=None if bar is None else bar.update, meta=_study_meta(args, train_x))
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    files = write_report(st, args.out)
    print(table_markdown(st))
    print(f"wrote {args.out}/" + ", ".join(files))
    return st


def main(argv=None):
    """Entry point of the ``flowpp`` script; returns the exit status (0 ok, 1 diverged, 2 error,
    130/143 stopped by SIGINT/SIGTERM after a checkpoint; see :func:`flowpp_ref.cli.args.run`)."""
    args = build_parser().parse_args(argv)
    return cli_args.run({"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "export": cmd_export,
                         "demo": cmd_demo, "study": cmd_study}[args.cmd],
                        args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
