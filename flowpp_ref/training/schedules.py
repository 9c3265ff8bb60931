"""Learning-rate schedules: the linear warm-up of the paper, or one of the release's
piecewise schedules by name (``TrainConfig.lr_schedule``; see :mod:`flowpp_ref.model.release`).

``learning_rate(step, tc)`` is what the training loop calls, with ``step`` the 1-based
number of the update about to be applied (as :func:`flowpp_ref.training.optim.warmup_lr`).
"""
from __future__ import annotations

from flowpp_ref.model.release import SCHEDULES
from flowpp_ref.training.optim import warmup_lr


def learning_rate(step: int, tc) -> float:
    """The learning rate of update ``step`` for the training config ``tc``.

    ``tc.lr_schedule`` None: ``warmup_lr(step, tc.lr, tc.warmup_steps)`` (linear warm-up,
    then constant). A name of :data:`flowpp_ref.model.release.SCHEDULES`: that launcher's
    piecewise schedule (its own peak and warm-up; ``tc.lr`` and ``tc.warmup_steps``
    are then informational only).
    """
    name = getattr(tc, "lr_schedule", None)
    if name is None:
        return warmup_lr(step, tc.lr, tc.warmup_steps)
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; choose one of {sorted(SCHEDULES)} or None")
    return float(SCHEDULES[name](step))
