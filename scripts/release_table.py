"""Print the README's table of the release's presets (parameter counts, paper bits/dim, FLOP estimates).

    PYTHONPATH=. python scripts/release_table.py [--tflops 10]

Counts come from shapes (flowpp_ref.model.paramcount, flowpp_ref.model.release); costs are FLOP
estimates (2 x multiply-adds of convs, dense layers and attention products; a training
step = 3 x forward), converted to time at an assumed sustained throughput -- estimates,
not measurements.
"""
import argparse

from flowpp_ref.model.paramcount import count_parameters, describe
from flowpp_ref.model.presets import PRESETS, RELEASE_OF
from flowpp_ref.model.release import RELEASE, forward_flops, run_steps


def _t(seconds):
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tflops", type=float, default=10.0, help="assumed sustained TFLOP/s of one GPU [10]")
    a = ap.parse_args()
    rate = a.tflops * 1e12
    print("| preset | release file | parameters: ours / release | paper bits/dim | forward GFLOP per image "
          "| one training step (batch): est. | the release's run: steps, est. on one GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, key in RELEASE_OF.items():
        rc, p = RELEASE[key], PRESETS[name]
        ours = count_parameters(p.model)
        fwd_ours = forward_flops(describe(p.model))
        step = 3 * fwd_ours * p.train.batch_size
        steps = run_steps(rc)
        bpd = f"{rc.paper_bpd}" if rc.paper_bpd else "not reported"
        print(f"| `{name}` | `{rc.source}` | {ours:,} / {rc.stated_params:,} | {bpd} | {fwd_ours / 1e9:.1f} "
              f"| {step / 1e12:.2f} TFLOP ({p.train.batch_size}): {_t(step / rate)} "
              f"| {steps:,}: {_t(steps * step / rate)} |")


if __name__ == "__main__":
    main()
