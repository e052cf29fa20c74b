"""Learning-rate schedules as pure functions of progress, so resuming needs no scheduler state."""
from __future__ import annotations

import math


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    All schedules warm up linearly over ``warmup_steps``; then ``cosine`` follows a half cosine
    to zero, ``onecycle`` falls linearly to zero (the triangular cycle of fast CIFAR training),
    and ``constant`` stays at one.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        return max(0.0, 1 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")
