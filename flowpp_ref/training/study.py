"""The paper's comparisons at one matched scale: Flow++, its three ablations, RealNVP and Glow.

The Flow++ paper argues with two tables (revised numbering): Table 1 compares it with RealNVP and Glow
on CIFAR-10 (3.49, 3.35, 3.09 bits/dim), Table 2 ablates its three changes after the same training
(uniform dequantization 3.292, affine coupling 3.200, no self-attention 3.193, Flow++ 3.165; the first
submission's Table 1, after 164 epochs: 3.305, 3.226, 3.233, 3.180). A *study* trains each variant at
one small scale, over several seeds, for the same time budget, and reports test bits/dim beside those
numbers.

**Variants** (:data:`VARIANTS`), each built from a base preset (default ``small``) and the lineage
presets (``realnvp-small``, ``glow-small``):

* ``flowpp``: the base preset;
* ``uniform-dequant``, ``affine``: the release's ablations (``abl_nodequant.py``, ``abl_nomixlog.py``),
  which widen the coupling networks to keep the parameter count: the filters are chosen here the
  same way, the width whose count is closest to ``flowpp``'s (the affine ablation widens the main flow's
  and the dequantizer's networks together, as the release does);
* ``no-attention``: the release's ``abl_noattn.py``, the gated pointwise block in the attention slot
  (the same count by construction);
* ``realnvp``, ``glow``: the lineage presets at the same image size, their width matched the same way.

Every variant keeps its own optimiser recipe (the preset's; Glow's is Adamax) but shares the batch size,
the seed (hence the data order), the time budget, the evaluation protocol and the data.

**Protocol.** Run ``(variant, seed)`` trains in ``<study>/runs/<variant>-seed<seed>/``, an ordinary run
folder (checkpoint, ``log.jsonl``, ``summary.json``), for ``minutes`` of training time (``time_s`` in
the log: the data-dependent init and the evaluations are not counted). Every ``eval_every`` steps the
training loop logs the test bits/dim with the EMA parameters on the first ``eval_batches`` test batches:
the curves, and the comparison at equal steps (the largest evaluated step every run reached). At the end
the EMA parameters are scored on ``eval_images`` test images: the ELBO (k = 1) and the
importance-weighted bound at ``iw_k`` samples on the first ``iw_images``; the result goes to
``study_result.json`` in the run folder. A killed study continues where it stopped: a finished run is
read back, an unfinished one resumes from its checkpoint with the training time it has left.

**Scale** (:class:`StudyScale`): by default the images are CIFAR-10 averaged over 2x2 blocks to 16x16
(:func:`flowpp_ref.datasets.block_average`), so that 18 runs (6 variants x 3 seeds) of 6 minutes fit in 2 hours on 2 cores;
``--image-size 32 --base-preset cpu-bench --minutes 60`` (or a GPU backend) scales every run up.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from flowpp_ref.model.paramcount import count_parameters
from flowpp_ref.model.presets import Preset, get_preset
from flowpp_ref.model.release import RELEASE
from flowpp_ref.runtime import runfolder
from flowpp_ref.training.evaluation import evaluate
from flowpp_ref.training.loop import build_model, load_model, train

VARIANTS = ("flowpp", "uniform-dequant", "affine", "no-attention", "realnvp", "glow")

# The paper's CIFAR-10 test bits/dim (revised text): Table 1 (density) and Table 2 (ablations, 400 epochs);
# "first" is the first submission's ablation table (164 epochs).
PAPER = {
    "flowpp": {"table": "Table 1 / Table 2", "bpd": RELEASE["cifar10"].paper_bpd, "ablation_bpd": 3.165,
               "first": 3.180},
    "uniform-dequant": {"table": "Table 2", "bpd": RELEASE["cifar10-uniform-dequant"].paper_bpd, "first": 3.305},
    "affine": {"table": "Table 2", "bpd": RELEASE["cifar10-affine"].paper_bpd, "first": 3.226},
    "no-attention": {"table": "Table 2", "bpd": RELEASE["cifar10-no-attention"].paper_bpd, "first": 3.233},
    "realnvp": {"table": "Table 1", "bpd": 3.49},
    "glow": {"table": "Table 1", "bpd": 3.35},
}

RESULT_NAME = "study_result.json"


@dataclasses.dataclass
class StudyScale:
    """Everything that sets the size of a study (the same for every variant)."""
    image_size: int = 16                 # CIFAR-10 averaged over (32 / image_size)^2 blocks
    base_preset: str = "small"
    realnvp_preset: str = "realnvp-small"
    glow_preset: str = "glow-small"
    minutes: float = 6.0                 # training time of each run
    seeds: int = 3
    batch_size: int = 16
    eval_every: int = 100                # steps between the logged test evaluations
    eval_batches: int = 4                # batches of batch_size test images in each of them
    eval_images: int = 1000              # the final ELBO
    iw_k: int = 16                       # the final importance-weighted bound ...
    iw_images: int = 200                 # ... on this many test images


def _base_overrides(scale: StudyScale, seed: int) -> dict:
    s = scale.image_size
    return dict(image_shape=(s, s, 3), batch_size=scale.batch_size, seed=seed, eval_every=scale.eval_every,
                eval_batches=scale.eval_batches, checkpoint_every=max(scale.eval_every, 50))


def _count(preset: Preset) -> int:
    """Parameters of a preset's model: from shapes for Flow++, by building RealNVP / Glow."""
    if preset.model.family == "flowpp":
        return count_parameters(preset.model)
    return build_model(preset).num_parameters()


