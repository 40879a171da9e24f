"""The learning-rate schedule of the job: a multiplier per optimizer step, for ``LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def lr_lambda(args: Any, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warm-up, then linear, cosine or constant."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        if args.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        if args.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor
