"""Learning-rate schedules: constant, linear warmup, warmup then cosine decay (Megatron's shapes)."""

import math

from mpmp.errors import ConfigError

SCHEDULES = ("constant", "warmup", "cosine")


def learning_rate(
    step: int, lr: float, schedule: str = "constant", warmup: int = 0, total: int = 1, min_lr: float = 0.0
) -> float:
    """The rate for 0-based step `step`.

    warmup: lr * (step + 1) / warmup for the first `warmup` steps (then constant, or cosine).
    cosine: from lr down to min_lr along half a cosine between the end of warmup and `total`.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    if schedule != "constant" and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    return lr