def _closest_width(make, target: int, step: int = 4, hi: int = 512):
    """The width w (a multiple of ``step``, the heads of the attention, up to ``hi``) whose ``make(w)``
    preset has the parameter count closest to ``target`` (counts grow with w: bisection, then the
    better neighbour)."""
    lo, hi = 1, hi // step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _count(make(mid * step)) < target:
            lo = mid
        else:
            hi = mid
    return step * min((lo, hi), key=lambda m: abs(_count(make(m * step)) - target))


def variant_preset(name: str, scale: StudyScale, seed: int = 0) -> Preset:
    """The preset of one variant at ``scale`` (widths matched to ``flowpp``'s parameter count)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    ov = _base_overrides(scale, seed)
    base = get_preset(scale.base_preset, **ov)
    target = count_parameters(base.model)
    if name == "flowpp":
        return base
    if name == "no-attention":
        return get_preset(scale.base_preset, mixer="gated-nin", **ov)
    if name == "uniform-dequant":
        make = lambda w: get_preset(scale.base_preset, dequantization="uniform", filters=w, **ov)  # noqa: E731
    elif name == "affine":
        ratio = base.model.dequant_filters / base.model.filters
        make = lambda w: get_preset(scale.base_preset, coupling="affine", filters=w,  # noqa: E731
                                    dequant_filters=max(4, 4 * round(w * ratio / 4)), **ov)
    else:
        lineage = scale.realnvp_preset if name == "realnvp" else scale.glow_preset
        make = lambda w: get_preset(lineage, filters=w, **ov)  # noqa: E731
        return make(_closest_width(make, target))
    return make(_closest_width(make, target))


def plan(scale: StudyScale, variants=VARIANTS) -> list[dict]:
    """The runs of a study, seeds in the outer loop (a partial study has every variant of seed 0 first):
    ``[{"variant", "seed", "name", "preset"}, ...]``."""
    return [{"variant": v, "seed": s, "name": f"{v}-seed{s}", "preset": variant_preset(v, scale, s)}
            for s in range(scale.seeds) for v in variants]


def _trained_seconds(run_dir: str):
    """(training seconds at the checkpoint, its step), from the checkpoint and ``log.jsonl``; (0, 0) if none."""
    ck = os.path.join(run_dir, runfolder.CKPT_NAME)
    if not os.path.exists(ck):
        return 0.0, 0
    step = runfolder.read_checkpoint_step(ck)
    t = 0.0
    for rec in runfolder.read_jsonl(os.path.join(run_dir, runfolder.LOG_NAME)):
        if rec.get("step", math.inf) <= step and "train_bpd" in rec and "time_s" in rec:
            t = float(rec["time_s"])
    return t, step


def evaluate_run(run_dir: str, test_images, scale: StudyScale, *, backend="numpy") -> dict:
    """The final scores of a trained run with its EMA parameters: the ELBO on ``eval_images`` test
    images and the importance-weighted bound at ``iw_k`` on ``iw_images``."""
    model, _, _ = load_model(os.path.join(run_dir, runfolder.CKPT_NAME), backend=backend, use_ema_params=True)
    bs = scale.batch_size
    elbo = evaluate(model, test_images[:scale.eval_images], batch_size=bs, k=1, seed=1)
    iw = evaluate(model, test_images[:scale.iw_images], batch_size=bs, k=scale.iw_k, seed=1)
    return {"test_bpd": elbo["bpd"], "test_bpd_sem": elbo["bpd_sem"], "eval_images": elbo["num_images"],
            "iw_bpd": iw["bpd"], "iw_bpd_sem": iw["bpd_sem"], "iw_k": scale.iw_k, "iw_images": iw["num_images"],
            "num_parameters": model.num_parameters()}


def run_one(run: dict, study_dir: str, train_images, test_images, scale: StudyScale, *, backend="numpy",
            on_seconds=None) -> dict:
    """Train (or resume, or read back) one run of the study and score it; returns its result record."""
    run_dir = os.path.join(study_dir, "runs", run["name"])
    result_path = os.path.join(run_dir, RESULT_NAME)
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    done_s, _ = _trained_seconds(run_dir)
    left = scale.minutes * 60.0 - done_s
    if left > 0.5:
        last = [time.perf_counter()]

        def tick(step, rec):                    # the study's progress bar: seconds of this run's budget
            now = time.perf_counter()
            if on_seconds is not None:
                on_seconds(now - last[0])
            last[0] = now
        train(run["preset"], train_images, test_images, out_dir=run_dir, minutes=left / 60.0, backend=backend,
              progress=False, on_step=tick, report=lambda msg: None)
    trained_s, steps = _trained_seconds(run_dir)
    res = {"variant": run["variant"], "seed": run["seed"], "name": run["name"], "steps": steps,
           "train_seconds": trained_s, **evaluate_run(run_dir, test_images, scale, backend=backend)}
    runfolder.atomic_write_text(result_path, json.dumps(res, indent=2, allow_nan=False))
    return res


# ------------------------------------------------------------------ the whole study
def _scale_record(scale: StudyScale, variants) -> dict:
    return {"scale": dataclasses.asdict(scale), "variants": list(variants)}


def check_study_folder(study_dir: str, scale: StudyScale, variants) -> None:
    """Write ``study_config.json`` in a new study folder; in an existing one, refuse a different scale
    or variant list (its runs would not be comparable), saying which settings differ."""
    path = os.path.join(study_dir, "study_config.json")
    want = _scale_record(scale, variants)
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        diff = [f"{k} {have.get('scale', {}).get(k)!r} there, {v!r} asked" for k, v in want["scale"].items()
                if have.get("scale", {}).get(k) != v]
        if have.get("variants") != want["variants"]:
            diff.append(f"variants {have.get('variants')} there, {want['variants']} asked")
        if diff:
            raise ValueError(f"{study_dir} holds a study with other settings ({'; '.join(diff)}): give the same "
                             "settings to continue it, or another --out for a new study")
        return
    os.makedirs(study_dir, exist_ok=True)
    runfolder.atomic_write_text(path, json.dumps(want, indent=2))


def run_curves(run_dir: str) -> dict:
    """A run's logged curves: ``{"eval": [(step, time_s, test_bpd)], "train": [(step, time_s, train_bpd)]}``."""
    recs = runfolder.read_jsonl(os.path.join(run_dir, runfolder.LOG_NAME))
    ev = [(r["step"], r["time_s"], r["test_bpd"]) for r in recs if "test_bpd" in r and "time_s" in r]
    tr = [(r["step"], r["time_s"], r["train_bpd"]) for r in recs if "train_bpd" in r and "time_s" in r]
    return {"eval": ev, "train": tr}


def _mean_sd(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def summarize(results: list[dict], curves: dict, variants) -> dict:
    """``curves``: run name -> its evaluations ``[(step, time_s, test_bpd), ...]``. Per variant: parameters, steps, the final ELBO and importance-weighted bound, and the test
    bits/dim at equal steps (the largest evaluated step that every run reached), each as mean and
    sample standard deviation over the seeds; beside the paper's numbers."""
    last_eval = [max((s for s, _, _ in curves[r["name"]]), default=0) for r in results]
    equal_step = min(last_eval) if last_eval else 0
    out = {"equal_step": equal_step, "variants": {}}
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        at_eq = [next((b for s, _, b in curves[r["name"]] if s == equal_step), None) for r in rs]
        out["variants"][v] = {
            "num_parameters": rs[0]["num_parameters"] if rs else None, "seeds": [r["seed"] for r in rs],
            "steps": _mean_sd([r["steps"] for r in rs]), "test_bpd": _mean_sd([r["test_bpd"] for r in rs]),
            "iw_bpd": _mean_sd([r["iw_bpd"] for r in rs]), "bpd_at_equal_step": _mean_sd(at_eq),
            "paper": PAPER[v]}
    return out


def run_study(study_dir: str, train_images, test_images, scale: StudyScale, variants=VARIANTS, *,
              backend="numpy", progress=None, meta=None) -> dict:
    """Run (or continue) a study; writes ``study.json`` (plan, per-run results, the evaluation curves,
    summary) and
    returns it. ``progress(seconds)`` is called as training time passes (for a progress bar); ``meta``
    (the command, the machine) is stored as it is."""
    check_study_folder(study_dir, scale, variants)
    runs = plan(scale, variants)
    results, curves = [], {}
    for run in runs:
        results.append(run_one(run, study_dir, train_images, test_images, scale, backend=backend,
                               on_seconds=progress))
        curves[run["name"]] = run_curves(os.path.join(study_dir, "runs", run["name"]))["eval"]
    study = {**_scale_record(scale, variants), "meta": meta or {}, "image_shape": list(runs[0]["preset"].model.image_shape),
             "runs": results, "curves": curves, "summary": summarize(results, curves, variants),
             "presets": {r["name"]: {"preset": r["preset"].name, "model": dataclasses.asdict(r["preset"].model),
                                     "train": dataclasses.asdict(r["preset"].train)} for r in runs}}
    runfolder.atomic_write_text(os.path.join(study_dir, "study.json"), json.dumps(study, indent=1, allow_nan=False))
    return study
