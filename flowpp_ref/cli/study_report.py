"""What a study (:mod:`flowpp_ref.training.study`) writes beside its runs: ``table.md`` (mean and
spread over seeds beside the paper's Tables 1 and 2), ``curves.png`` (test bits/dim against steps and
against training time, one line per variant, the seeds' range shaded: the paper's Figure 1) and
``samples.png`` (a row of samples per variant, from each variant's first seed).

Figures are drawn on an Agg canvas, as in :mod:`flowpp_ref.cli.plotting` (matplotlib loaded only to draw).
"""
from __future__ import annotations

import os

import numpy as np

from flowpp_ref.cli.plotting import make_grid
from flowpp_ref.core.backend import make_rng
from flowpp_ref.runtime import runfolder
from flowpp_ref.training.loop import load_model

LABELS = {"flowpp": "Flow++", "uniform-dequant": "uniform dequantization", "affine": "affine coupling",
          "no-attention": "no self-attention", "realnvp": "RealNVP", "glow": "Glow"}


def _pm(stat, digits=3):
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def table_markdown(study: dict) -> str:
    """The study's table: one row per variant, mean ± sample standard deviation over the seeds."""
    sc, summ = study["scale"], study["summary"]
    h, w, _ = study["image_shape"]
    k = sc["iw_k"]
    lines = [f"CIFAR-10 at {h}x{w}, {sc['minutes']:g} min of training per run, {sc['seeds']} seed(s); "
             f"test bits/dim with the EMA parameters (ELBO on {sc['eval_images']} test images, the "
             f"importance-weighted bound at k = {k} on {sc['iw_images']}; at step {summ['equal_step']}, the "
             f"largest step every run reached, on the periodic evaluation's "
             f"{sc['eval_batches'] * sc['batch_size']} images). Mean ± sd over seeds.", "",
             f"| variant | parameters | steps | test bpd (ELBO) | test bpd (k = {k}) | bpd at step "
             f"{summ['equal_step']} | paper, CIFAR-10 32x32 | paper, first submission |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in summ["variants"].items():
        paper = r["paper"]
        lines.append(f"| {LABELS.get(v, v)} | {r['num_parameters']:,} | {_pm(r['steps'], 0)} | {_pm(r['test_bpd'])} | "
                     f"{_pm(r['iw_bpd'])} | {_pm(r['bpd_at_equal_step'])} | {paper['bpd']:.3f} ({paper['table']}) | "
                     f"{paper.get('first', '-')} |")
    return "\n".join(lines) + "\n"


def _band(ax, xs, ys, label, color):
    """The seeds' mean on a common x grid, with their range shaded."""
    lo = max(x[0] for x in xs)
    hi = min(x[-1] for x in xs)
    if not hi > lo:
        return
    grid = np.linspace(lo, hi, 100)
    vals = np.array([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    ax.plot(grid, vals.mean(0), color=color, label=label, lw=1.5)
    if len(vals) > 1:
        ax.fill_between(grid, vals.min(0), vals.max(0), color=color, alpha=0.2, lw=0)


def plot_curves(study: dict, path: str) -> None:
    """Test bits/dim (periodic evaluations, EMA) against steps and against training minutes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for i, v in enumerate(study["variants"]):
        runs = [r for r in study["runs"] if r["variant"] == v]
        evs = [np.array(study["curves"][r["name"]], dtype=np.float64) for r in runs]
        evs = [e for e in evs if len(e) > 1]
        if not evs:
            continue
        color = f"C{i}"
        _band(axes[0], [e[:, 0] for e in evs], [e[:, 2] for e in evs], LABELS.get(v, v), color)
        _band(axes[1], [e[:, 1] / 60 for e in evs], [e[:, 2] for e in evs], LABELS.get(v, v), color)
    finals = [r["test_bpd"] for r in study["runs"]]
    if finals:                                    # the end of training, not the first steps, decides the scale
        axes[0].set_ylim(min(finals) - 0.1, max(finals) + 0.6)
    axes[0].set(xlabel="training step", ylabel="test bits/dim (EMA)", title="against steps")
    axes[1].set(xlabel="training time (min)", title="against time")
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    h, w, _ = study["image_shape"]
    fig.suptitle(f"CIFAR-10 {h}x{w}: mean over seeds, range shaded", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def sample_rows(study: dict, study_dir: str, n: int = 8, temperature: float = 1.0) -> dict:
    """``{variant: uint8 [n, H, W, C]}``: samples of each variant's first run (EMA parameters)."""
    rows = {}
    for v in study["variants"]:
        run = next(r for r in study["runs"] if r["variant"] == v)
        model, _, _ = load_model(os.path.join(study_dir, "runs", run["name"], runfolder.CKPT_NAME))
        rows[v] = model.sample(n, rng=make_rng(0, model.xp), temperature=temperature)
    return rows


def save_sample_rows(rows: dict, path: str, scale: int = 3) -> None:
    """One row per variant, its name on the left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = list(rows)
    fig = Figure(figsize=(9, 1.0 * len(names) + 0.3))
    FigureCanvasAgg(fig)
    for i, v in enumerate(names):
        ax = fig.add_subplot(len(names), 1, i + 1)
        ax.imshow(make_grid(np.asarray(rows[v]), nrow=len(rows[v])), interpolation="nearest")
        ax.set_axis_off()
        ax.text(-0.01, 0.5, LABELS.get(v, v), transform=ax.transAxes, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.98, bottom=0.02, hspace=0.15)
    fig.savefig(path, dpi=30 * scale)


def write_report(study: dict, study_dir: str) -> list[str]:
    """``table.md``, ``curves.png`` and ``samples.png`` in the study folder; returns their names."""
    runfolder.atomic_write_text(os.path.join(study_dir, "table.md"), table_markdown(study))
    plot_curves(study, os.path.join(study_dir, "curves.png"))
    save_sample_rows(sample_rows(study, study_dir), os.path.join(study_dir, "samples.png"))
    return ["study.json", "table.md", "curves.png", "samples.png"]
